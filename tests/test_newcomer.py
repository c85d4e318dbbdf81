"""What a newcomer hit on a first afternoon: flags split by a recipe value, exported files given as
checkpoints, paths that are folders or devices, leftovers of a refused resume, a full disk, silent
skips and doubled warnings, clusters that can never answer. Each test pins one defect.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from train_utils import cli

import levit


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """A folder of two small JPEGs."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / name)
    return folder


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """A levit-format file of the tiny model (its variant is in the file: no --model needed)."""
    path = tmp_path / "tiny.safetensors"
    levit.save(levit.create_model("levit_tiny", img_size=64), path)
    return path


def one_line_error(r, code: int, *needles: str) -> str:
    """The last stderr line of a failed ``levit`` run, checked: the exit code, no traceback, the needles."""
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    for n in needles:
        assert n in last, last
    return last


# ---- 1. flags --------------------------------------------------------------------------------
def test_recipe_values_split_by_a_flag_all_reach_the_recipe(tmp_path, monkeypatch):
    import levit.train.run

    seen = []
    monkeypatch.setattr(
        levit.train.run,
        "train",
        lambda cfg, **kw: seen.append(cfg) or type("R", (), {"best_epoch": 1, "finished_before": False})(),
    )
    r = cli("train", "--dataset", "digits", "--output", tmp_path / "r", "epochs=1", "--distillation", "none", "lr=1e-3")
    assert r.returncode == 0, r.stderr
    assert seen[0].epochs == 1 and seen[0].lr == 1e-3 and seen[0].distillation == "none"
    # an unknown flag is still refused, by the sub-command
    r = cli("train", "--dataset", "digits", "epochs=1", "--bogus", "lr=1e-3")
    one_line_error(r, 2, "levit train: error: unrecognized arguments: --bogus")


def test_intermixed_paths_of_predict(photos, ckpt):
    r = cli("predict", photos / "a.jpg", "-c", ckpt, "--topk", "1", photos / "b.jpg", "--json")
    assert r.returncode == 0, r.stderr
    assert "a.jpg" in r.stdout and "b.jpg" in r.stdout


def test_exported_files_given_as_checkpoints_say_what_they_are(tmp_path, photos):
    onnx = tmp_path / "model.bin"  # an ONNX file known by its bytes, whatever its name
    onnx.write_bytes(b"\x08\x09\x12\x07pytorch\x1a\x062.1" + bytes(64))
    pte = tmp_path / "model.bin2"
    pte.write_bytes(b"\x1c\x00\x00\x00ET12" + bytes(64))
    for path, what in ((onnx, "exported ONNX file"), (pte, "exported ExecuTorch program")):
        r = cli("predict", photos, "-m", "levit_tiny", "-c", path)
        last = one_line_error(r, 1, str(path), what, "use it with")
        assert "Unpickl" not in last
        # without --model, reading the file's metadata says the same
        one_line_error(cli("predict", photos, "-c", path), 1, what)
    (tmp_path / "m.onnx").write_bytes(b"garbage" * 10)
    one_line_error(cli("predict", photos, "-m", "levit_tiny", "-c", tmp_path / "m.onnx"), 1, "exported ONNX file")


def test_labels_that_are_not_a_readable_file_say_why(photos, ckpt, tmp_path, monkeypatch):
    base = ["predict", photos, "-c", ckpt, "--labels"]
    one_line_error(cli(*base, tmp_path), 2, "--labels", "is a folder")
    one_line_error(cli(*base, "/dev/null"), 2, "--labels", "not a regular file")
    one_line_error(cli(*base, tmp_path / "none.txt"), 2, "--labels", "no such file")
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\n")
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != labels and real(p, mode, **kw))
    one_line_error(cli(*base, labels), 2, "--labels", "permission denied")


def test_folders_that_cannot_be_listed_or_devices_given_as_images_say_why(photos, ckpt, monkeypatch):
    one_line_error(cli("predict", "/dev/null", "-c", ckpt), 1, "/dev/null", "not a regular file")
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != photos and real(p, mode, **kw))
    one_line_error(cli("predict", photos, "-c", ckpt), 1, str(photos), "permission denied")


# ---- 2. a refused resume leaves nothing behind ------------------------------------------------
@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_refused_resume_leaves_no_partial_file(photos, ckpt, tmp_path, suffix):
    out = tmp_path / "results" / f"out{suffix}"
    out.parent.mkdir()
    assert cli("predict", photos, "-c", ckpt, "--topk", "1", "--output", out).returncode == 0
    before = out.read_bytes()
    r = cli("predict", photos, "-c", ckpt, "--topk", "2", "--output", out, "--resume")
    one_line_error(r, 1, "--topk")
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name] and out.read_bytes() == before


def test_resume_of_a_corrupt_file_leaves_no_partial_file(photos, ckpt, tmp_path):
    out = tmp_path / "results" / "out.jsonl"
    out.parent.mkdir()
    out.write_text("this is not JSON\n")
    one_line_error(cli("predict", photos, "-c", ckpt, "--output", out, "--resume"), 1, "not a JSON row")
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]
    assert out.read_text() == "this is not JSON\n"
