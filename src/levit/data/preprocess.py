"""The one inference preprocessing: an image file (or its bytes) -> the model's (3, H, W) input.

Every way an image reaches a model (``levit predict``, ``levit serve`` and its Ray replicas, ``levit
eval``, ``levit predict --ray``, the export sidecars) builds :class:`Preprocess` with
:meth:`Preprocess.from_model`, from the preprocessing the weights carry in ``model.pretrained_cfg``
(input size, crop, interpolation, mean, std). So the same image gives the same tensor whichever way
it comes in, and a value the user overrides is overridden the same way everywhere.

Also here: :class:`ImageFiles` and :func:`collate`, the DataLoader side of the same decoding, where an
unreadable file is an item carrying its reason instead of an exception.
"""

from __future__ import annotations

import errno
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torchvision import transforms as T

from ..errors import ImageError, LeViTError
from ..models.config import DEFAULT_CROP_PCT, IMAGENET_MEAN, IMAGENET_STD, check_crop_pct
from ..utils import first_line
from . import DECODERS
from .images import open_image_file, open_rgb
from .transforms import eval_transform, resize_size, squash_size

__all__ = [
    "DECODERS",
    "DEFAULT_MAX_PIXELS",
    "MAX_ASPECT",
    "Batch",
    "ImageFiles",
    "Preprocess",
    "collate",
    "collate_into",
    "load_item",
    "read_image_bytes",
]

# Pillow's own decompression-bomb threshold (PIL.Image.MAX_IMAGE_PIXELS, a 24-bit image of 256 MiB).
# Larger images are refused with an ImageError instead of Pillow's warning.
DEFAULT_MAX_PIXELS = 89_478_485
# An image longer than this many times its short side is cropped towards its middle before the
# resize (Preprocess.bounded): its resized intermediate stays a few megabytes whatever its shape.
MAX_ASPECT = 16


def _quiet_bomb_warning() -> None:
    """Silence Pillow's decompression-bomb warning (once, process-wide): :class:`Preprocess` applies
    its own ``max_pixels`` limit and reports a refused image as one :class:`~levit.errors.ImageError` line."""
    from PIL import Image

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _size(path: object) -> int | None:
    try:
        return os.path.getsize(path)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return None


def _image_error(src: object, e: BaseException) -> ImageError:
    """A one-line :class:`~levit.errors.ImageError` saying why ``src`` could not be decoded."""
    from PIL import Image, UnidentifiedImageError

    name = None if isinstance(src, (bytes, bytearray)) else src
    if isinstance(e, FileNotFoundError):
        reason = "a symbolic link to a missing file" if name is not None and os.path.islink(name) else "no such file"
    elif isinstance(e, IsADirectoryError):
        reason = "is a folder, not an image file"
    elif isinstance(e, PermissionError):
        reason = "permission denied"
    elif isinstance(e, OSError) and e.errno == errno.ELOOP:
        reason = "a loop of symbolic links, not an image file"
    elif (len(src) if name is None else _size(src)) == 0:  # type: ignore[arg-type]
        reason = "empty file (0 bytes)"
    elif isinstance(e, Image.DecompressionBombError):
        reason = f"image too large ({first_line(e, 160)})"
    elif isinstance(e, UnidentifiedImageError):
        reason = "not an image (Pillow cannot identify its format)"
    elif isinstance(e, OSError) and "truncated" in str(e):
        reason = "truncated image (the file ends before the picture does)"
    else:
        reason = f"cannot decode image ({type(e).__name__}: {first_line(e, 160)})"
    return ImageError(reason, name)


def read_image_bytes(src: str | os.PathLike | bytes | bytearray) -> bytes:
    """The bytes of an image file (or ``src`` itself when given bytes), read without ever blocking:
    the file is opened non-blocking and must be a regular file, so a pipe, socket or device named
    like a photo (or swapped in after a folder was listed) is a one-line
    :class:`~levit.errors.ImageError` instead of a read that waits forever."""
    if isinstance(src, (bytes, bytearray)):
        return bytes(src)
    try:
        f = open_image_file(src)
    except ImageError:
        raise
    except Exception as e:
        raise _image_error(src, e) from None
    with f:
        return f.read()


def _model_cfg(model: Any) -> tuple[Any, Mapping[str, Any]]:
    """``(input size, pretrained_cfg)`` of a LeViT, its features wrapper or anything carrying both."""
    cfg = getattr(model, "config", None)
    size = getattr(cfg, "img_size", None) or getattr(model, "img_size", None)
    if size is None:
        raise LeViTError(f"cannot tell the input size of {type(model).__name__}: pass Preprocess(img_size=...)")
    return size, getattr(model, "pretrained_cfg", None) or {}


