#!/usr/bin/env python3
"""GPU check, step 6: where memfit_best's time goes on the LLaMA-7B-shaped model (step 4
measured it at a fraction of exact's tokens per second in bf16). The same job (2 blocks,
bf16, LoRA rank 8, micro-batch 4 x 512) with one memory option at a time, then all of
memfit_best's: tokens per second and peak memory each, against exact."""
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import Step, md_table, mib  # noqa: E402
import workloads as W  # noqa: E402

# Most telling first: a step stopped at its limit keeps what it ran.
VARIANTS = [
    ("exact", {}),
    ("memfit_best", {"preset": "memfit_best"}),
    ("ms_norm", {"norm": "memory_sharing"}),
    ("approx", {"activation": "approx"}),
    ("fused_mlp", {"fused_mlp": True}),
    ("fused_loss", {"fused_loss": True}),
    ("checkpointing", {"activation_checkpointing": True}),
]


def main():
    s = Step()
    cuda = s.device == "cuda"
    scale = "full" if cuda else "tiny"
    batch, seq, warm, timed = (4, 512, 3, 6) if cuda else (2, 64, 1, 2)
    # Outside the logs folder: the runs' checkpoints must not go into logs.tar.gz.
    work = tempfile.mkdtemp(prefix="memfit-gpu-ablation-")
    text, tok = W.synthetic_text(work, words=60_000 if cuda else 5_000)
    worker = os.path.join(s.bin, "memfit-worker")
    device = "cuda:0" if cuda else "cpu"
    rows, base = [], None
    for name, memory in VARIANTS:
        if s.left() < 15:
            s.result["data"].setdefault("skipped", []).append(name)
            continue
        spec = W.llama_spec(work, name, W.llama_config(scale), text, tok, memory, batch, seq, warm + timed)
        rc, out = s.run([worker, "run", "--spec", spec, "--device", device, "--threads", "4"], f"{name}.log",
                        timeout=max(5, s.left() - 3))
        r = W.summarize_run(W.events_of(out), warm, batch, tokens_per_row=seq)
        s.result["data"][name] = r
        s.save()
        if rc != 0 or r.get("failed"):
            s.error(f"{name}: exit {rc}: {r.get('failed') or out[-300:]}")
            continue
        tps = r.get("tokens_per_second")
        if name == "exact":
            base = r
        rel = (f"{100 * (tps / base['tokens_per_second'] - 1):+.1f}%" if base and tps and base.get("tokens_per_second") else "-")
        rows.append([name, ", ".join(f"{k}: {v}" for k, v in memory.items()) or "-",
                     mib(r["peak_allocated"]) if r.get("peak_allocated") else "-",
                     f"{tps:.0f}" if tps else "-", rel])
    shutil.rmtree(work, ignore_errors=True)
    s.finish(f"LLaMA-7B-shaped, 2 blocks, bf16, LoRA r8, {batch}x{seq}, {warm} warm-up + {timed} timed steps"
             f"{'' if cuda else ' (CPU: 64-wide model)'}:\n\n" +
             md_table(["variant", "memory options", "peak alloc MiB", "tokens/s", "vs exact"], rows))


if __name__ == "__main__":
    main()
