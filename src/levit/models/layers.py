"""Building blocks of LeViT, each in two forms.

The training form: every Linear/Conv followed by a BatchNorm, attention biases as learned tables.
Each layer with a BatchNorm or an attention bias also knows its inference form, ``layer.fused()``: a
NEW module equal to the layer in eval mode (BatchNorms folded into the weights in float64, the q
scale folded into the q rows, the bias table gathered into a (heads, N_q, N_k) matrix), on the
layer's device and in its dtype; the layer itself is left untouched. :func:`levit.fuse` walks a
network and swaps each layer for its form, like timm's ``reparameterize_model`` and the official
``replace_batchnorm``. Layers without a BatchNorm or bias (Hardswish, the pre-norm LayerNorm of
Table 5's A3) have no second form and stay as they are.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .config import PATCH_SIZE, LeViTConfig

__all__ = [
    "MLP",
    "Attention",
    "AttentionSwitches",
    "BNLinear",
    "ConvBN",
    "DropPath",
    "FusedAttention",
    "FusedMLP",
    "FusedShrinkAttention",
    "FusedStem",
    "LinearBN",
    "ShrinkAttention",
    "Stem",
    "attention_bias_index",
    "gather_bias",
    "grid_bias",
    "merge_heads",
    "resample_bias_table",
]


# ---- folding (float64) ---------------------------------------------------------------------------
def _affine_of(norm: nn.Module, n: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """(scale, shift) in float64 of a BatchNorm in eval mode, or of an identity."""
    if isinstance(norm, nn.Identity):
        one = torch.ones(n, dtype=torch.float64, device=like.device)
        return one, torch.zeros_like(one)
    w = norm.weight if norm.weight is not None else torch.ones_like(norm.running_mean)
    b = norm.bias if norm.bias is not None else torch.zeros_like(norm.running_mean)
    scale = w.double() / torch.sqrt(norm.running_var.double() + norm.eps)
    return scale, b.double() - norm.running_mean.double() * scale


def _fold_after(layer: nn.Linear | nn.Conv2d, norm: nn.Module) -> tuple[Tensor, Tensor]:
    """(weight, bias) in float64 of ``norm(layer(x))`` as one layer: y = s * (W x + b) + t."""
    w = layer.weight.double()
    scale, shift = _affine_of(norm, w.shape[0], w)
    bias = shift if layer.bias is None else shift + scale * layer.bias.double()
    return w * scale.view(-1, *([1] * (w.ndim - 1))), bias


def _load(dst: nn.Linear | nn.Conv2d, w: Tensor, b: Tensor) -> nn.Module:
    """Copy float64 (weight, bias) into ``dst`` (already on the right device and dtype)."""
    with torch.no_grad():
        dst.weight.copy_(w.to(dst.weight.dtype))
        dst.bias.copy_(b.to(dst.bias.dtype))
    return dst


def _like(module: nn.Module, ref: Tensor) -> nn.Module:
    """``module`` moved to ``ref``'s device and dtype."""
    return module.to(device=ref.device, dtype=ref.dtype)


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

    def fused(self) -> nn.Conv2d:
        """Inference form: one biased Conv2d (the BatchNorm folded in)."""
        c = self.conv
        out = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding)
        return _load(_like(out, c.weight), *_fold_after(c, self.bn))


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

    def folded(self) -> tuple[Tensor, Tensor]:
        """(weight, bias) in float64 of the equivalent biased Linear."""
        return _fold_after(self.linear, self.bn)

    def fused(self) -> nn.Linear:
        """Inference form: one biased Linear (the BatchNorm folded in)."""
        out = nn.Linear(self.linear.in_features, self.linear.out_features)
        return _load(_like(out, self.linear.weight), *self.folded())


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

    def folded(self) -> tuple[Tensor, Tensor]:
        """(weight, bias) in float64 of the Linear with the norm's affine part folded in: the whole
        head for a BatchNorm (y = W (s x + t) + c); for a LayerNorm (ablation A3), what follows its
        normalisation (y = W (g n + beta) + c, n = the normalised tokens)."""
        w, c = self.linear.weight.double(), self.linear.bias.double()
        if isinstance(self.bn, nn.LayerNorm):
            ln = self.bn
            g = ln.weight.double() if ln.weight is not None else torch.ones(w.shape[1], dtype=w.dtype, device=w.device)
            beta = ln.bias.double() if ln.bias is not None else torch.zeros_like(g)
            return w * g.view(1, -1), c + w @ beta
        scale, shift = _affine_of(self.bn, w.shape[1], w)
        return w * scale.view(1, -1), c + w @ shift

    def fused(self) -> nn.Module:
        """Inference form: one biased Linear; with a LayerNorm (ablation A3), which normalises each
        image by its own statistics, a LayerNorm without affine parameters followed by the Linear."""
        return self._form(*self.folded())

    def _form(self, w: Tensor, b: Tensor) -> nn.Module:
        lin = _load(_like(nn.Linear(w.shape[1], w.shape[0]), self.linear.weight), w, b)
        if not isinstance(self.bn, nn.LayerNorm):
            return lin
        out = copy.deepcopy(self)
        out.bn = _like(nn.LayerNorm(w.shape[1], eps=self.bn.eps, elementwise_affine=False), self.linear.weight)
        out.linear = lin
        return out


