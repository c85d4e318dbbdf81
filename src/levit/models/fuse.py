"""Inference form of LeViT: BatchNorms folded, heads merged, attention biases baked in.

:func:`fuse` builds a NEW :class:`FusedLeViT` from a trained :class:`~levit.models.network.LeViT`; the input
model is not modified. The fused module holds plain tensors (weights, biases and the gathered
attention-bias matrices), so there is nothing that can go stale after ``load_state_dict``,
``.to(device)`` or ``.to(dtype)``.
"""

from __future__ import annotations

import copy
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import LeViTConfig
from .layers import BNLinear, ConvBN, LinearBN, _pair, attention_bias_index, resample_bias_table
from .network import FeatureAPI, LeViT, check_input, pos_embed_for, run_stage

__all__ = [
    "FusedAttention",
    "FusedLeViT",
    "FusedMLP",
    "FusedShrinkAttention",
    "attention_path",
    "cpu_bf16_supported",
    "fusable",
    "fuse",
]


# ---- what this machine can run ---------------------------------------------------------------
# Module-level switches (tests and benchmarks force them; ``None`` means: decide from the device).
#: ``"per_image"`` / ``"matmul"`` / ``"sdpa"`` forces the eager attention path everywhere; ``None``:
#: :func:`attention_path` decides.
ATTENTION_PATH: str | None = None
ATTENTION_PATHS = ("per_image", "matmul", "sdpa")
#: ``True`` / ``False`` forces oneDNN's fused linear/conv kernels on or off on CPU (``True`` still needs a
#: CPU that runs them); ``None``: by capability and batch size (:data:`ONEDNN_MIN_BATCH`).
ONEDNN_FUSED: bool | None = None
#: oneDNN's fused kernels from this batch size up; below it plain PyTorch was measured faster
#: (``benchmarks/attention_paths.py``: the fused kernels reorder the weights on every call, which a
#: batch of one image does not pay back)
ONEDNN_MIN_BATCH = 4
#: the per-image attention loop is used for fp32 on CPU up to this many intra-op threads: measured side
#: by side with ``benchmarks/attention_paths.py`` on an AVX-512 CPU (LeViT-128S, batch 16) it beat
#: the ``matmul`` path on one thread in fp32 (1.06x in the quietest run), not in bf16 (0.93x) nor on
#: two threads (README, Speed). 0 switches it off.
PER_IMAGE_MAX_THREADS = 1


def cpu_bf16_supported() -> bool:
    """Whether this CPU has native bf16 instructions for oneDNN (AVX-512 BF16, AMX, AVX-NE-CONVERT)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def attention_path(device: torch.device | str, dtype: torch.dtype = torch.float32) -> str:
    """The eager attention implementation for ``device``: ``"per_image"``, ``"matmul"`` or ``"sdpa"``.

    The two batched forms run over all images and heads at once, so nothing loops over the batch in
    Python: ``matmul`` (two batched matmuls, the bias added in place; measured faster than SDPA with
    a mask on CPU) on the CPU, ``sdpa`` (one ``scaled_dot_product_attention``, the bias as an
    additive mask) on every other device (CUDA, ``meta``, ...). ``per_image`` (one batched GEMM over
    the heads per image, written in place) is used for fp32 on CPUs running at most
    :data:`PER_IMAGE_MAX_THREADS` threads (one). :data:`ATTENTION_PATH` overrides all.
    """
    if ATTENTION_PATH is not None:
        if ATTENTION_PATH not in ATTENTION_PATHS:
            raise ValueError(
                f"levit.models.fuse.ATTENTION_PATH must be one of {', '.join(ATTENTION_PATHS)} or None, got {ATTENTION_PATH!r}"
            )
        return ATTENTION_PATH
    if torch.device(device).type == "cpu":
        one_thread = torch.get_num_threads() <= PER_IMAGE_MAX_THREADS
        return "per_image" if one_thread and dtype == torch.float32 else "matmul"
    return "sdpa"


def _onednn_ok(x: Tensor) -> bool:
    """Whether oneDNN's fused linear/conv kernels should run ``x``: CPU inference in eager mode only,
    bf16 only where the CPU has bf16 instructions (elsewhere oneDNN's bf16 kernels raise)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False  # inductor does its own fusion; traced graphs stay portable (checked first: no graph break)
    if ONEDNN_FUSED is False or (ONEDNN_FUSED is None and x.shape[0] < ONEDNN_MIN_BATCH):
        return False
    return (
        x.device.type == "cpu"
        and (x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and cpu_bf16_supported()))
        and not torch.is_grad_enabled()  # no autograd formula: training/grad mode takes the plain path
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def _linear(x: Tensor, layer: nn.Linear, act: str = "none", residual: Tensor | None = None) -> Tensor:
    """``act(layer(x))`` or ``residual + layer(x)``, as ONE oneDNN kernel on CPU when possible.

    Bias, Hardswish and the residual addition run in the GEMM's epilogue instead of as extra passes
    over memory. Uses the module's current weight every call: there is nothing cached to go stale.
    """
    if _onednn_ok(x) and layer.weight.dtype == x.dtype:
        if residual is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, layer.weight, layer.bias, "add")
        return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, act, [], "")
    y = layer(x)
    if act == "hardswish":
        y = F.hardswish(y)
    return y if residual is None else residual + y


