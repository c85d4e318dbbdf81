"""The LeViT network (training form)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import LeViTConfig
from .layers import MLP, Attention, BNLinear, ConvBN, DropPath, ShrinkAttention

__all__ = ["LeViT", "LeViTBlock", "LeViTStage", "ShrinkBlock", "check_input"]


class LeViTBlock(nn.Module):
    """One attention + MLP pair, both residual."""

    def __init__(self, cfg: LeViTConfig, stage: int, drop_path: float) -> None:
        super().__init__()
        dim, r = cfg.embed_dim[stage], cfg.resolutions[stage]
        self.attn = Attention(dim, cfg.key_dim, cfg.num_heads[stage], cfg.attn_ratio, r)
        self.mlp = MLP(dim, int(dim * cfg.mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(x))
        return x + self.drop_path(self.mlp(x))


class ShrinkBlock(nn.Module):
    """Shrink attention (stage s-1 -> s, not residual) followed by a residual MLP."""

    def __init__(self, cfg: LeViTConfig, stage: int, drop_path: float) -> None:
        super().__init__()
        c_in, c_out = cfg.embed_dim[stage - 1], cfg.embed_dim[stage]
        self.attn = ShrinkAttention(
            c_in, c_out, cfg.key_dim, cfg.shrink_heads[stage - 1], cfg.down_attn_ratio, cfg.resolutions[stage - 1]
        )
        self.mlp = MLP(c_out, int(c_out * cfg.down_mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = self.attn(x)
        return x + self.drop_path(self.mlp(x))


class LeViTStage(nn.Module):
    """A shrink block (except in the first stage) and ``depth`` LeViT blocks at one resolution."""

    def __init__(self, cfg: LeViTConfig, stage: int, drop_path: float) -> None:
        super().__init__()
        self.downsample = ShrinkBlock(cfg, stage, drop_path) if stage > 0 else nn.Identity()
        self.blocks = nn.Sequential(*[LeViTBlock(cfg, stage, drop_path) for _ in range(cfg.depth[stage])])

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.downsample(x))


def check_input(x: Tensor, cfg: LeViTConfig) -> None:
    """Raise a clear error when ``x`` is not a (B, in_chans, img_size, img_size) batch."""
    if x.ndim != 4 or x.shape[1] != cfg.in_chans or x.shape[2] != cfg.img_size or x.shape[3] != cfg.img_size:
        raise ValueError(
            f"{cfg.name} expects input of shape (B, {cfg.in_chans}, {cfg.img_size}, {cfg.img_size}), "
            f"got {tuple(x.shape)}; build the model with img_size=... for another resolution"
        )


class LeViT(nn.Module):
    """LeViT image classifier (Graham et al., ICCV 2021), in its trainable, unfused form.

    ``forward`` returns logits of shape (B, num_classes). With ``cfg.distillation`` the model has
    two heads; after :meth:`set_distilled_training` (True) and in training mode it returns the pair
    ``(head, head_dist)``, otherwise their average. Use :func:`levit.fuse` for fast inference.

    ``class_names`` (one label per output, or ``None``) travels with the model: :func:`levit.fuse`
    copies it, :func:`levit.save` writes it and loading a levit file restores it.
    """

    class_names: list[str] | None

    def __init__(self, cfg: LeViTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.class_names = None
        ch = cfg.stem_channels  # in_chans -> C/8 -> C/4 -> C/2 -> C
        self.stem = nn.Sequential(
            ConvBN(ch[0], ch[1]),
            nn.Hardswish(),
            ConvBN(ch[1], ch[2]),
            nn.Hardswish(),
            ConvBN(ch[2], ch[3]),
            nn.Hardswish(),
            ConvBN(ch[3], ch[4]),
        )
        self.stages = nn.ModuleList([LeViTStage(cfg, s, cfg.drop_path_rate) for s in range(cfg.num_stages)])
        nf, nc = cfg.num_features, cfg.num_classes
        self.head = BNLinear(nf, nc) if nc > 0 else nn.Identity()
        self.head_dist = (BNLinear(nf, nc) if nc > 0 else nn.Identity()) if cfg.distillation else None
        self.distilled_training = False

    @property
    def num_classes(self) -> int:
        """Number of output classes (0: the model returns pooled features)."""
        return self.config.num_classes

    def set_distilled_training(self, enable: bool = True) -> None:
        """Return ``(head, head_dist)`` in training mode instead of their average."""
        if enable and self.head_dist is None:
            raise ValueError("this model has no distillation head (built with distillation=False)")
        self.distilled_training = enable

    def no_weight_decay(self) -> set[str]:
        """Parameter names that take no weight decay (attention bias tables)."""
        return {n for n, _ in self.named_parameters() if n.endswith("attention_biases")}

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) images -> (B, N, C) tokens of the last stage."""
        check_input(x, self.config)
        x = self.stem(x).flatten(2).transpose(1, 2)  # (B, C, r, r) -> (B, r*r, C)
        for stage in self.stages:
            x = stage(x)
        return x

    def feature_maps(self, x: Tensor) -> list[Tensor]:
        """The output of every stage as (B, C_s, r_s, r_s) maps, e.g. for a detection backbone."""
        check_input(x, self.config)
        x = self.stem(x).flatten(2).transpose(1, 2)
        out = []
        for stage, r in zip(self.stages, self.config.resolutions):
            x = stage(x)
            out.append(x.transpose(1, 2).reshape(x.shape[0], -1, r, r))
        return out

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """(B, N, C) tokens -> logits (or pooled features with ``pre_logits``)."""
        x = x.mean(1)
        if pre_logits:
            return x
        if self.head_dist is None:
            return self.head(x)
        a, b = self.head(x), self.head_dist(x)
        if self.distilled_training and self.training and not torch.jit.is_scripting():
            return a, b
        return (a + b) / 2

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head(s) with freshly initialised ones for ``num_classes`` classes."""
        self.config = self.config.replace(num_classes=num_classes)
        self.class_names = None  # the old labels do not name the new outputs
        nf = self.config.num_features
        device = next(self.parameters()).device
        self.head = (BNLinear(nf, num_classes) if num_classes > 0 else nn.Identity()).to(device)
        if self.head_dist is not None:
            self.head_dist = (BNLinear(nf, num_classes) if num_classes > 0 else nn.Identity()).to(device)
