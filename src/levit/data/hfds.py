"""Hugging Face ``datasets`` as training data: ``--data DIR`` whose ``train/`` and ``val/`` are each a
``Dataset.save_to_disk`` folder or hold Parquet files, with an image column and a label column.

The image column is the one typed ``datasets.Image`` (else one named ``image``/``img``), read undecoded
(its bytes, or the file it points to) and decoded like every image in levit
(:func:`levit.data.images.open_rgb`); the label column is the ``ClassLabel`` one (its names become
the class names), else one named ``label``/``labels`` holding class indices. The rows are indexable,
so training uses the same sampler, per-sample augmentation seeds and bad-sample handling as an
ImageFolder (:func:`levit.data.datasets.indexed_loaders`).

With ``hf_streaming=true`` the Parquet files are streamed instead (:class:`HFStream`:
``datasets.load_dataset("parquet", streaming=True)``, never loaded whole): rows split across
processes by ``datasets.distributed.split_dataset_by_node`` and across loader workers by ``datasets``
itself, shuffled by its buffer, every row once an epoch.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Iterator
from inspect import signature
from pathlib import Path
from typing import Any

import torch

from ..errors import LeViTError
from ..utils import first_line
from .datasets import TrainValData, check_batch, collate_skip, indexed_loaders, read_to_quota, seeded
from .images import open_rgb
from .transforms import eval_transform, train_transform

__all__ = ["HFImages", "HFStream", "build_hf_loaders", "build_hf_stream_loaders", "is_hf_folder", "is_hf_split"]
__all__ += ["encoded", "find_columns", "load_split", "stream_counts"]

IMAGE_NAMES = ("image", "img")
LABEL_NAMES = ("label", "labels")


def is_hf_split(folder: str | os.PathLike) -> bool:
    """``folder`` is one split of a Hugging Face dataset: a ``save_to_disk`` folder or ``*.parquet`` files."""
    folder = Path(folder)
    saved = (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()
    return folder.is_dir() and (saved or any(folder.glob("*.parquet")))


def is_hf_folder(root: str | os.PathLike) -> bool:
    """``root/train`` is a ``save_to_disk`` folder or holds Parquet files."""
    return is_hf_split(Path(root) / "train")


def load_split(folder: str | os.PathLike) -> Any:
    """The ``datasets.Dataset`` of one split folder (``save_to_disk``, or its ``*.parquet`` files)."""
    import datasets

    folder = Path(folder)
    if not is_hf_split(folder):
        raise LeViTError(f"--data: {folder} is neither a save_to_disk folder nor a folder of .parquet files")
    try:
        if (folder / "state.json").is_file():
            return datasets.load_from_disk(str(folder))
        files = sorted(str(p) for p in folder.glob("*.parquet"))
        return datasets.Dataset.from_parquet(files, keep_in_memory=True)
    except Exception as e:  # a damaged folder: one line naming it
        raise LeViTError(f"--data: {folder} could not be read as a dataset ({first_line(e, 120)})") from None


def find_columns(ds: Any, where: Path) -> tuple[str, str, list[str] | None]:
    """The image column, the label column and the label names (``None``: the labels are indices) of
    ``ds`` (read from ``where``); a one-line :class:`LeViTError` when either column is missing."""
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
    bad row is replaced by the next good one (``replace_bad``) or left out (image ``None``).
    ``loader`` turns the image's bytes (or path) into what ``transform`` takes (:func:`encoded`:
    unchanged, for a transform that decodes, as ``levit eval``'s)."""

    def __init__(
        self, ds: Any, image: str, label: str, transform: Any, *, replace_bad: bool = True, loader: Callable = open_rgb
    ) -> None:
        ds = _undecoded(ds, image)
        self.ds, self.image, self.label, self.transform, self.replace_bad = ds, image, label, transform, replace_bad
        self.loader = loader

    def __len__(self) -> int:
        return len(self.ds)

    def _load(self, index: int, seed: int | None) -> tuple[Any, int]:
        return _load_row(self, self.ds[index], seed)

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


def encoded(value: Any) -> Any:
    """An image's bytes or path as they are: the ``loader`` for a transform that decodes itself."""
    return value


def _undecoded(ds: Any, image: str) -> Any:
    """``ds`` with its ``datasets.Image`` column left undecoded: bytes or a path, decoded by levit."""
    import datasets

    if isinstance(ds.features[image], datasets.Image):
        ds = ds.cast_column(image, datasets.Image(decode=False))
    return ds


