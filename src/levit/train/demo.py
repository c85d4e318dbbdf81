"""The demo model ``levit serve`` runs when no model is named: ``levit_tiny`` trained on the bundled
handwritten digits (``configs/digits.yaml``, shortened to :data:`DIGITS_EPOCHS` epochs), so the server
has a model whose answers mean something without a download.

It is trained once, on first use, and cached in the user's cache folder (:func:`digits_model_path`);
later calls read the file. The training is the ordinary recipe run (:func:`levit.train.run.train`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from torch import nn

__all__ = ["DIGITS_EPOCHS", "DIGITS_MODEL_NAME", "digits_model", "digits_model_path"]

# fewer epochs than the recipe's: the demo only has to answer sensibly, and it trains before serving
DIGITS_EPOCHS = 8
#: the name the demo model is served under
DIGITS_MODEL_NAME = "levit_tiny_digits"


def digits_model_path() -> Path:
    """Where the demo model is cached: ``$XDG_CACHE_HOME/levit/serve/`` (default ``~/.cache``); the
    file name carries the epoch count, so a changed recipe never reads an old file."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "levit" / "serve" / f"levit_tiny_digits_{DIGITS_EPOCHS}ep.safetensors"


def digits_model(path: str | os.PathLike | None = None, *, on_note: Callable[[str], None] | None = None) -> nn.Module:
    """The demo model from ``path`` (default :func:`digits_model_path`), trained and written there
    first if the file is missing (written atomically: an interrupted training leaves no file).

    ``on_note`` gets one line before a training starts (it takes a while). The model carries the
    preprocessing its training validated with (the recipe's ``eval_crop_pct``), so every entry point
    that builds :meth:`levit.data.preprocess.Preprocess.from_model` sees images as it was trained to."""
    from ..factory.create import create_model

    path = Path(path) if path is not None else digits_model_path()
    if not path.is_file():
        if on_note is not None:
            on_note(
                f"training the demo model once (levit_tiny on the bundled digits, {DIGITS_EPOCHS} epochs, "
                f"on the CPU; docs/serving.md says how long), cached as {path}"
            )
        _train_to(path)
    return create_model("levit_tiny", checkpoint=path)


def _train_to(path: Path) -> None:
    """Run the shortened digits recipe in a temporary folder and write its model to ``path``. The
    recipe sets torch's thread count for its run; the caller's count is put back after."""
    import torch

    from ..utils import atomic_path
    from ..weights.format import save
    from . import run
    from .recipe import resolve_config

    path.parent.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    try:
        with tempfile.TemporaryDirectory(prefix="levit-digits-") as tmp:
            cfg = resolve_config(config="digits", output=str(Path(tmp) / "run"), epochs=DIGITS_EPOCHS)
            model = run.train(cfg).model
    finally:
        torch.set_num_threads(threads)
    with atomic_path(path) as out:
        save(model, out)
