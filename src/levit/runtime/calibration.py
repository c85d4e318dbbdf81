"""Calibration images for int8, and the one measure of a reduced precision against fp32.

:func:`load_calibration` turns what the user gives (a tensor, tensors, image files or folders) into
one (N, 3, H, W) batch, decoding files with the model's own preprocessing; :func:`fidelity` is the
agreement that :func:`levit.deploy` reports for bf16/int8 and that an int8 ExecuTorch export must
reach (:func:`levit.runtime.edge.export_executorch`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..errors import LeViTError

if TYPE_CHECKING:
    from ..data.preprocess import Preprocess

__all__ = ["CalibrationImages", "fidelity", "load_calibration"]

#: what a caller may pass as calibration images
CalibrationImages = Tensor | Iterable[Tensor] | str | os.PathLike | Iterable[str | os.PathLike]


def load_calibration(images: CalibrationImages, preprocess: Preprocess, limit: int | None = None) -> Tensor:
    """Calibration images as one (N, 3, H, W) float tensor.

    Accepts a tensor, an iterable of tensors (single images or batches), or image files/folders,
    decoded by ``preprocess`` (the model's own: :meth:`levit.data.preprocess.Preprocess.from_model`),
    so that int8 is calibrated on the inputs the model will see. ``limit``: at most this many images.
    """
    items = [images] if isinstance(images, (Tensor, str, os.PathLike)) else list(images)
    if items and all(isinstance(i, (str, os.PathLike)) for i in items):
        x = _read_images(items, preprocess, limit)
    elif items and all(isinstance(i, Tensor) for i in items):
        x = torch.cat([t if t.ndim == 4 else t.unsqueeze(0) for t in items])
    else:
        raise LeViTError("calibration: expected a (N, 3, H, W) tensor, tensors, or image files/folders")
    if x.ndim != 4 or x.shape[1] != 3:
        raise LeViTError(f"calibration images must be (N, 3, H, W), got {tuple(x.shape)}")
    return x[:limit] if limit else x


def _read_images(paths: list, preprocess: Preprocess, limit: int | None) -> Tensor:
    """The readable images among ``paths`` (files and folders), at most ``limit``. An unreadable file
    is skipped with one warning for all of them, as a prediction job skips it: by default the job's
    own inputs calibrate it, and one bad photo among them must not stop the job."""
    import warnings

    from ..data.images import find_images
    from ..errors import ImageError

    files = find_images(paths)[: limit or None]
    xs, bad = [], []
    for f in files:
        try:
            xs.append(preprocess(f))
        except ImageError as e:
            bad.append(f"{f} ({e.reason})")
    if bad:
        warnings.warn(f"{len(bad)} calibration image(s) cannot be read and were skipped: {bad[0]}", stacklevel=3)
    if not xs:
        raise LeViTError(f"no readable images for calibration in {', '.join(map(str, paths))}")
    return torch.stack(xs)


def fidelity(logits: Tensor, reference: Tensor) -> dict[str, float]:
    """Agreement of ``logits`` with fp32 ``reference`` logits (both (N, classes)).

    Returns ``top1_agreement`` (fraction of images with the same arg-max), ``max_rel_error`` (the
    largest per-image max |difference| / max |reference logit|) and ``images``.
    """
    logits, reference = logits.float().cpu(), reference.float().cpu()
    agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    per_img = (logits - reference).abs().amax(-1) / reference.abs().amax(-1).clamp_min(1e-12)
    return {"images": int(reference.shape[0]), "top1_agreement": agree, "max_rel_error": per_img.max().item()}
