"""Image preprocessing and datasets."""

from __future__ import annotations

import contextlib
import math
import os
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torchvision
from torchvision import transforms as T

from .errors import LeViTError

__all__ = [
    "DEFAULT_CROP_PCT",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RepeatAugSampler",
    "SafeImageFolder",
    "ShardSampler",
    "build_mixup",
    "check_image_folder",
    "check_train_val_layout",
    "collate_skip",
    "eval_transform",
    "imagenet_class_names",
    "make_digits_folder",
    "train_transform",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP_PCT = 0.875  # the authors' evaluation: resize 256 -> centre crop 224


def eval_transform(img_size: int | tuple[int, int] = 224, crop_pct: float = DEFAULT_CROP_PCT) -> T.Compose:
    """The official evaluation preprocessing for a PIL image: resize the short side to
    ``img_size / crop_pct`` (bicubic), centre-crop ``img_size``, to tensor, ImageNet mean/std.
    For an (H, W) size the short side goes to ``max(H, W) / crop_pct``, so the crop always fits."""
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    size = math.floor((img_size if isinstance(img_size, int) else max(img_size)) / crop_pct)
    return T.Compose(
        [
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(img_size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in label order (shipped with the package)."""
    from importlib.resources import files

    return files("levit").joinpath("data/imagenet_classes.txt").read_text().splitlines()


# ---- training data -----------------------------------------------------------------------------
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


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
        loose = [p.name for p in root.iterdir() if p.suffix.lower() in IMG_EXTENSIONS]
        hint = f" (found {len(loose)} loose images: put them in one sub-folder per class)" if loose else ""
        raise LeViTError(f"{what}: {root} has no class sub-folders{hint}; expected {root}/CLASS_NAME/IMAGE.jpg")
    for c in classes:
        if not any(f.lower().endswith(IMG_EXTENSIONS) for _, _, fs in os.walk(root / c) for f in fs):
            raise LeViTError(f"{what}: class folder {root / c} holds no images ({', '.join(IMG_EXTENSIONS[:3])}, ...)")
    return classes


def check_train_val_layout(root: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Check ``root/train`` and ``root/val`` (ImageFolder layouts, val classes a subset of train's);
    returns (train classes, val classes)."""
    root = Path(root)
    if not root.is_dir():
        raise LeViTError(f"--data: {root} is not a folder (expected DIR/train/CLASS/*.jpg and DIR/val/CLASS/*.jpg)")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise LeViTError(
                f"--data: {root} has no '{split}' sub-folder (expected DIR/train/CLASS/*.jpg and DIR/val/CLASS/*.jpg)"
            )
    train_classes = check_image_folder(root / "train")
    val_classes = check_image_folder(root / "val")
    extra = sorted(set(val_classes) - set(train_classes))
    if extra:
        raise LeViTError(f"--data: {root / 'val'} has classes missing from {root / 'train'}: {extra[:5]}")
    return train_classes, val_classes


class SafeImageFolder(torchvision.datasets.ImageFolder):
    """ImageFolder whose unreadable images are skipped, counted and reported instead of crashing.

    ``__getitem__`` accepts a plain index or ``(index, seed)`` from :class:`RepeatAugSampler`: with a
    seed the random augmentation of that sample is a pure function of the seed (so a resumed run sees
    the same images as an uninterrupted one), with the caller's RNG states left as they were. A sample
    is ``(image, target, bad_paths)``, where ``bad_paths`` lists the images that failed to decode and were
    replaced by the next readable one; :func:`collate_skip` gathers them.
    """

    def __init__(self, root: str | os.PathLike, transform=None, class_to_idx: dict[str, int] | None = None) -> None:
        self._fixed = class_to_idx
        super().__init__(str(root), transform=transform, is_valid_file=_is_image)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes, mapping = super().find_classes(directory)
        if self._fixed is not None:  # e.g. a val folder with fewer classes than train
            missing = [c for c in classes if c not in self._fixed]
            if missing:
                raise LeViTError(f"{directory}: class folder(s) {missing[:5]} unknown to the model")
            mapping = {c: self._fixed[c] for c in classes}
        return classes, mapping

    def __getitem__(self, item):  # type: ignore[override]
        index, seed = item if isinstance(item, tuple) else (item, None)
        bad: list[str] = []
        for attempt in range(min(len(self.samples), 50)):
            path, target = self.samples[(index + attempt) % len(self.samples)]
            try:
                img = self.loader(path)
                img.load()
            except Exception:
                bad.append(path)
                continue
            if self.transform is not None:
                if seed is None:
                    img = self.transform(img)
                else:
                    with _seeded(seed):
                        img = self.transform(img)
            return img, target, bad
        raise LeViTError(f"{self.root}: 50 images in a row are unreadable (first: {bad[0]})")


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMG_EXTENSIONS)


@contextlib.contextmanager
def _seeded(seed: int):
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


def collate_skip(batch: list) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Collate ``(image, target, bad_paths)`` samples into (images, targets, all bad paths)."""
    imgs = torch.stack([b[0] for b in batch])
    targets = torch.tensor([b[1] for b in batch], dtype=torch.long)
    return imgs, targets, [p for b in batch for p in b[2]]


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


def train_transform(cfg) -> Callable:
    """The training augmentation of a recipe (timm's ``create_transform``: random-resized crop,
    flip, RandAugment, bicubic, random erasing, normalisation)."""
    from timm.data import create_transform

    return create_transform(
        cfg.img_size,
        is_training=True,
        scale=tuple(cfg.train_crop_scale),
        hflip=cfg.hflip,
        color_jitter=cfg.color_jitter,
        auto_augment=cfg.auto_augment or None,
        interpolation=cfg.train_interpolation,
        re_prob=cfg.reprob,
        re_mode=cfg.remode,
        re_count=cfg.recount,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )


def build_mixup(cfg, num_classes: int):
    """timm's Mixup/CutMix (with label smoothing) for a recipe, or None when both are off."""
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=cfg.mixup,
        cutmix_alpha=cfg.cutmix,
        prob=cfg.mixup_prob,
        switch_prob=cfg.mixup_switch_prob,
        mode=cfg.mixup_mode,
        label_smoothing=cfg.smoothing,
        num_classes=num_classes,
    )


# ---- the digits demo ---------------------------------------------------------------------------
DIGIT_CLASSES = [str(i) for i in range(10)]


def make_digits_folder(root: str | os.PathLike, val_fraction: float = 0.2, seed: int = 0) -> Path:
    """Write scikit-learn's UCI handwritten digits (1797 real 8x8 images, bundled, no download) as
    ``root/train/<digit>/*.png`` and ``root/val/<digit>/*.png`` (a stratified, seeded held-out split).
    Existing complete folders are reused."""
    from PIL import Image

    root = Path(root)
    done = root / ".complete"
    if done.is_file():
        return root
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise LeViTError("--dataset digits needs scikit-learn: pip install 'levit[train]'") from e
    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)
    idx = np.arange(len(images))
    tr, va = train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=digits.target)
    for split, ids in (("train", tr), ("val", va)):
        for i in ids:
            d = root / split / str(digits.target[i])
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], mode="L").convert("RGB").save(d / f"{i:04d}.png")
    done.write_text("ok\n")
    return root
