"""``create_model``: a network from its name, with weights loaded (the name lookup lives in
:mod:`levit.models.config`; it is re-exported here)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..models.config import VARIANTS, LeViTConfig, canonical_name, get_config, list_models

if TYPE_CHECKING:  # torch is imported when a model is built, not when names are listed
    from torch import nn

__all__ = ["build_model", "canonical_name", "create_model", "get_config", "list_models"]  # names re-exported


def create_model(
    name: str,
    *,
    num_classes: int | None = None,
    distillation: bool | None = None,
    img_size: int | tuple[int, int] | None = None,
    drop_path_rate: float | None = None,
    checkpoint: str | os.PathLike | None = None,
    pretrained: bool = False,
    features_only: bool = False,
    out_indices: int | Sequence[int] | None = None,
    ablation: str | None = None,
    **overrides: object,
) -> nn.Module:
    """Build a LeViT model, optionally loading weights.

    Args:
        name: a name from :func:`list_models` or an official spelling (``LeViT_256``).
        num_classes: classifier outputs (default 1000, or a levit checkpoint's); 0 returns pooled features.
        distillation: build the second (distillation) head, as the released models have (default True).
        img_size: input side or (H, W), each a multiple of 16 (default 224); attention-bias tables of a
            checkpoint made at another size (e.g. the released 224 weights) are resampled onto the new grid.
        drop_path_rate: stochastic depth rate; ``None`` keeps the variant's (0.1 for LeViT-384).
        checkpoint: an official release file, a timm LeViT state dict (``.pth`` or ``.safetensors``), a
            Hugging Face transformers LeViT file or ``save_pretrained`` folder, or a file written by
            :func:`levit.save`. Loaded strictly; a fused checkpoint gives a fused model.
        pretrained: download the authors' released weights (cached, hash-checked).
        features_only: return a feature extractor (timm's convention) whose forward gives a list of
            (B, C_s, H/stride_s, W/stride_s) maps, with ``feature_info.channels()`` / ``.reduction()``.
        out_indices: the stages it returns (default all: strides 16, 32, 64); an int n: the last n.
        ablation: ``"A1"``..``"A7"`` builds the paper's Table 5 variant (see :data:`levit.models.config.ABLATIONS`).
        **overrides: any other :class:`~levit.models.config.LeViTConfig` field (``in_chans``, ``key_dim``, ...).

    Example:
        >>> model = create_model("levit_128s", checkpoint="LeViT-128S-96703c44.pth").eval()
    """
    if checkpoint is not None and pretrained:
        raise ValueError("give either checkpoint=... or pretrained=True, not both")
    given = dict(num_classes=num_classes, distillation=distillation, img_size=img_size, drop_path_rate=drop_path_rate)
    changes = {k: v for k, v in given.items() if v is not None} | overrides
    name = canonical_name(name)  # the one place a user's spelling becomes a variant name
    if ablation is not None:
        changes["ablation"] = ablation
    cfg = get_config(name, **changes)  # validates every key (and the ablation) before any file is read
    if pretrained:
        from ..weights.hub import download_pretrained

        checkpoint = download_pretrained(name)
    if out_indices is not None and not features_only:
        raise ValueError("out_indices=... needs features_only=True")
    if checkpoint is None:
        model = build_model(cfg)
    else:
        from ..weights.format import checkpoint_config, load_into, open_checkpoint

        ck = open_checkpoint(checkpoint)
        model = load_into(build_model(checkpoint_config(ck, VARIANTS[name], changes), fused=ck.fused), ck)
    if features_only:
        from ..models.network import LeViTFeatures

        return LeViTFeatures(model, out_indices)
    return model


def build_model(cfg: LeViTConfig, *, fused: bool = False) -> nn.Module:
    """A :class:`~levit.models.network.LeViT` (or, with ``fused``, a :class:`~levit.models.fuse.FusedLeViT` with
    placeholder weights, to load a fused file into) for ``cfg``, freshly initialised."""
    if fused:
        from ..models.fuse import FusedLeViT

        return FusedLeViT(cfg)
    from ..models.network import LeViT

    return LeViT(cfg)
