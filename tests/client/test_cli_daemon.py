#!/usr/bin/python3
"""The `memfit` CLI as a process against a real memfitd with real workers: every verb,
`-o json` parsed and checked, exit codes, the error paths (unreachable server, wrong
token, unknown job, invalid spec), and `memfit watch` under a pseudo-terminal. Needs the
data from scripts/fetch_data.sh (exit 77 = skipped without it)."""
import json
import os
import pty
import re
import select
import subprocess
import sys
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "server"))
import daemon_harness as D  # noqa: E402

CLI = os.environ.get("MEMFIT_CLI", os.path.join(D.REPO, "build", "bin", "memfit"))
TOKEN, OTHER, ADMIN = "cli-alice-token-000000", "cli-bob-token-0000000000", "cli-root-token-00000000"


def spec_file(tmp, name, steps=6, **over):
    """A tiny GPT-2 LoRA spec file (relative paths: the CLI makes them absolute)."""
    d = os.path.join(tmp, name)
    os.makedirs(d, exist_ok=True)
    over.setdefault("method", {"kind": "lora", "lora": {"rank": 4, "alpha": 8}})
    training = {"steps": steps}
    training.update(over.pop("training", {}))
    path = D.W.gpt2_job(d, training=training, **over)
    with open(path) as f:
        spec = json.load(f)
    spec["name"] = name
    spec["model"]["config_path"] = "config.json"  # relative to the spec file
    with open(path, "w") as f:
        json.dump(spec, f)
    return path


