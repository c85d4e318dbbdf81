"""Run a LeViT as fast as this machine allows: one call picks a backend and a precision.

:func:`deploy` fuses the model (BN folded, heads merged) and hands it to one of

- ``eager``: the fused PyTorch module under ``torch.inference_mode``;
- ``inductor``: ``torch.compile`` with weight freezing (constant-folded, prepacked weights);
- ``onnxruntime``: the fused model exported to ONNX, all graph optimisations on;
- ``openvino``: the fused model converted with ``openvino.convert_model``;
- ``cudagraph``: the fused eager module replayed from CUDA graphs (one capture per batch shape,
  a static input buffer, the last partial batch padded): no kernel-launch overhead on a GPU;
- ``executorch``: the fused model lowered to an ExecuTorch program for XNNPACK (:mod:`levit.runtime.pte`),
  run in ExecuTorch's runtime at a fixed batch of ``batch_size``: what a phone runs;
- ``auto``: the fastest one on this machine for the precision asked for.

Reduced precisions follow what the CPU can do: bf16 oneDNN kernels only where
``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` (elsewhere plain PyTorch bf16, or fp32 for
OpenVINO and ``auto``, with a one-line warning); int8 warns on CPUs without VNNI/AMX, where it is
slower than fp32, and ``auto`` keeps fp32 there. :attr:`Predictor.precision` is what actually runs.

Precisions: ``fp32``, ``bf16`` (weights and activations in bfloat16), ``fp16`` (GPU), ``int8``
(post-training static quantization calibrated on the user's images: NNCF for OpenVINO, QDQ
quantization for ONNX Runtime). A reduced precision is only as good as its agreement with fp32, so
every :class:`Predictor` can measure it (:meth:`Predictor.fidelity_on`), and :func:`deploy` does so on
the calibration images when they are given.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import io
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import LeViTError
from ..utils import available_cpus, num_threads
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
    "cpu_bf16_supported",
    "cpu_flags",
    "cpu_int8_fast",
    "deploy",
    "deploy_lanes",
    "fidelity",
    "graphs_available",
    "load_calibration",
    "resolve",
    "resolve_backend",
]

# the package each backend (or backend + precision) needs, and the extra that installs it
_NEEDS: dict[tuple[str, str | None], tuple[str, ...]] = {
    ("onnxruntime", None): ("onnx", "onnxruntime"),
    ("openvino", None): ("openvino",),
    ("openvino", "int8"): ("openvino", "nncf"),
    ("executorch", None): ("executorch",),
}
# `auto`: measured on CPU with `benchmarks/speed_targets.py` (README, Speed); the first installed one wins
_AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "fp32": ("openvino", "onnxruntime", "inductor", "eager"),
    "bf16": ("openvino", "inductor", "eager"),
    "fp16": ("inductor", "eager"),
    "int8": ("openvino", "onnxruntime"),
}
# `auto` on a GPU, per precision: CUDA graphs up to this batch (launch-bound: graphs remove the
# per-kernel CPU cost), inductor above (fused kernels, throughput). Measured by benchmarks/gpu.py on
# one H200 (torch 2.11, fp16/bf16, LeViT-128S and LeViT-384): graphs run 7.8x / 3.3x eager at batch
# 64 and 16x / 13x at batch 1, while at batch 1024 inductor runs 1.27x / 1.54x graphs (docs/speed.md, GPU).
_AUTO_GPU_GRAPH_MAX_BATCH: dict[str, int] = {"fp32": 64, "fp16": 64, "bf16": 64}
_CPU_ONLY = ("onnxruntime", "openvino", "executorch")
_GPU_ONLY = ("cudagraph",)


class DeployError(LeViTError, ValueError):
    """An unknown backend/precision, a combination that does not exist, or a missing runtime package."""


class DeployWarning(UserWarning):
    """A precision that runs slower than asked or as another precision on this machine (one line)."""


# ---- what this CPU can do ------------------------------------------------------------------
def cpu_bf16_supported() -> bool:
    """Whether oneDNN has native bf16 kernels on this CPU (torch's own probe, as
    :func:`levit.models.kernels.cpu_bf16_supported` answers it: tests force it with ``kernels.forced``)."""
    from ..models.kernels import cpu_bf16_supported as probe

    return probe()


def cpu_flags() -> set[str] | None:
    """The CPU feature flags from ``/proc/cpuinfo`` (x86 ``flags``, ARM ``Features``); None if unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, val = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(val.split())
    return None


