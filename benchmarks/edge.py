"""LeViT on a phone's runtime: ExecuTorch (XNNPACK) fp32 and int8, proven and timed in ONE process.

Sections (``--sections``, default all three, in this order):

1. ``parity``: ``levit export --format executorch`` (:func:`levit.runtime.edge.export_executorch`, which
   loads the written ``.pte`` in ExecuTorch's runtime and compares it with a float64 run of the
   fused model) for all five variants at 224x224, LeViT-128S at a non-square 224x320 and with a
   dynamic batch (1..16); the relative error (target <= 1e-5), the size and the export time
   (target < 60 s) per variant.
2. ``int8``: LeViT-128S and LeViT-256 exported in int8 (PT2E, XNNPACK's quantizer; activations
   quantized per token at run time, the default, and per tensor with calibrated scales) on real
   photos (the ones ``benchmarks/speed_targets.py`` uses: scikit-learn's and scikit-image's samples,
   54 views); top-1 agreement and max relative logit error against fp32 on those images, beside
   ``levit.deploy``'s int8 backends (OpenVINO + NNCF, ONNX Runtime) on the same images and weights
   (target: at least as good as deploy's ``auto`` int8), and the size against the fp32 file
   (target <= 30%).
3. ``speed``: images/s of LeViT-128S and LeViT-256 at batch 1 and 16, one thread and all cores:
   levit's fused model eager, ONNX Runtime and OpenVINO (fp32, through ``levit.deploy``) and the
   ExecuTorch programs (fp32, int8 both ways) in ExecuTorch's runtime, the same weights. Per thread
   count, every candidate is built first, then all are timed in interleaved rounds (a noisy
   neighbour slows all alike); the median over the rounds is reported. Targets at batch 1, one
   thread, LeViT-128S: ExecuTorch fp32 >= 1.0x levit eager, ExecuTorch int8 >= 1.5x ExecuTorch fp32.

XNNPACK on this x86 CPU stands in for ARM (the same kernels, built for another instruction set):
the paper's ARM figures (Table 3: Graviton2, one thread) are printed beside the table for context,
not as a comparison.

Weights: randomised BN statistics and attention biases (like a trained model's, non-degenerate), or
``--checkpoint FILE`` (one file: used for the variant it holds). Results: ``--json FILE``.

    PYTHONPATH=src python benchmarks/edge.py                       # everything (~10 min on 2 cores)
    PYTHONPATH=src python benchmarks/edge.py --quick               # LeViT-128S, batch 1, one thread (~2 min)
    PYTHONPATH=src python benchmarks/edge.py --sections parity     # the five-variant parity only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import levit
from levit.data.synthetic import photo_like_images
from levit.models.config import PAPER_RESULTS
from levit.paper.speed import device_name
from levit.paper.timing import interleaved
from levit.runtime import edge, pte
from levit.runtime.deploy import build_runner, deploy, resolve

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' helpers (test support)
from helpers import randomize_weights

VARIANTS = ("levit_128s", "levit_128", "levit_192", "levit_256", "levit_384")
SECTIONS = ("parity", "int8", "speed")


def real_images() -> torch.Tensor:
    """The real photos of benchmarks/speed_targets.py (needs scikit-learn and scikit-image), else
    photo-like synthetic images (levit.data.synthetic.photo_like_images)."""
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        from speed_targets import real_images as photos

        return photos()
    except ImportError as e:
        print(f"(real photos unavailable: {e}; using 54 synthetic photo-like images)", file=sys.stderr)
        return photo_like_images(54, 224, seed=11)


def build_model(name: str, checkpoint: str | None, img_size=224) -> torch.nn.Module:
    if checkpoint:
        return levit.create_model(name, checkpoint=checkpoint, img_size=img_size).eval()
    return randomize_weights(levit.create_model(name, img_size=img_size), seed=0).eval()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- 1. parity -------------------------------------------------------------------------------------
def section_parity(args, out: Path) -> list[dict]:
    cases = [(v, 224, False) for v in args.variants]
    if "levit_128s" in args.variants and not args.quick:
        cases += [("levit_128s", (224, 320), False), ("levit_128s", 224, True)]
    rows = []
    for name, size, dynamic in cases:
        model = build_model(name, args.checkpoint, size)
        label = f"{name} {size if isinstance(size, int) else 'x'.join(map(str, size))}" + (" b1..16" if dynamic else "")
        log(f"parity: {label} ...")
        t0 = time.perf_counter()
        res = edge.export_executorch(model, out / "p.pte", batch_size=16 if dynamic else 1, dynamic_batch=dynamic)
        rows.append(
            {
                "case": label,
                "rel_error": res.max_rel_error,
                "torch_rel_error": res.torch_rel_error,
                "images": res.images,
                "mb": res.size_bytes / 1e6,
                "export_s": time.perf_counter() - t0,
            }
        )
    print("\n## fp32 .pte in ExecuTorch's runtime vs float64 PyTorch (levit export --format executorch)")
    print("(max |difference| / max |logit| over the check images; 'fp32 torch' is fp32 PyTorch's own error, the")
    print(" rounding floor on these weights: randomised ones put it near 1e-5)")
    print(f"{'case':<28} {'rel error':>10} {'fp32 torch':>11} {'ratio':>6} {'MB':>6} {'export s':>9}")
    for r in rows:
        print(
            f"{r['case']:<28} {r['rel_error']:10.2e} {r['torch_rel_error']:11.2e} "
            f"{r['rel_error'] / r['torch_rel_error']:6.2f} {r['mb']:6.1f} {r['export_s']:9.1f}"
        )
    worst = max(r["rel_error"] for r in rows)
    worst_ratio = max(r["rel_error"] / r["torch_rel_error"] for r in rows)
    slowest = max(r["export_s"] for r in rows)
    print(
        f"target rel error <= 1e-5: worst {worst:.2e} {'MET' if worst <= 1e-5 else 'NOT MET'} "
        f"(at most {worst_ratio:.2f}x fp32 PyTorch's own error)"
    )
    print(f"target export < 60 s per variant: slowest {slowest:.0f} s {'MET' if slowest < 60 else 'NOT MET'}")
    return rows


# ---- 2. int8 ---------------------------------------------------------------------------------------
def section_int8(args, out: Path, images: torch.Tensor) -> list[dict]:
    rows = []
    for name in args.models:
        model = build_model(name, args.checkpoint)
        log(f"int8: {name} fp32 export ...")
        fp32 = edge.export_executorch(model, out / f"{name}.pte")
        row = {"model": name, "fp32_mb": fp32.size_bytes / 1e6}
        for act in pte.INT8_ACTIVATIONS:
            log(f"int8: {name} int8 ({act} activations) export on {images.shape[0]} images ...")
            t0 = time.perf_counter()
            # a benchmark reports what it measures: the export's acceptance check (a broken quantization
            # agrees on about 1/classes of the images) is reported beside the figure instead of aborting
            # the run: agreements differ between CPUs, and randomised weights keep the top logits close
            q = edge.export_executorch(
                model,
                out / f"{name}_int8.pte",
                precision="int8",
                calibration=images,
                int8=edge.Int8Options(act, min_agreement=0.0),
            )
            row[f"executorch {act}"] = {
                "top1_agreement": q.top1_agreement,
                "max_rel_error": q.max_rel_error,
                "mb": q.size_bytes / 1e6,
                "size_ratio": q.size_bytes / fp32.size_bytes,
                "export_s": time.perf_counter() - t0,
            }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for be in ("openvino", "onnxruntime"):
                log(f"int8: {name} levit.deploy {be} int8 ...")
                row[be] = deploy(model, backend=be, precision="int8", batch_size=16, calibration=images).fidelity
        row["auto"] = resolve("auto", "int8")[0]  # deploy's choice for int8 on this CPU
        rows.append(row)
    print(f"\n## int8 on {images.shape[0]} real-photo views: agreement with fp32 (the same images calibrate)")
    print(f"{'model':<11} {'runtime':<34} {'top-1 agree':>11} {'max rel err':>12} {'MB':>6} {'of fp32':>8}")
    for r in rows:
        print(f"{r['model']:<11} {'executorch fp32':<34} {'':>11} {'':>12} {r['fp32_mb']:6.1f}")
        for act in pte.INT8_ACTIVATIONS:
            e = r[f"executorch {act}"]
            below = e["top1_agreement"] < edge.DEFAULT_MIN_AGREEMENT
            print(
                f"{'':<11} {f'executorch int8 {act}':<34} {e['top1_agreement'] * 100:10.1f}% "
                f"{e['max_rel_error']:12.2e} {e['mb']:6.1f} {e['size_ratio'] * 100:7.1f}%"
                + (f"  BELOW the export's {edge.DEFAULT_MIN_AGREEMENT * 100:.0f}% check" if below else "")
            )
        for be in ("openvino", "onnxruntime"):
            f = r[be]
            tag = f"levit.deploy {be} int8" + (" (auto)" if be == r["auto"] else "")
            print(f"{'':<11} {tag:<34} {f['top1_agreement'] * 100:10.1f}% {f['max_rel_error']:12.2e}")
    for r in rows:
        e, a = r["executorch dynamic"], r[r["auto"]]["top1_agreement"]
        print(
            f"target {r['model']} int8 (dynamic, the default) agreement >= deploy auto int8 ({r['auto']}): "
            f"{e['top1_agreement'] * 100:.1f}% vs {a * 100:.1f}% {'MET' if e['top1_agreement'] >= a else 'NOT MET'}; "
            f"size <= 30% of fp32: {e['size_ratio'] * 100:.1f}% {'MET' if e['size_ratio'] <= 0.30 else 'NOT MET'}"
        )
    return rows


# ---- 3. speed --------------------------------------------------------------------------------------
def section_speed(args, images: torch.Tensor) -> dict:
    """One phase per thread count (ExecuTorch's threadpool is process-wide: a resize makes every
    program reload), the candidates of a phase timed in interleaved rounds."""
    all_cores = os.cpu_count() or 1
    threads = [1] if args.quick else sorted({1, all_cores})
    batches = [1] if args.quick else [1, 16]
    precs = ("fp32", "int8 dynamic", "int8 static")
    programs: dict[tuple, bytes] = {}
    fused_models = {name: levit.fuse(build_model(name, args.checkpoint)) for name in args.models}
    inputs = {b: photo_like_images(b, 224, seed=1) for b in batches}
    for name, fused in fused_models.items():
        for b in batches:
            for prec in precs:
                log(f"speed: {name} executorch {prec} batch {b} ...")
                act = prec.split()[-1] if prec != "fp32" else "dynamic"
                programs[(name, prec, b)] = pte.lower(
                    fused,
                    inputs[b],
                    precision=prec.split()[0],
                    calibration=images if prec != "fp32" else None,
                    int8_activations=act,
                ).data
    speeds: dict[tuple, list[float]] = {}
    for th in threads:
        cands: dict[tuple, object] = {}  # (model, backend, batch, threads) -> runner
        for name, fused in fused_models.items():
            for b in batches:
                cands[(name, "levit eager", b, th)] = build_runner(fused, "eager", example=inputs[b], threads=th)
                for be in ("onnxruntime", "openvino"):
                    cands[(name, be, b, th)] = build_runner(fused, be, example=inputs[b], threads=th)
                for prec in precs:
                    cands[(name, f"executorch {prec}", b, th)] = pte.Program(programs[(name, prec, b)], threads=th)
        torch.set_num_threads(th)  # levit eager's threads; the other runtimes hold their own
        # warm-up calls first (XNNPACK and the runtimes set up on first calls), then timed windows
        per_call = interleaved(
            {k: (lambda run=run, x=inputs[k[2]]: run(x)) for k, run in cands.items()},
            rounds=args.rounds,
            window=args.window,
            on_round=lambda r, n, th=th: log(f"speed: {th} thread(s), round {r}/{n}"),
        )
        speeds.update({k: [k[2] / s for s in v] for k, v in per_call.items()})
    med = {k: statistics.median(v) for k, v in speeds.items()}
    print(f"\n## images/s, median of {args.rounds} interleaved rounds ({device_name()}, {all_cores} cores)")
    print("XNNPACK on this x86 CPU stands in for ARM: the same kernels, another instruction set.")
    backends = ["levit eager", "onnxruntime", "openvino", *(f"executorch {p}" for p in precs)]
    print(f"{'model':<11} {'batch':>5} {'thr':>4} " + " ".join(f"{b:>22}" for b in backends))
    for name in args.models:
        for b in batches:
            for th in threads:
                vals = " ".join(f"{med[(name, be, b, th)]:22.1f}" for be in backends)
                print(f"{name:<11} {b:>5} {th:>4} {vals}")
    print(
        "paper, Table 3, ARM (AWS Graviton2, one thread), for context: "
        + ", ".join(f"{n} {PAPER_RESULTS[n].arm_img_s} img/s" for n in args.models if n in PAPER_RESULTS)
    )
    targets = {}
    if "levit_128s" in args.models:
        k = ("levit_128s", "executorch fp32", 1, 1)
        r1 = med[k] / med[("levit_128s", "levit eager", 1, 1)]
        r2 = med[("levit_128s", "executorch int8 dynamic", 1, 1)] / med[k]
        targets = {"fp32_vs_eager": r1, "int8_vs_fp32": r2}
        print(
            f"target LeViT-128S batch 1, one thread: executorch fp32 / levit eager = {r1:.2f}x (>= 1.0) "
            f"{'MET' if r1 >= 1.0 else 'NOT MET'}"
        )
        print(
            f"target LeViT-128S batch 1, one thread: executorch int8 (dynamic) / executorch fp32 = {r2:.2f}x (>= 1.5) "
            f"{'MET' if r2 >= 1.5 else 'NOT MET'}"
        )
    return {"speeds": {" | ".join(map(str, k)): v for k, v in speeds.items()}, "targets": targets}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated: parity, int8, speed")
    ap.add_argument("--quick", action="store_true", help="LeViT-128S only, batch 1, one thread, 3 short rounds")
    ap.add_argument("--models", default="levit_128s,levit_256", help="int8 and speed sections")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="parity section")
    ap.add_argument("--checkpoint", default=None, help="weights (one file: use --models/--variants of its variant)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 5, quick 3)")
    ap.add_argument("--window", type=float, default=None, help="seconds per candidate per round (default 1, quick 0.5)")
    ap.add_argument("--json", default=None, help="write the results to this file")
    args = ap.parse_args()
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        ap.error(f"--sections: unknown {', '.join(bad)}; choose from {', '.join(SECTIONS)}")
    args.models = ["levit_128s"] if args.quick else [m.strip() for m in args.models.split(",")]
    args.variants = ["levit_128s"] if args.quick else [v.strip() for v in args.variants.split(",")]
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.window = args.window or (0.5 if args.quick else 1.0)
    print("command: " + " ".join(["python", *sys.argv]))
    print(f"torch {torch.__version__}, executorch {edge._versions().get('executorch')}, {device_name()}")
    results: dict = {"args": vars(args), "device": device_name()}
    images = real_images() if {"int8", "speed"} & set(sections) else None
    with tempfile.TemporaryDirectory() as d:
        for s in sections:
            if s == "parity":
                results["parity"] = section_parity(args, Path(d))
            elif s == "int8":
                results["int8"] = section_int8(args, Path(d), images)
            else:
                results["speed"] = section_speed(args, images)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
