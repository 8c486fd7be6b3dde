#!/usr/bin/env python3
"""Step 3: the estimator against the worker's measured peaks, and the CUDA constants
fitted from them.

Each spec of a grid (the four architectures, memory presets, fp32/bf16, LoRA/full, tiny
configs and real sizes: GPT-2 124M, ViT-B/16, RoBERTa-base, a LLaMA-7B-shaped model at two
layers, all random-init) runs memfit-worker for two steps and `memfit estimate -o json`
predicts the same job. Per spec it records the worker's allocated and reserved peaks
(its `finished` event), the estimate's allocated peak, allocator overhead, context and
total, and on CUDA the process's device memory as NVML sees it (nvidia-smi, sampled
every 0.2 s while workers run).

Then on CUDA it fits the estimator's two device constants (server/estimator/estimator.h,
DeviceModel): the estimate is

    peak = allocated_est * (1 + reserved_overhead) + context_bytes

- reserved_overhead: the caching allocator's reserve beyond its tensors. Measured as
  reserved - allocated = x * allocated + b over the specs (Theil-Sen: the median of the
  pairwise slopes, robust to one odd spec); reserved_overhead = x. The fixed part b
  (partly filled blocks of small allocations) has no term of its own in the estimator.
- context_bytes: the median over specs of NVML peak - (1 + x) * allocated_est, i.e. what
  the process holds beyond the proportional term: the CUDA context and kernel images
  (NVML - reserved), the allocator's fixed part b, and what the estimate's allocated peak
  misses (cuBLAS workspaces, which LibTorch 2.x takes from the caching allocator). Each
  component is reported on its own.

The estimates are recomputed with the fitted constants (`memfit estimate --cuda-context
--reserved-overhead`) and the error is reported before and after, per spec and in
summary. The constants go to data["constants"] and OUT/cuda_constants.json.

On the CPU (rehearsal) the same grid runs (tiny: three specs) without NVML; the
constants are reported as not measured and the allocated peak's error is shown.
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import Step, md_table, mib  # noqa: E402

MiB = 2**20

# Real sizes (random init from these configs; no weights are downloaded).
GPT2_124M = {"model_type": "gpt2", "vocab_size": 50257, "n_embd": 768, "n_layer": 12, "n_head": 12,
             "n_positions": 1024, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new"}
# Fashion-MNIST's 28x28 grey images are resized to 224 and their channel replicated to 3
# (docs/SPEC.md, data).
VIT_B16 = {"model_type": "vit", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
           "intermediate_size": 3072, "image_size": 224, "patch_size": 16, "num_channels": 3,
           "hidden_act": "gelu", "layer_norm_eps": 1e-12, "num_labels": 10}
ROBERTA_BASE = {"model_type": "roberta", "vocab_size": 50265, "hidden_size": 768, "num_hidden_layers": 12,
                "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 514,
                "type_vocab_size": 1, "layer_norm_eps": 1e-5, "hidden_act": "gelu", "num_labels": 2,
                "pad_token_id": 1}
LLAMA_7B_2L = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
               "num_hidden_layers": 2, "num_attention_heads": 32, "num_key_value_heads": 32,
               "rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "tie_word_embeddings": False,
               "hidden_act": "silu"}

# (name, architecture, memory mode of accuracy.MODES, method, (micro-batch, length),
#  accuracy.EXTRAS variant (None or "bf16"), config or None for accuracy's tiny one).
# Most important first: the step stops starting specs near its deadline.
FULL_GRID = [
    ("gpt2-124M", "gpt2", "exact", "full", (8, 256), None, GPT2_124M),
    ("vit-b16", "vit", "paper", "lora", (32, 0), None, VIT_B16),
    ("llama7b-2L", "llama", "best", "lora", (4, 256), "bf16", LLAMA_7B_2L),
    ("gpt2-124M", "gpt2", "best", "lora", (8, 512), "bf16", GPT2_124M),
    ("vit-b16", "vit", "exact", "full", (32, 0), "bf16", VIT_B16),
    ("roberta-base", "roberta", "ms", "lora", (16, 256), None, ROBERTA_BASE),
    ("llama7b-2L", "llama", "paper+ckpt", "lora", (8, 512), "bf16", LLAMA_7B_2L),
    # The largest: where the allocator's proportional reserve shows best.
    ("vit-b16", "vit", "exact", "full", (128, 0), None, VIT_B16),
    ("tiny", "gpt2", "exact", "full", (4, 64), None, None),
    ("tiny", "llama", "exact", "full", (4, 64), None, None),
    ("tiny", "vit", "exact", "full", (16, 0), None, None),
    ("tiny", "roberta", "exact", "full", (4, 64), None, None),
    ("tiny", "gpt2", "paper", "lora", (8, 128), "bf16", None),
    ("tiny", "llama", "paper+fused", "lora", (8, 128), "bf16", None),
    ("tiny", "vit", "best", "lora", (64, 0), "bf16", None),
    ("tiny", "roberta", "paper+ckpt", "lora", (8, 128), None, None),
    ("tiny", "gpt2", "approx", "lora", (8, 128), None, None),
    ("tiny", "llama", "best", "full", (8, 128), "bf16", None),
    ("tiny", "vit", "ms", "full", (64, 0), None, None),
    ("tiny", "roberta", "best", "full", (8, 128), "bf16", None),
    ("tiny", "llama", "ms", "lora", (8, 128), None, None),
    ("tiny", "vit", "paper+fused", "full", (64, 0), None, None),
]
TINY_GRID = [
    ("tiny", "gpt2", "exact", "full", (2, 32), None, None),
    ("tiny", "vit", "paper", "lora", (4, 0), None, None),
    ("tiny", "llama", "best", "lora", (2, 32), "bf16", None),
]

def validation_grid(grid):
    """The same architectures and options at other shapes (MEMFIT_GPU_GRID=validation): a
    check of constants fitted on FULL_GRID against specs they were not fitted on."""
    out = []
    for name, arch, mode, method, (B, S), extra, config in grid:
        B2 = B * 2 if B <= 16 else B // 2
        S2 = (S // 2 if S >= 256 else S * 2) if S else 0
        out.append((name, arch, mode, method, (B2, S2), extra, config))
    return out


START_GUARD_S = 20   # full runs: no new spec with less than this left before the deadline
KILL_GUARD_S = 8     # workers still running this close to the deadline are stopped
STAGGER_S = 0.3      # between two worker starts (keeps NVML's processes apart in time)
NVML_INTERVAL_S = 0.2


def case_label(case):
    name, arch, mode, method, (B, S), extra, _ = case
    size = f"{B}x{S}" if S else f"B{B}"
    return f"{name}-{arch}-{mode}-{method}-{extra or 'fp32'}-{size}" if name == "tiny" else \
        f"{name}-{mode}-{method}-{extra or 'fp32'}-{size}"


def nvidia_smi(*query):
    """Rows of `nvidia-smi --query-...=... --format=csv,noheader,nounits`, split on commas;
    None when nvidia-smi is missing or fails."""
    return nvidia_smi_many([query])[0]


def nvidia_smi_many(queries, timeout=10):
    """Several nvidia-smi queries run at once (each call takes tens to hundreds of ms)."""
    procs = []
    for q in queries:
        try:
            procs.append(subprocess.Popen(["nvidia-smi", *q, "--format=csv,noheader,nounits"],
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
        except OSError:
            procs.append(None)
    out = []
    for p in procs:
        if p is None:
            out.append(None)
            continue
        try:
            text, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            out.append(None)
            continue
        out.append([[c.strip() for c in line.split(",")] for line in text.splitlines() if line.strip()]
                   if p.returncode == 0 else None)
    return out


class NvmlSampler(threading.Thread):
    """Samples every compute process's device memory (nvidia-smi's used_memory, MiB) and
    the device's used memory; keeps, per pid, when it was first and last seen and its
    peak, and the device-level samples (for processes NVML shows under another pid
    namespace's numbers, or not at all)."""

    def __init__(self, interval=NVML_INTERVAL_S):
        super().__init__(daemon=True)
        self.interval = interval
        self.lock = threading.Lock()
        self.procs = {}          # pid -> {"first", "last", "peak"} (bytes)
        self.device = []         # (time, used bytes)
        self.last_sample = 0.0
        self.samples = 0
        self.unreadable = 0      # samples whose used_memory was not a number ([N/A])
        self.tick_sum = 0.0      # seconds spent in nvidia-smi, over all samples
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            t0 = time.time()
            rows, dev = nvidia_smi_many([["--query-compute-apps=pid,used_memory"], ["--query-gpu=memory.used"]])
            t = time.time()
            with self.lock:
                for row in rows or []:
                    try:
                        pid, used = int(row[0]), int(float(row[1])) * MiB
                    except (ValueError, IndexError):
                        self.unreadable += 1
                        continue
                    p = self.procs.setdefault(pid, {"first": t, "last": t, "peak": 0})
                    p["last"], p["peak"] = t, max(p["peak"], used)
                try:
                    self.device.append((t, int(float(dev[0][0])) * MiB))
                except (TypeError, ValueError, IndexError):
                    pass
                self.samples += 1
                self.last_sample = t
                self.tick_sum += t - t0
            self._halt.wait(max(0.0, self.interval - (time.time() - t0)))

    def stop(self):
        self._halt.set()
        self.join(timeout=15)

    def tick(self):
        """Seconds between two samples, on average."""
        with self.lock:
            return max(self.interval, self.tick_sum / self.samples if self.samples else self.interval)

    def snapshot(self):
        with self.lock:
            return {k: dict(v) for k, v in self.procs.items()}, list(self.device), self.last_sample


class Matcher:
    """Finds each finished worker's NVML process. By pid when NVML reports this
    namespace's pids; else by time: a process NVML first saw after the worker started
    and stopped seeing by the time it ended (workers are matched in the order they end,
    so one still running is never taken). Failing both, the device's used memory above
    the step's baseline in the worker's last second, if it ran alone then."""

    def __init__(self, sampler, baseline_pids, baseline_used):
        self.sampler = sampler
        self.claimed = set(baseline_pids)
        self.baseline_used = baseline_used

    def ready(self, w):
        """True once NVML has sampled after the worker ended (its process gone)."""
        return self.sampler.last_sample > w["end"] + 0.05

    def match(self, w, runs):
        procs, device, _ = self.sampler.snapshot()
        p = procs.get(w["pid"])
        # The same number seen only while the worker ran: this namespace's pid (under
        # another namespace's numbers it would be some other process).
        if p and p["first"] >= w["start"] - 0.05 and p["last"] <= w["end"] + 0.05:
            self.claimed.add(w["pid"])
            return p["peak"], "pid"
        # A process exits within milliseconds of its worker's end: NVML saw it last at
        # most about two sampling periods before.
        window = 2 * self.sampler.tick() + 0.2
        cands = [(pid, p) for pid, p in procs.items() if pid not in self.claimed and
                 p["first"] >= w["start"] - 0.05 and w["end"] - window <= p["last"] <= w["end"] + 0.05]
        if cands:
            pid, p = min(cands, key=lambda c: abs(c[1]["last"] - w["end"]) + abs(c[1]["first"] - w["start"]))
            self.claimed.add(pid)
            return p["peak"], "time" if len(cands) == 1 else "time (ambiguous)"
        # Device-level: samples in the worker's last second while no other worker ran.
        others = [r for r in runs if r is not w]
        solo = [used for t, used in device if w["end"] - 1.0 <= t <= w["end"] and
                not any(r["start"] <= t <= r.get("end", 1e18) for r in others)]
        if solo and self.baseline_used is not None:
            return max(solo) - self.baseline_used, "device (alone)"
        return None, None


def summary(errs):
    """Median |error|, worst under (most negative) and worst over of relative errors."""
    errs = [e for e in errs if e is not None]
    if not errs:
        return None
    return {"n": len(errs), "median_abs": statistics.median(abs(e) for e in errs),
            "worst_under": min(errs), "worst_over": max(errs)}


def summary_line(label, s):
    if not s:
        return f"- {label}: no measurements"
    under = pct(s["worst_under"]) if s["worst_under"] < 0 else "none"
    over = pct(s["worst_over"]) if s["worst_over"] > 0 else "none"
    return f"- {label}: {s['n']} specs, median |error| {100 * s['median_abs']:.2f}%, worst under {under}, worst over {over}"


def rel(est, measured):
    return est / measured - 1 if est is not None and measured else None


def pct(x):
    return "-" if x is None else f"{100 * x:+.2f}%"


def mib2(b):
    """Small differences (offsets) in MiB with two decimals."""
    return "-" if b is None else f"{b / MiB:.2f}"


def mb(x):
    return "-" if x is None else mib(x)


def theil_sen(xs, ys, min_dx):
    """Slope and intercept of y = a x + b: the median of pairwise slopes (pairs at least
    min_dx apart in x) and the median residual. None when no pair qualifies."""
    slopes = [(ys[j] - ys[i]) / (xs[j] - xs[i]) for i in range(len(xs)) for j in range(i + 1, len(xs))
              if abs(xs[j] - xs[i]) >= min_dx]
    if not slopes:
        return None
    a = statistics.median(slopes)
    return a, statistics.median(y - a * x for x, y in zip(xs, ys))


def fit_constants(recs, device_info):
    """The CUDA constants from the measured specs (see the module's docstring); a dict
    with "measured": False and the reason when they cannot be fitted."""
    pts = [r for r in recs if r.get("reserved") and r.get("allocated")]
    if not pts:
        return {"measured": False, "reason": "no CUDA measurement (CPU run or every spec failed)"}
    alloc = [r["allocated"] for r in pts]
    extra = [r["reserved"] - r["allocated"] for r in pts]
    # Pairs of specs whose allocated peaks differ by at least 256 MiB: the proportional
    # part shows there, above the few MiB of partly used blocks that dominate tiny jobs.
    ts = theil_sen(alloc, extra, 256 * MiB)
    if ts is not None:
        overhead = max(0.0, ts[0])
        fixed = statistics.median(e - overhead * a for a, e in zip(alloc, extra))
        how = "Theil-Sen fit of reserved - allocated = x * allocated + b"
    else:
        # Sizes too close to fit a slope (a tiny grid): the median ratio.
        overhead = max(0.0, statistics.median(e / a for a, e in zip(alloc, extra)))
        fixed = 0.0
        how = "median of reserved / allocated - 1 (no slope could be fitted)"
    c = {"measured": True, "device_name": device_info.get("name"),
         "applies_to": {"context_bytes": "DeviceModel::kCudaContextBytes",
                        "reserved_overhead": "DeviceModel::kCudaReservedOverhead"},
         "device_memory_bytes": device_info.get("memory_bytes"), "driver": device_info.get("driver"),
         "reserved_overhead": round(overhead, 4), "reserved_overhead_method": how,
         "allocator_fixed_bytes": int(fixed), "specs": len(pts),
         "reserved_ratio_median": statistics.median(r["reserved"] / r["allocated"] - 1 for r in pts)}
    offsets = [r["allocated"] - r["est_allocated"] for r in pts if r.get("est_allocated") is not None]
    if offsets:
        c["allocated_offset_bytes"] = {"median": int(statistics.median(offsets)), "min": min(offsets),
                                       "max": max(offsets)}
    nv = [r for r in pts if r.get("nvml_peak") and r.get("est_allocated") is not None]
    if nv:
        outside = [r["nvml_peak"] - r["reserved"] for r in nv]
        c["outside_allocator_bytes"] = {"median": int(statistics.median(outside)), "min": min(outside),
                                        "max": max(outside)}
        # Rounded up to a MiB: the constant the estimator adds to (1 + x) * allocated.
        rest = [r["nvml_peak"] - (1 + c["reserved_overhead"]) * r["est_allocated"] for r in nv]
        c["context_bytes"] = int(-(-statistics.median(rest) // MiB) * MiB)
        c["context_bytes_max"] = int(max(rest))
    else:
        c["context_bytes"] = None
        c["context_reason"] = "no NVML process peak (nvidia-smi showed no matching process)"
    return c


def main():
    step = Step()
    ctx = step.ctx
    cuda = step.device == "cuda"
    # worker_harness and accuracy read these when imported.
    os.environ["MEMFIT_WORKER"] = os.path.join(step.bin, "memfit-worker")
    os.environ["MEMFIT_CLI"] = os.path.join(step.bin, "memfit")
    os.environ["MEMFIT_DATA_DIR"] = ctx["data"]
    sys.path.insert(0, os.path.join(ctx["repo"], "tests", "estimator"))
    import accuracy as A  # noqa: E402  (imports tests/worker/worker_harness.py)

    grid = TINY_GRID if step.tiny else FULL_GRID
    if os.environ.get("MEMFIT_GPU_GRID") == "validation":
        grid = validation_grid(grid)
        step.result["data"]["grid"] = "validation"
    parallel = 4 if cuda else 2
    threads = 4 if cuda else 1          # the worker's CPU threads; the CPU estimate uses the same
    data = step.result["data"]
    data.update({"device": step.device, "tiny": step.tiny, "parallel": parallel, "threads": threads,
                 "specs": [], "skipped": [], "stopped": []})
    # What changes the caching allocator's and cuBLAS's memory, as the workers see it.
    data["env"] = {k: os.environ.get(k) for k in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF",
                                                  "CUBLAS_WORKSPACE_CONFIG", "CUDA_MODULE_LOADING")}
    step.save()

    device_info = {}
    sampler = matcher = None
    if cuda:
        rows = nvidia_smi("--query-gpu=name,memory.total,driver_version")
        if rows:
            try:
                device_info = {"name": rows[0][0], "memory_bytes": int(float(rows[0][1])) * MiB,
                               "driver": rows[0][2]}
            except (ValueError, IndexError):
                device_info = {"name": rows[0][0]}
        else:
            step.error("nvidia-smi unavailable: no NVML process peaks, context not measured")
        data["device_info"] = device_info
        if rows:
            sampler = NvmlSampler()
            sampler.start()
            # A baseline before the first worker: other processes, the device's used memory.
            t0 = time.time()
            while sampler.samples < 2 and time.time() - t0 < 5:
                time.sleep(0.05)
            procs, device, _ = sampler.snapshot()
            matcher = Matcher(sampler, procs.keys(), max((u for _, u in device), default=None))
            data["nvml_baseline"] = {"pids": sorted(procs), "device_used": matcher.baseline_used}

    tmp_root = tempfile.mkdtemp(prefix="memfit-step3-")
    texts = A.make_data(tmp_root)
    pending = list(enumerate(grid))
    running, finished = [], []   # worker runs: dicts (case, spec, proc, start, end, ...)
    waiting_nvml = []            # finished CUDA runs not yet matched to an NVML process
    last_start = 0.0

    def record(w):
        """Turns a finished (or stopped) run into its record and saves the step's result."""
        case, est = w["case"], w.get("est")
        name, arch, mode, method, (B, S), extra, _ = case
        rec = {"index": w["index"], "spec": case_label(case), "arch": arch, "mode": mode, "method": method,
               "micro_batch": B, "sequence_length": S, "dtype": extra or "fp32", "real": name != "tiny",
               "seconds": round(w["end"] - w["start"], 2), "pid": w["pid"]}
        with open(w["out"], errors="replace") as f:
            out = f.read()
        with open(w["err"], errors="replace") as f:
            err = f.read()
        fin = A.worker_outcome(w["proc"].returncode, out, err, step.device)
        if w.get("stopped"):
            # Not a failure of the spec: listed apart, like the specs never started.
            rec["error"] = "stopped at the step's deadline"
            data["stopped"].append(rec["spec"])
        elif "error" in fin:
            rec["error"] = fin["error"]
            step.error(f"{rec['spec']}: {fin['error']}")
        else:
            rec["allocated"] = A.measured_peak(fin)
            rec["reserved"] = fin.get("peak_reserved_bytes", 0) if cuda else None
            rec["measured_phase"] = fin.get("peak_phase")
        if est:
            rec.update({"est_allocated": est["allocated_peak_bytes"], "est_overhead": est["allocator_overhead_bytes"],
                        "est_context": est["context_bytes"], "est_peak": est["peak_bytes"],
                        "est_slack": est.get("bound_slack_bytes", 0), "est_phase": est.get("peak_phase")})
            rec["est_reserved"] = rec["est_allocated"] + rec["est_overhead"]
        if "allocated" in rec and est:
            rec["alloc_error"] = rel(rec["est_allocated"], rec["allocated"])
            rec["alloc_offset"] = rec["allocated"] - rec["est_allocated"]
            if cuda:
                rec["reserved_error"] = rel(rec["est_reserved"], rec["reserved"])
        w["rec"] = rec
        data["specs"].append(rec)
        data["specs"].sort(key=lambda r: r["index"])
        step.save()
        # The outputs (checkpoint, export) go now; the spec stays for the second estimate.
        shutil.rmtree(os.path.join(w["tmp"], "out"), ignore_errors=True)

    def add_nvml(w):
        peak, how = matcher.match(w, finished + running)
        rec = w["rec"]
        if peak is None:
            rec["nvml"] = "no matching process"
        else:
            rec.update({"nvml_peak": peak, "nvml_match": how})
            if rec.get("reserved"):
                rec["outside_allocator"] = peak - rec["reserved"]
            if rec.get("est_peak"):
                rec["total_error"] = rel(rec["est_peak"], peak)
        step.save()

    def start(index, case):
        name, arch, mode, method, size, extra, config = case
        tmp = tempfile.mkdtemp(prefix="spec-", dir=tmp_root)
        spec = A.make_spec(tmp, arch, mode, method, size, texts, extra, config=config)
        # The estimate first: a spec the worker cannot finish still has one.
        est, err = A.estimate_json(spec, step.device, threads)
        if err:
            step.error(f"{case_label(case)}: {err}")
        log = step.path(f"{index:02d}_{case_label(case)}")
        w = {"index": index, "case": case, "spec": spec, "tmp": tmp, "est": est,
             "out": log + ".events", "err": log + ".stderr", "start": time.time()}
        with open(w["out"], "w") as out, open(w["err"], "w") as errf:
            w["proc"] = subprocess.Popen(A.worker_argv(spec, step.device, threads), stdout=out, stderr=errf)
        w["pid"] = w["proc"].pid
        return w

    try:
        while pending or running:
            # Stop what would run into the deadline; start nothing new close to it.
            if step.left() < KILL_GUARD_S:
                for w in running:
                    if not w.get("stopped"):
                        w["proc"].kill()
                        w["stopped"] = True
            guard = 0 if step.tiny else START_GUARD_S
            while pending and len(running) < parallel and step.left() > guard + KILL_GUARD_S and \
                    time.time() - last_start >= STAGGER_S:
                index, case = pending.pop(0)
                try:
                    running.append(start(index, case))
                except Exception as e:  # noqa: BLE001 -- one spec's failure is recorded, the step goes on
                    step.error(f"{case_label(case)}: could not start: {e}")
                last_start = time.time()
            if pending and step.left() <= guard + KILL_GUARD_S:
                data["skipped"] = [case_label(c) for _, c in pending]
                pending = []
                step.save()
            for w in list(running):
                if w["proc"].poll() is not None:
                    w["end"] = time.time()
                    running.remove(w)
                    finished.append(w)
                    try:
                        record(w)
                    except Exception as e:  # noqa: BLE001 -- e.g. an event without a field
                        step.error(f"{case_label(w['case'])}: reading its results: {e!r}")
                        continue
                    if matcher:
                        waiting_nvml.append(w)
            for w in list(waiting_nvml):
                if matcher.ready(w):
                    waiting_nvml.remove(w)
                    add_nvml(w)
            time.sleep(0.05)
        # The last runs' processes: one more NVML sample after they ended.
        deadline = time.time() + 1.5
        while waiting_nvml and time.time() < deadline:
            for w in list(waiting_nvml):
                if matcher.ready(w):
                    waiting_nvml.remove(w)
                    add_nvml(w)
            time.sleep(0.05)
        for w in waiting_nvml:
            add_nvml(w)
    finally:
        for w in running:
            w["proc"].kill()
        if sampler:
            sampler.stop()
            data["nvml_samples"] = sampler.samples
            data["nvml_unreadable"] = sampler.unreadable

    recs = data["specs"]
    ok = [r for r in recs if "allocated" in r]
    constants = fit_constants(ok, device_info) if cuda else \
        {"measured": False, "reason": "CPU run: no caching allocator, no NVML"}
    data["constants"] = constants
    step.save()

    # The estimates again with the fitted constants.
    if constants.get("measured"):
        flags = ["--reserved-overhead", str(constants["reserved_overhead"])]
        if constants.get("context_bytes") is not None:
            flags += ["--cuda-context", str(constants["context_bytes"])]
        for r in ok:
            if "est_allocated" not in r or step.left() < 1:
                continue
            w = next(f for f in finished if f["index"] == r["index"])
            est, err = A.estimate_json(w["spec"], step.device, threads, *flags)
            if err:
                step.error(f"{r['spec']}: estimate with the fitted constants: {err}")
                continue
            r["after_est_reserved"] = est["allocated_peak_bytes"] + est["allocator_overhead_bytes"]
            r["after_est_peak"] = est["peak_bytes"]
            r["after_reserved_error"] = rel(r["after_est_reserved"], r["reserved"])
            if r.get("nvml_peak"):
                r["after_total_error"] = rel(r["after_est_peak"], r["nvml_peak"])
        step.save()
    shutil.rmtree(tmp_root, ignore_errors=True)
    with open(os.path.join(ctx["out"], "cuda_constants.json"), "w") as f:
        json.dump(constants, f, indent=1)

    sums = {"allocated": summary([r.get("alloc_error") for r in ok])}
    if cuda:
        sums.update({"reserved_before": summary([r.get("reserved_error") for r in ok]),
                     "reserved_after": summary([r.get("after_reserved_error") for r in ok]),
                     "total_before": summary([r.get("total_error") for r in ok]),
                     "total_after": summary([r.get("after_total_error") for r in ok])})
    data["summary"] = sums
    step.save()
    # Specs stopped or never started at the deadline are listed, not failures; a run that
    # measured nothing is.
    if not ok:
        step.error("no spec was measured")
    step.finish(markdown(step.device, recs, constants, sums, data))


def markdown(device, recs, constants, sums, data):
    cuda = device == "cuda"
    lines = []
    if cuda:
        header = ["spec", "alloc MiB", "est", "err", "meas-est MiB", "reserved", "est before/after",
                  "NVML", "NVML-res", "total est before/after", "total err before/after"]
    else:
        header = ["spec", "alloc MiB", "est", "err", "meas-est MiB", "slack MiB", "phase meas/est", "s"]
    rows = []
    for r in recs:
        if "allocated" not in r:
            rows.append([r["spec"], "error: " + r.get("error", "?")[:80]] + [""] * (len(header) - 2))
            continue
        base = [r["spec"], mib(r["allocated"]), mb(r.get("est_allocated")), pct(r.get("alloc_error")),
                mib2(r.get("alloc_offset"))]
        if cuda:
            rows.append(base + [
                mib(r["reserved"]), f"{mb(r.get('est_reserved'))} / {mb(r.get('after_est_reserved'))}",
                mb(r.get("nvml_peak")), mb(r.get("outside_allocator")),
                f"{mb(r.get('est_peak'))} / {mb(r.get('after_est_peak'))}",
                f"{pct(r.get('total_error'))} / {pct(r.get('after_total_error'))}"])
        else:
            rows.append(base + [mb(r.get("est_slack")), f"{r.get('measured_phase')}/{r.get('est_phase')}",
                                f"{r['seconds']:.0f}"])
    lines.append(md_table(header, rows))
    lines.append("")
    lines.append(summary_line("allocated peak (estimate vs the worker's)", sums["allocated"]))
    if cuda:
        lines.append(summary_line("reserved, default constants", sums["reserved_before"]))
        lines.append(summary_line("reserved, fitted constants", sums["reserved_after"]))
        lines.append(summary_line("total vs NVML process peak, default constants", sums["total_before"]))
        lines.append(summary_line("total vs NVML process peak, fitted constants", sums["total_after"]))
    if cuda:
        how = [r["nvml_match"] for r in recs if r.get("nvml_match")]
        lines.append(f"- NVML process peaks: {len(how)} specs ("
                     + (", ".join(f"{how.count(k)} by {k}" for k in sorted(set(how))) or "none matched")
                     + f"), {data.get('nvml_samples', 0)} samples")
    if data.get("stopped"):
        lines.append(f"- stopped at the deadline: {', '.join(data['stopped'])}")
    if data.get("skipped"):
        lines.append(f"- not started (deadline): {len(data['skipped'])} specs: {', '.join(data['skipped'])}")
    lines.append("")
    if constants.get("measured"):
        c = constants
        lines.append(f"Fitted constants for {c.get('device_name')} (driver {c.get('driver')}), {c['specs']} specs:")
        ctx_text = "not measured" if c.get("context_bytes") is None else \
            f"{mib(c['context_bytes'])} MiB (worst spec needs {mib(c['context_bytes_max'])})"
        lines.append(f"- context_bytes (kCudaContextBytes): {ctx_text}")
        lines.append(f"- reserved_overhead (kCudaReservedOverhead): {c['reserved_overhead']:.4f} "
                     f"({c['reserved_overhead_method']}; fixed part b = {mib(c['allocator_fixed_bytes'])} MiB; "
                     f"median reserved/allocated - 1 = {c['reserved_ratio_median']:.4f})")
        if "outside_allocator_bytes" in c:
            o = c["outside_allocator_bytes"]
            lines.append(f"- NVML - reserved (context, kernels): median {mib(o['median'])} MiB, "
                         f"{mib(o['min'])}..{mib(o['max'])}")
        if "allocated_offset_bytes" in c:
            o = c["allocated_offset_bytes"]
            lines.append(f"- measured - estimated allocated (e.g. cuBLAS workspaces): median {mib(o['median'])} MiB, "
                         f"{mib(o['min'])}..{mib(o['max'])}")
        lines.append("- written to cuda_constants.json")
    else:
        lines.append(f"CUDA constants: not measured ({constants.get('reason')}).")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
