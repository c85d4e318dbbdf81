"""Training: the paper's recipe (LeViT, Section 5.1) on an ImageFolder, from one CPU to many GPUs.

:func:`train` takes a :class:`~levit.train.recipe.TrainConfig` (a YAML recipe + overrides, see
:mod:`levit.train.recipe`) and runs: one epoch (:mod:`levit.train.engine`), evaluate, checkpoint
(:mod:`levit.train.rundir`), repeat. Under ``torchrun`` it runs DDP (:mod:`levit.train.distributed`);
only rank 0 logs and writes files.
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
from ..models.config import IMAGENET_MEAN, IMAGENET_STD
from .distributed import DistContext, barrier, distributed, gather_lists, log
from .engine import EpochParts, LoopState, evaluate, train_one_epoch
from .optim import build_optimizer, build_scheduler, freeze_trunk
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
    TRACES,
    MetricsRecorder,
    RunDir,
    atomic_save,
    check_resume_fits,
    checkpoint_files,
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


#: fewer optimizer updates per epoch than this, with gradient accumulation, gets a note at the start
SMALL_DATA_UPDATES = 50


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
        run = _Run(cfg, ctx, resume)
        try:
            return run.run(list(callbacks))
        except OSError:  # a full disk, a lost file system
            run.discard_if_no_weights()
            raise


class _Run:
    """One training run: built step by step (:meth:`_start`), then the epochs (:meth:`run`)."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext, resume: str | None) -> None:
        self.cfg, self.ctx, self.resume = cfg, ctx, resume
        self.dir = RunDir(cfg.output, is_main=ctx.is_main)
        self.made: list[Path] = []  # what a failed start removes
        self.resumed_from: Path | None = None
        self.state = LoopState()

    def discard_if_no_weights(self) -> None:
        """After a failed write before any weights were saved: nothing here can be resumed, and the
        metrics of the lost steps would make the next run refuse the folder, so what this run made
        goes, as after a failed start."""
        d = self.dir
        if self.resumed_from is None and not (d.path / "best.pth").exists() and not checkpoint_files(d.ckpt_dir):
            d.discard([*self.made, *(d.path / t for t in TRACES)])

    def run(self, callbacks: list) -> TrainResult:
        try:
            self._start(self._resume_point())
        except BaseException:
            self.dir.discard(self.made)
            raise
        cfg, state, ctx = self.cfg, self.state, self.ctx
        if state.epoch >= cfg.epochs:
            return self._nothing_left()
        if self.resumed_from is not None:
            log(ctx, f"resumed from {self.resumed_from} (epoch {state.epoch + 1}, step {state.global_step})")
        self.dir.prepare(cfg.to_dict() | ({"data": str(self.root)} if self.root is not None else {}))
        self.recorder.truncate(state.global_step, state.epoch)  # back to the checkpoint
        barrier(ctx)
        self.parts.recorder = self.recorder
        log(ctx, self.banner)
        t_run = time.time()
        for epoch in range(state.epoch, cfg.epochs):
            first_step = state.step_in_epoch if epoch == state.epoch else 0
            state.epoch, state.step_in_epoch = epoch, first_step
            self.scheduler.step(epoch)
            self.data.sampler.set_epoch(epoch, first_step * self.parts.accumulation_steps * cfg.batch_size)
            self.model.train()
            self._freeze_for(epoch)
            if self.parts.teacher is not None:
                self.parts.teacher.eval()

            def on_step(end_of_epoch: bool, epoch: int = epoch) -> None:
                info = {"epoch": epoch, "step_in_epoch": state.step_in_epoch, "global_step": state.global_step}
                for callback in callbacks:
                    callback("step", info)
                every = cfg.checkpoint_every_steps
                if every and state.global_step % every == 0 and not end_of_epoch:
                    self._save_checkpoint(complete=False)

            stats = train_one_epoch(self.parts, self.data.train_loader, cfg, state, first_step, on_step)
            self._note_skipped(stats.pop("bad"), "training")
            record = self._end_of_epoch(stats)
            self._save_checkpoint(complete=True)
            for callback in callbacks:
                callback("epoch", record)
        return self._finish(time.time() - t_run)

    # ---- building ------------------------------------------------------------------------------
    def _resume_point(self) -> tuple[Path, dict] | None:
        """Rank 0 applies the overwrite guard and picks the checkpoint (before anything is written);
        every rank gets its verdict, so all fail together or all load the same file."""
        ctx = self.ctx
        verdict: list = [None, None]  # (error class, message), checkpoint path
        found, error = None, None
        if ctx.is_main:
            try:
                found = (
                    self._elastic_resume_point() if self.dir.elastic_restart() else self.dir.resume_point(self.resume)
                )
                verdict[1] = str(found[0]) if found else None
            except LeViTError as e:
                error, verdict[0] = e, (type(e).__name__, str(e))
        if ctx.is_distributed:
            dist.broadcast_object_list(verdict, src=0)
        if error is not None:
            raise error
        if verdict[0] is not None:
            raise (CheckpointError if verdict[0][0] == "CheckpointError" else LeViTError)(verdict[0][1])
        if ctx.is_main or verdict[1] is None:
            return found
        from .rundir import load_state

        return Path(verdict[1]), load_state(verdict[1])

    def _elastic_resume_point(self) -> tuple[Path, dict] | None:
        """A torchrun restart of this folder's job: continue from the newest readable checkpoint, or
        start over when the job died before its first one (the folder is its own: no guard to pass)."""
        from .rundir import find_resume_checkpoint

        found = find_resume_checkpoint(self.dir.path)
        where = f"continuing from {found[0]}" if found else "no checkpoint yet: starting over"
        log(self.ctx, f"torchrun restart {self.dir.elastic_restart()} of this run: {where}")
        return found

    def _start(self, resume_point: tuple[Path, dict] | None) -> None:
        self._build_data()
        self._build_model()
        self._build_optimization()
        if resume_point is not None:
            self._restore(*resume_point)
        else:
            seed_all(self.cfg.seed + 7919 * self.ctx.rank)
        self.recorder = MetricsRecorder(self.dir.path, self.ctx.is_main, self.cfg.tensorboard)
        self._wrap()

    def _build_data(self) -> None:
        from ..data.digits import make_digits_folder
        from ..data.loaders import build_run_loaders

        cfg, ctx = self.cfg, self.ctx
        if cfg.dataset == "digits":  # bundled data goes into the run folder, never into --data
            self.root = self.dir.path / "digits"
            if ctx.is_main:
                if not self.root.exists():
                    self.made.append(self.root)
                make_digits_folder(self.root, seed=0)
            barrier(ctx)
        else:  # None: the recipe's train_shards/val_shards patterns name the data
            self.root = Path(cfg.data) if cfg.data is not None else None
        self.data = build_run_loaders(
            cfg, self.root, world=ctx.world_size, rank=ctx.rank, pin_memory=ctx.device.type == "cuda"
        )
        self.class_names = self.data.class_names
        self.accumulation_steps = accumulation_steps(cfg, ctx.world_size)

    def _build_model(self) -> None:
        from ..factory.create import create_model
        from ..models.config import canonical_name
        from .distill import build_teacher

        cfg, ctx = self.cfg, self.ctx
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
            for warning in caught:
                log(ctx, f"note: {warning.message}")
            if cfg.reset_head and not any("re-initialised" in str(w.message) for w in caught):
                model.reset_classifier(len(self.class_names))
                log(
                    ctx,
                    f"note: the classifier head(s) are re-initialised for {len(self.class_names)} classes (reset_head)",
                )
        else:
            model = create_model(self.name, **kwargs)
        model.class_names = self.class_names
        # the model carries the preprocessing its validation uses (the recipe's crop, the normalisation
        # its training transforms apply), so the trained model in memory, its checkpoints and every
        # entry point that reads them (Preprocess.from_model) agree
        model.pretrained_cfg.update(crop_pct=cfg.eval_crop_pct, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        if distill:
            model.set_distilled_training(True)
        self.channels_last = ctx.device.type == "cuda" and cfg.channels_last
        model.to(ctx.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model, self.teacher = model, None
        if distill and cfg.teacher_cache:  # the teacher's answers read from a file, not computed
            from .teacher_cache import CachedTeacher

            self.teacher = CachedTeacher(cfg.teacher_cache, cfg, self.data, ctx.world_size).to(ctx.device)
        elif distill:
            self.teacher = build_teacher(cfg.teacher, cfg.teacher_checkpoint, len(self.class_names)).to(ctx.device)
            if self.channels_last:
                self.teacher.to(memory_format=torch.channels_last)

    def _build_optimization(self) -> None:
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
        from timm.utils import ModelEmaV3

        from ..data.transforms import build_mixup
        from .distill import DistillationLoss

        cfg, ctx = self.cfg, self.ctx
        self.total_batch = cfg.batch_size * ctx.world_size * self.accumulation_steps
        self.lr = cfg.lr * self.total_batch / cfg.lr_base_batch
        self.optimizer = build_optimizer(self.model, cfg, self.lr)
        self.updates_per_epoch = math.ceil(self.data.micro_per_epoch / self.accumulation_steps)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.updates_per_epoch)
        self.ema = ModelEmaV3(self.model, decay=cfg.model_ema_decay) if cfg.model_ema else None
        self.amp_dtype = None
        if ctx.device.type == "cuda" and cfg.amp != "none":
            bf16 = cfg.amp == "bf16" and torch.cuda.is_bf16_supported()
            self.amp_dtype = torch.bfloat16 if bf16 else torch.float16
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=self.amp_dtype == torch.float16)
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

    def _restore(self, path: Path, saved: dict) -> None:
        """Continue from checkpoint ``path`` (its contents ``saved``): weights, optimizer, schedule,
        scaler, EMA, the loop position and this rank's random streams."""
        cfg, ctx, state = self.cfg, self.ctx, self.state
        check_resume_fits(path, saved, cfg, self.class_names)
        try:
            self.model.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
            old_cfg = saved.get("train_config") or {}
            defaults = TrainConfig()  # a key the checkpoint's run did not know had its default there
            if all(old_cfg.get(k, getattr(defaults, k)) == getattr(cfg, k) for k in SCHEDULE_KEYS):
                self.scheduler.load_state_dict(saved["scheduler"])
            else:  # e.g. more epochs: the lr follows the new recipe from this epoch on
                log(ctx, "note: the lr schedule differs from the checkpoint's run; following the new recipe")
            self.scaler.load_state_dict(saved["scaler"])
            if self.ema is not None and saved.get("ema") is not None:
                self.ema.module.load_state_dict(saved["ema"])
        except (RuntimeError, ValueError, KeyError) as e:
            from ..utils import first_line

            raise CheckpointError(f"{path}: does not fit this run's model/optimizer ({first_line(e, 200)})") from None
        state.global_step = int(saved["global_step"])
        state.best_top1, state.best_epoch = float(saved.get("best_top1", -1.0)), int(saved.get("best_epoch", 0))
        state.last = dict(saved.get("last") or {})
        if saved.get("epoch_complete", True):
            state.epoch, state.step_in_epoch = int(saved["epoch"]) + 1, 0
        else:
            state.epoch, state.step_in_epoch = int(saved["epoch"]), int(saved["step_in_epoch"])
        rng_states = saved.get("rng") or []
        if len(rng_states) == ctx.world_size:
            set_rng_state(rng_states[ctx.rank])
        else:
            made_with = f"checkpoint made with {len(rng_states)} processes, now {ctx.world_size}"
            log(ctx, f"warning: {made_with}: random streams restart")
            seed_all(cfg.seed + 7919 * ctx.rank + state.global_step)
        self.resumed_from = path

    def _forward_models(self) -> tuple[nn.Module, nn.Module]:
        """The DDP wrapper (or the model) and what runs forward (that, compiled or not). DDP registers
        the parameters that require gradients when it is built: a run that freezes or releases the
        trunk builds it again."""
        cfg, ctx = self.cfg, self.ctx
        ddp_wrapper: nn.Module = self.model
        if ctx.is_distributed:
            cuda = ctx.device.type == "cuda"
            device_ids = [ctx.local_rank] if cuda else None
            ddp_wrapper = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        return ddp_wrapper, torch.compile(ddp_wrapper) if cfg.compile else ddp_wrapper

    def _freeze_for(self, epoch: int) -> None:
        """The trunk frozen during the first ``freeze_epochs`` epochs (the heads learn alone), then released."""
        frozen = epoch < self.cfg.freeze_epochs
        changed = freeze_trunk(self.model, frozen)
        if changed:
            what = "frozen: only the classifier head(s) learn" if frozen else "released: every layer learns"
            log(self.ctx, f"epoch {epoch + 1}: the trunk is {what}")
        if changed and self.ctx.is_distributed:
            self.parts.ddp_wrapper, self.parts.forward_model = self._forward_models()

    def _wrap(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        freeze_trunk(self.model, self.state.epoch < cfg.freeze_epochs)  # before DDP registers the parameters
        ddp_wrapper, forward_model = self._forward_models()
        n_train, n_val = self.data.sizes
        scaled = (
            ""
            if self.total_batch == cfg.lr_base_batch
            else f" (lr {cfg.lr:g} x {self.total_batch}/{cfg.lr_base_batch})"
        )
        self.banner = (
            f"training {self.name} ({len(self.class_names)} classes, {n_train} train / {n_val} val images) on "
            f"{ctx.world_size} x {ctx.device.type}; batch {cfg.batch_size} x {ctx.world_size} process(es) x {self.accumulation_steps} accumulation"
            f" = {self.total_batch}, lr {self.lr:.3g}{scaled}, distillation {cfg.distillation}, amp {self.amp_dtype or 'off'}"
        )
        if self.state.epoch < cfg.freeze_epochs:
            self.banner += f"; the trunk is frozen until epoch {cfg.freeze_epochs} (only the head(s) learn)"
        for note in self.data.notes:
            self.banner += f"\nnote: {note}"
        updates = self.updates_per_epoch
        if self.accumulation_steps > 1 and updates < SMALL_DATA_UPDATES:  # an ImageNet recipe on a small dataset
            self.banner += (
                f"\nnote: this recipe is made for a large dataset: on {n_train} training images it means an effective "
                f"batch of {self.total_batch} ({self.accumulation_steps} accumulation steps), lr {cfg.lr:g} x {self.total_batch}/"
                f"{cfg.lr_base_batch} = {self.lr:.3g} and {updates} optimizer update(s) per epoch; for a small "
                "dataset use --config digits, or total_batch=null with your own batch_size and lr"
            )
        self.parts = EpochParts(
            model=self.model,
            forward_model=forward_model,
            ddp_wrapper=ddp_wrapper,
            criterion=self.criterion,
            optimizer=self.optimizer,
            scaler=self.scaler,
            ema=self.ema,
            mixup=self.mixup,
            teacher=self.teacher,
            ctx=ctx,
            amp_dtype=self.amp_dtype,
            accumulation_steps=self.accumulation_steps,
            micro_batches_per_epoch=self.data.micro_per_epoch,
            updates_per_epoch=self.updates_per_epoch,
            samples_per_epoch=self.data.micro_per_epoch * cfg.batch_size * ctx.world_size,
            recorder=None,
            scheduler=self.scheduler,
        )

    # ---- the epochs ----------------------------------------------------------------------------
    def _metadata(self) -> dict:
        from ..weights.format import build_metadata

        return build_metadata(self.model, eval={"img_size": self.cfg.img_size, "crop_pct": self.cfg.eval_crop_pct})

    def _save_checkpoint(self, complete: bool) -> None:
        ctx, state, cfg = self.ctx, self.state, self.cfg
        rng_states = gather_lists(ctx, [rng_state()])
        if not ctx.is_main:
            return
        payload = {
            "model": self.model.state_dict(),
            "levit": self._metadata(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": state.epoch,
            "step_in_epoch": state.step_in_epoch,
            "epoch_complete": complete,
            "global_step": state.global_step,
            "sampler": self.data.sampler.state_dict()
            | {"start": state.step_in_epoch * self.accumulation_steps * cfg.batch_size},
            "rng": rng_states,
            "best_top1": state.best_top1,
            "best_epoch": state.best_epoch,
            "last": {k: v for k, v in state.last.items() if isinstance(v, (int, float))},
            "world_size": ctx.world_size,
            "train_config": cfg.to_dict(),
        }
        self.dir.save_checkpoint(payload, state.global_step, cfg.keep_last)

    def _note_skipped(self, bad: list, split: str) -> None:
        new = [(path, reason) for path, reason in bad if path not in self.state.skipped]
        for path, reason in bad:
            self.state.skipped.setdefault(path, reason)
        if new:
            count = len({path for path, _ in new})
            log(self.ctx, f"warning: skipped {count} unreadable {split} image(s), e.g. {new[0][0]} ({new[0][1]})")

    def _end_of_epoch(self, stats: dict) -> dict:
        cfg, ctx, state = self.cfg, self.ctx, self.state
        if ctx.is_distributed:  # BN statistics made identical on all ranks before evaluating
            for buffer in self.model.buffers():
                dist.broadcast(buffer, 0)
        record: dict[str, Any] = {"event": "epoch", "epoch": state.epoch + 1, "train_loss": stats["train_loss"]}
        record |= {"lr": max(g["lr"] for g in self.optimizer.param_groups), "epoch_time_s": stats["epoch_time_s"]}
        record |= {"train_img_s": stats["train_img_s"]}
        if (state.epoch + 1) % cfg.eval_every == 0 or state.epoch + 1 == cfg.epochs:
            options = dict(amp_dtype=self.amp_dtype, channels_last=self.channels_last)
            metrics = evaluate(self.model, self.data.val_loader, ctx.device, **options)
            self._note_skipped(metrics.pop("skipped"), "validation")
            record.update(top1=metrics["top1"], top5=metrics["top5"], val_loss=metrics["loss"], val_images=metrics["n"])
            if self.ema is not None:
                ema_metrics = evaluate(self.ema.module, self.data.val_loader, ctx.device, **options)
                record.update(
                    ema_top1=ema_metrics["top1"], ema_top5=ema_metrics["top5"], ema_val_loss=ema_metrics["loss"]
                )
            state.last = metrics
            if metrics["top1"] > state.best_top1:
                state.best_top1, state.best_epoch = metrics["top1"], state.epoch + 1
                if ctx.is_main:
                    payload = {"model": self.model.state_dict(), "levit": self._metadata()}
                    self.dir.save_best(payload | {"epoch": state.epoch + 1, "top1": metrics["top1"]})
            ema = f", EMA top-1 {record['ema_top1']:.2f}%" if self.ema is not None else ""
            log(
                ctx,
                f"epoch {state.epoch + 1}/{cfg.epochs}: train loss {stats['train_loss']:.4f}, val top-1 "
                f"{metrics['top1']:.2f}% top-5 {metrics['top5']:.2f}% loss {metrics['loss']:.4f}{ema} "
                f"({stats['epoch_time_s']:.1f}s)",
            )
        record["skipped_images"] = len(state.skipped)
        self.recorder.write(record, step=state.epoch + 1)
        return record

    def _finish(self, total_time: float) -> TrainResult:
        cfg, state = self.cfg, self.state
        last = state.last
        summary = {"event": "summary", "best_top1": state.best_top1, "best_epoch": state.best_epoch}
        summary |= {"final_top1": last.get("top1"), "final_top5": last.get("top5"), "epochs": cfg.epochs}
        summary |= {"steps": state.global_step, "time_s": total_time, "skipped_images": len(state.skipped)}
        self.recorder.write(summary)
        self.recorder.close()
        final = f"final top-1 {last['top1']:.2f}% top-5 {last['top5']:.2f}%; " if "top1" in last else ""
        log(
            self.ctx,
            f"done: best top-1 {state.best_top1:.2f}% at epoch {state.best_epoch}; {final}{total_time:.1f}s; "
            f"weights {self.dir.path / 'best.pth'}",
        )
        return self._result()

    def _nothing_left(self) -> TrainResult:
        state = self.state
        log(
            self.ctx,
            f"nothing left to do: {self.dir.path} already finished {state.epoch} of {self.cfg.epochs} epoch(s) "
            f"(best top-1 {state.best_top1:.2f}% at epoch {state.best_epoch}); raise epochs=N to train longer",
        )
        return self._result(finished_before=True)

    def _result(self, finished_before: bool = False) -> TrainResult:
        self.model.eval()
        if self.cfg.distillation != "none":
            self.model.set_distilled_training(False)
        state = self.state
        out = self.dir.path
        return TrainResult(
            state.best_top1, state.best_epoch, state.last, out, self.model, sorted(state.skipped), finished_before
        )
