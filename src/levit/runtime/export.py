"""Export the fused LeViT to ONNX, OpenVINO IR or TorchScript, and prove the file equal to PyTorch.

:func:`prove` is the one proof of every exported artifact (these formats, and ExecuTorch programs:
:func:`levit.runtime.edge.export_executorch`): the written file runs in its own runtime on
photo-like images normalised as the model's preprocessing normalises photos (:func:`proof_images`),
here on a batch of a different size than the one it was traced with (so the batch dimension is
shown to be dynamic), and its logits are compared with a float64 run of the same fused model: the
exact answer, which fp32 PyTorch itself only approximates. The accepted error is ``tolerance`` or
:data:`FP32_MARGIN` times fp32 PyTorch's own error against float64, whichever is larger, so a model
whose BatchNorm statistics make fp32 rounding visible still exports, while a wrong graph, whose
error is orders of magnitude above fp32 rounding, never does. The file only appears at ``path``
once that check has passed (written under a temporary name, then renamed).

:func:`write_onnx` and :func:`to_openvino` are the package's one ONNX export and one OpenVINO
conversion, :func:`openvino_core` its one OpenVINO runtime (the backends of :func:`levit.runtime.deploy.deploy` run on them too).
"""

from __future__ import annotations

import copy
import errno
import functools
import io
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import LeViTError
from ..utils import atomic_path, first_line, os_error_line
from .options import DEFAULT_TOLERANCE, FORMATS

__all__ = [
    "DEFAULT_TOLERANCE",
    "FORMATS",
    "FP32_MARGIN",
    "MIN_OPSET",
    "ExportError",
    "ExportResult",
    "Proof",
    "check_opset",
    "check_packages",
    "export",
    "max_opset",
    "openvino_core",
    "openvino_model_from_onnx",
    "proof_images",
    "prove",
    "rel_error",
    "resolve_format",
    "to_openvino",
    "write_onnx",
]

_PACKAGES = {"onnx": ("onnx", "onnxruntime"), "openvino": ("openvino",), "torchscript": ()}
MIN_OPSET = 14  # HardSwish is an ONNX operator from opset 14 on
# an exported file may be this many times further from float64 than fp32 PyTorch is: a runtime's
# kernels round differently from PyTorch's (other summation orders, fused operations), by the same
# order of magnitude, while a wrong graph is off by far more
FP32_MARGIN = 10.0


