"""ExecuTorch programs (``.pte``): lower an inference module to XNNPACK and run it in ExecuTorch's runtime.

ExecuTorch is PyTorch's on-device runtime; its XNNPACK backend runs the same kernels on ARM (phones,
edge boards) and x86, so a program lowered and checked here runs unchanged on Android and iOS.
:func:`lower` takes a module through ``torch.export`` and ``to_edge_transform_and_lower`` with the
XNNPACK partitioner, in fp32 or in int8 (PT2E static quantization with XNNPACK's quantizer,
calibrated on the caller's images); :class:`Program` runs the result, here or anywhere the Python
runtime is installed.

Before lowering, a few shape operations of the exported graph are rewritten into equivalent ones
that XNNPACK runs (:func:`xnnpack_friendly`), so that the whole fixed-batch LeViT becomes ONE
XNNPACK subgraph instead of dozens separated by ExecuTorch's portable kernels: the q/k/v
``split`` becomes slices (``split_with_sizes`` also makes ExecuTorch's edge conversion fix a
dynamic batch to the example's), the 4-D attention ``matmul`` a ``bmm`` on 3-D views, the shrink
attention's stride-2 subsampling (the paper's Section 4.2, "shrink attention") a reshape and a
stride-1 slice, the token average before the classifier a 4-D mean, and the stem's channels-last
copy (an eager oneDNN layout hint) is dropped. With a dynamic batch, which XNNPACK neither slices
nor views by its symbol, the q/k/v slices become linear layers of their weight rows, the
subsampling a 1x1 convolution of stride 2, and every view names the batch as -1, so that the fp32
program is one subgraph too. Every rewrite moves the same numbers.

Only this module and the ``executorch`` package talk to each other: :mod:`levit.runtime.deploy` runs
programs through it (backend ``executorch``), :mod:`levit.runtime.edge` writes and proves ``.pte`` files.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import operator
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.fx.passes.infra.pass_base import PassResult

from ..errors import LeViTError
from ..utils import first_line

__all__ = [
    "INT8_ACTIVATIONS",
    "PRECISIONS",
    "ExecuTorchError",
    "Lowered",
    "Program",
    "available",
    "check_available",
    "get_threads",
    "lower",
    "set_threads",
    "xnnpack_friendly",
]

PRECISIONS = ("fp32", "int8")
# int8 activations: "dynamic" quantizes the inputs of the linear layers per token while the program
# runs (XNNPACK's dynamically quantized GEMMs); "static" quantizes the inputs of the linear layers
# and convolutions per tensor, with scales calibrated beforehand. Dynamic is the default: a scale per
# token follows LeViT's activations, whose range varies from token to token, closer than one
# calibrated scale per tensor, at about the same speed (docs/edge.md measures both with benchmarks/edge.py).
INT8_ACTIVATIONS = ("dynamic", "static")

_aten = torch.ops.aten


class ExecuTorchError(LeViTError, RuntimeError):
    """ExecuTorch is missing, or a program could not be built, loaded or run."""


def available() -> bool:
    """Whether the ``executorch`` package (``pip install 'levit[edge]'``) is installed."""
    return importlib.util.find_spec("executorch") is not None


def check_available() -> None:
    """Raise :class:`ExecuTorchError` naming the extra to install when ExecuTorch is missing."""
    if not available():
        raise ExecuTorchError("ExecuTorch is not installed: pip install 'levit[edge]'")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Python warnings and torch's log warnings raised while exporting and lowering stay unprinted:
    they are about torch/ExecuTorch internals, not about the user's model."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def native_log() -> Iterator[list[str]]:
    """Send the process's stderr (file descriptor 2) to a temporary file for the block; the list it
    yields holds those lines once the block has ended.

    ExecuTorch's runtime logs from C++ (on x86, for instance, a few lines about ARM CPU files it
    cannot find); the CLI keeps its one-line output, and a failure quotes the runtime's reason.
    Python writes to ``sys.stderr`` inside the block land there too.
    """
    lines: list[str] = []
    with tempfile.TemporaryFile() as tmp:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines.extend(tmp.read().decode(errors="replace").splitlines())


def _reason(lines: list[str]) -> str:
    """The runtime's own explanation among its log lines (an ``Attempted ...`` / ``Check failed`` line)."""
    for ln in lines:
        msg = ln.split("] ", 1)[-1].strip()
        if msg and not msg.startswith(("Reading file", "Failed to open midr", "CPU info", "Resetting")):
            return msg
    return ""


