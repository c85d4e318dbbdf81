"""The engine: one epoch of training (:func:`train_one_epoch`) and evaluation (:func:`evaluate`,
:func:`evaluate_folder`), laid out like torchvision's and DeiT's references.

Samples that fail to decode or augment are skipped by :class:`levit.data.SafeImageFolder` and reported
here as ``(path, reason)`` pairs: training replaces them by the next image (the batch keeps its shape)
and stops once they pass ``max_bad_fraction`` of the epoch; evaluation leaves them out of the count.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .distributed import DistContext, all_reduce_sum, distributed, gather_lists
from .errors import LeViTError

__all__ = ["EpochParts", "LoopState", "evaluate", "evaluate_folder", "train_one_epoch"]


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
    passes its own shard (no padding, e.g. :class:`levit.data.ShardSampler`) and the sums are reduced,
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
    all_reduce_sum(sums)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        skipped = gather_lists(DistContext(world=torch.distributed.get_world_size()), skipped)
    model.train(was_training)
    n = max(sums[3].item(), 1.0)
    return {
        "top1": 100.0 * sums[1].item() / n,
        "top5": 100.0 * sums[2].item() / n,
        "loss": sums[0].item() / n,
        "n": int(sums[3].item()),
        "skipped": [(str(p), str(r)) for p, r in skipped],
    }


def evaluate_folder(
    model: nn.Module,
    data: str | os.PathLike,
    *,
    img_size: int,
    crop_pct: float = 0.875,
    batch_size: int = 64,
    workers: int = 2,
    device: str = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate ``model`` on an ImageFolder (one sub-folder per class) with the official preprocessing;
    under torchrun every process takes a shard and the counts are reduced (the group is torn down
    after). Class folders are matched to ``model.class_names`` by name when the model has them, else
    taken in sorted order. Returns :func:`evaluate`'s numbers plus ``rank`` (only rank 0 should print).
    ``progress`` shows a progress bar on stderr (rank 0)."""
    from .data import SafeImageFolder, ShardSampler, check_image_folder, collate_skip, eval_transform

    classes = check_image_folder(data)
    names = getattr(model, "class_names", None)
    if names:
        unknown = [c for c in classes if c not in names]
        if unknown:
            raise LeViTError(f"--data: class folder(s) {unknown[:5]} are not classes of the checkpoint")
        class_to_idx = {c: list(names).index(c) for c in classes}
    else:
        if len(classes) != model.config.num_classes:
            raise LeViTError(
                f"--data: {len(classes)} class folders, but the model has {model.config.num_classes} classes and "
                "no class names to match them by (folders are taken in sorted order)"
            )
        class_to_idx = {c: i for i, c in enumerate(classes)}
    dataset = SafeImageFolder(
        data, transform=eval_transform(img_size, crop_pct), class_to_idx=class_to_idx, replace_bad=False
    )
    with distributed(device) as ctx:
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=ShardSampler(len(dataset), ctx.world, ctx.rank),
            num_workers=workers,
            collate_fn=collate_skip,
        )
        batches: Iterable = loader
        if progress and ctx.main:
            from tqdm.auto import tqdm

            batches = tqdm(loader, desc="eval", unit="batch", leave=False, file=sys.stderr, dynamic_ncols=True)
        metrics = evaluate(model.to(ctx.device).eval(), batches, ctx.device)
        return metrics | {"rank": ctx.rank}


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
    """The objects one epoch of training works with (built once by :func:`levit.train.train`)."""

    model: nn.Module  # the unwrapped model (clipping, EMA)
    net: nn.Module  # what runs forward: the model, DDP-wrapped and/or compiled
    ddp: nn.Module  # the DDP wrapper (``no_sync`` between accumulation steps), or the model
    criterion: Callable
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: Any  # timm ModelEmaV3 or None
    mixup: Any  # timm Mixup or None
    teacher: nn.Module | None
    ctx: DistContext
    amp_dtype: torch.dtype | None
    accum: int  # micro-batches per optimizer step
    micro_per_epoch: int
    updates_per_epoch: int
    samples_per_epoch: int  # over all processes
    recorder: Any  # levit.rundir.MetricsRecorder


