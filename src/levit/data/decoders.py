"""Decoding an image straight into a uint8 tensor, and the evaluation preprocessing on tensors: the
``tensor`` and ``cuda`` decoders of :class:`levit.data.preprocess.Preprocess`.

The ``pil`` decoder (Pillow, then torchvision's PIL transforms) is the authors' evaluation, bit for bit.
This path decodes with libjpeg-turbo / libpng into a (3, H, W) uint8 tensor (TorchCodec's
``decode_image`` where it is installed, torchvision's otherwise) and resizes that tensor with
torchvision's antialiased uint8 kernels, the same filter as Pillow's, so its pixels differ from the
``pil`` path's by rounding only; it skips Pillow's PIL -> tensor conversion, which costs as much as
the resize (docs/predict.md measures both paths and their agreement).

The ``cuda`` decoder (:func:`decode_jpegs_on`) decodes a whole batch of JPEGs in one call on the
model's device (nvJPEG on a CUDA GPU; the same call runs on the CPU, which is how it is tested) and
resizes there: only the files' bytes cross to the GPU.

Whatever these paths do not take as they are (formats other than JPEG and PNG, 16-bit images, images
over the pixel limit, files it cannot decode) goes to the ``pil`` path, which gives the same answer as
always, or the one-line :class:`~levit.errors.ImageError` an unreadable file gets.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["TENSOR_FORMATS", "decode_jpegs_on", "decode_to_tensor", "resize_and_crop", "tensor_decoder_name"]

# what the tensor decoder takes itself, by its first bytes: JPEG and 8-bit PNG
TENSOR_FORMATS = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG"}
# Pillow modes the tensor decoder turns into RGB exactly as Pillow's convert("RGB") does; others
# (16-bit and float greyscale, which the pil path scales to 8 bits by their range) go to the pil path
_RGB_MODES = {"RGB", "L", "P", "RGBA", "LA", "CMYK"}


def _decoder() -> tuple[str, Callable]:
    """TorchCodec's ``decode_image`` where installed (torchvision's image decoding is deprecated in
    its favour), else torchvision's; each returns (3, H, W) uint8 for ``mode=RGB``."""
    try:
        from torchcodec.decoders import ImageReadMode, decode_image

        return "torchcodec", lambda data: decode_image(data, mode=ImageReadMode.RGB)
    except (ImportError, OSError, RuntimeError):  # not installed, or built for another torch
        from torchvision.io import ImageReadMode, decode_image

        def decode(data: Tensor) -> Tensor:
            with warnings.catch_warnings():  # its deprecation notice points at TorchCodec, above
                warnings.simplefilter("ignore", DeprecationWarning)
                return decode_image(data, mode=ImageReadMode.RGB)

        return "torchvision", decode


_NAME, _DECODE = _decoder()


def tensor_decoder_name() -> str:
    """Which library decodes for the ``tensor`` path here: ``torchcodec`` or ``torchvision``."""
    return _NAME


def decode_to_tensor(data: bytes, max_pixels: int | None) -> Tensor | None:
    """The (3, H, W) uint8 RGB tensor of the JPEG or 8-bit PNG in ``data``, or ``None`` for anything
    this path leaves to Pillow (another format or mode, over ``max_pixels``, or not decodable)."""
    from PIL import Image

    if not any(data.startswith(magic) for magic in TENSOR_FORMATS):
        return None
    try:
        with warnings.catch_warnings(), Image.open(io.BytesIO(data)) as im:  # the header only
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            w, h = im.size
            if im.mode not in _RGB_MODES or (max_pixels and w * h > max_pixels):
                return None
        return _DECODE(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    except Exception:  # Pillow or the decoder refuses it: the pil path says why, in one line
        return None


def resize_and_crop(
    img: Tensor, size: int | tuple[int, int], out_hw: tuple[int, int], interpolation: str, antialias: bool = True
) -> Tensor:
    """The evaluation geometry on a (3, H, W) uint8 tensor, as torchvision's ``Resize(size)`` +
    ``CenterCrop(out_hw)`` compute it on a PIL image (an int ``size``: the short side)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    mode = InterpolationMode(interpolation)
    img = F.resize(img, [size] if isinstance(size, int) else list(size), interpolation=mode, antialias=antialias)
    return F.center_crop(img, list(out_hw))


def _decode_jpegs(sources: list[Tensor], device: torch.device) -> list[Tensor]:
    """One batched JPEG decode on ``device`` (nvJPEG on a GPU: the whole list in one call)."""
    try:
        from torchcodec.decoders import decode_jpeg

        return list(decode_jpeg(sources, mode="RGB", device=device))
    except ImportError:
        from torchvision.io import ImageReadMode, decode_jpeg

        with warnings.catch_warnings():  # its deprecation notice points at TorchCodec, above
            warnings.simplefilter("ignore", DeprecationWarning)
            return list(decode_jpeg(sources, mode=ImageReadMode.RGB, device=device))


def decode_jpegs_on(datas: list[bytes], device: torch.device, max_pixels: int | None) -> list[Tensor | None]:
    """(3, H, W) uint8 RGB tensors on ``device`` for the JPEGs among ``datas``, decoded as one batch;
    ``None`` for every other item, and for a JPEG the batch decoder refuses (CMYK, or progressive
    where the device's decoder lacks it, or corrupt: those are decoded again one by one, and what still
    fails is left to the caller's CPU path, which decodes it or says why it cannot)."""
    from PIL import Image

    todo = []
    for i, data in enumerate(datas):
        if not data.startswith(b"\xff\xd8\xff"):
            continue
        try:
            with warnings.catch_warnings(), Image.open(io.BytesIO(data)) as im:  # the header only
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                w, h = im.size
                if im.mode in ("RGB", "L") and not (max_pixels and w * h > max_pixels):
                    todo.append(i)
        except Exception:
            continue  # not a readable JPEG header: the CPU path says why
    out: list[Tensor | None] = [None] * len(datas)
    sources = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in todo]
    try:
        decoded: list[Tensor | None] = list(_decode_jpegs(sources, device)) if sources else []
    except Exception:  # one bad file fails the batch call: find it by decoding one at a time
        decoded = []
        for source in sources:
            try:
                decoded.append(_decode_jpegs([source], device)[0])
            except Exception:
                decoded.append(None)
    for i, img in zip(todo, decoded):
        out[i] = img
    return out
