#!/usr/bin/env python3
"""The Slurm test cluster (tests/slurm/cluster.py) against a real Slurm 22.05, and the
shard layout facts docs/SLURM.md reports, as assertions.

One node with 2 fake GPUs x 4 shards: concurrent shard jobs land on GPU 0 and GPU 1
first fit (CUDA_VISIBLE_DEVICES, SLURM_SHARDS_ON_NODE, the GRES index), a job whose
shards would have to span two GPUs waits although enough shards are free in total, cancelling frees
its GPU, more shards than one GPU has never start, a failing job reports its exit code
(also through the jobcomp file, `sacct -c`). Two nodes (in network namespaces the
harness makes, or two slurmd on loopback where namespaces cannot be made): one job on
both. Ctrl-C inside the context manager tears down. After every cluster: no process and
no namespace of the harness is left.

Needs root and Debian's slurmctld, slurmd, slurm-client and munge (scripts/setup.sh);
exits 77 (skipped) without them. About 20 s.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import cluster  # noqa: E402
from cluster import Cluster  # noqa: E402

JOB = """#!/bin/sh
echo "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES SLURM_SHARDS_ON_NODE=$SLURM_SHARDS_ON_NODE"
sleep {sleep}
exit {rc}
"""


def skip_reason():
    if os.geteuid() != 0:
        return "needs root (the test cluster's daemons run as root)"
    missing = cluster.missing_binaries()
    if missing:
        return ("Slurm/munge programs missing: " + " ".join(missing) +
                " (scripts/setup.sh installs slurmctld slurmd slurm-client munge)")
    return None


def netns_works():
    """Whether this machine lets us make a network namespace (tried, then removed)."""
    if shutil.which("ip") is None or shutil.which("nsenter") is None:
        return False
    name = f"mfsprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True)
    if r.returncode != 0:
        return False
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return True


class SlurmCase(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="memfit-slurm-")
        self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)

    def assertNothingLeft(self, c):
        self.assertEqual(cluster.processes_with_token(c.token, c.dir), [],
                         "processes of the harness left after teardown")
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        nss = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        prefix = f"mfs{c.token}"
        self.assertNotIn(prefix, links)
        self.assertNotIn(prefix, nss)

    def job(self, c, job_id):
        out = c.run("scontrol", "show", "job", "-d", job_id).stdout
        path = os.path.join(c.dir, "jobs", f"{job_id}.out")
        env = {}
        if os.path.exists(path):
            with open(path) as f:
                env = dict(kv.split("=", 1) for kv in f.readline().split() if "=" in kv)
        return {
            "state": re.search(r"JobState=(\S+)", out).group(1),
            "reason": re.search(r"Reason=(\S+)", out).group(1),
            "exit": re.search(r"\bExitCode=(\S+)", out).group(1),
            "idx": re.findall(r"GRES=(\S+?)\(IDX:([^)]*)\)", out),
            "env": env,
        }

    def wait(self, c, job_id, pred, what, timeout=15):
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(c, job_id)
            if pred(info):
                return info
            if time.monotonic() > deadline:
                self.fail(f"job {job_id}: timed out waiting for {what}; last {info}")
            time.sleep(0.1)

    def submit(self, c, gres, sleep=60, rc=0, extra=()):
        args = [f"--output={c.dir}/jobs/%j.out"] + ([f"--gres={gres}"] if gres else [])
        return c.sbatch(*args, *extra, script=JOB.format(sleep=sleep, rc=rc))

    def running_with_output(self, c, j):
        return self.wait(c, j, lambda i: i["state"] == "RUNNING" and i["env"], "RUNNING")


class ShardLayout(SlurmCase):
    def test_shards_of_one_job_stay_on_one_gpu(self):
        with Cluster(os.path.join(self.tmp, "c"), nodes=1, gpus=2, shards_per_gpu=4,
                     cpus=8, memory_mb=8000) as c:
            a = self.submit(c, "shard:3")
            ia = self.running_with_output(c, a)
            b = self.submit(c, "shard:3")
            ib = self.running_with_output(c, b)
            # First fit: GPU 0, then GPU 1 (one free shard left on each).
            self.assertEqual(ia["idx"], [("shard:3", "0")])
            self.assertEqual(ia["env"], {"CUDA_VISIBLE_DEVICES": "0", "SLURM_SHARDS_ON_NODE": "3"})
            self.assertEqual(ib["idx"], [("shard:3", "1")])
            self.assertEqual(ib["env"]["CUDA_VISIBLE_DEVICES"], "1")
            # Two shards are free in total, one per GPU: a 2-shard job does not span, it waits.
            p = self.submit(c, "shard:2")
            time.sleep(2.5)
            ip = self.job(c, p)
            self.assertEqual((ip["state"], ip["reason"]), ("PENDING", "Resources"))
            # Cancelling b frees GPU 1: the waiting job starts there, whole.
            t0 = time.monotonic()
            c.run("scancel", b)
            self.wait(c, b, lambda i: i["state"] == "CANCELLED", "CANCELLED", timeout=10)
            ip = self.running_with_output(c, p)
            self.assertEqual(ip["idx"], [("shard:2", "1")])
            self.assertEqual(ip["env"], {"CUDA_VISIBLE_DEVICES": "1", "SLURM_SHARDS_ON_NODE": "2"})
            self.assertLess(time.monotonic() - t0, 10)
            # A single-shard job fills GPU 0's last shard (first fit, not the emptier GPU).
            s = self.submit(c, "shard:1")
            self.assertEqual(self.running_with_output(c, s)["idx"], [("shard:1", "0")])
            # Whole GPUs and shards are not kept apart: gpu:1 starts at once on GPU 0,
            # whose four shards are all in use by shard jobs.
            g = self.submit(c, "gpu:1")
            ig = self.running_with_output(c, g)
            self.assertEqual(ig["idx"], [("gpu:1", "0")])
            for j in (a, p, s, g):
                c.run("scancel", j)
            for j in (a, p, s, g):
                self.wait(c, j, lambda i: i["state"] == "CANCELLED", "CANCELLED", timeout=10)
            # First fit, not best fit: two free on GPU 0, one on GPU 1 -> GPU 0.
            x = self.submit(c, "shard:2")
            self.assertEqual(self.running_with_output(c, x)["idx"], [("shard:2", "0")])
            y = self.submit(c, "shard:3")
            self.assertEqual(self.running_with_output(c, y)["idx"], [("shard:3", "1")])
            z = self.submit(c, "shard:1")
            self.assertEqual(self.running_with_output(c, z)["idx"], [("shard:1", "0")])
            c.run("scancel", x, y, z)
            for j in (x, y, z):
                self.wait(c, j, lambda i: i["state"] == "CANCELLED", "CANCELLED", timeout=10)
            # More shards than one GPU has never start, even on an idle node.
            big = self.submit(c, "shard:5")
            time.sleep(2.5)
            ibig = self.job(c, big)
            self.assertEqual((ibig["state"], ibig["reason"]), ("PENDING", "Resources"))
            c.run("scancel", big)
            # A failing job: FAILED, exit code 3, in scontrol and in the jobcomp file.
            f = self.submit(c, "shard:1", sleep=0, rc=3)
            info = self.wait(c, f, lambda i: i["state"] in ("FAILED", "COMPLETED"), "the end")
            self.assertEqual((info["state"], info["exit"]), ("FAILED", "3:0"))
            acct = c.run("sacct", "-c", "-P", "-n", "-j", f, "-o", "JobID,State,ExitCode").stdout
            self.assertIn(f"{f}|FAILED|3:0", acct.split())
        self.assertNothingLeft(c)


class Nodes(SlurmCase):
    def test_two_nodes_one_job_on_both(self):
        use_netns = netns_works()
        with Cluster(os.path.join(self.tmp, "c"), nodes=2, gpus=2, shards_per_gpu=4,
                     netns=use_netns) as c:
            out = os.path.join(c.dir, "jobs", "two.out")
            script = "#!/bin/sh\nsrun sh -c 'echo $SLURMD_NODENAME $(hostname) " \
                     "$SLURM_SHARDS_ON_NODE'\n"
            j = c.sbatch("-N2", "--gres=shard:2", f"--output={out}", script=script)
            self.wait(c, j, lambda i: i["state"] in ("COMPLETED", "FAILED"), "the end")
            with open(out) as f:
                lines = sorted(f.read().split("\n"))[1:]
            if use_netns:
                # Separate hosts: each node its own hostname.
                self.assertEqual(lines, ["node0 node0 2", "node1 node1 2"])
            else:
                self.assertEqual([l.split()[0] for l in lines], ["node0", "node1"])
        self.assertNothingLeft(c)

    def test_ctrl_c_tears_down(self):
        code = textwrap.dedent(f"""
            import os, signal, sys, time
            sys.path.insert(0, {HERE!r})
            from cluster import Cluster
            with Cluster({os.path.join(self.tmp, 'c')!r}, nodes=1, gpus=1, shards_per_gpu=2) as c:
                print(c.token, flush=True)
                c.sbatch("--output=/dev/null", script="#!/bin/sh\\nsleep 60\\n")
                time.sleep(1)
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(30)
        """)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=60)
        self.assertIn("KeyboardInterrupt", r.stderr)
        self.assertTrue(r.stdout.strip(), f"the cluster did not come up: {r.stderr[-2000:]}")
        token = r.stdout.split()[0]
        self.assertEqual(cluster.processes_with_token(token, os.path.join(self.tmp, 'c')), [])


class Failure(SlurmCase):
    def test_failed_start_names_the_log_and_leaves_nothing(self):
        c = Cluster(os.path.join(self.tmp, "c"), nodes=1, gpus=1, shards_per_gpu=1,
                    extra_conf=["SelectType=select/nosuchplugin"], timeout=10)
        with self.assertRaises(cluster.ClusterError) as cm:
            c.start()
        msg = str(cm.exception)
        self.assertIn("slurmctld exited", msg)
        self.assertIn("slurmctld.log", msg)
        self.assertIn("nosuchplugin", msg)
        self.assertNothingLeft(c)

    def test_refuses_a_folder_it_did_not_make(self):
        d = os.path.join(self.tmp, "foreign")
        os.makedirs(d)
        with open(os.path.join(d, "keep.txt"), "w") as f:
            f.write("not the harness's\n")
        with self.assertRaisesRegex(cluster.ClusterError, "not empty"):
            Cluster(d).start()
        self.assertEqual(os.listdir(d), ["keep.txt"])


def _terminate(signum, frame):
    raise SystemExit(f"test_cluster.py: signal {signum}, tearing down")


def main():
    # ctest's timeout or a plain kill: leave through the context managers (teardown).
    signal.signal(signal.SIGTERM, _terminate)
    reason = skip_reason()
    if reason:
        print(f"test_cluster.py: skipped: {reason}")
        return 77
    prog = unittest.main(exit=False, verbosity=2)
    return 0 if prog.result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
