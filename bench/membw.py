#!/usr/bin/env python3
"""The machine's memory read bandwidth, for the weight-read floor of a decode step.

    .venv/bin/python bench/membw.py [--mb 1024] [--threads 1,2] [--repeats 7]

torch's sum over a float32 buffer far larger than the last-level cache (vectorised, split over
OpenMP threads like the decode step's products): bytes / seconds, best of --repeats for each
thread count (the best run is the one least disturbed by other work on the machine); best_gb_s is
the best of them all. Prints one JSON line.
"""

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=int, default=1024)
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    buf = torch.ones(args.mb * 2**20 // 4, dtype=torch.float32)  # written once: every page resident
    nbytes = buf.numel() * 4
    per_threads = {}
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        buf.sum()
        seconds = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            buf.sum()
            seconds.append(time.perf_counter() - t)
        per_threads[threads] = {"best_gb_s": round(nbytes / min(seconds) / 1e9, 2),
                                "median_gb_s": round(nbytes / sorted(seconds)[len(seconds) // 2] / 1e9, 2)}
    print(json.dumps({"bench": "membw", "method": "torch.sum(float32)", "buffer_mb": args.mb, "repeats": args.repeats,
                      "best_gb_s": max(v["best_gb_s"] for v in per_threads.values()),
                      "threads": per_threads}))


if __name__ == "__main__":
    main()
