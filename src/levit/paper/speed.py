"""The paper's speed protocol (Table 3, Figure 1) on this machine: LeViT against EfficientNet and DeiT.

CPU (the paper's Intel column): one thread, batch 16, fp32, 224x224 (competitors at their native
resolution). GPU: fp16, the largest power-of-two batch that fits (found by an out-of-memory-safe
search); with ``backend="auto"`` this library's LeViT runs its fastest path for the batch (CUDA
graphs or inductor, named in the row) and timm's models run eager. Several batch sizes in one run
(``batch_size=[1, 64, 1024]``) give latency and throughput side by side. Each model is warmed up,
then timed over several windows; a row reports the median throughput with the min and max over the
windows. Competitors are timm models built with
``pretrained=False`` (speed does not depend on the weights; nothing is downloaded).

>>> rows = benchmark(["levit_128s", "timm_levit_128s"], threads=1, batch_size=16)
>>> print(format_table(rows))

``levit bench`` asks for a :class:`SpeedRun` (the flags as given), which :meth:`SpeedRun.resolved`
completes with the protocol's defaults for the device, and runs it with :func:`run_speed_table`.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import platform
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LeViTError
from ..utils import atomic_path, num_threads, process_memory, save_figure
from .accuracy import FIELD_ACCURACY, MODERN_MODELS, MODERN_QUICK_MODELS
from .timing import cuda_sync, timed_window, warm_up

__all__ = [
    "BENCH_MODELS",
    "QUICK_MODELS",
    "SUITES",
    "BenchModel",
    "SpeedProtocol",
    "SpeedRun",
    "bench_inference_form",
    "bench_size",
    "benchmark",
    "benchmark_one",
    "build_bench_model",
    "device_name",
    "find_max_batch",
    "format_bench_models",
    "format_table",
    "list_bench_models",
    "parse_batch_sizes",
    "plot_rows",
    "plot_target",
    "run_speed_table",
    "speedup_summary",
    "write_rows",
]


@dataclass(frozen=True)
class BenchModel:
    """A model the benchmark knows: how to build it, its family and the paper's top-1."""

    name: str
    family: str  # line in the plot
    implementation: str  # "levit" (this library, fused), "timm", "timm+reparam"
    source: str  # levit variant or timm model name
    img_size: int
    top1: float | None  # ImageNet-1k top-1 from the paper's Table 3
    ablation: str | None = None  # a Table 5 row ("A1".."A7") of a levit variant


def _entries() -> dict[str, BenchModel]:
    from ..models.config import PAPER_RESULTS, VARIANTS

    out: dict[str, BenchModel] = {}
    for v in VARIANTS:
        top1 = PAPER_RESULTS[v].top1 if v in PAPER_RESULTS else None
        out[v] = BenchModel(v, "LeViT (levit)", "levit", v, 224, top1)
        if v in PAPER_RESULTS:
            out[f"timm_{v}"] = BenchModel(f"timm_{v}", "LeViT (timm)", "timm", v, 224, top1)
            out[f"timm_{v}_reparam"] = BenchModel(
                f"timm_{v}_reparam", "LeViT (timm, reparameterized)", "timm+reparam", v, 224, top1
            )
    for b, (res, top1) in enumerate([(224, 77.1), (240, 79.1), (260, 80.1), (300, 81.6), (380, 82.9)]):
        out[f"efficientnet_b{b}"] = BenchModel(
            f"efficientnet_b{b}", "EfficientNet", "timm", f"efficientnet_b{b}", res, top1
        )
    for a in ("A1", "A2", "A3", "A5", "A6", "A7"):  # the paper's Table 5 (A4 is the base model)
        out[f"levit_128s_{a.lower()}"] = BenchModel(
            f"levit_128s_{a.lower()}", "LeViT-128S ablations", "levit", "levit_128s", 224, None, a
        )
    out["deit_tiny"] = BenchModel("deit_tiny", "DeiT", "timm", "deit_tiny_patch16_224", 224, 76.6)
    out["deit_small"] = BenchModel("deit_small", "DeiT", "timm", "deit_small_patch16_224", 224, 82.6)
    for name, acc in FIELD_ACCURACY.items():  # today's peers (the modern suite), each in its best form
        if name not in out and acc.timm_model:
            out[name] = BenchModel(name, acc.family, "timm+reparam", acc.timm_model, acc.img_size, acc.top1)
    return out


