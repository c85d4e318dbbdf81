"""Helpers for checking LeViT numerics (tests, benchmarks' fidelity measurements)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["randomize_weights"]


@torch.no_grad()
def randomize_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine terms, and every zero-initialised
    attention-bias table and head bias random values, in place; returns ``model``. The Table 5
    ablations' extra parameters (LayerNorms, biased linears and convs, position embedding) too.

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
        elif isinstance(m, nn.LayerNorm) and m.weight is not None:  # ablation A3
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    for name, p in model.named_parameters():
        if name.endswith("attention_biases"):
            p.copy_(torch.randn(p.shape, generator=g))
        elif name.endswith(("linear.bias", "conv.bias")):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        elif name == "pos_embed":  # ablation A5
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model
