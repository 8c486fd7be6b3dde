"""Helpers for the memfit-worker process tests: write configs, specs and data, run the
worker as a real process, and read its JSON-lines events."""
import json
import os
import subprocess
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
DATA = os.environ.get("MEMFIT_DATA_DIR", os.path.join(REPO, ".memfit", "data"))
WORKER = os.environ.get("MEMFIT_WORKER", os.path.join(REPO, "build", "bin", "memfit-worker"))

TINY_GPT2 = {"model_type": "gpt2", "vocab_size": 50257, "n_embd": 64, "n_layer": 2, "n_head": 4,
             "n_positions": 128, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new"}
TINY_LLAMA = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 64, "intermediate_size": 172,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "rms_norm_eps": 1e-6, "max_position_embeddings": 128, "tie_word_embeddings": True,
              "hidden_act": "silu"}
TINY_VIT = {"model_type": "vit", "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
            "intermediate_size": 128, "image_size": 28, "patch_size": 7, "num_channels": 1,
            "hidden_act": "gelu", "layer_norm_eps": 1e-12, "num_labels": 10}
TINY_ROBERTA = {"model_type": "roberta", "vocab_size": 50265, "hidden_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 4, "intermediate_size": 128, "max_position_embeddings": 130,
                "type_vocab_size": 1, "layer_norm_eps": 1e-5, "hidden_act": "gelu", "num_labels": 2,
                "pad_token_id": 1}


def have_data():
    return all(os.path.exists(os.path.join(DATA, p)) for p in
               ("gpt2/encoder.json", "llama/tokenizer.model", "moby-dick/chapter_1.txt",
                "fashion-mnist/t10k-labels-idx1-ubyte"))


def moby(tmp, first, last, name):
    """Chapters first..last of Moby-Dick in one file."""
    path = os.path.join(tmp, name)
    with open(path, "w", encoding="utf-8") as out:
        for i in range(first, last + 1):
            with open(os.path.join(DATA, "moby-dick", f"chapter_{i}.txt"), encoding="utf-8") as f:
                out.write(f.read())
    return path


def fmnist(split):
    base = "train" if split == "train" else "t10k"
    return (os.path.join(DATA, "fashion-mnist", f"{base}-images-idx3-ubyte"),
            os.path.join(DATA, "fashion-mnist", f"{base}-labels-idx1-ubyte"))


class Run:
    def __init__(self, proc_result):
        self.code = proc_result.returncode
        self.stderr = proc_result.stderr
        self.events = []
        for line in proc_result.stdout.splitlines():
            line = line.strip()
            if line:
                self.events.append(json.loads(line))

    def of(self, kind):
        return [e for e in self.events if e.get("event") == kind]

    def last(self):
        return self.events[-1] if self.events else {}


def workdir(prefix):
    return tempfile.mkdtemp(prefix=f"memfit-{prefix}-")


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)
    return path


def gpt2_job(tmp, **over):
    cfg = write_json(os.path.join(tmp, "config.json"), over.pop("config", TINY_GPT2))
    train = over.pop("train", None) or moby(tmp, 1, 40, "train.txt")
    val = over.pop("val", None) or moby(tmp, 131, 135, "val.txt")
    spec = {"name": "tiny-gpt2",
            "model": {"architecture": "gpt2", "config_path": cfg, "init_seed": 1},
            "data": {"train_path": train, "validation_path": val, "format": "text",
                     "tokenizer_path": os.path.join(DATA, "gpt2")},
            "method": {"kind": "full"},
            "training": {"steps": 6, "micro_batch": 4, "sequence_length": 32, "learning_rate": 0.003,
                         "eval_batches": 4, "seed": 5},
            "output_dir": os.path.join(tmp, "out")}
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key].update(value)
        else:
            spec[key] = value
    return write_json(os.path.join(tmp, "job.json"), spec)


def run_worker(spec, *args, timeout=900):
    r = subprocess.run([WORKER, "run", "--spec", spec, "--threads", "2", *args],
                       capture_output=True, text=True, timeout=timeout)
    return Run(r)


def start_worker(spec, *args):
    return subprocess.Popen([WORKER, "run", "--spec", spec, "--threads", "2", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
