#!/usr/bin/python3
"""examples/ as a new user runs them: every spec there is valid as shipped (`memfit
estimate` reads its files), and each is submitted through `memfit` to a real memfitd with
real workers and succeeds -- shortened to a few steps and writing into a temporary
folder, otherwise unchanged. lora-gpt2.yaml runs on the checkpoint pretrain-gpt2.yaml
wrote, as the examples' README says. Needs scripts/fetch_data.sh's data (exit 77 =
skipped without it)."""
import json
import os
import subprocess
import sys
import tempfile
import unittest

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "server"))
import daemon_harness as D  # noqa: E402

CLI = os.environ.get("MEMFIT_CLI", os.path.join(D.REPO, "build", "bin", "memfit"))
EXAMPLES = os.path.join(D.REPO, "examples")
SPECS = ("pretrain-gpt2.yaml", "lora-gpt2.yaml", "vit-fashion-mnist.yaml", "prompt-completion-llama.yaml")


def load(name):
    with open(os.path.join(EXAMPLES, name)) as f:
        return yaml.safe_load(f)


class Examples(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="memfit-examples-")
        cls.d = D.Daemon("examples", devices=("cpu:0=2GiB",),
                         roots=["--read-root", D.REPO, "--read-root", cls.tmp, "--write-root", cls.tmp])
        cls.env = dict(os.environ, MEMFIT_SERVER=f"127.0.0.1:{cls.d.port}")

    @classmethod
    def tearDownClass(cls):
        cls.d.stop()

    def memfit(self, *args, timeout=900):
        return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout, env=self.env)

    def shortened(self, name, steps):
        """The example with its relative paths made absolute (as against its own folder),
        output into the temporary folder (the pretrained checkpoint looked up there too)
        and the run cut to `steps`; written next to the runs."""
        spec = json.loads(json.dumps(load(name)).replace("../.memfit/runs/", os.path.join(self.tmp, "runs") + "/"))
        for section, keys in (("model", ("config_path", "weights_path")),
                              ("data", ("train_path", "validation_path", "tokenizer_path",
                                        "train_labels_path", "validation_labels_path"))):
            for k in keys:
                if k in spec[section]:
                    spec[section][k] = os.path.normpath(os.path.join(EXAMPLES, spec[section][k]))
        spec["output_dir"] = os.path.normpath(os.path.join(EXAMPLES, spec["output_dir"]))
        t = spec["training"]
        t.pop("epochs", None)
        t["steps"] = steps
        for k in ("eval_interval", "checkpoint_interval", "early_stopping"):
            t.pop(k, None)
        t["eval_batches"] = 2
        path = os.path.join(self.tmp, name)
        with open(path, "w") as f:
            yaml.safe_dump(spec, f)
        return path, spec

    def run_example(self, name, steps=3):
        path, spec = self.shortened(name, steps)
        r = self.memfit("submit", "-f", path, "--watch")
        self.assertEqual(r.returncode, 0, f"{name}:\n{r.stdout}\n{r.stderr}")
        self.assertRegex(r.stdout.splitlines()[-1], r" succeeded: measured peak ")
        return spec

    def test_every_example_is_valid_as_shipped(self):
        for name in SPECS:
            spec = load(name)
            self.assertEqual(spec["name"] + ".yaml", name)
            self.assertTrue(spec["output_dir"].startswith("../.memfit/runs/"), name)
            if name == "lora-gpt2.yaml":
                continue  # reads the pretraining run's output: checked in the chain below
            r = self.memfit("estimate", "-f", os.path.join(EXAMPLES, name), "-o", "json")
            self.assertEqual(r.returncode, 0, f"{name}: {r.stderr}")
            self.assertGreater(json.loads(r.stdout)["peak_bytes"], 0)

    def test_pretrain_then_lora_on_its_checkpoint(self):
        pre = self.run_example("pretrain-gpt2.yaml", steps=4)
        model = os.path.join(pre["output_dir"], "model")
        self.assertEqual(sorted(os.listdir(model)), ["config.json", "merges.txt", "model.safetensors", "vocab.json"])
        lora = self.run_example("lora-gpt2.yaml")
        adapter = os.path.join(lora["output_dir"], "adapter")
        self.assertEqual(sorted(os.listdir(adapter)),
                         ["adapter_config.json", "adapter_model.safetensors", "merges.txt", "vocab.json"])
        with open(os.path.join(adapter, "adapter_config.json")) as f:
            cfg = json.load(f)
        self.assertEqual((cfg["peft_type"], cfg["r"], sorted(cfg["target_modules"])), ("LORA", 8, ["c_attn", "c_fc"]))

    def test_vit_classification(self):
        spec = self.run_example("vit-fashion-mnist.yaml")
        self.assertTrue(os.path.isfile(os.path.join(spec["output_dir"], "model", "model.safetensors")))

    def test_prompt_completion_lora_on_llama(self):
        spec = self.run_example("prompt-completion-llama.yaml")
        adapter = os.path.join(spec["output_dir"], "adapter")
        self.assertIn("tokenizer.model", os.listdir(adapter))
        with open(os.path.join(adapter, "adapter_config.json")) as f:
            self.assertEqual(json.load(f)["task_type"], "CAUSAL_LM")


if __name__ == "__main__":
    if not os.path.isfile(os.path.join(D.W.DATA, "llama", "tokenizer.model")):
        print("data missing: run scripts/fetch_data.sh (skipped)")
        sys.exit(77)
    unittest.main(verbosity=2)
