"""Image-folder datasets: layout checks, a dataset that skips unreadable images, the loaders of a run."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision

from ..errors import ImageError, LeViTError
from ..utils import first_line
from .images import IMAGE_EXTENSIONS, is_image, open_rgb
from .samplers import RepeatAugSampler, ShardSampler
from .transforms import eval_transform, train_transform


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in label order (shipped with the package)."""
    from importlib.resources import files

    return files("levit").joinpath("data/imagenet_classes.txt").read_text().splitlines()


def check_image_folder(root: str | os.PathLike, what: str = "--data") -> list[str]:
    """Check that ``root`` is an ImageFolder (one sub-folder per class holding images) and return
    the sorted class names. Raises :class:`LeViTError` with a one-line message otherwise."""
    root = Path(root)
    if not root.exists():
        raise LeViTError(f"{what}: {root} does not exist (expected a folder with one sub-folder per class)")
    if not root.is_dir():
        raise LeViTError(f"{what}: {root} is not a folder (expected a folder with one sub-folder per class)")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    if not classes:
        loose = [p.name for p in root.iterdir() if is_image(p)]
        hint = f" (found {len(loose)} loose images: put them in one sub-folder per class)" if loose else ""
        raise LeViTError(f"{what}: {root} has no class sub-folders{hint}; expected {root}/CLASS_NAME/IMAGE.jpg")
    for c in classes:
        if not any(is_image(f) for _, _, fs in os.walk(root / c) for f in fs):
            raise LeViTError(
                f"{what}: class folder {root / c} holds no images ({', '.join(IMAGE_EXTENSIONS[:3])}, ...)"
            )
    return classes


def check_train_val_layout(root: str | os.PathLike, what: str = "--data") -> tuple[list[str], list[str]]:
    """Check ``root/train`` and ``root/val`` (ImageFolder layouts, val classes a subset of train's);
    returns (train classes, val classes). Errors name ``root`` as ``what`` (the flag or argument)."""
    root = Path(root)
    if not root.is_dir():
        raise LeViTError(f"{what}: {root} is not a folder (expected DIR/train/CLASS/*.jpg and DIR/val/CLASS/*.jpg)")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise LeViTError(
                f"{what}: {root} has no '{split}' sub-folder (expected DIR/train/CLASS/*.jpg and DIR/val/CLASS/*.jpg)"
            )
    train_classes = check_image_folder(root / "train", what)
    val_classes = check_image_folder(root / "val", what)
    extra = sorted(set(val_classes) - set(train_classes))
    if extra:
        raise LeViTError(f"{what}: {root / 'val'} has classes missing from {root / 'train'}: {extra[:5]}")
    return train_classes, val_classes


