"""Training data: samplers, unreadable images, seeded augmentation, layout checks, the digits demo."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch
from train_utils import make_folder

from levit.data import (
    RepeatAugSampler,
    SafeImageFolder,
    ShardSampler,
    build_mixup,
    check_image_folder,
    collate_skip,
    make_digits_folder,
    train_transform,
)
from levit.errors import LeViTError
from levit.train import TrainConfig


@pytest.mark.parametrize("world", [1, 2, 3])
def test_repeat_aug_sampler_across_ranks(world):
    n = 10
    samplers = [RepeatAugSampler(n, num_replicas=world, rank=r, repeats=3, seed=5) for r in range(world)]
    per_rank = [s.indices() for s in samplers]
    assert all(len(p) == len(s) == -(-n // world) for p, s in zip(per_rank, samplers))  # equal steps on all ranks
    pairs = [p for rank in per_rank for p in rank]
    seeds = [s for _, s in pairs]
    assert len(set(seeds)) == len(seeds)  # every copy is augmented differently
    counts = Counter(i for i, _ in pairs)
    # an epoch sees ~n samples; each index appears in runs of 3 copies spread over the ranks
    assert sum(counts.values()) == len(per_rank[0]) * world
    assert max(counts.values()) <= 3
    if world == 3:  # consecutive copies go to different ranks
        assert per_rank[0][0][0] == per_rank[1][0][0] == per_rank[2][0][0]
    # deterministic per epoch, different across epochs
    again = RepeatAugSampler(n, num_replicas=world, rank=0, repeats=3, seed=5)
    assert again.indices() == per_rank[0]
    again.set_epoch(1)
    assert again.indices() != per_rank[0]


def test_repeat_aug_sampler_resume_position():
    s = RepeatAugSampler(20, repeats=3, seed=1)
    s.set_epoch(4)
    full = list(s)
    s.set_epoch(4, start=7)
    assert list(s) == full[7:] and len(s) == len(full) - 7
    plain = RepeatAugSampler(6, repeats=1, shuffle=False)
    assert [i for i, _ in plain] == list(range(6))


def test_shard_sampler_counts_every_sample_once():
    shards = [list(ShardSampler(7, 3, r)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(7))


def test_corrupt_image_is_skipped_and_reported(tmp_path):
    make_folder(tmp_path / "d", {"a": 2, "b": 2})
    bad = tmp_path / "d" / "a" / "a_001.png"
    bad.write_bytes(b"not an image at all")
    ds = SafeImageFolder(tmp_path / "d", transform=train_transform(_cfg()))
    img, target, bad_paths = ds[1]  # a_001 -> replaced by the next readable image (b_000)
    assert bad_paths == [str(bad)] and target == 1 and img.shape == (3, 32, 32)
    x, y, paths = collate_skip([ds[0], ds[1], ds[2]])
    assert x.shape == (3, 3, 32, 32) and y.tolist() == [0, 1, 1] and paths == [str(bad)]


def test_seeded_augmentation_is_reproducible_and_leaves_caller_rng_alone(tmp_path):
    make_folder(tmp_path / "d", {"a": 3})
    ds = SafeImageFolder(tmp_path / "d", transform=train_transform(_cfg()))
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    before = torch.rand(1), random.random(), np.random.rand()
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    a, b, c = ds[(0, 123)][0], ds[(0, 123)][0], ds[(0, 124)][0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (torch.rand(1), random.random(), np.random.rand()) == before


def test_layout_errors_name_the_folder(tmp_path):
    with pytest.raises(LeViTError, match="does not exist"):
        check_image_folder(tmp_path / "missing")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(LeViTError, match="is not a folder"):
        check_image_folder(tmp_path / "f.txt")
    make_folder(tmp_path / "ok", {"x": 1, "y": 1})
    assert check_image_folder(tmp_path / "ok") == ["x", "y"]
    with pytest.raises(LeViTError, match=r"class folder\(s\) \['y'\] unknown to the model"):
        SafeImageFolder(tmp_path / "ok", class_to_idx={"x": 0})


def test_paper_augmentation_and_mixup_build():
    cfg = TrainConfig(img_size=32)
    tf = train_transform(cfg)
    text = repr(tf)
    assert "RandAugment" in text and "RandomErasing" in text and "bicubic" in text.lower()
    mix = build_mixup(cfg, 10)
    assert mix.mixup_alpha == 0.8 and mix.cutmix_alpha == 1.0 and mix.label_smoothing == 0.1
    assert mix.mix_prob == 1.0 and mix.switch_prob == 0.5 and mix.mode == "batch"
    _, y = mix(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    assert y.shape == (4, 10) and torch.allclose(y.sum(1), torch.ones(4))
    assert build_mixup(TrainConfig(mixup=0, cutmix=0), 10) is None


def test_digits_folder(tmp_path):
    root = make_digits_folder(tmp_path / "digits")
    train = sum(1 for _ in (root / "train").rglob("*.png"))
    val = sum(1 for _ in (root / "val").rglob("*.png"))
    assert train + val == 1797 and val == 360
    assert check_image_folder(root / "val") == [str(i) for i in range(10)]
    mtime = (root / ".complete").stat().st_mtime
    make_digits_folder(root)  # reused, not rewritten
    assert (root / ".complete").stat().st_mtime == mtime


def _cfg() -> TrainConfig:
    return TrainConfig(img_size=32)
