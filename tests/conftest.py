"""Shared test helpers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import levit
from levit.testing import randomize_weights as randomize


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / ||b||."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture
def tiny() -> nn.Module:
    torch.manual_seed(0)
    return randomize(levit.create_model("levit_tiny", img_size=64), seed=1).eval()


FULL_VARIANTS = ["levit_128s", "levit_128", "levit_192", "levit_256", "levit_384"]
