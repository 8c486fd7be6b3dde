"""The estimator against the worker: every architecture x memory mode x method x
(micro-batch, length) runs memfit-worker for two steps on CPU under the tracking
allocator, and `memfit estimate` predicts the same job. Held to what tests/estimator/
sweep.py holds random specs to: within 1% of the measured peak (plus the bound slack the
estimate reports), never more than 0.5% below it. (The first goal was 3% and 1%.)

    python3 tests/estimator/accuracy.py              # the whole grid (ctest runs this)
    python3 tests/estimator/accuracy.py --only gpt2 --verbose
    python3 tests/estimator/accuracy.py --markdown   # the table for docs/PERFORMANCE.md
    python3 tests/estimator/accuracy.py --device cuda # on a GPU: the caching allocator's
                                                     # allocated peak (goal) and reserved peak
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "tests", "worker"))
import worker_harness as H  # noqa: E402

CLI = os.environ.get("MEMFIT_CLI", os.path.join(REPO, "build", "bin", "memfit"))
THREADS = 2
TOLERANCE = 0.01   # |estimate / measured - 1| <= 1% (+ the reported bound slack)
UNDER = 0.005      # never more than 0.5% below
# CPU bf16: LibTorch 1.13's oneDNN bf16 GEMMs allocate packing buffers the estimator
# charges at a bound (docs/ACCOUNTING.md): never under, and over by at most the bound
# slack the estimate reports (bound_slack_bytes) beyond the tolerance. Reported apart.
UNDER_CPU_BF16 = UNDER

GPT2 = dict(H.TINY_GPT2, n_positions=256)
LLAMA = dict(H.TINY_LLAMA, max_position_embeddings=256)
VIT = dict(H.TINY_VIT)
ROBERTA = dict(H.TINY_ROBERTA, max_position_embeddings=260)

MODES = {
    "exact": {},
    "approx": {"activation": "approx"},
    "ms": {"norm": "memory_sharing"},
    "paper": {"activation": "approx", "norm": "memory_sharing"},
    "paper+fused": {"activation": "approx", "norm": "memory_sharing", "fused_mlp": True},
    "paper+ckpt": {"activation": "approx", "norm": "memory_sharing", "activation_checkpointing": True},
    "best": {"preset": "memfit_best"},
}
TEXT_SIZES = [(2, 32), (4, 64), (8, 128)]
IMAGE_SIZES = [(4, 0), (16, 0), (64, 0)]


def long_texts(tmp):
    """jsonl_classification rows of ~1500 characters: every row fills the sequence."""
    text = open(H.moby(tmp, 1, 20, "src.txt"), encoding="utf-8").read().split()
    rows, step = [], 300
    for i in range(0, len(text) - step, step):
        rows.append({"text": " ".join(text[i:i + step]), "label": (i // step) % 2})
    path = os.path.join(tmp, "cls.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows[:200]))
    return path


# Variants on top of the grid: gradient accumulation (later micro-batches see every
# gradient), bf16, a validation split (the eval phase) and LoRA dropout.
EXTRAS = {
    "accum2": {"training": {"gradient_accumulation": 2}},
    "bf16": {"training": {"dtype": "bf16"}},
    "eval": {"training": {"eval_batches": 2}, "validation": True},
    "dropout": {"lora_dropout": 0.1},
}


CONFIGS = {"gpt2": GPT2, "llama": LLAMA, "vit": VIT, "roberta": ROBERTA}


def make_data(tmp):
    """The training texts every grid spec reads, written in tmp: {"text", "val", "cls"}."""
    return {"text": H.moby(tmp, 1, 30, "train.txt"), "val": H.moby(tmp, 131, 133, "val.txt"),
            "cls": long_texts(tmp)}


def make_spec(tmp, arch, mode, method, size, data, extra=None, config=None):
    """Writes tmp/config.json and tmp/job.json for one grid point; returns the spec's path.
    `config` replaces the architecture's tiny config (scripts/gpu/step_estimator.py's real
    sizes)."""
    B, S = size
    memory = dict(MODES[mode])
    config = config or CONFIGS[arch]
    spec = {"name": f"{arch}-{mode}-{method}-{B}x{S}", "model": {"architecture": arch, "init_seed": 1},
            "method": {"kind": method}, "memory": memory,
            "training": {"steps": 2, "micro_batch": B, "learning_rate": 1e-3, "seed": 3},
            "output_dir": os.path.join(tmp, "out")}
    x = EXTRAS.get(extra, {})
    spec["training"].update(x.get("training", {}))
    if method == "lora":
        spec["method"]["lora"] = {"rank": 4, "alpha": 8, "dropout": x.get("lora_dropout", 0.0)}
    if arch == "gpt2":
        spec["model"]["config_path"] = H.write_json(os.path.join(tmp, "config.json"), config)
        spec["data"] = {"train_path": data["text"], "format": "text", "tokenizer_path": os.path.join(H.DATA, "gpt2")}
        spec["training"]["sequence_length"] = S
        if x.get("validation"):
            spec["data"]["validation_path"] = data["val"]
    elif arch == "llama":
        spec["model"]["config_path"] = H.write_json(os.path.join(tmp, "config.json"), config)
        spec["data"] = {"train_path": data["text"], "format": "text", "tokenizer_path": os.path.join(H.DATA, "llama")}
        spec["training"]["sequence_length"] = S
        if x.get("validation"):
            spec["data"]["validation_path"] = data["val"]
    elif arch == "vit":
        spec["model"]["config_path"] = H.write_json(os.path.join(tmp, "config.json"), config)
        xs, ys = H.fmnist("test")
        spec["data"] = {"train_path": xs, "train_labels_path": ys}
        if x.get("validation"):
            spec["data"].update({"validation_path": xs, "validation_labels_path": ys})
    else:
        spec["model"]["config_path"] = H.write_json(os.path.join(tmp, "config.json"), config)
        spec["data"] = {"train_path": data["cls"], "format": "jsonl_classification",
                        "tokenizer_path": os.path.join(H.DATA, "gpt2")}
        spec["training"]["sequence_length"] = S
        if x.get("validation"):
            spec["data"]["validation_path"] = data["cls"]
    return H.write_json(os.path.join(tmp, "job.json"), spec)


DEVICE = "cpu"


def worker_argv(spec, device, threads):
    """memfit-worker's command line for one spec on `device` ("cpu" or "cuda")."""
    dev = ["--device", "cuda:0"] if device == "cuda" else []
    return [H.WORKER, "run", "--spec", spec, "--threads", str(threads), *dev]


