"""The paper's ablations (Table 5) on your machine: train the base LeViT-128S and rows A1-A7 at a
short schedule and tabulate params, FLOPs, measured CPU speed and top-1 beside the paper's numbers.

The sweep folder::

    digits/                  the bundled digits as an ImageFolder (default data; shared by every run)
    <row>/                   one training run per row (levit.train's folder: best.pth, metrics.jsonl, ...)
    <row>/ablate.json        the row's result, written when the row is complete (``--resume auto`` skips it)
    ablations.csv / .md      the table
    ablations.png            top-1 per row, ours beside the paper's (needs matplotlib)

Rows: ``base`` and A1-A7 (:data:`levit.models.config.ABLATIONS`). The paper trains every row except A4 with
hard distillation; A4 drops it. Here distillation needs a teacher (``teacher_checkpoint``); without
one every row trains without distillation, so A4 would repeat ``base`` exactly: it is not trained
again and its row says so.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import LeViTError
from ..models.config import ABLATIONS, PAPER_ABLATIONS, PATCH_SIZE
from ..utils import atomic_path, num_threads, save_figure

if TYPE_CHECKING:  # torch is imported to train and time, not to count (`levit models --ablations`)
    import torch

__all__ = [
    "ROWS",
    "AblationSettings",
    "ablate",
    "count_rows",
    "format_markdown",
    "measure_cpu_speed",
    "plot_ablations",
    "write_csv",
]

ROWS: tuple[str, ...] = ("base", *ABLATIONS)
MODEL = "levit_128s"  # Table 5 is about LeViT-128S (A1 and A6 set its widths)
COLUMNS = (
    "row",
    "change",
    "params",
    "flops",
    "cpu_img_s",
    "fused",
    "top1",
    "epochs",
    "train_time_s",
    "paper_params_m",
    "paper_flops_m",
    "paper_top1",
    "note",
)


def _ablation(row: str) -> str | None:
    if row not in ROWS:
        raise LeViTError(f"unknown ablation row {row!r}; valid: {', '.join(ROWS)}")
    return None if row == "base" else row


def count_rows(rows: Sequence[str] = ROWS, img_size: int = 224, num_classes: int = 1000) -> list[dict[str, Any]]:
    """Params and FLOPs of every row's model, as in Table 5 (no distillation head), with the paper's
    figures. Arithmetic on the configs (:mod:`levit.models.flops`, equal to the built models' counts): no torch."""
    from ..models.config import get_config
    from ..models.flops import flops_from_config, params_from_config

    out = []
    for row in rows:
        cfg = get_config(MODEL, ablation=_ablation(row), distillation=False, img_size=img_size, num_classes=num_classes)
        paper = PAPER_ABLATIONS[row]
        out.append(
            {
                "row": row,
                "change": ABLATIONS.get(row, "LeViT-128S"),
                "params": params_from_config(cfg),
                "flops": flops_from_config(cfg),
                "paper_params_m": paper.params_m,
                "paper_flops_m": paper.flops_m,
                "paper_top1": paper.top1,
            }
        )
    return out


def measure_cpu_speed(
    models: dict[str, torch.nn.Module],
    img_size: int,
    *,
    batch_size: int = 16,
    threads: int = 1,
    seconds: float = 3.0,
    rounds: int = 5,
) -> dict[str, float]:
    """Images/s of each model on the CPU (fp32, inference mode, ``threads`` threads, batch 16 as the
    paper's CPU protocol), measured side by side: ``rounds`` interleaved rounds of one timed window
    per model (about ``seconds`` per model in all) after a warm-up round; each model's fastest window
    counts (other jobs on a shared machine only ever slow a window down, so the fastest is the least
    disturbed; interleaving spreads the disturbance over all rows alike)."""
    import torch

    from .timing import interleaved

    window = seconds / rounds
    x = torch.randn(batch_size, 3, img_size, img_size)
    with torch.inference_mode(), num_threads(threads):
        calls = {name: (lambda m=model: m(x)) for name, model in models.items()}
        interleaved(calls, rounds=1, window=window, warmup_calls=1)  # a warm-up round
        secs = interleaved(calls, rounds=rounds, window=window)
    return {k: batch_size / min(v) for k, v in secs.items()}


@dataclass
class AblationSettings:
    """What the sweep runs: data, schedule, rows and how speed is measured."""

    output: str = "runs/ablate"
    data: str | None = None  # ImageFolder with train/ and val/; None: the bundled digits
    epochs: int = 10
    img_size: int = 32  # training resolution
    batch_size: int = 64
    threads: int | None = None  # training threads (None: the recipe's)
    rows: tuple[str, ...] = ROWS
    teacher_checkpoint: str | None = None  # with it: hard distillation for every row but A4 (as the paper)
    bench_img_size: int = 224  # speed, params and FLOPs: the paper's 224x224 ImageNet-shaped model
    bench_seconds: float = 3.0  # timing per row (interleaved rounds)
    resume: bool = False  # skip rows already complete, continue a row's interrupted run
    train_overrides: dict[str, Any] | None = None  # any other training-recipe value


def _train_row(row: str, s: AblationSettings, out: Path) -> dict[str, Any]:
    """Train one row via levit.train's public entry points; returns its top-1 and timing.

    The only place the sweep touches the training code (``resolve_config`` + ``train``).
    """
    from ..train.run import resolve_config, train

    distill = s.teacher_checkpoint is not None and row != "A4"
    values: dict[str, Any] = dict(
        model=MODEL,
        output=str(out / row),
        epochs=s.epochs,
        img_size=s.img_size,
        batch_size=s.batch_size,
        ablation=_ablation(row),
        distillation="hard" if distill else "none",
        progress=False,
        log_every=10_000,
        warmup_epochs=min(2, max(s.epochs - 1, 0)),
    )
    if distill:
        values.update(teacher=None, teacher_checkpoint=s.teacher_checkpoint)
    if s.threads is not None:
        values["threads"] = s.threads
    if s.data is None:  # one shared copy of the bundled digits, written once beside the rows
        from ..data.digits import make_digits_folder

        values.update(dataset=None, data=str(make_digits_folder(out / "digits", seed=0)))
    else:
        values.update(dataset=None, data=s.data)
    values.update(s.train_overrides or {})
    cfg = resolve_config(config="digits", **values)
    resume = "auto" if (out / row / "checkpoints").is_dir() else None
    t0 = time.perf_counter()
    result = train(cfg, resume=resume)
    return {"top1": result.best_top1, "epochs": cfg.epochs, "train_time_s": time.perf_counter() - t0}


def _speeds(rows: Sequence[str], s: AblationSettings) -> dict[str, tuple[float, bool]]:
    """(img/s, fused) per row: the 1000-class model in its inference form (A3 keeps its LayerNorms), side by side."""
    from ..factory.create import create_model
    from ..models.fuse import inference_form

    models, fused = {}, {}
    for row in rows:
        model = create_model(MODEL, ablation=_ablation(row), distillation=False, img_size=s.bench_img_size).eval()
        models[row] = inference_form(model)
        fused[row] = models[row].is_fused
    speeds = measure_cpu_speed(models, s.bench_img_size, seconds=s.bench_seconds)
    return {row: (speeds[row], fused[row]) for row in rows}


def ablate(settings: AblationSettings, *, progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Run the sweep and write ``ablations.csv`` / ``.md`` (and ``.png`` with matplotlib) in
    ``settings.output``; returns the rows. Complete rows are skipped with ``settings.resume``."""
    say = progress or (lambda msg: None)
    out = Path(settings.output)
    rows = list(dict.fromkeys(settings.rows))
    for r in rows:
        _ablation(r)
    if settings.epochs < 1:
        raise LeViTError(f"--epochs must be >= 1, got {settings.epochs}")
    if settings.img_size < PATCH_SIZE or settings.img_size % PATCH_SIZE or settings.bench_img_size % PATCH_SIZE:
        raise LeViTError(f"--img-size and --bench-img-size must be multiples of {PATCH_SIZE}")
    if settings.teacher_checkpoint is not None and not Path(settings.teacher_checkpoint).is_file():
        raise LeViTError(f"--teacher-checkpoint: file not found: {settings.teacher_checkpoint}")
    done = [r for r in rows if (out / r / "ablate.json").is_file()]
    started = [r for r in rows if (out / r).is_dir()]
    if started and not settings.resume:
        raise LeViTError(
            f"--output {out} holds an earlier sweep ({', '.join(started)}): continue it with --resume auto, "
            "or pick another --output (nothing is overwritten)"
        )
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _sweep(settings, out, rows, done, say)
    except BaseException:
        if created:  # a sweep that failed before writing anything leaves no empty folder behind
            with contextlib.suppress(OSError):
                out.rmdir()
        raise


def _sweep(
    settings: AblationSettings, out: Path, rows: list[str], done: list[str], say: Callable[[str], None]
) -> list[dict[str, Any]]:
    """The rows of :func:`ablate`, trained (or read back when ``done``) in ``out``, then the tables."""
    counts = {c["row"]: c for c in count_rows(rows, img_size=settings.bench_img_size)}
    results: list[dict[str, Any]] = []
    for row in rows:
        marker = out / row / "ablate.json"
        if row in done:
            say(f"{row}: complete, skipped ({marker})")
            results.append(json.loads(marker.read_text()))
            continue
        note = ""
        if row == "A4" and settings.teacher_checkpoint is None and "base" in rows:
            say("A4: no teacher given, so every row trains without distillation and A4 = base: not trained again")
            base = next((r for r in results if r["row"] == "base"), None)
            trained = {k: base[k] for k in ("top1", "epochs", "train_time_s")} if base else None
            note = "no --teacher-checkpoint: every row without distillation, A4 = base (not trained again)"
        else:
            trained = None
        if trained is None:
            say(f"{row}: training ({ABLATIONS.get(row, 'the base LeViT-128S')})")
            trained = _train_row(row, settings, out)
        rec = {**counts[row], **trained, "note": note}
        (out / row).mkdir(parents=True, exist_ok=True)
        with atomic_path(marker) as tmp:
            Path(tmp).write_text(json.dumps(rec, indent=2))
        results.append(rec)
        say(f"{row}: top-1 {rec['top1']:.2f}%")
    say(f"measuring CPU speed at {settings.bench_img_size}px (batch 16, 1 thread, rows interleaved)")
    for rec, (img_s, fused) in zip(results, _speeds(rows, settings).values(), strict=True):
        rec.update(cpu_img_s=img_s, fused=fused)
    results = [{k: r.get(k) for k in COLUMNS} for r in results]
    write_csv(results, out / "ablations.csv")
    with atomic_path(out / "ablations.md") as tmp:
        Path(tmp).write_text(format_markdown(results, settings))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        say("matplotlib is not installed (pip install 'levit[plot]'): no ablations.png")
    else:
        plot_ablations(results, out / "ablations.png", data="digits" if settings.data is None else settings.data)
    return results


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """The rows as CSV (columns :data:`COLUMNS`), written atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})
    with atomic_path(path) as tmp:
        Path(tmp).write_text(buf.getvalue())
    return Path(path)


