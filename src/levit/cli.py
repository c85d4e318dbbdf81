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

    if args.ablations:
        return _cmd_models_ablations(args)
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


def _cmd_models_ablations(args: argparse.Namespace) -> int:
    from levit.ablate import count_rows

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
def _cmd_predict(args: argparse.Namespace) -> int:
    from levit.predict import find_images, predict_paths

    find_images(args.paths)  # a missing path fails before the model is built
    if args.topk < 1:
        raise UsageError(f"--topk must be >= 1, got {args.topk}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    from levit.deploy import check_backend

    try:
        check_backend(args.backend, args.precision)
    except ValueError as e:
        raise UsageError(f"--backend/--precision: {e}") from e
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    kwargs = {"img_size": args.img_size} if args.img_size else {}
    model = _load_model(args, **kwargs)
    runner = None
    if args.backend != "eager" or args.precision != "fp32" or args.threads:
        import levit

        calib = (args.calibration or args.paths) if args.precision != "fp32" else None
        runner = levit.deploy(
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
        args.paths,
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
    return 0 if results else 1


# ---- bench -------------------------------------------------------------------------------------
def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from levit.benchmark import (
        BENCH_MODELS,
        DEFAULT_MODELS,
        QUICK_MODELS,
        benchmark,
        format_table,
        plot_rows,
        write_rows,
    )
    from levit.deploy import check_backend

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
    try:
        check_backend(args.backend, precision)
    except ValueError as e:
        raise UsageError(f"--backend/--precision: {e}") from e
    if precision == "int8":
        raise UsageError("--precision int8 needs calibration images: use `levit predict` or levit.deploy()")
    for flag, v in (("--threads", args.threads), ("--batch-size", args.batch_size), ("--windows", args.windows)):
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
    batch = args.batch_size or (16 if args.device == "cpu" else None)
    print(
        f"levit bench: {len(models)} models, {args.device}, backend {args.backend}, {precision}, "
        f"batch {batch or 'max power of two'}, threads {threads or '-'}; warm-up {warmup:g}s + "
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
def _cmd_export(args: argparse.Namespace) -> int:
    from levit.export import FORMATS, check_packages, export

    if args.format is None:
        args.format = next((f for f, s in FORMATS.items() if args.output.suffix.lower() == s), None)
        if args.format is None:
            raise UsageError(f"--format is required (cannot tell it from {args.output.name!r})")
    if args.format == "openvino" and args.output.suffix.lower() != ".xml":
        raise UsageError(f"--output: an OpenVINO model is an .xml file (+ .bin beside it), got {args.output.name!r}")
    if not args.output.parent.is_dir():
        raise UsageError(f"--output: folder {args.output.parent} does not exist")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_packages(args.format)  # a missing runtime fails before the model is built
    kwargs = {"img_size": args.img_size} if args.img_size else {}
    model = _load_model(args, **kwargs)
    result = export(model, args.output, format=args.format, batch_size=args.batch_size, opset=args.opset)
    print(f"exported {result}")
    return 0


# ---- train / eval ------------------------------------------------------------------------------
def _cmd_train(args: argparse.Namespace) -> int:
    from levit.train import parse_overrides, resolve_config, train

    for flag, v in (("--epochs", args.epochs), ("--batch-size", args.batch_size), ("--img-size", args.img_size)):
        if v is not None and v < 1:
            raise UsageError(f"{flag} must be >= 1, got {v}")
    if args.resume not in (None, "auto") and not Path(args.resume).is_file():
        raise UsageError(f"--resume must be 'auto' or an existing checkpoint file, got {args.resume!r}")
    if args.config is not None and not Path(args.config).is_file():
        from levit.train import available_recipes

        if args.config not in available_recipes():
            raise UsageError(
                f"--config: {args.config} is neither a YAML file nor a shipped recipe ({', '.join(available_recipes())})"
            )
    overrides = parse_overrides(args.overrides)
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
    values = {k: v for k, v in flags.items() if v is not None} | overrides
    model = values.pop("model", None) or args.model
    if model is None and args.config is None and args.dataset is None:
        raise UsageError("--model is required (or a --config / --dataset recipe that names one)")
    cfg = resolve_config(config=args.config, model=model, **values)
    if cfg.distillation != "none" and not cfg.teacher_checkpoint:
        raise UsageError(
            f"--distillation {cfg.distillation} needs --teacher-checkpoint PATH (teacher weights are never "
            "downloaded), or --distillation none"
        )
    result = train(cfg, resume=args.resume)
    return 0 if result.best_epoch > 0 or cfg.epochs == 0 else 1


def _cmd_eval(args: argparse.Namespace) -> int:
    import os

    import torch

    from levit.data import SafeImageFolder, ShardSampler, check_image_folder, collate_skip, eval_transform
    from levit.errors import LeViTError
    from levit.train import evaluate

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        raise UsageError(f"--crop-pct must be in (0, 1], got {args.crop_pct}")
    if args.checkpoint is None and not args.pretrained:
        raise UsageError("--checkpoint PATH (or --pretrained) is required: evaluating random weights is meaningless")
    classes = check_image_folder(args.data)
    from levit.checkpoint import read_metadata

    meta = read_metadata(args.checkpoint) if args.checkpoint is not None else None
    train_eval = (meta or {}).get("eval") or {}
    kwargs = {"img_size": args.img_size} if args.img_size else {}
    model = _load_model(args, **kwargs)
    img_size = model.config.img_size
    crop_pct = args.crop_pct or train_eval.get("crop_pct") or 0.875
    names = getattr(model, "class_names", None)
    if names:
        unknown = [c for c in classes if c not in names]
        if unknown:
            raise LeViTError(f"--data: class folder(s) {unknown[:5]} are not classes of the checkpoint")
        class_to_idx = {c: names.index(c) for c in classes}
    else:
        if len(classes) != model.config.num_classes:
            raise LeViTError(
                f"--data: {len(classes)} class folders, but the model has {model.config.num_classes} classes and "
                "no class names to match them by (folders are taken in sorted order)"
            )
        class_to_idx = {c: i for i, c in enumerate(classes)}
    if not args.no_fuse:
        import levit
        from levit.fuse import fusable

        if not getattr(model, "is_fused", False) and not fusable(model):  # ablation A3 (LayerNorm)
            print(f"note: {model.config.ablation} cannot be fused: evaluating the unfused model", file=sys.stderr)
        elif not getattr(model, "is_fused", False):
            model = levit.fuse(model)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if use_cuda else torch.device("cpu")
    if world > 1:
        import torch.distributed as dist

        if use_cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    dataset = SafeImageFolder(args.data, transform=eval_transform(img_size, crop_pct), class_to_idx=class_to_idx)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=ShardSampler(len(dataset), world, rank),
        num_workers=args.workers,
        collate_fn=collate_skip,
    )
    model = model.to(device).eval()
    m = evaluate(model, loader, device)
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    if rank != 0:
        return 0
    result = {
        "model": model.config.name,
        "checkpoint": str(args.checkpoint) if args.checkpoint else "pretrained",
        "data": str(args.data),
        "img_size": img_size,
        "crop_pct": crop_pct,
        "fused": not args.no_fuse,
        **m,
    }
    print(f"top-1 {m['top1']:.2f}%  top-5 {m['top5']:.2f}%  loss {m['loss']:.4f}  ({m['n']} images)")
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    return 0


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
        "  levit models\n  levit models 'levit_1*' --json\n  levit models --ablations   # Table 5: A1-A7",
    )
    p.add_argument("pattern", nargs="?", default="*", help="shell-style name filter")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--ablations", action="store_true", help="the paper's Table 5 rows (LeViT-128S, A1-A7) instead")
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
    p.add_argument("--backend", default="eager", help="eager | inductor | onnxruntime | openvino | auto")
    p.add_argument("--precision", default="fp32", help="fp32 | bf16 | fp16 | int8")
    p.add_argument("--calibration", type=Path, nargs="+", help="int8: calibration images (default: the input images)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the runtime's)")
    p.add_argument("--json", action="store_true", help="print JSON results")
    p.set_defaults(func=_cmd_predict)

    # ---- bench / export (speed) ----
    p = _sub(
        sub,
        "bench",
        "measure images/s (the paper's Table 3 protocol) for LeViT, EfficientNet and DeiT on this machine",
        "  levit bench --quick                              # ~1.5 min: one line per family, 1 thread, batch 16\n"
        "  levit bench --plot speed.png --output speed.csv  # the whole Table 3 + Figure 1\n"
        "  levit bench --models levit_128s,timm_levit_128s --backend openvino --precision bf16\n"
        "  levit bench --device cuda                        # fp16, largest power-of-two batch\n"
        "  levit bench --list",
    )
    p.add_argument("--quick", action="store_true", help="a short run over a few models (< 2 minutes)")
    p.add_argument("--models", help="comma-separated names (see --list); default: all of Table 3")
    p.add_argument("--list", action="store_true", help="list the models the benchmark knows")
    p.add_argument("--backend", default="eager", help="eager | inductor | onnxruntime | openvino | auto")
    p.add_argument("--precision", default=None, help="fp32 | bf16 | fp16 (default: fp32 on CPU, fp16 on GPU)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to run")
    p.add_argument("--threads", type=int, default=1, help="CPU threads")
    p.add_argument(
        "--batch-size", "-b", type=int, default=None, help="default: 16 on CPU, the largest fitting power of two on GPU"
    )
    p.add_argument("--img-size", type=int, default=None, help="resolution (default: each model's native one)")
    p.add_argument("--warmup", type=float, default=None, help="warm-up seconds per model (default 5, quick 1)")
    p.add_argument("--windows", type=int, default=None, help="timed windows per model (default 5, quick 3)")
    p.add_argument("--window", type=float, default=None, help="seconds per timed window (default 3, quick 1)")
    p.add_argument("--output", "-o", type=Path, help="write the rows to FILE.csv or FILE.json")
    p.add_argument("--plot", type=Path, help="write the speed/accuracy plot (Figure 1) to FILE.png")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of the table")
    p.set_defaults(func=_cmd_bench)

    p = _sub(
        sub,
        "export",
        "export the fused model to ONNX / OpenVINO / TorchScript and check it against PyTorch",
        "  levit export --model levit_128s --checkpoint LeViT-128S-96703c44.pth --format onnx --output levit.onnx\n"
        "  levit export --model levit_256 --pretrained --format openvino --output levit_256.xml\n"
        "  levit export --checkpoint mine.safetensors --output mine.pt   # format from the suffix",
    )
    _add_model_args(p, required=False)
    p.add_argument(
        "--format",
        "-f",
        choices=["onnx", "openvino", "torchscript"],
        default=None,
        help="output format (default: from --output's suffix)",
    )
    p.add_argument("--output", "-o", type=Path, required=True, help="output file (.onnx, .xml, .pt)")
    p.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's, 224)")
    p.add_argument("--batch-size", "-b", type=int, default=2, help="batch traced with (the batch axis stays dynamic)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset")
    p.set_defaults(func=_cmd_export)

    # ---- train / eval (training) ----
    p = _sub(
        sub,
        "train",
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
    )
    p.formatter_class = argparse.RawDescriptionHelpFormatter  # defaults come from the recipe, not argparse
    p.add_argument("--data", type=Path, help="folder with train/ and val/ sub-folders (ImageFolder layout)")
    p.add_argument("--dataset", choices=["digits"], help="a bundled dataset instead of --data (no download)")
    p.add_argument(
        "--output",
        "-o",
        type=Path,
        help="run folder: config.yaml, metrics.jsonl, checkpoints/, best.pth (default: runs/levit)",
    )
    p.add_argument("--model", "-m", help="model name (see `levit models`); default: the recipe's")
    p.add_argument("--config", help="recipe YAML file or shipped recipe name (default: the model's paper recipe)")
    p.add_argument("--epochs", type=int, help="number of epochs")
    p.add_argument("--batch-size", "-b", type=int, help="images per process per step")
    p.add_argument("--img-size", type=int, help="training resolution (multiple of 16)")
    p.add_argument("--distillation", choices=["none", "soft", "hard"], help="teacher loss")
    p.add_argument("--teacher", help="teacher: a timm model name (regnety_160) or a levit variant")
    p.add_argument("--teacher-checkpoint", type=Path, help="teacher weights file (never downloaded)")
    p.add_argument("--resume", metavar="auto|PATH", help="continue: 'auto' = newest complete checkpoint in --output")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to train (default: cuda if available)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe values, e.g. lr=1e-3 mixup=0")
    p.set_defaults(func=_cmd_train)

    p = _sub(
        sub,
        "eval",
        "top-1 / top-5 / loss of a checkpoint on an ImageFolder (fused model by default)",
        "  levit eval --data ~/imagenet/val --model levit_128s --pretrained\n"
        "  levit eval --data runs/digits/digits/val --checkpoint runs/digits/best.pth --output eval.json\n"
        "  torchrun --nproc_per_node=4 -m levit eval --data ~/imagenet/val --model levit_256 -c LeViT-256.pth",
    )
    p.formatter_class = argparse.RawDescriptionHelpFormatter  # defaults spelled out in the help texts
    p.add_argument("--data", type=Path, required=True, help="folder with one sub-folder per class")
    _add_model_args(p, required=False)
    p.add_argument("--img-size", type=int, default=None, help="input resolution (default: the checkpoint's)")
    p.add_argument(
        "--crop-pct", type=float, default=None, help="centre-crop fraction (default: the training run's or 0.875)"
    )
    p.add_argument("--batch-size", "-b", type=int, default=64, help="images per forward pass (default: 64)")
    p.add_argument("--workers", type=int, default=2, help="data loading processes (default: 2)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to run (default: auto)")
    p.add_argument("--no-fuse", action="store_true", help="evaluate the unfused model (BatchNorm not folded)")
    p.add_argument("--output", type=Path, help="also write the results as JSON to this file")
    p.set_defaults(func=_cmd_eval)
    _add_ablate_parser(sub)
    _add_biases_parser(sub)
    return parser


# ---- ablate / biases (the paper's Table 5 and the attention-bias pictures) ------------------------
def _add_ablate_parser(sub) -> None:
    p = _sub(
        sub,
        "ablate",
        "train LeViT-128S and the paper's Table 5 ablations A1-A7 at a short schedule; table + bar chart",
        "  levit ablate                                        # the bundled digits, 32px, 10 epochs, 2-CPU minutes\n"
        "  levit ablate --resume auto                          # continue an interrupted sweep\n"
        "  levit ablate --variants base,A3,A5 --epochs 3\n"
        "  levit ablate --data ~/imagenet100 --img-size 224 --epochs 100 --output runs/ablate-in100 \\\n"
        "      --teacher-checkpoint teacher.safetensors        # distillation for every row but A4, as the paper",
    )
    p.add_argument("--output", "-o", type=Path, default=Path("runs/ablate"), help="sweep folder")
    p.add_argument("--data", type=Path, help="ImageFolder with train/ and val/ (default: the bundled digits)")
    p.add_argument("--epochs", type=int, default=10, help="epochs per row")
    p.add_argument("--img-size", type=int, default=32, help="training resolution (multiple of 16)")
    p.add_argument("--batch-size", "-b", type=int, default=64, help="training batch")
    p.add_argument("--threads", type=int, default=None, help="training threads (default: the digits recipe's, 1)")
    p.add_argument("--variants", default=",".join(("base", "A1", "A2", "A3", "A4", "A5", "A6", "A7")), help="rows")
    p.add_argument("--teacher-checkpoint", type=Path, help="teacher weights: hard distillation for all rows but A4")
    p.add_argument("--bench-img-size", type=int, default=224, help="resolution of the CPU speed measurement")
    p.add_argument("--bench-seconds", type=float, default=3.0, help="seconds of timing per row")
    p.add_argument("--resume", choices=["auto"], help="continue a sweep: skip complete rows, resume a started one")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="training-recipe values, e.g. lr=1e-3")
    p.set_defaults(func=_cmd_ablate)


