"""Distillation losses (hand-computed on toy logits) and the frozen teacher."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import levit
from levit.errors import LeViTError
from levit.train.distill import DistillationLoss, Teacher, build_teacher, distillation_loss

HEAD = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
HEAD_DIST = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.0]])
TEACHER = torch.tensor([[0.0, 0.0, 3.0], [1.0, 2.0, 0.0]])
TARGET = torch.tensor([0, 1])


def _ce(logits: list[float], k: int) -> float:
    return -(logits[k] - math.log(sum(math.exp(v) for v in logits)))


def _softmax(logits: list[float], tau: float) -> list[float]:
    z = sum(math.exp(v / tau) for v in logits)
    return [math.exp(v / tau) / z for v in logits]


def test_none_is_the_label_loss_of_head():
    loss = distillation_loss((HEAD, HEAD_DIST), TARGET, TEACHER, mode="none")
    want = (_ce([2, 0, 0], 0) + _ce([0, 1, 0], 1)) / 2
    assert loss.item() == pytest.approx(want, abs=1e-6)


def test_hard_distillation_matches_hand_computation():
    # 0.5 * CE(head, targets) + 0.5 * CE(head_dist, argmax(teacher)); argmax(teacher) = [2, 1]
    loss = distillation_loss((HEAD, HEAD_DIST), TARGET, TEACHER, mode="hard", alpha=0.5)
    label = (_ce([2, 0, 0], 0) + _ce([0, 1, 0], 1)) / 2
    teacher = (_ce([0, 1, 0], 2) + _ce([0.5, 0, 0], 1)) / 2
    assert loss.item() == pytest.approx(0.5 * label + 0.5 * teacher, abs=1e-6)
    loss = distillation_loss((HEAD, HEAD_DIST), TARGET, TEACHER, mode="hard", alpha=0.2)
    assert loss.item() == pytest.approx(0.8 * label + 0.2 * teacher, abs=1e-6)


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_soft_distillation_matches_hand_computation(tau):
    """By default as DeiT's released code: the KL summed over batch and classes, divided by the number
    of logits (B x classes = 2 x 3); ``kl_norm="batch"``: divided by the batch size (per-sample KL)."""
    loss = distillation_loss((HEAD, HEAD_DIST), TARGET, TEACHER, mode="soft", alpha=0.5, tau=tau)
    per_sample = distillation_loss((HEAD, HEAD_DIST), TARGET, TEACHER, mode="soft", alpha=0.5, tau=tau, kl_norm="batch")
    kl = 0.0
    for s, t in zip(HEAD_DIST.tolist(), TEACHER.tolist()):
        p_t, p_s = _softmax(t, tau), _softmax(s, tau)
        kl += sum(a * math.log(a / b) for a, b in zip(p_t, p_s))
    label = (_ce([2, 0, 0], 0) + _ce([0, 1, 0], 1)) / 2
    assert loss.item() == pytest.approx(0.5 * label + 0.5 * kl / 6 * tau * tau, abs=1e-6)  # x tau^2
    assert per_sample.item() == pytest.approx(0.5 * label + 0.5 * kl / 2 * tau * tau, abs=1e-6)
    with pytest.raises(ValueError, match="kl_norm"):
        distillation_loss((HEAD, HEAD_DIST), TARGET, TEACHER, mode="soft", kl_norm="mean")


def test_soft_distillation_normalisation_reaches_the_loss_module_and_recipe():
    from levit.errors import LeViTError
    from levit.train.run import resolve_config

    teacher = torch.nn.Linear(3, 3)
    x = torch.randn(2, 3)
    losses = {
        norm: DistillationLoss(torch.nn.functional.cross_entropy, teacher, "soft", kl_norm=norm)(
            x, (HEAD, HEAD_DIST), TARGET
        ).item()
        for norm in ("numel", "batch")
    }
    with torch.no_grad():
        t = teacher(x)
    for norm, got in losses.items():
        assert got == pytest.approx(distillation_loss((HEAD, HEAD_DIST), TARGET, t, mode="soft", kl_norm=norm).item())
    assert losses["numel"] != pytest.approx(losses["batch"])
    assert resolve_config(dataset="digits", model="levit_128s").distillation_kl_norm == "numel"
    with pytest.raises(LeViTError, match="distillation_kl_norm"):
        resolve_config(dataset="digits", model="levit_128s", distillation_kl_norm="sum")


def test_soft_targets_and_teacher_term_uses_distillation_head():
    soft = torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1]])  # mixed / smoothed targets
    loss = distillation_loss((HEAD, HEAD_DIST), soft, TEACHER, mode="hard", alpha=0.5)
    label = (
        sum(
            -(w * (row[k] - math.log(sum(math.exp(v) for v in row))))
            for row, t in zip(HEAD.tolist(), soft.tolist())
            for k, w in enumerate(t)
        )
        / 2
    )
    teacher = (_ce([0, 1, 0], 2) + _ce([0.5, 0, 0], 1)) / 2
    assert loss.item() == pytest.approx(0.5 * label + 0.5 * teacher, abs=1e-5)
    # gradients reach head_dist only through the teacher term
    hd = HEAD_DIST.clone().requires_grad_()
    distillation_loss((HEAD, hd), TARGET, TEACHER, mode="hard", alpha=0.0).backward()
    assert hd.grad is None or torch.count_nonzero(hd.grad) == 0


def test_distillation_loss_module_runs_teacher_on_the_same_inputs():
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(x.clone())
            return TEACHER

    x = torch.randn(2, 3, 8, 8)
    crit = DistillationLoss(nn.CrossEntropyLoss(), Teacher(Probe()), "hard", 0.5)
    loss = crit(x, (HEAD, HEAD_DIST), TARGET)
    assert torch.equal(seen[0], x)  # same mean/std: images passed unchanged
    assert loss.item() == pytest.approx(distillation_loss((HEAD, HEAD_DIST), TARGET, TEACHER, mode="hard").item())
    with pytest.raises(ValueError, match="needs a teacher"):
        DistillationLoss(nn.CrossEntropyLoss(), None, "hard")


def test_teacher_is_frozen_eval_and_renormalises():
    inner = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(5))
    inner(torch.randn(2, 3, 8, 8))
    t = Teacher(inner, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    t.train()  # asked to train: stays in eval, BN statistics never move
    assert not t.training and not inner.training
    assert all(not p.requires_grad for p in t.parameters())
    before = inner[1].running_mean.clone()
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    y = t(x)
    assert not y.requires_grad and torch.equal(inner[1].running_mean, before)
    # student images (ImageNet mean/std) -> the teacher's normalisation, computed by hand
    rec = []
    t2 = Teacher(_Record(rec), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    img = torch.rand(1, 3, 4, 4)
    student = (img - torch.tensor(levit.data.transforms.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        levit.data.transforms.IMAGENET_STD
    ).view(1, 3, 1, 1)
    t2(student)
    torch.testing.assert_close(rec[0], (img - 0.5) / 0.5, atol=1e-5, rtol=0)


class _Record(nn.Module):
    def __init__(self, rec):
        super().__init__()
        self.rec = rec

    def forward(self, x):
        self.rec.append(x)
        return x.mean((2, 3))


def test_build_teacher_from_levit_checkpoint_and_timm_name(tmp_path):
    torch.manual_seed(0)
    student_teacher = levit.create_model("levit_tiny", num_classes=4, img_size=32, distillation=False).eval()
    path = levit.save(student_teacher, tmp_path / "t.safetensors")
    t = build_teacher(None, path, 4)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(t(x), student_teacher(x))
    with pytest.raises(LeViTError, match="predicts 4 classes, the data has 10"):
        build_teacher(None, path, 10)
    # a timm model by name + a weights file (no download)
    import timm

    tm = timm.create_model("test_resnet", num_classes=4)
    torch.save({"model": tm.state_dict()}, tmp_path / "r.pth")
    t = build_teacher("test_resnet", tmp_path / "r.pth", 4)
    tm.eval()
    # test_resnet's own normalisation is mean = std = 0.5: the teacher converts the student's images
    mean, std = (
        torch.tensor(v).view(1, 3, 1, 1)
        for v in (levit.data.transforms.IMAGENET_MEAN, levit.data.transforms.IMAGENET_STD)
    )
    torch.testing.assert_close(t(x), tm((x * std + mean - 0.5) / 0.5), atol=1e-5, rtol=1e-5)
    with pytest.raises(LeViTError, match="does not fit timm test_resnet with 7 classes"):
        build_teacher("test_resnet", tmp_path / "r.pth", 7)
    with pytest.raises(LeViTError, match="never downloaded"):
        build_teacher("regnety_160", None, 4)
    with pytest.raises(LeViTError, match="neither a levit model nor a timm model"):
        build_teacher("no_such_net", tmp_path / "r.pth", 4)
