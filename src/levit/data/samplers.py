"""Samplers: repeated augmentation (DeiT's RASampler) and plain sharding across processes."""

from __future__ import annotations

import math

import torch


class RepeatAugSampler(torch.utils.data.Sampler):
    """Distributed sampler with repeated augmentation (DeiT's RASampler) and a resumable position.

    Every epoch: a seeded permutation of the dataset, each index repeated ``repeats`` times in a row
    (the copies land on different ranks, or in the same batch on one process, and are augmented
    differently), padded to a multiple of ``num_replicas``, then rank ``r`` takes every
    ``num_replicas``-th element starting at ``r``. Each rank yields ``ceil(len(dataset) / num_replicas)``
    samples, so an epoch sees as many images as without repetition. Elements are ``(index, seed)``
    pairs; the seed drives that sample's augmentation. ``set_epoch(epoch, start)`` skips the first
    ``start`` samples of this rank (resume in the middle of an epoch). ``repeats=1`` is a plain
    (shuffled, padded) distributed sampler.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        repeats: int = 3,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        if num_samples < 1:
            raise ValueError("RepeatAugSampler needs a non-empty dataset")
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        self.n, self.num_replicas, self.rank = num_samples, num_replicas, rank
        self.repeats, self.shuffle, self.seed = repeats, shuffle, seed
        self.epoch, self.start = 0, 0
        self.per_rank = math.ceil(num_samples / num_replicas)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's permutation and skip the first ``start`` samples of this rank."""
        self.epoch, self.start = epoch, start

    def indices(self) -> list[tuple[int, int]]:
        """All ``(index, seed)`` pairs of this rank for the current epoch (ignoring ``start``)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        order = order.repeat_interleave(self.repeats).tolist()
        total = math.ceil(len(order) / self.num_replicas) * self.num_replicas
        order += order[: total - len(order)]  # pad so every rank gets the same count
        mine = list(range(self.rank, total, self.num_replicas))[: self.per_rank]
        # a seed per (epoch, global position) so that repeated copies are augmented differently
        base = (self.seed * 1_000_003 + self.epoch) * 10_000_019
        return [(order[p], (base + p) % 2**63) for p in mine]

    def __iter__(self):
        return iter(self.indices()[self.start :])

    def __len__(self) -> int:
        return self.per_rank - self.start

    def state_dict(self) -> dict:
        """Epoch, position and layout, saved in checkpoints."""
        return {"epoch": self.epoch, "start": self.start, "seed": self.seed, "num_replicas": self.num_replicas}


class ShardSampler(torch.utils.data.Sampler):
    """Evaluation sampler: rank ``r`` gets indices ``r, r + W, r + 2W, ...`` with no padding, so a
    reduction over ranks counts every sample exactly once."""

    def __init__(self, num_samples: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.idx = list(range(rank, num_samples, num_replicas))

    def __iter__(self):
        return iter(self.idx)

    def __len__(self) -> int:
        return len(self.idx)
