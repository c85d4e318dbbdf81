"""levit: LeViT image classifiers, exact to the released weights, built for fast inference."""

from __future__ import annotations

from ._version import __version__
from .backbone import create_backbone
from .checkpoint import save
from .config import LeViTConfig
from .deploy import deploy
from .flops import count_flops, count_params
from .fuse import fuse
from .registry import create_model, list_models

__all__ = [
    "LeViTConfig",
    "__version__",
    "count_flops",
    "count_params",
    "create_backbone",
    "create_model",
    "deploy",
    "fuse",
    "list_models",
    "save",
]
