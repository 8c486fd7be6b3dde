#!/usr/bin/env python3
"""Re-estimates, here, the specs a GPU check's step 3 measured, with this build's
estimator, and prints each spec's error against the measured peaks: what a change to the
estimator's CUDA model does to a past measurement, without a GPU.

    python3 scripts/gpu/reestimate.py RESULTS.json [memfit estimate flags...]
    python3 scripts/gpu/reestimate.py out/results.json --gpu-model "NVIDIA H200"
    MEMFIT_GPU_GRID=validation python3 scripts/gpu/reestimate.py out/results.json

RESULTS.json is the check's results.json (the grid it ran, full or validation, is read
from it).
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
os.environ.setdefault("MEMFIT_DATA_DIR", os.path.join(REPO, ".memfit", "data"))
os.environ.setdefault("MEMFIT_CLI", os.path.join(REPO, "build", "bin", "memfit"))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "tests", "estimator"))
import accuracy as A  # noqa: E402
import step_estimator as SE  # noqa: E402


def load_measured(path):
    """The step-3 specs of a results.json and the grid it ran; exits naming the problem."""
    try:
        with open(path) as f:
            results = json.load(f)
        step = next(s for s in results["steps"] if s.get("name") == "estimator")
        data = step["data"]
        return {s["spec"]: s for s in data["specs"]}, data.get("grid"), data.get("tiny")
    except (OSError, ValueError) as e:
        sys.exit(f"reestimate: {path}: {e}")
    except (KeyError, TypeError, AttributeError, StopIteration):
        sys.exit(f"reestimate: {path}: no step 3 (estimator) with measured specs in it")


def main():
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        sys.exit(__doc__)
    measured, grid_name, tiny = load_measured(sys.argv[1])
    grid = SE.TINY_GRID if tiny else SE.FULL_GRID
    if grid_name == "validation" or os.environ.get("MEMFIT_GPU_GRID") == "validation":
        grid = SE.validation_grid(grid)
    tmp_root = tempfile.mkdtemp(prefix="memfit-reestimate-")
    texts = A.make_data(tmp_root)
    rows = []
    for i, case in enumerate(grid):
        label = SE.case_label(case)
        m = measured.get(label)
        if not m or not m.get("nvml_peak"):
            continue
        _, arch, mode, method, size, extra, config = case
        tmp = os.path.join(tmp_root, f"c{i}")
        os.makedirs(tmp)
        spec = A.make_spec(tmp, arch, mode, method, size, texts, extra, config=config)
        p = subprocess.run([os.environ["MEMFIT_CLI"], "estimate", "-f", spec, "--device", "cuda", "-o", "json"]
                           + sys.argv[2:], capture_output=True, text=True)
        if p.returncode != 0:
            print(f"{label}: memfit estimate failed: {p.stderr.strip()}")
            continue
        e = json.loads(p.stdout)
        alloc, reserved = e["allocated_peak_bytes"], e["allocated_peak_bytes"] + e["allocator_overhead_bytes"]
        rows.append((label, alloc / m["allocated"] - 1, reserved / m["reserved"] - 1,
                     e["peak_bytes"] / m["nvml_peak"] - 1))
    shutil.rmtree(tmp_root, ignore_errors=True)
    if not rows:
        sys.exit(f"reestimate: none of the {len(measured)} measured specs (with an NVML peak) is in the grid")
    for label, a, r, t in rows:
        print(f"{label:48s} allocated {100 * a:+6.2f}%  reserved {100 * r:+6.2f}%  total {100 * t:+6.2f}%")
    for k, name in ((1, "allocated"), (2, "reserved"), (3, "total vs NVML")):
        v = [r[k] for r in rows]
        if v:
            print(f"{name}: {len(v)} specs, median {100 * statistics.median(v):+.2f}%, "
                  f"worst under {100 * min(v):+.2f}%, worst over {100 * max(v):+.2f}%")


if __name__ == "__main__":
    main()
