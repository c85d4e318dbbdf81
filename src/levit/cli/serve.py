"""``levit serve``: classify images over HTTP, with dynamic batching; one process or Ray Serve replicas."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import (
    UsageError,
    check_runtime,
    crop_pct_option,
    decoder_option,
    img_size_option,
    load_model,
    model_name,
    positive_float,
    runtime_options,
    warnings_as_lines,
)


def _model_arg(text: str) -> str | tuple[str, Path]:
    """``--model``: a model name or alias, or ``NAME=CHECKPOINT`` (a model served as NAME)."""
    if "=" in text:
        name, _, path = text.partition("=")
        if not name.strip() or not path or "/" in name:
            raise argparse.ArgumentTypeError(f"expected NAME=CHECKPOINT (NAME without '/'), got {text!r}")
        return name.strip(), Path(path)
    return model_name(text)


def args_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        "-m",
        type=_model_arg,
        action="append",
        metavar="NAME|NAME=CHECKPOINT",
        help="model name or alias (see `levit models`), read from --checkpoint or --pretrained; or "
        "NAME=CHECKPOINT, repeatable: several models, each with its own lanes and batches, addressed as "
        "NAME (/v1/classify?model=NAME, /v2/models/NAME); the first is the default",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--checkpoint", "-c", type=Path, help="official, timm or levit checkpoint file")
    g.add_argument("--pretrained", action="store_true", help="download the authors' released weights")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port, printed at start)")
    p.add_argument(
        "--grpc-port",
        type=int,
        default=None,
        help="also serve the KServe v2 gRPC protocol on this port (0: any free port, printed at start; "
        "one process only, not with --ray)",
    )
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
    _limit_args(p)
    g = p.add_argument_group("model and runtime")
    g.add_argument("--topk", type=int, default=5, help="classes per answer unless the request says ?topk=")
    img_size_option(g, "input resolution N or HxW, multiples of 16 (default: the model's)", rectangular=True)
    crop_pct_option(g)
    decoder_option(g)
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
    g.add_argument(
        "--no-model-control",
        dest="model_control",
        action="store_false",
        help="refuse POST /v2/repository/models/{name}/load (403): new versions only by SIGHUP, which "
        "reads --checkpoint again",
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


def _limit_args(p: argparse.ArgumentParser) -> None:
    """The limits a request and the queue are held to."""
    g = p.add_argument_group("limits")
    g.add_argument("--max-body-mb", type=positive_float, default=20.0, help="larger request bodies get 413")
    g.add_argument(
        "--max-megapixels", type=positive_float, default=50.0, help="larger images get 400, before being decoded"
    )
    g.add_argument("--read-timeout", type=positive_float, default=30.0, help="seconds a client has to send its body")
    g.add_argument(
        "--max-header-kb", type=positive_float, default=16.0, help="a larger request head (line + headers) gets 431"
    )
    g.add_argument(
        "--header-timeout",
        type=positive_float,
        default=10.0,
        help="seconds a client has to send its request head; then 408 and the connection is closed",
    )
    g.add_argument(
        "--drain-timeout", type=positive_float, default=30.0, help="SIGTERM: seconds to finish in-flight requests"
    )
    g.add_argument("--decode-workers", type=int, default=None, help="images decoded at once (default: CPU count)")
    g.add_argument(
        "--max-queue",
        type=int,
        default=None,
        help="classify requests taken at once, from upload to answer; beyond, 429 with Retry-After "
        "(default: one full batch per model lane and a quarter batch more)",
    )


def _config(args: argparse.Namespace):
    """The server's :class:`~levit.runtime.serve_config.ServeConfig` from the flags; a bad value is a usage
    error naming the flag (exit 2, before any model)."""
    from levit.runtime.options import OptionError
    from levit.runtime.serve import ServeConfig
    from levit.train.demo import DIGITS_MODEL_NAME

    _split_models(args)
    if args.img_size and _demo(args):
        raise UsageError("--img-size needs --model or --checkpoint (the demo digits model is 32x32)")
    try:
        return ServeConfig(
            host=args.host,
            port=args.port,
            grpc_port=args.grpc_port,
            max_batch_size=args.max_batch_size,
            max_wait_ms=args.max_wait_ms,
            max_body_mb=args.max_body_mb,
            max_pixels=int(args.max_megapixels * 1e6),
            topk=args.topk,
            crop_pct=args.crop_pct,
            decoder=args.decoder,
            backend=args.backend,
            precision=args.precision,
            threads=args.threads,
            lanes=args.lanes,
            decode_workers=args.decode_workers,
            max_queue=args.max_queue,
            read_timeout_s=args.read_timeout,
            max_header_bytes=int(args.max_header_kb * 1024),
            header_timeout_s=args.header_timeout,
            drain_timeout_s=args.drain_timeout,
            quiet=args.quiet,
            model_name=DIGITS_MODEL_NAME if _demo(args) else None,
            checkpoint=str(args.checkpoint) if args.checkpoint else None,
            checkpoints=tuple((name, str(path)) for name, path in args.named),
            model_control=args.model_control,
            calibration=tuple(map(str, args.calibration)) if args.calibration else None,
        )
    except OptionError as e:
        raise UsageError(e.as_flags()) from None


def _split_models(args: argparse.Namespace) -> None:
    """``args.model`` (repeated) into ``args.model``, the one model name or None, and ``args.named``,
    the ``NAME=CHECKPOINT`` pairs; a usage error for two plain names or a name given twice."""
    given = args.model or []
    plain = [m for m in given if isinstance(m, str)]
    args.named = [m for m in given if isinstance(m, tuple)]
    if len(plain) > 1:
        raise UsageError(f"--model: one model name at most ({', '.join(plain)}); serve more as --model NAME=CHECKPOINT")
    names = [n for n, _ in args.named]
    if len(set(names)) < len(names):
        raise UsageError(f"--model: each NAME once, got {', '.join(names)}")
    args.model = plain[0] if plain else None


def _single(args: argparse.Namespace) -> bool:
    """A model named the usual way (--model VARIANT, --checkpoint or --pretrained)."""
    return args.model is not None or args.checkpoint is not None or args.pretrained


def _demo(args: argparse.Namespace) -> bool:
    """No model named: the demo digits model (:func:`levit.train.demo.digits_model`)."""
    return not _single(args) and not args.named


def _model(args: argparse.Namespace):
    """The model to serve (or the models by name), loaded (or the demo one trained) once the port is bound."""
    if _demo(args):
        from levit.train.demo import digits_model

        return digits_model(on_note=lambda line: print(f"no --model/--checkpoint: {line}", file=sys.stderr))
    models = {}
    if _single(args):
        model = load_model(args, **({"img_size": args.img_size} if args.img_size else {}))
        if not args.named:
            return model
        models[model.config.name] = model
    from levit.runtime.serve_models import read_named

    for name, path in args.named:
        if name in models:
            raise UsageError(f"--model {name}=...: {name} is already the name of the --model/--checkpoint model")
        models[name] = read_named(name, str(path))
    return models


def cmd_serve(args: argparse.Namespace) -> int:
    from levit.runtime.options import OptionError
    from levit.runtime.serve import serve

    config = _config(args)
    check_runtime(args.backend, args.precision)
    try:
        with warnings_as_lines():  # each when it happens, each message once
            return serve(
                lambda: _model(args), config, ray=args.ray, replicas=args.replicas, replica_cpus=args.replica_cpus
            )
    except OptionError as e:  # --replicas without --ray
        raise UsageError(e.as_flags()) from None
