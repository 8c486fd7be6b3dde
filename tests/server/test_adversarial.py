#!/usr/bin/python3
"""memfitd against a hostile user: the real daemon and real memfit-worker processes on tiny
GPT-2 jobs, with the user trying to make memfitd or its workers read or write outside the
configured folders (paths outside the roots, planted and swapped symbolic links, other jobs'
folders, the state folder, device files, oversize inputs), learn what a file holds or whether
it exists, race cancel against submit, and feed it bad names, priorities, tokens files and
damaged state. Each test states the behaviour it holds memfitd to.

Needs the data from scripts/fetch_data.sh for the tests that train or estimate; without it
those are skipped and the run ends with 77 (skipped) when the rest pass. The read-only store
test needs root (it runs memfitd as nobody through setpriv)."""
import functools
import hashlib
import os
import queue
import re
import secrets
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
import types
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import daemon_harness as D  # noqa: E402
from daemon_harness import pb, grpc  # noqa: E402

MiB = D.MiB
HAVE_DATA = D.W.have_data()
IS_ROOT = os.geteuid() == 0
DENIED, INVALID, PRECONDITION = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT,
                                 grpc.StatusCode.FAILED_PRECONDITION)


def needs_data(fn):
    @functools.wraps(fn)
    def wrapped(self, *a, **kw):
        if not HAVE_DATA:
            self.skipTest(f"data missing in {D.W.DATA}: run scripts/fetch_data.sh")
        return fn(self, *a, **kw)
    return wrapped


def refused(fn):
    """(code, details) of a call that must fail."""
    try:
        r = fn()
    except grpc.RpcError as e:
        return e.code(), e.details()
    raise AssertionError(f"accepted, expected a refusal: {r}")


def worker_pid(events):
    for e in reversed(events):
        if e.kind == "placed":
            return int(re.search(r"worker (\d+)", e.message).group(1))
    raise AssertionError("no placed event")


def snapshot(top):
    """Everything below `top` (itself included), never following links: type, mode, size,
    modification and change times, inode, link count, link target. Any file created,
    written, removed, renamed, chmod'ed or linked to changes it."""
    out = {}

    def walk(path, rel):
        st = os.lstat(path)
        out[rel] = (stat.S_IFMT(st.st_mode), st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino,
                    st.st_nlink, os.readlink(path) if stat.S_ISLNK(st.st_mode) else None)
        if stat.S_ISDIR(st.st_mode):
            for name in sorted(os.listdir(path)):
                walk(os.path.join(path, name), os.path.join(rel, name))

    walk(top, ".")
    return out


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    return path


def unpause(d):
    """Restart a --paused daemon without --paused: its queued jobs start now."""
    d.stop()
    d.extra = [x for x in d.extra if x != "--paused"]
    d.start()


class Case(unittest.TestCase):
    """Temporary folders removed and daemons stopped at the end of each test."""

    def tmpdir(self, name):
        path = tempfile.mkdtemp(prefix=f"memfit-adv-{name}-")
        self.addCleanup(shutil.rmtree, path, ignore_errors=True)
        return path

    def daemon(self, name, **kw):
        if "dir" not in kw and "state" not in kw:
            kw["dir"] = self.tmpdir(name)
        d = D.Daemon(name, **kw)
        self.addCleanup(d.stop)
        return d

    def rooted(self, name, extra=(), devices=("cpu:0=256MiB",), read=(), **kw):
        """A daemon with explicit roots: reads the fetched data and <base>/in (plus `read`),
        writes below <base>/users. <base>/outside is in no root; the state is <base>/state."""
        base = self.tmpdir(name)
        p = types.SimpleNamespace(base=base, inp=os.path.join(base, "in"), users=os.path.join(base, "users"),
                                  outside=os.path.join(base, "outside"), state=os.path.join(base, "state"))
        for x in (p.inp, p.users, p.outside):
            os.makedirs(x)
        roots = ["--read-root", D.W.DATA, "--read-root", p.inp, "--write-root", p.users]
        for r in read:
            roots += ["--read-root", r]
        d = self.daemon(name, dir=base, devices=devices, extra=list(extra), roots=roots, **kw)
        return d, p

    @staticmethod
    def spec(p, name, steps=1, **over):
        """A tiny GPT-2 job reading below <base>/in/<name>, writing to <base>/users/<name>."""
        over.setdefault("output_dir", os.path.join(p.users, name))
        return D.gpt2_spec(os.path.join(p.inp, name), steps=steps, **over)

    def assertRefused(self, fn, codes, *needles):
        code, details = refused(fn)
        codes = codes if isinstance(codes, tuple) else (codes,)
        self.assertIn(code, codes, details)
        for n in needles:
            self.assertIn(n, details)
        return details


# ---- 1. the default configuration: no roots -------------------------------------------------