def _cmd_ablate(args: argparse.Namespace) -> int:
    from levit.ablate import ROWS, AblationSettings, ablate, format_markdown
    from levit.train import parse_overrides

    rows = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    bad = [v for v in rows if v not in ROWS]
    if bad or not rows:
        raise UsageError(f"--variants: unknown row(s) {bad}; valid: {', '.join(ROWS)}")
    if args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
    if args.img_size % 16 or args.img_size < 16 or args.bench_img_size % 16 or args.bench_img_size < 16:
        raise UsageError("--img-size and --bench-img-size must be positive multiples of 16")
    if args.data is not None and not args.data.is_dir():
        raise UsageError(f"--data: folder not found: {args.data}")
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
        train_overrides=parse_overrides(args.overrides),
    )
    results = ablate(settings, progress=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_markdown(results, settings))
    print(f"written: {args.output / 'ablations.csv'}, {args.output / 'ablations.md'}")
    return 0


def _add_biases_parser(sub) -> None:
    p = _sub(
        sub,
        "biases",
        "draw the learned attention biases: each head's bias over the (dy, dx) offsets, per stage",
        "  levit biases --model levit_128s --pretrained --output biases.png\n"
        "  levit biases --checkpoint runs/digits/best.pth --output digits_biases.png\n"
        "  levit biases --model levit_256 --pretrained --img-size 384 --output b384.png  # resampled",
    )
    _add_model_args(p, required=False)
    p.add_argument("--output", "-o", type=Path, default=Path("attention_biases.png"), help="PNG (+ .npz beside it)")
    p.add_argument("--img-size", type=int, default=None, help="show the biases resampled to this resolution")
    p.set_defaults(func=_cmd_biases)


def _cmd_biases(args: argparse.Namespace) -> int:
    from levit.biases import attention_biases, plot_biases, save_biases

    if args.output.suffix.lower() != ".png":
        raise UsageError(f"--output: expected a .png file, got {args.output.name!r}")
    if not args.output.parent.is_dir():
        raise UsageError(f"--output: folder {args.output.parent} does not exist")
    if args.img_size is not None and (args.img_size < 16 or args.img_size % 16):
        raise UsageError(f"--img-size must be a positive multiple of 16, got {args.img_size}")
    kwargs = {"img_size": args.img_size} if args.img_size else {}
    model = _load_model(args, **kwargs)
    tables = attention_biases(model)
    npz = save_biases(tables, args.output.with_suffix(".npz"))
    cfg = model.config
    label = cfg.name + (f" ({cfg.ablation})" if cfg.ablation else "")
    plot_biases(tables, args.output, title=f"{label} attention biases at {cfg.img_size}px")
    print(f"written: {args.output} and {npz} ({len(tables)} attention layers)")
    return 0


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
