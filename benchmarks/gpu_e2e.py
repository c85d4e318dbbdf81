"""`levit predict` on a GPU host with each decoder, against timm's loader loop, in ONE run.

For each decoder of `levit.data.preprocess.Preprocess` (`pil`, `tensor`, `cuda`), side by side:

- decoding alone: images/s of the decoder's layout without the model (DataLoader processes on every
  core for `pil` and `tensor`, batched decoding on the device for `cuda`);
- `levit predict` end to end (levit.runtime.predict.predict_files writing JSON Lines, the fused model,
  the backend `auto` picks), with the GPU's utilisation sampled (nvidia-smi);
- the peer: timm's `inference.py` loop (create_loader + timm's LeViT-128S), the same files;

on photo-like 500x375 JPEGs and on 4032x3024 phone photos (benchmarks/predict_e2e.py writes them).

    python benchmarks/gpu_e2e.py                          # on a CUDA host: 3000 + 32 images
    python benchmarks/gpu_e2e.py --smoke --device cpu     # the script's logic, here, in seconds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # predict_e2e's helpers, beside this file
from predict_e2e import gpu_utilisation, images, timm_e2e

import levit
from levit.data.preprocess import ImageFiles, Preprocess, collate
from levit.runtime.options import PredictOptions
from levit.runtime.pipeline import available_cores
from levit.runtime.predict import build_runner, predict_files

DECODERS = ("pil", "tensor", "cuda")


def decode_rate(files: list[Path], decoder: str, device: str, batch: int) -> float:
    """Images/s of the decoder's layout without the model."""
    pre = Preprocess(224, decoder=decoder)
    t = time.perf_counter()
    if decoder == "cuda":
        for start in range(0, len(files), batch):
            x = pre.pixels_batch([str(f) for f in files[start : start + batch]], torch.device(device)).x
            pre.normalize(x)
        if device == "cuda":
            torch.cuda.synchronize()
    else:
        loader = torch.utils.data.DataLoader(
            ImageFiles(files, pre, pixels=True), batch_size=batch, num_workers=available_cores(), collate_fn=collate
        )
        sum(len(b.paths) for b in loader)
    return len(files) / (time.perf_counter() - t)


def levit_rate(model: torch.nn.Module, files: list[Path], opts: PredictOptions, runner) -> tuple[float, float]:
    """``levit predict``'s images/s with ``opts`` and the backend ``runner`` (built beforehand: its
    compilation is not the job), and the GPU's mean utilisation (%) meanwhile."""
    with gpu_utilisation(opts.device) as samples:
        s = predict_files(model, files, opts, runner=runner, progress=False)
    assert s.classified == len(files), s
    return len(files) / s.seconds, statistics.mean(samples) if samples else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--small", type=int, default=3000, help="500x375 JPEGs")
    ap.add_argument("--big", type=int, default=32, help="4032x3024 JPEGs")
    ap.add_argument("--smoke", action="store_true", help="a few images, one round: checks the script")
    ap.add_argument("--images", type=Path, default=Path(tempfile.gettempdir()) / "levit_predict_e2e")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here: run with --device cpu (and --smoke) to check the script")
    small, big = (24, 2) if args.smoke else (args.small, args.big)
    batch = 32 if args.device == "cpu" else 256
    model = levit.fuse(levit.create_model("levit_128s")).to(args.device)
    import timm

    peer = timm.create_model("levit_128s", pretrained=False).eval().to(args.device)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    # the backend levit predict --backend auto builds, once: its compilation is not the job
    runner = build_runner(model, PredictOptions(device=args.device, backend="auto", batch_size=batch))
    print("| images | decoder | decode alone img/s | levit predict img/s | GPU busy % | timm img/s | levit / timm |")
    print("|---|---|---|---|---|---|---|")
    for size, n in (("500x375", small), ("4032x3024", big)):
        if n == 0:
            continue
        files = images(args.images, size, n)
        timm = timm_e2e(files, peer, available_cores(), args.device, batch)
        for decoder in DECODERS:
            alone = decode_rate(files, decoder, args.device, batch)
            opts = PredictOptions(output=str(args.images / "gpu_e2e.jsonl"), overwrite=True, device=args.device)
            rate, busy = levit_rate(model, files, opts.replace(decoder=decoder), runner)
            print(
                f"| {n} x {size} | {decoder} | {alone:.1f} | {rate:.1f} | {busy:.0f} | {timm:.1f} | {rate / timm:.2f}x |"
            )
    print(
        f"\n{name}, {available_cores()} cores, torch {torch.__version__}; command: python benchmarks/gpu_e2e.py"
        + (" --smoke" if args.smoke else "")
        + f" --device {args.device}"
    )


if __name__ == "__main__":
    main()
