"""The tests' shared helpers: randomised models, photo-like inputs, error measures and tolerances.

A freshly built LeViT is degenerate: unit BatchNorm statistics, zero attention biases and residual
branches switched off by zero BatchNorm weights (the paper's initialisation, Section 4.2). Its
logits barely depend on the image, so a fusion, conversion or precision check run on it passes
whatever the bug. :func:`randomize_weights` turns it into a model that behaves like a trained one
in the ways those checks need: every image gets its own answer, attention biases matter, and every
residual branch contributes. Every numeric check runs on such a model and on photo-like images.

The benchmarks use these helpers too (they put ``tests/`` on ``sys.path``): test support, not library.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import Tensor, nn

import levit
from levit.data.synthetic import photo_like_images
from levit.models.config import LeViTConfig

FULL_VARIANTS = ["levit_128s", "levit_128", "levit_192", "levit_256", "levit_384"]

# The tolerances of the numeric checks (relative L2 error, :func:`rel_l2_error`, on photo-like
# images); the planted-bug tests (test_planted_bugs.py) show that real bugs exceed them by orders of magnitude.
FUSE_TOL = 1e-4  # fused vs unfused, fp32
PARITY_TOL = 1e-5  # ours vs timm's LeViT, fp32


def sample_images(n: int, img_size: int | tuple[int, int] = 224, *, seed: int = 0, channels: int = 3) -> Tensor:
    """``n`` synthetic photo-like images, ImageNet-normalised, shape (n, channels, H, W) for an
    ``img_size`` side or (H, W) (:func:`levit.data.synthetic.photo_like_images`; channels past the
    third get a mean of 0.45 and a std of 0.225)."""
    mean = ([0.485, 0.456, 0.406] + [0.45] * max(channels - 3, 0))[:channels]
    std = ([0.229, 0.224, 0.225] + [0.225] * max(channels - 3, 0))[:channels]
    return photo_like_images(n, img_size, seed=seed, mean=mean, std=std)


# The last BatchNorm of each residual branch gets weights of this order: the identity path carries the
# image through the depth and each branch perturbs it. Measured on levit_128s / levit_384 with
# sample_images: at 0.1 fp32 stays within ~1e-5 of float64 while a zeroed, permuted or q/k-swapped
# attention moves the logits by 5e-2 or more; at 0.35 fp32 rounding grows to ~1e-4 (chaotic).
_RESIDUAL_SCALE = 0.1


def _bias_table(heads: int, grid: tuple[int, int], g: torch.Generator) -> Tensor:
    """A (heads, h*w) relative-position bias table over the (dy, dx) offsets of an (h, w) grid, of a
    trained model's magnitude: each head prefers near (or, for some heads, far) offsets with its own
    slope, plus structure-free noise."""
    h, w = grid
    dy = torch.arange(h, dtype=torch.float32).view(-1, 1) / max(h - 1, 1)
    dx = torch.arange(w, dtype=torch.float32).view(1, -1) / max(w - 1, 1)
    dist = (dy**2 + dx**2).sqrt().reshape(-1)  # 0..sqrt(2), whatever the grid's aspect
    slope = torch.randn(heads, 1, generator=g) * 2.0
    return -slope * dist + torch.randn(heads, h * w, generator=g) * 0.7


def _bias_grid(owner: nn.Module, n: int) -> tuple[int, int]:
    """The (h, w) offset grid of ``owner``'s bias table of ``n`` entries: its ``resolution`` (levit's
    attention modules: the build grid), else a square grid (other LeViTs, e.g. transformers')."""
    res = getattr(owner, "resolution", None)
    if isinstance(res, int):
        res = (res, res)
    if isinstance(res, tuple) and len(res) == 2 and res[0] * res[1] == n:
        return res
    r = round(n**0.5)
    if r * r != n:
        raise ValueError(f"cannot tell the grid of a {n}-entry bias table in {type(owner).__name__}")
    return r, r


def _randomize_parameters(model: nn.Module, g: torch.Generator) -> None:
    """Every weight of ``model`` drawn from ``g`` as :func:`randomize_weights` describes (statistics aside)."""
    for name, prm in model.named_parameters():
        if name.endswith("attention_biases"):
            owner = model.get_submodule(name.rpartition(".")[0])
            prm.copy_(_bias_table(prm.shape[0], _bias_grid(owner, prm.shape[1]), g))
    for m in model.modules():  # every weight from the seed: the model does not depend on torch's global RNG
        if isinstance(m, nn.Linear | nn.Conv2d):
            m.weight.normal_(0.0, m.weight[0].numel() ** -0.5, generator=g)
            if m.bias is not None:  # biased layers without a BatchNorm after them (ablation A3)
                m.bias.normal_(0.0, 0.1, generator=g)
        elif isinstance(m, nn.LayerNorm) and m.weight is not None:  # ablation A3
            m.weight.uniform_(0.5, 1.5, generator=g)
            m.bias.normal_(0.0, 0.1, generator=g)
    pos = getattr(model, "pos_embed", None)
    if isinstance(pos, nn.Parameter):  # ablation A5: absolute position embedding, a trained one's magnitude
        pos.normal_(0.0, 0.5, generator=g)
    residual_bns = {
        id(m.bn)
        for n, m in model.named_modules()
        if n.endswith(("attn.proj", "mlp.fc2")) and ".downsample.attn" not in n and hasattr(m, "bn")
    }
    for n, m in model.named_modules():  # ablation A3: no BatchNorm ends the branch; scale its linear
        if (
            n.endswith(("attn.proj", "mlp.fc2"))
            and ".downsample.attn" not in n
            and isinstance(getattr(m, "bn", None), nn.Identity)
        ):
            m.linear.weight.mul_(_RESIDUAL_SCALE)
            m.linear.bias.mul_(_RESIDUAL_SCALE)
    for m in model.modules():  # transformers' LeViT: a residual layer wraps its branch as `.module`
        branch = getattr(m, "module", None)
        if "Residual" in type(m).__name__ and isinstance(branch, nn.Module):
            last = [b for b in branch.modules() if isinstance(b, nn.BatchNorm1d | nn.BatchNorm2d)][-1:]
            residual_bns.update(id(b) for b in last)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            scale = _RESIDUAL_SCALE if id(m) in residual_bns else 1.0  # a branch adds to, not replaces, the stream
            m.weight.uniform_(0.5 * scale, 1.5 * scale, generator=g)
            m.bias.normal_(0.0, 0.1, generator=g)
    for head in (getattr(model, "head", None), getattr(model, "head_dist", None)):
        linear = getattr(head, "linear", None)
        if isinstance(linear, nn.Linear):
            fan_in = linear.weight.shape[1]
            linear.weight.normal_(0.0, 2.0 / fan_in**0.5, generator=g)
            linear.bias.normal_(0.0, 0.1, generator=g)


def _measure_bn_statistics(model: nn.Module, images: Tensor) -> None:
    """BatchNorm running statistics of ``model`` measured by one forward pass over ``images`` (only
    the BatchNorms in training mode: exact statistics, no drop-path noise); modes restored."""
    p = next(model.parameters())
    was_training = {m: m.training for m in model.modules()}
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)]
    momenta = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one pass gives the statistics of these images
        m.train()
    try:
        model(images.to(device=p.device, dtype=p.dtype))
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
            # A channel whose spread is tiny next to its mean (or to the layer's typical spread) turns
            # fp32 rounding into large errors in eval mode (cancellation, then division by ~0): the
            # checks would fail on noise. Bound that amplification; the signal is kept.
            floor = torch.maximum((0.5 * m.running_mean).square(), 0.05 * m.running_var.mean())
            m.running_var.copy_(torch.maximum(m.running_var, floor))
        for m, mode in was_training.items():
            m.training = mode


