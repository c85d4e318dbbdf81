"""Training loop, recipes, checkpoints/resume, DDP and the train/eval CLI."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from train_utils import env, make_dataset, run_cli, run_py, step_losses, tiny_config

import levit
from levit.errors import LeViTError
from levit.train import TrainConfig, available_recipes, load_recipe, parse_overrides, resolve_config, train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VARIANTS = ["levit_128s", "levit_128", "levit_192", "levit_256", "levit_384"]

# levit-facts.md §5, value by value
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
    raw = yaml.safe_load((CONFIGS / f"{variant}.yaml").read_text())
    for key, want in PAPER.items():
        assert key in raw, f"{variant}.yaml lacks {key}"
        assert raw[key] == want, f"{variant}.yaml: {key} = {raw[key]!r}, paper {want!r}"
    assert raw["model"] == variant
    assert raw["drop_path"] == (0.1 if variant == "levit_384" else 0.0)
    # the file parses into a full, valid config; and the shipped copy is the same file
    cfg = resolve_config(config=CONFIGS / f"{variant}.yaml", data="x")
    assert cfg.model == variant
    assert load_recipe(variant) == load_recipe(CONFIGS / f"{variant}.yaml")


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


def test_cli_bad_override_and_bad_data_exit_cleanly(tmp_path):
    r = run_cli("train", "--data", str(tmp_path), "--output", str(tmp_path / "o"), "--model", "levit_tiny", "lr=abc")
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "bad value for lr" in r.stderr and "Traceback" not in r.stderr
    # ImageFolder without train/val: error before training, nothing written
    r = run_cli(
        "train", "--data", str(tmp_path), "-o", str(tmp_path / "o"), "-m", "levit_tiny", "--distillation", "none"
    )
    assert r.returncode == 1 and "has no 'train' sub-folder" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "o" / "checkpoints").exists()
    r = run_cli(
        "train", "--data", str(tmp_path), "--output", str(tmp_path / "o"), "--model", "levit_tiny", "--epochs", "0"
    )
    assert r.returncode == 2 and "--epochs must be >= 1" in r.stderr
    # the paper recipe distils: without teacher weights it stops before anything runs (nothing is downloaded)
    r = run_cli("train", "--data", str(tmp_path), "-o", str(tmp_path / "o"), "-m", "levit_tiny")
    assert r.returncode == 2 and "needs --teacher-checkpoint PATH" in r.stderr


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
    assert not (tmp_path / "out" / "checkpoints").exists()


# ---- a full tiny run -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One 2-epoch run with a corrupt training image, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("run")
    data = make_dataset(tmp / "data", classes=3, train=6, val=3)
    (data / "train" / "c1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    tb = importlib.util.find_spec("tensorboard") is not None
    cfg = resolve_config(**tiny_config(data, tmp / "out", mixup=0.0, cutmix=0.0, keep_last=2, tensorboard=tb))
    result = train(cfg)
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
    # the corrupt image was skipped and reported, the epoch went on
    assert summary["skipped_images"] == 1 and result.skipped_images[0].endswith("broken.png")
    # resolved config written; last K=2 checkpoints kept, complete and atomic (no temp files)
    assert yaml.safe_load((out / "config.yaml").read_text())["batch_size"] == 4
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["ckpt-000000004.pth", "ckpt-000000008.pth"]
    state = torch.load(out / "checkpoints" / ckpts[-1], weights_only=True)
    for key in ("model", "ema", "optimizer", "scheduler", "scaler", "epoch", "global_step", "sampler", "rng", "levit"):
        assert key in state, key
    assert state["levit"]["class_names"] == ["c0", "c1", "c2"]


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
    r = run_cli(
        "eval",
        "--data",
        str(data / "val"),
        "--checkpoint",
        str(out / "best.pth"),
        "--output",
        str(tmp_path / "e.json"),
        "--workers",
        "0",
    )
    assert r.returncode == 0, r.stderr
    fused = json.loads((tmp_path / "e.json").read_text())
    r = run_cli(
        "eval",
        "--data",
        str(data / "val"),
        "-c",
        str(out / "best.pth"),
        "--no-fuse",
        "--output",
        str(tmp_path / "u.json"),
        "--workers",
        "0",
    )
    unfused = json.loads((tmp_path / "u.json").read_text())
    assert fused["n"] == unfused["n"] == 9 and fused["top1"] == unfused["top1"]
    assert abs(fused["loss"] - unfused["loss"]) < 1e-4
    best_top1 = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["best_top1"]
    assert fused["crop_pct"] == 0.875 and abs(fused["top1"] - best_top1) < 1e-6
    # levit predict prints the class names stored in the checkpoint
    r = run_cli("predict", str(data / "val" / "c2"), "-c", str(out / "best.pth"), "--topk", "1", "--json")
    assert r.returncode == 0, r.stderr
    assert {p["top"][0]["label"] for p in json.loads(r.stdout)} <= {"c0", "c1", "c2"}


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed")
def test_tensorboard_events_written(tiny_run):
    _, out, _ = tiny_run
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_fresh_run_never_overwrites_an_earlier_one(tiny_run):
    data, out, _ = tiny_run
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    with pytest.raises(LeViTError, match="holds checkpoints of an earlier run: continue it with --resume auto"):
        train(resolve_config(**tiny_config(data, out)))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


def test_eval_cli_errors(tiny_run, tmp_path):
    data, out, _ = tiny_run
    r = run_cli("eval", "--data", str(tmp_path / "nope"), "-c", str(out / "best.pth"))
    assert r.returncode == 1 and "does not exist" in r.stderr and r.stderr.count("\n") == 1
    r = run_cli("eval", "--data", str(data / "val"), "--model", "levit_tiny")
    assert r.returncode == 2 and "--checkpoint" in r.stderr


# ---- kill -9 and resume --------------------------------------------------------------------------
RUNNER = r"""
import json, os, signal, sys
import torch
from levit.train import resolve_config, train
cfg = resolve_config(**json.loads(sys.argv[1]))
mode, at = sys.argv[2], int(sys.argv[3])
resume = sys.argv[4] if len(sys.argv) > 4 else None
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
train(cfg, callbacks=callbacks, resume=resume)
"""


@pytest.fixture(scope="module")
def resume_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    data = make_dataset(tmp / "data", classes=3, train=8, val=2)
    # every random stream is on: RandAugment, random erasing, Mixup/CutMix, drop path, repeated aug, EMA
    extra = dict(epochs=2, checkpoint_every_steps=2, drop_path=0.1, repeated_aug=3, keep_last=10)
    ref = tiny_config(data, tmp / "ref", **extra)
    r = run_py(RUNNER, json.dumps(ref), "none", "0")
    assert r.returncode == 0, r.stderr
    return data, tmp, extra, step_losses(tmp / "ref")


@pytest.mark.parametrize("mode, at, resumes_from", [("step", 9, 8), ("save", 8, 6)])
def test_kill9_then_resume_auto_reproduces_losses(resume_setup, mode, at, resumes_from):
    data, tmp, extra, ref_losses = resume_setup
    assert sorted(ref_losses) == list(range(1, 13))  # 24 images / batch 4 = 6 steps x 2 epochs
    out = tmp / f"run_{mode}"
    cfg = json.dumps(tiny_config(data, out, **extra))
    r = run_py(RUNNER, cfg, mode, str(at))
    assert r.returncode == -9, r.stderr  # really killed
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("ckpt-*.pth"))
    assert ckpts[-1] == f"ckpt-{resumes_from:09d}.pth"  # no half-written file under a checkpoint name
    for p in (out / "checkpoints").glob("ckpt-*.pth"):  # every earlier file is intact
        torch.load(p, weights_only=True)
    r = run_py(RUNNER, cfg, "none", "0", "auto")
    assert r.returncode == 0, r.stderr
    assert f"ckpt-{resumes_from:09d}.pth" in r.stderr  # says where it resumed from
    assert not list((out / "checkpoints").glob(".*.tmp"))  # debris of the crash cleaned
    assert step_losses(out) == ref_losses  # bit-identical per-step losses
    a = torch.load(tmp / "ref" / "checkpoints" / "ckpt-000000012.pth", weights_only=True)
    b = torch.load(out / "checkpoints" / "ckpt-000000012.pth", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["ema"]:
        assert torch.equal(a["ema"][k], b["ema"][k]), k


def test_resume_errors(tmp_path):
    r = run_cli(
        "train", "--data", str(tmp_path), "--output", str(tmp_path), "--model", "levit_tiny", "--resume", "nope.pth"
    )
    assert r.returncode == 2 and "--resume must be 'auto' or an existing checkpoint file" in r.stderr


# ---- distributed ---------------------------------------------------------------------------------
DDP_RUNNER = r"""
import json, os, sys
import torch
from levit.train import resolve_config, train
cfg = resolve_config(**json.loads(sys.argv[1]))
res = train(cfg)
rank = int(os.environ["RANK"])
torch.save({"sd": res.model.state_dict(), "n": res.last["n"], "top1": res.last["top1"]}, f"{sys.argv[2]}/rank{rank}.pt")
"""


def test_ddp_two_process_gloo_identical_weights(tmp_path):
    data = make_dataset(tmp_path / "data", classes=3, train=6, val=3)
    (data / "val" / "c0" / "c0_000.png").unlink()  # 8 val images left
    (data / "val" / "c2" / "c2_000.png").unlink()  # 7: shards of 4 and 3, nothing padded or counted twice
    cfg = tiny_config(data, tmp_path / "out", epochs=2, workers=1, mixup=0.8, cutmix=1.0, drop_path=0.1)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    (tmp_path / "r.py").write_text(DDP_RUNNER)
    r = subprocess.run(
        [*torchrun, str(tmp_path / "r.py"), json.dumps(cfg), str(tmp_path)],
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in (0, 1))
    assert a["sd"].keys() == b["sd"].keys()
    for k in a["sd"]:
        assert torch.equal(a["sd"][k], b["sd"][k]), k  # parameters AND BatchNorm statistics
    assert a["n"] == b["n"] == 7  # every val image counted exactly once across ranks
    assert a["top1"] == b["top1"]
    # logging and checkpoints from rank 0 only: one record per step; 18 images / (4 x 2) = 2 steps per epoch
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["event"] == "step"] == [1, 2, 3, 4]
    assert "training levit_tiny" in r.stderr and r.stderr.count("training levit_tiny") == 1
    state = torch.load(tmp_path / "out" / "checkpoints" / "ckpt-000000004.pth", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert torch.equal(state["model"]["head.linear.weight"], a["sd"]["head.linear.weight"])


def test_hard_distillation_run_with_a_levit_teacher(tiny_run, tmp_path):
    data, out, _ = tiny_run
    teacher_file = out / "best.pth"
    before = teacher_file.read_bytes()
    cfg = resolve_config(
        **tiny_config(data, tmp_path / "student", epochs=1, distillation="hard", teacher_checkpoint=str(teacher_file))
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
    r = run_cli(
        "train",
        "--data",
        str(data),
        "-o",
        str(tmp_path / "o"),
        "-m",
        "levit_tiny",
        "--distillation",
        "none",
        "--device",
        "cuda",
    )
    assert r.returncode == 1 and "no CUDA GPU is available" in r.stderr and r.stderr.count("\n") == 1


def test_resume_finished_run_with_more_epochs(tmp_path):
    data = make_dataset(tmp_path / "d", classes=2, train=4, val=1)
    train(resolve_config(**tiny_config(data, tmp_path / "o", epochs=1)))
    result = train(resolve_config(**tiny_config(data, tmp_path / "o", epochs=3)), resume="auto")
    lines = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines if x["event"] == "epoch"] == [1, 2, 3]
    assert [x["step"] for x in lines if x["event"] == "step"] == [1, 2, 3, 4, 5, 6]
    assert [x["event"] for x in lines].count("summary") == 1 and lines[-1]["epochs"] == 3
    assert result.best_epoch >= 1


@pytest.mark.parametrize("gpu, backend", [(True, "nccl"), (False, "gloo")])
def test_process_group_backend_follows_the_device(monkeypatch, gpu, backend):
    """Structural check of the GPU path on a CPU machine: NCCL + cuda:LOCAL_RANK under torchrun on GPUs."""
    import levit.train as lt

    calls = {}
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.setdefault("set_device", i))
    monkeypatch.setattr(lt.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(lt.dist, "init_process_group", lambda backend, **kw: calls.update(backend=backend, **kw))
    d = lt._init_distributed("auto")
    assert calls["backend"] == backend and (d.rank, d.world, d.local_rank) == (3, 4, 1) and not d.main
    assert d.device == (torch.device("cuda", 1) if gpu else torch.device("cpu"))
    assert calls.get("set_device") == (1 if gpu else None)
