"""``levit export --format executorch``: a ``.pte`` for phones and edge boards, proven in ExecuTorch's runtime.

The paper measures LeViT on three device classes (Table 3: GPU, Intel CPU, ARM); ExecuTorch with
its XNNPACK backend is PyTorch's way onto the third. :func:`export_executorch` fuses the model,
lowers it (:func:`levit.runtime.pte.lower`: ``torch.export`` -> XNNPACK, fp32 or PT2E int8), writes
the ``.pte`` and a JSON sidecar, and proves the written file, loaded in ExecuTorch's runtime:

- fp32: by the proof of every export, :func:`levit.runtime.export.prove` (against a float64 run of
  the same fused model on photo-like images);
- int8: its top-1 agreement and largest relative logit error against the fused fp32 model on the
  calibration images are measured with :func:`levit.runtime.calibration.fidelity` (what
  :func:`levit.deploy` reports for its int8 backends); below ``min_agreement`` the file fails.

A file that fails is not written (neither is its sidecar): both are written under temporary
names and renamed once the check has passed.

The sidecar (``model.json`` beside ``model.pte``) holds what an app needs besides the program:
the variant, the input size and batch, the model's own preprocessing (resize, crop, interpolation,
mean, std: :meth:`levit.data.preprocess.Preprocess.from_model`), the precision and the class names.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..utils import atomic_path
from .calibration import CalibrationImages
from .export import DEFAULT_TOLERANCE, ExportError, proof_images, prove
from .options import DEFAULT_DYNAMIC_MAX_BATCH
from .pte import INT8_ACTIVATIONS, PRECISIONS, ExecuTorchError, Program, check_available, lower

__all__ = [
    "DEFAULT_DYNAMIC_MAX_BATCH",
    "DEFAULT_MIN_AGREEMENT",
    "FORMAT",
    "INT8_ACTIVATIONS",
    "PRECISIONS",
    "SIDECAR_FORMAT",
    "SUFFIX",
    "EdgeExportResult",
    "Int8Options",
    "export_executorch",
    "load",
    "read_sidecar",
    "sidecar_path",
]

FORMAT, SUFFIX = "executorch", ".pte"
SIDECAR_FORMAT = "levit-executorch/1"
# int8 fails below this top-1 agreement with fp32: a broken quantization (a wrong scale, a wrong
# weight) agrees on about 1/classes of the images, a working one on most of them, even on randomised
# weights whose top logits are close (docs/edge.md measures it beside levit.deploy's int8 backends)
DEFAULT_MIN_AGREEMENT = 0.5


@dataclass(frozen=True)
class Int8Options:
    """How an int8 program is quantized and accepted (:func:`export_executorch`).

    ``activations``: ``dynamic`` (the linear layers' inputs quantized per token while the program
    runs) or ``static`` (per tensor, scales calibrated): :data:`levit.runtime.pte.INT8_ACTIVATIONS`.
    ``min_agreement``: the lowest accepted top-1 agreement with fp32 on the calibration images.
    """

    activations: str = "dynamic"
    min_agreement: float = DEFAULT_MIN_AGREEMENT

    def __post_init__(self) -> None:
        if self.activations not in INT8_ACTIVATIONS:
            raise ExportError(
                f"int8 activations must be one of {', '.join(INT8_ACTIVATIONS)}, got {self.activations!r}"
            )
        if not 0 <= self.min_agreement <= 1:
            raise ExportError(f"min_agreement must be in [0, 1], got {self.min_agreement}")


@dataclass(frozen=True)
class EdgeExportResult:
    """What :func:`export_executorch` wrote and how the file did against PyTorch."""

    path: Path
    sidecar: Path
    precision: str
    batch: int  # the fixed batch, or the largest one of a dynamic batch
    dynamic_batch: bool
    size_bytes: int
    seconds: float  # lowering + writing + the check in the runtime
    images: int  # images the check ran
    max_rel_error: float  # fp32: vs float64; int8: vs fp32 PyTorch (max over images of max |diff| / max |logit|)
    torch_rel_error: float = 0.0  # fp32 PyTorch vs float64: the rounding floor (fp32 only)
    limit: float = DEFAULT_TOLERANCE  # fp32: the accepted error
    top1_agreement: float | None = None  # int8: same arg-max as fp32 PyTorch (fraction of images)
    int8_activations: str | None = None  # int8: "dynamic" or "static"
    min_agreement: float | None = None  # int8: the accepted agreement
    xnnpack_subgraphs: int = 1  # 1: XNNPACK runs the whole network, no portable kernel between parts
    metadata: dict = field(default_factory=dict, repr=False, compare=False)

    def __str__(self) -> str:
        batch = f"batch 1..{self.batch}" if self.dynamic_batch else f"batch {self.batch}"
        head = (
            f"{self.path} (executorch {self.precision}, {batch}, {self.size_bytes / 1e6:.1f} MB, "
            f"{self.seconds:.0f} s): "
        )
        if self.precision == "int8":
            head = head.replace(f"{self.precision},", f"int8, {self.int8_activations} activations,", 1)
            check = (
                f"top-1 agreement with fp32 {self.top1_agreement * 100:.1f}% on {self.images} calibration images "
                f"(accepted from {self.min_agreement * 100:.0f}%), max relative logit error {self.max_rel_error:.2e}"
            )
        else:
            check = (
                f"relative error {self.max_rel_error:.2e} vs a float64 run of the model in ExecuTorch's runtime "
                f"(fp32 PyTorch: {self.torch_rel_error:.2e}; accepted up to {self.limit:.1e}; {self.images} images)"
            )
        parts = ""
        if self.xnnpack_subgraphs != 1:  # ExecuTorch's portable kernels run between the parts, slower
            parts = f"; XNNPACK runs it in {self.xnnpack_subgraphs} parts"
        return f"{head}{check}{parts}; metadata in {self.sidecar.name}"


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON sidecar of a ``.pte`` file: ``model.pte`` -> ``model.json``."""
    return Path(path).with_suffix(".json")


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from .._version import __version__

    out = {"levit": __version__, "torch": torch.__version__}
    with contextlib.suppress(PackageNotFoundError):  # checked before exporting
        out["executorch"] = version("executorch")
    return out