BENCH_MODELS: dict[str, BenchModel] = _entries()
# the full run: Table 3 (every LeViT, ours and timm's, every competitor)
DEFAULT_MODELS: tuple[str, ...] = (
    *(f"levit_{v}" for v in ("128s", "128", "192", "256", "384")),
    *(f"timm_levit_{v}" for v in ("128s", "128", "192", "256", "384")),
    *(f"efficientnet_b{b}" for b in range(5)),
    "deit_tiny",
    "deit_small",
)
# `levit bench --quick`: a few models of each family, so that a first comparison is a short run on a small
# machine (how long it takes here is in docs/speed.md, beside the command)
QUICK_MODELS: tuple[str, ...] = (
    "levit_128s",
    "levit_192",
    "levit_256",
    "timm_levit_128s",
    "timm_levit_256",
    "efficientnet_b0",
    "efficientnet_b2",
    "deit_tiny",
)


def list_bench_models() -> list[str]:
    """Names :func:`benchmark` accepts."""
    return list(BENCH_MODELS)


def format_bench_models() -> str:
    """One line per model :func:`benchmark` knows: name, family, native resolution, the paper's top-1."""
    return "\n".join(
        f"{name:<26} {e.family:<30} {e.img_size}px  top-1 {e.top1 if e.top1 else '-'}"
        for name, e in BENCH_MODELS.items()
    )


def device_name(device: str | torch.device = "cpu") -> str:
    """A human-readable name of the CPU model or the GPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# ---- memory --------------------------------------------------------------------------------------
def _reset_peak_rss() -> bool:
    with contextlib.suppress(OSError, AttributeError):  # hand freed heap back, so RSS shows this model only
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)
        return True
    except OSError:
        return False


# ---- building ----------------------------------------------------------------------------------
def _flops_of(module: nn.Module, img_size: int) -> int:
    """Multiply-adds of one image, counted by PyTorch's FLOP counter (matmuls and convs)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        module(torch.zeros(1, 3, img_size, img_size))
    return fc.get_total_flops() // 2


def build_bench_model(entry: BenchModel, img_size: int | None = None) -> tuple[nn.Module, int]:
    """``entry``'s model as built, before any fusion (eval mode, random weights), and its resolution.

    This library's LeViT comes from :func:`levit.create_model`; the peers from timm with
    ``pretrained=False`` (nothing is downloaded).
    """
    from ..factory.create import create_model

    res = img_size or entry.img_size
    if entry.implementation == "levit":
        return create_model(entry.source, img_size=res, ablation=entry.ablation).eval(), res
    try:
        import timm
    except ImportError as e:  # pragma: no cover - timm is a dependency
        raise LeViTError("the competitors need timm: pip install timm") from e
    kwargs = {"img_size": res} if img_size and entry.source.startswith(("levit", "deit")) else {}
    return timm.create_model(entry.source, pretrained=False, **kwargs).eval(), res


def bench_inference_form(entry: BenchModel, model: nn.Module) -> nn.Module:
    """The module ``entry`` is timed as: this library's fused LeViT, timm's ``reparameterize_model``
    (a new module; branches merged, BN folded where the model knows how) for ``timm+reparam``, else
    ``model`` itself."""
    if entry.implementation == "levit":
        from ..models.fuse import inference_form

        return inference_form(model)
    if entry.implementation == "timm+reparam":
        from timm.utils.model import reparameterize_model

        return reparameterize_model(model)
    return model


def bench_size(entry: BenchModel, model: nn.Module, res: int) -> tuple[int, int]:
    """(params, FLOPs per image) of ``model`` as built: LeViT's in the paper's convention, the
    others' multiply-adds by PyTorch's FLOP counter."""
    from ..models.config import VARIANTS
    from ..models.flops import count_flops, count_params

    if entry.implementation == "levit":
        return count_params(model), count_flops(model)
    params = sum(p.numel() for p in model.parameters())
    if entry.source in VARIANTS and res == 224:
        return params, count_flops(entry.source)
    return params, _flops_of(model, res)


def _build(entry: BenchModel, img_size: int | None) -> tuple[nn.Module, int, int, int]:
    """(inference module, params, FLOPs per image, resolution)."""
    model, res = build_bench_model(entry, img_size)
    params, flops = bench_size(entry, model, res)
    return bench_inference_form(entry, model), params, flops, res


