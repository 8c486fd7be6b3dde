#!/usr/bin/python3
"""The demo's closing picture: each job's memory over time, read back from Prometheus'
HTTP API (the Prometheus the demo starts beside memfitd), against its estimate and its
reservation. One panel per job: the device's measured use while the job ran on it, the
peak the job's worker measured so far, the estimate and the reservation.

    demo_plot.py --prometheus http://127.0.0.1:PORT --start UNIX --end UNIX --out memory.png
"""
import argparse
import json
import math
import sys
import urllib.parse
import urllib.request

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MiB = 1 << 20


def api(base, path, **params):
    url = f"{base}/api/v1/{path}?" + urllib.parse.urlencode(params, doseq=True)
    with urllib.request.urlopen(url, timeout=30) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise RuntimeError(f"{url}: {body}")
    return body["data"]


def series(base, expr, start, end, step):
    """[(t, value)] of the first series the expression returns over the range."""
    data = api(base, "query_range", query=expr, start=start, end=end, step=step)["result"]
    if not data:
        return [], {}
    return [(float(t), float(v)) for t, v in data[0]["values"]], data[0]["metric"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prometheus", required=True)
    ap.add_argument("--start", type=float, required=True)
    ap.add_argument("--end", type=float, required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    step = max(1, int((a.end - a.start) / 600))
    jobs = {}
    for labels in api(a.prometheus, "series", **{"match[]": "memfit_job_info", "start": a.start, "end": a.end}):
        jobs[labels["job_id"]] = labels.get("name", labels["job_id"])
    if not jobs:
        sys.exit("demo_plot: Prometheus has no memfit_job_info series in that range")
    order = sorted(jobs, key=lambda j: j)
    cols = 2 if len(order) > 1 else 1
    rows = math.ceil(len(order) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 3.6 * rows), squeeze=False)
    for ax, job in zip(axes.flat, order):
        sel = f'job_id="{job}"'
        peak, meta = series(a.prometheus, f"memfit_job_measured_peak_bytes{{{sel}}}", a.start, a.end, step)
        est, _ = series(a.prometheus, f"memfit_job_estimated_peak_bytes{{{sel}}}", a.start, a.end, step)
        res, _ = series(a.prometheus, f"memfit_job_reserved_bytes{{{sel}}}", a.start, a.end, step)
        device = meta.get("device", "")
        # The device's use while this job ran there: every job on it, this one included.
        running, _ = series(a.prometheus, f'memfit_job_steps{{{sel},state="running"}}', a.start, a.end, step)
        t0, t1 = (running[0][0], running[-1][0]) if running else (a.start, a.start)
        used, _ = series(a.prometheus, f'memfit_device_memory_peak_bytes{{device="{device}"}}', t0, t1, step)

        def plot(points, label, **kw):
            if points:
                ax.plot([t - a.start for t, _ in points], [v / MiB for _, v in points], label=label, **kw)

        plot(used, f"{device} in use by all its jobs (peak between scrapes)", color="tab:blue", linewidth=1)
        plot(peak, "measured peak so far", color="tab:red", linewidth=2)
        plot(est, "estimate", color="tab:green", linestyle="--")
        plot(res, "reservation", color="tab:gray", linestyle=":")
        ax.set_title(f"{jobs[job]} ({job}, {device})", fontsize=10)
        ax.set_xlabel("seconds since the demo started")
        ax.set_ylabel("MiB")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    for ax in list(axes.flat)[len(order):]:
        ax.axis("off")
    fig.suptitle("memfit: each job's memory, measured against its estimate (from Prometheus)")
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(a.out)


if __name__ == "__main__":
    main()
