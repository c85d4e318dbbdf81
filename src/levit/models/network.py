"""The LeViT network, written once: :func:`levit.fuse` turns it into its inference form by swapping
each layer for its own (:mod:`levit.models.layers`), never by building a second copy of the skeleton."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.fx._symbolic_trace as _fx
import torch.nn.functional as F
from torch import Tensor, nn

from .config import DEFAULT_CROP_PCT, IMAGENET_MEAN, IMAGENET_STD, PATCH_SIZE, LeViTConfig, check_crop_pct
from .layers import MLP, Attention, AttentionSwitches, BNLinear, DropPath, ShrinkAttention, Stem

__all__ = [
    "PREPROCESS_KEYS",
    "FeatureInfo",
    "LeViT",
    "LeViTBlock",
    "LeViTFeatures",
    "LeViTStage",
    "ShrinkBlock",
    "check_input",
    "checked_preprocess",
    "default_preprocess",
]


@torch.fx.wrap
def pos_embed_for(pos: Tensor, build: tuple[int, int], h: int, w: int) -> Tensor:
    """The (1, h*w, C) absolute position embedding (Table 5, A5) for an (h, w) token grid: the
    learned one at the build grid, else resampled bicubically as an image (corners aligned, like the
    bias tables). A leaf for ``torch.fx`` (Python control flow on the input's shape)."""
    h, w = int(h), int(w)
    if (h, w) == tuple(build):
        return pos
    grid = pos.reshape(1, build[0], build[1], -1).permute(0, 3, 1, 2)
    out = F.interpolate(grid.float(), size=(h, w), mode="bicubic", align_corners=True).to(pos.dtype)
    return out.flatten(2).transpose(1, 2)


class LeViTBlock(nn.Module):
    """One attention + MLP pair, both residual."""

    def __init__(self, cfg: LeViTConfig, stage: int, drop_path: float) -> None:
        super().__init__()
        dim, r = cfg.embed_dim[stage], cfg.grid_sizes[stage]
        self.attn = Attention(dim, cfg.key_dim, cfg.num_heads[stage], cfg.attn_ratio, r, _attn_switches(cfg))
        self.mlp = MLP(dim, int(dim * cfg.mlp_ratio), norm=cfg.norm)
        self.drop_path = DropPath(drop_path)
        self.norm1, self.norm2 = _prenorm(cfg, dim), _prenorm(cfg, dim)

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None) -> Tensor:
        if self.training and self.drop_path.p > 0:  # stochastic depth drops a branch before the residual add
            x = x + self.drop_path(self.attn(self.norm1(x), hw))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        x = self.attn(self.norm1(x), hw, residual=x)  # the inference form adds it in the projection's GEMM
        return self.mlp(self.norm2(x), residual=x)


def _attn_switches(cfg: LeViTConfig) -> AttentionSwitches:
    """The Table 5 switches of the attention layers (all on for LeViT itself)."""
    return AttentionSwitches(norm=cfg.norm, use_bias=cfg.pos == "bias", act=cfg.attn_act)


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
            cfg.grid_sizes[stage - 1],
            _attn_switches(cfg),
        )
        self.mlp = MLP(c_out, int(c_out * cfg.down_mlp_ratio), norm=cfg.norm)
        self.drop_path = DropPath(drop_path)
        self.norm1, self.norm2 = _prenorm(cfg, c_in), _prenorm(cfg, c_out)

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None) -> Tensor:
        x = self.attn(self.norm1(x), hw)
        if self.training and self.drop_path.p > 0:
            return x + self.drop_path(self.mlp(self.norm2(x)))
        return self.mlp(self.norm2(x), residual=x)


class LeViTStage(nn.Module):
    """A shrink block (except in the first stage) and ``depth`` LeViT blocks at one resolution."""

    def __init__(self, cfg: LeViTConfig, stage: int, drop_path: float) -> None:
        super().__init__()
        self.downsample = ShrinkBlock(cfg, stage, drop_path) if stage > 0 else nn.Identity()
        self.blocks = nn.Sequential(*[LeViTBlock(cfg, stage, drop_path) for _ in range(cfg.depth[stage])])

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None) -> tuple[Tensor, tuple[int, int]]:
        """(B, h*w, C) tokens on the (h, w) grid -> (tokens, grid) after this stage."""
        if hw is None:  # the build grid of this stage's input
            first = self.blocks[0] if isinstance(self.downsample, nn.Identity) else self.downsample
            hw = first.attn.resolution
        if not isinstance(self.downsample, nn.Identity):
            x = self.downsample(x, hw)
            hw = LeViTConfig.subsampled_grid(hw)
        for block in self.blocks:
            x = block(x, hw)
        return x, hw