class SafeImageFolder(torchvision.datasets.ImageFolder):
    """ImageFolder whose bad samples are skipped, counted and reported instead of crashing a run.

    Images are listed by :func:`levit.data.images.is_image` and decoded by ``loader`` (default
    :func:`levit.data.images.open_rgb`: 16-bit images scaled to 8 bits; ``str`` hands the path to a
    ``transform`` that decodes, such as :class:`levit.data.preprocess.Preprocess`). A sample is *bad* when decoding or the transform raises.
    ``__getitem__`` accepts a plain index or ``(index, seed)`` from :class:`RepeatAugSampler`: with a
    seed the random augmentation of that sample is a pure function of the seed (so a resumed run sees
    the same images as an uninterrupted one), with the caller's RNG states left as they were. A sample
    is ``(image, target, bad)``, where ``bad`` lists ``(path, reason)`` of the bad samples met. With
    ``replace_bad=True`` (training) a bad sample is replaced by the next good one, so batches keep their
    size; with ``False`` (evaluation) its image is ``None`` and :func:`collate_skip` leaves it out.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform=None,
        class_to_idx: dict[str, int] | None = None,
        *,
        replace_bad: bool = True,
        loader=open_rgb,
    ) -> None:
        self._fixed = class_to_idx
        self.replace_bad = replace_bad
        super().__init__(str(root), transform=transform, loader=loader, is_valid_file=is_image)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes, mapping = super().find_classes(directory)
        if self._fixed is not None:  # e.g. a val folder with fewer classes than train
            missing = [c for c in classes if c not in self._fixed]
            if missing:
                raise LeViTError(f"{directory}: class folder(s) {missing[:5]} unknown to the model")
            mapping = {c: self._fixed[c] for c in classes}
        return classes, mapping

    def _load(self, path: str, seed: int | None):
        img = self.loader(path)
        if self.transform is None:
            return img
        if seed is None:
            return self.transform(img)
        with seeded(seed):
            return self.transform(img)

    def __getitem__(self, item):  # type: ignore[override]
        index, seed = item if isinstance(item, tuple) else (item, None)
        bad: list[tuple[str, str]] = []
        for attempt in range(min(len(self.samples), 50) if self.replace_bad else 1):
            path, target = self.samples[(index + attempt) % len(self.samples)]
            try:
                return self._load(path, seed), target, bad
            except ImageError as e:  # ours says why in one line, without the path again
                bad.append((path, e.reason))
            except Exception as e:  # a corrupt file, or an augmentation that fails on this image
                bad.append((path, f"{type(e).__name__}: {first_line(e, 120)}"))
        if not self.replace_bad:
            return None, self.samples[index][1], bad
        raise LeViTError(f"{self.root}: 50 images in a row are unreadable (first: {bad[0][0]}: {bad[0][1]})")


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed python/numpy/torch RNGs for one sample's augmentation, then restore the caller's states."""
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)  # CPU only: CUDA RNG streams are left alone
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


def collate_skip(batch: list) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
    """Collate ``(image, target, bad)`` samples into (images, targets, every ``(path, reason)``);
    samples whose image is ``None`` (unreadable, evaluation) are left out (an all-bad batch gives an
    empty tensor)."""
    good = [b for b in batch if b[0] is not None]
    imgs = torch.stack([b[0] for b in good]) if good else torch.empty(0)
    targets = torch.tensor([b[1] for b in good], dtype=torch.long)
    return imgs, targets, [p for b in batch for p in b[2]]


STREAM_PASSES = 50  # reads of a stream's data at most, filling the places of bad samples (training)


def read_to_quota(
    read: Callable[[int], Iterable[tuple[str, Callable[[], tuple]]]],
    quota: int,
    replace_bad: bool,
    missing: Callable[[], list[tuple[str, str]]] | None = None,
) -> Iterator[tuple]:
    """The ``(image, target, bad)`` samples of a streamed dataset (shards, streamed Parquet), one
    loader worker's share. ``read(attempt)`` gives, for one pass over the worker's data, each
    sample's name and a function that loads it (raising on a corrupt image or label).

    Training (``replace_bad``): exactly ``quota`` good samples, the places of bad ones filled by
    reading the data again (passes 1, 2, ...: new augmentations), as an ImageFolder replaces a bad
    file by the next one, so that every process keeps its number of batches; a pass with no good
    sample ends it early. Evaluation: one pass, a bad sample yielded as ``(None, -1, bad)``. Each bad
    sample is reported once (in the first pass), with the ``missing()`` ones of that pass (what an
    index promised and the data did not hold)."""
    made, pending = 0, []
    for attempt in range(STREAM_PASSES if replace_bad else 1):
        good = 0
        for name, load in read(attempt):
            try:
                img, target = load()
            except Exception as e:  # a corrupt image or label, or an augmentation that fails on it
                if attempt == 0:  # reported once, not again when the data is read again
                    pending.append((name, f"{type(e).__name__}: {first_line(e, 120)}"))
                if not replace_bad:
                    yield None, -1, pending
                    pending = []
                continue
            yield img, target, pending
            pending, made, good = [], made + 1, good + 1
            if replace_bad and made >= quota:
                return
        if attempt == 0 and missing is not None:
            pending += missing()
        if not replace_bad or good == 0:
            break
    if pending and not replace_bad:
        yield None, -1, pending