class Preprocess:
    """Decode one image (a file path or its bytes) to the model's (3, H, W) float32 input.

    Build it with :meth:`from_model`: the model's own preprocessing. The defaults of the constructor
    are the authors' evaluation (resize the short side to ``img_size / crop_pct`` bicubic, centre crop,
    ImageNet mean/std), exactly :func:`levit.data.transforms.eval_transform` on
    :func:`levit.data.images.open_rgb` (16-bit images scaled to 8 bits).

    ``fast_decode=True`` lets the decoder of a JPEG at least twice the resize target skip the pixels
    the resize throws away (Pillow's DCT-domain ``draft``): much faster on large photos, with slightly
    different pixels (docs/predict.md measures both), hence opt-in; smaller JPEGs and other formats
    are unchanged. Images over ``max_pixels`` pixels (``None``: no limit) are refused before decoding.

    Unreadable, truncated, empty, non-image and too-large inputs raise
    :class:`~levit.errors.ImageError` (one line). Picklable, for DataLoader workers and Ray actors.
    """

    #: the settings that define a preprocessing (what :meth:`settings` returns and pickling keeps)
    FIELDS = (
        "img_size",
        "crop_pct",
        "mean",
        "std",
        "interpolation",
        "crop_mode",
        "fast_decode",
        "max_pixels",
        "decoder",
    )

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        crop_pct: float = DEFAULT_CROP_PCT,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        interpolation: str = "bicubic",
        crop_mode: str = "center",
        fast_decode: bool = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        decoder: str = "pil",
    ) -> None:
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
        if isinstance(img_size, (tuple, list)):
            img_size = (int(img_size[0]), int(img_size[1]))
            img_size = img_size[0] if img_size[0] == img_size[1] else img_size
        if max_pixels is not None and max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1 or None, got {max_pixels}")
        for name, v in (("mean", mean), ("std", std)):
            if len(v) != 3:
                raise ValueError(f"{name} must have 3 values (R, G, B), got {tuple(v)!r}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be > 0, got {tuple(std)!r}")
        self.img_size, self.crop_pct = img_size, check_crop_pct(crop_pct)
        self.mean, self.std = tuple(map(float, mean)), tuple(map(float, std))
        self.interpolation, self.crop_mode = str(interpolation), str(crop_mode)
        self.fast_decode, self.max_pixels, self.decoder = bool(fast_decode), max_pixels, decoder
        self.resize = resize_size(img_size, crop_pct)
        self.transform = eval_transform(img_size, self.crop_pct, self.mean, self.std, self.interpolation, crop_mode)
        self._geometry = T.Compose(self.transform.transforms[:2])  # its resize and crop, for pixels()
        self._norm: dict[str, tuple[Tensor, Tensor]] = {}  # normalize()'s mean and std, per device
        _quiet_bomb_warning()

    @classmethod
    def from_model(cls, model: Any, **overrides: Any) -> Preprocess:
        """The preprocessing ``model`` expects: its input size (``model.config.img_size``) and the
        ``crop_pct``, ``crop_mode``, ``interpolation``, ``mean`` and ``std`` of its ``pretrained_cfg``
        (a levit file's saved values, a converted checkpoint's, the authors' defaults otherwise).

        ``overrides``: any of :attr:`FIELDS`; a value of ``None`` keeps the model's (so a command-line
        flag left unset passes straight through).
        """
        unknown = set(overrides) - set(cls.FIELDS)
        if unknown:
            raise TypeError(f"unknown preprocessing setting(s) {sorted(unknown)}; known: {', '.join(cls.FIELDS)}")
        size, cfg = _model_cfg(model)
        kw: dict[str, Any] = {"img_size": size}
        kw.update({k: cfg[k] for k in ("crop_pct", "crop_mode", "interpolation", "mean", "std") if k in cfg})
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)

    @property
    def out_hw(self) -> tuple[int, int]:
        """The (H, W) of the tensors this returns."""
        s = self.img_size
        return (s, s) if isinstance(s, int) else s

    def settings(self) -> dict[str, Any]:
        """The settings as plain data (:attr:`FIELDS`): what :meth:`from_model` resolved, for sidecars and logs."""
        return {k: getattr(self, k) for k in self.FIELDS}

    def __repr__(self) -> str:
        return "Preprocess(" + ", ".join(f"{k}={v!r}" for k, v in self.settings().items()) + ")"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Preprocess) and self.settings() == other.settings()

    __hash__ = None  # type: ignore[assignment]

    def decode(self, src: str | os.PathLike | bytes):
        """The 8-bit RGB ``PIL.Image`` of ``src`` (JPEGs drafted when ``fast_decode``); raises
        :class:`~levit.errors.ImageError`."""
        return self._pil(read_image_bytes(src), src)

    def _pil(self, data: bytes, src: object):
        """Pillow's decode of ``data`` (the file ``src``'s bytes), every failure one ImageError line."""
        name = None if isinstance(src, (bytes, bytearray)) else src
        try:
            return open_rgb(data, draft=self.resize if self.fast_decode else None, max_pixels=self.max_pixels)
        except ImageError as e:
            raise ImageError(e.reason, name) from None
        except Exception as e:  # whatever Pillow raises for a bad file
            raise _image_error(src, e) from None

    def __call__(self, src: str | os.PathLike | bytes) -> Tensor:
        """The (3, H, W) float32 input tensor of one image; raises :class:`~levit.errors.ImageError` if
        it cannot be read."""
        return self.normalize(self.pixels(src))

    def pixels(self, src: str | os.PathLike | bytes) -> Tensor:
        """The model's input before normalisation: (3, H, W) uint8, resized and cropped. A batch of these
        is a quarter of the float batch, so a GPU pipeline moves pixels and normalises them where the
        model runs (:meth:`normalize`), with the same result."""
        from torchvision.transforms.v2.functional import pil_to_tensor

        data = read_image_bytes(src)
        if self.decoder in ("pil", "auto"):  # auto: pil, but for a GPU's batches (pixels_batch)
            return pil_to_tensor(self._geometry(self.bounded(self._pil(data, src)))).contiguous()
        from .decoders import decode_to_tensor

        img = None if self.fast_decode else decode_to_tensor(data, self.max_pixels)
        if img is None:  # what the tensor decoder leaves to Pillow, and the drafted JPEGs of fast_decode
            img = pil_to_tensor(self._pil(data, src))
        return self._tensor_geometry(img)

    def _tensor_geometry(self, img: Tensor) -> Tensor:
        """Bound, resize and crop a (3, H, W) uint8 tensor, on whatever device it is."""
        from .decoders import resize_and_crop

        box = self._bound_box(img.shape[-1], img.shape[-2])
        if box is not None:
            img = img[:, box[1] : box[3], box[0] : box[2]]
        size = self.resize if self.crop_mode == "center" else squash_size(self.img_size, self.crop_pct)
        return resize_and_crop(img, size, self.out_hw, self.interpolation).contiguous()

    def pixels_batch(self, paths: Sequence[str], device: torch.device) -> Batch:
        """:meth:`pixels` of a batch of files, stacked on ``device``: the JPEGs decoded there in one call
        (:func:`levit.data.decoders.decode_jpegs_on`; nvJPEG on a CUDA GPU) and resized there, every
        other file (and a JPEG the device's decoder refuses) through :meth:`pixels` on the CPU; an
        unreadable file is an error, as in :class:`ImageFiles`."""
        from .decoders import decode_jpegs_on

        datas: list[bytes] = []
        errors: dict[int, str] = {}
        for i, path in enumerate(paths):
            try:
                datas.append(read_image_bytes(path))
            except ImageError as e:
                datas.append(b"")
                errors[i] = e.reason
        on_device = [None] * len(paths) if self.fast_decode else decode_jpegs_on(datas, device, self.max_pixels)
        images, ok = [], []
        for i, img in enumerate(on_device):
            if i in errors:
                continue
            try:
                images.append(self.pixels(datas[i]).to(device) if img is None else self._tensor_geometry(img))
                ok.append(i)
            except ImageError as e:
                errors[i] = e.reason
        return Batch(list(paths), torch.stack(images) if images else None, ok, errors)

    def normalize(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """uint8 pixels, (3, H, W) or a (B, 3, H, W) batch, on any device -> float32
        ``(x / 255 - mean) / std``, computed as torchvision's ``ToTensor`` + ``Normalize`` compute it,
        so the pil decoder's tensors are the authors' bit for bit; into ``out`` (float32, ``x``'s shape
        and device) when given, with the same values."""
        key = str(x.device)
        if key not in self._norm:  # made once per device: no host-to-device copy per batch
            self._norm[key] = tuple(
                torch.tensor(v, dtype=torch.float32).view(-1, 1, 1).to(x.device) for v in (self.mean, self.std)
            )
        mean, std = self._norm[key]
        y = x.float() if out is None else out.copy_(x)
        return y.div_(255).sub_(mean).div_(std)

    def _bound_box(self, w: int, h: int) -> tuple[int, int, int, int] | None:
        """The (left, top, right, bottom) of :meth:`bounded`'s crop of a ``w`` x ``h`` image, or ``None``."""
        short, long = min(w, h), max(w, h)
        if self.crop_mode != "center" or long <= MAX_ASPECT * short:
            return None
        keep = MAX_ASPECT * short
        start = (long - keep) // 2
        return (start, 0, start + keep, h) if w > h else (0, start, w, start + keep)

    def bounded(self, img):  # PIL.Image -> PIL.Image
        """``img``, or for an image longer than :data:`MAX_ASPECT` times its short side, its centre
        cropped to that ratio along the long side.

        The resize takes the short side to ``resize`` pixels, so a 1 x 8000 strip would first become
        a 256 x 2,048,000 image (gigabytes) of which the centre crop keeps 224 columns. The centre crop
        lies within the short side's length of the middle, so cropping to :data:`MAX_ASPECT` first
        keeps everything the crop reads, with room for the filter, and bounds the cost whatever the
        shape; the positions the resize samples then move by less than a pixel. Images within the
        ratio (every photo) are not touched. ``squash`` resizes to a fixed size and needs no bound.
        """
        box = self._bound_box(*img.size)
        return img if box is None else img.crop(box)

    def __getstate__(self) -> dict:
        return self.settings()

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)


