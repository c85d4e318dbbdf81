"""``levit bench``: the paper's Table 3 speed protocol on this machine."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from .common import (
    UsageError,
    check_img_memory,
    check_output,
    img_size_option,
    one_of,
    require,
    runtime_options,
    warnings_as_lines,
)

if TYPE_CHECKING:  # levit bench --help must not import torch
    from levit.paper.speed import SpeedRun


def args_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quick", action="store_true", help="a short run: a few models of each family, shorter warm-up and windows"
    )
    p.add_argument(
        "--suite",
        choices=["paper", "modern"],
        default="paper",
        help="paper: Table 3 (default); modern: LeViT against today's efficient models, each in its best fp32 "
        "form (the fastest of eager, OpenVINO and ONNX Runtime that gives eager's logits), with cited top-1 "
        "and the Pareto front",
    )
    p.add_argument(
        "--protocol",
        type=one_of(("paper", "latency", "executorch", "all"), "protocol"),
        default=None,
        metavar="paper|latency|executorch|all",
        help="--suite modern only: paper: one thread, batch 16 (the default); latency: every core, batch 1; "
        "executorch: the phone-class runtime (ExecuTorch XNNPACK), one thread, batch 1; all: the three one after "
        "the other (without --models: the whole suite in the paper's protocol, the quick set's 11 models in "
        "latency, 10 of them in executorch; with --quick 5 models in each), one table per protocol, --output rows with a protocol "
        "column, --plot FILE.png writing FILE_paper.png, FILE_latency.png and FILE_executorch.png. "
        "Sets the threads, the batch and the backend: not with --threads, -b or --backend",
    )
    p.add_argument("--models", help="comma-separated names (see --list); default: all of the suite")
    p.add_argument("--list", action="store_true", help="list the models the benchmark knows")
    runtime_options(
        p,
        backend=None,
        backend_help="default: eager on CPU (the paper's protocol); on GPU auto: levit's fastest path per batch, "
        "timm's models eager; --suite modern: auto (the fastest checked fp32 form), eager, openvino, onnxruntime, "
        "or executorch (the phone-class protocol, with -b 1)",
        precision=None,
        precision_help="default: fp32 on CPU, fp16 on GPU",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to run")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default 1)")
    p.add_argument(
        "--batch-size",
        "-b",
        default=None,
        help="a batch size or a comma-separated list (1,64,1024); "
        "default: 16 on CPU, the largest fitting power of two on GPU",
    )
    img_size_option(p, "resolution (default: each model's native one)")
    p.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="warm-up seconds per model (default 5, quick 1); --suite modern: the trial window of each form "
        "(default 0.5)",
    )
    p.add_argument(
        "--windows",
        type=int,
        default=None,
        help="timed windows per model (default 5, quick 3); --suite modern: interleaved rounds (default 5, quick 3; "
        "--protocol all: 4 in the paper's protocol, 3 in the others)",
    )
    p.add_argument(
        "--window",
        type=float,
        default=None,
        help="seconds per timed window (default 3, quick 1; --suite modern: 1.5, quick 0.5; --protocol all: 1)",
    )
    p.add_argument("--output", "-o", type=Path, help="write the rows to FILE.csv or FILE.json")
    p.add_argument(
        "--plot",
        type=Path,
        help="write the speed/accuracy plot (Figure 1) to FILE.png; --protocol all: FILE_<protocol>.png for each",
    )
    p.add_argument("--json", action="store_true", help="print JSON rows instead of the table")


def _speed_runs(args: argparse.Namespace) -> list[tuple[str | None, SpeedRun]]:
    """The flags as resolved runs, one per protocol (``None``: no ``--protocol``, the run the flags
    describe); every refusal is a usage error naming its flag, before any model is built."""
    from levit.errors import LeViTError
    from levit.paper.field import protocol_runs

    run = _speed_run(args)
    if args.protocol is None:
        return [(None, run)]
    if args.suite != "modern":
        raise UsageError("--protocol needs --suite modern (the paper's suite has one protocol)")
    for flag, v in (("--threads", args.threads), ("--batch-size", args.batch_size), ("--backend", args.backend)):
        if v is not None:
            raise UsageError(f"--protocol sets the threads, the batch and the backend: drop {flag}")
    try:
        # the rounds as the flags give them (None: each protocol's own), not the one run's defaults
        given = replace(run, models=_models(args), windows=args.windows, window_s=args.window, warmup_s=args.warmup)
        return list(protocol_runs(given, args.protocol))
    except LeViTError as e:
        raise UsageError(str(e)) from None


def _models(args: argparse.Namespace) -> tuple[str, ...] | None:
    return None if args.models is None else tuple(m.strip() for m in args.models.split(",") if m.strip())


def _speed_run(args: argparse.Namespace) -> SpeedRun:
    """The flags as a resolved run; every refusal is a usage error naming its flag, before any model is built."""
    from levit.errors import LeViTError
    from levit.paper.speed import BENCH_MODELS, SpeedRun, parse_batch_sizes

    for flag, v in (("--threads", args.threads), ("--windows", args.windows)):
        if v is not None and v < 1:
            raise UsageError(f"{flag} must be >= 1, got {v}")
    require("--warmup", args.warmup, 0)
    require("--window", args.window, 0)  # 0: one call per window
    models = _models(args)
    try:
        batches = None if args.batch_size is None else tuple(parse_batch_sizes(args.batch_size))
    except LeViTError as e:
        raise UsageError(f"--batch-size: {e}") from e
    try:
        run = SpeedRun(
            models=models,
            quick=args.quick,
            device=args.device,
            backend=args.backend,
            precision=args.precision,
            batch_sizes=batches,
            threads=1 if args.threads is None else args.threads,
            img_size=args.img_size,
            warmup_s=args.warmup,
            windows=args.windows,
            window_s=args.window,
            suite=args.suite,
        ).resolved()
    except LeViTError as e:
        raise UsageError(str(e)) from None
    for path, flag, sufs in (
        (args.output, "--output", (".csv", ".json")),
        (args.plot, "--plot", (".png", ".svg", ".pdf")),
    ):
        if path is not None and path.suffix.lower() not in sufs:
            raise UsageError(f"{flag} must end in {' or '.join(sufs)}, got {path.name!r}")
        check_output(path, flag)
    if args.img_size:
        for name in dict.fromkeys(
            BENCH_MODELS[m].source for m in run.models if BENCH_MODELS[m].implementation == "levit"
        ):
            check_img_memory(name, args.img_size, max(run.batch_sizes or [16]))
    return run


def _minutes(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _progress_printer() -> Callable[[int, int, str, dict | None], None]:
    """``[i/n] model ...`` before each job and its img/s after it, on stderr, with the time so far."""
    t0 = time.perf_counter()

    def progress(i: int, n: int, name: str, row: dict | None) -> None:
        if row is None:
            print(f"[{i + 1}/{n}] {name} ...", end="", file=sys.stderr, flush=True)
            return
        clock = f"{time.perf_counter() - t0:.0f}s"
        if row.get("eta_s") is not None:  # the modern suite's estimate of the time left
            clock += f", about {_minutes(row['eta_s'])} left"
        if "img_s" not in row:  # a step without a speed of its own (the modern suite's timed rounds)
            print(f" done [{clock}]", file=sys.stderr, flush=True)
        else:
            # a model with a single form has no trial speed: its rounds give it
            speed = "checked" if row["img_s"] is None else f"{row['img_s']:.1f} img/s"
            print(
                f" {speed} ({row['backend']} {row['precision']}, batch {row['batch']}) [{clock}]",
                file=sys.stderr,
                flush=True,
            )

    return progress


def cmd_bench(args: argparse.Namespace) -> int:
    from levit.paper.bench import format_bench, plot_bench, run_bench, run_protocols
    from levit.paper.speed import format_bench_models, write_rows

    if args.list:
        print(format_bench_models())
        return 0
    runs = _speed_runs(args)
    progress = _progress_printer()
    with warnings_as_lines():  # e.g. "levit_128s (A3) cannot be fused: timed unfused"
        if runs[0][0] is None:
            print(f"levit bench: {runs[0][1].describe()}", file=sys.stderr)
            rows = run_bench(runs[0][1], progress=progress)
        else:

            def on_protocol(name: str, run: SpeedRun) -> None:
                print(f"levit bench: protocol {name}: {run.describe()}", file=sys.stderr, flush=True)

            rows = run_protocols(runs, progress=progress, on_protocol=on_protocol)
    print(json.dumps(rows, indent=2) if args.json else format_bench(rows))
    if args.output:
        print(f"wrote {write_rows(rows, args.output)}", file=sys.stderr)
    if args.plot:
        for path in plot_bench(rows, args.plot):
            print(f"wrote {path}", file=sys.stderr)
    return 0
