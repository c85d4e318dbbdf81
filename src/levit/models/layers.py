"""Building blocks of LeViT (training form: every Linear/Conv followed by a BatchNorm)."""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from .config import LeViTConfig

__all__ = [
    "MLP",
    "Attention",
    "BNLinear",
    "ConvBN",
    "DropPath",
    "LinearBN",
    "ShrinkAttention",
    "attention_bias_index",
    "grid_bias",
    "resample_bias_table",
]


class ConvBN(nn.Module):
    """Conv2d (no bias) followed by BatchNorm2d.

    ``norm="ln"`` (the paper's Table 5 ablation A3, no BatchNorm): a biased Conv2d, no normalisation
    (``bn`` is an identity), as the patch embedding of ViT/DeiT.
    """

    def __init__(
        self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 2, padding: int = 1, norm: str = "bn"
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, bias=norm != "bn")
        self.bn = nn.BatchNorm2d(out_ch) if norm == "bn" else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


class LinearBN(nn.Module):
    """Linear (no bias) followed by BatchNorm1d over batch x tokens.

    ``norm="ln"`` (ablation A3): a plain biased Linear (``bn`` is an identity; the LayerNorm sits
    before the block, pre-norm) and no zero-init.
    """

    def __init__(self, in_features: int, out_features: int, bn_weight_init: float = 1.0, norm: str = "bn") -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=norm != "bn")
        if norm != "bn":
            self.bn = nn.Identity()
            return
        self.bn = nn.BatchNorm1d(out_features)
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.linear(x)  # (B, N, C)
        return self.bn(x.flatten(0, 1)).view_as(x)


class BNLinear(nn.Module):
    """BatchNorm1d followed by Linear: the classifier head (trunc-normal init, std 0.02).

    ``norm="ln"`` (ablation A3): LayerNorm instead of the BatchNorm.
    """

    def __init__(self, in_features: int, out_features: int, norm: str = "bn") -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(in_features) if norm == "bn" else nn.LayerNorm(in_features)
        self.linear = nn.Linear(in_features, out_features)
        nn.init.trunc_normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.bn(x))


def _pair(r: int | tuple[int, int]) -> tuple[int, int]:
    return (r, r) if isinstance(r, int) else (int(r[0]), int(r[1]))


def attention_bias_index(
    resolution: int | tuple[int, int], stride: int = 1, device: torch.device | str | None = None
) -> Tensor:
    """Index into a (heads, h*w) bias table for every (query, key) pair.

    Queries sit on the grid subsampled by ``stride`` (positions 0, s, 2s, ...); keys on the full
    ``resolution`` grid (a side, or (h, w)). The bias between query (i, j) and key (k, l) is
    ``table[|s*i - k| * w + |s*j - l|]``: a function of the (dy, dx) offset only (paper, Section 4.2).
    Returns an int64 tensor of shape (N_q, N_k).
    """
    h, w = _pair(resolution)
    ky, kx = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    q = (torch.arange(0, h, stride, device=device), torch.arange(0, w, stride, device=device))
    qy, qx = torch.meshgrid(*q, indexing="ij")
    dy = (qy.reshape(-1, 1) - ky.reshape(1, -1)).abs()
    dx = (qx.reshape(-1, 1) - kx.reshape(1, -1)).abs()
    return dy * w + dx


def resample_bias_table(table: Tensor, src: int | tuple[int, int], dst: int | tuple[int, int]) -> Tensor:
    """Resample a (heads, h*w) relative-offset bias table from grid ``src`` to grid ``dst``.

    The table is a function of the (dy, dx) offsets, so it is interpolated as an (h, w) image:
    bicubically and separately in each axis, offsets 0..h-1 mapped onto 0..h'-1 (corners aligned,
    the same spacing as the token grid they index). Differentiable; returns ``table`` when the grids match.
    """
    (h, w), (h2, w2) = _pair(src), _pair(dst)
    if (h, w) == (h2, w2):
        return table
    heads = table.shape[0]
    grid = table.reshape(1, heads, h, w)
    out = F.interpolate(grid.float(), size=(h2, w2), mode="bicubic", align_corners=True)
    return out.reshape(heads, h2 * w2).to(table.dtype)


@torch.fx.wrap
def grid_bias(table: Tensor, idxs: Tensor, build: tuple[int, int], h: int, w: int, stride: int = 1) -> Tensor:
    """The (heads, N_q, N_k) attention bias for a (h, w) key grid.

    At the build grid this gathers the learned table with the precomputed index (exactly the
    model's numbers); at another grid the table is resampled (:func:`resample_bias_table`) and the
    index rebuilt on every call: nothing is cached, so it can never be stale after a weight update.
    A leaf for ``torch.fx`` (the grid comparison is Python control flow on the input's shape).
    """
    h, w = int(h), int(w)
    if (h, w) == tuple(build):
        return table[:, idxs]
    idx = attention_bias_index((h, w), stride, table.device)
    return resample_bias_table(table, build, (h, w))[:, idx]


