"""GPU speed of levit against timm's LeViT, side by side in ONE process: one command, a few minutes.

Sections (run in the order ``--sections`` gives, by default infer, train, paper; each candidate
group is timed in interleaved rounds, medians; same weights on both sides):

1. ``paper``: the paper's protocol (Table 3, GPU column: fp16, the largest power-of-two batch that
   fits) for all five variants, levit's fused model eager and from a CUDA graph, against 10x the
   paper's V100 images/s (12,880 / 9,266 / 8,601 / 6,582 / 4,165).
2. ``train``: one training step (bf16 autocast, AdamW, batch 256, both heads' average, cross-entropy)
   of levit's LeViT against timm's, for LeViT-128S and LeViT-384; levit twice, with its attention-bias
   gather (``levit.models.layers.gather_bias``: advanced indexing) and with ``index_select`` in its
   place (``levit-index-select``), whose values and gradients are first checked equal on the device.
3. ``infer``: LeViT-128S and LeViT-384 at batch 1, 64 and 1024, fp16 and bf16: levit fused eager,
   levit + CUDA graphs (``backend="cudagraph"``), levit inductor (``backend="inductor"``), against
   timm eager, timm + CUDA graph and timm ``torch.compile`` (inductor, weights frozen, like ours).
   Compiles are the slow part: by default inductor runs in the first precision (fp16) at batch 1024
   only (the compile targets' batch; ``--compile-batches``, ``--compile-all`` for every cell), and no
   new compile starts once ``--budget`` seconds have passed (the JSON's ``not_run`` says so).

Also checked: the fused model equals the unfused one on the GPU in fp32 (relative error) and agrees
with it in fp16/bf16 (top-1 agreement on real photos when scikit-image/scikit-learn are installed,
else on random images), beside timm's LeViT in the same precision against the same reference: on
randomised weights the top two logits are close, so reduced precision flips some answers in any
implementation (on a CPU, fp16/bf16: 98%/85% for LeViT-128S, 96%/91% for LeViT-384), and the bar
is min(99%, timm's agreement less 5 points). Results go to ``OUT/gpu.json`` and ``OUT/gpu.md`` (rewritten after every
group, so an interrupted run keeps what it measured).

    PYTHONPATH=src python benchmarks/gpu.py                    # one H100/H200, planned for < 5 minutes
    PYTHONPATH=src python benchmarks/gpu.py --out results/
    PYTHONPATH=src python benchmarks/gpu.py --smoke --device cpu --out /tmp/gpu-smoke  # logic check on a CPU
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import levit
from levit.models import layers
from levit.models.config import PAPER_RESULTS
from levit.paper.speed import device_name, find_max_batch
from levit.paper.timing import cuda_sync
from levit.paper.timing import interleaved as timed_rounds
from levit.runtime.calibration import fidelity
from levit.runtime.deploy import build_runner
from levit.weights.format import to_timm_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' helpers (test support)
from helpers import randomize_weights

PAPER_VARIANTS = ("levit_128s", "levit_128", "levit_192", "levit_256", "levit_384")
T0 = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - T0


def log(msg: str) -> None:
    print(f"[{elapsed():5.0f}s] {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(cands: dict[str, Callable[[], object]], device: torch.device, rounds: int, window: float) -> dict:
    """{name: [seconds per call in each round]}: every candidate runs for ``window`` s once per round."""
    return timed_rounds(cands, rounds=rounds, window=window, sync=cuda_sync(device))


def models_pair(
    variant: str, img: int, device: torch.device
) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """(levit unfused, levit fused, timm LeViT) with the same non-degenerate weights, on ``device``."""
    import timm

    model = randomize_weights(levit.create_model(variant, img_size=img), seed=0).eval()
    peer = timm.create_model(variant, pretrained=False, img_size=img).eval()
    peer.load_state_dict(to_timm_state_dict(model))
    return model.to(device), levit.fuse(model).to(device), peer.to(device)


def images_for_fidelity(img: int, device: torch.device, n: int) -> tuple[torch.Tensor, str]:
    try:
        sys.path.insert(0, str(Path(__file__).parent))
        from speed_targets import real_images

        return real_images(img)[:n].to(device), "real photos"
    except Exception:  # scikit-image / scikit-learn missing: random images still catch a broken path
        g = torch.Generator().manual_seed(1)
        return torch.randn(n, 3, img, img, generator=g).to(device), "random images"


# ---- sections ----------------------------------------------------------------------------------
def check_fidelity(args: argparse.Namespace, device: torch.device, res: dict) -> None:
    for variant in args.models:
        model, fused, peer = models_pair(variant, args.img, device)
        x, kind = images_for_fidelity(args.img, device, 64 if not args.smoke else 4)
        tf32 = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False  # true fp32 convolutions for the fp32 comparison
        try:
            with torch.inference_mode():
                ref = model(x).float()
                f32 = fused(x).float()
                timm32 = peer(x).float()
        finally:
            torch.backends.cudnn.allow_tf32 = tf32
        # timm's LeViT caches its gathered attention biases in eval mode, in the dtype of the call that
        # filled the cache; a copy converted to fp16 would then mix dtypes. train() empties the cache.
        peer.train().eval()
        row = {
            "images": kind,
            "fused_vs_unfused_fp32_rel_err": ((f32 - ref).norm() / ref.norm()).item(),
            "timm_vs_unfused_fp32_rel_err": ((timm32 - ref).norm() / ref.norm()).item(),
        }
        for prec in args.precisions:
            run = build_runner(fused, "eager", prec, example=x)
            run_peer = build_runner(peer, "eager", prec, example=x)
            with torch.inference_mode():
                row[f"{prec}_top1_agreement"] = fidelity(run(x), ref)["top1_agreement"]
                row[f"timm_{prec}_top1_agreement"] = fidelity(run_peer(x), ref)["top1_agreement"]
        res["fidelity"][variant] = row
        log(f"fidelity {variant}: {row}")


def paper_section(args: argparse.Namespace, device: torch.device, res: dict, save: Callable[[], None]) -> None:
    prec = "fp16" if device.type == "cuda" else args.precisions[0]
    for variant in args.paper_models:
        _, fused, _ = models_pair(variant, args.img, device)

        def try_batch(b: int, fused: torch.nn.Module = fused) -> None:
            run = build_runner(fused, "eager", prec, example=torch.zeros(1, 3, args.img, args.img, device=device))
            x = torch.randn(b, 3, args.img, args.img, device=device)
            run(x)
            run(x)
            sync(device)

        batch = find_max_batch(try_batch, limit=args.paper_limit)
        x = torch.randn(batch, 3, args.img, args.img, device=device)
        cands = {"levit eager": build_runner(fused, "eager", prec, example=x)}
        if device.type == "cuda":
            cands["levit cudagraph"] = build_runner(fused, "cudagraph", prec, example=x)
        times = interleaved({k: functools.partial(r, x) for k, r in cands.items()}, device, args.rounds, args.window)
        speeds = {k: batch / statistics.median(v) for k, v in times.items()}
        best = max(speeds, key=speeds.get)
        v100 = PAPER_RESULTS[variant].gpu_img_s
        res["paper"][variant] = {
            "batch": batch,
            "precision": prec,
            "img_s": speeds,
            "best": best,
            "paper_v100_img_s": v100,
            "ratio_to_v100": speeds[best] / v100,
            "target_10x_met": speeds[best] >= 10 * v100,
        }
        log(f"paper {variant}: batch {batch}, {speeds}, {speeds[best] / v100:.1f}x V100")
        del cands
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()


advanced_gather = layers.gather_bias


def index_select_gather(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The attention-bias gather by ``index_select`` (backward: ``index_add``, atomics on a GPU)."""
    return table.index_select(1, index.reshape(-1)).view(table.shape[0], *index.shape)


