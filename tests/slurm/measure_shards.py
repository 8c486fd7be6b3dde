#!/usr/bin/env python3
"""Measures on a real Slurm how GPU shards of one job are laid out (docs/SLURM.md,
"What Slurm 22.05 does with shards (measured)").

    measure_shards.py STATE_DIR [--shard-files] [--conf LINE]... [--scenario NAME]...

Brings up a one-node test cluster (tests/slurm/cluster.py: 2 fake GPUs x 4 shards) in
STATE_DIR (empty or missing), runs each scenario and prints what Slurm did: per job its
state, reason, GRES index (`scontrol show job -d`) and the environment the job saw.
Needs root and Slurm; about a minute for all scenarios.
"""

import argparse
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cluster import Cluster, ClusterError  # noqa: E402

JOB_SCRIPT = """#!/bin/sh
echo "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES SLURM_SHARDS_ON_NODE=$SLURM_SHARDS_ON_NODE \
SLURM_JOB_GPUS=$SLURM_JOB_GPUS GPU_DEVICE_ORDINAL=$GPU_DEVICE_ORDINAL"
sleep {sleep}
exit {rc}
"""


def job_info(c, job_id):
    out = c.run("scontrol", "show", "job", "-d", str(job_id)).stdout
    state = re.search(r"JobState=(\S+)", out).group(1)
    reason = re.search(r"Reason=(\S+)", out).group(1)
    idx = re.findall(r"GRES=(\S+)\(IDX:([^)]*)\)", out)
    exit_code = re.search(r"\bExitCode=(\S+)", out).group(1)
    path = os.path.join(c.dir, "jobs", f"{job_id}.out")
    seen = {}
    if os.path.exists(path):
        with open(path) as f:
            first = f.readline()
        seen = dict(kv.split("=", 1) for kv in first.split() if "=" in kv)
    return {"id": job_id, "state": state, "reason": reason, "gres_idx": idx,
            "exit": exit_code, "env": seen}


def submit(c, gres, sleep=30, rc=0, extra=()):
    args = [f"--output={c.dir}/jobs/%j.out"] + (["--gres=" + gres] if gres else []) + list(extra)
    return c.sbatch(*args, script=JOB_SCRIPT.format(sleep=sleep, rc=rc))


def wait_for(c, job_id, states, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(c, job_id)
        if info["state"] in states:
            return info
        time.sleep(0.1)
    return job_info(c, job_id)


def settle(c, seconds=4):
    """Give the scheduler (sched_interval=1, backfill) a few passes."""
    time.sleep(seconds)


def clear(c):
    ids = c.run("squeue", "-h", "-o", "%i").stdout.split()
    if ids:
        c.run("scancel", *ids)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and c.run("squeue", "-h", "-o", "%i").stdout.strip():
        time.sleep(0.2)


def show(title, infos):
    if not infos:
        return
    print(f"\n== {title}")
    for i in infos:
        env = i["env"]
        print(f"  job {i['id']:>4} {i['label']:<22} {i['state']:<10} reason={i['reason']:<12} "
              f"idx={','.join(f'{g}@{x}' for g, x in i['gres_idx']) or '-':<18} "
              f"CVD={env.get('CUDA_VISIBLE_DEVICES', '-')} "
              f"SHARDS={env.get('SLURM_SHARDS_ON_NODE', '-')} "
              f"JOB_GPUS={env.get('SLURM_JOB_GPUS', '-')}")


def run_in_order(c, title, requests, gap=1.3, wait=4):
    """Submit (label, gres, extra) one after another, `gap` seconds apart."""
    ids = []
    for label, gres, extra in requests:
        try:
            ids.append((label, submit(c, gres, extra=extra)))
        except ClusterError as e:
            print(f"\n== {title}\n  {label}: rejected: {e}")
            continue
        time.sleep(gap)
    settle(c, wait)
    infos = []
    for label, j in ids:
        i = job_info(c, j)
        i["label"] = label
        infos.append(i)
    show(title, infos)
    clear(c)
    return infos


SCENARIOS = {}


def scenario(f):
    SCENARIOS[f.__name__] = f
    return f


@scenario
def alone(c):
    """Each N=1..8 alone on an idle node."""
    out = []
    for n in range(1, 9):
        j = submit(c, f"shard:{n}", sleep=0)
        i = wait_for(c, j, ("COMPLETED", "FAILED"), timeout=3)
        i["label"] = f"shard:{n} alone"
        out.append(i)
        clear(c)
    show("shard:N alone on an idle node (2 GPUs x 4 shards)", out)


@scenario
def no_span(c):
    run_in_order(c, "no span: 3 + 3 leave 1 free per GPU, then shard:2", [
        ("shard:3", "shard:3", ()), ("shard:3", "shard:3", ()), ("shard:2", "shard:2", ())])


@scenario
def first_fit(c):
    run_in_order(c, "order of placement", [
        ("shard:3", "shard:3", ()), ("shard:2", "shard:2", ()), ("shard:1", "shard:1", ()),
        ("shard:2", "shard:2", ())])


@scenario
def options(c):
    for label, extra in (("enforce-binding", ["--gres-flags=enforce-binding"]),
                         ("exclusive", ["--exclusive"]),
                         ("ntasks=2", ["--ntasks=2"])):
        run_in_order(c, f"shard:5 with --{label}", [(f"shard:5 {label}", "shard:5", extra)],
                     wait=4)
    run_in_order(c, "--gpus-per-task=1 with shard:2", [
        ("shard:2 gpus-per-task", "shard:2", ["--ntasks=1", "--gpus-per-task=1"])])
    run_in_order(c, "-N1 --ntasks=2 --gres=shard:2 (per node)", [
        ("shard:2 ntasks=2", "shard:2", ["--ntasks=2"])])


@scenario
def mixing(c):
    run_in_order(c, "shard job first, then whole GPUs", [
        ("shard:1", "shard:1", ()), ("gpu:2", "gpu:2", ())])
    run_in_order(c, "shard on GPU0, then gpu:1", [
        ("shard:1", "shard:1", ()), ("gpu:1", "gpu:1", ())])
    run_in_order(c, "whole GPU first, then shards", [
        ("gpu:1", "gpu:1", ()), ("shard:4", "shard:4", ()), ("shard:1", "shard:1", ())])
    run_in_order(c, "both GPUs whole, then a shard", [
        ("gpu:2", "gpu:2", ()), ("shard:1", "shard:1", ())])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("state_dir")
    ap.add_argument("--shard-files", action="store_true")
    ap.add_argument("--conf", action="append", default=[])
    ap.add_argument("--scenario", action="append", choices=sorted(SCENARIOS))
    a = ap.parse_args()
    try:
        with Cluster(a.state_dir, nodes=1, gpus=2, shards_per_gpu=4, cpus=8, memory_mb=8000,
                     shard_files=a.shard_files, extra_conf=a.conf) as c:
            print(open(os.path.join(c.dir, "gres.conf")).read().rstrip())
            for name in a.scenario or list(SCENARIOS):
                SCENARIOS[name](c)
    except ClusterError as e:
        print(f"measure_shards.py: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
