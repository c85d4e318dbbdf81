"""levit.data.shared_batches: decoding processes write their batches into shared memory made once and
reused, and a batch is never overwritten while its consumer holds it."""

from __future__ import annotations

import time

import pytest
import torch
from helpers import write_sample_jpegs

from levit.data.preprocess import ImageFiles, Preprocess, collate
from levit.data.shared_batches import SharedBatches
from levit.errors import LeViTError

BATCH = 4


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """18 photo-like JPEGs of two sizes, an unreadable file in the second batch and a whole batch of
    unreadable ones (the fourth), so that batches differ and one has no pixels at all."""
    root = tmp_path_factory.mktemp("shared")
    photos = write_sample_jpegs(root, 10, (48, 64), seed=3) + write_sample_jpegs(root, 8, (60, 40), seed=4, prefix="t")
    bad = []
    for i in range(5):
        (root / f"bad{i}.jpg").write_bytes(b"not a jpeg")
        bad.append(root / f"bad{i}.jpg")
    return photos[:5] + bad[:1] + photos[5:11] + bad[1:] + photos[11:]


@pytest.fixture(scope="module")
def pre():
    return Preprocess(32)


def _reference(files, pre, pixels=False):
    items = ImageFiles(files, pre, pixels)
    return [collate([items[i] for i in range(j, min(j + BATCH, len(files)))]) for j in range(0, len(files), BATCH)]


def _same(batch, ref) -> bool:
    same_x = (batch.x is None and ref.x is None) or torch.equal(batch.x, ref.x)
    return same_x and (batch.paths, batch.ok, batch.errors) == (ref.paths, ref.ok, ref.errors)


@pytest.mark.parametrize(("workers", "pixels", "persistent"), [(0, False, False), (2, False, True), (1, True, False)])
def test_batches_equal_the_dataloaders_pass_after_pass(files, pre, workers, pixels, persistent):
    """Every pass gives the batches DataLoader's collation gives (pixels, file names, readable
    positions, error reasons; a batch with no readable file has no pixels), normalised in the
    processes or as uint8; with processes, all in the one block of shared memory made at the start."""
    ref = _reference(files, pre, pixels)
    loader = SharedBatches(files, pre, BATCH, workers, pixels=pixels, persistent=persistent)
    seen = set()
    for _ in range(2):
        got = 0
        for batch, r in zip(loader, ref, strict=True):
            assert _same(batch, r)
            if batch.x is not None:
                seen.add(batch.x.untyped_storage().data_ptr())
            loader.release(batch)
            got += 1
        assert got == len(ref) == len(loader)
    if workers:
        assert len(seen) == 1
    assert ref[3].x is None and ref[1].errors  # the fixture's whole bad batch, and one bad file


def test_a_held_batch_is_never_overwritten(files, pre):
    """A consumer holding an old batch while it takes newer ones: the worker whose batch falls in the
    old batch's slot waits for its release instead of writing over it."""
    ref = _reference(files, pre)
    loader = SharedBatches(files, pre, BATCH, 1, hold=2)  # 4 slots: batch 4 goes where batch 0 is
    it = iter(loader)
    first = next(it)
    loader.release(next(it))
    third = next(it)  # batch 4 is asked of the process now
    time.sleep(0.5)  # time enough to decode it
    assert _same(first, ref[0]) and _same(third, ref[2])
    loader.release(first)
    loader.release(third)
    for batch, r in zip(it, ref[3:], strict=True):
        assert _same(batch, r)
        loader.release(batch)


def test_holding_more_than_said_is_an_error_not_a_hang(files, pre):
    loader = SharedBatches(files, pre, BATCH, 1, hold=1)
    it = iter(loader)
    next(it)
    with pytest.raises(LeViTError, match="holds 1 batches, at most 1"):
        next(it)


def test_a_pass_left_early_leaves_the_next_one_whole(files, pre):
    """A consumer leaving a pass while holding a batch, and releasing it later: the processes
    (persistent) drop what they had in hand, and the next pass gives every batch right."""
    ref = _reference(files, pre)
    loader = SharedBatches(files, pre, BATCH, 2, hold=3, persistent=True)  # 7 slots for 6 batches
    it = iter(loader)
    kept = next(it)
    loader.release(next(it))
    it.close()
    nxt = iter(loader)  # its second batch goes where the kept one is
    time.sleep(0.5)  # time enough to decode it
    assert _same(kept, ref[0])
    loader.release(kept)
    for batch, r in zip(nxt, ref, strict=True):
        assert _same(batch, r)
        loader.release(batch)