def merge_heads(heads: Sequence[nn.Module]) -> nn.Module:
    """One classifier equal to the average of ``heads`` (the distilled model's ``head`` and
    ``head_dist``, :class:`BNLinear` each) in inference form, averaged in float64. Identities (a
    model without classes) merge into an identity."""
    if all(isinstance(h, nn.Identity) for h in heads):
        return nn.Identity()
    folded = [h.folded() for h in heads]
    w = sum(f[0] for f in folded) / len(folded)
    b = sum(f[1] for f in folded) / len(folded)
    return heads[0]._form(w, b)


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


def gather_bias(table: Tensor, index: Tensor) -> Tensor:
    """``table[:, index]``: the (heads, N_q, N_k) bias of every (query, key) pair from a (heads, h*w)
    table; the one place the trained form gathers it (every call: nothing cached, nothing stale).
    Advanced indexing, whose backward (an ``index_put`` with accumulation) is deterministic on a GPU
    too. ``index_select`` gives the same values, but its backward accumulates with atomics on a GPU;
    which one a GPU training step prefers is what ``benchmarks/gpu.py``'s ``train`` section measures
    (both, and timm's LeViT, in the same rounds)."""
    return table[:, index]


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
def grid_bias(
    bias: Tensor, build: tuple[int, int], h: int, w: int, stride: int = 1, index: Tensor | None = None
) -> Tensor:
    """The (heads, N_q, N_k) attention bias for an (h, w) key grid, from either form's bias: the
    learned (heads, h*w) table of the trained form (with its ``index``, :func:`attention_bias_index`),
    or the gathered (heads, N_q, N_k) matrix of the inference form.

    At the build grid this is the model's own bias (the table gathered, or the matrix itself). At
    another grid the table (a matrix's first row: query (0, 0) sees every offset) is resampled
    (:func:`resample_bias_table`) and gathered with an index built for that grid. Computed on every
    call: nothing is cached, so nothing can be stale after a weight update, a move or an in-place
    edit. A leaf for ``torch.fx`` (the grid comparison is Python control flow on the input's shape).
    """
    h, w = int(h), int(w)
    table = bias if bias.ndim == 2 else bias[:, 0, :]
    if (h, w) == tuple(build):
        if bias.ndim == 3:
            return bias
        return gather_bias(table, attention_bias_index(build, stride, bias.device) if index is None else index)
    return gather_bias(resample_bias_table(table, build, (h, w)), attention_bias_index((h, w), stride, bias.device))


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

    def fused(self) -> DropPath:
        """Inference form: no stochastic depth, whatever the mode."""
        return DropPath(0.0)


@dataclass(frozen=True)
class AttentionSwitches:
    """The paper's Table 5 switches of an attention layer, all on in LeViT itself: ``norm="ln"`` (A3)
    biased linears without BatchNorm, ``use_bias=False`` (A5) no attention bias (``attention_biases``
    is ``None``), ``act=False`` (A7) no Hardswish before the projection."""

    norm: str = "bn"
    use_bias: bool = True
    act: bool = True


