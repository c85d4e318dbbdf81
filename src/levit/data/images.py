"""Finding and decoding image files: one list of extensions and one decoder for the whole package.

``open_rgb`` scales high-bit-depth images (16-bit PNG/TIFF in modes ``I;16``, ``I``, float ``F``) to
8 bits before converting to RGB: Pillow's own ``convert("RGB")`` clips such values to 0 or 255.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from ..utils import open_regular

__all__ = ["IMAGE_EXTENSIONS", "find_images", "is_image", "open_image_file", "open_rgb"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def is_image(path: str | os.PathLike) -> bool:
    """Whether the file name has an image extension (case-insensitive)."""
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def open_image_file(path: str | os.PathLike) -> BinaryIO:
    """``path`` opened for reading in binary without ever blocking (:func:`levit.utils.open_regular`),
    refused with a one-line :class:`~levit.errors.ImageError` unless it is a regular file: a pipe,
    socket or device named like a photo would otherwise stop the job at that file. The ``OSError``
    of a path that cannot be opened (missing, no permission, a folder) is raised as it is."""
    from ..errors import ImageError

    f = open_regular(path)
    if f is None:
        raise ImageError("not a regular file (a pipe, socket or device), not an image file", path)
    return f


def find_images(paths: Iterable[str | os.PathLike], *, skipped: list[Path] | None = None) -> list[Path]:
    """Files as given, plus every image (by extension) under each folder, recursively and sorted.
    A missing path raises ``FileNotFoundError`` naming it (a mistyped argument stops the job at once),
    a folder that cannot be listed ``PermissionError`` (a walk would silently find nothing in it); the
    other files found in folders are appended to ``skipped`` when given, so that a caller can say what
    it left out. A path given or found that is there but is no regular file (a pipe, socket or device)
    or no file at all (a symbolic link to nothing, or in a loop) is kept: its reader refuses it
    (:func:`levit.data.preprocess.read_image_bytes`), as one unreadable image among the others."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            if not os.access(p, os.R_OK | os.X_OK):
                raise PermissionError(f"permission denied: cannot list the folder {p}")
            found = sorted(f for f in p.rglob("*") if not f.is_dir())  # special files too: error rows
            out += [f for f in found if is_image(f)]
            if skipped is not None:
                skipped += [f for f in found if not is_image(f)]
        elif p.exists() or p.is_symlink():  # a file, a pipe or device, or a link that leads nowhere
            out.append(p)
        else:
            raise FileNotFoundError(f"no such image file or folder: {p}")
    return out


def _to_8bit(im):
    """A single-channel high-bit-depth image scaled to mode ``L`` by its type's full range."""
    import numpy as np
    from PIL import Image

    a = np.asarray(im)
    if a.dtype.kind == "f":  # float images: [0, 1] by convention, else their own range
        lo, hi = (0.0, 1.0) if a.size == 0 or (a.min() >= 0 and a.max() <= 1) else (float(a.min()), float(a.max()))
    elif im.mode.startswith("I;16") or a.dtype in (np.uint16, np.int16) or a.max(initial=0) <= 65535:
        lo, hi = 0.0, 65535.0
    else:
        lo, hi = 0.0, float(np.iinfo(np.int32).max)
    scaled = (a.astype(np.float64) - lo) * (255.0 / max(hi - lo, 1e-12))
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def open_rgb(
    path: str | os.PathLike | bytes,
    *,
    draft: int | None = None,
    max_pixels: int | None = 0,
):
    """Decode an image file (or its bytes) to an 8-bit RGB ``PIL.Image`` (fully loaded, file closed).

    Palette, grey, CMYK and alpha images are converted by Pillow; 16-bit and 32-bit integer and float
    greyscale images are first scaled to 8 bits over their type's range, so a 16-bit PNG gives the same
    pixels as its 8-bit copy.

    ``draft=S`` lets a JPEG decoder skip the pixels a resize to a short side of ``S`` would throw away
    (Pillow's ``draft``: DCT-domain downscaling by 1/2, 1/4 or 1/8 while both sides stay >= ``S``);
    the pixels then differ slightly from a full decode. ``max_pixels`` refuses larger images with an
    :class:`~levit.errors.ImageError` before any pixel is decoded: ``0`` (the default) is Pillow's own
    limit (``PIL.Image.MAX_IMAGE_PIXELS``, decompression bombs), reported in one line of ours instead
    of Pillow's warning; ``None`` sets no limit.
    """
    import io
    import warnings

    from PIL import Image

    from ..errors import ImageError

    source = None if isinstance(path, bytes) else path
    # the file is opened here, not by Pillow: a pipe named like a photo must not block (open_image_file)
    with io.BytesIO(path) if isinstance(path, bytes) else open_image_file(path) as fp:
        with warnings.catch_warnings():  # Pillow's decompression-bomb warning: one line of ours instead
            warnings.simplefilter("error" if max_pixels == 0 else "ignore", Image.DecompressionBombWarning)
            try:
                im = Image.open(fp)
            except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
                m = re.search(r"\((\d+) pixels\)", str(e))
                size = f"{int(m.group(1)) / 1e6:.1f}-megapixel " if m else ""
                raise ImageError(
                    f"{size}image too large to decode safely (Pillow's limit: {Image.MAX_IMAGE_PIXELS:,} pixels, "
                    "PIL.Image.MAX_IMAGE_PIXELS)",
                    source,
                ) from None
        with im:
            if max_pixels and im.size[0] * im.size[1] > max_pixels:
                w, h = im.size
                raise ImageError(f"image is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,}", source)
            if draft is not None and im.format == "JPEG":
                im.draft("RGB", (draft, draft))
            im.load()
            if im.mode in ("I", "F") or im.mode.startswith("I;16"):
                im = _to_8bit(im)
            # an RGB image is returned as loaded: convert("RGB") would copy it (48 MB for a phone photo)
            return im if im.mode == "RGB" else im.convert("RGB")
