"""LeViT as a detection backbone at torchvision's default resolution, timed against ResNet-50-FPN.

torchvision's detectors resize the short side of every image to 800 px (long side at most 1333),
so a 4:3 photo becomes 800x1067, padded to 800x1088: the first LeViT stage then attends over
50x68 = 3,400 tokens instead of 196, and attention is quadratic in that. This script measures what
that costs on the CPU, side by side in ONE process (interleaved rounds, medians), for

- the backbone alone (``levit.create_backbone(name)`` with its FPN, against torchvision's
  ResNet-50-FPN backbone) on the resized, padded batch, and
- the whole ``FasterRCNN`` inference (transform, backbone, RPN, RoI heads) on one photo-sized image.

Weights are random (nothing is downloaded); the timing does not depend on them beyond the RPN,
which keeps its fixed number of proposals either way.

    python benchmarks/detection.py                               # 2 threads, levit_128s and levit_256
    python benchmarks/detection.py --threads 1 --models levit_128s --rounds 3
    python benchmarks/detection.py --min-size 512 --max-size 853  # a smaller resize
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable

import torch
from torchvision.models.detection import FasterRCNN, fasterrcnn_resnet50_fpn

import levit
from levit.paper.timing import interleaved as timed_rounds


def interleaved(cands: dict[str, Callable[[], object]], rounds: int, window: float) -> dict[str, list[float]]:
    """{name: [seconds per call, one per round]}; every candidate runs at least once per round."""
    return timed_rounds(
        cands,
        rounds=rounds,
        window=window,
        warmup_calls=1,
        on_round=lambda r, n: print(f"round {r}/{n} done", file=sys.stderr, flush=True),
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="levit_128s,levit_256", help="comma-separated LeViT variants")
    ap.add_argument("--min-size", type=int, default=800, help="detector resize: short side (torchvision: 800)")
    ap.add_argument("--max-size", type=int, default=1333, help="detector resize: long side cap (torchvision: 1333)")
    ap.add_argument("--image", default="600x800", help="input photo size HxW before the detector's resize")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--window", type=float, default=2.0, help="seconds per candidate per round")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    h, w = (int(v) for v in args.image.lower().split("x"))
    image = torch.rand(3, h, w)
    size = {"min_size": args.min_size, "max_size": args.max_size}

    detectors: dict[str, torch.nn.Module] = {
        "resnet50-fpn": fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, **size).eval()
    }
    for name in filter(None, (m.strip() for m in args.models.split(","))):
        detectors[name + "-fpn"] = FasterRCNN(levit.create_backbone(name), num_classes=91, **size).eval()

    with torch.inference_mode():
        batch, _ = detectors["resnet50-fpn"].transform([image])  # the resized, padded batch the backbones see
        padded = batch.tensors
        for det in detectors.values():  # every backbone gets the same input; LeViT pads to 16 itself
            det.backbone(padded)
    n_tokens = (padded.shape[-2] // 16) * (padded.shape[-1] // 16)
    print(
        f"input {h}x{w} -> resized and padded to {padded.shape[-2]}x{padded.shape[-1]} "
        f"({n_tokens} tokens in LeViT's first stage); {args.threads} thread(s), {args.rounds} interleaved rounds",
        flush=True,
    )

    cands: dict[str, Callable[[], object]] = {}
    for name, det in detectors.items():

        def backbone(det: torch.nn.Module = det) -> object:
            with torch.inference_mode():
                return det.backbone(padded)

        def detector(det: torch.nn.Module = det) -> object:
            with torch.inference_mode():
                return det([image])

        cands[f"{name} backbone"] = backbone
        cands[f"{name} detector"] = detector
    secs = interleaved(cands, args.rounds, args.window)
    med = {k: statistics.median(v) for k, v in secs.items()}

    params = {n: sum(p.numel() for p in d.backbone.parameters()) for n, d in detectors.items()}
    print("\n| model | backbone params | backbone ms | vs ResNet-50-FPN | FasterRCNN ms | vs ResNet-50-FPN |")
    print("|---|---|---|---|---|---|")
    for name in detectors:
        b, d = med[f"{name} backbone"], med[f"{name} detector"]
        rb, rd = med["resnet50-fpn backbone"] / b, med["resnet50-fpn detector"] / d
        print(f"| {name} | {params[name] / 1e6:.1f}M | {b * 1e3:.0f} | {rb:.2f}x | {d * 1e3:.0f} | {rd:.2f}x |")
    print("(ratios above 1 mean faster than ResNet-50-FPN)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
