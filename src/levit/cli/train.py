"""``levit train`` and ``levit eval``: the paper's recipe, and a checkpoint's accuracy."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from levit.models.config import DEFAULT_CROP_PCT

from .common import UsageError, check_output, img_size_option, load_model, model_name, model_options


def args_train(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter  # defaults come from the recipe, not argparse
    p.add_argument("--data", type=Path, help="folder with train/ and val/ sub-folders (ImageFolder layout)")
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


def args_eval(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter  # defaults spelled out in the help texts
    p.add_argument("--data", type=Path, required=True, help="folder with one sub-folder per class")
    model_options(p)
    img_size_option(p, "input resolution N or HxW (default: the checkpoint's)", rectangular=True)
    p.add_argument(
        "--crop-pct",
        type=float,
        default=None,
        help="centre-crop fraction (default: the checkpoint's pretrained_cfg: its training run's, or "
        f"{DEFAULT_CROP_PCT}, the authors' evaluation)",
    )
    p.add_argument("--batch-size", "-b", type=int, default=64, help="images per forward pass (default: 64)")
    p.add_argument(
        "--workers", type=int, default=None, help="data loading processes (default: the CPU cores available, at most 8)"
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to run (default: auto)")
    p.add_argument("--no-fuse", action="store_true", help="evaluate the unfused model (BatchNorm not folded)")
    p.add_argument("--output", type=Path, help="also write the results as JSON to this file")


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
    if cfg.distillation != "none" and not cfg.teacher_checkpoint:
        raise UsageError(
            f"--distillation {cfg.distillation} needs --teacher-checkpoint PATH (teacher weights are never "
            "downloaded), or --distillation none"
        )
    result = train(cfg, resume=args.resume)
    return 0 if result.best_epoch > 0 or result.finished_before else 1


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from levit.train.evaluate import evaluate_folder

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers is not None and args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    check_output(args.output)
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        raise UsageError(f"--crop-pct must be in (0, 1], got {args.crop_pct}")
    if args.checkpoint is None and not args.pretrained:
        raise UsageError("--checkpoint PATH (or --pretrained) is required: evaluating random weights is meaningless")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available")
    from levit.data.datasets import check_image_folder
    from levit.utils import default_workers

    check_image_folder(args.data)  # a bad folder fails before the model is loaded
    kwargs = {"img_size": args.img_size} if args.img_size else {}
    model = load_model(args, batch=args.batch_size, **kwargs)
    crop_pct = args.crop_pct or model.pretrained_cfg["crop_pct"]  # the file's (a training run's eval crop)
    if not args.no_fuse:
        from levit.models.fuse import inference_form

        model = inference_form(model)
    fused = model.is_fused
    m = evaluate_folder(
        model,
        args.data,
        img_size=model.config.img_size,
        crop_pct=crop_pct,
        batch_size=args.batch_size,
        workers=args.workers if args.workers is not None else default_workers(),
        device=args.device,
        progress=sys.stderr.isatty(),  # a bar on a terminal, nothing in logs
    )
    if m.pop("rank") != 0:
        return 0
    skipped = m.pop("skipped")
    for path, reason in skipped[:5]:
        print(f"warning: skipped unreadable image {path} ({reason})", file=sys.stderr)
    if len(skipped) > 5:
        print(f"warning: ... and {len(skipped) - 5} more unreadable images (all listed in --output)", file=sys.stderr)
    result = {
        "model": model.config.name,
        "checkpoint": str(args.checkpoint) if args.checkpoint else "pretrained",
        "data": str(args.data),
        "img_size": model.config.img_size,
        "crop_pct": crop_pct,
        "fused": fused,
        **m,
        "skipped": [p for p, _ in skipped],
    }
    note = f", {len(skipped)} unreadable skipped" if skipped else ""
    print(f"top-1 {m['top1']:.2f}%  top-5 {m['top5']:.2f}%  loss {m['loss']:.4f}  ({m['n']} images{note})")
    if args.output is not None:
        from levit.utils import atomic_path

        with atomic_path(args.output) as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n")
    return 0
