"""Image preprocessing and datasets."""

from __future__ import annotations

import math

from torchvision import transforms as T

__all__ = ["DEFAULT_CROP_PCT", "IMAGENET_MEAN", "IMAGENET_STD", "eval_transform", "imagenet_class_names"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP_PCT = 0.875  # the authors' evaluation: resize 256 -> centre crop 224


def eval_transform(img_size: int = 224, crop_pct: float = DEFAULT_CROP_PCT) -> T.Compose:
    """The official evaluation preprocessing for a PIL image: resize the short side to
    ``img_size / crop_pct`` (bicubic), centre-crop ``img_size``, to tensor, ImageNet mean/std."""
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    size = math.floor(img_size / crop_pct)
    return T.Compose(
        [
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(img_size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in label order (shipped with the package)."""
    from importlib.resources import files

    return files("levit").joinpath("data/imagenet_classes.txt").read_text().splitlines()
