"""Training loop, recipes, checkpoints/resume, DDP and the train/eval CLI."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from train_utils import cli, make_dataset, run_py, step_losses, tiny_config, tree

import levit
from levit.errors import CheckpointError, LeViTError
from levit.models.config import DEFAULT_CROP_PCT
from levit.train.run import TrainConfig, available_recipes, load_recipe, parse_overrides, resolve_config, train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VARIANTS = ["levit_128s", "levit_128", "levit_192", "levit_256", "levit_384"]

# the paper's recipe (Section 5.1, with DeiT's augmentation), value by value
PAPER = {
    "batch_size": 256,  # 32 GPUs x 256
    "total_batch": 8192,  # effective batch
    "epochs": 1000,
    "opt": "adamw",
    "opt_eps": 1e-8,
    "lr": 5e-4,
    "lr_base_batch": 512,  # lr x total_batch / 512
    "weight_decay": 0.025,
    "sched": "cosine",
    "warmup_epochs": 5,
    "warmup_lr": 1e-6,
    "min_lr": 1e-5,
    "clip_grad": 0.01,
    "clip_mode": "agc",
    "auto_augment": "rand-m9-mstd0.5-inc1",
    "train_interpolation": "bicubic",
    "reprob": 0.25,
    "remode": "pixel",
    "recount": 1,
    "mixup": 0.8,
    "cutmix": 1.0,
    "mixup_prob": 1.0,
    "mixup_switch_prob": 0.5,
    "mixup_mode": "batch",
    "smoothing": 0.1,
    "repeated_aug": 3,
    "distillation": "hard",
    "distillation_alpha": 0.5,
    "teacher": "regnety_160",
    "model_ema": True,
    "model_ema_decay": 0.99996,
    "img_size": 224,
    "eval_crop_pct": 0.875,
}


# ---- recipes -------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_recipe_holds_every_paper_value(variant):
    raw = load_recipe(CONFIGS / f"{variant}.yaml")  # the variant's lines on top of paper.yaml
    for key, want in PAPER.items():
        assert key in raw, f"{variant}.yaml lacks {key}"
        assert raw[key] == want, f"{variant}.yaml: {key} = {raw[key]!r}, paper {want!r}"
    assert raw["model"] == variant
    assert raw["drop_path"] == (0.1 if variant == "levit_384" else 0.0)
    # the file parses into a full, valid config
    cfg = resolve_config(config=CONFIGS / f"{variant}.yaml", data="x")
    assert cfg.model == variant


@pytest.mark.parametrize("variant", VARIANTS)
def test_model_name_alone_selects_its_shipped_recipe(variant):
    """What the package ships (read through importlib.resources, as an installed package does) is the
    paper recipe, and ``--model X`` alone trains with it rather than with the dataclass defaults."""
    shipped = load_recipe(variant)
    assert {k: shipped[k] for k in PAPER} == PAPER and shipped["model"] == variant
    cfg = resolve_config(model="LeViT_" + variant[6:].upper(), data="x")  # the official spelling
    assert cfg.model.lower() == variant and cfg.drop_path == (0.1 if variant == "levit_384" else 0.0)
    assert cfg.checkpoint_every_steps == shipped["checkpoint_every_steps"] != TrainConfig().checkpoint_every_steps


def test_variant_recipes_are_the_paper_base_plus_their_own_lines(tmp_path):
    """One base (paper.yaml) and per-variant overrides: a variant file holds only what differs."""
    base = yaml.safe_load((CONFIGS / "paper.yaml").read_text())
    for variant in VARIANTS:
        raw = yaml.safe_load((CONFIGS / f"{variant}.yaml").read_text())
        assert raw.pop("base") == "paper" and raw.pop("model") == variant
        assert raw == ({"drop_path": 0.1} if variant == "levit_384" else {}), variant
        assert load_recipe(variant) == {**load_recipe("paper"), "model": variant, **raw}
    assert "model" not in base
    # a user's recipe can build on a shipped one or on a file beside it; the nearest value wins
    (tmp_path / "mine.yaml").write_text("base: levit_256\nepochs: 3\n")
    (tmp_path / "child.yaml").write_text("base: mine\nlr: 1.0e-4\n")
    got = load_recipe(tmp_path / "child.yaml")
    assert (got["model"], got["epochs"], got["lr"], got["mixup"]) == ("levit_256", 3, 1e-4, 0.8)
    (tmp_path / "loop.yaml").write_text("base: loop\n")
    with pytest.raises(LeViTError, match="cycle"):
        load_recipe(tmp_path / "loop.yaml")


def test_recipes_shipped_and_defaults_are_paper():
    assert set(VARIANTS) | {"digits"} <= set(available_recipes())
    d = TrainConfig()
    for key, want in PAPER.items():
        assert getattr(d, key) == want, key


def test_bad_overrides_are_one_line_errors():
    assert parse_overrides(["epochs=3", "mixup=0", "clip_grad=null", "train_crop_scale=[0.5, 1]"]) == {
        "epochs": 3,
        "mixup": 0.0,
        "clip_grad": None,
        "train_crop_scale": [0.5, 1.0],
    }
    with pytest.raises(LeViTError, match=r"unknown key\(s\) \['epoch'\]; valid keys: .*epochs"):
        parse_overrides(["epoch=3"])
    with pytest.raises(LeViTError, match="bad value for epochs: expected int"):
        parse_overrides(["epochs=three"])
    with pytest.raises(LeViTError, match="not KEY=VALUE"):
        parse_overrides(["epochs"])
    with pytest.raises(LeViTError, match="distillation must be one of"):
        resolve_config(model="levit_tiny", data="x", distillation="medium")
    with pytest.raises(ValueError, match="unknown model 'levit_999'"):
        resolve_config(model="levit_999", data="x")


@pytest.mark.parametrize(
    "args, message",
    [
        (["lr=abc"], "bad value for lr"),
        (["epoch=3"], "unknown key(s) ['epoch']"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--img-size", "100"], "--img-size: must be a positive multiple of 16"),
        (["--model", "levit_999"], "unknown model 'levit_999'"),
        (["--dataset", "digits"], "--data"),  # both --data and --dataset
        (["--resume", "nope.pth"], "--resume must be 'auto' or an existing checkpoint file"),
        (["--distillation", "hard"], "needs --teacher-checkpoint PATH"),  # nothing is downloaded
        (["--config", "nope"], "neither a YAML file nor a shipped recipe"),
        (["--device", "tpu"], "invalid choice: 'tpu'"),
    ],
)
def test_cli_bad_flags_and_values_exit_2_before_anything_is_written(tmp_path, args, message):
    base = ["train", "--data", tmp_path / "data", "-o", tmp_path / "o", "-m", "levit_tiny", "--distillation", "none"]
    r = cli(*base, *args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_cli_bad_data_exits_1_and_leaves_nothing(tmp_path):
    (tmp_path / "o").mkdir()  # an existing, empty output folder stays as it was
    r = cli("train", "--data", tmp_path / "d", "-o", tmp_path / "o", "-m", "levit_tiny", "--distillation", "none")
    assert r.returncode == 1 and "is not a folder" in r.stderr
    assert r.stderr.count("\n") == 1 and list((tmp_path / "o").iterdir()) == []
    (tmp_path / "flat").mkdir()
    r = cli("train", "--data", tmp_path / "flat", "-o", tmp_path / "new", "-m", "levit_tiny", "--distillation", "none")
    assert r.returncode == 1 and "has no 'train' sub-folder" in r.stderr
    assert not (tmp_path / "new").exists()  # a failed start leaves no empty output folder behind


@pytest.mark.parametrize(
    "layout, message",
    [
        ("no_val", "has no 'val' sub-folder"),
        ("loose", "has no class sub-folders (found 2 loose images"),
        ("empty_class", "holds no images"),
        ("extra_val_class", "has classes missing from"),
    ],
)
def test_bad_data_folders(tmp_path, layout, message):
    from train_utils import make_folder

    root = tmp_path / "d"
    make_folder(root / "train", {"a": 2, "b": 2})
    if layout == "loose":
        (root / "val").mkdir()
        for p in list((root / "train" / "a").iterdir()):
            shutil.copy(p, root / "val" / p.name)
    elif layout == "empty_class":
        make_folder(root / "val", {"a": 1, "b": 1})
        (root / "val" / "b").joinpath("notes.txt").write_text("x")
        for p in (root / "val" / "b").glob("*.png"):
            p.unlink()
    elif layout == "extra_val_class":
        make_folder(root / "val", {"a": 1, "z": 1})
    cfg = resolve_config(**tiny_config(root, tmp_path / "out"))
    with pytest.raises(LeViTError, match=message.replace("(", r"\(")):
        train(cfg)
    assert not (tmp_path / "out").exists()


# ---- a full tiny run -----------------------------------------------------------------------------
BROKEN = b"\x89PNG\r\n\x1a\n" + b"garbage" * 10


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One 2-epoch run with a corrupt training image and a corrupt validation image, shared below."""
    tmp = tmp_path_factory.mktemp("run")
    data = make_dataset(tmp / "data", classes=3, train=6, val=3)
    (data / "train" / "c1" / "broken.png").write_bytes(BROKEN)
    (data / "val" / "c2" / "broken_val.png").write_bytes(BROKEN)
    tb = importlib.util.find_spec("tensorboard") is not None
    extra = dict(mixup=0.0, cutmix=0.0, keep_last=2, tensorboard=tb, max_bad_fraction=0.2)
    result = train(resolve_config(**tiny_config(data, tmp / "out", **extra)))
    return data, tmp / "out", result


