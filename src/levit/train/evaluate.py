"""Evaluating a model on an image folder (``levit eval``): class matching, the model's own
preprocessing (:meth:`levit.data.preprocess.Preprocess.from_model`), one shard per process under torchrun."""

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
    """Evaluate ``model`` on an ImageFolder (one sub-folder per class); under torchrun every process
    takes a shard and the counts are reduced (the group is torn down after).

    The images get the model's own preprocessing (:meth:`levit.data.preprocess.Preprocess.from_model`,
    the very object ``levit predict`` and the server decode with), ``preprocessing`` overriding its
    settings (e.g. ``{"crop_pct": 1.0, "decoder": "tensor"}``; ``None`` values keep the model's); with ``fuse`` the
    model runs in its inference form (:func:`levit.models.fuse.inference_form`; same outputs, faster).
    Class folders are matched to ``model.class_names`` by name when the model has them, else taken in
    sorted order. ``workers``: loading processes (default: the available cores, at most eight).
    Returns :func:`levit.train.engine.evaluate`'s numbers plus ``rank`` (only rank 0 should print),
    ``crop_pct`` and ``fused``. ``progress`` shows a progress bar on stderr (rank 0)."""
    from ..data.datasets import SafeImageFolder, check_image_folder, collate_skip
    from ..data.samplers import ShardSampler

    classes = check_image_folder(data)
    names = getattr(model, "class_names", None)
    if names:
        unknown = [c for c in classes if c not in names]
        if unknown:
            raise LeViTError(f"--data: class folder(s) {unknown[:5]} are not classes of the checkpoint")
        class_to_idx = {c: list(names).index(c) for c in classes}
    else:
        if len(classes) != model.config.num_classes:
            raise LeViTError(
                f"--data: {len(classes)} class folders, but the model has {model.config.num_classes} classes and "
                "no class names to match them by (folders are taken in sorted order)"
            )
        class_to_idx = {c: i for i, c in enumerate(classes)}
    preprocess = Preprocess.from_model(model, **(preprocessing or {}))
    if fuse:
        from ..models.fuse import inference_form

        model = inference_form(model)
    # the dataset hands each path to the preprocessing, which decodes it as every other entry point does
    dataset = SafeImageFolder(data, transform=preprocess, class_to_idx=class_to_idx, replace_bad=False, loader=str)
    if workers is None:
        from ..utils import default_workers

        workers = default_workers()
    with distributed(device) as ctx:
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=ShardSampler(len(dataset), ctx.world_size, ctx.rank),
            num_workers=workers,
            collate_fn=collate_skip,
        )
        batches: Iterable = loader
        if progress and ctx.is_main:
            from tqdm.auto import tqdm

            batches = tqdm(loader, desc="eval", unit="batch", leave=False, file=sys.stderr, dynamic_ncols=True)
        metrics = evaluate(model.to(ctx.device).eval(), batches, ctx.device)
        return metrics | {"rank": ctx.rank, "crop_pct": preprocess.crop_pct, "fused": model.is_fused}
