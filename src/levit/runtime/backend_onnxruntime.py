"""The ``onnxruntime`` backend of :func:`levit.deploy`: the fused model as ONNX, all graph
optimisations on, fp32 or int8 (static QDQ quantization calibrated on the user's images)."""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from . import cpu

__all__ = [
    "onnx_bytes",
    "onnxruntime_model",
    "onnxruntime_session",
    "quantization_options",
    "quantize_int8",
]


def onnx_bytes(module: nn.Module, example: Tensor) -> bytes:
    """``module`` (an fp32 inference module) as ONNX bytes, by the package's one ONNX export
    (:func:`levit.runtime.export.write_onnx`), batch axis dynamic."""
    from .export import write_onnx

    buf = io.BytesIO()
    write_onnx(module.float().eval(), example.float(), buf, opset=17)
    return buf.getvalue()


def quantization_options() -> dict[str, object]:
    """The keyword arguments of ONNX Runtime's ``quantize_static`` for this CPU.

    QDQ, weights per output channel, u8 activations and s8 weights (U8S8, the format ONNX Runtime's
    quantization guide recommends for CPUs). Where those kernels can saturate (:func:`levit.runtime.cpu.u8s8_saturates`:
    x86 without VNNI), the weights are quantized to 7 bits (``reduce_range``): a u8 x s7 pair sum
    then always fits the 16 bits it is added in, and the same fast kernels run. Elsewhere the weights
    keep all 8 bits.
    """
    from onnxruntime.quantization import QuantFormat, QuantType

    return {
        "quant_format": QuantFormat.QDQ,
        "per_channel": True,
        "activation_type": QuantType.QUInt8,
        "weight_type": QuantType.QInt8,
        "reduce_range": cpu.u8s8_saturates(),
    }


class _NoPreprocessingAdvice(logging.Filter):
    """Drops ONNX Runtime's advice to run its pre-processing before ``quantize_static``: a root-logger
    warning on every call, which nothing the user can do here would change (levit quantizes the
    model it exported itself)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Please consider")


@contextlib.contextmanager
def _quiet_quantization_advice() -> Iterator[None]:
    """:class:`_NoPreprocessingAdvice` on the root logger for the block; with a null handler there
    when it has none, so that ONNX Runtime's ``logging.warning`` does not configure the root logger
    for the rest of the process (``logging.basicConfig``)."""
    root, advice, null = logging.getLogger(), _NoPreprocessingAdvice(), logging.NullHandler()
    bare = not root.handlers
    root.addFilter(advice)
    if bare:
        root.addHandler(null)
    try:
        yield
    finally:
        root.removeFilter(advice)
        root.removeHandler(null)


def quantize_int8(onnx_model: bytes, calib: Tensor) -> bytes:
    """The int8 QDQ model of ``onnx_model`` (bytes), calibrated on ``calib`` (N, 3, H, W), with
    :func:`quantization_options`."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"images": c.numpy()} for c in calib.float().split(8)])

        def get_next(self) -> dict | None:
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d, "fp32.onnx"), Path(d, "int8.onnx")
        src.write_bytes(onnx_model)
        # progress output would corrupt --json output
        with contextlib.redirect_stdout(io.StringIO()), _quiet_quantization_advice():
            quantize_static(str(src), str(dst), Reader(), **quantization_options())
        return dst.read_bytes()


def onnxruntime_model(module: nn.Module, precision: str, example: Tensor, calib: Tensor | None) -> bytes:
    """``module`` exported once (:func:`onnx_bytes`) and, for ``int8``, quantized on ``calib``: the
    ONNX bytes every session (:func:`onnxruntime_session`) is built from."""
    onnx_model = onnx_bytes(module, example)
    if precision == "int8":
        onnx_model = quantize_int8(onnx_model, calib)
    return onnx_model


def onnxruntime_session(onnx_model: bytes, threads: int | None) -> Callable[[Tensor], Tensor]:
    """An ONNX Runtime CPU session of ``onnx_model`` (from :func:`onnxruntime_model`), all graph
    optimisations on, on ``threads`` intra-op threads (``None``: ONNX Runtime's default)."""
    import onnxruntime as ort

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
