#!/usr/bin/env python3
"""Device memory bandwidth for the decode floor: the best of --repeats device-to-device copies.

    python3 bench/gpubw.py [--device cuda] [--mb 2048] [--repeats 20] [--threads N]

dst.copy_(src) over two --mb buffers (uint8; 2 GiB is ~35x an H200's L2, so the copy runs from
HBM), after 3 untimed copies; each copy timed alone with CUDA events (perf_counter around a
synchronised copy on the CPU). GB/s counts the bytes read plus the bytes written (2 x the buffer),
i.e. the memory traffic per second, the figure a decode step that reads its weights once is bound
by. Prints one JSON line: best and median GB/s.
"""

import argparse
import json
import statistics
import sys
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--mb", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    n = args.mb << 20
    src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    times = []
    for i in range(3 + args.repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t = time.perf_counter()
            dst.copy_(src)
            seconds = time.perf_counter() - t
        if i >= 3:
            times.append(seconds)
    assert torch.equal(dst[:4096], src[:4096])
    rate = [2 * n / s / 1e9 for s in times]
    print(json.dumps({"bench": "gpubw", "event": "bandwidth", "device": str(device),
                      "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
                      "torch": torch.__version__, "mb": args.mb, "repeats": args.repeats,
                      "counts": "read + written bytes", "best_gb_s": round(max(rate), 1),
                      "median_gb_s": round(statistics.median(rate), 1),
                      "threads": torch.get_num_threads()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