@torch.no_grad()
def randomize_weights(model: nn.Module, seed: int = 0, *, images: Tensor | None = None) -> nn.Module:
    """Make ``model`` (a LeViT) behave like a trained network for numeric checks, in place; returns it.

    - attention-bias tables of a trained model's magnitude (a distance preference per head + noise);
    - every convolution and linear weight drawn from ``seed`` (variance-preserving), so the model
      does not depend on torch's global random state;
    - BatchNorm affine terms drawn at random, the last BatchNorm of every residual branch included
      (zero in a fresh model) but small, so that the residual stream keeps the image's signal over
      the depth instead of being swamped (chaotic, fp32 noise grows) or switched off;
    - classifier weights large enough that the softmax is not flat;
    - the Table 5 ablations' extra parameters: biased linears/convs and LayerNorms (A3, whose
      residual branches end in a linear scaled like the BatchNorm above), position embedding (A5);
    - BatchNorm running statistics measured by a forward pass in training mode over ``images``
      (default: 4 :func:`sample_images`), so that, as in a trained model, every layer sees
      normalised activations on photo-like inputs.

    The model's mode (train/eval) is restored; nothing else (dropout, drop-path) is randomised.
    Check such a model on photo-like inputs (:func:`sample_images`): on white noise, far from the
    statistics it was calibrated on, its activations grow and fp32 rounding with them.
    """
    g = torch.Generator().manual_seed(seed)
    _randomize_parameters(model, g)
    cfg = getattr(model, "config", None)
    cfg = cfg if isinstance(cfg, LeViTConfig) else None  # e.g. transformers' LeViT: 224x224 RGB
    if images is None:
        size = cfg.img_hw if cfg is not None else 224
        images = sample_images(4, size, seed=seed, channels=cfg.in_chans if cfg is not None else 3)
    _measure_bn_statistics(model, images)
    return model


