"""WebDataset tar shards: the sequential layout for data that lives on network storage or in buckets.

A shard folder holds ``train/*.tar`` and ``val/*.tar``; each sample of a shard is ``KEY.jpg`` (or
``.png``, ``.jpeg``, ``.webp``) with ``KEY.cls``, its class index as text (WebDataset's convention).
``levit-shards.json`` beside them names the classes and counts each shard's samples; without it the
shards are listed once (tar headers only) and the classes are numbered.

:func:`write_shards` writes such a folder from an ImageFolder (``levit data shard``).
:class:`ShardStream` reads one split for one process: the process's shards (``r, r + W, ...`` of the
sorted list), split again among its loader workers, so no sample is read twice in an epoch; the tars
are read by :func:`tar_members`, their members grouped into samples and shuffled by webdataset
(``group_by_keys``, ``shuffle``); decoding and augmentation are the same as for an ImageFolder
(:func:`levit.data.images.open_rgb`, the recipe's transform, seeded per sample). A sample
that cannot be read, decoded or augmented is skipped and reported as ``(shard:key, reason)``, like a
corrupt file in :class:`levit.data.datasets.SafeImageFolder`.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import random
import re
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from ..errors import ImageError, LeViTError
from ..utils import first_line, open_regular
from .datasets import TrainValData, check_batch, check_train_val_layout, collate_skip, read_to_quota, seeded
from .images import IMAGE_EXTENSIONS, is_image, open_image_file, open_rgb
from .transforms import eval_transform, train_transform

__all__ = [
    "IMAGE_KEYS",
    "INDEX_NAME",
    "EpochLoader",
    "ShardIndex",
    "ShardStream",
    "assign",
    "batches_per_process",
    "batches_taken",
]
__all__ += ["build_shard_loaders", "expand_pattern", "index_shards", "is_pattern", "is_shard_folder", "pattern_index"]
__all__ += ["ShardFormatError", "read_index", "tar_members", "write_shards"]

#: the file beside ``train/`` and ``val/`` naming the classes and the samples of every shard
INDEX_NAME = "levit-shards.json"
#: the image extensions a sample may carry (the first present is decoded): those of an ImageFolder
IMAGE_KEYS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)


def is_shard_folder(root: str | os.PathLike) -> bool:
    """``root/train`` holds ``.tar`` shards (and no class folders): a WebDataset layout."""
    train = Path(root) / "train"
    return train.is_dir() and any(p.suffix == ".tar" for p in train.iterdir())


@dataclass
class ShardIndex:
    """The classes of a shard folder and, per split, each shard's path and sample count."""

    classes: list[str]
    splits: dict[str, list[tuple[Path, int]]]


def _count_samples(shard: Path) -> tuple[int, set[int]]:
    """Samples (``.cls`` members) of one shard and the class indices they hold, from the tar alone."""
    classes: set[int] = set()
    n = 0
    with _open_shard(shard) as f, tarfile.open(fileobj=f) as tar:
        for member in tar:
            if member.name.endswith(".cls"):
                n += 1
                data = tar.extractfile(member)
                classes.add(int(data.read().decode().strip()) if data else 0)
    return n, classes


class ShardFormatError(ValueError):
    """A shard that is not a readable tar from some byte on: a header whose checksum is wrong, a
    member cut short, a number or extended header that does not parse, a sparse member; or no tar at
    all, a pipe, socket or device named like one."""


def _open_shard(path: str | os.PathLike, buffering: int = -1) -> BinaryIO:
    """Shard ``path`` opened for reading, never blocking: a pipe named like a shard is a
    :class:`ShardFormatError` (a broken shard to the readers), not a read that waits forever."""
    f = open_regular(path, buffering)
    if f is None:
        raise ShardFormatError("not a regular file (a pipe, socket or device), not a tar")
    return f


#: a tar block: every header is one, and every member's data is padded to a whole number of them
_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
#: member types whose data is the file itself (``tarfile``'s ``REGULAR_TYPES`` less GNU sparse files)
_REGULAR = (b"0", b"\0", b"7")
#: member types with no data after their header whatever their size field says (links, devices,
#: directories, fifos); the data of any other type is skipped, as ``tarfile`` does
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")
#: headers that describe the member after them: pax extended (``x``, Solaris ``X``) and global
#: (``g``) records, GNU long name (``L``) and long link name (``K``)
_EXTENSIONS = (b"x", b"X", b"g", b"L", b"K")
#: names webdataset leaves out of samples (``__key__``-like metadata members)
_META = re.compile(r"__[^/]*__($|/)")


