"""What every ``levit`` command shares: exit codes, the parser, value types that make a bad flag one
line, option groups and model loading."""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from levit.models.config import PATCH_SIZE

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_PIPE = 0, 1, 2, 130, 141


class UsageError(Exception):
    """A bad flag value found after parsing: printed as one line, exit code 2."""


class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Examples kept as written; ``(default: X)`` added only where the help does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (and exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


# ---- value types: a bad value is a one-line usage error naming the flag (exit 2) -------------------
def model_name(text: str) -> str:
    """A registered model name or alias, canonicalised here once (``LeViT_128S`` -> ``levit_128s``)."""
    from levit.models.config import canonical_name

    try:
        return canonical_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def img_size_type(text: str) -> int:
    """An input resolution: a positive multiple of PATCH_SIZE, 16 (the stem's four stride-2 convolutions)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < PATCH_SIZE or v % PATCH_SIZE:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of {PATCH_SIZE} (e.g. 224), got {v}")
    return v


def img_hw_type(text: str) -> int | tuple[int, int]:
    """An input resolution ``N`` or ``HxW`` (e.g. ``224`` or ``192x320``), each a multiple of 16."""
    parts = text.lower().replace(",", "x").split("x")
    if len(parts) == 1:
        return img_size_type(text)
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected N or HxW (e.g. 224 or 192x320), got {text!r}")
    try:
        h, w = (int(v) for v in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or HxW (e.g. 224 or 192x320), got {text!r}") from None
    for v in (h, w):
        if v < PATCH_SIZE or v % PATCH_SIZE:
            raise argparse.ArgumentTypeError(
                f"height and width must be positive multiples of {PATCH_SIZE}, got {text!r}"
            )
    return h if h == w else (h, w)


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return v


def require(flag: str, value: float | None, low: float, *, strict: bool = False) -> None:
    """A numeric flag's lower bound (``value`` None: the flag was not given): one line, exit 2."""
    if value is None:
        return
    if not math.isfinite(value) or (value <= low if strict else value < low):
        raise UsageError(f"{flag} must be {'>' if strict else '>='} {low:g}, got {value:g}")


def crop_pct_type(text: str) -> float:
    """``--crop-pct``: a fraction in (0, 1] (:func:`levit.models.config.check_crop_pct`)."""
    from levit.models.config import check_crop_pct

    try:
        return check_crop_pct(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}") from None


def crop_pct_option(p: argparse.ArgumentParser) -> None:
    """``--crop-pct``: the crop of the model's own preprocessing, overridden the same way by every command."""
    from levit.models.config import DEFAULT_CROP_PCT

    p.add_argument(
        "--crop-pct",
        type=crop_pct_type,
        default=None,
        help="centre-crop fraction: resize to img_size / crop_pct, then crop (default: the checkpoint's "
        f"pretrained_cfg, as every levit command and the server use it; the authors' {DEFAULT_CROP_PCT})",
    )


def decoder_option(p: argparse.ArgumentParser) -> None:
    """``--decoder``: how images are decoded and preprocessed (:class:`levit.data.preprocess.Preprocess`)."""
    from levit.data import DECODERS

    p.add_argument(
        "--decoder",
        choices=DECODERS,
        default="pil",
        help="pil: the authors' evaluation, bit for bit; tensor: decoded into a tensor and resized there, "
        "about twice as fast per core, equal but for 8-bit rounding; cuda: each batch's JPEGs decoded in one "
        "call on the model's device (nvJPEG on a GPU) and resized there; auto: cuda on a GPU, else pil "
        "(docs/predict.md)",
    )


def check_output(path: Path | None, flag: str = "--output", *, inputs: dict[str, Path | None] | None = None) -> None:
    """An output file that cannot be written is refused before the job runs, naming the flag; so is one
    that is a file the job reads (``inputs``: flag -> path): writing it would replace the user's input,
    a checkpoint typed twice, with the job's result."""
    from levit.utils import unwritable_reason

    if path is None:
        return
    for in_flag, source in (inputs or {}).items():
        if source is not None and path.exists() and Path(source).exists() and path.samefile(source):
            raise UsageError(f"{flag} {path} is the {in_flag} file: writing it would replace it; choose another name")
    if reason := unwritable_reason(path):
        raise UsageError(f"{flag} {path}: {reason}")


def check_output_folder(path: Path | None, flag: str = "--output") -> None:
    """A folder the job makes or fills (a training run, a sweep): a file in its place, or a place where
    no folder can be made, is refused before the job runs, naming the flag (not an OS error naming a
    sub-folder, after the data was read)."""
    from levit.utils import unwritable_reason

    if path is None:
        return
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is a file; expected a folder (made if missing)")
    nearest = next(p for p in (path, *path.parents) if p.exists())  # the folder that gets the new one
    if reason := unwritable_reason(nearest / ".levit"):
        raise UsageError(f"{flag} {path}: {reason}")


def check_input_file(path: Path | None, flag: str) -> None:
    """A file the command will read: a folder, a device or a pipe, a missing or an unreadable file is
    refused before the job runs, in one line naming the flag and what is wrong with the path."""
    import os

    if path is None:
        return
    if path.is_dir():
        raise UsageError(f"{flag}: {path} is a folder, expected a file")
    if path.exists() and not path.is_file():
        raise UsageError(f"{flag}: {path} is not a regular file")
    if not path.exists():
        raise UsageError(f"{flag}: no such file: {path}")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{flag}: {path}: permission denied")


def check_img_memory(name: str, img_size: int | tuple[int, int], batch: int) -> None:
    """An input size whose attention maps would not fit in memory is refused before the model is
    built (its bias index tables alone grow with the square of the token count)."""
    from levit.models.config import get_config
    from levit.models.flops import attention_bytes
    from levit.utils import available_memory

    cfg = get_config(name, img_size=img_size)
    need, have = attention_bytes(cfg, batch), available_memory()
    size = "x".join(map(str, cfg.img_hw))
    what = (
        f"{name} at {size} ({cfg.grid_sizes[0][0] * cfg.grid_sizes[0][1]:,} tokens) needs about {need / 2**30:.1f} GiB"
    )
    if have is not None and need > have:
        smaller = " or a smaller --batch-size" if batch > 1 else ""
        raise UsageError(
            f"--img-size {size}: {what} for a batch of {batch}, more than the {have / 2**30:.1f} GiB of memory "
            f"available; use a smaller --img-size{smaller}"
        )
    if need > 2**30:
        print(f"note: --img-size {size}: {what} of memory for a batch of {batch}", file=sys.stderr)


def one_of(values: Sequence[str], what: str) -> Callable[[str], str]:
    """Like ``choices=``, with the library's own wording: ``unknown backend 'x'; choose from ...``."""

    def parse(text: str) -> str:
        if text not in values:
            raise argparse.ArgumentTypeError(f"unknown {what} {text!r}; choose from {', '.join(values)}")
        return text

    return parse


# ---- shared option groups --------------------------------------------------------------------
def model_options(p: argparse.ArgumentParser, *, required: bool = False) -> None:
    """--model / --checkpoint / --pretrained."""
    p.add_argument("--model", "-m", type=model_name, required=required, help="model name or alias (see `levit models`)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--checkpoint", "-c", type=Path, help="official, timm or levit checkpoint file")
    g.add_argument("--pretrained", action="store_true", help="download the authors' released weights")


def img_size_option(p: argparse.ArgumentParser, help: str, *, rectangular: bool = False) -> None:
    """--img-size N, or N / HxW where the command takes non-square inputs."""
    if rectangular:
        p.add_argument("--img-size", type=img_hw_type, default=None, metavar="N|HxW", help=help)
    else:
        p.add_argument("--img-size", type=img_size_type, default=None, metavar="N", help=help)


def runtime_options(
    p: argparse.ArgumentParser,
    *,
    backend: str | None,
    precision: str | None,
    precision_help: str,
    backend_help: str = "runtime",
) -> None:
    """--backend / --precision, choices from :mod:`levit.runtime.deploy`."""
    from levit.runtime.options import BACKENDS, PRECISIONS

    p.add_argument(
        "--backend", type=one_of(BACKENDS, "backend"), default=backend, metavar="|".join(BACKENDS), help=backend_help
    )
    p.add_argument(
        "--precision",
        type=one_of(PRECISIONS, "precision"),
        default=precision,
        metavar="|".join(PRECISIONS),
        help=precision_help,
    )


def check_runtime(backend: str, precision: str) -> None:
    """The backend/precision pair runs here (packages installed, combination exists), else exit 2."""
    from levit.runtime.deploy import check_backend

    try:
        check_backend(backend, precision)
    except ValueError as e:
        raise UsageError(f"--backend/--precision: {e}") from e


@contextlib.contextmanager
def warnings_as_lines() -> Iterator[None]:
    """Python warnings raised inside the block are printed when they happen, as one ``warning: ...``
    line each, and each message once (a warning given per model copy or per batch says nothing new)."""
    seen: set[str] = set()

    def show(message: Warning | str, *_: object, **__: object) -> None:
        text = str(message)
        if text not in seen:
            seen.add(text)
            print(f"warning: {text}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        # as Python's default filters: the libraries' deprecations are for their developers, not users
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        warnings.showwarning = show  # restored by catch_warnings on the way out
        yield


def load_model(args: argparse.Namespace, batch: int = 1, **kwargs: object):
    """The model named by --model / --checkpoint / --pretrained (levit files may omit --model); an
    ``img_size`` whose attention for ``batch`` images would not fit in memory is refused first."""
    from levit.factory.create import create_model
    from levit.weights.format import read_metadata

    name = args.model
    if name is None:
        if args.checkpoint is None:
            raise UsageError("--model is required (unless --checkpoint is a levit-format file)")
        meta = read_metadata(args.checkpoint)
        if meta is None:
            raise UsageError(f"--model is required: {args.checkpoint} is not a levit-format file")
        name = meta["variant"]
    if kwargs.get("img_size"):
        check_img_memory(name, kwargs["img_size"], batch)  # type: ignore[arg-type]
    with warnings_as_lines():
        model = create_model(name, checkpoint=args.checkpoint, pretrained=args.pretrained, **kwargs)
    if args.checkpoint is None and not args.pretrained:
        print(
            f"WARNING: no --checkpoint or --pretrained given: {name} has RANDOM weights and its "
            "predictions are meaningless.",
            file=sys.stderr,
        )
    return model