def _symbolic_tracing() -> bool:
    """Whether ``torch.fx.symbolic_trace`` is running (shapes are proxies: no checks possible)."""
    probe = getattr(_fx, "is_fx_symbolic_tracing", None) or _fx.is_fx_tracing  # the former: torch >= 2.5
    return probe()


def check_input(x: Tensor, cfg: LeViTConfig, any_size: bool = False) -> None:
    """Raise a clear error when ``x`` is not a (B, in_chans, H, W) batch of the build size
    (``any_size``: any H, W >= :data:`~levit.models.config.PATCH_SIZE`, as a backbone takes). Skipped
    while ``torch.fx`` traces."""
    if _symbolic_tracing():
        return
    H, W = cfg.img_hw
    ok = x.ndim == 4 and x.shape[1] == cfg.in_chans
    if ok and any_size:
        ok = x.shape[2] >= PATCH_SIZE and x.shape[3] >= PATCH_SIZE
    elif ok:
        ok = x.shape[2] == H and x.shape[3] == W
    if not ok:
        want = f"H, W (each >= {PATCH_SIZE})" if any_size else f"{H}, {W}"
        raise ValueError(
            f"{cfg.name} expects input of shape (B, {cfg.in_chans}, {want}), got {tuple(x.shape)}; "
            "build the model with img_size=... for another resolution (forward_features and "
            "forward_intermediates take other sizes)"
        )


class FeatureInfo:
    """Channels and stride of each stage's output, timm's ``feature_info`` interface.

    ``channels()`` / ``reduction()`` / ``module_name()`` give the values for the selected
    ``out_indices`` (or one index); ``get_dicts()`` the raw ``{"num_chs", "reduction", "module"}`` rows.
    """

    def __init__(self, info: list[dict], out_indices: Sequence[int]) -> None:
        self.info = [dict(d) for d in info]
        self.out_indices = tuple(out_indices)

    def _get(self, key: str, idx: int | None) -> list | object:
        if idx is None:
            return [self.info[i][key] for i in self.out_indices]
        return self.info[self.out_indices[idx]][key]

    def channels(self, idx: int | None = None) -> list[int] | int:
        """Output channels per selected stage (or of the ``idx``-th selected one)."""
        return self._get("num_chs", idx)

    def reduction(self, idx: int | None = None) -> list[int] | int:
        """Stride relative to the input per selected stage (16, 32, 64 for three stages)."""
        return self._get("reduction", idx)

    def module_name(self, idx: int | None = None) -> list[str] | str:
        """Module path of each selected stage."""
        return self._get("module", idx)

    def get_dicts(self) -> list[dict]:
        """The rows of the selected stages."""
        return [dict(self.info[i]) for i in self.out_indices]

    def __len__(self) -> int:
        return len(self.out_indices)

    def __getitem__(self, i: int) -> dict:
        return self.info[self.out_indices[i]]


def stage_feature_info(cfg: LeViTConfig) -> list[dict]:
    """timm-style rows: channels, stride (16, then x2 per shrink attention) and module of each stage."""
    return [
        {"num_chs": c, "reduction": PATCH_SIZE * 2**s, "module": f"stages.{s}"} for s, c in enumerate(cfg.embed_dim)
    ]


def resolve_indices(indices: int | Sequence[int] | None, num_stages: int) -> list[int]:
    """timm's convention: an int n selects the last n stages, a sequence selects those (negative ok)."""
    if indices is None:
        return list(range(num_stages))
    if isinstance(indices, int):
        if not 0 < indices <= num_stages:
            raise ValueError(f"indices={indices}: need 1..{num_stages} (the last n stages)")
        return list(range(num_stages - indices, num_stages))
    out = []
    for i in indices:
        j = i + num_stages if i < 0 else i
        if not 0 <= j < num_stages:
            raise ValueError(f"stage index {i} out of range for {num_stages} stages (0..{num_stages - 1})")
        out.append(j)
    if not out:
        raise ValueError("indices selects no stage")
    return sorted(set(out))


