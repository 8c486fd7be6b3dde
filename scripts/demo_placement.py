#!/usr/bin/python3
"""Where the demo's jobs ran: `memfit list -o json` and `memfit devices -o json` -> each
job's device and run time, how long each device had 0, 1, 2... jobs, and whether a device
ever held two or more jobs while another sat idle (the placement memfitd avoids; seconds
below 1 are left out: a job ending and the next starting).

    demo_placement.py DEVICES.json JOBS.json
Prints "placement: spread ..." or "placement: PACKED ..." as its last line; exit 0 either
way (a demo reports, CTest demo_end_to_end decides).
"""
import datetime
import json
import sys


def when(ts):
    return datetime.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def main(devices_path, jobs_path):
    with open(devices_path) as f:
        devices = [d["name"] for d in json.load(f).get("devices", [])]
    with open(jobs_path) as f:
        jobs = json.load(f)
    runs = []  # (start, end, device, name)
    for j in reversed(jobs):
        if j.get("started_at") and j.get("finished_at") and j.get("device"):
            runs.append((when(j["started_at"]), when(j["finished_at"]), j["device"], j.get("name", j["id"])))
    if not runs or len(devices) < 2:
        print("placement: nothing to compare (fewer than two devices or no finished job)")
        return
    t0 = min(r[0] for r in runs)
    for s, e, d, n in runs:
        print(f"  {n:<28} {d:<8} {s - t0:7.1f} s -> {e - t0:7.1f} s")
    # Sweep the starts and ends: per interval, jobs per device.
    edges = sorted({r[0] for r in runs} | {r[1] for r in runs})
    packed_idle = 0.0
    shares = {}
    for a, b in zip(edges, edges[1:]):
        mid = (a + b) / 2
        count = {d: 0 for d in devices}
        for s, e, d, _ in runs:
            if s <= mid < e:
                count[d] = count.get(d, 0) + 1
        key = " + ".join(str(count[d]) for d in devices)
        shares[key] = shares.get(key, 0.0) + (b - a)
        if max(count.values()) >= 2 and min(count.values()) == 0:
            packed_idle += b - a
    print("  jobs per device (" + " + ".join(devices) + "): " +
          ", ".join(f"{k} for {v:.1f} s" for k, v in sorted(shares.items())))
    if packed_idle >= 1.0:
        print(f"placement: PACKED: a device held 2+ jobs while another was idle for {packed_idle:.1f} s")
    else:
        print("placement: spread: no device held two jobs while another was idle")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: demo_placement.py DEVICES.json JOBS.json")
    main(sys.argv[1], sys.argv[2])
