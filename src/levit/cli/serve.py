"""``levit serve``: classify images over HTTP, with dynamic batching; one process or Ray Serve replicas."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

from levit.models.config import DEFAULT_CROP_PCT

from .common import (
    UsageError,
    check_runtime,
    img_size_option,
    load_model,
    model_options,
    positive_float,
    runtime_options,
)

# the demo model served when no model is named: levit_tiny trained on the bundled digits (no download)
DIGITS_EPOCHS = 8


def args_serve(p: argparse.ArgumentParser) -> None:
    model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port, printed at start)")
    g = p.add_argument_group("batching")
    g.add_argument("--max-batch-size", type=int, default=32, help="most images per forward pass")
    g.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        help="longest wait for a batch to fill after its first request while a model lane is free and "
        "no request is being decoded to join it (a lone request does not wait; while every lane is busy, "
        "requests wait for the first to finish and fill one batch)",
    )
    g = p.add_argument_group("limits")
    g.add_argument("--max-body-mb", type=positive_float, default=20.0, help="larger request bodies get 413")
    g.add_argument(
        "--max-megapixels", type=positive_float, default=50.0, help="larger images get 400, before being decoded"
    )
    g.add_argument("--read-timeout", type=positive_float, default=30.0, help="seconds a client has to send its body")
    g.add_argument(
        "--drain-timeout", type=positive_float, default=30.0, help="SIGTERM: seconds to finish in-flight requests"
    )
    g.add_argument("--decode-workers", type=int, default=None, help="images decoded at once (default: CPU count)")
    g = p.add_argument_group("model and runtime")
    g.add_argument("--topk", type=int, default=5, help="classes per answer unless the request says ?topk=")
    img_size_option(g, "input resolution N or HxW, multiples of 16 (default: the model's)", rectangular=True)
    g.add_argument("--crop-pct", type=float, default=DEFAULT_CROP_PCT, help="centre-crop fraction, as levit predict")
    runtime_options(g, backend="auto", precision="fp32", precision_help="numeric precision")
    g.add_argument("--calibration", type=Path, nargs="+", help="int8: calibration images (files or folders)")
    g.add_argument(
        "--lanes",
        type=int,
        default=None,
        help="model lanes: batches computed at once, each by its own copy of the backend "
        "(default on a CPU: the cores // --threads, or one per core up to 8; a GPU runs one)",
    )
    g.add_argument(
        "--threads", type=int, default=None, help="CPU threads per model lane (default: the cores // --lanes, else 1)"
    )
    g = p.add_argument_group("Ray Serve")
    g.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run as a Ray Serve deployment: a local one-machine Ray, or join the cluster at ADDRESS",
    )
    g.add_argument("--replicas", type=int, default=1, help="with --ray: copies of the application")
    g.add_argument("--replica-cpus", type=positive_float, default=1.0, help="with --ray: CPUs reserved per replica")
    p.add_argument("--quiet", "-q", action="store_true", help="no access log (one line per request) or info lines")


def _check(args: argparse.Namespace) -> None:
    for flag, value in (
        ("--max-batch-size", args.max_batch_size),
        ("--topk", args.topk),
        ("--replicas", args.replicas),
        ("--threads", args.threads),
        ("--lanes", args.lanes),
        ("--decode-workers", args.decode_workers),
    ):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    if args.max_wait_ms < 0:
        raise UsageError(f"--max-wait-ms must be >= 0, got {args.max_wait_ms}")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    if not 0 < args.crop_pct <= 1:
        raise UsageError(f"--crop-pct must be in (0, 1], got {args.crop_pct}")
    if args.ray is None and args.replicas != 1:
        raise UsageError("--replicas needs --ray (one process serves one copy of the model)")
    if args.precision == "int8" and not args.calibration:
        raise UsageError("--precision int8 needs --calibration IMAGES (files or folders)")


def digits_model_path() -> Path:
    """Where the demo digits model is cached: ``$XDG_CACHE_HOME/levit/serve/`` (default ``~/.cache``)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "levit" / "serve" / f"levit_tiny_digits_{DIGITS_EPOCHS}ep.safetensors"


def digits_model():
    """The demo model: levit_tiny trained on the bundled handwritten digits (``configs/digits.yaml``,
    shortened to a few epochs), trained once on first use and cached (:func:`digits_model_path`)."""
    import tempfile

    from levit.factory.registry import create_model
    from levit.utils import atomic_path
    from levit.weights.format import save

    path = digits_model_path()
    if not path.is_file():
        from levit.train.recipe import resolve_config
        from levit.train.run import train

        print(
            f"no --model/--checkpoint: training the demo model (levit_tiny on the bundled digits, {DIGITS_EPOCHS} "
            f"epochs, about a minute on 2 CPU cores), once; cached as {path}",
            file=sys.stderr,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="levit-digits-") as tmp:
            cfg = resolve_config(config="digits", output=str(Path(tmp) / "run"), epochs=DIGITS_EPOCHS)
            result = train(cfg)
            with atomic_path(path) as out:
                save(result.model, out)
    return create_model("levit_tiny", checkpoint=path)


def _check_installed() -> None:
    """The serve extra's packages, checked without importing them (one line naming the missing ones)."""
    import importlib.util

    from levit.errors import LeViTError

    wanted = {"ray": "ray[serve]", "fastapi": "fastapi", "uvicorn": "uvicorn", "prometheus_client": "prometheus-client"}
    wanted["multipart"] = "python-multipart"
    missing = [pkg for mod, pkg in wanted.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise LeViTError(f"levit serve needs {', '.join(missing)}: pip install 'levit[serve]'")


def cmd_serve(args: argparse.Namespace) -> int:
    _check(args)
    _check_installed()
    check_runtime(args.backend, args.precision)
    from levit.runtime.serve import LeViTService, ServeConfig, listen

    sock = listen(args.host, args.port) if args.ray is None else None  # a taken port fails before the model loads

    if args.model is None and args.checkpoint is None and not args.pretrained:
        if args.img_size:
            raise UsageError("--img-size needs --model or --checkpoint (the demo digits model is 32x32)")
        model = digits_model()
        name = "levit_tiny_digits"
    else:
        model = load_model(args, **({"img_size": args.img_size} if args.img_size else {}))
        name = None
    config = ServeConfig(
        host=args.host,
        port=args.port,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_body_mb=args.max_body_mb,
        max_pixels=int(args.max_megapixels * 1e6),
        topk=args.topk,
        crop_pct=args.crop_pct,
        backend=args.backend,
        precision=args.precision,
        threads=args.threads,
        lanes=args.lanes,
        decode_workers=args.decode_workers,
        read_timeout_s=args.read_timeout,
        drain_timeout_s=args.drain_timeout,
        quiet=args.quiet,
        model_name=name,
        calibration=tuple(map(str, args.calibration)) if args.calibration else None,
    )
    with _warnings_as_lines_now():
        if args.ray is not None:
            from levit.runtime.serve_ray import run_ray

            return run_ray(
                model, config, address=args.ray or None, replicas=args.replicas, replica_cpus=args.replica_cpus
            )
        from levit.runtime.serve import run_server

        return run_server(LeViTService(model, config), sock)


@contextlib.contextmanager
def _warnings_as_lines_now() -> Iterator[None]:
    """Python warnings printed as one ``warning: ...`` line each, when they happen (a server runs for days)."""
    old = warnings.showwarning
    warnings.showwarning = lambda message, *_, **__: print(f"warning: {message}", file=sys.stderr)
    try:
        yield
    finally:
        warnings.showwarning = old
