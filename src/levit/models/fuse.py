"""LeViT's inference form: the same network with each layer swapped for its own inference form.

:func:`fuse` deep-copies a model and walks it, replacing every layer that has a ``fused()`` method
(:mod:`levit.models.layers`: BatchNorms folded in float64, q scales folded, attention biases
gathered) and merging the two distillation heads into one; the stem, stages, token flow, heads and
feature API are the network's own (:class:`~levit.models.network.LeViT`), written once. Layers
without an inference form (Table 5's A3 pre-norm LayerNorm) stay as they are, so every Table 5 row
fuses. The input model is never modified. The fused layers hold plain tensors (weights, biases and the
gathered attention-bias matrices): nothing can go stale after ``load_state_dict``, ``.to(device)``
or ``.to(dtype)``, and the kernels (:mod:`levit.models.kernels`) are chosen per call by the device.

:func:`inference_form` is the one "what runs at inference" policy that ``predict``, ``eval``,
``export``, ``deploy``, ``bench`` and ``ablate`` share.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .config import LeViTConfig
from .layers import merge_heads
from .network import LeViT, LeViTFeatures

__all__ = ["FusedLeViT", "fuse", "inference_form"]


class FusedLeViT(LeViT):
    """A :class:`~levit.models.network.LeViT` in its inference form: the same class body (nothing is
    redefined here), its layers swapped by :func:`fuse`. The subclass only lets ``isinstance`` and
    ``is_fused`` tell the forms apart.

    Constructing it from a config gives the inference form of a freshly initialised model
    (placeholder weights to load a fused checkpoint into).
    """

    is_fused = True

    def __init__(self, cfg: LeViTConfig) -> None:
        super().__init__(cfg)
        _to_inference_form(self)
        self.eval()


def _swap_layers(module: nn.Module) -> None:
    """Replace, in place, each descendant layer that has an inference form (``fused()``) by it."""
    for name, child in module.named_children():
        form = getattr(child, "fused", None)
        if callable(form):
            setattr(module, name, form())
        else:
            _swap_layers(child)


@torch.no_grad()
def _to_inference_form(model: nn.Module) -> None:
    """Fuse ``model`` in place: layers swapped, each LeViT's two heads merged into one."""
    for m in list(model.modules()):
        if isinstance(m, LeViT) and m.head_dist is not None:
            m.head = merge_heads([m.head, m.head_dist])
            m.head_dist = None
    _swap_layers(model)
    for m in model.modules():
        if isinstance(m, LeViT):
            m.__class__ = FusedLeViT
            m.sync_pretrained_cfg()  # the fused form's layer names; the user's edits stay


@torch.no_grad()
def fuse(model: nn.Module) -> nn.Module:
    """A new inference module equal to ``model.eval()``: BN folded, heads merged, biases baked in.

    Works on every LeViT (every Table 5 row: A3's LayerNorms stay as they are), on a
    ``features_only`` model and on an already fused one (returns a copy). The input model is left
    untouched (mode, weights and device); the result is in eval mode, on the model's device and in
    its dtype, with its class names and preprocessing (``pretrained_cfg``).
    """
    if not isinstance(model, LeViT | LeViTFeatures):
        raise TypeError(f"fuse() needs a levit LeViT model, got {type(model).__name__}")
    fused = copy.deepcopy(model)
    _to_inference_form(fused)
    return fused.eval()


def inference_form(model: nn.Module) -> nn.Module:
    """What to run for inference, in eval mode, as a NEW module (the input is untouched): the fused
    form of a levit model (:func:`fuse`; layers without an inference form stay as they are, so every
    model has one and no warning is needed), a copy of any other module (e.g. a timm peer in a benchmark)."""
    if isinstance(model, LeViT | LeViTFeatures):
        return fuse(model)
    return copy.deepcopy(model).eval()
