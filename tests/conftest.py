"""Shared test helpers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import levit


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial statistics and affine terms, every zero-initialised weight and bias
    table random values: a fresh LeViT would pass fusion and loading tests trivially."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    for name, p in model.named_parameters():
        if name.endswith("attention_biases"):
            p.copy_(torch.randn(p.shape, generator=g))
        elif name.endswith("linear.bias"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / ||b||."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture
def tiny() -> nn.Module:
    torch.manual_seed(0)
    return randomize(levit.create_model("levit_tiny", img_size=64), seed=1).eval()


FULL_VARIANTS = ["levit_128s", "levit_128", "levit_192", "levit_256", "levit_384"]
