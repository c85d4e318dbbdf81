"""Helpers for checking LeViT numerics (tests, benchmarks' fidelity measurements)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["randomize_weights"]


@torch.no_grad()
def randomize_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine terms, and every zero-initialised
    attention-bias table and head bias random values, in place; returns ``model``.

    A freshly built LeViT is degenerate (unit BN statistics, zero biases, residual branches switched
    off by zero BN weights): fusion, conversion and reduced-precision checks would pass on it trivially.
    """
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
