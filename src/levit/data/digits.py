"""The bundled demo dataset: scikit-learn's UCI handwritten digits written as an image folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import LeViTError


def make_digits_folder(root: str | os.PathLike, val_fraction: float = 0.2, seed: int = 0) -> Path:
    """Write scikit-learn's UCI handwritten digits (1797 real 8x8 images, bundled, no download) as
    ``root/train/<digit>/*.png`` and ``root/val/<digit>/*.png`` (a stratified, seeded held-out split),
    built beside ``root`` and renamed into place when complete. Existing complete folders are reused."""
    from PIL import Image

    root = Path(root)
    done = root / ".complete"
    if done.is_file():
        return root
    if root.exists():
        raise LeViTError(f"{root} exists but is not a complete digits folder (no .complete marker): remove it")
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise LeViTError("--dataset digits needs scikit-learn: pip install 'levit[train]'") from e
    import shutil

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)
    idx = np.arange(len(images))
    tr, va = train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=digits.target)
    tmp = root.with_name(f".{root.name}.{os.getpid()}.tmp")  # written aside, renamed when complete
    try:
        for split, ids in (("train", tr), ("val", va)):
            for i in ids:
                d = tmp / split / str(digits.target[i])
                d.mkdir(parents=True, exist_ok=True)
                Image.fromarray(images[i], mode="L").convert("RGB").save(d / f"{i:04d}.png")
        (tmp / ".complete").write_text("ok\n")
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
