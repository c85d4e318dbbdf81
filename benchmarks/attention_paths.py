"""The fused model's two eager attention paths side by side on CPU, in ONE process.

``per_image`` (one batched GEMM over the heads per image, in place) against the two batched forms,
``matmul`` (two batched matmuls over all images and heads) and ``sdpa`` (one
``scaled_dot_product_attention``, the bias as an additive mask), with oneDNN's fused linear/conv
kernels on and off, for LeViT-128S at the given batches and thread counts.
Interleaved rounds (each round runs every candidate for one window), medians; the ratios feed the
defaults in ``src/levit/models/kernels.py`` (``PER_IMAGE_MAX_THREADS``, ``ONEDNN_MIN_BATCH``); each
candidate is forced with ``levit.models.kernels.forced``.

    python benchmarks/attention_paths.py                          # batch 16 and 1, 1 and 2 threads
    python benchmarks/attention_paths.py --batches 16 --threads 1 --rounds 9
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

import levit
from levit.models import kernels
from levit.paper.timing import interleaved

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' helpers (test support)
from helpers import randomize_weights


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="levit_128s")
    ap.add_argument("--batches", default="16,1")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--window", type=float, default=0.5, help="seconds per candidate per round")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--only", default="", help="comma-separated candidate names to keep (default: all six)")
    args = ap.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    fused = levit.fuse(randomize_weights(levit.create_model(args.model), seed=0).eval()).to(dtype)
    cands = {  # name -> (attention path, oneDNN fused kernels)
        "per_image + oneDNN": ("per_image", True),
        "matmul + oneDNN": ("matmul", True),
        "sdpa + oneDNN": ("sdpa", True),
        "per_image, plain linear": ("per_image", False),
        "matmul, plain linear": ("matmul", False),
        "sdpa, plain linear": ("sdpa", False),
    }

    keep = [c.strip() for c in args.only.split(",") if c.strip()]
    cands = {k: v for k, v in cands.items() if not keep or k in keep}

    def run(path: str, onednn: bool | None, x: torch.Tensor) -> None:
        with kernels.forced(attention_path=path, onednn=onednn), torch.inference_mode():
            fused(x)

    for th in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(th)
        for b in [int(t) for t in args.batches.split(",")]:
            x = torch.randn(b, 3, 224, 224).to(dtype)
            calls = {name: (lambda p=p, o=o, x=x: run(p, o, x)) for name, (p, o) in cands.items()}
            secs = interleaved(calls, rounds=args.rounds, window=args.window, warmup_calls=1)
            speeds = {k: [b / t for t in v] for k, v in secs.items()}
            med = {k: statistics.median(v) for k, v in speeds.items()}
            base = next(iter(med.values()))
            print(f"{args.model} {args.dtype}, batch {b}, {th} thread(s), {args.rounds} interleaved rounds:")
            for k, v in med.items():
                print(
                    f"  {k:<26} {v:8.1f} img/s  {v / base:5.2f}x  (min {min(speeds[k]):.1f}, max {max(speeds[k]):.1f})"
                )
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
