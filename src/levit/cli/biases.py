"""``levit biases``: draw the learned attention biases of every layer."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import UsageError, check_output, img_size_option, load_model, model_options


def args_biases(p: argparse.ArgumentParser) -> None:
    model_options(p)
    p.add_argument("--output", "-o", type=Path, default=Path("attention_biases.png"), help="PNG (+ .npz beside it)")
    img_size_option(
        p, "show the biases resampled to this resolution, N or HxW (default: the model's)", rectangular=True
    )


def cmd_biases(args: argparse.Namespace) -> int:
    from levit.paper.attention_biases import draw_biases

    if args.output.suffix.lower() != ".png":
        raise UsageError(f"--output: expected a .png file, got {args.output.name!r}")
    check_output(args.output)
    check_output(args.output.with_suffix(".npz"))
    model = load_model(args, **({"img_size": args.img_size} if args.img_size else {}))
    png, npz, layers = draw_biases(model, args.output)
    print(f"written: {png} and {npz} ({layers} attention layers)")
    return 0