def _attention_batched(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """One fused attention over all images and heads; the bias is an additive mask. (B, N_q, H*Dv)."""
    B, Nq, H, _ = q.shape
    x = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias, scale=1.0
    )  # (B, H, N_q, Dv)
    return x.transpose(1, 2).reshape(B, Nq, H * v.shape[-1])


def _attention_matmul(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """Two batched matmuls over all images and heads, the bias added in place. (B, N_q, H*Dv)."""
    B, Nq, H, _ = q.shape
    attn = torch.matmul(q.transpose(1, 2), k.permute(0, 2, 3, 1)).add_(bias).softmax(dim=-1)  # (B, H, N_q, N_k)
    return torch.matmul(attn, v.transpose(1, 2)).transpose(1, 2).reshape(B, Nq, H * v.shape[-1])


def _attention_per_image(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """One batched GEMM over the heads per image, straight on the strided views, written in place."""
    B, Nq, H, _ = q.shape
    Dv = v.shape[-1]
    out = q.new_empty(B, Nq, H, Dv)
    for b in range(B):
        attn = torch.bmm(q[b].transpose(0, 1), k[b].permute(1, 2, 0)).add_(bias).softmax(dim=-1)  # (H, N_q, N_k)
        torch.bmm(attn, v[b].transpose(0, 1), out=out[b].transpose(0, 1))
    return out.view(B, Nq, H * Dv)


def _attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, act: bool = True) -> Tensor:
    """``hardswish(softmax(q k^T + bias) v)`` for token-major views, heads concatenated.

    q: (B, N_q, H, D), k: (B, N_k, H, D), v: (B, N_k, H, Dv) (strided views into the projection
    outputs; the scale is folded into q), bias: (H, N_q, N_k). Returns (B, N_q, H*Dv).

    Eager inference takes the path :func:`attention_path` picks for the device: batched over images
    and heads (``scaled_dot_product_attention`` on GPUs and ``meta``, batched matmuls on the CPU) or
    the per-image loop (one CPU thread, fp32). Traced graphs (ONNX, OpenVINO, TorchScript) get the one fused attention op
    that the runtimes optimise; autograd and ``torch.compile`` get plain batched matmuls.
    ``act=False`` (Table 5, ablation A7) leaves the Hardswish out.
    """
    B, Nq, H, _ = q.shape
    Dv = v.shape[-1]
    if torch.jit.is_tracing():
        x = _attention_batched(q, k, v, bias)
        return F.hardswish(x) if act else x
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        attn = torch.matmul(q.transpose(1, 2), k.permute(0, 2, 3, 1)) + bias  # (B, H, N_q, N_k)
        x = torch.matmul(attn.softmax(dim=-1), v.transpose(1, 2))  # (B, H, N_q, Dv)
        x = x.transpose(1, 2).reshape(B, Nq, H * Dv)
        return F.hardswish(x) if act else x
    path = attention_path(q.device, q.dtype)
    if path == "per_image":
        x = _attention_per_image(q, k, v, bias)
    elif path == "matmul":
        x = _attention_matmul(q, k, v, bias)
    else:
        x = _attention_batched(q, k, v, bias)
    return F.hardswish(x, inplace=True) if act else x


class _GridBias:
    """The (H, N_q, N_k) bias of a fused attention for another token grid than its build grid.

    The build bias is the gathered table, so its first row (query at offset (0, 0)) IS the (H, h*w)
    relative-offset table: it is resampled (:func:`levit.models.layers.resample_bias_table`) and gathered for
    the new grid. Results are cached per grid (a few grids, oldest dropped) and only served for the
    very same buffer object, storage, version, device and dtype, so a ``load_state_dict``, ``.to()``,
    reassignment or in-place edit of ``attn_bias`` is never served stale. No caching with autograd on.
    """

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self.cache: dict[tuple, tuple] = {}

    @staticmethod
    def _stamp(bias: Tensor) -> tuple:
        return (bias.data_ptr(), bias._version, bias.device, bias.dtype)

    def __call__(self, bias: Tensor, build: tuple[int, int], hw: tuple[int, int], stride: int) -> Tensor:
        hw = (int(hw[0]), int(hw[1]))
        if hw == build:
            return bias
        grad = torch.is_grad_enabled()
        hit = self.cache.get((hw, stride))
        if not grad and hit is not None and hit[0]() is bias and hit[1] == self._stamp(bias):
            return hit[2]
        table = resample_bias_table(bias[:, 0, :], build, hw)
        out = table[:, attention_bias_index(hw, stride, bias.device)]
        if not grad:
            self.cache.pop((hw, stride), None)
            if len(self.cache) >= self.size:
                self.cache.pop(next(iter(self.cache)))
            self.cache[(hw, stride)] = (weakref.ref(bias), self._stamp(bias), out)
        return out

    def __deepcopy__(self, memo: dict) -> _GridBias:
        return _GridBias(self.size)

    def __getstate__(self) -> dict:
        return {"size": self.size, "cache": {}}


class FusedAttention(nn.Module):
    """Self-attention with the q scale folded into ``qkv`` and the bias as a (H, N, N) buffer."""

    act = True  # Hardswish before the projection (False in ablation A7)

    def __init__(self, dim: int, key_dim: int, num_heads: int, val_dim: int, resolution: int) -> None:
        super().__init__()
        self.num_heads, self.key_dim, self.val_dim = num_heads, key_dim, val_dim
        self.resolution = _pair(resolution)  # build grid (h, w)
        n = self.resolution[0] * self.resolution[1]
        self.qkv = nn.Linear(dim, num_heads * (2 * key_dim + val_dim))
        self.proj = nn.Linear(num_heads * val_dim, dim)
        self.register_buffer("attn_bias", torch.zeros(num_heads, n, n))
        self._grid_bias = _GridBias()

    def forward(self, x: Tensor, residual: Tensor | None = None, hw: tuple[int, int] | None = None) -> Tensor:
        """(B, N, C) -> (B, N, C) on an (h, w) grid (default: the build grid): the attention branch,
        plus ``residual`` when given."""
        B, N, _ = x.shape
        bias = self.attn_bias if hw is None else self._grid_bias(self.attn_bias, self.resolution, hw, 1)
        qkv = _linear(x, self.qkv).view(B, N, self.num_heads, -1)  # per head [q: D, k: D, v: Dv]
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.val_dim], 3)  # (B, N, H, d) views
        return _linear(_attention(q, k, v, bias, self.act), self.proj, residual=residual)