class DefaultConfiguration(Case):
    @needs_data
    def test_without_roots_output_dir_under_etc_is_refused_and_nothing_is_created(self):
        d = self.daemon("noroots", roots=[], extra=["--paused"])
        etc_before = sorted(os.listdir("/etc"))
        target = f"/etc/memfit-adv-{secrets.token_hex(6)}"
        spec = D.gpt2_spec(os.path.join(d.dir, "a"), steps=1, output_dir=target)
        for out in (target, target + "/nested/deeper", "/etc"):
            spec.output_dir = out
            details = self.assertRefused(lambda: d.submit(spec), DENIED, "output_dir")
            self.assertTrue(details.startswith("output_dir: "), details)
            self.assertIn("outside the folders memfitd may write", details)
            self.assertRefused(lambda: d.cluster.EstimateJob(pb.EstimateJobRequest(spec=spec), timeout=30),
                               DENIED, "output_dir")
        self.assertFalse(os.path.lexists(target))
        self.assertEqual(sorted(os.listdir("/etc")), etc_before)
        # Its inputs are refused too: with no read roots a job cannot read anything.
        spec.output_dir = ""
        details = self.assertRefused(lambda: d.submit(spec), DENIED, "outside the folders memfitd may read")
        self.assertTrue(details.startswith("model.config_path: "), details)
        self.assertIn("none configured", details)
        spec.model.config_path = ""
        self.assertRefused(lambda: d.submit(spec), DENIED, "data.train_path", "outside the folders memfitd may read")
        self.assertEqual(len(d.jobs.ListJobs(pb.ListJobsRequest(), timeout=30).jobs), 0)


# ---- 2. output folders ----------------------------------------------------------------------

class OutputFolders(Case):
    def assertFailedOnOutputs(self, job):
        # Either the worker refused the planted link (the user's own doing: USER_INPUT,
        # naming output_dir) or it succeeded without going through it.
        self.assertIn(job.state, (pb.FAILED, pb.SUCCEEDED), job)
        if job.state == pb.FAILED:
            self.assertEqual(job.failure.kind, pb.USER_INPUT, job.failure)
            self.assertIn("output_dir", job.failure.message)
            self.assertEqual(job.attempts, 1)

    @needs_data
    def test_a_metrics_link_planted_before_the_start_is_not_followed(self):
        d, p = self.rooted("metricslink", extra=["--paused"])
        decoy = write(os.path.join(p.outside, "decoy.txt"), "precious: not memfit's to write\n")
        j = d.submit(self.spec(p, "a", steps=2))
        # The folder was claimed (new, with its marker) at submit; the link comes after.
        self.assertEqual(sorted(os.listdir(os.path.join(p.users, "a"))), [".memfit-job"])
        os.symlink(decoy, os.path.join(p.users, "a", "metrics.jsonl"))
        before, digest = snapshot(p.outside), sha256(decoy)
        unpause(d)
        done = d.wait(j.id, timeout=120)
        self.assertFailedOnOutputs(done)
        self.assertEqual(sha256(decoy), digest)
        self.assertEqual(snapshot(p.outside), before)

    @needs_data
    def test_a_checkpoints_link_planted_before_the_start_is_not_followed(self):
        d, p = self.rooted("ckptlink", extra=["--paused"])
        outside = os.path.join(p.outside, "keep")
        write(os.path.join(outside, "step-000000000-important", "data.bin"), os.urandom(4096))
        # Shaped like this job's own checkpoints: a resume would read it, the pruning of
        # old checkpoints (keep two) would delete it.
        write(os.path.join(outside, "step-000000000", "state.json"), '{"step": 0}')
        write(os.path.join(outside, "step-000000000", "state.safetensors"), os.urandom(512))
        write(os.path.join(outside, "latest"), "step-000000000\n")
        j = d.submit(self.spec(p, "b", steps=3, training={"checkpoint_interval": 1}))
        os.symlink(outside, os.path.join(p.users, "b", "checkpoints"))
        before = snapshot(p.outside)
        unpause(d)
        done = d.wait(j.id, timeout=120)
        self.assertFailedOnOutputs(done)
        self.assertEqual(snapshot(p.outside), before)
        self.assertTrue(os.path.isdir(os.path.join(outside, "step-000000000-important")))

    @needs_data
    def test_output_dir_swapped_for_a_link_is_not_followed(self):
        d, p = self.rooted("swapdir", extra=["--paused"])
        decoy = os.path.join(p.outside, "dd")
        os.makedirs(decoy)
        j = d.submit(self.spec(p, "c", steps=2))
        out = os.path.join(p.users, "c")
        # The attacker even copies the job's marker into the decoy folder.
        shutil.copy(os.path.join(out, ".memfit-job"), decoy)
        os.rename(out, out + "-moved")
        os.symlink(decoy, out)
        before = snapshot(p.outside)
        unpause(d)
        done = d.wait(j.id, timeout=120)
        self.assertFailedOnOutputs(done)
        self.assertEqual(snapshot(p.outside), before)
        # A link inside the write root at submit: refused, nothing made behind it.
        os.symlink(decoy, os.path.join(p.users, "evil"))
        self.assertRefused(lambda: d.submit(self.spec(p, "e", output_dir=os.path.join(p.users, "evil", "run"))),
                           DENIED, "output_dir")
        self.assertRefused(lambda: d.submit(self.spec(p, "f", output_dir=os.path.join(p.users, "evil"))),
                           (DENIED, PRECONDITION), "output_dir")
        self.assertEqual(snapshot(p.outside), before)

    @needs_data
    def test_another_jobs_folder_cannot_be_claimed(self):
        d, p = self.rooted("claimed")
        first = d.submit(self.spec(p, "a", steps=2))
        marker = os.path.join(p.users, "a", ".memfit-job")
        with open(marker) as f:
            self.assertEqual(f.read().strip(), first.id)
        other = self.spec(p, "b", output_dir=os.path.join(p.users, "a"))
        details = self.assertRefused(lambda: d.submit(other), PRECONDITION, "output_dir")
        self.assertTrue(details.startswith("output_dir: "), details)
        # Nor a folder inside it: the first job's worker replaces and removes what its
        # folder holds (adapter, checkpoints), so a job there would lose its outputs.
        for sub in ("adapter", "checkpoints/x", "eval"):
            nested = self.spec(p, "n", output_dir=os.path.join(p.users, "a", sub))
            self.assertRefused(lambda: d.submit(nested), PRECONDITION, "output_dir", "another job's output folder")
        done = d.wait(first.id, timeout=120)
        self.assertEqual(done.state, pb.SUCCEEDED, done.failure)
        self.assertTrue(os.path.isdir(done.result.adapter_dir), done.result)
        self.assertFalse(os.path.exists(os.path.join(p.users, "a", "eval")))
        self.assertRefused(lambda: d.submit(other), PRECONDITION, "output_dir")  # after it ended too
        self.assertRefused(lambda: d.submit(self.spec(p, "n", output_dir=os.path.join(p.users, "a", "eval"))),
                           PRECONDITION, "output_dir", "another job's output folder")
        with open(marker) as f:
            self.assertEqual(f.read().strip(), first.id)
        # Eight submits racing for one new folder: exactly one claims it.
        got = []
        race = self.spec(p, "r", output_dir=os.path.join(p.users, "race"))

        def one():
            try:
                got.append(d.submit(race).id)
            except grpc.RpcError as e:
                got.append(e.code())
        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [x for x in got if isinstance(x, str)]
        self.assertEqual(len(winners), 1, got)
        self.assertEqual(got.count(PRECONDITION), 7, got)
        self.assertEqual(d.wait(winners[0], timeout=120).state, pb.SUCCEEDED)

    @needs_data
    def test_a_folder_that_holds_files_is_refused_and_left_alone(self):
        d, p = self.rooted("nonempty", extra=["--paused"])
        important = write(os.path.join(p.users, "e", "adapter", "important.bin"), os.urandom(8192))
        before = snapshot(os.path.join(p.users, "e"))
        details = self.assertRefused(lambda: d.submit(self.spec(p, "e")), PRECONDITION, "output_dir", "adapter")
        self.assertIn("new or empty folder", details)
        # An estimate claims nothing and touches nothing.
        self.assertTrue(d.cluster.EstimateJob(pb.EstimateJobRequest(spec=self.spec(p, "e")), timeout=30).fits)
        self.assertEqual(snapshot(os.path.join(p.users, "e")), before)
        self.assertTrue(os.path.isfile(important))

    @needs_data
    def test_the_state_folder_is_not_an_output(self):
        # The harness's default roots: /tmp is a write root and holds the state folder.
        d = self.daemon("stateout", extra=["--paused"])
        state = os.path.join(d.dir, "state")
        inside = d.submit(D.gpt2_spec(os.path.join(d.dir, "a"), steps=1, output_dir=""))
        before = snapshot(state + "/jobs")
        for out in (state, state + "/jobs", f"{state}/jobs/{inside.id}/output", state + "/x/y", d.dir):
            spec = D.gpt2_spec(os.path.join(d.dir, "b"), steps=1, output_dir=out)
            details = self.assertRefused(lambda: d.submit(spec), DENIED, "output_dir")
            self.assertIn("state folder", details)
        self.assertEqual(snapshot(state + "/jobs"), before)
        self.assertFalse(os.path.exists(state + "/x"))


