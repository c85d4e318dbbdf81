"""A torchvision-ready detection backbone: LeViT stages (+ FPN) as an ``OrderedDict`` of maps.

``create_backbone("levit_128s", checkpoint=...)`` plugs straight into
``torchvision.models.detection.FasterRCNN(backbone, num_classes=...)`` and ``RetinaNet`` with their
default transforms, anchor generators and RoI pooling:

- any image size: the input is padded (right/bottom, zeros) to a multiple of 16 and the attention
  biases follow the token grid (resampled from the learned tables, see :func:`levit.models.layers.grid_bias`);
- LeViT's three stages have strides 16, 32 and 64 (paper, Section 4.2: a 16x16 patch
  stem, then two shrink attentions). The FPN adds two coarser levels (a stride-2 3x3 conv and a
  stride-2 subsampling, as RetinaNet's P6/P7 and torchvision's ``LastLevelMaxPool``), giving the five
  maps ``"0", "1", "2", "3", "pool"`` (strides 16 ... 256) that torchvision's default anchor
  generators (five sizes, 32 ... 512) and ``MultiScaleRoIAlign(["0", "1", "2", "3"])`` expect.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork

from ..models.config import PATCH_SIZE

__all__ = ["LeViTBackbone", "create_backbone"]

_TORCHVISION_LEVELS = 5  # maps torchvision's default anchor generators are built for


class _ExtraLevels(ExtraFPNBlock):
    """Coarser pyramid levels after the last FPN output: stride-2 3x3 convs, the last one a plain
    stride-2 subsampling (max-pool, kernel 1) named ``"pool"`` as in torchvision's FPN backbones."""

    def __init__(self, channels: int, levels: int) -> None:
        super().__init__()
        self.levels = levels
        self.convs = nn.ModuleList([nn.Conv2d(channels, channels, 3, 2, 1) for _ in range(max(levels - 1, 0))])
        for conv in self.convs:
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)

    def forward(self, p: list[Tensor], c: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        for conv in self.convs:
            p.append(conv(F.relu(p[-1]) if len(p) > len(c) else p[-1]))
            names.append(str(len(names)))
        if self.levels > 0:
            p.append(F.max_pool2d(p[-1], 1, 2, 0))
            names.append("pool")
        return p, names


class LeViTBackbone(nn.Module):
    """LeViT (or a fused LeViT) as a detection backbone; see :func:`create_backbone`.

    ``forward(images (B, 3, H, W)) -> OrderedDict[str, (B, out_channels, h, w)]``.
    """

    def __init__(
        self,
        body: nn.Module,
        out_indices: Sequence[int] = (0, 1, 2),
        fpn: bool = True,
        out_channels: int = 256,
        extra_levels: int | None = None,
        frozen_bn: bool = True,
    ) -> None:
        super().__init__()
        info = body.feature_info
        self.out_indices = tuple(body.prune_intermediate_layers(list(out_indices), prune_head=True))
        self.body = body
        self.frozen_bn = frozen_bn
        chans = [info[i]["num_chs"] for i in self.out_indices]
        self.strides = [info[i]["reduction"] for i in self.out_indices]
        if fpn:
            n = _TORCHVISION_LEVELS - len(chans) if extra_levels is None else extra_levels
            if n < 0:
                raise ValueError(f"extra_levels={extra_levels} must be >= 0")
            self.fpn = FeaturePyramidNetwork(chans, out_channels, extra_blocks=_ExtraLevels(out_channels, n))
            self.strides += [self.strides[-1] * 2**k for k in range(1, n + 1)]
            self.out_channels = out_channels
        else:
            self.fpn = None
            self.out_channels = chans[-1]
            self.strides = self.strides[-1:]
        self.train(self.training)

    def train(self, mode: bool = True) -> LeViTBackbone:
        """Train mode, except the body's BatchNorms with ``frozen_bn`` (detection batches are small:
        the ImageNet running statistics are kept, as torchvision does with ``FrozenBatchNorm2d``)."""
        super().train(mode)
        if self.frozen_bn:
            for m in self.body.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        H, W = x.shape[-2:]
        x = F.pad(x, (0, -W % PATCH_SIZE, 0, -H % PATCH_SIZE))  # (B, 3, H, W) -> multiples of 16, zeros right/bottom
        maps = self.body.forward_intermediates(x, indices=list(self.out_indices), intermediates_only=True)
        if self.fpn is None:
            return OrderedDict([("0", maps[-1])])
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))


def create_backbone(
    name: str,
    *,
    checkpoint: str | os.PathLike | None = None,
    pretrained: bool = False,
    fpn: bool = True,
    out_indices: Sequence[int] = (0, 1, 2),
    out_channels: int = 256,
    extra_levels: int | None = None,
    frozen_bn: bool = True,
    **model_kwargs: object,
) -> LeViTBackbone:
    """A detection backbone for torchvision's ``FasterRCNN`` / ``RetinaNet`` / ``MaskRCNN``.

    Args:
        name: a LeViT variant (``levit_128s`` ... ``levit_384``).
        checkpoint: ImageNet weights: an official, timm, Hugging Face or levit file (as
            :func:`levit.create_model`); ``pretrained=True`` downloads the authors' release.
        fpn: add a feature pyramid (``out_channels`` wide) with coarser extra levels up to the five
            maps (strides 16 ... 256) that torchvision's default anchors expect. Without it the module
            returns the last stage's map alone (``{"0": ...}``, stride 64): pass your own
            ``rpn_anchor_generator`` (one level) and ``box_roi_pool`` then.
        out_indices: the stages fed to the FPN (strides 16, 32, 64).
        extra_levels: pyramid levels after the last stage (default: up to five maps in all).
        frozen_bn: keep the backbone's BatchNorm statistics fixed in training.
        **model_kwargs: passed to :func:`levit.create_model` (``img_size``, ``drop_path_rate``, ...).

    Example:
        >>> from torchvision.models.detection import FasterRCNN
        >>> backbone = levit.create_backbone("levit_128s", checkpoint="LeViT-128S-96703c44.pth")
        >>> detector = FasterRCNN(backbone, num_classes=91)
    """
    from .create import create_model

    body = create_model(name, checkpoint=checkpoint, pretrained=pretrained, **model_kwargs)
    return LeViTBackbone(body, out_indices, fpn, out_channels, extra_levels, frozen_bn)