def test_tiny_run_records_and_checkpoints(tiny_run):
    _, out, result = tiny_run
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if r["event"] == "step"]
    epochs = [r for r in lines if r["event"] == "epoch"]
    summary = lines[-1]
    # 19 images incl. the corrupt one, batch 4, drop_last: 4 steps per epoch, 2 epochs
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert all(r["loss"] > 0 and r["lr"] > 0 for r in steps)
    assert [r["epoch"] for r in epochs] == [1, 2] and all("top1" in r and "ema_top1" in r for r in epochs)
    assert summary["event"] == "summary" and summary["best_epoch"] in (1, 2)
    assert summary["best_top1"] == max(r["top1"] for r in epochs)
    # the corrupt images were skipped and reported (train and val), the epoch went on; the unreadable
    # validation image is not counted (9 readable of 10)
    assert summary["skipped_images"] == 2 and [Path(p).name for p in result.skipped_images] == [
        "broken.png",
        "broken_val.png",
    ]
    assert all(r["val_images"] == 9 for r in epochs) and result.last["n"] == 9
    # resolved config written; last K=2 checkpoints kept, complete and atomic (no temp files)
    assert yaml.safe_load((out / "config.yaml").read_text())["batch_size"] == 4
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["ckpt-000000004.pth", "ckpt-000000008.pth"]
    state = torch.load(out / "checkpoints" / ckpts[-1], weights_only=True)
    for key in ("model", "ema", "optimizer", "scheduler", "scaler", "epoch", "global_step", "sampler", "rng", "levit"):
        assert key in state, key
    assert state["levit"]["class_names"] == ["c0", "c1", "c2"] and state["levit"]["variant"] == "levit_tiny"
    assert state["levit"]["eval"] == {"img_size": 32, "crop_pct": 0.875} and state["levit"]["fused"] is False


