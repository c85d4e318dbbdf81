"""Synthetic photo-like images: inputs for checks that must run without the user's photos.

Every export is proven by running the written file on images (:func:`levit.runtime.export.prove`).
Those images should look to the network like what it will classify: spatially correlated and
normalised as the model's preprocessing normalises photos. White noise is not: it drives a trained
network's activations far outside their range, where fp32 rounding grows with them, and the check
would measure noise rather than the export.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..models.config import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["photo_like_images"]


def photo_like_images(
    n: int,
    img_size: int | tuple[int, int] = 224,
    *,
    seed: int = 0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Tensor:
    """``n`` synthetic photo-like images, shape (n, C, H, W) for an ``img_size`` side or (H, W), with
    C = ``len(mean)``: pixels in [0, 1] normalised by ``mean`` and ``std`` (a model's preprocessing).

    Each is a smooth colour field (three low-frequency waves) with four soft-edged colour blobs and
    one hard edge, plus a little sensor noise: spatially correlated like real photos (white noise is
    not), and different enough from one another that a working classifier tells them apart. The
    same ``seed`` gives the same images.
    """
    if len(mean) != len(std):
        raise ValueError(f"mean and std need one value per channel, got {len(mean)} and {len(std)}")
    channels = len(mean)
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> Tensor:
        return torch.rand(shape, generator=g)

    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    yy, xx = torch.linspace(0, 1, h).view(1, 1, -1, 1), torch.linspace(0, 1, w).view(1, 1, 1, -1)  # (n, k, H, W)
    fx, fy, phase = rand(n, 3, 1, 1) * 4, rand(n, 3, 1, 1) * 4, rand(n, 3, 1, 1) * 6.28
    waves = torch.sin(2 * math.pi * (fx * xx + fy * yy) + phase)  # (n, 3, H, W)
    img = torch.einsum("nkhw,nkc->nchw", waves, (rand(n, 3, channels) - 0.5) * 0.6)
    cx, cy, r = rand(n, 4, 1, 1), rand(n, 4, 1, 1), 0.03 + 0.15 * rand(n, 4, 1, 1)
    blobs = torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r**2))  # (n, 4, H, W)
    img += torch.einsum("nkhw,nkc->nchw", blobs, (rand(n, 4, channels) - 0.5) * 1.2)
    angle, offset = rand(n, 1, 1, 1) * 6.28, rand(n, 1, 1, 1)
    edge = ((torch.cos(angle) * (xx - offset) + torch.sin(angle) * (yy - 0.5)) > 0).float()  # (n, 1, H, W)
    img += edge * (rand(n, channels, 1, 1) - 0.5) * 0.8
    img = (0.45 + img + 0.02 * torch.randn(img.shape, generator=g)).clamp(0, 1)
    m = torch.tensor([float(v) for v in mean]).view(1, -1, 1, 1)
    s = torch.tensor([float(v) for v in std]).view(1, -1, 1, 1)
    return (img - m) / s
