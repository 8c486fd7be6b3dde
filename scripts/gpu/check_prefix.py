#!/usr/bin/env python3
"""Checks that a build used nothing from the system beyond the compiler's own runtime,
LibTorch and CUDA: every header it compiled (ninja's dependency log), every library it
linked (build.ninja's link lines) and every library its programs load (ldd) must lie in
the private prefix, the source or build tree, LibTorch, CUDA, or the C/C++ runtime. The
GPU machine has nothing else, so whatever this lets through would break the build there.

    python3 scripts/gpu/check_prefix.py --build build-rehearse --prefix PREFIX \
        --torch-lib DIR [--torch-include DIR ...] [--programs bin/memfit-worker ...]

Exit 0 when clean; else prints each offending path with the package that owns it.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

# The toolchain's and C library's own files, by Debian or Ubuntu package name.
RUNTIME_PACKAGES = re.compile(
    r"^(libc6|libc6-dev|linux-libc-dev|libc-dev-bin|libcrypt-dev|libcrypt1|libnsl-dev|libtirpc-dev|"
    r"libstdc\+\+6|libstdc\+\+-\d+-dev|libgcc-s1|libgcc-\d+-dev|gcc-\d+|g\+\+-\d+|cpp-\d+|"
    r"libgomp1|libatomic1|libquadmath0|libasan\d|libubsan\d|libtsan\d)$")
RUNTIME_LIBS = re.compile(
    r"^(ld-linux-x86-64|libc|libm|libdl|librt|libpthread|libstdc\+\+|libgcc_s|libgomp|libatomic|"
    r"libutil|libresolv)\.so")
# The NVIDIA driver's libraries (libcuda, libnvidia-ml) come with the machine.
DRIVER_LIBS = re.compile(r"^(libcuda|libnvidia-|libnvrtc|libcudart|libcublas|libcudnn)")


def owners(paths):
    """Path -> owning package (dpkg -S), '' when no package owns it or dpkg is absent."""
    out = {p: "" for p in paths}
    if not paths or not shutil.which("dpkg"):
        return out
    todo = sorted(paths)
    for i in range(0, len(todo), 500):
        chunk = todo[i:i + 500]
        p = subprocess.run(["dpkg", "-S"] + chunk, capture_output=True, text=True)
        for line in p.stdout.splitlines():
            if ": " not in line:
                continue
            pkgs, path = line.split(": ", 1)
            if path in out:
                out[path] = pkgs.split(",")[0].split(":")[0].strip()
    # dpkg names files by the path it installed them at (/lib vs /usr/lib on merged-/usr).
    alias = {}
    for p in todo:
        if not out[p] and p.startswith("/usr/lib/"):
            alias[p[4:]] = p
        elif not out[p] and p.startswith("/lib/"):
            alias["/usr" + p] = p
    if alias:
        p = subprocess.run(["dpkg", "-S"] + sorted(alias), capture_output=True, text=True)
        for line in p.stdout.splitlines():
            if ": " in line:
                pkgs, path = line.split(": ", 1)
                if path in alias:
                    out[alias[path]] = pkgs.split(",")[0].split(":")[0].strip()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", required=True)
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--torch-lib", required=True, help="the folder of libtorch.so")
    ap.add_argument("--torch-include", action="append", default=[],
                    help="LibTorch's header folders (TORCH_INCLUDE_DIRS)")
    ap.add_argument("--torch-package", action="append", default=[],
                    help="packages that are LibTorch here (Debian: libtorch-dev and the -dev "
                         "packages its headers include)")
    ap.add_argument("--programs", nargs="*", default=[], help="programs to check with ldd")
    a = ap.parse_args()

    build = os.path.realpath(a.build)
    prefix = os.path.realpath(a.prefix)
    torch_lib = os.path.realpath(a.torch_lib)
    allowed_roots = [prefix, os.path.realpath(REPO), build, "/usr/local/cuda", "/usr/lib/gcc",
                     os.path.realpath("/usr/local/cuda")]
    allowed_roots += [os.path.realpath(p) for p in a.torch_include]
    allowed_roots.append(torch_lib)
    # A compiler installed in its own prefix (the GPU machine's /opt/gcc) brings its runtime.
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx:
        cxx_prefix = os.path.dirname(os.path.dirname(os.path.realpath(cxx)))
        if cxx_prefix not in ("/usr", "/", "/usr/local"):
            allowed_roots.append(cxx_prefix)
    torch_pkgs = set(a.torch_package)

    def rooted(p):
        return any(p == r or p.startswith(r.rstrip("/") + "/") for r in allowed_roots)

    # Libraries LibTorch itself loads are LibTorch's (Debian's LibTorch 1.13 brings many).
    torch_loads = set()
    for lib in os.listdir(torch_lib):
        if re.match(r"lib(torch|c10)[^/]*\.so", lib):
            torch_loads.update(v for v in ldd(os.path.join(torch_lib, lib), {}).values() if v)

    problems = []

    # 1. Headers: ninja's dependency log (the build must have been run).
    deps = subprocess.run(["ninja", "-C", build, "-t", "deps"], capture_output=True, text=True).stdout
    headers = {os.path.realpath(l.strip()) if not l.strip().startswith("/") else os.path.normpath(l.strip())
               for l in deps.splitlines() if l.startswith("    ")}
    headers = {h if h.startswith("/") else os.path.realpath(os.path.join(build, h)) for h in headers}
    outside = sorted(h for h in headers if not rooted(h) and not rooted(os.path.realpath(h)))
    own = owners(outside)
    for h in outside:
        pkg = own[h]
        if pkg and (RUNTIME_PACKAGES.match(pkg) or pkg in torch_pkgs):
            continue
        problems.append(f"header {h} ({pkg or 'no package'})")

    # 2. Link lines: absolute library paths and -L folders in build.ninja.
    # A -lNAME is the first libNAME.so (or .a) in the line's -L folders, then the linker's
    # default folders: what this machine's linker would take.
    default_dirs = ["/usr/local/lib", "/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib", "/lib"]
    libs = set()
    with open(os.path.join(build, "build.ninja")) as f:
        for line in f:
            line = line.strip()
            if not line.startswith(("LINK_LIBRARIES =", "LINK_PATH =")):
                continue
            toks = [p for tok in line.split("=", 1)[1].split() for p in tok.split(",")]
            ldirs = [t[2:] for t in toks if t.startswith("-L") and len(t) > 2]
            for part in toks:
                if part.startswith("-l") and len(part) > 2 and not RUNTIME_LIBS.match(f"lib{part[2:]}.so"):
                    found = next((os.path.join(d, f"lib{part[2:]}{ext}") for d in ldirs + default_dirs
                                  for ext in (".so", ".a") if os.path.exists(os.path.join(d, f"lib{part[2:]}{ext}"))),
                                 None)
                    libs.add(os.path.normpath(found) if found else f"{part} (not found)")
                    continue
                if part.startswith("-L"):
                    part = part[2:]
                if part.startswith("/") and (".so" in part or part.endswith(".a") or os.path.isdir(part)):
                    libs.add(os.path.normpath(part))
    outside = sorted(l for l in libs if not rooted(l) and not rooted(os.path.realpath(l))
                     and os.path.realpath(l) not in torch_loads and l not in torch_loads
                     and os.path.realpath(l) != torch_lib)  # LibTorch's own folder (-L, rpath)
    own = owners(outside)
    for l in outside:
        if l.endswith("(not found)"):
            problems.append(f"linked {l}")
            continue
        pkg = own[l]
        if pkg and (RUNTIME_PACKAGES.match(pkg) or pkg in torch_pkgs):
            continue
        if DRIVER_LIBS.match(os.path.basename(l)):
            continue
        problems.append(f"linked {l} ({pkg or 'no package'})")

    # 3. What the programs load, with the prefix's libraries on LD_LIBRARY_PATH as there.
    env = {"LD_LIBRARY_PATH": os.environ.get("LD_LIBRARY_PATH", "")}
    for prog in a.programs:
        path = os.path.join(build, prog)
        if not os.path.exists(path):
            problems.append(f"program {prog}: not built")
            continue
        for name, where in ldd(path, env).items():
            if where is None:
                problems.append(f"{prog} loads {name}: not found")
                continue
            real = os.path.realpath(where)
            if rooted(real) or real in torch_loads or where in torch_loads:
                continue
            if RUNTIME_LIBS.match(name) or DRIVER_LIBS.match(name):
                continue
            problems.append(f"{prog} loads {name} from {where}")

    for p in problems:
        print("check_prefix:", p)
    print(f"check_prefix: {len(headers)} headers, {len(libs)} link paths, {len(a.programs)} programs; "
          f"{len(problems)} from outside the prefix, LibTorch, CUDA and the C/C++ runtime")
    return 1 if problems else 0


def ldd(path, env):
    """soname -> resolved path (None when not found)."""
    e = dict(os.environ)
    e.update(env)
    p = subprocess.run(["ldd", path], capture_output=True, text=True, env=e)
    out = {}
    for line in p.stdout.splitlines():
        line = line.strip()
        m = re.match(r"(\S+) => (not found|(\S+) \(0x[0-9a-f]+\))", line)
        if m:
            out[m.group(1)] = None if m.group(2) == "not found" else os.path.realpath(m.group(3))
        else:
            m = re.match(r"(/\S+) \(0x", line)
            if m:
                out[os.path.basename(m.group(1))] = os.path.realpath(m.group(1))
    return out


if __name__ == "__main__":
    sys.exit(main())
