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
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .ablate import args_ablate, cmd_ablate
from .bench import args_bench, cmd_bench
from .biases import args_biases, cmd_biases
from .common import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_PIPE, EXIT_USAGE, Formatter, Parser, UsageError
from .data import args_data, cmd_data
from .eval import args_eval, cmd_eval
from .export import args_export, cmd_export
from .models import args_models, cmd_models
from .predict import args_predict, cmd_predict
from .serve import args_serve, cmd_serve
from .train import args_train, cmd_train

__all__ = ["COMMANDS", "UsageError", "build_parser", "main"]


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
        args_models,
        cmd_models,
    ),
    "predict": Command(
        "classify images (files or folders) with the official evaluation preprocessing",
        "  levit predict cat.jpg --model levit_256 --pretrained\n"
        "  levit predict photos/ --model levit_128s --checkpoint LeViT-128S-96703c44.pth --topk 3 --json\n"
        "  levit predict img.png --checkpoint my_model.safetensors   # levit files know their model\n"
        "  levit predict photos/ -m levit_256 --pretrained --backend openvino --precision int8",
        args_predict,
        cmd_predict,
    ),
    "serve": Command(
        "classify images over HTTP: dynamic batching, health/ready/metrics, limits, graceful shutdown",
        "  levit serve                                          # the demo digits model on 127.0.0.1:8000\n"
        "  levit serve --model levit_128s --pretrained --max-batch-size 32 --max-wait-ms 10\n"
        "  levit serve --checkpoint mine.safetensors --backend openvino --port 8080 --quiet\n"
        "  levit serve --model levit_256 --pretrained --ray --replicas 4   # Ray Serve, local cluster\n"
        "  curl -s --data-binary @cat.jpg -H 'content-type: image/jpeg' 'http://127.0.0.1:8000/v1/classify?topk=3'\n"
        "  curl -s -T cat.jpg http://127.0.0.1:8000/predictions/levit_128s   # TorchServe's API, as its clients call it",
        args_serve,
        cmd_serve,
    ),
    "bench": Command(
        "measure images/s (the paper's Table 3 protocol) for LeViT, EfficientNet and DeiT on this machine",
        "  levit bench --quick                              # a few models per family, 1 thread, batch 16\n"
        "  levit bench --plot speed.png --output speed.csv  # the whole Table 3 + Figure 1\n"
        "  levit bench --models levit_128s,timm_levit_128s --backend openvino --precision bf16\n"
        "  levit bench --device cuda                        # fp16, largest power-of-two batch\n"
        "  levit bench --suite modern --quick --plot field.png  # LeViT against today's models, Pareto front\n"
        "  levit bench --device cuda -b 1,64,1024 --models levit_128s,timm_levit_128s  # latency + throughput\n"
        "  levit bench --list",
        args_bench,
        cmd_bench,
    ),
    "export": Command(
        "export the fused model to ONNX / OpenVINO / TorchScript / ExecuTorch and check it against PyTorch",
        "  levit export --model levit_128s --checkpoint LeViT-128S-96703c44.pth --format onnx --output levit.onnx\n"
        "  levit export --model levit_256 --pretrained --format openvino --output levit_256.xml\n"
        "  levit export --checkpoint mine.safetensors --output mine.pt   # format from the suffix\n"
        "  levit export -m levit_128s --pretrained -o levit.pte          # ExecuTorch/XNNPACK (phones), fp32, batch 1\n"
        "  levit export -m levit_128s --pretrained -o levit_int8.pte --precision int8 --calibration photos/",
        args_export,
        cmd_export,
    ),
    "train": Command(
        "train a LeViT with the paper's recipe (hard distillation, DeiT augmentation), on 1 CPU to many GPUs",
        "  levit train --dataset digits --output runs/digits            # 2-CPU demo, no download\n"
        "  levit train --data ~/imagenet --output runs/128s --model levit_128s \\\n"
        "      --teacher-checkpoint regnety_160-a5fe301d.pth             # paper recipe (configs/levit_128s.yaml)\n"
        "  levit train --data mydata --output runs/ft --model levit_256 --distillation none \\\n"
        "      epochs=30 pretrained=true total_batch=null warmup_epochs=1  # fine-tune, KEY=VALUE overrides\n"
        "  levit train --data mydata --output runs/ft --model levit_256 --resume auto   # continue after a crash\n"
        "  levit train --data ~/flowers-shards -o runs/fl --config finetune pretrained=true  # shard folder\n"
        "  levit train -o runs/fl --config finetune pretrained=true 'train_shards=/data/train-{000000..000146}.tar' \\\n"
        "      'val_shards=/data/val-{000000..000006}.tar'               # brace patterns of shards, no --data\n"
        "  levit train --data ~/food101_hf -o runs/food --config finetune pretrained=true  # Hugging Face dataset\n"
        "  levit train --data ~/food101_parquet -o runs/food --config finetune pretrained=true \\\n"
        "      hf_streaming=true                                         # its Parquet files streamed\n"
        "  torchrun --nproc_per_node=8 -m levit train --data ~/imagenet --output runs/256 --model levit_256 \\\n"
        "      --teacher-checkpoint regnety_160.pth                     # DDP on 8 GPUs\n"
        "  torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 --rdzv-id=run1 \\\n"
        "      -m levit train ...                                        # 4 nodes x 8 GPUs (run on every node)",
        args_train,
        cmd_train,
    ),
    "eval": Command(
        "top-1 / top-5 / loss of a checkpoint on an ImageFolder, WebDataset shards or a Hugging Face dataset",
        "  levit eval --data ~/imagenet/val --model levit_128s --pretrained\n"
        "  levit eval --data runs/digits/digits/val --checkpoint runs/digits/best.pth --output eval.json\n"
        "  levit eval --data ~/flowers-shards -c runs/fl/best.pth          # a shard folder (its val/ shards)\n"
        "  levit eval --data '/data/val-{000000..000006}.tar' -c runs/fl/best.pth   # a val_shards= brace pattern\n"
        "  levit eval --data ~/food101_parquet -c runs/food/best.pth   # Hugging Face dataset (its val/), hf_streaming=true or not\n"
        "  torchrun --nproc_per_node=4 -m levit eval --data ~/imagenet/val --model levit_256 -c LeViT-256.pth",
        args_eval,
        cmd_eval,
    ),
    "ablate": Command(
        "train LeViT-128S and the paper's Table 5 ablations A1-A7 at a short schedule; table + bar chart",
        "  levit ablate                                        # base + A1-A7 on the bundled digits, 32px, 10 epochs\n"
        "  levit ablate --resume auto                          # continue an interrupted sweep\n"
        "  levit ablate --variants base,A3,A5 --epochs 3\n"
        "  levit ablate --data ~/imagenet100 --img-size 224 --epochs 100 --output runs/ablate-in100 \\\n"
        "      --teacher-checkpoint teacher.safetensors        # distillation for every row but A4, as the paper",
        args_ablate,
        cmd_ablate,
    ),
    "data": Command(
        "prepare training data: an ImageFolder as WebDataset tar shards; a teacher's answers for every view of a run",
        "  levit data shard ~/flowers ~/flowers-shards --shard-size 1000\n"
        "  levit train --data ~/flowers-shards --output runs/flowers --config finetune pretrained=true\n"
        "  levit data teacher-cache t.cache epochs=300 distillation=soft --topk 10 --data ~/flowers-shards \\\n"
        "      --model levit_256 --teacher-checkpoint regnety_160.pth   # then: levit train ... teacher_cache=t.cache",
        args_data,
        cmd_data,
    ),
    "biases": Command(
        "draw the learned attention biases: each head's bias over the (dy, dx) offsets, per stage",
        "  levit biases --model levit_128s --pretrained --output biases.png\n"
        "  levit biases --checkpoint runs/digits/best.pth --output digits_biases.png\n"
        "  levit biases --model levit_256 --pretrained --img-size 384 --output b384.png  # resampled",
        args_biases,
        cmd_biases,
    ),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of the ``levit`` command. With ``only``, just that command gets its
    options (the others keep their one-line help): ``main`` builds no more than it runs."""
    from levit._version import __version__

    parser = Parser(
        prog="levit",
        description="LeViT image classifiers: models, prediction, benchmarks, training, export.",
        epilog="examples:\n  levit models\n  levit predict photo.jpg --model levit_256 --pretrained\n"
        "  levit bench --quick\n\nexit codes: 0 success, 1 failure, 2 usage error (bad flag or value).\n"
        "Run `levit COMMAND --help` for each command's options.",
        formatter_class=Formatter,
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
            formatter_class=Formatter,
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


def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = build_parser(only=_command_in(argv))
    for word in argv:
        # a file named like an option (`levit predict -photo.jpg`) is read as one, and argparse then
        # reports a missing or unknown argument that never names the file: name it and the way out
        if word.startswith("-") and not word.startswith("--") and len(word) > 2 and os.path.isfile(word):
            parser.error(f"{word} is read as an option; give a file whose name starts with '-' as ./{word}")
    args, extra = parser.parse_known_args(argv)
    if extra:
        # an unknown option before the command (`levit --verbose models`) belongs to no sub-command:
        # left over, it would be dropped silently, so it is refused here
        stray = [w for w in argv[: argv.index(args.command)] if w in extra]
        if stray:
            parser.error(f"unrecognized arguments: {' '.join(stray)}")
        # positionals split by a flag (`epochs=1 --distillation none lr=1e-3`) are what argparse's
        # plain parse leaves over: the command's own words are parsed again, intermixed, by the
        # innermost sub-command (`levit data teacher-cache`: argparse cannot intermix a parser that
        # has sub-commands); anything still unknown is reported by it, whose --help lists the flags
        command, words = parser, argv
        while (sub := _subcommands(command)) is not None:
            name = next((w for w in words if w in sub.choices), None)
            if name is None:
                break
            command, words = sub.choices[name], words[words.index(name) + 1 :]
        vars(args).update(vars(command.parse_intermixed_args(words)))
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
    except OSError as e:  # a full disk, a read-only file system: the system's reason, naming the file
        if args.debug:
            raise
        print(f"levit {args.command}: error: {_os_error(e, args)}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _os_error(e: OSError, args: argparse.Namespace) -> str:
    """One line for a failed file operation: the file it names, else what the command writes, its
    ``--output`` or ``levit data shard``'s DST (a write or a flush that fails on a full disk names no
    file, and the output is what was written)."""
    from levit.utils import os_error_line

    flag, path = "--output", getattr(args, "output", None)
    if path is None:
        flag, path = "DST", getattr(args, "dst", None)
    if e.filename is None and path is not None:
        return f"{flag} {path}: {os_error_line(e)}"
    return os_error_line(e)
