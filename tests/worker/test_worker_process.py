#!/usr/bin/python3
"""memfit-worker as a real process: the JSON-lines contract, outputs, bad input, out of
memory, SIGTERM and exact resume. Needs the data from scripts/fetch_data.sh (exit 77 =
skipped without it)."""
import json
import os
import shutil
import signal
import struct
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reference"))
import worker_harness as H  # noqa: E402
from reference import read_safetensors, write_safetensors  # noqa: E402

import numpy as np  # noqa: E402


class Contract(unittest.TestCase):
    def test_full_run_emits_the_events_and_writes_the_model(self):
        tmp = H.workdir("full")
        r = H.run_worker(H.gpt2_job(tmp, training={"eval_interval": 3, "checkpoint_interval": 2}))
        self.assertEqual(r.code, 0, r.events[-3:])
        kinds = [e["event"] for e in r.events]
        self.assertEqual(kinds[0], "started")
        self.assertEqual(kinds[-1], "finished")
        self.assertEqual(len(r.of("step")), 6)
        self.assertEqual([e["step"] for e in r.of("eval")], [0, 3, 6])
        self.assertEqual([e["step"] for e in r.of("checkpoint")], [2, 4, 6])
        step1 = r.of("step")[0]
        for key in ("loss", "lr", "tokens_per_second", "memory_bytes", "peak_memory_bytes", "activation_bytes"):
            self.assertIn(key, step1)
        fin = r.last()
        self.assertGreater(fin["peak_memory_bytes"], fin["activation_bytes"])
        self.assertGreater(fin["activation_bytes"], 0)
        self.assertGreater(fin["eval"]["perplexity"], 1.0)
        model = os.path.join(tmp, "out", "model")
        w = read_safetensors(os.path.join(model, "model.safetensors"))
        self.assertEqual(w["transformer.h.0.attn.c_attn.weight"].shape, (64, 192))  # Conv1D layout
        with open(os.path.join(model, "config.json")) as f:
            self.assertEqual(json.load(f)["n_embd"], 64)
        # The tokenizer travels with the model, under the names Hugging Face tools load.
        self.assertEqual(fin["output"]["tokenizer_files"], ["vocab.json", "merges.txt"])
        for src, name in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
            with open(os.path.join(H.DATA, "gpt2", src), "rb") as a, open(os.path.join(model, name), "rb") as b:
                self.assertEqual(a.read(), b.read(), name)
        with open(os.path.join(tmp, "out", "metrics.jsonl")) as f:
            self.assertEqual(len(f.read().splitlines()), len(r.events))
        # Only the two newest checkpoints stay.
        ck = sorted(os.listdir(os.path.join(tmp, "out", "checkpoints")))
        self.assertEqual(ck, ["latest", "step-000000004", "step-000000006"])

    def test_lora_writes_a_peft_adapter(self):
        tmp = H.workdir("lora")
        r = H.run_worker(H.gpt2_job(tmp, method={"kind": "lora", "lora": {"rank": 4, "alpha": 8, "dropout": 0.1,
                                                                           "target_modules": ["c_attn", "c_fc"]}},
                                    memory={"preset": "memfit_best"}))
        self.assertEqual(r.code, 0, r.events[-2:])
        started = r.of("started")[0]
        self.assertLess(started["trainable_parameters"], started["parameters"] / 10)
        adapter = os.path.join(tmp, "out", "adapter")
        with open(os.path.join(adapter, "adapter_config.json")) as f:
            cfg = json.load(f)
        self.assertEqual((cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["task_type"]), ("LORA", 4, 8.0, "CAUSAL_LM"))
        self.assertEqual(sorted(cfg["target_modules"]), ["c_attn", "c_fc"])
        self.assertTrue(cfg["fan_in_fan_out"])
        w = read_safetensors(os.path.join(adapter, "adapter_model.safetensors"))
        self.assertEqual(len(w), 2 * 2 * 2)  # 2 layers x 2 targets x (A, B)
        a = w["base_model.model.transformer.h.1.attn.c_attn.lora_A.weight"]
        b = w["base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"]
        self.assertEqual((a.shape, b.shape), ((4, 64), (192, 4)))
        self.assertGreater(np.abs(b).max(), 0.0)  # B starts at zero and trained
        self.assertTrue(os.path.isfile(os.path.join(adapter, "vocab.json")))
        self.assertTrue(os.path.isfile(os.path.join(adapter, "merges.txt")))


