"""Shared test helpers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import levit
from levit.models.testing import randomize_weights as randomize
from levit.models.testing import sample_images


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / ||b||."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture
def tiny() -> nn.Module:
    torch.manual_seed(0)
    return randomize(levit.create_model("levit_tiny", img_size=64), seed=1).eval()


FULL_VARIANTS = ["levit_128s", "levit_128", "levit_192", "levit_256", "levit_384"]

# The tolerances of the numeric checks (relative L2 error on photo-like images); the planted-bug
# tests (test_planted_bugs.py) show that real bugs exceed them by orders of magnitude.
FUSE_TOL = 1e-4  # fused vs unfused, fp32
PARITY_TOL = 1e-5  # ours vs timm's LeViT, fp32


def photos(n: int = 2, size: int | tuple[int, int] = 224, seed: int = 0) -> torch.Tensor:
    """Photo-like test inputs (see levit.models.testing.sample_images), distinct from the calibration ones."""
    return sample_images(n, size, seed=1000 + seed)