def write_sample_jpegs(
    folder: str | os.PathLike,
    n: int,
    size: tuple[int, int] = (375, 500),
    *,
    seed: int = 0,
    quality: int = 90,
    prefix: str = "img",
) -> list[Path]:
    """Write ``n`` photo-like JPEGs of ``size`` (H, W) into ``folder`` (:func:`sample_images`' scenes)
    and return their paths, sorted. Large sizes are drawn at most 1024 px wide, upscaled (bicubic) and
    given fresh per-pixel sensor noise, so a 12-megapixel "phone photo" takes a fraction of a second
    and still costs a decoder what a real one does (its JPEG is about 2 MB at quality 90)."""
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    h, w = size
    scale = max(1, math.ceil(max(h, w) / 1024))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        x = sample_images(1, (math.ceil(h / scale), math.ceil(w / scale)), seed=seed + i)[0] * std + mean
        im = Image.fromarray((x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
        if scale > 1:
            a = np.asarray(im.resize((w, h), Image.BICUBIC), dtype=np.int16)
            a = a + rng.integers(-4, 5, size=a.shape, dtype=np.int16)  # sensor noise at full resolution
            im = Image.fromarray(a.clip(0, 255).astype(np.uint8))
        paths.append(folder / f"{prefix}_{i:05d}.jpg")
        im.save(paths[-1], quality=quality)
    return paths


def randomized_model(name: str = "levit_tiny", seed: int = 0, **kwargs: object) -> nn.Module:
    """``levit.create_model(name, **kwargs)`` with randomised, trained-like weights, in eval mode.
    Deterministic: the initial draws come from ``seed`` too, and the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return randomize_weights(levit.create_model(name, **kwargs), seed=seed).eval()


def tiny_model(seed: int = 0, img_size: int | tuple[int, int] = 64, **kwargs: object) -> nn.Module:
    """The tiny variant (64 px by default), randomised: the model of most fast tests."""
    return randomized_model("levit_tiny", seed, img_size=img_size, **kwargs)


def rel_l2_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error ||a - b||_2 / ||b||_2 over the whole tensor (in float64).

    (``levit.runtime.export`` judges exports by another measure, the largest absolute difference
    over the largest absolute value, ``max |a - b| / max |b|``.)"""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def photos(n: int = 2, size: int | tuple[int, int] = 224, seed: int = 0) -> torch.Tensor:
    """Photo-like test inputs (:func:`sample_images`), distinct from the calibration ones."""
    return sample_images(n, size, seed=1000 + seed)


def fake_lanes(monkeypatch, per_lane) -> None:
    """``levit.runtime.deploy.deploy_lanes`` replaced: each lane is ``per_lane(model, threads=..., **kw)``
    (a runner, as :func:`levit.deploy` returns one, given deploy's keywords), so that a test runs the
    lanes' scheduling on fakes or counts what each lane was asked for."""
    import importlib

    deploy_mod = importlib.import_module("levit.runtime.deploy")

    def lanes(model, lanes, *, threads=1, **kw):
        return [per_lane(model, threads=threads, **kw) for _ in range(lanes)]

    monkeypatch.setattr(deploy_mod, "deploy_lanes", lanes)
