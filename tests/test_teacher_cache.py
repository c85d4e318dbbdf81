"""The teacher cache: built once, read by hard distillation with the live teacher's losses, bit for bit."""

from __future__ import annotations

import pytest
import torch
from train_utils import cli, make_dataset, step_losses, tiny_config

import levit
from levit.errors import LeViTError
from levit.train.recipe import resolve_config
from levit.train.run import train
from levit.train.teacher_cache import build_teacher_cache


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tc")
    data = make_dataset(tmp / "data", classes=3, train=6, val=2)
    torch.manual_seed(5)
    teacher = levit.create_model("levit_tiny", num_classes=3, img_size=32, distillation=False)
    levit.save(teacher, tmp / "teacher.safetensors")
    values = dict(distillation="hard", teacher_checkpoint=str(tmp / "teacher.safetensors"), drop_path=0.1)
    return tmp, data, values


def test_cached_teacher_gives_the_live_teachers_losses(setup):
    tmp, data, values = setup
    live = train(resolve_config(**tiny_config(data, tmp / "live", **values)))
    cache = build_teacher_cache(resolve_config(**tiny_config(data, tmp / "unused", **values)), tmp / "teacher.cache")
    cached = train(resolve_config(**tiny_config(data, tmp / "cached", teacher_cache=str(cache), **values)))
    assert step_losses(tmp / "cached") == step_losses(tmp / "live") and len(step_losses(tmp / "live")) == 8
    a, b = live.model.state_dict(), cached.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a run whose views differ, or a damaged file, is refused in one line naming why
    with pytest.raises(LeViTError, match=r"made for another run \(recipe.seed"):
        train(resolve_config(**tiny_config(data, tmp / "other", teacher_cache=str(cache), seed=1, **values)))
    with pytest.raises(LeViTError, match="needs 3 of"):
        train(resolve_config(**tiny_config(data, tmp / "longer", teacher_cache=str(cache), epochs=3, **values)))


def test_teacher_cache_command_builds_the_same_cache(setup):
    tmp, data, values = setup
    recipe = ["img_size=32", "batch_size=4", "epochs=2", "total_batch=null"]  # right after the file name
    options = ["--data", data, "--teacher-checkpoint", values["teacher_checkpoint"], "--model", "levit_tiny"]
    done = cli("data", "teacher-cache", tmp / "cli.cache", *recipe, *options)
    assert done.returncode == 0, done.stderr
    assert "teacher_cache=" in done.stderr
    library = tmp / "library.cache"
    build_teacher_cache(resolve_config(**tiny_config(data, tmp / "unused", **values)), library)
    a, b = (torch.load(p, weights_only=True) for p in (tmp / "cli.cache", library))
    assert torch.equal(a["classes"], b["classes"]) and a["fingerprint"] == b["fingerprint"]
    assert cli("data", "teacher-cache", tmp / "bad.cache", *recipe, "mixup=oops", *options).returncode == 2
