"""The optimiser, the learning-rate schedule and the trunk freeze of a run, as fine-tuning needs them.

- :func:`build_optimizer`: timm's ``create_optimizer_v2`` over the model; with ``layer_decay`` the
  parameter groups follow :meth:`levit.models.network.LeViT.group_matcher` (stem, every block in order,
  heads last) and each group's ``lr_scale`` is ``layer_decay ** (distance from the heads)``: the heads
  get the full rate, the stem the lowest (BEiT's layer-wise decay, timm's implementation).
- :func:`build_scheduler`: timm's ``create_scheduler_v2``, stepped per epoch (the paper's recipe) or,
  with ``sched_on_updates``, per optimizer update (:func:`scheduler_on_update` before each update), so a
  short fine-tune gets a smooth warm-up and cosine instead of one rate per epoch.
- :func:`freeze_trunk`: everything but the classifier head(s) stops learning (no gradients, batch-norm
  statistics kept), for the first ``freeze_epochs`` epochs of a fine-tune.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["HEAD_PREFIXES", "build_optimizer", "build_scheduler", "freeze_trunk", "scheduler_on_update"]

#: the parameters of the classifier head(s); everything else is the trunk
HEAD_PREFIXES = ("head.", "head_dist.")


def build_optimizer(model: nn.Module, cfg: Any, lr: float) -> torch.optim.Optimizer:
    """``cfg.opt`` at rate ``lr`` over every parameter of ``model`` (no weight decay on 1-D tensors
    and the model's ``no_weight_decay`` names), with layer-wise rate decay when ``cfg.layer_decay`` is set.

    Every parameter is in a group even while frozen (:func:`freeze_trunk`), so unfreezing needs no new
    optimiser and a checkpoint's optimiser state always fits."""
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(
        model,
        opt=cfg.opt,
        lr=lr,
        weight_decay=cfg.weight_decay,
        eps=cfg.opt_eps,
        layer_decay=cfg.layer_decay,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Any, updates_per_epoch: int) -> Any:
    """timm's scheduler for ``cfg`` (``sched``, ``epochs``, ``warmup_epochs`` from ``warmup_lr``,
    ``min_lr``): its time unit is the epoch, or the optimizer update when ``cfg.sched_on_updates``
    (then warm-up and decay last ``warmup_epochs x updates_per_epoch`` and ``epochs x
    updates_per_epoch`` updates). Group rates are the schedule's value times their ``lr_scale``."""
    from timm.scheduler import create_scheduler_v2

    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=cfg.sched,
        num_epochs=cfg.epochs,
        warmup_epochs=cfg.warmup_epochs,
        warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr,
        step_on_epochs=not cfg.sched_on_updates,
        updates_per_epoch=updates_per_epoch,
    )
    return scheduler


def scheduler_on_update(scheduler: Any, update: int) -> None:
    """Set the rates of optimizer update number ``update`` (0 for the first of the run) on a per-update
    schedule; a per-epoch schedule ignores it (timm's ``step_update`` does nothing then)."""
    scheduler.step_update(num_updates=update)


def freeze_trunk(model: nn.Module, frozen: bool) -> list[str]:
    """Freeze (``True``) or release every parameter of ``model`` outside the classifier head(s);
    returns the names it changed.

    Frozen parameters get no gradient (so the optimiser, which skips parameters without one, leaves
    them and their optimiser state as they are) and the trunk's modules are put in eval mode, so their
    batch-norm statistics stay those of the checkpoint; call it again after every ``model.train()``."""
    changed = []
    for name, param in model.named_parameters():
        if name.startswith(HEAD_PREFIXES):
            continue
        if param.requires_grad == frozen:
            changed.append(name)
        param.requires_grad_(not frozen)
    if frozen:
        for name, module in model.named_children():
            if not (name + ".").startswith(HEAD_PREFIXES):
                module.eval()
    return changed
