"""ImageNet-1k top-1 of every model in the modern comparison, each with its source.

The figures live in ``field_top1.csv`` beside this module (package data), one row per model: its
name in ``levit bench``, the timm architecture that builds it (empty for this library's LeViT), its
family, the resolution the figure was measured at (the model is timed at the same one), the top-1,
where the figure comes from, and timm's own figure beside it where there is one. Speed does not
depend on the weights, so the models are built with random weights and the accuracy is read here;
a model without a sourced figure has ``top1`` ``None`` (written "unknown" in the file).

>>> FIELD_ACCURACY["shvit_s1"].top1
72.78
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from importlib import resources

__all__ = ["FIELD_ACCURACY", "MODERN_MODELS", "MODERN_QUICK_MODELS", "FieldAccuracy", "load_field_accuracy"]

DATA_FILE = "field_top1.csv"


@dataclass(frozen=True)
class FieldAccuracy:
    """One row of ``field_top1.csv``: a model of the comparison and its sourced top-1."""

    name: str  # the name levit bench knows it by
    timm_model: str | None  # the timm architecture that builds it; None: this library's LeViT
    family: str  # a colour in the Pareto picture
    img_size: int  # the resolution the top-1 was measured at, and the one it is timed at
    top1: float | None  # ImageNet-1k top-1 %, None where no source gives one
    source: str  # where ``top1`` comes from
    timm_top1: float | None  # timm's results-imagenet.csv figure for the same model, where there is one
    note: str = ""


def _number(text: str) -> float | None:
    text = text.strip()
    return None if text in ("", "unknown") else float(text)


def load_field_accuracy(text: str | None = None) -> dict[str, FieldAccuracy]:
    """The rows of ``field_top1.csv`` (or of ``text``, CSV in the same columns) by name."""
    if text is None:
        text = resources.files(__package__).joinpath(DATA_FILE).read_text()
    out: dict[str, FieldAccuracy] = {}
    for row in csv.DictReader(text.splitlines()):
        out[row["name"]] = FieldAccuracy(
            name=row["name"],
            timm_model=row["timm_model"] or None,
            family=row["family"],
            img_size=int(row["img_size"]),
            top1=_number(row["top1"]),
            source=row["source"].strip() or "unknown",
            timm_top1=_number(row["timm_top1"]),
            note=row["note"],
        )
    return out


FIELD_ACCURACY: dict[str, FieldAccuracy] = load_field_accuracy()
# `levit bench --suite modern`: every model of the data file, the paper's and today's
MODERN_MODELS: tuple[str, ...] = tuple(FIELD_ACCURACY)
# `--suite modern --quick`: LeViT at both ends and the small and fast models nearest them in accuracy,
# so that a first look at the front is a short run on a small machine
MODERN_QUICK_MODELS: tuple[str, ...] = (
    "levit_128s",
    "levit_256",
    "efficientvit_m4",
    "efficientvit_m5",
    "shvit_s2",
    "mobilenetv4_conv_small",
    "starnet_s2",
    "repvit_m0_9",
    "fastvit_t8",
    "efficientformerv2_s0",
    "efficientnet_b0",
)