class Cli(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.d = D.Daemon("cli", devices=("cpu:0=512MiB",),
                         tokens=[(TOKEN, "alice", False), (OTHER, "bob", False), (ADMIN, "root", True)])
        cls.env = dict(os.environ, MEMFIT_SERVER=f"127.0.0.1:{cls.d.port}", MEMFIT_TOKEN=TOKEN)

    @classmethod
    def tearDownClass(cls):
        cls.d.stop()

    def memfit(self, *args, token=None, env=None, timeout=300):
        e = dict(env or self.env)
        if token is not None:
            e["MEMFIT_TOKEN"] = token
        return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout, env=e)

    def json_of(self, *args, **kw):
        r = self.memfit(*args, "-o", "json", **kw)
        self.assertEqual(r.returncode, 0, r.stderr)
        return json.loads(r.stdout)

    def test_submit_watch_get_list_events_logs_devices(self):
        spec = spec_file(self.d.dir, "one", steps=5)
        r = self.memfit("submit", "-f", spec, "--watch")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        job_id = re.match(r"(j\S+) queued: estimated peak [\d.]+ MiB, reserving [\d.]+ MiB", r.stdout).group(1)
        lines = r.stdout.splitlines()
        self.assertIn("placed: running on cpu:0", r.stdout)
        self.assertEqual(len([x for x in lines if re.search(r" step \d/5 loss ", x)]), 5)  # not a terminal: lines
        self.assertRegex(lines[-1], rf"^{job_id} succeeded: measured peak [\d.]+ MiB, estimated [\d.]+ MiB, "
                                    r"reserved [\d.]+ MiB, eval loss \d+\.\d{4}$")

        j = self.json_of("get", job_id)
        self.assertEqual(j["id"], job_id)
        self.assertEqual(j["state"], "SUCCEEDED")
        self.assertEqual(j["owner"], "alice")
        self.assertEqual(j["spec"]["model"]["config_path"], os.path.join(self.d.dir, "one", "config.json"))
        self.assertGreater(int(j["result"]["measured_peak_bytes"]), 0)
        self.assertEqual(int(j["progress"]["step"]), 5)
        text = self.memfit("get", job_id).stdout
        self.assertIn("state       succeeded on cpu:0", text)
        self.assertIn("output      " + os.path.join(self.d.dir, "one", "out", "adapter"), text)
        # -o yaml is the spec as memfitd ran it: it can be submitted again
        y = self.memfit("get", job_id, "-o", "yaml")
        self.assertEqual(y.returncode, 0)
        again = os.path.join(self.d.dir, "again.yaml")
        with open(again, "w") as f:
            # a new output folder: the old one holds the first run's checkpoints
            f.write(y.stdout.replace("steps: 5", "steps: 2").replace("/one/out", "/again-out"))
        self.assertIn("learning_rate: 0.003\n", y.stdout)
        r2 = self.memfit("submit", "-f", again, "-o", "json")
        self.assertEqual(r2.returncode, 0, r2.stderr)
        second = json.loads(r2.stdout)["id"]
        self.assertEqual(self.memfit("watch", second).returncode, 0)

        listed = self.json_of("list")
        self.assertEqual([x["id"] for x in listed][:2], [second, job_id])  # newest first
        table = self.memfit("list", "--state", "succeeded").stdout.splitlines()
        self.assertEqual(table[0].split(), ["JOB", "NAME", "OWNER", "STATE", "DEVICE", "STEP", "RESERVED", "PEAK", "TIME"])
        self.assertTrue(any(line.startswith(job_id) and "succeeded" in line and " 5/5 " in line for line in table))
        self.assertEqual(self.json_of("list", "--state", "queued"), [])

        ev = self.json_of("events", job_id)
        self.assertEqual([int(e["seq"]) for e in ev], list(range(1, len(ev) + 1)))
        self.assertEqual(ev[0]["kind"], "submitted")
        self.assertEqual(ev[-1]["state"], "SUCCEEDED")
        logs = self.memfit("logs", job_id)
        self.assertEqual(logs.returncode, 0)
        worker = [json.loads(x) for x in logs.stdout.splitlines()]
        self.assertEqual(worker[0]["event"], "started")
        self.assertEqual(worker[-1]["event"], "finished")

        dev = self.json_of("devices")["devices"]
        self.assertEqual(dev[0]["name"], "cpu:0")
        self.assertEqual(int(dev[0]["total_bytes"]), 512 << 20)
        out = self.memfit("devices").stdout.splitlines()
        self.assertEqual(out[0].split()[:5], ["DEVICE", "MODEL", "TOTAL", "RESERVED", "USED"])
        self.assertRegex(out[1], r"^cpu:0\s+configured\s+512\.0 MiB\s+.*\[[#+.]{24}\]")

        est = self.memfit("estimate", "-f", spec, "--server", self.env["MEMFIT_SERVER"], "-o", "json")
        self.assertEqual(est.returncode, 0, est.stderr)
        e = json.loads(est.stdout)
        self.assertTrue(e["fits"])
        self.assertTrue(e["plan"]["calibration_key"].startswith("gpt2|"))
        self.assertGreater(int(e["plan"]["reserved_bytes"]), e["peak_bytes"])

    def test_submit_accepts_the_auto_preset(self):
        # Issue 11: the CLI refused `memory.preset: auto` ("expected memfit_best or custom")
        # before any request; memfitd fits it to its device at admission.
        spec = spec_file(self.d.dir, "auto", steps=2, memory={"preset": "auto"},
                         method={"kind": "full"}, training={"micro_batch": 4})
        r = self.memfit("submit", "-f", spec, "-o", "json")
        self.assertEqual(r.returncode, 0, r.stderr)
        j = json.loads(r.stdout)
        self.assertNotIn(j["plan"]["level"], ("", "none"))
        self.assertEqual(self.memfit("watch", j["id"]).returncode, 0)
        done = self.json_of("get", j["id"])
        self.assertEqual(done["state"], "SUCCEEDED")
        self.assertNotEqual(done["spec"]["memory"].get("preset", ""), "auto")  # ran the plan's options

    def test_cancel_and_watch_exit_codes(self):
        spec = spec_file(self.d.dir, "long", steps=100000, training={"checkpoint_interval": 100000})
        job = json.loads(self.memfit("submit", "-f", spec, "-o", "json").stdout)
        self.d.wait(job["id"], lambda x: x.progress.step >= 1, token=TOKEN)
        c = self.json_of("cancel", job["id"])
        self.assertEqual(c["state"], "CANCELLING")
        w = self.memfit("watch", job["id"])
        self.assertEqual(w.returncode, 11, w.stdout + w.stderr)
        self.assertTrue(w.stdout.strip().endswith(f"{job['id']} cancelled"))
        # a job that fails on its input: watch exits 10 and says why
        bad = spec_file(self.d.dir, "bad", steps=2)
        with open(bad) as f:
            s = json.load(f)
        s["data"]["train_path"] = os.path.join(self.d.dir, "bad", "empty.txt")
        open(s["data"]["train_path"], "w").close()
        with open(bad, "w") as f:
            json.dump(s, f)
        r = self.memfit("submit", "-f", bad, "--watch")
        self.assertEqual(r.returncode, 10, r.stdout + r.stderr)
        self.assertIn(" failed: ", r.stdout.splitlines()[-1])
        fj = json.loads(self.memfit("get", r.stdout.split()[0], "-o", "json").stdout)
        self.assertEqual(fj["failure"]["kind"], "USER_INPUT")

    def test_error_paths_have_distinct_exit_codes(self):
        spec = spec_file(self.d.dir, "err")
        unreachable = dict(self.env, MEMFIT_SERVER="127.0.0.1:1")
        cases = [
            (["list"], {"env": unreachable}, 3, "cannot reach memfitd at 127.0.0.1:1"),
            (["list"], {"token": "wrong-token-0000000000"}, 4, "unknown token"),
            (["list"], {"token": ""}, 4, "missing authorization"),
            (["get", "j0000000000000-000000"], {}, 5, "no job j0000000000000-000000"),
            (["get"], {}, 2, "JOB is required"),
            (["list", "--state", "sleeping"], {}, 2, "--state: expected queued"),
            (["submit", "-f", "/nonexistent.yaml"], {}, 2, "/nonexistent.yaml"),
            (["submit"], {}, 2, "-f SPEC is required"),
            (["frobnicate"], {}, 2, "unknown command 'frobnicate'"),
        ]
        for args, kw, code, needle in cases:
            r = self.memfit(*args, **kw)
            self.assertEqual(r.returncode, code, (args, r.stderr))
            self.assertIn(needle, r.stderr, args)
            if args[0] != "frobnicate":
                self.assertEqual(len(r.stderr.strip().splitlines()), 1, (args, r.stderr))  # one line
        # an invalid spec names the field, before any network
        with open(spec) as f:
            s = json.load(f)
        s["training"]["micro_batch"] = 0
        bad = os.path.join(self.d.dir, "err", "bad.json")
        with open(bad, "w") as f:
            json.dump(s, f)
        r = self.memfit("submit", "-f", bad, env=unreachable)
        self.assertEqual(r.returncode, 2)
        self.assertIn("training.micro_batch", r.stderr)
        # another user's job: refused
        mine = json.loads(self.memfit("submit", "-f", spec, "-o", "json").stdout)["id"]
        r = self.memfit("cancel", mine, token=OTHER)
        self.assertEqual(r.returncode, 4)
        self.assertIn("belongs to another user", r.stderr)
        self.assertIn(mine, [x["id"] for x in self.json_of("list", "--all-users", token=ADMIN)])
        self.assertNotIn(mine, [x["id"] for x in self.json_of("list", token=OTHER)])
        self.assertNotIn(mine, [x["id"] for x in self.json_of("list", token=ADMIN)])  # an admin's own jobs
        r = self.memfit("list", "--all-users", token=OTHER)
        self.assertEqual(r.returncode, 4)
        self.assertIn("only admins", r.stderr)
        self.memfit("cancel", mine)

    def test_version_with_and_without_a_daemon(self):
        r = self.memfit("version")
        self.assertEqual(r.returncode, 0, r.stderr)
        lines = r.stdout.splitlines()
        self.assertRegex(lines[0], r"^memfit \d+\.\d+\.\d+( \(commit [0-9a-f]+\))?$")
        self.assertRegex(lines[1], rf"^memfitd \d+\.\d+\.\d+( \(commit [0-9a-f]+\))? at 127\.0\.0\.1:{self.d.port}$")
        j = self.json_of("version")
        self.assertEqual(j["daemon"]["version"], j["cli"]["version"])  # built from the same tree
        # no daemon: the CLI's version, a line saying so, exit 0
        down = self.memfit("version", env=dict(self.env, MEMFIT_SERVER="127.0.0.1:1"))
        self.assertEqual(down.returncode, 0, down.stderr)
        self.assertEqual(down.stdout.splitlines()[0], lines[0])
        self.assertIn("memfitd: cannot reach memfitd at 127.0.0.1:1", down.stdout)
        jd = self.json_of("version", env=dict(self.env, MEMFIT_SERVER="127.0.0.1:1"))
        self.assertIsNone(jd["daemon"])
        self.assertIn("cannot reach", jd["daemon_error"])
        # the daemon's answer over gRPC, as any client sees it
        v = self.d.cluster.GetVersion(D.pb.GetVersionRequest(), metadata=self.d.md(TOKEN), timeout=30)
        self.assertEqual(v.version, j["cli"]["version"])

    def test_typos_get_one_line_with_a_suggestion(self):
        for args, want in ((["sumbit"], "memfit: unknown command 'sumbit'; did you mean 'submit'?"),
                           (["lsit"], "memfit: unknown command 'lsit'; did you mean 'list'?"),
                           (["list", "--stat", "running"], "memfit list: unknown option '--stat'; did you mean '--state'?"),
                           (["logs", "j1", "--folow"], "memfit logs: unknown option '--folow'; did you mean '--follow'?")):
            r = self.memfit(*args)
            self.assertEqual(r.returncode, 2, args)
            self.assertEqual(r.stderr, want + "\n")
            self.assertEqual(r.stdout, "")  # not the whole usage

    def test_server_address_forms(self):
        port = self.d.port
        for server in (f"127.0.0.1:{port}", f"grpc://127.0.0.1:{port}", f"dns:///127.0.0.1:{port}",
                       f"localhost:{port}"):
            r = self.memfit("list", "--server", server)
            self.assertEqual(r.returncode, 0, (server, r.stderr))
        # a host alone: the default port (nothing listens there in the test)
        r = self.memfit("list", env=dict(self.env, MEMFIT_SERVER="127.0.0.1"))
        self.assertIn(r.returncode, (0, 3), r.stderr)
        if r.returncode == 3:
            self.assertIn("cannot reach memfitd at 127.0.0.1:7540", r.stderr)
        r = self.memfit("list", env=dict(self.env, MEMFIT_SERVER=f"http://127.0.0.1:{port}"))
        self.assertEqual(r.returncode, 2)
        self.assertEqual(r.stderr, "memfit list: MEMFIT_SERVER: expected host, host:port, [v6]:port, "
                                   f"grpc://host[:port] or dns:///host[:port], got 'http://127.0.0.1:{port}'\n")
        r = self.memfit("devices", "--server", "https://x")
        self.assertEqual(r.returncode, 2)
        self.assertIn("memfit devices: --server: expected host", r.stderr)

    def test_watch_and_logs_tail(self):
        spec = spec_file(self.d.dir, "tail", steps=6)
        r = self.memfit("submit", "-f", spec, "--watch")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        job_id = r.stdout.split()[0]
        steps = lambda out: re.findall(r" step (\d)/6 loss ", out)  # noqa: E731
        self.assertEqual(steps(r.stdout), [str(i) for i in range(1, 7)])  # submit --watch: every step

        # watch without --tail, not on a terminal: every event but the steps before the last
        w = self.memfit("watch", job_id)
        self.assertEqual(w.returncode, 0, w.stderr)
        self.assertEqual(steps(w.stdout), ["6"])
        self.assertIn("placed: running on cpu:0", w.stdout)
        self.assertTrue(w.stdout.splitlines()[-1].startswith(f"{job_id} succeeded: measured peak"))
        events = self.json_of("events", job_id)
        w2 = self.memfit("watch", job_id, "--tail", "2")
        body = w2.stdout.splitlines()[1:-1]  # the header line, the events, the closing line
        self.assertEqual(len(body), 2, w2.stdout)
        self.assertIn(events[-1]["kind"], body[-1])
        wall = self.memfit("watch", job_id, "--tail", "all")
        self.assertEqual(steps(wall.stdout), [str(i) for i in range(1, 7)])
        self.assertEqual(len(wall.stdout.splitlines()), len(events) + 2)

        full = self.memfit("logs", job_id).stdout
        self.assertGreater(len(full.splitlines()), 3)
        for n in (1, 3):
            t = self.memfit("logs", job_id, "--tail", str(n))
            self.assertEqual(t.returncode, 0, t.stderr)
            self.assertEqual(t.stdout.splitlines(), full.splitlines()[-n:])
        self.assertEqual(self.memfit("logs", job_id, "--tail", "0").stdout, "")
        self.assertEqual(self.memfit("logs", job_id, "--tail", "100000", "--follow").stdout, full)

    def test_json_has_every_field(self):
        dev = self.json_of("devices")["devices"][0]
        for field in ("name", "kind", "model", "total_bytes", "reserved_bytes", "used_bytes", "job_ids"):
            self.assertIn(field, dev)
        spec = spec_file(self.d.dir, "fields", steps=2)
        j = json.loads(self.memfit("submit", "-f", spec, "-o", "json").stdout)
        for field in ("device", "attempts", "progress", "result", "started_at", "finished_at"):
            self.assertIn(field, j)  # a queued job: null where nothing is known yet
        self.assertIsNone(j["started_at"])
        self.assertEqual(self.memfit("watch", j["id"]).returncode, 0)
        done = self.json_of("get", j["id"])
        self.assertGreater(int(done["result"]["measured_peak_bytes"]), 0)
        self.assertIsNotNone(done["started_at"])

    def test_submit_after_chains_jobs(self):
        first = json.loads(self.memfit("submit", "-f", spec_file(self.d.dir, "first", steps=3), "-o", "json").stdout)
        r = self.memfit("submit", "-f", spec_file(self.d.dir, "second", steps=2), "--after", first["id"], "--watch")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn(f"; after {first['id']} succeeds", r.stdout.splitlines()[0])
        self.assertIn(f"after: job {first['id']} succeeded", r.stdout)
        second = r.stdout.split()[0]
        a, b = self.json_of("get", first["id"]), self.json_of("get", second)
        self.assertEqual(a["state"], "SUCCEEDED")
        self.assertEqual(b["after"], first["id"])
        self.assertGreaterEqual(b["started_at"], a["finished_at"])  # RFC 3339 UTC strings sort as times
        self.assertIn(f"after       {first['id']}", self.memfit("get", second).stdout)

        # the job it waits for is cancelled: this one is cancelled, saying why
        long = json.loads(self.memfit("submit", "-f", spec_file(self.d.dir, "long-first", steps=100000,
                                                               training={"checkpoint_interval": 100000}),
                                      "-o", "json").stdout)
        waiting = json.loads(self.memfit("submit", "-f", spec_file(self.d.dir, "waits", steps=2), "--after",
                                         long["id"], "-o", "json").stdout)
        self.assertEqual(waiting["state"], "QUEUED")
        self.memfit("cancel", long["id"])
        w = self.memfit("watch", waiting["id"])
        self.assertEqual(w.returncode, 11, w.stdout + w.stderr)
        self.assertEqual(w.stdout.splitlines()[-1], f"{waiting['id']} cancelled: job {long['id']}, which this job "
                                                    "waited for (after), was cancelled")
        self.assertEqual(self.json_of("get", waiting["id"])["started_at"], None)  # never ran
        # refused: no such job, another user's, one already cancelled
        spec = spec_file(self.d.dir, "refused", steps=2)
        for args, kw, code, needle in (
                (["--after", "j0000000000000-000000"], {}, 2, "after: no job j0000000000000-000000"),
                (["--after", waiting["id"]], {"token": OTHER}, 4, "belongs to another user"),
                (["--after", long["id"]], {}, 2, "was cancelled; nothing to wait for")):
            r = self.memfit("submit", "-f", spec, *args, **kw)
            self.assertEqual(r.returncode, code, r.stderr)
            self.assertIn(needle, r.stderr)

    def test_submit_after_a_pretrain_whose_model_does_not_exist_yet(self):
        # The demo's chain in one go: LoRA on the model the pretrain writes. Its config and
        # weights are not there at submit: memfitd estimates it when the pretrain succeeded.
        pre = json.loads(self.memfit("submit", "-f", spec_file(self.d.dir, "pre", steps=3, method={"kind": "full"}),
                                     "-o", "json").stdout)
        model = os.path.join(self.d.dir, "pre", "out", "model")
        lora = spec_file(self.d.dir, "lora-on-pre", steps=2)
        with open(lora) as f:
            s = json.load(f)
        s["model"] = {"architecture": "gpt2", "config_path": os.path.join(model, "config.json"),
                      "weights_path": os.path.join(model, "model.safetensors")}
        with open(lora, "w") as f:
            json.dump(s, f)
        r = self.memfit("submit", "-f", lora, "--after", pre["id"], "--watch")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn(f"queued: after {pre['id']} succeeds (estimated then)", r.stdout.splitlines()[0])
        self.assertIn("estimated: estimated peak", r.stdout)
        done = self.json_of("get", r.stdout.split()[0])
        self.assertEqual(done["state"], "SUCCEEDED")
        self.assertGreater(int(done["plan"]["reserved_bytes"]), 0)
        # inputs still missing when the job it waited for succeeded: failed, saying so
        missing = spec_file(self.d.dir, "missing-after", steps=2)
        with open(missing) as f:
            s = json.load(f)
        s["model"]["config_path"] = os.path.join(self.d.dir, "nowhere", "config.json")
        with open(missing, "w") as f:
            json.dump(s, f)
        first = json.loads(self.memfit("submit", "-f", spec_file(self.d.dir, "short", steps=2), "-o", "json").stdout)
        r = self.memfit("submit", "-f", missing, "--after", first["id"], "--watch")
        self.assertEqual(r.returncode, 10, r.stdout + r.stderr)
        self.assertIn(f"failed: when job {first['id']} succeeded: model.config_path", r.stdout)

    def test_completion_script(self):
        r = self.memfit("completion", "bash")
        self.assertEqual(r.returncode, 0)
        out = subprocess.run(["bash", "-c", r.stdout + "\nCOMP_WORDS=(memfit wa); COMP_CWORD=1; _memfit; "
                              "echo \"${COMPREPLY[*]}\"; COMP_WORDS=(memfit watch j1 --ta); COMP_CWORD=3; _memfit; "
                              "echo \"${COMPREPLY[*]}\""], capture_output=True, text=True)
        self.assertEqual(out.stdout, "watch\n--tail\n", out.stderr)

    def test_help_on_every_verb(self):
        for verb in ("submit", "get", "list", "cancel", "watch", "events", "logs", "devices", "estimate", "version",
                     "completion"):
            r = self.memfit(verb, "--help")
            self.assertEqual(r.returncode, 0, verb)
            self.assertTrue(r.stdout.startswith(f"usage: memfit {verb}"), verb)
            self.assertIn("example: memfit " + verb, r.stdout)
            if verb not in ("estimate", "completion"):
                self.assertIn("MEMFIT_SERVER", r.stdout)
        r = self.memfit("--help")
        self.assertEqual(r.returncode, 0)
        for verb in ("submit", "watch", "devices", "estimate", "version", "completion"):
            self.assertIn(f"  {verb}", r.stdout)
        for flag in ("--server", "--token", "--tls-ca", "--tls", "-o, --output"):
            self.assertIn(flag, r.stdout)

    def test_watch_on_a_terminal_updates_one_progress_line(self):
        spec = spec_file(self.d.dir, "tty", steps=30)
        job = json.loads(self.memfit("submit", "-f", spec, "-o", "json").stdout)
        master, slave = pty.openpty()
        p = subprocess.Popen([CLI, "watch", job["id"]], stdout=slave, stderr=subprocess.PIPE, env=self.env)
        os.close(slave)
        data = b""
        deadline = time.time() + 300
        while time.time() < deadline:
            ready, _, _ = select.select([master], [], [], 1)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                data += chunk
            elif p.poll() is not None:
                break
        p.wait(timeout=30)
        err = p.stderr.read().decode()
        p.stderr.close()
        os.close(master)
        text = data.decode()
        self.assertEqual(p.returncode, 0, text + err)
        updates = re.findall(r"\r\x1b\[K\[[#.]{20}\] step (\d+)/30  loss [\d.]+  \d+ tok/s  ETA \S+  peak [\d.]+ MiB / "
                             r"[\d.]+ MiB reserved  saved [\d.]+ (?:KiB|MiB|B)", text)
        self.assertGreaterEqual(len(updates), 10)  # one line, rewritten in place
        self.assertEqual(updates[-1], "30")
        self.assertNotRegex(text, r"\n[^\n]*step 1/30 loss")  # no plain step lines on a terminal
        self.assertRegex(text.replace("\r\n", "\n").rstrip().splitlines()[-1],
                         rf"^{job['id']} succeeded: measured peak")


