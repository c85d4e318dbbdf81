"""levit: LeViT image classifiers, exact to the released weights, built for fast inference.

The public names are imported on first use (PEP 562), so that ``import levit`` and the command
line's ``levit --help`` / ``levit models`` do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__

if TYPE_CHECKING:
    from .factory.backbone import create_backbone
    from .factory.create import create_model
    from .models.config import LeViTConfig, list_models
    from .models.flops import count_flops, count_params
    from .models.fuse import fuse
    from .runtime.deploy import deploy
    from .weights.format import save

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

# public name -> the module that defines it
_PUBLIC = {
    "LeViTConfig": "models.config",
    "create_backbone": "factory.backbone",
    "count_flops": "models.flops",
    "count_params": "models.flops",
    "create_model": "factory.create",
    "deploy": "runtime.deploy",
    "fuse": "models.fuse",
    "list_models": "models.config",
    "save": "weights.format",
}


def __getattr__(name: str) -> object:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    try:  # subpackages (levit.models, levit.runtime, ...) as attributes, like an eager package
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
