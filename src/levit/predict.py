"""Classify image files with the official evaluation preprocessing."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from .data import DEFAULT_CROP_PCT, eval_transform, imagenet_class_names

__all__ = ["IMAGE_EXTENSIONS", "class_names_for", "find_images", "predict_paths"]

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def find_images(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given, plus every image (by extension) under each folder, sorted. A missing path is an error."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"no such image file or folder: {p}")
    return out


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
    from PIL import Image

    paths, tensors = [], []
    for f in files:
        try:
            with Image.open(f) as im:
                tensors.append(transform(im.convert("RGB")))
            paths.append(f)
        except Exception as e:  # unreadable or truncated image: report and go on
            on_error(f, f"cannot read image ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
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
    crop_pct: float = DEFAULT_CROP_PCT,
    progress: bool = True,
    on_error: Callable[[Path, str], None] | None = None,
    runner: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[dict]:
    """Top-k predictions for every readable image under ``paths``.

    Returns one dict per image: ``{"path", "top": [{"class", "label", "prob"}, ...]}``. Unreadable
    images are passed to ``on_error(path, message)`` and skipped. The model is fused first when it
    is an unfused LeViT (same outputs, faster). ``runner`` (e.g. a :func:`levit.deploy` predictor)
    replaces the model's forward pass: logits from a (B, 3, H, W) batch.
    """
    from .fuse import FusedLeViT, fuse

    files = find_images(paths)
    if not isinstance(model, FusedLeViT):
        names = class_names_for(model)
        model = fuse(model)
    else:
        names = class_names_for(model)
    model.eval()
    p = next(model.parameters())
    transform = eval_transform(model.config.img_size, crop_pct)
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
