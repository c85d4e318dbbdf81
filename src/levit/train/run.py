"""Training: the paper's recipe (LeViT, Section 5.1) on an ImageFolder, from one CPU to many GPUs.

:func:`train` takes a :class:`~levit.train.recipe.TrainConfig` (a YAML recipe + overrides, see
:mod:`levit.recipe`) and runs: one epoch (:mod:`levit.engine`), evaluate, checkpoint (:mod:`levit.rundir`),
repeat. Under ``torchrun`` it runs DDP (:mod:`levit.distributed`); only rank 0 logs and writes files.
Checkpoints hold everything needed to continue bit-exactly on CPU: model, EMA, optimizer, scheduler,
grad scaler, epoch/step, sampler position and every rank's RNG states.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import CheckpointError, LeViTError
from .distributed import DistContext, barrier, distributed, gather_lists, log
from .engine import EpochParts, LoopState, evaluate, train_one_epoch
from .recipe import (
    SCHEDULE_KEYS,
    TrainConfig,
    accumulation_steps,
    available_recipes,
    check_config,
    load_recipe,
    parse_overrides,
    resolve_config,
)
from .rundir import (
    MetricsRecorder,
    RunDir,
    atomic_save,
    check_resume_fits,
    find_resume_checkpoint,
    rng_state,
    seed_all,
    set_rng_state,
)

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


@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank)."""

    best_top1: float
    best_epoch: int
    last: dict[str, float]
    output: Path
    model: nn.Module  # the trained (unwrapped) model, in eval mode
    skipped_images: list[str]  # unreadable training and validation images, and failed augmentations
    finished_before: bool = False  # resumed a run that had nothing left to do


def train(
    cfg: TrainConfig, *, callbacks: Iterable[Callable[[str, dict], None]] = (), resume: str | None = None
) -> TrainResult:
    """Train per ``cfg``; ``resume`` is ``None``, ``"auto"`` (newest readable checkpoint in the output
    folder) or a checkpoint path. ``callbacks`` get ``(event, info)`` after every optimizer step
    (``"step"``) and epoch (``"epoch"``). Runs DDP when started by torchrun.

    A fresh run refuses an output folder with any trace of an earlier run; ``--resume auto`` refuses a
    folder with run files but no readable checkpoint. A start that fails removes what it created."""
    check_config(cfg)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    with distributed(cfg.device) as ctx:
        return _Run(cfg, ctx, resume).run(list(callbacks))