def _add_bias_table(m: nn.Module, heads: int, resolution: tuple[int, int], stride: int, use_bias: bool) -> None:
    """The (heads, h*w) learned bias table and its index buffer; both ``None`` without (ablation A5)."""
    if not use_bias:
        m.register_parameter("attention_biases", None)
        m.register_buffer("attention_bias_idxs", None, persistent=False)
        return
    m.attention_biases = nn.Parameter(torch.zeros(heads, resolution[0] * resolution[1]))
    m.register_buffer("attention_bias_idxs", attention_bias_index(resolution, stride), persistent=False)


class DropPath(nn.Module):
    """Stochastic depth on a residual branch: a per-sample keep mask, rescaled, in training only."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Attention(nn.Module):
    """Multi-head self-attention with a learned per-head relative-position bias.

    Per head the qkv channels are laid out [q: D, k: D, v: attn_ratio*D]. The bias is gathered
    from ``attention_biases`` on every call: there is no cache that could go stale.

    Table 5 ablations: ``norm="ln"`` (A3) biased linears without BatchNorm, ``use_bias=False`` (A5)
    no attention bias (``attention_biases`` is ``None``), ``act=False`` (A7) no Hardswish before
    the projection.
    """

    def __init__(
        self,
        dim: int,
        key_dim: int,
        num_heads: int,
        attn_ratio: float,
        resolution: int | tuple[int, int],
        *,
        norm: str = "bn",
        use_bias: bool = True,
        act: bool = True,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.val_dim = int(attn_ratio * key_dim)
        self.resolution = _pair(resolution)  # build grid (h, w)
        self.scale = key_dim**-0.5
        self.qkv = LinearBN(dim, num_heads * (2 * key_dim + self.val_dim), norm=norm)
        self.act = nn.Hardswish() if act else nn.Identity()
        self.proj = LinearBN(num_heads * self.val_dim, dim, bn_weight_init=0.0, norm=norm)
        _add_bias_table(self, num_heads, self.resolution, 1, use_bias)

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None) -> Tensor:
        """(B, N, C) tokens on an (h, w) grid (default: the build grid) -> (B, N, C)."""
        B, N, _ = x.shape
        h, w = self.resolution if hw is None else hw
        qkv = self.qkv(x).view(B, N, self.num_heads, -1)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, N, d)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        if self.attention_biases is not None:  # None: no attention bias (ablation A5)
            attn = attn + grid_bias(self.attention_biases, self.attention_bias_idxs, self.resolution, h, w)
        x = attn.softmax(dim=-1) @ v  # (B, H, N, val_dim)
        x = x.transpose(1, 2).reshape(B, N, self.num_heads * self.val_dim)
        return self.proj(self.act(x))


class ShrinkAttention(nn.Module):
    """Attention that halves the token grid: queries from the stride-2 subsampled input.

    Heads H = C_in / D; kv per head [k: D, v: 4D]; output width C_out. Not residual.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        key_dim: int,
        num_heads: int,
        attn_ratio: float,
        resolution: int | tuple[int, int],
        *,
        norm: str = "bn",
        use_bias: bool = True,
        act: bool = True,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.val_dim = int(attn_ratio * key_dim)
        self.resolution = _pair(resolution)  # build input grid (h, w)
        self.resolution_out = LeViTConfig.subsampled_grid(self.resolution)
        self.scale = key_dim**-0.5
        self.kv = LinearBN(in_dim, num_heads * (key_dim + self.val_dim), norm=norm)
        self.q = LinearBN(in_dim, num_heads * key_dim, norm=norm)
        self.act = nn.Hardswish() if act else nn.Identity()
        self.proj = LinearBN(num_heads * self.val_dim, out_dim, norm=norm)
        _add_bias_table(self, num_heads, self.resolution, 2, use_bias)

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None) -> Tensor:
        """(B, h*w, C_in) tokens on an (h, w) grid (default: the build grid) -> (B, h'*w', C_out)."""
        B, N, C = x.shape
        h, w = self.resolution if hw is None else hw
        h2, w2 = LeViTConfig.subsampled_grid((h, w))
        k, v = self.kv(x).view(B, N, self.num_heads, -1).split([self.key_dim, self.val_dim], dim=3)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, H, N, d)
        xs = x.view(B, h, w, C)[:, ::2, ::2].reshape(B, h2 * w2, C)  # subsampled queries
        q = self.q(xs).view(B, h2 * w2, self.num_heads, self.key_dim).transpose(1, 2)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        if self.attention_biases is not None:  # None: no attention bias (ablation A5)
            attn = attn + grid_bias(self.attention_biases, self.attention_bias_idxs, self.resolution, h, w, 2)
        x = attn.softmax(dim=-1) @ v  # (B, H, N_q, val_dim)
        x = x.transpose(1, 2).reshape(B, h2 * w2, self.num_heads * self.val_dim)
        return self.proj(self.act(x))


class MLP(nn.Module):
    """LinearBN -> Hardswish -> LinearBN (the second BN starts at weight 0: residual branch)."""

    def __init__(self, dim: int, hidden: int, norm: str = "bn") -> None:
        super().__init__()
        self.fc1 = LinearBN(dim, hidden, norm=norm)
        self.act = nn.Hardswish()
        self.fc2 = LinearBN(hidden, dim, bn_weight_init=0.0, norm=norm)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))
