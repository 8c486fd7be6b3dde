#!/usr/bin/env python3
"""Step 4, headline: the paper's headline experiment as closely as the data here allows.

The paper (Yang et al., ICML 2024; shared/docs/method.md, section 3) reports for ViT-B/16
with LoRA at batch 64: peak memory 3827 MiB -> 2717 MiB (-29.0%) and throughput 288 ->
290 img/s (+0.7%) when GELU and LayerNorm become ReGELU2 and MS-LayerNorm. Here
memfit-worker trains a random-initialised ViT-B/16 (224 px, patch 16) with LoRA of rank 4
on every linear layer of the blocks, as the reference code's `lora_all` configs do, at
micro-batch 64 on Fashion-MNIST's t10k images (resized to 224x224, grey replicated to 3
channels), in three memory modes:

  exact        no memory options (memfit's default: exact ops, memory-efficient attention)
  paper        activation: approx + norm: memory_sharing (the paper's two techniques)
  memfit_best  the preset (adds fused MLP recompute and, for language models, the fused loss)

in bf16 (the reference code trains with AMP; memfit's bf16 keeps parameters in bf16 too),
a few warm-up steps and then timed steps; peaks come from the worker's `finished` event
(allocated overall and per phase, the caching allocator's reserved peak), throughput from
the step events' wall-clock times. Then a LLaMA-7B-shaped model (hidden 4096,
intermediate 11008, 32 heads, vocab 32000, 2 blocks) in bf16 at sequence 512, exact vs
memfit_best. With time left: the ViT in fp32, and exact with the stock attention.

On a CPU (the rehearsal) the same runs use scaled-down shapes, which the markdown says.
"""
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Step, md_table  # noqa: E402
import workloads as W  # noqa: E402

PAPER = {"exact": (3827, 288.0), "paper": (2717, 290.0)}  # MiB, img/s (method.md, section 3)


class Plan:
    """Shapes, batch and step counts for this device: the paper's on the GPU, smaller on
    a CPU so that a run takes seconds, not minutes."""

    def __init__(self, device, tiny):
        self.device = device
        if tiny:
            self.scale, self.llama_scale = "tiny", "tiny"
            self.vit_batch, self.vit_warmup, self.vit_timed = 16, 2, 4
            self.llama_batch, self.llama_seq, self.llama_warmup, self.llama_timed = 2, 64, 1, 3
            self.note = ("**Tiny rehearsal (CPU)**: a 2-block, 64-wide ViT on 32 px images at micro-batch 16 and "
                         "a 64-wide LLaMA; the numbers only show that the step runs end to end.")
        elif device == "cpu":
            self.scale, self.llama_scale = "cpu", "cpu"
            self.vit_batch, self.vit_warmup, self.vit_timed = 8, 1, 2
            self.llama_batch, self.llama_seq, self.llama_warmup, self.llama_timed = 2, 128, 1, 2
            self.note = ("**CPU rehearsal**: ViT-B/16's widths and 224 px images but 2 of its 12 blocks, at "
                         "micro-batch 8 (a full ViT-B/16 step at batch 64 takes minutes on a few cores); the "
                         "LLaMA at width 1024 (2 blocks, sequence 128, micro-batch 2). Ratios between modes are "
                         "meaningful, absolute sizes are not the paper's.")
        else:
            self.scale, self.llama_scale = "full", "full"
            self.vit_batch, self.vit_warmup, self.vit_timed = 64, 5, 25
            self.llama_batch, self.llama_seq, self.llama_warmup, self.llama_timed = 4, 512, 3, 10
            self.note = ("ViT-B/16 (12 blocks, hidden 768, 12 heads, intermediate 3072, patch 16, 224 px), "
                         "random initialisation, LoRA rank 4 on query/key/value and every dense layer of the "
                         "blocks, micro-batch 64.")

    def runs(self):
        """(key, family, mode, dtype, required): the runs in the order they matter; the
        optional ones run only if the step's time allows, and never in tiny runs (CI
        keeps the step under a minute on two cores)."""
        out = [(f"vit_bf16_{m}", "vit", m, "bf16", True) for m in ("exact", "paper", "memfit_best")]
        out += [(f"llama_bf16_{m}", "llama", m, "bf16", True) for m in ("exact", "memfit_best")]
        if self.scale == "tiny":
            return out
        out += [(f"vit_fp32_{m}", "vit", m, "fp32", False) for m in ("exact", "paper", "memfit_best")]
        out += [("vit_bf16_exact_standard_attention", "vit", "exact_standard_attention", "bf16", False)]
        return out


def memory_of(mode):
    if mode == "exact_standard_attention":
        return {"attention": "standard"}
    return W.MODES[mode]


def pct(value, ref):
    if value is None or not ref:
        return "-"
    return f"{(value / ref - 1) * 100:+.1f}%"


def mib_or_dash(b):
    if not b:
        return "-"
    m = b / 2**20
    return f"{m:.0f}" if m >= 100 else f"{m:.1f}"


def rate(v):
    return "-" if v is None else (f"{v:.0f}" if v >= 100 else f"{v:.2f}")


