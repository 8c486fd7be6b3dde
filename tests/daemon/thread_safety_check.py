#!/usr/bin/env python3
"""memfitd's locks, checked by the compiler: every file of server/daemon/ and
server/store/ compiled again with clang's -Wthread-safety (as errors), with the flags
CMake used for it (compile_commands.json). A member marked ABSL_GUARDED_BY(mu_) touched
without mu_ held, or a function marked ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) called without
it, fails this test. Exit 77 (skipped) without clang.

    python3 tests/daemon/thread_safety_check.py BUILD_DIR [CLANG++]
"""
import json
import os
import shlex
import shutil
import subprocess
import sys

build = sys.argv[1] if len(sys.argv) > 1 else "build"
clang = sys.argv[2] if len(sys.argv) > 2 else (shutil.which("clang++") or shutil.which("clang++-14"))
if not clang:
    print("thread-safety check: no clang++ here; skipped")
    sys.exit(77)
with open(os.path.join(build, "compile_commands.json")) as f:
    commands = json.load(f)
repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
wanted = [os.path.join(repo, "server", d) for d in ("daemon", "store")]
# gcc flags clang does not know, and the output: this only analyses.
drop_prefix = ("-o", "-MD", "-MT", "-MF", "-fno-fat-lto", "-Wno-dangling-pointer")
failed = 0
checked = 0
for c in commands:
    src = os.path.abspath(os.path.join(c["directory"], c["file"]))
    if not any(src.startswith(w + os.sep) for w in wanted):
        continue
    args = c["arguments"] if "arguments" in c else shlex.split(c["command"])
    out, skip = [clang], False
    for a in args[1:]:
        if skip:
            skip = False
            continue
        if a in ("-o", "-MT", "-MF"):
            skip = True
            continue
        if a.startswith(drop_prefix) or a == "-c" or a.endswith("ccache"):
            continue
        out.append(a)
    if os.path.basename(out[1]) in ("g++", "c++") or out[1].endswith("/g++"):
        out.pop(1)  # ccache launcher form: "ccache g++ ..."
    out += ["-fsyntax-only", "-Wthread-safety", "-Werror=thread-safety", "-Wno-unknown-warning-option"]
    r = subprocess.run(out, cwd=c["directory"], capture_output=True, text=True)
    checked += 1
    diags = [l for l in r.stderr.splitlines() if "thread-safety" in l or "error:" in l]
    if r.returncode != 0:
        failed += 1
        print(f"FAIL {os.path.relpath(src, repo)}")
        print("\n".join(diags[:40]) or r.stderr[-4000:])
    else:
        print(f"ok   {os.path.relpath(src, repo)}")
print(f"{checked - failed} passed, {failed} failed")
sys.exit(1 if failed or checked == 0 else 0)