_INT8_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm"}  # int8 dot-product instructions


# oneDNN ISA limits (``ONEDNN_MAX_CPU_ISA`` / ``DNNL_MAX_CPU_ISA``) that leave out every int8 dot product
_ISA_WITHOUT_VNNI = {"SSE41", "AVX", "AVX2", "AVX512_CORE"}


def cpu_int8_fast() -> bool:
    """Whether int8 GEMMs beat fp32 here: VNNI (AVX-512 or AVX), AMX, or ARM dot products.

    Reads /proc/cpuinfo; when it is unreadable, falls back to torch's capability (AVX-512 CPUs
    without VNNI are rare, AVX2-only ones have no int8 dot products of that width). oneDNN limited
    to an ISA without VNNI (``ONEDNN_MAX_CPU_ISA=AVX2``, which OpenVINO's oneDNN obeys too) counts
    as no.
    """
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    if limit.strip().upper() in _ISA_WITHOUT_VNNI:
        return False
    flags = cpu_flags()
    if flags is not None:
        return bool(flags & _INT8_FLAGS)
    return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX")


def graphs_available(device: torch.device | str) -> bool:
    """Whether CUDA graphs can run on ``device`` (a CUDA device, CUDA available)."""
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


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
        fast = cpu_bf16_supported() if precision == "bf16" else cpu_int8_fast()
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
        return ("cudagraph" if small and graphs_available(device) else "inductor"), precision
    for b in _AUTO_ORDER[precision]:
        if not _missing(b, precision):
            return b, precision
    raise DeployError(f"no installed backend runs {precision}: pip install 'levit[export]'")