# ---- timing ------------------------------------------------------------------------------------
def _timed_windows(
    run: Callable[[], object], device: torch.device, warmup_s: float, windows: int, window_s: float
) -> list[float]:
    """Seconds per call in each window, after ``warmup_s`` of warm-up (always >= 2 calls)."""
    sync = cuda_sync(device)
    warm_up(run, warmup_s, sync=sync)
    return [timed_window(run, window_s, sync=sync) for _ in range(windows)]


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def find_max_batch(try_batch: Callable[[int], object], start: int = 1, limit: int = 4096) -> int:
    """The largest power of two ``b`` in [start, limit] for which ``try_batch(b)`` runs without OOM.

    Doubles until an out-of-memory error (caught; the CUDA cache is emptied) or ``limit``.
    """
    best, b = 0, start
    while b <= limit:
        try:
            try_batch(b)
            best = b
        except (RuntimeError, torch.OutOfMemoryError) as e:
            if not _is_oom(e):
                raise
            break
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        b *= 2
    if best == 0:
        raise LeViTError(f"not even batch {start} fits in memory")
    return best


@dataclass(frozen=True)
class SpeedProtocol:
    """How :func:`benchmark_one` times a model. The defaults are the paper's CPU protocol (fp32, batch
    16, one thread); on a GPU the precision defaults to fp16 and the batch to the largest power of two
    that fits."""

    backend: str = "eager"  # this library's LeViT (fused first); timm's models too when backend_for_competitors
    precision: str | None = None  # None: fp32 on CPU, fp16 on GPU
    device: str = "cpu"
    batch_size: int | None = None  # None: 16 on CPU, the largest fitting power of two on GPU
    threads: int | None = 1  # CPU threads (ignored on a GPU)
    img_size: int | None = None  # None: each model's native resolution
    warmup_s: float = 5.0
    windows: int = 5
    window_s: float = 3.0
    backend_for_competitors: bool = True  # else timm's models run eager


def benchmark_one(name: str, protocol: SpeedProtocol | None = None, **settings: Any) -> dict:
    """Time one model (a name from :func:`list_bench_models`) and return its row.

    ``settings`` are :class:`SpeedProtocol` fields that override ``protocol`` (or its defaults), so
    ``benchmark_one("levit_128s", batch_size=1)`` reads as the protocol with one change.
    """
    p = replace(protocol or SpeedProtocol(), **settings)
    if name not in BENCH_MODELS:
        raise LeViTError(f"unknown benchmark model {name!r}; valid: {', '.join(BENCH_MODELS)}")
    entry = BENCH_MODELS[name]
    device = torch.device(p.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LeViTError("--device cuda: no CUDA GPU is available")
    precision = p.precision or ("fp16" if device.type == "cuda" else "fp32")
    be = p.backend if (entry.implementation == "levit" or p.backend_for_competitors) else "eager"
    if be == "auto" and device.type != "cpu" and entry.implementation != "levit":
        be = "eager"  # on a GPU the peers run in their best eager form (fp16/bf16 weights, no compiler)
    with num_threads(p.threads if device.type == "cpu" else None):
        return _measure(entry, name, replace(p, backend=be, precision=precision), device)


def _measure(entry: BenchModel, name: str, p: SpeedProtocol, device: torch.device) -> dict:
    from ..runtime.deploy import build_runner, resolve

    be, precision, batch_size, img_size = p.backend, p.precision, p.batch_size, p.img_size
    threads = p.threads
    peak_ok = device.type == "cpu" and _reset_peak_rss()
    rss0 = process_memory("VmRSS")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_gpu = torch.cuda.memory_allocated(device)
    module, params, flops, res = _build(entry, img_size)
    module = module.to(device)

    def make_runner(b: int, backend: str) -> Callable[[], object]:
        x = torch.randn(b, 3, res, res, device=device)
        run = build_runner(module, backend, precision, example=x, threads=threads if device.type == "cpu" else None)
        return lambda: run(x)

    if batch_size is None:
        if device.type == "cuda":

            def try_batch(b: int) -> None:  # eager holds the most activations: what fits there fits everywhere
                r = make_runner(b, "eager")
                warm_up(r, sync=cuda_sync(device))

            batch_size = find_max_batch(try_batch)
        else:
            batch_size = 16
    be, precision = resolve(be, precision, device, batch_size)  # auto: this batch's fastest path
    runner = make_runner(batch_size, be)
    per_call = _timed_windows(runner, device, p.warmup_s, p.windows, p.window_s)
    rates = [batch_size / t for t in per_call]
    if device.type == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated(device) - base_gpu) / 2**20
    else:
        hwm = process_memory("VmHWM") if peak_ok else None
        peak_mb = (hwm - rss0) / 2**20 if (hwm is not None and rss0 is not None) else None
    import timm

    return {
        "model": name,
        "family": entry.family,
        "implementation": entry.implementation,
        "backend": be,
        "precision": precision,
        "device": device_name(device),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "batch": batch_size,
        "threads": threads if device.type == "cpu" else None,
        "img_size": res,
        "img_s": statistics.median(rates),
        "img_s_min": min(rates),
        "img_s_max": max(rates),
        "ms_batch": statistics.median(per_call) * 1000,
        "params": params,
        "flops": flops,
        "peak_mem_mb": round(peak_mb, 1) if peak_mb is not None else None,
        "top1_paper": entry.top1,
    }


