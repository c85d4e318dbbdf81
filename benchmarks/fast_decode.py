"""Is `--fast-decode` safe to use? Speed of the JPEG decoders, and how much the tensors and answers change.

Decoders compared on photo-like JPEGs at 500x375 and 4032x3024 (CPU ms per image, one thread,
decode + the whole preprocessing to the 224x224 input):

- official: Pillow full decode + Pillow bicubic resize (levit's default, the authors' eval);
- draft (`--fast-decode`): Pillow's DCT-domain `draft` (1/2, 1/4, 1/8 while the short side stays >= the
  resize target), then the official Pillow resize;
- torchvision decode_jpeg + torch resize (libjpeg-turbo, every pixel decoded).

Then, official against `--fast-decode`: the preprocessed tensors' difference (ImageNet-normalised
units) and top-1 agreement, on two models:

- a LeViT trained on the bundled digits (`levit train --dataset digits`, or --digits-checkpoint):
  its validation digits written as JPEGs at both sizes; accuracy against the true digit too;
- LeViT-128S with randomised weights (tests/helpers.py's randomize_weights, which makes its answers
  depend on the image like a trained model's): photo-like JPEGs and the photos scikit-learn and
  scikit-image ship, at their own size and upscaled to 4032x3024.

    python benchmarks/fast_decode.py                              # trains the digits model first (~1 min)
    python benchmarks/fast_decode.py --digits-checkpoint runs/digits/best.pth --photos 100
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import levit
from levit.data.preprocess import Preprocess

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' helpers (test support)
from helpers import randomize_weights, write_sample_jpegs

SIZES = {"500x375": (375, 500), "4032x3024": (3024, 4032)}


def decoder_speed(files: list[Path], rounds: int) -> dict[str, float]:
    """Median CPU ms per image (one thread) of each decoder + preprocessing, interleaved rounds."""
    from torchvision.io import decode_jpeg, read_file
    from torchvision.transforms.v2 import functional as F

    full, fast = Preprocess(224), Preprocess(224, fast_decode=True)

    def tv(path: Path) -> torch.Tensor:
        x = decode_jpeg(read_file(str(path)))
        x = F.resize(x, [fast.resize], interpolation=F.InterpolationMode.BICUBIC, antialias=True)
        x = F.center_crop(x, [224, 224])
        return F.normalize(x.float().div_(255), list(fast.mean), list(fast.std))

    cands = {"official (Pillow)": full, "draft (--fast-decode)": fast, "torchvision decode_jpeg": tv}
    out: dict[str, list[float]] = {k: [] for k in cands}
    torch.set_num_threads(1)
    for r in range(rounds):
        for name in list(cands) if r % 2 == 0 else list(cands)[::-1]:
            t = time.process_time()
            for f in files:
                cands[name](f)
            out[name].append((time.process_time() - t) / len(files) * 1e3)
    return {k: statistics.median(v) for k, v in out.items()}


def compare(model: torch.nn.Module, files: list[Path], labels: list[int] | None = None) -> dict[str, float]:
    """Official vs fast preprocessing of ``files`` through ``model``: tensor differences, top-1 agreement."""
    size = model.config.img_size
    full, fast = Preprocess(size), Preprocess(size, fast_decode=True)
    fused = levit.fuse(model)
    diffs_max, diffs_mean, agree, right_full, right_fast = [], [], 0, 0, 0
    with torch.inference_mode():
        for i in range(0, len(files), 32):
            chunk = files[i : i + 32]
            a = torch.stack([full(f) for f in chunk])
            b = torch.stack([fast(f) for f in chunk])
            d = (a - b).abs().flatten(1)
            diffs_max += d.amax(1).tolist()
            diffs_mean += d.mean(1).tolist()
            pa, pb = fused(a).argmax(-1), fused(b).argmax(-1)
            agree += int((pa == pb).sum())
            if labels is not None:
                y = torch.tensor(labels[i : i + 32])
                right_full += int((pa == y).sum())
                right_fast += int((pb == y).sum())
    out = {
        "n": len(files),
        "max |diff|": max(diffs_max),
        "mean |diff|": statistics.mean(diffs_mean),
        "top-1 agreement %": 100 * agree / len(files),
    }
    if labels is not None:
        out["accuracy official %"] = 100 * right_full / len(files)
        out["accuracy fast %"] = 100 * right_fast / len(files)
    return out


def digits_jpegs(val: Path, out: Path, size: tuple[int, int], limit: int) -> tuple[list[Path], list[int]]:
    """The validation digits (8x8 PNGs) as JPEGs of ``size`` (H, W): upscaled bicubic, centred on grey."""
    files, labels = [], []
    out.mkdir(parents=True, exist_ok=True)
    classes = sorted(p.name for p in val.iterdir() if p.is_dir())
    items = sorted((p, classes.index(p.parent.name)) for p in val.glob("*/*.png"))[:limit]
    h, w = size
    for i, (png, y) in enumerate(items):
        side = min(h, w)
        digit = Image.open(png).convert("RGB").resize((side, side), Image.BICUBIC)
        canvas = Image.new("RGB", (w, h), (0, 0, 0))
        canvas.paste(digit, ((w - side) // 2, 0))
        files.append(out / f"d{i:04d}.jpg")
        canvas.save(files[-1], quality=90)
        labels.append(y)
    return files, labels


def real_photos(out: Path) -> list[Path]:
    """The photos scikit-learn and scikit-image ship, as JPEGs at their size and at 4032x3024."""
    import skimage.data as skd
    from sklearn.datasets import load_sample_images

    arrays = list(load_sample_images().images)
    for name in ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left"):
        fn = getattr(skd, name, None)
        if fn is not None:
            arrays.append(fn())
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, a in enumerate(arrays):
        im = Image.fromarray(np.asarray(a)).convert("RGB")
        files.append(out / f"real_{i}.jpg")
        im.save(files[-1], quality=90)
        files.append(out / f"real_{i}_4032.jpg")
        im.resize((4032, 3024), Image.BICUBIC).save(files[-1], quality=90)
    return files


def table(title: str, rows: list[tuple[str, dict]]) -> None:
    print(f"\n{title}")
    cols = list(dict.fromkeys(k for _, r in rows for k in r))
    print("| images | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for name, r in rows:
        cells = [f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in cols]
        print(f"| {name} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--digits-checkpoint", type=Path, help="a levit trained on the digits (default: train one)")
    ap.add_argument("--photos", type=int, default=64, help="photo-like JPEGs per size for LeViT-128S")
    ap.add_argument("--big", type=int, default=8, help="4032x3024 photo-like JPEGs (speed and agreement)")
    ap.add_argument("--digits", type=int, default=120, help="validation digits per size")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = args.digits_checkpoint
        run = tmp / "digits"
        if ckpt is None:
            print("training a LeViT on the bundled digits (levit train --dataset digits) ...", file=sys.stderr)
            subprocess.run(
                [sys.executable, "-m", "levit", "train", "--dataset", "digits", "--output", str(run)], check=True
            )
            ckpt = run / "best.pth"
        val = (ckpt.parent / "digits" / "val") if (ckpt.parent / "digits" / "val").is_dir() else None
        if val is None:
            from levit.data.digits import make_digits_folder

            val = make_digits_folder(tmp / "digits_data") / "val"
        photos = {
            n: write_sample_jpegs(tmp / n, args.photos if n == "500x375" else args.big, s, seed=0)
            for n, s in SIZES.items()
        }

        speed = [(f"{len(f)} x {n}", decoder_speed(f, args.rounds)) for n, f in photos.items()]
        table("decode + preprocess to 224x224, CPU ms per image (one thread, median of interleaved rounds)", speed)

        from levit.weights.format import read_metadata

        meta = read_metadata(ckpt)
        digits_model = levit.create_model(meta["variant"] if meta else "levit_tiny", checkpoint=ckpt).eval()
        rows = []
        for n, s in SIZES.items():
            files, labels = digits_jpegs(
                val, tmp / f"digits_{n}", s, args.digits if n == "500x375" else args.digits // 4
            )
            rows.append((f"digits model, {len(files)} digits at {n}", compare(digits_model, files, labels)))
        torch.manual_seed(0)
        big_model = randomize_weights(levit.create_model("levit_128s")).eval()
        for n, f in photos.items():
            rows.append((f"LeViT-128S (randomised), {len(f)} photo-like at {n}", compare(big_model, f)))
        real = real_photos(tmp / "real")
        rows.append(
            (f"LeViT-128S (randomised), {len(real)} real photos (own size + 4032x3024)", compare(big_model, real))
        )
        table(
            "official vs --fast-decode: preprocessed tensor |difference| (normalised units) and top-1 agreement", rows
        )
    print("\ncommand: python benchmarks/fast_decode.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
