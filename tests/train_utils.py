"""Shared helpers for the training tests: tiny generated ImageFolder data and subprocess runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

SRC = str(Path(__file__).resolve().parents[1] / "src")


def make_folder(root: Path, per_class: dict[str, int], size: int = 24, seed: int = 0) -> Path:
    """ImageFolder of simple learnable images: class k has a bright band at a class-specific row."""
    rng = np.random.default_rng(seed)
    for k, (cls, n) in enumerate(sorted(per_class.items())):
        d = root / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            row = (k * 7 + 3) % (size - 4)
            img[row : row + 4, :, k % 3] = 230
            Image.fromarray(img).save(d / f"{cls}_{i:03d}.png")
    return root


def make_dataset(root: Path, classes: int = 3, train: int = 8, val: int = 3, seed: int = 0) -> Path:
    """``root/train`` and ``root/val`` with ``classes`` classes."""
    names = [f"c{k}" for k in range(classes)]
    make_folder(root / "train", dict.fromkeys(names, train), seed=seed)
    make_folder(root / "val", dict.fromkeys(names, val), seed=seed + 1)
    return root


def tiny_config(data: Path, output: Path, **extra) -> dict:
    """A fast recipe on the tiny model that still exercises every random stream."""
    cfg = dict(
        model="levit_tiny",
        data=str(data),
        output=str(output),
        img_size=32,
        epochs=2,
        batch_size=4,
        total_batch=None,
        lr=1e-3,
        lr_base_batch=4,
        warmup_epochs=1,
        distillation="none",
        teacher=None,
        workers=0,
        threads=1,
        device="cpu",
        log_every=1,
        progress=False,
        model_ema=True,
        model_ema_decay=0.9,
        checkpoint_every_steps=0,
    )
    cfg.update(extra)
    return cfg


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = SRC + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    return e


def run_py(code: str, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env(), capture_output=True, text=True, timeout=timeout
    )


def run_cli(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "levit", *args], env=env(), capture_output=True, text=True, timeout=timeout
    )


def cli(*args: str) -> SimpleNamespace:
    """``levit ARGS`` in this process (``levit.cli.main``): returncode, stdout and stderr."""
    import contextlib
    import io

    from levit.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (to check that nothing was written or changed)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def step_losses(output: Path) -> dict[int, float]:
    """Per-step losses from a run's metrics.jsonl (the last record of a step wins)."""
    out: dict[int, float] = {}
    for line in (output / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["event"] == "step":
            out[rec["step"]] = rec["loss"]
    return out


def hf_dataset(folder: Path, classes: list[str]):
    """The ImageFolder ``folder`` as a ``datasets.Dataset``, rows in the ImageFolder's order, image
    bytes inline."""
    import datasets

    from levit.data.datasets import SafeImageFolder

    samples = SafeImageFolder(folder).samples
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    rows = {"image": [{"bytes": Path(p).read_bytes(), "path": None} for p, _ in samples]}
    return datasets.Dataset.from_dict(rows | {"label": [t for _, t in samples]}, features=features)
