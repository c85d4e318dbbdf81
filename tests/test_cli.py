"""The command line: `levit models`, `levit predict` and their error cases."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import levit
from levit.cli import main


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (120, 90, 3), dtype=np.uint8)).save(folder / "a.jpg")
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(folder / "sub" / "b.png")  # grey
    Image.fromarray(rng.integers(0, 255, (70, 100, 4), dtype=np.uint8)).save(folder / "c.png")  # RGBA
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    return folder


def test_models_table_has_exact_counts(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "levit_128s      7,777,058     305,108,946" in out and "2,352,935,380" in out
    assert main(["models", "levit_2*", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in rows] == ["levit_256"]
    assert rows[0]["params"] == 18_893_876 and rows[0]["flops"] == 1_128_024_056 and rows[0]["top1"] == 81.6


def test_predict_folder_skips_unreadable_and_reports(images, capsys, tmp_path):
    model = levit.create_model("levit_tiny", img_size=64)
    model.class_names = [f"thing {i}" for i in range(1000)]
    ckpt = levit.save(model, tmp_path / "tiny.safetensors")
    code = main(["predict", str(images), "--checkpoint", str(ckpt), "--topk", "3", "--batch-size", "2", "--json"])
    captured = capsys.readouterr()
    assert code == 0
    results = json.loads(captured.out)
    assert [r["path"].split("imgs/")[1] for r in results] == ["a.jpg", "c.png", "sub/b.png"]
    for r in results:
        assert len(r["top"]) == 3 and r["top"][0]["label"].startswith("thing ")
        probs = [p["prob"] for p in r["top"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-6
    assert "skipped" in captured.err and "broken.jpg" in captured.err
    assert "RANDOM weights" not in captured.err


def test_predict_matches_the_library(images, capsys, tmp_path):
    """The CLI's top-1 equals the fused model applied to the official preprocessing."""
    import torch

    from levit.data.transforms import eval_transform

    model = levit.create_model("levit_tiny", img_size=64).eval()
    ckpt = levit.save(model, tmp_path / "tiny.safetensors")
    assert main(["predict", str(images / "a.jpg"), "-c", str(ckpt), "--json", "--topk", "1"]) == 0
    got = json.loads(capsys.readouterr().out)[0]["top"][0]
    x = eval_transform(64)(Image.open(images / "a.jpg").convert("RGB"))[None]
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    assert got["class"] == int(probs.argmax()) and got["prob"] == pytest.approx(probs.max().item(), abs=1e-5)
    assert got["label"] == levit.data.datasets.imagenet_class_names()[got["class"]]


def test_predict_with_random_weights_says_so(images, capsys):
    assert main(["predict", str(images / "a.jpg"), "--model", "LeViT_128S", "--topk", "2"]) == 0
    captured = capsys.readouterr()
    assert "RANDOM weights" in captured.err
    assert captured.out.splitlines()[0].endswith("a.jpg") and "%" in captured.out


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["predict", "missing.jpg", "-m", "levit_tiny"], 1, "no such image file or folder: missing.jpg"),
        (["predict", "{img}", "-m", "levit_tiny", "--topk", "0"], 2, "--topk must be >= 1"),
        (["predict", "{img}", "-m", "levit_tiny", "--crop-pct", "1.2"], 2, "--crop-pct: must be in (0, 1], got 1.2"),
        (
            ["predict", "{img}", "-m", "levit_tiny", "--calibration", "{img}"],
            2,
            "--calibration calibrates an int8 model: add --precision int8",
        ),
        (["predict", "{img}", "-m", "levit_tiny", "--resume"], 2, "--resume needs --output FILE"),
        (["predict", "{img}", "-m", "nope"], 2, "unknown model 'nope'; valid names:"),
        (["predict", "{img}", "-m", "levit_tiny", "--img-size", "100"], 2, "--img-size: must be a positive multiple"),
        (["predict", "{img}", "-m", "levit_tiny", "--img-size", "0"], 2, "--img-size: must be a positive multiple"),
        (["predict", "{img}", "-m", "levit_tiny", "--img-size", "48x90"], 2, "--img-size: height and width must be"),
        (["predict", "{img}", "-m", "levit_tiny", "--img-size", "48x96x3"], 2, "--img-size: expected N or HxW"),
        (["predict", "{empty}", "-m", "levit_tiny"], 1, "no image files in "),
        (["predict", "{img}", "-m", "levit_tiny", "--backend", "tvm"], 2, "unknown backend 'tvm'; choose from"),
        (["predict", "{img}", "-m", "levit_tiny", "-c", "{bad}"], 1, "cannot read it as a checkpoint"),
        (["predict", "{img}"], 2, "--model is required"),
        (["predict", "{img}", "-c", "{official}"], 2, "--model is required: "),
    ],
)
def test_predict_errors_are_one_line(images, tmp_path, capsys, argv, code, message):
    import torch

    from levit.weights.convert import to_official_state_dict

    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage" * 10)
    official = tmp_path / "official.pth"
    torch.save({"model": to_official_state_dict(levit.create_model("levit_tiny"))}, official)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    argv = [a.format(img=images / "a.jpg", bad=bad, official=official, empty=empty) for a in argv]
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    last = err[-1]
    assert last.startswith("levit predict: error: ") and message in last
    assert not any("Traceback" in line for line in err)