def worker_outcome(returncode, stdout, stderr, device):
    """The worker's `finished` event from its JSON-lines stdout, or an error dict:
    {"error": text} (plus "no_device": True when CUDA was asked for and is missing)."""
    events = []
    for line in stdout.splitlines():
        try:
            if line.strip():
                events.append(json.loads(line))
        except ValueError:
            pass  # a line cut short by a kill
    fin = events[-1] if events else {}
    if returncode != 0 or fin.get("event") != "finished":
        if device == "cuda" and returncode == 2 and "cuda" in json.dumps(events[-1:]).lower():
            return {"no_device": True, "error": "no CUDA device"}
        return {"error": f"worker exit {returncode}: {events[-1:] or stderr[-400:]}"}
    return fin


def measured_peak(fin):
    """The worker's allocated peak: its meter's peak or the largest phase peak."""
    return max(fin["peak_memory_bytes"], max(fin["peak_by_phase"].values()))


def estimate_json(spec, device, threads, *extra, timeout=60):
    """`memfit estimate -o json` for one spec (extra: e.g. --cuda-context 600MiB); returns
    (the parsed JSON, None) or (None, an error message)."""
    e = subprocess.run([CLI, "estimate", "-f", spec, "--device", device, "--threads", str(threads), *extra,
                        "-o", "json"], capture_output=True, text=True, timeout=timeout)
    if e.returncode != 0:
        return None, f"estimate exit {e.returncode}: {e.stderr.strip()}"
    return json.loads(e.stdout), None


def run_case(case, data):
    arch, mode, method, size, extra = case
    tmp = tempfile.mkdtemp(prefix="memfit-acc-")
    spec = make_spec(tmp, arch, mode, method, size, data, extra)
    w = subprocess.run(worker_argv(spec, DEVICE, THREADS), capture_output=True, text=True, timeout=900)
    fin = worker_outcome(w.returncode, w.stdout, w.stderr, DEVICE)
    if "error" in fin:
        return {"case": case, **fin}
    est, err = estimate_json(spec, DEVICE, THREADS)
    if err:
        return {"case": case, "error": err}
    measured = measured_peak(fin)
    # CUDA: the goal is on the caching allocator's allocated bytes (the tensors); its
    # reserved bytes are reported next to the estimate's allocated + overhead.
    predicted = est["allocated_peak_bytes"] if DEVICE == "cuda" else est["peak_bytes"]
    return {"case": case, "measured": measured, "estimate": predicted, "slack": est.get("bound_slack_bytes", 0),
            "ratio": predicted / measured,
            "reserved": fin.get("peak_reserved_bytes", 0),
            "estimated_reserved": est["allocated_peak_bytes"] + est["allocator_overhead_bytes"],
            "measured_phases": fin["peak_by_phase"], "estimated_phases": est["phase_peaks"],
            "measured_activations": fin["activation_bytes"],
            "estimated_activations": est["breakdown"]["activation_bytes"]}