def _text(field: bytes) -> str:
    """A header's text field: up to its first NUL, decoded as ``tarfile`` decodes names (UTF-8)."""
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _number(field: bytes, at: int) -> int:
    """A header's number field: octal text, or GNU's base-256 (first byte 0x80, or 0xff when negative)
    for values too large for it."""
    if field[0] in (0x80, 0xFF):
        n = int.from_bytes(field[1:], "big")
        return n - 256 ** (len(field) - 1) if field[0] == 0xFF else n
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise ShardFormatError(f"header at byte {at}: {field!r} is not a number") from None


#: one pax record's length and keyword (``tarfile``'s pattern)
_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")


def _pax_records(data: bytes, at: int) -> dict[str, str]:
    """The ``keyword=value`` records of a pax extended header, ``b"%d %s=%s\\n"`` each, the length
    counting the whole record (``tarfile``'s parse: it stops at the first text that is not one)."""
    records, pos = {}, 0
    while match := _PAX_RECORD.match(data, pos):
        length = int(match[1])
        if length == 0:
            raise ShardFormatError(f"pax header at byte {at}: a record of length 0")
        value = data[match.end(2) + 1 : match.start(1) + length - 1]
        records[match[2].decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _decompressing(raw: BinaryIO) -> BinaryIO:
    """``raw`` decompressed on the fly when it starts as a gzip, bzip2 or xz stream (the test of
    ``tarfile``'s ``"r|*"``, which webdataset opens shards with), else ``raw`` itself."""
    head = raw.peek(10)[:10]
    if head.startswith(b"\x1f\x8b\x08"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if head[:3] == b"BZh" and head[4:10] == b"1AY&SY":
        return bz2.BZ2File(raw)
    if head.startswith((b"\x5d\x00\x00\x80", b"\xfd7zXZ")):
        return lzma.LZMAFile(raw)
    return raw


def _apply_pax(records: dict[str, str], name: str, size: int) -> tuple[str, int]:
    """A member's name and size after pax records (``path``, trailing slashes dropped; ``size``, 0
    when it does not parse), as ``tarfile`` applies them."""
    if "size" in records:
        try:
            size = int(records["size"])
        except ValueError:
            size = 0
    return (records["path"].rstrip("/") if "path" in records else name), size


def tar_members(path: str | os.PathLike) -> Iterator[tuple[str, bytes]]:
    """The regular files of tar ``path`` in order, ``(name, data)``, named as ``tarfile`` names them
    (a ustar name with its prefix, pax ``path`` and ``size`` records, extended and global, GNU long
    names); links, directories, devices and metadata headers are passed over. One sequential pass
    through a 1 MiB buffer (a header read is a copy out of memory, and memory stays bounded however
    large the shard), without ``tarfile``: the Python objects it builds for every member (two a
    sample) cost more than an ImageFolder's file open when the images are small, which made shards
    slower than the folder they were written from; a header parsed here costs a small part of that
    (docs/training.md, "Sharded data", has the measured costs).

    Every header's checksum is verified (the unsigned or the signed sum, as ``tarfile`` accepts); a
    wrong one, a member cut short, a number that does not parse or a sparse member raises
    :class:`ShardFormatError` after the members before it: where the next header starts cannot be
    known, so the rest of the shard is unreadable. The archive ends at a zero block or at the end of
    the file where a header would start (``tarfile`` accepts both)."""
    with _open_shard(path, buffering=1 << 20) as raw, _decompressing(raw) as f:
        global_records: dict[str, str] = {}  # pax ``g`` records: for every member after them
        chain: list[str | dict[str, str]] = []  # the extension headers before a member: L names, x records
        at = 0  # the offset of the header read (uncompressed), for the messages
        while True:
            header = f.read(_BLOCK)
            if not header or header == _ZERO_BLOCK:
                if chain:
                    raise ShardFormatError(f"the archive ends at byte {at}, after an extension header")
                return
            if len(header) < _BLOCK:
                raise ShardFormatError(f"truncated header at byte {at}")
            # the sum of the header's bytes, its checksum field counted as 8 spaces (256); the zero
            # bytes (most of a header) are dropped first, which makes the sum several times faster
            unsigned = sum(header.translate(None, b"\0")) - sum(header[148:156]) + 256
            stored = _number(header[148:156], at)
            if stored != unsigned:  # some old tars sum signed bytes: each byte >= 128 counts 256 less
                high = sum(b >= 128 for b in header[:148] + header[156:])
                if stored != unsigned - 256 * high:
                    raise ShardFormatError(f"header at byte {at}: bad checksum")
            kind, size, name = header[156:157], _number(header[124:136], at), _text(header[:100])
            if kind == b"S":
                raise ShardFormatError(f"header at byte {at}: {name} is a sparse file (not supported)")
            # an old tar's directory: a plain file whose name ends in /; it has no data
            directory = kind == b"\0" and name.endswith("/")
            if kind not in (b"L", b"K") and header[345] != 0:  # a ustar name split in prefix and name
                name = _text(header[345:500]) + "/" + name
            data_at = at + _BLOCK
            if kind in _EXTENSIONS:
                data = f.read(size)
                if len(data) < size:
                    raise ShardFormatError(f"extension header at byte {at} cut short")
                f.read(-size % _BLOCK)
                records = _pax_records(data, at) if kind in (b"x", b"X", b"g") else {}
                if any(k.startswith("GNU.sparse.") for k in records):
                    raise ShardFormatError(f"pax header at byte {at}: a sparse file (not supported)")
                if kind == b"g":
                    global_records.update(records)
                elif kind != b"K":  # K: a long link name, nothing of a regular file's
                    chain.append(_text(data) if kind == b"L" else records)
                at = data_at + size + -size % _BLOCK
                continue
            # tarfile applies the global records, then the chain from the header nearest the member
            # out (so the first header of a chain has the last word), an x header with the globals
            if global_records:
                name, size = _apply_pax(global_records, name, size)
            for ext in reversed(chain):
                name, size = (ext, size) if isinstance(ext, str) else _apply_pax(global_records | ext, name, size)
            chain = []
            if kind in _NO_DATA or directory:
                at = data_at
                continue  # a link, device, fifo or directory: no data follows its header
            data = f.read(size)
            if len(data) < size:
                raise ShardFormatError(f"{name} (header at byte {at}) cut short: {len(data)} of {size} bytes")
            f.read(-size % _BLOCK)
            at = data_at + size + -size % _BLOCK
            if kind in _REGULAR:
                yield name, data


def _tar_samples(sources: Iterable[dict], handler: Callable[[Exception], bool]) -> Iterator[dict]:
    """webdataset's ``tarfile_to_samples`` with :func:`tar_members` reading the tars: each shard's
    regular files but metadata (``__*__``) as ``{"fname", "data", "__url__"}``, then ``{}`` at the
    shard's end, grouped by webdataset's own ``group_by_keys`` (``KEY.jpg`` + ``KEY.cls``, the
    extension lower-cased). An error ends its shard (``handler`` is told; no ``{}`` follows, as in
    webdataset), so the samples and their order are webdataset's."""
    from webdataset.tariterators import group_by_keys

    def files() -> Iterator[dict]:
        for source in sources:
            url = source["url"]
            try:
                for name, data in tar_members(url):
                    if not (name.startswith("__") and _META.match(name)):
                        yield {"fname": name, "data": data, "__url__": url}
                yield {}
            except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError) as exn:
                if not handler(exn):
                    break

    return group_by_keys(files(), handler=handler)


def is_pattern(text: str | os.PathLike) -> bool:
    """``text`` is a brace pattern of shards (``train-{000000..000146}.tar``, ``{a,b}.tar``)."""
    return "{" in str(text) and "}" in str(text)


def expand_pattern(pattern: str | os.PathLike, what: str = "--data") -> list[Path]:
    """The shard paths a brace pattern names, in the pattern's order (``{000..146}`` keeps the zero
    padding, ``{a,b}`` lists, both nest), as webdataset expands its URLs (``braceexpand``). A named
    file that does not exist is a one-line :class:`LeViTError` naming the first one missing (a typo
    in a range must not train on part of the data unnoticed)."""
    from braceexpand import braceexpand

    try:
        paths = [Path(p).expanduser() for p in braceexpand(str(pattern))]
    except Exception as e:  # an unbalanced brace
        raise LeViTError(f"{what}: {pattern} is not a brace pattern ({first_line(e, 80)})") from None
    if not paths:
        raise LeViTError(f"{what}: {pattern} names no shard")
    missing = next((p for p in paths if not p.is_file()), None)
    if missing is not None:
        raise LeViTError(f"{what}: {missing} does not exist (named by {pattern}, {len(paths)} file(s) in all)")
    return paths


def _saved_index(path: Path, cache: dict[Path, dict | None]) -> dict | None:
    """The parsed ``levit-shards.json`` at ``path`` (``None``: there is none), read once."""
    if path not in cache:
        cache[path] = None
        if path.is_file():
            try:
                saved = json.loads(path.read_text())
                saved["classes"] = [str(c) for c in saved["classes"]]
                cache[path] = saved
            except (ValueError, KeyError, TypeError) as e:
                raise LeViTError(f"--data: {path} is not a shard index ({first_line(e, 80)}): remove it") from None
    return cache[path]


def index_shards(splits: dict[str, list[Path]]) -> ShardIndex:
    """The :class:`ShardIndex` of the shards of each split. A shard's sample count comes from the
    ``levit-shards.json`` two folders up (``DST/train/shard-000000.tar`` -> ``DST/levit-shards.json``,
    as ``levit data shard`` writes it), else from listing the tar (headers and ``.cls`` only); the
    classes are the index's, else numbered ``0 .. max`` over every listed shard."""
    cache: dict[Path, dict | None] = {}
    sized: dict[str, list[tuple[Path, int]]] = {}
    names, seen, listed = None, set(), False
    for split, shards in splits.items():
        sized[split] = []
        for p in shards:
            saved = _saved_index(p.parent.parent / INDEX_NAME, cache)
            try:
                n = int(saved[p.parent.name][p.name]) if saved else None
            except (KeyError, TypeError, ValueError):
                n = None  # a shard the index does not list: counted from the tar
            if n is None:
                try:
                    n, found = _count_samples(p)
                except (OSError, tarfile.TarError, ValueError) as e:
                    raise LeViTError(f"--data: {p} is not a readable tar shard ({first_line(e, 80)})") from None
                seen, listed = seen | found, True
            names = names or (saved["classes"] if saved else None)
            sized[split].append((p, n))
    if names is None or (listed and max(seen, default=-1) >= len(names)):
        names = [str(i) for i in range(max(seen, default=-1) + 1)]
    return ShardIndex(names, sized)


def read_index(root: str | os.PathLike) -> ShardIndex:
    """The :class:`ShardIndex` of shard folder ``root``: from ``levit-shards.json``, or by listing the
    shards (their class indices numbered ``0 .. max``). One-line :class:`LeViTError` on a bad layout."""
    root = Path(root)
    splits = {}
    for split in ("train", "val"):
        folder = root / split
        shards = sorted(p for p in folder.glob("*.tar")) if folder.is_dir() else []
        if not shards:
            raise LeViTError(
                f"--data: {folder} holds no .tar shards (expected {root}/train/*.tar and {root}/val/*.tar)"
            )
        splits[split] = shards
    return index_shards(splits)


def pattern_index(train: str, val: str) -> ShardIndex:
    """The :class:`ShardIndex` of the shards two brace patterns name (recipe keys ``train_shards``
    and ``val_shards``)."""
    return index_shards({"train": expand_pattern(train, "train_shards"), "val": expand_pattern(val, "val_shards")})


def assign(shards: list[tuple[Path, int]], rank: int, world: int, worker: int, workers: int) -> list[tuple[Path, int]]:
    """The shards of loader worker ``worker`` of process ``rank``: every ``world``-th of the sorted
    list for the process, every ``workers``-th of those for the worker (disjoint, together all)."""
    return shards[rank::world][worker::workers]


def batches_per_process(shards: list[tuple[Path, int]], world: int, workers: int, batch_size: int) -> int:
    """Full batches every process can make in an epoch (the fewest of any process): each worker
    batches its own samples and drops its last incomplete batch."""
    return min(
        sum(sum(n for _, n in assign(shards, r, world, w, workers)) // batch_size for w in range(workers))
        for r in range(world)
    )


def batches_taken(full: list[int], batches: int) -> list[int]:
    """How many of each loader worker's ``full`` batches the first ``batches`` batches of a DataLoader
    hold: it takes one from each worker in turn, passing over a worker that has no more."""
    taken = [0] * len(full)
    while sum(taken) < batches and any(t < f for t, f in zip(taken, full, strict=True)):
        for w in range(len(full)):
            if taken[w] < full[w] and sum(taken) < batches:
                taken[w] += 1
    return taken


class ShardStream(torch.utils.data.IterableDataset):
    """One split of a shard folder for one process: ``(image, target, bad)`` samples, as
    :class:`levit.data.datasets.SafeImageFolder` gives, for :func:`levit.data.datasets.collate_skip`.

    ``shuffle`` (training): each epoch (:meth:`set_epoch`) the worker's shards come in a new order
    and samples pass a shuffle buffer of ``buffer`` samples; each sample's augmentation is seeded by
    (seed, epoch, key), so it depends neither on the worker count nor on where a run resumed. Bad
    samples ride along with the next good one (``replace_bad``, training) or come back as an image of
    ``None`` (evaluation). ``loader`` turns a sample's image bytes into what ``transform`` takes
    (``bytes``: the bytes themselves, for a transform that decodes, as ``levit eval``'s)."""

    def __init__(
        self,
        shards: list[tuple[Path, int]],
        transform: Callable | None,
        *,
        rank: int = 0,
        world: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        buffer: int = 1000,
        loader: Callable = open_rgb,
    ) -> None:
        self.shards, self.transform, self.rank, self.world = shards, transform, rank, world
        self.loader = loader
        self.shuffle, self.seed, self.buffer, self.epoch = shuffle, seed, buffer, 0
        self.replace_bad = shuffle
        self.take: list[int] | None = None  # good samples each loader worker makes (limit_to)

    def limit_to(self, batches: int, batch_size: int, workers: int) -> None:
        """Make only the samples of the first ``batches`` batches of ``batch_size`` that a DataLoader
        with ``workers`` workers (and ``drop_last``) takes from this process: the samples after a
        worker's last batch used would be read, decoded and augmented only to be dropped
        (docs/training.md times the shard epoch against the folder's)."""
        full = [
            sum(n for _, n in assign(self.shards, self.rank, self.world, w, workers)) // batch_size
            for w in range(workers)
        ]
        self.take = [t * batch_size for t in batches_taken(full, batches)]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's shard order, shuffle and augmentation seeds."""
        self.epoch = epoch

    def _mine(self) -> list[tuple[str, int]]:
        """This worker's shards (path, samples), in this epoch's order."""
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = [(str(p), n) for p, n in assign(self.shards, self.rank, self.world, worker, workers)]
        if self.shuffle:
            random.Random(zlib.crc32(f"{self.seed}/{self.epoch}/{self.rank}/{worker}".encode())).shuffle(mine)
        return mine

    def _samples(self, urls: list[str], errors: list[str], attempt: int) -> Iterator[dict]:
        import webdataset as wds

        def handler(exn: Exception) -> bool:  # a broken tar: the rest of that shard is skipped
            errors.append(f"{type(exn).__name__}: {first_line(exn, 60)}")  # its samples are reported as missing
            return True

        stages = [wds.SimpleShardList(urls), lambda sources: _tar_samples(sources, handler)]
        if self.shuffle:
            rng = random.Random(zlib.crc32(f"{self.seed}/{self.epoch}/{self.rank}/{attempt}".encode()))
            stages.append(wds.shuffle(self.buffer, initial=min(self.buffer, 100), rng=rng))
        return iter(wds.DataPipeline(*stages))

    def _decode(self, sample: dict, attempt: int):
        ext = next((k for k in IMAGE_KEYS if k in sample), None)
        if ext is None or "cls" not in sample:
            raise LeViTError(f"sample has no {'image' if ext is None else '.cls'} ({', '.join(sorted(sample))})")
        target = int(sample["cls"].decode().strip())
        img = self.loader(sample[ext])
        if self.transform is not None:
            again = f"/{attempt}" if attempt else ""  # a sample read again to fill in is augmented anew
            seed = zlib.crc32(f"{self.seed}/{self.epoch}{again}/{sample['__key__']}".encode())
            with seeded(seed):
                img = self.transform(img)
        return img, target

    def __iter__(self) -> Iterator[tuple]:
        """The worker's samples. In training, as many good samples as the index promises it: the
        places of bad or missing ones are filled by reading its shards again (as an ImageFolder
        replaces a bad file by the next one), so every process keeps its number of batches."""
        mine = self._mine()
        quota = sum(n for _, n in mine)
        if self.take is not None:
            info = torch.utils.data.get_worker_info()
            quota = min(quota, self.take[info.id if info is not None else 0])
        seen: dict[str, int] = {}  # samples read from each shard in the pass
        # each shard's file name, for the samples' names: once a shard, as a Path per sample costs
        # as much as reading the sample from its tar
        names = {u: Path(u).name for u, _ in mine}
        errors: list[str] = []  # the pass's read errors

        def read(attempt: int) -> Iterator[tuple[str, Callable[[], tuple]]]:
            seen.clear()
            errors.clear()
            for sample in self._samples([u for u, _ in mine], errors, attempt):
                url = str(sample.get("__url__", "shard"))
                seen[url] = seen.get(url, 0) + 1
                name = names.get(url) or Path(url).name
                yield f"{name}:{sample.get('__key__', '?')}", lambda s=sample: self._decode(s, attempt)

        def missing() -> list[tuple[str, str]]:
            """What the index promises and the shards did not hold: a truncated or unreadable tar."""
            why = f"missing from its shard, a truncated or unreadable tar ({errors[0] if errors else 'ended early'})"
            return [(f"{Path(url).name}:missing-{k}", why) for url, n in mine for k in range(n - seen.get(url, 0))]

        yield from read_to_quota(read, quota, self.replace_bad, missing)


class EpochLoader:
    """A training loader over a :class:`ShardStream` that also plays the sampler's part in a run:
    :meth:`set_epoch` (epoch, and the samples already done when resuming inside it), exactly
    ``batches`` batches an epoch on every process (so DDP ranks stay in step), :meth:`state_dict`."""

    def __init__(self, loader: torch.utils.data.DataLoader, batches: int) -> None:
        self.loader, self.batches = loader, batches
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch and skip its first ``start`` samples (whole batches: they are read again
        and dropped, so a resumed epoch continues with the samples and augmentations it would have had)."""
        self.epoch, self.start = epoch, start
        self.loader.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator:
        skip = self.start // self.loader.batch_size
        for i, batch in enumerate(self.loader):
            if i >= self.batches:
                break
            if i >= skip:
                yield batch

    def __len__(self) -> int:
        return self.batches - self.start // self.loader.batch_size

    def state_dict(self) -> dict:
        """Epoch and position, saved in checkpoints."""
        return {
            "epoch": self.epoch,
            "start": self.start,
            "seed": self.loader.dataset.seed,
            "num_replicas": self.loader.dataset.world,
        }


def write_shards(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    shard_size: int = 1000,
    seed: int = 0,
    skipped: list[tuple[Path, str]] | None = None,
) -> dict[str, int]:
    """Write the ImageFolder ``src`` (``train/`` and ``val/``, one sub-folder per class) as WebDataset
    shards in ``dst`` (``train/shard-000000.tar`` ...: ``KEY.<ext>`` with the file's own bytes, never
    re-encoded, and ``KEY.cls``), ``shard_size`` samples each, training samples in a seeded random
    order so that every shard mixes the classes; writes ``levit-shards.json``. Returns the samples
    written per split.

    ``dst`` gets its shards all at once or not at all, because a folder of tar files is data to every
    reader (:func:`is_shard_folder`): they are written into a hidden ``dst/.partial-PID`` folder (on
    ``dst``'s own disk, which may be a mount), moved into place once all are written, and removed
    with whatever was moved on any error; a ``dst`` this call made goes too. A file that cannot be
    read (no permission, gone since the folder was listed, or no regular file: a pipe named like a
    photo would block the run) is left out and appended to ``skipped`` as ``(path, reason)``; an
    undecodable image is written as it is, and skipped by the readers as a corrupt file of an
    ImageFolder is."""
    import shutil

    if shard_size < 1:
        raise LeViTError(f"--shard-size must be >= 1, got {shard_size}")
    src, dst = Path(src), Path(dst)
    classes, _ = check_train_val_layout(src, "SRC")
    if dst.exists() and any(dst.iterdir()):
        left = sorted(p.name for p in dst.iterdir() if p.name.startswith(".partial-"))
        hint = f" ({left[0]} is what a stopped run left: remove it)" if left else ""
        raise LeViTError(f"{dst} exists and is not empty{hint}: shards are written into a new folder")
    made, moved = not dst.exists(), []
    work = dst / f".partial-{os.getpid()}"
    work.mkdir(parents=True)
    try:
        written = _write_splits(src, work, classes, shard_size, seed, skipped)
        for name in ("train", "val", INDEX_NAME):
            os.replace(work / name, dst / name)
            moved.append(dst / name)
        work.rmdir()
    except BaseException:
        for path in (dst,) if made else (work, *moved):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        raise
    return written


def _write_splits(
    src: Path, dst: Path, classes: list[str], shard_size: int, seed: int, skipped: list | None
) -> dict[str, int]:
    """:func:`write_shards`' shards and index, written into the new folder ``dst``."""
    import webdataset as wds

    index: dict = {"classes": classes}
    written = {}
    for split in ("train", "val"):
        files = [(p, k) for k, c in enumerate(classes) for p in sorted((src / split / c).rglob("*")) if is_image(p)]
        if split == "train":
            random.Random(seed).shuffle(files)
        (dst / split).mkdir()
        counts: dict[str, int] = {}
        # a whole-second mtime (fixed: the same images give the same shards): a fractional one makes
        # tarfile add a second (pax) header to every member, which every read parses again
        pattern = str(dst / split / "shard-%06d.tar")
        with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0, mtime=0) as sink:
            n = 0
            for path, label in files:
                try:
                    with open_image_file(path) as f:
                        data = f.read()
                except (ImageError, OSError) as e:  # ImageError: no regular file
                    if skipped is not None:
                        why = e.reason if isinstance(e, ImageError) else (e.strerror or str(e)).lower()
                        skipped.append((path, why))
                    continue
                ext = path.suffix.lower().lstrip(".")
                sink.write({"__key__": f"{n:09d}", ext: data, "cls": str(label).encode()})
                name = f"shard-{n // shard_size:06d}.tar"
                counts[name] = counts.get(name, 0) + 1
                n += 1
        index[split], written[split] = counts, n
    (dst / INDEX_NAME).write_text(json.dumps(index, indent=1) + "\n")
    return written


def build_shard_loaders(
    cfg, root: str | os.PathLike | None, *, world: int = 1, rank: int = 0, pin_memory: bool = False
) -> TrainValData:
    """Loaders over the WebDataset shards in ``root/train`` and ``root/val``, or (``root`` ``None``)
    those the recipe's ``train_shards`` and ``val_shards`` brace patterns name (:class:`ShardStream`):
    the same transforms as an ImageFolder, each process and loader worker reading its own shards, the
    same number of training batches on every process. Repeated augmentation is not applied to a
    stream (a note says so)."""
    from ..utils import default_workers

    workers = cfg.workers if cfg.workers is not None else default_workers()  # null: the cores available
    index = read_index(root) if root is not None else pattern_index(cfg.train_shards, cfg.val_shards)
    train_shards, val_shards = index.splits["train"], index.splits["val"]
    # a worker with no shard of its own would only idle: never more workers than a process has shards
    train_workers = min(workers, max(1, len(train_shards[rank::world])))
    batches = batches_per_process(train_shards, world, max(train_workers, 1), cfg.batch_size)
    check_batch(cfg, batches)
    train_set = ShardStream(train_shards, train_transform(cfg), rank=rank, world=world, shuffle=True, seed=cfg.seed)
    train_set.limit_to(batches, cfg.batch_size, max(train_workers, 1))
    val_set = ShardStream(val_shards, eval_transform(cfg.img_size, cfg.eval_crop_pct), rank=rank, world=world)
    common = dict(batch_size=cfg.batch_size, collate_fn=collate_skip, pin_memory=pin_memory)
    train_loader = torch.utils.data.DataLoader(train_set, num_workers=train_workers, drop_last=True, **common)
    val_workers = min(workers, max(1, len(val_shards[rank::world])))
    val_loader = torch.utils.data.DataLoader(val_set, num_workers=val_workers, **common)
    loader = EpochLoader(train_loader, batches)
    sizes = (sum(n for _, n in train_shards), sum(n for _, n in val_shards))
    notes = [f"repeated_aug={cfg.repeated_aug} is not applied to shards (each sample once per epoch)"]
    return TrainValData(
        loader, val_loader, loader, index.classes, batches, sizes, notes if cfg.repeated_aug > 1 else []
    )
