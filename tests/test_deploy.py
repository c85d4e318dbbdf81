"""levit.deploy: every backend and precision gives the right shape and stays within its fidelity bound."""

from __future__ import annotations

import pytest
import torch
from conftest import photos, randomize

import levit
from levit.deploy import DeployError, Predictor, check_backend, fidelity, resolve_backend


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize(levit.create_model("levit_tiny", img_size=64), seed=3).eval()


@pytest.fixture(scope="module")
def images():
    return photos(12, 64, seed=1)


@pytest.fixture(scope="module")
def reference(model, images):
    with torch.no_grad():
        return model(images)


# (backend, precision, max relative logit error, min top-1 agreement) on these 12 images: what the
# working runtimes achieve on this tiny 64px model (measured: fp32 4e-6 and 12/12; bf16 0.055 / 0.047
# and 11/12; int8 OpenVINO 0.31 and 10/12, onnxruntime 0.40 and 8/12) with a margin of about a
# quarter, so a quantizer that flips half the answers or a precision that doubles the error fails.
CASES = [
    ("eager", "fp32", 1e-5, 1.0),
    ("onnxruntime", "fp32", 1e-5, 1.0),
    ("openvino", "fp32", 1e-5, 1.0),
    ("eager", "bf16", 0.07, 10 / 12),
    ("openvino", "bf16", 0.06, 10 / 12),
    ("openvino", "int8", 0.4, 9 / 12),
    ("onnxruntime", "int8", 0.5, 7 / 12),
]


@pytest.mark.parametrize(("backend", "precision", "max_err", "min_agree"), CASES)
def test_backend_precision(model, images, reference, backend, precision, max_err, min_agree):
    calib = images if precision != "fp32" else None
    pred = levit.deploy(model, backend=backend, precision=precision, batch_size=5, threads=1, calibration=calib)
    assert isinstance(pred, Predictor) and pred.backend == backend and pred.precision == precision
    out = pred(images)  # 12 images, batch 5: three chunks, the last one partial
    assert out.shape == (12, model.config.num_classes) and out.dtype == torch.float32
    f = fidelity(out, reference)
    assert f["max_rel_error"] <= max_err, f
    assert f["top1_agreement"] >= min_agree, f
    if precision == "fp32":
        assert pred.fidelity is None
    else:  # reduced precision reports its fidelity on the calibration images (here: the same images)
        assert pred.fidelity is not None and pred.fidelity["images"] == 12
        assert pred.fidelity["top1_agreement"] == pytest.approx(f["top1_agreement"])
        assert pred.fidelity["max_rel_error"] == pytest.approx(f["max_rel_error"], rel=1e-3)


def test_inductor_pads_partial_batches_to_its_compiled_shape(images):
    """The compiled backend sees only its fixed batch (no recompilation); outputs are trimmed back.
    Checked on the Predictor without compiling (compiling costs minutes on a busy 2-core machine)."""
    seen = []

    def run(x):
        seen.append(x.shape[0])
        return x.mean((2, 3))  # a stand-in network: per-image outputs

    pred = Predictor(
        run, backend="inductor", precision="fp32", batch_size=8, threads=1, device=torch.device("cpu"), img_size=64
    )
    out = pred(images)  # 12 images: a full chunk of 8, then 4 padded to 8
    assert seen == [8, 8] and out.shape == (12, 3)
    torch.testing.assert_close(out, images.mean((2, 3)))
    eager = Predictor(
        run, backend="eager", precision="fp32", batch_size=8, threads=1, device=torch.device("cpu"), img_size=64
    )
    seen.clear()
    eager(images[:3])
    assert seen == [3]  # only the compiled backend pads


def test_deploy_leaves_model_untouched(model, images, reference):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    levit.deploy(model, backend="eager", precision="bf16")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert next(model.parameters()).dtype == torch.float32


def test_fidelity_measures_disagreement():
    ref = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    f = fidelity(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), ref)
    assert f["top1_agreement"] == 0.5 and f["max_rel_error"] == pytest.approx(1.0)


def test_calibration_from_image_files(model, tmp_path):
    from PIL import Image

    for i in range(3):
        Image.fromarray((torch.rand(80, 90, 3) * 255).byte().numpy()).save(tmp_path / f"{i}.png")
    pred = levit.deploy(model, backend="eager", precision="bf16", calibration=tmp_path)
    assert pred.fidelity["images"] == 3


@pytest.mark.parametrize(
    ("backend", "precision", "words"),
    [
        ("tensorrt", "fp32", "unknown backend"),
        ("eager", "int4", "unknown precision"),
        ("eager", "int8", "not supported by backend eager"),
        ("onnxruntime", "bf16", "not supported by backend onnxruntime"),
    ],
)
def test_bad_backend_or_precision(backend, precision, words):
    with pytest.raises(DeployError, match=words):
        check_backend(backend, precision)


def test_int8_needs_calibration(model):
    with pytest.raises(DeployError, match="calibration"):
        levit.deploy(model, backend="openvino", precision="int8")


def test_missing_runtime_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "openvino" else real(n, *a))
    with pytest.raises(DeployError, match=r"openvino.*pip install 'levit\[export\]'"):
        check_backend("openvino", "fp32")
    assert resolve_backend("auto", "fp32") != "openvino"


def test_wrong_input_shape_is_a_clear_error(model):
    pred = levit.deploy(model, backend="eager")
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\)"):
        pred(torch.randn(2, 3, 32, 32))