# ---- threads -------------------------------------------------------------------------------------
def _portable_lib():
    with _quiet():
        from executorch.extension.pybindings import portable_lib

    return portable_lib


_pool_made = False
# bumped by every resize of the threadpool: XNNPACK's delegates keep the pool they were loaded with,
# and a resize frees it, so a Program loaded before a resize loads itself again (Program._execute)
_pool_generation = 0


def get_threads() -> int:
    """Threads in ExecuTorch's threadpool (XNNPACK runs on it; by default one per core)."""
    global _pool_made
    lib = _portable_lib()
    if _pool_made:
        return int(lib._threadpool_get_thread_count())
    with native_log():  # the threadpool is made on first use, and logs reading the CPU's description
        n = int(lib._threadpool_get_thread_count())
    _pool_made = True
    return n


def set_threads(n: int) -> None:
    """Resize ExecuTorch's process-wide threadpool to ``n`` threads (XNNPACK's kernels run on it).

    ExecuTorch's Python bindings expose this as ``_unsafe_reset_threadpool`` (experimental: it must
    not be called while a program runs on another Python thread). The old pool is freed, and the
    XNNPACK delegates of programs loaded before still point at it: every :class:`Program` loads
    itself again before its next call (running such a program otherwise crashes the process). A
    no-op when ``n`` threads already run. On a phone the app sets it through the runtime's C++
    threadpool API.
    """
    global _pool_generation
    if n < 1:
        raise ExecuTorchError(f"threads must be >= 1, got {n}")
    if get_threads() != n:
        with native_log():  # "Resetting threadpool to n threads."
            _portable_lib()._unsafe_reset_threadpool(int(n))
        _pool_generation += 1


# ---- graph rewrites ---------------------------------------------------------------------------------
def _shape(node: torch.fx.Node) -> list:
    return list(node.meta["val"].shape)


def _static(shape: list) -> list[int]:
    """A view shape XNNPACK takes: a symbolic size (a dynamic batch) becomes the one inferred -1."""
    return [s if isinstance(s, int) else -1 for s in shape]


def _split_to_slices(g: torch.fx.Graph, n: torch.fx.Node) -> None:
    x, sizes = n.args[0], list(n.args[1])
    dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    for user in list(n.users):
        if user.target is not operator.getitem:
            return
    for user in list(n.users):
        i = user.args[1]
        with g.inserting_before(user):
            s = g.call_function(_aten.slice.Tensor, (x, dim, starts[i], starts[i] + sizes[i]))
        s.meta = dict(user.meta)
        user.replace_all_uses_with(s)
        g.erase_node(user)
    g.erase_node(n)


def _matmul_to_bmm(g: torch.fx.Graph, n: torch.fx.Node) -> torch.fx.Node | None:
    a, b = n.args
    sa, sb = _shape(a), _shape(b)
    if len(sa) != 4 or len(sb) != 4 or sa[1] != sb[1] or not all(isinstance(s, int) for s in sa[1:] + sb[1:]):
        return None
    with g.inserting_before(n):  # (B, H, M, K) @ (B, H, K, N) as (B*H, M, K) @ (B*H, K, N)
        a3 = g.call_function(_aten.reshape.default, (a, [-1, *sa[2:]]))
        b3 = g.call_function(_aten.reshape.default, (b, [-1, *sb[2:]]))
        c = g.call_function(_aten.bmm.default, (a3, b3))
        return g.call_function(_aten.reshape.default, (c, _static(_shape(n))))


def _dynamic(node: torch.fx.Node) -> bool:
    """Whether ``node``'s value has a symbolic size (a dynamic batch)."""
    return not all(isinstance(s, int) for s in _shape(node))


