"""`memfit estimate` as a process: the JSON object, the text breakdown, the fit plan and
bad input (exit 2, the message names the flag, file or field)."""
import json
import math
import os
import subprocess
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "tests", "worker"))
import worker_harness as H  # noqa: E402

CLI = os.environ.get("MEMFIT_CLI", os.path.join(REPO, "build", "bin", "memfit"))


def run(*args):
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=120)


def spec_file(tmp, **over):
    spec_file.n += 1
    cfg = H.write_json(os.path.join(tmp, f"config{spec_file.n}.json"), over.pop("config", dict(H.TINY_GPT2)))
    spec = {"name": "est", "model": {"architecture": "gpt2", "config_path": cfg},
            "data": {"train_path": os.path.join(tmp, "train.txt"), "format": "text",
                     "tokenizer_path": os.path.join(tmp, "tok")},
            "method": {"kind": "lora"}, "memory": {"preset": "memfit_best"},
            "training": {"steps": 10, "micro_batch": 8, "gradient_accumulation": 2, "sequence_length": 64},
            "output_dir": os.path.join(tmp, "out"), "resources": {"devices": ["cuda:0"]}}
    for k, v in over.items():
        spec[k] = dict(spec.get(k, {}), **v) if isinstance(v, dict) else v
    return H.write_json(os.path.join(tmp, f"job{spec_file.n}.json"), spec)


spec_file.n = 0


