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
import weakref
from collections.abc import Sequence

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .config import PATCH_SIZE, LeViTConfig

__all__ = [
    "MLP",
    "Attention",
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
    "fused_grid_bias",
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

    def fused(self) -> DropPath:
        """Inference form: no stochastic depth, whatever the mode."""
        return DropPath(0.0)


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

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None, residual: Tensor | None = None) -> Tensor:
        """(B, N, C) tokens on an (h, w) grid (default: the build grid) -> (B, N, C), plus
        ``residual`` when given."""
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
        x = self.proj(self.act(x))
        return x if residual is None else residual + x

    @torch.no_grad()
    def fused(self) -> FusedAttention:
        """Inference form: BatchNorms folded, the q scale folded into the q rows of ``qkv``, the bias
        table gathered into a (heads, N, N) matrix (zeros without attention bias, ablation A5)."""
        out = FusedAttention(
            self.qkv.linear.in_features,
            self.key_dim,
            self.num_heads,
            self.val_dim,
            self.resolution,
            act=isinstance(self.act, nn.Hardswish),
        )
        out = _like(out, self.qkv.linear.weight)
        w, b = self.qkv.folded()
        per_head = 2 * self.key_dim + self.val_dim  # rows per head: [q: D, k: D, v: Dv]
        w.view(self.num_heads, per_head, -1)[:, : self.key_dim] *= self.scale
        b.view(self.num_heads, per_head)[:, : self.key_dim] *= self.scale
        _load(out.qkv, w, b)
        _load(out.proj, *self.proj.folded())
        if self.attention_biases is not None:
            out.attn_bias.copy_(self.attention_biases[:, self.attention_bias_idxs])
        return out


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

    @torch.no_grad()
    def fused(self) -> FusedShrinkAttention:
        """Inference form: BatchNorms folded, the q scale folded into ``q``, the bias table gathered
        into a (heads, N_q, N_k) matrix (zeros without attention bias, ablation A5)."""
        out = FusedShrinkAttention(
            self.kv.linear.in_features,
            self.proj.linear.out_features,
            self.key_dim,
            self.num_heads,
            self.val_dim,
            self.resolution,
            act=isinstance(self.act, nn.Hardswish),
        )
        out = _like(out, self.kv.linear.weight)
        _load(out.kv, *self.kv.folded())
        w, b = self.q.folded()
        _load(out.q, w * self.scale, b * self.scale)
        _load(out.proj, *self.proj.folded())
        if self.attention_biases is not None:
            out.attn_bias.copy_(self.attention_biases[:, self.attention_bias_idxs])
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


_GRID_CACHE: dict[int, tuple[weakref.ref, tuple, dict]] = {}  # id(bias) -> (ref, stamp, {(h, w, stride): bias})
_GRID_CACHE_SIZE = 4  # grids kept per bias


@torch.fx.wrap
def fused_grid_bias(bias: Tensor, build: tuple[int, int], h: int, w: int, stride: int = 1) -> Tensor:
    """The (H, N_q, N_k) bias of a fused attention for an (h, w) key grid: ``bias`` itself at the build
    grid; at another grid its first row (the query at offset (0, 0): the whole (H, h*w) relative-offset
    table) resampled (:func:`resample_bias_table`) and gathered for the new grid.

    Results are cached per grid (a few, oldest dropped) and only served for the very same tensor
    object, storage, version, device and dtype, so a ``load_state_dict``, ``.to()``, reassignment or
    in-place edit of the buffer is never served stale; nothing is cached with autograd on or while
    compiling. A leaf for ``torch.fx`` (the grid comparison is Python control flow on the input's shape).
    """
    h, w = int(h), int(w)
    if (h, w) == tuple(build):
        return bias
    cacheable = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
    stamp = (bias.data_ptr(), bias._version, bias.device, bias.dtype)
    key = (h, w, stride)
    entry = _GRID_CACHE.get(id(bias)) if cacheable else None
    if entry is not None and entry[0]() is bias and entry[1] == stamp and key in entry[2]:
        return entry[2][key]
    table = resample_bias_table(bias[:, 0, :], build, (h, w))
    out = table[:, attention_bias_index((h, w), stride, bias.device)]
    if cacheable:
        if entry is None or entry[0]() is not bias:  # a new tensor: its entry goes when it does
            weakref.finalize(bias, _GRID_CACHE.pop, id(bias), None)
        if entry is None or entry[0]() is not bias or entry[1] != stamp:
            entry = (weakref.ref(bias), stamp, {})
            _GRID_CACHE[id(bias)] = entry
        grids = entry[2]
        if len(grids) >= _GRID_CACHE_SIZE:
            grids.pop(next(iter(grids)))
        grids[key] = out
    return out


