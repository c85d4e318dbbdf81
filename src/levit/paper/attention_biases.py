"""The learned attention biases of a LeViT, as arrays and as one picture.

Every attention layer holds a table of shape (heads, h*w): the bias between a query and a key at
offset (dy, dx) on the h x w token grid is ``table[head, |dy| * w + |dx|]`` (paper, section 4.2,
"attention bias"). :func:`attention_biases` returns each table as a (heads, h, w) array indexed by
(|dy|, |dx|); :func:`plot_biases` draws every head over the full, mirrored offset grid
(dy in -(h-1) .. h-1, dx in -(w-1) .. w-1), one row per attention layer, like the paper's per-head
bias figures.

For a shrink attention the offsets are between the stride-2 query position and a key on the input
grid. Resampling a model to another resolution (``create_model(..., img_size=...)``) resamples the
tables: draw the result to see what the network would use there.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import LeViTError
from ..utils import atomic_path, save_figure

__all__ = ["attention_biases", "draw_biases", "plot_biases", "save_biases"]


def _table(module: nn.Module) -> torch.Tensor | None:
    """(heads, h*w) bias table of an attention layer, trained form or fused form."""
    table = getattr(module, "attention_biases", None)
    if isinstance(table, torch.Tensor):
        return table.detach()
    bias = getattr(module, "attn_bias", None)  # fused: (H, N_q, N_k) gathered matrix
    if isinstance(bias, torch.Tensor):
        # the query at grid position (0, 0) sees the key at (dy, dx) with offset (dy, dx): row 0
        # of the gathered matrix is the whole table, for plain and for shrink attention alike
        return bias[:, 0, :].detach()
    return None


def attention_biases(model: nn.Module) -> dict[str, np.ndarray]:
    """Every attention layer's bias as a float32 array of shape (heads, h, w), indexed [head, |dy|, |dx|].

    Keys are ``stage{s}.shrink`` (the shrink attention entering stage s) and ``stage{s}.block{j}``,
    in network order. Works on the trained (:class:`~levit.models.network.LeViT`) and the fused form.
    """
    cfg = getattr(model, "config", None)
    stages = getattr(model, "stages", None)
    if cfg is None or stages is None:
        raise LeViTError(f"attention_biases needs a levit model, got {type(model).__name__}")
    if getattr(cfg, "pos", "bias") != "bias":
        raise LeViTError(f"{cfg.name} ({cfg.ablation}) has no attention biases: it adds a position embedding instead")
    out: dict[str, np.ndarray] = {}
    for s, stage in enumerate(stages):
        layers = [] if isinstance(stage.downsample, nn.Identity) else [("shrink", stage.downsample.attn)]
        layers += [(f"block{j}", blk.attn) for j, blk in enumerate(stage.blocks)]
        for name, attn in layers:
            table = _table(attn)
            if table is None:  # pragma: no cover - every LeViT attention has one
                raise LeViTError(f"stage {s} {name}: no attention-bias table found")
            h, w = attn.resolution  # the (h, w) key grid the table is laid out on
            out[f"stage{s}.{name}"] = table.float().cpu().reshape(table.shape[0], h, w).numpy()
    return out


def save_biases(tables: dict[str, np.ndarray], path: str | os.PathLike) -> Path:
    """The arrays of :func:`attention_biases` as one ``.npz`` (same keys), written atomically."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **tables)
    return path


def _mirror(t: np.ndarray) -> np.ndarray:
    """(h, w) over (|dy|, |dx|) -> (2h-1, 2w-1) over (dy, dx) = (-(h-1) .. h-1, -(w-1) .. w-1)."""
    rows = np.concatenate([t[:0:-1], t], axis=0)
    return np.concatenate([rows[:, :0:-1], rows], axis=1)


def plot_biases(tables: dict[str, np.ndarray], path: str | os.PathLike, title: str | None = None) -> Path:
    """One PNG: a row per attention layer, a column per head, each head's bias over (dy, dx).

    Needs matplotlib (``pip install 'levit[plot]'``)."""
    try:
        import matplotlib
    except ImportError as e:
        raise LeViTError("drawing needs matplotlib: pip install 'levit[plot]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not tables:
        raise LeViTError("no attention biases to draw")
    names = list(tables)
    cols = max(t.shape[0] for t in tables.values())
    cell = 1.15
    fig, axes = plt.subplots(
        len(names), cols, figsize=(max(4.8, 1.2 + cols * cell), 0.8 + len(names) * cell), squeeze=False
    )
    for i, name in enumerate(names):
        t = tables[name]
        rh, rw = t.shape[-2:]
        lim = float(np.abs(t).max()) or 1.0
        for h in range(cols):
            ax = axes[i][h]
            ax.set_xticks([])
            ax.set_yticks([])
            if h >= t.shape[0]:
                ax.axis("off")
                continue
            ext = (-(rw - 1) - 0.5, rw - 1 + 0.5, rh - 1 + 0.5, -(rh - 1) - 0.5)
            ax.imshow(_mirror(t[h]), cmap="RdBu_r", vmin=-lim, vmax=lim, extent=ext, interpolation="nearest")
            if i == 0:
                ax.set_title(f"head {h}", fontsize=8)
            if h == 0:
                ax.set_ylabel(f"{name}\n{rh}x{rw}", fontsize=7)
    fig.suptitle((title or "attention biases") + "\neach head over offsets (dy, dx); red +, blue -", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, format="png", dpi=80)


def draw_biases(model: nn.Module, path: str | os.PathLike) -> tuple[Path, Path, int]:
    """The model's attention biases drawn to ``path`` (a PNG titled with the variant, its ablation and
    the input size) and saved as arrays beside it (the same name, ``.npz``): ``levit biases`` in one
    call. Returns (png, npz, number of attention layers); nothing is written for a model without biases."""
    path = Path(path)
    tables = attention_biases(model)
    cfg = model.config
    label = cfg.name + (f" ({cfg.ablation})" if cfg.ablation else "")
    h, w = cfg.img_hw
    size = f"{h}x{w}" if h != w else f"{h}px"
    npz = save_biases(tables, path.with_suffix(".npz"))
    return plot_biases(tables, path, title=f"{label} attention biases at {size}"), npz, len(tables)