def resolve_backend(
    backend: str, precision: str, device: torch.device | str = "cpu", batch_size: int | None = None
) -> str:
    """The concrete backend for ``auto`` (the fastest installed one for ``precision``), else ``backend``.

    See :func:`resolve`, which also gives the precision that actually runs.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeployWarning)
        return resolve(backend, precision, device, batch_size)[0]


# ---- calibration / fidelity ----------------------------------------------------------------
def load_calibration(
    images: Tensor | Iterable[Tensor] | str | os.PathLike | Iterable[str | os.PathLike],
    img_size: int | tuple[int, int] = 224,
    limit: int | None = None,
) -> Tensor:
    """Calibration images as one (N, 3, H, W) float tensor.

    Accepts a tensor, an iterable of tensors (single images or batches), or image files/folders
    (decoded with the official evaluation preprocessing).
    """
    items = [images] if isinstance(images, (Tensor, str, os.PathLike)) else list(images)
    if items and all(isinstance(i, (str, os.PathLike)) for i in items):
        x = _read_images(items, img_size, limit)
    elif items and all(isinstance(i, Tensor) for i in items):
        x = torch.cat([t if t.ndim == 4 else t.unsqueeze(0) for t in items])
    else:
        raise LeViTError("calibration: expected a (N, 3, H, W) tensor, tensors, or image files/folders")
    if x.ndim != 4 or x.shape[1] != 3:
        raise LeViTError(f"calibration images must be (N, 3, H, W), got {tuple(x.shape)}")
    return x[:limit] if limit else x


def _read_images(paths: list, img_size: int | tuple[int, int], limit: int | None) -> Tensor:
    from ..data.images import find_images, open_rgb
    from ..data.transforms import eval_transform

    files = find_images(paths)[: limit or None]
    if not files:
        raise LeViTError(f"no images found for calibration in {', '.join(map(str, paths))}")
    tf = eval_transform(img_size)
    xs = []
    for f in files:
        try:
            xs.append(tf(open_rgb(f)))
        except Exception as e:
            raise LeViTError(f"calibration image {f} cannot be read ({type(e).__name__})") from e
    return torch.stack(xs)


def fidelity(logits: Tensor, reference: Tensor) -> dict[str, float]:
    """Agreement of ``logits`` with fp32 ``reference`` logits (both (N, classes)).

    Returns ``top1_agreement`` (fraction of images with the same arg-max), ``max_rel_error`` (the
    largest per-image max |difference| / max |reference logit|) and ``images``.
    """
    logits, reference = logits.float().cpu(), reference.float().cpu()
    agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    per_img = (logits - reference).abs().amax(-1) / reference.abs().amax(-1).clamp_min(1e-12)
    return {"images": int(reference.shape[0]), "top1_agreement": agree, "max_rel_error": per_img.max().item()}


# ---- runners: (B, 3, H, W) float32 CPU/GPU tensor -> (B, classes) ---------------------------
_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _torch_runner(module: nn.Module, precision: str, compile: bool, example: Tensor) -> Callable[[Tensor], Tensor]:
    dtype = _TORCH_DTYPES[precision]
    module = copy.deepcopy(module).eval().to(dtype)
    if compile:
        module = torch.compile(module, options={"freezing": True})

    def run(x: Tensor) -> Tensor:
        with torch.inference_mode():
            return module(x.to(dtype)).float()

    return run


# ---- CUDA graphs ---------------------------------------------------------------------------------
def _capture_cuda_graph(fn: Callable[[Tensor], Tensor], static_in: Tensor) -> tuple[Tensor, Callable[[], None]]:
    """Warm ``fn`` up on a side stream, then capture ``fn(static_in)`` into one CUDA graph.

    Returns the graph's static output and its replay function. :func:`_graph_runner` calls it via
    ``_capture`` so that tests can put a fake graph in its place on a machine without CUDA.
    """
    side = torch.cuda.Stream(device=static_in.device)
    side.wait_stream(torch.cuda.current_stream(static_in.device))
    with torch.cuda.stream(side):
        for _ in range(3):  # cuBLAS/cuDNN workspaces and autotuning happen outside the capture
            fn(static_in)
    torch.cuda.current_stream(static_in.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(static_in)
    return static_out, graph.replay


_capture = _capture_cuda_graph


def _graph_runner(module: nn.Module, precision: str) -> Callable[[Tensor], Tensor]:
    """Replay ``module`` from CUDA graphs: one capture per input shape, each with a static input buffer.

    The returned function keeps its graphs in ``run.graphs`` (shape -> (input, output, replay)).
    """
    dtype = _TORCH_DTYPES[precision]
    module = copy.deepcopy(module).eval().to(dtype)
    graphs: dict[tuple[int, ...], tuple[Tensor, Tensor, Callable[[], None]]] = {}

    @torch.inference_mode()  # the static buffers are inference tensors: only ever touched in here
    def run(x: Tensor) -> Tensor:
        key = tuple(x.shape)
        if key not in graphs:
            static_in = torch.empty(key, dtype=dtype, device=x.device)
            static_in.copy_(x)
            static_out, replay = _capture(module, static_in)
            graphs[key] = (static_in, static_out, replay)
        static_in, static_out, replay = graphs[key]
        static_in.copy_(x)
        replay()
        return static_out.to(torch.float32, copy=True)  # the static buffer is overwritten by the next replay

    run.graphs = graphs  # type: ignore[attr-defined]
    return run


def _onnx_bytes(module: nn.Module, example: Tensor) -> bytes:
    from .export import write_onnx

    buf = io.BytesIO()
    write_onnx(module.float().eval(), example.float(), buf, opset=17)
    return buf.getvalue()


def _ort_runner(
    module: nn.Module, precision: str, threads: int | None, example: Tensor, calib: Tensor | None
) -> Callable[[Tensor], Tensor]:
    import onnxruntime as ort

    onnx_model = _onnx_bytes(module, example)
    if precision == "int8":
        onnx_model = _ort_quantize(onnx_model, calib)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(onnx_model, so, providers=["CPUExecutionProvider"])

    def run(x: Tensor) -> Tensor:
        out = sess.run(None, {"images": x.detach().float().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(out)

    return run


def _ort_quantize(onnx_model: bytes, calib: Tensor) -> bytes:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"images": c.numpy()} for c in calib.float().split(8)])

        def get_next(self) -> dict | None:
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d, "fp32.onnx"), Path(d, "int8.onnx")
        src.write_bytes(onnx_model)
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(
                str(src),
                str(dst),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )
        return dst.read_bytes()


def _ov_model(module: nn.Module, example: Tensor):
    from .export import to_openvino

    return to_openvino(module.float().eval(), example.float())


def _overflow_fix():  # -> nncf's OverflowFix | None
    """NNCF's fix for int8 GEMMs without dot-product instructions (7-bit weights in every layer, so
    the u8 x s8 pair sums of AVX2/AVX-512 without VNNI cannot saturate 16 bits), else NNCF's default
    (``None``: the first layer only).

    Measured on the test suite's 64 px levit_tiny with oneDNN limited to AVX2: top-1 agreement with
    fp32 4/12 and max relative logit error 0.66 without it, 10/12 and 0.35 with it. With VNNI it
    only costs precision (LeViT-128S: 72% against 52% agreement on randomised weights).
    """
    from nncf.quantization.advanced_parameters import OverflowFix

    return None if cpu_int8_fast() else OverflowFix.ENABLE


def _ov_config(precision: str, threads: int | None) -> dict[str, object]:
    """OpenVINO's CPU compile options for ``precision``.

    The layers an int8 model leaves unquantized run in bf16 only where torch's probe reports native
    bf16 (:func:`cpu_bf16_supported`), else in f32: OpenVINO reads the CPU's bf16 flag itself, and
    where the two disagree (oneDNN limited to AVX2 by ``ONEDNN_MAX_CPU_ISA`` on an AVX-512 BF16 CPU)
    it picks bf16 kernels that it then cannot build.
    """
    config: dict[str, object] = {"PERFORMANCE_HINT": "LATENCY"}
    hint = {"fp32": "f32", "bf16": "bf16"}.get(precision) or ("bf16" if cpu_bf16_supported() else "f32")
    config["INFERENCE_PRECISION_HINT"] = hint
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
        if threads < available_cpus():
            # OpenVINO pins a compiled model's threads to cores counted from the first one, so two
            # one-thread models (levit serve's lanes, Ray actors on one machine) would share a core:
            # 2 lanes of LeViT-128S on a 2-core machine used 1.4 cores pinned, 1.8 not
            config["ENABLE_CPU_PINNING"] = False
    return config


def _ov_runner(
    module: nn.Module, precision: str, threads: int | None, example: Tensor, calib: Tensor | None
) -> Callable[[Tensor], Tensor]:
    import openvino as ov

    ov_model = _ov_model(module, example)
    if precision == "int8":
        import logging

        import nncf

        nncf.set_log_level(logging.ERROR)
        data = nncf.Dataset([c.numpy() for c in calib.float().split(8)])
        # Transformer patterns, but no SmoothQuant: on LeViT it costs fidelity (measured on real photos:
        # 85% top-1 agreement with it, 100% without; benchmarks/speed_targets.py)
        with contextlib.redirect_stdout(io.StringIO()):  # NNCF's progress bars would corrupt --json output
            ov_model = nncf.quantize(
                ov_model,
                data,
                model_type=nncf.ModelType.TRANSFORMER,
                subset_size=int(calib.shape[0]),
                advanced_parameters=nncf.AdvancedQuantizationParameters(
                    smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(convolution=-1, matmul=-1),
                    overflow_fix=_overflow_fix(),
                ),
            )
    compiled = ov.Core().compile_model(ov_model, "CPU", _ov_config(precision, threads))
    req = compiled.create_infer_request()

    def run(x: Tensor) -> Tensor:
        req.infer([x.detach().float().cpu().contiguous().numpy()], share_inputs=True)
        return torch.from_numpy(req.get_output_tensor(0).data.copy())

    return run


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
    backend, precision = resolve(backend, precision, example.device, example.shape[0])
    if precision == "int8" and calibration is None:
        raise DeployError("precision int8 needs calibration images (calibration=... / --calibration)")
    if backend == "cudagraph" and not graphs_available(example.device):
        raise DeployError(f"backend cudagraph needs a CUDA GPU with CUDA available; the model is on {example.device}")
    with num_threads(threads):
        if backend in ("eager", "inductor"):
            return _torch_runner(module, precision, backend == "inductor", example)
        if backend == "cudagraph":
            return _graph_runner(module, precision)
        module = copy.deepcopy(module).float().eval()
        if backend == "executorch":
            from .pte import Program, lower

            return Program(lower(module, example, precision=precision, calibration=calibration), threads=threads)
        if backend == "onnxruntime":
            return _ort_runner(module, precision, threads, example, calibration)
        return _ov_runner(module, precision, threads, example, calibration)


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


def deploy(
    model: nn.Module,
    *,
    backend: str = "auto",
    precision: str = "fp32",
    batch_size: int = 16,
    threads: int | None = None,
    calibration: Tensor | Iterable[Tensor] | str | os.PathLike | Iterable[str | os.PathLike] | None = None,
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
    from ..models.fuse import inference_form

    if batch_size < 1:
        raise DeployError(f"batch_size must be >= 1, got {batch_size}")
    if threads is not None and threads < 1:
        raise DeployError(f"threads must be >= 1, got {threads}")
    model = inference_form(model)  # a new module: the input is untouched
    p = next(model.parameters())
    device = p.device
    cfg = model.config
    backend, precision = resolve(backend, precision, device, batch_size)
    calib = load_calibration(calibration, cfg.img_size) if calibration is not None else None
    if calib is not None and tuple(calib.shape[-2:]) != cfg.img_hw:
        h, w = cfg.img_hw
        raise DeployError(f"calibration images are {calib.shape[-2]}x{calib.shape[-1]}, the model takes {h}x{w}")
    example = torch.zeros(batch_size, cfg.in_chans, *cfg.img_hw, device=device)
    reference = copy.deepcopy(model).float().eval()
    run = build_runner(model, backend, precision, example=example, threads=threads, calibration=calib)
    pred = Predictor(
        run,
        backend=backend,
        precision=precision,
        batch_size=batch_size,
        threads=threads,
        device=device,
        img_size=cfg.img_size,
        reference=reference,
    )
    pred(example)  # compile / warm up now, not on the user's first call
    if calib is not None and precision != "fp32":
        pred.fidelity = pred.fidelity_on(calib)
    return pred


def deploy_lanes(model: nn.Module, lanes: int, *, threads: int | None = 1, **kwargs: object) -> list[Predictor]:
    """``lanes`` copies of :func:`deploy` (``kwargs``: its other arguments), each on ``threads``
    threads: the model lanes of ``levit predict`` and ``levit serve``, which compute one batch each
    at the same time (a batch of one or two images split over every core leaves most threads waiting;
    levit.runtime.pipeline). A warning (e.g. no bf16 here) is given once, by the first copy."""
    if lanes < 1:
        raise ValueError(f"lanes must be >= 1, got {lanes}")
    copies = [deploy(model, threads=threads, **kwargs)]  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeployWarning)
        copies += [deploy(model, threads=threads, **kwargs) for _ in range(lanes - 1)]  # type: ignore[arg-type]
    return copies
