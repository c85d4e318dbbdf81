"""The runtimes' choices as plain data (no torch import): the command line builds its ``--help`` from
these without loading the runtimes themselves."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from ..data import DECODERS
from ..errors import LeViTError
from ..models.config import check_crop_pct

__all__ = [
    "BACKENDS",
    "CALIBRATION_IMAGES",
    "CPU_BATCH_SIZE",
    "DEFAULT_DYNAMIC_MAX_BATCH",
    "DEFAULT_TOLERANCE",
    "EDGE_FORMAT",
    "FORMATS",
    "GPU_BATCH_SIZE",
    "PRECISIONS",
    "SUPPORTED_PRECISIONS",
    "OptionError",
    "PredictOptions",
    "check_model_options",
]

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
DEFAULT_DYNAMIC_MAX_BATCH = 32  # the largest batch of a dynamic-batch ExecuTorch program when none is given
DEFAULT_TOLERANCE = 1e-4  # relative to the float64 run; the fp32 rounding floor is added on top


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


class OptionError(LeViTError, ValueError):
    """A bad option value. ``field`` names the option; ``message`` may name others as ``{field}``
    placeholders, filled with plain names in Python and with flags (``--field-name``) by :meth:`as_flags`."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field} " + message.format_map(_Names(str)))
        self.field, self.message = field, message

    def as_flags(self) -> str:
        """The message for the command line, e.g. ``--resume needs --output FILE``."""
        return f"{_flag(self.field)} " + self.message.format_map(_Names(_flag))


class _Names(dict):
    """``str.format_map`` filler: each ``{field}`` becomes ``spell(field)``."""

    def __init__(self, spell) -> None:
        super().__init__()
        self.spell = spell

    def __missing__(self, key: str) -> str:
        return self.spell(key)


def check_model_options(options: Any) -> None:
    """The checks every job's options share (:class:`PredictOptions`, the server's ``ServeConfig``):
    ``crop_pct`` in (0, 1] or ``None``, a known ``decoder``, ``backend`` and ``precision``; an
    :class:`OptionError` naming the field otherwise."""
    if options.crop_pct is not None:
        try:
            check_crop_pct(options.crop_pct)
        except ValueError:
            raise OptionError("crop_pct", f"must be in (0, 1], got {options.crop_pct}") from None
    for name, choices in (("decoder", DECODERS), ("backend", BACKENDS), ("precision", PRECISIONS)):
        if getattr(options, name) not in choices:
            raise OptionError(name, f"must be one of {', '.join(choices)}, got {getattr(options, name)!r}")


# the most images per forward pass when the backend does not say: the CPU's lanes each run one
# batch (small batches keep a lane's working set in its core's cache); a GPU needs large batches to fill
CPU_BATCH_SIZE, GPU_BATCH_SIZE = 32, 256
# int8 without calibration images: the first input images calibrate it
CALIBRATION_IMAGES = 300
OUTPUT_SUFFIXES = (".jsonl", ".csv", ".parquet")


@dataclass(frozen=True)
class PredictOptions:
    """Everything a prediction job can be told, validated once (:class:`OptionError` names the field).

    The model: ``backend`` and ``precision`` (:func:`levit.deploy`; ``eager``/``fp32`` runs the fused
    model itself; no backend means ``eager`` for fp32 and ``auto`` otherwise), ``calibration`` images for int8 (default: the first :data:`CALIBRATION_IMAGES` inputs),
    ``device`` (``None``: the model's), ``batch_size`` (``None``: the backend's, else
    :data:`CPU_BATCH_SIZE` on a CPU and :data:`GPU_BATCH_SIZE` on a GPU), ``threads`` (CPU lanes: that
    many batches decoded and classified at once, one thread each) and ``workers`` (decoding processes;
    :func:`levit.runtime.pipeline.iter_batches` says when each is used).

    The preprocessing: ``crop_pct`` (``None``: the model's ``pretrained_cfg``), ``fast_decode``,
    ``max_pixels`` (``None``: Pillow's limit) and ``decoder`` (``pil`` or ``tensor``), as
    :meth:`levit.data.preprocess.Preprocess.from_model`; ``pixel_batches``: batches travel as uint8
    pixels and are normalised where the model runs, the same tensors (``None``: on a GPU, not on the CPU).

    The rows: ``topk`` classes each, ``include_logits``, ``class_names`` (default: the model's or
    ImageNet's); ``output`` (``.jsonl``, ``.csv`` or ``.parquet``) with ``resume`` or ``overwrite``.
    ``ray``: ``None`` runs here; ``""`` on Ray Data (the cluster already initialised, else a new local
    one), an address joins that cluster.
    """

    topk: int = 5
    batch_size: int | None = None
    device: str | None = None
    backend: str | None = None
    precision: str = "fp32"
    calibration: tuple[str, ...] | None = None
    threads: int | None = None
    workers: int | None = None
    crop_pct: float | None = None
    fast_decode: bool = False
    max_pixels: int | None = None
    decoder: str = "pil"
    pixel_batches: bool | None = None
    include_logits: bool = False
    class_names: tuple[str, ...] | None = None
    output: str | None = None
    resume: bool = False
    overwrite: bool = False
    ray: str | None = None

    def __post_init__(self) -> None:
        if self.backend is None:  # fp32: the eager model itself; else the fastest backend that has it
            object.__setattr__(self, "backend", "eager" if self.precision == "fp32" else "auto")
        for name, low in (("topk", 1), ("batch_size", 1), ("threads", 1), ("workers", 0), ("max_pixels", 1)):
            v = getattr(self, name)
            if v is not None and v < low:
                raise OptionError(name, f"must be >= {low}, got {v}")
        check_model_options(self)
        if self.calibration is not None and self.precision != "int8":
            raise OptionError("calibration", "calibrates an int8 model: add {precision} int8")
        if self.ray is not None and self.device not in (None, "cpu"):
            raise OptionError("ray", f"runs on the cluster's CPUs, not on {self.device}")
        if self.output is None:
            for name in ("resume", "overwrite"):
                if getattr(self, name):
                    raise OptionError(name, "needs {output} FILE")
            return
        if os.path.splitext(self.output)[1].lower() not in OUTPUT_SUFFIXES:
            raise OptionError(
                # the path as given: a bare name would hide which file (`/dev/null` read as 'null')
                "output",
                f"must end in {', '.join(OUTPUT_SUFFIXES)}, got {os.fspath(self.output)!r}",
            )
        if self.resume and self.overwrite:
            raise OptionError("resume", "and {overwrite} contradict each other: choose one")

    def replace(self, **changes: Any) -> PredictOptions:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def uses_runtime(self) -> bool:
        """Whether a :func:`levit.deploy` backend runs the model (anything but eager fp32)."""
        return self.backend != "eager" or self.precision != "fp32"

    def default_batch_size(self, on_cpu: bool) -> int:
        """``batch_size``, else :data:`CPU_BATCH_SIZE` on a CPU and :data:`GPU_BATCH_SIZE` elsewhere."""
        return self.batch_size or (CPU_BATCH_SIZE if on_cpu else GPU_BATCH_SIZE)