class _Run:
    """One training run: built step by step (:meth:`_start`), then the epochs (:meth:`run`)."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext, resume: str | None) -> None:
        self.cfg, self.ctx, self.resume = cfg, ctx, resume
        self.dir = RunDir(cfg.output, main=ctx.main)
        self.made: list[Path] = []  # what a failed start removes
        self.resumed_from: Path | None = None
        self.state = LoopState()

    def run(self, callbacks: list) -> TrainResult:
        try:
            self._start(self._resume_point())
        except BaseException:
            self.dir.discard(self.made)
            raise
        cfg, st, d = self.cfg, self.state, self.ctx
        if st.epoch >= cfg.epochs:
            return self._nothing_left()
        if self.resumed_from is not None:
            log(d, f"resumed from {self.resumed_from} (epoch {st.epoch + 1}, step {st.global_step})")
        self.dir.prepare(cfg.to_dict() | {"data": str(self.root)})
        self.recorder.truncate(st.global_step, st.epoch)  # back to the checkpoint
        barrier(d)
        self.parts.recorder = self.recorder
        log(d, self.banner)
        t_run = time.time()
        for epoch in range(st.epoch, cfg.epochs):
            first_step = st.step_in_epoch if epoch == st.epoch else 0
            st.epoch, st.step_in_epoch = epoch, first_step
            self.scheduler.step(epoch)
            self.data.sampler.set_epoch(epoch, first_step * self.parts.accum * cfg.batch_size)
            self.model.train()
            if self.parts.teacher is not None:
                self.parts.teacher.eval()

            def on_step(end_of_epoch: bool, epoch: int = epoch) -> None:
                info = {"epoch": epoch, "step_in_epoch": st.step_in_epoch, "global_step": st.global_step}
                for cb in callbacks:
                    cb("step", info)
                every = cfg.checkpoint_every_steps
                if every and st.global_step % every == 0 and not end_of_epoch:
                    self._save_checkpoint(complete=False)

            stats = train_one_epoch(self.parts, self.data.train_loader, cfg, st, first_step, on_step)
            self._note_skipped(stats.pop("bad"), "training")
            rec = self._end_of_epoch(stats)
            self._save_checkpoint(complete=True)
            for cb in callbacks:
                cb("epoch", rec)
        return self._finish(time.time() - t_run)

    # ---- building ------------------------------------------------------------------------------
    def _resume_point(self) -> tuple[Path, dict] | None:
        """Rank 0 applies the overwrite guard and picks the checkpoint (before anything is written);
        every rank gets its verdict, so all fail together or all load the same file."""
        d = self.ctx
        verdict: list = [None, None]  # (error class, message), checkpoint path
        found, error = None, None
        if d.main:
            try:
                found = self.dir.resume_point(self.resume)  # a bad --resume fails before any work
                verdict[1] = str(found[0]) if found else None
            except LeViTError as e:
                error, verdict[0] = e, (type(e).__name__, str(e))
        if d.on:
            dist.broadcast_object_list(verdict, src=0)
        if error is not None:
            raise error
        if verdict[0] is not None:
            raise (CheckpointError if verdict[0][0] == "CheckpointError" else LeViTError)(verdict[0][1])
        if d.main or verdict[1] is None:
            return found
        from .rundir import load_state

        return Path(verdict[1]), load_state(verdict[1])

    def _start(self, resume_point: tuple[Path, dict] | None) -> None:
        self._build_data()
        self._build_model()
        self._build_optimization()
        if resume_point is not None:
            self._restore(*resume_point)
        else:
            seed_all(self.cfg.seed + 7919 * self.ctx.rank)
        self.recorder = MetricsRecorder(self.dir.path, self.ctx.main, self.cfg.tensorboard)
        self._wrap()

    def _build_data(self) -> None:
        from ..data.datasets import build_loaders
        from ..data.digits import make_digits_folder

        cfg, d = self.cfg, self.ctx
        if cfg.dataset == "digits":  # bundled data goes into the run folder, never into --data
            self.root = self.dir.path / "digits"
            if d.main:
                if not self.root.exists():
                    self.made.append(self.root)
                make_digits_folder(self.root, seed=0)
            barrier(d)
        else:
            self.root = Path(cfg.data)
        self.data = build_loaders(cfg, self.root, world=d.world, rank=d.rank, pin_memory=d.device.type == "cuda")
        self.class_names = self.data.class_names
        self.accum = accumulation_steps(cfg, d.world)

    def _build_model(self) -> None:
        from ..factory.registry import create_model
        from ..models.config import canonical_name
        from .distill import build_teacher

        cfg, d = self.cfg, self.ctx
        torch.manual_seed(cfg.seed)  # same init on every rank; DDP also broadcasts rank 0's
        self.name = canonical_name(cfg.model)
        distill = cfg.distillation != "none"
        kwargs: dict[str, Any] = dict(num_classes=len(self.class_names), distillation=distill, img_size=cfg.img_size)
        if cfg.drop_path is not None:
            kwargs["drop_path_rate"] = cfg.drop_path
        if cfg.ablation is not None:  # the paper's Table 5 row
            kwargs["ablation"] = cfg.ablation
        if cfg.init_checkpoint or cfg.pretrained:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    model = create_model(self.name, checkpoint=cfg.init_checkpoint, pretrained=cfg.pretrained, **kwargs)
                except CheckpointError as e:  # offline: name the recipe key that takes a file, not a CLI flag
                    from ..weights.hub import PASS_A_FILE

                    hint = "or set init_checkpoint=PATH instead of pretrained=true"
                    raise CheckpointError(str(e).replace(PASS_A_FILE, hint)) from None
            for w in caught:
                log(d, f"note: {w.message}")
        else:
            model = create_model(self.name, **kwargs)
        model.class_names = self.class_names
        if distill:
            model.set_distilled_training(True)
        self.channels_last = d.device.type == "cuda" and cfg.channels_last
        model.to(d.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model, self.teacher = model, None
        if distill:
            self.teacher = build_teacher(cfg.teacher, cfg.teacher_checkpoint, len(self.class_names)).to(d.device)
            if self.channels_last:
                self.teacher.to(memory_format=torch.channels_last)

    def _build_optimization(self) -> None:
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2
        from timm.utils import ModelEmaV3

        from ..data.transforms import build_mixup
        from .distill import DistillationLoss

        cfg, d = self.cfg, self.ctx
        self.total_batch = cfg.batch_size * d.world * self.accum
        self.lr = cfg.lr * self.total_batch / cfg.lr_base_batch
        opt = create_optimizer_v2(self.model, opt=cfg.opt, lr=self.lr, weight_decay=cfg.weight_decay, eps=cfg.opt_eps)
        self.optimizer = opt
        self.scheduler, _ = create_scheduler_v2(
            opt,
            sched=cfg.sched,
            num_epochs=cfg.epochs,
            warmup_epochs=cfg.warmup_epochs,
            warmup_lr=cfg.warmup_lr,
            min_lr=cfg.min_lr,
            step_on_epochs=True,
        )
        self.ema = ModelEmaV3(self.model, decay=cfg.model_ema_decay) if cfg.model_ema else None
        self.amp_dtype = None
        if d.device.type == "cuda" and cfg.amp != "none":
            bf16 = cfg.amp == "bf16" and torch.cuda.is_bf16_supported()
            self.amp_dtype = torch.bfloat16 if bf16 else torch.float16
        self.scaler = torch.amp.GradScaler(d.device.type, enabled=self.amp_dtype == torch.float16)
        self.mixup = build_mixup(cfg, len(self.class_names))
        if self.mixup is not None:
            base_loss: Callable = SoftTargetCrossEntropy()
        elif cfg.smoothing > 0:
            base_loss = LabelSmoothingCrossEntropy(cfg.smoothing)
        else:
            base_loss = nn.CrossEntropyLoss()
        self.criterion = DistillationLoss(
            base_loss,
            self.teacher,
            cfg.distillation,
            cfg.distillation_alpha,
            cfg.distillation_tau,
            kl_norm=cfg.distillation_kl_norm,
        )

    def _restore(self, path: Path, state: dict) -> None:
        cfg, d, st = self.cfg, self.ctx, self.state
        check_resume_fits(path, state, cfg, self.class_names)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            old_cfg = state.get("train_config") or {}
            if all(old_cfg.get(k) == getattr(cfg, k) for k in SCHEDULE_KEYS):
                self.scheduler.load_state_dict(state["scheduler"])
            else:  # e.g. more epochs: the lr follows the new recipe from this epoch on
                log(d, "note: the lr schedule differs from the checkpoint's run; following the new recipe")
            self.scaler.load_state_dict(state["scaler"])
            if self.ema is not None and state.get("ema") is not None:
                self.ema.module.load_state_dict(state["ema"])
        except (RuntimeError, ValueError, KeyError) as e:
            from ..utils import first_line

            raise CheckpointError(f"{path}: does not fit this run's model/optimizer ({first_line(e, 200)})") from None
        st.global_step = int(state["global_step"])
        st.best_top1, st.best_epoch = float(state.get("best_top1", -1.0)), int(state.get("best_epoch", 0))
        st.last = dict(state.get("last") or {})
        if state.get("epoch_complete", True):
            st.epoch, st.step_in_epoch = int(state["epoch"]) + 1, 0
        else:
            st.epoch, st.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        rngs = state.get("rng") or []
        if len(rngs) == d.world:
            set_rng_state(rngs[d.rank])
        else:
            log(d, f"warning: checkpoint made with {len(rngs)} processes, now {d.world}: random streams restart")
            seed_all(cfg.seed + 7919 * d.rank + st.global_step)
        self.resumed_from = path

    def _wrap(self) -> None:
        cfg, d = self.cfg, self.ctx
        net: nn.Module = self.model
        if d.on:
            cuda = d.device.type == "cuda"
            net = nn.parallel.DistributedDataParallel(self.model, device_ids=[d.local_rank] if cuda else None)
        ddp = net
        if cfg.compile:
            net = torch.compile(net)
        n_train, n_val = self.data.sizes
        self.banner = (
            f"training {self.name} ({len(self.class_names)} classes, {n_train} train / {n_val} val images) on "
            f"{d.world} x {d.device.type}; batch {cfg.batch_size} x {d.world} process(es) x {self.accum} accumulation"
            f" = {self.total_batch}, lr {self.lr:.3g}, distillation {cfg.distillation}, amp {self.amp_dtype or 'off'}"
        )
        self.parts = EpochParts(
            model=self.model,
            net=net,
            ddp=ddp,
            criterion=self.criterion,
            optimizer=self.optimizer,
            scaler=self.scaler,
            ema=self.ema,
            mixup=self.mixup,
            teacher=self.teacher,
            ctx=d,
            amp_dtype=self.amp_dtype,
            accum=self.accum,
            micro_per_epoch=self.data.micro_per_epoch,
            updates_per_epoch=math.ceil(self.data.micro_per_epoch / self.accum),
            samples_per_epoch=self.data.micro_per_epoch * cfg.batch_size * d.world,
            recorder=None,
        )

    # ---- the epochs ----------------------------------------------------------------------------
    def _metadata(self) -> dict:
        from ..weights.format import build_metadata

        return build_metadata(self.model, eval={"img_size": self.cfg.img_size, "crop_pct": self.cfg.eval_crop_pct})

    def _save_checkpoint(self, complete: bool) -> None:
        d, st, cfg = self.ctx, self.state, self.cfg
        rngs = gather_lists(d, [rng_state()])
        if not d.main:
            return
        payload = {
            "model": self.model.state_dict(),
            "levit": self._metadata(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": st.epoch,
            "step_in_epoch": st.step_in_epoch,
            "epoch_complete": complete,
            "global_step": st.global_step,
            "sampler": self.data.sampler.state_dict() | {"start": st.step_in_epoch * self.accum * cfg.batch_size},
            "rng": rngs,
            "best_top1": st.best_top1,
            "best_epoch": st.best_epoch,
            "last": {k: v for k, v in st.last.items() if isinstance(v, (int, float))},
            "world_size": d.world,
            "train_config": cfg.to_dict(),
        }
        self.dir.save_checkpoint(payload, st.global_step, cfg.keep_last)

    def _note_skipped(self, bad: list, split: str) -> None:
        new = [(p, r) for p, r in bad if p not in self.state.skipped]
        for p, r in bad:
            self.state.skipped.setdefault(p, r)
        if new:
            n = len({p for p, _ in new})
            log(self.ctx, f"warning: skipped {n} unreadable {split} image(s), e.g. {new[0][0]} ({new[0][1]})")

    def _end_of_epoch(self, stats: dict) -> dict:
        cfg, d, st = self.cfg, self.ctx, self.state
        if d.on:  # BN statistics made identical on all ranks before evaluating
            for b in self.model.buffers():
                dist.broadcast(b, 0)
        rec: dict[str, Any] = {"event": "epoch", "epoch": st.epoch + 1, "train_loss": stats["train_loss"]}
        rec |= {"lr": self.optimizer.param_groups[0]["lr"], "epoch_time_s": stats["epoch_time_s"]}
        rec |= {"train_img_s": stats["train_img_s"]}
        if (st.epoch + 1) % cfg.eval_every == 0 or st.epoch + 1 == cfg.epochs:
            kw = dict(amp_dtype=self.amp_dtype, channels_last=self.channels_last)
            m = evaluate(self.model, self.data.val_loader, d.device, **kw)
            self._note_skipped(m.pop("skipped"), "validation")
            rec.update(top1=m["top1"], top5=m["top5"], val_loss=m["loss"], val_images=m["n"])
            if self.ema is not None:
                me = evaluate(self.ema.module, self.data.val_loader, d.device, **kw)
                rec.update(ema_top1=me["top1"], ema_top5=me["top5"], ema_val_loss=me["loss"])
            st.last = m
            if m["top1"] > st.best_top1:
                st.best_top1, st.best_epoch = m["top1"], st.epoch + 1
                if d.main:
                    payload = {"model": self.model.state_dict(), "levit": self._metadata()}
                    self.dir.save_best(payload | {"epoch": st.epoch + 1, "top1": m["top1"]})
            ema = f", EMA top-1 {rec['ema_top1']:.2f}%" if self.ema is not None else ""
            log(
                d,
                f"epoch {st.epoch + 1}/{cfg.epochs}: train loss {stats['train_loss']:.4f}, val top-1 {m['top1']:.2f}% "
                f"top-5 {m['top5']:.2f}% loss {m['loss']:.4f}{ema} ({stats['epoch_time_s']:.1f}s)",
            )
        rec["skipped_images"] = len(st.skipped)
        self.recorder.write(rec, step=st.epoch + 1)
        return rec

    def _finish(self, total_time: float) -> TrainResult:
        cfg, st = self.cfg, self.state
        last = st.last
        summary = {"event": "summary", "best_top1": st.best_top1, "best_epoch": st.best_epoch}
        summary |= {"final_top1": last.get("top1"), "final_top5": last.get("top5"), "epochs": cfg.epochs}
        summary |= {"steps": st.global_step, "time_s": total_time, "skipped_images": len(st.skipped)}
        self.recorder.write(summary)
        self.recorder.close()
        final = f"final top-1 {last['top1']:.2f}% top-5 {last['top5']:.2f}%; " if "top1" in last else ""
        log(
            self.ctx,
            f"done: best top-1 {st.best_top1:.2f}% at epoch {st.best_epoch}; {final}{total_time:.1f}s; "
            f"weights {self.dir.path / 'best.pth'}",
        )
        return self._result()

    def _nothing_left(self) -> TrainResult:
        st = self.state
        log(
            self.ctx,
            f"nothing left to do: {self.dir.path} already finished {st.epoch} of {self.cfg.epochs} epoch(s) "
            f"(best top-1 {st.best_top1:.2f}% at epoch {st.best_epoch}); raise epochs=N to train longer",
        )
        return self._result(finished_before=True)

    def _result(self, finished_before: bool = False) -> TrainResult:
        self.model.eval()
        if self.cfg.distillation != "none":
            self.model.set_distilled_training(False)
        st = self.state
        out = self.dir.path
        return TrainResult(st.best_top1, st.best_epoch, st.last, out, self.model, sorted(st.skipped), finished_before)
