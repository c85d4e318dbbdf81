"""``levit data shard``: an ImageFolder (``train/`` and ``val/``) written as WebDataset tar shards;
``levit data teacher-cache``: a recipe's teacher run once over every view of its run (its top class; for soft
distillation also its top-k logits), for ``teacher_cache=PATH``."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from .common import UsageError, check_output, check_output_folder


def args_data(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    shard = sub.add_parser("shard", help="write SRC/{train,val} as SRC's shards in DST/{train,val}/shard-NNNNNN.tar")
    shard.add_argument(
        "src", metavar="SRC", type=Path, help="folder with train/ and val/ sub-folders (ImageFolder layout)"
    )
    shard.add_argument(
        "dst",
        metavar="DST",
        type=Path,
        help="new folder for the shards (train/*.tar, val/*.tar, levit-shards.json), which they enter once all are written",
    )
    shard.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default: 1000)")
    shard.add_argument("--seed", type=int, default=0, help="the training samples' shuffled order (default: 0)")
    cache = sub.add_parser(
        "teacher-cache",
        help="run the teacher once over every view a distilled run meets (hard: its top class; soft: its top-k logits)",
        description="Run the teacher once over every augmented view a one-process distilled run meets and store\n"
        "its answers for teacher_cache=OUTPUT. The run's data: --data DIR (ImageFolder, shard folder or\n"
        "Hugging Face dataset folder) or train_shards=PATTERN val_shards=PATTERN.",
        epilog="examples:\n"
        "  levit data teacher-cache t.cache epochs=5 --config digits --data digits --teacher-checkpoint t.safetensors\n"
        "  levit data teacher-cache t.cache epochs=5 distillation=soft --topk 10 --data shards/ --teacher-checkpoint T\n"
        "  levit data teacher-cache t.cache 'train_shards=train-{000000..000009}.tar' \\\n"
        "      'val_shards=val-{000000..000001}.tar' --model levit_128s --teacher-checkpoint T",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cache.add_argument("output", type=Path, help="the cache file to write (then: levit train ... teacher_cache=OUTPUT)")
    cache.add_argument(
        "--data",
        type=Path,
        help="the run's --data folder (ImageFolder, WebDataset shard folder or Hugging Face dataset folder); "
        "or give train_shards=PATTERN val_shards=PATTERN",
    )
    cache.add_argument(
        "--topk",
        type=int,
        metavar="K",
        help="store the teacher's K largest logits per view, for distillation=soft (default with "
        "distillation=soft: 10; K >= the number of classes keeps them all, exactly)",
    )
    cache.add_argument("--config", help="the run's recipe (YAML file or shipped name)")
    cache.add_argument("--model", "-m", help="the run's model (default: the recipe's)")
    cache.add_argument("--teacher", help="teacher: a timm model name or a levit variant (default: the recipe's)")
    cache.add_argument("--teacher-checkpoint", type=Path, required=True, help="teacher weights file")
    cache.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="the run's recipe values (epochs=..., seed=...)"
    )


def cmd_data(args: argparse.Namespace) -> int:
    if args.data_command == "teacher-cache":
        return _teacher_cache(args)
    from levit.data.shards import write_shards

    if args.shard_size < 1:
        raise UsageError(f"--shard-size must be >= 1, got {args.shard_size}")
    check_output_folder(args.dst, "DST")
    skipped: list[tuple[Path, str]] = []
    # SIGTERM (a scheduler's stop) as an exception, so that write_shards removes its partial folder;
    # only the main thread may set a handler (called from another one, the process's stays)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if main else None
    try:
        written = write_shards(args.src, args.dst, shard_size=args.shard_size, seed=args.seed, skipped=skipped)
    finally:
        if previous is not None:  # None: a handler not set from Python, which cannot be put back
            signal.signal(signal.SIGTERM, previous)
    for path, reason in skipped[:5]:
        print(f"warning: skipped {path} ({reason})", file=sys.stderr)
    if len(skipped) > 5:
        print(f"warning: ... and {len(skipped) - 5} more files that could not be read", file=sys.stderr)
    shards = {split: len(list((args.dst / split).glob("*.tar"))) for split in written}
    summary = ", ".join(f"{split}: {n} samples in {shards[split]} shard(s)" for split, n in written.items())
    print(f"wrote {args.dst} ({summary})", file=sys.stderr)
    return 0


def _terminated(signum: int, frame: object) -> None:
    """A signal handler: the signal as ``SystemExit`` (exit status 128 + its number, as the shell's)."""
    raise SystemExit(128 + signum)


def _teacher_cache(args: argparse.Namespace) -> int:
    from levit.errors import LeViTError
    from levit.train.recipe import parse_overrides, resolve_config
    from levit.train.teacher_cache import build_teacher_cache

    if args.topk is not None and args.topk < 1:
        raise UsageError(f"--topk must be >= 1 (logits kept per view), got {args.topk}")
    check_output(args.output, "output", inputs={"--teacher-checkpoint": args.teacher_checkpoint})
    try:  # bad recipe values are usage errors (exit 2), as in levit train
        values = {"teacher_checkpoint": str(args.teacher_checkpoint), "distillation": "hard"}
        if args.data is not None:
            values["data"] = str(args.data)
        if args.teacher:
            values["teacher"] = args.teacher
        cfg = resolve_config(config=args.config, model=args.model, **(values | parse_overrides(args.overrides)))
    except (LeViTError, ValueError) as e:
        raise UsageError(str(e)) from None
    if cfg.data is None and cfg.train_shards is None:
        raise UsageError("--data DIR or train_shards=PATTERN val_shards=PATTERN is required (the run's data)")
    path = build_teacher_cache(cfg, args.output, topk=args.topk)
    kept = " and top-k logits" if args.topk is not None or cfg.distillation == "soft" else ""
    print(f"wrote {path} ({cfg.epochs} epoch(s) of views{kept}); train with teacher_cache={path}", file=sys.stderr)
    return 0
