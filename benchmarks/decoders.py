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
filling and draining the processes at the ends of a pass costs a few per cent of it, the two counts
taking turns pass by pass; once with the batches normalised in the processes (the CPU's layout) and
once as uint8 pixels normalised where the model runs (a GPU's layout: a quarter of the bytes through
shared memory).
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

import levit
from levit.data.decoders import tensor_decoder_name
from levit.data.preprocess import Preprocess
from levit.runtime.options import CPU_BATCH_SIZE
from levit.runtime.pipeline import decoding_loader

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


def rates(
    files: list[Path], pre: Preprocess, workers: tuple[int, ...] = (1, 2), rounds: int = 5, pixels: bool = False
) -> list[float]:
    """Images/s decoded + preprocessed by each count of DataLoader processes in ``workers``, in
    `levit predict`'s layout (its batch size, its split of the files among the processes, prefetch
    2): the median of ``rounds`` passes over ``files``, the counts taking turns pass by pass (a
    disturbance of the machine falls on both alike), once their processes run (a first pass starts
    them: starting them is not decoding). ``pixels``: the batches travel as uint8 pixels, normalised
    where the model runs (a GPU's layout), instead of normalised float (the CPU's ``--workers``)."""
    loaders = []
    for n in workers:
        loader = decoding_loader(files, pre, CPU_BATCH_SIZE, n, pixels=pixels, persistent=True)
        sum(len(b.paths) for b in loader)
        loaders.append(loader)
    passes: list[list[float]] = [[] for _ in workers]
    for _ in range(rounds):
        for loader, out in zip(loaders, passes):
            t = time.perf_counter()
            n = sum(len(b.paths) for b in loader)
            out.append(n / (time.perf_counter() - t))
    return [statistics.median(p) for p in passes]


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
            "\n| images | pil CPU ms/img | tensor CPU ms/img | tensor / pil speed | 1 worker img/s (tensor) | 2 workers "
            "| 2 / 1 | 2 / 1, uint8 batches (a GPU's layout) | 2 / 1, independent processes |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for name, hw, n in (
            ("500x375", (375, 500), 40 if args.quick else 2560),
            ("4032x3024", (3024, 4032), 4 if args.quick else 64),
        ):
            files = write_sample_jpegs(root / name, n, hw, seed=0)
            p = cpu_ms(files, Preprocess(224))
            t = cpu_ms(files, Preprocess(224, decoder="tensor"))
            r1, r2 = rates(files, Preprocess(224, decoder="tensor"))
            u1, u2 = rates(files, Preprocess(224, decoder="tensor"), pixels=True)
            i1, i2 = (independent(files, Preprocess(224, decoder="tensor"), k) for k in (1, 2))
            print(
                f"| {n} x {name} | {p:.2f} | {t:.2f} | {p / t:.2f}x | {r1:.1f} | {r2:.1f} | {r2 / r1:.2f}x "
                f"| {u2 / u1:.2f}x ({u1:.1f}, {u2:.1f}) | {i2 / i1:.2f}x |"
            )
    print(
        f"\ntorch {torch.__version__}, one torch thread per process; command: python benchmarks/decoders.py"
        + (" --quick" if args.quick else "")
    )


if __name__ == "__main__":
    main()