def _check_bad_samples(bad: float, cfg, parts: EpochParts, local: list) -> None:
    limit = cfg.max_bad_fraction * parts.samples_per_epoch
    if bad > limit:
        eg = f", e.g. {local[0][0]} ({local[0][1]})" if local else ""
        raise LeViTError(
            f"{int(bad)} of this epoch's {parts.samples_per_epoch} training samples could not be read or "
            f"augmented, more than max_bad_fraction={cfg.max_bad_fraction:g}{eg}; fix or remove those files "
            "(or raise max_bad_fraction)"
        )


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
    from timm.utils import dispatch_clip_grad

    p, d, dev = parts, parts.ctx, parts.ctx.device
    channels_last = dev.type == "cuda" and cfg.channels_last
    bar = None
    if d.main and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=p.updates_per_epoch,
            initial=first_step,
            desc=f"epoch {state.epoch + 1}/{cfg.epochs}",
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
        )
    loss_sum = torch.zeros((), device=dev)
    loss_n = 0
    group_loss = torch.zeros((), device=dev)
    log_loss = torch.zeros((), device=dev)
    log_n = 0
    bad: list = []
    micro = first_step * p.accum
    t0, seen = time.time(), 0
    t_log, seen_log = t0, 0
    p.optimizer.zero_grad(set_to_none=True)
    for x, y, bad_samples in loader:
        bad.extend(bad_samples)
        x = x.to(dev, non_blocking=True)
        y = y.to(dev, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if p.mixup is not None:
            x, y = p.mixup(x, y)
        group = micro // p.accum
        group_size = p.accum if group < p.updates_per_epoch - 1 else p.micro_per_epoch - group * p.accum
        boundary = (micro + 1) % p.accum == 0 or micro + 1 == p.micro_per_epoch
        sync = p.ddp.no_sync() if d.on and not boundary else contextlib.nullcontext()
        with sync:
            with torch.autocast(dev.type, dtype=p.amp_dtype or torch.float32, enabled=p.amp_dtype is not None):
                outputs = p.net(x)
                loss = p.criterion(x, outputs, y)
            p.scaler.scale(loss / group_size).backward()
        group_loss += loss.detach() / group_size
        micro += 1
        seen += x.shape[0]
        if not boundary:
            continue
        if cfg.clip_grad is not None and cfg.clip_grad > 0:
            p.scaler.unscale_(p.optimizer)
            dispatch_clip_grad(p.model.parameters(), cfg.clip_grad, mode=cfg.clip_mode)
        p.scaler.step(p.optimizer)
        p.scaler.update()
        p.optimizer.zero_grad(set_to_none=True)
        if p.ema is not None:
            p.ema.update(p.model, step=state.global_step)
        state.global_step += 1
        state.step_in_epoch += 1
        loss_sum += group_loss
        log_loss += group_loss
        loss_n += 1
        log_n += 1
        group_loss = torch.zeros((), device=dev)
        end_of_epoch = state.step_in_epoch == p.updates_per_epoch
        if state.global_step % cfg.log_every == 0 or end_of_epoch:
            # the bad-sample count rides along with the loss: every rank sees the same total and stops together
            sums = all_reduce_sum(torch.stack([log_loss.detach().double(), torch.tensor(float(len(bad)), device=dev)]))
            avg = sums[0].item() / (log_n * d.world)
            _check_bad_samples(sums[1].item(), cfg, p, bad)
            now = time.time()
            img_s = (seen - seen_log) * d.world / max(now - t_log, 1e-9)
            cur_lr = p.optimizer.param_groups[0]["lr"]
            rec = {"event": "step", "epoch": state.epoch + 1, "step": state.global_step, "loss": avg}
            p.recorder.write(rec | {"lr": cur_lr, "img_s": img_s}, step=state.global_step)
            if bar is not None:
                bar.set_postfix(loss=f"{avg:.4f}", lr=f"{cur_lr:.2e}", img_s=f"{img_s:.0f}")
            log_loss.zero_()
            log_n, t_log, seen_log = 0, now, seen
        if bar is not None:
            bar.update(1)
        on_step(end_of_epoch)
    if bar is not None:
        bar.close()
    train_time = time.time() - t0
    return {
        "train_loss": all_reduce_sum(loss_sum.double()).item() / max(loss_n * d.world, 1),
        "epoch_time_s": train_time,
        "train_img_s": seen * d.world / max(train_time, 1e-9),
        "bad": gather_lists(d, bad),
    }