# ---- 3. nothing learned about files outside the roots ---------------------------------------

class Secrets(Case):
    SECRET = "/etc/shadow" if os.path.exists("/etc/shadow") else "/etc/passwd"
    MISSING = "/etc/does-not-exist-xyz"

    def estimate_refusal(self, d, tmp, config_path):
        spec = D.gpt2_spec(tmp, steps=1, output_dir="")
        spec.model.config_path = config_path
        code, details = refused(lambda: d.cluster.EstimateJob(pb.EstimateJobRequest(spec=spec), timeout=30))
        self.assertEqual(code, DENIED, details)
        self.assertTrue(details.startswith("model.config_path: "), details)
        for leak in ("root:", "last read", "does not exist", "No such file", "JSON", "parse"):
            self.assertNotIn(leak, details)
        # Nor is it queued by a submit.
        self.assertEqual(refused(lambda: d.submit(spec))[0], DENIED)
        return details

    def assertSameRefusal(self, d, tmp, a, b):
        ma, mb = self.estimate_refusal(d, tmp, a), self.estimate_refusal(d, tmp, b)
        self.assertEqual(ma.replace(a, "PATH"), mb.replace(b, "PATH"))

    @needs_data
    def test_estimate_neither_reads_nor_reveals_files_outside_the_roots(self):
        self.assertFalse(os.path.exists(self.MISSING))
        # No roots at all (the default), then explicit roots.
        d0 = self.daemon("secret0", roots=[], extra=["--paused"])
        self.assertSameRefusal(d0, os.path.join(d0.dir, "a"), self.SECRET, self.MISSING)
        d, p = self.rooted("secret", extra=["--paused"])
        tmp = os.path.join(p.inp, "a")
        self.assertSameRefusal(d, tmp, self.SECRET, self.MISSING)
        # Links inside a read root that lead out: an existing and a missing target, by
        # absolute and by relative path, look the same.
        links = {}
        for name, target in (("abs-secret", self.SECRET), ("abs-missing", self.MISSING),
                             ("rel-secret", "../" * 12 + self.SECRET.lstrip("/")),
                             ("rel-missing", "../" * 12 + self.MISSING.lstrip("/"))):
            links[name] = os.path.join(p.inp, name)
            os.symlink(target, links[name])
        self.assertSameRefusal(d, tmp, links["abs-secret"], links["abs-missing"])
        self.assertSameRefusal(d, tmp, links["rel-secret"], links["rel-missing"])
        self.assertSameRefusal(d, tmp, links["abs-secret"], links["rel-missing"])
        # memfitd's own database is no input either.
        details = self.estimate_refusal(d, tmp, os.path.join(p.state, "memfit.db"))
        self.assertIn("state folder", details)
        self.assertEqual(len(d.jobs.ListJobs(pb.ListJobsRequest(), timeout=30).jobs), 0)


