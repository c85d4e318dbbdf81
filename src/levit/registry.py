"""Model names, aliases and the ``create_model`` entry point."""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path

from torch import nn

from .config import VARIANTS, LeViTConfig

__all__ = ["canonical_name", "create_model", "get_config", "list_models"]


def canonical_name(name: str) -> str:
    """``LeViT_128S``, ``levit-128s``, ``LeViT-128S`` ... -> ``levit_128s``; unknown names list the valid ones."""
    key = re.sub(r"[-\s]", "_", name.strip()).lower()
    if key in VARIANTS:
        return key
    raise ValueError(
        f"unknown model {name!r}; valid names: {', '.join(VARIANTS)} (official spellings like LeViT_128S work too)"
    )


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern`` (e.g. ``"levit_1*"``)."""
    return [n for n in VARIANTS if fnmatch.fnmatch(n, pattern.lower())]


def get_config(name: str, **overrides: object) -> LeViTConfig:
    """The config of a registered variant with ``overrides`` applied (unknown keys are an error).

    ``ablation="A1".."A7"`` first turns the variant into the paper's Table 5 row, then the other
    overrides apply."""
    from .config import ablation_config

    ablation = overrides.pop("ablation", None)
    return ablation_config(VARIANTS[canonical_name(name)], ablation).replace(**overrides)


def create_model(
    name: str,
    *,
    num_classes: int | None = None,
    distillation: bool | None = None,
    img_size: int | None = None,
    drop_path_rate: float | None = None,
    checkpoint: str | os.PathLike | None = None,
    pretrained: bool = False,
    ablation: str | None = None,
    **overrides: object,
) -> nn.Module:
    """Build a LeViT model, optionally loading weights.

    Args:
        name: a name from :func:`list_models` or an official spelling (``LeViT_256``).
        num_classes: classifier outputs (default 1000, or a levit checkpoint's); 0 returns pooled features.
        distillation: build the second (distillation) head, as the released models have (default True).
        img_size: input side (default 224); attention-bias tables of a checkpoint made at another size
            are resampled.
        drop_path_rate: stochastic depth rate; ``None`` keeps the variant's (0.1 for LeViT-384).
        checkpoint: an official release file, a timm LeViT state dict (``.pth`` or ``.safetensors``), or a
            file written by :func:`levit.save`. Loaded strictly; a fused checkpoint gives a fused model.
        pretrained: download the authors' released weights (cached, hash-checked).
        ablation: ``"A1"``..``"A7"`` builds the paper's Table 5 variant (see :data:`levit.config.ABLATIONS`).
        **overrides: any other :class:`~levit.config.LeViTConfig` field (``in_chans``, ``key_dim``, ...).

    Example:
        >>> model = create_model("levit_128s", checkpoint="LeViT-128S-96703c44.pth").eval()
    """
    if checkpoint is not None and pretrained:
        raise ValueError("give either checkpoint=... or pretrained=True, not both")
    given = dict(num_classes=num_classes, distillation=distillation, img_size=img_size, drop_path_rate=drop_path_rate)
    changes = {k: v for k, v in given.items() if v is not None} | overrides
    if ablation is not None:
        changes["ablation"] = ablation
    cfg = get_config(name, **changes)  # validates the name and every key before any file is read
    if pretrained:
        from .checkpoint import download_pretrained

        checkpoint = download_pretrained(cfg.name)
    if checkpoint is not None:
        from .checkpoint import load_checkpoint

        return load_checkpoint(Path(checkpoint), cfg.name, **changes)
    from .model import LeViT

    return LeViT(cfg)
