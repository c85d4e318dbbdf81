"""The kernels of LeViT: which attention implementation and which linear/conv kernels run, chosen
per call from what the device can do.

:func:`attention` is the attention of both layers (:class:`~levit.models.layers.Attention`,
:class:`~levit.models.layers.ShrinkAttention`) in both forms (trained and fused), written once; which
implementation runs is decided in one place (:func:`attention_path` for eager inference, traced,
compiled and autograd calls beside it). The linear and convolution kernels serve the inference form.

Two choices, each with one setter (the style of timm's ``set_fused_attn``) and ``None`` meaning
"decide from the device":

- the eager attention path (:func:`attention_path`, forced with :func:`set_attention_path`):
  ``per_image``, ``matmul`` or ``sdpa``;
- oneDNN's fused linear/conv kernels on CPU (:func:`onednn_ok`, forced with :func:`set_onednn`).

:func:`forced` sets either (and the CPU's bf16 probe, :func:`cpu_bf16_supported`) for the length of a
``with`` block, which is how tests and ``benchmarks/attention_paths.py`` compare the paths.

The functions the inference layers call (:func:`linear`, :func:`attention`, :func:`conv_stem`) are
leaves for ``torch.fx`` (``torch.fx.wrap``): the device, dtype and batch checks run when the traced
graph runs, never as Python control flow on a traced value. Under ``torch.jit.trace`` (ONNX, OpenVINO,
TorchScript), ``torch.compile`` and ``torch.export`` they take plain, portable PyTorch ops.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ATTENTION_PATHS",
    "ONEDNN_MIN_BATCH",
    "PER_IMAGE_MAX_THREADS",
    "attention",
    "attention_path",
    "conv_stem",
    "cpu_bf16_supported",
    "forced",
    "linear",
    "onednn_ok",
    "set_attention_path",
    "set_onednn",
]

ATTENTION_PATHS = ("per_image", "matmul", "sdpa")
#: oneDNN's fused kernels from this batch size up, plain PyTorch below it: the fused kernels reorder
#: the weights on every call, which a batch of a few images does not pay back (measured with
#: ``benchmarks/attention_paths.py``; the figures are in docs/speed.md, "Attention paths").
ONEDNN_MIN_BATCH = 4
#: the per-image attention loop is used for fp32 on CPU up to this many intra-op threads, the one
#: setting where it beat the batched ``matmul`` path side by side; bf16 and more threads run the batched
#: path (``benchmarks/attention_paths.py`` measures both; its figures are in docs/speed.md, "Attention
#: paths"). 0 switches it off.
PER_IMAGE_MAX_THREADS = 1

# The forced choices (None: decide from the device). Set them with the setters or ``forced``.
_attention_path: str | None = None
_onednn: bool | None = None
_cpu_bf16: bool | None = None
_KEEP = object()


def set_attention_path(name: str | None) -> None:
    """Force the eager attention path everywhere (``"per_image"``, ``"matmul"`` or ``"sdpa"``);
    ``None`` lets :func:`attention_path` decide from the device again."""
    global _attention_path
    if name is not None and name not in ATTENTION_PATHS:
        raise ValueError(f"attention path must be one of {', '.join(ATTENTION_PATHS)} or None, got {name!r}")
    _attention_path = name


def set_onednn(enabled: bool | None) -> None:
    """Force oneDNN's fused linear/conv kernels on CPU on (``True``: still only where the CPU runs
    them) or off (``False``); ``None`` decides by capability and batch size (:data:`ONEDNN_MIN_BATCH`)."""
    global _onednn
    if enabled is not None and not isinstance(enabled, bool):
        raise ValueError(f"set_onednn takes True, False or None, got {enabled!r}")
    _onednn = enabled


@contextmanager
def forced(*, attention_path: object = _KEEP, onednn: object = _KEEP, cpu_bf16: object = _KEEP) -> Iterator[None]:
    """Within the block: the given attention path (:func:`set_attention_path`), oneDNN switch
    (:func:`set_onednn`) and answer of the CPU's bf16 probe (``cpu_bf16``: ``True``/``False``
    pretends the CPU has/lacks native bf16, ``None`` asks torch); restored on exit.

    Example:
        >>> with kernels.forced(attention_path="sdpa", onednn=False):
        ...     logits = fused(images)
    """
    global _cpu_bf16
    saved = (_attention_path, _onednn, _cpu_bf16)
    try:
        if attention_path is not _KEEP:
            set_attention_path(attention_path)  # type: ignore[arg-type]
        if onednn is not _KEEP:
            set_onednn(onednn)  # type: ignore[arg-type]
        if cpu_bf16 is not _KEEP:
            _cpu_bf16 = cpu_bf16  # type: ignore[assignment]
        yield
    finally:
        set_attention_path(saved[0])
        set_onednn(saved[1])
        _cpu_bf16 = saved[2]


# ---- what this machine can run ---------------------------------------------------------------
def cpu_bf16_supported() -> bool:
    """Whether this CPU has native bf16 instructions for oneDNN (AVX-512 BF16, AMX, AVX-NE-CONVERT)."""
    if _cpu_bf16 is not None:
        return _cpu_bf16
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def attention_path(device: torch.device | str, dtype: torch.dtype = torch.float32) -> str:
    """The eager attention implementation for ``device``: ``"per_image"``, ``"matmul"`` or ``"sdpa"``.

    The two batched forms run over all images and heads at once, so nothing loops over the batch in
    Python: ``matmul`` (two batched matmuls, the bias added in place) on the CPU, where SDPA with an
    additive mask runs slower (docs/speed.md, "Attention paths"); ``sdpa`` (one
    ``scaled_dot_product_attention``, the bias as an additive mask) on every other device (CUDA,
    ``meta``, ...). ``per_image`` (one batched GEMM over
    the heads per image, written in place) is used for fp32 on CPUs running at most
    :data:`PER_IMAGE_MAX_THREADS` threads (one). :func:`set_attention_path` overrides all.
    """
    if _attention_path is not None:
        return _attention_path
    if torch.device(device).type == "cpu":
        one_thread = torch.get_num_threads() <= PER_IMAGE_MAX_THREADS
        return "per_image" if one_thread and dtype == torch.float32 else "matmul"
    return "sdpa"


def _portable() -> bool:
    """Whether a graph is being captured (inductor, export, jit): plain ops only, no probes."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting()


