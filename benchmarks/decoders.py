"""The decoders of `levit.data.preprocess.Preprocess` side by side: what the `tensor` path changes
against the bit-exact `pil` path on real photographs, and how fast each is per core.

    python benchmarks/decoders.py            # agreement on 54 views of real photos + speed
    python benchmarks/decoders.py --quick    # fewer images, for a check of the script itself

Agreement: the photos shipped with scikit-learn and scikit-image, each written as JPEG at four sizes
(half, as shipped, 2x and 4x), flipped, and cropped, 54 files; every view preprocessed both ways and
classified by LeViT-128S with randomised, trained-like weights (tests/helpers.py). Reported: the
largest and mean difference of the input tensors (normalised units), the largest relative logit
error, top-1 agreement. Speed: decode + preprocess CPU ms per image on one thread, each path, on
photo-like 500x375 and 4032x3024 JPEGs (as benchmarks/predict_e2e.py writes them), and the
images/s of one and two decoding processes in `levit predict`'s layout (`levit.runtime.pipeline`
with `--workers N`: its batch size and its split of the files), over 2,560 and 64 files so that
filling and draining the processes at the ends of a pass costs a few per cent of it, the counts
taking turns pass by pass; once with the batches normalised in the processes (the CPU's layout) and
once as uint8 pixels normalised where the model runs (a GPU's layout: a quarter of the bytes through
shared memory); beside them, torch's DataLoader as it comes (each batch in shared memory of its own)
in the same layout and the same turns, the peer of `levit.data.shared_batches`.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from intervals import median_interval

import levit
from levit.data.decoders import tensor_decoder_name
from levit.data.preprocess import ImageFiles, Preprocess, collate
from levit.runtime.options import CPU_BATCH_SIZE
from levit.runtime.pipeline import decoding_loader, plan

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' helpers (test support)
from helpers import randomize_weights, write_sample_jpegs


def photo_views(folder: Path, quick: bool) -> list[Path]:
    """Real photos as JPEG files: each at 4 sizes, flipped and cropped (6 views a photo)."""
    import skimage.data as skd
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = list(load_sample_images().images)
    for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field"):
        photos.append(getattr(skd, name)())
    photos.append(skd.stereo_motorcycle()[0])
    files = []
    for i, arr in enumerate(photos[: 3 if quick else None]):
        im = Image.fromarray(np.asarray(arr)).convert("RGB")
        w, h = im.size
        views = {f"x{s}": im.resize((int(w * s), int(h * s)), Image.Resampling.LANCZOS) for s in (0.5, 1, 2, 4)}
        views["flip"] = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        views["crop"] = im.crop((w // 6, h // 6, w - w // 6, h - h // 6))
        for name, v in views.items():
            files.append(folder / f"photo{i:02d}_{name}.jpg")
            v.save(files[-1], quality=92)
    return files


def agreement(files: list[Path]) -> dict[str, float]:
    torch.manual_seed(0)
    model = levit.fuse(randomize_weights(levit.create_model("levit_128s"), seed=0).eval())
    pil, tensor = Preprocess(224), Preprocess(224, decoder="tensor")
    a = torch.stack([pil(f) for f in files])
    b = torch.stack([tensor(f) for f in files])
    with torch.inference_mode():
        la, lb = model(a), model(b)
    rel = ((la - lb).abs().amax(-1) / la.abs().amax(-1)).max().item()
    return {
        "views": len(files),
        "max |diff|": (a - b).abs().max().item(),
        "mean |diff|": (a - b).abs().mean().item(),
        "max rel logit error": rel,
        "top-1 agreement": (la.argmax(-1) == lb.argmax(-1)).float().mean().item(),
    }


def cpu_ms(files: list[Path], pre: Preprocess, rounds: int = 3) -> float:
    """Best of ``rounds``: CPU ms per image to decode + preprocess, this process, one torch thread."""
    pre(files[0])
    best = float("inf")
    for _ in range(rounds):
        t = time.process_time()
        for f in files:
            pre(f)
        best = min(best, (time.process_time() - t) / len(files))
    return best * 1e3


def _count(loader) -> int:
    """One pass over ``loader``: its images, each batch released once counted (a plain DataLoader's
    batches need no release)."""
    n = 0
    for b in loader:
        n += len(b.paths)
        getattr(loader, "release", lambda _: None)(b)
    return n


def plain_loader(files: list[Path], pre: Preprocess, workers: int, pixels: bool) -> torch.utils.data.DataLoader:
    """torch's DataLoader as it comes, in `levit predict`'s layout (:func:`plan`): each batch collated
    into shared memory of its own by the worker, mapped and unmapped by the parent (the peer of
    levit.data.shared_batches)."""
    workers, batch = plan(files, CPU_BATCH_SIZE, workers)
    data = ImageFiles(files, pre, pixels)
    return torch.utils.data.DataLoader(
        data, batch, num_workers=workers, collate_fn=collate, prefetch_factor=2, persistent_workers=True
    )


def rates(files: list[Path], pre: Preprocess, rounds: int = 5, pixels: bool = False) -> dict[str, list[float]]:
    """Images/s of each pass, decoded + preprocessed by 1 and 2 DataLoader processes in `levit
    predict`'s layout (its batch size, its split of the files among the processes, prefetch 2),
    through `levit predict`'s reused shared memory (``levit1``, ``levit2``) and through torch's
    DataLoader as it comes (``plain1``, ``plain2``): ``rounds`` passes over ``files`` each, the four
    taking turns pass by pass (a disturbance of the machine falls on all alike, and each round's
    ratios compare passes run side by side), once their processes run (a first pass starts them:
    starting them is not decoding). ``pixels``: the batches travel as uint8 pixels, normalised
    where the model runs (a GPU's layout), instead of normalised float (the CPU's ``--workers``)."""
    loaders = {
        f"levit{n}": decoding_loader(files, pre, CPU_BATCH_SIZE, n, pixels=pixels, persistent=True) for n in (1, 2)
    }
    loaders.update({f"plain{n}": plain_loader(files, pre, n, pixels) for n in (1, 2)})
    for loader in loaders.values():
        _count(loader)
    passes: dict[str, list[float]] = {k: [] for k in loaders}
    for _ in range(rounds):
        for k, loader in loaders.items():
            t = time.perf_counter()
            n = _count(loader)
            passes[k].append(n / (time.perf_counter() - t))
    return passes


def by_round(passes: dict[str, list[float]], num: str, den: str) -> str:
    """``num`` / ``den`` round by round: their median and an interval for it (benchmarks/intervals.py)."""
    ratios = [a / b for a, b in zip(passes[num], passes[den])]
    low, high, coverage = median_interval(ratios)
    return f"{statistics.median(ratios):.2f}x ({coverage:.0%} interval {low:.2f}-{high:.2f})"


def _decode_all(files: list[Path], pre: Preprocess, out) -> None:
    torch.set_num_threads(1)
    for f in files[:16]:
        pre(f)
    t = time.perf_counter()
    for f in files:
        pre(f)
    out.put(len(files) / (time.perf_counter() - t))


def independent(files: list[Path], pre: Preprocess, n: int) -> float:
    """Images/s of ``n`` processes each decoding + preprocessing its share of ``files`` on its own (no
    DataLoader, no parent receiving batches): how far this machine's cores scale by themselves."""
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_decode_all, args=(files[i::n], pre, out)) for i in range(n)]
    for p in procs:
        p.start()
    total = sum(out.get() for _ in procs)
    for p in procs:
        p.join()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 photos, fewer speed images")
    ap.add_argument("--rounds", type=int, default=5, help="passes of each loader, taking turns (default 5)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "views").mkdir()
        res = agreement(photo_views(root / "views", args.quick))
        print(f"tensor path ({tensor_decoder_name()}) against pil, {res.pop('views')} views of real photos:")
        print("| " + " | ".join(res) + " |\n|" + "---|" * len(res))
        print("| " + " | ".join(f"{v:.4g}" if k != "top-1 agreement" else f"{v:.1%}" for k, v in res.items()) + " |")
        print(
            "\n| images | pil CPU ms/img | tensor CPU ms/img | tensor / pil speed | 1 process img/s (tensor) "
            "| 2 processes | 2 / 1 | 2 / 1, uint8 batches (a GPU's layout) | 2 / 1, independent processes "
            "| torch's DataLoader as it comes: 1, 2 processes | its 2 / 1 | 2 processes / DataLoader's |"
        )
        print("|---" * 12 + "|")
        rounds: list[str] = []
        for name, hw, n in (
            ("500x375", (375, 500), 40 if args.quick else 2560),
            ("4032x3024", (3024, 4032), 4 if args.quick else 64),
        ):
            files = write_sample_jpegs(root / name, n, hw, seed=0)
            tensor = Preprocess(224, decoder="tensor")
            p = cpu_ms(files, Preprocess(224))
            t = cpu_ms(files, tensor)
            passes = rates(files, tensor, args.rounds)
            r = {k: statistics.median(v) for k, v in passes.items()}
            u = {k: statistics.median(v) for k, v in rates(files, tensor, args.rounds, pixels=True).items()}
            rounds.append(
                f"{n} x {name}, round by round: levit 2 / 1 {by_round(passes, 'levit2', 'levit1')}; DataLoader's "
                f"2 / 1 {by_round(passes, 'plain2', 'plain1')}; levit's 2 processes / DataLoader's "
                f"{by_round(passes, 'levit2', 'plain2')}"
            )
            i1, i2 = (independent(files, tensor, k) for k in (1, 2))
            print(
                f"| {n} x {name} | {p:.2f} | {t:.2f} | {p / t:.2f}x | {r['levit1']:.1f} | {r['levit2']:.1f} "
                f"| {r['levit2'] / r['levit1']:.2f}x | {u['levit2'] / u['levit1']:.2f}x ({u['levit1']:.1f}, "
                f"{u['levit2']:.1f}) | {i2 / i1:.2f}x | {r['plain1']:.1f}, {r['plain2']:.1f} "
                f"| {r['plain2'] / r['plain1']:.2f}x | {r['levit2'] / r['plain2']:.2f}x |"
            )
        print("\n" + "\n".join(rounds))
    print(
        f"\ntorch {torch.__version__}, one torch thread per process; command: python benchmarks/decoders.py"
        + (" --quick" if args.quick else "")
        + (f" --rounds {args.rounds}" if args.rounds != 5 else "")
    )


if __name__ == "__main__":
    main()