class FusedShrinkAttention(nn.Module):
    """Shrink attention with folded BNs and a (H, N_q, N_k) bias buffer."""

    act = True  # Hardswish before the projection (False in ablation A7)

    def __init__(self, in_dim: int, out_dim: int, key_dim: int, num_heads: int, val_dim: int, resolution: int) -> None:
        super().__init__()
        self.num_heads, self.key_dim, self.val_dim = num_heads, key_dim, val_dim
        self.resolution = _pair(resolution)  # build input grid (h, w)
        self.resolution_out = LeViTConfig.subsampled_grid(self.resolution)
        nq = self.resolution_out[0] * self.resolution_out[1]
        nk = self.resolution[0] * self.resolution[1]
        self.kv = nn.Linear(in_dim, num_heads * (key_dim + val_dim))
        self.q = nn.Linear(in_dim, num_heads * key_dim)
        self.proj = nn.Linear(num_heads * val_dim, out_dim)
        self.register_buffer("attn_bias", torch.zeros(num_heads, nq, nk))
        self._grid_bias = _GridBias()

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None) -> Tensor:
        """(B, h*w, C_in) on an (h, w) grid (default: the build grid) -> (B, h'*w', C_out)."""
        B, N, C = x.shape
        h, w = self.resolution if hw is None else hw
        h2, w2 = LeViTConfig.subsampled_grid((h, w))
        bias = self.attn_bias if hw is None else self._grid_bias(self.attn_bias, self.resolution, hw, 2)
        H = self.num_heads
        k, v = _linear(x, self.kv).view(B, N, H, -1).split([self.key_dim, self.val_dim], dim=3)  # (B, N, H, d)
        xs = x.view(B, h, w, C)[:, ::2, ::2].reshape(B, h2 * w2, C)
        q = _linear(xs, self.q).view(B, h2 * w2, H, self.key_dim)  # (B, N_q, H, D)
        return _linear(_attention(q, k, v, bias, self.act), self.proj)