def check_index_select(model: torch.nn.Module, device: torch.device) -> None:
    """The two gathers give the same bias and the same table gradients (to 1e-6 relative on a GPU,
    where atomics change the order of the sums) at every attention grid of ``model``."""
    g = torch.Generator(device=device).manual_seed(0)
    for m in model.modules():
        if getattr(m, "attention_biases", None) is None:
            continue
        table = torch.randn(m.attention_biases.shape, device=device, generator=g).requires_grad_()
        up = torch.randn(table.shape[0], *m.attention_bias_idxs.shape, device=device, generator=g)
        a, b = advanced_gather(table, m.attention_bias_idxs), index_select_gather(table, m.attention_bias_idxs)
        assert torch.equal(a, b)
        ga, gb = (torch.autograd.grad(t, table, up)[0] for t in (a, b))
        torch.testing.assert_close(gb, ga, rtol=1e-6, atol=1e-5)


def train_section(args: argparse.Namespace, device: torch.device, res: dict, save: Callable[[], None]) -> None:
    import timm

    amp = torch.bfloat16
    for variant in args.models:
        torch.manual_seed(0)
        ours = levit.create_model(variant, img_size=args.img).to(device)
        theirs = timm.create_model(variant, pretrained=False, img_size=args.img).to(device)
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(args.train_batch, 3, args.img, args.img, device=device, generator=g)
        y = torch.randint(0, 1000, (args.train_batch,), device=device, generator=g)

        def make(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
            model.train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.025)

            def step() -> None:
                opt.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=amp):
                    out = model(x)
                    if isinstance(out, tuple):
                        out = (out[0] + out[1]) / 2
                    loss = F.cross_entropy(out.float(), y)
                loss.backward()
                opt.step()

            return step

        check_index_select(ours, device)
        plain, selecting = make(ours, x, y), make(ours, x, y)

        def with_index_select(step: Callable[[], None] = selecting) -> None:
            layers.gather_bias = index_select_gather  # levit's own function, put back at once
            try:
                step()
            finally:
                layers.gather_bias = advanced_gather

        steps = {"levit": plain, "levit-index-select": with_index_select, "timm": make(theirs, x, y)}
        times = interleaved(steps, device, args.rounds, args.window)
        speeds = {k: args.train_batch / statistics.median(v) for k, v in times.items()}
        res["train"][variant] = {
            "batch": args.train_batch,
            "amp": "bf16",
            "img_s": speeds,
            "levit_over_timm": speeds["levit"] / speeds["timm"],
            "levit_index_select_over_timm": speeds["levit-index-select"] / speeds["timm"],
        }
        log(f"train {variant}: {speeds}, levit/timm {speeds['levit'] / speeds['timm']:.2f}x")
        del steps, ours, theirs
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()


