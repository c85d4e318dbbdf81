"""The runtimes' choices as plain data (no torch import): the command line builds its ``--help`` from
these without loading the runtimes themselves."""

from __future__ import annotations

__all__ = ["BACKENDS", "DEFAULT_TOLERANCE", "EDGE_FORMAT", "FORMATS", "PRECISIONS", "SUPPORTED_PRECISIONS"]

BACKENDS = ("auto", "eager", "inductor", "onnxruntime", "openvino", "cudagraph", "executorch")
PRECISIONS = ("fp32", "bf16", "fp16", "int8")
SUPPORTED_PRECISIONS: dict[str, tuple[str, ...]] = {
    "eager": ("fp32", "bf16", "fp16"),
    "inductor": ("fp32", "bf16", "fp16"),
    "onnxruntime": ("fp32", "int8"),
    "openvino": ("fp32", "bf16", "int8"),
    "cudagraph": ("fp32", "bf16", "fp16"),
    "executorch": ("fp32", "int8"),
}
# export formats and the file suffix each is recognised by
FORMATS = {"onnx": ".onnx", "openvino": ".xml", "torchscript": ".pt"}
EDGE_FORMAT = ("executorch", ".pte")  # ExecuTorch programs (levit.runtime.edge), exported by their own path
DEFAULT_TOLERANCE = 1e-4  # relative to the float64 run; the fp32 rounding floor is added on top
