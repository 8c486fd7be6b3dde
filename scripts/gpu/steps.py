#!/usr/bin/env python3
"""The GPU check's measuring steps, each in its own process under a time limit, results
written after every step so a run stopped from outside still leaves what it measured.

    python3 scripts/gpu/steps.py --build build-cuda --device cuda --out OUT
    python3 scripts/gpu/steps.py --build build --device cpu --tiny --out OUT   # rehearsal

Steps (scripts/gpu/step_*.py; each takes --ctx FILE, writes its JSON to ctx["result"]):
  1 tests      the `gpu`-labelled tests (CUDA kernels against CPU bodies), the op tests
  2 bench      each op's forward+backward against the stock op; bandwidth fraction
  3 estimator  the estimator against the worker's measured peaks; constants fitted
  4 headline   ViT-B/16 LoRA at micro-batch 64 (exact, paper, memfit_best); LLaMA block
  5 daemon     memfitd packing three jobs on one device; NVML used vs reservations
  6 ablation   the LLaMA-7B-shaped job with one memory option at a time: where time goes

OUT gets summary.md (every step's table) and results.json (every step's data), and
logs.tar.gz (the folder --logs: each step's logs, and whatever else the caller put there)
after every step. A step's JSON: {"step", "status": ok|failed|timeout|skipped|
error, "seconds", "markdown", "data", "errors": [...]}.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from common import processes_naming  # noqa: E402

STEPS = [
    ("1", "tests", "step_tests.py"),
    ("2", "bench", "step_bench.py"),
    ("3", "estimator", "step_estimator.py"),
    ("4", "headline", "step_headline.py"),
    ("5", "daemon", "step_daemon.py"),
    ("6", "ablation", "step_ablation.py"),
]
# Seconds per step on the GPU (the whole check must end inside 10 minutes, build
# included); --tiny runs use the same limits.
LIMITS = {"tests": 60, "bench": 60, "estimator": 150, "headline": 90, "daemon": 90, "ablation": 60}


def step_owned_dir(result_path):
    """The folder a step declared its own (data.owned_dir), if any."""
    try:
        with open(result_path) as f:
            d = json.load(f).get("data", {}).get("owned_dir")
        return d if d and os.path.isabs(d) and len(d) > 8 else None
    except (OSError, ValueError):
        return None


def kill_processes_under(folder):
    """SIGKILL every process whose command line names a path in `folder` (memfitd and
    its workers, which start sessions of their own and so outlive the step's group)."""
    for pid, _ in processes_naming(folder):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def write_outputs(out, results, env):
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"env": env, "steps": results}, f, indent=1)
    lines = ["# memfit GPU check", ""]
    for k, v in env.items():
        lines.append(f"- {k}: {v}")
    lines.append("")
    for r in results:
        lines.append(f"## Step {r['step']}: {r['name']} — {r['status']} ({r.get('seconds', 0):.0f} s)")
        lines.append("")
        if r.get("markdown"):
            lines.append(r["markdown"].rstrip())
            lines.append("")
        for e in r.get("errors", [])[:20]:
            lines.append(f"- error: {e}")
        lines.append("")
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", required=True, help="build folder with bin/")
    ap.add_argument("--device", choices=("cpu", "cuda"), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--logs", help="folder for the steps' logs (default OUT/logs), packed into OUT/logs.tar.gz")
    ap.add_argument("--budget", type=float, default=0,
                    help="seconds for all the chosen steps: their limits are scaled to fit")
    ap.add_argument("--tiny", action="store_true", help="tiny inputs (rehearsal and CI)")
    ap.add_argument("--steps", default="1,2,3,4,5,6", help="comma-separated step numbers or names")
    ap.add_argument("--data", default=os.environ.get("MEMFIT_DATA_DIR", os.path.join(REPO, ".memfit", "data")))
    ap.add_argument("--time-scale", type=float, default=1.0, help="multiply every step's time limit")
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE for summary.md's header")
    a = ap.parse_args()

    out = os.path.abspath(a.out)
    logs = os.path.abspath(a.logs) if a.logs else os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    build = os.path.abspath(a.build)
    wanted = set(a.steps.split(","))
    env = dict(kv.split("=", 1) for kv in a.env)
    env.update({"device": a.device, "tiny": a.tiny, "build": os.path.basename(build)})
    wanted = {w.strip() for w in wanted}
    chosen = [(n, name, sc) for n, name, sc in STEPS if n in wanted or name in wanted]
    unknown = wanted - {n for n, _, _ in STEPS} - {name for _, name, _ in STEPS}
    if unknown or not chosen:
        ap.error(f"--steps: unknown {', '.join(sorted(unknown)) or 'selection'}; steps are "
                 + ", ".join(f"{n} ({name})" for n, name, _ in STEPS))
    scale = a.time_scale
    if a.budget > 0:
        scale = a.budget / sum(LIMITS[name] for _, name, _ in chosen)
        env["step budget"] = f"{a.budget:.0f} s (limits x{scale:.2f})"
    results = []
    for num, name, script in chosen:
        limit = LIMITS[name] * scale
        result_path = os.path.join(logs, f"step{num}_{name}.json")
        ctx = {"step": num, "name": name, "repo": REPO, "build": build, "bin": os.path.join(build, "bin"),
               "device": a.device, "tiny": a.tiny, "data": os.path.abspath(a.data), "out": out,
               "logs": logs, "result": result_path, "limit_s": limit,
               "deadline": time.time() + limit - 3}
        ctx_path = os.path.join(logs, f"step{num}_{name}.ctx.json")
        with open(ctx_path, "w") as f:
            json.dump(ctx, f, indent=1)
        if os.path.exists(result_path):
            os.remove(result_path)
        t0 = time.time()
        status, err = "ok", None
        with open(os.path.join(logs, f"step{num}_{name}.log"), "w") as log:
            p = subprocess.Popen([sys.executable, os.path.join(HERE, script), "--ctx", ctx_path],
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = p.wait(timeout=limit)
                if rc != 0:
                    status, err = "error", f"{script} exited with {rc}"
            except subprocess.TimeoutExpired:
                status, err = "timeout", f"stopped at its limit of {limit:.0f} s"
            finally:
                # The step's own children go with it; memfitd's workers start sessions of
                # their own, so any of the build's programs still running go too.
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except OSError:
                    pass
                p.wait()
                owned = step_owned_dir(result_path)
                if owned:
                    kill_processes_under(owned)
        r = {"step": num, "name": name, "status": status, "markdown": "", "data": {}, "errors": []}
        if os.path.exists(result_path):
            try:
                with open(result_path) as f:
                    r.update(json.load(f))
            except (OSError, ValueError) as e:
                r["errors"].append(f"{result_path}: {e}")
        if status != "ok":
            # A step that died or ran out of time keeps what it wrote, marked as such.
            r["status"] = status if r.get("status") in (None, "ok", "partial") else r["status"]
            r["errors"].append(err)
        r["seconds"] = time.time() - t0
        r["step"], r["name"] = num, name
        results.append(r)
        write_outputs(out, results, env)
        subprocess.run(["tar", "-C", os.path.dirname(logs), "-czf", os.path.join(out, "logs.tar.gz"),
                        os.path.basename(logs)], check=False)
        print(f"step {num} {name}: {r['status']} in {r['seconds']:.0f} s", flush=True)
    bad = [r for r in results if r["status"] not in ("ok", "skipped")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
