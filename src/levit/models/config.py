"""Model configurations: one frozen dataclass per LeViT variant, derived sizes included."""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from dataclasses import dataclass, field

__all__ = [
    "ABLATIONS",
    "DEFAULT_CROP_PCT",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PAPER_ABLATIONS",
    "PAPER_RESULTS",
    "PATCH_SIZE",
    "VARIANTS",
    "LeViTConfig",
    "ablation_config",
    "canonical_name",
    "get_config",
    "list_models",
]

# The preprocessing of the released weights (the authors' evaluation, as DeiT's): ImageNet mean/std,
# resize the shorter side to img_size / crop_pct (bicubic: 256 for 224), centre crop img_size.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP_PCT = 0.875


def check_crop_pct(crop_pct: object, what: str = "crop_pct") -> float:
    """``crop_pct`` as a float in (0, 1] (the evaluation resizes to ``img_size / crop_pct``, then crops
    ``img_size``); anything else is a ``ValueError`` naming ``what``."""
    if isinstance(crop_pct, bool) or not isinstance(crop_pct, int | float) or not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"{what} must be in (0, 1], got {crop_pct!r}")
    return float(crop_pct)


#: the stem's total stride: four stride-2 convolutions (Section 4.2), or the one 16x16 stride-16
#: convolution of Table 5's A2; input sides are multiples of it and stage s has stride PATCH_SIZE * 2**s
PATCH_SIZE = 16


# The Table 5 rows that only flip switches (A1 and A6 set widths: see _ABLATION_DIMS below).
_ABLATION_SWITCHES: dict[str, dict[str, object]] = {
    "A2": dict(stem="linear16"),
    "A3": dict(norm="ln"),
    "A4": {},
    "A5": dict(pos="embed"),
    "A7": dict(attn_act=False),
}


