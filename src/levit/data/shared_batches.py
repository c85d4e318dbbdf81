"""Decoded batches from DataLoader worker processes, written into shared memory made once and reused.

A DataLoader worker hands every batch over in shared memory of its own: the worker creates it and
faults its fresh pages in, the parent receives a file descriptor, maps the memory and unmaps it when
the batch is dropped. For normalised float batches that work is most of what two decoding processes
lose against two processes on their own (docs/predict.md measures both). Here the parent makes
``slots`` batches of shared memory before the workers start; a worker normalises each image of batch
number ``b`` straight into slot ``b % slots`` (no float tensor per image, no copy to stack them) and
sends back only the file names and which were readable.

The rule that keeps a batch from being overwritten while it is in use: ``turn[s]`` is the one batch
number allowed to write slot ``s`` next. A worker decoding batch ``b`` waits until
``turn[b % slots] == b``; the consumer's :meth:`SharedBatches.release` of batch ``b`` sets it to
``b + slots``. So a slot is written only after its previous batch was released, in whatever order
the workers finish. There are ``hold`` (the most batches the consumer holds at a time) plus the
loader's prefetch slots, so a consumer that releases its batches in about the order it got them
never makes a worker wait. Batch numbers go on across the passes of a persistent loader, and a pass
left unfinished is written off (:meth:`SharedBatches.__iter__`).

Without worker processes, or with batches for pinned memory (a GPU's copy), batches are collated
as DataLoader does (:func:`~levit.data.preprocess.collate`) and :meth:`SharedBatches.release` does
nothing.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from ..errors import LeViTError
from .preprocess import Batch, ImageFiles, Preprocess, collate, collate_into, load_item

__all__ = ["SharedBatches"]

PREFETCH = 2  # batches each worker decodes ahead (DataLoader's prefetch_factor)


class _AbandonedError(Exception):
    """The batch a worker waits to write belongs to a pass the consumer left."""


SHM = "/dev/shm"  # where Linux keeps POSIX shared memory, torch's included


def _check_shared_memory(nbytes: int) -> None:
    """Refuse, in one line saying what to change, a ring larger than the shared memory free (a
    container's /dev/shm is 64 MB unless given more), where torch would raise a RuntimeError ("unable
    to allocate shared memory ... No space left on device") and the run end in a traceback. Where
    there is no /dev/shm (macOS keeps shared memory elsewhere, Windows has no ``statvfs``) there is
    nothing to check."""
    try:
        st = os.statvfs(SHM)
    except (AttributeError, OSError):
        return
    free = st.f_bavail * st.f_frsize
    if nbytes > free:
        mb = 1 << 20
        raise LeViTError(
            f"decoding processes need {nbytes / mb:,.1f} MB of shared memory and {SHM} has {free / mb:,.1f} MB "
            "free: decode in this process (--workers 0), use fewer --workers or a smaller --batch-size, or give "
            "the container more shared memory (docker run --shm-size)"
        )


class _Ring:
    """``slots`` batches of shared memory and each slot's turn (above); picklable into workers."""

    def __init__(self, slots: int, batch_size: int, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.slots = slots
        x = torch.empty((slots, batch_size, *shape), dtype=dtype)
        _check_shared_memory(x.nbytes)
        self.x = x.share_memory_()
        self.turn = torch.arange(slots, dtype=torch.int64).share_memory_()
        self.first_live = torch.zeros(1, dtype=torch.int64).share_memory_()  # lower numbers: written off

    def claim(self, b: int) -> Tensor:
        """In a worker: slot ``b % slots`` once batch ``b`` may write it (polled, since a worker
        rarely waits: only while the consumer still holds an older batch of that slot)."""
        s, pause = b % self.slots, 1e-4
        while int(self.turn[s]) != b:
            if b < int(self.first_live[0]):
                raise _AbandonedError
            time.sleep(pause)
            pause = min(2 * pause, 2e-3)
        return self.x[s]

    def next_turn(self, s: int, floor: int) -> int:
        """The first batch number from ``floor`` on that writes slot ``s``."""
        return floor + (s - floor) % self.slots


class _ImageBatches(torch.utils.data.Dataset):
    """Batch number -> its files decoded: into the ring's slot in a worker (the small metadata
    returned), or collated (no ring)."""

    def __init__(
        self, paths: Sequence[str | os.PathLike], pre: Preprocess, pixels: bool, batch_size: int, ring: _Ring | None
    ) -> None:
        self.files, self.batch_size, self.ring = ImageFiles(paths, pre, pixels), batch_size, ring
        self.batches = -(-len(self.files) // batch_size)

    def __len__(self) -> int:
        return self.batches

    def __getitem__(self, b: int) -> Batch | tuple:
        first = (b % self.batches) * self.batch_size
        idx = range(first, min(first + self.batch_size, len(self.files)))
        if self.ring is None:
            return collate([self.files[i] for i in idx])
        pre = self.files.preprocess
        items = [load_item(pre, self.files.paths[i], pixels=True) for i in idx]
        batch = collate_into(items, self.ring.claim(b), pre, self.files.pixels)
        return b, batch.paths, batch.ok, batch.errors


def _as_is(item: object) -> object:
    """DataLoader's ``collate_fn`` for items that are whole batches already."""
    return item


class _Numbers(torch.utils.data.Sampler):
    """The DataLoader's sampler: the batch numbers of the pass starting at ``start``."""

    def __init__(self, batches: int) -> None:
        self.start, self.batches = 0, batches

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.start + self.batches))


class SharedBatches:
    """The batches of ``paths`` decoded by ``workers`` DataLoader processes (``0``: in this process),
    ``batch_size`` files each in input order, as :class:`~levit.data.preprocess.Batch`: normalised
    float, or with ``pixels`` uint8 to be normalised where the model runs.

    A batch's ``x`` lives in shared memory that later batches reuse: call :meth:`release` once done
    with it, from any thread, also for a batch taken in a pass left early (its slot waits for that).
    The consumer may hold up to ``hold`` batches at a time; asking for
    another while holding ``hold`` is a :class:`~levit.errors.LeViTError` (the workers would wait
    for a release that never comes). ``pin_memory``: batches in pinned memory for a GPU's copy
    (collated per batch). ``persistent``: the processes stay between passes.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        pre: Preprocess,
        batch_size: int,
        workers: int,
        *,
        pixels: bool = False,
        hold: int = 1,
        pin_memory: bool = False,
        persistent: bool = False,
    ) -> None:
        if hold < 1:
            raise ValueError(f"hold must be >= 1, got {hold}")
        ring = None
        if workers > 0 and not pin_memory:
            dtype = torch.uint8 if pixels else torch.float32
            ring = _Ring(hold + PREFETCH * workers, batch_size, (3, *pre.out_hw), dtype)
        self._ring, self._hold, self._lock = ring, hold, threading.Lock()
        self._held: dict[int, int] = {}  # slot -> the batch number in it, while the consumer holds it
        data = _ImageBatches(paths, pre, pixels, batch_size, ring)
        self._numbers = _Numbers(len(data))
        self._loader = torch.utils.data.DataLoader(
            data,
            batch_size=None,
            sampler=self._numbers,
            num_workers=workers,
            collate_fn=_as_is,
            pin_memory=pin_memory,
            prefetch_factor=PREFETCH if workers else None,
            persistent_workers=persistent and workers > 0,
        )

    def __len__(self) -> int:
        """The number of batches in a pass."""
        return len(self._numbers)

    def __iter__(self) -> Iterator[Batch]:
        """One pass over the files; the worker processes start now. A pass left before its end is
        written off: workers waiting to write its batches give up, and the next pass writes each
        slot once its holder released it."""
        end = self._numbers.start + len(self._numbers)
        return self._pass(iter(self._loader), end)  # the sampler's numbers are taken here

    def _pass(self, items: Iterator, end: int) -> Iterator[Batch]:
        try:
            for item in items:
                yield self._receive(item)
        finally:
            self._numbers.start = end
            if self._ring is not None:
                self._write_off(end)
            del items  # stops the workers of a loader that is not persistent, now

    def release(self, batch: Batch) -> None:
        """Done with ``batch``'s pixels: its shared memory may take a later batch."""
        ring = self._ring
        if ring is None or batch.x is None:
            return
        slot = (batch.x.data_ptr() - ring.x.data_ptr()) // ring.x[0].nbytes
        with self._lock:
            b = self._held.pop(slot)
            ring.turn[slot] = ring.next_turn(slot, max(b + 1, int(ring.first_live[0])))

    def _receive(self, item: Batch | tuple) -> Batch:
        """A worker's metadata -> the batch, its pixels a view of its slot (held until released)."""
        if self._ring is None:
            return item  # type: ignore[return-value]
        b, paths, ok, errors = item  # type: ignore[misc]
        slot = b % self._ring.slots
        with self._lock:
            if len(self._held) >= self._hold:
                raise LeViTError(f"a consumer of SharedBatches holds {len(self._held)} batches, at most {self._hold}")
            if ok:
                self._held[slot] = b
            else:  # nothing to hold: the slot's next batch may write at once
                self._ring.turn[slot] = b + self._ring.slots
        return Batch(paths, self._ring.x[slot, : len(ok)] if ok else None, ok, errors)

    def _write_off(self, end: int) -> None:
        """Batches numbered below ``end`` are off: a worker waiting to write one gives up, and each
        slot not held goes to its first batch from ``end`` on (a held one does on its release)."""
        ring = self._ring
        assert ring is not None
        with self._lock:
            ring.first_live[0] = end
            for s in range(ring.slots):
                if s not in self._held:
                    ring.turn[s] = ring.next_turn(s, end)
