"""A teacher paid once (TinyViT's idea): run the teacher over every augmented view a run will train on,
store its answer per view, and let any later run read it instead of running the teacher.

A view is fixed by the run's data pipeline: every sample's augmentation is seeded by (seed, epoch,
position) (:class:`levit.data.samplers.RepeatAugSampler`) and Mixup/CutMix draw from the process's
random streams, which :func:`build_teacher_cache` seeds and advances exactly as training does. So
epoch ``e``, micro-batch ``b``, row ``r`` of the cache is the view that training meets at the same
place. Hard distillation needs only the teacher's top class there (the losses are those of the live
teacher, bit for bit); soft distillation needs its distribution, so a soft cache also holds the
teacher's ``k`` largest logits per view (float16 values, int16 class indices; float32 values when
``k`` is every class, then the losses are again the live teacher's bit for bit) and one float32 for
the rest, from which training rebuilds the distribution as TinyViT does (the mass of the other
classes spread evenly over them; :class:`CachedTeacher`). The file holds the classes (``epochs x
batches x batch``), the logits if any, a fingerprint of the data, the recipe values that shape the
views and the teacher, and a SHA-256 of the arrays; a run whose fingerprint differs is refused with
the first difference.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.hfds import is_hf_folder
from ..errors import LeViTError
from .rundir import seed_all

__all__ = ["DEFAULT_TOPK", "VIEW_KEYS", "CachedTeacher", "build_teacher_cache", "cache_fingerprint", "rebuild_logits"]

#: the recipe values that decide which views a run trains on (and so what the cache holds)
VIEW_KEYS = ("img_size", "batch_size", "seed", "repeated_aug", "auto_augment", "train_interpolation")
VIEW_KEYS += ("train_crop_scale", "hflip", "color_jitter", "reprob", "remode", "recount", "mixup", "cutmix")
VIEW_KEYS += ("mixup_prob", "mixup_switch_prob", "mixup_mode", "smoothing", "eval_crop_pct")
#: logits kept per view by a soft cache unless told otherwise (TinyViT keeps 10 of ImageNet's 1000)
DEFAULT_TOPK = 10
#: the arrays a cache may hold, in the order its checksum reads them
ARRAYS = ("classes", "values", "indices", "rest")


def _file_digest(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_fingerprint(cfg: Any, data: Any) -> dict[str, Any]:
    """What a cache is valid for: the training set (the names and sizes of its files: images, shards,
    Parquet or ``save_to_disk`` files; else its classes and size), the recipe's view keys
    (:data:`VIEW_KEYS`) and the teacher (its weights' SHA-256)."""
    dataset = getattr(data.train_loader, "dataset", None)
    samples = getattr(dataset, "samples", None)
    stream = getattr(getattr(data.train_loader, "loader", None), "dataset", None)  # shards: an EpochLoader's
    shards = getattr(stream, "shards", None)
    files = getattr(stream, "files", None)  # a streamed Parquet split (hf_streaming=true)
    if samples is not None:
        listing = "\n".join(f"{Path(p).name} {t} {os.path.getsize(p)}" for p, t in samples)
    elif shards is not None or files is not None:
        # a stream's batches are its files read in turn by the loader's workers: the files (names, sizes,
        # order) and the worker count decide which view lands where, so both are part of the fingerprint
        if shards is not None:
            listing = "\n".join(f"{Path(p).name} {n} {os.path.getsize(p)}" for p, n in shards)
        else:
            listing = "\n".join(f"{Path(p).name} {os.path.getsize(p)}" for p in files)
        listing += f"\nclasses {data.class_names} workers {data.train_loader.loader.num_workers}"
    elif cfg.data is not None and is_hf_folder(cfg.data):
        # a save_to_disk or Parquet split: its rows are read by index, as an ImageFolder's files, so
        # its files' names and sizes stand for them, as the image files' do for a folder
        split = sorted(p for p in (Path(cfg.data) / "train").iterdir() if p.is_file())
        listing = "\n".join(f"{p.name} {p.stat().st_size}" for p in split) + f"\nclasses {data.class_names}"
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


def _checksum(saved: dict[str, Any]) -> str:
    digest = hashlib.sha256()
    for key in ARRAYS:  # a hard cache's checksum is that of its classes alone, as before soft caches
        if saved.get(key) is not None:
            digest.update(saved[key].numpy().tobytes())
    return digest.hexdigest()


def _soft_arrays(shape: tuple[int, ...], num_classes: int, topk: int) -> dict[str, Tensor]:
    """Empty top-``topk`` logit arrays for ``shape`` = (epochs, batches, batch)."""
    every = topk == num_classes  # all the logits: float32, so the losses are the live teacher's bit for bit
    arrays = {
        "values": torch.zeros(*shape, topk, dtype=torch.float32 if every else torch.float16),
        "indices": torch.zeros(*shape, topk, dtype=torch.int16 if num_classes <= 2**15 else torch.int32),
    }
    if not every:
        arrays["rest"] = torch.zeros(*shape, dtype=torch.float32)
    return arrays


def _store_logits(arrays: dict[str, Tensor], where: tuple[int, int], logits: Tensor, tau: float) -> None:
    """Keep a batch's top-k ``logits`` at ``where`` = (epoch, batch), and in ``rest`` the one logit that,
    given to every other class, leaves them the mass they hold at temperature ``tau``:
    ``rest = tau * (logsumexp(tail / tau) - log(classes - k))``, so ``softmax(rebuilt / tau)`` keeps the
    top-k probabilities (same normaliser) and spreads the tail's mass evenly (TinyViT's rule)."""
    values = arrays["values"]
    k, rows = values.shape[-1], logits.shape[0]
    top, idx = logits.topk(k, dim=1)  # sorted, largest first
    values[where][:rows] = top.to(values.dtype)
    arrays["indices"][where][:rows] = idx.to(arrays["indices"].dtype)
    if "rest" in arrays:
        tail = logits.scatter(1, idx, float("-inf")) / tau
        arrays["rest"][where][:rows] = tau * (tail.logsumexp(dim=1) - math.log(logits.shape[1] - k))


@torch.no_grad()
def build_teacher_cache(cfg: Any, path: str | os.PathLike, *, topk: int | None = None) -> Path:
    """Run ``cfg``'s teacher over every view of ``cfg.epochs`` epochs of ``cfg``'s training data (``--data``
    or the ``train_shards`` pattern), as a one-process run of ``cfg`` would meet them, and write their top
    classes to ``path``; with ``cfg.distillation`` ``soft`` (or ``topk`` given) also their ``topk`` largest
    logits (default :data:`DEFAULT_TOPK`; at most the number of classes, which keeps them all)."""
    from ..data.loaders import build_run_loaders
    from ..data.transforms import build_mixup
    from .distill import build_teacher

    if cfg.data is None and cfg.train_shards is None:
        raise LeViTError(
            "a teacher cache is built for --data DIR or train_shards=PATTERN val_shards=PATTERN "
            "(the bundled digits: their folder in a run's output)"
        )
    if topk is not None and topk < 1:
        raise LeViTError(f"--topk must be >= 1 (logits kept per view), got {topk}")
    if cfg.threads is not None:  # as training sets it: the teacher's float sums in the same order
        torch.set_num_threads(cfg.threads)
    data = build_run_loaders(cfg, cfg.data)  # None: the train_shards/val_shards patterns
    num_classes = len(data.class_names)
    teacher = build_teacher(cfg.teacher, cfg.teacher_checkpoint, num_classes)
    mixup = build_mixup(cfg, num_classes)
    seed_all(cfg.seed)  # as a fresh one-process run seeds itself before its first batch
    shape = (cfg.epochs, data.micro_per_epoch, cfg.batch_size)
    classes = torch.full(shape, -1, dtype=torch.int32)
    soft = cfg.distillation == "soft" or topk is not None
    arrays = _soft_arrays(shape, num_classes, min(topk or DEFAULT_TOPK, num_classes)) if soft else {}
    for epoch in range(cfg.epochs):
        data.sampler.set_epoch(epoch)
        for b, (images, targets, _) in enumerate(data.train_loader):
            if mixup is not None:
                images, targets = mixup(images, targets)
            logits = teacher(images)
            classes[epoch, b, : images.shape[0]] = logits.argmax(dim=1).int()
            if soft:
                _store_logits(arrays, (epoch, b), logits.float(), cfg.distillation_tau)
    payload: dict[str, Any] = {"classes": classes, **arrays, "fingerprint": cache_fingerprint(cfg, data)}
    if soft:
        payload["tau"] = cfg.distillation_tau
    payload["sha256"] = _checksum(payload)
    from .rundir import atomic_save

    return atomic_save(payload, Path(path))


def rebuild_logits(values: Tensor, indices: Tensor, rest: Tensor | None, num_classes: int) -> Tensor:
    """(B, ``num_classes``) teacher logits from a soft cache's (B, k) top ``values`` at class ``indices``
    and (B,) ``rest`` logits (``None``: the cache kept every class, whose logits come back exactly).

    TinyViT's rule: the k kept logits as they were and every other class the one ``rest`` logit, which
    gives the classes outside the top k the teacher's total mass for them, spread evenly: all that k
    numbers and one can say of the tail (its shape is lost, its mass is not, so the top-k
    probabilities and the tail's total are the teacher's)."""
    rows = values.shape[0]
    if rest is None:
        logits = torch.empty(rows, num_classes, device=values.device)
    else:
        logits = rest[:, None].expand(rows, num_classes).clone()
    return logits.scatter_(1, indices.long(), values.float())


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        saved = torch.load(path, weights_only=True)
        saved["classes"]
    except Exception as e:
        raise LeViTError(f"teacher_cache: {path} is not a teacher cache ({type(e).__name__})") from None
    if _checksum(saved) != saved.get("sha256"):
        raise LeViTError(f"teacher_cache: {path} is damaged (its checksum does not match)")
    return saved


class CachedTeacher(nn.Module):
    """A teacher read from a cache: :meth:`seek` (epoch, micro-batch) before each forward, which returns
    one-hot logits of the cached classes (hard distillation takes their argmax) or, for soft
    distillation, the logits rebuilt from the cached top-k (the teacher's own when it kept them all)."""

    def __init__(self, path: str | os.PathLike, cfg: Any, data: Any, world_size: int = 1) -> None:
        super().__init__()
        path = Path(path)
        saved = _read_cache(path)
        classes = saved["classes"]
        if cfg.distillation not in ("hard", "soft") or world_size != 1:
            raise LeViTError("teacher_cache: only hard or soft distillation in one process reads a teacher cache")
        self.soft = cfg.distillation == "soft"
        if self.soft and saved.get("values") is None:
            raise LeViTError(
                f"teacher_cache: {path} holds the teacher's top classes only (hard distillation); for "
                "distillation=soft rebuild it with distillation=soft (levit data teacher-cache ... --topk K)"
            )
        if self.soft and "rest" in saved and saved["tau"] != cfg.distillation_tau:
            raise LeViTError(
                f"teacher_cache: {path} was made for distillation_tau={saved['tau']}, this run has "
                f"{cfg.distillation_tau}: rebuild it with distillation_tau={cfg.distillation_tau}"
            )
        difference = _first_difference(cache_fingerprint(cfg, data), saved["fingerprint"])
        if difference is not None:
            raise LeViTError(f"teacher_cache: {path} was made for another run ({difference})")
        if classes.shape[0] < cfg.epochs or classes.shape[1] != data.micro_per_epoch:
            raise LeViTError(
                f"teacher_cache: {path} holds {classes.shape[0]} epoch(s) of {classes.shape[1]} batches; this run "
                f"needs {cfg.epochs} of {data.micro_per_epoch}: build it with epochs={cfg.epochs}"
            )
        self.register_buffer("classes", classes.long(), persistent=False)
        for key in ("values", "indices", "rest"):  # kept compact; widened one batch at a time
            self.register_buffer(key, saved.get(key) if self.soft else None, persistent=False)
        self.num_classes, self.epoch, self.batch = len(data.class_names), 0, 0

    def seek(self, epoch: int, micro_batch: int) -> None:
        """The view the next forward answers for."""
        self.epoch, self.batch = epoch, micro_batch

    def forward(self, x: Tensor) -> Tensor:
        rows, where = x.shape[0], (self.epoch, self.batch)
        if not self.soft:
            found = self.classes[where][:rows].to(x.device)
            return F.one_hot(found, self.num_classes).to(x.dtype)
        rest = None if self.rest is None else self.rest[where][:rows]
        logits = rebuild_logits(self.values[where][:rows], self.indices[where][:rows], rest, self.num_classes)
        return logits.to(x.device)