def onednn_ok(x: Tensor) -> bool:
    """Whether oneDNN's fused linear/conv kernels should run ``x``: CPU inference in eager mode only,
    from :data:`ONEDNN_MIN_BATCH` images up (or as :func:`set_onednn` forces), bf16 only where the CPU
    has bf16 instructions (elsewhere oneDNN's bf16 kernels raise)."""
    if _portable():
        return False  # inductor does its own fusion; traced graphs stay portable (checked first: no graph break)
    if _onednn is False or (_onednn is None and x.shape[0] < ONEDNN_MIN_BATCH):
        return False
    return (
        x.device.type == "cpu"
        and (x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and cpu_bf16_supported()))
        and not torch.is_grad_enabled()  # no autograd formula: training/grad mode takes the plain path
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


# ---- the kernels the inference layers call (leaves for torch.fx) -----------------------------------
@torch.fx.wrap
def linear(x: Tensor, weight: Tensor, bias: Tensor | None, act: str = "none", residual: Tensor | None = None) -> Tensor:
    """``act(x @ weight.T + bias)`` or ``residual + x @ weight.T + bias``, as ONE oneDNN kernel on CPU
    when :func:`onednn_ok`: bias, Hardswish and the residual addition run in the GEMM's epilogue instead
    of as extra passes over memory. ``act`` is ``"none"`` or ``"hardswish"``."""
    if weight.dtype == x.dtype and onednn_ok(x):
        if residual is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, act, [], "")
    y = F.linear(x, weight, bias)
    if act == "hardswish":
        y = F.hardswish(y)
    return y if residual is None else residual + y