class _PathList:
    """File names packed in one byte buffer + offsets: DataLoader workers read them without touching
    Python objects, so their copy-on-write memory does not grow with the number of files (a list of
    str would be copied page by page into every worker as its reference counts change)."""

    def __init__(self, paths: Sequence[str | os.PathLike]) -> None:
        encoded = [os.fsencode(p) for p in paths]
        self._offsets = np.cumsum([0] + [len(b) for b in encoded], dtype=np.int64)
        self._buf = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> str:
        return os.fsdecode(self._buf[self._offsets[i] : self._offsets[i + 1]].tobytes())


def load_item(preprocess: Preprocess, path: str, pixels: bool = False) -> tuple[str, Tensor | None, str | None]:
    """``(path, tensor, None)`` for a readable image (with ``pixels``, its uint8
    :meth:`Preprocess.pixels`), ``(path, None, reason)`` for an unreadable one."""
    try:
        return path, preprocess.pixels(path) if pixels else preprocess(path), None
    except ImageError as e:
        return path, None, e.reason


class ImageFiles(torch.utils.data.Dataset):
    """Image files as ``(path, tensor or None, error or None)``: a bad file is an item with its reason.
    With ``pixels`` the tensors are uint8 (:meth:`Preprocess.pixels`), to be normalised later."""

    def __init__(self, paths: Sequence[str | os.PathLike], preprocess: Preprocess, pixels: bool = False) -> None:
        self.paths, self.preprocess, self.pixels = _PathList(paths), preprocess, pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[str, Tensor | None, str | None]:
        return load_item(self.preprocess, self.paths[i], self.pixels)


