"""What the GPU check's steps share: their context, their result file (rewritten after
every measurement, so a step stopped at its limit keeps what it measured), and running
memfit's programs before the step's deadline."""
import argparse
import json
import os
import subprocess
import time


class Step:
    def __init__(self):
        ap = argparse.ArgumentParser()
        ap.add_argument("--ctx", required=True)
        a = ap.parse_args()
        with open(a.ctx) as f:
            self.ctx = json.load(f)
        self.device = self.ctx["device"]
        self.tiny = self.ctx["tiny"]
        self.bin = self.ctx["bin"]
        self.logs = self.ctx["logs"]
        self.result = {"status": "partial", "markdown": "", "data": {}, "errors": []}
        self.save()

    def left(self):
        """Seconds before the step's deadline."""
        return self.ctx["deadline"] - time.time()

    def path(self, name):
        """A file in the logs folder, named for this step."""
        return os.path.join(self.logs, f"step{self.ctx['step']}_{name}")

    def save(self):
        tmp = self.ctx["result"] + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.result, f, indent=1)
        os.replace(tmp, self.ctx["result"])

    def error(self, message):
        self.result["errors"].append(message)
        self.save()

    def finish(self, markdown, status=None):
        self.result["markdown"] = markdown
        self.result["status"] = status or ("failed" if self.result["errors"] else "ok")
        self.save()

    def run(self, argv, log_name, timeout=None, env=None, **kw):
        """Runs argv with its output in logs/<log_name>, stopped at the deadline (or
        `timeout`); returns (returncode or None on timeout, output text)."""
        limit = max(1.0, min(timeout or 1e9, self.left()))
        e = dict(os.environ)
        e.update(env or {})
        log = self.path(log_name)
        with open(log, "w") as f:
            try:
                p = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, timeout=limit, env=e, **kw)
                rc = p.returncode
            except subprocess.TimeoutExpired:
                rc = None
        with open(log, errors="replace") as f:
            return rc, f.read()


def processes_naming(folder):
    """(pid, argv) of every process, this one aside, whose command line names a path
    inside `folder` (memfitd and its workers, which run in sessions of their own)."""
    prefix = folder.rstrip("/").encode() + b"/"
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if any(a.startswith(prefix) for a in argv):
            out.append((int(d), argv))
    return out


def md_table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(out)


def mib(b):
    return f"{b / 2**20:.1f}"
