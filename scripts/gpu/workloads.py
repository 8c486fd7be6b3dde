"""Workloads the GPU check's headline and daemon steps train: model configs (ViT-B/16 and
LLaMA-7B shapes, scaled down for CPU rehearsals), the job specs memfit-worker and memfitd
take, a synthetic text corpus for the language models, and reading a worker's events.

Only Fashion-MNIST's t10k files are sure to be on the GPU machine, so the images come
from there (the worker resizes the 28x28 grey images to the model's size and replicates
their channel) and the text is generated here, with a WordPiece vocabulary written beside
it: memory and throughput depend on shapes, not on what the tokens say.
"""
import json
import os
import random

# memory sections of a job spec (docs/SPEC.md, "memory"). "exact" is memfit's default:
# every op exact, attention memory-efficient (the paper's timm ViT uses PyTorch's fused
# scaled_dot_product_attention too). "paper" is what the paper adds: ReGELU2/ReSiLU2 and
# memory-sharing norms. "memfit_best" is memfit's own cheapest exact-or-approximate choice.
MODES = {
    "exact": {},
    "paper": {"activation": "approx", "norm": "memory_sharing"},
    "memfit_best": {"preset": "memfit_best"},
}
MODE_NOTES = {
    "exact": "no memory options (memfit's default: exact ops, memory-efficient attention)",
    "paper": "activation: approx, norm: memory_sharing (ReGELU2 + MS-LayerNorm)",
    "memfit_best": "preset: memfit_best",
    "exact_standard_attention": "attention: standard (stock softmax composite, keeps the probabilities)",
}


def vit_config(scale):
    """A ViT classifier's config.json. scale: "full" is ViT-B/16 at 224 px (the paper's
    model); "cpu" keeps ViT-B/16's widths and image size with 2 of its 12 blocks; "tiny"
    is a 2-block, 64-wide ViT on 32 px images (CI)."""
    base = {"model_type": "vit", "hidden_act": "gelu", "layer_norm_eps": 1e-12, "qkv_bias": True,
            "num_channels": 3, "num_labels": 10}
    if scale == "tiny":
        base.update(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                    image_size=32, patch_size=8)
    else:
        base.update(hidden_size=768, num_hidden_layers=12 if scale == "full" else 2, num_attention_heads=12,
                    intermediate_size=3072, image_size=224, patch_size=16)
    return base


def llama_config(scale):
    """A LLaMA config.json. "full": LLaMA-7B's block shape (hidden 4096, intermediate
    11008, 32 heads, vocab 32000) with 2 of its 32 blocks; "daemon": 8 blocks of width
    1024 (the daemon step's language model, quick to initialise); "cpu": 2 blocks of
    width 1024; "tiny": width 64."""
    widths = {"full": (4096, 11008, 32, 2), "daemon": (1024, 2752, 8, 8), "cpu": (1024, 2752, 8, 2),
              "tiny": (64, 172, 4, 2)}
    hidden, inter, heads, layers = widths[scale]
    return {"model_type": "llama", "vocab_size": 32000, "hidden_size": hidden, "intermediate_size": inter,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "hidden_act": "silu",
            "tie_word_embeddings": False}


def llama_parameters(cfg):
    """Parameters of a LLaMA config (blocks, embedding and untied head; norms left out):
    what a training step's matrix products cost per token, near enough."""
    h, i, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    return n * (4 * h * h + 3 * h * i) + 2 * cfg["vocab_size"] * h


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
    return path


def synthetic_text(folder, words=120_000, seed=0):
    """A text file of `words` pseudo-words and a WordPiece vocabulary holding every one of
    them (so no token is [UNK]); returns (text path, tokenizer folder)."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = sorted({"".join(rng.choice(letters) for _ in range(rng.randint(2, 8))) for _ in range(3000)})
    tok = os.path.join(folder, "tokenizer")
    os.makedirs(tok, exist_ok=True)
    with open(os.path.join(tok, "vocab.txt"), "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ","] + vocab) + "\n")
    text = os.path.join(folder, "corpus.txt")
    with open(text, "w") as f:
        left = words
        while left > 0:
            n = min(left, rng.randint(6, 24))
            f.write(" ".join(rng.choice(vocab) for _ in range(n)) + ".\n")
            left -= n
    return text, tok


def fmnist(data_dir):
    """Fashion-MNIST's t10k images and labels (the only split the GPU machine has)."""
    base = os.path.join(data_dir, "fashion-mnist")
    return os.path.join(base, "t10k-images-idx3-ubyte"), os.path.join(base, "t10k-labels-idx1-ubyte")


