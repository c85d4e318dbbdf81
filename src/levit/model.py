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
        self.attn = Attention(dim, cfg.key_dim, cfg.num_heads[stage], cfg.attn_ratio, r, **_attn_switches(cfg))
        self.mlp = MLP(dim, int(dim * cfg.mlp_ratio), norm=cfg.norm)
        self.drop_path = DropPath(drop_path)
        self.norm1, self.norm2 = _prenorm(cfg, dim), _prenorm(cfg, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def _attn_switches(cfg: LeViTConfig) -> dict:
    """The Table 5 switches of the attention layers (all on for LeViT itself)."""
    return dict(norm=cfg.norm, use_bias=cfg.pos == "bias", act=cfg.attn_act)


def _prenorm(cfg: LeViTConfig, dim: int) -> nn.Module:
    """Pre-norm LayerNorm of a block in ablation A3 (no BatchNorm); an identity in LeViT."""
    return nn.LayerNorm(dim) if cfg.norm == "ln" else nn.Identity()


class ShrinkBlock(nn.Module):
    """Shrink attention (stage s-1 -> s, not residual) followed by a residual MLP."""

    def __init__(self, cfg: LeViTConfig, stage: int, drop_path: float) -> None:
        super().__init__()
        c_in, c_out = cfg.embed_dim[stage - 1], cfg.embed_dim[stage]
        self.attn = ShrinkAttention(
            c_in,
            c_out,
            cfg.shrink_key_dim,
            cfg.shrink_heads[stage - 1],
            cfg.down_attn_ratio,
            cfg.resolutions[stage - 1],
            **_attn_switches(cfg),
        )
        self.mlp = MLP(c_out, int(c_out * cfg.down_mlp_ratio), norm=cfg.norm)
        self.drop_path = DropPath(drop_path)
        self.norm1, self.norm2 = _prenorm(cfg, c_in), _prenorm(cfg, c_out)

    def forward(self, x: Tensor) -> Tensor:
        x = self.attn(self.norm1(x))
        return x + self.drop_path(self.mlp(self.norm2(x)))


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
    """

    def __init__(self, cfg: LeViTConfig) -> None:
        super().__init__()
        self.config = cfg
        c = cfg.embed_dim[0]
        if cfg.stem == "linear16":  # Table 5, A2: one 16x16 stride-16 convolution (ViT's patch embedding)
            self.stem = nn.Sequential(ConvBN(cfg.in_chans, c, 16, 16, 0, norm=cfg.norm))
        else:
            self.stem = nn.Sequential(
                ConvBN(cfg.in_chans, c // 8, norm=cfg.norm),
                nn.Hardswish(),
                ConvBN(c // 8, c // 4, norm=cfg.norm),
                nn.Hardswish(),
                ConvBN(c // 4, c // 2, norm=cfg.norm),
                nn.Hardswish(),
                ConvBN(c // 2, c, norm=cfg.norm),
            )
        self.pos_embed: nn.Parameter | None = None
        if cfg.pos == "embed":  # Table 5, A5: absolute position embedding added to the input tokens
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.resolutions[0] ** 2, c))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.stages = nn.ModuleList([LeViTStage(cfg, s, cfg.drop_path_rate) for s in range(cfg.num_stages)])
        nf, nc = cfg.num_features, cfg.num_classes
        self.head = BNLinear(nf, nc, norm=cfg.norm) if nc > 0 else nn.Identity()
        self.head_dist = (BNLinear(nf, nc, norm=cfg.norm) if nc > 0 else nn.Identity()) if cfg.distillation else None
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
        return {n for n, _ in self.named_parameters() if n.endswith("attention_biases") or n == "pos_embed"}

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) images -> (B, N, C) tokens of the last stage."""
        check_input(x, self.config)
        x = self.stem(x).flatten(2).transpose(1, 2)  # (B, C, r, r) -> (B, r*r, C)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for stage in self.stages:
            x = stage(x)
        return x

    def feature_maps(self, x: Tensor) -> list[Tensor]:
        """The output of every stage as (B, C_s, r_s, r_s) maps, e.g. for a detection backbone."""
        check_input(x, self.config)
        x = self.stem(x).flatten(2).transpose(1, 2)
        if self.pos_embed is not None:
            x = x + self.pos_embed
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
        nf = self.config.num_features
        device = next(self.parameters()).device
        norm = self.config.norm
        self.head = (BNLinear(nf, num_classes, norm=norm) if num_classes > 0 else nn.Identity()).to(device)
        if self.head_dist is not None:
            self.head_dist = (BNLinear(nf, num_classes, norm=norm) if num_classes > 0 else nn.Identity()).to(device)
