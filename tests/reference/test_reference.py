#!/usr/bin/python3
"""memfit's models against the independent reference (reference.py): seeded checkpoints
in Hugging Face layout, written here with numpy, run through memfit-model-probe and
through the reference; the logits must agree to 1e-4 (fp32) in every memory mode, and in
exact mode (and with activation checkpointing) the parameter gradients too.

    python3 tests/reference/test_reference.py --probe build/bin/memfit-model-probe
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference import read_safetensors, run, write_safetensors  # noqa: E402

CONFIGS = {
    "gpt2": {"model_type": "gpt2", "vocab_size": 97, "n_embd": 32, "n_layer": 2, "n_head": 4,
             "n_positions": 64, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new"},
    "llama": {"model_type": "llama", "vocab_size": 101, "hidden_size": 32, "intermediate_size": 86,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "rms_norm_eps": 1e-6, "max_position_embeddings": 64, "tie_word_embeddings": False,
              "hidden_act": "silu"},
    "llama_tied": {"model_type": "llama", "vocab_size": 101, "hidden_size": 32, "intermediate_size": 64,
                   "num_hidden_layers": 1, "num_attention_heads": 4, "rms_norm_eps": 1e-6,
                   "max_position_embeddings": 64, "tie_word_embeddings": True, "hidden_act": "silu"},
    "vit": {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 64, "image_size": 16, "patch_size": 4, "num_channels": 3,
            "hidden_act": "gelu", "layer_norm_eps": 1e-12,
            "id2label": {str(i): f"c{i}" for i in range(5)}},
    "bert": {"model_type": "bert", "vocab_size": 103, "hidden_size": 32, "num_hidden_layers": 2,
             "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 64,
             "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu", "num_labels": 3},
    "roberta": {"model_type": "roberta", "vocab_size": 103, "hidden_size": 32, "num_hidden_layers": 2,
                "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 70,
                "type_vocab_size": 1, "layer_norm_eps": 1e-5, "hidden_act": "gelu", "num_labels": 3,
                "pad_token_id": 1},
}


def shapes(arch, c):
    """Hugging Face tensor names and shapes, from the architectures' layouts."""
    s = {}
    if arch == "gpt2":
        d, I = c["n_embd"], 4 * c["n_embd"]
        s["transformer.wte.weight"] = (c["vocab_size"], d)
        s["transformer.wpe.weight"] = (c["n_positions"], d)
        for i in range(c["n_layer"]):
            p = f"transformer.h.{i}."
            s.update({p + "ln_1.weight": (d,), p + "ln_1.bias": (d,), p + "attn.c_attn.weight": (d, 3 * d),
                      p + "attn.c_attn.bias": (3 * d,), p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,),
                      p + "ln_2.weight": (d,), p + "ln_2.bias": (d,), p + "mlp.c_fc.weight": (d, I),
                      p + "mlp.c_fc.bias": (I,), p + "mlp.c_proj.weight": (I, d), p + "mlp.c_proj.bias": (d,)})
        s.update({"transformer.ln_f.weight": (d,), "transformer.ln_f.bias": (d,)})
    elif arch.startswith("llama"):
        d, I, H = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"]
        D, Hk = d // H, c.get("num_key_value_heads", H)
        s["model.embed_tokens.weight"] = (c["vocab_size"], d)
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}."
            s.update({p + "input_layernorm.weight": (d,), p + "self_attn.q_proj.weight": (H * D, d),
                      p + "self_attn.k_proj.weight": (Hk * D, d), p + "self_attn.v_proj.weight": (Hk * D, d),
                      p + "self_attn.o_proj.weight": (d, H * D), p + "post_attention_layernorm.weight": (d,),
                      p + "mlp.gate_proj.weight": (I, d), p + "mlp.up_proj.weight": (I, d),
                      p + "mlp.down_proj.weight": (d, I)})
        s["model.norm.weight"] = (d,)
        if not c["tie_word_embeddings"]:
            s["lm_head.weight"] = (c["vocab_size"], d)
    elif arch == "vit":
        d, I, P, C = c["hidden_size"], c["intermediate_size"], c["patch_size"], c["num_channels"]
        n = (c["image_size"] // P) ** 2 + 1
        e = "vit.embeddings."
        s.update({e + "cls_token": (1, 1, d), e + "position_embeddings": (1, n, d),
                  e + "patch_embeddings.projection.weight": (d, C, P, P), e + "patch_embeddings.projection.bias": (d,)})
        for i in range(c["num_hidden_layers"]):
            p = f"vit.encoder.layer.{i}."
            a = p + "attention.attention."
            s.update({p + "layernorm_before.weight": (d,), p + "layernorm_before.bias": (d,),
                      a + "query.weight": (d, d), a + "query.bias": (d,), a + "key.weight": (d, d), a + "key.bias": (d,),
                      a + "value.weight": (d, d), a + "value.bias": (d,),
                      p + "attention.output.dense.weight": (d, d), p + "attention.output.dense.bias": (d,),
                      p + "layernorm_after.weight": (d,), p + "layernorm_after.bias": (d,),
                      p + "intermediate.dense.weight": (I, d), p + "intermediate.dense.bias": (I,),
                      p + "output.dense.weight": (d, I), p + "output.dense.bias": (d,)})
        s.update({"vit.layernorm.weight": (d,), "vit.layernorm.bias": (d,),
                  "classifier.weight": (len(c["id2label"]), d), "classifier.bias": (len(c["id2label"]),)})
    else:
        d, I = c["hidden_size"], c["intermediate_size"]
        b = "roberta." if arch == "roberta" else "bert."
        e = b + "embeddings."
        s.update({e + "word_embeddings.weight": (c["vocab_size"], d),
                  e + "position_embeddings.weight": (c["max_position_embeddings"], d),
                  e + "token_type_embeddings.weight": (c["type_vocab_size"], d),
                  e + "LayerNorm.weight": (d,), e + "LayerNorm.bias": (d,)})
        for i in range(c["num_hidden_layers"]):
            p = f"{b}encoder.layer.{i}."
            a = p + "attention.self."
            s.update({a + "query.weight": (d, d), a + "query.bias": (d,), a + "key.weight": (d, d), a + "key.bias": (d,),
                      a + "value.weight": (d, d), a + "value.bias": (d,),
                      p + "attention.output.dense.weight": (d, d), p + "attention.output.dense.bias": (d,),
                      p + "attention.output.LayerNorm.weight": (d,), p + "attention.output.LayerNorm.bias": (d,),
                      p + "intermediate.dense.weight": (I, d), p + "intermediate.dense.bias": (I,),
                      p + "output.dense.weight": (d, I), p + "output.dense.bias": (d,),
                      p + "output.LayerNorm.weight": (d,), p + "output.LayerNorm.bias": (d,)})
        L = c["num_labels"]
        if arch == "roberta":
            s.update({"classifier.dense.weight": (d, d), "classifier.dense.bias": (d,),
                      "classifier.out_proj.weight": (L, d), "classifier.out_proj.bias": (L,)})
        else:
            s.update({b + "pooler.dense.weight": (d, d), b + "pooler.dense.bias": (d,),
                      "classifier.weight": (L, d), "classifier.bias": (L,)})
    return s


def make_weights(arch, cfg, seed):
    rng = np.random.default_rng(seed)
    w = {}
    for name, shape in shapes(arch, cfg).items():
        if name.endswith("LayerNorm.weight") or "layernorm" in name.lower() and name.endswith(".weight") \
                or name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight") \
                or name.endswith("norm.weight"):
            w[name] = (1.0 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
        elif name.endswith(".bias"):
            w[name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            w[name] = (0.15 * rng.standard_normal(shape)).astype(np.float32)
    return w


def make_inputs(arch, cfg, seed, padded):
    rng = np.random.default_rng(seed + 1)
    if arch == "vit":
        C, S = cfg["num_channels"], cfg["image_size"]
        return {"pixels": rng.standard_normal((3, C, S, S)).astype(np.float32),
                "labels": rng.integers(0, len(cfg["id2label"]), 3).astype(np.int64)}
    B, S = 3, 11
    ids = rng.integers(2, cfg["vocab_size"], (B, S)).astype(np.int64)
    out = {"input_ids": ids}
    mask = np.ones((B, S), dtype=np.uint8)
    if padded:
        mask[1, 7:] = 0
        mask[2, 4:] = 0
        pad = cfg.get("pad_token_id", 0)
        ids[mask == 0] = pad
        out["attention_mask"] = mask
    if arch in ("gpt2",) or arch.startswith("llama"):
        labels = ids.copy()
        labels[mask == 0] = -100
        out["labels"] = labels
    else:
        out["labels"] = rng.integers(0, cfg["num_labels"], B).astype(np.int64)
    return out


MODES = {
    "exact": {"activation": "exact", "norm": "exact", "attention": "memory_efficient"},
    "exact_standard_attention": {"activation": "exact", "norm": "exact", "attention": "standard"},
    "exact_checkpointing": {"activation": "exact", "norm": "exact", "activation_checkpointing": True},
    "approx": {"activation": "approx", "norm": "exact"},
    "memory_sharing": {"activation": "exact", "norm": "memory_sharing"},
    "approx_memory_sharing": {"activation": "approx", "norm": "memory_sharing"},
    "fused_mlp": {"activation": "exact", "norm": "exact", "fused_mlp": True},
    "memfit_best": {"preset": "memfit_best"},
}
EXACT_GRADS = {"exact", "exact_standard_attention", "exact_checkpointing", "fused_mlp"}


def spec_for(arch, tmp, mode):
    base = "llama" if arch.startswith("llama") else arch
    task = {"gpt2": "causal_lm", "llama": "causal_lm", "vit": "image_classification"}.get(base, "sequence_classification")
    data = {"train_path": "unused"}
    if base == "vit":
        data.update({"format": "idx", "train_labels_path": "unused"})
    else:
        data.update({"format": "jsonl_classification" if task == "sequence_classification" else "text",
                     "tokenizer_path": "unused"})
    mem = {k: v for k, v in MODES[mode].items()}
    return {"name": f"{arch}-{mode}", "model": {"architecture": base, "config_path": "config.json",
                                                 "weights_path": "model.safetensors"},
            "task": task, "data": data, "method": {"kind": "full"}, "memory": mem,
            "training": {"steps": 1}, "output_dir": "out"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--probe", required=True)
    args = ap.parse_args()
    failures, checks = [], 0
    for arch, cfg in CONFIGS.items():
        for padded in ([False, True] if arch in ("gpt2", "llama", "bert", "roberta") else [False]):
            tmp = tempfile.mkdtemp(prefix=f"memfit-ref-{arch}-")
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(cfg, f)
            weights = make_weights(arch, cfg, seed=len(arch))
            write_safetensors(os.path.join(tmp, "model.safetensors"), weights)
            inputs = make_inputs(arch, cfg, seed=7, padded=padded)
            write_safetensors(os.path.join(tmp, "inputs.safetensors"), inputs)
            ref_logits, ref_loss, ref_grads = run("llama" if arch.startswith("llama") else arch, cfg, weights, inputs)
            real = inputs.get("attention_mask")
            for mode in MODES:
                spec = spec_for(arch, tmp, mode)
                spec_path = os.path.join(tmp, f"job-{mode}.json")
                with open(spec_path, "w") as f:
                    json.dump(spec, f)
                out = os.path.join(tmp, f"out-{mode}.safetensors")
                r = subprocess.run([args.probe, "--spec", spec_path, "--inputs", os.path.join(tmp, "inputs.safetensors"),
                                    "--out", out], capture_output=True, text=True)
                label = f"{arch}{' padded' if padded else ''} {mode}"
                if r.returncode != 0:
                    failures.append(f"{label}: probe failed: {r.stderr.strip()}")
                    continue
                got = read_safetensors(out)
                logits = got["logits"]
                if real is not None and logits.ndim == 3:
                    keep = real.astype(bool)
                    diff = np.abs(logits[keep] - ref_logits[keep]).max()
                else:
                    diff = np.abs(logits - ref_logits).max()
                checks += 1
                if not diff <= 1e-4:
                    failures.append(f"{label}: logits differ by {diff:.3e} (> 1e-4)")
                if mode in EXACT_GRADS:
                    checks += 1
                    if abs(float(got["loss"][0]) - ref_loss) > 1e-4:
                        failures.append(f"{label}: loss {float(got['loss'][0])} vs {ref_loss}")
                    for name, g in ref_grads.items():
                        mine = got.get("grad." + name)
                        if mine is None:
                            failures.append(f"{label}: no gradient for {name}")
                            continue
                        scale = max(1e-3, float(np.abs(g).max()))
                        err = float(np.abs(mine - g).max()) / scale
                        if not err <= 2e-4:
                            failures.append(f"{label}: gradient of {name} differs by {err:.2e} of its scale")
                print(f"ok   {label}: logits max |diff| {diff:.2e}")
    print(f"{checks} checks, {len(failures)} failures")
    for f in failures:
        print("FAIL", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