class FusedAttention(nn.Module):
    """:class:`Attention`'s inference form: ``qkv`` with the q scale folded in, the bias as a
    (H, N, N) buffer, run by :mod:`levit.models.kernels` (the path chosen per call by the device)."""

    def __init__(
        self, dim: int, key_dim: int, num_heads: int, val_dim: int, resolution: int | tuple[int, int], act: bool = True
    ) -> None:
        super().__init__()
        self.num_heads, self.key_dim, self.val_dim = num_heads, key_dim, val_dim
        self.act = act  # Hardswish before the projection (False in ablation A7)
        self.resolution = _pair(resolution)  # build grid (h, w)
        n = self.resolution[0] * self.resolution[1]
        self.qkv = nn.Linear(dim, num_heads * (2 * key_dim + val_dim))
        self.proj = nn.Linear(num_heads * val_dim, dim)
        self.register_buffer("attn_bias", torch.zeros(num_heads, n, n))

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None, residual: Tensor | None = None) -> Tensor:
        """(B, N, C) -> (B, N, C) on an (h, w) grid (default: the build grid), plus ``residual`` when
        given (added inside the projection's GEMM)."""
        B, N, _ = x.shape
        h, w = self.resolution if hw is None else hw
        bias = fused_grid_bias(self.attn_bias, self.resolution, h, w, 1)
        qkv = kernels.linear(x, self.qkv.weight, self.qkv.bias).view(B, N, self.num_heads, -1)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.val_dim], 3)  # (B, N, H, d) views
        x = kernels.attention(q, k, v, bias, self.act)
        return kernels.linear(x, self.proj.weight, self.proj.bias, residual=residual)


class FusedShrinkAttention(nn.Module):
    """:class:`ShrinkAttention`'s inference form: folded BNs, the q scale in ``q``, a (H, N_q, N_k) bias buffer."""

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
        super().__init__()
        self.num_heads, self.key_dim, self.val_dim = num_heads, key_dim, val_dim
        self.act = act  # Hardswish before the projection (False in ablation A7)
        self.resolution = _pair(resolution)  # build input grid (h, w)
        self.resolution_out = LeViTConfig.subsampled_grid(self.resolution)
        nq = self.resolution_out[0] * self.resolution_out[1]
        nk = self.resolution[0] * self.resolution[1]
        self.kv = nn.Linear(in_dim, num_heads * (key_dim + val_dim))
        self.q = nn.Linear(in_dim, num_heads * key_dim)
        self.proj = nn.Linear(num_heads * val_dim, out_dim)
        self.register_buffer("attn_bias", torch.zeros(num_heads, nq, nk))

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None) -> Tensor:
        """(B, h*w, C_in) on an (h, w) grid (default: the build grid) -> (B, h'*w', C_out)."""
        B, N, C = x.shape
        h, w = self.resolution if hw is None else hw
        h2, w2 = LeViTConfig.subsampled_grid((h, w))
        bias = fused_grid_bias(self.attn_bias, self.resolution, h, w, 2)
        H = self.num_heads
        kv = kernels.linear(x, self.kv.weight, self.kv.bias).view(B, N, H, -1)
        k, v = kv.split([self.key_dim, self.val_dim], dim=3)  # (B, N, H, d)
        xs = x.view(B, h, w, C)[:, ::2, ::2].reshape(B, h2 * w2, C)  # subsampled queries
        q = kernels.linear(xs, self.q.weight, self.q.bias).view(B, h2 * w2, H, self.key_dim)  # (B, N_q, H, D)
        return kernels.linear(kernels.attention(q, k, v, bias, self.act), self.proj.weight, self.proj.bias)


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
