"""``levit ablate`` and ``levit biases``: the paper's Table 5 and its attention-bias pictures."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import UsageError, check_output, img_size_option, img_size_type, load_model, model_options, require


def args_ablate(p: argparse.ArgumentParser) -> None:
    from levit.tools.ablate import ROWS

    p.add_argument("--output", "-o", type=Path, default=Path("runs/ablate"), help="sweep folder")
    p.add_argument("--data", type=Path, help="ImageFolder with train/ and val/ (default: the bundled digits)")
    p.add_argument("--epochs", type=int, default=10, help="epochs per row")
    p.add_argument(
        "--img-size", type=img_size_type, default=32, metavar="N", help="training resolution (multiple of 16)"
    )
    p.add_argument("--batch-size", "-b", type=int, default=64, help="training batch")
    p.add_argument("--threads", type=int, default=None, help="training threads (default: the digits recipe's, 1)")
    p.add_argument("--variants", default=",".join(ROWS), help="comma-separated rows")
    p.add_argument("--teacher-checkpoint", type=Path, help="teacher weights: hard distillation for all rows but A4")
    p.add_argument(
        "--bench-img-size", type=img_size_type, default=224, metavar="N", help="resolution of the CPU speed measurement"
    )
    p.add_argument("--bench-seconds", type=float, default=3.0, help="seconds of timing per row")
    p.add_argument("--resume", choices=["auto"], help="continue a sweep: skip complete rows, resume a started one")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="training-recipe values, e.g. lr=1e-3")


def cmd_ablate(args: argparse.Namespace) -> int:
    from levit.errors import LeViTError
    from levit.tools.ablate import ROWS, AblationSettings, ablate, format_markdown
    from levit.train.recipe import parse_overrides

    rows = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    bad = [v for v in rows if v not in ROWS]
    if not rows:
        raise UsageError(f"--variants: no row named; give comma-separated rows from {', '.join(ROWS)}")
    if bad:
        raise UsageError(f"--variants: unknown row(s) {bad}; valid: {', '.join(ROWS)}")
    if args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
    require("--batch-size", args.batch_size, 1)
    require("--threads", args.threads, 1)
    require("--bench-seconds", args.bench_seconds, 0, strict=True)
    if args.data is not None and not args.data.is_dir():
        raise UsageError(f"--data: folder not found: {args.data}")
    try:
        overrides = parse_overrides(args.overrides)
    except LeViTError as e:
        raise UsageError(str(e)) from None
    settings = AblationSettings(
        output=str(args.output),
        data=str(args.data) if args.data else None,
        epochs=args.epochs,
        img_size=args.img_size,
        batch_size=args.batch_size,
        threads=args.threads,
        rows=rows,
        teacher_checkpoint=str(args.teacher_checkpoint) if args.teacher_checkpoint else None,
        bench_img_size=args.bench_img_size,
        bench_seconds=args.bench_seconds,
        resume=args.resume == "auto",
        train_overrides=overrides,
    )
    results = ablate(settings, progress=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_markdown(results, settings))
    print(f"written: {args.output / 'ablations.csv'}, {args.output / 'ablations.md'}")
    return 0


def args_biases(p: argparse.ArgumentParser) -> None:
    model_options(p)
    p.add_argument("--output", "-o", type=Path, default=Path("attention_biases.png"), help="PNG (+ .npz beside it)")
    img_size_option(
        p, "show the biases resampled to this resolution, N or HxW (default: the model's)", rectangular=True
    )


def cmd_biases(args: argparse.Namespace) -> int:
    from levit.tools.biases import attention_biases, plot_biases, save_biases

    if args.output.suffix.lower() != ".png":
        raise UsageError(f"--output: expected a .png file, got {args.output.name!r}")
    check_output(args.output)
    check_output(args.output.with_suffix(".npz"))
    kwargs = {"img_size": args.img_size} if args.img_size else {}
    model = load_model(args, **kwargs)
    tables = attention_biases(model)
    npz = save_biases(tables, args.output.with_suffix(".npz"))
    cfg = model.config
    label = cfg.name + (f" ({cfg.ablation})" if cfg.ablation else "")
    size = "x".join(map(str, cfg.img_hw)) if cfg.img_hw[0] != cfg.img_hw[1] else f"{cfg.img_hw[0]}px"
    plot_biases(tables, args.output, title=f"{label} attention biases at {size}")
    print(f"written: {args.output} and {npz} ({len(tables)} attention layers)")
    return 0
