"""The tests' shared helpers: randomised models, photo-like inputs, error measures and tolerances.

A freshly built LeViT is degenerate (unit BatchNorm statistics, zero attention biases, residual
branches switched off), so every numeric check runs on a model made to behave like a trained one
(:func:`levit.models.testing.randomize_weights`) and on photo-like images.
"""

from __future__ import annotations

import torch
from torch import nn

import levit
from levit.models.testing import randomize_weights, sample_images

FULL_VARIANTS = ["levit_128s", "levit_128", "levit_192", "levit_256", "levit_384"]

# The tolerances of the numeric checks (relative L2 error, :func:`rel_l2_error`, on photo-like
# images); the planted-bug tests (test_planted_bugs.py) show that real bugs exceed them by orders of magnitude.
FUSE_TOL = 1e-4  # fused vs unfused, fp32
PARITY_TOL = 1e-5  # ours vs timm's LeViT, fp32


def randomized_model(name: str = "levit_tiny", seed: int = 0, **kwargs: object) -> nn.Module:
    """``levit.create_model(name, **kwargs)`` with randomised, trained-like weights, in eval mode.
    Deterministic: the initial draws come from ``seed`` too, and the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return randomize_weights(levit.create_model(name, **kwargs), seed=seed).eval()


def tiny_model(seed: int = 0, img_size: int | tuple[int, int] = 64, **kwargs: object) -> nn.Module:
    """The tiny variant (64 px by default), randomised: the model of most fast tests."""
    return randomized_model("levit_tiny", seed, img_size=img_size, **kwargs)


def rel_l2_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error ||a - b||_2 / ||b||_2 over the whole tensor (in float64).

    (``levit.runtime.export`` judges exports by another measure, the largest absolute difference
    over the largest absolute value, ``max |a - b| / max |b|``.)"""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def photos(n: int = 2, size: int | tuple[int, int] = 224, seed: int = 0) -> torch.Tensor:
    """Photo-like test inputs (see levit.models.testing.sample_images), distinct from the calibration ones."""
    return sample_images(n, size, seed=1000 + seed)