class Training(unittest.TestCase):
    def test_memory_sharing_export_unmerges_to_the_same_model(self):
        # Full fine-tuning with merged norms, exported; the export reloaded in exact mode
        # evaluates to the same loss (before its first step) as the trained model did.
        a = H.workdir("msx")
        r = H.run_worker(H.gpt2_job(a, memory={"norm": "memory_sharing", "activation": "approx"},
                                    training={"steps": 4, "learning_rate": 0.01}))
        self.assertEqual(r.code, 0, r.events[-2:])
        trained = r.last()["eval"]["loss"]
        b = H.workdir("msx")
        weights = os.path.join(a, "out", "model", "model.safetensors")
        r2 = H.run_worker(H.gpt2_job(b, model={"weights_path": weights}, training={"steps": 1, "eval_interval": 1}))
        self.assertEqual(r2.code, 0, r2.events[-2:])
        self.assertAlmostEqual(r2.of("eval")[0]["loss"], trained, places=4)
        self.assertEqual(r2.of("eval")[0]["step"], 0)
        # The folded norms (ln_1 and ln_2 of 2 layers, scale and shift of 64) are counted
        # in the started event and no longer train as separate parameters; ln_f feeds the
        # tied head and is not folded.
        folded, exact = r.of("started")[0], r2.of("started")[0]
        self.assertEqual(folded["folded_norm_parameters"], 2 * 2 * 2 * 64)
        self.assertIn("not decayed", folded["folded_norm_note"])
        self.assertNotIn("folded_norm_parameters", exact)
        self.assertEqual(exact["trainable_parameters"] - folded["trainable_parameters"], 2 * 2 * 2 * 64)

    def test_gradient_accumulation_matches_a_bigger_micro_batch(self):
        runs = []
        for mb, acc in ((4, 1), (2, 2)):
            d = H.workdir("accum")
            r = H.run_worker(H.gpt2_job(d, training={"steps": 3, "micro_batch": mb, "gradient_accumulation": acc}))
            self.assertEqual(r.code, 0, r.events[-2:])
            runs.append(read_safetensors(os.path.join(d, "out", "model", "model.safetensors")))
        # Adam's update m / sqrt(v) does not shrink with the gradient: where an element's
        # gradient is at rounding level, the two summation orders move it by different
        # fractions of the learning rate (3e-3). One c_attn bias element of ~4e-7 differs
        # by 1.03e-5 (3 steps); atol is 1% of the learning rate.
        for k in runs[0]:
            np.testing.assert_allclose(runs[0][k], runs[1][k], rtol=1e-4, atol=3e-5, err_msg=k)

    def test_prompt_completion_bf16_and_early_stopping(self):
        tmp = H.workdir("pc")
        rows = [{"prompt": f"Q: what hunts the whale number {i}?\nA:", "completion": " Ahab."} for i in range(24)]
        path = os.path.join(tmp, "pc.jsonl")
        with open(path, "w") as f:
            f.write("\n".join(json.dumps(r) for r in rows))
        r = H.run_worker(H.gpt2_job(tmp, train=path, val=path, data={"format": "jsonl_prompt_completion"},
                                    training={"steps": 6, "dtype": "bf16", "eval_interval": 2,
                                              "early_stopping": {"patience": 1, "min_delta": 100.0}}))
        self.assertEqual(r.code, 0, r.events[-2:])
        self.assertIn("24 prompt/completion pairs", r.of("started")[0]["train"])
        self.assertEqual(r.of("started")[0]["job"]["dtype"], "bf16")
        fin = r.last()
        self.assertTrue(fin["early_stopped"])
        self.assertEqual(fin["step"], 2)  # no eval can improve by 100: stop at the first one after step 0
        self.assertTrue(all(np.isfinite(e["loss"]) for e in r.of("step")))

    def test_images_are_resized_and_replicated_to_the_model_input(self):
        tmp = H.workdir("resize")
        cfg = dict(H.TINY_VIT, image_size=32, patch_size=8, num_channels=3)
        x, y = H.fmnist("test")
        spec = {"name": "vit-resize", "model": {"architecture": "vit", "config_path": H.write_json(os.path.join(tmp, "c.json"), cfg)},
                "data": {"train_path": x, "train_labels_path": y, "validation_path": x, "validation_labels_path": y},
                "method": {"kind": "head_only"}, "training": {"steps": 3, "micro_batch": 16, "eval_batches": 2},
                "output_dir": os.path.join(tmp, "out")}
        r = H.run_worker(H.write_json(os.path.join(tmp, "job.json"), spec))
        self.assertEqual(r.code, 0, r.events[-2:])
        started = r.of("started")[0]
        self.assertIn("10000 images of 28x28", started["train"])
        self.assertEqual(started["trainable_parameters"], 64 * 10 + 10)  # head only: the classifier
        self.assertEqual(r.last()["eval"]["count"], 32)
        self.assertNotIn("tokenizer_files", r.last()["output"])  # images: no tokenizer

    def test_cuda_device_without_cuda_is_bad_input(self):
        r = H.run_worker(H.gpt2_job(H.workdir("cuda")), "--device", "cuda:0")
        if r.code == 0:
            self.skipTest("a CUDA device is present")
        self.assertEqual(r.code, 2, r.events)
        self.assertIn("cuda:0", r.last()["message"])


