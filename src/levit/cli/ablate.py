"""``levit ablate``: the paper's Table 5 ablations, trained and timed side by side."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import UsageError, check_output_folder, img_size_type, require


def args_ablate(p: argparse.ArgumentParser) -> None:
    from levit.paper.ablations import ROWS

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
    from levit.paper.ablations import ROWS, AblationSettings, ablate, format_markdown
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
    check_output_folder(args.output)
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
