"""Parameter and FLOP counts in the paper's convention (multiply-adds)."""

from __future__ import annotations

import itertools

from torch import nn

from .config import LeViTConfig

__all__ = ["count_flops", "count_params", "flops_from_config"]


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as BN running statistics are not counted)."""
    return sum(p.numel() for p in model.parameters())


def flops_from_config(cfg: LeViTConfig, fused: bool = False) -> int:
    """Multiply-adds of one image through the network described by ``cfg``.

    Convention (the authors'): a conv counts in*out*k*k*out_pixels, a linear layer in*out*tokens,
    each classifier head in*out, attention heads*(Nq*Nk*D + Nq*Nk + Nq*Nk*Dv); BatchNorm,
    activations, additions and pooling are free. A fused model has the two heads merged into one.

    The Table 5 ablations count the same way: A2's 16x16 stem conv as in*out*256*tokens, A3's
    LayerNorms and biases and A5's position embedding are free (like BatchNorm and additions).
    """
    total = 0
    res = cfg.img_size
    if cfg.stem == "linear16":
        total += cfg.in_chans * cfg.embed_dim[0] * 16 * 16 * cfg.resolutions[0] ** 2
    else:
        chans = [cfg.in_chans, cfg.embed_dim[0] // 8, cfg.embed_dim[0] // 4, cfg.embed_dim[0] // 2, cfg.embed_dim[0]]
        for a, b in itertools.pairwise(chans):
            res = (res - 1) // 2 + 1  # 3x3, stride 2, padding 1
            total += a * b * 9 * res * res

    def attn_core(heads: int, nq: int, nk: int, d: int, dv: int) -> int:
        return heads * (nq * nk * d + nq * nk + nq * nk * dv)

    D = cfg.key_dim
    for s in range(cfg.num_stages):
        C, r, H = cfg.embed_dim[s], cfg.resolutions[s], cfg.num_heads[s]
        N = r * r
        if s > 0:
            c_in, r_in, h = cfg.embed_dim[s - 1], cfg.resolutions[s - 1], cfg.shrink_heads[s - 1]
            Ds = cfg.shrink_key_dim
            n_in, dv = r_in * r_in, int(cfg.down_attn_ratio * Ds)
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
        from .registry import get_config

        return flops_from_config(get_config(model_or_name))
    cfg = getattr(model_or_name, "config", None)
    if not isinstance(cfg, LeViTConfig):
        raise TypeError(f"count_flops needs a LeViT model, name or config, got {type(model_or_name).__name__}")
    fused = getattr(model_or_name, "is_fused", False)
    return flops_from_config(cfg, fused=fused)