@dataclass(frozen=True)
class LeViTConfig:
    """Everything that defines a LeViT network.

    The paper's variants live in :data:`VARIANTS`; derive others with
    :meth:`replace` (unknown fields raise a ``TypeError`` listing the valid ones).
    """

    name: str
    embed_dim: tuple[int, ...]  # C per stage
    key_dim: int  # D (query/key size per head, also used by shrink attention)
    num_heads: tuple[int, ...]  # attention heads per stage
    depth: tuple[int, ...]  # (attention, MLP) pairs per stage
    drop_path_rate: float = 0.0
    attn_ratio: float = 2.0  # value size = attn_ratio * D in the stage attention
    mlp_ratio: float = 2.0  # hidden size = mlp_ratio * C
    down_attn_ratio: float = 4.0  # value size = 4 * D in shrink attention
    down_mlp_ratio: float = 2.0  # MLP after shrink attention
    num_classes: int = 1000
    distillation: bool = True
    img_size: int | tuple[int, int] = 224  # side, or (H, W); each a multiple of 16
    in_chans: int = 3
    # ---- the paper's Table 5 ablations (see ABLATIONS / ablation_config); defaults = LeViT ----
    ablation: str | None = None  # None or "A1".."A7": which Table 5 row this config is
    norm: str = "bn"  # "bn": Linear+BatchNorm everywhere; "ln": pre-norm LayerNorm, biased linears (A3)
    stem: str = "patchconv"  # "patchconv": four 3x3 stride-2 convs; "linear16": one 16x16 stride-16 conv (A2)
    pos: str = "bias"  # "bias": attention bias; "embed": absolute position embedding on the input (A5)
    attn_act: bool = True  # Hardswish before the attention projections (off in A7)
    down_key_dim: int | None = None  # shrink attention key dim (None: key_dim)
    down_heads: tuple[int, ...] | None = None  # shrink attention heads (None: C_in / key_dim)

    def __post_init__(self) -> None:
        n = len(self.embed_dim)
        if not (len(self.num_heads) == len(self.depth) == n) or n == 0:
            raise ValueError(
                f"embed_dim, num_heads and depth need one entry per stage; got {self.embed_dim}, "
                f"{self.num_heads}, {self.depth}"
            )
        if self.embed_dim[0] % 8 and self.ablation != "A1":  # A1's C=114: stem widths 114//8, //4, //2
            raise ValueError(f"embed_dim[0] must be divisible by 8 (stem), got {self.embed_dim[0]}")
        for c in self.embed_dim[:-1] if self.down_heads is None else ():
            if c % self.key_dim:
                raise ValueError(f"embed_dim {c} must be divisible by key_dim {self.key_dim} (shrink heads)")
        size = self.img_size
        if isinstance(size, list | tuple):
            if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in size):
                raise ValueError(f"img_size must be an int or (H, W), got {size!r}")
            # (S, S) is stored as S: one spelling per size (names, metadata, comparisons)
            object.__setattr__(self, "img_size", size[0] if size[0] == size[1] else tuple(size))
        elif not isinstance(size, int) or isinstance(size, bool):
            raise ValueError(f"img_size must be an int or (H, W), got {size!r}")
        if any(v < PATCH_SIZE or v % PATCH_SIZE for v in self.img_hw):
            raise ValueError(f"img_size must be a positive multiple of {PATCH_SIZE} (each side), got {self.img_size}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")
        self._check_ablation_fields()

    def _check_ablation_fields(self) -> None:
        if self.ablation is not None and self.ablation not in ABLATIONS:
            raise ValueError(f"unknown ablation {self.ablation!r}; valid: None, {', '.join(ABLATIONS)}")
        for key, valid in (("norm", ("bn", "ln")), ("stem", ("patchconv", "linear16")), ("pos", ("bias", "embed"))):
            if getattr(self, key) not in valid:
                raise ValueError(f"{key} must be one of {', '.join(valid)}; got {getattr(self, key)!r}")
        wrong = {k: v for k, v in _ABLATION_SWITCHES.get(self.ablation or "", {}).items() if getattr(self, k) != v}
        if wrong:  # e.g. replace(ablation="A3") on a BatchNorm config: the label would lie
            raise ValueError(
                f"ablation {self.ablation} needs {wrong}; build it with create_model(..., ablation=...) "
                "or levit.models.config.ablation_config"
            )
        if self.down_heads is not None and len(self.down_heads) != self.num_stages - 1:
            raise ValueError(f"down_heads needs one entry per shrink attention ({self.num_stages - 1})")

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        """Number of attention stages."""
        return len(self.embed_dim)

    @staticmethod
    def subsampled(r: int) -> int:
        """Side of a grid after one stride-2 step (a 3x3 conv with padding 1, or the shrink
        attention's every-other-token queries): ``(r - 1) // 2 + 1``, so 7 -> 4 (Section 4.2)."""
        return (r - 1) // 2 + 1

    @staticmethod
    def subsampled_grid(hw: tuple[int, int]) -> tuple[int, int]:
        """An (h, w) token grid after one stride-2 step: :meth:`subsampled` on each side."""
        return LeViTConfig.subsampled(hw[0]), LeViTConfig.subsampled(hw[1])

    @property
    def stem_channels(self) -> tuple[int, ...]:
        """Channels through the patch-embedding stem: in_chans -> C/8 -> C/4 -> C/2 -> C (four 3x3
        stride-2 convolutions, Section 4.2); in_chans -> C for the one-convolution stem of ablation A2."""
        c = self.embed_dim[0]
        if self.stem == "linear16":
            return (self.in_chans, c)
        return (self.in_chans, c // 8, c // 4, c // 2, c)

    @property
    def stem_resolutions(self) -> tuple[tuple[int, int], ...]:
        """Output (h, w) of each stem convolution: 112, 56, 28, 14 (square) at 224x224; 14 for the
        one 16x16 stride-16 convolution of ablation A2 (same token grid on multiples of 16)."""
        out, (h, w) = [], self.img_hw
        if self.stem == "linear16":
            return ((h // PATCH_SIZE, w // PATCH_SIZE),)
        for _ in range(4):
            h, w = self.subsampled_grid((h, w))
            out.append((h, w))
        return tuple(out)

    @property
    def img_hw(self) -> tuple[int, int]:
        """Input (H, W): ``img_size`` as a pair."""
        s = self.img_size
        return (s, s) if isinstance(s, int) else (s[0], s[1])

    @property
    def grid_sizes(self) -> tuple[tuple[int, int], ...]:
        """Token grid (h, w) per stage: (14, 14) -> (7, 7) -> (4, 4) at 224x224 (the stem's stride 16,
        then each shrink attention keeps every other row and column)."""
        out = [self.stem_resolutions[-1]]
        for _ in range(self.num_stages - 1):
            out.append(self.subsampled_grid(out[-1]))
        return tuple(out)

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Token grid side per stage for a square input: 14 -> 7 -> 4 at 224x224 (see :attr:`grid_sizes`)."""
        if not isinstance(self.img_size, int):
            raise ValueError(f"{self.name} is built for a non-square input {self.img_size}: use grid_sizes")
        return tuple(h for h, _ in self.grid_sizes)

    @property
    def shrink_heads(self) -> tuple[int, ...]:
        """Heads of each shrink attention (between stage s and s+1): C_s / D."""
        if self.down_heads is not None:
            return tuple(self.down_heads)
        return tuple(c // self.key_dim for c in self.embed_dim[:-1])

    @property
    def shrink_key_dim(self) -> int:
        """Query/key size per head of the shrink attentions (``key_dim`` unless an ablation sets it)."""
        return self.key_dim if self.down_key_dim is None else self.down_key_dim

    @property
    def num_features(self) -> int:
        """Width of the pooled features fed to the classifier."""
        return self.embed_dim[-1]

    def replace(self, **changes: object) -> LeViTConfig:
        """A copy with some fields changed; unknown fields are an error listing the valid ones."""
        valid = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - valid)
        if unknown:
            raise TypeError(f"unknown config key(s) {unknown}; valid keys: {sorted(valid)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-friendly dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> LeViTConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - valid)
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; valid keys: {sorted(valid)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass(frozen=True)
class PaperResult:
    """Figures reported in the paper (Table 3) for a released model."""

    top1: float
    top5: float
    gpu_img_s: float  # V100, fp16
    cpu_img_s: float  # Xeon Gold 6138, one thread, batch 16
    arm_img_s: float
    url: str = field(default="")


VARIANTS: dict[str, LeViTConfig] = {
    "levit_128s": LeViTConfig("levit_128s", (128, 256, 384), 16, (4, 6, 8), (2, 3, 4)),
    "levit_128": LeViTConfig("levit_128", (128, 256, 384), 16, (4, 8, 12), (4, 4, 4)),
    "levit_192": LeViTConfig("levit_192", (192, 288, 384), 32, (3, 5, 6), (4, 4, 4)),
    "levit_256": LeViTConfig("levit_256", (256, 384, 512), 32, (4, 6, 8), (4, 4, 4)),
    "levit_384": LeViTConfig("levit_384", (384, 512, 768), 32, (6, 9, 12), (4, 4, 4), drop_path_rate=0.1),
    # A tiny model for tests and demos: same structure, a fraction of the width and depth.
    "levit_tiny": LeViTConfig("levit_tiny", (32, 48, 64), 8, (2, 3, 4), (1, 1, 1)),
}

_BASE_URL = "https://dl.fbaipublicfiles.com/LeViT/"
PAPER_RESULTS: dict[str, PaperResult] = {
    "levit_128s": PaperResult(76.6, 92.9, 12880, 131.1, 39.1, _BASE_URL + "LeViT-128S-96703c44.pth"),
    "levit_128": PaperResult(78.6, 94.0, 9266, 94.0, 30.8, _BASE_URL + "LeViT-128-b88c2750.pth"),
    "levit_192": PaperResult(80.0, 94.7, 8601, 65.0, 24.2, _BASE_URL + "LeViT-192-92712e41.pth"),
    "levit_256": PaperResult(81.6, 95.4, 6582, 42.5, 16.4, _BASE_URL + "LeViT-256-13b5763e.pth"),
    "levit_384": PaperResult(82.6, 96.0, 4165, 23.1, 9.4, _BASE_URL + "LeViT-384-9bdaf2e2.pth"),
}


# ---- the paper's Table 5 (LeViT-128S, 100 epochs, without the distillation head) ------------------
ABLATIONS: dict[str, str] = {
    "A1": "no pyramid: one stage, depth 11, 14x14 tokens, D=19, N=3 heads, C=114",
    "A2": "no PatchConv: one 16x16 stride-16 convolution as the stem",
    "A3": "no BatchNorm: pre-norm LayerNorm (and no zero-init)",
    "A4": "no distillation (a recipe choice: the model is the base model)",
    "A5": "no attention bias: absolute position embedding added to the input tokens",
    "A6": "no wider blocks: DeiT-style q=k=v dim D=30, C=120/180/240, MLP x4, shrink heads 16/24",
    "A7": "no Hardswish before the attention projection",
}


@dataclass(frozen=True)
class PaperAblation:
    """One row of the paper's Table 5 (params/FLOPs in millions, ImageNet top-1 after 100 epochs)."""

    params_m: float
    flops_m: float
    top1: float


PAPER_ABLATIONS: dict[str, PaperAblation] = {
    "base": PaperAblation(7.4, 305, 71.9),
    "A1": PaperAblation(1.2, 308, 56.5),
    "A2": PaperAblation(7.4, 275, 65.3),
    "A3": PaperAblation(7.4, 305, 66.6),
    "A4": PaperAblation(7.4, 305, 69.7),
    "A5": PaperAblation(7.4, 305, 70.4),
    "A6": PaperAblation(6.2, 312, 70.9),
    "A7": PaperAblation(7.4, 305, 71.1),
}

# A1 and A6 change the widths: the paper gives them for LeViT-128S only.
_ABLATION_DIMS: dict[str, dict[str, object]] = {
    "A1": dict(embed_dim=(114,), key_dim=19, num_heads=(3,), depth=(11,)),
    # DeiT-style blocks: per head q = k = v = D (attn_ratio 1), heads = C / D, MLP x4. The shrink
    # attentions keep 16 / 24 heads and become DeiT-style too (key = value = D = 30, MLP x4 after
    # them): with that reading the counts land on the paper's 6.2M / 312M (Table 5). The base
    # model's shrink design (key 16, value 4D) gives 6.2M / 323M with MLP x2 after it (3.5% over
    # in FLOPs) and 6.5M / 333M with MLP x4 (7% over).
    "A6": dict(
        embed_dim=(120, 180, 240),
        key_dim=30,
        num_heads=(4, 6, 8),
        attn_ratio=1.0,
        mlp_ratio=4.0,
        down_key_dim=30,
        down_heads=(16, 24),
        down_attn_ratio=1.0,
        down_mlp_ratio=4.0,
    ),
}


def ablation_config(cfg: LeViTConfig, ablation: str | None) -> LeViTConfig:
    """``cfg`` turned into the paper's Table 5 variant ``ablation`` ("A1".."A7"; ``None``: unchanged).

    A2, A3, A5 and A7 are switches that apply to every variant; A1 and A6 set the paper's widths and
    exist for ``levit_128s`` only; A4 (no distillation) is the base model: drop the distillation in
    the training recipe (``distillation: none``).
    """
    if ablation is None:
        return cfg
    if ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation {ablation!r}; valid: None, {', '.join(ABLATIONS)}")
    if ablation in _ABLATION_DIMS:
        if cfg.name != "levit_128s":
            raise ValueError(
                f"ablation {ablation} sets the paper's LeViT-128S widths ({ABLATIONS[ablation]}); "
                f"build it from levit_128s, not {cfg.name}"
            )
        return cfg.replace(ablation=ablation, **_ABLATION_DIMS[ablation])
    return cfg.replace(ablation=ablation, **_ABLATION_SWITCHES[ablation])


# ---- names: registered variants and their aliases ---------------------------------------------
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
    ablation = overrides.pop("ablation", None)
    return ablation_config(VARIANTS[canonical_name(name)], ablation).replace(**overrides)