def _load_row(owner: Any, row: dict, seed: int | None) -> tuple[Any, int]:
    """One row as (image through ``owner.loader`` and ``owner.transform``, seeded by ``seed``; target)."""
    value = row[owner.image]
    if isinstance(value, dict):  # datasets.Image undecoded: {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if value is None:
        raise LeViTError("no image in this row")
    img = owner.loader(value)
    if owner.transform is not None:
        if seed is None:
            img = owner.transform(img)
        else:
            with seeded(seed):
                img = owner.transform(img)
    return img, int(row[owner.label])


def build_hf_loaders(
    cfg, root: str | os.PathLike, *, world: int = 1, rank: int = 0, pin_memory: bool = False
) -> TrainValData:
    """Loaders over the Hugging Face datasets in ``root/train`` and ``root/val``, with the recipe's
    transforms and the ImageFolder loaders' sampling (:func:`levit.data.datasets.indexed_loaders`)."""
    root = Path(root)
    train_ds, val_ds = load_split(root / "train"), load_split(root / "val")
    image, label, names = find_columns(train_ds, root / "train")
    val_image, val_label, _ = find_columns(val_ds, root / "val")
    if names is None:
        top = max(max(train_ds[label], default=-1), max(val_ds[val_label], default=-1))
        names = [str(i) for i in range(top + 1)]
    train_set = HFImages(train_ds, image, label, train_transform(cfg))
    val_set = HFImages(val_ds, val_image, val_label, eval_transform(cfg.img_size, cfg.eval_crop_pct), replace_bad=False)
    return indexed_loaders(cfg, train_set, val_set, list(names), world=world, rank=rank, pin_memory=pin_memory)


def stream_counts(rows: list[int], rank: int, world: int, worker: int, workers: int) -> int:
    """The rows loader worker ``worker`` of process ``rank`` streams, for Parquet files of ``rows``
    rows each, as ``datasets`` splits them: with files a multiple of ``world``, each process streams
    every ``world``-th file, else every process reads every file and keeps every ``world``-th row
    (``split_dataset_by_node``); a process's files then go to its workers in turn (every ``workers``-th)."""
    if len(rows) % world == 0:
        return sum(rows[rank::world][worker::workers])
    return len(range(rank, sum(rows[worker::workers]), world))


class HFStream(torch.utils.data.IterableDataset):
    """Parquet files streamed (``datasets.load_dataset("parquet", streaming=True)``) for one process:
    ``(image, target, bad)`` samples, as :class:`HFImages` gives, every row once an epoch over all
    processes (``split_dataset_by_node``) and their loader workers (``datasets``' own split).

    ``shuffle`` (training): ``datasets``' shuffle (the files' order and a buffer of ``buffer`` rows),
    seeded by ``seed`` and :meth:`set_epoch`'s epoch, so an epoch's order is the same on every
    reading with the same processes and workers; each sample's augmentation is seeded by (seed,
    epoch, rank, worker, position). In training each worker yields exactly its :func:`stream_counts`
    rows: a bad row is reported and its place filled by reading the worker's rows again."""

    def __init__(
        self,
        files: list[str],
        rows: list[int],
        transform: Any,
        *,
        rank: int = 0,
        world: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        loader: Callable = open_rgb,
    ) -> None:
        self.files, self.rows, self.transform, self.rank, self.world = files, rows, transform, rank, world
        self.shuffle, self.seed, self.loader, self.epoch, self.buffer = shuffle, seed, loader, 0, 1000
        self.replace_bad, self.image = shuffle, None
        self.take: list[int] | None = None  # good samples each loader worker makes (set for training)
        self.image, self.label = find_columns(self._stream(), Path(files[0]).parent)[:2]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's shuffle and augmentation seeds."""
        self.epoch = epoch

    def _stream(self) -> Any:
        import datasets
        from datasets.distributed import split_dataset_by_node

        ds = datasets.load_dataset("parquet", data_files=self.files, split="train", streaming=True)
        if self.image is not None:
            ds = _undecoded(ds, self.image)
        ds = split_dataset_by_node(ds, rank=self.rank, world_size=self.world)
        if self.shuffle:
            # the buffer fills from one file at a time (the files' order shuffled), as levit's shards: datasets'
            # default reads up to 10 files at once in threads and then sleeps 5 s at every stream's end
            one = (
                {"max_buffer_input_shards": 1} if "max_buffer_input_shards" in signature(ds.shuffle).parameters else {}
            )
            ds = ds.shuffle(seed=self.seed, buffer_size=self.buffer, **one)
            # last: every later step (cast, split) makes a new dataset at epoch 0, the same order each epoch
            ds.set_epoch(self.epoch)
        return ds

    def __iter__(self) -> Iterator[tuple]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        quota = stream_counts(self.rows, self.rank, self.world, worker, workers)
        if self.take is not None:  # only the samples of the batches the epoch uses (build_hf_stream_loaders)
            quota = min(quota, self.take[worker])
        ds = self._stream()

        def read(attempt: int) -> Iterator[tuple[str, Callable[[], tuple]]]:
            for i, row in enumerate(ds):
                seed = zlib.crc32(f"{self.seed}/{self.epoch}/{self.rank}/{worker}/{attempt}/{i}".encode())
                yield f"rank {self.rank} worker {worker} row {i}", lambda row=row, seed=seed: _load_row(self, row, seed)

        yield from read_to_quota(read, quota, self.replace_bad)