class Estimate(unittest.TestCase):
    def test_json_has_the_peak_breakdown_and_phases(self):
        tmp = H.workdir("est")
        r = run("estimate", "-f", spec_file(tmp), "-o", "json")
        self.assertEqual(r.returncode, 0, r.stderr)
        e = json.loads(r.stdout)
        self.assertEqual(e["device"]["kind"], "cuda")
        b = e["breakdown"]
        self.assertEqual(e["peak_bytes"], e["allocated_peak_bytes"] + e["allocator_overhead_bytes"] + e["context_bytes"])
        self.assertEqual(e["context_bytes"], 800 << 20)  # DeviceModel::kCudaContextBytes
        # The caching allocator model's reserve: segments hold at least the tensors.
        self.assertGreaterEqual(e["allocator_overhead_bytes"], int(0.08 * e["allocated_peak_bytes"]))
        # The H200's measured constants, by NVML's name.
        h = json.loads(run("estimate", "-f", spec_file(tmp), "-o", "json", "--gpu-model", "NVIDIA H200").stdout)
        self.assertEqual(h["context_bytes"], 800 << 20)
        self.assertLess(h["allocator_overhead_bytes"], e["allocator_overhead_bytes"])  # 5% margin, not 8%
        self.assertEqual(b["optimizer_bytes"], 8 * e["trainable_parameters"])
        self.assertGreater(b["activation_bytes"], 0)
        self.assertEqual(sum(a["bytes"] for a in e["activations"]),
                         sum(o["bytes"] for a in e["activations"] for o in a["ops"]))
        self.assertEqual([a["where"] for a in e["activations"] if a["where"].startswith("layer")], ["layer 0", "layer 1"])
        self.assertIn(e["peak_phase"], e["phase_peaks"])
        self.assertEqual(e["phase_peaks"][e["peak_phase"]], e["allocated_peak_bytes"])
        self.assertNotIn("fit", e)
        # The CUDA constants are overridable.
        r2 = run("estimate", "-f", spec_file(tmp), "-o", "json", "--cuda-context", "1GiB", "--reserved-overhead", "0")
        e2 = json.loads(r2.stdout)
        self.assertEqual(e2["context_bytes"], 1 << 30)
        # Without the margin, what remains is the caching allocator model's own reserve.
        self.assertEqual(e2["allocator_overhead_bytes"],
                         e["allocator_overhead_bytes"] - math.ceil(e["allocated_peak_bytes"] * 0.08))
        self.assertEqual(e2["peak_bytes"], e2["allocated_peak_bytes"] + e2["allocator_overhead_bytes"] + (1 << 30))

    def test_fit_plan_keeps_the_global_batch(self):
        tmp = H.workdir("est")
        spec = spec_file(tmp, training={"micro_batch": 32, "gradient_accumulation": 2, "sequence_length": 128})
        full = json.loads(run("estimate", "-f", spec, "-o", "json").stdout)
        r = run("estimate", "-f", spec, "--device-memory", str(full["peak_bytes"] - 1), "-o", "json")
        self.assertEqual(r.returncode, 0, r.stderr)
        fit = json.loads(r.stdout)["fit"]
        self.assertTrue(fit["fits"])
        self.assertEqual(fit["micro_batch"] * fit["gradient_accumulation"], 64)
        self.assertLess(fit["micro_batch"], 32)
        self.assertLessEqual(fit["peak_bytes"], full["peak_bytes"] - 1)
        self.assertTrue(any("chose" in x for x in fit["reasons"]))
        # The CUDA context alone takes 800 MiB.
        none = json.loads(run("estimate", "-f", spec, "--device-memory", "810MiB", "-o", "json").stdout)["fit"]
        self.assertFalse(none["fits"])
        self.assertGreater(none["smallest_bytes"], 810 << 20)

    def test_auto_preset_plan_is_written_and_runs_under_its_limit(self):
        # Issue 11: `memory.preset: auto` was refused before any request; the plan could
        # not be run by hand. Now estimate writes it, and the worker runs it (or fits it).
        if not H.have_data():
            self.skipTest("test data missing")
        tmp = H.workdir("est")
        cfg = H.write_json(os.path.join(tmp, "cfg.json"), dict(H.TINY_GPT2, n_positions=256))
        spec = H.write_json(os.path.join(tmp, "auto.json"), {
            "name": "auto", "model": {"architecture": "gpt2", "config_path": cfg, "init_seed": 1},
            "data": {"train_path": H.moby(tmp, 1, 10, "train.txt"), "format": "text",
                     "tokenizer_path": os.path.join(H.DATA, "gpt2")},
            "method": {"kind": "full"}, "memory": {"preset": "auto"},
            "training": {"steps": 1, "micro_batch": 8, "gradient_accumulation": 1, "sequence_length": 96},
            "output_dir": "out"})
        as_is = json.loads(run("estimate", "-f", spec, "--device", "cpu", "--threads", "1", "-o", "json").stdout)
        limit = int(as_is["peak_bytes"] * 0.8)
        plan_path = os.path.join(tmp, "plan.json")
        r = run("estimate", "-f", spec, "--device", "cpu", "--threads", "1", "--device-memory", str(limit),
                "--write-spec", plan_path, "-o", "json")
        self.assertEqual(r.returncode, 0, r.stderr)
        fit = json.loads(r.stdout)["fit"]
        self.assertTrue(fit["fits"], fit)
        self.assertIn("wrote " + plan_path, r.stderr)
        plan = json.load(open(plan_path))
        self.assertEqual(int(plan["training"]["micro_batch"]) * int(plan["training"]["gradient_accumulation"]), 8)
        self.assertEqual(int(plan["training"]["micro_batch"]), fit["micro_batch"])
        self.assertNotIn("preset", plan["memory"])  # every option explicit
        self.assertEqual(plan["output_dir"], os.path.join(tmp, "out"))  # paths made absolute
        w = subprocess.run([H.WORKER, "run", "--spec", plan_path, "--threads", "1", "--memory-limit", str(limit)],
                           capture_output=True, text=True, timeout=600)
        last = json.loads(w.stdout.splitlines()[-1])
        self.assertEqual(last["event"], "finished", last)
        self.assertLessEqual(last["peak_memory_bytes"], limit)
        # The worker fits an auto spec itself when told how much memory there is...
        fresh = dict(json.load(open(spec)), output_dir="out2")  # out holds the plan's checkpoints
        spec2 = H.write_json(os.path.join(tmp, "auto2.json"), fresh)
        w = subprocess.run([H.WORKER, "run", "--spec", spec2, "--threads", "1", "--fit", str(limit), "--max-steps", "1"],
                           capture_output=True, text=True, timeout=600)
        first = json.loads(w.stdout.splitlines()[0])
        self.assertEqual(first["plan"]["micro_batch"], fit["micro_batch"])
        self.assertEqual(first["job"]["micro_batch"], fit["micro_batch"])
        # ... and says what it needs when not.
        w = subprocess.run([H.WORKER, "run", "--spec", spec2, "--threads", "1"], capture_output=True, text=True, timeout=600)
        self.assertEqual(w.returncode, 2)
        self.assertIn("memory.preset: auto", json.loads(w.stdout.splitlines()[-1])["message"])
        # --write-spec: needs --device-memory, and never overwrites the spec it reads.
        r = run("estimate", "-f", spec, "--write-spec", plan_path)
        self.assertEqual(r.returncode, 2)
        self.assertIn("--write-spec needs --device-memory", r.stderr)
        before = open(spec).read()
        r = run("estimate", "-f", spec, "--device-memory", str(limit), "--write-spec", spec)
        self.assertEqual(r.returncode, 2)
        self.assertEqual(open(spec).read(), before)

    def test_text_output_and_sizes(self):
        tmp = H.workdir("est")
        r = run("estimate", "-f", spec_file(tmp), "--device-memory", "16GiB")
        self.assertEqual(r.returncode, 0, r.stderr)
        for needle in ("peak", "weights", "optimizer state", "activations kept", "layer 0", "fit in 16.00 GiB"):
            self.assertIn(needle, r.stdout)

    def test_bad_input_names_the_field(self):
        tmp = H.workdir("est")
        cases = [
            (["estimate"], "-f SPEC is required"),
            (["estimate", "-f", os.path.join(tmp, "missing.json")], "missing.json"),
            (["estimate", "-f", spec_file(tmp), "--device-memory", "16 gigs"], "--device-memory: '16 gigs' is not a size"),
            (["estimate", "-f", spec_file(tmp), "-o", "yaml"], "-o: expected json or text"),
            (["estimate", "-f", spec_file(tmp), "--device", "tpu"], "--device: expected cpu or cuda"),
            (["estimate", "-f", spec_file(tmp, training={"micro_batch": 1000000000000})], "training.micro_batch"),
            (["estimate", "-f", spec_file(tmp, config=dict(H.TINY_GPT2, n_embd=0))], "n_embd"),
            (["estimate", "-f", spec_file(tmp, training={"sequence_length": 4096})], "sequence_length"),
            (["estimate", "-f", spec_file(tmp), "--reserved-overhead", "-1"], "--reserved-overhead"),
            (["estimate", "-f", spec_file(tmp), "--cuda-context", "lots"], "--cuda-context"),
            (["frobnicate"], "unknown command 'frobnicate'"),
        ]
        for args, needle in cases:
            r = run(*args)
            self.assertEqual(r.returncode, 2, (args, r.stdout, r.stderr))
            self.assertIn(needle, r.stderr, args)


if __name__ == "__main__":
    unittest.main()
