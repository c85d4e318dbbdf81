"""Hugging Face datasets as `--data`: a save_to_disk folder or Parquet files train as the ImageFolder would."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_utils import make_dataset, step_losses, tiny_config

from levit.data.datasets import SafeImageFolder
from levit.errors import LeViTError
from levit.train.recipe import resolve_config
from levit.train.run import train

datasets = pytest.importorskip("datasets")
BROKEN = b"\x89PNG\r\n\x1a\n" + b"garbage" * 10


def as_dataset(folder: Path, classes: list[str]):
    """The ImageFolder ``folder`` as a datasets.Dataset, rows in the ImageFolder's order, image bytes inline."""
    samples = SafeImageFolder(folder).samples
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    rows = {"image": [{"bytes": Path(p).read_bytes(), "path": None} for p, _ in samples]}
    return datasets.Dataset.from_dict(rows | {"label": [t for _, t in samples]}, features=features)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """The same images as an ImageFolder, a save_to_disk folder and Parquet files (one corrupt image)."""
    tmp = tmp_path_factory.mktemp("hf")
    folder = make_dataset(tmp / "folder", classes=3, train=6, val=2)
    (folder / "train" / "c1" / "broken.png").write_bytes(BROKEN)
    classes = ["c0", "c1", "c2"]
    for split in ("train", "val"):
        ds = as_dataset(folder / split, classes)
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
