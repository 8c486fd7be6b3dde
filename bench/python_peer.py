#!/usr/bin/python3
"""The outside peer for memfit-bench-train: the same models, written in PyTorch
(tests/reference/reference.py with PyTorch's fused LayerNorm and activations, as Hugging
Face's eager modules run them), on the same LibTorch (Debian's python3-torch 1.13), timed
over whole full-fine-tuning steps: forward, backward, torch.optim.AdamW. Also counts the
bytes of the tensors autograd saves (unique storages, parameters excluded).

    /usr/bin/python3 bench/python_peer.py [--reps N] [--threads N] [--json]
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "reference"))
import reference as R  # noqa: E402
from test_reference import make_weights  # noqa: E402

R.FAST = True

# The shapes of memfit-bench-train (keep in step with bench/train_bench.cpp).
ARCHS = {
    "gpt2": ({"vocab_size": 50257, "n_embd": 384, "n_layer": 4, "n_head": 6, "n_positions": 1024,
              "activation_function": "gelu_new"}, 4, 256),
    "llama": ({"vocab_size": 32000, "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 4,
               "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 2048,
               "tie_word_embeddings": False, "hidden_act": "silu"}, 2, 256),
    "vit": ({"hidden_size": 192, "num_hidden_layers": 6, "num_attention_heads": 3, "intermediate_size": 768,
             "image_size": 224, "patch_size": 16, "num_channels": 3, "hidden_act": "gelu",
             "id2label": {str(i): str(i) for i in range(10)}}, 16, 0),
    "roberta": ({"vocab_size": 50265, "hidden_size": 384, "num_hidden_layers": 4, "num_attention_heads": 6,
                 "intermediate_size": 1536, "max_position_embeddings": 514, "type_vocab_size": 1,
                 "layer_norm_eps": 1e-5, "hidden_act": "gelu", "num_labels": 2, "pad_token_id": 1}, 16, 128),
}


def step_fn(arch, cfg, P, batch):
    if arch == "vit":
        logits = R.vit(cfg, P, batch["pixels"])
        return F.cross_entropy(logits, batch["labels"])
    if arch == "gpt2":
        return R.causal_lm_loss(R.gpt2(cfg, P, batch["ids"], None), batch["ids"])
    if arch == "llama":
        return R.causal_lm_loss(R.llama(cfg, P, batch["ids"], None), batch["ids"])
    return F.cross_entropy(R.bert(cfg, P, batch["ids"], None, roberta=True), batch["labels"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for arch, (cfg, B, S) in ARCHS.items():
        weights = make_weights(arch, cfg, seed=1)
        P = R.Params({k: v * 0.1 if v.ndim > 1 else v for k, v in weights.items()})
        if arch == "vit":
            batch = {"pixels": torch.randn(B, 3, cfg["image_size"], cfg["image_size"]),
                     "labels": torch.randint(0, 10, (B,))}
        else:
            batch = {"ids": torch.randint(2, cfg["vocab_size"], (B, S)), "labels": torch.randint(0, 2, (B,))}
        params = list(P.t.values())
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
        param_ptrs = {p.data_ptr() for p in params}
        times, saved = [], {}

        def pack(t):
            if t.data_ptr() not in param_ptrs:
                saved[t.data_ptr()] = t.untyped_storage().nbytes() if hasattr(t, "untyped_storage") \
                    else t.storage().nbytes()
            return t

        for i in range(args.reps + 1):
            saved.clear()
            t0 = time.perf_counter()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = step_fn(arch, cfg, P, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i > 0:
                times.append((time.perf_counter() - t0) * 1000.0)
        rows.append({"arch": arch, "method": "full", "step_ms": statistics.median(times),
                     "saved_bytes": int(sum(saved.values()))})
    if args.json:
        print(json.dumps({"threads": args.threads, "reps": args.reps, "rows": rows}))
    else:
        print(f"Python PyTorch peer, full fine-tuning steps, {args.threads} threads, median of {args.reps}")
        for r in rows:
            print(f"{r['arch']:<8} {r['step_ms']:10.1f} ms   saved tensors {r['saved_bytes'] / 2**20:8.2f} MiB")


if __name__ == "__main__":
    main()
