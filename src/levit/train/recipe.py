"""The training recipe: :class:`TrainConfig`, YAML recipes (shipped or a file), KEY=VALUE overrides and
their validation. Every problem is a one-line :class:`~levit.errors.LeViTError` naming the key.

The defaults are the paper's recipe (LeViT, Section 5.1, with DeiT's augmentation and distillation).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LeViTError
from ..models.config import DEFAULT_CROP_PCT, PATCH_SIZE

__all__ = [
    "SCHEDULE_KEYS",
    "TrainConfig",
    "accumulation_steps",
    "available_recipes",
    "check_config",
    "load_recipe",
    "parse_overrides",
    "resolve_config",
]


@dataclass
class TrainConfig:
    """Every knob of a training run. Defaults are the paper's recipe (Section 5.1)."""

    # what to train, on what
    model: str = "levit_256"
    data: str | None = None  # DIR with train/ and val/: ImageFolder, WebDataset .tar shards or HF datasets
    train_shards: str | None = None  # instead of data: a brace pattern of .tar shards (train-{000000..000146}.tar)
    val_shards: str | None = None  # with train_shards: the validation shards' brace pattern
    hf_streaming: bool = False  # Parquet under data: streamed (datasets' IterableDataset), never all in memory
    dataset: str | None = (
        None  # "digits": the bundled scikit-learn digits, written to OUTPUT/digits (never into `data`)
    )
    output: str = "runs/levit"
    img_size: int = 224
    drop_path: float | None = None  # None: the variant's (0.1 for LeViT-384)
    ablation: str | None = None  # the paper's Table 5 row A1..A7 (A4: the base model with distillation none)
    init_checkpoint: str | None = None  # start from these weights (fine-tuning); any format create_model reads
    pretrained: bool = False  # start from the authors' released weights (downloaded)
    reset_head: bool = False  # fine-tuning: new classifier head(s), also when the class count is the checkpoint's
    freeze_epochs: int = 0  # fine-tuning: only the head(s) learn for this many epochs, then everything
    # schedule and batch
    epochs: int = 1000
    batch_size: int = 256  # per process (the paper: 32 GPUs x 256)
    total_batch: int | None = 8192  # effective batch; reached by gradient accumulation (None: no accumulation)
    # optimiser
    opt: str = "adamw"
    opt_eps: float = 1e-8
    lr: float = 5e-4  # scaled by total_batch / lr_base_batch
    lr_base_batch: int = 512
    weight_decay: float = 0.025  # not on attention biases, norms and biases
    layer_decay: float | None = None  # lr x layer_decay^(blocks from the head): heads full rate, stem lowest
    sched: str = "cosine"
    sched_on_updates: bool = False  # the rate changes every optimizer update (fine-tuning), not every epoch (the paper)
    warmup_epochs: int = 5
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    clip_grad: float | None = 0.01
    clip_mode: str = "agc"  # adaptive gradient clipping
    # augmentation (DeiT)
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    train_interpolation: str = "bicubic"
    train_crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    hflip: float = 0.5
    color_jitter: float = 0.3
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    smoothing: float = 0.1
    repeated_aug: int = 3
    # distillation
    distillation: str = "hard"  # none / soft / hard
    distillation_alpha: float = 0.5
    distillation_tau: float = 1.0
    distillation_kl_norm: str = "numel"  # soft: KL sum / (B x classes) as DeiT's code, or "batch": / B
    teacher: str | None = "regnety_160"  # a timm model name or a levit variant
    teacher_checkpoint: str | None = None  # weights file (never downloaded)
    # distillation from this file: the teacher's top class (hard) or top-k logits (soft) per view
    teacher_cache: str | None = None  # (levit.train.teacher_cache)
    # weights average and evaluation
    model_ema: bool = True
    model_ema_decay: float = 0.99996
    eval_crop_pct: float = DEFAULT_CROP_PCT  # resize img_size / crop_pct (bicubic), centre crop img_size
    eval_every: int = 1
    # machinery
    seed: int = 0
    workers: int | None = None  # data-loading processes; None: the CPU cores available (at most 8)
    threads: int | None = None  # intra-op CPU threads (torch.set_num_threads); None: torch's default
    device: str = "auto"  # auto / cpu / cuda
    amp: str = "bf16"  # bf16 / fp16 / none (GPU only; CPU runs in fp32)
    channels_last: bool = True  # GPU only
    compile: bool = False
    checkpoint_every_steps: int = 0  # 0: only at the end of every epoch
    keep_last: int = 3
    log_every: int = 50
    progress: bool = True
    tensorboard: bool = False
    # samples whose decoding or augmentation fails are skipped and reported; past this fraction of an
    # epoch's samples the run stops (a folder of garbage is not trained on)
    max_bad_fraction: float = 0.01

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML/JSON friendly)."""
        return dataclasses.asdict(self)


_CHOICES = {
    "distillation": ("none", "soft", "hard"),
    "distillation_kl_norm": ("numel", "batch"),
    "amp": ("none", "bf16", "fp16"),
    "device": ("auto", "cpu", "cuda"),
    "clip_mode": ("agc", "norm", "value"),
    "mixup_mode": ("batch", "pair", "elem"),
    "dataset": (None, "digits"),
    "remode": ("pixel", "rand", "const"),
}
_POSITIVE = ("epochs", "batch_size", "lr_base_batch", "keep_last", "log_every", "eval_every", "img_size", "recount")
_NON_NEGATIVE = ("warmup_epochs", "warmup_lr", "min_lr", "weight_decay", "opt_eps", "checkpoint_every_steps", "mixup")
_NON_NEGATIVE += ("cutmix", "color_jitter", "freeze_epochs")
_FRACTIONS = ("hflip", "reprob", "mixup_prob", "mixup_switch_prob", "smoothing", "model_ema_decay")


SCHEDULE_KEYS = ("epochs", "sched", "warmup_epochs", "warmup_lr", "min_lr", "lr", "lr_base_batch", "total_batch")
SCHEDULE_KEYS += ("sched_on_updates",)


def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def _number(value: Any) -> Any:
    """A number written as text, in any notation Python reads (``1e-4``, ``3E-4``, ``.5``), as a float.

    YAML 1.1, which PyYAML follows, reads ``1e-4`` (no dot) as a string; values of float keys are
    numbers however they are written. Anything else is returned unchanged (and refused by the caller)."""
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return value
    return value


def _coerce(key: str, value: Any, source: str) -> Any:
    """Check/convert ``value`` against the type of field ``key``; one-line error naming ``source``."""
    ftype = str(_fields()[key].type)
    optional = "None" in ftype
    base = ftype.replace("| None", "").strip()
    bad = LeViTError(f"{source}: bad value for {key}: expected {ftype.replace('|', 'or')}, got {value!r}")
    if value is None:
        if optional:
            return None
        raise bad
    if base == "bool":
        if isinstance(value, bool):
            return value
        raise bad
    if base == "int":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise bad
        return int(value)
    if base == "float":
        value = _number(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad
        return float(value)
    if base == "str":
        if isinstance(value, (dict, list, bool)):
            raise bad
        return str(value)
    if base.startswith("list"):
        value = [_number(v) for v in value] if isinstance(value, (list, tuple)) else value
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        ):
            raise bad
        return [float(v) for v in value]
    return value  # pragma: no cover


def check_config(cfg: TrainConfig) -> None:
    """Raise a one-line :class:`LeViTError` for the first invalid value of ``cfg``."""
    for key, choices in _CHOICES.items():
        if getattr(cfg, key) not in choices:
            raise LeViTError(f"{key} must be one of {[c for c in choices if c]}, got {getattr(cfg, key)!r}")
    for key in _POSITIVE:
        if getattr(cfg, key) < 1:
            raise LeViTError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.img_size % PATCH_SIZE:
        raise LeViTError(f"img_size must be a multiple of {PATCH_SIZE}, got {cfg.img_size}")
    if cfg.threads is not None and cfg.threads < 1:
        raise LeViTError(f"threads must be >= 1 or null, got {cfg.threads}")
    if cfg.workers is not None and cfg.workers < 0:
        raise LeViTError(f"workers must be >= 0 or null, got {cfg.workers}")
    for key in _NON_NEGATIVE:
        if getattr(cfg, key) < 0:
            raise LeViTError(f"{key} must be >= 0, got {getattr(cfg, key)}")
    for key in _FRACTIONS:
        if not 0 <= getattr(cfg, key) <= 1:
            raise LeViTError(f"{key} must be in [0, 1], got {getattr(cfg, key)}")
    for key in ("lr", "distillation_tau"):
        if not getattr(cfg, key) > 0:
            raise LeViTError(f"{key} must be > 0, got {getattr(cfg, key)}")
    if cfg.clip_grad is not None and not cfg.clip_grad > 0:
        raise LeViTError(f"clip_grad must be > 0 or null, got {cfg.clip_grad}")
    if cfg.layer_decay is not None and not 0 < cfg.layer_decay <= 1:
        raise LeViTError(f"layer_decay must be in (0, 1] or null, got {cfg.layer_decay}")
    if cfg.drop_path is not None and not 0 <= cfg.drop_path < 1:
        raise LeViTError(f"drop_path must be in [0, 1) or null, got {cfg.drop_path}")
    if cfg.total_batch is not None and cfg.total_batch < 1:
        raise LeViTError(f"total_batch must be >= 1 or null, got {cfg.total_batch}")
    if not 0 < cfg.eval_crop_pct <= 1:
        raise LeViTError(f"eval_crop_pct must be in (0, 1], got {cfg.eval_crop_pct}")
    if len(cfg.train_crop_scale) != 2 or not 0 < cfg.train_crop_scale[0] <= cfg.train_crop_scale[1] <= 1:
        raise LeViTError(f"train_crop_scale must be [min, max] within (0, 1], got {cfg.train_crop_scale}")
    if not 0 <= cfg.distillation_alpha <= 1:
        raise LeViTError(f"distillation_alpha must be in [0, 1], got {cfg.distillation_alpha}")
    if cfg.repeated_aug < 1:
        raise LeViTError(f"repeated_aug must be >= 1 (1: off), got {cfg.repeated_aug}")
    if not 0 <= cfg.max_bad_fraction <= 1:
        raise LeViTError(f"max_bad_fraction must be in [0, 1], got {cfg.max_bad_fraction}")
    if cfg.data is not None and cfg.dataset is not None:
        raise LeViTError(f"--data {cfg.data} and --dataset {cfg.dataset} exclude each other: give one")
    if (cfg.train_shards is None) != (cfg.val_shards is None):
        raise LeViTError("train_shards and val_shards go together: give both brace patterns (or --data DIR)")
    if cfg.train_shards is not None and (cfg.data is not None or cfg.dataset is not None):
        raise LeViTError("train_shards/val_shards replace --data and --dataset: give one of them")
    if cfg.data is None and cfg.dataset is None and cfg.train_shards is None:
        raise LeViTError(
            "--data DIR is required (DIR/train/CLASS/*.jpg and DIR/val/CLASS/*.jpg), or --dataset digits, "
            "or train_shards=PATTERN val_shards=PATTERN"
        )
    if cfg.data is not None and Path(cfg.output).resolve().is_relative_to(Path(cfg.data).resolve()):
        raise LeViTError(
            f"--output {cfg.output} is inside --data {cfg.data}: the run's files would become part of the "
            "dataset; pick an --output outside it"
        )
    from ..models.config import canonical_name, get_config

    canonical_name(cfg.model)  # unknown names list the valid ones
    if cfg.ablation is not None:
        try:
            get_config(cfg.model, ablation=cfg.ablation)  # unknown rows list the valid ones
        except ValueError as e:
            raise LeViTError(f"ablation: {e}") from None
        if cfg.ablation == "A4" and cfg.distillation != "none":
            raise LeViTError("ablation A4 is the base model trained without distillation: set distillation=none")


def available_recipes() -> list[str]:
    """Names of the recipes shipped with the package (``levit_256``, ``digits``, ...)."""
    from importlib.resources import files

    return sorted(p.name[:-5] for p in files("levit").joinpath("configs").iterdir() if p.name.endswith(".yaml"))


def load_recipe(name_or_path: str | os.PathLike, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A recipe as a dict: a YAML file path, or the name of a shipped recipe (see :func:`available_recipes`).

    A recipe may name another as its ``base`` (a shipped name, or a file path relative to its own
    folder): the base's values come first and the recipe's own override them, so the five paper
    recipes are ``paper.yaml`` plus a few lines each."""
    from importlib.resources import files

    import yaml

    path = Path(name_or_path)
    if path.is_file():
        text, source, folder = path.read_text(), str(path), path.parent
    else:
        shipped = files("levit").joinpath("configs", f"{name_or_path}.yaml")
        if not shipped.is_file():
            raise LeViTError(
                f"--config: {name_or_path} is neither a YAML file nor a shipped recipe ({', '.join(available_recipes())})"
            )
        text, source, folder = shipped.read_text(), f"recipe {name_or_path}", None
    try:
        recipe = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise LeViTError(f"--config: {source} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(recipe, dict):
        raise LeViTError(f"--config: {source} must be a mapping of KEY: VALUE")
    base = recipe.pop("base", None)
    if base is None:
        return _validate(recipe, source)
    if not isinstance(base, str) or source in _seen or len(_seen) > 8:
        raise LeViTError(f"--config: {source}: base must name one other recipe, without a cycle (got {base!r})")
    local = folder / base if folder is not None else None
    if local is not None and local.suffix not in (".yaml", ".yml"):
        local = local.with_suffix(".yaml")
    parent = load_recipe(local if local is not None and local.is_file() else base, (*_seen, source))
    return {**parent, **_validate(recipe, source)}


def _validate(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    valid = _fields()
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise LeViTError(f"{source}: unknown key(s) {unknown}; valid keys: {', '.join(valid)}")
    return {k: _coerce(k, v, source) for k, v in values.items()}


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["epochs=3", "mixup=0"]`` -> ``{"epochs": 3, "mixup": 0}`` (values parsed as YAML scalars)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LeViTError(f"override {item!r} is not KEY=VALUE (e.g. epochs=30)")
        try:
            out[key.strip().replace("-", "_")] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            out[key.strip().replace("-", "_")] = value
    return _validate(out, "override")


def resolve_config(*, config: str | os.PathLike | None = None, model: str | None = None, **values: Any) -> TrainConfig:
    """The run's config: the recipe (``config``; else the shipped recipe of ``dataset`` or ``model``;
    else the paper defaults), then ``model`` and every ``values`` entry on top (``None`` included: it
    sets a key to null, e.g. ``total_batch=None`` turns gradient accumulation off)."""
    from ..models.config import canonical_name

    if config is not None:
        recipe = load_recipe(config)
    elif values.get("dataset"):
        recipe = load_recipe(values["dataset"])
    elif model is not None and canonical_name(model) in available_recipes():
        recipe = load_recipe(canonical_name(model))
    else:
        recipe = {}
    given = _validate(values, "override")
    if model is not None:
        given["model"] = model
    if (given.get("data") is not None or given.get("train_shards") is not None) and "dataset" not in given:
        # a recipe written for a bundled dataset (``digits``) used on the user's own folder: the
        # folder is what the user asked to train on, the recipe only brings its hyper-parameters
        recipe.pop("dataset", None)
    merged = {**recipe, **given}
    cfg = TrainConfig(**merged)
    check_config(cfg)
    return cfg


def accumulation_steps(cfg: TrainConfig, world: int) -> int:
    """Micro-batches per optimizer step to reach ``total_batch`` (1: none)."""
    if cfg.total_batch is None:
        return 1
    per_step = cfg.batch_size * world
    if cfg.total_batch % per_step:
        raise LeViTError(
            f"total_batch {cfg.total_batch} is not a multiple of batch_size x processes = {per_step} "
            "(set total_batch=null or pick sizes that divide)"
        )
    return max(1, cfg.total_batch // per_step)
