"""`levit bench`, `levit export` and `levit predict --backend/--precision` on the command line."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_model

import levit
from levit.cli import main


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["bench", "--backend", "tensorrt"], "unknown backend 'tensorrt'"),
        (["bench", "--backend", "eager", "--precision", "int8"], "int8 is not supported by backend eager"),
        (["bench", "--backend", "onnxruntime", "--precision", "bf16"], "bf16 is not supported by backend onnxruntime"),
        (["bench", "--models", "levit_999"], "--models: unknown levit_999"),
        (["bench", "--plot", "fig.txt"], "--plot must end in"),
        (["bench", "--threads", "0"], "--threads must be >= 1"),
        (["export", "--model", "levit_tiny", "--output", "x.zip"], "cannot tell the format from 'x.zip'"),
        (["export", "--model", "levit_tiny", "--output", "x.zip"], ".pt (torchscript), .pte (executorch)"),
        (["export", "--model", "levit_tiny", "--output", "x.onnx", "--opset", "5"], "--opset: ONNX opset 5"),
        (["export", "--model", "levit_tiny", "--output", "x.onnx", "--tolerance", "0"], "--tolerance: must be > 0"),
        (["export", "--model", "levit_999", "--output", "x.onnx"], "unknown model 'levit_999'"),
        (["bench", "--img-size", "100"], "--img-size: must be a positive multiple of 16"),
        (["export", "--model", "levit_tiny", "--format", "openvino", "--output", "x.onnx"], ".xml"),
        (["export", "--model", "levit_tiny", "--output", "/no/such/dir/x.onnx"], "does not exist"),
        (["predict", "README.md", "--model", "levit_tiny", "--backend", "tvm"], "unknown backend 'tvm'"),
        (["predict", "README.md", "--model", "levit_tiny", "--backend", "inductor", "--precision", "int8"], "int8"),
    ],
)
def test_usage_errors_are_one_line_exit_2(capsys, argv, words):
    assert main(argv) == 2
    line = _err_line(capsys)
    assert words in line, line


def test_missing_runtime_names_the_extra(capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "onnxruntime" else real(n, *a))
    assert main(["bench", "--backend", "onnxruntime"]) == 2
    assert "pip install 'levit[export]'" in _err_line(capsys)
    assert main(["export", "--model", "levit_tiny", "--format", "onnx", "--output", "x.onnx"]) == 1
    line = _err_line(capsys)
    assert "onnxruntime" in line and "levit[export]" in line


def test_bench_json_output(tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["bench", "--models", "levit_tiny", "--img-size", "64", "--batch-size", "2", "--warmup", "0"]
    assert main([*argv, "--windows", "1", "--window", "0", "--output", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert rows[0]["model"] == "levit_tiny" and rows[0]["img_s"] > 0
    cap = capsys.readouterr()
    assert "levit_tiny" in cap.out and "[1/1] levit_tiny" in cap.err  # table + progress


@pytest.fixture
def saved(tmp_path):
    from PIL import Image

    model = tiny_model(seed=2)
    ckpt = levit.save(model, tmp_path / "tiny.safetensors")
    Image.fromarray((torch.rand(70, 70, 3) * 255).byte().numpy()).save(tmp_path / "a.png")
    return ckpt, tmp_path / "a.png"


def test_export_and_predict_with_onnxruntime(saved, tmp_path, capsys):
    ckpt, image = saved
    out = tmp_path / "tiny.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--output", str(out)]) == 0
    assert out.exists() and "relative error" in capsys.readouterr().out

    argv = ["predict", str(image), "--checkpoint", str(ckpt), "--json", "--topk", "1"]
    assert main(argv) == 0
    eager = json.loads(capsys.readouterr().out)
    assert main([*argv, "--backend", "onnxruntime"]) == 0
    ort = json.loads(capsys.readouterr().out)
    assert eager[0]["top"][0]["class"] == ort[0]["top"][0]["class"]
    assert ort[0]["top"][0]["prob"] == pytest.approx(eager[0]["top"][0]["prob"], abs=1e-4)


# int8's report (agreement with fp32 on stderr, stdout kept to the rows): tests/test_newcomer.py's
# int8 run, which needs a fresh interpreter anyway


def test_predict_bf16_on_a_cpu_without_bf16_warns_in_one_line(saved, capsys):
    """On an AVX2-only CPU (the probe forced to "no"): fp32 runs, one `warning:` line says why."""
    from levit.models import kernels

    ckpt, image = saved
    argv = ["predict", str(image), "--checkpoint", str(ckpt), "--json", "--backend", "openvino", "--precision", "bf16"]
    with kernels.forced(cpu_bf16=False):
        assert main(argv) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out)[0]["path"].endswith("a.png")
    warned = [ln for ln in cap.err.splitlines() if ln.startswith("warning:")]
    assert len(warned) == 1 and "fp32" in warned[0], cap.err
    assert "DeployWarning" not in cap.err and "warnings.warn" not in cap.err
