"""``levit predict``: classify image files and folders, streaming results to a file (resumable), on one
machine or a Ray cluster."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from levit.runtime.options import OptionError, PredictOptions
from levit.runtime.writers import partial_path

from .common import (
    UsageError,
    check_input_file,
    check_output,
    check_runtime,
    crop_pct_option,
    decoder_option,
    img_size_option,
    load_model,
    model_options,
    runtime_options,
    warnings_as_lines,
)

PREDICT_ERROR_LINES = 20  # unreadable files listed one per line on stderr; the rest are counted


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
    crop_pct_option(p)
    decoder_option(p)
    runtime_options(
        p,
        backend=None,
        precision="fp32",
        precision_help="numeric precision",
        backend_help="runtime (default: eager for fp32, else auto: the fastest here that has the precision)",
    )
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


def predict_options(args: argparse.Namespace) -> PredictOptions:
    """The job's :class:`~levit.runtime.options.PredictOptions` from the flags; a bad value, or an
    ``--output`` that cannot be written, is a usage error naming the flag (exit 2, before any model)."""
    from levit.runtime.writers import OutputExistsError, check_destination

    check_input_file(args.labels, "--labels")
    try:
        options = PredictOptions(
            topk=args.topk,
            batch_size=args.batch_size,
            device=args.device,
            backend=args.backend,
            precision=args.precision,
            calibration=tuple(map(str, args.calibration)) if args.calibration else None,
            threads=args.threads,
            workers=args.workers,
            crop_pct=args.crop_pct,
            fast_decode=args.fast_decode,
            decoder=args.decoder,
            max_pixels=args.max_pixels,
            include_logits=args.include_logits,
            output=str(args.output) if args.output is not None else None,
            resume=args.resume,
            overwrite=args.overwrite,
            ray=args.ray,
        )
    except OptionError as e:
        raise UsageError(e.as_flags()) from None
    if args.output is None:
        return options
    check_output(args.output)
    try:
        check_destination(args.output, resume=args.resume, overwrite=args.overwrite)
    except OutputExistsError as e:
        raise UsageError(
            f"--output: {partial_path(args.output)} is left from an interrupted run: add --resume to finish it "
            "or --overwrite to start again"
            if e.partial
            else f"--output: {args.output} exists: add --resume to add missing images or --overwrite to replace it"
        ) from None
    return options


def _read_labels(path: Path, num_classes: int) -> list[str]:
    names = path.read_text(encoding="utf-8").splitlines()
    while names and not names[-1].strip():
        names.pop()
    if len(names) != num_classes:
        raise UsageError(f"--labels: {path} has {len(names)} lines, the model predicts {num_classes} classes")
    return names


class _Printer:
    """What ``levit predict`` prints while the job runs: rows (text or collected for ``--json``) when
    there is no ``--output``, the first :data:`PREDICT_ERROR_LINES` unreadable files, notes."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.collected, self.errors = args, [], 0
        self.first_error: str | None = None  # "path: reason" of the first unreadable file

    def rows(self, rows: list[dict]) -> None:
        from tqdm.auto import tqdm

        if self.args.output is not None:
            return
        ok = [{k: v for k, v in r.items() if k != "error"} for r in rows if r["error"] is None]
        if self.args.json:
            self.collected.extend(ok)
            return
        lines = []
        for r in ok:
            lines.append(r["path"])
            lines += [f"  {p['prob'] * 100:6.2f}%  {p['label']}  (class {p['class']})" for p in r["top"]]
        if lines:
            tqdm.write("\n".join(lines), file=sys.stdout)

    def error(self, path: str, reason: str) -> None:
        from tqdm.auto import tqdm

        self.errors += 1
        self.first_error = self.first_error or f"{path}: {reason}"
        if self.errors <= PREDICT_ERROR_LINES:
            tqdm.write(f"skipped {path}: {reason}", file=sys.stderr)

    @staticmethod
    def note(line: str) -> None:
        print(line, file=sys.stderr)


def cmd_predict(args: argparse.Namespace) -> int:
    from levit.runtime.predict import list_inputs, predict_files

    skipped: list[Path] = []
    files = list_inputs(args.paths, skipped=skipped)  # a missing path or no image fails before the model is built
    if skipped:  # files in the folders without an image extension are left out: say so, once
        kinds = " ".join(sorted({f.suffix.lower() or "(none)" for f in skipped}))
        print(
            f"levit predict: skipped {len(skipped)} file(s) in the folders whose extension is not an image's "
            f"({kinds}); give such a file by name to try it",
            file=sys.stderr,
        )
    options = predict_options(args)
    if options.uses_runtime:
        check_runtime(options.backend, options.precision)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA GPU is available here")
    kwargs = {"img_size": args.img_size} if args.img_size else {}
    batch = min(options.default_batch_size(on_cpu=args.device == "cpu"), len(files))
    model = load_model(args, batch=batch, **kwargs).to(args.device)
    if args.labels:
        options = options.replace(class_names=tuple(_read_labels(args.labels, model.config.num_classes)))
    out = _Printer(args)
    try:
        with warnings_as_lines():  # e.g. "this CPU has no bf16 instructions: runs fp32"
            summary = predict_files(
                model,
                files,
                options,
                on_rows=out.rows,
                on_error=out.error,
                on_note=out.note,
                progress=not args.json or args.output is not None,
            )
    except KeyboardInterrupt:
        if args.output is not None:
            where = partial_path(args.output)
            print(f"levit predict: stopped; rows so far are in {where} (--resume finishes)", file=sys.stderr)
        raise
    _print_summary(args, summary, out.collected)
    if summary.classified == 0 and summary.failed > 0:
        first = "" if out.first_error is None else f" (the first: {out.first_error})"
        print(f"levit predict: error: none of the {summary.failed} image file(s) could be read{first}", file=sys.stderr)
        return 1
    return 0


def _print_summary(args: argparse.Namespace, summary, collected: list[dict]) -> None:
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