def _preprocessing(model: nn.Module) -> dict:
    """The model's own preprocessing (:meth:`levit.data.preprocess.Preprocess.from_model`), spelt out
    step by step for an app that has no levit."""
    from ..data.preprocess import Preprocess

    pre = Preprocess.from_model(model)
    h, w = pre.out_hw
    if pre.crop_mode == "squash":  # both sides to img_size / crop_pct, the aspect not kept
        resize = {"resize_to": [math.floor(h / pre.crop_pct), math.floor(w / pre.crop_pct)]}
    else:
        resize = {
            "resize_shorter_side": pre.resize,
            "resize_longer_side": "floor(longer * resize_shorter_side / shorter)",
        }
    return {
        "crop_mode": pre.crop_mode,
        **resize,
        "interpolation": pre.interpolation,
        "center_crop": [h, w],
        "crop_offset": "round((resized - crop) / 2) per axis, a half rounded to even",
        "crop_pct": pre.crop_pct,
        "scale": 1 / 255,
        "mean": list(pre.mean),
        "std": list(pre.std),
        "formula": "(pixel * scale - mean[c]) / std[c], channel c in R, G, B order",
    }


def _metadata(
    model: nn.Module, path: Path, precision: str, batch: int, dynamic: bool, check: dict, activations: str | None
) -> dict:
    """The sidecar: everything an app needs besides the program."""
    from .predict import class_names_for

    cfg = model.config
    h, w = cfg.img_hw
    n = cfg.num_classes
    return {
        "format": SIDECAR_FORMAT,
        "program": path.name,
        "variant": cfg.name,
        "ablation": cfg.ablation,
        "precision": precision,
        "int8_activations": activations,
        "batch": {"min": 1, "max": batch} if dynamic else batch,
        "input": {"shape": [batch, cfg.in_chans, h, w], "dtype": "float32", "layout": "NCHW", "channels": "RGB"},
        "preprocessing": _preprocessing(model),
        "output": {"shape": [batch, n], "dtype": "float32", "kind": "logits" if n else "features"},
        "class_names": class_names_for(model) if n else [],
        "check": check,
        "versions": _versions(),
    }


