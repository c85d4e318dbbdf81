"""Evaluating a model on an image folder, WebDataset shards or a Hugging Face dataset (``levit eval``):
class matching, the model's own preprocessing (:meth:`levit.data.preprocess.Preprocess.from_model`),
one part per process under torchrun."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..data.preprocess import Preprocess
from ..errors import LeViTError
from .distributed import distributed
from .engine import evaluate

__all__ = ["evaluate_folder"]


def evaluate_folder(
    model: nn.Module,
    data: str | os.PathLike,
    *,
    preprocessing: Mapping[str, Any] | None = None,
    fuse: bool = True,
    batch_size: int = 64,
    workers: int | None = None,
    device: str = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate ``model`` on ``data``: an ImageFolder (one sub-folder per class), WebDataset shards (a
    folder of ``.tar`` shards, a shard folder whose ``val/`` holds them, or a brace pattern) or a
    Hugging Face dataset (a ``save_to_disk`` or Parquet folder, or a dataset folder's ``val/``), as
    :func:`levit.data.loaders.eval_source` recognises it. Under torchrun every process takes a part
    (its samples, or its shards) and the counts are reduced (the group is torn down after).

    The images get the model's own preprocessing (:meth:`levit.data.preprocess.Preprocess.from_model`,
    the very object ``levit predict`` and the server decode with, fed the file or the sample's bytes),
    ``preprocessing`` overriding its settings (e.g. ``{"crop_pct": 1.0, "decoder": "tensor"}``; ``None``
    values keep the model's); with ``fuse`` the model runs in its inference form
    (:func:`levit.models.fuse.inference_form`; same outputs, faster). Classes are matched to
    ``model.class_names`` by name when the model has them, else taken in sorted order (numbered
    classes: as indices). ``workers``: loading processes (default: the available cores, at most eight).
    Returns :func:`levit.train.engine.evaluate`'s numbers plus ``rank`` (only rank 0 should print),
    ``crop_pct`` and ``fused``. ``progress`` shows a progress bar on stderr (rank 0)."""
    from ..data.loaders import eval_source

    kind, where = eval_source(data)
    preprocess = Preprocess.from_model(model, **(preprocessing or {}))
    classes, make = _EVAL_SETS[kind](where, preprocess)
    lut = _label_map(classes, model)
    if fuse:
        from ..models.fuse import inference_form

        model = inference_form(model)
    if workers is None:
        from ..utils import default_workers

        workers = default_workers()
    with distributed(device) as ctx:
        loader = make(ctx.rank, ctx.world_size, batch_size, workers)
        batches: Iterable = (
            (images, lut[targets] if targets.numel() else targets, bad) for images, targets, bad in loader
        )
        if progress and ctx.is_main:
            from tqdm.auto import tqdm

            total = len(loader) if hasattr(loader.dataset, "__len__") else None  # a stream's length is unknown
            batches = tqdm(batches, total=total, desc="eval", unit="batch", leave=False, file=sys.stderr)
        metrics = evaluate(model.to(ctx.device).eval(), batches, ctx.device)
        return metrics | {"rank": ctx.rank, "crop_pct": preprocess.crop_pct, "fused": model.is_fused}


def _label_map(classes: list[str], model: nn.Module) -> torch.Tensor:
    """The model's class index of each of the data's classes: by name when the model has names (or
    the data's classes are numbered ``0 .. n-1``: their numbers), else in order, counts equal."""
    names = list(getattr(model, "class_names", None) or [])
    numbered = classes == [str(i) for i in range(len(classes))]
    num_classes = model.config.num_classes
    if names and set(classes) <= set(names):
        return torch.tensor([names.index(c) for c in classes], dtype=torch.long)
    if numbered and len(classes) <= num_classes:
        return torch.arange(len(classes))  # class indices, as the shards' .cls or the label column hold them
    if names:
        unknown = [c for c in classes if c not in names]
        raise LeViTError(f"--data: class(es) {unknown[:5]} are not classes of the checkpoint")
    if len(classes) != num_classes:
        raise LeViTError(
            f"--data: {len(classes)} classes, but the model has {num_classes} classes and "
            "no class names to match them by (classes are taken in sorted order)"
        )
    return torch.arange(len(classes))


def _folder_set(root: Any, preprocess: Preprocess) -> tuple[list[str], Any]:
    from ..data.datasets import SafeImageFolder, check_image_folder, collate_skip
    from ..data.samplers import ShardSampler

    classes = check_image_folder(root)
    # the dataset hands each path to the preprocessing, which decodes it as every other entry point does
    dataset = SafeImageFolder(root, transform=preprocess, replace_bad=False, loader=str)

    def make(rank: int, world: int, batch_size: int, workers: int) -> torch.utils.data.DataLoader:
        sampler = ShardSampler(len(dataset), world, rank)
        return torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_skip
        )

    return classes, make


def _shard_set(shards: Any, preprocess: Preprocess) -> tuple[list[str], Any]:
    from ..data.datasets import collate_skip
    from ..data.shards import ShardStream, index_shards

    index = index_shards({"val": list(shards)})

    def make(rank: int, world: int, batch_size: int, workers: int) -> torch.utils.data.DataLoader:
        # each worker reads shards of its own: never more workers than this process has shards
        stream = ShardStream(index.splits["val"], preprocess, rank=rank, world=world, loader=bytes)
        workers = min(workers, len(index.splits["val"][rank::world]))
        return torch.utils.data.DataLoader(stream, batch_size=batch_size, num_workers=workers, collate_fn=collate_skip)

    return index.classes, make


def _hf_set(folder: Any, preprocess: Preprocess) -> tuple[list[str], Any]:
    from ..data.datasets import collate_skip
    from ..data.hfds import HFImages, encoded, find_columns, load_split
    from ..data.samplers import ShardSampler

    ds = load_split(folder)
    image, label, names = find_columns(ds, folder)
    if names is None:
        names = [str(i) for i in range(max(ds[label], default=-1) + 1)]
    dataset = HFImages(ds, image, label, preprocess, replace_bad=False, loader=encoded)

    def make(rank: int, world: int, batch_size: int, workers: int) -> torch.utils.data.DataLoader:
        sampler = ShardSampler(len(dataset), world, rank)
        return torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_skip
        )

    return list(names), make


#: how each kind of evaluation data is read: (its class names, a loader maker for (rank, world, batch, workers))
_EVAL_SETS = {"folder": _folder_set, "shards": _shard_set, "hf": _hf_set}
