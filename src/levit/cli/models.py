"""``levit models``: the variants with their exact sizes (and the Table 5 rows)."""

from __future__ import annotations

import argparse
import json

from .common import UsageError


def args_models(p: argparse.ArgumentParser) -> None:
    p.add_argument("pattern", nargs="?", default="*", help="shell-style name filter")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--ablations", action="store_true", help="the paper's Table 5 rows (LeViT-128S, A1-A7) instead")


def cmd_models(args: argparse.Namespace) -> int:
    from levit.models.config import PAPER_RESULTS, VARIANTS, list_models
    from levit.models.flops import flops_from_config, params_from_config

    if args.ablations:
        return cmd_models_ablations(args)
    names = list_models(args.pattern)
    if not names:
        raise UsageError(f"no model matches {args.pattern!r}; the models are {', '.join(list_models())}")
    rows = []
    for name in names:
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


def cmd_models_ablations(args: argparse.Namespace) -> int:
    from levit.paper.ablations import count_rows  # arithmetic on the configs: no torch import

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
