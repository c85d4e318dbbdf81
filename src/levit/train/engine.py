"""The engine: one epoch of training (:func:`train_one_epoch`) and evaluation (:func:`evaluate`), laid out
like torchvision's and DeiT's references.

Samples that fail to decode or augment are skipped by :class:`levit.data.datasets.SafeImageFolder` and reported
here as ``(path, reason)`` pairs: training replaces them by the next image (the batch keeps its shape)
and stops once they pass ``max_bad_fraction`` of the epoch; evaluation leaves them out of the count.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LeViTError
from .distributed import DistContext, all_reduce_sum, gather_lists
from .optim import scheduler_on_update

__all__ = ["EpochParts", "LoopState", "evaluate", "train_one_epoch"]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: torch.device | str = "cpu",
    *,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    class_map: Tensor | None = None,
) -> dict[str, Any]:
    """Top-1 / top-5 accuracy (%), mean cross-entropy and image count ``n`` of ``model`` over ``loader``.

    Batches are ``(images, targets[, bad])``; ``bad`` lists ``(path, reason)`` of images that could not
    be read (left out of every number, returned as ``skipped``). Under torch.distributed, each rank
    passes its own shard (no padding, e.g. :class:`levit.data.samplers.ShardSampler`) and the sums are reduced,
    so every sample counts exactly once. ``class_map`` (classes,) maps model outputs to dataset labels.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, n
    skipped: list = []
    for batch in loader:
        if len(batch) > 2:
            skipped.extend(batch[2])
        if batch[0].numel() == 0:  # every image of the batch was unreadable
            continue
        images, targets = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images)
        if isinstance(logits, tuple):
            logits = (logits[0] + logits[1]) / 2
        logits = logits.float()
        if class_map is not None:
            logits = logits[:, class_map.to(device)]
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top.eq(targets[:, None])
        sums[0] += F.cross_entropy(logits, targets, reduction="sum").double()
        sums[1] += hit[:, :1].sum()
        sums[2] += hit.sum()
        sums[3] += targets.numel()
    all_reduce_sum(sums)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        skipped = gather_lists(DistContext(world_size=torch.distributed.get_world_size()), skipped)
    model.train(was_training)
    count = max(sums[3].item(), 1.0)
    return {
        "top1": 100.0 * sums[1].item() / count,
        "top5": 100.0 * sums[2].item() / count,
        "loss": sums[0].item() / count,
        "n": int(sums[3].item()),
        "skipped": [(str(path), str(reason)) for path, reason in skipped],
    }


# ---- training -----------------------------------------------------------------------------------
@dataclass
class LoopState:
    """Where the run is: what a checkpoint stores besides the weights and optimiser."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_top1: float = -1.0
    best_epoch: int = 0
    last: dict[str, Any] = field(default_factory=dict)  # the last evaluation's numbers
    skipped: dict[str, str] = field(default_factory=dict)  # path -> reason, over the whole run


@dataclass
class EpochParts:
    """The objects one epoch of training works with (built once by :func:`levit.train.run.train`)."""

    model: nn.Module  # the unwrapped model (clipping, EMA)
    forward_model: nn.Module  # what runs forward: the model, DDP-wrapped and/or compiled
    ddp_wrapper: nn.Module  # the DDP wrapper (``no_sync`` between accumulation steps), or the model
    criterion: Callable
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: Any  # timm ModelEmaV3 or None
    mixup: Any  # timm Mixup or None
    teacher: nn.Module | None
    ctx: DistContext
    amp_dtype: torch.dtype | None
    accumulation_steps: int  # micro-batches per optimizer step
    micro_batches_per_epoch: int  # per process
    updates_per_epoch: int
    samples_per_epoch: int  # over all processes
    recorder: Any  # levit.train.rundir.MetricsRecorder
    scheduler: Any = None  # timm scheduler: told each update's number when it is stepped per update


def _check_bad_samples(bad_count: float, cfg, parts: EpochParts, local_bad: list) -> None:
    limit = cfg.max_bad_fraction * parts.samples_per_epoch
    if bad_count > limit:
        example = f", e.g. {local_bad[0][0]} ({local_bad[0][1]})" if local_bad else ""
        raise LeViTError(
            f"{int(bad_count)} of this epoch's {parts.samples_per_epoch} training samples could not be read or "
            f"augmented, more than max_bad_fraction={cfg.max_bad_fraction:g}{example}; fix or remove those files "
            "(or raise max_bad_fraction)"
        )


class _EpochMeter:
    """The epoch's running numbers, kept on the device (``.item()`` only at log points): the loss of
    the optimizer step being accumulated, the epoch's and the log window's loss sums, images seen."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.step_loss = torch.zeros((), device=device)  # the accumulation group's loss
        self.epoch_loss, self.epoch_updates = torch.zeros((), device=device), 0
        self.window_loss, self.window_updates = torch.zeros((), device=device), 0
        self.bad: list = []  # (path, reason) of this process's unreadable samples
        self.start = self.window_start = time.time()
        self.seen = self.window_seen = 0  # images seen by this process

    def end_update(self) -> None:
        """One optimizer step done: its loss joins the epoch's and the log window's."""
        self.epoch_loss += self.step_loss
        self.window_loss += self.step_loss
        self.epoch_updates += 1
        self.window_updates += 1
        self.step_loss = torch.zeros((), device=self.device)

    def log_window(self, parts: EpochParts, cfg, state: LoopState, bar: Any) -> None:
        """Reduce the log window over the processes, check the bad-sample budget, write the record."""
        world_size = parts.ctx.world_size
        # the bad-sample count rides along with the loss: every rank sees the same total and stops together
        local = torch.stack(
            [self.window_loss.detach().double(), torch.tensor(float(len(self.bad)), device=self.device)]
        )
        sums = all_reduce_sum(local)
        avg_loss = sums[0].item() / (self.window_updates * world_size)
        _check_bad_samples(sums[1].item(), cfg, parts, self.bad)
        now = time.time()
        img_s = (self.seen - self.window_seen) * world_size / max(now - self.window_start, 1e-9)
        lr = max(g["lr"] for g in parts.optimizer.param_groups)  # the heads' rate under layer decay
        record = {"event": "step", "epoch": state.epoch + 1, "step": state.global_step, "loss": avg_loss}
        parts.recorder.write(record | {"lr": lr, "img_s": img_s}, step=state.global_step)
        if bar is not None:
            bar.set_postfix(loss=f"{avg_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{img_s:.0f}")
        self.window_loss.zero_()
        self.window_updates, self.window_start, self.window_seen = 0, now, self.seen

    def summary(self, ctx: DistContext) -> dict[str, Any]:
        """The epoch's train loss and throughput over all processes, and every process's bad samples."""
        train_time = time.time() - self.start
        return {
            "train_loss": all_reduce_sum(self.epoch_loss.double()).item() / max(self.epoch_updates * ctx.world_size, 1),
            "epoch_time_s": train_time,
            "train_img_s": self.seen * ctx.world_size / max(train_time, 1e-9),
            "bad": gather_lists(ctx, self.bad),
        }


