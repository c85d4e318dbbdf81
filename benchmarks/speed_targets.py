"""Measure the CPU speed targets side by side in ONE process and print the ratios.

LeViT-128S, 224x224, one CPU thread, batch 16 (and --batch 1 for latency). Every candidate is
built first, then all of them are timed in interleaved rounds (each round runs every candidate
for one window); a candidate's speed is the median over the rounds, so a noisy neighbour slows
all candidates alike.

Weights: a LeViT with randomised BN statistics and attention biases (non-degenerate, like a trained
model), or --checkpoint FILE. The same weights are loaded into timm's LeViT (the peer). Fidelity of
reduced precisions is measured on real photos (the samples scikit-learn and scikit-image ship,
several crops each) against our fp32 model.

    python benchmarks/speed_targets.py                 # batch 16
    python benchmarks/speed_targets.py --batch 1       # latency
    python benchmarks/speed_targets.py --json out.json
    python benchmarks/speed_targets.py --only "timm eager,timm openvino fp32,levit eager,levit auto"  # prefixes
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import levit
from levit.models.config import DEFAULT_CROP_PCT
from levit.runtime.calibration import fidelity
from levit.runtime.deploy import build_runner
from levit.weights.convert import to_timm_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' helpers (test support)
from helpers import randomize_weights as randomize


def real_images(img_size: int = 224) -> torch.Tensor:
    """Photos shipped with scikit-learn and scikit-image, 6 views each (3 crop scales x flip), eval-normalised."""
    import skimage.data as skd
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from levit.data.transforms import eval_transform

    photos = list(load_sample_images().images)
    for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field"):
        photos.append(getattr(skd, name)())
    photos.append(skd.stereo_motorcycle()[0])
    out = []
    for arr in photos:
        im = Image.fromarray(np.asarray(arr)).convert("RGB")
        for crop in (DEFAULT_CROP_PCT, 0.7, 1.0):  # the authors' crop and two others
            t = eval_transform(img_size, crop)(im)
            out += [t, t.flip(-1)]
    return torch.stack(out)


def _ov_default(module: torch.nn.Module, x: torch.Tensor, threads: int):
    """OpenVINO as a user would run timm's LeViT: converted, compiled with the default precision."""
    import openvino as ov

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = ov.convert_model(module, example_input=x)
    c = ov.Core().compile_model(m, "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})
    req = c.create_infer_request()
    prec = c.get_property("INFERENCE_PRECISION_HINT")

    def run(t: torch.Tensor) -> torch.Tensor:
        req.infer([t.numpy()], share_inputs=True)
        return torch.from_numpy(req.get_output_tensor(0).data.copy())

    return run, str(prec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="levit_128s")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--window", type=float, default=1.0, help="seconds per candidate per round")
    ap.add_argument("--skip", default="", help="comma-separated candidates to leave out")
    ap.add_argument("--only", default="", help="comma-separated name prefixes: build only the candidates matching one")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import timm

    if args.checkpoint:
        model = levit.create_model(args.model, checkpoint=args.checkpoint).eval()
    else:
        model = randomize(levit.create_model(args.model), seed=0).eval()
    peer = timm.create_model(args.model, pretrained=False).eval()
    peer.load_state_dict(to_timm_state_dict(model))
    fused = levit.fuse(model)
    images = real_images()
    x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref_imgs = torch.cat([fused(c) for c in images.split(16)])
        assert fidelity(peer(images), ref_imgs)["max_rel_error"] < 1e-4, "timm peer does not match our model"

    skip = set(filter(None, args.skip.split(",")))
    th = args.threads
    # name -> (runner, precision, is_ours)
    cands: dict[str, tuple] = {}

    only = [p.strip() for p in args.only.split(",") if p.strip()]

    def add(name: str, make, precision: str, ours: bool) -> None:
        if name in skip or (only and not any(name == p or name.startswith(p + " ") for p in only)):
            return
        t0 = time.perf_counter()
        print(f"building {name} ...", end="", file=sys.stderr, flush=True)
        cands[name] = (make(), precision, ours)
        print(f" {time.perf_counter() - t0:.0f}s", file=sys.stderr)

    add("timm eager", lambda: build_runner(peer, "eager", example=x, threads=th), "fp32", False)
    add("timm openvino fp32", lambda: build_runner(peer, "openvino", example=x, threads=th), "fp32", False)
    ov_def = {}

    def make_ov_default():
        run, prec = _ov_default(peer, x, th)
        ov_def["precision"] = prec
        return run

    add("timm openvino default", make_ov_default, "default", False)
    add("levit eager", lambda: build_runner(fused, "eager", example=x, threads=th), "fp32", True)
    add("levit onnxruntime", lambda: build_runner(fused, "onnxruntime", example=x, threads=th), "fp32", True)
    add("levit openvino", lambda: build_runner(fused, "openvino", example=x, threads=th), "fp32", True)
    add("levit inductor", lambda: build_runner(fused, "inductor", example=x, threads=th), "fp32", True)
    add("levit eager bf16", lambda: build_runner(fused, "eager", "bf16", example=x, threads=th), "bf16", True)
    add("levit inductor bf16", lambda: build_runner(fused, "inductor", "bf16", example=x, threads=th), "bf16", True)
    add("levit openvino bf16", lambda: build_runner(fused, "openvino", "bf16", example=x, threads=th), "bf16", True)
    from levit.runtime.deploy import resolve

    for prec in ("fp32", "bf16", "int8"):  # what levit.deploy(backend="auto") runs on this CPU
        be, ran = resolve("auto", prec)
        calib = images if ran == "int8" else None
        add(
            f"levit auto {prec} ({be} {ran})",
            lambda be=be, ran=ran, calib=calib: build_runner(fused, be, ran, example=x, threads=th, calibration=calib),
            ran,
            True,
        )
    add(
        "levit openvino int8",
        lambda: build_runner(fused, "openvino", "int8", example=x, threads=th, calibration=images),
        "int8",
        True,
    )

    # fidelity on the real photos (fixed-shape backends get full batches of args.batch)
    fid = {}
    for name, (run, _prec, _) in cands.items():
        outs = []
        for c in images.split(args.batch):
            n = c.shape[0]
            if n < args.batch:
                c = torch.cat([c, c[:1].expand(args.batch - n, -1, -1, -1)])
            outs.append(run(c)[:n])
        fid[name] = fidelity(torch.cat(outs), ref_imgs)

    # interleaved timing
    for run, _, _ in cands.values():
        run(x)
        run(x)
    speeds: dict[str, list[float]] = {k: [] for k in cands}
    for r in range(args.rounds):
        for name, (run, _, _) in cands.items():
            n, t0 = 0, time.perf_counter()
            while True:
                run(x)
                n += 1
                dt = time.perf_counter() - t0
                if dt >= args.window:
                    break
            speeds[name].append(n * args.batch / dt)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in speeds.items()}

    from levit.paper.speed import device_name

    dev = device_name()
    print(
        f"\n{args.model}, batch {args.batch}, {th} thread(s), {dev}; torch {torch.__version__}, timm {timm.__version__}"
    )
    print(f"OpenVINO default precision on this CPU: {ov_def.get('precision', '?')}")
    print(f"{'candidate':<34} {'img/s':>8} {'min':>8} {'max':>8} {'top1 agree':>11} {'max rel err':>12}")
    for k in cands:
        f = fid[k]
        print(
            f"{k:<34} {med[k]:8.1f} {min(speeds[k]):8.1f} {max(speeds[k]):8.1f} "
            f"{f['top1_agreement'] * 100:10.1f}% {f['max_rel_error']:12.2e}"
        )
    print(f"(fidelity vs our fp32 on {images.shape[0]} views of real photos; {args.rounds} interleaved rounds)")
    if not args.checkpoint:
        print(
            "(randomised weights: their top two logits are close, so bf16/int8 flip answers that a trained "
            "model's would not; compare with timm's own reduced precision, or pass --checkpoint)"
        )

    def get(k: str) -> float | None:
        return med.get(k)

    results = {}
    timm_eager = get("timm eager")
    ours_fp32 = {k: v for k, v in med.items() if cands[k][2] and cands[k][1] == "fp32"}
    # Randomised weights give small top-2 margins: reduced precision flips some answers in any
    # implementation, so without a checkpoint the bar is the peer's own agreement in its default
    # (reduced) precision less 5 points (a few of the 54 views: two correct bf16 runs of the same
    # graph differ by that much), where that is below 99%.
    bar = 0.99
    peer_default = fid.get("timm openvino default")
    peer_reduced = "32" not in ov_def.get("precision", "32")  # e.g. "<Type: 'bfloat16'>"
    if not args.checkpoint and peer_default is not None and peer_reduced:
        bar = min(bar, peer_default["top1_agreement"] - 0.05)
    ok_reduced = {
        k: v for k, v in med.items() if cands[k][2] and cands[k][1] != "fp32" and fid[k]["top1_agreement"] >= bar
    }
    print("\ntargets:")

    def target(label: str, num_name: str | None, num: float | None, den_name: str, den: float | None, goal: float):
        if num is None or den is None:
            print(f"  {label}: not measured")
            return
        ratio = num / den
        results[label] = {"ratio": ratio, "goal": goal, "met": ratio >= goal, "num": num_name, "den": den_name}
        print(
            f"  {label}: {num_name} / {den_name} = {ratio:.2f}x (goal >= {goal}x) {'MET' if ratio >= goal else 'NOT MET'}"
        )

    target("fused eager fp32 vs timm eager", "levit eager", get("levit eager"), "timm eager", timm_eager, 1.25)
    if ours_fp32:
        best = max(ours_fp32, key=ours_fp32.get)
        target("best fp32 vs timm eager", best, ours_fp32[best], "timm eager", timm_eager, 2.0)
        target(
            "best fp32 vs OpenVINO fp32 (timm)",
            best,
            ours_fp32[best],
            "timm openvino fp32",
            get("timm openvino fp32"),
            1.0,
        )
    if ok_reduced:
        best = max(ok_reduced, key=ok_reduced.get)
        target(
            f"best reduced precision (>={bar:.1%} top-1 agreement) vs OpenVINO default (timm)",
            best,
            ok_reduced[best],
            "timm openvino default",
            get("timm openvino default"),
            1.2,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "args": vars(args),
                    "device": dev,
                    "speeds": speeds,
                    "median": med,
                    "fidelity": fid,
                    "targets": results,
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