class BadInput(unittest.TestCase):
    def expect_bad(self, spec, needle, *args):
        r = H.run_worker(spec, *args)
        self.assertEqual(r.code, 2, r.events)
        last = r.last()
        self.assertEqual((last.get("event"), last.get("reason")), ("failed", "bad_input"), last)
        self.assertIn(needle, last["message"])
        return last["message"]

    def test_bad_specs_configs_and_arguments(self):
        tmp = H.workdir("bad")
        spec = H.gpt2_job(tmp)
        with open(spec) as f:
            good = json.load(f)
        broken = dict(good, trainng={"steps": 2})
        self.expect_bad(H.write_json(os.path.join(tmp, "b1.json"), broken), "trainng")
        self.expect_bad(spec, "--memory-limit", "--memory-limit", "lots")
        self.expect_bad(os.path.join(tmp, "nope.json"), "cannot read")
        cfg = dict(H.TINY_GPT2)
        del cfg["n_embd"]
        self.expect_bad(H.gpt2_job(H.workdir("bad"), config=cfg), "n_embd: missing")
        self.expect_bad(H.gpt2_job(H.workdir("bad"), data={"tokenizer_path": "/no/such/tok"}), "/no/such/tok")
        self.expect_bad(H.gpt2_job(H.workdir("bad"), data={"train_path": "/no/such/train.txt"}), "cannot read")
        empty = os.path.join(tmp, "empty.txt")
        open(empty, "w").close()
        self.expect_bad(H.gpt2_job(H.workdir("bad"), train=empty), "fewer than one sequence")
        self.expect_bad(H.gpt2_job(H.workdir("bad"), method={"kind": "lora", "lora": {"target_modules": ["q_proj"]}}),
                        "no linear layer named 'q_proj'")

    def test_bad_weights_are_named(self):
        tmp = H.workdir("badw")
        lying = os.path.join(tmp, "lying.safetensors")
        header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 64]}}).encode()
        with open(lying, "wb") as f:
            f.write(struct.pack("<Q", len(header)) + header + b"\0" * 16)
        self.expect_bad(H.gpt2_job(tmp, model={"weights_path": lying}), "out of range")
        wrong = os.path.join(tmp, "wrong.safetensors")
        write_safetensors(wrong, {"transformer.wte.weight": np.zeros((50257, 32), np.float32),
                                  "transformer.extra.weight": np.zeros((3,), np.float32)})
        msg = self.expect_bad(H.gpt2_job(H.workdir("badw"), model={"weights_path": wrong}), "missing")
        self.assertIn("transformer.h.0.attn.c_attn.weight", msg)
        self.assertIn("unexpected", msg)
        self.assertIn("transformer.extra.weight", msg)
        self.assertIn("wrong shape", msg)
        self.assertIn("[50257, 32] in the checkpoint, the config needs [50257, 64]", msg)

    def test_bad_labels_and_a_failed_run_keeps_the_previous_output(self):
        tmp = H.workdir("cls")
        cfg = H.write_json(os.path.join(tmp, "config.json"), H.TINY_ROBERTA)
        rows = [{"text": "a fine whale", "label": 1}, {"text": "a bad sea", "label": 0}] * 4
        good = os.path.join(tmp, "good.jsonl")
        with open(good, "w") as f:
            f.write("\n".join(json.dumps(r) for r in rows))
        spec = {"name": "cls", "model": {"architecture": "roberta", "config_path": cfg},
                "data": {"train_path": good, "format": "jsonl_classification",
                         "tokenizer_path": os.path.join(H.DATA, "gpt2")},
                "method": {"kind": "full"}, "training": {"steps": 2, "micro_batch": 4, "sequence_length": 16},
                "output_dir": os.path.join(tmp, "out")}
        r = H.run_worker(H.write_json(os.path.join(tmp, "job.json"), spec))
        self.assertEqual(r.code, 0, r.events[-2:])
        model = os.path.join(tmp, "out", "model", "model.safetensors")
        with open(model, "rb") as f:
            before = f.read()
        bad = os.path.join(tmp, "bad.jsonl")
        with open(bad, "w") as f:
            f.write(json.dumps({"text": "x", "label": 1}) + "\n" + json.dumps({"text": "y", "label": 5}) + "\n")
        spec["data"]["train_path"] = bad
        self.expect_bad(H.write_json(os.path.join(tmp, "job2.json"), spec), "bad.jsonl:2: label 5 is out of range for 2 classes")
        with open(model, "rb") as f:
            self.assertEqual(f.read(), before)


