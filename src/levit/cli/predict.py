"""``levit predict``: classify image files and folders, streaming results to a file (resumable), on one
machine or a Ray cluster."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from levit.models.config import DEFAULT_CROP_PCT

from .common import (
    UsageError,
    check_output,
    check_runtime,
    img_size_option,
    load_model,
    model_options,
    runtime_options,
    warnings_as_lines,
)

PREDICT_ERROR_LINES = 20  # unreadable files listed one per line on stderr; the rest are counted
PREDICT_CALIBRATION_IMAGES = 300  # int8 calibration without --calibration: the first input images


def args_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", type=Path, help="image files and/or folders (searched recursively)")
    model_options(p)
    p.add_argument("--topk", type=int, default=5, help="classes to show per image")
    p.add_argument(
        "--batch-size", "-b", type=int, default=None, help="images per forward pass (default: 32 on CPU, 256 on GPU)"
    )
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
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the model runs (decoding: CPU)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU model lanes: that many batches decoded and classified at once, one thread each (eager: the "
        "model; other backends: a copy each; int8: one copy on that many threads) (default: the cores available; "
        "other backends: at most 8 copies, sharing the cores)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="decoding processes (default: none on the CPU, where the lanes decode their own batches, up to "
        "8 lanes; the cores available for an int8 model and on a GPU)",
    )
    p.add_argument(
        "--fast-decode",
        action="store_true",
        help="decode large JPEGs at reduced size (DCT scaling): 5x faster on phone photos, their pixels differ "
        "slightly from the official preprocessing (docs/predict.md)",
    )
    p.add_argument(
        "--max-pixels", type=int, default=None, help="refuse larger images (default: Pillow's limit, 89.5 megapixels)"
    )
    p.add_argument("--output", "-o", type=Path, help="write rows to FILE.jsonl, FILE.csv or FILE.parquet as they come")
    p.add_argument("--resume", action="store_true", help="continue --output, skipping the images already in it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--labels", type=Path, help="class names, one per line (default: the model's or ImageNet's)")
    p.add_argument("--include-logits", action="store_true", help="add each image's raw logits to the rows")
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run on Ray Data: a new local cluster, or join the one at ADDRESS (pip install 'levit[cluster]')",
    )
    p.add_argument("--json", action="store_true", help="print JSON results (with --output: a JSON summary)")


def _check_predict_args(args: argparse.Namespace) -> None:
    """Every flag of `levit predict` that can be checked before the model is built (exit 2 if wrong)."""
    for flag, v, low in (
        ("--topk", args.topk, 1),
        ("--batch-size", args.batch_size, 1),
        ("--threads", args.threads, 1),
        ("--workers", args.workers, 0),
        ("--max-pixels", args.max_pixels, 1),
    ):
        if v is not None and v < low:
            raise UsageError(f"{flag} must be >= {low}, got {v}")
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        raise UsageError(f"--crop-pct must be in (0, 1], got {args.crop_pct}")
    if args.labels is not None and not args.labels.is_file():
        raise UsageError(f"--labels: no such file: {args.labels}")
    if args.output is None:
        for flag in ("resume", "overwrite"):
            if getattr(args, flag):
                raise UsageError(f"--{flag} needs --output FILE")
        return
    from levit.runtime.writers import FORMATS, partial_path

    if args.output.suffix.lower() not in FORMATS:
        raise UsageError(f"--output must end in {', '.join(FORMATS)}, got {args.output.name!r}")
    check_output(args.output)
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other: choose one")
    if not (args.resume or args.overwrite):
        if partial_path(args.output).exists():
            raise UsageError(
                f"--output: {partial_path(args.output)} is left from an interrupted run: add --resume to finish it "
                "or --overwrite to start again"
            )
        if args.output.exists():
            raise UsageError(
                f"--output: {args.output} exists: add --resume to add missing images or --overwrite to replace it"
            )


def _read_labels(path: Path, num_classes: int) -> list[str]:
    names = path.read_text(encoding="utf-8").splitlines()
    while names and not names[-1].strip():
        names.pop()
    if len(names) != num_classes:
        raise UsageError(f"--labels: {path} has {len(names)} lines, the model predicts {num_classes} classes")
    return names


def _backends(args: argparse.Namespace, model, files: list, use_runtime: bool) -> tuple:
    """(runner, ray_backend): a :func:`levit.deploy` predictor built here, or the recipe for one that
    each Ray actor builds; both None for the eager fp32 model."""
    runner, ray_backend = None, None
    calib = None
    if use_runtime and args.precision != "fp32":
        calib = [str(f) for f in (args.calibration or files[:PREDICT_CALIBRATION_IMAGES])]
    if use_runtime and args.ray is not None:  # built on each Ray actor, one thread each
        ray_backend = {"backend": args.backend, "precision": args.precision, "threads": 1, "calibration": calib}
        ray_backend["batch_size"] = args.batch_size or 32
    elif use_runtime:
        from levit.runtime.deploy import deploy_lanes
        from levit.runtime.pipeline import lane_layout
        from levit.utils import available_cpus

        # on the CPU, one one-thread copy of the backend per lane (levit.runtime.pipeline), at most
        # 8 copies by default (memory), sharing the cores; int8 calibrates once: one copy on all the
        # threads, one batch at a time
        lanes, per_lane = lane_layout(args.threads, 1 if args.threads else None, available_cpus())
        if args.device != "cpu" or calib is not None:
            lanes = 1
        with warnings_as_lines():  # e.g. "this CPU has no bf16 instructions: runs fp32"
            runners = deploy_lanes(
                model,
                lanes,
                threads=per_lane if lanes > 1 else args.threads,
                backend=args.backend,
                precision=args.precision,
                batch_size=args.batch_size or (32 if args.device == "cpu" else 256),
                calibration=calib,
            )
        runner = runners if lanes > 1 else runners[0]
        if runners[0].fidelity:
            f = runners[0].fidelity
            print(
                f"{runners[0].backend} {runners[0].precision}: top-1 agreement with fp32 {f['top1_agreement'] * 100:.1f}% on "
                f"{f['images']} images, max relative logit error {f['max_rel_error']:.2e}",
                file=sys.stderr,
            )
    return runner, ray_backend


def cmd_predict(args: argparse.Namespace) -> int:
    from levit.runtime.pipeline import Preprocess
    from levit.runtime.predict import list_inputs, predict_files

    files = list_inputs(args.paths)  # a missing path or no image at all fails before the model is built
    _check_predict_args(args)
    use_runtime = args.backend != "eager" or args.precision != "fp32"
    if use_runtime:
        check_runtime(args.backend, args.precision)  # the CLI's one check, before the model is built
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available here")
    if args.ray is not None and args.device == "cuda":
        raise UsageError("--ray runs on the cluster's CPUs: drop --device cuda")
    kwargs = {"img_size": args.img_size} if args.img_size else {}
    model = load_model(args, batch=min(args.batch_size or 32, len(files)), **kwargs).to(args.device)
    names = _read_labels(args.labels, model.config.num_classes) if args.labels else None
    runner, ray_backend = _backends(args, model, files, use_runtime)
    from tqdm.auto import tqdm

    shown = 0

    def on_error(path: str, reason: str) -> None:
        nonlocal shown
        shown += 1
        if shown <= PREDICT_ERROR_LINES:
            tqdm.write(f"skipped {path}: {reason}", file=sys.stderr)

    collected: list[dict] = []

    def on_rows(rows: list[dict]) -> None:
        if args.output is not None:
            return
        ok = [{k: v for k, v in r.items() if k != "error"} for r in rows if r["error"] is None]
        if args.json:
            collected.extend(ok)
            return
        lines = []
        for r in ok:
            lines.append(r["path"])
            lines += [f"  {p['prob'] * 100:6.2f}%  {p['label']}  (class {p['class']})" for p in r["top"]]
        if lines:
            tqdm.write("\n".join(lines), file=sys.stdout)

    try:
        summary = predict_files(
            model,
            files,
            output=args.output,
            resume=args.resume,
            overwrite=args.overwrite,
            topk=args.topk,
            batch_size=args.batch_size,
            preprocess=Preprocess.for_model(
                model if runner is None else runner[0] if isinstance(runner, list) else runner,
                crop_pct=args.crop_pct or model.pretrained_cfg["crop_pct"],  # else the checkpoint's own
                fast_decode=args.fast_decode,
                **({"max_pixels": args.max_pixels} if args.max_pixels else {}),
            ),
            include_logits=args.include_logits,
            class_names=names,
            workers=args.workers,
            threads=None if use_runtime else args.threads,
            runner=runner,
            ray=args.ray if args.ray is not None else False,
            ray_backend=ray_backend,
            on_rows=on_rows,
            on_error=on_error,
            progress=not args.json or args.output is not None,
        )
    except KeyboardInterrupt:
        if args.output is not None:
            from levit.runtime.writers import partial_path

            print(
                f"levit predict: stopped; rows so far are in {partial_path(args.output)} (--resume finishes)",
                file=sys.stderr,
            )
        raise
    if summary.failed > PREDICT_ERROR_LINES:
        where = f" (their error rows are in {args.output})" if args.output else ""
        print(f"... and {summary.failed - PREDICT_ERROR_LINES} more unreadable file(s){where}", file=sys.stderr)
    done = f", {summary.already_done} already in {args.output}" if summary.already_done else ""
    print(
        f"levit predict: {summary.classified} classified, {summary.failed} unreadable{done}; "
        f"{summary.images_per_s:.1f} img/s over {summary.seconds:.1f} s"
        + (f"; results in {args.output}" if args.output else ""),
        file=sys.stderr,
    )
    if args.json and args.output is None:
        print(json.dumps(collected, indent=2))
    elif args.json:
        info = {k: getattr(summary, k) for k in ("classified", "failed", "already_done", "seconds", "images_per_s")}
        print(json.dumps({**info, "output": str(args.output)}, indent=2))
    if summary.classified == 0 and summary.failed > 0:
        print(f"levit predict: error: none of the {summary.failed} image file(s) could be read", file=sys.stderr)
        return 1
    return 0