def test_help_usage_errors_and_exit_codes(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "predict" in out and "exit codes" in out
    assert main(["predict", "x.jpg", "--nope"]) == 2
    assert (
        capsys.readouterr().err == "levit predict: error: unrecognized arguments: --nope (see `levit predict --help`)\n"
    )
    assert main(["predict"]) == 2
    err = capsys.readouterr().err
    assert "required: paths" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("command", ["models", "predict", "bench", "export", "train", "eval"])
def test_help_shows_each_default_once(capsys, command):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out
    for line in out.splitlines():
        assert line.count("default") <= 1, line


def test_closed_pipe_is_quiet(tmp_path):
    """`levit models | head -1`: no BrokenPipeError traceback (a real pipe, so a subprocess)."""
    import os

    env = {**os.environ, "PYTHONPATH": str(Path(levit.__file__).parents[1])}
    cmd = f"{sys.executable} -m levit models | head -1"
    run = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env, timeout=60)
    assert run.stdout.startswith("model") and len(run.stdout.splitlines()) == 1
    assert "Traceback" not in run.stderr and "BrokenPipe" not in run.stderr, run.stderr


def test_python_m_levit_runs_the_cli(tmp_path):
    import os

    env = {**os.environ, "PYTHONPATH": str(Path(levit.__file__).parents[1])}
    run = subprocess.run([sys.executable, "-m", "levit", "predict"], capture_output=True, text=True, env=env)
    assert run.returncode == 2 and "required: paths" in run.stderr and len(run.stderr.splitlines()) == 1


def test_help_and_models_do_not_import_torch():
    """`levit --help`, `levit models` (--ablations too) start in a fraction of a second: torch is never imported."""
    import os

    env = {**os.environ, "PYTHONPATH": str(Path(levit.__file__).parents[1])}
    code = (
        "import sys, contextlib, io\n"
        "from levit.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['--help']) == 0 and main(['models']) == 0 and main(['models', '--json']) == 0\n"
        "    assert main(['models', '--ablations']) == 0\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_16_bit_png_gets_the_probabilities_of_its_8_bit_copy(tiny, tmp_path):
    from levit.runtime.predict import predict_paths

    rng = np.random.default_rng(3)
    grey = (np.linspace(0, 255, 80)[None, :] * np.ones((60, 1))).astype(np.uint8)  # a ramp + noise
    grey = np.clip(grey.astype(int) + rng.integers(-20, 20, grey.shape), 0, 255).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "a8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "a16.png")  # same picture, 16 bits
    assert Image.open(tmp_path / "a16.png").mode.startswith("I")
    r8, r16 = predict_paths(tiny, [tmp_path / "a8.png", tmp_path / "a16.png"], topk=3, progress=False)
    assert [p["class"] for p in r8["top"]] == [p["class"] for p in r16["top"]]
    assert [p["prob"] for p in r8["top"]] == pytest.approx([p["prob"] for p in r16["top"]], abs=1e-5)


def test_models_pattern_that_matches_nothing_is_a_usage_error(capsys):
    from levit.cli import main

    assert main(["models", "resnet*"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no model matches 'resnet*'" in err and "levit_128s" in err
    assert main(["models", "levit_1*"]) == 0 and "levit_192" in capsys.readouterr().out


def test_help_of_every_command_imports_no_torch():
    """``levit --help`` and every ``levit COMMAND --help`` start without torch (well under a second),
    since their choices come from plain-data modules (``levit.runtime.options``, ``levit.models.config``);
    so do the deployments of ``levit serve --ray`` that hold no model (their replicas start sooner)."""
    import subprocess
    import sys

    from levit.cli import COMMANDS

    code = (
        "import contextlib, io, sys\n"
        "from levit.cli import main\n"
        f"for cmd in {[[], *[[c] for c in COMMANDS]]!r}:\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        assert main([*cmd, '--help']) == 0\n"
        "    if 'torch' in sys.modules:\n"
        "        sys.exit('torch imported by: levit ' + ' '.join(cmd) + ' --help')\n"
        # levit serve --ray's front and start-up placeholder: their replicas hold no model
        "import levit.runtime.serve_ray_front\n"
        "if 'torch' in sys.modules:\n"
        "    sys.exit('torch imported by: levit.runtime.serve_ray_front')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-500:]
