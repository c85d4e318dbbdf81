"""The loaders of a training run, whatever the layout of ``--data``: WebDataset shards
(:func:`levit.data.shards.build_shard_loaders`), Hugging Face datasets
(:func:`levit.data.hfds.build_hf_loaders`) or an ImageFolder (:func:`levit.data.datasets.build_loaders`)."""

from __future__ import annotations

import os
from pathlib import Path

from .datasets import TrainValData, build_loaders
from .hfds import build_hf_loaders, is_hf_folder
from .shards import build_shard_loaders, is_shard_folder

__all__ = ["build_run_loaders"]


def build_run_loaders(
    cfg, root: str | os.PathLike, *, world: int = 1, rank: int = 0, pin_memory: bool = False
) -> TrainValData:
    """The training and validation loaders for ``root``, by the layout its ``train/`` folder has."""
    build = build_loaders
    if is_shard_folder(Path(root)):
        build = build_shard_loaders
    elif is_hf_folder(root):
        build = build_hf_loaders
    return build(cfg, root, world=world, rank=rank, pin_memory=pin_memory)