def test_training_checkpoints_load_everywhere(tiny_run, tmp_path):
    data, out, result = tiny_run
    for path in (out / "best.pth", out / "checkpoints" / "ckpt-000000008.pth"):
        model = levit.create_model("levit_tiny", checkpoint=path).eval()
        assert model.class_names == ["c0", "c1", "c2"]
    # the final weights are the last checkpoint's
    model = levit.create_model("levit_tiny", checkpoint=out / "checkpoints" / "ckpt-000000008.pth")
    for k, v in result.model.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    # levit eval (fused, default) == the unfused model, and --model comes from the file
    common = ["eval", "--data", data / "val", "-c", out / "best.pth", "--workers", "0"]
    r = cli(*common, "--output", tmp_path / "e.json")
    assert r.returncode == 0, r.stderr
    fused = json.loads((tmp_path / "e.json").read_text())
    r = cli(*common, "--no-fuse", "--output", tmp_path / "u.json")
    unfused = json.loads((tmp_path / "u.json").read_text())
    # the unreadable val image is reported and excluded: 9 images, not 10 (nor 9 + a duplicate)
    assert fused["n"] == unfused["n"] == 9 and fused["top1"] == unfused["top1"]
    assert [Path(p).name for p in fused["skipped"]] == ["broken_val.png"]
    assert "broken_val.png" in r.stderr and "(9 images, 1 unreadable skipped)" in r.stdout
    assert abs(fused["loss"] - unfused["loss"]) < 1e-4
    best_top1 = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["best_top1"]
    assert fused["crop_pct"] == 0.875 and abs(fused["top1"] - best_top1) < 1e-6
    # levit predict prints the class names stored in the checkpoint
    r = cli("predict", data / "val" / "c1", "-c", out / "best.pth", "--topk", "1", "--json")
    assert r.returncode == 0, r.stderr
    assert {p["top"][0]["label"] for p in json.loads(r.stdout)} <= {"c0", "c1", "c2"}


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed")
def test_tensorboard_events_written(tiny_run):
    _, out, _ = tiny_run
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


