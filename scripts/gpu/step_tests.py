#!/usr/bin/env python3
"""GPU check, step 1: the `gpu`-labelled tests (every CUDA kernel against its CPU body on
the same inputs) and the op tests, from the build's GoogleTest binaries, recording each
suite's passed, failed and skipped tests by name (GoogleTest's JSON report); then a
smoke run of memfit-worker on the device (a tiny GPT-2 with memfit_best, 3 steps), so a
worker that cannot run there is known before the later steps rely on it."""
import json
import os
import sys

from common import Step, md_table

SUITES = [("gpu", "memfit_gpu_tests"), ("ops", "memfit_ops_tests")]


def main():
    s = Step()
    rows = []
    for label, binary in SUITES:
        exe = os.path.join(s.bin, binary)
        if not os.path.exists(exe):
            s.error(f"{binary}: not built")
            continue
        report = s.path(f"{label}.json")
        if os.path.exists(report):
            os.remove(report)
        rc, out = s.run([exe, f"--gtest_output=json:{report}", "--gtest_brief=1"], f"{label}.log")
        suite = {"returncode": rc, "passed": 0, "failed": [], "skipped": 0}
        if rc is None:
            s.error(f"{binary}: stopped at the step's time limit")
        if os.path.exists(report):
            with open(report) as f:
                rep = json.load(f)
            for ts in rep.get("testsuites", []):
                for t in ts.get("testsuite", []):
                    name = f"{ts['name']}.{t['name']}"
                    if t.get("failures"):
                        suite["failed"].append(name)
                    elif t.get("result") == "SKIPPED" or t.get("status") == "NOTRUN":
                        suite["skipped"] += 1
                    else:
                        suite["passed"] += 1
        elif rc is not None:
            s.error(f"{binary}: no report (exit {rc}); last output: {out[-400:]}")
        if suite["failed"]:
            s.error(f"{binary}: {len(suite['failed'])} failed: {', '.join(suite['failed'][:10])}")
        if rc not in (0, None) and not suite["failed"]:
            s.error(f"{binary}: exit {rc}")
        if label == "gpu" and s.device == "cuda" and suite["skipped"] and not suite["passed"]:
            s.error("memfit_gpu_tests skipped every test: no CUDA device seen by the CUDA build")
        s.result["data"][label] = suite
        s.save()
        rows.append([binary, suite["passed"], len(suite["failed"]), suite["skipped"],
                     ", ".join(suite["failed"][:5]) or "-"])
    md = md_table(["suite", "passed", "failed", "skipped", "failed tests"], rows)
    md += "\n\n" + smoke(s)
    s.finish(md)


def smoke(s):
    """One tiny training run on the device; returns a markdown line."""
    os.environ["MEMFIT_WORKER"] = os.path.join(s.bin, "memfit-worker")
    os.environ["MEMFIT_DATA_DIR"] = s.ctx["data"]
    sys.path.insert(0, os.path.join(s.ctx["repo"], "tests", "worker"))
    import worker_harness as H  # noqa: E402 (reads the environment at import)
    tmp = H.workdir("gpu-smoke")
    spec = H.gpt2_job(tmp, memory={"preset": "memfit_best"}, training={"steps": 3, "eval_batches": 1})
    device = "cuda:0" if s.device == "cuda" else "cpu"
    rc, out = s.run([H.WORKER, "run", "--spec", spec, "--device", device, "--threads", "2"], "worker_smoke.log",
                    timeout=60)
    events = []
    for line in out.splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            pass
    done = [e for e in events if e.get("event") == "finished"]
    data = {"returncode": rc, "events": len(events)}
    if done:
        data.update({k: done[-1].get(k) for k in ("peak_memory_bytes", "peak_reserved_bytes", "train_loss",
                                                   "eval_loss") if k in done[-1]})
    s.result["data"]["worker_smoke"] = data
    if rc != 0 or not done:
        s.error(f"memfit-worker on {s.device}: exit {rc}, {len(events)} events; last output: {out[-600:]}")
        return f"memfit-worker smoke run on {s.device}: FAILED (exit {rc})"
    return (f"memfit-worker smoke run on {s.device} (tiny GPT-2, memfit_best, 3 steps): ok, peak allocated "
            f"{data.get('peak_memory_bytes')} B, reserved {data.get('peak_reserved_bytes')} B")


if __name__ == "__main__":
    main()