def grid(only):
    cases = []
    for arch in ("gpt2", "llama", "vit", "roberta"):
        if only and arch not in only:
            continue
        for mode in MODES:
            for method in ("full", "lora"):
                for size in (IMAGE_SIZES if arch == "vit" else TEXT_SIZES):
                    cases.append((arch, mode, method, size, None))
        mid = (IMAGE_SIZES if arch == "vit" else TEXT_SIZES)[1]
        for extra, mode, method in (("accum2", "exact", "full"), ("accum2", "best", "lora"),
                                    ("bf16", "paper", "full"), ("bf16", "best", "lora"),
                                    ("eval", "exact", "lora"), ("eval", "best", "full"),
                                    ("dropout", "paper", "lora"), ("dropout", "best", "lora")):
            cases.append((arch, mode, method, mid, extra))
    return cases


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", help="architectures to run")
    ap.add_argument("--mode", nargs="*", help="memory modes to run")
    ap.add_argument("--extra", nargs="*", help="only these variants (accum2, bf16, eval, dropout)")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    if not H.have_data():
        print("accuracy: test data missing (scripts/fetch_data.sh); skipped")
        return 77
    tmp = tempfile.mkdtemp(prefix="memfit-acc-data-")
    data = make_data(tmp)
    cases = [c for c in grid(args.only) if (not args.mode or c[1] in args.mode) and (not args.extra or c[4] in args.extra)]
    if DEVICE == "cuda" and cases:
        first = run_case(cases[0], data)
        if first.get("no_device"):
            print("accuracy: no CUDA device; skipped")
            return 77
    with ThreadPoolExecutor(max_workers=args.jobs) as ex:
        results = list(ex.map(lambda c: run_case(c, data), cases))
    if DEVICE == "cuda":
        rr = [r["reserved"] / r["estimated_reserved"] for r in results if "error" not in r and r["estimated_reserved"]]
        if rr:
            print(f"CUDA reserved / (estimated allocated + overhead): median {statistics.median(rr):.4f}, "
                  f"max {max(rr):.4f} (calibrates DeviceModel::kCudaReservedOverhead)")
    failures, ratios = [], []
    for r in results:
        arch, mode, method, (B, S), extra = r["case"]
        name = f"{arch:8s} {mode:12s} {method:5s} B={B:<3d} S={S:<4d} {extra or '':7s}"
        if "error" in r:
            failures.append(f"{name}: {r['error']}")
            print(f"{name} ERROR {r['error']}")
            continue
        ratios.append((r["ratio"], r["case"][4] == "bf16"))
        under = UNDER_CPU_BF16 if r["case"][4] == "bf16" else UNDER
        bad = r["ratio"] - 1 > TOLERANCE + r["slack"] / r["measured"] or r["ratio"] < 1 - under
        if bad:
            failures.append(f"{name}: estimate {r['estimate']} vs measured {r['measured']} ({r['ratio']:.4f})")
        if args.verbose or bad:
            print(f"{name} measured {r['measured'] / 2**20:9.3f} MiB  estimate {r['estimate'] / 2**20:9.3f} MiB"
                  f"  ratio {r['ratio']:.4f}{'  <-- MISS' if bad else ''}")
            if args.verbose:
                mp, ep = r["measured_phases"], r["estimated_phases"]
                print("    phases " + " ".join(f"{k}:{mp.get(k, 0) / 2**20:.2f}/{ep.get(k, 0) / 2**20:.2f}"
                                               for k in ("init", "batch", "forward", "backward", "optimizer", "eval", "export")
                                               if k in mp or k in ep)
                      + f"  act {r['measured_activations'] / 2**20:.3f}/{r['estimated_activations'] / 2**20:.3f}")
    for label, sel in (("fp32", False), ("CPU bf16", True)):
        rs = [x for x, b in ratios if b == sel]
        if not rs:
            continue
        errs = [abs(x - 1) for x in rs]
        worst = max(rs, key=lambda x: abs(x - 1))
        print(f"\n{label}: {len(rs)} cases: mean absolute error {100 * statistics.mean(errs):.2f}%, "
              f"median {100 * statistics.median(errs):.2f}%, worst {100 * (worst - 1):+.2f}%, "
              f"lowest {100 * (min(rs) - 1):+.2f}%, highest {100 * (max(rs) - 1):+.2f}%")
    if args.markdown:
        print("\n| architecture | mode | method | B x S | measured MiB | estimate MiB | error |")
        print("|---|---|---|---|---|---|---|")
        for r in results:
            if "error" in r:
                continue
            arch, mode, method, (B, S), extra = r["case"]
            print(f"| {arch} | {mode}{' + ' + extra if extra else ''} | {method} | {B} x {S or '-'} | {r['measured'] / 2**20:.2f} | "
                  f"{r['estimate'] / 2**20:.2f} | {100 * (r['ratio'] - 1):+.2f}% |")
    if failures:
        print(f"\n{len(failures)} of {len(results)} cases outside the goal:")
        for f in failures:
            print("  " + f)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
