"""Parameter and FLOP counts in the paper's convention (multiply-adds)."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

from .config import LeViTConfig

if TYPE_CHECKING:  # arithmetic on the config: no torch needed to count
    from torch import nn

__all__ = ["count_flops", "count_params", "flops_from_config", "params_from_config"]


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as BN running statistics are not counted)."""
    return sum(p.numel() for p in model.parameters())


def params_from_config(cfg: LeViTConfig) -> int:
    """Parameters of the unfused model described by ``cfg``, by arithmetic (no model is built):
    equal to ``count_params(LeViT(cfg))`` (tested for every variant)."""

    def linear_bn(a: int, b: int) -> int:  # weight (no bias) + BN weight and bias
        return a * b + 2 * b

    total = sum(9 * a * b + 2 * b for a, b in itertools.pairwise(cfg.stem_channels))  # ConvBN, no conv bias
    D = cfg.key_dim
    for s in range(cfg.num_stages):
        C, H = cfg.embed_dim[s], cfg.num_heads[s]
        n = cfg.grid_sizes[s][0] * cfg.grid_sizes[s][1]
        if s > 0:
            c_in, h = cfg.embed_dim[s - 1], cfg.shrink_heads[s - 1]
            n_in = cfg.grid_sizes[s - 1][0] * cfg.grid_sizes[s - 1][1]
            dv = int(cfg.down_attn_ratio * D)
            total += linear_bn(c_in, h * (D + dv)) + linear_bn(c_in, h * D) + linear_bn(h * dv, C)
            total += h * n_in  # bias table: one entry per offset on the input grid
            hidden = int(C * cfg.down_mlp_ratio)
            total += linear_bn(C, hidden) + linear_bn(hidden, C)
        dv = int(cfg.attn_ratio * D)
        hidden = int(C * cfg.mlp_ratio)
        block = linear_bn(C, H * (2 * D + dv)) + linear_bn(H * dv, C) + H * n
        block += linear_bn(C, hidden) + linear_bn(hidden, C)
        total += cfg.depth[s] * block
    nf, nc = cfg.num_features, cfg.num_classes
    if nc > 0:  # BN + Linear with bias, per head
        total += (2 if cfg.distillation else 1) * (2 * nf + nf * nc + nc)
    return total


def flops_from_config(cfg: LeViTConfig, fused: bool = False) -> int:
    """Multiply-adds of one image through the network described by ``cfg``.

    Convention (the authors'): a conv counts in*out*k*k*out_pixels, a linear layer in*out*tokens,
    each classifier head in*out, attention heads*(Nq*Nk*D + Nq*Nk + Nq*Nk*Dv); BatchNorm,
    activations, additions and pooling are free. A fused model has the two heads merged into one.
    """
    total = 0
    for (a, b), (h, w) in zip(itertools.pairwise(cfg.stem_channels), cfg.stem_resolutions):
        total += a * b * 9 * h * w  # 3x3, stride 2, padding 1

    def attn_core(heads: int, nq: int, nk: int, d: int, dv: int) -> int:
        return heads * (nq * nk * d + nq * nk + nq * nk * dv)

    D = cfg.key_dim
    for s in range(cfg.num_stages):
        C, H = cfg.embed_dim[s], cfg.num_heads[s]
        N = cfg.grid_sizes[s][0] * cfg.grid_sizes[s][1]
        if s > 0:
            c_in, h = cfg.embed_dim[s - 1], cfg.shrink_heads[s - 1]
            n_in, dv = cfg.grid_sizes[s - 1][0] * cfg.grid_sizes[s - 1][1], int(cfg.down_attn_ratio * D)
            total += c_in * h * (D + dv) * n_in  # kv
            total += c_in * h * D * N  # q on the subsampled grid
            total += attn_core(h, N, n_in, D, dv)
            total += h * dv * C * N  # proj
            hidden = int(C * cfg.down_mlp_ratio)
            total += 2 * C * hidden * N
        dv = int(cfg.attn_ratio * D)
        for _ in range(cfg.depth[s]):
            total += C * H * (2 * D + dv) * N  # qkv
            total += attn_core(H, N, N, D, dv)
            total += H * dv * C * N  # proj
            total += 2 * C * int(C * cfg.mlp_ratio) * N  # MLP
    heads = 2 if (cfg.distillation and not fused) else 1
    total += heads * cfg.num_features * cfg.num_classes
    return total


def count_flops(model_or_name: nn.Module | str | LeViTConfig) -> int:
    """FLOPs (multiply-adds, paper convention) of a model, a registered name or a config."""
    if isinstance(model_or_name, LeViTConfig):
        return flops_from_config(model_or_name)
    if isinstance(model_or_name, str):
        from .registry import get_config

        return flops_from_config(get_config(model_or_name))
    cfg = getattr(model_or_name, "config", None)
    if not isinstance(cfg, LeViTConfig):
        raise TypeError(f"count_flops needs a LeViT model, name or config, got {type(model_or_name).__name__}")
    fused = getattr(model_or_name, "is_fused", False)
    return flops_from_config(cfg, fused=fused)