# ---- 4. inputs: regular files of bounded size -----------------------------------------------

class Inputs(Case):
    @needs_data
    def test_device_files_fifos_and_folders_are_not_inputs(self):
        d, p = self.rooted("devzero", extra=["--paused"], read=["/dev"])
        val = write(os.path.join(p.inp, "v.txt"), "some years ago, never mind how long precisely. " * 20)
        os.symlink("/dev/zero", os.path.join(p.inp, "zero"))
        os.mkfifo(os.path.join(p.inp, "fifo"))  # opening it for reading would block
        for n, (train, needle) in enumerate((("/dev/zero", "not a regular file"),
                                             (os.path.join(p.inp, "zero"), "leads outside"),
                                             (os.path.join(p.inp, "fifo"), "not a regular file"),
                                             (p.inp, "not a regular file"))):
            t0 = time.time()
            details = self.assertRefused(lambda: d.submit(self.spec(p, f"z{n}", train=train, val=val)),
                                         (INVALID, DENIED), needle)
            self.assertTrue(details.startswith("data.train_path: "), details)
            self.assertLess(time.time() - t0, 10)
        self.assertEqual(len(d.jobs.ListJobs(pb.ListJobsRequest(), timeout=30).jobs), 0)
        self.assertEqual(os.listdir(p.users), [])  # refused before any folder was claimed

    @needs_data
    def test_inputs_larger_than_max_input_bytes_are_refused(self):
        base = self.tmpdir("maxinput-cfg")
        cfg = write(os.path.join(base, "memfitd.yaml"), "limits: {max_input_bytes: 1KiB}\n")
        d, p = self.rooted("maxinput", extra=["--paused", "--config", cfg])
        val = write(os.path.join(p.inp, "v.txt"), "x" * 512)
        big = write(os.path.join(p.inp, "big.txt"), "call me ishmael. " * 120 + "x" * (2048 - 17 * 120))
        self.assertEqual(os.path.getsize(big), 2048)
        details = self.assertRefused(lambda: d.submit(self.spec(p, "a", train=big, val=val)), INVALID,
                                     "data.train_path", "limits.max_input_bytes")
        self.assertIn("2.00 KiB", details)
        self.assertRefused(lambda: d.submit(self.spec(p, "b", train=val, val=big)), INVALID,
                           "data.validation_path", "limits.max_input_bytes")
        # Under the limit: accepted.
        small = write(os.path.join(p.inp, "small.txt"), "call me ishmael. " * 50)
        j = d.submit(self.spec(p, "c", train=small, val=val))
        self.assertEqual(j.state, pb.QUEUED)


# ---- 5. and 8f. worker processes --------------------------------------------------------------

