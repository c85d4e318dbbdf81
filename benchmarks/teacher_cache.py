"""The teacher cache's cost on CPU: a distilled epoch reading the cache against one running the teacher
and one without distillation, and what building the cache costs.

    python benchmarks/teacher_cache.py              # the bundled digits, 5 epochs, the digits recipe
    python benchmarks/teacher_cache.py --soft 3     # soft distillation from the teacher's top 3 logits

Student: the digits recipe's tiny LeViT at 32x32. Teacher: timm's ``regnety_016`` with random
weights (its forward costs several times the student's whole training step; its answers do not
matter for the timing). Reported: the median epoch time (training only, from ``metrics.jsonl``) of
each run (the undistilled and cached runs alternate over 3 rounds), the cache's build time, and
the ratios to the undistilled run; with ``--soft K`` (soft distillation, the top ``K`` logits kept)
also the cache's bytes per view and the largest difference of a step's loss from the live teacher's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch

from levit.data.digits import make_digits_folder
from levit.train.recipe import resolve_config
from levit.train.run import train
from levit.train.teacher_cache import ARRAYS, build_teacher_cache

ROUNDS = 3


def epoch_seconds(output: Path) -> float:
    """Median training time of an epoch of the run in ``output``."""
    lines = [json.loads(x) for x in (output / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["epoch_time_s"] for r in lines if r["event"] == "epoch")


def step_losses(output: Path) -> dict[int, float]:
    """Each optimizer step's loss in the run in ``output``."""
    lines = [json.loads(x) for x in (output / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if r["event"] == "step"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--soft", type=int, metavar="K", help="soft distillation from the teacher's top K logits")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_digits_folder(tmp / "digits")
        torch.save(timm.create_model("regnety_016", num_classes=10).state_dict(), tmp / "teacher.pth")
        common = dict(config="digits", data=str(data), epochs=5, progress=False)
        mode = "soft" if args.soft else "hard"
        teacher = dict(distillation=mode, teacher="regnety_016", teacher_checkpoint=str(tmp / "teacher.pth"))
        train(resolve_config(output=str(tmp / "live"), **common, **teacher))
        start = time.perf_counter()
        cfg = resolve_config(output=str(tmp / "x"), **common, **teacher)
        build_teacher_cache(cfg, tmp / "teacher.cache", topk=args.soft)
        built = time.perf_counter() - start
        times: dict[str, list[float]] = {"none": [], "cached": []}
        for r in range(ROUNDS):  # alternating, so a busy machine weighs on both alike
            train(resolve_config(output=str(tmp / f"none{r}"), **common))
            cache = str(tmp / "teacher.cache")
            train(resolve_config(output=str(tmp / f"cached{r}"), teacher_cache=cache, **common, **teacher))
            times["none"].append(epoch_seconds(tmp / f"none{r}"))
            times["cached"].append(epoch_seconds(tmp / f"cached{r}"))
        live = epoch_seconds(tmp / "live")
        none, cached = sum(times["none"]) / ROUNDS, sum(times["cached"]) / ROUNDS
        print(f"no distillation {none:.2f} s/epoch, cached teacher {cached:.2f}, live teacher {live:.2f}")
        print("cached / none per round: " + ", ".join(f"{c / n:.2f}" for c, n in zip(times["cached"], times["none"])))
        print(f"cached / none: {cached / none:.2f}; live / none: {live / none:.2f}")
        print(f"cache built in {built:.1f} s for 5 epochs of views ({built / 5:.2f} s each)")
        if args.soft:
            saved = torch.load(tmp / "teacher.cache", weights_only=True)
            views = saved["classes"].numel()
            per_view = sum(saved[k].nbytes for k in ARRAYS if k in saved) / views
            size = (tmp / "teacher.cache").stat().st_size
            live_losses, cached_losses = step_losses(tmp / "live"), step_losses(tmp / "cached0")
            worst = max(abs(live_losses[s] - cached_losses[s]) for s in live_losses)
            print(f"soft, top {args.soft}: {per_view:.0f} B per view ({size / views:.1f} B with the file's header)")
            print(f"largest step-loss difference from the live teacher: {worst:.2e}")


if __name__ == "__main__":
    main()
