"""The cost of building `levit serve`'s and `levit predict`'s model lanes: `deploy_lanes` (the model
converted once, a compiled model per lane) against one `deploy()` per lane (each converting again:
what deploy_lanes did before), on a fused LeViT with random weights, one thread per lane.

    python benchmarks/deploy_lanes.py                         # LeViT-128S, 2 lanes, OpenVINO
    python benchmarks/deploy_lanes.py --lanes 4 --backend onnxruntime

The two are timed in turns, --repeats times each, after one deploy() that takes the imports and the
runtime's first-use costs out of the timings; the median is reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch

import levit
from levit.runtime.deploy import deploy, deploy_lanes


def main() -> None:
    """Parse the flags, time both ways, print one line each."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="levit_128s")
    p.add_argument("--backend", default="openvino")
    p.add_argument("--lanes", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16, help="the lanes' compiled batch (levit serve's default)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    model = levit.fuse(levit.create_model(args.model).eval())
    kw = {"backend": args.backend, "batch_size": args.batch_size, "threads": 1}
    warnings.simplefilter("ignore")  # a DeployWarning (e.g. no bf16) says nothing about the timing
    deploy(model, **kw)
    per_lane, once = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        [deploy(model, **kw) for _ in range(args.lanes)]
        per_lane.append(time.perf_counter() - t)
        t = time.perf_counter()
        deploy_lanes(model, args.lanes, **kw)
        once.append(time.perf_counter() - t)
    where = f"{args.model}, {args.backend}, {args.lanes} lanes, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
    for name, times in (("one deploy() per lane", per_lane), ("deploy_lanes", once)):
        runs = ", ".join(f"{x:.1f}" for x in times)
        print(f"{name} ({where}): median {statistics.median(times):.1f} s (runs {runs})")


if __name__ == "__main__":
    main()
