#!/usr/bin/python3
"""memfitd end to end: the real daemon, real memfit-worker processes on tiny models (GPT-2
shaped, Moby-Dick, the GPT-2 tokenizer), over gRPC on loopback, with an independent client
(python3-grpcio). Packing, waiting, out-of-memory retry, cancellation, restart recovery
after SIGKILL, graceful stop, authentication, validation, metrics (promtool). Needs the
data from scripts/fetch_data.sh (exit 77 = skipped without it)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import daemon_harness as D  # noqa: E402
from daemon_harness import pb, grpc  # noqa: E402

MiB = D.MiB


def worker_pid(events):
    for e in reversed(events):
        if e.kind == "placed":
            return int(re.search(r"worker (\d+)", e.message).group(1))
    raise AssertionError("no placed event")


def kinds(events):
    return [e.kind for e in events]


def seconds(ts):
    return ts.seconds + ts.nanos / 1e9


class Packing(unittest.TestCase):
    def test_jobs_share_a_device_while_they_fit_and_the_next_waits(self):
        # 256 MiB device: two LoRA jobs (~85 MiB estimated) and one memfit_best LoRA job
        # (~37 MiB) fit at once; a full fine-tune (~110 MiB) waits for room.
        d = D.Daemon("pack", devices=("cpu:0=256MiB",))
        try:
            tmp = d.dir
            specs = [D.gpt2_spec(os.path.join(tmp, "a"), steps=25),
                     D.gpt2_spec(os.path.join(tmp, "b"), steps=25),
                     D.gpt2_spec(os.path.join(tmp, "c"), steps=25, preset="memfit_best"),
                     D.gpt2_spec(os.path.join(tmp, "d"), steps=6, lora=False)]
            jobs = [d.submit(s) for s in specs]
            reserved = [j.plan.reserved_bytes for j in jobs]
            self.assertLessEqual(sum(reserved[:3]), 256 * MiB)
            self.assertGreater(sum(reserved), 256 * MiB)
            for j in jobs:
                self.assertEqual(j.state, pb.QUEUED)
                self.assertGreater(j.plan.estimated_peak_bytes, 0)
                # reservation = estimate (calibrated) + 8% margin
                self.assertAlmostEqual(j.plan.reserved_bytes / j.plan.calibrated_peak_bytes, 1.08, delta=0.001)
            # memfit_best keeps fewer activations than the stock ops would
            self.assertLess(jobs[2].plan.activation_bytes, jobs[2].plan.exact_activation_bytes)

            # While the first three run, the device lists all three and their reservations.
            seen = 0
            deadline = time.time() + 120
            while time.time() < deadline and seen < 3:
                dev = d.devices_now()[0]
                seen = max(seen, len(dev.job_ids))
                if len(dev.job_ids) == 3:
                    self.assertEqual(sorted(dev.job_ids), sorted(j.id for j in jobs[:3]))
                    self.assertEqual(dev.reserved_bytes, sum(reserved[:3]))
                    self.assertEqual(d.get(jobs[3].id).state, pb.QUEUED)
                time.sleep(0.05)
            self.assertEqual(seen, 3)

            done = [d.wait(j.id, timeout=600) for j in jobs]
            for j in done:
                self.assertEqual(j.state, pb.SUCCEEDED, (j.failure, d.log[-10:]))
                self.assertEqual(j.attempts, 1)
                # the worker ran capped at its reservation, and the estimate held
                self.assertLessEqual(j.result.measured_peak_bytes, j.plan.reserved_bytes)
                ratio = j.result.measured_peak_bytes / j.plan.estimated_peak_bytes
                self.assertGreater(ratio, 0.97, j.id)
                self.assertLess(ratio, 1.03, j.id)
                self.assertTrue(os.path.isdir(j.result.adapter_dir or j.result.model_dir))
            # the full fine-tune was placed only after one of the others had finished
            ev = {j.id: d.events(j.id) for j in jobs}
            first_end = min(seconds(e.time) for j in jobs[:3] for e in ev[j.id] if e.kind == "finished")
            placed_d = [seconds(e.time) for e in ev[jobs[3].id] if e.kind == "placed"][0]
            placed_abc = [seconds(e.time) for j in jobs[:3] for e in ev[j.id] if e.kind == "placed"]
            self.assertGreaterEqual(placed_d, first_end)
            self.assertLess(max(placed_abc), first_end)
            for j in jobs:
                k = kinds(ev[j.id])
                self.assertEqual(k[0], "submitted")
                self.assertIn("placed", k)
                self.assertIn("step", k)
                self.assertEqual(k[-1], "state")
                self.assertEqual(ev[j.id][-1].state, pb.SUCCEEDED)
                self.assertEqual([e.seq for e in ev[j.id]], list(range(1, len(k) + 1)))
            self.assertEqual(d.devices_now()[0].reserved_bytes, 0)
            # finished jobs fed the estimate-error histogram
            m = d.metrics()
            self.assertEqual(D.metric_value(m, "memfit_estimate_error_ratio_count"), 4)
            self.assertEqual(D.metric_value(m, "memfit_jobs", state="succeeded"), 4)
        finally:
            d.stop()

    def test_memory_auto_picks_options_that_fit(self):
        # 70 MiB: plain LoRA (~92 MiB reserved) does not fit; auto turns on memfit's ops.
        d = D.Daemon("auto", devices=("cpu:0=70MiB",))
        try:
            plain = D.gpt2_spec(os.path.join(d.dir, "p"), steps=3)
            with self.assertRaises(grpc.RpcError) as e:
                d.submit(plain)
            self.assertEqual(e.exception.code(), grpc.StatusCode.FAILED_PRECONDITION)
            self.assertIn("largest device has 70.00 MiB", e.exception.details())
            self.assertIn("memory.preset: auto", e.exception.details())
            auto = D.gpt2_spec(os.path.join(d.dir, "q"), steps=3, preset="auto")
            j = d.submit(auto)
            self.assertLessEqual(j.plan.reserved_bytes, 70 * MiB)
            self.assertNotEqual(j.plan.level, "")
            self.assertNotEqual(j.plan.level, "none")
            self.assertTrue(j.spec.memory.fused_loss or j.spec.memory.activation == "approx")
            self.assertEqual(j.spec.memory.preset, "")  # the chosen options, spelled out
            done = d.wait(j.id)
            self.assertEqual(done.state, pb.SUCCEEDED, done.failure)
            self.assertLessEqual(done.result.measured_peak_bytes, 70 * MiB)
        finally:
            d.stop()


class OutOfMemory(unittest.TestCase):
    def test_a_job_that_runs_out_of_memory_is_retried_bigger(self):
        d = D.Daemon("oom", devices=("cpu:0=256MiB",))
        try:
            spec = D.gpt2_spec(os.path.join(d.dir, "a"), steps=4)
            est = d.cluster.EstimateJob(pb.EstimateJobRequest(spec=spec), timeout=30)
            self.assertTrue(est.fits)
            self.assertAlmostEqual(est.plan.reserved_bytes / est.peak_bytes, 1.08, delta=0.001)
            # Declared 85% of the estimated peak: the worker's cap is hit, the job comes back
            # with 1.25x, which covers the real peak.
            declared = int(est.peak_bytes * 0.85)
            j = d.submit(D.gpt2_spec(os.path.join(d.dir, "b"), steps=4, memory=str(declared)))
            self.assertEqual(j.plan.reserved_bytes, declared)
            done = d.wait(j.id)
            self.assertEqual(done.state, pb.SUCCEEDED, (done.failure, d.log[-10:]))
            self.assertEqual(done.attempts, 2)
            self.assertAlmostEqual(done.plan.reserved_bytes, declared * 1.25, delta=1)
            ev = d.events(j.id)
            k = kinds(ev)
            self.assertIn("failed", k)
            self.assertIn("oom", k)
            failed = json.loads([e for e in ev if e.kind == "failed"][0].data_json)
            self.assertEqual(failed["reason"], "oom")
            self.assertLess(k.index("oom"), len(k) - 1 - k[::-1].index("placed"))
            m = d.metrics()
            self.assertEqual(D.metric_value(m, "memfit_oom_retries_total"), 1)
            self.assertIn("# HELP memfit_oom_retries_total", m)
        finally:
            d.stop()

    def test_out_of_memory_after_the_retries_fails_as_system(self):
        d = D.Daemon("oomfail", devices=("cpu:0=256MiB",))
        try:
            est = d.cluster.EstimateJob(pb.EstimateJobRequest(spec=D.gpt2_spec(os.path.join(d.dir, "x"))), timeout=30)
            j = d.submit(D.gpt2_spec(os.path.join(d.dir, "a"), steps=4, memory=str(int(est.peak_bytes * 0.3))))
            done = d.wait(j.id)
            self.assertEqual(done.state, pb.FAILED)
            self.assertEqual(done.failure.kind, pb.SYSTEM)
            self.assertEqual(done.failure.reason, "oom")
            self.assertEqual(done.attempts, 3)  # first try + 2 retries
        finally:
            d.stop()


class Cancel(unittest.TestCase):
    def test_cancel_a_running_job_checkpoints_and_frees_the_device_when_gone(self):
        d = D.Daemon("cancel")
        try:
            j = d.submit(D.gpt2_spec(os.path.join(d.dir, "a"), steps=100000,
                                     training={"checkpoint_interval": 1000}))
            d.wait(j.id, lambda x: x.progress.step >= 2)
            pid = worker_pid(d.events(j.id))
            self.assertTrue(D.pid_alive(pid))
            c = d.jobs.CancelJob(pb.CancelJobRequest(id=j.id), timeout=30)
            self.assertEqual(c.state, pb.CANCELLING)
            done = d.wait(j.id, timeout=60)
            self.assertEqual(done.state, pb.CANCELLED)
            self.assertFalse(D.pid_alive(pid))
            self.assertEqual(d.devices_now()[0].reserved_bytes, 0)
            k = kinds(d.events(j.id))
            self.assertIn("stopped", k)  # the worker checkpointed on SIGTERM
            self.assertTrue(os.listdir(os.path.join(j.spec.output_dir, "checkpoints")))
            # cancelling again is a no-op; a queued job is cancelled at once
            self.assertEqual(d.jobs.CancelJob(pb.CancelJobRequest(id=j.id), timeout=30).state, pb.CANCELLED)
        finally:
            d.stop()

    def test_cancel_a_queued_job(self):
        d = D.Daemon("cancelq", extra=["--paused"])
        try:
            j = d.submit(D.gpt2_spec(os.path.join(d.dir, "a")))
            self.assertEqual(d.jobs.CancelJob(pb.CancelJobRequest(id=j.id), timeout=30).state, pb.CANCELLED)
            self.assertEqual(D.metric_value(d.metrics(), "memfit_queue_length"), 0)
            with self.assertRaises(grpc.RpcError) as e:
                d.jobs.CancelJob(pb.CancelJobRequest(id="j-nope"), timeout=30)
            self.assertEqual(e.exception.code(), grpc.StatusCode.NOT_FOUND)
        finally:
            d.stop()


class Recovery(unittest.TestCase):
    def test_kill_9_and_restart_keeps_every_job(self):
        # One device that holds one of these jobs at a time.
        d = D.Daemon("recover", devices=("cpu:0=120MiB",))
        try:
            done_job = d.submit(D.gpt2_spec(os.path.join(d.dir, "done"), steps=2))
            done = d.wait(done_job.id)
            self.assertEqual(done.state, pb.SUCCEEDED)
            running = d.submit(D.gpt2_spec(os.path.join(d.dir, "run"), steps=200,
                                           training={"checkpoint_interval": 5}))
            orphan = d.submit(D.gpt2_spec(os.path.join(d.dir, "orphan"), steps=40,
                                          training={"checkpoint_interval": 5}))
            queued = d.submit(D.gpt2_spec(os.path.join(d.dir, "queued"), steps=2))
            d.wait(running.id, lambda x: x.progress.step >= 3)
            run_pid = worker_pid(d.events(running.id))
            d.kill9()
            # The worker outlives the daemon (own session).
            self.assertTrue(D.pid_alive(run_pid))
            time.sleep(1)
            d.start()
            adopted = [e for e in d.events(running.id) if e.kind == "adopted"]
            self.assertEqual(len(adopted), 1)
            self.assertIn(f"worker {run_pid} found again", adopted[0].message)
            self.assertIn(d.get(running.id).state, (pb.RUNNING, pb.SUCCEEDED))
            self.assertEqual(d.get(orphan.id).state, pb.QUEUED)
            self.assertEqual(d.get(queued.id).state, pb.QUEUED)
            got = d.get(done_job.id)
            self.assertEqual(got.state, pb.SUCCEEDED)
            self.assertEqual(got.result, done.result)
            # Now the worker the orphan gets dies with the daemon.
            d.wait(orphan.id, lambda x: x.state == pb.RUNNING and x.progress.step >= 6, timeout=600)
            orphan_pid = worker_pid(d.events(orphan.id))
            d.kill9()
            os.kill(orphan_pid, signal.SIGKILL)
            time.sleep(0.5)
            d.start()
            for j in (running, orphan, queued):
                fin = d.wait(j.id, timeout=600)
                self.assertEqual(fin.state, pb.SUCCEEDED, (j.id, fin.failure))
            ev = d.events(orphan.id)
            k = kinds(ev)
            self.assertIn("adopted", k)
            self.assertIn("requeued", k)
            starts = [json.loads(e.data_json) for e in ev if e.kind == "started"]
            self.assertGreater(starts[-1]["start_step"], 0)  # resumed from its checkpoint
            self.assertEqual(d.get(orphan.id).attempts, 2)
        finally:
            d.stop()

    def test_sigterm_lets_workers_checkpoint_and_resume_at_the_next_start(self):
        d = D.Daemon("graceful")
        try:
            j = d.submit(D.gpt2_spec(os.path.join(d.dir, "a"), steps=40, training={"checkpoint_interval": 1000}))
            d.wait(j.id, lambda x: x.progress.step >= 3)
            pid = worker_pid(d.events(j.id))
            self.assertEqual(d.stop(), 0)
            self.assertFalse(D.pid_alive(pid))
            d.start()
            fin = d.wait(j.id, timeout=600)
            self.assertEqual(fin.state, pb.SUCCEEDED)
            ev = d.events(j.id)
            self.assertIn("stopped", kinds(ev))
            starts = [json.loads(e.data_json) for e in ev if e.kind == "started"]
            self.assertEqual(len(starts), 2)
            self.assertGreaterEqual(starts[1]["start_step"], 3)
        finally:
            d.stop()


class Api(unittest.TestCase):
    ALICE, BOB, ROOT = "alice-token-0123456789", "bob-token-0123456789ab", "root-token-0123456789ab"

    def test_tokens_users_and_admins(self):
        d = D.Daemon("auth", tokens=[(self.ALICE, "alice", False), (self.BOB, "bob", False),
                                    (self.ROOT, "root", True)], extra=["--paused"])
        try:
            spec = D.gpt2_spec(os.path.join(d.dir, "a"))
            spec.output_dir = ""  # each job writes into its own folder in the state dir
            for tok in (None, "not-a-token-at-all-xx"):
                with self.assertRaises(grpc.RpcError) as e:
                    d.submit(spec, token=tok)
                self.assertEqual(e.exception.code(), grpc.StatusCode.UNAUTHENTICATED)
            a = d.submit(spec, token=self.ALICE)
            b = d.submit(spec, token=self.BOB)
            self.assertEqual(a.owner, "alice")
            for call in (lambda: d.get(a.id, token=self.BOB),
                         lambda: d.jobs.CancelJob(pb.CancelJobRequest(id=a.id), metadata=d.md(self.BOB), timeout=30),
                         lambda: d.events(a.id, token=self.BOB),
                         lambda: d.jobs.ListJobs(pb.ListJobsRequest(owner="alice"), metadata=d.md(self.BOB), timeout=30)):
                with self.assertRaises(grpc.RpcError) as e:
                    call()
                self.assertEqual(e.exception.code(), grpc.StatusCode.PERMISSION_DENIED)
            mine = d.jobs.ListJobs(pb.ListJobsRequest(), metadata=d.md(self.BOB), timeout=30).jobs
            self.assertEqual([j.id for j in mine], [b.id])
            every = d.jobs.ListJobs(pb.ListJobsRequest(all_users=True), metadata=d.md(self.ROOT), timeout=30).jobs
            self.assertEqual(sorted(j.id for j in every), sorted([a.id, b.id]))
            own = d.jobs.ListJobs(pb.ListJobsRequest(), metadata=d.md(self.ROOT), timeout=30).jobs
            self.assertEqual(list(own), [])  # an admin's own jobs unless all_users
            with self.assertRaises(grpc.RpcError) as e:
                d.jobs.ListJobs(pb.ListJobsRequest(all_users=True), metadata=d.md(self.BOB), timeout=30)
            self.assertEqual(e.exception.code(), grpc.StatusCode.PERMISSION_DENIED)
            self.assertEqual(d.get(a.id, token=self.ROOT).owner, "alice")
            c = d.jobs.CancelJob(pb.CancelJobRequest(id=a.id), metadata=d.md(self.ROOT), timeout=30)
            self.assertEqual(c.state, pb.CANCELLED)
            self.assertIn("cancelled by root", d.events(a.id, token=self.ALICE)[-1].message)
        finally:
            d.stop()

    def test_validation_at_the_edge(self):
        d = D.Daemon("validate", extra=["--paused", "--max-queued-per-user", "3",
                                        "--allowed-root", D.W.DATA, "--allowed-root", tempfile.gettempdir()])
        try:
            good = D.gpt2_spec(os.path.join(d.dir, "a"))
            good.output_dir = ""  # submitted several times: each job gets its own folder

            def code(spec, field):
                with self.assertRaises(grpc.RpcError) as e:
                    d.submit(spec)
                self.assertIn(field, e.exception.details())
                return e.exception.code()

            bad = type(good)()
            bad.CopyFrom(good)
            bad.training.micro_batch = -2
            self.assertEqual(code(bad, "training.micro_batch"), grpc.StatusCode.INVALID_ARGUMENT)
            bad.CopyFrom(good)
            bad.model.config_path = "relative/config.json"
            self.assertEqual(code(bad, "model.config_path"), grpc.StatusCode.INVALID_ARGUMENT)
            bad.CopyFrom(good)
            bad.model.config_path = "/etc/passwd"
            self.assertEqual(code(bad, "model.config_path"), grpc.StatusCode.PERMISSION_DENIED)
            bad.CopyFrom(good)
            bad.resources.memory = "lots"
            self.assertEqual(code(bad, "resources.memory"), grpc.StatusCode.INVALID_ARGUMENT)
            bad.CopyFrom(good)
            bad.training.micro_batch = 4096
            bad.training.sequence_length = 128
            self.assertEqual(code(bad, "largest device has"), grpc.StatusCode.FAILED_PRECONDITION)
            # idempotent submission
            first = d.submit(good, request_id="r-1")
            self.assertEqual(d.submit(good, request_id="r-1").id, first.id)
            d.submit(good)
            d.submit(good)
            with self.assertRaises(grpc.RpcError) as e:
                d.submit(good)
            self.assertEqual(e.exception.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
            self.assertIn("max_queued_per_user", e.exception.details())
            # the limit holds under concurrent submits too
            other = D.Daemon("limit", extra=["--paused", "--max-queued-per-user", "3"])
            try:
                results = []

                def one():
                    try:
                        results.append(other.submit(good).id)
                    except grpc.RpcError as err:
                        results.append(err.code())
                threads = [threading.Thread(target=one) for _ in range(12)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                self.assertEqual(len([x for x in results if isinstance(x, str)]), 3)
                self.assertEqual(results.count(grpc.StatusCode.RESOURCE_EXHAUSTED), 9)
            finally:
                other.stop()
            with self.assertRaises(grpc.RpcError) as e:
                d.get("j0000000000000-000000")
            self.assertEqual(e.exception.code(), grpc.StatusCode.NOT_FOUND)
            # paging
            r1 = d.jobs.ListJobs(pb.ListJobsRequest(page_size=2), timeout=30)
            r2 = d.jobs.ListJobs(pb.ListJobsRequest(page_size=2, page_token=r1.next_page_token), timeout=30)
            self.assertEqual(len(r1.jobs) + len(r2.jobs), 3)
            self.assertFalse(r2.next_page_token)
            self.assertFalse({j.id for j in r1.jobs} & {j.id for j in r2.jobs})
            # a request that does not parse (truncated; a string that is not UTF-8) gets a
            # status with a message, not INTERNAL with none
            raw = d.channel.unary_unary("/memfit.v1.JobService/SubmitJob",
                                        request_serializer=lambda x: x, response_deserializer=lambda x: x)
            for payload in (b"\x0a\x05\x0a\x03\xff\xfe\xfd", b"\x0a\xff\xff\xff\x0f"):
                with self.assertRaises(grpc.RpcError) as e:
                    raw(payload, timeout=10)
                self.assertEqual(e.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
                self.assertIn("could not be parsed", e.exception.details())
            # health checking: raw call to grpc.health.v1.Health/Check (SERVING = 1 in field 1)
            check = d.channel.unary_unary("/grpc.health.v1.Health/Check",
                                          request_serializer=lambda x: x, response_deserializer=lambda x: x)
            self.assertEqual(check(b"", timeout=10), b"\x08\x01")
        finally:
            d.stop()

    def test_watch_gives_history_then_live_events_and_ends_with_the_job(self):
        d = D.Daemon("watch")
        try:
            j = d.submit(D.gpt2_spec(os.path.join(d.dir, "a"), steps=8))
            d.wait(j.id, lambda x: x.progress.step >= 1)
            seen = list(d.jobs.WatchJob(pb.WatchJobRequest(id=j.id), timeout=300))
            self.assertEqual([e.seq for e in seen], list(range(1, len(seen) + 1)))
            self.assertEqual(seen[0].kind, "submitted")
            self.assertEqual(seen[-1].state, pb.SUCCEEDED)
            self.assertEqual(len([e for e in seen if e.kind == "step"]), 8)
            # a watcher after the end gets the whole history and returns
            again = list(d.jobs.WatchJob(pb.WatchJobRequest(id=j.id, after_seq=3), timeout=30))
            self.assertEqual([e.seq for e in again], [e.seq for e in seen[3:]])
        finally:
            d.stop()


class Configuration(unittest.TestCase):
    def test_bad_configuration_is_refused_naming_the_setting(self):
        tmp = tempfile.mkdtemp(prefix="memfitd-config-")
        state = ["--state-dir", os.path.join(tmp, "state")]

        def yaml(text, n=[0]):
            n[0] += 1
            path = os.path.join(tmp, f"memfitd-{n[0]}.yaml")
            with open(path, "w") as f:
                f.write(text)
            return ["--config", path]

        def tokens_file(name, text, mode=0o600):
            path = os.path.join(tmp, name)
            with open(path, "w") as f:
                f.write(text)
            os.chmod(path, mode)
            return path

        tokens = tokens_file("tokens", "short alice\n")
        good = "t" * 20
        for args, needle in ((["--bogus"], "unknown option '--bogus'"),
                             (["--tokens", tokens_file("open", f"{good} alice\n", 0o644)],
                              "is readable by others (mode 644)"),
                             (["--tokens", tokens_file("twice", f"{good} alice\n{good} bob admin\n")],
                              "twice:2: this token is already given"),
                             (["--worker-cgroup", tmp], "workers.cgroup: " + tmp + ": not a cgroup v2 folder"),
                             (["--worker-user", "no-such-user-xyz"], "workers.user: no user 'no-such-user-xyz'"),
                             (["--margin", "-1"], "--margin"),
                             (["--device", "gpu0=8GiB"], "expected cpu:N or cuda:N"),
                             (["--device", "cpu:0=lots"], "--device cpu:0"),
                             (["--tls-cert", "/nonexistent.pem"], "tls: give both"),
                             (["--tokens", tokens], "tokens need at least 16 characters"),
                             (["--tokens", os.path.join(tmp, "missing")], "tokens_file: cannot read"),
                             (yaml("scheduling: {margin: 0.1, bogus: 1}\n"), "scheduling.bogus: unknown setting"),
                             (yaml("limits: {max_message_bytes: huge}\n"), "limits.max_message_bytes"),
                             (yaml("devices: [{name: cpu:0}]\n"), "devices[0]: needs name and memory"),
                             (yaml("metrics: {finished_retention_seconds: -1}\n"), "metrics.finished_retention_seconds"),
                             (["--metrics-finished-retention-seconds", "x"], "metrics.finished_retention_seconds"),
                             (yaml("listen: [1, 2\n"), "memfitd-5.yaml: yaml-cpp")):
            code, err = D.run_memfitd(*state, *args)
            self.assertEqual(code, 2, (args, err))
            self.assertIn(needle, err.splitlines()[0], args)  # said on the first line

    def test_yaml_file_limits_and_tls(self):
        tmp = tempfile.mkdtemp(prefix="memfitd-tls-")
        cert, key, root = D.self_signed(tmp)
        with open(os.path.join(tmp, "memfitd.yaml"), "w") as f:
            f.write(f"tls: {{cert: {cert}, key: {key}}}\n"
                    "cpu_devices: 3\ncpu_device_memory: 300MiB\n"
                    "limits: {max_message_bytes: 16KiB}\nscheduling: {paused: true, margin: 0.25}\n")
        d = D.Daemon("tls", devices=(), dir=tmp, tls_root=root, extra=["--config", os.path.join(tmp, "memfitd.yaml")])
        try:
            self.assertIn("(TLS)", "".join(d.log))
            devs = d.devices_now()
            self.assertEqual([x.name for x in devs], ["cpu:0", "cpu:1", "cpu:2"])
            self.assertEqual({x.total_bytes for x in devs}, {300 * MiB})
            spec = D.gpt2_spec(os.path.join(tmp, "a"))
            j = d.submit(spec)
            self.assertAlmostEqual(j.plan.reserved_bytes / j.plan.calibrated_peak_bytes, 1.25, delta=0.001)
            time.sleep(0.5)
            self.assertEqual(d.get(j.id).state, pb.QUEUED)  # paused: accepted, never started
            spec.name = "x" * 20000
            with self.assertRaises(grpc.RpcError) as e:
                d.submit(spec)
            self.assertEqual(e.exception.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
            plain = grpc.insecure_channel(f"127.0.0.1:{d.port}")
            with self.assertRaises(grpc.RpcError) as e:
                D.rpc.JobServiceStub(plain).GetJob(pb.GetJobRequest(id=j.id), timeout=5)
            self.assertEqual(e.exception.code(), grpc.StatusCode.UNAVAILABLE)
            plain.close()
        finally:
            d.stop()


class Metrics(unittest.TestCase):
    def test_metrics_follow_a_running_job_and_pass_promtool(self):
        promtool = shutil.which("promtool")
        d = D.Daemon("metrics", devices=("cpu:0=256MiB", "cpu:1=128MiB"))
        try:
            j = d.submit(D.gpt2_spec(os.path.join(d.dir, "a"), steps=100000, preset="memfit_best",
                                     training={"checkpoint_interval": 100000}))
            d.wait(j.id, lambda x: x.progress.step >= 2)
            m = d.metrics()
            labels = {"job_id": j.id, "owner": "local", "state": "running"}
            dev = d.get(j.id).device
            self.assertNotIn('job="', m)  # the scrape job's label is Prometheus' own
            self.assertEqual(D.metric_value(m, "memfit_job_info", job_id=j.id, name=j.name, owner="local",
                                            model="gpt2", method="lora", preset="memfit_best"), 1)
            self.assertEqual(D.metric_value(m, "memfit_job_steps", **labels, device=dev),
                             D.metric_value(m, "memfit_job_steps", job_id=j.id))
            self.assertEqual(D.metric_value(m, "memfit_job_reserved_bytes", **labels), j.plan.reserved_bytes)
            self.assertEqual(D.metric_value(m, "memfit_job_estimated_peak_bytes", **labels),
                             j.plan.estimated_peak_bytes)
            self.assertGreater(D.metric_value(m, "memfit_job_measured_peak_bytes", **labels), 0)
            self.assertGreaterEqual(D.metric_value(m, "memfit_job_steps", **labels), 2)
            self.assertGreater(D.metric_value(m, "memfit_job_loss", **labels), 0)
            self.assertEqual(D.metric_value(m, "memfit_job_activation_saved_bytes", **labels),
                             j.plan.exact_activation_bytes - j.plan.activation_bytes)
            self.assertGreater(j.plan.exact_activation_bytes - j.plan.activation_bytes, 0)
            self.assertEqual(D.metric_value(m, "memfit_device_memory_total_bytes", device="cpu:1"), 128 * MiB)
            self.assertEqual(D.metric_value(m, "memfit_device_memory_reserved_bytes", device=dev),
                             j.plan.reserved_bytes)
            self.assertGreater(D.metric_value(m, "memfit_device_memory_used_bytes", device=dev), 0)
            # The peak since the last scrape: on a CPU device the running job's reported peak,
            # above the bytes in use between steps.
            self.assertGreater(D.metric_value(m, "memfit_device_memory_peak_bytes", device=dev),
                               D.metric_value(m, "memfit_device_memory_used_bytes", device=dev))
            self.assertEqual(D.metric_value(m, "memfit_device_memory_peak_bytes", device="cpu:1" if dev == "cpu:0"
                                            else "cpu:0"), 0)
            self.assertEqual(D.metric_value(m, "memfit_jobs", state="running"), 1)
            self.assertEqual(D.metric_value(m, "memfit_placement_latency_seconds_count"), 1)
            for line in m.splitlines():
                if line.startswith("# TYPE memfit_"):
                    name = line.split()[2]
                    self.assertIn(f"# HELP {name} ", m)
            if promtool:
                r = subprocess.run([promtool, "check", "metrics"], input=m, capture_output=True, text=True)
                self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
                self.assertEqual((r.stdout + r.stderr).strip(), "")
            d.jobs.CancelJob(pb.CancelJobRequest(id=j.id), timeout=30)
            d.wait(j.id, timeout=60)
            m = d.metrics()
            # Finished: its last values stay (metrics.finished_retention_seconds, 600 s) with
            # its final state; no series says it runs.
            self.assertIsNone(D.metric_value(m, "memfit_job_reserved_bytes", job_id=j.id, state="running"))
            self.assertEqual(D.metric_value(m, "memfit_job_reserved_bytes", job_id=j.id, state="cancelled"),
                             j.plan.reserved_bytes)
            self.assertGreaterEqual(D.metric_value(m, "memfit_job_steps", job_id=j.id, state="cancelled"), 2)
            self.assertEqual(D.metric_value(m, "memfit_job_info", job_id=j.id), 1)
            self.assertEqual(D.metric_value(m, "memfit_jobs", state="cancelled"), 1)
            self.assertEqual(D.metric_value(m, "memfit_device_memory_reserved_bytes", device=dev), 0)
            if not promtool:
                self.skipTest("promtool not installed (Debian: prometheus)")
        finally:
            d.stop()


if __name__ == "__main__":
    for path, what in ((D.MEMFITD, "memfitd"), (D.WORKER, "memfit-worker")):
        if not os.path.exists(path):
            print(f"{what} not built at {path}")
            sys.exit(1)
    if not D.W.have_data():
        print(f"data missing in {D.W.DATA}: run scripts/fetch_data.sh (skipped)")
        sys.exit(77)
    unittest.main(verbosity=2)