def _stride2_slice(g: torch.fx.Graph, n: torch.fx.Node, convolve: bool) -> torch.fx.Node | None:
    """``x[..., ::2, ...]`` on a static dim of even size s: view the dim as (s/2, 2) and keep index 0
    of each pair (a stride-1 slice). An odd s (a 7x7 grid at 224 px) takes the even part that way
    and concatenates the last row: the same elements.

    XNNPACK slices only tensors of static shape, so with ``convolve`` a tensor with a dynamic batch
    is subsampled by a 1x1 convolution of stride 2 whose one weight is 1 instead: the same elements
    in fp32 (x * 1.0), and one XNNPACK op."""
    x, d = n.args[0], n.args[1]
    sx = _shape(x)
    d %= len(sx)
    size = sx[d]
    start, end = n.args[2], n.args[3]
    if not isinstance(size, int) or size < 2 or start != 0 or end < size or d == 0:
        return None
    if convolve and _dynamic(x):
        after = math.prod(sx[d + 1 :])
        if not all(isinstance(s, int) for s in sx[d + 1 :]):
            return None
        one = _constant(g, torch.ones(1, 1, 1, 1), "subsample_one")
        with g.inserting_before(n):  # (B*before, 1, s, after) -> (B*before, 1, ceil(s/2), after)
            v = g.call_function(_aten.reshape.default, (x, [-1, 1, size, after]))
            c = g.call_function(_aten.conv2d.default, (v, one, None, [2, 1]))
            return g.call_function(_aten.reshape.default, (c, _static(_shape(n))))
    even = size - size % 2
    with g.inserting_before(n):
        head = x if even == size else g.call_function(_aten.slice.Tensor, (x, d, 0, even))
        v = g.call_function(_aten.view.default, (head, _static([*sx[:d], even // 2, 2, *sx[d + 1 :]])))
        s = g.call_function(_aten.slice.Tensor, (v, d + 1, 0, 1))
        out = g.call_function(_aten.reshape.default, (s, _static([*sx[:d], even // 2, *sx[d + 1 :]])))
        if even != size:
            last = g.call_function(_aten.slice.Tensor, (x, d, even, size))
            out = g.call_function(_aten.cat.default, ([out, last], d))
        return out


def _token_mean(g: torch.fx.Graph, n: torch.fx.Node) -> torch.fx.Node | None:
    """``x.mean(1)`` of (B, N, C) tokens as XNNPACK's global average pool: a 4-D mean over (2, 3)."""
    x = n.args[0]
    if len(_shape(x)) != 3 or list(n.args[1]) not in ([1], [-2]) or (len(n.args) > 2 and n.args[2]) or n.kwargs:
        return None
    B, N, C = _static(_shape(x))
    with g.inserting_before(n):
        t = g.call_function(_aten.permute.default, (x, [0, 2, 1]))
        v = g.call_function(_aten.reshape.default, (t, [B, C, N, 1]))
        m = g.call_function(_aten.mean.dim, (v, [2, 3], True))
        return g.call_function(_aten.reshape.default, (m, [B, C]))


def _constant(g: torch.fx.Graph, value: Tensor, stem: str) -> torch.fx.Node:
    """A new parameter of ``g``'s module holding ``value``, read by a ``get_attr`` at the graph's start."""
    gm = g.owning_module
    stem = stem.replace(".", "_")
    name, i = stem, 0
    while hasattr(gm, name):
        i += 1
        name = f"{stem}_{i}"
    gm.register_parameter(name, nn.Parameter(value.detach().clone(), requires_grad=False))
    with g.inserting_before(next(iter(g.nodes))):
        node = g.get_attr(name)
    node.meta["val"] = value
    return node


def _heads_slice(g: torch.fx.Graph, n: torch.fx.Node) -> torch.fx.Node | None:
    """A slice of each head's channels out of a linear layer's output viewed as (B, N, heads, per),
    the q/k/v split of attention: the linear layer of just those rows of the weight, viewed as
    (B, N, heads, width). The same numbers (the same dot products), and no slice of a tensor with a
    dynamic batch, which XNNPACK does not take."""
    view, d, start, end = n.args[:4]
    if (len(n.args) > 4 and n.args[4] != 1) or view.target != _aten.view.default:
        return None
    lin = view.args[0]
    shape = _shape(view)
    if lin.target != _aten.linear.default or len(shape) != 4 or d % 4 != 3 or len(lin.users) != 1:
        return None
    if not all(isinstance(s, int) for s in [*shape[1:], start, end]):
        return None
    if not all(a.op == "get_attr" for a in lin.args[1:] if a is not None):
        return None
    heads, per = shape[2], shape[3]
    end = min(end, per)
    rows = [h * per + j for h in range(heads) for j in range(start, end)]
    w = operator.attrgetter(lin.args[1].target)(g.owning_module)
    b = operator.attrgetter(lin.args[2].target)(g.owning_module) if len(lin.args) > 2 and lin.args[2] else None
    if w.shape[0] != heads * per:
        return None
    weight = _constant(g, w[rows], f"{lin.args[1].target}_{start}_{end}")
    bias = None if b is None else _constant(g, b[rows], f"{lin.args[2].target}_{start}_{end}")
    with g.inserting_before(n):
        out = g.call_function(_aten.linear.default, (lin.args[0], weight, bias))
        return g.call_function(_aten.view.default, (out, _static([*shape[:3], end - start])))


def _batch_as_inferred(gm: torch.fx.GraphModule) -> PassResult:
    """ExecuTorch edge pass: every ``view_copy`` whose shape names the dynamic batch's symbol (torch's
    decompositions write the inferred size out) gets its sizes written out, the batch as the one
    inferred size, -1. XNNPACK takes a view with one inferred size, not one with a symbolic size; -1
    infers the same size."""
    changed = False
    for n in gm.graph.nodes:
        if n.op != "call_function" or "view_copy" not in str(n.target) or not isinstance(n.meta.get("val"), Tensor):
            continue
        out = list(n.meta["val"].shape)  # the sizes the view makes, -1 resolved
        if any(not isinstance(s, int) for s in n.args[1]) and sum(not isinstance(s, int) for s in out) == 1:
            n.args = (n.args[0], _static(out), *n.args[2:])
            changed = True
    gm.graph.eliminate_dead_code()  # the symbolic arithmetic those sizes were
    gm.recompile()
    return PassResult(gm, changed)


def xnnpack_friendly(gm: torch.fx.GraphModule, *, convolve: bool = True) -> torch.fx.GraphModule:
    """Rewrite, in place, the ops of an exported ATen graph (``torch.export.export(...).module()``)
    that XNNPACK does not take into equivalent ones it does; returns ``gm``.

    ``split_with_sizes`` -> slices; 4-D ``matmul`` -> ``bmm``; stride-2 slices -> reshape + slice;
    ``mean`` over the tokens of (B, N, C) -> a 4-D mean; a channels-last ``contiguous`` -> nothing.
    Anything else is left as it is (it then runs in ExecuTorch's portable kernels).

    A graph exported with a dynamic batch gets two more, because XNNPACK slices no tensor of dynamic
    shape: the q/k/v slices become linear layers of the matching weight rows; with ``convolve``, the
    stride-2 subsampling becomes a 1x1 convolution of stride 2 with weight 1. ``convolve=False``
    keeps that convolution out of a graph that is quantized next (the quantizer would round the
    copy it makes). Its views, which XNNPACK takes only with the batch as -1, are written so on the
    edge graph, where torch's decompositions have made them (:func:`lower`'s edge pass).
    """
    g = gm.graph
    for n in list(g.nodes):
        if n.op != "call_function":
            continue
        if n.target == _aten.split_with_sizes.default:
            _split_to_slices(g, n)
            continue
        if n.target == _aten.contiguous.default and n.kwargs.get("memory_format") == torch.channels_last:
            n.replace_all_uses_with(n.args[0])
            g.erase_node(n)
            continue
        out = None
        if n.target == _aten.matmul.default:
            out = _matmul_to_bmm(g, n)
        elif n.target == _aten.slice.Tensor and len(n.args) == 5 and n.args[4] == 2:
            out = _stride2_slice(g, n, convolve)
        elif n.target == _aten.mean.dim:
            out = _token_mean(g, n)
        if out is not None:
            out.meta = dict(n.meta)  # the same value: later rewrites read its shape
            n.replace_all_uses_with(out)
            g.erase_node(n)
    for n in list(g.nodes):  # a dynamic batch: the q/k/v slices made above
        out = None
        if n.op != "call_function" or not isinstance(n.meta.get("val"), Tensor) or not _dynamic(n):
            continue
        if n.target == _aten.slice.Tensor:
            out = _heads_slice(g, n)
        if out is not None:
            out.meta = dict(n.meta)
            n.replace_all_uses_with(out)
            g.erase_node(n)
    g.eliminate_dead_code()
    g.lint()
    gm.recompile()
    return gm


# ---- lowering --------------------------------------------------------------------------------------
def _chunks(images: Tensor, batch: int, fixed: bool) -> Iterator[Tensor]:
    """``images`` in batches of ``batch``; with ``fixed`` the last one is filled up with the first images."""
    for c in images.split(batch):
        if fixed and c.shape[0] < batch:
            c = torch.cat([c, images.repeat((batch // images.shape[0]) + 1, 1, 1, 1)[: batch - c.shape[0]]])
        yield c


@dataclass(frozen=True)
class Lowered:
    """A lowered program: its ``.pte`` bytes, and how much of it XNNPACK runs."""

    data: bytes
    xnnpack_subgraphs: int  # XNNPACK delegates; 1: the whole network in one
    ops_outside: int  # tensor ops left to ExecuTorch's portable kernels, between the subgraphs


def _parts(graph: torch.fx.Graph) -> tuple[int, int]:
    """(XNNPACK subgraphs, tensor ops outside them) of a lowered edge graph."""
    calls = [n for n in graph.nodes if n.op == "call_function"]
    delegates = sum("executorch_call_delegate" in str(n.target) for n in calls)
    outside = [
        n
        for n in calls
        if n.target is not operator.getitem
        and isinstance(n.meta.get("val"), Tensor)
        and "executorch_call_delegate" not in str(n.target)
    ]
    return delegates, len(outside)


def lower(
    module: nn.Module,
    example: Tensor,
    *,
    precision: str = "fp32",
    calibration: Tensor | None = None,
    max_batch: int | None = None,
    int8_activations: str = "dynamic",
) -> Lowered:
    """The ExecuTorch program (``.pte`` bytes, in :class:`Lowered`) of an fp32 inference ``module``,
    lowered to XNNPACK.

    Args:
        module: takes one (B, C, H, W) float tensor (a fused LeViT, or any image classifier).
        example: a (B, C, H, W) input; its shape is the program's input shape.
        precision: ``fp32``, or ``int8``: PT2E quantization with XNNPACK's quantizer (int8 weights
            per output channel; activations as ``int8_activations`` says).
        calibration: (N, C, H, W) images for int8, run through the observers in batches of B.
        int8_activations: ``dynamic`` (per token, at run time) or ``static`` (per tensor,
            calibrated): :data:`INT8_ACTIVATIONS`.
        max_batch: ``None``: the batch is fixed to B (what phones run). Else the batch is dynamic,
            1..``max_batch`` (memory is planned for ``max_batch``).
    """
    check_available()
    if precision not in PRECISIONS:
        raise ExecuTorchError(f"ExecuTorch precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if int8_activations not in INT8_ACTIVATIONS:
        raise ExecuTorchError(
            f"int8 activations must be one of {', '.join(INT8_ACTIVATIONS)}, got {int8_activations!r}"
        )
    if precision == "int8" and (calibration is None or calibration.shape[0] == 0):
        raise ExecuTorchError("int8 needs calibration images (calibration=... / --calibration)")
    if max_batch is not None and max_batch < 2:
        raise ExecuTorchError(f"a dynamic batch needs a largest batch of at least 2, got {max_batch}")
    module = module.eval()
    example = example.detach().float().cpu().contiguous()
    dynamic = None
    if max_batch is not None:
        if example.shape[0] < 2:  # an example batch of 1 would be specialised by torch.export
            example = example.repeat(2, 1, 1, 1)[:2]
        example = example[:max_batch]
        dynamic = ({0: torch.export.Dim("batch", min=1, max=max_batch)},)
    try:
        with _quiet(), torch.no_grad():
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
            from executorch.exir import to_edge_transform_and_lower

            gm = torch.export.export(module, (example,), dynamic_shapes=dynamic).module()
            gm = xnnpack_friendly(gm, convolve=precision == "fp32")
            if precision == "int8":
                gm = _quantize(gm, calibration, example.shape[0], max_batch is None, int8_activations)
            program = torch.export.export(gm, (example,), dynamic_shapes=dynamic)
            passes = [_batch_as_inferred] if dynamic else None
            edge = to_edge_transform_and_lower(program, transform_passes=passes, partitioner=[XnnpackPartitioner()])
            subgraphs, outside = _parts(edge.exported_program().graph)
            return Lowered(bytes(edge.to_executorch().buffer), subgraphs, outside)
    except ExecuTorchError:
        raise
    except Exception as e:
        raise ExecuTorchError(f"lowering to ExecuTorch failed: {type(e).__name__}: {first_line(e)}") from e


def _quantize(
    gm: torch.fx.GraphModule, calibration: Tensor, batch: int, fixed: bool, activations: str = "dynamic"
) -> torch.fx.GraphModule:
    """PT2E int8 with XNNPACK's quantizer (activations ``dynamic`` or ``static``): observers
    inserted, ``calibration`` run, converted."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=activations == "dynamic")
    quantizer = XNNPACKQuantizer().set_global(config)
    prepared = prepare_pt2e(gm, quantizer)
    for c in _chunks(calibration.detach().float().cpu(), batch, fixed):
        prepared(c.contiguous())
    return convert_pt2e(prepared)


# ---- running ---------------------------------------------------------------------------------------
class Program:
    """A ``.pte`` program loaded in ExecuTorch's runtime: ``(N, C, H, W) -> (N, classes)`` float32.

    Inputs of any batch are run in pieces the program takes: batches of its fixed batch (the last one
    filled with zeros and the extra rows dropped) or, for a dynamic batch, of at most its largest.
    ``threads`` resizes ExecuTorch's (process-wide) threadpool before each call where it differs.
    """

    def __init__(
        self, source: bytes | str | os.PathLike, *, max_batch: int | None = None, threads: int | None = None
    ) -> None:
        check_available()
        self.threads = threads
        if threads is not None:
            set_threads(threads)
        self._what = "the program" if isinstance(source, bytes) else str(source)
        self._data = source if isinstance(source, bytes) else Path(source).read_bytes()
        self._load()
        info = self._method.metadata.input_tensor_meta(0)
        self.input_shape = tuple(int(s) for s in info.sizes())  # as planned: the example's shape
        self.max_batch = max_batch  # None: the batch is fixed to input_shape[0]

    def _load(self) -> None:
        """Load the program and its ``forward`` (XNNPACK's delegates take the threadpool of now)."""
        with _quiet():
            from executorch.runtime import Runtime

        with native_log() as log:
            try:
                self._program = Runtime.get().load_program(self._data)  # keeps the bytes alive
                self._method = self._program.load_method("forward")
                err = None
            except Exception as e:
                err = e
        if err is not None:
            why = _reason(log) or first_line(err)
            raise ExecuTorchError(f"ExecuTorch cannot load {self._what}: {why}") from err
        self._generation = _pool_generation
        self._first = True

    @property
    def batch(self) -> int:
        """The batch one call of the program runs: its fixed batch, or the largest dynamic one."""
        return self.max_batch or self.input_shape[0]

    def _execute(self, x: Tensor) -> Tensor:
        if self._generation != _pool_generation:  # the threadpool was resized since the load
            self._load()
        if self._first:  # XNNPACK sets itself up on the first call and logs from C++
            with native_log() as log:
                try:
                    out, err = self._method.execute([x]), None
                except RuntimeError as e:
                    out, err = None, e
            if err is not None:
                raise ExecuTorchError(f"the ExecuTorch program failed: {_reason(log) or first_line(err)}") from err
            self._first = False
        else:
            out = self._method.execute([x])
        return out[0]

    def __call__(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape[1:]:
            raise ValueError(
                f"expected images of shape (B, {', '.join(map(str, self.input_shape[1:]))}), got {tuple(x.shape)}"
            )
        if self.threads is not None:
            set_threads(self.threads)
        x = x.detach().float().cpu().contiguous()
        fixed = self.max_batch is None
        outs = []
        for c in x.split(self.batch):
            n = c.shape[0]
            if fixed and n < self.batch:
                c = torch.cat([c, c.new_zeros(self.batch - n, *c.shape[1:])])
            outs.append(self._execute(c.contiguous())[:n])
        return torch.cat(outs)