class FusedMLP(nn.Module):
    """Linear -> Hardswish -> Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """``fc2(hardswish(fc1(x)))``, plus ``residual`` when given (added inside the last GEMM)."""
        return _linear(_linear(x, self.fc1, "hardswish"), self.fc2, residual=residual)


class _FusedBlock(nn.Module):
    def __init__(self, cfg: LeViTConfig, s: int) -> None:
        super().__init__()
        dim = cfg.embed_dim[s]
        self.attn = FusedAttention(
            dim, cfg.key_dim, cfg.num_heads[s], int(cfg.attn_ratio * cfg.key_dim), cfg.grid_sizes[s]
        )
        self.attn.act = cfg.attn_act
        self.mlp = FusedMLP(dim, int(dim * cfg.mlp_ratio))

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None) -> Tensor:
        x = self.attn(x, residual=x, hw=hw)
        return self.mlp(x, residual=x)


class _FusedShrink(nn.Module):
    def __init__(self, cfg: LeViTConfig, s: int) -> None:
        super().__init__()
        c_out = cfg.embed_dim[s]
        self.attn = FusedShrinkAttention(
            cfg.embed_dim[s - 1],
            c_out,
            cfg.shrink_key_dim,
            cfg.shrink_heads[s - 1],
            int(cfg.down_attn_ratio * cfg.shrink_key_dim),
            cfg.grid_sizes[s - 1],
        )
        self.attn.act = cfg.attn_act
        self.mlp = FusedMLP(c_out, int(c_out * cfg.down_mlp_ratio))

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None) -> Tensor:
        x = self.attn(x, hw)
        return self.mlp(x, residual=x)


class _FusedStage(nn.Module):
    def __init__(self, cfg: LeViTConfig, s: int) -> None:
        super().__init__()
        self.downsample = _FusedShrink(cfg, s) if s > 0 else nn.Identity()
        self.blocks = nn.Sequential(*[_FusedBlock(cfg, s) for _ in range(cfg.depth[s])])
        self.grid = cfg.grid_sizes[s]  # build output grid (h, w)

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None) -> Tensor | tuple[Tensor, tuple[int, int]]:
        """Build grid (``hw`` None): tokens -> tokens, as always. Another grid: -> (tokens, new grid)."""
        if hw is None:
            return self.blocks(self.downsample(x))
        return run_stage(self.downsample, self.blocks, x, hw)


class FusedLeViT(FeatureAPI, nn.Module):
    """LeViT for inference: plain convs and linears, one head. Build it with :func:`fuse`.

    Constructing it directly gives placeholder weights (used when loading a fused checkpoint).
    """

    is_fused = True
    class_names: list[str] | None  # copied from the unfused model by fuse()

    def __init__(self, cfg: LeViTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.class_names = None
        chans = cfg.stem_channels
        layers: list[nn.Module] = []
        if cfg.stem == "linear16":  # ablation A2: one 16x16 stride-16 conv
            layers = [nn.Conv2d(chans[0], chans[1], 16, 16, 0)]
        else:
            for i in range(4):
                layers.append(nn.Conv2d(chans[i], chans[i + 1], 3, 2, 1))
                if i < 3:
                    layers.append(nn.Hardswish())
        self.stem = nn.Sequential(*layers)
        self.pos_embed: nn.Parameter | None = None
        if cfg.pos == "embed":  # ablation A5: absolute position embedding (the attention biases stay 0)
            h, w = cfg.grid_sizes[0]
            self.pos_embed = nn.Parameter(torch.zeros(1, h * w, chans[-1]))
        self.stages = nn.ModuleList([_FusedStage(cfg, s) for s in range(cfg.num_stages)])
        nc = cfg.num_classes
        self.head = nn.Linear(cfg.num_features, nc) if nc > 0 else nn.Identity()
        self.eval()

    @property
    def num_classes(self) -> int:
        """Number of output classes (0: the model returns pooled features)."""
        return self.config.num_classes

    def _stem(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu":
            return self.stem(x)
        eager = not (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting())
        if eager and x.dtype == torch.bfloat16 and not cpu_bf16_supported():
            # no native bf16 here: oneDNN's bf16 convolutions raise and the fallback is slow, so the stem
            # (3x3 convs, tiny weights) runs in fp32 and hands bf16 on
            y = x.float().contiguous(memory_format=torch.channels_last)
            for m in self.stem:
                if isinstance(m, nn.Conv2d):
                    b = m.bias.float() if m.bias is not None else None
                    y = F.conv2d(y, m.weight.float(), b, m.stride, m.padding)
                else:
                    y = m(y)
            return y.to(torch.bfloat16)
        x = x.contiguous(memory_format=torch.channels_last)  # oneDNN's convolutions are faster channels-last
        if not _onednn_ok(x) or x.dtype != self.stem[0].weight.dtype:
            return self.stem(x)
        convs = [m for m in self.stem if isinstance(m, nn.Conv2d)]
        for i, c in enumerate(convs):  # conv + bias + Hardswish in one oneDNN kernel
            act = "hardswish" if i < len(convs) - 1 else "none"
            x = torch.ops.mkldnn._convolution_pointwise(
                x, c.weight, c.bias, list(c.padding), list(c.stride), [1, 1], 1, act, [], ""
            )
        return x

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) images -> (B, N, C) tokens of the last stage (any H, W >= 16)."""
        check_input(x, self.config, any_size=True)
        return self._tokens(x)[-1][0]

    def _tokens(self, x: Tensor, upto: int | None = None) -> list[tuple[Tensor, tuple[int, int]]]:
        """[(tokens, grid)] after each stage (through ``upto``). At the build size the stages run
        exactly as for classification; at another size the biases are resampled per grid."""
        x = self._stem(x)
        hw = (x.shape[2], x.shape[3])
        build = hw == self.config.grid_sizes[0]
        x = x.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C)
        if self.pos_embed is not None:  # ablation A5
            x = x + pos_embed_for(self.pos_embed, self.config.grid_sizes[0], hw[0], hw[1])
        out = []
        for s, stage in enumerate(self.stages):
            if upto is not None and s > upto:
                break
            if build:
                x = stage(x)
                hw = stage.grid
            else:
                x, hw = stage(x, hw)
            out.append((x, hw))
        return out

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.config)
        return self.head(self._tokens(x)[-1][0].mean(1))

    # ---- classifier access (the feature API is FeatureAPI's, shared with LeViT) ----------------
    def get_classifier(self) -> nn.Module:
        """The (merged) classifier head."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a new (zero-initialised) linear layer for ``num_classes`` classes
        (0: pooled features). Train it on the unfused model for anything but a linear probe."""
        if global_pool not in (None, "avg"):
            raise ValueError(f"global_pool={global_pool!r}: LeViT pools by averaging tokens ('avg')")
        self.config = self.config.replace(num_classes=num_classes)
        p = self.stem[0].weight
        if num_classes > 0:
            self.head = nn.Linear(self.config.num_features, num_classes).to(device=p.device, dtype=p.dtype)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        else:
            self.head = nn.Identity()