def _m(x: float) -> str:
    return f"{x / 1e6:.2f}M"


def format_markdown(rows: Sequence[dict[str, Any]], settings: AblationSettings | None = None) -> str:
    """The table as markdown: ours beside the paper's Table 5."""
    s = settings or AblationSettings()
    data = "the bundled digits" if s.data is None else f"`{s.data}`"
    lines = [
        f"LeViT-128S ablations (paper Table 5) on {data}: {s.epochs} epoch(s) at {s.img_size}px. "
        f"Params/FLOPs/speed: the 1000-class {s.bench_img_size}px model without distillation head; "
        "speed: CPU, fp32, batch 16, 1 thread, fused (A3 keeps its LayerNorms), rows timed interleaved (fastest round). "
        "Top-1: the best epoch on the held-out split. Paper: ImageNet, 100 epochs.",
        "",
        "| row | change | params | FLOPs | CPU img/s | top-1 (ours) | params (paper) | FLOPs (paper) | top-1 (paper) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        top1 = "-" if r.get("top1") is None or math.isnan(r["top1"]) else f"{r['top1']:.1f}"
        note = f" ({r['note']})" if r.get("note") else ""
        lines.append(
            f"| {r['row']} | {r['change']}{note} | {_m(r['params'])} | {r['flops'] / 1e6:.0f}M | "
            f"{r['cpu_img_s']:.1f} | {top1} | {r['paper_params_m']}M | {r['paper_flops_m']}M | {r['paper_top1']} |"
        )
    return "\n".join(lines) + "\n"


def plot_ablations(rows: Sequence[dict[str, Any]], path: str | Path, data: str = "digits") -> Path:
    """Bar chart: top-1 per row, this sweep beside the paper's (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["row"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
    for ax, key, title, color in (
        (axes[0], "top1", f"this machine: {data}", "tab:blue"),
        (axes[1], "paper_top1", "paper Table 5: ImageNet, 100 epochs", "tab:gray"),
    ):
        vals = [float(r[key]) for r in rows]
        bars = ax.bar(names, vals, color=color)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        lo = min(vals)
        ax.set_ylim(max(0.0, lo - 10), min(100.0, max(vals) + 5))
        ax.set_title(title)
        ax.set_ylabel("top-1 (%)")
    fig.suptitle("LeViT-128S ablations (Table 5)")
    fig.tight_layout()
    return save_figure(fig, path, format="png", dpi=110)
