#!/usr/bin/env python3
"""Runs a benchmark's smoke command and checks what it printed, row by row.

    check_bench_smoke.py ops -- memfit-bench-ops --quick --reps 1 --json
    check_bench_smoke.py schedule -- memfit-bench-schedule --jobs 80 --devices 4
    check_bench_smoke.py sweep -- memfit-bench-schedule --sweep --jobs 200 --devices 4

A CTest regular expression cannot do this: PASS_REGULAR_EXPRESSION makes CTest ignore
the exit code, and one matching row hides every other row. Here the exit code must be 0
and every row must hold:
  ops       every block's measured kept bytes equal the accounting's (kept_vs_expected
            exactly 1, and the expected parts sum to it); every number finite; every op
            row has positive times and byte counts.
  schedule  every policy's row is present; no policy failed a job; memfit's and the
            oracle's reservations ran nothing out of memory.
  sweep     (memfit-bench-schedule --sweep) every (floor, load) row is present; memfit
            ran nothing out of memory; at load 0.5 its mean completion time is within
            1.05x of one job per GPU and below best fit's (compute-aware placement).
Exits 1 naming the row and value that broke, 0 otherwise.
"""
import json
import math
import re
import subprocess
import sys


def fail(msg):
    print(f"check_bench_smoke: {msg}", file=sys.stderr)
    sys.exit(1)


def numbers(x, where):
    """Every number anywhere in x must be finite (JSON from C++ may carry nan/inf)."""
    if isinstance(x, dict):
        for k, v in x.items():
            numbers(v, f"{where}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            numbers(v, f"{where}[{i}]")
    elif isinstance(x, float) and not math.isfinite(x):
        fail(f"{where} is {x}")


def check_ops(out):
    try:
        d = json.loads(out, parse_constant=lambda c: float(c.lower().replace("infinity", "inf")))
    except json.JSONDecodeError as e:
        fail(f"output is not JSON: {e}")
    numbers(d, "$")
    ops, blocks = d.get("ops") or [], d.get("blocks") or []
    if not ops or not blocks:
        fail(f"expected op rows and block rows, got {len(ops)} and {len(blocks)}")
    for o in ops:
        for k in ("stock_ms", "memfit_ms", "stock_kept_bytes", "memfit_kept_bytes",
                  "stock_peak_bytes", "memfit_peak_bytes"):
            if not (isinstance(o.get(k), (int, float)) and o[k] > 0):
                fail(f"op {o.get('op')!r}: {k} = {o.get(k)!r}, expected a positive number")
    for b in blocks:
        name = f"block {b.get('block')!r} mode {b.get('mode')!r}"
        if b.get("kept_vs_expected") != 1:
            fail(f"{name}: kept_vs_expected = {b.get('kept_vs_expected')!r}, expected exactly 1")
        if b.get("kept_bytes") != b.get("expected_kept_bytes"):
            fail(f"{name}: kept {b.get('kept_bytes')} B, accounting {b.get('expected_kept_bytes')} B")
        parts = sum(p["bytes"] for p in b.get("expected_parts", []))
        if parts != b.get("expected_kept_bytes"):
            fail(f"{name}: expected parts sum to {parts} B, not {b.get('expected_kept_bytes')} B")
    print(f"check_bench_smoke: {len(ops)} op rows and {len(blocks)} block rows hold")


POLICIES = ("one job per GPU", "declared size (HAMi/shards), best fit", "memfit estimate, best fit (before)",
            "memfit estimate, spread, compute unknown", "memfit estimate, spread, learned compute (memfitd)",
            "oracle (true peaks), best fit", "oracle (true peaks), spread, true compute")


def check_schedule(out):
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 9 and cells[0] in POLICIES:
            rows[cells[0]] = cells
    for p in POLICIES:
        if p not in rows:
            fail(f"no row for policy {p!r}")
        oom, failed = rows[p][7], rows[p][8]
        if not re.fullmatch(r"\d+", oom) or not re.fullmatch(r"\d+", failed):
            fail(f"{p}: out-of-memory {oom!r}, failed {failed!r} are not counts")
        if int(failed) != 0:
            fail(f"{p}: {failed} jobs failed")
        if (p.startswith("memfit") or p.startswith("oracle")) and int(oom) != 0:
            fail(f"{p}: {oom} jobs ran out of memory")
    print(f"check_bench_smoke: {len(rows)} policy rows hold")


def check_sweep(out):
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 12 and re.fullmatch(r"\d\.\d", cells[0]):
            rows[(cells[0], cells[1])] = cells
    for floor in ("0.2", "0.5"):
        for load in ("0.5", "1.0", "4.0"):
            r = rows.get((floor, load))
            if r is None:
                fail(f"no sweep row for floor {floor}, load {load}")
            one, best_fit, spread = (float(r[i]) for i in (2, 3, 4))
            if r[10] != "0":
                fail(f"floor {floor}, load {load}: {r[10]} jobs ran out of memory")
            if load == "0.5":
                if spread > 1.05 * one:
                    fail(f"floor {floor}, load 0.5: mean JCT {spread} h > 1.05 x one job per GPU ({one} h)")
                if spread >= best_fit:
                    fail(f"floor {floor}, load 0.5: spreading ({spread} h) is not faster than best fit ({best_fit} h)")
    print(f"check_bench_smoke: {len(rows)} sweep rows hold")


def main(argv):
    checks = {"ops": check_ops, "schedule": check_schedule, "sweep": check_sweep}
    if len(argv) < 3 or argv[1] not in checks or "--" not in argv:
        fail("usage: check_bench_smoke.py ops|schedule|sweep -- COMMAND...")
    cmd = argv[argv.index("--") + 1:]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sys.stdout.write(r.stdout)
    sys.stderr.write(r.stderr)
    if r.returncode != 0:
        fail(f"{cmd[0]} exited {r.returncode}")
    checks[argv[1]](r.stdout)


if __name__ == "__main__":
    main(sys.argv)
