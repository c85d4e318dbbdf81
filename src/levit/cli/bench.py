"""``levit bench``: the paper's Table 3 speed protocol on this machine."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import (
    UsageError,
    check_img_memory,
    check_output,
    img_size_option,
    require,
    runtime_options,
    warnings_as_lines,
)


def args_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a short run over a few models (< 2 minutes)")
    p.add_argument("--models", help="comma-separated names (see --list); default: all of Table 3")
    p.add_argument("--list", action="store_true", help="list the models the benchmark knows")
    runtime_options(
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
    img_size_option(p, "resolution (default: each model's native one)")
    p.add_argument("--warmup", type=float, default=None, help="warm-up seconds per model (default 5, quick 1)")
    p.add_argument("--windows", type=int, default=None, help="timed windows per model (default 5, quick 3)")
    p.add_argument("--window", type=float, default=None, help="seconds per timed window (default 3, quick 1)")
    p.add_argument("--output", "-o", type=Path, help="write the rows to FILE.csv or FILE.json")
    p.add_argument("--plot", type=Path, help="write the speed/accuracy plot (Figure 1) to FILE.png")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of the table")


def _check_numbers_and_outputs(args: argparse.Namespace, models: list[str], batches: list[int] | None) -> None:
    """The numeric flags, the output files and the input size's memory, before any model is built."""
    from levit.paper.speed import BENCH_MODELS

    for flag, v in (("--threads", args.threads), ("--windows", args.windows)):
        if v is not None and v < 1:
            raise UsageError(f"{flag} must be >= 1, got {v}")
    require("--warmup", args.warmup, 0)
    require("--window", args.window, 0)  # 0: one call per window
    for path, flag, sufs in (
        (args.output, "--output", (".csv", ".json")),
        (args.plot, "--plot", (".png", ".svg", ".pdf")),
    ):
        if path is not None:
            if path.suffix.lower() not in sufs:
                raise UsageError(f"{flag} must end in {' or '.join(sufs)}, got {path.name!r}")
            check_output(path, flag)
    if args.img_size:
        for name in dict.fromkeys(BENCH_MODELS[m].source for m in models if BENCH_MODELS[m].implementation == "levit"):
            check_img_memory(name, args.img_size, max(batches or [16]))


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from levit.errors import LeViTError
    from levit.paper.speed import (
        BENCH_MODELS,
        DEFAULT_MODELS,
        QUICK_MODELS,
        benchmark,
        format_table,
        parse_batch_sizes,
        plot_rows,
        write_rows,
    )
    from levit.runtime.deploy import check_backend

    if args.list:
        for name, e in BENCH_MODELS.items():
            print(f"{name:<26} {e.family:<30} {e.img_size}px  top-1 {e.top1 if e.top1 else '-'}")
        return 0
    if args.models is not None:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        if not models:
            raise UsageError("--models: no model named; give comma-separated names (see `levit bench --list`)")
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
    _check_numbers_and_outputs(args, models, batches)
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

    with warnings_as_lines():  # e.g. "levit_128s (A3) cannot be fused: timed unfused"
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