@dataclass
class TrainValData:
    """The loaders of a training run and what the loop needs to know about them."""

    train_loader: Iterable  # batches of (images, targets, bad)
    val_loader: Iterable
    sampler: Any  # the training order: set_epoch(epoch, start), state_dict() (a RepeatAugSampler, or the shard loader)
    class_names: list[str]
    micro_per_epoch: int  # training batches per process per epoch
    sizes: tuple[int, int]  # train, val images
    notes: list[str] = field(default_factory=list)  # what the run should tell the user about its data


def check_batch(cfg, per_rank: int) -> None:
    """A one-line error when a process gets no full batch, or an odd batch meets batch-mode Mixup."""
    if per_rank < 1:
        raise LeViTError(f"--batch-size {cfg.batch_size} is larger than the training images per process")
    if cfg.mixup_mode == "batch" and (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
        raise LeViTError(f"--batch-size must be even with Mixup/CutMix (mode batch), got {cfg.batch_size}")


def build_loaders(
    cfg, root: str | os.PathLike, *, world: int = 1, rank: int = 0, pin_memory: bool = False
) -> TrainValData:
    """Loaders for ``root/train`` (the recipe's augmentation, :class:`RepeatAugSampler`, bad samples
    replaced) and ``root/val`` (evaluation preprocessing, sharded without padding, unreadable images
    left out), after checking the layout. Loaders never touch the global RNG. (WebDataset shards:
    :func:`levit.data.shards.build_shard_loaders`; Hugging Face datasets:
    :func:`levit.data.hfds.build_hf_loaders`.)"""
    root = Path(root)
    check_train_val_layout(root)
    train_set = SafeImageFolder(root / "train", transform=train_transform(cfg))
    val_set = SafeImageFolder(
        root / "val",
        transform=eval_transform(cfg.img_size, cfg.eval_crop_pct),
        class_to_idx=train_set.class_to_idx,
        replace_bad=False,
    )
    return indexed_loaders(
        cfg, train_set, val_set, list(train_set.classes), world=world, rank=rank, pin_memory=pin_memory
    )


def indexed_loaders(
    cfg,
    train_set: torch.utils.data.Dataset,
    val_set: torch.utils.data.Dataset,
    class_names: list[str],
    *,
    world: int = 1,
    rank: int = 0,
    pin_memory: bool = False,
) -> TrainValData:
    """The loaders of a run over two indexable datasets that take ``(index, seed)`` and give
    ``(image, target, bad)`` (as :class:`SafeImageFolder`): :class:`RepeatAugSampler` for training,
    :class:`ShardSampler` for validation."""
    from ..utils import default_workers

    workers = cfg.workers if cfg.workers is not None else default_workers()  # null: the cores available
    sampler = RepeatAugSampler(len(train_set), num_replicas=world, rank=rank, repeats=cfg.repeated_aug, seed=cfg.seed)
    micro_per_epoch = sampler.per_rank // cfg.batch_size
    if micro_per_epoch < 1:
        raise LeViTError(
            f"--batch-size {cfg.batch_size} is larger than the {sampler.per_rank} training images per process"
        )
    check_batch(cfg, micro_per_epoch)
    common = dict(batch_size=cfg.batch_size, num_workers=workers, collate_fn=collate_skip, pin_memory=pin_memory)
    train_loader = torch.utils.data.DataLoader(
        train_set,
        sampler=sampler,
        drop_last=True,
        generator=torch.Generator().manual_seed(cfg.seed),
        persistent_workers=False,
        **common,
    )
    val_loader = torch.utils.data.DataLoader(
        val_set,
        sampler=ShardSampler(len(val_set), world, rank),
        generator=torch.Generator().manual_seed(cfg.seed),
        **common,
    )
    return TrainValData(train_loader, val_loader, sampler, class_names, micro_per_epoch, (len(train_set), len(val_set)))
