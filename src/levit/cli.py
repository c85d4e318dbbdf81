"""The ``levit`` command line. Thin: parse, call the library, print.

Each command is a row of :data:`COMMANDS`: its one-line help, examples, a function adding its
options and its handler. Only the command being run gets its options built (and the library
modules they take their choices from imported), so ``levit --help`` and ``levit models`` start
without importing torch.

Exit codes: 0 success, 1 failure (bad file, data or model), 2 usage error (bad flag or value),
130 interrupted, 141 output pipe closed (``levit models | head -1``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["COMMANDS", "UsageError", "build_parser", "main"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_PIPE = 0, 1, 2, 130, 141


class UsageError(Exception):
    """A bad flag value found after parsing: printed as one line, exit code 2."""


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Examples kept as written; ``(default: X)`` added only where the help does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (and exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


# ---- value types: a bad value is a one-line usage error naming the flag (exit 2) -------------------
def _model_name(text: str) -> str:
    """A registered model name or alias, canonicalised here once (``LeViT_128S`` -> ``levit_128s``)."""
    from levit.registry import canonical_name

    try:
        return canonical_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _img_size(text: str) -> int:
    """An input resolution: a positive multiple of 16 (the stem's four stride-2 convolutions)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 16 or v % 16:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 16 (e.g. 224), got {v}")
    return v


def _img_hw(text: str) -> int | tuple[int, int]:
    """An input resolution ``N`` or ``HxW`` (e.g. ``224`` or ``192x320``), each a multiple of 16."""
    parts = text.lower().replace(",", "x").split("x")
    if len(parts) == 1:
        return _img_size(text)
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected N or HxW (e.g. 224 or 192x320), got {text!r}")
    try:
        h, w = (int(v) for v in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or HxW (e.g. 224 or 192x320), got {text!r}") from None
    for v in (h, w):
        if v < 16 or v % 16:
            raise argparse.ArgumentTypeError(f"height and width must be positive multiples of 16, got {text!r}")
    return h if h == w else (h, w)


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return v


def _one_of(values: Sequence[str], what: str) -> Callable[[str], str]:
    """Like ``choices=``, with the library's own wording: ``unknown backend 'x'; choose from ...``."""

    def parse(text: str) -> str:
        if text not in values:
            raise argparse.ArgumentTypeError(f"unknown {what} {text!r}; choose from {', '.join(values)}")
        return text

    return parse


# ---- shared option groups --------------------------------------------------------------------
def _model_options(p: argparse.ArgumentParser, *, required: bool = False) -> None:
    """--model / --checkpoint / --pretrained."""
    p.add_argument(
        "--model", "-m", type=_model_name, required=required, help="model name or alias (see `levit models`)"
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--checkpoint", "-c", type=Path, help="official, timm or levit checkpoint file")
    g.add_argument("--pretrained", action="store_true", help="download the authors' released weights")


def _img_size_option(p: argparse.ArgumentParser, help: str, *, rectangular: bool = False) -> None:
    """--img-size N, or N / HxW where the command takes non-square inputs."""
    if rectangular:
        p.add_argument("--img-size", type=_img_hw, default=None, metavar="N|HxW", help=help)
    else:
        p.add_argument("--img-size", type=_img_size, default=None, metavar="N", help=help)


def _runtime_options(
    p: argparse.ArgumentParser,
    *,
    backend: str | None,
    precision: str | None,
    precision_help: str,
    backend_help: str = "runtime",
) -> None:
    """--backend / --precision, choices from :mod:`levit.deploy`."""
    from levit.deploy import BACKENDS, PRECISIONS

    p.add_argument(
        "--backend", type=_one_of(BACKENDS, "backend"), default=backend, metavar="|".join(BACKENDS), help=backend_help
    )
    p.add_argument(
        "--precision",
        type=_one_of(PRECISIONS, "precision"),
        default=precision,
        metavar="|".join(PRECISIONS),
        help=precision_help,
    )


def _check_runtime(backend: str, precision: str) -> None:
    """The backend/precision pair runs here (packages installed, combination exists), else exit 2."""
    from levit.deploy import check_backend

    try:
        check_backend(backend, precision)
    except ValueError as e:
        raise UsageError(f"--backend/--precision: {e}") from e


@contextlib.contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """Python warnings raised inside the block are printed as one ``warning: ...`` line each."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)


def _load_model(args: argparse.Namespace, **kwargs: object):
    """The model named by --model / --checkpoint / --pretrained (levit files may omit --model)."""
    from levit.checkpoint import read_metadata
    from levit.registry import create_model

    name = args.model
    if name is None:
        if args.checkpoint is None:
            raise UsageError("--model is required (unless --checkpoint is a levit-format file)")
        meta = read_metadata(args.checkpoint)
        if meta is None:
            raise UsageError(f"--model is required: {args.checkpoint} is not a levit-format file")
        name = meta["variant"]
    with _warnings_as_lines():
        model = create_model(name, checkpoint=args.checkpoint, pretrained=args.pretrained, **kwargs)
    if args.checkpoint is None and not args.pretrained:
        print(
            f"WARNING: no --checkpoint or --pretrained given: {name} has RANDOM weights and its "
            "predictions are meaningless.",
            file=sys.stderr,
        )
    return model


# ---- models ------------------------------------------------------------------------------------
def _args_models(p: argparse.ArgumentParser) -> None:
    p.add_argument("pattern", nargs="?", default="*", help="shell-style name filter")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--ablations", action="store_true", help="the paper's Table 5 rows (LeViT-128S, A1-A7) instead")


def _cmd_models(args: argparse.Namespace) -> int:
    from levit.config import PAPER_RESULTS, VARIANTS
    from levit.flops import flops_from_config, params_from_config
    from levit.registry import list_models

    if args.ablations:
        return _cmd_models_ablations(args)
    rows = []
    for name in list_models(args.pattern):
        cfg = VARIANTS[name]
        paper = PAPER_RESULTS.get(name)
        rows.append(
            {
                "model": name,
                "params": params_from_config(cfg),  # arithmetic on the config: no torch import
                "flops": flops_from_config(cfg),
                "top1": paper.top1 if paper else None,
                "top5": paper.top5 if paper else None,
                "cpu_img_s_paper": paper.cpu_img_s if paper else None,
                "gpu_img_s_paper": paper.gpu_img_s if paper else None,
                "pretrained": bool(paper),
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'model':<12} {'params':>12} {'FLOPs':>15} {'top-1':>6} {'top-5':>6} {'CPU img/s*':>11} {'GPU img/s*':>11}")
    for r in rows:
        t1 = f"{r['top1']:.1f}" if r["top1"] else "-"
        t5 = f"{r['top5']:.1f}" if r["top5"] else "-"
        cpu = f"{r['cpu_img_s_paper']:.1f}" if r["cpu_img_s_paper"] else "-"
        gpu = f"{r['gpu_img_s_paper']:.0f}" if r["gpu_img_s_paper"] else "-"
        print(f"{r['model']:<12} {r['params']:>12,} {r['flops']:>15,} {t1:>6} {t5:>6} {cpu:>11} {gpu:>11}")
    print("params: both heads, unfused; FLOPs: multiply-adds, paper convention; top-1/5: ImageNet-1k val,")
    print(
        "released weights; * speeds as printed in the paper (Xeon 6138 one thread / V100). `levit bench` measures yours."
    )
    return 0


def _cmd_models_ablations(args: argparse.Namespace) -> int:
    from levit.ablate import count_rows  # arithmetic on the configs: no torch import

    rows = count_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'row':<5} {'params':>11} {'paper':>6} {'FLOPs':>13} {'paper':>6} {'top-1*':>6}  change")
    for r in rows:
        print(
            f"{r['row']:<5} {r['params']:>11,} {r['paper_params_m']:>5}M {r['flops']:>13,} {r['paper_flops_m']:>5}M "
            f"{r['paper_top1']:>6}  {r['change']}"
        )
    print("LeViT-128S, 1000 classes, 224x224, without the distillation head (as in the paper's Table 5);")
    print("* ImageNet top-1 after 100 epochs, from the paper. `levit ablate` trains them on your machine.")
    return 0


# ---- predict -----------------------------------------------------------------------------------
def _args_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", type=Path, help="image files and/or folders (searched recursively)")
    _model_options(p)
    p.add_argument("--topk", type=int, default=5, help="classes to show per image")
    p.add_argument("--batch-size", "-b", type=int, default=32, help="images per forward pass")
    _img_size_option(
        p, "input resolution N or HxW (e.g. 192x320), multiples of 16 (default: the model's, 224)", rectangular=True
    )
    p.add_argument("--crop-pct", type=float, default=0.875, help="centre-crop fraction (resize = img_size / crop_pct)")
    _runtime_options(p, backend="eager", precision="fp32", precision_help="numeric precision")
    p.add_argument("--calibration", type=Path, nargs="+", help="int8: calibration images (default: the input images)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the runtime's)")
    p.add_argument("--json", action="store_true", help="print JSON results")


def _cmd_predict(args: argparse.Namespace) -> int:
    from levit.predict import list_inputs, predict_paths

    files = list_inputs(args.paths)  # a missing path or no image at all fails before the model is built
    if args.topk < 1:
        raise UsageError(f"--topk must be >= 1, got {args.topk}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not 0 < args.crop_pct <= 1:
        raise UsageError(f"--crop-pct must be in (0, 1], got {args.crop_pct}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    use_runtime = args.backend != "eager" or args.precision != "fp32" or args.threads
    if use_runtime:
        _check_runtime(args.backend, args.precision)  # the CLI's one check, before the model is built
    kwargs = {"img_size": args.img_size} if args.img_size else {}
    from levit.fuse import fuse

    model = fuse(_load_model(args, **kwargs))  # fused once: the runtime and the fp32 reference share it
    runner = None
    if use_runtime:
        from levit.deploy import deploy

        calib = (args.calibration or files) if args.precision != "fp32" else None
        with _warnings_as_lines():  # e.g. "this CPU has no bf16 instructions: runs fp32"
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


# ---- bench -------------------------------------------------------------------------------------
def _args_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a short run over a few models (< 2 minutes)")
    p.add_argument("--models", help="comma-separated names (see --list); default: all of Table 3")
    p.add_argument("--list", action="store_true", help="list the models the benchmark knows")
    _runtime_options(
        p,
        backend=None,
        backend_help="default: eager on CPU (the paper's protocol); on GPU auto: levit's fastest path per batch, "
        "timm's models eager",
        precision=None,
        precision_help="default: fp32 on CPU, fp16 on GPU",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to run")
    p.add_argument("--threads", type=int, default=1, help="CPU threads")
    p.add_argument(
        "--batch-size",
        "-b",
        default=None,
        help="a batch size or a comma-separated list (1,64,1024); "
        "default: 16 on CPU, the largest fitting power of two on GPU",
    )
    _img_size_option(p, "resolution (default: each model's native one)")
    p.add_argument("--warmup", type=float, default=None, help="warm-up seconds per model (default 5, quick 1)")
    p.add_argument("--windows", type=int, default=None, help="timed windows per model (default 5, quick 3)")
    p.add_argument("--window", type=float, default=None, help="seconds per timed window (default 3, quick 1)")
    p.add_argument("--output", "-o", type=Path, help="write the rows to FILE.csv or FILE.json")
    p.add_argument("--plot", type=Path, help="write the speed/accuracy plot (Figure 1) to FILE.png")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of the table")


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from levit.benchmark import (
        BENCH_MODELS,
        DEFAULT_MODELS,
        QUICK_MODELS,
        benchmark,
        format_table,
        parse_batch_sizes,
        plot_rows,
        write_rows,
    )
    from levit.deploy import check_backend
    from levit.errors import LeViTError

    if args.list:
        for name, e in BENCH_MODELS.items():
            print(f"{name:<26} {e.family:<30} {e.img_size}px  top-1 {e.top1 if e.top1 else '-'}")
        return 0
    if args.models:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = [m for m in models if m not in BENCH_MODELS]
        if unknown:
            raise UsageError(f"--models: unknown {', '.join(unknown)}; see `levit bench --list`")
    else:
        models = list(QUICK_MODELS if args.quick else DEFAULT_MODELS)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available here")
    precision = args.precision or ("fp16" if args.device == "cuda" else "fp32")
    if args.backend is None:  # GPU: levit's fastest path per batch, timm eager; CPU: the paper's eager protocol
        args.backend = "auto" if args.device == "cuda" else "eager"
    try:
        check_backend(args.backend, precision)
    except ValueError as e:
        raise UsageError(f"--backend/--precision: {e}") from e
    if precision == "int8":
        raise UsageError("--precision int8 needs calibration images: use `levit predict` or levit.deploy()")
    if args.device == "cpu" and args.backend == "cudagraph":
        raise UsageError("--backend cudagraph needs a GPU: add --device cuda")
    if args.device == "cuda" and args.backend in ("onnxruntime", "openvino", "executorch"):
        raise UsageError(f"--backend {args.backend} runs on the CPU only: drop --device cuda")
    try:
        batches = parse_batch_sizes(args.batch_size) if args.batch_size is not None else None
    except LeViTError as e:
        raise UsageError(f"--batch-size: {e}") from e
    for flag, v in (("--threads", args.threads), ("--windows", args.windows)):
        if v is not None and v < 1:
            raise UsageError(f"{flag} must be >= 1, got {v}")
    for path, flag, sufs in (
        (args.output, "--output", (".csv", ".json")),
        (args.plot, "--plot", (".png", ".svg", ".pdf")),
    ):
        if path is not None:
            if path.suffix.lower() not in sufs:
                raise UsageError(f"{flag} must end in {' or '.join(sufs)}, got {path.name!r}")
            if not path.parent.is_dir():
                raise UsageError(f"{flag}: folder {path.parent} does not exist")
    warmup, windows, window = (1.0, 3, 1.0) if args.quick else (5.0, 5, 3.0)
    warmup = args.warmup if args.warmup is not None else warmup
    windows = args.windows or windows
    window = args.window if args.window is not None else window
    threads = args.threads if args.device == "cpu" else None
    batch = batches or ([16] if args.device == "cpu" else None)
    print(
        f"levit bench: {len(models)} models, {args.device}, backend {args.backend}, {precision}, "
        f"batch {','.join(map(str, batch)) if batch else 'max power of two'}, threads {threads or '-'}; "
        f"warm-up {warmup:g}s + "
        f"{windows} x {window:g}s per model",
        file=sys.stderr,
    )
    import time

    t0 = time.perf_counter()

    def progress(i: int, n: int, name: str, row: dict | None) -> None:
        if row is None:
            print(f"[{i + 1}/{n}] {name} ...", end="", file=sys.stderr, flush=True)
        else:
            print(
                f" {row['img_s']:.1f} img/s ({row['backend']} {row['precision']}, batch {row['batch']}) "
                f"[{time.perf_counter() - t0:.0f}s]",
                file=sys.stderr,
                flush=True,
            )

    rows = benchmark(
        models,
        backend=args.backend,
        precision=precision,
        device=args.device,
        batch_size=batch,
        threads=threads,
        img_size=args.img_size,
        warmup_s=warmup,
        windows=windows,
        window_s=window,
        progress=progress,
    )
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows))
    if args.output:
        print(f"wrote {write_rows(rows, args.output)}", file=sys.stderr)
    if args.plot:
        print(f"wrote {plot_rows(rows, args.plot)}", file=sys.stderr)
    return 0


# ---- export ------------------------------------------------------------------------------------
_EDGE_FORMAT = ("executorch", ".pte")  # levit.edge.FORMAT / SUFFIX (no torch import to build the parser)


def _args_export(p: argparse.ArgumentParser) -> None:
    from levit.export import DEFAULT_TOLERANCE, FORMATS

    formats = {**FORMATS, _EDGE_FORMAT[0]: _EDGE_FORMAT[1]}
    _model_options(p)
    p.add_argument(
        "--format",
        "-f",
        type=_one_of(tuple(formats), "format"),
        metavar="|".join(formats),
        default=None,
        help="output format (default: from --output's suffix)",
    )
    suffixes = ", ".join(formats.values())
    p.add_argument("--output", "-o", type=Path, required=True, help=f"output file ({suffixes})")
    _img_size_option(
        p, "input resolution N or HxW (e.g. 192x320), multiples of 16 (default: the model's, 224)", rectangular=True
    )
    p.add_argument(
        "--batch-size",
        "-b",
        type=int,
        default=None,
        help="onnx/openvino/torchscript: batch traced with, the batch axis stays dynamic (default 2); "
        "executorch: the program's fixed batch (default 1), or its largest with --dynamic-batch (default 32)",
    )
    p.add_argument("--opset", type=int, default=17, help="ONNX opset")
    p.add_argument(
        "--precision",
        type=_one_of(("fp32", "int8"), "precision"),
        default="fp32",
        metavar="fp32|int8",
        help="executorch: int8 = PT2E static quantization with XNNPACK's quantizer (needs --calibration)",
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
        type=_positive_float,
        default=DEFAULT_TOLERANCE,
        help="largest accepted relative error of the exported file against a float64 run of the model "
        f"(fp32 rounding allowed on top; default: {DEFAULT_TOLERANCE:g})",
    )


def _cmd_export(args: argparse.Namespace) -> int:
    from levit.export import ExportError, check_opset, check_packages, export, resolve_format

    if args.format == _EDGE_FORMAT[0] or (args.format is None and args.output.suffix.lower() == _EDGE_FORMAT[1]):
        return _cmd_export_executorch(args)
    for flag, given in (
        ("--precision int8", args.precision != "fp32"),
        ("--calibration", args.calibration),
        ("--dynamic-batch", args.dynamic_batch),
        ("--min-agreement", args.min_agreement is not None),
    ):
        if given:
            raise UsageError(
                f"{flag} is only for --format executorch (onnx/openvino/torchscript are fp32, batch dynamic)"
            )
    args.batch_size = 2 if args.batch_size is None else args.batch_size
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
    model = _load_model(args, **kwargs)
    result = export(
        model, args.output, format=fmt, batch_size=args.batch_size, opset=args.opset, tolerance=args.tolerance
    )
    print(f"exported {result}")
    return 0


def _cmd_export_executorch(args: argparse.Namespace) -> int:
    """``levit export --format executorch``: levit.edge.export_executorch, flags checked first."""
    if args.output.suffix.lower() != _EDGE_FORMAT[1]:
        raise UsageError(f"--output: an ExecuTorch program is a {_EDGE_FORMAT[1]} file, got {args.output.name!r}")
    if not args.output.parent.is_dir():
        raise UsageError(f"--output: folder {args.output.parent} does not exist")
    if args.precision == "int8" and not args.calibration:
        raise UsageError("--precision int8 needs --calibration images (files or folders)")
    if args.precision == "fp32" and (args.calibration or args.min_agreement is not None):
        raise UsageError("--calibration and --min-agreement are for --precision int8")
    if args.min_agreement is not None and not 0 <= args.min_agreement <= 1:
        raise UsageError(f"--min-agreement must be in [0, 1], got {args.min_agreement}")
    batch = args.batch_size if args.batch_size is not None else (32 if args.dynamic_batch else 1)
    if batch < (2 if args.dynamic_batch else 1):
        raise UsageError(f"--batch-size must be >= {2 if args.dynamic_batch else 1}, got {batch}")
    from levit.pte import available

    if not available():
        raise UsageError("--format executorch needs ExecuTorch: pip install 'levit[edge]'")
    from levit.edge import DEFAULT_MIN_AGREEMENT, export_executorch

    kwargs = {"img_size": args.img_size} if args.img_size else {}
    model = _load_model(args, **kwargs)
    with _warnings_as_lines():  # e.g. an unfusable ablation exported unfused
        result = export_executorch(
            model,
            args.output,
            precision=args.precision,
            calibration=args.calibration,
            batch_size=batch,
            dynamic_batch=args.dynamic_batch,
            tolerance=args.tolerance,
            min_agreement=DEFAULT_MIN_AGREEMENT if args.min_agreement is None else args.min_agreement,
        )
    print(f"exported {result}")
    return 0


# ---- train / eval ------------------------------------------------------------------------------
def _args_train(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter  # defaults come from the recipe, not argparse
    p.add_argument("--data", type=Path, help="folder with train/ and val/ sub-folders (ImageFolder layout)")
    p.add_argument("--dataset", choices=["digits"], help="a bundled dataset instead of --data (no download)")
    p.add_argument(
        "--output",
        "-o",
        type=Path,
        help="run folder: config.yaml, metrics.jsonl, checkpoints/, best.pth (default: runs/levit)",
    )
    p.add_argument("--model", "-m", type=_model_name, help="model name (see `levit models`); default: the recipe's")
    p.add_argument("--config", help="recipe YAML file or shipped recipe name (default: the model's paper recipe)")
    p.add_argument("--epochs", type=int, help="number of epochs")
    p.add_argument("--batch-size", "-b", type=int, help="images per process per step")
    _img_size_option(p, "training resolution (multiple of 16)")
    p.add_argument("--distillation", choices=["none", "soft", "hard"], help="teacher loss")
    p.add_argument("--teacher", help="teacher: a timm model name (regnety_160) or a levit variant")
    p.add_argument("--teacher-checkpoint", type=Path, help="teacher weights file (never downloaded)")
    p.add_argument("--resume", metavar="auto|PATH", help="continue: 'auto' = newest complete checkpoint in --output")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to train (default: cuda if available)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe values, e.g. lr=1e-3 mixup=0")


def _args_eval(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter  # defaults spelled out in the help texts
    p.add_argument("--data", type=Path, required=True, help="folder with one sub-folder per class")
    _model_options(p)
    _img_size_option(p, "input resolution N or HxW (default: the checkpoint's)", rectangular=True)
    p.add_argument(
        "--crop-pct", type=float, default=None, help="centre-crop fraction (default: the training run's or 0.875)"
    )
    p.add_argument("--batch-size", "-b", type=int, default=64, help="images per forward pass (default: 64)")
    p.add_argument("--workers", type=int, default=2, help="data loading processes (default: 2)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to run (default: auto)")
    p.add_argument("--no-fuse", action="store_true", help="evaluate the unfused model (BatchNorm not folded)")
    p.add_argument("--output", type=Path, help="also write the results as JSON to this file")


def _cmd_train(args: argparse.Namespace) -> int:
    from levit.errors import LeViTError
    from levit.recipe import available_recipes, parse_overrides, resolve_config
    from levit.train import train

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


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from levit.engine import evaluate_folder

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        raise UsageError(f"--crop-pct must be in (0, 1], got {args.crop_pct}")
    if args.checkpoint is None and not args.pretrained:
        raise UsageError("--checkpoint PATH (or --pretrained) is required: evaluating random weights is meaningless")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available")
    from levit.checkpoint import read_metadata
    from levit.data import check_image_folder

    check_image_folder(args.data)  # a bad folder fails before the model is loaded
    meta = read_metadata(args.checkpoint) if args.checkpoint is not None else None
    train_eval = (meta or {}).get("eval") or {}
    kwargs = {"img_size": args.img_size} if args.img_size else {}
    model = _load_model(args, **kwargs)
    crop_pct = args.crop_pct or train_eval.get("crop_pct") or 0.875
    fused = getattr(model, "is_fused", False)
    if not args.no_fuse and not fused:
        from levit.fuse import fusable, fuse

        if fusable(model):
            model, fused = fuse(model), True
        else:  # ablation A3: LayerNorm does not fold into the linears
            print(f"note: {model.config.ablation} cannot be fused: evaluating the unfused model", file=sys.stderr)
    m = evaluate_folder(
        model,
        args.data,
        img_size=model.config.img_size,
        crop_pct=crop_pct,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
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


# ---- ablate / biases (the paper's Table 5 and the attention-bias pictures) ------------------------
def _args_ablate(p: argparse.ArgumentParser) -> None:
    from levit.ablate import ROWS

    p.add_argument("--output", "-o", type=Path, default=Path("runs/ablate"), help="sweep folder")
    p.add_argument("--data", type=Path, help="ImageFolder with train/ and val/ (default: the bundled digits)")
    p.add_argument("--epochs", type=int, default=10, help="epochs per row")
    p.add_argument("--img-size", type=_img_size, default=32, metavar="N", help="training resolution (multiple of 16)")
    p.add_argument("--batch-size", "-b", type=int, default=64, help="training batch")
    p.add_argument("--threads", type=int, default=None, help="training threads (default: the digits recipe's, 1)")
    p.add_argument("--variants", default=",".join(ROWS), help="comma-separated rows")
    p.add_argument("--teacher-checkpoint", type=Path, help="teacher weights: hard distillation for all rows but A4")
    p.add_argument(
        "--bench-img-size", type=_img_size, default=224, metavar="N", help="resolution of the CPU speed measurement"
    )
    p.add_argument("--bench-seconds", type=float, default=3.0, help="seconds of timing per row")
    p.add_argument("--resume", choices=["auto"], help="continue a sweep: skip complete rows, resume a started one")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="training-recipe values, e.g. lr=1e-3")


def _cmd_ablate(args: argparse.Namespace) -> int:
    from levit.ablate import ROWS, AblationSettings, ablate, format_markdown
    from levit.errors import LeViTError
    from levit.recipe import parse_overrides

    rows = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    bad = [v for v in rows if v not in ROWS]
    if bad or not rows:
        raise UsageError(f"--variants: unknown row(s) {bad}; valid: {', '.join(ROWS)}")
    if args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
    if args.data is not None and not args.data.is_dir():
        raise UsageError(f"--data: folder not found: {args.data}")
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


def _args_biases(p: argparse.ArgumentParser) -> None:
    _model_options(p)
    p.add_argument("--output", "-o", type=Path, default=Path("attention_biases.png"), help="PNG (+ .npz beside it)")
    _img_size_option(
        p, "show the biases resampled to this resolution, N or HxW (default: the model's)", rectangular=True
    )


def _cmd_biases(args: argparse.Namespace) -> int:
    from levit.biases import attention_biases, plot_biases, save_biases

    if args.output.suffix.lower() != ".png":
        raise UsageError(f"--output: expected a .png file, got {args.output.name!r}")
    if not args.output.parent.is_dir():
        raise UsageError(f"--output: folder {args.output.parent} does not exist")
    kwargs = {"img_size": args.img_size} if args.img_size else {}
    model = _load_model(args, **kwargs)
    tables = attention_biases(model)
    npz = save_biases(tables, args.output.with_suffix(".npz"))
    cfg = model.config
    label = cfg.name + (f" ({cfg.ablation})" if cfg.ablation else "")
    size = "x".join(map(str, cfg.img_hw)) if cfg.img_hw[0] != cfg.img_hw[1] else f"{cfg.img_hw[0]}px"
    plot_biases(tables, args.output, title=f"{label} attention biases at {size}")
    print(f"written: {args.output} and {npz} ({len(tables)} attention layers)")
    return 0


# ---- the command table and the entry point -----------------------------------------------------
@dataclass(frozen=True)
class Command:
    """One ``levit`` sub-command: help line, examples, options, handler."""

    help: str
    examples: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {
    "models": Command(
        "list the LeViT variants with their exact sizes",
        "  levit models\n  levit models 'levit_1*' --json\n  levit models --ablations   # Table 5: A1-A7",
        _args_models,
        _cmd_models,
    ),
    "predict": Command(
        "classify images (files or folders) with the official evaluation preprocessing",
        "  levit predict cat.jpg --model levit_256 --pretrained\n"
        "  levit predict photos/ --model levit_128s --checkpoint LeViT-128S-96703c44.pth --topk 3 --json\n"
        "  levit predict img.png --checkpoint my_model.safetensors   # levit files know their model\n"
        "  levit predict photos/ -m levit_256 --pretrained --backend openvino --precision int8",
        _args_predict,
        _cmd_predict,
    ),
    "bench": Command(
        "measure images/s (the paper's Table 3 protocol) for LeViT, EfficientNet and DeiT on this machine",
        "  levit bench --quick                              # ~1.5 min: one line per family, 1 thread, batch 16\n"
        "  levit bench --plot speed.png --output speed.csv  # the whole Table 3 + Figure 1\n"
        "  levit bench --models levit_128s,timm_levit_128s --backend openvino --precision bf16\n"
        "  levit bench --device cuda                        # fp16, largest power-of-two batch\n"
        "  levit bench --device cuda -b 1,64,1024 --models levit_128s,timm_levit_128s  # latency + throughput\n"
        "  levit bench --list",
        _args_bench,
        _cmd_bench,
    ),
    "export": Command(
        "export the fused model to ONNX / OpenVINO / TorchScript / ExecuTorch and check it against PyTorch",
        "  levit export --model levit_128s --checkpoint LeViT-128S-96703c44.pth --format onnx --output levit.onnx\n"
        "  levit export --model levit_256 --pretrained --format openvino --output levit_256.xml\n"
        "  levit export --checkpoint mine.safetensors --output mine.pt   # format from the suffix\n"
        "  levit export -m levit_128s --pretrained -o levit.pte          # ExecuTorch/XNNPACK (phones), fp32, batch 1\n"
        "  levit export -m levit_128s --pretrained -o levit_int8.pte --precision int8 --calibration photos/",
        _args_export,
        _cmd_export,
    ),
    "train": Command(
        "train a LeViT with the paper's recipe (hard distillation, DeiT augmentation), on 1 CPU to many GPUs",
        "  levit train --dataset digits --output runs/digits            # 2-CPU demo, no download\n"
        "  levit train --data ~/imagenet --output runs/128s --model levit_128s \\\n"
        "      --teacher-checkpoint regnety_160-a5fe301d.pth             # paper recipe (configs/levit_128s.yaml)\n"
        "  levit train --data mydata --output runs/ft --model levit_256 --distillation none \\\n"
        "      epochs=30 pretrained=true total_batch=null warmup_epochs=1  # fine-tune, KEY=VALUE overrides\n"
        "  levit train --data mydata --output runs/ft --model levit_256 --resume auto   # continue after a crash\n"
        "  torchrun --nproc_per_node=8 -m levit train --data ~/imagenet --output runs/256 --model levit_256 \\\n"
        "      --teacher-checkpoint regnety_160.pth                     # DDP on 8 GPUs\n"
        "  torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 --rdzv-id=run1 \\\n"
        "      -m levit train ...                                        # 4 nodes x 8 GPUs (run on every node)",
        _args_train,
        _cmd_train,
    ),
    "eval": Command(
        "top-1 / top-5 / loss of a checkpoint on an ImageFolder (fused model by default)",
        "  levit eval --data ~/imagenet/val --model levit_128s --pretrained\n"
        "  levit eval --data runs/digits/digits/val --checkpoint runs/digits/best.pth --output eval.json\n"
        "  torchrun --nproc_per_node=4 -m levit eval --data ~/imagenet/val --model levit_256 -c LeViT-256.pth",
        _args_eval,
        _cmd_eval,
    ),
    "ablate": Command(
        "train LeViT-128S and the paper's Table 5 ablations A1-A7 at a short schedule; table + bar chart",
        "  levit ablate                                        # the bundled digits, 32px, 10 epochs, 2-CPU minutes\n"
        "  levit ablate --resume auto                          # continue an interrupted sweep\n"
        "  levit ablate --variants base,A3,A5 --epochs 3\n"
        "  levit ablate --data ~/imagenet100 --img-size 224 --epochs 100 --output runs/ablate-in100 \\\n"
        "      --teacher-checkpoint teacher.safetensors        # distillation for every row but A4, as the paper",
        _args_ablate,
        _cmd_ablate,
    ),
    "biases": Command(
        "draw the learned attention biases: each head's bias over the (dy, dx) offsets, per stage",
        "  levit biases --model levit_128s --pretrained --output biases.png\n"
        "  levit biases --checkpoint runs/digits/best.pth --output digits_biases.png\n"
        "  levit biases --model levit_256 --pretrained --img-size 384 --output b384.png  # resampled",
        _args_biases,
        _cmd_biases,
    ),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of the ``levit`` command. With ``only``, just that command gets its
    options (the others keep their one-line help): ``main`` builds no more than it runs."""
    from levit._version import __version__

    parser = _Parser(
        prog="levit",
        description="LeViT image classifiers: models, prediction, benchmarks, training, export.",
        epilog="examples:\n  levit models\n  levit predict photo.jpg --model levit_256 --pretrained\n"
        "  levit bench --quick\n\nexit codes: 0 success, 1 failure, 2 usage error (bad flag or value).\n"
        "Run `levit COMMAND --help` for each command's options.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"levit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=cmd.help,
            description=cmd.help,
            epilog="examples:\n" + cmd.examples,
            formatter_class=_Formatter,
        )
        if only is None or only == name:
            cmd.add_arguments(p)
        p.set_defaults(func=cmd.run)
    return parser


def _command_in(argv: Sequence[str]) -> str:
    """The sub-command named in ``argv`` ('' when none): the first word that is not an option."""
    return next((a for a in argv if not a.startswith("-")), "")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``levit`` command; returns the exit code (0 ok, 1 failure, 2 usage error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    except BrokenPipeError:  # `levit models | head -1`: the reader left; say nothing more
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), sys.stdout.fileno())  # the exit-time flush must not fail again
        return EXIT_PIPE


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = build_parser(only=_command_in(argv))
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported by the sub-command, whose --help lists the valid flags
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _main(argv: list[str]) -> int:
    try:
        args = _parse(argv)
    except SystemExit as e:  # --help, --version, or a usage error already printed: return its code
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    from levit.errors import LeViTError

    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows up here, inside the handler's error reporting
        return code
    except UsageError as e:
        if args.debug:
            raise
        print(f"levit {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (LeViTError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        if args.debug:
            raise
        print(f"levit {args.command}: error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
