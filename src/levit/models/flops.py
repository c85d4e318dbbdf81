"""Parameter and FLOP counts in the paper's convention (multiply-adds)."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

from .config import PATCH_SIZE, LeViTConfig

if TYPE_CHECKING:  # arithmetic on the config: no torch needed to count
    from torch import nn

__all__ = ["attention_bytes", "count_flops", "count_params", "flops_from_config", "params_from_config"]


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as BN running statistics are not counted)."""
    return sum(p.numel() for p in model.parameters())


def params_from_config(cfg: LeViTConfig) -> int:
    """Parameters of the unfused model described by ``cfg``, by arithmetic (no model is built):
    equal to ``count_params(LeViT(cfg))`` (tested for every variant and every Table 5 ablation)."""
    ln = cfg.norm == "ln"  # ablation A3: biased linears/convs without BatchNorm, pre-norm LayerNorms

    def linear_bn(a: int, b: int) -> int:  # weight (no bias) + BN weight and bias; A3: weight + bias
        return a * b + (b if ln else 2 * b)

    k = PATCH_SIZE * PATCH_SIZE if cfg.stem == "linear16" else 3 * 3  # A2: one 16x16 convolution
    total = sum(k * a * b + (b if ln else 2 * b) for a, b in itertools.pairwise(cfg.stem_channels))
    if cfg.pos == "embed":  # A5: one position embedding per token of the first grid
        total += cfg.grid_sizes[0][0] * cfg.grid_sizes[0][1] * cfg.embed_dim[0]
    tables = cfg.pos == "bias"
    D, Ds = cfg.key_dim, cfg.shrink_key_dim
    for s in range(cfg.num_stages):
        C, H = cfg.embed_dim[s], cfg.num_heads[s]
        n = cfg.grid_sizes[s][0] * cfg.grid_sizes[s][1]
        if s > 0:
            c_in, h = cfg.embed_dim[s - 1], cfg.shrink_heads[s - 1]
            n_in = cfg.grid_sizes[s - 1][0] * cfg.grid_sizes[s - 1][1]
            dv = int(cfg.down_attn_ratio * Ds)
            total += linear_bn(c_in, h * (Ds + dv)) + linear_bn(c_in, h * Ds) + linear_bn(h * dv, C)
            total += h * n_in if tables else 0  # bias table: one entry per offset on the input grid
            hidden = int(C * cfg.down_mlp_ratio)
            total += linear_bn(C, hidden) + linear_bn(hidden, C)
            total += 2 * (c_in + C) if ln else 0  # the two LayerNorms
        dv = int(cfg.attn_ratio * D)
        hidden = int(C * cfg.mlp_ratio)
        block = linear_bn(C, H * (2 * D + dv)) + linear_bn(H * dv, C) + (H * n if tables else 0)
        block += linear_bn(C, hidden) + linear_bn(hidden, C)
        block += 4 * C if ln else 0
        total += cfg.depth[s] * block
    nf, nc = cfg.num_features, cfg.num_classes
    if nc > 0:  # BN (A3: LayerNorm, as many) + Linear with bias, per head
        total += (2 if cfg.distillation else 1) * (2 * nf + nf * nc + nc)
    return total


def flops_from_config(cfg: LeViTConfig, fused: bool = False) -> int:
    """Multiply-adds of one image through the network described by ``cfg``.

    Convention (the authors'): a conv counts in*out*k*k*out_pixels, a linear layer in*out*tokens,
    each classifier head in*out, attention heads*(Nq*Nk*D + Nq*Nk + Nq*Nk*Dv); BatchNorm,
    activations, additions and pooling are free. A fused model has the two heads merged into one.

    The Table 5 ablations count the same way: A2's 16x16 stem conv as in*out*256*tokens, A3's
    LayerNorms and biases and A5's position embedding are free (like BatchNorm and additions).
    """
    total = 0
    k = PATCH_SIZE * PATCH_SIZE if cfg.stem == "linear16" else 3 * 3  # A2: one 16x16 stride-16 conv; else 3x3 stride 2
    for (a, b), (h, w) in zip(itertools.pairwise(cfg.stem_channels), cfg.stem_resolutions):
        total += a * b * k * h * w

    def attn_core(heads: int, nq: int, nk: int, d: int, dv: int) -> int:
        return heads * (nq * nk * d + nq * nk + nq * nk * dv)

    D = cfg.key_dim
    for s in range(cfg.num_stages):
        C, H = cfg.embed_dim[s], cfg.num_heads[s]
        N = cfg.grid_sizes[s][0] * cfg.grid_sizes[s][1]
        if s > 0:
            c_in, h = cfg.embed_dim[s - 1], cfg.shrink_heads[s - 1]
            Ds = cfg.shrink_key_dim
            n_in, dv = cfg.grid_sizes[s - 1][0] * cfg.grid_sizes[s - 1][1], int(cfg.down_attn_ratio * Ds)
            total += c_in * h * (Ds + dv) * n_in  # kv
            total += c_in * h * Ds * N  # q on the subsampled grid
            total += attn_core(h, N, n_in, Ds, dv)
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
        from .config import get_config

        return flops_from_config(get_config(model_or_name))
    cfg = getattr(model_or_name, "config", None)
    if not isinstance(cfg, LeViTConfig):
        raise TypeError(f"count_flops needs a LeViT model, name or config, got {type(model_or_name).__name__}")
    fused = getattr(model_or_name, "is_fused", False)
    return flops_from_config(cfg, fused=fused)


def attention_bytes(cfg: LeViTConfig, batch: int = 1, bytes_per_value: int = 4) -> int:
    """Memory of the model's largest attention map for ``batch`` images of ``cfg``'s size, by arithmetic.

    Attention maps are (heads, queries, keys) per image and grow with the square of the token count
    (196 tokens at 224x224, 65,536 at 4096x4096). The estimate counts the bias gathered over the grid
    once, and the scores, their softmax and one temporary per image: the peak of the unfused and
    fused forward passes alike, within a small factor. For refusing an input size before anything
    is allocated; the model's other activations are far smaller."""
    worst = 0
    for s in range(cfg.num_stages):
        n = cfg.grid_sizes[s][0] * cfg.grid_sizes[s][1]
        worst = max(worst, cfg.num_heads[s] * n * n)
        if s > 0:  # the shrink attention: queries on this stage's grid, keys on the previous one
            n_in = cfg.grid_sizes[s - 1][0] * cfg.grid_sizes[s - 1][1]
            worst = max(worst, cfg.shrink_heads[s - 1] * n * n_in)
    return worst * bytes_per_value * (1 + 3 * batch)