def _progress_bar(parts: EpochParts, cfg, state: LoopState, first_step: int) -> Any:
    """A tqdm bar over the epoch's optimizer steps on the main process, when asked for; else ``None``."""
    if not (parts.ctx.is_main and cfg.progress):
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=parts.updates_per_epoch,
        initial=first_step,
        desc=f"epoch {state.epoch + 1}/{cfg.epochs}",
        unit="step",
        dynamic_ncols=True,
        file=sys.stderr,
    )


def _optimizer_step(parts: EpochParts, cfg, state: LoopState) -> None:
    """Unscale and clip (AGC or norm), step, zero the gradients, update the EMA."""
    from timm.utils import dispatch_clip_grad

    if parts.scheduler is not None:  # this update's rate (a per-epoch schedule ignores it)
        scheduler_on_update(parts.scheduler, state.global_step)
    if cfg.clip_grad is not None and cfg.clip_grad > 0:
        parts.scaler.unscale_(parts.optimizer)
        dispatch_clip_grad(parts.model.parameters(), cfg.clip_grad, mode=cfg.clip_mode)
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    parts.optimizer.zero_grad(set_to_none=True)
    if parts.ema is not None:
        parts.ema.update(parts.model, step=state.global_step)
    state.global_step += 1
    state.step_in_epoch += 1


def train_one_epoch(
    parts: EpochParts,
    loader: Iterable,
    cfg,
    state: LoopState,
    first_step: int,
    on_step: Callable[[bool], None],
) -> dict[str, Any]:
    """One epoch from optimizer step ``first_step``: forward, loss, backward with gradient
    accumulation (no DDP all-reduce between accumulation steps), clipping, optimizer step, EMA,
    logging every ``cfg.log_every`` steps. ``on_step(end_of_epoch)`` runs after every optimizer step
    (callbacks, mid-epoch checkpoints). Returns the epoch's train loss, throughput and skipped samples."""
    ctx, device, steps = parts.ctx, parts.ctx.device, parts.accumulation_steps
    channels_last = device.type == "cuda" and cfg.channels_last
    bar = _progress_bar(parts, cfg, state, first_step)
    meter = _EpochMeter(device)
    micro_batch = first_step * steps
    parts.optimizer.zero_grad(set_to_none=True)
    seek = getattr(parts.teacher, "seek", None)  # a cached teacher answers for a place in the run
    for images, targets, bad_samples in loader:
        if seek is not None:
            seek(state.epoch, micro_batch)
        meter.bad.extend(bad_samples)
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if parts.mixup is not None:
            images, targets = parts.mixup(images, targets)
        group = micro_batch // steps  # the optimizer step this micro-batch belongs to; the last may be short
        group_size = steps if group < parts.updates_per_epoch - 1 else parts.micro_batches_per_epoch - group * steps
        boundary = (micro_batch + 1) % steps == 0 or micro_batch + 1 == parts.micro_batches_per_epoch
        no_sync = ctx.is_distributed and not boundary
        with parts.ddp_wrapper.no_sync() if no_sync else contextlib.nullcontext():
            amp = parts.amp_dtype is not None
            with torch.autocast(device.type, dtype=parts.amp_dtype or torch.float32, enabled=amp):
                loss = parts.criterion(images, parts.forward_model(images), targets)
            parts.scaler.scale(loss / group_size).backward()
        meter.step_loss += loss.detach() / group_size
        micro_batch += 1
        meter.seen += images.shape[0]
        if not boundary:
            continue
        _optimizer_step(parts, cfg, state)
        meter.end_update()
        end_of_epoch = state.step_in_epoch == parts.updates_per_epoch
        if state.global_step % cfg.log_every == 0 or end_of_epoch:
            meter.log_window(parts, cfg, state, bar)
        if bar is not None:
            bar.update(1)
        on_step(end_of_epoch)
    if bar is not None:
        bar.close()
    return meter.summary(ctx)
