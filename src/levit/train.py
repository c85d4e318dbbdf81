"""Training: the paper's recipe (levit-facts.md §5) on an ImageFolder, from one CPU to many GPUs.

The loop takes a :class:`TrainConfig` (built from a YAML recipe + overrides by :func:`resolve_config`)
and runs: one epoch, evaluate, checkpoint, repeat. Under ``torchrun`` it runs DDP (NCCL on GPU, gloo
on CPU); only rank 0 logs and writes files. Checkpoints are atomic (temporary file, then rename) and
hold everything needed to continue bit-exactly on CPU: model, EMA, optimizer, scheduler, grad scaler,
epoch/step, sampler position and every rank's RNG states.

Output directory::

    config.yaml                the resolved recipe
    metrics.jsonl              one JSON object per logged step, per epoch, and a final summary
    checkpoints/ckpt-<step>.pth  full training states, the newest ``keep_last`` kept
    best.pth                   the weights with the best top-1 (loads in create_model / levit eval / predict)
    tensorboard/               when ``tensorboard: true``
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import CheckpointError, LeViTError

__all__ = [
    "TrainConfig",
    "TrainResult",
    "atomic_save",
    "available_recipes",
    "evaluate",
    "find_resume_checkpoint",
    "load_recipe",
    "parse_overrides",
    "resolve_config",
    "train",
]


# ---- the recipe ---------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Every knob of a training run. Defaults are the paper's recipe (levit-facts.md §5)."""

    # what to train, on what
    model: str = "levit_256"
    data: str | None = None  # DIR with train/ and val/ (ImageFolder layout)
    dataset: str | None = None  # "digits": the bundled scikit-learn digits, written to `data` (or OUTPUT/digits)
    output: str = "runs/levit"
    img_size: int = 224
    drop_path: float | None = None  # None: the variant's (0.1 for LeViT-384)
    ablation: str | None = None  # the paper's Table 5 row A1..A7 (A4: the base model with distillation none)
    init_checkpoint: str | None = None  # start from these weights (fine-tuning); any format create_model reads
    pretrained: bool = False  # start from the authors' released weights (downloaded)
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
    sched: str = "cosine"  # stepped per epoch
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
    teacher: str | None = "regnety_160"  # a timm model name or a levit variant
    teacher_checkpoint: str | None = None  # weights file (never downloaded)
    # weights average and evaluation
    model_ema: bool = True
    model_ema_decay: float = 0.99996
    eval_crop_pct: float = 0.875  # resize img_size / crop_pct (bicubic), centre crop img_size
    eval_every: int = 1
    # machinery
    seed: int = 0
    workers: int = 8
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

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML/JSON friendly)."""
        return dataclasses.asdict(self)


_CHOICES = {
    "distillation": ("none", "soft", "hard"),
    "amp": ("none", "bf16", "fp16"),
    "device": ("auto", "cpu", "cuda"),
    "clip_mode": ("agc", "norm", "value"),
    "mixup_mode": ("batch", "pair", "elem"),
    "dataset": (None, "digits"),
    "remode": ("pixel", "rand", "const"),
}
_POSITIVE = ("epochs", "batch_size", "lr_base_batch", "keep_last", "log_every", "eval_every", "img_size", "recount")


_SCHEDULE_KEYS = ("epochs", "sched", "warmup_epochs", "warmup_lr", "min_lr", "lr", "lr_base_batch", "total_batch")


def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


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
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if base == "str":
        if isinstance(value, (dict, list, bool)):
            raise bad
        return str(value)
    if base.startswith("list"):
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        ):
            raise bad
        return [float(v) for v in value]
    return value  # pragma: no cover


def _check(cfg: TrainConfig) -> None:
    for key, choices in _CHOICES.items():
        if getattr(cfg, key) not in choices:
            raise LeViTError(f"{key} must be one of {[c for c in choices if c]}, got {getattr(cfg, key)!r}")
    for key in _POSITIVE:
        if getattr(cfg, key) < 1:
            raise LeViTError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.img_size % 16:
        raise LeViTError(f"img_size must be a multiple of 16, got {cfg.img_size}")
    if cfg.threads is not None and cfg.threads < 1:
        raise LeViTError(f"threads must be >= 1 or null, got {cfg.threads}")
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
    if cfg.data is None and cfg.dataset is None:
        raise LeViTError("--data DIR is required (DIR/train/CLASS/*.jpg and DIR/val/CLASS/*.jpg), or --dataset digits")
    from .registry import canonical_name, get_config

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


def load_recipe(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """A recipe as a dict: a YAML file path, or the name of a shipped recipe (see :func:`available_recipes`)."""
    from importlib.resources import files

    import yaml

    path = Path(name_or_path)
    if path.is_file():
        text, source = path.read_text(), str(path)
    else:
        shipped = files("levit").joinpath("configs", f"{name_or_path}.yaml")
        if not shipped.is_file():
            raise LeViTError(
                f"--config: {name_or_path} is neither a YAML file nor a shipped recipe ({', '.join(available_recipes())})"
            )
        text, source = shipped.read_text(), f"recipe {name_or_path}"
    try:
        recipe = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise LeViTError(f"--config: {source} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(recipe, dict):
        raise LeViTError(f"--config: {source} must be a mapping of KEY: VALUE")
    return _validate(recipe, source)


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
    from .registry import canonical_name

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
    merged = {**recipe, **given}
    cfg = TrainConfig(**merged)
    _check(cfg)
    return cfg


# ---- distributed helpers ------------------------------------------------------------------------
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1


def _init_distributed(device: str) -> _Dist:
    """Device choice + process group from torchrun's environment (NCCL on GPU, gloo on CPU)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise LeViTError("--device cuda: no CUDA GPU is available (use --device cpu)")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    d = _Dist(rank, world, local, dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return d


