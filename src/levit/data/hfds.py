"""Hugging Face ``datasets`` as training data: ``--data DIR`` whose ``train/`` and ``val/`` are each a
``Dataset.save_to_disk`` folder or hold Parquet files, with an image column and a label column.

The image column is the one typed ``datasets.Image`` (else one named ``image``/``img``), read undecoded
(its bytes, or the file it points to) and decoded like every image in levit
(:func:`levit.data.images.open_rgb`); the label column is the ``ClassLabel`` one (its names become
the class names), else one named ``label``/``labels`` holding class indices. The rows are indexable,
so training uses the same sampler, per-sample augmentation seeds and bad-sample handling as an
ImageFolder (:func:`levit.data.datasets.indexed_loaders`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..errors import LeViTError
from ..utils import first_line
from .datasets import TrainValData, indexed_loaders, seeded
from .images import open_rgb
from .transforms import eval_transform, train_transform

__all__ = ["HFImages", "build_hf_loaders", "is_hf_folder", "load_split"]

IMAGE_NAMES = ("image", "img")
LABEL_NAMES = ("label", "labels")


def _is_split(folder: Path) -> bool:
    saved = (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()
    return folder.is_dir() and (saved or any(folder.glob("*.parquet")))


def is_hf_folder(root: str | os.PathLike) -> bool:
    """``root/train`` is a ``save_to_disk`` folder or holds Parquet files."""
    return _is_split(Path(root) / "train")


def load_split(folder: str | os.PathLike) -> Any:
    """The ``datasets.Dataset`` of one split folder (``save_to_disk``, or its ``*.parquet`` files)."""
    import datasets

    folder = Path(folder)
    if not _is_split(folder):
        raise LeViTError(f"--data: {folder} is neither a save_to_disk folder nor a folder of .parquet files")
    try:
        if (folder / "state.json").is_file():
            return datasets.load_from_disk(str(folder))
        files = sorted(str(p) for p in folder.glob("*.parquet"))
        return datasets.Dataset.from_parquet(files, keep_in_memory=True)
    except Exception as e:  # a damaged folder: one line naming it
        raise LeViTError(f"--data: {folder} could not be read as a dataset ({first_line(e, 120)})") from None


def _columns(ds: Any, where: Path) -> tuple[str, str, list[str] | None]:
    """The image column, the label column and the label names (``None``: the labels are indices)."""
    import datasets

    features = ds.features
    image = next((c for c, f in features.items() if isinstance(f, datasets.Image)), None)
    image = image or next((c for c in IMAGE_NAMES if c in features), None)
    label = next((c for c, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
    label = label or next((c for c in LABEL_NAMES if c in features), None)
    if image is None or label is None:
        raise LeViTError(
            f"--data: {where} has columns {list(features)}: expected an image column (datasets.Image, or "
            f"named {'/'.join(IMAGE_NAMES)}) and a label column (ClassLabel, or named {'/'.join(LABEL_NAMES)})"
        )
    names = features[label].names if isinstance(features[label], datasets.ClassLabel) else None
    return image, label, names


class HFImages(torch.utils.data.Dataset):
    """Rows of a ``datasets.Dataset`` as ``(image, target, bad)`` samples, with the same contract as
    :class:`levit.data.datasets.SafeImageFolder`: ``(index, seed)`` seeds the sample's augmentation, a
    bad row is replaced by the next good one (``replace_bad``) or left out (image ``None``)."""

    def __init__(self, ds: Any, image: str, label: str, transform: Any, *, replace_bad: bool = True) -> None:
        import datasets

        if isinstance(ds.features[image], datasets.Image):
            ds = ds.cast_column(image, datasets.Image(decode=False))  # bytes or a path: decoded by levit
        self.ds, self.image, self.label, self.transform, self.replace_bad = ds, image, label, transform, replace_bad

    def __len__(self) -> int:
        return len(self.ds)

    def _load(self, index: int, seed: int | None) -> tuple[Any, int]:
        row = self.ds[index]
        value = row[self.image]
        if isinstance(value, dict):  # datasets.Image undecoded: {"bytes": ..., "path": ...}
            value = value.get("bytes") or value.get("path")
        if value is None:
            raise LeViTError("no image in this row")
        img = open_rgb(value)
        if self.transform is not None:
            if seed is None:
                img = self.transform(img)
            else:
                with seeded(seed):
                    img = self.transform(img)
        return img, int(row[self.label])

    def __getitem__(self, item: Any) -> tuple:
        index, seed = item if isinstance(item, tuple) else (item, None)
        bad: list[tuple[str, str]] = []
        for attempt in range(min(len(self), 50) if self.replace_bad else 1):
            i = (index + attempt) % len(self)
            try:
                img, target = self._load(i, seed)
                return img, target, bad
            except Exception as e:  # a corrupt image or label, or an augmentation that fails on it
                bad.append((f"row {i}", f"{type(e).__name__}: {first_line(e, 120)}"))
        if not self.replace_bad:
            return None, -1, bad
        raise LeViTError(f"50 rows in a row are unreadable (first: {bad[0][0]}: {bad[0][1]})")


def build_hf_loaders(
    cfg, root: str | os.PathLike, *, world: int = 1, rank: int = 0, pin_memory: bool = False
) -> TrainValData:
    """Loaders over the Hugging Face datasets in ``root/train`` and ``root/val``, with the recipe's
    transforms and the ImageFolder loaders' sampling (:func:`levit.data.datasets.indexed_loaders`)."""
    root = Path(root)
    train_ds, val_ds = load_split(root / "train"), load_split(root / "val")
    image, label, names = _columns(train_ds, root / "train")
    val_image, val_label, _ = _columns(val_ds, root / "val")
    if names is None:
        top = max(max(train_ds[label], default=-1), max(val_ds[val_label], default=-1))
        names = [str(i) for i in range(top + 1)]
    train_set = HFImages(train_ds, image, label, train_transform(cfg))
    val_set = HFImages(val_ds, val_image, val_label, eval_transform(cfg.img_size, cfg.eval_crop_pct), replace_bad=False)
    return indexed_loaders(cfg, train_set, val_set, list(names), world=world, rank=rank, pin_memory=pin_memory)