def parse_batch_sizes(text: str) -> list[int]:
    """``"1,64,1024"`` -> ``[1, 64, 1024]`` (order kept, duplicates dropped); raises on anything else."""
    parts = [p.strip() for p in str(text).split(",")]
    if not parts or any(not p for p in parts):
        raise LeViTError(f"batch sizes must be comma-separated positive integers like 1,64,1024, got {text!r}")
    out: list[int] = []
    for p in parts:
        try:
            b = int(p)
        except ValueError:
            raise LeViTError(f"batch sizes must be positive integers like 1,64,1024, got {p!r} in {text!r}") from None
        if b < 1:
            raise LeViTError(f"batch sizes must be >= 1, got {b} in {text!r}")
        if b not in out:
            out.append(b)
    return out


def benchmark(
    models: Sequence[str] = DEFAULT_MODELS,
    protocol: SpeedProtocol | None = None,
    *,
    batch_size: int | Sequence[int] | None = None,
    progress: Callable[[int, int, str, dict | None], None] | None = None,
    **settings: Any,
) -> list[dict]:
    """Rows of :func:`benchmark_one` for each name in ``models``, timed by ``protocol`` with
    ``settings`` (its fields) changed.

    ``batch_size`` may be a list: every model is timed at each batch (batch-major order, so the
    models compared at one batch run one after the other). ``progress(i, n, name, row)`` is called
    before (``row`` None) and after each (model, batch).
    """
    unknown = [m for m in models if m not in BENCH_MODELS]
    if unknown:
        raise LeViTError(f"unknown benchmark model(s) {', '.join(unknown)}; valid: {', '.join(BENCH_MODELS)}")
    batches: list[int | None] = list(batch_size) if isinstance(batch_size, Sequence) else [batch_size]
    if not batches:
        raise LeViTError("batch_size: give at least one batch size")
    protocol = replace(protocol or SpeedProtocol(), **settings)
    jobs = [(name, b) for b in batches for name in models]
    rows = []
    for i, (name, b) in enumerate(jobs):
        if progress:
            progress(i, len(jobs), name, None)
        row = benchmark_one(name, protocol, batch_size=b)
        rows.append(row)
        if progress:
            progress(i, len(jobs), name, row)
    return rows


# the model sets `levit bench --suite` runs: the paper's Table 3, or LeViT against today's field
# (levit.paper.field: each model in its best inference form, top-1 from a cited source)
SUITES: tuple[str, ...] = ("paper", "modern")
# the runtimes the modern suite may pick each model's fastest form from (fp32, checked against eager);
# executorch only when asked for: the phone-class protocol (XNNPACK, fixed batch)
MODERN_BACKENDS: tuple[str, ...] = ("auto", "eager", "openvino", "onnxruntime", "executorch")


