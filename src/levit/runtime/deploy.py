"""Run a LeViT as fast as this machine allows: one call picks a backend and a precision.

:func:`deploy` fuses the model (BN folded, heads merged) and hands it to one backend, each in its
own module:

- ``eager``, ``inductor`` (``torch.compile`` with frozen weights), ``cudagraph`` (the fused eager
  module replayed from CUDA graphs): :mod:`levit.runtime.backend_torch`;
- ``onnxruntime``: the fused model exported to ONNX: :mod:`levit.runtime.backend_onnxruntime`;
- ``openvino``: the fused model's ONNX export read by OpenVINO: :mod:`levit.runtime.backend_openvino`;
- ``executorch``: the fused model lowered to an ExecuTorch program for XNNPACK (:mod:`levit.runtime.pte`),
  run in ExecuTorch's runtime at a fixed batch of ``batch_size``: what a phone runs;
- ``auto``: the fastest one on this machine for the precision asked for.

Reduced precisions follow what the CPU can do (:mod:`levit.runtime.cpu`): bf16 oneDNN kernels only
where ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` (elsewhere plain PyTorch bf16, or fp32 for
OpenVINO and ``auto``, with a one-line warning); int8 warns on CPUs without VNNI/AMX, where it is
slower than fp32, and ``auto`` keeps fp32 there. :attr:`Predictor.precision` is what actually runs.

Precisions: ``fp32``, ``bf16`` (weights and activations in bfloat16), ``fp16`` (GPU), ``int8``
(post-training static quantization calibrated on the user's images: NNCF for OpenVINO, QDQ
quantization for ONNX Runtime). A reduced precision is only as good as its agreement with fp32, so
every :class:`Predictor` can measure it (:meth:`Predictor.fidelity_on`), and :func:`deploy` does so on
the calibration images when they are given (:func:`levit.runtime.calibration.fidelity`).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import LeViTError
from ..utils import num_threads
from . import backend_torch, cpu
from .calibration import CalibrationImages, fidelity, load_calibration
from .options import BACKENDS, PRECISIONS, SUPPORTED_PRECISIONS

__all__ = [
    "BACKENDS",
    "PRECISIONS",
    "SUPPORTED_PRECISIONS",
    "DeployError",
    "DeployWarning",
    "Predictor",
    "build_runner",
    "check_backend",
    "deploy",
    "deploy_lanes",
    "prepare_runner",
    "resolve",
]


class _NoCudaRuntimeNotice(logging.Filter):
    """Drops torch's "No CUDA runtime is found" notice: its C++ extension builder logs it on a machine
    without CUDA when inductor or NNCF import it, and no backend here builds an extension."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


logging.getLogger("torch.utils.cpp_extension").addFilter(_NoCudaRuntimeNotice())

# the package each backend (or backend + precision) needs, and the extra that installs it
_NEEDS: dict[tuple[str, str | None], tuple[str, ...]] = {
    ("onnxruntime", None): ("onnx", "onnxruntime"),
    ("openvino", None): ("openvino",),
    ("openvino", "int8"): ("openvino", "nncf"),
    ("executorch", None): ("executorch",),
}
# `auto` on a CPU: the first installed one wins, in the order measured by benchmarks/speed_targets.py
# (docs/speed.md, "Deploy backends on the CPU")
_AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "fp32": ("openvino", "onnxruntime", "inductor", "eager"),
    "bf16": ("openvino", "inductor", "eager"),
    "fp16": ("inductor", "eager"),
    "int8": ("openvino", "onnxruntime"),
}
# `auto` on a GPU, per precision: CUDA graphs up to this batch, inductor above. Small batches are
# launch-bound, and graphs remove the per-kernel CPU cost; large ones are compute-bound, where
# inductor's fused kernels win and graphs add nothing (benchmarks/gpu.py; docs/speed.md, GPU)
_AUTO_GPU_GRAPH_MAX_BATCH: dict[str, int] = {"fp32": 64, "fp16": 64, "bf16": 64}
_CPU_ONLY = ("onnxruntime", "openvino", "executorch")
_GPU_ONLY = ("cudagraph",)


class DeployError(LeViTError, ValueError):
    """An unknown backend/precision, a combination that does not exist, or a missing runtime package."""


class DeployWarning(UserWarning):
    """A precision that runs slower than asked or as another precision on this machine (one line)."""


# ---- checks ------------------------------------------------------------------------------------
def _missing(backend: str, precision: str | None = None) -> list[str]:
    pkgs = _NEEDS.get((backend, precision), ()) or _NEEDS.get((backend, None), ())
    return [p for p in pkgs if importlib.util.find_spec(p) is None]


