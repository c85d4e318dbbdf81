"""The ``openvino`` backend of :func:`levit.deploy`: the fused model converted by
:func:`levit.runtime.export.to_openvino` (its ONNX export, read by OpenVINO), fp32, bf16 or int8
(NNCF post-training quantization calibrated on the user's images), with CPU compile options keyed on
what this CPU can do."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..utils import available_cpus
from . import cpu

if TYPE_CHECKING:
    import openvino as ov

__all__ = [
    "openvino_compiled",
    "openvino_config",
    "openvino_model",
    "overflow_fix",
    "quantize_int8",
]


def overflow_fix():  # -> nncf's OverflowFix | None
    """NNCF's fix for int8 GEMMs without dot-product instructions (7-bit weights in every layer, so
    the u8 x s8 pair sums of AVX2/AVX-512 without VNNI cannot saturate 16 bits) where
    :func:`levit.runtime.cpu.cpu_int8_fast` says no, else NNCF's default (``None``: the first layer
    only). With VNNI the fix would only cost precision; docs/inference.md measures both sides."""
    from nncf.quantization.advanced_parameters import OverflowFix

    return None if cpu.cpu_int8_fast() else OverflowFix.ENABLE


def openvino_config(precision: str, threads: int | None) -> dict[str, object]:
    """OpenVINO's CPU compile options for ``precision`` on ``threads`` threads (``None``: its default).

    The layers an int8 model leaves unquantized run in bf16 only where torch's probe reports native
    bf16 (:func:`levit.runtime.cpu.cpu_bf16_supported`), else in f32: OpenVINO reads the CPU's bf16
    flag itself, and where the two disagree (oneDNN limited to AVX2 by ``ONEDNN_MAX_CPU_ISA`` on an
    AVX-512 BF16 CPU) it picks bf16 kernels that it then cannot build.
    """
    config: dict[str, object] = {"PERFORMANCE_HINT": "LATENCY"}
    hint = {"fp32": "f32", "bf16": "bf16"}.get(precision) or ("bf16" if cpu.cpu_bf16_supported() else "f32")
    config["INFERENCE_PRECISION_HINT"] = hint
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
        if threads < available_cpus():
            # OpenVINO pins a compiled model's threads to cores counted from the first one, so two
            # one-thread models (levit serve's lanes, Ray actors on one machine) would share a core
            config["ENABLE_CPU_PINNING"] = False
    return config


def quantize_int8(ov_model, calib: Tensor):  # openvino.Model -> openvino.Model
    """``ov_model`` quantized to int8 by NNCF, calibrated on ``calib`` (N, 3, H, W).

    Transformer patterns, but no SmoothQuant: on LeViT it costs fidelity against fp32 (docs/inference.md
    gives the measurement and its command); :func:`overflow_fix` where the CPU lacks VNNI.
    """
    import logging

    import nncf

    nncf.set_log_level(logging.ERROR)
    data = nncf.Dataset([c.numpy() for c in calib.float().split(8)])
    with contextlib.redirect_stdout(io.StringIO()):  # NNCF's progress bars would corrupt --json output
        return nncf.quantize(
            ov_model,
            data,
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=int(calib.shape[0]),
            advanced_parameters=nncf.AdvancedQuantizationParameters(
                smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(convolution=-1, matmul=-1),
                overflow_fix=overflow_fix(),
            ),
        )


def openvino_model(module: nn.Module, precision: str, example: Tensor, calib: Tensor | None) -> ov.Model:
    """``module`` converted once (:func:`levit.runtime.export.to_openvino`) and, for ``int8``,
    quantized on ``calib``: what every compiled copy (:func:`openvino_compiled`) is built from."""
    from .export import to_openvino

    ov_model = to_openvino(module.float().eval(), example.float())
    if precision == "int8":
        ov_model = quantize_int8(ov_model, calib)
    return ov_model


def openvino_compiled(ov_model: ov.Model, precision: str, threads: int | None) -> Callable[[Tensor], Tensor]:
    """``ov_model`` (from :func:`openvino_model`) compiled for the CPU at ``precision`` on ``threads``
    threads, with an infer request of its own. Compiling leaves ``ov_model`` unchanged, so one model
    gives any number of copies."""
    from .export import openvino_core

    compiled = openvino_core().compile_model(ov_model, "CPU", openvino_config(precision, threads))
    req = compiled.create_infer_request()

    def run(x: Tensor) -> Tensor:
        req.infer([x.detach().float().cpu().contiguous().numpy()], share_inputs=True)
        return torch.from_numpy(req.get_output_tensor(0).data.copy())

    return run