class CliTls(unittest.TestCase):
    def test_the_cli_talks_tls_with_a_ca_file(self):
        tmp = D.tempfile.mkdtemp(prefix="memfit-cli-tls-")
        cert, key, root = D.self_signed(tmp)
        d = D.Daemon("cli-tls", dir=tmp, tls_root=root, extra=["--tls-cert", cert, "--tls-key", key, "--paused"])
        try:
            env = dict(os.environ, MEMFIT_SERVER=f"localhost:{d.port}")
            env.pop("MEMFIT_TOKEN", None)
            r = subprocess.run([CLI, "devices", "-o", "json"], capture_output=True, text=True, env=env, timeout=60)
            self.assertEqual(r.returncode, 3, r.stderr)  # plaintext against TLS: unreachable
            env["MEMFIT_TLS_CA"] = cert
            r = subprocess.run([CLI, "devices", "-o", "json"], capture_output=True, text=True, env=env, timeout=60)
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertEqual(json.loads(r.stdout)["devices"][0]["name"], "cpu:0")
            r = subprocess.run([CLI, "list", "--tls-ca", "/nonexistent.pem"], capture_output=True, text=True, env=env)
            self.assertEqual(r.returncode, 2)
            self.assertIn("--tls-ca: cannot read /nonexistent.pem", r.stderr)
        finally:
            d.stop()


if __name__ == "__main__":
    for path, what in ((D.MEMFITD, "memfitd"), (D.WORKER, "memfit-worker"), (CLI, "memfit")):
        if not os.path.exists(path):
            print(f"{what} not built at {path}")
            sys.exit(1)
    if not D.W.have_data():
        print(f"data missing in {D.W.DATA}: run scripts/fetch_data.sh (skipped)")
        sys.exit(77)
    unittest.main(verbosity=2)
