"""``levit export``: the fused model to ONNX / OpenVINO / TorchScript, checked against PyTorch."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import UsageError, img_size_option, load_model, model_options, one_of, positive_float


def args_export(p: argparse.ArgumentParser) -> None:
    from levit.runtime.options import DEFAULT_TOLERANCE, FORMATS

    model_options(p)
    p.add_argument(
        "--format",
        "-f",
        type=one_of(tuple(FORMATS), "format"),
        metavar="|".join(FORMATS),
        default=None,
        help="output format (default: from --output's suffix)",
    )
    suffixes = ", ".join(FORMATS.values())
    p.add_argument("--output", "-o", type=Path, required=True, help=f"output file ({suffixes})")
    img_size_option(
        p, "input resolution N or HxW (e.g. 192x320), multiples of 16 (default: the model's, 224)", rectangular=True
    )
    p.add_argument("--batch-size", "-b", type=int, default=2, help="batch traced with (the batch axis stays dynamic)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset")
    p.add_argument(
        "--tolerance",
        type=positive_float,
        default=DEFAULT_TOLERANCE,
        help="largest accepted relative error of the exported file against a float64 run of the model "
        f"(fp32 rounding allowed on top; default: {DEFAULT_TOLERANCE:g})",
    )


def cmd_export(args: argparse.Namespace) -> int:
    from levit.runtime.export import ExportError, check_opset, check_packages, export, resolve_format

    try:
        fmt = resolve_format(args.output, args.format)
        if fmt == "onnx":
            check_opset(args.opset)
    except ExportError as e:
        flag = "--opset" if "opset" in str(e) else "--output/--format"
        raise UsageError(f"{flag}: {e}") from e
    if not args.output.parent.is_dir():
        raise UsageError(f"--output: folder {args.output.parent} does not exist")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_packages(fmt)  # a missing runtime fails before the model is built
    kwargs = {"img_size": args.img_size} if args.img_size else {}
    model = load_model(args, **kwargs)
    result = export(
        model, args.output, format=fmt, batch_size=args.batch_size, opset=args.opset, tolerance=args.tolerance
    )
    print(f"exported {result}")
    return 0
