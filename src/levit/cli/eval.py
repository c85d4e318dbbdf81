"""``levit eval``: a checkpoint's top-1 / top-5 / loss on an image folder, WebDataset shards or a Hugging Face dataset."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import (
    UsageError,
    check_output,
    crop_pct_option,
    decoder_option,
    img_size_option,
    load_model,
    model_options,
    require,
)


def args_eval(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter  # defaults spelled out in the help texts
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        help="folder with one sub-folder per class; or WebDataset shards (a folder of .tar files, a shard "
        "folder whose val/ holds them, or a quoted brace pattern such as 'val-{000000..000009}.tar'); or a "
        "Hugging Face dataset (a save_to_disk or Parquet folder, or a dataset folder whose val/ is one)",
    )
    model_options(p)
    img_size_option(p, "input resolution N or HxW (default: the checkpoint's)", rectangular=True)
    crop_pct_option(p)
    decoder_option(p)
    p.add_argument("--batch-size", "-b", type=int, default=64, help="images per forward pass (default: 64)")
    p.add_argument(
        "--workers", type=int, default=None, help="data loading processes (default: the CPU cores available, at most 8)"
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to run (default: auto)")
    p.add_argument("--no-fuse", action="store_true", help="evaluate the unfused model (BatchNorm not folded)")
    p.add_argument("--output", type=Path, help="also write the results as JSON to this file")


def _validation_folder(data: Path) -> Path:
    """A training dataset's root (``train/`` and ``val/``, each of class folders) given as ``--data``
    means its ``val/``, as a shard or Hugging Face dataset root does; read as an image folder it would
    be a two-class set, ``train`` and ``val``, and its top-1 a meaningless number."""
    root = Path(data)
    val = root / "val"
    if (root / "train").is_dir() and val.is_dir() and any(p.is_dir() for p in val.iterdir()):
        print(f"levit eval: {root} holds train/ and val/ class folders: evaluating {val}", file=sys.stderr)
        return val
    return data


def cmd_eval(args: argparse.Namespace) -> int:
    from levit.data.loaders import eval_source
    from levit.train.evaluate import evaluate_folder

    require("--batch-size", args.batch_size, 1)
    require("--workers", args.workers, 0)
    check_output(args.output, inputs={"--checkpoint": args.checkpoint})
    if args.checkpoint is None and not args.pretrained:
        raise UsageError("--checkpoint PATH (or --pretrained) is required: evaluating random weights is meaningless")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA GPU is available")
    args.data = _validation_folder(args.data)
    eval_source(args.data)  # a bad folder or pattern fails before the model is loaded
    model = load_model(args, batch=args.batch_size, **({"img_size": args.img_size} if args.img_size else {}))
    metrics = evaluate_folder(
        model,
        args.data,
        preprocessing={"crop_pct": args.crop_pct, "decoder": args.decoder},  # None: the checkpoint's own
        fuse=not args.no_fuse,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        progress=sys.stderr.isatty(),  # a bar on a terminal, nothing in logs
    )
    if metrics.pop("rank") == 0:
        _report(args, model, metrics)
    return 0


def _report(args: argparse.Namespace, model, metrics: dict) -> None:
    """The unreadable images (the first five), the one result line, and ``--output``'s JSON."""
    skipped = metrics.pop("skipped")
    for path, reason in skipped[:5]:
        print(f"warning: skipped unreadable image {path} ({reason})", file=sys.stderr)
    if len(skipped) > 5:
        print(f"warning: ... and {len(skipped) - 5} more unreadable images (all listed in --output)", file=sys.stderr)
    note = f", {len(skipped)} unreadable skipped" if skipped else ""
    m = metrics
    print(f"top-1 {m['top1']:.2f}%  top-5 {m['top5']:.2f}%  loss {m['loss']:.4f}  ({m['n']} images{note})")
    if args.output is None:
        return
    from levit.utils import atomic_path

    result = {
        "model": model.config.name,
        "checkpoint": str(args.checkpoint) if args.checkpoint else "pretrained",
        "data": str(args.data),
        "img_size": model.config.img_size,
        **m,
        "skipped": [p for p, _ in skipped],
    }
    with atomic_path(args.output) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
