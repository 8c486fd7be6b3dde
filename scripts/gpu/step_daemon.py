#!/usr/bin/env python3
"""Step 5, daemon: memfitd packing three jobs onto one device by their estimates.

memfitd starts on loopback with its own state folder (a temporary one) and, on the GPU
machine, finds the GPU through NVML (server/daemon/devices.cpp; workers see it as cuda:0
through CUDA_VISIBLE_DEVICES); in the CPU rehearsal it gets one configured CPU device.
Three jobs whose reservations fit the device together are submitted with the `memfit`
CLI: on the GPU two ViT-B/16 LoRA jobs at micro-batch 64 (bf16; exact and memfit_best)
and an 8-block, 1024-wide LLaMA LoRA job (bf16, sequence 512, memfit_best); on a CPU tiny
versions of the same. Every ~0.5 s the step samples NVML's used memory (nvidia-smi) and
memfitd's view of the device (`memfit devices -o json`: the sum of reservations, the
memory it measures, the jobs placed there). At the end: whether all three trained at the
same time on the same device (placement, and the overlap of their step events), the
highest NVML used memory against the highest sum of reservations, and each job's
measured peak against its estimate. memfitd is stopped (SIGTERM: workers checkpoint) and
any worker of this daemon still alive is killed by its pid.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Step, md_table, processes_naming  # noqa: E402
import workloads as W  # noqa: E402

MiB = 1 << 20
CUDA_CONTEXT = 800 * MiB  # the device model's context (DeviceModel::cuda("NVIDIA H200")): the daemon adds it to a
# CUDA worker's reserved peak when it compares with the estimate (calibration)


def ts(s):
    """Seconds since the epoch from protobuf's JSON timestamp ("2026-12-04T15:58:08.661Z")."""
    if not s:
        return None
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def mb(b):
    return "-" if b is None else f"{b / MiB:.0f}" if b >= 100 * MiB else f"{b / MiB:.1f}"


