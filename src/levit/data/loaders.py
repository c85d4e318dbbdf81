"""The loaders of a training run, whatever the layout of ``--data``: WebDataset shards
(:func:`levit.data.shards.build_shard_loaders`, also from the recipe's ``train_shards``/``val_shards``
brace patterns), Hugging Face datasets (:func:`levit.data.hfds.build_hf_loaders`, streamed with
``hf_streaming``) or an ImageFolder (:func:`levit.data.datasets.build_loaders`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import LeViTError
from .datasets import TrainValData, build_loaders
from .hfds import build_hf_loaders, build_hf_stream_loaders, is_hf_folder
from .shards import build_shard_loaders, is_pattern, is_shard_folder

__all__ = ["build_run_loaders", "eval_source"]


def build_run_loaders(
    cfg, root: str | os.PathLike | None, *, world: int = 1, rank: int = 0, pin_memory: bool = False
) -> TrainValData:
    """The training and validation loaders for ``root``, by the layout its ``train/`` folder has
    (``root`` ``None``: the shards the recipe's ``train_shards`` and ``val_shards`` patterns name)."""
    if root is None:
        return build_shard_loaders(cfg, None, world=world, rank=rank, pin_memory=pin_memory)
    if is_pattern(root) and not Path(root).exists():
        raise LeViTError(
            f"--data {root}: a brace pattern names the shards of one split; give train_shards=PATTERN "
            "val_shards=PATTERN instead of --data"
        )
    build = build_loaders
    if is_shard_folder(Path(root)):
        build = build_shard_loaders
    elif is_hf_folder(root):
        build = build_hf_stream_loaders if getattr(cfg, "hf_streaming", False) else build_hf_loaders
    if getattr(cfg, "hf_streaming", False) and build is not build_hf_stream_loaders:
        # streaming is a way of reading Parquet: asked of any other layout it would silently do nothing
        raise LeViTError(f"hf_streaming=true: {Path(root) / 'train'} holds no .parquet files to stream")
    return build(cfg, root, world=world, rank=rank, pin_memory=pin_memory)


def eval_source(data: str | os.PathLike) -> tuple[str, Any]:
    """What an evaluation's ``--data`` names, recognised by its layout: ``("shards", [paths])`` for a
    brace pattern of shards, a folder of ``.tar`` shards or a shard folder's ``val/``; ``("hf", folder)``
    for a ``save_to_disk`` or Parquet folder, or a dataset folder's ``val/``; else ``("folder", path)``,
    an ImageFolder (one sub-folder per class, checked). One-line :class:`LeViTError` on a bad path."""
    from .datasets import check_image_folder
    from .hfds import is_hf_split
    from .shards import expand_pattern

    if is_pattern(data) and not Path(data).exists():
        return "shards", expand_pattern(data)
    root = Path(data)
    for folder in (root, root / "val"):  # the split itself, or the val split of a training --data
        tars = sorted(folder.glob("*.tar")) if folder.is_dir() else []
        if tars:
            return "shards", tars
        if is_hf_split(folder):
            return "hf", folder
    check_image_folder(root)
    return "folder", root