class Workers(Case):
    @needs_data
    def test_the_kernel_caps_a_workers_memory_at_reservation_plus_allowance(self):
        d = self.daemon("rlimit", extra=["--worker-memory-allowance", "1GiB"])
        j = d.submit(D.gpt2_spec(os.path.join(d.dir, "a"), steps=100000, training={"checkpoint_interval": 100000}))
        running = d.wait(j.id, lambda x: x.state == pb.RUNNING and x.progress.step >= 1, timeout=120)
        pid = worker_pid(d.events(j.id))
        with open(f"/proc/{pid}/limits") as f:
            line = [x for x in f if x.startswith("Max data size")][0]
        soft, hard = line.split()[3:5]
        want = running.plan.reserved_bytes + (1 << 30)
        self.assertEqual((soft, hard), (str(want), str(want)), line)
        d.jobs.CancelJob(pb.CancelJobRequest(id=j.id), timeout=30)
        self.assertEqual(d.wait(j.id, timeout=60).state, pb.CANCELLED)

    @needs_data
    def test_a_worker_past_its_kernel_limit_is_out_of_memory_not_a_host_problem(self):
        # 120 MB of text: loading and tokenizing it needs more than the reservation plus a
        # 700 MiB allowance. The kernel refuses, the worker reports oom, the job follows the
        # out-of-memory rule (two larger retries) and fails as SYSTEM/oom.
        d = self.daemon("kernel-oom", extra=["--worker-memory-allowance", "700MiB", "--crash-retries", "0"])
        spec = D.gpt2_spec(os.path.join(d.dir, "a"), steps=3)
        with open(os.path.join(D.W.DATA, "moby-dick", "chapter_1.txt")) as f:
            chapter = f.read()
        with open(spec.data.train_path, "w") as f:
            while f.tell() < 120 << 20:
                f.write(chapter)
        j = d.submit(spec)
        done = d.wait(j.id, timeout=600)
        self.assertEqual(done.state, pb.FAILED)
        self.assertEqual((done.failure.kind, done.failure.reason), (pb.SYSTEM, "oom"))
        self.assertEqual((done.attempts, done.oom_retries, done.crash_retries), (3, 2, 0))
        failed = [e.message for e in d.events(j.id) if e.kind == "failed"]
        self.assertEqual(len(failed), 3)
        self.assertIn("reached its memory limit", failed[0])
        self.assertEqual(d.devices_now()[0].reserved_bytes, 0)

    @needs_data
    def test_a_worker_killed_by_sigkill_fails_the_job_naming_the_signal(self):
        d = self.daemon("sigkill", extra=["--crash-retries", "0"])
        j = d.submit(D.gpt2_spec(os.path.join(d.dir, "a"), steps=100000, training={"checkpoint_interval": 100000}))
        d.wait(j.id, lambda x: x.state == pb.RUNNING and x.progress.step >= 1, timeout=120)
        os.kill(worker_pid(d.events(j.id)), signal.SIGKILL)
        done = d.wait(j.id, timeout=60)
        self.assertEqual(done.state, pb.FAILED)
        self.assertEqual(done.failure.kind, pb.SYSTEM)
        self.assertIn("killed by signal 9 (SIGKILL)", done.failure.message)
        self.assertEqual(done.attempts, 1)
        self.assertEqual(d.devices_now()[0].reserved_bytes, 0)


    @needs_data
    def test_workers_run_as_the_configured_user_with_nothing_of_the_daemons(self):
        if not IS_ROOT:
            self.skipTest("starting workers as another user needs root")
        try:
            import pwd
            nobody = pwd.getpwnam("nobody")
        except KeyError:
            self.skipTest("no user 'nobody' here")
        # nobody must reach the worker binary and the fetched data (CI's clone may sit
        # below a private home folder).
        for path in (D.WORKER, os.path.join(D.W.DATA, "gpt2", "encoder.json")):
            probe = subprocess.run(["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
                                    "--clear-groups", "test", "-r", path], capture_output=True)
            if probe.returncode != 0:
                self.skipTest(f"{path} is not readable by nobody here")
        base = self.tmpdir("user")
        os.chmod(base, 0o755)
        d = self.daemon("user", dir=base, extra=["--worker-user", "nobody"],
                        roots=["--read-root", D.W.DATA, "--read-root", base])
        spec = D.gpt2_spec(os.path.join(base, "a"), steps=30, training={"checkpoint_interval": 1000})
        os.chmod(os.path.join(base, "a"), 0o755)
        spec.output_dir = ""
        j = d.submit(spec)
        d.wait(j.id, lambda x: x.state == pb.RUNNING and x.progress.step >= 1, timeout=120)
        pid = worker_pid(d.events(j.id))
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
        self.assertEqual(status["Uid"].split()[:2], [str(nobody.pw_uid)] * 2)
        self.assertEqual(status["Groups"].strip(), "")
        # No descriptor of the daemon's (database, sockets, lock) reached the worker.
        fds = {os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")}
        self.assertFalse([x for x in fds if "memfit.db" in x or "memfitd.lock" in x or x.startswith("socket:")], fds)
        done = d.wait(j.id, timeout=300)
        self.assertEqual(done.state, pb.SUCCEEDED, done.failure)
        self.assertEqual(os.stat(done.result.adapter_dir).st_uid, nobody.pw_uid)
        state = os.path.join(base, "state")
        self.assertEqual(stat.S_IMODE(os.stat(state).st_mode), 0o711)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(state, "memfit.db")).st_mode), 0o600)


# ---- 6., 8d, 8e. the state folder -------------------------------------------------------------

