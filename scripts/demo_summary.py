#!/usr/bin/python3
"""The demo's closing table: `memfit list -o json` on stdin -> per job the estimated and
measured peak memory, the activation memory memfit's ops saved, the final validation
metric and where the output is (oldest job first)."""
import json
import sys

MiB = 1 << 20


def mib(b):
    return f"{b / MiB:.1f} MiB"


jobs = list(reversed(json.load(sys.stdin)))
rows = [("job", "state", "estimated", "measured", "estimate", "activations", "saved", "result")]
for j in jobs:
    p, r = j.get("plan") or {}, j.get("result") or {}
    est, meas = int(p.get("estimated_peak_bytes", 0)), int(r.get("measured_peak_bytes", 0))
    act, stock = int(p.get("activation_bytes", 0)), int(p.get("exact_activation_bytes", 0))
    # JSON carries every field (zeros too): accuracy is the result of classification
    # tasks only, language models report their validation loss.
    spec = j.get("spec") or {}
    arch = (spec.get("model") or {}).get("architecture", "")
    task = spec.get("task") or ("causal_lm" if arch in ("gpt2", "llama") else "classification")
    if "classification" in task and "eval_accuracy" in r:
        result = f"accuracy {100 * r['eval_accuracy']:.1f}%"
    elif r.get("eval_loss"):
        result = f"val loss {r['eval_loss']:.3f}"
    else:
        result = j.get("failure", {}).get("message", "-")
    rows.append((j["name"], j["state"].lower(), mib(est), mib(meas) if meas else "-",
                 f"{100 * (est / meas - 1):+.2f}%" if meas else "-", mib(act),
                 mib(stock - act) if stock > act else "0", result))
widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
for r in rows:
    print("  ".join(c.ljust(w) if i in (0, 1, 7) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
print()
for j in jobs:
    r = j.get("result", {})
    print(f"{j['name']:<26}{r.get('adapter_dir') or r.get('model_dir') or '-'}")
