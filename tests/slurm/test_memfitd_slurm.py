#!/usr/bin/python3
"""memfitd's Slurm executor against a real Slurm 22.05 (tests/slurm/cluster.py: munge,
slurmctld and slurmd on loopback or in network namespaces, fake GPUs with shards), with
the real memfit-worker running tiny GPT-2 LoRA jobs on the nodes' CPUs:

- jobs run at once on shards of different GPUs while they fit, and wait while they do not;
- the shard count follows the reservation (sbatch's --gres, scontrol's GRES);
- the worker's events reach memfitd (steps, finished), calibration and metrics work;
- cancel (a running job: SIGTERM to its batch step; Slurm shows it cancelled);
- an out-of-memory attempt comes back with more shards;
- memfitd killed with SIGKILL adopts its Slurm jobs after a restart;
- a job failing on the node fails with the worker's reason;
- with two compute nodes (network namespaces where the machine allows them), jobs land on
  both nodes.

Needs root, Slurm (slurmctld slurmd slurm-client munge) and the fetched data; exits 77
(skipped) otherwise.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "server"))

import cluster as C  # noqa: E402

MiB = 1 << 20
SHARD = 16 * MiB   # per shard; 8 per GPU: a fake GPU of 128 MiB
PER_GPU = 8
NOBODY = "token-of-nobody-0123456789"
GHOST = "token-of-a-ghost-0123456789"
DAEMON = "token-of-daemon-0123456789"


def skip_reason():
    if os.geteuid() != 0:
        return "needs root (Slurm's daemons)"
    missing = C.missing_binaries()
    if missing:
        return "Slurm is not installed: " + ", ".join(missing)
    return None


WHY = skip_reason()
if WHY is None:
    import daemon_harness as D  # noqa: E402  (needs build/python)
    if not os.path.exists(os.path.join(D.W.DATA, "gpt2", "encoder.json")):
        WHY = "data missing: run scripts/fetch_data.sh"


def config(path, partition, gpus, run_as="service"):
    with open(path, "w") as f:
        f.write(f"""executor: slurm
slurm:
  partition: {partition}
  shard_memory: {SHARD}
  shards_per_gpu: {PER_GPU}
  gpus: {gpus}
  device: cpu
  run_as: {run_as}
  poll_seconds: 0.3
""")
    return path


class Base(unittest.TestCase):
    NODES = 1
    NETNS = False
    RUN_AS = "service"
    TOKENS = None

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="memfit-slurm-")
        os.chmod(cls.tmp, 0o755)
        cls.cluster = C.Cluster(os.path.join(cls.tmp, "slurm"), nodes=cls.NODES, gpus=2, shards_per_gpu=PER_GPU,
                                cpus=4, memory_mb=16000, netns=cls.NETNS)
        cls.cluster.start()
        print(f"\n{cls.__name__}: {cls.NODES} node(s)" + (", network namespaces" if cls.NETNS else ", loopback"),
              file=sys.stderr)
        cls.saved_env = dict(os.environ)
        try:
            os.environ["SLURM_CONF"] = cls.cluster.env["SLURM_CONF"]
            cfg = config(os.path.join(cls.tmp, "memfitd.yaml"), "test", 2 * cls.NODES, cls.RUN_AS)
            os.makedirs(os.path.join(cls.tmp, "d"))
            extra = ["--config", cfg, "--worker-memory-allowance", "512MiB"]
            cls.tokenizer = os.path.join(D.W.DATA, "gpt2")
            if cls.RUN_AS == "submitter":
                # Jobs run as another user, who may not reach the build tree or the fetched
                # data (a clone in a 0700 folder): the worker and the tokenizer are copied
                # where every user can read them (the worker needs only system libraries).
                os.makedirs(os.path.join(cls.tmp, "bin"))
                worker = shutil.copy2(D.WORKER, os.path.join(cls.tmp, "bin", "memfit-worker"))
                os.chmod(worker, 0o755)
                cls.tokenizer = shutil.copytree(cls.tokenizer, os.path.join(cls.tmp, "data", "gpt2"))
                for root, dirs, files in os.walk(os.path.join(cls.tmp, "data")):
                    os.chmod(root, 0o755)
                    for f in files:
                        os.chmod(os.path.join(root, f), 0o644)
                extra += ["--worker", worker]
            cls.d = D.Daemon("slurm", devices=(), dir=os.path.join(cls.tmp, "d"), tokens=cls.TOKENS, extra=extra)
        except BaseException:
            os.environ.clear()
            os.environ.update(cls.saved_env)
            cls.cluster.stop()
            shutil.rmtree(cls.tmp, ignore_errors=True)
            raise

    @classmethod
    def tearDownClass(cls):
        try:
            cls.d.stop()
        finally:
            os.environ.clear()
            os.environ.update(cls.saved_env)
            cls.cluster.stop()
            shutil.rmtree(cls.tmp, ignore_errors=True)

    def spec(self, name, steps=12, **kw):
        spec = D.gpt2_spec(os.path.join(self.tmp, name), steps=steps, **kw)
        spec.data.tokenizer_path = self.tokenizer
        return spec

    def slurm_id(self, job, token=None):
        """The Slurm job id memfitd's "placed" events name (the last one)."""
        events = self.d.events(job.id, token)
        ids = [e.message.split("Slurm as job ")[1].split()[0] for e in events
               if e.kind == "placed" and "Slurm as job" in e.message]
        self.assertTrue(ids, f"no Slurm placement for {job.id}: {[e.message for e in events]}")
        return ids[-1]

    def squeue_state(self, slurm_id):
        r = self.cluster.run("squeue", "-h", "-t", "all", "-j", slurm_id, "-o", "%T")
        return r.stdout.strip()