# config.yaml alone (a run that failed before saving anything) is taken over: tests/test_first_use.py
@pytest.mark.parametrize("trace", ["best.pth", "metrics.jsonl", "checkpoints"])
def test_any_trace_of_an_earlier_run_makes_a_fresh_run_refuse(tiny_run, tmp_path, trace):
    data, out, _ = tiny_run
    src = out / trace
    (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / trace)
    before = tree(tmp_path)
    with pytest.raises(LeViTError, match=rf"holds an earlier run \({trace}/?\): continue it with --resume auto"):
        train(resolve_config(**tiny_config(data, tmp_path)))
    assert tree(tmp_path) == before  # nothing overwritten, nothing added


def test_resume_auto_without_a_readable_checkpoint_refuses(tiny_run, tmp_path):
    data, out, _ = tiny_run
    for name in ("best.pth", "metrics.jsonl", "config.yaml"):
        shutil.copy(out / name, tmp_path / name)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "ckpt-000000099.pth").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    before = {k: v for k, v in tree(tmp_path).items() if k != "checkpoints/ckpt-000000099.pth"}
    r = cli("train", *_flags(data, tmp_path), "--resume", "auto")
    assert r.returncode == 1
    err = r.stderr.splitlines()[-1]
    for found in ("best.pth", "metrics.jsonl", "config.yaml", "checkpoints/", "ckpt-000000099.pth.corrupt"):
        assert found in err, (found, err)
    assert "no readable checkpoint" in err and "set aside" in r.stderr
    after = tree(tmp_path)
    assert {k: v for k, v in after.items() if not k.endswith(".corrupt")} == before  # the run is untouched
    assert "checkpoints/ckpt-000000099.pth.corrupt" in after


def test_corrupt_newer_checkpoint_is_set_aside_and_never_pruned(tiny_run, tmp_path):
    data, out, _ = tiny_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    bad = run / "checkpoints" / "ckpt-000000099.pth"
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 100)  # higher step than every good one
    cfg = resolve_config(**tiny_config(data, run, epochs=3, mixup=0.0, cutmix=0.0, keep_last=2, max_bad_fraction=0.2))
    result = train(cfg, resume="auto")
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    # resumed from step 8, trained epoch 3; pruning kept the two newest good ones and left the corrupt one alone
    assert ckpts == ["ckpt-000000008.pth", "ckpt-000000012.pth", "ckpt-000000099.pth.corrupt"]
    assert result.best_epoch >= 1 and not bad.exists()