@dataclass(frozen=True)
class SpeedRun:
    """One ``levit bench`` run as asked for, ``None`` meaning "the default"; :meth:`resolved` fills in
    the defaults of the paper's protocol for the device and refuses what cannot run.

    ``suite="modern"`` times the models of :data:`levit.paper.accuracy.MODERN_MODELS` by
    :func:`levit.paper.field.run_field` (:func:`levit.paper.bench.run_bench` runs either suite): there ``backend`` ``auto`` (the default) means the fastest
    of eager, OpenVINO and ONNX Runtime that gives the eager form's logits, ``warmup_s`` is the trial
    window of each form, and ``windows`` the number of interleaved rounds."""

    models: tuple[str, ...] | None = None  # None: the suite's models (fewer with ``quick``)
    quick: bool = False  # fewer models, a shorter warm-up and shorter windows
    device: str = "cpu"
    backend: str | None = None  # None: eager on CPU (the paper's protocol); on GPU auto for levit, timm eager
    precision: str | None = None  # None: fp32 on CPU, fp16 on GPU
    batch_sizes: tuple[int, ...] | None = None  # None: 16 on CPU, the largest fitting power of two on GPU
    threads: int | None = 1  # CPU threads
    img_size: int | None = None  # None: each model's native resolution
    warmup_s: float | None = None  # None: 5 s (quick: 1 s); modern: the trial window, 0.5 s
    windows: int | None = None  # None: 5 (quick: 3)
    window_s: float | None = None  # None: 3 s (quick: 1 s); modern: 1.5 s (quick: 0.5 s)
    suite: str = "paper"

    def _check_modern(self, backend: str | None, precision: str | None) -> None:
        if self.device != "cpu":
            raise LeViTError("--suite modern runs on the CPU for now: drop --device cuda")
        if precision not in (None, "fp32"):
            raise LeViTError("--suite modern compares fp32 forms only: drop --precision")
        if backend not in (None, *MODERN_BACKENDS):
            raise LeViTError(f"--suite modern: --backend must be one of {', '.join(MODERN_BACKENDS)}")
        if self.batch_sizes and len(self.batch_sizes) > 1:
            raise LeViTError("--suite modern: one batch size per run (each protocol is its own picture)")

    def resolved(self) -> SpeedRun:
        """Every default filled in; raises :class:`~levit.errors.LeViTError` naming the flag at fault
        for an unknown model, a missing GPU, or a backend/precision/device that cannot run together
        (int8 needs calibration images, which a speed table does not take)."""
        from ..runtime.deploy import check_backend

        if self.suite not in SUITES:
            raise LeViTError(f"--suite: unknown {self.suite!r}; choose from {', '.join(SUITES)}")
        modern = self.suite == "modern"
        if modern:
            self._check_modern(self.backend, self.precision)
        quick_models, all_models = (MODERN_QUICK_MODELS, MODERN_MODELS) if modern else (QUICK_MODELS, DEFAULT_MODELS)
        models = self.models if self.models is not None else (quick_models if self.quick else all_models)
        if not models:
            raise LeViTError("--models: no model named; give comma-separated names (see `levit bench --list`)")
        unknown = [m for m in models if m not in BENCH_MODELS]
        if unknown:
            raise LeViTError(f"--models: unknown {', '.join(unknown)}; see `levit bench --list`")
        gpu = self.device == "cuda"
        if gpu and not torch.cuda.is_available():
            raise LeViTError("--device cuda: no CUDA GPU is available here")
        precision = self.precision or ("fp16" if gpu else "fp32")
        backend = self.backend or ("auto" if gpu or modern else "eager")
        try:
            check_backend(backend, precision)
        except ValueError as e:
            raise LeViTError(f"--backend/--precision: {e}") from e
        if precision == "int8":
            raise LeViTError("--precision int8 needs calibration images: use `levit predict` or levit.deploy()")
        if not gpu and backend == "cudagraph":
            raise LeViTError("--backend cudagraph needs a GPU: add --device cuda")
        if gpu and backend in ("onnxruntime", "openvino", "executorch"):
            raise LeViTError(f"--backend {backend} runs on the CPU only: drop --device cuda")
        if modern:
            # the trial only picks each model's runtime (the rounds after it time the pick): two rounds
            # of 0.5 s rank forms that differ by more than the noise, and keep the whole suite within
            # 15 minutes on 2 cores (docs/field.md gives the run times)
            warmup_s, windows, window_s = (0.5, 3, 0.5) if self.quick else (0.5, 5, 1.5)
        else:
            warmup_s, windows, window_s = (1.0, 3, 1.0) if self.quick else (5.0, 5, 3.0)
        return replace(
            self,
            models=tuple(models),
            backend=backend,
            precision=precision,
            # the phone-class protocol is batch 1, as a phone runs one picture at a time
            batch_sizes=self.batch_sizes or (None if gpu else ((1,) if backend == "executorch" else (16,))),
            threads=None if gpu else self.threads,
            warmup_s=warmup_s if self.warmup_s is None else self.warmup_s,
            windows=self.windows or windows,
            window_s=window_s if self.window_s is None else self.window_s,
        )

    def protocol(self) -> SpeedProtocol:
        """The :class:`SpeedProtocol` every model of the run is timed by (the batch is set per job)."""
        r = self.resolved()
        return SpeedProtocol(
            backend=r.backend,
            precision=r.precision,
            device=r.device,
            threads=r.threads,
            img_size=r.img_size,
            warmup_s=r.warmup_s,
            windows=r.windows,
            window_s=r.window_s,
        )

    def describe(self) -> str:
        """One line saying what a resolved run times and how, to print before the long part."""
        batch = ",".join(map(str, self.batch_sizes)) if self.batch_sizes else "max power of two"
        if self.suite == "modern":
            return (
                f"suite modern: {len(self.models or ())} models, backend {self.backend} (fp32 forms checked "
                f"against eager), batch {batch}, threads {self.threads}; trial {self.warmup_s:g}s per form, "
                f"then {self.windows} interleaved rounds of {self.window_s:g}s"
            )
        return (
            f"{len(self.models or ())} models, {self.device}, backend {self.backend}, {self.precision}, "
            f"batch {batch}, threads {self.threads or '-'}; "
            f"warm-up {self.warmup_s:g}s + {self.windows} x {self.window_s:g}s per model"
        )