def to_nchw(x: Tensor, hw: tuple[int, int]) -> Tensor:
    """(B, h*w, C) tokens -> (B, C, h, w) map."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], hw[0], hw[1])


#: the preprocessing a model carries (``model.pretrained_cfg``), saved with its weights by :func:`levit.save`
PREPROCESS_KEYS = ("crop_pct", "crop_mode", "interpolation", "mean", "std")


def default_preprocess() -> dict:
    """The released weights' evaluation (the authors', as DeiT's): resize to img_size / DEFAULT_CROP_PCT
    bicubically, centre crop, ImageNet mean/std."""
    return {
        "crop_pct": DEFAULT_CROP_PCT,
        "crop_mode": "center",
        "interpolation": "bicubic",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
    }


def checked_preprocess(cfg: Mapping) -> dict:
    """The preprocessing keys (:data:`PREPROCESS_KEYS`) of a ``pretrained_cfg``, checked and as plain
    values: ``crop_pct`` in (0, 1], ``mean`` and ``std`` three numbers each (``std`` > 0), the
    interpolation and crop mode strings. A ``ValueError`` names the first bad key. The dict itself can
    be edited in place at any time, so this runs where it is written to or read from a file."""
    out = {k: cfg[k] for k in PREPROCESS_KEYS if k in cfg}
    if "crop_pct" in out:
        out["crop_pct"] = check_crop_pct(out["crop_pct"])
    for k in ("mean", "std"):
        if k not in out:
            continue
        v = out[k]
        if isinstance(v, str | bytes) or not isinstance(v, Sequence) or len(v) != 3:
            raise ValueError(f"{k} must be three numbers (R, G, B), got {v!r}")
        out[k] = tuple(float(x) for x in v)
        if k == "std" and min(out[k]) <= 0:
            raise ValueError(f"std must be > 0, got {v!r}")
    for k in ("interpolation", "crop_mode"):
        if k in out and not isinstance(out[k], str):
            raise ValueError(f"{k} must be a string, got {out[k]!r}")
    return out


class LeViT(nn.Module):
    """LeViT image classifier (Graham et al., ICCV 2021).

    Built in its trainable form; :func:`levit.fuse` returns its inference form, the same skeleton with
    each layer swapped for its own (:class:`~levit.models.fuse.FusedLeViT`, ``is_fused`` True).
    ``forward`` returns logits of shape (B, num_classes). With ``cfg.distillation`` the model has two
    heads; after :meth:`set_distilled_training` (True) and in training mode it returns the pair
    ``(head, head_dist)``, otherwise their average (the inference form merges them into one).

    ``class_names`` (one label per output, or ``None``) and the preprocessing in ``pretrained_cfg``
    travel with the model: :func:`levit.fuse` copies them, :func:`levit.save` writes them and loading
    a levit file restores them.
    """

    is_fused = False
    class_names: list[str] | None

    def __init__(self, cfg: LeViTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.class_names = None
        self.pretrained_cfg: dict = default_preprocess()  # + the keys that follow from the model, below
        ch = cfg.stem_channels  # in_chans -> C/8 -> C/4 -> C/2 -> C (A2: in_chans -> C)
        self.stem = Stem(ch, patch16=cfg.stem == "linear16", norm=cfg.norm)
        self.pos_embed: nn.Parameter | None = None
        if cfg.pos == "embed":  # Table 5, A5: absolute position embedding added to the input tokens
            h, w = cfg.grid_sizes[0]
            self.pos_embed = nn.Parameter(torch.zeros(1, h * w, ch[-1]))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.stages = nn.ModuleList([LeViTStage(cfg, s, cfg.drop_path_rate) for s in range(cfg.num_stages)])
        nf, nc = cfg.num_features, cfg.num_classes
        self.head = BNLinear(nf, nc, norm=cfg.norm) if nc > 0 else nn.Identity()
        self.head_dist = (BNLinear(nf, nc, norm=cfg.norm) if nc > 0 else nn.Identity()) if cfg.distillation else None
        self.distilled_training = False
        self.sync_pretrained_cfg()

    # ---- timm's model attributes ----------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Number of output classes (0: the model returns pooled features)."""
        return self.config.num_classes

    @property
    def num_features(self) -> int:
        """Width of the pooled features (timm's ``num_features``)."""
        return self.config.num_features

    @property
    def head_hidden_size(self) -> int:
        """Width of the classifier's input (timm's ``head_hidden_size``; no pre-logits layer here)."""
        return self.config.num_features

    @property
    def in_chans(self) -> int:
        """Input channels."""
        return self.config.in_chans

    @property
    def default_cfg(self) -> dict:
        """timm's older name of :attr:`pretrained_cfg`: the very same dict."""
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, value: dict) -> None:
        self.pretrained_cfg = value

    def sync_pretrained_cfg(self) -> dict:
        """Rewrite, in place, the keys of :attr:`pretrained_cfg` that follow from the model: input
        size, classes, the first convolution and the classifier layers (timm's ``first_conv`` and
        ``classifier``: the layers whose ``.weight`` and ``.bias`` timm's ``load_pretrained`` adapts
        or drops). Run whenever the model changes form or head; the preprocessing and every other
        key stay as the user set them. Returns the dict.

        ``pretrained_cfg`` is a plain dict attribute, as in timm: edit it in place
        (``model.pretrained_cfg["crop_pct"] = 1.0``); :func:`levit.fuse`, :func:`levit.save` and
        loading keep the edits, and every preprocessing is built from it.
        """
        cfg = self.config
        linear_head = self.is_fused and cfg.norm == "bn"  # the fused BatchNorm head is one nn.Linear
        heads = ["head"] if self.head_dist is None else ["head", "head_dist"]
        names = tuple(h if linear_head else f"{h}.linear" for h in heads)
        if not isinstance(self.__dict__.get("pretrained_cfg"), dict):
            self.pretrained_cfg = default_preprocess()
        self.pretrained_cfg.update(
            architecture=cfg.name,
            input_size=(cfg.in_chans, *cfg.img_hw),
            fixed_input_size=True,
            num_classes=cfg.num_classes,
            pool_size=None,
            first_conv="stem.0" if self.is_fused else "stem.0.conv",
            classifier=names[0] if len(names) == 1 else names,
        )
        return self.pretrained_cfg

    # ---- training switches -----------------------------------------------------------------------
    def set_distilled_training(self, enable: bool = True) -> None:
        """Return ``(head, head_dist)`` in training mode instead of their average."""
        if enable and self.head_dist is None:
            raise ValueError("this model has one head, no distillation head (built with distillation=False, or fused)")
        self.distilled_training = enable

    def no_weight_decay(self) -> set[str]:
        """Parameter names that take no weight decay (attention bias tables)."""
        return {n for n, _ in self.named_parameters() if n.endswith("attention_biases") or n == "pos_embed"}

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's parameter grouping, first to last (layer-wise lr decay in ``timm.optim``): the stem,
        then each stage (``coarse``) or each of its blocks in order, its shrinking block first; the
        heads match nothing, which puts them last."""
        if coarse:
            return {"stem": r"^stem|^pos_embed", "blocks": r"^stages\.(\d+)"}
        blocks = [(r"^stages\.(\d+)\.downsample", (-1,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None)]
        return {"stem": r"^stem|^pos_embed", "blocks": blocks}

    # ---- the token flow --------------------------------------------------------------------------
    def _tokens(self, x: Tensor, upto: int | None = None) -> list[tuple[Tensor, tuple[int, int]]]:
        """Stem + stages (through ``upto``): [(tokens, grid)] after each stage. Every layer gets the
        grid of its input: at the build size the biases are the learned (or fused) ones, at another
        size they are resampled (:func:`levit.models.layers.grid_bias`, for both forms)."""
        x = self.stem(x)  # (B, C, h, w)
        hw = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C)
        if self.pos_embed is not None:
            x = x + pos_embed_for(self.pos_embed, self.config.grid_sizes[0], hw[0], hw[1])
        out = []
        for s, stage in enumerate(self.stages):
            if upto is not None and s > upto:
                break
            x, hw = stage(x, hw)
            out.append((x, hw))
        return out

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) images -> (B, N, C) tokens of the last stage (any H, W >= 16)."""
        check_input(x, self.config, any_size=True)
        return self._tokens(x)[-1][0]

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
        check_input(x, self.config)
        return self.forward_head(self._tokens(x)[-1][0])

    # ---- classifier access -------------------------------------------------------------------------
    def get_classifier(self) -> nn.Module:
        """The classifier head (a (head, head_dist) pair as a ModuleList when there are two)."""
        if self.head_dist is None:
            return self.head
        return nn.ModuleList([self.head, self.head_dist])

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head(s) with freshly initialised ones for ``num_classes`` classes (0: pooled
        features), on the model's device, in its dtype and its mode (train or eval), in the model's
        form (fused: one folded head). ``global_pool`` is accepted for timm compatibility; only
        ``"avg"`` exists."""
        if global_pool not in (None, "avg"):
            raise ValueError(f"global_pool={global_pool!r}: LeViT pools by averaging tokens ('avg')")
        self.config = self.config.replace(num_classes=num_classes)
        self.class_names = None  # the old labels do not name the new outputs
        p = next(self.parameters())

        def new_head() -> nn.Module:
            if num_classes <= 0:
                return nn.Identity()
            head = BNLinear(self.num_features, num_classes, norm=self.config.norm).to(device=p.device, dtype=p.dtype)
            return (head.fused() if self.is_fused else head).train(self.training)

        self.head = new_head()
        if self.head_dist is not None:
            self.head_dist = new_head()
        self.sync_pretrained_cfg()

    # ---- timm's feature API ----------------------------------------------------------------------
    @property
    def feature_info(self) -> list[dict]:
        """Channels, stride and module of each stage's output (timm's ``model.feature_info``)."""
        return stage_feature_info(self.config)

    def feature_maps(self, x: Tensor) -> list[Tensor]:
        """The output of every stage as (B, C_s, h_s, w_s) maps, e.g. for a detection backbone."""
        return self.forward_intermediates(x, intermediates_only=True)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm's feature API: the stages ``indices`` (an int n: the last n; default all) as NCHW maps.

        Returns ``(last-stage tokens (B, N, C), maps)``, or only the maps with ``intermediates_only``.
        ``stop_early`` skips the stages after the last one asked for. Any input size >= 16 works.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt={output_fmt!r}: only 'NCHW' is supported")
        check_input(x, self.config, any_size=True)
        take = resolve_indices(indices, len(self.stages))
        upto = max(take) if (stop_early or intermediates_only) else None
        outs = self._tokens(x, upto)
        maps = [to_nchw(*outs[i]) for i in take]
        return maps if intermediates_only else (outs[-1][0], maps)

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] | None = None, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last of ``indices`` (and the heads): what a backbone keeps."""
        take = resolve_indices(indices, len(self.stages))
        self.stages = self.stages[: max(take) + 1]
        if prune_head:
            self.reset_classifier(0)
        return take


