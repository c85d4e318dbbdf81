"""Training-step speed on CPU: levit's LeViT-128S vs timm's LeViT-128S in the same loop.

One step = forward (both heads, training mode) + cross-entropy + backward + AdamW update, batch 32 at
224x224, 2 intra-op threads. The two models are timed in alternating rounds (the order flips every round) so
that other load on the machine hits both alike; the ratio uses each model's fastest round (the least
disturbed one; the medians are printed too). ratio = timm time / levit time: > 1 means levit is faster.

    python benchmarks/train_step.py                 # batch 32, 2 threads, 12 rounds of 2 steps
    python benchmarks/train_step.py --rounds 4 --steps 3 --json result.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import timm
import torch
import torch.nn.functional as F

import levit


def make_step(model: torch.nn.Module, batch: int, img: int):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.025)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, img, img, generator=g)
    y = torch.randint(0, 1000, (batch,), generator=g)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = model(x)
        if isinstance(out, tuple):
            out = (out[0] + out[1]) / 2
        F.cross_entropy(out, y).backward()
        opt.step()

    return step


def timed(step, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=12, help="alternating timing rounds")
    p.add_argument("--steps", type=int, default=2, help="steps per model per round")
    p.add_argument("--json", help="also write the result to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours = levit.create_model("levit_128s", img_size=args.img_size)
    theirs = timm.create_model("levit_128s", img_size=args.img_size)  # the peer to beat (LevitDistilled)
    assert levit.count_params(ours) == sum(p.numel() for p in theirs.parameters())
    steps = {
        "levit": make_step(ours, args.batch_size, args.img_size),
        "timm": make_step(theirs, args.batch_size, args.img_size),
    }
    for s in steps.values():  # warm-up
        s()
        s()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(args.rounds):
        order = list(steps) if r % 2 == 0 else list(steps)[::-1]
        for k in order:
            times[k].append(timed(steps[k], args.steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    res = {
        "model": "levit_128s",
        "batch_size": args.batch_size,
        "threads": args.threads,
        "img_size": args.img_size,
        "levit_ms": best["levit"] * 1e3,
        "timm_ms": best["timm"] * 1e3,
        "levit_img_s": args.batch_size / best["levit"],
        "timm_img_s": args.batch_size / best["timm"],
        "ratio_timm_over_levit": best["timm"] / best["levit"],
        "levit_median_ms": med["levit"] * 1e3,
        "timm_median_ms": med["timm"] * 1e3,
        "ratio_of_medians": med["timm"] / med["levit"],
        "rounds_ms": {k: [round(t * 1e3, 1) for t in v] for k, v in times.items()},
        "torch": torch.__version__,
        "timm": timm.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
    print(
        f"LeViT-128S training step, batch {args.batch_size}, {args.threads} threads, {args.img_size}px: "
        f"levit {res['levit_ms']:.0f} ms ({res['levit_img_s']:.1f} img/s), timm {res['timm_ms']:.0f} ms "
        f"({res['timm_img_s']:.1f} img/s); levit is {res['ratio_timm_over_levit']:.2f}x timm's speed "
        f"(medians: levit {res['levit_median_ms']:.0f} ms, timm {res['timm_median_ms']:.0f} ms, "
        f"ratio {res['ratio_of_medians']:.2f})"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