def run_speed_table(
    run: SpeedRun, *, progress: Callable[[int, int, str, dict | None], None] | None = None
) -> list[dict]:
    """The rows of a ``levit bench`` run (resolved first): every model at every batch size, by the
    run's protocol; ``progress`` as in :func:`benchmark`."""
    run = run.resolved()
    if run.suite != "paper":
        raise LeViTError("run_speed_table runs the paper's suite; levit.paper.bench.run_bench runs any suite")
    return benchmark(
        run.models, run.protocol(), batch_size=run.batch_sizes and list(run.batch_sizes), progress=progress
    )


def speedup_summary(rows: Sequence[dict]) -> str | None:
    """levit img/s / timm img/s for each LeViT whose timm twin ran at the same batch, one line.

    ``levit (fused) / timm's LeViT, img/s: batch B: NAME RATIOx (LEVIT_BACKEND vs TIMM_BACKEND); ...``
    (each ratio names the two backends that produced it). None when no pair ran.
    """
    groups: dict[int, list[str]] = {}
    by_key = {(r["model"], r["batch"]): r for r in rows}
    for (name, batch), r in by_key.items():
        peer = by_key.get(("timm_" + name, batch))
        if peer is not None and r.get("implementation") == "levit":
            ratio = r["img_s"] / peer["img_s"]
            groups.setdefault(batch, []).append(f"{name} {ratio:.2f}x ({r['backend']} vs {peer['backend']})")
    if not groups:
        return None
    return "levit (fused) / timm's LeViT, img/s: " + "; ".join(f"batch {b}: {', '.join(v)}" for b, v in groups.items())


# ---- output ------------------------------------------------------------------------------------
_COLUMNS = [
    ("model", "model", "{}"),
    ("implementation", "impl", "{}"),
    ("backend", "backend", "{}"),
    ("precision", "prec", "{}"),
    ("img_size", "res", "{}"),
    ("batch", "batch", "{}"),
    ("img_s", "img/s", "{:.1f}"),
    ("img_s_min", "min", "{:.1f}"),
    ("img_s_max", "max", "{:.1f}"),
    ("ms_batch", "ms/batch", "{:.1f}"),
    ("params", "params M", "{:.1f}"),
    ("flops", "FLOPs M", "{:.0f}"),
    ("peak_mem_mb", "peak MB", "{:.0f}"),
    ("top1_paper", "top-1*", "{:.1f}"),
]