class _AttentionGrid(nn.Module):
    """What every attention layer shares, in both forms: the head geometry, the key grid its bias was
    built for (``resolution``; the query grid ``resolution_out`` when queries are subsampled), and the
    one attention call (:func:`levit.models.kernels.attention`) with the bias for the input's grid."""

    stride = 1  # queries on every ``stride``-th row and column of the key grid (2: shrink attention)

    def __init__(self, key_dim: int, num_heads: int, val_dim: int, resolution: int | tuple[int, int]) -> None:
        super().__init__()
        self.num_heads, self.key_dim, self.val_dim = num_heads, key_dim, val_dim
        self.resolution = _pair(resolution)  # build grid (h, w) of the keys
        self.resolution_out = LeViTConfig.subsampled_grid(self.resolution) if self.stride == 2 else self.resolution

    def bias_for(self, h: int, w: int) -> Tensor | None:
        """The (heads, N_q, N_k) bias for an (h, w) key grid (``None``: no attention bias, ablation A5)."""
        raise NotImplementedError

    def attend(self, q: Tensor, k: Tensor, v: Tensor, hw: tuple[int, int], act: bool, scale: float) -> Tensor:
        """(B, N_q, H*Dv) attention of (B, N, H, d) views on the (h, w) key grid ``hw``."""
        return kernels.attention(q, k, v, self.bias_for(*hw), act, scale)

    def queries(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        """The tokens the queries are made from: (B, h*w, C) -> (B, h'*w', C), the input itself or its
        even rows and columns (stride 2)."""
        if self.stride == 1:
            return x
        (h, w), (h2, w2) = hw, LeViTConfig.subsampled_grid(hw)
        return x.view(x.shape[0], h, w, -1)[:, ::2, ::2].reshape(x.shape[0], h2 * w2, -1)


class _TrainedAttention(_AttentionGrid):
    """The trained form's share: the scale, the activation before the projection and the learned
    (heads, h*w) bias table, gathered on every call (no cache that could go stale); ``switches``: the
    Table 5 ablations (:class:`AttentionSwitches`)."""

    def __init__(
        self,
        key_dim: int,
        num_heads: int,
        attn_ratio: float,
        resolution: int | tuple[int, int],
        switches: AttentionSwitches,
    ) -> None:
        super().__init__(key_dim, num_heads, int(attn_ratio * key_dim), resolution)
        self.scale = key_dim**-0.5
        self.act = nn.Hardswish() if switches.act else nn.Identity()
        _add_bias_table(self, num_heads, self.resolution, self.stride, switches.use_bias)

    def bias_for(self, h: int, w: int) -> Tensor | None:
        """The learned table gathered for an (h, w) key grid (resampled off the build grid)."""
        if self.attention_biases is None:
            return None
        return grid_bias(self.attention_biases, self.resolution, h, w, self.stride, self.attention_bias_idxs)

    def _fused_like(self, out: _FusedAttentionBase) -> _FusedAttentionBase:
        """``out`` on this layer's device and dtype, with the bias table gathered into its matrix."""
        out = _like(out, self.proj.linear.weight)
        if self.attention_biases is not None:
            out.attn_bias.copy_(gather_bias(self.attention_biases, self.attention_bias_idxs))
        return out


class Attention(_TrainedAttention):
    """Multi-head self-attention with a learned per-head relative-position bias.

    Per head the qkv channels are laid out [q: D, k: D, v: attn_ratio*D]. ``switches``: the Table 5
    ablations (:class:`AttentionSwitches`; all on by default).
    """

    def __init__(
        self,
        dim: int,
        key_dim: int,
        num_heads: int,
        attn_ratio: float,
        resolution: int | tuple[int, int],
        switches: AttentionSwitches = AttentionSwitches(),
    ) -> None:
        super().__init__(key_dim, num_heads, attn_ratio, resolution, switches)
        norm = switches.norm
        self.qkv = LinearBN(dim, num_heads * (2 * key_dim + self.val_dim), norm=norm)
        self.proj = LinearBN(num_heads * self.val_dim, dim, bn_weight_init=0.0, norm=norm)

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None, residual: Tensor | None = None) -> Tensor:
        """(B, N, C) tokens on an (h, w) grid (default: the build grid) -> (B, N, C), plus
        ``residual`` when given."""
        B, N, _ = x.shape
        qkv = self.qkv(x).view(B, N, self.num_heads, -1)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.val_dim], dim=3)  # (B, N, H, d) views
        x = self.proj(self.act(self.attend(q, k, v, hw or self.resolution, False, self.scale)))
        return x if residual is None else residual + x

    @torch.no_grad()
    def fused(self) -> FusedAttention:
        """Inference form: BatchNorms folded, the q scale folded into the q rows of ``qkv``, the bias
        table gathered into a (heads, N, N) matrix (zeros without attention bias, ablation A5)."""
        dim, act = self.qkv.linear.in_features, isinstance(self.act, nn.Hardswish)
        out = self._fused_like(FusedAttention(dim, self.key_dim, self.num_heads, self.val_dim, self.resolution, act))
        w, b = self.qkv.folded()
        per_head = 2 * self.key_dim + self.val_dim  # rows per head: [q: D, k: D, v: Dv]
        w.view(self.num_heads, per_head, -1)[:, : self.key_dim] *= self.scale
        b.view(self.num_heads, per_head)[:, : self.key_dim] *= self.scale
        _load(out.qkv, w, b)
        _load(out.proj, *self.proj.folded())
        return out