def test_eval_cli_errors(tiny_run, tmp_path):
    data, out, _ = tiny_run
    r = cli("eval", "--data", tmp_path / "nope", "-c", out / "best.pth")
    assert r.returncode == 1 and "does not exist" in r.stderr and r.stderr.count("\n") == 1
    r = cli("eval", "--data", data / "val", "--model", "levit_tiny")
    assert r.returncode == 2 and "--checkpoint" in r.stderr
    bad = [("--batch-size", "0"), ("--img-size", "0"), ("--img-size", "100"), ("--crop-pct", "1.5")]
    bad += [("--workers", "-1"), ("--model", "levit_999"), ("--device", "tpu")]
    for flag, value in bad:
        r = cli("eval", "--data", data / "val", "-c", out / "best.pth", flag, value)
        assert r.returncode == 2 and flag in r.stderr and r.stderr.count("\n") == 1, r.stderr


def _flags(data: Path, output: Path, *extra: str) -> list:
    """CLI flags of the tiny recipe (train_utils.tiny_config) as KEY=VALUE overrides."""
    cfg = tiny_config(data, output)
    return (
        ["--data", data, "-o", output]
        + [f"{k}={'null' if v is None else v}" for k, v in cfg.items() if k not in ("data", "output")]
        + list(extra)
    )


def test_resume_finished_run_with_more_epochs_then_nothing_left(tmp_path):
    data = make_dataset(tmp_path / "d", classes=2, train=4, val=1)
    train(resolve_config(**tiny_config(data, tmp_path / "o", epochs=1)))
    result = train(resolve_config(**tiny_config(data, tmp_path / "o", epochs=3)), resume="auto")
    lines = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines if x["event"] == "epoch"] == [1, 2, 3]
    assert [x["step"] for x in lines if x["event"] == "step"] == [1, 2, 3, 4, 5, 6]
    assert [x["event"] for x in lines].count("summary") == 1 and lines[-1]["epochs"] == 3
    assert result.best_epoch >= 1
    # once more: the run is finished; nothing is trained, rewritten or reported as nan / null
    before = tree(tmp_path / "o")
    r = cli("train", *_flags(data, tmp_path / "o", "epochs=3"), "--resume", "auto")
    assert r.returncode == 0, r.stderr
    assert "nothing left to do" in r.stderr and "already finished 3 of 3 epoch(s)" in r.stderr
    assert "nan" not in r.stderr and tree(tmp_path / "o") == before


def test_resume_mismatch_says_what_differs(tiny_run, tmp_path):
    data, out, _ = tiny_run
    ckpt = out / "checkpoints" / "ckpt-000000008.pth"
    cfg = resolve_config(**tiny_config(data, tmp_path / "o", img_size=48, max_bad_fraction=0.2))
    with pytest.raises(CheckpointError, match=r"was made for another run: img_size 32 \(checkpoint\) vs 48"):
        train(cfg, resume=str(ckpt))
    other = make_dataset(tmp_path / "d2", classes=2, train=4, val=1)
    with pytest.raises(CheckpointError, match=r"classes 3 \[c0, c1, c2\] \(checkpoint\) vs 2 \[c0, c1\]"):
        train(resolve_config(**tiny_config(other, tmp_path / "o")), resume=str(ckpt))
    assert not (tmp_path / "o").exists()  # the failed starts left nothing behind


def test_too_many_bad_samples_stop_the_run(tmp_path):
    data = make_dataset(tmp_path / "d", classes=2, train=6, val=1)
    for k in range(3):
        (data / "train" / "c0" / f"c0_00{k}.png").write_bytes(BROKEN)
    with pytest.raises(
        LeViTError,
        match=r"training samples could not be read or augmented, more than "
        r"max_bad_fraction=0.01, e\.g\. .*c0_00\d\.png \((OSError|UnidentifiedImageError)",
    ):
        train(resolve_config(**tiny_config(data, tmp_path / "o", epochs=1)))