def read_sidecar(path: str | os.PathLike) -> dict:
    """The sidecar of a ``.pte`` written by :func:`export_executorch` (``path`` is the ``.pte`` or the ``.json``)."""
    p = Path(path)
    side = p if p.suffix.lower() == ".json" else sidecar_path(p)
    try:
        meta = json.loads(side.read_text())
    except FileNotFoundError:
        raise ExportError(f"{side} not found: the sidecar is written beside the .pte by levit export") from None
    except (OSError, ValueError) as e:
        raise ExportError(f"{side} is not a readable JSON sidecar ({type(e).__name__})") from e
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        raise ExportError(f"{side} is not a levit ExecuTorch sidecar (expected format {SIDECAR_FORMAT!r})")
    return meta


def load(path: str | os.PathLike, *, threads: int | None = None) -> Program:
    """The ``.pte`` at ``path`` in ExecuTorch's runtime, batched as its sidecar says: a callable
    ``(N, 3, H, W) -> (N, classes)`` (:class:`levit.runtime.pte.Program`)."""
    meta = read_sidecar(path)
    batch = meta["batch"]
    return Program(Path(path), max_batch=batch["max"] if isinstance(batch, dict) else None, threads=threads)


def _fused(model: nn.Module) -> nn.Module:
    from ..models.fuse import inference_form

    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise ExportError(f"export_executorch() needs a levit model, got {type(model).__name__}")
    return inference_form(model).float().cpu().eval()  # a new module: the input is untouched


def _check_args(path: Path, precision: str, batch_size: int, dynamic_batch: bool, tolerance: float) -> None:
    if path.suffix.lower() != SUFFIX:
        raise ExportError(f"an ExecuTorch program is a {SUFFIX} file, got {path.name!r}")
    if not path.parent.is_dir():
        raise ExportError(f"output folder {path.parent} does not exist")
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r} for executorch; choose from {', '.join(PRECISIONS)}")
    if batch_size < 1:
        raise ExportError(f"batch_size must be >= 1, got {batch_size}")
    if dynamic_batch and batch_size < 2:
        raise ExportError(f"a dynamic batch runs 1..batch_size: batch_size must be >= 2, got {batch_size}")
    if not tolerance > 0:
        raise ExportError(f"tolerance must be > 0, got {tolerance}")


def _calibration(fused: nn.Module, calibration: CalibrationImages | None) -> Tensor:
    """The int8 calibration images, decoded with the model's own preprocessing."""
    from ..data.preprocess import Preprocess
    from .calibration import load_calibration

    if calibration is None:
        raise ExportError("int8 needs calibration images (calibration=... / --calibration)")
    calib = load_calibration(calibration, Preprocess.from_model(fused))
    if tuple(calib.shape[-2:]) != fused.config.img_hw:
        h, w = fused.config.img_hw
        raise ExportError(f"calibration images are {calib.shape[-2]}x{calib.shape[-1]}, the model takes {h}x{w}")
    return calib