class ShrinkAttention(_TrainedAttention):
    """Attention that halves the token grid: queries from the stride-2 subsampled input.

    Heads H = C_in / D; kv per head [k: D, v: 4D]; output width C_out. Not residual. ``switches``:
    the Table 5 ablations (:class:`AttentionSwitches`; all on by default).
    """

    stride = 2

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        key_dim: int,
        num_heads: int,
        attn_ratio: float,
        resolution: int | tuple[int, int],
        switches: AttentionSwitches = AttentionSwitches(),
    ) -> None:
        super().__init__(key_dim, num_heads, attn_ratio, resolution, switches)
        norm = switches.norm
        self.kv = LinearBN(in_dim, num_heads * (key_dim + self.val_dim), norm=norm)
        self.q = LinearBN(in_dim, num_heads * key_dim, norm=norm)
        self.proj = LinearBN(num_heads * self.val_dim, out_dim, norm=norm)

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None) -> Tensor:
        """(B, h*w, C_in) tokens on an (h, w) grid (default: the build grid) -> (B, h'*w', C_out)."""
        B, N, _ = x.shape
        hw = hw or self.resolution
        k, v = self.kv(x).view(B, N, self.num_heads, -1).split([self.key_dim, self.val_dim], dim=3)
        q = self.q(self.queries(x, hw))
        q = q.view(B, q.shape[1], self.num_heads, self.key_dim)  # (B, N_q, H, D)
        return self.proj(self.act(self.attend(q, k, v, hw, False, self.scale)))

    @torch.no_grad()
    def fused(self) -> FusedShrinkAttention:
        """Inference form: BatchNorms folded, the q scale folded into ``q``, the bias table gathered
        into a (heads, N_q, N_k) matrix (zeros without attention bias, ablation A5)."""
        dims = (self.kv.linear.in_features, self.proj.linear.out_features, self.key_dim, self.num_heads)
        act = isinstance(self.act, nn.Hardswish)
        out = self._fused_like(FusedShrinkAttention(*dims, self.val_dim, self.resolution, act))
        _load(out.kv, *self.kv.folded())
        w, b = self.q.folded()
        _load(out.q, w * self.scale, b * self.scale)
        _load(out.proj, *self.proj.folded())
        return out


class MLP(nn.Module):
    """LinearBN -> Hardswish -> LinearBN (the second BN starts at weight 0: residual branch)."""

    def __init__(self, dim: int, hidden: int, norm: str = "bn") -> None:
        super().__init__()
        self.fc1 = LinearBN(dim, hidden, norm=norm)
        self.act = nn.Hardswish()
        self.fc2 = LinearBN(hidden, dim, bn_weight_init=0.0, norm=norm)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """``fc2(hardswish(fc1(x)))``, plus ``residual`` when given."""
        x = self.fc2(self.act(self.fc1(x)))
        return x if residual is None else residual + x

    @torch.no_grad()
    def fused(self) -> FusedMLP:
        """Inference form: both BatchNorms folded."""
        out = _like(FusedMLP(self.fc1.linear.in_features, self.fc1.linear.out_features), self.fc1.linear.weight)
        _load(out.fc1, *self.fc1.folded())
        _load(out.fc2, *self.fc2.folded())
        return out


class Stem(nn.Sequential):
    """The patch embedding (Section 4.2): four 3x3 stride-2 :class:`ConvBN` with a Hardswish between
    two, in_chans -> C/8 -> C/4 -> C/2 -> C; or (``patch16``, Table 5's A2) one 16x16 stride-16
    convolution, ViT's patch embedding."""

    def __init__(self, channels: Sequence[int], *, patch16: bool = False, norm: str = "bn") -> None:
        if patch16:
            super().__init__(ConvBN(channels[0], channels[1], PATCH_SIZE, PATCH_SIZE, 0, norm=norm))
            return
        layers: list[nn.Module] = []
        for i in range(len(channels) - 1):
            layers += [nn.Hardswish()] if i else []
            layers.append(ConvBN(channels[i], channels[i + 1], norm=norm))
        super().__init__(*layers)

    @torch.no_grad()
    def fused(self) -> FusedStem:
        """Inference form: the same sequence with each :class:`ConvBN` a biased Conv2d."""
        return FusedStem(*[m.fused() if isinstance(m, ConvBN) else copy.deepcopy(m) for m in self])