class StateFolder(Case):
    def test_a_second_daemon_on_the_same_state_folder_exits(self):
        d = self.daemon("twice", extra=["--paused"])
        state = os.path.join(d.dir, "state")
        code, err = D.run_memfitd("--state-dir", state, "--paused")
        self.assertEqual(code, 2, err)
        self.assertIn(f"another memfitd (pid {d.proc.pid})", err.splitlines()[0])
        # The first is untouched and still serves.
        self.assertIsNone(d.proc.poll())
        self.assertEqual(len(d.devices_now()), 1)
        # The lock dies with its holder: after SIGKILL a new daemon starts there.
        d.kill9()
        d.start()
        with open(os.path.join(state, "memfitd.lock")) as f:
            self.assertEqual(f.read().strip(), str(d.proc.pid))

    @needs_data
    def test_a_corrupt_job_record_fails_that_job_only(self):
        d = self.daemon("corrupt", extra=["--paused"])
        jobs = [d.submit(D.gpt2_spec(os.path.join(d.dir, n), steps=1, output_dir="")) for n in "abc"]
        bad = jobs[1]
        self.assertEqual(d.stop(), 0)
        db = sqlite3.connect(os.path.join(d.dir, "state", "memfit.db"))
        with db:
            n = db.execute("UPDATE jobs SET job = x'deadbeef' WHERE id = ?", (bad.id,)).rowcount
        db.close()
        self.assertEqual(n, 1)
        d.start()
        got = d.get(bad.id)
        self.assertEqual(got.state, pb.FAILED)
        self.assertEqual(got.failure.reason, "corrupt_record")
        self.assertEqual(got.failure.kind, pb.SYSTEM)
        self.assertEqual(d.events(bad.id)[-1].state, pb.FAILED)
        self.assertIn("could not be read", "".join(d.log))
        listed = {j.id: j.state for j in d.jobs.ListJobs(pb.ListJobsRequest(), timeout=30).jobs}
        self.assertEqual(listed, {jobs[0].id: pb.QUEUED, bad.id: pb.FAILED, jobs[2].id: pb.QUEUED})
        for j in (jobs[0], jobs[2]):
            self.assertEqual(d.get(j.id).spec, j.spec)
        unpause(d)
        for j in (jobs[0], jobs[2]):
            done = d.wait(j.id, timeout=120)
            self.assertEqual(done.state, pb.SUCCEEDED, done.failure)
        self.assertEqual(d.get(bad.id).state, pb.FAILED)

    def test_a_read_only_store_is_refused_at_start(self):
        if not IS_ROOT:
            self.skipTest("needs root: memfitd is run as nobody (setpriv) on a store owned by root")
        if not shutil.which("setpriv"):
            self.skipTest("setpriv (util-linux) not installed")
        base = self.tmpdir("readonly")
        os.chmod(base, 0o755)
        state = os.path.join(base, "state")
        D.Daemon("readonly", dir=base, extra=["--paused"]).stop()  # makes the store
        db = os.path.join(state, "memfit.db")
        self.assertEqual(os.stat(db).st_uid, 0)
        # The lock file is nobody's (so the lock is not what fails); the database is root's.
        os.chown(os.path.join(state, "memfitd.lock"), 65534, 65534)
        for mode, needle in ((0o644, "read-only"), (0o600, "memfit.db")):
            os.chmod(db, mode)
            digest = sha256(db)
            r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", D.MEMFITD,
                                "--state-dir", state, "--listen", "127.0.0.1:0", "--metrics-listen", "off", "--paused"],
                               capture_output=True, text=True, timeout=30)
            self.assertEqual(r.returncode, 2, r.stderr)
            first = r.stderr.splitlines()[0]
            self.assertIn("memfit.db", first)
            self.assertIn(needle, first)
            self.assertEqual(sha256(db), digest)


# ---- 7. and 9. races ------------------------------------------------------------------------

