"""``levit train``: the paper's recipe (hard distillation) on an image folder, from one CPU to many GPUs."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import UsageError, check_output_folder, img_size_option, model_name


def args_train(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter  # defaults come from the recipe, not argparse
    p.add_argument(
        "--data",
        type=Path,
        help="folder with train/ and val/ sub-folders: ImageFolder layout, WebDataset .tar shards (levit data "
        "shard) or Hugging Face datasets (save_to_disk or Parquet; hf_streaming=true streams the Parquet); "
        "instead of --data: train_shards=PATTERN val_shards=PATTERN, quoted brace patterns of shards",
    )
    p.add_argument("--dataset", choices=["digits"], help="a bundled dataset instead of --data (no download)")
    p.add_argument(
        "--output",
        "-o",
        type=Path,
        help="run folder: config.yaml, metrics.jsonl, checkpoints/, best.pth (default: runs/levit)",
    )
    p.add_argument("--model", "-m", type=model_name, help="model name (see `levit models`); default: the recipe's")
    p.add_argument("--config", help="recipe YAML file or shipped recipe name (default: the model's paper recipe)")
    p.add_argument("--epochs", type=int, help="number of epochs")
    p.add_argument("--batch-size", "-b", type=int, help="images per process per step")
    img_size_option(p, "training resolution (multiple of 16)")
    p.add_argument("--distillation", choices=["none", "soft", "hard"], help="teacher loss")
    p.add_argument("--teacher", help="teacher: a timm model name (regnety_160) or a levit variant")
    p.add_argument("--teacher-checkpoint", type=Path, help="teacher weights file (never downloaded)")
    p.add_argument("--resume", metavar="auto|PATH", help="continue: 'auto' = newest complete checkpoint in --output")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to train (default: cuda if available)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe values, e.g. lr=1e-3 mixup=0")


def cmd_train(args: argparse.Namespace) -> int:
    from levit.errors import LeViTError
    from levit.train.recipe import available_recipes, parse_overrides, resolve_config
    from levit.train.run import train

    for flag, v in (("--epochs", args.epochs), ("--batch-size", args.batch_size)):
        if v is not None and v < 1:
            raise UsageError(f"{flag} must be >= 1, got {v}")
    if args.resume not in (None, "auto") and not Path(args.resume).is_file():
        raise UsageError(f"--resume must be 'auto' or an existing checkpoint file, got {args.resume!r}")
    if args.config is not None and not Path(args.config).is_file() and args.config not in available_recipes():
        raise UsageError(
            f"--config: {args.config} is neither a YAML file nor a shipped recipe ({', '.join(available_recipes())})"
        )
    flags = {
        "data": str(args.data) if args.data is not None else None,
        "dataset": args.dataset,
        "output": str(args.output) if args.output is not None else None,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "img_size": args.img_size,
        "distillation": args.distillation,
        "teacher": args.teacher,
        "teacher_checkpoint": str(args.teacher_checkpoint) if args.teacher_checkpoint else None,
        "device": args.device,
    }
    try:  # every bad KEY=VALUE, flag value or recipe value is a usage error (exit 2)
        overrides = parse_overrides(args.overrides)
        values = {k: v for k, v in flags.items() if v is not None} | overrides
        model = values.pop("model", None) or args.model
        if model is None and args.config is None and args.dataset is None:
            raise UsageError("--model is required (or a --config / --dataset recipe that names one)")
        cfg = resolve_config(config=args.config, model=model, **values)
    except (LeViTError, ValueError) as e:
        raise UsageError(str(e)) from None
    check_output_folder(Path(cfg.output))
    if cfg.distillation != "none" and not cfg.teacher_checkpoint:
        raise UsageError(
            f"--distillation {cfg.distillation} needs --teacher-checkpoint PATH (teacher weights are never "
            "downloaded), or --distillation none"
        )
    result = train(cfg, resume=args.resume)
    return 0 if result.best_epoch > 0 or result.finished_before else 1