def vit_spec(folder, name, config, data_dir, memory, micro_batch, steps, dtype="fp32", lora_rank=4,
             output_dir=None):
    """A ViT LoRA job on Fashion-MNIST as the paper's ViT experiment sets LoRA up: rank 4 on
    every linear layer of the blocks (query, key, value, both dense layers of attention
    and MLP), the classification head trained with them. Returns the spec's path."""
    cfg = write_json(os.path.join(folder, f"{name}.config.json"), config)
    images, labels = fmnist(data_dir)
    spec = {"name": name,
            "model": {"architecture": "vit", "config_path": cfg, "init_seed": 1},
            "data": {"format": "idx", "train_path": images, "train_labels_path": labels},
            "method": {"kind": "lora", "lora": {"rank": lora_rank, "alpha": lora_rank}},
            "memory": dict(memory),
            "training": {"steps": steps, "micro_batch": micro_batch, "dtype": dtype, "learning_rate": 1e-3,
                         "seed": 1, "log_interval": 1},
            "output_dir": output_dir or os.path.join(folder, f"{name}.out")}
    return write_json(os.path.join(folder, f"{name}.json"), spec)


def llama_spec(folder, name, config, text, tokenizer, memory, micro_batch, seq, steps, dtype="bf16",
               lora_rank=8, output_dir=None):
    """A LLaMA LoRA job (rank 8 on every linear layer of the blocks) on the synthetic
    text. Returns the spec's path."""
    cfg = write_json(os.path.join(folder, f"{name}.config.json"), config)
    spec = {"name": name,
            "model": {"architecture": "llama", "config_path": cfg, "init_seed": 1},
            "data": {"format": "text", "train_path": text, "tokenizer_path": tokenizer},
            "method": {"kind": "lora", "lora": {"rank": lora_rank, "alpha": 2 * lora_rank}},
            "memory": dict(memory),
            "training": {"steps": steps, "micro_batch": micro_batch, "sequence_length": seq, "dtype": dtype,
                         "learning_rate": 1e-4, "seed": 1, "log_interval": 1},
            "output_dir": output_dir or os.path.join(folder, f"{name}.out")}
    return write_json(os.path.join(folder, f"{name}.json"), spec)


def events_of(text):
    """The JSON-lines events in a worker's output (other lines, e.g. stderr mixed in,
    are skipped)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def summarize_run(events, warmup, rows_per_step, tokens_per_row=1):
    """What one worker run measured: peaks from its `finished` event (allocated overall,
    the training steps' own peak, the caching allocator's reserved peak on CUDA),
    activation bytes, and throughput over the steps after `warmup`, from the events'
    wall-clock times (that covers everything a step does, asynchronous GPU work
    included, since the next step's loss read waits for it). None where not measured."""
    steps = [e for e in events if e.get("event") == "step"]
    fin = next((e for e in events if e.get("event") == "finished"), None)
    failed = next((e for e in events if e.get("event") == "failed"), None)
    started = next((e for e in events if e.get("event") == "started"), None)
    r = {"steps": len(steps), "failed": failed and f"{failed.get('reason')}: {failed.get('message')}"}
    if started:
        r["parameters"] = started.get("parameters")
        r["trainable_parameters"] = started.get("trainable_parameters")
        r["memory_options"] = started.get("job", {}).get("memory")
    if fin:
        phases = fin.get("peak_by_phase", {})
        r["peak_allocated"] = fin.get("peak_memory_bytes")
        r["peak_reserved"] = fin.get("peak_reserved_bytes")
        r["peak_phase"] = fin.get("peak_phase")
        r["peak_by_phase"] = phases
        r["step_peak"] = max([phases.get(k, 0) for k in ("forward", "backward", "optimizer")] or [0]) or None
        r["activation_bytes"] = fin.get("activation_bytes")
    elif steps:
        r["peak_allocated"] = max(e.get("peak_memory_bytes", 0) for e in steps)
        r["activation_bytes"] = steps[0].get("activation_bytes")
    timed = [e for e in steps if e.get("step", 0) > warmup]
    base = next((e for e in steps if e.get("step") == warmup), None)
    if timed and base and "time" in base and "time" in timed[-1]:
        secs = timed[-1]["time"] - base["time"]
        r["timed_steps"] = len(timed)
        r["timed_seconds"] = secs
        if secs > 0:
            r["rows_per_second"] = len(timed) * rows_per_step / secs
            r["tokens_per_second"] = r["rows_per_second"] * tokens_per_row
    elif timed:
        # No wall-clock times: the worker's own step timings.
        secs = sum(e.get("step_seconds", 0) for e in timed)
        r["timed_steps"] = len(timed)
        r["timed_seconds"] = secs
        if secs > 0:
            r["rows_per_second"] = len(timed) * rows_per_step / secs
            r["tokens_per_second"] = r["rows_per_second"] * tokens_per_row
    return r
