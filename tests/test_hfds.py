"""Hugging Face datasets as `--data`: a save_to_disk folder or Parquet files train as the ImageFolder would."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_utils import hf_dataset, make_dataset, step_losses, tiny_config

from levit.errors import LeViTError
from levit.train.recipe import resolve_config
from levit.train.run import train

datasets = pytest.importorskip("datasets")
BROKEN = b"\x89PNG\r\n\x1a\n" + b"garbage" * 10


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """The same images as an ImageFolder, a save_to_disk folder and Parquet files (one corrupt image)."""
    tmp = tmp_path_factory.mktemp("hf")
    folder = make_dataset(tmp / "folder", classes=3, train=6, val=2)
    (folder / "train" / "c1" / "broken.png").write_bytes(BROKEN)
    classes = ["c0", "c1", "c2"]
    for split in ("train", "val"):
        ds = hf_dataset(folder / split, classes)
        ds.save_to_disk(str(tmp / "saved" / split))
        (tmp / "parquet" / split).mkdir(parents=True)
        ds.to_parquet(str(tmp / "parquet" / split / "part-0.parquet"))
    return tmp


@pytest.mark.parametrize("layout", ["saved", "parquet"])
def test_hf_dataset_trains_exactly_as_its_image_folder(layouts, layout):
    """Same rows in the same order, same seed: the same per-step losses and weights, bit for bit (the
    sampler, the per-sample augmentation seeds and the bad-sample handling are the ImageFolder's)."""
    extra = dict(epochs=2, max_bad_fraction=0.2)
    want = train(resolve_config(**tiny_config(layouts / "folder", layouts / f"run_folder_{layout}", **extra)))
    got = train(resolve_config(**tiny_config(layouts / layout, layouts / f"run_{layout}", **extra)))
    assert step_losses(layouts / f"run_{layout}") == step_losses(layouts / f"run_folder_{layout}")
    a, b = want.model.state_dict(), got.model.state_dict()
    assert all((a[k] == b[k]).all() for k in a)
    assert got.model.class_names == ["c0", "c1", "c2"] and got.last["n"] == 6
    assert len(got.skipped_images) == len(want.skipped_images) == 1 and got.skipped_images[0].startswith("row ")


def test_hf_dataset_without_an_image_column_is_a_one_line_error(tmp_path):
    ds = datasets.Dataset.from_dict({"pixels": [[0, 1]], "label": [0]})
    for split in ("train", "val"):
        ds.save_to_disk(str(tmp_path / "d" / split))
    with pytest.raises(LeViTError, match="expected an image column"):
        train(resolve_config(**tiny_config(tmp_path / "d", tmp_path / "out")))


def test_eval_on_a_dataset_gives_the_numbers_of_its_image_folder(layouts, tmp_path):
    """``levit eval --data`` on a save_to_disk folder, a Parquet folder or a dataset root (its val/)
    gives the ImageFolder's top-1, top-5, loss and count exactly."""
    import json

    from train_utils import cli

    import levit

    ckpt = levit.save(levit.create_model("levit_tiny", num_classes=3, img_size=32), tmp_path / "m.safetensors")
    results = []
    for data in ("folder/val", "saved/val", "parquet/val", "parquet"):
        done = cli("eval", "--data", layouts / data, "-c", ckpt, "--workers", "0", "--output", tmp_path / "e.json")
        assert done.returncode == 0, done.stderr
        results.append({k: v for k, v in json.loads((tmp_path / "e.json").read_text()).items() if k != "data"})
    assert results[0]["n"] == 6 and all(r == results[0] for r in results[1:])


def png(seed: int) -> bytes:
    """A distinct 16x16 PNG."""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def parquet_split(folder: Path, files: int, rows: int = 20) -> tuple[list[str], list[int]]:
    """``rows`` distinct images (label = row % 3) in ``files`` Parquet files; their paths and row counts."""
    import numpy as np

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    folder.mkdir(parents=True)
    parts = np.array_split(np.arange(rows), files)
    for k, part in enumerate(parts):
        rows_k = {"image": [{"bytes": png(int(i)), "path": None} for i in part], "label": [int(i) % 3 for i in part]}
        datasets.Dataset.from_dict(rows_k, features=features).to_parquet(str(folder / f"part-{k}.parquet"))
    return sorted(str(p) for p in folder.glob("*.parquet")), [len(p) for p in parts]


@pytest.mark.parametrize("files", [4, 5])
def test_streaming_sees_every_row_once_over_ranks_and_workers(tmp_path, files):
    """2 processes x 2 loader workers over a streamed Parquet split: every row exactly once an epoch,
    whether the files divide among the processes (4: files per process) or not (5: rows per process),
    each worker yielding the rows stream_counts promises (training fills a shortfall by reading again,
    which would repeat rows); an epoch's order is the same on every reading, the next epoch's another."""
    import hashlib

    import torch

    from levit.data.datasets import collate_skip
    from levit.data.hfds import HFStream, stream_counts
    from levit.data.transforms import eval_transform

    paths, rows = parquet_split(tmp_path / "train", files)
    seen = []
    for rank in range(2):
        stream = HFStream(paths, rows, eval_transform(16, 1.0), rank=rank, world=2, shuffle=True, seed=3)
        stream.set_epoch(1)
        loader = torch.utils.data.DataLoader(stream, batch_size=2, num_workers=2, collate_fn=collate_skip)
        got = [hashlib.sha1(img.numpy().tobytes()).hexdigest() for images, _, _ in loader for img in images]
        assert len(got) == sum(stream_counts(rows, rank, 2, w, 2) for w in range(2))
        seen += got
    assert len(seen) == 20 and len(set(seen)) == 20
    # the order is datasets' shuffle of (seed, epoch): the same on every reading, another the next epoch
    stream = HFStream(paths, rows, None, shuffle=True, seed=3, loader=bytes)
    orders = []
    for epoch in (1, 1, 2):
        stream.set_epoch(epoch)
        orders.append([image for image, _, _ in stream])
    assert orders[0] == orders[1] != orders[2] and sorted(orders[0]) == sorted(orders[2])


def test_streaming_trains_with_equal_batches_on_every_process(layouts, tmp_path):
    """hf_streaming=true reads the Parquet split as a stream: the run trains and validates on every row
    (the corrupt one skipped and reported); asked of a save_to_disk folder, a one-line error."""
    extra = dict(epochs=1, max_bad_fraction=0.2, hf_streaming=True, mixup=0.0, cutmix=0.0)
    got = train(resolve_config(**tiny_config(layouts / "parquet", tmp_path / "run", **extra)))
    assert got.model.class_names == ["c0", "c1", "c2"] and got.last["n"] == 6
    assert len(got.skipped_images) == 1 and "row" in got.skipped_images[0]
    with pytest.raises(LeViTError, match=r"no \.parquet files to stream"):
        train(resolve_config(**tiny_config(layouts / "saved", tmp_path / "saved", **extra)))


def test_a_training_stream_augments_only_the_rows_of_the_batches_the_epoch_uses(layouts):
    """19 rows (one corrupt) in batches of 4: the epoch uses 16, and only those are augmented (the
    two good rows past the last batch would be dropped by the loader)."""
    from levit.data.hfds import build_hf_stream_loaders

    cfg = resolve_config(**tiny_config(layouts / "parquet", layouts / "unused", hf_streaming=True))
    data = build_hf_stream_loaders(cfg, layouts / "parquet")
    stream = data.train_loader.loader.dataset
    assert stream.take == [16]
    calls, transform = [], stream.transform
    stream.transform = lambda img: calls.append(1) or transform(img)
    assert [len(images) for images, _, _ in data.train_loader.loader] == [4, 4, 4, 4]
    assert len(calls) == 16


class InterruptError(Exception):
    pass


def test_streamed_run_stopped_mid_epoch_resumes_with_the_same_losses(layouts, tmp_path):
    """hf_streaming=true, stopped after update 3 of an epoch's 4 and resumed (``resume="auto"``) from its
    checkpoint at update 2: the uninterrupted run's per-step losses and weights, bit for bit (the rows
    already trained on are read again and dropped, every row keeps its place and augmentation)."""
    import torch

    extra = dict(epochs=1, max_bad_fraction=0.2, hf_streaming=True, checkpoint_every_steps=2)
    whole = train(resolve_config(**tiny_config(layouts / "parquet", tmp_path / "whole", **extra)))

    def stop(event: str, info: dict) -> None:
        if event == "step" and info["global_step"] == 3:
            raise InterruptError

    cfg = resolve_config(**tiny_config(layouts / "parquet", tmp_path / "cut", **extra))
    with pytest.raises(InterruptError):
        train(cfg, callbacks=[stop])
    steps: list[int] = []
    resumed = train(cfg, resume="auto", callbacks=[lambda event, info: steps.append(info.get("global_step"))])
    assert steps[:2] == [3, 4]  # from the checkpoint at update 2, not from the start
    losses = step_losses(tmp_path / "whole")
    assert step_losses(tmp_path / "cut") == losses and len(losses) == 4
    want, got = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