@torch.fx.wrap
def conv_stem(
    x: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor],
    strides: Sequence[tuple[int, int]],
    paddings: Sequence[tuple[int, int]],
) -> Tensor:
    """The patch-embedding stem: the convolutions in order, a Hardswish between two (none after the last).

    On CPU it runs channels-last (oneDNN's convolutions are faster so), each convolution with its bias
    and Hardswish as one oneDNN kernel when :func:`onednn_ok`; bf16 input on a CPU without native bf16
    runs the stem in fp32 (oneDNN's bf16 convolutions raise there and the fallback is slow; the weights
    are tiny) and hands bf16 on.
    """
    n = len(weights)

    def plain(y: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        for i, (w, b, s, p) in enumerate(zip(weights, biases, strides, paddings)):
            w, b = (w, b) if dtype is None else (w.to(dtype), b.to(dtype))
            y = F.conv2d(y, w, b, s, p)
            if i < n - 1:
                y = F.hardswish(y)
        return y

    if x.device.type != "cpu":
        return plain(x)
    if x.dtype == torch.bfloat16 and not _portable() and not cpu_bf16_supported():
        return plain(x.float().contiguous(memory_format=torch.channels_last), torch.float32).to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    if x.dtype != weights[0].dtype or not onednn_ok(x):
        return plain(x)
    for i, (w, b, s, p) in enumerate(zip(weights, biases, strides, paddings)):  # conv + bias + Hardswish
        act = "hardswish" if i < n - 1 else "none"
        x = torch.ops.mkldnn._convolution_pointwise(x, w, b, list(p), list(s), [1, 1], 1, act, [], "")
    return x


def _sdpa(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    """One fused attention over all images and heads, the bias an additive mask. (B, H, N_q, Dv)."""
    return F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias, scale=scale
    )


def _scores_to_probs(attn: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    """``softmax(attn * scale + bias)`` over keys, in place on the fresh scores (autograd saves the
    inputs of a matmul, not its output, so writing over it is safe in training too). The scale is
    applied after the product, as the authors' code and timm do, so the trained form matches them."""
    if scale != 1.0:
        attn = attn.mul_(scale)
    if bias is not None:  # None: no attention bias (Table 5, ablation A5)
        attn = attn.add_(bias)
    return attn.softmax(dim=-1)


def _matmul(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    """Two batched matmuls over all images and heads. (B, H, N_q, Dv)."""
    attn = _scores_to_probs(torch.matmul(q.transpose(1, 2), k.permute(0, 2, 3, 1)), bias, scale)  # (B, H, N_q, N_k)
    return torch.matmul(attn, v.transpose(1, 2))


def _per_image(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    """One batched GEMM over the heads per image, straight on the strided views, written in place
    (no autograd formula for ``out=``: inference only). (B, H, N_q, Dv), a view of a (B, N_q, H, Dv) buffer."""
    B, Nq, H, _ = q.shape
    out = q.new_empty(B, Nq, H, v.shape[-1])
    for b in range(B):
        attn = _scores_to_probs(torch.bmm(q[b].transpose(0, 1), k[b].permute(1, 2, 0)), bias, scale)  # (H, N_q, N_k)
        torch.bmm(attn, v[b].transpose(0, 1), out=out[b].transpose(0, 1))
    return out.transpose(1, 2)


_PATHS = {"per_image": _per_image, "matmul": _matmul, "sdpa": _sdpa}


def _path_for(q: Tensor) -> str:
    """The one place the attention implementation of a call is chosen. Traced graphs (ONNX, OpenVINO,
    TorchScript) get ``sdpa``, the one fused attention op the runtimes optimise; autograd,
    ``torch.compile`` and ``torch.export`` get ``matmul``, plain batched matmuls that every backward
    and compiler takes; eager inference gets what :func:`attention_path` picks for the device."""
    if torch.jit.is_tracing():
        return "sdpa"
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return "matmul"
    return attention_path(q.device, q.dtype)


@torch.fx.wrap
def attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, act: bool = True, scale: float = 1.0) -> Tensor:
    """``act(softmax(q k^T * scale + bias) v)`` for token-major views, heads concatenated: the
    attention of both forms of both attention layers, written once.

    q: (B, N_q, H, D), k: (B, N_k, H, D), v: (B, N_k, H, Dv) (strided views into the projection
    outputs), bias: (H, N_q, N_k) or ``None`` (no attention bias, Table 5's A5). ``scale``: the
    trained form passes D^-0.5; the inference form folds it into q and passes 1. ``act``: a Hardswish
    on the result (``False``: the caller applies its own, or none, as in Table 5's A7).
    Returns (B, N_q, H*Dv).

    Eager inference takes the path :func:`attention_path` picks for the device: batched over images
    and heads (``scaled_dot_product_attention`` on GPUs and ``meta``, batched matmuls on the CPU) or
    the per-image loop (one CPU thread, fp32); see :func:`_path_for` for traced, compiled and
    autograd calls.
    """
    B, Nq, H, _ = q.shape
    x = _PATHS[_path_for(q)](q, k, v, bias, scale)  # (B, H, N_q, Dv)
    x = x.transpose(1, 2).reshape(B, Nq, H * v.shape[-1])
    if not act:
        return x
    return F.hardswish(x, inplace=not torch.is_grad_enabled() and not _portable())