class OneNode(Base):
    def test_1_concurrent_shards_then_wait(self):
        # Three jobs of 6 shards each: one per GPU (8 shards), the third waits.
        # The first two run long enough to be seen running side by side on a slow machine.
        jobs = [self.d.submit(self.spec(f"c{i}", steps=s)) for i, s in enumerate((400, 400, 40))]
        for j in jobs:
            self.assertEqual(j.state, D.pb.QUEUED)
            self.assertEqual(-(-j.plan.reserved_bytes // SHARD), 6, j.plan)
        self.d.wait(jobs[0].id, lambda j: j.state == D.pb.RUNNING and j.progress.step > 0, timeout=300)
        self.d.wait(jobs[1].id, lambda j: j.state == D.pb.RUNNING and j.progress.step > 0, timeout=300)
        gpus = set()
        for j in jobs[:2]:
            info = self.cluster.job(self.slurm_id(j))
            self.assertEqual(info["JobState"], "RUNNING")
            self.assertIn("shard:6", info.get("TresPerNode", "") + info.get("GRES", ""), info)
            gpus.add(info.get("GRES", ""))
        self.assertEqual(len(gpus), 2, f"both jobs on one GPU: {gpus}")
        # The third cannot get 6 shards of one GPU while both run: it waits in memfitd's
        # queue (the partition's shards are reserved). Read it between two looks at the
        # first two, so a slow machine where one already ended does not fail the test.
        third = self.d.get(jobs[2].id).state
        if all(self.d.get(j.id).state == D.pb.RUNNING for j in jobs[:2]):
            self.assertEqual(third, D.pb.QUEUED)
        done = [self.d.wait(j.id, timeout=300) for j in jobs]
        for j in done:
            self.assertEqual(j.state, D.pb.SUCCEEDED, j)
            self.assertGreater(j.result.measured_peak_bytes, 0)
            kinds = [e.kind for e in self.d.events(j.id)]
            self.assertIn("step", kinds)
            self.assertIn("finished", kinds)
            notes = [e.message for e in self.d.events(j.id) if e.kind == "executor"]
            self.assertTrue(any(n.endswith("is running on node0") for n in notes), notes)
            self.assertEqual(self.squeue_state(self.slurm_id(j)), "COMPLETED")
        # The third started only after one of the first two ended.
        t = lambda j, f: getattr(j, f).ToMilliseconds()
        self.assertGreaterEqual(t(done[2], "started_at"), min(t(done[0], "finished_at"), t(done[1], "finished_at")) - 1000)
        m = self.d.metrics()
        self.assertIsNotNone(D.metric_value(m, "memfit_device_memory_total_bytes", device="slurm:test"))
        self.assertEqual(D.metric_value(m, "memfit_device_memory_total_bytes", device="slurm:test"), 2 * PER_GPU * SHARD)

    def test_2_cancel_running_and_pending(self):
        a = self.d.submit(self.spec("cancel", steps=100000))
        self.d.wait(a.id, lambda j: j.state == D.pb.RUNNING and j.progress.step > 0, timeout=300)
        sid = self.slurm_id(a)
        self.d.jobs.CancelJob(D.pb.CancelJobRequest(id=a.id), timeout=30)
        j = self.d.wait(a.id, timeout=60)
        self.assertEqual(j.state, D.pb.CANCELLED)
        deadline = time.time() + 30
        while self.squeue_state(sid) not in ("CANCELLED", "COMPLETED", "FAILED") and time.time() < deadline:
            time.sleep(0.2)
        self.assertIn(self.squeue_state(sid), ("CANCELLED", "COMPLETED", "FAILED"))

    def test_3_out_of_memory_comes_back_with_more_shards(self):
        # Declared 60 MiB (4 shards) for a job that peaks near 85 MiB: out of memory, then
        # 75 MiB (5 shards), then 94 MiB (6 shards), which holds it.
        j = self.d.submit(self.spec("oom", memory="60MiB"))
        done = self.d.wait(j.id, timeout=300)
        self.assertEqual(done.state, D.pb.SUCCEEDED, [e.message for e in self.d.events(j.id)])
        shards = [int(e.message.split("shard:")[1].split(")")[0]) for e in self.d.events(j.id)
                  if e.kind == "placed" and "shard:" in e.message]
        self.assertGreaterEqual(len(shards), 2, shards)
        self.assertEqual(shards, sorted(shards))
        self.assertGreater(shards[-1], shards[0])
        self.assertGreaterEqual(done.oom_retries, 1)

    def test_4_failing_on_the_node(self):
        spec = self.spec("bad")
        j = self.d.submit(spec)
        # The training text disappears after admission: the worker fails on the node.
        os.unlink(spec.data.train_path)
        done = self.d.wait(j.id, timeout=300)
        self.assertEqual(done.state, D.pb.FAILED)
        self.assertTrue(done.failure.message, done.failure)

    def test_5_kill9_and_adoption(self):
        j = self.d.submit(self.spec("adopt", steps=150))
        self.d.wait(j.id, lambda x: x.state == D.pb.RUNNING and x.progress.step > 0, timeout=300)
        sid = self.slurm_id(j)
        self.d.kill9()
        self.assertEqual(self.squeue_state(sid), "RUNNING")  # the job lives on without memfitd
        self.d.start()
        done = self.d.wait(j.id, timeout=300)
        self.assertEqual(done.state, D.pb.SUCCEEDED, [e.message for e in self.d.events(j.id)])
        kinds = [e.kind for e in self.d.events(j.id)]
        self.assertIn("adopted", kinds)
        self.assertEqual(self.slurm_id(done), sid)  # not submitted again


class AsSubmitter(Base):
    """slurm.run_as: submitter: each job runs as the Unix user named like its owner."""
    RUN_AS = "submitter"
    TOKENS = [(NOBODY, "nobody", False), (GHOST, "no-such-user-here", False), (DAEMON, "daemon", False)]

    def test_runs_as_the_owner_and_refuses_unknown_users(self):
        spec = self.spec("nobody")
        j = self.d.submit(spec, token=NOBODY)
        self.d.wait(j.id, lambda x: x.state == D.pb.RUNNING and x.progress.step > 0, timeout=300, token=NOBODY)
        info = self.cluster.job(self.slurm_id(j, NOBODY))
        self.assertTrue(info["UserId"].startswith("nobody("), info["UserId"])
        done = self.d.wait(j.id, timeout=300, token=NOBODY)
        self.assertEqual(done.state, D.pb.SUCCEEDED, [e.message for e in self.d.events(j.id, NOBODY)])
        # What the job wrote belongs to it; memfitd's database does not.
        out = os.path.join(os.path.dirname(spec.data.train_path), "out")
        self.assertEqual(os.stat(out).st_uid, 65534)
        self.assertEqual(os.stat(os.path.join(self.d.dir, "state", "memfit.db")).st_uid, 0)
        with self.assertRaises(D.grpc.RpcError) as e:
            self.d.submit(self.spec("ghost"), token=GHOST)
        self.assertIn("no Unix user named 'no-such-user-here'", e.exception.details())
        with self.assertRaises(D.grpc.RpcError) as e:
            self.d.submit(self.spec("daemon"), token=DAEMON)  # a system account (uid 1)
        self.assertIn("never run as root, a system account", e.exception.details())


class TwoNodes(Base):
    NODES = 2
    NETNS = True

    @classmethod
    def setUpClass(cls):
        if C.missing_binaries(netns=True):
            cls.NETNS = False
        try:
            super().setUpClass()
        except C.ClusterError:
            if not cls.NETNS:
                raise
            cls.NETNS = False  # namespaces refused here: several slurmd on loopback
            super().setUpClass()

    def test_jobs_land_on_both_nodes(self):
        jobs = [self.d.submit(self.spec(f"n{i}", steps=60)) for i in range(4)]
        for j in jobs:
            self.d.wait(j.id, lambda x: (x.state == D.pb.RUNNING and x.progress.step > 0) or x.state in D.FINAL,
                        timeout=300)
        nodes = {self.cluster.job(self.slurm_id(j))["NodeList"] for j in jobs}
        self.assertEqual(nodes, {"node0", "node1"})
        for j in jobs:
            self.assertEqual(self.d.wait(j.id, timeout=300).state, D.pb.SUCCEEDED)


if __name__ == "__main__":
    if WHY:
        print(f"skipped: {WHY}")
        sys.exit(77)
    unittest.main(verbosity=2)
