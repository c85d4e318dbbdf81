"""The evaluation preprocessing of the authors' code and the training augmentation of the paper's recipe (DeiT's)."""

from __future__ import annotations

import math
from collections.abc import Callable

from torchvision import transforms as T

from ..models.config import DEFAULT_CROP_PCT, IMAGENET_MEAN, IMAGENET_STD, check_crop_pct

#: the interpolations a model's ``pretrained_cfg`` may name (timm's spellings)
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
#: the evaluation crops: ``center`` resizes the short side to ``img_size / crop_pct`` and crops the
#: middle (the authors'); ``squash`` resizes the whole image to ``img_size / crop_pct`` then crops
CROP_MODES = ("center", "squash")


def resize_size(img_size: int | tuple[int, int] = 224, crop_pct: float = DEFAULT_CROP_PCT) -> int:
    """The short side the evaluation resize goes to: ``img_size / crop_pct`` (for (H, W): ``max(H, W)``)."""
    crop_pct = check_crop_pct(crop_pct)
    return math.floor((img_size if isinstance(img_size, int) else max(img_size)) / crop_pct)


def squash_size(img_size: int | tuple[int, int], crop_pct: float = DEFAULT_CROP_PCT) -> tuple[int, int]:
    """The (H, W) the ``squash`` evaluation resizes to: each side ``img_size / crop_pct``."""
    crop_pct = check_crop_pct(crop_pct)
    hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    return (math.floor(hw[0] / crop_pct), math.floor(hw[1] / crop_pct))


def eval_transform(
    img_size: int | tuple[int, int] = 224,
    crop_pct: float = DEFAULT_CROP_PCT,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    interpolation: str = "bicubic",
    crop_mode: str = "center",
) -> T.Compose:
    """The evaluation preprocessing for a PIL image; the defaults are the authors' (resize the short
    side to ``img_size / crop_pct`` bicubic, centre-crop ``img_size``, to tensor, ImageNet mean/std).
    For an (H, W) size the short side goes to ``max(H, W) / crop_pct``, so the crop always fits.
    ``crop_mode="squash"`` resizes both sides to ``img_size / crop_pct`` (aspect not kept) instead."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
    if crop_mode not in CROP_MODES:
        raise ValueError(f"crop_mode must be one of {', '.join(CROP_MODES)}, got {crop_mode!r}")
    mode = T.InterpolationMode(interpolation)
    size = squash_size(img_size, crop_pct) if crop_mode == "squash" else resize_size(img_size, crop_pct)
    return T.Compose([T.Resize(size, interpolation=mode), T.CenterCrop(img_size), T.ToTensor(), T.Normalize(mean, std)])


def safe_posterize(img, bits_to_keep: int, **_):
    """``ImageOps.posterize`` for every bit count timm's RandAugment asks for.

    Pillow's ``ImageOps.posterize`` accepts 1..8 bits and, since Pillow 13, raises ``ValueError`` for
    anything else. timm's ``PosterizeIncreasing`` op (RandAugment with ``inc1``) maps its magnitude to
    ``4 - int(magnitude / 10 * 4)`` bits; with ``mstd0.5`` the magnitude is drawn from N(9, 0.5) and
    clipped to 10, so about one call in fifty asks for 0 bits. Keeping 0 bits means a black image, which
    is what older Pillow (mask ``~255``) and the TensorFlow reference (shift by 8) give: the recipe's
    behaviour is kept, only the crash goes.
    """
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, int(bits_to_keep))


def _make_posterize_safe(transform) -> int:
    """Swap timm's posterize op for :func:`safe_posterize` in every (Rand/Auto/AugMix) augmentation op
    inside ``transform``; returns how many ops were patched."""
    from timm.data import auto_augment

    patched = 0
    stack = [transform]
    while stack:
        t = stack.pop()
        if isinstance(t, auto_augment.AugmentOp):
            if t.aug_fn is auto_augment.posterize:
                t.aug_fn = safe_posterize
                patched += 1
            continue
        for attr in ("transforms", "ops", "policy"):
            inner = getattr(t, attr, None)
            if isinstance(inner, (list, tuple)):
                stack.extend(inner)
    return patched


def train_transform(cfg) -> Callable:
    """The training augmentation of a recipe (timm's ``create_transform``: random-resized crop,
    flip, RandAugment, bicubic, random erasing, normalisation), with posterize made safe on current
    Pillow (:func:`safe_posterize`)."""
    from timm.data import create_transform

    transform = create_transform(
        cfg.img_size,
        is_training=True,
        scale=tuple(cfg.train_crop_scale),
        hflip=cfg.hflip,
        color_jitter=cfg.color_jitter,
        auto_augment=cfg.auto_augment or None,
        interpolation=cfg.train_interpolation,
        re_prob=cfg.reprob,
        re_mode=cfg.remode,
        re_count=cfg.recount,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
    _make_posterize_safe(transform)
    return transform


def build_mixup(cfg, num_classes: int):
    """timm's Mixup/CutMix (with label smoothing) for a recipe, or None when both are off."""
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=cfg.mixup,
        cutmix_alpha=cfg.cutmix,
        prob=cfg.mixup_prob,
        switch_prob=cfg.mixup_switch_prob,
        mode=cfg.mixup_mode,
        label_smoothing=cfg.smoothing,
        num_classes=num_classes,
    )