# ---- the inference forms ------------------------------------------------------------------------
class FusedStem(nn.Sequential):
    """The stem's inference form: biased Conv2d layers (Hardswish between), run by
    :func:`levit.models.kernels.conv_stem` (channels-last, conv + bias + Hardswish as one oneDNN kernel on CPU)."""

    def forward(self, x: Tensor) -> Tensor:
        convs = [m for m in self if isinstance(m, nn.Conv2d)]
        return kernels.conv_stem(
            x, [c.weight for c in convs], [c.bias for c in convs], [c.stride for c in convs], [c.padding for c in convs]
        )


class _FusedAttentionBase(_AttentionGrid):
    """The inference form's share: the activation switch (``False`` in ablation A7) and the bias as a
    gathered (heads, N_q, N_k) buffer, resampled at another grid on every call (:func:`grid_bias`)."""

    def __init__(
        self, key_dim: int, num_heads: int, val_dim: int, resolution: int | tuple[int, int], act: bool
    ) -> None:
        super().__init__(key_dim, num_heads, val_dim, resolution)
        self.act = act  # Hardswish before the projection (False in ablation A7)
        nq, nk = math.prod(self.resolution_out), math.prod(self.resolution)
        self.register_buffer("attn_bias", torch.zeros(num_heads, nq, nk))

    def bias_for(self, h: int, w: int) -> Tensor:
        """The gathered bias, or its resampling for an (h, w) key grid."""
        return grid_bias(self.attn_bias, self.resolution, h, w, self.stride)


class FusedAttention(_FusedAttentionBase):
    """:class:`Attention`'s inference form: ``qkv`` with the q scale folded in, the bias as a
    (H, N, N) buffer, run by :mod:`levit.models.kernels` (the path chosen per call by the device)."""

    def __init__(
        self, dim: int, key_dim: int, num_heads: int, val_dim: int, resolution: int | tuple[int, int], act: bool = True
    ) -> None:
        super().__init__(key_dim, num_heads, val_dim, resolution, act)
        self.qkv = nn.Linear(dim, num_heads * (2 * key_dim + val_dim))
        self.proj = nn.Linear(num_heads * val_dim, dim)

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None, residual: Tensor | None = None) -> Tensor:
        """(B, N, C) -> (B, N, C) on an (h, w) grid (default: the build grid), plus ``residual`` when
        given (added inside the projection's GEMM)."""
        B, N, _ = x.shape
        qkv = kernels.linear(x, self.qkv.weight, self.qkv.bias).view(B, N, self.num_heads, -1)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.val_dim], 3)  # (B, N, H, d) views
        x = self.attend(q, k, v, hw or self.resolution, self.act, 1.0)
        return kernels.linear(x, self.proj.weight, self.proj.bias, residual=residual)


class FusedShrinkAttention(_FusedAttentionBase):
    """:class:`ShrinkAttention`'s inference form: folded BNs, the q scale in ``q``, a (H, N_q, N_k) bias buffer."""

    stride = 2

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        key_dim: int,
        num_heads: int,
        val_dim: int,
        resolution: int | tuple[int, int],
        act: bool = True,
    ) -> None:
        super().__init__(key_dim, num_heads, val_dim, resolution, act)
        self.kv = nn.Linear(in_dim, num_heads * (key_dim + val_dim))
        self.q = nn.Linear(in_dim, num_heads * key_dim)
        self.proj = nn.Linear(num_heads * val_dim, out_dim)

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None) -> Tensor:
        """(B, h*w, C_in) on an (h, w) grid (default: the build grid) -> (B, h'*w', C_out)."""
        B, N, _ = x.shape
        hw = hw or self.resolution
        kv = kernels.linear(x, self.kv.weight, self.kv.bias).view(B, N, self.num_heads, -1)
        k, v = kv.split([self.key_dim, self.val_dim], dim=3)  # (B, N, H, d)
        q = kernels.linear(self.queries(x, hw), self.q.weight, self.q.bias)
        q = q.view(B, q.shape[1], self.num_heads, self.key_dim)  # (B, N_q, H, D)
        return kernels.linear(self.attend(q, k, v, hw, self.act, 1.0), self.proj.weight, self.proj.bias)


class FusedMLP(nn.Module):
    """:class:`MLP`'s inference form: Linear -> Hardswish -> Linear, each as one oneDNN kernel on CPU."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """``fc2(hardswish(fc1(x)))``, plus ``residual`` when given (added inside the last GEMM)."""
        x = kernels.linear(x, self.fc1.weight, self.fc1.bias, "hardswish")
        return kernels.linear(x, self.fc2.weight, self.fc2.bias, residual=residual)
