"""What a new user meets first: the documented examples that used to fail as printed, numeric flags,
run folders that must not block the next run, and error messages that name the user's flag and path.

Each test pins one defect. The examples themselves run in tests/test_docs.py; these tests check the
behaviour behind them with cheap stand-ins (training and timing replaced where only the
configuration is under test).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import pytest
from train_utils import cli, make_dataset

import levit.train.run


@pytest.fixture
def small_digits(monkeypatch):
    """The bundled digits cut to 200 images (writing 1797 PNGs is not what these tests check)."""
    import sklearn.datasets  # imported here: a second of every worker's collection

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
    import levit.paper.ablations

    monkeypatch.setattr(levit.paper.ablations, "_speeds", lambda rows, s: {r: (100.0, r != "A3") for r in rows})
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


# ---- numeric flags -------------------------------------------------------------------------------
def _one_error_line(r) -> str:
    lines = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith(("WARNING", "note:"))]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["bench", "--models", ""], "--models: no model named"),
        (["bench", "--models", " , "], "--models: no model named"),
        (["bench", "--window", "-1"], "--window must be >= 0, got -1"),
        (["bench", "--warmup", "-5"], "--warmup must be >= 0, got -5"),
        (["bench", "--warmup", "nan"], "--warmup must be >= 0, got nan"),
        (["ablate", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["ablate", "--threads", "0"], "--threads must be >= 1, got 0"),
        (["ablate", "--bench-seconds", "-1"], "--bench-seconds must be > 0, got -1"),
        (["ablate", "--variants", ""], "--variants: no row named"),
        (["train", "--dataset", "digits", "workers=-1"], "workers must be >= 0 or null, got -1"),
        (["train", "--dataset", "digits", "lr=0"], "lr must be > 0, got 0"),
        (["train", "--dataset", "digits", "warmup_epochs=-1"], "warmup_epochs must be >= 0, got -1"),
        (["train", "--dataset", "digits", "hflip=1.5"], "hflip must be in [0, 1], got 1.5"),
        (["train", "--dataset", "digits", "distillation_tau=0"], "distillation_tau must be > 0, got 0"),
    ],
)
def test_numeric_flags_are_checked_in_one_line_with_exit_2(tmp_path, argv, words):
    if argv[0] in ("train", "ablate"):
        argv = [*argv, "--output", str(tmp_path / "out")]
    r = cli(*argv)
    assert r.returncode == 2, r.stderr
    assert words in _one_error_line(r)
    assert not (tmp_path / "out").exists()


def test_an_img_size_that_cannot_fit_is_refused_before_anything_is_allocated(tmp_path, monkeypatch):
    from PIL import Image

    import levit.factory.create
    import levit.utils

    Image.new("RGB", (40, 30)).save(tmp_path / "cat.png")
    monkeypatch.setattr(levit.utils, "available_memory", lambda: 2 * 2**30)  # a 2 GiB machine

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not be built")

    monkeypatch.setattr(levit.factory.create, "create_model", no_model)
    r = cli("predict", tmp_path / "cat.png", "-m", "levit_tiny", "--img-size", "2048")
    assert r.returncode == 2
    line = _one_error_line(r)
    assert "--img-size 2048x2048" in line and "8.0 GiB" in line and "2.0 GiB of memory available" in line, line
    r = cli("export", "-m", "levit_tiny", "--img-size", "1024x2048", "--output", tmp_path / "m.onnx")
    assert r.returncode == 2 and "--img-size 1024x2048" in _one_error_line(r)


def test_a_pattern_that_matches_no_model_says_so():
    r = cli("models", "resnet*")
    assert r.returncode == 2 and r.stdout == ""
    assert "no model matches 'resnet*'" in _one_error_line(r)
    assert cli("models", "levit_1*").stdout.count("levit_1") == 3


# ---- nothing blocks the next run ---------------------------------------------------------------
def test_a_run_folder_with_no_weights_and_no_metrics_is_taken_over(tmp_path, capsys):
    from levit.errors import LeViTError
    from levit.train.rundir import RunDir

    out = tmp_path / "run"  # what a run that failed in its first epoch leaves
    (out / "checkpoints").mkdir(parents=True)
    (out / "config.yaml").write_text("model: levit_tiny\n")
    (out / "metrics.jsonl").write_text("")
    for resume in (None, "auto"):
        assert RunDir(out).resume_point(resume) is None
        assert "starting a new run there" in capsys.readouterr().err
    for valuable in ("best.pth", "checkpoints/ckpt-000000001.pth.corrupt", "metrics.jsonl", "tensorboard/events"):
        (out / valuable).parent.mkdir(parents=True, exist_ok=True)
        (out / valuable).write_text("x")
        for resume in (None, "auto"):
            with pytest.raises(LeViTError, match="holds"):
                RunDir(out).resume_point(resume)
        (out / valuable).unlink() if valuable != "metrics.jsonl" else (out / valuable).write_text("")


def test_an_output_inside_the_data_folder_is_refused(tmp_path):
    data = make_dataset(tmp_path / "D", classes=2, train=2, val=1)
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    r = cli("train", "--config", "digits", "--data", data, "--output", data / "train" / "run")
    assert r.returncode == 2 and "is inside --data" in _one_error_line(r)
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before


def test_worker_counts_default_to_the_cores_available(tmp_path, monkeypatch):
    import levit.utils
    from levit.data.datasets import build_loaders
    from levit.train.recipe import load_recipe, resolve_config

    assert load_recipe("paper")["workers"] is None
    monkeypatch.setattr(levit.utils, "available_cpus", lambda: 3)
    assert levit.utils.default_workers() == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two torchrun processes share the cores
    assert levit.utils.default_workers() == 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setattr(levit.utils, "available_cpus", lambda: 64)
    assert levit.utils.default_workers() == 8
    monkeypatch.setattr(levit.utils, "available_cpus", lambda: 2)
    data = make_dataset(tmp_path / "data", classes=2, train=2, val=1)
    cfg = resolve_config(model="levit_256", data=str(data), batch_size=2, distillation="none")
    assert cfg.workers is None
    assert build_loaders(cfg, data).train_loader.num_workers == 2


def test_a_large_data_recipe_on_a_tiny_dataset_says_what_it_implies(tmp_path):
    data = make_dataset(tmp_path / "data", classes=2, train=4, val=1)
    r = cli(
        "train", "--data", data, "--output", tmp_path / "run", "--model", "levit_tiny", "--distillation", "none",
        "--batch-size", "4", "--img-size", "32", "--epochs", "1", "workers=0", "progress=false", "model_ema=false",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    notes = [ln for ln in r.stderr.splitlines() if ln.startswith("note: this recipe is made for a large dataset")]
    assert len(notes) == 1, r.stderr
    assert "lr 0.008 (lr 0.0005 x 8192/512)" in r.stderr  # the banner says the lr was scaled
    for words in (
        "on 8 training images",
        "effective batch of 8192",
        "(2048 accumulation steps)",
        "= 0.008",
        "1 optimizer",
    ):
        assert words in notes[0], notes[0]


# ---- messages name the user's flag and path ----------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "target"),
    [
        (["eval", "--data", "{tmp}", "-m", "levit_tiny", "--pretrained"], "{tmp}/cat.jpg/out.json"),
        (["eval", "--data", "{tmp}", "-m", "levit_tiny", "--pretrained"], "/proc/levit-out.json"),
        (["bench", "--models", "levit_tiny"], "{tmp}/cat.jpg/out.json"),
        (["biases", "-m", "levit_tiny"], "/proc/levit-biases.png"),
        (["export", "-m", "levit_tiny"], "{tmp}/cat.jpg/out.onnx"),
        (["export", "-m", "levit_tiny"], "{tmp}/folder.onnx"),
    ],
)
def test_an_output_that_cannot_be_written_is_refused_before_the_job(tmp_path, monkeypatch, argv, target):
    import levit.factory.create
    import levit.paper.speed

    def no_job(*args, **kwargs):
        raise AssertionError("the job must not start")

    monkeypatch.setattr(levit.factory.create, "create_model", no_job)
    monkeypatch.setattr(levit.paper.speed, "benchmark", no_job)
    (tmp_path / "cat.jpg").write_bytes(b"\xff\xd8 a photo")
    (tmp_path / "folder.onnx").mkdir()
    output = target.format(tmp=tmp_path)
    r = cli(*[a.format(tmp=tmp_path) for a in argv], "--output", output)
    assert r.returncode == 2
    line = _one_error_line(r)
    assert line.startswith(f"levit {argv[0]}: error: --output {output}: ") and ".tmp" not in line, line
    if "cat.jpg/" in output:
        assert f"{tmp_path / 'cat.jpg'} is a file, not a folder" in line


def test_a_small_text_file_is_not_a_checkpoint(tmp_path):
    from levit.errors import CheckpointError
    from levit.weights.format import read_checkpoint

    (tmp_path / "notes.pth").write_text("hello")
    with pytest.raises(CheckpointError, match=r"it is a text file \(5 bytes\), not a torch") as e:
        read_checkpoint(tmp_path / "notes.pth")
    assert "truncated" not in str(e.value)
    (tmp_path / "cut.pth").write_bytes(b"PK\x03\x04\x00")
    with pytest.raises(CheckpointError, match=r"truncated \(5 bytes\)"):
        read_checkpoint(tmp_path / "cut.pth")


@pytest.mark.parametrize("limit", [3000, 1000])  # Pillow warns past its limit and refuses past twice it
def test_a_decompression_bomb_is_one_line_when_opened(tmp_path, monkeypatch, limit):
    """Training and eval decode with Pillow's own limit: past it, one line of ours, not Pillow's warning."""
    import warnings

    from PIL import Image

    from levit.data.images import open_rgb
    from levit.errors import ImageError

    Image.new("RGB", (64, 64), "red").save(tmp_path / "huge.png")  # 4096 pixels: over the lowered limit
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageError, match="too large to decode safely") as e:
            open_rgb(tmp_path / "huge.png")
    assert "\n" not in str(e.value)


def test_predict_refuses_an_image_over_max_pixels_in_one_skipped_line(tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 64), "red").save(tmp_path / "huge.png")  # 4096 pixels
    r = cli("predict", tmp_path / "huge.png", "-m", "levit_tiny", "--max-pixels", "1000")
    assert r.returncode == 1
    skipped = [ln for ln in r.stderr.splitlines() if ln.startswith("skipped")]
    assert len(skipped) == 1 and "over the limit of 1,000" in skipped[0], r.stderr
    assert "DecompressionBomb" not in r.stderr and "Traceback" not in r.stderr


def test_eval_shows_progress(tmp_path, capsys):
    import torch

    import levit
    from levit.train.evaluate import evaluate_folder

    data = make_dataset(tmp_path / "data", classes=2, train=1, val=2)
    model = levit.create_model("levit_tiny", num_classes=2, img_size=32)
    with torch.no_grad():
        evaluate_folder(model, data / "val", batch_size=2, workers=0, device="cpu", progress=True)
    err = capsys.readouterr().err
    assert "eval:" in err and "0/2 [" in err and "batch/s" in err, err  # a bar over the 2 batches


def test_readme_keeps_its_two_commands_and_shows_a_cpu_only_install():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    install = 'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev,train]" && levit bench --quick\n'
    assert install + "python -m pytest -q -n auto\n" in text
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text().splitlines()
    assert ci[-1] == "python -m pytest -q -n auto"  # CI runs exactly the README's test command
    assert "--index-url https://download.pytorch.org/whl/cpu" in text
