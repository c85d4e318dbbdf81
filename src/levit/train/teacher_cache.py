"""A teacher paid once (TinyViT's idea): run the teacher over every augmented view a run will train on,
store its answer per view, and let any later run read it instead of running the teacher.

A view is fixed by the run's data pipeline: every sample's augmentation is seeded by (seed, epoch,
position) (:class:`levit.data.samplers.RepeatAugSampler`) and Mixup/CutMix draw from the process's
random streams, which :func:`build_teacher_cache` seeds and advances exactly as training does. So
epoch ``e``, micro-batch ``b``, row ``r`` of the cache is the view that training meets at the same
place, and hard distillation needs only the teacher's top class there: the losses are those of the
live teacher, bit for bit. The file holds the classes (``epochs x batches x batch``), a fingerprint
of the data, the recipe values that shape the views and the teacher, and a SHA-256 of the classes;
a run whose fingerprint differs is refused with the first difference.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LeViTError
from .rundir import seed_all

__all__ = ["VIEW_KEYS", "CachedTeacher", "build_teacher_cache", "cache_fingerprint"]

#: the recipe values that decide which views a run trains on (and so what the cache holds)
VIEW_KEYS = ("img_size", "batch_size", "seed", "repeated_aug", "auto_augment", "train_interpolation")
VIEW_KEYS += ("train_crop_scale", "hflip", "color_jitter", "reprob", "remode", "recount", "mixup", "cutmix")
VIEW_KEYS += ("mixup_prob", "mixup_switch_prob", "mixup_mode", "smoothing", "eval_crop_pct")


def _file_digest(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_fingerprint(cfg: Any, data: Any) -> dict[str, Any]:
    """What a cache is valid for: the training set (its samples' names and sizes, or its classes and
    size), the recipe's view keys (:data:`VIEW_KEYS`) and the teacher (its weights' SHA-256)."""
    dataset = getattr(data.train_loader, "dataset", None)
    samples = getattr(dataset, "samples", None)
    if samples is not None:
        listing = "\n".join(f"{Path(p).name} {t} {os.path.getsize(p)}" for p, t in samples)
    else:
        listing = f"{data.class_names} {data.sizes}"
    return {
        "data": hashlib.sha256(listing.encode()).hexdigest(),
        "recipe": {key: getattr(cfg, key) for key in VIEW_KEYS},
        "teacher": {"weights": _file_digest(cfg.teacher_checkpoint)},  # the weights name the teacher
    }


def _first_difference(want: dict, got: dict, prefix: str = "") -> str | None:
    for key in sorted(set(want) | set(got)):
        a, b = want.get(key), got.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = _first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key}: this run {a!r}, the cache {b!r}"
    return None


@torch.no_grad()
def build_teacher_cache(cfg: Any, path: str | os.PathLike) -> Path:
    """Run ``cfg``'s teacher over every view of ``cfg.epochs`` epochs of ``cfg``'s training data, as a
    one-process run of ``cfg`` would meet them, and write their top classes to ``path``."""
    from ..data.loaders import build_run_loaders
    from ..data.transforms import build_mixup
    from .distill import build_teacher

    if cfg.data is None:
        raise LeViTError("a teacher cache is built for --data DIR (the bundled digits: their folder in a run's output)")
    data = build_run_loaders(cfg, cfg.data)
    teacher = build_teacher(cfg.teacher, cfg.teacher_checkpoint, len(data.class_names))
    mixup = build_mixup(cfg, len(data.class_names))
    seed_all(cfg.seed)  # as a fresh one-process run seeds itself before its first batch
    classes = torch.full((cfg.epochs, data.micro_per_epoch, cfg.batch_size), -1, dtype=torch.int32)
    for epoch in range(cfg.epochs):
        data.sampler.set_epoch(epoch)
        for b, (images, targets, _) in enumerate(data.train_loader):
            if mixup is not None:
                images, targets = mixup(images, targets)
            classes[epoch, b, : images.shape[0]] = teacher(images).argmax(dim=1).int()
    payload = {"classes": classes, "fingerprint": cache_fingerprint(cfg, data)}
    payload["sha256"] = hashlib.sha256(classes.numpy().tobytes()).hexdigest()
    path = Path(path)
    from .rundir import atomic_save

    return atomic_save(payload, path)


class CachedTeacher(nn.Module):
    """A teacher read from a cache: :meth:`seek` (epoch, micro-batch) before each forward, which
    returns one-hot logits of the cached classes (hard distillation takes their argmax)."""

    def __init__(self, path: str | os.PathLike, cfg: Any, data: Any, world_size: int = 1) -> None:
        super().__init__()
        path = Path(path)
        try:
            saved = torch.load(path, weights_only=True)
            classes = saved["classes"]
        except Exception as e:
            raise LeViTError(f"teacher_cache: {path} is not a teacher cache ({type(e).__name__})") from None
        if hashlib.sha256(classes.numpy().tobytes()).hexdigest() != saved.get("sha256"):
            raise LeViTError(f"teacher_cache: {path} is damaged (its checksum does not match)")
        if cfg.distillation != "hard" or world_size != 1:
            raise LeViTError("teacher_cache: only hard distillation in one process reads a teacher cache")
        difference = _first_difference(cache_fingerprint(cfg, data), saved["fingerprint"])
        if difference is not None:
            raise LeViTError(f"teacher_cache: {path} was made for another run ({difference})")
        if classes.shape[0] < cfg.epochs or classes.shape[1] != data.micro_per_epoch:
            raise LeViTError(
                f"teacher_cache: {path} holds {classes.shape[0]} epoch(s) of {classes.shape[1]} batches; this run "
                f"needs {cfg.epochs} of {data.micro_per_epoch}: build it with epochs={cfg.epochs}"
            )
        self.register_buffer("classes", classes.long(), persistent=False)
        self.num_classes, self.epoch, self.batch = len(data.class_names), 0, 0

    def seek(self, epoch: int, micro_batch: int) -> None:
        """The view the next forward answers for."""
        self.epoch, self.batch = epoch, micro_batch

    def forward(self, x: Tensor) -> Tensor:
        found = self.classes[self.epoch, self.batch, : x.shape[0]].to(x.device)
        return F.one_hot(found, self.num_classes).to(x.dtype)
