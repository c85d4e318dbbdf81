"""Classify image files with the official evaluation preprocessing."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from ..data.datasets import imagenet_class_names
from ..data.images import IMAGE_EXTENSIONS, find_images, open_rgb
from ..data.transforms import eval_transform
from ..errors import LeViTError
from ..utils import first_line

__all__ = ["class_names_for", "list_inputs", "predict_paths"]


def list_inputs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The image files to classify: files as given plus the images under each folder. A missing path
    raises ``FileNotFoundError``; finding no image at all raises :class:`LeViTError` saying where and
    what was looked for."""
    paths = list(paths)
    files = find_images(paths)
    if not files:
        where = ", ".join(map(str, paths)) or "(no paths given)"
        raise LeViTError(f"no image files in {where} (looked for {' '.join(IMAGE_EXTENSIONS)})")
    return files


def class_names_for(model: nn.Module) -> list[str]:
    """Label names: the model's own (``model.class_names``), ImageNet's for 1000 classes, else numbers."""
    names = getattr(model, "class_names", None)
    n = model.config.num_classes
    if names and len(names) == n:
        return list(names)
    if n == 1000:
        return imagenet_class_names()
    return [f"class_{i}" for i in range(n)]


def _batches(
    files: list[Path], transform: Callable, batch_size: int, on_error: Callable[[Path, str], None]
) -> Iterator[tuple[list[Path], torch.Tensor]]:
    paths, tensors = [], []
    for f in files:
        try:
            tensors.append(transform(open_rgb(f)))
            paths.append(f)
        except Exception as e:  # unreadable or truncated image: report and go on
            on_error(f, f"cannot read image ({type(e).__name__}: {first_line(e, limit=160)})")
            continue
        if len(paths) == batch_size:
            yield paths, torch.stack(tensors)
            paths, tensors = [], []
    if paths:
        yield paths, torch.stack(tensors)


@torch.inference_mode()
def predict_paths(
    model: nn.Module,
    paths: Iterable[str | os.PathLike],
    *,
    topk: int = 5,
    batch_size: int = 32,
    crop_pct: float | None = None,
    progress: bool = True,
    on_error: Callable[[Path, str], None] | None = None,
    runner: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[dict]:
    """Top-k predictions for every readable image under ``paths``.

    Returns one dict per image: ``{"path", "top": [{"class", "label", "prob"}, ...]}``. Unreadable
    images are passed to ``on_error(path, message)`` and skipped; no image at all is a
    :class:`LeViTError`. The model runs in its inference form (:func:`levit.models.fuse.inference_form`:
    same outputs, faster). ``crop_pct`` defaults to the model's own (``model.pretrained_cfg``). ``runner`` (e.g. a :func:`levit.deploy` predictor) replaces the model's forward pass:
    logits from a (B, 3, H, W) batch.
    """
    from ..models.fuse import inference_form

    files = list_inputs(paths)
    names = class_names_for(model)
    model = inference_form(model)
    p = next(model.parameters())
    transform = eval_transform(model.config.img_size, crop_pct or model.pretrained_cfg["crop_pct"])
    k = min(topk, model.config.num_classes)
    results = []
    bar = None
    if progress and len(files) > batch_size:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(files), unit="img", desc="predict")
    for batch_paths, x in _batches(files, transform, batch_size, on_error or (lambda path, msg: None)):
        logits = runner(x) if runner is not None else model(x.to(device=p.device, dtype=p.dtype))
        probs = logits.float().softmax(-1)
        top_p, top_i = probs.topk(k, dim=-1)
        for path, ps, idx in zip(batch_paths, top_p.tolist(), top_i.tolist()):
            top = [{"class": i, "label": names[i], "prob": round(v, 6)} for v, i in zip(ps, idx)]
            results.append({"path": str(path), "top": top})
        if bar is not None:
            bar.update(len(batch_paths))
    if bar is not None:
        bar.close()
    return results