def test_digits_recipe_on_user_data_trains_on_that_data_only(tmp_path, monkeypatch):
    """``--config digits --data MYDATA``: the user named their folder, so it is what is trained on; the
    recipe brings its hyper-parameters only. Nothing is written into MYDATA, no digits are made."""
    import levit.data.digits

    data = make_dataset(tmp_path / "mine", classes=3, train=4, val=1)
    before = tree(data)
    monkeypatch.setattr(levit.data.digits, "make_digits_folder", lambda *a, **k: pytest.fail("digits were written"))
    cfg = resolve_config(config="digits", data=str(data), output=str(tmp_path / "o"), epochs=1, batch_size=4)
    assert cfg.dataset is None and cfg.lr == load_recipe("digits")["lr"]
    result = train(cfg)
    assert result.model.class_names == ["c0", "c1", "c2"] and tree(data) == before
    # the trained model carries the preprocessing its validation used, as its checkpoint does
    assert result.model.pretrained_cfg["crop_pct"] == cfg.eval_crop_pct != DEFAULT_CROP_PCT
    assert not (tmp_path / "o" / "digits").exists()
    with pytest.raises(LeViTError, match="exclude each other"):
        resolve_config(config="digits", data=str(data), dataset="digits")


def test_bundled_dataset_goes_under_output_and_a_failed_start_removes_it(tmp_path, monkeypatch):
    import levit.data.digits

    made = []

    def small_digits(root, seed=0):  # the real one writes 1797 files (tested in test_data.py)
        made.append(Path(root))
        return make_dataset(Path(root), classes=2, train=4, val=1)

    monkeypatch.setattr(levit.data.digits, "make_digits_folder", small_digits)
    (tmp_path / "o").mkdir()
    r = cli(
        "train",
        "--dataset",
        "digits",
        "-o",
        tmp_path / "o",
        "--distillation",
        "hard",
        "--teacher-checkpoint",
        tmp_path / "missing.pth",
        "epochs=1",
        "batch_size=4",
    )
    assert r.returncode == 1 and "missing.pth" in r.stderr
    assert made == [tmp_path / "o" / "digits"]  # written under --output ...
    assert list((tmp_path / "o").iterdir()) == []  # ... and removed when the start failed
    r = cli(
        "train",
        "--dataset",
        "digits",
        "-o",
        tmp_path / "new",
        "--distillation",
        "hard",
        "--teacher-checkpoint",
        tmp_path / "missing.pth",
        "epochs=1",
        "batch_size=4",
    )
    assert r.returncode == 1 and not (tmp_path / "new").exists()


# ---- kill -9 and resume --------------------------------------------------------------------------
RUNNER = r"""
import json, os, signal, sys
import torch
from levit.train.run import resolve_config, train
cfg = resolve_config(**json.loads(sys.argv[1]))
mode, at = sys.argv[2], int(sys.argv[3])
callbacks = []
if mode == "step":  # SIGKILL ourselves right after optimizer step `at`
    def cb(event, info):
        if event == "step" and info["global_step"] == at:
            os.kill(os.getpid(), signal.SIGKILL)
    callbacks.append(cb)
elif mode == "save":  # SIGKILL in the middle of writing checkpoint `at`
    real = torch.save
    def dying_save(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("global_step") == at and "optimizer" in obj:
            f.write(b"PK\x03\x04" + os.urandom(3000))
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real(obj, f, *a, **k)
    torch.save = dying_save
train(cfg, callbacks=callbacks)
"""


@pytest.fixture(scope="module")
def resume_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    data = make_dataset(tmp / "data", classes=3, train=4, val=1)
    # every random stream is on: RandAugment, random erasing, Mixup/CutMix, drop path, repeated aug, EMA
    extra = dict(epochs=2, checkpoint_every_steps=2, drop_path=0.1, repeated_aug=3, keep_last=10)
    train(resolve_config(**tiny_config(data, tmp / "ref", **extra)))  # the uninterrupted reference
    return data, tmp, extra, step_losses(tmp / "ref")