class Memory(unittest.TestCase):
    def test_memory_limit_is_a_clean_oom(self):
        tmp = H.workdir("oom")
        r = H.run_worker(H.gpt2_job(tmp), "--memory-limit", "20MiB")
        self.assertEqual(r.code, 3, r.events)
        last = r.last()
        self.assertEqual((last["event"], last["reason"]), ("failed", "oom"))
        self.assertIn("out of memory", last["message"])
        # Enough memory: the same job finishes, under the cap it was given.
        r = H.run_worker(H.gpt2_job(H.workdir("oom")), "--memory-limit", "400MiB")
        self.assertEqual(r.code, 0, r.events[-2:])
        self.assertLess(r.last()["peak_memory_bytes"], 400 * 2**20)


class StopAndResume(unittest.TestCase):
    def test_sigterm_checkpoints_then_the_same_spec_resumes(self):
        tmp = H.workdir("term")
        spec = H.gpt2_job(tmp, training={"steps": 400})
        p = H.start_worker(spec)
        for line in p.stdout:
            if json.loads(line)["event"] == "step":
                p.send_signal(signal.SIGTERM)
                break
        out, _ = p.communicate(timeout=300)
        self.assertEqual(p.returncode, 4)
        last = json.loads(out.strip().splitlines()[-1])
        self.assertEqual(last["event"], "stopped")
        stopped_at = last["step"]
        self.assertGreater(stopped_at, 0)
        self.assertLess(stopped_at, 400)
        r = H.run_worker(spec, "--max-steps", str(stopped_at + 2))
        self.assertEqual(r.code, 0, r.events[-2:])
        started = r.of("started")[0]
        self.assertEqual(started["start_step"], stopped_at)
        self.assertIn("resumed_from", started)
        self.assertEqual(r.last()["step"], stopped_at + 2)

    def test_resumed_run_is_bit_identical(self):
        lora = {"kind": "lora", "lora": {"rank": 4, "alpha": 8, "dropout": 0.2}}
        full = H.workdir("whole")
        whole = H.run_worker(H.gpt2_job(full, method=lora, training={"steps": 8}))
        self.assertEqual(whole.code, 0, whole.events[-2:])
        part = H.workdir("parts")
        spec = H.gpt2_job(part, method=lora, training={"steps": 8})
        first = H.run_worker(spec, "--max-steps", "3")
        self.assertEqual(first.code, 0, first.events[-2:])
        self.assertTrue(first.last()["truncated"])
        second = H.run_worker(spec)
        self.assertEqual(second.code, 0, second.events[-2:])
        self.assertEqual(second.of("started")[0]["start_step"], 3)
        a = read_safetensors(os.path.join(full, "out", "adapter", "adapter_model.safetensors"))
        b = read_safetensors(os.path.join(part, "out", "adapter", "adapter_model.safetensors"))
        self.assertEqual(sorted(a), sorted(b))
        for k in a:
            self.assertTrue(np.array_equal(a[k], b[k]), k)
        self.assertEqual(whole.of("step")[-1]["loss"], second.of("step")[-1]["loss"])


if __name__ == "__main__":
    if not os.path.exists(H.WORKER):
        print(f"memfit-worker not built at {H.WORKER}")
        sys.exit(1)
    if not H.have_data():
        print(f"data missing in {H.DATA}: run scripts/fetch_data.sh (skipped)")
        sys.exit(77)
    unittest.main(verbosity=2)
