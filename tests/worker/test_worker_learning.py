#!/usr/bin/python3
"""memfit-worker learns on real data (scripts/fetch_data.sh; exit 77 = skipped without
it), and memfit's memory modes change memory, not results:
  - a small GPT-2 trained on Moby-Dick lowers its validation loss;
  - LoRA on the checkpoint that run produced lowers it further;
  - approx + memory-sharing ends within 2% (relative) of exact, same seed and steps;
  - a small ViT reaches >= 80% test accuracy on Fashion-MNIST, and memfit_best within 2%.
"""
import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import worker_harness as H  # noqa: E402

GPT2_TRAIN = {"steps": 80, "micro_batch": 8, "sequence_length": 64, "learning_rate": 0.003,
              "warmup_steps": 8, "eval_interval": 40, "eval_batches": 24, "seed": 11, "log_interval": 20}


class Gpt2OnMobyDick(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = H.workdir("learn-gpt2")
        cls.train = H.moby(cls.tmp, 1, 100, "train.txt")
        cls.val = H.moby(cls.tmp, 131, 135, "val.txt")

    def run_mode(self, name, memory, **over):
        d = os.path.join(self.tmp, name)
        os.makedirs(d, exist_ok=True)
        r = H.run_worker(H.gpt2_job(d, train=self.train, val=self.val, memory=memory,
                                    training=dict(GPT2_TRAIN), **over))
        self.assertEqual(r.code, 0, r.events[-2:])
        return r, d

    def test_learns_then_lora_improves_and_memfit_modes_match_exact(self):
        exact, exact_dir = self.run_mode("exact", {"activation": "exact", "norm": "exact"})
        evals = [e["loss"] for e in exact.of("eval")]
        print(f"exact: eval losses {evals}", flush=True)
        self.assertEqual([e["step"] for e in exact.of("eval")], [0, 40, 80])
        self.assertLess(evals[-1], evals[0] - 2.0)  # from about ln(50257) = 10.8

        memfit, _ = self.run_mode("approx_ms", {"activation": "approx", "norm": "memory_sharing"})
        m = memfit.of("eval")[-1]["loss"]
        print(f"approx + memory_sharing: final eval loss {m:.4f} vs exact {evals[-1]:.4f}", flush=True)
        self.assertLess(abs(m - evals[-1]) / evals[-1], 0.02)
        self.assertLess(memfit.last()["activation_bytes"], exact.last()["activation_bytes"])

        # LoRA on the full run's weights, on chapters it has not seen.
        more = H.moby(self.tmp, 101, 130, "more.txt")
        d = os.path.join(self.tmp, "lora")
        os.makedirs(d, exist_ok=True)
        weights = os.path.join(exact_dir, "out", "model", "model.safetensors")
        r = H.run_worker(H.gpt2_job(d, train=more, val=self.val, model={"weights_path": weights},
                                    method={"kind": "lora", "lora": {"rank": 8, "alpha": 16}},
                                    memory={"preset": "memfit_best"},
                                    training=dict(GPT2_TRAIN, steps=80, learning_rate=0.01, eval_interval=80)))
        self.assertEqual(r.code, 0, r.events[-2:])
        start, lora = r.of("eval")[0]["loss"], r.last()["eval"]["loss"]
        print(f"LoRA on the full run's checkpoint: {start:.4f} -> {lora:.4f}", flush=True)
        self.assertAlmostEqual(start, evals[-1], places=3)  # B = 0: LoRA starts as the base model
        self.assertLess(lora, start - 0.02)


class VitOnFashionMnist(unittest.TestCase):
    def run_mode(self, name, memory):
        tmp = H.workdir(f"learn-vit-{name}")
        cfg = H.write_json(os.path.join(tmp, "config.json"), H.TINY_VIT)
        train_x, train_y = H.fmnist("train")
        test_x, test_y = H.fmnist("test")
        spec = {"name": f"vit-{name}", "model": {"architecture": "vit", "config_path": cfg, "init_seed": 1},
                "data": {"train_path": train_x, "train_labels_path": train_y,
                         "validation_path": test_x, "validation_labels_path": test_y},
                "method": {"kind": "full"}, "memory": memory,
                "training": {"steps": 700, "micro_batch": 64, "learning_rate": 0.002, "warmup_steps": 30,
                             "weight_decay": 0.01, "seed": 3, "log_interval": 100},
                "output_dir": os.path.join(tmp, "out")}
        r = H.run_worker(H.write_json(os.path.join(tmp, "job.json"), spec))
        self.assertEqual(r.code, 0, r.events[-2:])
        return r.last()

    def test_reaches_80_percent_and_memfit_best_matches_exact(self):
        exact = self.run_mode("exact", {"activation": "exact", "norm": "exact"})
        best = self.run_mode("best", {"preset": "memfit_best"})
        a, b = exact["eval"]["accuracy"], best["eval"]["accuracy"]
        print(f"ViT on Fashion-MNIST test: exact {a:.4f}, memfit_best {b:.4f}", flush=True)
        self.assertGreaterEqual(a, 0.80)
        self.assertLess(abs(b - a) / a, 0.02)
        self.assertLess(best["activation_bytes"], exact["activation_bytes"])


if __name__ == "__main__":
    if not H.have_data():
        print(f"data missing in {H.DATA}: run scripts/fetch_data.sh (skipped)")
        sys.exit(77)
    unittest.main(verbosity=2)