def format_table(rows: Sequence[dict]) -> str:
    """A plain-text table of benchmark rows, with the device and versions as a header line."""
    if not rows:
        return "(no results)"
    cells = []
    for r in rows:
        line = []
        for key, _, fmt in _COLUMNS:
            v = r.get(key)
            if key in ("params", "flops") and v is not None:
                v = v / 1e6
            line.append("-" if v is None else fmt.format(v))
        cells.append(line)
    heads = [h for _, h, _ in _COLUMNS]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    fmt_line = lambda xs: "  ".join(x.ljust(w) if i < 4 else x.rjust(w) for i, (x, w) in enumerate(zip(xs, widths)))  # noqa: E731
    r0 = rows[0]
    n = r0.get("threads")
    threads = f", {n} thread{'s' if n != 1 else ''}" if n else ""
    out = [f"{r0['device']}{threads}; torch {r0['torch']}, timm {r0['timm']}", fmt_line(heads)]
    out += [fmt_line(c) for c in cells]
    out.append("img/s: median over the timed windows (min/max beside); top-1*: ImageNet-1k, the paper's Table 3")
    summary = speedup_summary(rows)
    if summary:
        out.append(summary)
    return "\n".join(out)


def write_rows(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """Write rows as ``.csv`` or ``.json`` (by the suffix)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".json"):
        raise LeViTError(f"--output must end in .csv or .json, got {path.name!r}")
    with atomic_path(path) as tmp:
        if suffix == ".json":
            tmp.write_text(json.dumps(list(rows), indent=2) + "\n")
        else:
            with tmp.open("w", newline="") as f:
                keys = list(dict.fromkeys(k for r in rows for k in r))
                w = csv.DictWriter(f, fieldnames=keys)
                w.writeheader()
                # nested values (the modern suite's per-runtime checks) as JSON in their cell
                w.writerows(
                    {k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in r.items()} for r in rows
                )
    return path


def plot_target(path: str | os.PathLike):  # -> (matplotlib.pyplot, Path)
    """``matplotlib.pyplot`` on its file-only backend and ``path`` as a ``Path``, for a ``--plot``
    picture; a missing matplotlib or a suffix it cannot write is a one-line :class:`LeViTError`."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise LeViTError("--plot needs matplotlib: pip install 'levit[plot]'") from e
    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise LeViTError(f"--plot must end in .png, .svg or .pdf, got {path.name!r}")
    return plt, path


def plot_rows(rows: Sequence[dict], path: str | os.PathLike, title: str | None = None) -> Path:
    """The paper's Figure 1 on this machine: measured img/s (log x) against the paper's top-1 (y)."""
    plt, path = plot_target(path)
    pts = [r for r in rows if r.get("top1_paper") is not None]
    if not pts:
        raise LeViTError("nothing to plot: none of the benchmarked models has a published top-1")
    fig, ax = plt.subplots(figsize=(8, 5.2), dpi=110)
    styles = {
        "LeViT (levit)": ("tab:red", "o", "-"),
        "LeViT (timm)": ("tab:orange", "s", "--"),
        "LeViT (timm, reparameterized)": ("tab:brown", "s", ":"),
        "EfficientNet": ("tab:blue", "^", "-"),
        "DeiT": ("tab:green", "D", "-"),
    }
    for fam in dict.fromkeys(r["family"] for r in pts):
        fr = sorted((r for r in pts if r["family"] == fam), key=lambda r: r["top1_paper"])
        color, marker, ls = styles.get(fam, (None, "o", "-"))
        label = fam
        be = {f"{r['backend']} {r['precision']}" for r in fr}
        if len(be) == 1:
            label += f" [{be.pop()}]"
        ax.plot([r["img_s"] for r in fr], [r["top1_paper"] for r in fr], ls, marker=marker, color=color, label=label)
        for r in fr:
            short = r["model"].replace("timm_", "").replace("efficientnet_", "").replace("levit_", "")
            left = "timm" in fam  # timm's LeViT sits just left of ours: label it on the other side
            ax.annotate(
                short,
                (r["img_s"], r["top1_paper"]),
                textcoords="offset points",
                xytext=(-5, 3) if left else (5, -10),
                ha="right" if left else "left",
                fontsize=7,
            )
    ax.set_xscale("log")
    lo = min(r["img_s"] for r in pts)
    hi = max(r["img_s"] for r in pts)
    ax.set_xlim(lo / 1.6, hi * 1.6)
    ax.set_xlabel("images / second (measured on this machine, log scale)")
    ax.set_ylabel("ImageNet-1k top-1 % (paper, Table 3)")
    r0 = pts[0]
    n = r0.get("threads")
    thr = f", {n} thread{'s' if n != 1 else ''}" if n else ""
    ax.set_title(title or f"{r0['device']}{thr}, batch {r0['batch']}, {r0['precision']}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return save_figure(fig, path)