def check_backend(backend: str, precision: str) -> None:
    """Raise :class:`DeployError` (one line, naming the fix) unless ``backend`` can run ``precision`` here."""
    if backend not in BACKENDS:
        raise DeployError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise DeployError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if backend == "auto":
        return
    ok = SUPPORTED_PRECISIONS[backend]
    if precision not in ok:
        others = [b for b, p in SUPPORTED_PRECISIONS.items() if precision in p]
        raise DeployError(
            f"precision {precision} is not supported by backend {backend} (it supports {', '.join(ok)}); "
            f"backends with {precision}: {', '.join(others)}"
        )
    missing = _missing(backend, precision)
    if missing:
        extra = "edge" if backend == "executorch" else "export"
        raise DeployError(
            f"backend {backend} ({precision}) needs the package(s) {', '.join(missing)}: pip install 'levit[{extra}]'"
        )


def _warn(msg: str) -> None:
    warnings.warn(msg, DeployWarning, stacklevel=3)


def resolve(
    backend: str, precision: str, device: torch.device | str = "cpu", batch_size: int | None = None
) -> tuple[str, str]:
    """The ``(backend, precision)`` that will actually run ``precision`` on ``backend`` on ``device``.

    ``auto`` becomes the fastest installed backend. On a CPU without native bf16 (or int8 dot
    products) ``auto`` keeps fp32 and OpenVINO bf16 runs fp32 (OpenVINO would silently do so), with
    a one-line :class:`DeployWarning`; an explicit eager/inductor bf16 or int8 backend runs as asked
    and warns that it is slower than fp32 there.
    """
    check_backend(backend, precision)
    dev = torch.device(device).type
    if dev == "cpu" and backend in _GPU_ONLY:
        raise DeployError(f"backend {backend} needs a CUDA GPU; the model is on the CPU")
    if dev != "cpu" and backend in _CPU_ONLY:
        raise DeployError(f"backend {backend} runs on the CPU only; the model is on {device}")
    if dev == "cpu" and precision in ("bf16", "int8"):
        fast = cpu.cpu_bf16_supported() if precision == "bf16" else cpu.cpu_int8_fast()
        why = (
            "this CPU has no native bf16 (torch.ops.mkldnn._is_mkldnn_bf16_supported() is False)"
            if precision == "bf16"
            else "this CPU has no int8 dot-product instructions (no VNNI/AMX)"
        )
        if not fast:
            if backend == "auto":
                _warn(f"{why}: {precision} would be slower than fp32, auto runs fp32")
                precision = "fp32"
            elif backend == "openvino" and precision == "bf16":
                _warn(f"{why}: OpenVINO runs bf16 models in fp32 here, so fp32 it is")
                precision = "fp32"
            else:
                _warn(f"{why}: {backend} {precision} runs, but slower than fp32")
    if backend != "auto":
        return backend, precision
    if dev != "cpu":
        small = batch_size is not None and batch_size <= _AUTO_GPU_GRAPH_MAX_BATCH.get(precision, 0)
        return ("cudagraph" if small and backend_torch.graphs_available(device) else "inductor"), precision
    for b in _AUTO_ORDER[precision]:
        if not _missing(b, precision):
            return b, precision
    raise DeployError(f"no installed backend runs {precision}: pip install 'levit[export]'")


#: a function building one runner on the given threads (``None``: the runtime's default)
RunnerFactory = Callable[[int | None], Callable[[Tensor], Tensor]]


def prepare_runner(
    module: nn.Module,
    backend: str,
    precision: str = "fp32",
    *,
    example: Tensor,
    threads: int | None = None,
    calibration: Tensor | None = None,
) -> RunnerFactory:
    """The one-time work of :func:`build_runner` (export, conversion, int8 calibration, lowering),
    done now; returns a function that builds a runner of it on a given thread count.

    Each runner is a compiled model / session / program of its own, so runners run at the same time
    (the lanes of :func:`deploy_lanes`) at the cost of one conversion. ``threads`` is the count the
    one-time work runs on. The PyTorch backends have no one-time work: each runner is a copy.
    """
    backend, precision = resolve(backend, precision, example.device, example.shape[0])
    if precision == "int8" and calibration is None:
        raise DeployError("precision int8 needs calibration images (calibration=... / --calibration)")
    if backend == "cudagraph" and not backend_torch.graphs_available(example.device):
        raise DeployError(f"backend cudagraph needs a CUDA GPU with CUDA available; the model is on {example.device}")
    if backend in ("eager", "inductor"):
        return lambda t: backend_torch.torch_runner(module, precision, backend == "inductor")
    if backend == "cudagraph":
        return lambda t: backend_torch.graph_runner(module, precision)
    with num_threads(threads):
        module = copy.deepcopy(module).float().eval()
        if backend == "executorch":
            from .pte import Program, lower

            program = lower(module, example, precision=precision, calibration=calibration).data
            return lambda t: Program(program, threads=t)
        if backend == "onnxruntime":
            from .backend_onnxruntime import onnxruntime_model, onnxruntime_session

            onnx_model = onnxruntime_model(module, precision, example, calibration)
            return lambda t: onnxruntime_session(onnx_model, t)
        from .backend_openvino import openvino_compiled, openvino_model

        ov_model = openvino_model(module, precision, example, calibration)
        return lambda t: openvino_compiled(ov_model, precision, t)