class ExportError(LeViTError, RuntimeError):
    """The export failed or the exported file does not reproduce PyTorch's outputs."""


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export` wrote and how close the file is to PyTorch."""

    path: Path
    format: str
    max_rel_error: float  # max |exported - float64| / max |float64| on the check batch
    check_batch: int
    torch_rel_error: float = 0.0  # the same measure for fp32 PyTorch: the rounding floor
    limit: float = DEFAULT_TOLERANCE  # the accepted error: max(tolerance, FP32_MARGIN x torch_rel_error)

    def __str__(self) -> str:
        return (
            f"{self.path} ({self.format}): relative error {self.max_rel_error:.2e} vs a float64 run of the model "
            f"(fp32 PyTorch: {self.torch_rel_error:.2e}; accepted up to {self.limit:.1e}; batch {self.check_batch})"
        )


def rel_error(a: Tensor, b: Tensor) -> float:
    """``max |a - b| / max |b|`` in float64: the measure every exported file is judged by."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@dataclass(frozen=True)
class Proof:
    """What :func:`prove` measured: the file's error against float64 and fp32 PyTorch's (both
    :func:`rel_error`), the accepted error, and the number of images."""

    max_rel_error: float
    torch_rel_error: float
    limit: float
    images: int


def proof_images(model: nn.Module, n: int, *, seed: int = 0) -> Tensor:
    """``n`` photo-like images at ``model``'s input size, normalised with the mean and std of its
    ``pretrained_cfg`` (:func:`levit.data.synthetic.photo_like_images`): the inputs of :func:`prove`."""
    from ..data.synthetic import photo_like_images
    from ..models.config import IMAGENET_MEAN, IMAGENET_STD

    cfg = model.config
    pre = getattr(model, "pretrained_cfg", None) or {}
    mean, std = pre.get("mean", IMAGENET_MEAN), pre.get("std", IMAGENET_STD)
    if len(mean) != cfg.in_chans:  # not an RGB model: every channel normalised alike
        mean, std = [sum(mean) / len(mean)] * cfg.in_chans, [sum(std) / len(std)] * cfg.in_chans
    return photo_like_images(n, cfg.img_hw, seed=seed, mean=mean, std=std)


def prove(
    fused: nn.Module,
    run: Callable[[Tensor], Tensor],
    images: Tensor,
    *,
    tolerance: float,
    what: str,
    path: str | os.PathLike,
) -> Proof:
    """Prove that ``run`` (a written file, run in its own runtime) computes ``fused`` (the fp32
    inference module it was made from) on ``images``, or raise :class:`ExportError`.

    The reference is a float64 run of ``fused``; the accepted error is ``tolerance`` or
    :data:`FP32_MARGIN` times fp32 PyTorch's own error, whichever is larger. ``what`` names the file
    in the error ("the exported onnx model"), which also says that nothing was written to ``path``.
    """
    with torch.inference_mode():
        exact = copy.deepcopy(fused).double()(images.double())  # float64: the answer fp32 only approximates
        torch_err = rel_error(fused(images), exact)
    limit = max(tolerance, FP32_MARGIN * torch_err)
    got = run(images)
    err = rel_error(got, exact) if tuple(got.shape) == tuple(exact.shape) else float("inf")
    if not err <= limit:
        raise ExportError(
            f"{what} does not match PyTorch: relative error {err:.2e} vs float64 > {limit:.1e} "
            f"(fp32 PyTorch: {torch_err:.2e}; shape {tuple(got.shape)} vs {tuple(exact.shape)}); "
            f"nothing was written to {path}"
        )
    return Proof(err, torch_err, limit, int(images.shape[0]))


def check_packages(fmt: str) -> None:
    """Raise :class:`ExportError` naming the extra to install when ``fmt``'s runtime is missing."""
    import importlib.util

    missing = [p for p in _PACKAGES[fmt] if importlib.util.find_spec(p) is None]
    if missing:
        raise ExportError(f"--format {fmt} needs the package(s) {', '.join(missing)}: pip install 'levit[export]'")


def max_opset() -> int:
    """The newest ONNX opset torch's TorchScript-based exporter writes."""
    try:
        from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET

        return int(ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
    except (ImportError, AttributeError):  # pragma: no cover - private constant moved
        return 20


def check_opset(opset: int) -> None:
    """Raise :class:`ExportError` unless LeViT can be written at ``opset``."""
    hi = max_opset()
    if not MIN_OPSET <= opset <= hi:
        raise ExportError(f"ONNX opset {opset} is not supported: choose {MIN_OPSET}..{hi} (HardSwish needs opset 14)")


def write_onnx(model: nn.Module, example: Tensor, dest: str | os.PathLike | io.BytesIO, opset: int = 17) -> None:
    """Write ``model`` (an fp32 inference module) as ONNX with a dynamic batch axis: the package's
    one ONNX export (``levit export`` and :func:`levit.runtime.backend_onnxruntime.onnx_bytes`).

    The export traces the first image of ``example`` alone: the batch axis is dynamic, and the tracer
    holds every activation of the traced call until it ends, so a whole batch would cost its size
    times one image's memory (docs/field.md, "Memory", has the figures)."""
    check_opset(opset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example[:1],),
            dest if isinstance(dest, io.BytesIO) else str(dest),
            dynamo=False,
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
        )


def _run_onnx(path: Path, x: Tensor) -> Tensor:
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {"images": x.numpy()})[0])


def to_openvino(model: nn.Module, example: Tensor):
    """``model`` (an fp32 inference module) converted to an ``openvino.Model`` with a dynamic batch
    axis: the package's one OpenVINO conversion (``levit export`` and
    :func:`levit.runtime.backend_openvino.openvino_model`). It goes by way of the package's one ONNX
    export (:func:`write_onnx`), read by OpenVINO's ONNX frontend: the graph ONNX Runtime runs (input
    ``images``, output ``logits``), with the same logits and speed as a conversion by OpenVINO's
    PyTorch frontend, in less CPU time, as that frontend traces the module first (docs/inference.md gives
    the figures and their command). A module that does not
    export to ONNX, or whose export the ONNX frontend cannot read, is converted by the PyTorch frontend."""
    import openvino as ov

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            buf = io.BytesIO()
            write_onnx(model, example, buf)
            ov_model = openvino_model_from_onnx(buf.getvalue())
        except Exception:  # no ONNX export, or one the ONNX frontend cannot read: the PyTorch frontend traces it
            ov_model = ov.convert_model(model, example_input=example)
    ov_model.reshape({ov_model.inputs[0]: ov.PartialShape([-1, *example.shape[1:]])})
    return ov_model


def openvino_model_from_onnx(onnx_model: bytes):  # -> openvino.Model
    """An fp32 ONNX export (:func:`write_onnx`, batch axis dynamic) read by OpenVINO's ONNX frontend
    (``Core.read_model``): the step :func:`to_openvino` takes, for a caller that already holds the
    export. Not ``openvino.convert_model``: its Python converter sends a telemetry event per op type
    of the graph, each from a forked copy of the calling process (a copy of every page table of a
    process holding torch and the models), unless the user opted out; read_model gives the same
    graph (the same logits, bit for bit: tests/test_export.py) from OpenVINO's C++ core alone."""
    return openvino_core().read_model(onnx_model, b"")


def _write_openvino(model: nn.Module, example: Tensor, tmp: Path) -> None:
    import openvino as ov

    ov.save_model(to_openvino(model, example), str(tmp), compress_to_fp16=False)  # fp32 weights


@functools.cache
def openvino_core() -> Any:  # openvino.Core
    """The process's one ``openvino.Core``, kept for the life of the process. OpenVINO's CPU plugin
    points the calling thread's alternate signal stack at memory of its own and puts back the one it
    found when it goes: with a Core per compile, several alive at once (model lanes) and dropped in
    another order than made left the stack on freed, later reused memory, and the next Python signal
    handler (SIGCHLD after a DataLoader's workers, for one) crashed the process. One Core is also what
    OpenVINO recommends: it caches the plugin and its settings."""
    import openvino as ov

    return ov.Core()


def _run_openvino(path: Path, x: Tensor) -> Tensor:
    compiled = openvino_core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return torch.from_numpy(compiled([x.numpy()])[compiled.outputs[0]].copy())


def _write_torchscript(model: nn.Module, example: Tensor, tmp: Path) -> None:
    traced = torch.jit.trace(model, (example,), check_trace=False)
    # saved to memory, then written by Python: torch's file writer aborts the whole process when a
    # write fails (a full disk), where Python's raises an OSError that names the reason
    buf = io.BytesIO()
    torch.jit.save(torch.jit.freeze(traced), buf)
    tmp.write_bytes(buf.getbuffer())


def _run_torchscript(path: Path, x: Tensor) -> Tensor:
    with torch.inference_mode():
        return torch.jit.load(str(path)).eval()(x)


def resolve_format(path: str | os.PathLike, format: str | None = None) -> str:
    """The export format for ``path``: ``format`` when given (checked against the suffix for
    OpenVINO, whose model is an ``.xml``), else inferred from the suffix. Raises :class:`ExportError`."""
    path = Path(path)
    if format is None:
        format = next((f for f, s in FORMATS.items() if path.suffix.lower() == s), None)
        if format is None:
            suffixes = ", ".join(f"{s} ({f})" for f, s in FORMATS.items())
            raise ExportError(f"cannot tell the format from {path.name!r}: give a format or one of {suffixes}")
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose from {', '.join(FORMATS)}")
    if format == "openvino" and path.suffix.lower() != ".xml":
        raise ExportError(f"an OpenVINO model is an .xml file (+ .bin beside it), got {path.name!r}")
    return format


def _disk_full(folder: Path, model: nn.Module) -> bool:
    """Whether ``folder``'s file system has less room left than ``model``'s weights take: OpenVINO's
    C++ writer reports a full disk as a bare stream error, so the space is looked at instead (while
    the half-written file still holds what it took)."""
    import shutil

    need = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    try:
        return shutil.disk_usage(folder).free < need
    except OSError:
        return False


def _write(format: str, fused: nn.Module, example: Tensor, tmp: Path, opset: int, path: Path) -> None:
    """Write ``fused`` as ``format`` to ``tmp``; a failure is one :class:`ExportError` line naming ``path``."""
    try:
        if format == "onnx":
            write_onnx(fused, example, tmp, opset)
        elif format == "openvino":
            _write_openvino(fused, example, tmp)
        else:
            _write_torchscript(fused, example, tmp)
    except ExportError:
        raise
    except OSError as e:
        raise ExportError(f"cannot write the {format} model: {os_error_line(e, path)}") from e
    except Exception as e:
        if _disk_full(path.parent, fused):
            full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            raise ExportError(f"cannot write the {format} model: {os_error_line(full, path)}") from e
        raise ExportError(f"{format} export failed: {type(e).__name__}: {first_line(e)}") from e


def export(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    format: str | None = None,
    batch_size: int = 2,
    opset: int = 17,
    tolerance: float = DEFAULT_TOLERANCE,
) -> ExportResult:
    """Export the fused ``model`` to ``path`` and check the file against a float64 run of it.

    Args:
        model: a LeViT, fused or not (it is fused first; the input is untouched).
        path: output file (``.onnx``, OpenVINO ``.xml`` (+ ``.bin`` beside it), TorchScript ``.pt``).
        format: ``onnx``, ``openvino`` or ``torchscript``; ``None`` infers it from the suffix.
        batch_size: the example batch (TorchScript traces it, the ONNX export its first image:
            :func:`write_onnx`); the check runs another batch size (dynamic batch).
        opset: ONNX opset (14 or newer).
        tolerance: the accepted relative error against float64 (:func:`rel_error`); fp32 rounding
            is allowed on top (:data:`FP32_MARGIN` times fp32 PyTorch's own error). Above it
            :class:`ExportError` is raised and nothing is written (:func:`prove`).
    """
    from ..models.fuse import inference_form

    path = Path(path)
    format = resolve_format(path, format)
    check_packages(format)
    if format == "onnx":
        check_opset(opset)
    if not path.parent.is_dir():
        raise ExportError(f"output folder {path.parent} does not exist")
    if not tolerance > 0:
        raise ExportError(f"tolerance must be > 0, got {tolerance}")

    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise ExportError(f"export() needs a levit model, got {type(model).__name__}")
    fused = inference_form(model).float().cpu()  # a new module: the input is untouched
    example = proof_images(fused, batch_size, seed=0)
    check = proof_images(fused, batch_size + 1, seed=1)  # another batch size: the batch axis is dynamic
    companions = (".bin",) if format == "openvino" else ()
    with atomic_path(path, companions=companions) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _write(format, fused, example, tmp, opset, path)
        runner = {"onnx": _run_onnx, "openvino": _run_openvino, "torchscript": _run_torchscript}[format]
        proof = prove(
            fused,
            lambda x: runner(tmp, x),
            check,
            tolerance=tolerance,
            what=f"the exported {format} model",
            path=path,
        )
    return ExportResult(path, format, proof.max_rel_error, proof.images, proof.torch_rel_error, proof.limit)
