"""levit: LeViT image classifiers, exact to the released weights, built for fast inference.

The public names are imported on first use (PEP 562), so that ``import levit`` and the command
line's ``levit --help`` / ``levit models`` do not pay for importing torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

from ._version import __version__

if TYPE_CHECKING:
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

# public name -> the module that defines it
_PUBLIC = {
    "LeViTConfig": "config",
    "create_backbone": "backbone",
    "count_flops": "flops",
    "count_params": "flops",
    "create_model": "registry",
    "deploy": "deploy",
    "fuse": "fuse",
    "list_models": "registry",
    "save": "checkpoint",
}


def __getattr__(name: str) -> object:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    try:  # submodules (levit.data, levit.export, ...) as attributes, like an eager package
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """``levit.fuse`` and ``levit.deploy`` are functions that share their name with a submodule:
    importing the submodule must not replace the function on the package (as an eager
    ``from .fuse import fuse`` in this file used to guarantee)."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in _PUBLIC and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