class Headline:
    def __init__(self, step):
        self.step = step
        self.ctx = step.ctx
        self.plan = Plan(step.device, step.tiny)
        self.worker = os.path.join(step.bin, "memfit-worker")
        self.work = tempfile.mkdtemp(prefix="memfit-headline-")
        self.runs = step.result["data"].setdefault("runs", {})
        self.skipped = step.result["data"].setdefault("skipped", [])
        step.result["data"]["plan"] = {k: v for k, v in vars(self.plan).items() if k != "note"}
        self.durations = {}  # family -> seconds of its slowest run so far
        self.text = None

    def corpus(self):
        if self.text is None:
            words = 120_000 if self.plan.llama_scale == "full" else 20_000
            self.text = W.synthetic_text(self.work, words=words)
        return self.text

    def spec(self, key, family, mode, dtype):
        p = self.plan
        if family == "vit":
            return W.vit_spec(self.work, key, W.vit_config(p.scale), self.ctx["data"], memory_of(mode),
                              p.vit_batch, p.vit_warmup + p.vit_timed, dtype=dtype)
        text, tok = self.corpus()
        return W.llama_spec(self.work, key, W.llama_config(p.llama_scale), text, tok, memory_of(mode),
                            p.llama_batch, p.llama_seq, p.llama_warmup + p.llama_timed, dtype=dtype)

    def run_one(self, key, family, mode, dtype, required, others_after):
        # A run needs about as long as the slowest of its family so far; the first of a
        # family gets a guess. Optional runs are skipped when they would not fit with
        # room to spare; required ones are tried while they might still make it.
        guess = self.durations.get(family, 30.0 if self.step.device == "cuda" else 20.0)
        if self.step.left() < (guess * 0.6 + 2 if required else guess * 1.2 + 2):
            why = f"{key}: skipped, {max(0.0, self.step.left()):.0f} s left (a run took about {guess:.0f} s)"
            self.skipped.append(why)
            if required:
                self.step.error(why)
            else:
                self.step.save()
            return
        spec = self.spec(key, family, mode, dtype)
        argv = [self.worker, "run", "--spec", spec]
        if self.step.device == "cuda":
            argv += ["--device", "cuda:0"]
        else:
            argv += ["--device", "cpu", "--threads", str(max(1, min(2, os.cpu_count() or 1)))]
        # A run may take the step's remaining time, but while required runs of another
        # family come after it, a share is kept for them: the first of a family gets 60%,
        # later ones up to three times the family's slowest. step.run never goes past
        # the step's deadline.
        if not others_after:
            limit = self.step.left()
        elif family in self.durations:
            limit = max(guess * 3, 0.5 * self.step.left())
        else:
            limit = 0.6 * self.step.left()
        t0 = time.time()
        rc, out = self.step.run(argv, f"{key}.log", timeout=limit)
        took = time.time() - t0
        self.durations[family] = max(self.durations.get(family, 0.0), took)
        p = self.plan
        if family == "vit":
            r = W.summarize_run(W.events_of(out), p.vit_warmup, p.vit_batch)
        else:
            r = W.summarize_run(W.events_of(out), p.llama_warmup, p.llama_batch, tokens_per_row=p.llama_seq)
        started = next((e for e in W.events_of(out) if e.get("event") == "started"), {})
        # Seconds from launch to the `started` event: libraries, CUDA context, data, the
        # model's random initialisation and norm folding (on the host).
        init = round(started["time"] - t0, 1) if "time" in started else None
        r.update(family=family, mode=mode, dtype=dtype, seconds=round(took, 1), init_seconds=init, exit_code=rc)
        self.runs[key] = r
        if rc is None and not required:
            # An optional run cut off by the step's deadline measured nothing whole: noted,
            # left out of the tables, not an error.
            r["incomplete"] = True
            self.skipped.append(f"{key}: stopped at its limit of {limit:.0f} s (optional; left out)")
            self.step.save()
        elif rc is None:
            self.step.error(f"{key}: stopped after {took:.0f} s (limit {limit:.0f} s); log {key}.log")
        elif rc != 0 or r.get("failed") or not r.get("peak_allocated"):
            self.step.error(f"{key}: exit code {rc}, {r.get('failed') or 'no finished event'}; log {key}.log")
        else:
            self.step.save()

    def reserved(self, r, ref):
        """The reserved peak and its ratio: the CUDA caching allocator's; on a CPU the
        worker's meter reports nothing comparable."""
        if self.step.device != "cuda":
            return ["-", "-"]
        return [mib_or_dash(r.get("peak_reserved")), pct(r.get("peak_reserved"), ref.get("peak_reserved"))]

    def vit_table(self, dtype):
        ref = self.runs.get(f"vit_{dtype}_exact", {})
        rows = []
        modes = ["exact", "paper", "memfit_best"] + (["exact_standard_attention"] if dtype == "bf16" else [])
        for mode in modes:
            r = self.runs.get(f"vit_{dtype}_{mode}")
            if r is None or r.get("incomplete"):
                continue
            paper = "-"
            if mode in PAPER and self.plan.scale == "full":
                mem, thr = PAPER[mode]
                paper = f"{mem} MiB, {thr:.0f} img/s" if mode == "exact" else (
                    f"{mem} MiB ({pct(mem, PAPER['exact'][0])}), {thr:.0f} img/s ({pct(thr, PAPER['exact'][1])})")
            rows.append([mode, mib_or_dash(r.get("peak_allocated")), pct(r.get("peak_allocated"), ref.get("peak_allocated")),
                         r.get("peak_phase") or "-", mib_or_dash(r.get("step_peak")), *self.reserved(r, ref),
                         mib_or_dash(r.get("activation_bytes")), pct(r.get("activation_bytes"), ref.get("activation_bytes")),
                         rate(r.get("rows_per_second")), pct(r.get("rows_per_second"), ref.get("rows_per_second")),
                         paper])
        if not rows:
            return ""
        return md_table(["mode", "peak alloc MiB", "vs exact", "peak phase", "step peak MiB", "peak reserved MiB", "vs exact",
                         "activations MiB", "vs exact", "img/s", "vs exact", "paper (ViT-B/16 LoRA, AMP)"], rows)

    def llama_table(self):
        ref = self.runs.get("llama_bf16_exact", {})
        rows = []
        for mode in ("exact", "memfit_best"):
            r = self.runs.get(f"llama_bf16_{mode}")
            if r is None or r.get("incomplete"):
                continue
            rows.append([mode, mib_or_dash(r.get("peak_allocated")), pct(r.get("peak_allocated"), ref.get("peak_allocated")),
                         r.get("peak_phase") or "-", mib_or_dash(r.get("step_peak")), *self.reserved(r, ref),
                         mib_or_dash(r.get("activation_bytes")), pct(r.get("activation_bytes"), ref.get("activation_bytes")),
                         rate(r.get("tokens_per_second")), pct(r.get("tokens_per_second"), ref.get("tokens_per_second"))])
        if not rows:
            return ""
        return md_table(["mode", "peak alloc MiB", "vs exact", "peak phase", "step peak MiB", "peak reserved MiB", "vs exact",
                         "activations MiB", "vs exact", "tokens/s", "vs exact"], rows)

    def markdown(self):
        p = self.plan
        lc = W.llama_config(p.llama_scale)
        out = [p.note, ""]
        out.append(f"ViT, bf16, micro-batch {p.vit_batch}: {p.vit_warmup} warm-up steps, throughput over the next "
                   f"{p.vit_timed}. Peaks: the `finished` event's peak_memory_bytes (allocated on the "
                   "device, whole run) and the phase it was reached in, the forward/backward/optimizer phases' "
                   "peak (step peak), peak_reserved_bytes (CUDA caching allocator; none on a CPU). Activations: "
                   "bytes alive after the first forward. img/s: rows over the wall-clock time of the timed steps.")
        out += ["", self.vit_table("bf16") or "(no ViT bf16 run finished)", ""]
        out.append(f"Modes: exact = {W.MODE_NOTES['exact']}; paper = {W.MODE_NOTES['paper']}; memfit_best = "
                   f"{W.MODE_NOTES['memfit_best']}. The paper's numbers are the reference code's (timm ViT-B/16, "
                   "pretrained weights, LoRA rank 4 on all linears, AMP fp16 autocast with fp32 weights, its own "
                   "GPU), so compare ratios, not MiB.")
        shape = "LLaMA-7B-shaped model" if p.llama_scale == "full" else "LLaMA model, scaled down"
        out += ["", f"{shape} (hidden {lc['hidden_size']}, intermediate {lc['intermediate_size']}, "
                    f"{lc['num_attention_heads']} heads, vocab {lc['vocab_size']}, {lc['num_hidden_layers']} blocks), "
                    f"bf16, LoRA rank 8 on every linear of the blocks, micro-batch {p.llama_batch} x sequence "
                    f"{p.llama_seq}, {p.llama_warmup} warm-up + {p.llama_timed} timed steps, synthetic text:", ""]
        out += [self.llama_table() or "(no LLaMA run finished)", ""]
        if any(k.startswith("vit_fp32") and not r.get("incomplete") for k, r in self.runs.items()):
            out += ["ViT in fp32 (same shapes and steps):", "", self.vit_table("fp32"), ""]
        timing = [f"{k} {r['seconds']:.0f} s (to `started` {r['init_seconds'] if r.get('init_seconds') is not None else '-'} s)"
                  for k, r in self.runs.items() if r.get("seconds") is not None]
        if timing:
            out += ["Wall-clock per run: " + "; ".join(timing) + ".", ""]
        for s in self.skipped:
            out.append(f"- {s}")
        return "\n".join(out)

    def main(self):
        try:
            runs = self.plan.runs()
            for i, run in enumerate(runs):
                others_after = any(req and fam != run[1] for _, fam, _, _, req in runs[i + 1:])
                try:
                    self.run_one(*run, others_after)
                except Exception as e:  # a broken run is recorded; the others go on
                    self.step.error(f"{run[0]}: {type(e).__name__}: {e}")
        finally:
            shutil.rmtree(self.work, ignore_errors=True)
            self.step.finish(self.markdown())


if __name__ == "__main__":
    Headline(Step()).main()