# ---- folding ---------------------------------------------------------------------------------
def _bn_scale_shift(bn: nn.BatchNorm1d | nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    w = bn.weight if bn.weight is not None else torch.ones_like(bn.running_mean)
    b = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
    scale = w.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    return scale, b.double() - bn.running_mean.double() * scale


def _fold(m: ConvBN | LinearBN) -> tuple[Tensor, Tensor]:
    """(weight, bias) of the affine map equal to ``m`` in eval mode, in float64."""
    w = (m.conv if isinstance(m, ConvBN) else m.linear).weight.double()
    scale, shift = _bn_scale_shift(m.bn)
    return w * scale.view(-1, *([1] * (w.ndim - 1))), shift


def _fold_head(m: BNLinear) -> tuple[Tensor, Tensor]:
    scale, shift = _bn_scale_shift(m.bn)
    w, b = m.linear.weight.double(), m.linear.bias.double()
    return w * scale.view(1, -1), b + w @ shift


def _set(dst: nn.Linear | nn.Conv2d, w: Tensor, b: Tensor) -> None:
    dst.weight.copy_(w.to(dst.weight.dtype))
    dst.bias.copy_(b.to(dst.bias.dtype))


def _scale_q_rows(w: Tensor, b: Tensor, heads: int, per_head: int, key_dim: int, scale: float) -> None:
    """Multiply the q rows (the first ``key_dim`` of each head's ``per_head`` rows) by ``scale``."""
    w.view(heads, per_head, -1)[:, :key_dim] *= scale
    b.view(heads, per_head)[:, :key_dim] *= scale


@torch.no_grad()
def fuse(model: LeViT) -> FusedLeViT:
    """A new inference module equal to ``model.eval()``: BN folded, heads merged, biases baked in.

    The input model is left untouched (mode, weights and device). The result is in eval mode, on the
    model's device and in its dtype. Accepts an already fused model (returns a copy).
    """
    if isinstance(model, FusedLeViT):
        return copy.deepcopy(model)
    if not isinstance(model, LeViT):
        raise TypeError(f"fuse() needs a levit LeViT model, got {type(model).__name__}")
    cfg = model.config
    if not fusable(model):
        raise ValueError(
            "levit.fuse: ablation A3's pre-norm LayerNorm normalises each token by its own statistics and "
            "cannot be folded into the next linear layer like BatchNorm; run the unfused model (model.eval())"
        )
    p = next(model.parameters())
    fused = FusedLeViT(cfg).to(device=p.device, dtype=p.dtype)
    names = getattr(model, "class_names", None)
    fused.class_names = list(names) if names else None

    src_convs = [m for m in model.stem if isinstance(m, ConvBN)]
    for src_conv, dst_conv in zip(src_convs, [m for m in fused.stem if isinstance(m, nn.Conv2d)], strict=True):
        _set(dst_conv, *_fold(src_conv))
    if model.pos_embed is not None:
        fused.pos_embed.copy_(model.pos_embed)

    for s_src, s_dst in zip(model.stages, fused.stages):
        if not isinstance(s_src.downsample, nn.Identity):
            src, dst = s_src.downsample.attn, s_dst.downsample.attn
            _set(dst.kv, *_fold(src.kv))
            w, b = _fold(src.q)
            _set(dst.q, w * src.scale, b * src.scale)
            _set(dst.proj, *_fold(src.proj))
            if src.attention_biases is not None:  # None in ablation A5: the buffer stays 0
                dst.attn_bias.copy_(src.attention_biases[:, src.attention_bias_idxs])
            _fold_mlp(s_src.downsample.mlp, s_dst.downsample.mlp)
        for b_src, b_dst in zip(s_src.blocks, s_dst.blocks):
            src, dst = b_src.attn, b_dst.attn
            w, b = _fold(src.qkv)
            _scale_q_rows(w, b, src.num_heads, 2 * src.key_dim + src.val_dim, src.key_dim, src.scale)
            _set(dst.qkv, w, b)
            _set(dst.proj, *_fold(src.proj))
            if src.attention_biases is not None:
                dst.attn_bias.copy_(src.attention_biases[:, src.attention_bias_idxs])
            _fold_mlp(b_src.mlp, b_dst.mlp)

    if cfg.num_classes > 0:
        w, b = _fold_head(model.head)
        if model.head_dist is not None:
            w2, b2 = _fold_head(model.head_dist)
            w, b = (w + w2) / 2, (b + b2) / 2
        _set(fused.head, w, b)
    return fused.eval()


def fusable(model: nn.Module) -> bool:
    """Whether :func:`fuse` can fold ``model``: every LeViT except ablation A3 (LayerNorm), fused ones too."""
    cfg = getattr(model, "config", None)
    return isinstance(cfg, LeViTConfig) and cfg.norm == "bn"


def _fold_mlp(src: nn.Module, dst: FusedMLP) -> None:
    _set(dst.fc1, *_fold(src.fc1))
    _set(dst.fc2, *_fold(src.fc2))