class Memfitd:
    """A memfitd process on free loopback ports, its stderr copied to a log file, and the
    `memfit` CLI pointed at it."""

    def __init__(self, step, state_dir, args, log_name="memfitd.log"):
        self.step = step
        self.state_dir = state_dir
        self.lines = []
        self.log = open(step.path(log_name), "w")
        argv = [os.path.join(step.bin, "memfitd"), "--state-dir", state_dir, "--listen", "127.0.0.1:0",
                "--metrics-listen", "127.0.0.1:0", "--worker", os.path.join(step.bin, "memfit-worker"),
                "--cancel-grace-seconds", "10", *args]
        self.log.write("$ " + " ".join(argv) + "\n")
        self.log.flush()
        # Not a new session: if the step is stopped from outside, memfitd goes with its
        # process group (its workers have their own sessions; see stop()).
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.addr = None
        self.ready = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()
        # "memfitd: listening on 127.0.0.1:PORT" once it serves (port 0: the kernel's pick).
        if not self.ready.wait(timeout=max(5.0, min(30.0, step.left() - 5))) or self.addr is None:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError("memfitd did not start: " + " | ".join(l.strip() for l in self.lines[-8:]))

    def _drain(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            self.log.write(line)
            self.log.flush()
            if self.addr is None and "listening on " in line:
                self.addr = line.split("listening on ")[1].split()[0]
                self.ready.set()
        self.ready.set()  # memfitd exited (before or after starting)

    def cli(self, *args, timeout=30):
        """`memfit VERB ARGS -s ADDR -o json`, parsed."""
        argv = [os.path.join(self.step.bin, "memfit"), *args, "-s", self.addr, "-o", "json"]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"memfit {' '.join(args)}: exit {r.returncode}: {r.stderr.strip()[:400]}")
        return json.loads(r.stdout)

    def workers(self):
        """Pids of live memfit-worker processes started by this daemon: their command line
        names a spec in this daemon's state folder (workers run in their own sessions, so
        they are found by that, never by name alone)."""
        pids = [pid for pid, argv in processes_naming(self.state_dir) if argv[0].endswith(b"memfit-worker")]
        return pids

    def stop(self, grace):
        """SIGTERM (workers checkpoint, jobs requeue), SIGKILL after `grace` seconds; then
        any worker of ours still alive is killed. Returns memfitd's exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=max(1.0, grace))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        left = self.workers()
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self.log.close()
        return self.proc.returncode, left


class Sampler(threading.Thread):
    """Every `period` seconds: NVML's used memory (nvidia-smi; on a GPU) and memfitd's
    view of the device (reserved, measured, the jobs placed)."""

    def __init__(self, daemon, device_name, cuda, period=0.5):
        super().__init__(daemon=True)
        self.d, self.device_name, self.cuda, self.period = daemon, device_name, cuda, period
        self.samples = []
        self.worker_env = {}
        self.errors = []
        self.stop_at = threading.Event()

    def note_worker_env(self):
        """The CUDA_VISIBLE_DEVICES entries each worker of this daemon was started with,
        once per worker: memfitd appends its own to the environment it inherited, so a
        value already there would come first (and getenv returns the first)."""
        for pid in self.d.workers():
            if pid in self.worker_env:
                continue
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = f.read().split(b"\0")
            except OSError:
                continue
            self.worker_env[pid] = [e.decode(errors="replace") for e in env if e.startswith(b"CUDA_VISIBLE_DEVICES=")]

    def nvml_used(self):
        r = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                           capture_output=True, text=True, timeout=10)
        return int(r.stdout.split()[0]) * MiB if r.returncode == 0 and r.stdout.strip() else None

    def run(self):
        while not self.stop_at.is_set():
            t = time.time()
            s = {"t": t}
            try:
                if self.cuda:
                    s["nvml_used"] = self.nvml_used()
                for dev in self.d.cli("devices").get("devices", []):
                    if dev["name"] == self.device_name:
                        s["reserved"] = int(dev["reserved_bytes"])
                        s["daemon_used"] = int(dev["used_bytes"])
                        s["jobs"] = list(dev.get("job_ids", []))
                self.samples.append(s)
                self.note_worker_env()
            except Exception as e:  # noqa: BLE001 -- a missed sample is noted, sampling goes on
                if len(self.errors) < 5:
                    self.errors.append(f"sample: {type(e).__name__}: {e}")
            self.stop_at.wait(max(0.0, self.period - (time.time() - t)))


class DaemonStep:
    def __init__(self, step):
        self.step = step
        self.cuda = step.device == "cuda"
        self.work = tempfile.mkdtemp(prefix="memfit-daemon-")
        self.data = step.result["data"]
        # steps.py stops whatever still runs under this folder if the step is killed.
        self.data["owned_dir"] = self.work
        step.save()
        self.daemon = None

    def job_specs(self):
        """The three jobs: (label, spec path). Sizes and step counts keep each running
        for roughly 15-25 s on an H200 when the three share it, and a few seconds each
        on a CPU (tiny models there, rehearsal and CI alike)."""
        out = self.work
        text, tok = W.synthetic_text(out, words=120_000 if self.cuda else 20_000)
        if self.cuda:
            vit, vit_batch, vit_steps = W.vit_config("full"), 64, 150
            llama, llama_batch, seq, llama_steps = W.llama_config("daemon"), 8, 512, 100
            vit_steps, llama_steps = self.sized_by_headline(vit_batch, llama, llama_batch * seq, vit_steps, llama_steps)
        else:
            vit, vit_batch, vit_steps = W.vit_config("tiny"), 16, 100
            llama, llama_batch, seq, llama_steps = W.llama_config("tiny"), 2, 64, 25
        self.data["job_steps"] = {"vit": vit_steps, "llama": llama_steps}
        return [
            ("vit-exact", W.vit_spec(out, "vit-exact", vit, self.step.ctx["data"], W.MODES["exact"], vit_batch,
                                     vit_steps, dtype="bf16")),
            ("vit-memfit_best", W.vit_spec(out, "vit-memfit_best", vit, self.step.ctx["data"],
                                           W.MODES["memfit_best"], vit_batch, vit_steps, dtype="bf16")),
            ("llama-memfit_best", W.llama_spec(out, "llama-memfit_best", llama, text, tok, W.MODES["memfit_best"],
                                               llama_batch, seq, llama_steps, dtype="bf16")),
        ]

    def sized_by_headline(self, vit_rows, llama, llama_tokens, vit_steps, llama_steps, seconds=25.0):
        """Step counts for about `seconds` of training with the three jobs sharing the GPU
        (each at a third of its speed alone), from the throughputs step 4 measured on this
        GPU when it ran (ViT-B/16 bf16 exact; the LLaMA-7B shape's tokens/s scaled by the
        two models' parameter counts, which flatters the smaller model: its share is
        planned at 60% of `seconds`); else the defaults."""
        path = os.path.join(self.step.logs, "step4_headline.json")
        try:
            with open(path) as f:
                runs = json.load(f)["data"]["runs"]
            vit_rate = runs["vit_bf16_exact"]["rows_per_second"]
            llama_rate = (runs["llama_bf16_exact"]["tokens_per_second"] *
                          W.llama_parameters(W.llama_config("full")) / W.llama_parameters(llama))
        except (OSError, ValueError, KeyError, TypeError):
            return vit_steps, llama_steps

        def clamp(n):
            return int(min(400, max(20, n)))

        sized = clamp(seconds * vit_rate / 3 / vit_rows), clamp(0.6 * seconds * llama_rate / 3 / llama_tokens)
        self.data["steps_sized_by_step4"] = True
        return sized

    def start_daemon(self):
        roots = ["--read-root", self.step.ctx["data"], "--read-root", self.work, "--write-root", self.work]
        state = os.path.join(self.work, "state")
        if not self.cuda:
            # One CPU device, large enough for the three tiny jobs together.
            return Memfitd(self.step, state, [*roots, "--gpus", "off", "--device", "cpu:0=4GiB",
                                              "--worker-threads", "1"]), "cpu:0"
        d = Memfitd(self.step, state, [*roots, "--gpus", "auto"])
        if any(l.startswith("GPU cuda:0") for l in d.lines):
            return d, "cuda:0"
        # NVML did not find the GPU: memfitd fell back to CPU devices. Say so, and go on
        # with the GPU configured by hand (placement and workers on CUDA, no NVML).
        self.step.error("memfitd found no GPU through NVML: " +
                        " | ".join(l.strip() for l in d.lines if "NVML" in l or "device" in l)[:400])
        d.stop(10)
        total = self.gpu_total()
        return Memfitd(self.step, state + "-configured",
                       [*roots, "--gpus", "off", "--device", f"cuda:0={total // MiB}MiB"],
                       log_name="memfitd_configured.log"), "cuda:0"

    @staticmethod
    def gpu_total():
        r = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i", "0"],
                           capture_output=True, text=True, timeout=10)
        return int(r.stdout.split()[0]) * MiB

    def main(self):
        sampler = None
        try:
            self.daemon, device = self.start_daemon()
            d = self.daemon
            self.data["device"] = device
            self.data["memfitd_log"] = [l.strip() for l in d.lines]
            self.data["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES")
            specs = self.job_specs()
            sampler = Sampler(d, device, self.cuda)
            sampler.start()
            time.sleep(1.2)  # the device before any job: NVML's baseline
            jobs = {}
            for label, spec in specs:
                j = d.cli("submit", "-f", spec)
                jobs[label] = j["id"]
            self.data["jobs"] = jobs
            self.step.save()
            self.wait(jobs)
        except Exception as e:  # noqa: BLE001 -- recorded; what was measured is kept
            self.step.error(f"{type(e).__name__}: {e}")
        finally:
            if sampler is not None:
                sampler.stop_at.set()
                sampler.join(timeout=5)
                self.data["samples"] = sampler.samples
                self.data["worker_cuda_visible_devices"] = {str(k): v for k, v in sampler.worker_env.items()}
                for e in sampler.errors:
                    self.step.error(e)
            try:
                if self.daemon is not None and self.data.get("jobs"):
                    self.collect(self.data["jobs"])
                    self.check_together()
            except Exception as e:  # noqa: BLE001
                self.step.error(f"collecting the jobs: {type(e).__name__}: {e}")
            if self.daemon is not None:
                rc, left = self.daemon.stop(grace=max(2.0, min(20.0, self.step.left() - 3)))
                self.data["memfitd_exit"] = rc
                if left:
                    self.step.error(f"workers still alive after memfitd stopped, killed: {left}")
            shutil.rmtree(self.work, ignore_errors=True)
            self.step.finish(self.markdown())

    def wait(self, jobs):
        """Until the three jobs have ended; cancelled when the step's time runs short,
        so that memfitd and the workers can still stop cleanly."""
        final = ("SUCCEEDED", "FAILED", "CANCELLED")
        cancelled = False
        while True:
            states = {j["id"]: j["state"] for j in self.daemon.cli("list", "--limit", "20")}
            self.data["states"] = {label: states.get(i) for label, i in jobs.items()}
            if all(states.get(i) in final for i in jobs.values()):
                return
            if not cancelled and self.step.left() < 25:
                for label, i in jobs.items():
                    if states.get(i) not in final:
                        self.step.error(f"{label}: still {states.get(i)} with {self.step.left():.0f} s left: "
                                        "cancelled")
                        self.daemon.cli("cancel", i)
                cancelled = True
            if self.step.left() < 8:
                self.step.error("jobs did not end in time: " + json.dumps(self.data["states"]))
                return
            time.sleep(1.0)

    def collect(self, jobs):
        """Each job's plan, result and worker events: estimate vs measured peaks, and
        the interval it trained in (first to last step event, the worker's clock)."""
        per = {}
        for label, i in jobs.items():
            j = self.daemon.cli("get", i)
            ev = self.daemon.cli("events", i)
            worker = [json.loads(e["data_json"]) for e in ev if e.get("data_json") and e["kind"] in
                      ("started", "step", "finished", "failed", "stopped")]
            steps = [e for e in worker if e.get("event") == "step"]
            fin = next((e for e in worker if e.get("event") == "finished"), {})
            started = next((e for e in worker if e.get("event") == "started"), {})
            sub = next((json.loads(e["data_json"]) for e in ev if e["kind"] == "submitted" and e.get("data_json")), {})
            plan = j.get("plan") or {}
            progress = j.get("progress") or {}
            result = j.get("result") or {}
            measured = int(result.get("measured_peak_bytes") or 0) or int(progress.get("peak_memory_bytes") or 0) or None
            reserved_peak = fin.get("peak_reserved_bytes")
            per[label] = {
                "id": i, "state": j.get("state"), "device": j.get("device"), "attempts": j.get("attempts"),
                "worker_device": started.get("device"),
                "estimated_peak": int(plan.get("estimated_peak_bytes") or 0) or None,
                "estimated_allocated_peak": sub.get("allocated_peak_bytes"),
                "estimated_context": sub.get("context_bytes"),
                "reserved": int(plan.get("reserved_bytes") or 0) or None,
                "measured_allocated_peak": measured,
                "measured_reserved_peak": reserved_peak,
                # What memfitd compares with the estimate on CUDA (calibration): the
                # caching allocator's reserved peak plus the CUDA context.
                "measured_device_peak": (reserved_peak + CUDA_CONTEXT) if (self.cuda and reserved_peak) else measured,
                "steps": len(steps),
                "train_from": steps[0].get("time") if steps else None,
                "train_to": steps[-1].get("time") if steps else None,
                "placed_at": ts(j.get("started_at")),
                "finished_at": ts(j.get("finished_at")),
                "failure": (j.get("failure") or {}).get("message") or None,
            }
            if j.get("state") != "SUCCEEDED":
                self.step.error(f"{label}: {j.get('state')}: {per[label]['failure'] or '-'}")
        self.data["per_job"] = per
        self.step.save()

    def check_together(self):
        """The point of the step: three jobs on one device at once. Anything else is an
        error in the step's result."""
        placed, devices, overlap = self.concurrency()
        self.data["placed_together"], self.data["train_overlap_seconds"] = placed, overlap
        if not placed:
            self.step.error("the three jobs were never placed on the device at the same time")
        if len(devices) != 1:
            self.step.error(f"the jobs ran on several devices: {sorted(str(d) for d in devices)}")
        if overlap is None or overlap <= 0:
            self.step.error("the three jobs did not train at the same time (their step intervals do not overlap)")

    def concurrency(self):
        """Whether the three jobs were placed on the same device at the same time (one
        sample listing all three) and trained at the same time (their step intervals
        overlap); the overlap in seconds."""
        per = self.data.get("per_job", {})
        samples = self.data.get("samples", [])
        ids = {p["id"] for p in per.values()}
        placed_together = bool(ids) and any(ids <= set(s.get("jobs", [])) for s in samples)
        devices = {p.get("device") for p in per.values()}
        froms = [p["train_from"] for p in per.values() if p.get("train_from")]
        tos = [p["train_to"] for p in per.values() if p.get("train_to")]
        overlap = (min(tos) - max(froms)) if len(froms) == len(per) == 3 and len(tos) == 3 else None
        return placed_together, devices, overlap

    def markdown(self):
        samples = self.data.get("samples", [])
        per = self.data.get("per_job", {})
        out = []
        if not self.cuda:
            out.append("**CPU rehearsal**: one configured CPU device (4 GiB), tiny ViT and LLaMA jobs; memfitd's "
                       "measured memory there is the sum of the workers' own meters, not NVML.")
        else:
            out.append(f"memfitd on {self.data.get('device', '?')} through NVML; jobs: two ViT-B/16 LoRA (bf16, "
                       "micro-batch 64; exact and memfit_best) and an 8-block 1024-wide LLaMA LoRA (bf16, "
                       "sequence 512, micro-batch 8, memfit_best), submitted together.")
        if self.data.get("CUDA_VISIBLE_DEVICES") is not None:
            out.append(f"CUDA_VISIBLE_DEVICES in memfitd's environment: `{self.data['CUDA_VISIBLE_DEVICES']}`.")
        env = self.data.get("worker_cuda_visible_devices") or {}
        if env:
            seen = sorted({" ".join(v) or "(none)" for v in env.values()})
            out.append(f"Workers' CUDA_VISIBLE_DEVICES entries ({len(env)} workers seen): "
                       + "; ".join(f"`{x}`" for x in seen)
                       + (" -- more than one entry: the first (inherited) wins over memfitd's."
                          if any(len(v) > 1 for v in env.values()) else "."))
        out.append("")
        if samples:
            t0 = samples[0]["t"]
            used_key = "nvml_used" if self.cuda else "daemon_used"
            used = [s.get(used_key) for s in samples if s.get(used_key) is not None]
            res = [s.get("reserved", 0) for s in samples]
            base = used[0] if used else None
            max_jobs = max(len(s.get("jobs", [])) for s in samples)
            placed, devices, overlap = self.concurrency()
            out += [f"{len(samples)} samples over {samples[-1]['t'] - t0:.0f} s (every ~0.5 s).", ""]
            rows = [["highest " + ("NVML used" if self.cuda else "measured by memfitd (the workers' meters)"),
                     mb(max(used)) if used else "-"],
                    ["baseline before the jobs (first sample)", mb(base)],
                    ["highest used minus baseline", mb(max(used) - base) if used and base is not None else "-"],
                    ["highest sum of reservations", mb(max(res)) if res else "-"],
                    *self.daemon_view_rows(),
                    ["highest (used - baseline) / sum of reservations at that time", self.used_vs_reserved(used_key, base)],
                    ["most jobs placed on the device at once", str(max_jobs)],
                    ["all three placed on one device at once", "yes" if placed else "no"],
                    ["devices the jobs ran on", ", ".join(sorted(str(x) for x in devices)) or "-"],
                    ["all three training at once (step intervals overlap)",
                     "-" if overlap is None else (f"yes, for {overlap:.1f} s" if overlap > 0 else "no")]]
            out += [md_table(["time series", "MiB / value"], rows), ""]
            # A coarse view of the series: at most ~16 rows.
            every = max(1, -(-len(samples) // 16))
            series = []
            for s in samples[::every]:
                series.append([f"{s['t'] - t0:.1f}", mb(s.get(used_key)), mb(s.get("reserved")),
                               str(len(s.get("jobs", [])))])
            out += [md_table(["t (s)", "NVML used MiB" if self.cuda else "measured MiB", "reserved MiB", "jobs placed"],
                             series), ""]
        if per:
            rows = []
            for label, p in per.items():
                ratio = (p["measured_device_peak"] / p["estimated_peak"]
                         if p.get("measured_device_peak") and p.get("estimated_peak") else None)
                alloc_ratio = (p["measured_allocated_peak"] / p["estimated_allocated_peak"]
                               if p.get("measured_allocated_peak") and p.get("estimated_allocated_peak") else None)
                where = p.get("device") or "-"
                if p.get("worker_device") and p.get("worker_device") != where:
                    where += f" (worker: {p['worker_device']})"
                rows.append([label, p.get("state"), where, str(p.get("steps")),
                             mb(p.get("estimated_peak")), mb(p.get("reserved")),
                             mb(p.get("measured_device_peak")),
                             "-" if ratio is None else f"{ratio:.2f}",
                             mb(p.get("estimated_allocated_peak")), mb(p.get("measured_allocated_peak")),
                             "-" if alloc_ratio is None else f"{alloc_ratio:.2f}"])
            measured_note = ("measured device peak = the worker's reserved peak (caching allocator) + 512 MiB CUDA "
                             "context, as memfitd compares it with the estimate" if self.cuda else
                             "measured peak = the worker's allocated peak (its meter)")
            out += [md_table(["job", "state", "device", "steps", "estimated MiB", "reserved MiB", "measured MiB",
                              "measured / est.", "est. allocated MiB", "measured allocated MiB", "alloc. measured / est."],
                             rows), "", measured_note + "."]
        return "\n".join(out)

    def daemon_view_rows(self):
        """On a GPU, memfitd's own samples of the device (nvmlDeviceGetMemoryInfo, v1:
        its `used` may count memory the driver reserves, which nvidia-smi leaves out)."""
        if not self.cuda:
            return []
        used = [s["daemon_used"] for s in self.data.get("samples", []) if s.get("daemon_used") is not None]
        if not used:
            return []
        return [["memfitd's used (its NVML call): first sample / highest", f"{mb(used[0])} / {mb(max(used))}"]]

    def used_vs_reserved(self, key, base):
        best = None
        for s in self.data.get("samples", []):
            u, r = s.get(key), s.get("reserved")
            if u is None or not r or base is None:
                continue
            v = (u - base) / r
            best = v if best is None else max(best, v)
        return "-" if best is None else f"{best:.2f}"


if __name__ == "__main__":
    DaemonStep(Step()).main()
