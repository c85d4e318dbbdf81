"""Export the fused LeViT to ONNX, OpenVINO IR or TorchScript, and prove the file equal to PyTorch.

Every export runs the written file in its own runtime on a batch of a different size than the
one it was traced with (so the batch dimension is shown to be dynamic) and compares its logits
with the fused PyTorch model. The file only appears at ``path`` once that check has passed: it is
written under a temporary name next to ``path`` and renamed.
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import LeViTError

__all__ = ["FORMATS", "ExportError", "ExportResult", "export"]

FORMATS = {"onnx": ".onnx", "openvino": ".xml", "torchscript": ".pt"}
_PACKAGES = {"onnx": ("onnx", "onnxruntime"), "openvino": ("openvino",), "torchscript": ()}


class ExportError(LeViTError, RuntimeError):
    """The export failed or the exported file does not reproduce PyTorch's outputs."""


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export` wrote and how close the file is to PyTorch."""

    path: Path
    format: str
    max_rel_error: float  # max |exported - pytorch| / max |pytorch| on the check batch
    check_batch: int

    def __str__(self) -> str:
        return f"{self.path} ({self.format}): relative error {self.max_rel_error:.2e} vs PyTorch (batch {self.check_batch})"


def _rel_error(a: Tensor, b: Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def check_packages(fmt: str) -> None:
    """Raise :class:`ExportError` naming the extra to install when ``fmt``'s runtime is missing."""
    import importlib.util

    missing = [p for p in _PACKAGES[fmt] if importlib.util.find_spec(p) is None]
    if missing:
        raise ExportError(f"--format {fmt} needs the package(s) {', '.join(missing)}: pip install 'levit[export]'")


def _write_onnx(model: nn.Module, example: Tensor, tmp: Path, opset: int) -> None:
    torch.onnx.export(
        model,
        (example,),
        str(tmp),
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


def _write_openvino(model: nn.Module, example: Tensor, tmp: Path) -> None:
    import openvino as ov

    ov_model = ov.convert_model(model, example_input=example)
    ov_model.reshape({ov_model.inputs[0]: ov.PartialShape([-1, *example.shape[1:]])})
    ov.save_model(ov_model, str(tmp), compress_to_fp16=False)  # fp32 weights: the parity check holds


def _run_openvino(path: Path, x: Tensor) -> Tensor:
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return torch.from_numpy(compiled([x.numpy()])[compiled.outputs[0]].copy())


def _write_torchscript(model: nn.Module, example: Tensor, tmp: Path) -> None:
    traced = torch.jit.trace(model, (example,), check_trace=False)
    torch.jit.save(torch.jit.freeze(traced), str(tmp))


def _run_torchscript(path: Path, x: Tensor) -> Tensor:
    with torch.inference_mode():
        return torch.jit.load(str(path)).eval()(x)


def export(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    format: str | None = None,
    batch_size: int = 2,
    opset: int = 17,
    tolerance: float = 1e-4,
) -> ExportResult:
    """Export the fused ``model`` to ``path`` and check the file against PyTorch.

    Args:
        model: a LeViT, fused or not (it is fused first; the input is untouched).
        path: output file (``.onnx``, OpenVINO ``.xml`` (+ ``.bin`` beside it), TorchScript ``.pt``).
        format: ``onnx``, ``openvino`` or ``torchscript``; ``None`` infers it from the suffix.
        batch_size: the batch traced with; the check runs another batch size (dynamic batch).
        opset: ONNX opset.
        tolerance: the largest accepted relative error in fp32; above it :class:`ExportError`
            is raised and nothing is written.
    """
    from .fuse import FusedLeViT, fusable, fuse

    path = Path(path)
    if format is None:
        format = next((f for f, s in FORMATS.items() if path.suffix.lower() == s), None)
        if format is None:
            raise ExportError(f"cannot tell the format from {path.name!r}; give one of {', '.join(FORMATS)}")
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose from {', '.join(FORMATS)}")
    if format == "openvino" and path.suffix.lower() != ".xml":
        raise ExportError(f"an OpenVINO model is an .xml file (+ .bin beside it), got {path.name!r}")
    check_packages(format)
    if not path.parent.is_dir():
        raise ExportError(f"output folder {path.parent} does not exist")

    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise ExportError(f"export() needs a levit model, got {type(model).__name__}")
    if fusable(model):
        fused: FusedLeViT = fuse(model).float().cpu().eval()  # a new module: the input is untouched
    else:  # ablation A3: LayerNorm does not fold into the linears; export the unfused model
        warnings.warn(
            f"{model.config.name} ({model.config.ablation}) cannot be fused: exporting it unfused", stacklevel=2
        )
        fused = copy.deepcopy(model).float().cpu().eval()
    cfg = fused.config
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(batch_size, cfg.in_chans, cfg.img_size, cfg.img_size, generator=gen)
    check = torch.randn(batch_size + 1, cfg.in_chans, cfg.img_size, cfg.img_size, generator=gen)
    with torch.inference_mode():
        expected = fused(check)

    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    extra = [tmp.with_suffix(".bin")] if format == "openvino" else []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                if format == "onnx":
                    _write_onnx(fused, example, tmp, opset)
                elif format == "openvino":
                    _write_openvino(fused, example, tmp)
                else:
                    _write_torchscript(fused, example, tmp)
            except ExportError:
                raise
            except Exception as e:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise ExportError(f"{format} export failed: {type(e).__name__}: {msg}") from e
            got = {"onnx": _run_onnx, "openvino": _run_openvino, "torchscript": _run_torchscript}[format](tmp, check)
        err = _rel_error(got, expected)
        if tuple(got.shape) != tuple(expected.shape) or not err <= tolerance:
            raise ExportError(
                f"the exported {format} model does not match PyTorch: relative error {err:.2e} > {tolerance:g} "
                f"(shape {tuple(got.shape)} vs {tuple(expected.shape)}); nothing was written to {path}"
            )
        if format == "openvino":
            os.replace(tmp.with_suffix(".bin"), path.with_suffix(".bin"))
        os.replace(tmp, path)
    finally:
        for f in (tmp, *extra):
            with contextlib.suppress(FileNotFoundError):
                f.unlink()
    return ExportResult(path, format, err, int(check.shape[0]))