def infer_section(args: argparse.Namespace, device: torch.device, res: dict, save: Callable[[], None]) -> None:
    graphs = device.type == "cuda"
    for prec in args.precisions:
        for variant in args.models:
            _, fused, peer = models_pair(variant, args.img, device)
            for batch in args.batches:
                x = torch.randn(batch, 3, args.img, args.img, device=device)
                want_compile = args.compile_all or (prec == args.precisions[0] and batch in args.compile_batches)
                specs = {"levit eager": (fused, "eager"), "timm eager": (peer, "eager")}
                if graphs:
                    specs.update({"levit cudagraph": (fused, "cudagraph"), "timm cudagraph": (peer, "cudagraph")})
                skipped: dict[str, str] = {}
                if want_compile and not args.no_compile:
                    specs.update({"levit inductor": (fused, "inductor"), "timm compile": (peer, "inductor")})
                else:
                    skipped["levit inductor"] = skipped["timm compile"] = "not run (--compile-batches/--compile-all)"
                cands = {}
                for name, (module, backend) in specs.items():
                    if backend == "inductor" and elapsed() > args.budget:
                        skipped[name] = f"skipped: past the {args.budget:.0f}s time budget"
                        continue
                    t = time.perf_counter()
                    try:
                        run = build_runner(module, backend, prec, example=x)
                        with torch.inference_mode():
                            run(x)  # compile / capture now
                    except Exception as e:  # one failing candidate must not lose the others
                        skipped[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
                        log(f"{variant} {prec} b{batch} {name}: {skipped[name]}")
                        continue
                    cands[name] = functools.partial(run, x)
                    if time.perf_counter() - t > 5:
                        log(f"{variant} {prec} b{batch} {name}: built in {time.perf_counter() - t:.0f}s")
                times = interleaved(cands, device, args.rounds, args.window)
                speeds = {k: batch / statistics.median(v) for k, v in times.items()}
                res["infer"].append(
                    {"model": variant, "precision": prec, "batch": batch, "img_s": speeds, "not_run": skipped}
                )
                log(f"{variant} {prec} batch {batch}: " + ", ".join(f"{k} {v:,.0f}" for k, v in speeds.items()))
                del cands
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                save()


# ---- report ------------------------------------------------------------------------------------
def targets(res: dict) -> list[dict]:
    """The GPU speed targets, each with its measured ratio (None where a cell was not measured)."""
    out = []

    def cell(model: str, prec: str, batch: int) -> dict:
        return next(
            (r["img_s"] for r in res["infer"] if (r["model"], r["precision"], r["batch"]) == (model, prec, batch)), {}
        )

    def add(label: str, num: float | None, den: float | None, goal: float) -> None:
        ratio = num / den if num and den else None
        out.append({"target": label, "ratio": ratio, "goal": goal, "met": None if ratio is None else ratio >= goal})

    p0 = res["args"]["precisions"][0]  # fp16 on a GPU: the targets' precision
    for m in res["args"]["models"]:
        lo, hi = res["args"]["batches"][0], res["args"]["batches"][-1]
        mid = res["args"]["batches"][len(res["args"]["batches"]) // 2]
        big, med, one = cell(m, p0, hi), cell(m, p0, mid), cell(m, p0, lo)
        levit_best = lambda c: max((v for k, v in c.items() if k.startswith("levit")), default=None)  # noqa: E731
        add(f"{m} {p0} b{hi}: fused eager / timm eager >= 1.5", big.get("levit eager"), big.get("timm eager"), 1.5)
        add(f"{m} {p0} b{mid}: fused eager / timm eager >= 2.5", med.get("levit eager"), med.get("timm eager"), 2.5)
        add(f"{m} {p0} b{hi}: best levit / timm eager >= 2.0", levit_best(big), big.get("timm eager"), 2.0)
        add(f"{m} {p0} b{hi}: best levit / timm compile >= 1.25", levit_best(big), big.get("timm compile"), 1.25)
        add(f"{m} {p0} b{lo}: best levit / timm cudagraph >= 2.0", levit_best(one), one.get("timm cudagraph"), 2.0)
    for m, f in res["fidelity"].items():
        err = f["fused_vs_unfused_fp32_rel_err"]
        out.append({"target": f"{m} fused fp32 rel. error <= 1e-4", "ratio": err, "goal": 1e-4, "met": err <= 1e-4})
        for p in res["args"]["precisions"]:
            # Randomised weights give small top-2 margins, so no implementation reaches 99% in reduced
            # precision on them: there the bar is timm's own agreement at that precision less 5 points
            # (a few of the images; a broken path agrees on almost none).
            agree, bar = f[f"{p}_top1_agreement"], min(0.99, f[f"timm_{p}_top1_agreement"] - 0.05)
            out.append(
                {
                    "target": f"{m} fused {p} top-1 agreement >= min(0.99, timm {p}'s - 0.05) = {bar:.3f}",
                    "ratio": agree,
                    "goal": bar,
                    "met": agree >= bar,
                }
            )
    for m, p in res["paper"].items():
        add(f"{m} paper protocol: best levit / V100 >= 10", p["img_s"][p["best"]], p["paper_v100_img_s"], 10.0)
    return out


def markdown(res: dict) -> str:
    a = res["args"]
    lines = [
        f"**{res['device']}**, torch {res['torch']}, timm {res['timm']}; images/s, medians of {a['rounds']} "
        f"interleaved rounds, one process, same weights",
        "",
    ]
    names = ["levit eager", "levit cudagraph", "levit inductor", "timm eager", "timm cudagraph", "timm compile"]
    if res["infer"]:
        lines += ["| model | prec | batch | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
        for r in res["infer"]:
            te = r["img_s"].get("timm eager")
            cells = []
            for n in names:
                v = r["img_s"].get(n)
                if v is None:
                    cells.append("-")
                else:
                    cells.append(f"{v:,.0f}" + (f" ({v / te:.2f}x)" if te and n.startswith("levit") else ""))
            lines.append(f"| {r['model']} | {r['precision']} | {r['batch']} | " + " | ".join(cells) + " |")
        lines += ["", "(x: against timm eager in the same row; '-': not run, see the JSON's not_run)", ""]
    if res["train"]:
        lines += [
            "| training step (bf16 autocast, AdamW) | batch | levit img/s | levit, index_select gather | timm img/s "
            "| levit/timm | index_select/timm |",
            "|---|---|---|---|---|---|---|",
        ]
        for m, t in res["train"].items():
            s = t["img_s"]
            lines.append(
                f"| {m} | {t['batch']} | {s['levit']:,.0f} | {s['levit-index-select']:,.0f} | {s['timm']:,.0f} "
                f"| {t['levit_over_timm']:.2f}x | {t['levit_index_select_over_timm']:.2f}x |"
            )
        lines.append("")
    if res["paper"]:
        lines += [
            "| paper protocol (max power-of-two batch) | prec | batch | levit img/s (path) | paper V100 | ratio |",
            "|---|---|---|---|---|---|",
        ]
        for m, p in res["paper"].items():
            lines.append(
                f"| {m} | {p['precision']} | {p['batch']} | {p['img_s'][p['best']]:,.0f} ({p['best']}) | "
                f"{p['paper_v100_img_s']:,.0f} | "
                f"{p['ratio_to_v100']:.1f}x |"
            )
        lines.append("")
    if res["fidelity"]:
        lines += ["| fidelity | " + " | ".join(next(iter(res["fidelity"].values()))) + " |"]
        lines += ["|---|" + "---|" * len(next(iter(res["fidelity"].values())))]
        for m, f in res["fidelity"].items():
            lines.append(
                f"| {m} | " + " | ".join(f"{v:.2e}" if isinstance(v, float) else str(v) for v in f.values()) + " |"
            )
        lines.append("")
    lines += ["| target | measured | goal | met |", "|---|---|---|---|"]
    for t in targets(res):
        r = "not measured" if t["ratio"] is None else f"{t['ratio']:.3g}"
        lines.append(
            f"| {t['target']} | {r} | {t['goal']} | {'-' if t['met'] is None else ('yes' if t['met'] else 'NO')} |"
        )
    lines.append(f"\n(total {res['seconds']:.0f}s)")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=Path("."), help="folder for gpu.json and gpu.md")
    ap.add_argument("--sections", default="infer,train,paper", help="comma-separated, run in this order")
    ap.add_argument("--models", default="levit_128s,levit_384")
    ap.add_argument("--batches", default="1,64,1024")
    ap.add_argument("--precisions", default="fp16,bf16")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--window", type=float, default=0.2, help="seconds per candidate per round")
    ap.add_argument("--train-batch", type=int, default=256)
    ap.add_argument("--paper-limit", type=int, default=4096, help="the batch search's upper bound")
    ap.add_argument("--budget", type=float, default=200.0, help="no new compiles after this many seconds")
    ap.add_argument("--compile-batches", default="1024", help="batches that get the inductor cells (first precision)")
    ap.add_argument("--compile-all", action="store_true", help="inductor in every cell (slow: ~24 compiles)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, to check the logic (e.g. with --device cpu)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu.py: no CUDA GPU here (use --smoke --device cpu to check the script's logic)", file=sys.stderr)
        return 2
    args.img = 224
    if args.smoke:
        args.img, args.batches, args.train_batch, args.paper_limit = 64, "1,2,4", 4, 4
        args.compile_batches = "4"
        args.rounds, args.window, args.budget = 2, 0.01, 1e9
        args.paper_models = ["levit_128s"]
        if device.type == "cpu":
            args.precisions = "bf16"
            args.no_compile = True
    else:
        args.paper_models = list(PAPER_VARIANTS)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.batches = [int(b) for b in str(args.batches).split(",")]
    args.compile_batches = [int(b) for b in str(args.compile_batches).split(",") if b.strip()]
    args.precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    warnings.filterwarnings("ignore")
    import timm

    args.out.mkdir(parents=True, exist_ok=True)
    res: dict = {
        "device": device_name(device),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "fidelity": {},
        "paper": {},
        "train": {},
        "infer": [],
        "seconds": 0.0,
    }

    def save() -> None:
        res["seconds"] = elapsed()
        res["targets"] = targets(res)
        for name, text in (("gpu.json", json.dumps(res, indent=2) + "\n"), ("gpu.md", markdown(res))):
            tmp = args.out / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, args.out / name)

    log(f"{res['device']}, torch {res['torch']}, timm {res['timm']}: {', '.join(sections)}")
    check_fidelity(args, device, res)
    save()
    for s in sections:
        {"paper": paper_section, "train": train_section, "infer": infer_section}[s](args, device, res, save)
    save()
    print(markdown(res))
    log(f"wrote {args.out / 'gpu.json'} and {args.out / 'gpu.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
