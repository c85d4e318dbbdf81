"""int8 fidelity with and without each choice ``levit.deploy`` makes for its int8 backends.

Each CPU-keyed choice is forced both ways through its probe (``levit.runtime.cpu``), so both sides
run on any machine; on a CPU with VNNI the integer arithmetic is exact either way, so the table shows
what each remedy costs in precision, not the saturation it prevents (that needs a CPU without VNNI):

- ONNX Runtime: 7-bit weights (``reduce_range``) where ``u8s8_saturates()``, else 8-bit;
- OpenVINO: NNCF's overflow fix (7-bit weights in every layer) where ``cpu_int8_fast()`` is False;
- OpenVINO: SmoothQuant off (``levit.runtime.backend_openvino.quantize_int8``) against NNCF's default.

LeViT-128S with randomised weights (tests/helpers.py) on the real photos of
``benchmarks/speed_targets.py`` (scikit-learn's and scikit-image's samples, 54 views); fidelity is
top-1 agreement and max relative logit error against fp32 (``levit.runtime.calibration.fidelity``).

    PYTHONPATH=src python benchmarks/int8_remedies.py
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path
from unittest import mock

import torch

import levit

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' helpers (test support)
from helpers import randomize_weights
from speed_targets import real_images


def fidelity(model: torch.nn.Module, photos: torch.Tensor, backend: str, patches: dict) -> dict:
    """``levit.deploy``'s int8 fidelity on ``photos`` with ``patches`` (name -> replacement) in place."""
    with warnings.catch_warnings(), contextlib.ExitStack() as stack:
        warnings.simplefilter("ignore")
        for name, value in patches.items():
            stack.enter_context(mock.patch(name, value))
        return levit.deploy(
            model, backend=backend, precision="int8", batch_size=16, threads=1, calibration=photos
        ).fidelity


def main() -> int:
    import nncf

    torch.manual_seed(0)
    model = randomize_weights(levit.create_model("levit_128s"), seed=0).eval()
    photos = real_images()
    default_sq = nncf.AdvancedSmoothQuantParameters
    rows = [
        ("onnxruntime", "8-bit weights (VNNI side)", {"levit.runtime.cpu.u8s8_saturates": lambda: False}),
        (
            "onnxruntime",
            "7-bit weights, reduce_range (no-VNNI side)",
            {"levit.runtime.cpu.u8s8_saturates": lambda: True},
        ),
        ("openvino", "no overflow fix (VNNI side)", {"levit.runtime.cpu.cpu_int8_fast": lambda: True}),
        ("openvino", "overflow fix (no-VNNI side)", {"levit.runtime.cpu.cpu_int8_fast": lambda: False}),
        (
            "openvino",
            "SmoothQuant on (NNCF's default alphas), no overflow fix",
            {
                "levit.runtime.cpu.cpu_int8_fast": lambda: True,
                "nncf.AdvancedSmoothQuantParameters": lambda **kw: default_sq(),
            },
        ),
    ]
    print(f"int8 on LeViT-128S (randomised weights), {photos.shape[0]} real-photo views, vs fp32")
    print(f"{'backend':<12} {'choice':<56} {'top-1 agree':>11} {'max rel err':>12}")
    for backend, label, patches in rows:
        f = fidelity(model, photos, backend, patches)
        print(f"{backend:<12} {label:<56} {f['top1_agreement'] * 100:10.1f}% {f['max_rel_error']:12.2e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
