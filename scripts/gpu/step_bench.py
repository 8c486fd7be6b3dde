#!/usr/bin/env python3
"""GPU check, step 2: the op benchmark on the device. Each op's forward+backward time and
kept bytes against the stock op (memfit-bench-ops --only ops), then the elementwise and
row ops' passes as a fraction of the device-to-device copy bandwidth measured in the same
run (--only bandwidth; goal >= 80%)."""
import json
import os

from common import Step, md_table

GOAL = 0.80


def run_json(s, args, name):
    rc, out = s.run([os.path.join(s.bin, "memfit-bench-ops"), "--json", "--device", s.device] + args,
                    f"{name}.log")
    if rc != 0:
        s.error(f"memfit-bench-ops {' '.join(args)}: " + ("stopped at the time limit" if rc is None else
                                                         f"exit {rc}: {out[-400:]}"))
        return None
    # The JSON object is the last line that parses (warnings may follow it).
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    s.error(f"memfit-bench-ops {' '.join(args)}: no JSON object in its output")
    return None


def main():
    s = Step()
    quick = ["--quick"] if s.tiny else []
    md = []
    bw = run_json(s, ["--only", "bandwidth", "--reps", "5"] + quick, "bandwidth")
    if bw:
        s.result["data"]["bandwidth"] = bw
        s.save()
        rows, below = [], []
        for r in bw["bandwidth"]:
            worst = min(r["fwd_fraction"], r["bwd_fraction"])
            if worst < GOAL:
                below.append(r["op"])
            rows.append([r["op"], f"{r['rows']}x{r['cols']}", f"{r['fwd_ms']:.4f}", f"{r['stock_fwd_ms']:.4f}",
                         f"{r['bwd_ms']:.4f}", f"{r['stock_bwd_ms']:.4f}", f"{100 * r['fwd_fraction']:.0f}%",
                         f"{100 * r['bwd_fraction']:.0f}%"])
        md.append(f"Device-to-device copy: {bw['copy_bytes_per_s'] / 1e9:.0f} GB/s (bytes read + written). "
                  f"Goal: each pass >= {GOAL:.0%} of it.")
        md.append("")
        md.append(md_table(["op", "shape", "fwd ms", "stock fwd", "bwd ms", "stock bwd", "fwd of copy",
                            "bwd of copy"], rows))
        md.append("")
        md.append("Below the goal: " + (", ".join(below) if below else "none"))
        s.result["data"]["below_goal"] = below
    ops = run_json(s, ["--only", "ops", "--reps", "5" if s.tiny else "20"] + quick, "ops")
    if ops:
        s.result["data"]["ops"] = ops
        s.save()
        rows = [[r["op"], ", ".join(r["shapes"]), f"{r['stock_ms']:.3f}", f"{r['memfit_ms']:.3f}",
                 f"{r['time_ratio']:.2f}", r["stock_kept_bytes"], r["memfit_kept_bytes"]] for r in ops["ops"]]
        md.append("")
        md.append(md_table(["op", "shapes", "stock ms", "memfit ms", "time ratio", "stock kept B",
                            "memfit kept B"], rows))
    blocks = run_json(s, ["--only", "blocks", "--reps", "3" if s.tiny else "10"] + quick, "blocks")
    if blocks:
        s.result["data"]["blocks"] = blocks
        rows = [[b["block"], f"{b['batch']}x{b['seq']}", b["mode"], b["kept_bytes"],
                 f"{b['kept_vs_expected']:.4f}", f"{b['kept_vs_exact']:.3f}", f"{b['step_ms']:.2f}",
                 f"{b['step_vs_exact']:.3f}"] for b in blocks["blocks"]]
        md.append("")
        md.append(md_table(["block", "batch x seq", "mode", "kept B", "kept / accounting", "kept / exact",
                            "step ms", "time / exact"], rows))
        off = [f"{b['block']} {b['mode']}" for b in blocks["blocks"] if abs(b["kept_vs_expected"] - 1) > 1e-9]
        if off:
            s.error("kept bytes differ from the accounting: " + ", ".join(off))
    s.finish("\n".join(md))


if __name__ == "__main__":
    main()
