"""What a new user meets first: the documented examples that used to fail as printed, numeric flags,
run folders that must not block the next run, and error messages that name the user's flag and path.

Each test pins one defect. The examples themselves run in tests/test_docs.py; these tests check the
behaviour behind them with cheap stand-ins (training and timing replaced where only the
configuration is under test).
"""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import pytest
import sklearn.datasets
from train_utils import cli, make_dataset

import levit.train.run


@pytest.fixture
def small_digits(monkeypatch):
    """The bundled digits cut to 200 images (writing 1797 PNGs is not what these tests check)."""
    real = sklearn.datasets.load_digits

    def load(*args, **kwargs):
        d = real(*args, **kwargs)
        return sklearn.datasets._base.Bunch(images=d.images[:200], target=d.target[:200], data=d.data[:200])

    monkeypatch.setattr(sklearn.datasets, "load_digits", load)


@pytest.fixture
def captured_runs(monkeypatch):
    """``levit.train.run.train`` replaced by a recorder of the configs it is given."""
    runs = []

    def fake_train(cfg, **kwargs):
        runs.append(cfg)
        return SimpleNamespace(best_top1=50.0, best_epoch=1, finished_before=False)

    monkeypatch.setattr(levit.train.run, "train", fake_train)
    return runs


# ---- examples that failed as printed -----------------------------------------------------------
def test_ablate_trains_every_row_on_one_shared_copy_of_the_bundled_digits(
    tmp_path, small_digits, captured_runs, monkeypatch
):
    import levit.tools.ablate

    monkeypatch.setattr(levit.tools.ablate, "_speeds", lambda rows, s: {r: (100.0, r != "A3") for r in rows})
    out = tmp_path / "sweep"
    r = cli("ablate", "--variants", "base,A3", "--epochs", "1", "--output", out)
    assert r.returncode == 0, r.stderr
    assert [c.ablation for c in captured_runs] == [None, "A3"]
    assert {c.data for c in captured_runs} == {str(out / "digits")} and all(c.dataset is None for c in captured_runs)
    assert (out / "digits" / ".complete").is_file() and (out / "digits" / "val").is_dir()
    assert (out / "A3" / "ablate.json").is_file() and (out / "ablations.csv").is_file()


@pytest.mark.parametrize("value", ["1e-4", "1E-4", "0.0001", "1.0e-4", ".0001"])
def test_float_overrides_in_any_notation_on_the_command_line(tmp_path, captured_runs, value):
    r = cli("train", "--dataset", "digits", "--output", tmp_path / "run", f"lr={value}", "drop_path=1e-1")
    assert r.returncode == 0, r.stderr
    assert captured_runs[0].lr == pytest.approx(1e-4) and captured_runs[0].drop_path == pytest.approx(0.1)


def test_float_values_in_any_notation_in_a_yaml_recipe(tmp_path, captured_runs):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("base: digits\nlr: 3e-4\nmin_lr: 1E-6\ntrain_crop_scale: [8e-2, 1]\n")
    r = cli("train", "--config", recipe, "--dataset", "digits", "--output", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    cfg = captured_runs[0]
    assert (cfg.lr, cfg.min_lr, cfg.train_crop_scale) == (pytest.approx(3e-4), pytest.approx(1e-6), [0.08, 1.0])
    for bad in ("lr=abc", "lr=nan", "lr=1e-4x"):  # still refused, naming the key
        r = cli("train", "--dataset", "digits", "--output", tmp_path / "run2", bad)
        assert r.returncode == 2 and "bad value for lr" in r.stderr


def test_offline_pretrained_in_train_names_the_init_checkpoint_key(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "data", classes=2, train=2, val=1)
    monkeypatch.setenv("LEVIT_PRETRAINED_URL", str(tmp_path / "empty-mirror"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    r = cli(
        "train",
        "--config",
        "digits",
        "--model",
        "levit_128s",
        "--data",
        data,
        "--output",
        tmp_path / "run",
        "pretrained=true",
        "batch_size=2",
    )
    assert r.returncode == 1
    line = r.stderr.strip().splitlines()[-1]
    assert "init_checkpoint=PATH" in line and "--checkpoint" not in line, line
    assert not (tmp_path / "run").exists()  # a failed start leaves nothing behind


@pytest.mark.parametrize("form", ["folder", "relative folder", "file url"])
def test_pretrained_mirror_is_a_folder_or_a_file_url(tmp_path, monkeypatch, form):
    from levit.weights.hub import download_checkpoint, mirror_url

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    body = b"stand-in weights"
    name = f"LeViT-X-{hashlib.sha256(body).hexdigest()[:8]}.pth"  # the name carries the file's hash
    (mirror / name).write_bytes(body)
    monkeypatch.chdir(tmp_path)
    given = {"folder": str(mirror), "relative folder": "mirror", "file url": mirror.as_uri()}[form]
    got = download_checkpoint(mirror_url(given, name), cache_dir=tmp_path / "cache", progress=False)
    assert got == tmp_path / "cache" / name and got.read_bytes() == body


def test_bench_times_an_a3_model_in_its_inference_form(capsys):
    """A3 (no BatchNorm) is timed like every row: fused around the LayerNorms it keeps, no warning."""
    r = cli(
        "bench", "--models", "levit_128s_a3", "--img-size", "32", "--warmup", "0", "--windows", "1", "--window", "0.01"
    )
    assert r.returncode == 0, r.stderr
    assert "levit_128s_a3" in r.stdout and "cannot be fused" not in r.stderr