def export_executorch(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    precision: str = "fp32",
    calibration: CalibrationImages | None = None,
    batch_size: int = 1,
    dynamic_batch: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    int8: Int8Options = Int8Options(),
) -> EdgeExportResult:
    """Export the fused ``model`` to an ExecuTorch program for XNNPACK at ``path`` (``.pte``) with its
    JSON sidecar (:func:`sidecar_path`), and check the written file in ExecuTorch's runtime.

    Args:
        model: a LeViT, fused or not (it is fused first; the input is untouched). Its ``img_size``
            (square or (H, W)) is the program's input size.
        path: the ``.pte`` file; the sidecar goes beside it as ``.json``.
        precision: ``fp32``, or ``int8`` (PT2E static quantization with XNNPACK's quantizer).
        calibration: int8: images to calibrate on and to measure the agreement with fp32 on: a
            (N, 3, H, W) tensor, tensors, or image files/folders (as for :func:`levit.deploy`).
        batch_size: the program's fixed batch (1: what phones run); with ``dynamic_batch``, its largest.
        dynamic_batch: a batch of 1..``batch_size`` instead of a fixed one.
        tolerance: fp32: the accepted relative error against float64 (:func:`levit.runtime.export.prove`).
        int8: int8: the activations' quantization and the lowest accepted agreement (:class:`Int8Options`).

    Raises :class:`levit.runtime.export.ExportError` (and writes nothing) when the export or its check fails.
    """
    path = Path(path)
    _check_args(path, precision, batch_size, dynamic_batch, tolerance)
    try:
        check_available()
    except ExecuTorchError as e:
        raise ExportError(str(e)) from None
    fused = _fused(model)
    calib = _calibration(fused, calibration) if precision == "int8" else None
    t0 = time.perf_counter()
    max_batch = batch_size if dynamic_batch else None
    try:  # the example only fixes the input's shape (and, dynamic, its largest batch)
        lowered = lower(
            fused,
            proof_images(fused, batch_size, seed=0),
            precision=precision,
            calibration=calib,
            max_batch=max_batch,
            int8_activations=int8.activations,
        )
    except ExecuTorchError as e:
        raise ExportError(str(e)) from e
    activations = int8.activations if precision == "int8" else None
    data = lowered.data
    with atomic_path(path, companions=(".json",)) as tmp:
        tmp.write_bytes(data)
        try:
            program = Program(tmp, max_batch=max_batch)
            if precision == "fp32":
                check = _check_fp32(fused, program, batch_size, dynamic_batch, tolerance, path)
            else:
                check = _check_int8(fused, program, calib, int8.min_agreement, path)
        except ExecuTorchError as e:
            raise ExportError(f"{e}; nothing was written to {path}") from e
        meta = _metadata(fused, path, precision, batch_size, dynamic_batch, check, activations)
        meta["xnnpack"] = {"subgraphs": lowered.xnnpack_subgraphs, "ops_outside": lowered.ops_outside}
        sidecar_path(tmp).write_text(json.dumps(meta, indent=1) + "\n")
    return EdgeExportResult(
        path=path,
        sidecar=sidecar_path(path),
        precision=precision,
        int8_activations=activations,
        batch=batch_size,
        dynamic_batch=dynamic_batch,
        size_bytes=len(data),
        seconds=time.perf_counter() - t0,
        xnnpack_subgraphs=lowered.xnnpack_subgraphs,
        metadata=meta,
        **check,
    )


def _check_fp32(
    fused: nn.Module, program: Program, batch_size: int, dynamic: bool, tolerance: float, path: Path
) -> dict:
    """The program proven (:func:`levit.runtime.export.prove`) on two full batches (fixed batch), or
    on one image and then three (dynamic: the batch is shown to vary)."""
    sizes = [1, min(3, batch_size)] if dynamic else [batch_size, batch_size]
    images = proof_images(fused, sum(sizes), seed=1)
    proof = prove(
        fused,
        lambda x: torch.cat([program(c) for c in x.split(sizes)]),
        images,
        tolerance=tolerance,
        what="the ExecuTorch program",
        path=path,
    )
    return {
        "images": proof.images,
        "max_rel_error": proof.max_rel_error,
        "torch_rel_error": proof.torch_rel_error,
        "limit": proof.limit,
    }


def _check_int8(fused: nn.Module, program: Program, calib: Tensor, min_agreement: float, path: Path) -> dict:
    """Top-1 agreement and max relative logit error against fp32 PyTorch on the calibration images,
    as :func:`levit.runtime.calibration.fidelity` measures them for :func:`levit.deploy`'s int8."""
    from .calibration import fidelity

    with torch.inference_mode():
        ref = torch.cat([fused(c) for c in calib.split(16)])
    got = program(calib)
    if tuple(got.shape) != tuple(ref.shape) or not torch.isfinite(got).all():
        raise ExportError(
            f"the int8 ExecuTorch program gives {'non-finite logits' if got.shape == ref.shape else tuple(got.shape)} "
            f"(expected {tuple(ref.shape)}); nothing was written to {path}"
        )
    f = fidelity(got, ref)
    if not f["top1_agreement"] >= min_agreement:
        raise ExportError(
            f"the int8 ExecuTorch program agrees with fp32 on {f['top1_agreement'] * 100:.1f}% of {f['images']} "
            f"calibration images (top-1), below the accepted {min_agreement * 100:.0f}% (max relative logit error "
            f"{f['max_rel_error']:.2e}); nothing was written to {path}"
        )
    return {
        "images": f["images"],
        "max_rel_error": f["max_rel_error"],
        "top1_agreement": f["top1_agreement"],
        "min_agreement": min_agreement,
    }