class Races(Case):
    @needs_data
    def test_cancel_racing_submit_never_runs_a_cancelled_job(self):
        # A submitter, a canceller of each id it returns, and a sweeper that cancels every
        # queued job it lists (which reaches some jobs before their submit has returned).
        # The device holds four of these 1-step jobs, so most submits are placed at once
        # and the scheduling loop is busy while the next submit comes in: that is when a
        # cancel could fall between a submit's insert and its enqueue. 800 rounds: the
        # daemon of 9dd8845 ran a job cancelled there in every one of 6 tries (~6 s); this
        # one takes ~20 s on 2 cores.
        d = self.daemon("cancelrace", devices=("cpu:0=400MiB",), extra=["--cancel-grace-seconds", "5"])
        spec = D.gpt2_spec(os.path.join(d.dir, "a"), steps=1, output_dir="")
        rounds, submitted, answers = 800, [], []
        ids, done_submitting, lock = queue.Queue(), threading.Event(), threading.Lock()
        deadline = time.time() + 60

        def cancel(job_id):
            try:
                st = d.jobs.CancelJob(pb.CancelJobRequest(id=job_id), timeout=30).state
            except grpc.RpcError as e:
                st = e.code()
            with lock:
                answers.append((job_id, st))

        def submitter(n):
            for _ in range(n):
                if time.time() > deadline:
                    return
                j = d.submit(spec)
                with lock:
                    submitted.append(j.id)
                ids.put(j.id)

        def canceller():  # cancels each returned id at once
            while not (done_submitting.is_set() and ids.empty()):
                try:
                    cancel(ids.get(timeout=0.05))
                except queue.Empty:
                    pass

        def sweeper():  # cancels what it sees queued, often before its submit has returned
            while not done_submitting.is_set():
                for j in d.jobs.ListJobs(pb.ListJobsRequest(states=[pb.QUEUED], page_size=1000), timeout=30).jobs:
                    cancel(j.id)

        subs = [threading.Thread(target=submitter, args=(rounds,))]
        others = [threading.Thread(target=canceller), threading.Thread(target=sweeper)]
        for t in subs + others:
            t.start()
        for t in subs:
            t.join()
        done_submitting.set()
        for t in others:
            t.join()
        self.assertGreaterEqual(len(submitted), 100)
        final = {i: d.wait(i, timeout=max(30, deadline + 60 - time.time())) for i in submitted}
        by_job = {}
        for i, st in answers:
            by_job.setdefault(i, []).append(st)
        self.assertEqual(set(by_job), set(submitted))
        for sts in by_job.values():
            self.assertTrue(all(st in (pb.CANCELLED, pb.CANCELLING, pb.SUCCEEDED) for st in sts), sts)
        # Only a cancel makes a job CANCELLING: a job no cancel answered otherwise than
        # CANCELLED was cancelled while it was queued.
        while_queued = {i for i, sts in by_job.items() if set(sts) == {pb.CANCELLED}}
        self.assertTrue(while_queued)
        for i in submitted:
            ev = d.events(i)
            why = (i, by_job[i], [(e.kind, e.state, e.message) for e in ev])
            self.assertIn(final[i].state, (pb.CANCELLED, pb.SUCCEEDED), why)
            cancelled_at = [n for n, e in enumerate(ev) if e.state == pb.CANCELLED]
            if cancelled_at:  # nothing places it after it was cancelled
                self.assertNotIn("placed", [e.kind for e in ev[cancelled_at[0]:]], why)
                self.assertEqual(final[i].state, pb.CANCELLED, why)
            if i in while_queued:  # it never ran
                self.assertEqual(final[i].state, pb.CANCELLED, why)
                self.assertEqual(final[i].attempts, 0, why)
                self.assertNotIn("placed", [e.kind for e in ev], why)
        time.sleep(0.5)
        self.assertEqual(d.devices_now()[0].reserved_bytes, 0)
        self.assertEqual(list(d.devices_now()[0].job_ids), [])
        self.assertEqual(D.metric_value(d.metrics(), "memfit_queue_length"), 0)
        self.assertEqual(D.metric_value(d.metrics(), "memfit_jobs", state="running"), 0)

    @needs_data
    def test_links_swapped_in_while_jobs_run_never_reach_the_decoys(self):
        d, p = self.rooted("linkrace", devices=("cpu:0=640MiB",), extra=["--paused", "--crash-retries", "0"])
        # Decoys: another user's folder inside the write root, and a folder in no root.
        inside = os.path.join(p.users, "someone-else")
        outside = self.tmpdir("decoy")
        for top in (inside, outside):
            write(os.path.join(top, "checkpoints", "latest"), "step-000000001\n")
            write(os.path.join(top, "checkpoints", "step-000000001", "state.json"), '{"step": 1}')
            write(os.path.join(top, "checkpoints", "step-000000001", "state.safetensors"), os.urandom(1024))
            write(os.path.join(top, "checkpoints", "step-000000000", "state.json"), '{"step": 0}')
            write(os.path.join(top, "adapter", "adapter.safetensors"), os.urandom(2048))
            write(os.path.join(top, "model", "model.safetensors"), os.urandom(2048))
            write(os.path.join(top, "metrics.jsonl"), '{"event": "precious"}\n')
        targets = {"checkpoints": "checkpoints", "adapter.tmp": "adapter", "model.tmp": "model",
                   "metrics.jsonl": "metrics.jsonl"}
        # (kind, what is swapped, from which step on): some from before the start, some
        # only once the job is training (its checkpoints saved every step, the folders it
        # writes at the end).
        plan = [("lora", ("checkpoints",), 2), ("lora", ("adapter.tmp",), 0),
                ("full", ("model.tmp", "checkpoints"), 1), ("lora", ("metrics.jsonl",), 1),
                ("lora", tuple(targets), 0), ("lora", ("checkpoints", "adapter.tmp"), 4),
                ("lora", ("adapter.tmp",), 3), ("lora", (), 0)]  # the last one untouched: it must succeed
        jobs = []
        for n, (kind, names, from_step) in enumerate(plan):
            spec = self.spec(p, f"j{n}", steps=5 if kind == "full" else 8, lora=kind == "lora",
                             training={"checkpoint_interval": 1})
            jobs.append(types.SimpleNamespace(id=d.submit(spec).id, out=spec.output_dir, names=names,
                                              from_step=from_step, step=0))
        before = {top: snapshot(top) for top in (inside, outside)}
        stop = threading.Event()
        swaps = [0]

        def plant(path, target, n):
            # Odd rounds: the real entry is moved aside for good and a link takes its place.
            # Even rounds: a link appears where the worker is about to write, and goes again.
            tmp = f"{path}.lnk-{n}"
            try:
                os.symlink(target, tmp)
            except OSError:
                return
            try:
                if n % 2 and os.path.isdir(path) and not os.path.islink(path):
                    os.rename(path, f"{path}.moved-{n}")
                os.rename(tmp, path)
                swaps[0] += 1
                if n % 2 == 0:
                    time.sleep(0.002)
                    os.unlink(path)
            except OSError:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass

        def swapper():
            n = 0
            while not stop.is_set():
                for j in jobs:
                    if j.step < j.from_step:
                        continue
                    for name in j.names:
                        n += 1
                        style = n % 3
                        target = (os.path.join(inside, targets[name]) if style == 0 else
                                  os.path.join("..", "someone-else", targets[name]) if style == 1 else
                                  os.path.join(outside, targets[name]))
                        plant(os.path.join(j.out, name), target, n)
                time.sleep(0.001)

        t = threading.Thread(target=swapper)
        t.start()
        try:
            unpause(d)  # every job starts now, while the links come and go
            deadline = time.time() + 15
            while time.time() < deadline:
                states = {}
                for j in jobs:
                    got = d.get(j.id)
                    j.step, states[j.id] = got.progress.step, got.state
                if all(st in D.FINAL for st in states.values()):
                    break
                time.sleep(0.02)
        finally:
            stop.set()
            t.join()
        done = [d.wait(j.id, timeout=180) for j in jobs]
        self.assertGreater(swaps[0], len(plan))
        self.assertEqual(snapshot(inside), before[inside])
        self.assertEqual(snapshot(outside), before[outside])
        for job in done:
            self.assertIn(job.state, (pb.SUCCEEDED, pb.FAILED), job)
            if job.state == pb.FAILED:
                self.assertEqual(job.attempts, 1)
        self.assertEqual(done[-1].state, pb.SUCCEEDED, done[-1].failure)
        self.assertTrue(any("symbolic link" in j.failure.message for j in done), [j.failure for j in done])
        self.assertEqual(d.devices_now()[0].reserved_bytes, 0)