@pytest.mark.parametrize("mode, at, resumes_from", [("step", 5, 4), ("save", 4, 3)])
def test_kill9_then_resume_auto_reproduces_losses(resume_setup, mode, at, resumes_from, capsys):
    data, tmp, extra, ref_losses = resume_setup
    assert sorted(ref_losses) == list(range(1, 7))  # 12 images / batch 4 = 3 steps x 2 epochs
    out = tmp / f"run_{mode}"
    cfg = tiny_config(data, out, **extra)
    r = run_py(RUNNER, json.dumps(cfg), mode, str(at))
    assert r.returncode == -9, r.stderr  # really killed
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("ckpt-*.pth"))
    assert ckpts[-1] == f"ckpt-{resumes_from:09d}.pth"  # no half-written file under a checkpoint name
    for p in (out / "checkpoints").glob("ckpt-*.pth"):  # every earlier file is intact
        torch.load(p, weights_only=True)
    if mode == "save":
        assert list((out / "checkpoints").glob(".*.tmp*"))  # the half-written temporary file
    train(resolve_config(**cfg), resume="auto")  # resumed in this process (a fresh interpreter is not needed)
    assert f"ckpt-{resumes_from:09d}.pth" in capsys.readouterr().err  # says where it resumed from
    assert not list((out / "checkpoints").glob(".*.tmp*"))  # debris of the crash cleaned
    assert step_losses(out) == ref_losses  # bit-identical per-step losses
    a = torch.load(tmp / "ref" / "checkpoints" / "ckpt-000000006.pth", weights_only=True)
    b = torch.load(out / "checkpoints" / "ckpt-000000006.pth", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["ema"]:
        assert torch.equal(a["ema"][k], b["ema"][k]), k


# ---- distributed: tests/test_elastic.py (one DDP run and its torchrun-restarted twin) -------------


def test_hard_distillation_run_with_a_levit_teacher(tiny_run, tmp_path):
    data, out, _ = tiny_run
    teacher_file = out / "best.pth"
    before = teacher_file.read_bytes()
    cfg = resolve_config(
        **tiny_config(
            data,
            tmp_path / "student",
            epochs=1,
            distillation="hard",
            teacher_checkpoint=str(teacher_file),
            max_bad_fraction=0.2,
        )
    )
    result = train(cfg)
    assert teacher_file.read_bytes() == before  # the teacher is only read
    student = levit.create_model("levit_tiny", checkpoint=tmp_path / "student" / "best.pth")
    assert student.config.distillation and student.head_dist is not None
    assert not result.model.distilled_training  # handed back in inference form
    torch.manual_seed(cfg.seed)  # the run's initial weights
    init = levit.create_model("levit_tiny", num_classes=3, img_size=32, distillation=True)
    trained = result.model.head_dist.linear.weight
    assert not torch.equal(trained, init.head_dist.linear.weight)  # the distillation head was trained


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_requested_without_gpu_is_one_line_error(tmp_path):
    data = make_dataset(tmp_path / "d", classes=2, train=2, val=1)
    r = cli(
        "train", "--data", data, "-o", tmp_path / "o", "-m", "levit_tiny", "--distillation", "none", "--device", "cuda"
    )
    assert r.returncode == 1 and "no CUDA GPU is available" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("gpu, backend", [(True, "nccl"), (False, "gloo")])
def test_process_group_backend_follows_the_device(monkeypatch, gpu, backend):
    """Structural check of the GPU path on a CPU machine: NCCL + cuda:LOCAL_RANK under torchrun on GPUs,
    and the group is torn down when the block ends (``levit train`` and ``levit eval`` share this)."""
    import levit.train.distributed as ld

    calls = {}
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.setdefault("set_device", i))
    monkeypatch.setattr(ld.dist, "is_initialized", lambda: "backend" in calls)
    monkeypatch.setattr(ld.dist, "init_process_group", lambda backend, **kw: calls.update(backend=backend, **kw))
    monkeypatch.setattr(ld.dist, "destroy_process_group", lambda: calls.update(destroyed=True))
    with ld.distributed("auto") as d:
        assert calls["backend"] == backend and (d.rank, d.world_size, d.local_rank) == (3, 4, 1) and not d.is_main
        assert d.device == (torch.device("cuda", 1) if gpu else torch.device("cpu"))
        assert calls.get("set_device") == (1 if gpu else None)
        assert calls["device_id"] == (torch.device("cuda", 1) if gpu else None)
        assert "destroyed" not in calls
    assert calls["destroyed"]