def _all_reduce_sum(t: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def _barrier(d: _Dist) -> None:
    if d.on:
        dist.barrier()


# ---- evaluation ---------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: torch.device | str = "cpu",
    *,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    class_map: Tensor | None = None,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy of ``model`` over ``loader``.

    Batches are ``(images, targets[, ...])``. Under torch.distributed, each rank passes its own shard
    (no padding, e.g. :class:`levit.data.ShardSampler`) and the sums are reduced, so every sample
    counts exactly once. ``class_map`` (classes,) maps model outputs to dataset label indices.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, n
    for batch in loader:
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = model(x)
        if isinstance(out, tuple):
            out = (out[0] + out[1]) / 2
        out = out.float()
        if class_map is not None:
            out = out[:, class_map.to(device)]
        k = min(5, out.shape[1])
        top = out.topk(k, dim=1).indices
        hit = top.eq(y[:, None])
        sums[0] += F.cross_entropy(out, y, reduction="sum").double()
        sums[1] += hit[:, :1].sum()
        sums[2] += hit.sum()
        sums[3] += y.numel()
    _all_reduce_sum(sums)
    model.train(was_training)
    n = max(sums[3].item(), 1.0)
    return {
        "top1": 100.0 * sums[1].item() / n,
        "top5": 100.0 * sums[2].item() / n,
        "loss": sums[0].item() / n,
        "n": int(sums[3].item()),
    }


# ---- checkpoints --------------------------------------------------------------------------------
def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename: a crash at any moment
    leaves either the old state or the complete new file, never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


def _ckpt_files(folder: Path) -> list[Path]:
    files = [p for p in folder.glob("ckpt-*.pth") if p.stem[5:].isdigit()]
    return sorted(files, key=lambda p: int(p.stem[5:]), reverse=True)


def _load_state(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable training checkpoint ({type(e).__name__})") from e
    if not isinstance(state, dict) or "model" not in state or "global_step" not in state:
        raise CheckpointError(f"{path}: not a levit training checkpoint (no model/global_step)")
    return state


def find_resume_checkpoint(output: str | os.PathLike) -> tuple[Path, dict] | None:
    """The newest complete, readable checkpoint under ``output/checkpoints`` and its contents, or None."""
    for path in _ckpt_files(Path(output) / "checkpoints"):
        try:
            return path, _load_state(path)
        except CheckpointError as e:
            print(f"warning: skipping {e}", file=sys.stderr)
    return None


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def _set_rng_state(s: Mapping) -> None:
    torch.set_rng_state(s["torch"])
    if s.get("cuda") and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    py = s["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


# ---- the run ------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank)."""

    best_top1: float
    best_epoch: int
    last: dict[str, float]
    output: Path
    model: nn.Module  # the trained (unwrapped) model, in eval mode
    skipped_images: list[str]


class _Recorder:
    """Rank-0 JSON lines + optional TensorBoard + console."""

    def __init__(self, out: Path, main: bool, tensorboard: bool) -> None:
        self.main, self.path, self.tb = main, out / "metrics.jsonl", None
        if main and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise LeViTError("tensorboard=true needs the tensorboard package: pip install 'levit[train]'") from e
            self.tb = SummaryWriter(str(out / "tensorboard"))

    def truncate(self, global_step: int, epochs_done: int) -> None:
        """On resume: drop records written after the checkpoint (the run will write them again)."""
        if not self.main or not self.path.is_file():
            return
        if global_step == 0 and epochs_done == 0:  # a fresh start: no stale records of a killed run
            self.path.unlink()
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the crash
            if (
                rec.get("event") == "summary"
                or (rec.get("event") == "step" and rec["step"] > global_step)
                or (rec.get("event") == "epoch" and rec["epoch"] > epochs_done)
            ):
                continue
            keep.append(line)
        self.path.write_text("".join(k + "\n" for k in keep))

    def write(self, rec: dict, step: int | None = None) -> None:
        if not self.main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None and step is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                    self.tb.add_scalar(f"{rec['event']}/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _log(d: _Dist, msg: str) -> None:
    if d.main:
        print(msg, file=sys.stderr, flush=True)


def _prepare_data(cfg: TrainConfig, d: _Dist, out: Path) -> Path:
    from .data import check_train_val_layout, make_digits_folder

    if cfg.dataset == "digits":
        root = Path(cfg.data) if cfg.data else out / "digits"
        if d.main:
            make_digits_folder(root, seed=0)
        _barrier(d)
    else:
        root = Path(cfg.data)
    check_train_val_layout(root)
    return root


def train(
    cfg: TrainConfig, *, callbacks: Iterable[Callable[[str, dict], None]] = (), resume: str | None = None
) -> TrainResult:
    """Train per ``cfg``; ``resume`` is ``None``, ``"auto"`` (newest complete checkpoint in the output
    folder, if any) or a checkpoint path. ``callbacks`` get ``(event, info)`` after every optimizer
    step (``"step"``) and epoch (``"epoch"``). Runs DDP when started by torchrun."""
    _check(cfg)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    d = _init_distributed(cfg.device)
    try:
        return _train(cfg, d, list(callbacks), resume)
    finally:
        if d.on and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, d: _Dist, callbacks: list, resume: str | None) -> TrainResult:
    import yaml
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3, dispatch_clip_grad

    from . import __version__
    from .checkpoint import FORMAT_VERSION
    from .data import (
        RepeatAugSampler,
        SafeImageFolder,
        ShardSampler,
        build_mixup,
        collate_skip,
        eval_transform,
        train_transform,
    )
    from .distill import DistillationLoss, build_teacher
    from .registry import canonical_name, create_model

    out = Path(cfg.output)
    dev = d.device
    cuda = dev.type == "cuda"

    # ---- resume point (read first: a bad --resume PATH fails before any work) ----
    state: dict | None = None
    resume_path: Path | None = None
    if resume not in (None, "", "none"):
        if resume == "auto":
            found = find_resume_checkpoint(out)
            if found is not None:
                resume_path, state = found
        else:
            resume_path = Path(resume)
            if not resume_path.is_file():
                raise LeViTError(f"--resume: checkpoint file not found: {resume_path}")
            state = _load_state(resume_path)
    elif _ckpt_files(out / "checkpoints"):
        raise LeViTError(
            f"--output {out} holds checkpoints of an earlier run: continue it with --resume auto, "
            "or pick another --output (nothing is overwritten)"
        )

    # ---- data ----
    root = _prepare_data(cfg, d, out)
    train_set = SafeImageFolder(root / "train", transform=train_transform(cfg))
    class_names = list(train_set.classes)
    num_classes = len(class_names)
    val_set = SafeImageFolder(
        root / "val", transform=eval_transform(cfg.img_size, cfg.eval_crop_pct), class_to_idx=train_set.class_to_idx
    )
    accum = 1
    if cfg.total_batch is not None:
        per_step = cfg.batch_size * d.world
        if cfg.total_batch % per_step:
            raise LeViTError(
                f"total_batch {cfg.total_batch} is not a multiple of batch_size x processes = {per_step} "
                "(set total_batch=null or pick sizes that divide)"
            )
        accum = max(1, cfg.total_batch // per_step)
    total_batch = cfg.batch_size * d.world * accum
    lr = cfg.lr * total_batch / cfg.lr_base_batch
    sampler = RepeatAugSampler(
        len(train_set), num_replicas=d.world, rank=d.rank, repeats=cfg.repeated_aug, seed=cfg.seed
    )
    micro_per_epoch = sampler.per_rank // cfg.batch_size
    if micro_per_epoch < 1:
        raise LeViTError(
            f"--batch-size {cfg.batch_size} is larger than the {sampler.per_rank} training images per process"
        )
    updates_per_epoch = math.ceil(micro_per_epoch / accum)
    if cfg.mixup_mode == "batch" and (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
        raise LeViTError(f"--batch-size must be even with Mixup/CutMix (mode batch), got {cfg.batch_size}")
    loader_gen = torch.Generator().manual_seed(cfg.seed)  # the global RNG is never touched by loaders
    workers = cfg.workers
    train_loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_skip,
        pin_memory=cuda,
        drop_last=True,
        generator=loader_gen,
        persistent_workers=False,
    )
    val_loader = torch.utils.data.DataLoader(
        val_set,
        batch_size=cfg.batch_size,
        sampler=ShardSampler(len(val_set), d.world, d.rank),
        num_workers=workers,
        collate_fn=collate_skip,
        pin_memory=cuda,
        generator=torch.Generator().manual_seed(cfg.seed),
    )

    # ---- model (same init on every rank; DDP also broadcasts rank 0's) ----
    torch.manual_seed(cfg.seed)
    name = canonical_name(cfg.model)
    distill = cfg.distillation != "none"
    kwargs: dict[str, Any] = dict(num_classes=num_classes, distillation=distill, img_size=cfg.img_size)
    if cfg.drop_path is not None:
        kwargs["drop_path_rate"] = cfg.drop_path
    if cfg.ablation is not None:
        kwargs["ablation"] = cfg.ablation
    if cfg.init_checkpoint or cfg.pretrained:
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = create_model(name, checkpoint=cfg.init_checkpoint, pretrained=cfg.pretrained, **kwargs)
        for w in caught:
            _log(d, f"note: {w.message}")
    else:
        model = create_model(name, **kwargs)
    model.class_names = class_names
    if distill:
        model.set_distilled_training(True)
    model.to(dev)
    if cuda and cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    teacher = None
    if distill:
        teacher = build_teacher(cfg.teacher, cfg.teacher_checkpoint, num_classes).to(dev)
        if cuda and cfg.channels_last:
            teacher.to(memory_format=torch.channels_last)

    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay, eps=cfg.opt_eps)
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=cfg.sched,
        num_epochs=cfg.epochs,
        warmup_epochs=cfg.warmup_epochs,
        warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr,
        step_on_epochs=True,
    )
    ema = ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.model_ema else None
    amp_dtype = None
    if cuda and cfg.amp != "none":
        amp_dtype = torch.bfloat16 if cfg.amp == "bf16" and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler(dev.type, enabled=amp_dtype == torch.float16)

    mixup = build_mixup(cfg, num_classes)
    if mixup is not None:
        base_loss: Callable = SoftTargetCrossEntropy()
    elif cfg.smoothing > 0:
        base_loss = LabelSmoothingCrossEntropy(cfg.smoothing)
    else:
        base_loss = nn.CrossEntropyLoss()
    criterion = DistillationLoss(base_loss, teacher, cfg.distillation, cfg.distillation_alpha, cfg.distillation_tau)

    # ---- restore ----
    start_epoch, start_step, global_step = 0, 0, 0
    best_top1, best_epoch = -1.0, 0
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            old_cfg = state.get("train_config") or {}
            if all(old_cfg.get(k) == getattr(cfg, k) for k in _SCHEDULE_KEYS):
                scheduler.load_state_dict(state["scheduler"])
            else:  # e.g. more epochs: the lr follows the new recipe from this epoch on
                _log(d, "note: the lr schedule differs from the checkpoint's run; following the new recipe")
            scaler.load_state_dict(state["scaler"])
            if ema is not None and state.get("ema") is not None:
                ema.module.load_state_dict(state["ema"])
        except (RuntimeError, ValueError, KeyError) as e:
            msg = str(e).strip().splitlines()[0][:200]
            raise CheckpointError(f"{resume_path}: does not fit this run's model/optimizer ({msg})") from None
        global_step = int(state["global_step"])
        best_top1, best_epoch = float(state.get("best_top1", -1.0)), int(state.get("best_epoch", 0))
        if state.get("epoch_complete", True):
            start_epoch, start_step = int(state["epoch"]) + 1, 0
        else:
            start_epoch, start_step = int(state["epoch"]), int(state["step_in_epoch"])
        rngs = state.get("rng") or []
        if len(rngs) == d.world:
            _set_rng_state(rngs[d.rank])
        else:
            _log(d, f"warning: checkpoint made with {len(rngs)} processes, now {d.world}: random streams restart")
            _seed_all(cfg.seed + 7919 * d.rank + global_step)
        _log(d, f"resumed from {resume_path} (epoch {start_epoch + 1}, step {global_step})")
    else:
        _seed_all(cfg.seed + 7919 * d.rank)

    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "checkpoints").mkdir(exist_ok=True)
        for tmp in (out / "checkpoints").glob(".*.tmp"):  # left by a crash mid-write
            tmp.unlink(missing_ok=True)
        resolved = cfg.to_dict() | {"data": str(root)}
        (out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    rec = _Recorder(out, d.main, cfg.tensorboard)
    rec.truncate(global_step, start_epoch)  # back to the checkpoint (or empty on a fresh start)
    _barrier(d)

    # ---- wrap ----
    net: nn.Module = model
    if d.on:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[d.local_rank] if cuda else None)
    ddp = net
    if cfg.compile:
        net = torch.compile(net)
    _log(
        d,
        f"training {name} ({num_classes} classes, {len(train_set)} train / {len(val_set)} val images) on "
        f"{d.world} x {dev.type}; batch {cfg.batch_size} x {d.world} process(es) x {accum} accumulation = "
        f"{total_batch}, lr {lr:.3g}, distillation {cfg.distillation}, amp {amp_dtype or 'off'}",
    )

    meta_base = {
        "format_version": FORMAT_VERSION,
        "variant": name,
        "config": model.config.to_dict(),
        "fused": False,
        "levit_version": __version__,
        "class_names": class_names,
        "eval": {"img_size": cfg.img_size, "crop_pct": cfg.eval_crop_pct},
    }

    def save_checkpoint(epoch: int, step_in_epoch: int, complete: bool) -> None:
        rngs: list = [None] * d.world
        if d.on:
            dist.all_gather_object(rngs, _rng_state())
        else:
            rngs = [_rng_state()]
        if not d.main:
            return
        payload = {
            "model": model.state_dict(),
            "levit": meta_base,
            "ema": ema.module.state_dict() if ema is not None else None,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "epoch_complete": complete,
            "global_step": global_step,
            "sampler": sampler.state_dict() | {"start": step_in_epoch * accum * cfg.batch_size},
            "rng": rngs,
            "best_top1": best_top1,
            "best_epoch": best_epoch,
            "world_size": d.world,
            "train_config": cfg.to_dict(),
        }
        atomic_save(payload, out / "checkpoints" / f"ckpt-{global_step:09d}.pth")
        for old in _ckpt_files(out / "checkpoints")[cfg.keep_last :]:
            old.unlink(missing_ok=True)

    skipped_all: set[str] = set()
    last: dict[str, float] = {}
    t_run = time.time()
    for epoch in range(start_epoch, cfg.epochs):
        scheduler.step(epoch)
        first_step = start_step if epoch == start_epoch else 0
        sampler.set_epoch(epoch, first_step * accum * cfg.batch_size)
        model.train()
        if teacher is not None:
            teacher.eval()
        bar = None
        if d.main and cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=updates_per_epoch,
                initial=first_step,
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
            )
        loss_sum = torch.zeros((), device=dev)
        loss_n = 0
        group_loss = torch.zeros((), device=dev)
        log_loss = torch.zeros((), device=dev)
        log_n = 0
        bad: list[str] = []
        micro = first_step * accum
        step_in_epoch = first_step
        t0, seen = time.time(), 0
        t_log, seen_log = t0, 0
        optimizer.zero_grad(set_to_none=True)
        for x, y, bad_paths in train_loader:
            bad.extend(bad_paths)
            x = x.to(dev, non_blocking=True)
            y = y.to(dev, non_blocking=True)
            if cuda and cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if mixup is not None:
                x, y = mixup(x, y)
            group = micro // accum
            group_size = accum if group < updates_per_epoch - 1 else micro_per_epoch - group * accum
            boundary = (micro + 1) % accum == 0 or micro + 1 == micro_per_epoch
            sync = ddp.no_sync() if d.on and not boundary else contextlib.nullcontext()
            with sync:
                with torch.autocast(dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    outputs = net(x)
                    loss = criterion(x, outputs, y)
                scaler.scale(loss / group_size).backward()
            group_loss += loss.detach() / group_size
            micro += 1
            seen += x.shape[0]
            if not boundary:
                continue
            if cfg.clip_grad is not None and cfg.clip_grad > 0:
                scaler.unscale_(optimizer)
                dispatch_clip_grad(model.parameters(), cfg.clip_grad, mode=cfg.clip_mode)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(model, step=global_step)
            global_step += 1
            step_in_epoch += 1
            loss_sum += group_loss
            log_loss += group_loss
            loss_n += 1
            log_n += 1
            group_loss = torch.zeros((), device=dev)
            end_of_epoch = step_in_epoch == updates_per_epoch
            if global_step % cfg.log_every == 0 or end_of_epoch:
                avg = _all_reduce_sum(log_loss.detach().clone().double()).item() / (log_n * d.world)
                now = time.time()
                img_s = (seen - seen_log) * d.world / max(now - t_log, 1e-9)
                cur_lr = optimizer.param_groups[0]["lr"]
                rec.write(
                    {
                        "event": "step",
                        "epoch": epoch + 1,
                        "step": global_step,
                        "loss": avg,
                        "lr": cur_lr,
                        "img_s": img_s,
                    },
                    step=global_step,
                )
                if bar is not None:
                    bar.set_postfix(loss=f"{avg:.4f}", lr=f"{cur_lr:.2e}", img_s=f"{img_s:.0f}")
                log_loss.zero_()
                log_n, t_log, seen_log = 0, now, seen
            if bar is not None:
                bar.update(1)
            for cb in callbacks:
                cb("step", {"epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step})
            if cfg.checkpoint_every_steps and global_step % cfg.checkpoint_every_steps == 0 and not end_of_epoch:
                save_checkpoint(epoch, step_in_epoch, complete=False)
        if bar is not None:
            bar.close()
        train_time = time.time() - t0
        train_loss = _all_reduce_sum(loss_sum.double()).item() / max(loss_n * d.world, 1)

        # ---- corrupt images of this epoch, gathered from all ranks ----
        if d.on:
            gathered: list = [None] * d.world
            dist.all_gather_object(gathered, bad)
            bad = [p for g in gathered for p in g]
        new_bad = sorted(set(bad) - skipped_all)
        skipped_all.update(bad)
        if new_bad:
            _log(d, f"warning: skipped {len(new_bad)} unreadable image(s), e.g. {new_bad[0]}")

        # ---- evaluate (BN statistics made identical on all ranks first) ----
        if d.on:
            for b in model.buffers():
                dist.broadcast(b, 0)
        epoch_rec: dict[str, Any] = {
            "event": "epoch",
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "lr": optimizer.param_groups[0]["lr"],
            "epoch_time_s": train_time,
            "train_img_s": seen * d.world / max(train_time, 1e-9),
            "skipped_images": len(skipped_all),
        }
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            m = evaluate(model, val_loader, dev, amp_dtype=amp_dtype, channels_last=cuda and cfg.channels_last)
            epoch_rec.update(top1=m["top1"], top5=m["top5"], val_loss=m["loss"])
            if ema is not None:
                me = evaluate(
                    ema.module, val_loader, dev, amp_dtype=amp_dtype, channels_last=cuda and cfg.channels_last
                )
                epoch_rec.update(ema_top1=me["top1"], ema_top5=me["top5"], ema_val_loss=me["loss"])
            last = m
            if m["top1"] > best_top1:
                best_top1, best_epoch = m["top1"], epoch + 1
                if d.main:
                    atomic_save(
                        {"model": model.state_dict(), "levit": meta_base, "epoch": epoch + 1, "top1": m["top1"]},
                        out / "best.pth",
                    )
            _log(
                d,
                f"epoch {epoch + 1}/{cfg.epochs}: train loss {train_loss:.4f}, val top-1 {m['top1']:.2f}% "
                f"top-5 {m['top5']:.2f}% loss {m['loss']:.4f}"
                + (f", EMA top-1 {epoch_rec['ema_top1']:.2f}%" if ema is not None else "")
                + f" ({train_time:.1f}s)",
            )
        rec.write(epoch_rec, step=epoch + 1)
        save_checkpoint(epoch, step_in_epoch, complete=True)
        for cb in callbacks:
            cb("epoch", epoch_rec)

    total_time = time.time() - t_run
    summary = {
        "event": "summary",
        "best_top1": best_top1,
        "best_epoch": best_epoch,
        "final_top1": last.get("top1"),
        "final_top5": last.get("top5"),
        "epochs": cfg.epochs,
        "steps": global_step,
        "time_s": total_time,
        "skipped_images": len(skipped_all),
    }
    rec.write(summary)
    rec.close()
    _log(
        d,
        f"done: best top-1 {best_top1:.2f}% at epoch {best_epoch}; final top-1 {last.get('top1', float('nan')):.2f}%"
        f" top-5 {last.get('top5', float('nan')):.2f}%; {total_time:.1f}s; weights {out / 'best.pth'}",
    )
    model.eval()
    if distill:
        model.set_distilled_training(False)
    return TrainResult(best_top1, best_epoch, last, out, model, sorted(skipped_all))


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