# ---- 8. names, priorities, tokens files ---------------------------------------------------------

class Robustness(Case):
    ALICE, ROOT = "alice-token-0123456789", "root-token-0123456789ab"

    @needs_data
    def test_names_are_short_printable_text(self):
        base = self.tmpdir("names-cfg")
        cfg = write(os.path.join(base, "memfitd.yaml"), "limits: {max_message_bytes: 16MiB}\n")
        d = self.daemon("names", extra=["--paused", "--config", cfg])
        spec = D.gpt2_spec(os.path.join(d.dir, "a"), steps=1, output_dir="")
        for name in ("x" * (4 << 20), "y" * 300, "z" * 257):
            spec.name = name
            details = self.assertRefused(lambda: d.submit(spec), INVALID, "limits.max_name_bytes")
            self.assertTrue(details.startswith(f"name: {len(name)} bytes, at most 256"), details)
            self.assertLess(len(details), 300)  # the name is not echoed back
        for name, shown in (("\x1b[31mred", "0x1b"), ("two\nlines", "0x0a"), ("del\x7f", "0x7f"), ("nul\x00", "0x00")):
            spec.name = name
            details = self.assertRefused(lambda: d.submit(spec), INVALID, "name", shown)
            self.assertNotIn(name, details)
            self.assertFalse(any(ord(ch) < 0x20 or ord(ch) == 0x7f for ch in details), repr(details))
        spec.name = "w" * 256
        self.assertEqual(d.submit(spec).name, "w" * 256)
        spec.name = "ok"
        self.assertRefused(lambda: d.submit(spec, request_id="r" * 300), INVALID, "request_id")
        self.assertEqual(len(d.jobs.ListJobs(pb.ListJobsRequest(), timeout=30).jobs), 1)
        # With the default message limit (4 MiB) a 4 MiB name does not even reach admission.
        d2 = self.daemon("names2", extra=["--paused"])
        spec.name = "x" * (4 << 20)
        self.assertIn(refused(lambda: d2.submit(spec))[0], (grpc.StatusCode.RESOURCE_EXHAUSTED, INVALID))
        spec.name = "x" * ((4 << 20) - 65536)
        self.assertRefused(lambda: d2.submit(spec), INVALID, "name: ")
        self.assertEqual(len(d2.devices_now()), 1)

    @needs_data
    def test_high_priorities_need_an_admin_token(self):
        d = self.daemon("prio", extra=["--paused"], tokens=[(self.ALICE, "alice", False), (self.ROOT, "root", True)])
        spec = D.gpt2_spec(os.path.join(d.dir, "a"), steps=1, output_dir="")
        for prio in (1000, 11, 2147483647):
            details = self.assertRefused(lambda: d.submit(spec, token=self.ALICE, priority=prio), DENIED,
                                         "priority", "limits.max_user_priority")
            self.assertTrue(details.startswith(f"priority: {prio} "), details)
        self.assertEqual(d.submit(spec, token=self.ALICE, priority=10).priority, 10)
        self.assertEqual(d.submit(spec, token=self.ROOT, priority=1000).priority, 1000)
        self.assertEqual(len(d.jobs.ListJobs(pb.ListJobsRequest(all_users=True), metadata=d.md(self.ROOT),
                                             timeout=30).jobs), 2)

    def test_tokens_file_must_be_private_and_unique(self):
        tmp = self.tmpdir("tokens")
        state = ["--state-dir", os.path.join(tmp, "state")]
        good = "t" * 20

        def tokens(name, text, mode=0o600):
            path = write(os.path.join(tmp, name), text)
            os.chmod(path, mode)
            return path
        for mode in (0o644, 0o640, 0o604):
            code, err = D.run_memfitd(*state, "--tokens", tokens(f"open-{mode:o}", f"{good} alice\n", mode))
            self.assertEqual(code, 2, err)
            self.assertIn("tokens_file", err.splitlines()[0])
            self.assertIn("readable by others", err.splitlines()[0])
            self.assertNotIn(good, err)
        secret = "s3cret-" + secrets.token_hex(12)
        twice = tokens("twice", f"{secret} alice\n{good} carol\n{secret} bob admin\n")
        code, err = D.run_memfitd(*state, "--tokens", twice)
        self.assertEqual(code, 2, err)
        self.assertIn("twice:3: this token is already given", err.splitlines()[0])
        self.assertNotIn(secret, err)
        # The same tokens, once each, in a private file: memfitd starts and knows them.
        d = self.daemon("tokens", extra=["--paused"], tokens=[(secret, "alice", False), (good, "bob", True)])
        self.assertEqual(len(d.devices_now(token=secret)), 1)
        self.assertEqual(refused(lambda: d.devices_now(token="not-" + secret))[0], grpc.StatusCode.UNAUTHENTICATED)


if __name__ == "__main__":
    for path, what in ((D.MEMFITD, "memfitd"), (D.WORKER, "memfit-worker")):
        if not os.path.exists(path):
            print(f"{what} not built at {path}")
            sys.exit(1)
    if not HAVE_DATA:
        print(f"data missing in {D.W.DATA}: the tests that need it are skipped (scripts/fetch_data.sh)")
    result = unittest.main(verbosity=2, exit=False).result
    if not result.wasSuccessful():
        sys.exit(1)
    sys.exit(0 if HAVE_DATA else 77)