class LeViTFeatures(nn.Module):
    """``create_model(..., features_only=True)``: a model that returns the NCHW map of each stage
    in ``out_indices`` (a list), with timm's :class:`FeatureInfo` in ``feature_info``.

    Wraps a :class:`LeViT`, fused or not (as ``self.model``, like timm's feature wrapper for LeViT),
    whose unused stages and heads are removed; :func:`levit.fuse` fuses it like any other model.
    """

    def __init__(self, model: nn.Module, out_indices: int | Sequence[int] | None = None) -> None:
        super().__init__()
        info = model.feature_info
        self.out_indices = tuple(model.prune_intermediate_layers(out_indices, prune_head=True))
        self.model = model
        self.feature_info = FeatureInfo(info, self.out_indices)

    @property
    def config(self) -> LeViTConfig:
        return self.model.config

    @property
    def is_fused(self) -> bool:
        """Whether the wrapped model is in its inference form."""
        return self.model.is_fused

    @property
    def pretrained_cfg(self) -> dict:
        """The wrapped model's ``pretrained_cfg`` (the same dict: edits in place reach the model)."""
        return self.model.pretrained_cfg

    @pretrained_cfg.setter
    def pretrained_cfg(self, value: dict) -> None:
        self.model.pretrained_cfg = value

    @property
    def default_cfg(self) -> dict:
        """timm's older name of :attr:`pretrained_cfg`: the very same dict."""
        return self.model.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, value: dict) -> None:
        self.model.pretrained_cfg = value

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.model.forward_intermediates(x, indices=list(self.out_indices), intermediates_only=True)
