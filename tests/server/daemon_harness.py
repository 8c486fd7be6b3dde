"""Helpers for the memfitd tests: start a real daemon on free loopback ports with its own
state folder, talk to it over gRPC with the stubs generated from proto/ (build/python),
scrape its /metrics, and stop it gracefully or with SIGKILL."""
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "worker"))
sys.path.insert(0, os.environ.get("MEMFIT_PYPROTO", os.path.join(REPO, "build", "python")))

import grpc  # noqa: E402
from google.protobuf import json_format  # noqa: E402
from memfit.v1 import job_pb2, service_pb2 as pb, service_pb2_grpc as rpc  # noqa: E402,F401

import worker_harness as W  # noqa: E402

MEMFITD = os.environ.get("MEMFITD", os.path.join(REPO, "build", "bin", "memfitd"))
WORKER = W.WORKER
MiB = 1 << 20
FINAL = (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED)


def spec_message(spec_path):
    with open(spec_path) as f:
        return json_format.ParseDict(json.load(f), job_pb2.JobSpec())


def gpt2_spec(tmp, steps=12, lora=True, preset=None, memory=None, **over):
    """A tiny GPT-2 job (Moby-Dick, the GPT-2 tokenizer) as a JobSpec message."""
    if lora:
        over.setdefault("method", {"kind": "lora", "lora": {"rank": 4, "alpha": 8}})
    training = {"steps": steps}
    training.update(over.pop("training", {}))
    over["training"] = training
    if preset:
        over["memory"] = {"preset": preset}
    if memory:
        over["resources"] = {"memory": memory}
    os.makedirs(tmp, exist_ok=True)
    return spec_message(W.gpt2_job(tmp, **over))


class Daemon:
    def __init__(self, name, devices=("cpu:0=256MiB",), tokens=None, extra=(), state=None, tls_root=None,
                 dir=None, roots=None):
        self.dir = dir or state or tempfile.mkdtemp(prefix=f"memfitd-{name}-")
        self.tls_root = tls_root  # PEM: connect with TLS, trusting this certificate
        self.devices = devices
        self.tokens_file = None
        if tokens:
            self.tokens_file = os.path.join(self.dir, "tokens")
            with open(os.open(self.tokens_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
                for tok, user, admin in tokens:
                    f.write(f"{tok} {user}{' admin' if admin else ''}\n")
        self.extra = list(extra)
        # Jobs read the fetched data and the tests' temporary folders, and write below
        # the temporary folders (docs/DAEMON.md: paths).
        self.roots = [] if roots is None else list(roots)
        if roots is None:
            self.roots = ["--read-root", W.DATA, "--read-root", tempfile.gettempdir(),
                          "--write-root", tempfile.gettempdir()]
        self.proc = None
        self.log = []
        self.start()

    def start(self, extra=()):
        args = [MEMFITD, "--state-dir", os.path.join(self.dir, "state"), "--listen", "127.0.0.1:0",
                "--metrics-listen", "127.0.0.1:0", "--worker", WORKER, "--worker-threads", "1",
                "--cancel-grace-seconds", "20", *self.roots, *self.extra, *extra]
        for d in self.devices:
            args += ["--device", d]
        if self.tokens_file:
            args += ["--tokens", self.tokens_file]
        self.proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.port = self.metrics_port = None
        deadline = time.time() + 30
        while time.time() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.log.append(line)
            if "metrics on http://" in line:
                self.metrics_port = int(line.strip().rsplit(":", 1)[1].split("/")[0])
            if "listening on" in line:
                self.port = int(line.split("listening on ")[1].split()[0].rsplit(":", 1)[1])
                break
        if self.port is None:
            raise RuntimeError("memfitd did not start:\n" + "".join(self.log))
        self.drain = threading.Thread(target=self._drain, args=(self.proc,), daemon=True)
        self.drain.start()
        if self.tls_root:
            creds = grpc.ssl_channel_credentials(root_certificates=self.tls_root)
            self.channel = grpc.secure_channel(f"127.0.0.1:{self.port}", creds,
                                               options=(("grpc.ssl_target_name_override", "localhost"),))
        else:
            self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.jobs = rpc.JobServiceStub(self.channel)
        self.cluster = rpc.ClusterServiceStub(self.channel)

    def _drain(self, proc):
        for line in proc.stderr:
            self.log.append(line)
        proc.stderr.close()

    def md(self, token):
        return (("authorization", f"Bearer {token}"),) if token else ()

    def submit(self, spec, token=None, **kw):
        return self.jobs.SubmitJob(pb.SubmitJobRequest(spec=spec, **kw), metadata=self.md(token), timeout=30)

    def get(self, job_id, token=None):
        return self.jobs.GetJob(pb.GetJobRequest(id=job_id), metadata=self.md(token), timeout=30)

    def events(self, job_id, token=None):
        out, page = [], ""
        while True:
            r = self.jobs.ListJobEvents(pb.ListJobEventsRequest(id=job_id, page_token=page, page_size=500),
                                        metadata=self.md(token), timeout=30)
            out += list(r.events)
            page = r.next_page_token
            if not page:
                return out

    def wait(self, job_id, pred=lambda j: j.state in FINAL, timeout=300, token=None):
        deadline = time.time() + timeout
        while time.time() < deadline:
            j = self.get(job_id, token)
            if pred(j):
                return j
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} did not get there in {timeout}s: {self.get(job_id, token)}\n"
                             + "".join(self.log[-20:]))

    def devices_now(self, token=None):
        return self.cluster.ListDevices(pb.ListDevicesRequest(), metadata=self.md(token), timeout=30).devices

    def metrics(self):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            return r.read().decode()

    def kill9(self):
        self.channel.close()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.channel.close()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def self_signed(tmp):
    """A certificate for localhost and 127.0.0.1 and its key: (cert path, key path, PEM bytes)."""
    cert, key = os.path.join(tmp, "server.pem"), os.path.join(tmp, "server.key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", key, "-out", cert], check=True, capture_output=True)
    with open(cert, "rb") as f:
        return cert, key, f.read()


def run_memfitd(*args):
    """memfitd run to completion (bad configurations): (exit code, stderr)."""
    r = subprocess.run([MEMFITD, "--listen", "127.0.0.1:0", "--metrics-listen", "off", *args],
                       capture_output=True, text=True, timeout=30)
    return r.returncode, r.stderr


def metric_value(text, name, /, **labels):
    """The value of one series in Prometheus text format, or None (a label may be called `name`)."""
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        series = head[len(name):]
        if series and not series.startswith("{"):
            continue
        got = {}
        if series.startswith("{"):
            for part in series.strip("{}").split(","):
                k, _, v = part.partition("=")
                got[k] = v.strip('"')
        if all(got.get(k) == str(v) for k, v in labels.items()):
            return float(value)
    return None


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie of a dead parent is reaped by init; treat "Z" as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False
