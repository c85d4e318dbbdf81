"""Building blocks of LeViT (training form: every Linear/Conv followed by a BatchNorm)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "MLP",
    "Attention",
    "BNLinear",
    "ConvBN",
    "DropPath",
    "LinearBN",
    "ShrinkAttention",
    "attention_bias_index",
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


def attention_bias_index(resolution: int, stride: int = 1) -> Tensor:
    """Index into a (heads, r*r) bias table for every (query, key) pair.

    Queries sit on the grid subsampled by ``stride`` (positions 0, s, 2s, ...); keys on the full
    ``resolution`` grid. The bias between query (i, j) and key (k, l) is
    ``table[|s*i - k| * r + |s*j - l|]``. Returns an int64 tensor of shape (N_q, N_k).
    """
    k = torch.arange(resolution)
    q = torch.arange(0, resolution, stride)
    ky, kx = torch.meshgrid(k, k, indexing="ij")
    qy, qx = torch.meshgrid(q, q, indexing="ij")
    dy = (qy.reshape(-1, 1) - ky.reshape(1, -1)).abs()
    dx = (qx.reshape(-1, 1) - kx.reshape(1, -1)).abs()
    return dy * resolution + dx


def _add_bias_table(m: nn.Module, heads: int, resolution: int, stride: int, use_bias: bool) -> None:
    """The (heads, r*r) learned bias table and its index buffer; both ``None`` without (ablation A5)."""
    if not use_bias:
        m.register_parameter("attention_biases", None)
        m.register_buffer("attention_bias_idxs", None, persistent=False)
        return
    m.attention_biases = nn.Parameter(torch.zeros(heads, resolution * resolution))
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
        resolution: int,
        *,
        norm: str = "bn",
        use_bias: bool = True,
        act: bool = True,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.val_dim = int(attn_ratio * key_dim)
        self.resolution = resolution
        self.scale = key_dim**-0.5
        self.qkv = LinearBN(dim, num_heads * (2 * key_dim + self.val_dim), norm=norm)
        self.act = nn.Hardswish() if act else nn.Identity()
        self.proj = LinearBN(num_heads * self.val_dim, dim, bn_weight_init=0.0, norm=norm)
        _add_bias_table(self, num_heads, resolution, 1, use_bias)

    def forward(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).view(B, N, self.num_heads, -1)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, N, d)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        if self.attention_biases is not None:
            attn = attn + self.attention_biases[:, self.attention_bias_idxs]
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
        resolution: int,
        *,
        norm: str = "bn",
        use_bias: bool = True,
        act: bool = True,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.val_dim = int(attn_ratio * key_dim)
        self.resolution = resolution
        self.resolution_out = (resolution - 1) // 2 + 1
        self.scale = key_dim**-0.5
        self.kv = LinearBN(in_dim, num_heads * (key_dim + self.val_dim), norm=norm)
        self.q = LinearBN(in_dim, num_heads * key_dim, norm=norm)
        self.act = nn.Hardswish() if act else nn.Identity()
        self.proj = LinearBN(num_heads * self.val_dim, out_dim, norm=norm)
        _add_bias_table(self, num_heads, resolution, 2, use_bias)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        r, r2 = self.resolution, self.resolution_out
        k, v = self.kv(x).view(B, N, self.num_heads, -1).split([self.key_dim, self.val_dim], dim=3)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, H, N, d)
        xs = x.view(B, r, r, C)[:, ::2, ::2].reshape(B, r2 * r2, C)  # subsampled queries
        q = self.q(xs).view(B, r2 * r2, self.num_heads, self.key_dim).transpose(1, 2)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        if self.attention_biases is not None:
            attn = attn + self.attention_biases[:, self.attention_bias_idxs]
        x = attn.softmax(dim=-1) @ v  # (B, H, N_q, val_dim)
        x = x.transpose(1, 2).reshape(B, r2 * r2, self.num_heads * self.val_dim)
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
