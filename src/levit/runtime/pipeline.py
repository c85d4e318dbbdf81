"""The one decode + preprocess step shared by ``levit predict``, ``levit serve`` and the Ray jobs.

A minimal version (decode with :func:`levit.data.images.open_rgb`, the official evaluation transform
:func:`levit.data.transforms.eval_transform`), with the image-size check done on the header before
any pixel is decoded.
"""

from __future__ import annotations

import io
import os

import torch

from ..data.images import open_rgb
from ..data.transforms import eval_transform
from ..errors import LeViTError
from ..models.config import DEFAULT_CROP_PCT, IMAGENET_MEAN, IMAGENET_STD
from ..utils import first_line

__all__ = ["ImageError", "Preprocess"]


class ImageError(LeViTError):
    """An input that is not a readable image: empty, truncated, not an image, or too large."""


class Preprocess:
    """Bytes or a file path -> a (3, H, W) float32 tensor, the official evaluation preprocessing.

    Picklable (plain attributes; the transform is rebuilt on first use in each process).
    ``max_pixels`` rejects images whose header declares more pixels, before decoding them.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        crop_pct: float = DEFAULT_CROP_PCT,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        fast_decode: bool = False,
        max_pixels: int | None = None,
    ) -> None:
        self.img_size, self.crop_pct, self.mean, self.std = img_size, crop_pct, tuple(mean), tuple(std)
        self.fast_decode, self.max_pixels = fast_decode, max_pixels
        self._transform = None

    @classmethod
    def for_model(cls, model: torch.nn.Module, **kw: object) -> Preprocess:
        """The preprocessing a LeViT was built for (its input resolution)."""
        return cls(img_size=model.config.img_size, **kw)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_transform": None}

    def _check_size(self, src: str | os.PathLike | io.BytesIO) -> None:
        from PIL import Image

        with Image.open(src) as im:  # reads the header only
            w, h = im.size
        if self.max_pixels is not None and w * h > self.max_pixels:
            raise ImageError(f"image is {w}x{h} ({w * h / 1e6:.0f} Mpx): at most {self.max_pixels / 1e6:g} Mpx taken")

    def __call__(self, src: str | os.PathLike | bytes) -> torch.Tensor:
        """Decode and preprocess one image; :class:`ImageError` names what was wrong."""
        from PIL import Image, UnidentifiedImageError

        if self._transform is None:
            t = eval_transform(self.img_size, self.crop_pct)
            t.transforms[-1].mean, t.transforms[-1].std = list(self.mean), list(self.std)
            self._transform = t
        if isinstance(src, bytes | bytearray | memoryview):
            if not len(src):
                raise ImageError("empty input: expected image bytes (JPEG, PNG, WebP, ...)")
            fp: str | os.PathLike | io.BytesIO = io.BytesIO(src)
        else:
            fp = src
        try:
            self._check_size(fp)
            if isinstance(fp, io.BytesIO):
                fp.seek(0)
            img = open_rgb(fp)
        except ImageError:
            raise
        except FileNotFoundError:
            raise ImageError(f"no such image file: {src}") from None
        except UnidentifiedImageError:
            raise ImageError("not an image: expected JPEG, PNG, WebP, GIF, BMP or TIFF data") from None
        except Image.DecompressionBombError as e:
            raise ImageError(f"image too large: {first_line(e, 160)}") from None
        except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
            raise ImageError(f"corrupt or truncated image: {first_line(e, 160)}") from None
        return self._transform(img)