def build_runner(
    module: nn.Module,
    backend: str,
    precision: str = "fp32",
    *,
    example: Tensor,
    threads: int | None = None,
    calibration: Tensor | None = None,
) -> Callable[[Tensor], Tensor]:
    """A function running any inference module ``module`` on ``backend`` at ``precision``.

    ``example`` is a representative input (its shape fixes H, W and the compiled batch size).
    Used by :func:`deploy` for LeViT and by the benchmark for the timm competitors. The backend and
    precision are resolved first (:func:`resolve`): pass resolved ones to know what runs.
    """
    make = prepare_runner(module, backend, precision, example=example, threads=threads, calibration=calibration)
    with num_threads(threads):
        return make(threads)


# ---- the public API ----------------------------------------------------------------------------
class Predictor:
    """A callable ``(B, 3, H, W) float tensor -> (B, classes) float32 logits`` on one backend.

    Inputs larger than ``batch_size`` are split; the fixed-shape backends (``inductor``,
    ``cudagraph``) pad the last chunk so that they never recompile or re-capture. Attributes: ``backend``, ``precision``, ``batch_size``,
    ``threads``, ``device``, ``img_size`` and ``fidelity`` (a dict, for reduced precisions measured
    on the calibration images; ``None`` otherwise).
    """

    def __init__(
        self,
        run: Callable[[Tensor], Tensor],
        *,
        backend: str,
        precision: str,
        batch_size: int,
        threads: int | None,
        device: torch.device,
        img_size: int | tuple[int, int],
        reference: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self._run, self._reference = run, reference
        self.backend, self.precision = backend, precision
        self.batch_size, self.threads, self.device, self.img_size = batch_size, threads, device, img_size
        self.fidelity: dict[str, float] | None = None

    def __repr__(self) -> str:
        return (
            f"Predictor(backend={self.backend!r}, precision={self.precision!r}, batch_size={self.batch_size}, "
            f"threads={self.threads}, device={str(self.device)!r}, fidelity={self.fidelity})"
        )

    def _chunks(self, x: Tensor) -> Iterator[Tensor]:
        yield from x.split(self.batch_size)

    def __call__(self, x: Tensor) -> Tensor:
        h, w = (self.img_size, self.img_size) if isinstance(self.img_size, int) else self.img_size
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != h or x.shape[3] != w:
            raise ValueError(f"expected images of shape (B, 3, {h}, {w}), got {tuple(x.shape)}")
        x = x.to(self.device)
        outs = []
        with num_threads(self.threads):
            for c in self._chunks(x):
                n = c.shape[0]
                if self.backend in ("inductor", "cudagraph") and n < self.batch_size:  # fixed shape: no recompiling
                    c = torch.cat([c, c.new_zeros(self.batch_size - n, *c.shape[1:])])
                outs.append(self._run(c)[:n])
        return torch.cat(outs)

    def fidelity_on(self, images: Tensor) -> dict[str, float]:
        """Top-1 agreement and max relative logit error against the fused fp32 eager model on ``images``."""
        if self._reference is None:
            raise RuntimeError("this predictor has no fp32 reference")
        with torch.inference_mode(), num_threads(self.threads):
            ref = torch.cat([self._reference(c.to(self.device)) for c in images.split(self.batch_size)])
        return fidelity(self(images), ref)


@dataclass
class _Prepared:
    """What every copy :func:`deploy` makes of one model shares: the resolved backend and precision,
    the warm-up input, the fp32 reference (read only), the calibration images, the runner factory
    (:func:`prepare_runner`) and the fidelity once measured."""

    backend: str
    precision: str
    img_size: int | tuple[int, int]
    example: Tensor
    reference: nn.Module
    calib: Tensor | None
    make: RunnerFactory
    fidelity: dict[str, float] | None = None


def _check_sizes(batch_size: int, threads: int | None) -> None:
    if batch_size < 1:
        raise DeployError(f"batch_size must be >= 1, got {batch_size}")
    if threads is not None and threads < 1:
        raise DeployError(f"threads must be >= 1, got {threads}")


def _prepare(
    model: nn.Module,
    backend: str,
    precision: str,
    batch_size: int,
    threads: int | None,
    calibration: CalibrationImages | None,
) -> _Prepared:
    """:func:`deploy`'s one-time work: fuse, resolve, load the calibration images, convert / export /
    calibrate (:func:`prepare_runner`)."""
    from ..data.preprocess import Preprocess
    from ..models.fuse import inference_form

    model = inference_form(model)  # a new module: the input is untouched
    device = next(model.parameters()).device
    cfg = model.config
    backend, precision = resolve(backend, precision, device, batch_size)
    calib = load_calibration(calibration, Preprocess.from_model(model)) if calibration is not None else None
    if calib is not None and tuple(calib.shape[-2:]) != cfg.img_hw:
        h, w = cfg.img_hw
        raise DeployError(f"calibration images are {calib.shape[-2]}x{calib.shape[-1]}, the model takes {h}x{w}")
    example = torch.zeros(batch_size, cfg.in_chans, *cfg.img_hw, device=device)
    reference = copy.deepcopy(model).float().eval()
    make = prepare_runner(model, backend, precision, example=example, threads=threads, calibration=calib)
    return _Prepared(backend, precision, cfg.img_size, example, reference, calib, make)


def deploy(
    model: nn.Module,
    *,
    backend: str = "auto",
    precision: str = "fp32",
    batch_size: int = 16,
    threads: int | None = None,
    calibration: CalibrationImages | None = None,
) -> Predictor:
    """Fuse ``model`` and put it on the fastest runtime asked for.

    Args:
        model: a LeViT (fused or not; the input is left untouched).
        backend: ``auto``, ``eager``, ``inductor``, ``onnxruntime``, ``openvino`` or ``cudagraph`` (GPU).
        precision: ``fp32``, ``bf16``, ``fp16`` or ``int8`` (int8 needs ``calibration``). Where this
            CPU lacks bf16/int8 instructions, ``auto`` (and OpenVINO bf16) run fp32 and warn; the
            returned predictor's ``precision`` says what runs.
        batch_size: the largest batch run at once (bigger inputs are split); also the compiled shape.
        threads: CPU threads (``None``: the runtime's default).
        calibration: images for int8 calibration and for the fidelity report of reduced precisions:
            a (N, 3, H, W) tensor, tensors, or image files/folders.

    Returns:
        a :class:`Predictor`; for reduced precisions with calibration images, ``predictor.fidelity``
        holds the top-1 agreement and the max relative logit error against fp32.

    Example:
        >>> pred = levit.deploy(model, backend="openvino", precision="int8", calibration="photos/")
        >>> pred.fidelity, pred(images).argmax(-1)
    """
    _check_sizes(batch_size, threads)
    return _copy(_prepare(model, backend, precision, batch_size, threads, calibration), batch_size, threads)


def _copy(prep: _Prepared, batch_size: int, threads: int | None) -> Predictor:
    """A predictor of its own (a compiled model, session or program on ``threads`` threads) on
    ``prep``, warmed up; for reduced precisions with calibration images, the fidelity measured on the
    first copy (every copy runs the same model)."""
    with num_threads(threads):
        run = prep.make(threads)
    pred = Predictor(
        run,
        backend=prep.backend,
        precision=prep.precision,
        batch_size=batch_size,
        threads=threads,
        device=prep.example.device,
        img_size=prep.img_size,
        reference=prep.reference,
    )
    pred(prep.example)  # compile / warm up now, not on the user's first call
    if prep.calib is not None and prep.precision != "fp32":
        if prep.fidelity is None:
            prep.fidelity = pred.fidelity_on(prep.calib)
        pred.fidelity = dict(prep.fidelity)
    return pred


def deploy_lanes(
    model: nn.Module,
    lanes: int,
    *,
    threads: int | None = 1,
    backend: str = "auto",
    precision: str = "fp32",
    batch_size: int = 16,
    calibration: CalibrationImages | None = None,
) -> list[Predictor]:
    """``lanes`` copies of :func:`deploy` (the same arguments), each on ``threads`` threads: the model
    lanes of ``levit predict`` and ``levit serve``, which compute one batch each at the same time (a
    batch of one or two images split over every core leaves most threads waiting;
    levit.runtime.pipeline). The model is fused, exported, converted and calibrated once for all
    copies (:func:`prepare_runner`: converting per lane made every reload of ``levit serve`` convert
    once per core); each gets a compiled model, session or program of its own, and all report the
    fidelity measured on the first. A warning (e.g. no bf16 here) is given once."""
    if lanes < 1:
        raise ValueError(f"lanes must be >= 1, got {lanes}")
    _check_sizes(batch_size, threads)
    prep = _prepare(model, backend, precision, batch_size, threads, calibration)
    copies = [_copy(prep, batch_size, threads)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeployWarning)
        copies += [_copy(prep, batch_size, threads) for _ in range(lanes - 1)]
    return copies
