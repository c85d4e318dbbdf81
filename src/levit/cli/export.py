"""``levit export``: the fused model to ONNX / OpenVINO / TorchScript / ExecuTorch, checked against PyTorch."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import (
    UsageError,
    check_output,
    img_size_option,
    load_model,
    model_options,
    one_of,
    positive_float,
    warnings_as_lines,
)


def args_export(p: argparse.ArgumentParser) -> None:
    from levit.runtime.options import DEFAULT_DYNAMIC_MAX_BATCH, DEFAULT_TOLERANCE, EDGE_FORMAT, FORMATS

    formats = {**FORMATS, EDGE_FORMAT[0]: EDGE_FORMAT[1]}
    model_options(p)
    p.add_argument(
        "--format",
        "-f",
        type=one_of(tuple(formats), "format"),
        metavar="|".join(formats),
        default=None,
        help="output format (default: from --output's suffix)",
    )
    suffixes = ", ".join(formats.values())
    p.add_argument("--output", "-o", type=Path, required=True, help=f"output file ({suffixes})")
    img_size_option(
        p, "input resolution N or HxW (e.g. 192x320), multiples of 16 (default: the model's, 224)", rectangular=True
    )
    p.add_argument(
        "--batch-size",
        "-b",
        type=int,
        default=None,
        help="onnx/openvino/torchscript: the example batch (default 2; torchscript traces it, the ONNX "
        "export its first image), the batch axis stays dynamic; "
        "executorch: the program's fixed batch (default 1), or its largest with --dynamic-batch "
        f"(default {DEFAULT_DYNAMIC_MAX_BATCH})",
    )
    p.add_argument("--opset", type=int, default=17, help="ONNX opset")
    p.add_argument(
        "--precision",
        type=one_of(("fp32", "int8"), "precision"),
        default="fp32",
        metavar="fp32|int8",
        help="executorch: int8 = PT2E quantization with XNNPACK's quantizer (needs --calibration)",
    )
    p.add_argument(
        "--int8-activations",
        type=one_of(("dynamic", "static"), "int8 activations"),
        default=None,
        metavar="dynamic|static",
        help="executorch int8: the linear layers' inputs quantized per token while the program runs (dynamic, "
        "the default: closer to fp32), or per tensor with calibrated scales (static)",
    )
    p.add_argument("--calibration", type=Path, nargs="+", help="executorch int8: calibration images (files or folders)")
    p.add_argument("--dynamic-batch", action="store_true", help="executorch: a batch of 1..--batch-size, not fixed")
    p.add_argument(
        "--min-agreement",
        type=float,
        default=None,
        help="executorch int8: lowest accepted top-1 agreement with fp32 on the calibration images (default: 0.5)",
    )
    p.add_argument(
        "--tolerance",
        type=positive_float,
        default=DEFAULT_TOLERANCE,
        help="largest accepted relative error of the exported file against a float64 run of the model "
        f"(fp32 rounding allowed on top; default: {DEFAULT_TOLERANCE:g})",
    )


def cmd_export(args: argparse.Namespace) -> int:
    from levit.runtime.export import ExportError, check_opset, check_packages, export, resolve_format
    from levit.runtime.options import EDGE_FORMAT, FORMATS

    if args.format == EDGE_FORMAT[0] or (args.format is None and args.output.suffix.lower() == EDGE_FORMAT[1]):
        return cmd_export_executorch(args)
    for flag, given in (
        ("--precision int8", args.precision != "fp32"),
        ("--calibration", args.calibration),
        ("--dynamic-batch", args.dynamic_batch),
        ("--min-agreement", args.min_agreement is not None),
        ("--int8-activations", args.int8_activations is not None),
    ):
        if given:
            raise UsageError(
                f"{flag} is only for --format executorch (onnx/openvino/torchscript are fp32, batch dynamic)"
            )
    args.batch_size = 2 if args.batch_size is None else args.batch_size
    if args.format is None and args.output.suffix.lower() not in FORMATS.values():  # the CLI's formats, .pte too
        known = ", ".join(f"{s} ({f})" for f, s in [*FORMATS.items(), EDGE_FORMAT])
        raise UsageError(f"--output/--format: cannot tell the format from {args.output.name!r}: give one of {known}")
    try:
        fmt = resolve_format(args.output, args.format)
        if fmt == "onnx":
            check_opset(args.opset)
    except ExportError as e:
        flag = "--opset" if "opset" in str(e) else "--output/--format"
        raise UsageError(f"{flag}: {e}") from e
    check_output(args.output, inputs={"--checkpoint": args.checkpoint})
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_packages(fmt)  # a missing runtime fails before the model is built
    kwargs = {"img_size": args.img_size} if args.img_size else {}
    model = load_model(args, batch=args.batch_size, **kwargs)
    result = export(
        model, args.output, format=fmt, batch_size=args.batch_size, opset=args.opset, tolerance=args.tolerance
    )
    print(f"exported {result}")
    return 0


def cmd_export_executorch(args: argparse.Namespace) -> int:
    """``levit export --format executorch``: :func:`levit.runtime.edge.export_executorch`, flags checked first."""
    from levit.runtime.options import DEFAULT_DYNAMIC_MAX_BATCH, EDGE_FORMAT

    if args.output.suffix.lower() != EDGE_FORMAT[1]:
        raise UsageError(f"--output: an ExecuTorch program is a {EDGE_FORMAT[1]} file, got {args.output.name!r}")
    check_output(args.output, inputs={"--checkpoint": args.checkpoint})
    if args.precision == "int8" and not args.calibration:
        raise UsageError("--precision int8 needs --calibration images (files or folders)")
    if args.precision == "fp32" and (args.calibration or args.min_agreement is not None or args.int8_activations):
        raise UsageError("--calibration, --min-agreement and --int8-activations are for --precision int8")
    if args.min_agreement is not None and not 0 <= args.min_agreement <= 1:
        raise UsageError(f"--min-agreement must be in [0, 1], got {args.min_agreement}")
    batch = args.batch_size if args.batch_size is not None else (DEFAULT_DYNAMIC_MAX_BATCH if args.dynamic_batch else 1)
    if batch < (2 if args.dynamic_batch else 1):
        raise UsageError(f"--batch-size must be >= {2 if args.dynamic_batch else 1}, got {batch}")
    from levit.runtime.pte import available

    if not available():
        raise UsageError("--format executorch needs ExecuTorch: pip install 'levit[edge]'")
    from levit.runtime.edge import DEFAULT_MIN_AGREEMENT, Int8Options, export_executorch

    int8 = Int8Options(
        activations=args.int8_activations or "dynamic",
        min_agreement=DEFAULT_MIN_AGREEMENT if args.min_agreement is None else args.min_agreement,
    )
    kwargs = {"img_size": args.img_size} if args.img_size else {}
    model = load_model(args, batch=batch, **kwargs)
    with warnings_as_lines():
        result = export_executorch(
            model,
            args.output,
            precision=args.precision,
            calibration=args.calibration,
            batch_size=batch,
            dynamic_batch=args.dynamic_batch,
            tolerance=args.tolerance,
            int8=int8,
        )
    print(f"exported {result}")
    return 0