class Batch(NamedTuple):
    """Up to ``batch_size`` files in input order: ``x`` stacks the readable ones (``None`` if none),
    ``ok`` their positions in ``paths``, ``errors`` maps the other positions to their reason."""

    paths: list[str]
    x: Tensor | None
    ok: list[int]
    errors: dict[int, str]


def collate(items: list[tuple[str, Tensor | None, str | None]]) -> Batch:
    """DataLoader ``collate_fn`` for :class:`ImageFiles` (stacked in shared memory inside a worker)."""
    from torch.utils.data import default_collate

    ok = [i for i, (_, x, _) in enumerate(items) if x is not None]
    x = default_collate([items[i][1] for i in ok]) if ok else None
    return Batch([p for p, _, _ in items], x, ok, {i: e for i, (_, _, e) in enumerate(items) if e is not None})


def collate_into(
    items: list[tuple[str, Tensor | None, str | None]], out: Tensor, preprocess: Preprocess, pixels: bool = False
) -> Batch:
    """:func:`collate` for items of uint8 pixels (:func:`load_item` with ``pixels=True``), written into
    ``out`` (a ``(batch_size, 3, H, W)`` tensor kept for batch after batch): normalised with the values
    of :meth:`Preprocess.__call__` (float32 ``out``), or with ``pixels`` as they are (uint8 ``out``).
    Each image goes straight to its place, with no tensor of its own and no copy to stack them."""
    ok, errors = [], {}
    for pos, (_, px, error) in enumerate(items):
        if px is None:
            errors[pos] = error
            continue
        dst = out[len(ok)]
        dst.copy_(px) if pixels else preprocess.normalize(px, out=dst)
        ok.append(pos)
    return Batch([p for p, _, _ in items], out[: len(ok)] if ok else None, ok, errors)
