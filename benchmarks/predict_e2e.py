"""`levit predict` end to end against its parts, its CPU-time limit and timm's loader loop, in ONE run.

Photo-like JPEGs at ImageNet's typical 500x375 and at phone size (4032x3024) are written once
(tests/helpers.py's write_sample_jpegs), then, side by side on the same machine:

- decode + preprocess alone: CPU seconds per image (one process, one thread) and images/s on all
  cores (DataLoader workers, as the pipeline runs them);
- the model alone: CPU seconds per image (one thread, batch 32) and images/s with the pipeline's
  layout (one-thread lanes on every core, or the backend's own threads);
- `levit predict` end to end (levit.runtime.predict.predict_files writing JSON Lines; model built first,
  worker start-up included), quiet and once more with one CPU-bound competitor process running;
- the peer: timm's `inference.py` loop (timm.data.create_loader + timm's LeViT-128S, top-k of every
  batch), quiet and with the competitor.

The CPU-time limit is `cores / (decode-and-preprocess CPU s per image + model CPU s per image)`:
no pipeline on this machine can beat it. End-to-end rates are medians over interleaved rounds.

    python benchmarks/predict_e2e.py                                   # 600 + 24 images, 3 rounds
    python benchmarks/predict_e2e.py --small 200 --big 6 --rounds 1    # a short run
    python benchmarks/predict_e2e.py --backend openvino                # another backend
    python benchmarks/predict_e2e.py --device cuda                     # the model on a GPU (no competitor runs)
    python benchmarks/predict_e2e.py --memory 1000,20000               # peak RSS of `levit predict` on N images
    python benchmarks/predict_e2e.py --layouts --big 0 --no-timm --no-competitor   # lanes vs decoding processes
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import levit
from levit.data.preprocess import ImageFiles, Preprocess, collate
from levit.runtime.deploy import deploy_lanes
from levit.runtime.options import PredictOptions
from levit.runtime.pipeline import available_cores, lane_layout, plan
from levit.runtime.predict import predict_files

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' helpers (test support)
from helpers import randomize_weights, sample_images, write_sample_jpegs

SIZES = {"500x375": (375, 500), "4032x3024": (3024, 4032)}


def images(root: Path, name: str, n: int, repeat: int = 1) -> list[Path]:
    """``n`` photo-like JPEGs of size ``name`` under ``root`` (reused when already there); with
    ``repeat`` > 1, ``n * repeat`` distinct files hard-linked to them (a GPU needs more images)."""
    folder = root / f"{name}_{n}"
    files = sorted(folder.glob("*.jpg")) if folder.is_dir() else []
    if len(files) != n:
        shutil.rmtree(folder, ignore_errors=True)
        print(f"writing {n} photo-like {name} JPEGs to {folder} ...", file=sys.stderr, flush=True)
        files = write_sample_jpegs(folder, n, SIZES[name], seed=0)
    return files if repeat <= 1 else links(root / f"{name}_{n}_x{repeat}", files, n * repeat)


def links(folder: Path, files: list[Path], n: int) -> list[Path]:
    """``n`` hard links in ``folder`` to ``files`` in turn: distinct files at the disk cost of ``files``."""
    if not folder.is_dir() or len(list(folder.iterdir())) != n:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for i in range(n):
            os.link(files[i % len(files)], folder / f"{i:06d}.jpg")
    return sorted(folder.iterdir())


@contextlib.contextmanager
def competitor(on: bool) -> Iterator[None]:
    """One CPU-bound process running alongside the block (another job on the machine)."""
    if not on:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        yield
    finally:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def gpu_utilisation(device: str) -> Iterator[list[float]]:
    """Samples of nvidia-smi's GPU utilisation (%) every 0.2 s during the block (empty off CUDA)."""
    samples: list[float] = []
    if device != "cuda" or shutil.which("nvidia-smi") is None:
        yield samples
        return
    stop = threading.Event()
    index = str(torch.cuda.current_device())

    def poll() -> None:
        while not stop.wait(0.2):
            out = subprocess.run(
                ["nvidia-smi", "-i", index, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
            ).stdout.strip()
            with contextlib.suppress(ValueError):
                samples.append(float(out))

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    try:
        yield samples
    finally:
        stop.set()
        t.join()


def decode_cpu_s(files: list[Path], pre: Preprocess) -> float:
    """CPU seconds per image to decode + preprocess, one process on one thread."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pre(files[0])
        t = time.process_time()
        for f in files:
            pre(f)
        return (time.process_time() - t) / len(files)
    finally:
        torch.set_num_threads(prev)


def decode_rate(files: list[Path], pre: Preprocess, workers: int) -> float:
    """Images/s decoded + preprocessed by ``workers`` DataLoader processes (the pipeline's decoding alone)."""
    workers, batch = plan(files, 32, workers)  # as levit predict splits the job
    loader = torch.utils.data.DataLoader(
        ImageFiles(files, pre), batch_size=batch, num_workers=workers, collate_fn=collate
    )
    t = time.perf_counter()
    n = sum(len(b.paths) for b in loader)
    return n / (time.perf_counter() - t)


def model_runner(model: torch.nn.Module, backend: str, device: str, batch: int, lanes: int = 1):
    """The model as `levit predict` runs it: the fused eager model, or ``lanes`` one-thread copies of
    another backend on the CPU (a list), or one copy on its own threads."""
    if backend == "eager":
        return levit.fuse(model).to(device).eval()
    if device == "cpu" and lanes > 1:
        copies, threads = lane_layout(None, None, lanes)  # as levit predict builds them
        return deploy_lanes(model, copies, threads=threads, backend=backend, batch_size=batch)
    return levit.deploy(model.to(device), backend=backend, batch_size=batch)


def model_cpu_s(run: Callable, x: torch.Tensor, calls: int) -> float:
    """CPU seconds per image of the model on one thread (batch ``x``)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            run(x)
            t = time.process_time()
            for _ in range(calls):
                run(x)
        return (time.process_time() - t) / (calls * x.shape[0])
    finally:
        torch.set_num_threads(prev)


def model_rate(runs: list[Callable], x: torch.Tensor, calls: int, device: str) -> float:
    """Images/s of the model alone as the pipeline runs it: one one-thread lane per entry of ``runs``
    (one entry: the backend's own threads)."""
    x = x.to(device)
    lanes = len(runs)
    free = list(runs)

    def work(n: int) -> None:
        run = free.pop()
        try:
            with torch.inference_mode():
                for _ in range(n):
                    run(x).float().cpu()
        finally:
            free.append(run)

    prev = torch.get_num_threads()
    if lanes > 1:
        torch.set_num_threads(1)
    try:
        work(1)
        t = time.perf_counter()
        if lanes > 1:
            with ThreadPoolExecutor(lanes) as pool:
                list(pool.map(work, [max(1, calls // lanes)] * lanes))
            done = max(1, calls // lanes) * lanes
        else:
            work(calls)
            done = calls
        return done * x.shape[0] / (time.perf_counter() - t)
    finally:
        torch.set_num_threads(prev)


def cpu_seconds() -> float:
    """CPU seconds used so far by this process and its reaped children (the decoding workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def levit_e2e(model, files, pre, out: Path, runner, device: str, batch: int, workers: int | None = None) -> float:
    options = PredictOptions(
        output=str(out),
        overwrite=True,
        batch_size=batch,
        crop_pct=pre.crop_pct,
        fast_decode=pre.fast_decode,
        max_pixels=pre.max_pixels,
        device=device,
        workers=workers,
    )
    s = predict_files(model, files, options, runner=runner, progress=False)
    assert s.classified == len(files), s
    return len(files) / s.seconds


def timm_e2e(files: list[Path], timm_model, workers: int, device: str, batch: int, k: int = 5) -> float:
    """timm's inference.py loop: ImageDataset + create_loader (bicubic, crop 0.875) + model + top-k."""
    import timm.data

    folder = files[0].parent
    ds = timm.data.ImageDataset(str(folder))
    loader = timm.data.create_loader(
        ds,
        input_size=(3, 224, 224),
        batch_size=batch,
        use_prefetcher=False,
        interpolation="bicubic",
        crop_pct=0.875,
        num_workers=workers,
        persistent_workers=False,
        pin_memory=device == "cuda",
        device=torch.device(device),
    )
    t = time.perf_counter()
    n, results = 0, []
    with torch.no_grad():
        for x, _ in loader:
            logits = timm_model(x.to(device, non_blocking=True))
            p, i = logits.softmax(-1).topk(k)
            results += list(zip(p.cpu().tolist(), i.cpu().tolist()))
            n += x.shape[0]
    assert n == len(files), (n, len(files))
    return n / (time.perf_counter() - t)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def peak_rss(args: argparse.Namespace, root: Path) -> None:
    """Peak RSS (MiB) of a `levit predict --output` process on N small images, N from --memory."""
    counts = [int(c) for c in args.memory.split(",")]
    base = images(root, "500x375", min(args.small, max(counts)))
    print(f"peak RSS of `levit predict` ({args.model}, eager, --output .jsonl), its largest process:")
    for n in counts:
        folder = links(root / f"links_{n}", base, n)[0].parent
        out = root / f"rss_{n}.jsonl"
        cmd = [sys.executable, "-m", "levit", "predict", str(folder), "-m", args.model, "--output", str(out)]
        probe = (
            "import resource, subprocess, sys\n"
            "subprocess.run(sys.argv[1:], check=True, stderr=subprocess.DEVNULL)\n"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        )
        t = time.perf_counter()
        kib = int(
            subprocess.run(
                [sys.executable, "-c", probe, *cmd, "--overwrite"], capture_output=True, text=True, check=True
            ).stdout
        )
        print(f"  {n:>7,} images: {kib / 1024:8.1f} MiB   ({time.perf_counter() - t:.0f} s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", type=int, default=600, help="500x375 JPEGs")
    ap.add_argument("--big", type=int, default=24, help="4032x3024 JPEGs")
    ap.add_argument("--model", default="levit_128s")
    ap.add_argument("--backend", default="eager", help="eager, openvino, onnxruntime, ... (levit.deploy)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=None, help="default: 32 on CPU, 256 on GPU")
    ap.add_argument("--repeat", type=int, default=1, help="classify each 500x375 image this many times (hard links)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved end-to-end rounds (median)")
    ap.add_argument("--no-timm", action="store_true", help="skip the timm peer")
    ap.add_argument("--no-competitor", action="store_true", help="skip the runs with a CPU-bound competitor")
    ap.add_argument(
        "--layouts",
        action="store_true",
        help="also run the layout before the lanes decoded their own batches, in the same rounds: decoding "
        "processes (one per core) beside the model lanes, or one runtime on all threads for other backends",
    )
    ap.add_argument("--images", type=Path, default=Path(tempfile.gettempdir()) / "levit_predict_e2e")
    ap.add_argument("--memory", help="only measure peak RSS on these image counts, e.g. 1000,20000")
    args = ap.parse_args()
    args.images.mkdir(parents=True, exist_ok=True)
    if args.memory:
        peak_rss(args, args.images)
        return
    cores = available_cores()
    dev = args.device
    batch = args.batch or (32 if dev == "cpu" else 256)
    competitor_runs = not args.no_competitor and dev == "cpu"
    model = randomize_weights(levit.create_model(args.model)).eval()
    lanes = cores if dev == "cpu" else 1
    runner = None if args.backend == "eager" else model_runner(model, args.backend, dev, batch, lanes)
    run = runner or model_runner(model, "eager", dev, batch)
    runs = runner if isinstance(runner, list) else [run] * lanes if runner is None else [run]
    lanes = len(runs)
    run = runs[0]
    fused = levit.fuse(model).to(dev)  # fused once, not in every timed run
    # --layouts: the previous layout (decoding processes; one copy of another backend on all threads)
    old_runner = None if args.backend == "eager" else model_runner(model, args.backend, dev, batch)
    timm_model = None
    if not args.no_timm:
        import timm

        timm_model = timm.create_model(args.model, pretrained=False).eval().to(dev)
    x = sample_images(batch, 224)
    m_cpu = model_cpu_s(run, x, 3) if dev == "cpu" else float("nan")
    m_rate = model_rate(runs, x, max(4, 2 * lanes), dev)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "preds.jsonl"
        for name, n in (("500x375", args.small), ("4032x3024", args.big)):
            if n <= 0:
                continue
            files = images(args.images, name, n, args.repeat if name == "500x375" else 1)
            for fast in (False, True) if name == "4032x3024" else (False,):
                pre = Preprocess(224, fast_decode=fast)
                d_cpu = decode_cpu_s(files[: min(len(files), 100)], pre)
                d_rate = decode_rate(files, pre, cores)
                limit = cores / (d_cpu + m_cpu) if dev == "cpu" else float("nan")
                res: dict[str, list[float]] = {}
                gpu: list[float] = []
                for r in range(args.rounds):
                    order = [("levit", False), ("timm", False), ("levit", True), ("timm", True)]
                    order += [("processes", False)] if args.layouts and dev == "cpu" else []
                    for who, busy in order if r % 2 == 0 else order[::-1]:
                        if (busy and not competitor_runs) or (who == "timm" and (timm_model is None or fast)):
                            continue
                        with competitor(busy), gpu_utilisation(dev) as util:
                            c0 = cpu_seconds()
                            if who == "levit":
                                v = levit_e2e(fused, files, pre, out, runner, dev, batch)
                            elif who == "processes":
                                v = levit_e2e(fused, files, pre, out, old_runner, dev, batch, workers=cores)
                            else:
                                v = timm_e2e(files, timm_model, cores, dev, batch)
                            cpu = (cpu_seconds() - c0) / len(files)  # the competitor is not reaped yet
                        key = f"{who}{'_busy' if busy else ''}"
                        res.setdefault(key, []).append(v)
                        res.setdefault(f"{key}_cpu", []).append(cpu * 1e3)
                        if who == "levit" and not busy:
                            gpu += util
                        print(
                            f"  {name}{' fast' if fast else ''} round {r + 1}: {who}{' +competitor' if busy else ''} "
                            f"{v:.1f} img/s",
                            file=sys.stderr,
                            flush=True,
                        )
                med = {k: median(v) for k, v in res.items()}
                rows.append(
                    {
                        "images": f"{len(files)} x {name}" + (" --fast-decode" if fast else ""),
                        "decode ms": d_cpu * 1e3,
                        "model ms": m_cpu * 1e3,
                        "limit": limit,
                        "one-core": 1 / (d_cpu + m_cpu) if dev == "cpu" else float("nan"),
                        "decode/s": d_rate,
                        "model/s": m_rate,
                        **med,
                        "gpu %": statistics.mean(gpu) if gpu else float("nan"),
                    }
                )
    print_table(rows, args, cores, batch, lanes)


def print_table(rows: list[dict], args: argparse.Namespace, cores: int, batch: int, lanes: int) -> None:
    def f(v: float | None, fmt: str = "{:.1f}") -> str:
        return "-" if v is None or v != v else fmt.format(v)

    print()
    print(
        f"`levit predict` end to end: {args.model}, {args.backend}, fp32, {args.device}, batch {batch}, "
        f"{cores} cores ({lanes} model lane(s)), torch {torch.__version__}"
    )
    print("command: python benchmarks/predict_e2e.py " + " ".join(sys.argv[1:]))
    head = [
        "images",
        "decode+pre CPU ms/img",
        "model CPU ms/img",
        "CPU-time limit img/s",
        "decode alone img/s",
        "model alone img/s",
        "levit img/s",
        "% of limit",
        "levit busy img/s",
        "busy/quiet",
        "timm img/s",
        "timm busy img/s",
        "levit/timm",
        "levit/timm busy",
        "CPU ms/img: levit, busy",
        "timm, busy",
    ]
    if args.device == "cuda":
        head.append("GPU util %")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        lv, lb, tq, tb = (r.get(k) for k in ("levit", "levit_busy", "timm", "timm_busy"))
        cells = [
            r["images"],
            f(r["decode ms"]),
            f(r["model ms"]),
            f(r["limit"]),
            f(r["decode/s"]),
            f(r["model/s"]),
            f(lv),
            f(lv / r["limit"] * 100 if lv else None, "{:.0f}%"),
            f(lb),
            f(lb / lv if lb and lv else None, "{:.2f}"),
            f(tq),
            f(tb),
            f(lv / tq if lv and tq else None, "{:.2f}x"),
            f(lb / tb if lb and tb else None, "{:.2f}x"),
            f"{f(r.get('levit_cpu'))}, {f(r.get('levit_busy_cpu'))}",
            f"{f(r.get('timm_cpu'))}, {f(r.get('timm_busy_cpu'))}",
        ]
        if args.device == "cuda":
            cells.append(f(r["gpu %"], "{:.0f}"))
        print("| " + " | ".join(cells) + " |")
    print()
    print(
        f"CPU-time limit = cores / (decode+preprocess CPU s/img + model CPU s/img), cores = {cores}; each term is "
        "measured alone in this run on one thread. busy: one CPU-bound competitor process running alongside.\n"
        "CPU ms/img: all the CPU an end-to-end run used (its process and its workers) per image; what it spends "
        "beyond decode+pre + model is overhead (threads waiting on one another, copies)."
    )
    for r in rows:
        if r.get("processes"):
            print(
                f"{r['images']}: lanes decoding {r['levit']:.1f} img/s ({r['levit_cpu']:.1f} CPU ms/img) against "
                f"decoding processes {r['processes']:.1f} ({r['processes_cpu']:.1f}): {r['levit'] / r['processes']:.2f}x"
            )
    for r in rows:
        if "4032x3024" in r["images"] and "fast" not in r["images"] and r["one-core"] == r["one-core"]:
            print(
                f"4032x3024, full decode + model on one core: {r['one-core']:.1f} img/s (3x: {3 * r['one-core']:.1f})"
            )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"(this benchmark process peaked at {rss:.0f} MiB RSS)")


if __name__ == "__main__":
    main()
