"""Knowledge distillation: a frozen teacher and the none / soft / hard losses (DeiT, LeViT).

The student is a two-head LeViT in distilled-training mode: ``head`` learns from the (mixed) labels,
``head_dist`` from the teacher. With weight ``alpha``:

- ``none``: ``base(head, targets)``
- ``soft``: ``(1 - alpha) * base(head, targets) + alpha * tau^2 * KL(softmax(teacher / tau) || softmax(head_dist / tau))``
  with the KL summed over the batch and the classes and divided by the number of logits (B x classes),
  as DeiT's released code does (``DistillationLoss`` in facebookresearch/deit ``losses.py``, divided by
  ``outputs_kd.numel()``; its authors keep it as the normalisation that reproduces their results);
  ``kl_norm="batch"`` divides by the batch size instead (the per-sample KL of Hinton et al., 2015,
  "Distilling the Knowledge in a Neural Network"; PyTorch's ``reduction="batchmean"``)
- ``hard``: ``(1 - alpha) * base(head, targets) + alpha * CE(head_dist, argmax(teacher))``
  (the paper: alpha = 0.5)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..errors import CheckpointError, LeViTError
from ..utils import first_line

__all__ = ["DISTILLATION_MODES", "KL_NORMS", "DistillationLoss", "Teacher", "build_teacher", "distillation_loss"]

DISTILLATION_MODES = ("none", "soft", "hard")
KL_NORMS = ("numel", "batch")  # soft distillation: divide the summed KL by B x classes (DeiT) or by B


def distillation_loss(
    outputs: Tensor | tuple[Tensor, Tensor],
    targets: Tensor,
    teacher_logits: Tensor | None,
    *,
    mode: str,
    alpha: float = 0.5,
    tau: float = 1.0,
    base: Callable[[Tensor, Tensor], Tensor] | None = None,
    kl_norm: str = "numel",
) -> Tensor:
    """The training loss of a (possibly two-head) student.

    Args:
        outputs: ``head`` logits, or ``(head, head_dist)`` from a model in distilled training.
        targets: class indices (B,) or soft/mixed targets (B, classes) for ``base``.
        teacher_logits: (B, classes) teacher outputs on the same inputs (ignored for ``none``).
        mode: ``none`` / ``soft`` / ``hard``.
        alpha: weight of the teacher term.
        tau: softmax temperature of ``soft``.
        base: the label loss (default: cross-entropy, which accepts class indices or probabilities).
        kl_norm: ``soft`` only: ``"numel"`` divides the summed KL by the number of logits, as DeiT's
            released code (its ``losses.py``: ``/ outputs_kd.numel()``); ``"batch"`` by the batch size
            (the per-sample KL of Hinton et al., 2015; ``reduction="batchmean"``), ``classes`` times larger.
    """
    if mode not in DISTILLATION_MODES:
        raise ValueError(f"distillation must be one of {DISTILLATION_MODES}, got {mode!r}")
    if kl_norm not in KL_NORMS:
        raise ValueError(f"kl_norm must be one of {KL_NORMS}, got {kl_norm!r}")
    base = base or F.cross_entropy
    head, head_dist = outputs if isinstance(outputs, tuple) else (outputs, outputs)
    label_loss = base(head, targets)
    if mode == "none":
        return label_loss
    if teacher_logits is None:
        raise ValueError(f"distillation {mode!r} needs teacher logits")
    teacher_logits = teacher_logits.detach().float()
    head_dist = head_dist.float()
    if mode == "soft":
        kl = F.kl_div(
            F.log_softmax(head_dist / tau, dim=1),
            F.log_softmax(teacher_logits / tau, dim=1),
            reduction="sum",
            log_target=True,
        )
        teacher_loss = kl * (tau * tau) / (head_dist.numel() if kl_norm == "numel" else head_dist.shape[0])
    else:
        teacher_loss = F.cross_entropy(head_dist, teacher_logits.argmax(dim=1))
    return (1.0 - alpha) * label_loss + alpha * teacher_loss


class DistillationLoss(nn.Module):
    """``loss(inputs, outputs, targets)``: runs the teacher on ``inputs`` and applies
    :func:`distillation_loss`."""

    def __init__(
        self,
        base: Callable[[Tensor, Tensor], Tensor],
        teacher: nn.Module | None,
        mode: str = "none",
        alpha: float = 0.5,
        tau: float = 1.0,
        kl_norm: str = "numel",
    ) -> None:
        super().__init__()
        if mode not in DISTILLATION_MODES:
            raise ValueError(f"distillation must be one of {DISTILLATION_MODES}, got {mode!r}")
        if kl_norm not in KL_NORMS:
            raise ValueError(f"kl_norm must be one of {KL_NORMS}, got {kl_norm!r}")
        if mode != "none" and teacher is None:
            raise ValueError(f"distillation {mode!r} needs a teacher")
        self.base, self.teacher, self.mode, self.alpha, self.tau = base, teacher, mode, alpha, tau
        self.kl_norm = kl_norm

    def forward(self, inputs: Tensor, outputs: Tensor | tuple[Tensor, Tensor], targets: Tensor) -> Tensor:
        teacher_logits = None
        if self.mode != "none":
            with torch.no_grad():
                teacher_logits = self.teacher(inputs)
        return distillation_loss(
            outputs,
            targets,
            teacher_logits,
            mode=self.mode,
            alpha=self.alpha,
            tau=self.tau,
            base=self.base,
            kl_norm=self.kl_norm,
        )


class Teacher(nn.Module):
    """A frozen teacher: always in eval mode, no gradients, fed the student's (normalised, mixed)
    images re-normalised with its own mean/std (and resized if it needs another input size)."""

    def __init__(
        self,
        model: nn.Module,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        input_mean: tuple[float, ...] = IMAGENET_MEAN,
        input_std: tuple[float, ...] = IMAGENET_STD,
        img_size: int | None = None,
    ) -> None:
        super().__init__()
        self.model = model.eval()
        for param in self.model.parameters():
            param.requires_grad_(False)
        # x_teacher = (x * input_std + input_mean - mean) / std = x * scale + shift
        scale = torch.tensor(input_std) / torch.tensor(std)
        shift = (torch.tensor(input_mean) - torch.tensor(mean)) / torch.tensor(std)
        self.renorm = not (torch.allclose(scale, torch.ones(3)) and torch.allclose(shift, torch.zeros(3)))
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, 3, 1, 1), persistent=False)
        self.img_size = img_size

    def train(self, mode: bool = True) -> Teacher:
        """The teacher stays in eval mode whatever the caller asks (BN statistics never move)."""
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        if self.renorm:
            x = x * self.scale.to(x.dtype) + self.shift.to(x.dtype)
        if self.img_size is not None and x.shape[-1] != self.img_size:
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bicubic", align_corners=False)
        out = self.model(x)
        return out[0] if isinstance(out, tuple) else out


def _check_teacher_name(name: str | None, variant: str, path: Path) -> None:
    """A levit file names its own variant, so ``name`` does not build the teacher; a name that is no
    model at all, or another levit variant, is still the user's mistake (a typo recorded in the run's
    config.yaml as if it had been the teacher), so it is refused rather than ignored. A timm name (the
    recipes' default, regnety_160) beside a levit file is the recipe's default teacher left in place."""
    from ..models.config import canonical_name

    if name is None:
        return
    try:
        given = canonical_name(name)
    except ValueError:
        import timm

        if not timm.is_model(name):
            raise LeViTError(f"--teacher: {name!r} is neither a levit model nor a timm model name") from None
        return
    if given != variant:
        raise LeViTError(f"--teacher {name}: --teacher-checkpoint {path} holds a {variant}, not a {given}")


def build_teacher(
    name: str | None,
    checkpoint: str | os.PathLike | None,
    num_classes: int,
    *,
    input_mean: tuple[float, ...] = IMAGENET_MEAN,
    input_std: tuple[float, ...] = IMAGENET_STD,
) -> Teacher:
    """A frozen :class:`Teacher` from a levit checkpoint (any format ``create_model`` reads) or a timm
    model ``name`` (default ``regnety_160``) with a weights file. Nothing is ever downloaded.

    Raises :class:`LeViTError` when the weights are missing or do not fit ``num_classes``.
    """
    from ..factory.create import create_model
    from ..models.config import canonical_name
    from ..weights.format import read_checkpoint, read_metadata

    if checkpoint is None:
        raise LeViTError(
            f"distillation needs --teacher-checkpoint PATH (weights for teacher {name or 'regnety_160'}; "
            "teacher weights are never downloaded)"
        )
    path = Path(checkpoint)
    if not path.is_file():
        raise LeViTError(f"--teacher-checkpoint: file not found: {path}")
    try:
        meta = read_metadata(path)
    except CheckpointError:
        meta = None  # not readable as a LeViT file: maybe a timm model's; checked below
    levit_name = None
    if meta is not None:
        levit_name = meta["variant"]
        _check_teacher_name(name, levit_name, path)
    elif name is not None:
        try:
            levit_name = canonical_name(name)
        except ValueError:
            levit_name = None
    if levit_name is not None:
        model = create_model(levit_name, checkpoint=path)
        img_size = model.config.img_size
        mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    else:
        import timm

        name = name or "regnety_160"
        if not timm.is_model(name):
            raise LeViTError(f"--teacher: {name!r} is neither a levit model nor a timm model name")
        model = timm.create_model(name, pretrained=False, num_classes=num_classes)
        state_dict = read_checkpoint(path, flag="--teacher-checkpoint")[0]
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as e:
            lines = str(e).strip().splitlines()  # torch: a header line, then the missing / unexpected keys
            detail = first_line(lines[1] if len(lines) > 1 else str(e), limit=200)
            raise CheckpointError(
                f"--teacher-checkpoint: {path} does not fit timm {name} with {num_classes} classes ({detail})"
            ) from None
        cfg = model.pretrained_cfg or {}
        mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
        img_size = None  # timm CNN teachers take any size; the student's images go in as they are
    out_classes = getattr(getattr(model, "config", None), "num_classes", None) or getattr(model, "num_classes", None)
    if out_classes is not None and out_classes != num_classes:
        raise LeViTError(
            f"--teacher-checkpoint: the teacher predicts {out_classes} classes, the data has {num_classes}"
        )
    return Teacher(model, mean, std, input_mean, input_std, img_size=img_size)
