"""The ``levit`` command line. Thin: parse, call the library, print."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

__all__ = ["UsageError", "main"]


class UsageError(Exception):
    """A bad flag value found after parsing: printed as one line, exit code 2."""


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (and exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _sub(subparsers, name: str, help: str, examples: str) -> argparse.ArgumentParser:
    return subparsers.add_parser(
        name, help=help, description=help, epilog="examples:\n" + examples, formatter_class=_Formatter
    )


def _add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", "-m", required=required, help="model name (see `levit models`)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--checkpoint", "-c", type=Path, help="official, timm or levit checkpoint file")
    g.add_argument("--pretrained", action="store_true", help="download the authors' released weights")


def _load_model(args: argparse.Namespace, **kwargs: object):
    """The model named by --model / --checkpoint / --pretrained (levit files may omit --model)."""
    import levit
    from levit.checkpoint import read_metadata

    name = args.model
    if name is None:
        if args.checkpoint is None:
            raise UsageError("--model is required (unless --checkpoint is a levit-format file)")
        meta = read_metadata(args.checkpoint)
        if meta is None:
            raise UsageError(f"--model is required: {args.checkpoint} is not a levit-format file")
        name = meta["variant"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = levit.create_model(name, checkpoint=args.checkpoint, pretrained=args.pretrained, **kwargs)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    if args.checkpoint is None and not args.pretrained:
        print(
            f"WARNING: no --checkpoint or --pretrained given: {name} has RANDOM weights and its "
            "predictions are meaningless.",
            file=sys.stderr,
        )
    return model


# ---- models ------------------------------------------------------------------------------------
def _cmd_models(args: argparse.Namespace) -> int:
    import torch

    import levit
    from levit.config import PAPER_RESULTS
    from levit.registry import get_config

    rows = []
    for name in levit.list_models(args.pattern):
        cfg = get_config(name)
        with torch.device("meta"):  # sizes only: no memory, no initialisation
            params = levit.count_params(levit.create_model(name))
        paper = PAPER_RESULTS.get(name)
        rows.append(
            {
                "model": name,
                "params": params,
                "flops": levit.count_flops(cfg),
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


# ---- predict -----------------------------------------------------------------------------------
def _cmd_predict(args: argparse.Namespace) -> int:
    from levit.predict import find_images, predict_paths

    find_images(args.paths)  # a missing path fails before the model is built
    if args.topk < 1:
        raise UsageError(f"--topk must be >= 1, got {args.topk}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    kwargs = {"img_size": args.img_size} if args.img_size else {}
    model = _load_model(args, **kwargs)
    results = predict_paths(
        model,
        args.paths,
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
    return 0 if results else 1


# ---- entry point -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``levit`` command."""
    from levit import __version__

    parser = _Parser(
        prog="levit",
        description="LeViT image classifiers: models, prediction, benchmarks, training, export.",
        epilog="examples:\n  levit models\n  levit predict photo.jpg --model levit_256 --pretrained\n"
        "  levit bench --quick\n\nRun `levit COMMAND --help` for each command's options.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"levit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = _sub(
        sub,
        "models",
        "list the LeViT variants with their exact sizes",
        "  levit models\n  levit models 'levit_1*' --json",
    )
    p.add_argument("pattern", nargs="?", default="*", help="shell-style name filter")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_models)

    p = _sub(
        sub,
        "predict",
        "classify images (files or folders) with the official evaluation preprocessing",
        "  levit predict cat.jpg --model levit_256 --pretrained\n"
        "  levit predict photos/ --model levit_128s --checkpoint LeViT-128S-96703c44.pth --topk 3 --json\n"
        "  levit predict img.png --checkpoint my_model.safetensors   # levit files know their model",
    )
    p.add_argument("paths", nargs="+", type=Path, help="image files and/or folders (searched recursively)")
    _add_model_args(p, required=False)
    p.add_argument("--topk", type=int, default=5, help="classes to show per image")
    p.add_argument("--batch-size", "-b", type=int, default=32, help="images per forward pass")
    p.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's, 224)")
    p.add_argument("--crop-pct", type=float, default=0.875, help="centre-crop fraction (resize = img_size / crop_pct)")
    p.add_argument("--json", action="store_true", help="print JSON results")
    p.set_defaults(func=_cmd_predict)

    # ---- bench / export (speed) ----
    # ---- train / eval (training) ----
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``levit`` command; returns the exit code (0 ok, 1 failure, 2 usage error)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported by the sub-command, whose --help lists the valid flags
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    from levit.errors import LeViTError

    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        if args.debug:
            raise
        print(f"levit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (LeViTError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        if args.debug:
            raise
        print(f"levit {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