def _parquet_rows(folder: Path) -> tuple[list[str], list[int]]:
    """The ``*.parquet`` files of ``folder`` (sorted) and their row counts (from their footers)."""
    import pyarrow.parquet as pq

    files = sorted(str(p) for p in folder.glob("*.parquet"))
    if not files:
        raise LeViTError(f"hf_streaming=true: {folder} holds no .parquet files to stream")
    try:
        return files, [pq.ParquetFile(f).metadata.num_rows for f in files]
    except Exception as e:  # a damaged file: one line naming the folder
        raise LeViTError(f"--data: {folder} has an unreadable .parquet file ({first_line(e, 120)})") from None


def _class_names(stream: HFStream) -> list[str]:
    """The label column's ``ClassLabel`` names, else ``0 .. max`` over the label column (read alone)."""
    import datasets
    import pyarrow.parquet as pq

    feature = stream._stream().features[stream.label]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    top = max(max(pq.read_table(f, columns=[stream.label]).column(0).to_pylist(), default=-1) for f in stream.files)
    return [str(i) for i in range(top + 1)]


def build_hf_stream_loaders(
    cfg, root: str | os.PathLike, *, world: int = 1, rank: int = 0, pin_memory: bool = False
) -> TrainValData:
    """Loaders streaming the Parquet files of ``root/train`` and ``root/val`` (:class:`HFStream`,
    ``hf_streaming=true``): the recipe's transforms, the same number of full training batches on every
    process (the fewest any can make). Repeated augmentation is not applied to a stream (a note says so)."""
    from ..utils import default_workers
    from .shards import EpochLoader, batches_taken

    workers = cfg.workers if cfg.workers is not None else default_workers()  # null: the cores available
    root = Path(root)
    (train_files, train_rows), (val_files, val_rows) = _parquet_rows(root / "train"), _parquet_rows(root / "val")
    train_set = HFStream(
        train_files, train_rows, train_transform(cfg), rank=rank, world=world, shuffle=True, seed=cfg.seed
    )
    val_set = HFStream(val_files, val_rows, eval_transform(cfg.img_size, cfg.eval_crop_pct), rank=rank, world=world)
    # datasets gives a worker files of its own: a worker beyond the files a process streams would idle
    mine = len(train_files[rank::world]) if len(train_files) % world == 0 else len(train_files)
    train_workers = min(workers, max(1, mine))
    streams = max(train_workers, 1)  # no workers: the process streams its rows itself
    per_rank = [
        sum(stream_counts(train_rows, r, world, w, streams) // cfg.batch_size for w in range(streams))
        for r in range(world)
    ]
    batches = min(per_rank)
    check_batch(cfg, batches)
    # each worker stops after its share of the batches the epoch uses, not after every row it has
    # (those past its last batch would be decoded and augmented only to be dropped)
    full = [stream_counts(train_rows, rank, world, w, streams) // cfg.batch_size for w in range(streams)]
    train_set.take = [t * cfg.batch_size for t in batches_taken(full, batches)]
    common = dict(batch_size=cfg.batch_size, collate_fn=collate_skip, pin_memory=pin_memory)
    train_loader = torch.utils.data.DataLoader(train_set, num_workers=train_workers, drop_last=True, **common)
    val_loader = torch.utils.data.DataLoader(val_set, num_workers=min(workers, len(val_files)), **common)
    loader = EpochLoader(train_loader, batches)
    notes = [f"repeated_aug={cfg.repeated_aug} is not applied to a stream (each sample once per epoch)"]
    sizes = (sum(train_rows), sum(val_rows))
    return TrainValData(
        loader, val_loader, loader, _class_names(train_set), batches, sizes, notes if cfg.repeated_aug > 1 else []
    )
