"""``levit predict``: classify image files and folders."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from levit.models.config import DEFAULT_CROP_PCT

from .common import (
    UsageError,
    check_runtime,
    img_size_option,
    load_model,
    model_options,
    runtime_options,
    warnings_as_lines,
)


def args_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", type=Path, help="image files and/or folders (searched recursively)")
    model_options(p)
    p.add_argument("--topk", type=int, default=5, help="classes to show per image")
    p.add_argument("--batch-size", "-b", type=int, default=32, help="images per forward pass")
    img_size_option(
        p, "input resolution N or HxW (e.g. 192x320), multiples of 16 (default: the model's, 224)", rectangular=True
    )
    p.add_argument(
        "--crop-pct",
        type=float,
        default=None,
        help=f"centre-crop fraction (resize = img_size / crop_pct; default: the checkpoint's, else {DEFAULT_CROP_PCT})",
    )
    runtime_options(p, backend="eager", precision="fp32", precision_help="numeric precision")
    p.add_argument("--calibration", type=Path, nargs="+", help="int8: calibration images (default: the input images)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the runtime's)")
    p.add_argument("--json", action="store_true", help="print JSON results")


def cmd_predict(args: argparse.Namespace) -> int:
    from levit.runtime.predict import list_inputs, predict_paths

    files = list_inputs(args.paths)  # a missing path or no image at all fails before the model is built
    if args.topk < 1:
        raise UsageError(f"--topk must be >= 1, got {args.topk}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        raise UsageError(f"--crop-pct must be in (0, 1], got {args.crop_pct}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    use_runtime = args.backend != "eager" or args.precision != "fp32" or args.threads
    if use_runtime:
        check_runtime(args.backend, args.precision)  # the CLI's one check, before the model is built
    kwargs = {"img_size": args.img_size} if args.img_size else {}
    from levit.models.fuse import inference_form

    model = inference_form(
        load_model(args, batch=min(args.batch_size, len(files)), **kwargs)
    )  # once: the runtime and the fp32 reference share it
    runner = None
    if use_runtime:
        from levit.runtime.deploy import deploy

        calib = (args.calibration or files) if args.precision != "fp32" else None
        with warnings_as_lines():  # e.g. "this CPU has no bf16 instructions: runs fp32"
            runner = deploy(
                model,
                backend=args.backend,
                precision=args.precision,
                batch_size=args.batch_size,
                threads=args.threads,
                calibration=calib,
            )
        if runner.fidelity:
            f = runner.fidelity
            print(
                f"{runner.backend} {runner.precision}: top-1 agreement with fp32 {f['top1_agreement'] * 100:.1f}% on "
                f"{f['images']} images, max relative logit error {f['max_rel_error']:.2e}",
                file=sys.stderr,
            )
    results = predict_paths(
        model,
        files,
        runner=runner,
        topk=args.topk,
        batch_size=args.batch_size,
        crop_pct=args.crop_pct,
        progress=not args.json,
        on_error=lambda path, msg: print(f"skipped {path}: {msg}", file=sys.stderr),
    )
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(r["path"])
            for p in r["top"]:
                print(f"  {p['prob'] * 100:6.2f}%  {p['label']}  (class {p['class']})")
    if not results:
        print(f"levit predict: error: none of the {len(files)} image file(s) could be read", file=sys.stderr)
    return 0 if results else 1
