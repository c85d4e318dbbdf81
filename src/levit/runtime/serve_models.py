"""The served model's versions: what one loaded version holds, and reading a new one from a checkpoint.

A server starts with version 1 of its model. Loading a checkpoint while serving (the repository API's
``POST /v2/repository/models/{name}/load``, or SIGHUP) makes the next version beside the one serving:
its own weights, preprocessing, lanes and batcher, warmed up before it takes any request. It then
takes over in one assignment (:class:`levit.runtime.serve_app.LeViTService` owns the swap): a request
is bound to the version serving when it arrives and finishes on it, so the previous version computes
what it had been given and is retired once nothing is left in its batcher. A checkpoint that fails to
load leaves the serving version as it was, and :attr:`ModelEntry.failure` says why.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from ..errors import LeViTError

if TYPE_CHECKING:
    from ..data.preprocess import Preprocess
    from .batcher import Batcher

__all__ = ["LoadError", "ModelEntry", "ModelVersion", "naming", "read_checkpoint", "read_named"]


class LoadError(LeViTError):
    """A version that could not be loaded; the message says which checkpoint and why."""


@dataclass(eq=False)
class ModelVersion:
    """One loaded version of a served model: its number, weights, preprocessing, class names, and
    (once deployed) the batcher over its lanes. ``checkpoint``: the file it was read from, if any;
    ``name``: the model's name on the server."""

    version: int
    model: nn.Module
    preprocess: Preprocess
    names: list[str]
    checkpoint: str | None = None
    batcher: Batcher | None = None
    loaded_at: float = field(default_factory=time.time)
    name: str = ""  # the model's name on this server

    @property
    def num_classes(self) -> int:
        """The classes this version answers with."""
        return len(self.names)

    @property
    def label(self) -> str:
        """The version as the protocols write it (a decimal string, as Triton's)."""
        return str(self.version)


@dataclass(eq=False)
class ModelEntry:
    """A model name's place in the repository: the version serving, the one loading (its number) and
    the last failed load (its number and why), until a load succeeds."""

    name: str
    serving: ModelVersion
    loading: int | None = None
    failure: tuple[int, str] | None = None

    def index(self, ready: bool) -> list[dict[str, Any]]:
        """Its rows of Triton's ``POST /v2/repository/index``: name, version, state, reason."""
        rows = [{"name": self.name, "version": self.serving.label, "state": "READY" if ready else "LOADING"}]
        if self.loading is not None:
            rows.append({"name": self.name, "version": str(self.loading), "state": "LOADING"})
        elif self.failure is not None:
            number, why = self.failure
            rows.append({"name": self.name, "version": str(number), "state": "UNAVAILABLE", "reason": why})
        return rows


def naming(path: str, error: BaseException) -> str:
    """``error``'s first line, with ``path`` in front unless it names it already."""
    from ..utils import first_line

    line = first_line(error)
    return line if path in line else f"{path}: {line}"


def read_checkpoint(path: str, like: nn.Module) -> nn.Module:
    """The model in the checkpoint at ``path``, a new version of ``like``: a levit-format file names its
    own variant, any other format (official, timm, Hugging Face) is read as ``like``'s variant; the
    input size is ``like``'s. Raises :class:`LoadError` with the reason in one line."""
    import os

    from ..factory.create import create_model
    from ..weights.format import read_metadata

    if not os.path.isfile(path):
        raise LoadError(f"no such checkpoint file: {path}")
    try:
        meta = read_metadata(path)
        name = meta["variant"] if meta else like.config.name
        model = create_model(name, checkpoint=path, img_size=like.config.img_size)
    except Exception as e:  # any reason a file does not load is the answer's reason
        raise LoadError(naming(path, e)) from None
    return model.eval()


def read_named(name: str, path: str) -> nn.Module:
    """The model served as ``name`` from the checkpoint at ``path`` (``--model NAME=CHECKPOINT``): a
    levit-format file names its variant; another format is read as the variant ``name`` (which must then
    be one). Raises :class:`LoadError` with the reason in one line."""
    import os

    from ..factory.create import create_model
    from ..models.config import list_models
    from ..weights.format import read_metadata

    if not os.path.isfile(path):
        raise LoadError(f"no such checkpoint file: {path}")
    try:
        meta = read_metadata(path)
    except Exception as e:
        raise LoadError(naming(path, e)) from None
    variant = meta["variant"] if meta else name.lower().replace("-", "_")
    if variant not in list_models():
        raise LoadError(
            f"{path} is not a levit-format file: name the model after its variant ({list_models()[0]}=FILE)"
        )
    try:
        return create_model(variant, checkpoint=path).eval()
    except Exception as e:
        raise LoadError(naming(path, e)) from None
