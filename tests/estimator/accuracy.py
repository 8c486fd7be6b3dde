"""The estimator against the worker: every architecture x memory mode x method x
(micro-batch, length) runs memfit-worker for two steps on CPU under the tracking
allocator, and `memfit estimate` predicts the same job. Goal (issue 4): within +-3% of
the measured peak everywhere, and never more than 1% below it.

    python3 tests/estimator/accuracy.py              # the whole grid (ctest runs this)
    python3 tests/estimator/accuracy.py --only gpt2 --verbose
    python3 tests/estimator/accuracy.py --markdown   # the table for docs/PERFORMANCE.md
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
TOLERANCE = 0.03   # |estimate / measured - 1| <= 3%
UNDER = 0.01       # never more than 1% below

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


def make_spec(tmp, arch, mode, method, size, data):
    B, S = size
    memory = dict(MODES[mode])
    spec = {"name": f"{arch}-{mode}-{method}-{B}x{S}", "model": {"architecture": arch, "init_seed": 1},
            "method": {"kind": method}, "memory": memory,
            "training": {"steps": 2, "micro_batch": B, "learning_rate": 1e-3, "seed": 3},
            "output_dir": os.path.join(tmp, "out")}
    if method == "lora":
        spec["method"]["lora"] = {"rank": 4, "alpha": 8}
    if arch == "gpt2":
        spec["model"]["config_path"] = H.write_json(os.path.join(tmp, "config.json"), GPT2)
        spec["data"] = {"train_path": data["text"], "format": "text", "tokenizer_path": os.path.join(H.DATA, "gpt2")}
        spec["training"]["sequence_length"] = S
    elif arch == "llama":
        spec["model"]["config_path"] = H.write_json(os.path.join(tmp, "config.json"), LLAMA)
        spec["data"] = {"train_path": data["text"], "format": "text", "tokenizer_path": os.path.join(H.DATA, "llama")}
        spec["training"]["sequence_length"] = S
    elif arch == "vit":
        spec["model"]["config_path"] = H.write_json(os.path.join(tmp, "config.json"), VIT)
        x, y = H.fmnist("test")
        spec["data"] = {"train_path": x, "train_labels_path": y}
    else:
        spec["model"]["config_path"] = H.write_json(os.path.join(tmp, "config.json"), ROBERTA)
        spec["data"] = {"train_path": data["cls"], "format": "jsonl_classification",
                        "tokenizer_path": os.path.join(H.DATA, "gpt2")}
        spec["training"]["sequence_length"] = S
    return H.write_json(os.path.join(tmp, "job.json"), spec)


def run_case(case, data):
    arch, mode, method, size = case
    tmp = tempfile.mkdtemp(prefix="memfit-acc-")
    spec = make_spec(tmp, arch, mode, method, size, data)
    w = subprocess.run([H.WORKER, "run", "--spec", spec, "--threads", str(THREADS)],
                       capture_output=True, text=True, timeout=900)
    events = [json.loads(l) for l in w.stdout.splitlines() if l.strip()]
    fin = events[-1] if events else {}
    if w.returncode != 0 or fin.get("event") != "finished":
        return {"case": case, "error": f"worker exit {w.returncode}: {events[-1:] or w.stderr[-400:]}"}
    e = subprocess.run([CLI, "estimate", "-f", spec, "--device", "cpu", "--threads", str(THREADS), "-o", "json"],
                       capture_output=True, text=True, timeout=60)
    if e.returncode != 0:
        return {"case": case, "error": f"estimate exit {e.returncode}: {e.stderr.strip()}"}
    est = json.loads(e.stdout)
    measured = max(fin["peak_memory_bytes"], max(fin["peak_by_phase"].values()))
    return {"case": case, "measured": measured, "estimate": est["peak_bytes"],
            "ratio": est["peak_bytes"] / measured,
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
                    cases.append((arch, mode, method, size))
    return cases


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", help="architectures to run")
    ap.add_argument("--mode", nargs="*", help="memory modes to run")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--jobs", type=int, default=1)
    args = ap.parse_args()
    if not H.have_data():
        print("accuracy: test data missing (scripts/fetch_data.sh); skipped")
        return 77
    tmp = tempfile.mkdtemp(prefix="memfit-acc-data-")
    data = {"text": H.moby(tmp, 1, 30, "train.txt"), "cls": long_texts(tmp)}
    cases = [c for c in grid(args.only) if not args.mode or c[1] in args.mode]
    with ThreadPoolExecutor(max_workers=args.jobs) as ex:
        results = list(ex.map(lambda c: run_case(c, data), cases))
    failures, ratios = [], []
    for r in results:
        arch, mode, method, (B, S) = r["case"]
        name = f"{arch:8s} {mode:12s} {method:5s} B={B:<3d} S={S:<4d}"
        if "error" in r:
            failures.append(f"{name}: {r['error']}")
            print(f"{name} ERROR {r['error']}")
            continue
        ratios.append(r["ratio"])
        bad = abs(r["ratio"] - 1) > TOLERANCE or r["ratio"] < 1 - UNDER
        if bad:
            failures.append(f"{name}: estimate {r['estimate']} vs measured {r['measured']} ({r['ratio']:.4f})")
        if args.verbose or bad:
            print(f"{name} measured {r['measured'] / 2**20:9.3f} MiB  estimate {r['estimate'] / 2**20:9.3f} MiB"
                  f"  ratio {r['ratio']:.4f}{'  <-- MISS' if bad else ''}")
            if args.verbose:
                mp, ep = r["measured_phases"], r["estimated_phases"]
                print("    phases " + " ".join(f"{k}:{mp.get(k, 0) / 2**20:.2f}/{ep.get(k, 0) / 2**20:.2f}"
                                               for k in ("init", "forward", "backward", "optimizer", "eval")
                                               if k in mp or k in ep)
                      + f"  act {r['measured_activations'] / 2**20:.3f}/{r['estimated_activations'] / 2**20:.3f}")
    if ratios:
        errs = [abs(x - 1) for x in ratios]
        worst = max(ratios, key=lambda x: abs(x - 1))
        print(f"\n{len(ratios)} cases: mean absolute error {100 * statistics.mean(errs):.2f}%, "
              f"median {100 * statistics.median(errs):.2f}%, worst {100 * (worst - 1):+.2f}%, "
              f"lowest {100 * (min(ratios) - 1):+.2f}%, highest {100 * (max(ratios) - 1):+.2f}%")
    if args.markdown:
        print("\n| architecture | mode | method | B x S | measured MiB | estimate MiB | error |")
        print("|---|---|---|---|---|---|---|")
        for r in results:
            if "error" in r:
                continue
            arch, mode, method, (B, S) = r["case"]
            print(f"| {arch} | {mode} | {method} | {B} x {S or '-'} | {r['measured'] / 2**20:.2f} | "
                  f"{r['estimate'] / 2**20:.2f} | {100 * (r['ratio'] - 1):+.2f}% |")
    if failures:
        print(f"\n{len(failures)} of {len(results)} cases outside the goal:")
        for f in failures:
            print("  " + f)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
