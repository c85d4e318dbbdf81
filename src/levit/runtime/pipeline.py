"""The local inference layouts: image files -> decode + preprocess -> batches -> backend -> top-k rows.

Decoding is :class:`levit.data.preprocess.Preprocess`, built from the model by every entry point
(:mod:`levit.runtime.predict`, :mod:`levit.runtime.ray_data`, the server), so an image gets the same
tensor, and the same answer, whichever way it comes in. The layouts, and why (docs/predict.md measures
each against the others with ``benchmarks/predict_e2e.py --layouts``):

- on the CPU the model runs as *lanes*: Python threads on ONE torch thread each, every lane decoding a
  batch and then classifying it. Torch's intra-op pool splits every op across threads that then wait
  for one another, so when another job shares the cores one descheduled thread stalls the rest;
  independent lanes never wait on each other, and with the decoding in the lanes there are as many
  busy threads as cores and no batch crosses a process boundary. Pillow and torch release the GIL while
  they decode, resize and compute. The eager model is shared by its lanes; ONNX Runtime and OpenVINO get
  one one-thread copy per lane (:func:`levit.runtime.deploy.deploy_lanes`). Past
  :data:`LANES_DECODE_UP_TO` lanes, or with ``workers=N``, N worker processes decode instead, since
  every decoding lane holds the GIL for a small share of its time;
- one runner that keeps its own threading (an int8 model calibrated once, a GPU) runs one batch at a
  time while DataLoader worker processes, one torch thread each, decode the next batches, so decoding
  and the model overlap instead of taking turns;
- a job of few batches is spread over at least as many batches as there are lanes or decoding
  processes (:func:`plan`), so no core idles while another decodes the only batch;
- rows come out in input order, one batch at a time, so memory does not grow with the number of
  images; an unreadable image becomes an ``error`` row and the run goes on.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor, nn

from ..data.datasets import imagenet_class_names
from ..data.preprocess import Batch, Preprocess, collate, load_item
from ..data.shared_batches import SharedBatches
from ..errors import LeViTError
from ..utils import available_cpus, num_threads
from .options import PredictOptions

__all__ = [
    "LANES_DECODE_UP_TO",
    "RowMaker",
    "Runner",
    "available_cores",
    "class_names_for",
    "classify",
    "decoding_loader",
    "inference_model",
    "iter_batches",
    "lane_layout",
    "make_rows",
    "plan",
    "preprocess_for",
]

# A one-batch job decodes in this thread unless its files total this much: starting decoding
# processes costs more than it saves below it (docs/predict.md has the start and decode times).
WORKERS_FROM_BYTES = 1 << 20
# Eager on the CPU, up to this many lanes decode their own batches; beyond, worker processes decode,
# since the decoding lanes together would hold the GIL a large share of the time.
LANES_DECODE_UP_TO = 8

Runner = Callable[[Tensor], Tensor] | Sequence[Callable[[Tensor], Tensor]]
"""A backend for :func:`iter_batches`: one callable, or one per CPU lane."""


def lane_layout(lanes: int | None, threads: int | None, cores: int) -> tuple[int, int]:
    """``(lanes, threads per lane)`` for the copies of a backend on ``cores`` CPU cores (``levit serve``'s
    ``--lanes``/``--threads``; ``levit predict --threads N`` asks for N lanes of one thread). Given both,
    as given; given one, the other fills the cores; given neither, one lane of one thread per core, at
    most :data:`LANES_DECODE_UP_TO` lanes (each holds a copy of the model), which then share the cores."""
    if lanes is None:
        lanes = max(1, cores // threads) if threads else max(1, min(cores, LANES_DECODE_UP_TO))
    if threads is None:
        threads = max(1, cores // lanes)
    return lanes, threads


def plan(paths: Sequence[str | os.PathLike], batch_size: int, workers: int | None = None) -> tuple[int, int]:
    """``(workers, batch_size)`` for decoding ``paths`` in batches of at most ``batch_size``.

    ``workers`` (default): none for a job of one batch whose files total under
    :data:`WORKERS_FROM_BYTES` (starting processes would cost more than they save), else one per
    available core, at most one per image. With two or more workers the images are spread evenly over
    a multiple of ``workers`` batches, so that every process decodes a share of a small job.
    """
    n = len(paths)
    if workers is None:
        one_batch = n <= batch_size
        if one_batch and (n < 2 or sum(_bytes(p) for p in paths) < WORKERS_FROM_BYTES):
            workers = 0
        else:
            workers = min(available_cores(), n)
    if workers > 1 and n:
        n_batches = -(-n // batch_size)
        n_batches = -(-n_batches // workers) * workers
        batch_size = -(-n // n_batches)
    return workers, batch_size


def _bytes(path: str | os.PathLike) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def available_cores() -> int:
    """The CPU cores this process may run on (:func:`levit.utils.available_cpus`), at least 1."""
    return max(1, available_cpus())


def class_names_for(model: Any) -> list[str]:
    """Label names: the model's own (``model.class_names``), ImageNet's for 1000 classes, else numbers."""
    names = getattr(model, "class_names", None)
    n = model.config.num_classes
    if names and len(names) == n:
        return list(names)
    if n == 1000:
        return imagenet_class_names()
    return [f"class_{i}" for i in range(n)]


def inference_model(model: nn.Module) -> nn.Module:
    """What a prediction job runs: a fused model in eval mode as it is (shared, not copied), anything
    else as its inference form (:func:`levit.models.fuse.inference_form`, a new module), so the
    caller's model is never changed."""
    from ..models.fuse import inference_form

    if getattr(model, "is_fused", False) and not model.training:
        return model
    return inference_form(model)


def make_rows(
    batch: Batch,
    probs: Tensor | None,
    classes: Tensor | None,
    logits: Tensor | None,
    names: Sequence[str],
    include_logits: bool = False,
) -> list[dict]:
    """One row per file of ``batch``: ``{"path", "top": [{"class", "label", "prob"}, ...], "error"}``
    (+ ``"logits"``, ``None`` for an unreadable file, with ``include_logits``), ``top`` empty and
    ``error`` the reason for an unreadable file."""
    top_p = probs.tolist() if probs is not None else []
    top_i = classes.tolist() if classes is not None else []
    raw = logits.tolist() if logits is not None else None
    slot = {pos: j for j, pos in enumerate(batch.ok)}
    rows = []
    for pos, path in enumerate(batch.paths):
        j = slot.get(pos)
        if j is None:
            row = {"path": path, "top": [], "error": batch.errors.get(pos, "not classified")}
        else:
            top = [{"class": c, "label": names[c], "prob": round(p, 6)} for p, c in zip(top_p[j], top_i[j])]
            row = {"path": path, "top": top, "error": None}
        if include_logits:
            row["logits"] = raw[j] if j is not None and raw is not None else None
        rows.append(row)
    return rows


def classify(
    run: Callable[[Tensor], Tensor],
    x: Tensor,
    device: torch.device,
    k: int,
    include_logits: bool,
    normalize: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(top-k probabilities, top-k classes, logits or None) of one batch, on the CPU. ``x`` is the
    model's input, or with ``normalize`` uint8 pixels normalised on ``device`` after the copy."""
    with torch.inference_mode():
        x = x.to(device, non_blocking=True)
        logits = run(x if normalize is None else normalize(x)).float()
        probs, classes = logits.softmax(-1).topk(k, dim=-1)
        return probs.cpu(), classes.cpu(), logits.cpu() if include_logits else None


@dataclasses.dataclass(frozen=True)
class RowMaker:
    """Classifies a decoded :class:`~levit.data.preprocess.Batch` into rows (:func:`make_rows`): the
    ``k`` best of ``names`` for each image, with its logits if ``include_logits``, on ``device``. With
    ``normalize`` (a :meth:`levit.data.preprocess.Preprocess.normalize`) the batches hold uint8 pixels,
    normalised on ``device``."""

    device: torch.device
    k: int
    names: Sequence[str]
    include_logits: bool = False
    normalize: Callable[[Tensor], Tensor] | None = None

    def __call__(self, run: Callable[[Tensor], Tensor] | None, batch: Batch) -> list[dict]:
        """The rows of ``batch``, its readable images classified by ``run``."""
        probs = classes = logits = None
        if batch.x is not None and run is not None:
            probs, classes, logits = classify(run, batch.x, self.device, self.k, self.include_logits, self.normalize)
        return make_rows(batch, probs, classes, logits, self.names, self.include_logits)


def iter_batches(
    model: nn.Module,
    paths: Sequence[str | os.PathLike],
    options: PredictOptions | None = None,
    *,
    preprocess: Preprocess | None = None,
    runner: Runner | None = None,
    **fields: Any,
) -> Iterator[list[dict]]:
    """Classify ``paths`` (files, in this order) and yield the rows of each batch (:func:`make_rows`).

    Args:
        model: the LeViT (its class names and preprocessing; also the forward pass unless ``runner``).
            An unfused LeViT is fused first (same outputs, faster; the caller's model is not changed).
        options: ``topk``, ``batch_size`` (the most images per forward pass; :func:`plan` may run
            fewer), ``workers``, ``threads``, ``device``, ``include_logits``, ``class_names`` of
            :class:`levit.runtime.options.PredictOptions`, or its ``fields`` as keywords (its
            backend fields are :func:`levit.runtime.predict.build_runner`'s business).
        preprocess: decoding + preprocessing (default: ``Preprocess.from_model(model)`` with the
            options' ``crop_pct``, ``fast_decode`` and ``max_pixels``).
        runner: a backend, e.g. a :func:`levit.deploy` predictor: (B, 3, H, W) -> (B, classes) logits;
            or a list of them on the CPU, one per lane (say ``levit.deploy(..., threads=1)`` per core).

    The layout (module docstring): with lanes (the eager model on the CPU, ``threads`` of them, default
    the available cores; or a list of runners) and ``workers`` 0 or unset, each lane decodes its own
    batch; otherwise ``workers`` DataLoader processes decode (default: the available cores; 0 decodes
    in this thread between batches). On CUDA the batches come in pinned memory, copied without
    blocking. Eager on the CPU sets torch to one thread while the iterator runs (restored after).
    """
    opts = options or PredictOptions()
    opts = opts.replace(**fields) if fields else opts
    paths = [os.fspath(p) for p in paths]
    names = list(opts.class_names) if opts.class_names is not None else class_names_for(model)
    num_classes = model.config.num_classes
    if len(names) != num_classes:
        raise LeViTError(f"{len(names)} class names for a model with {num_classes} classes")
    pre = preprocess or preprocess_for(model, opts)
    run, runners, dev = _backend(model, runner, opts.device)
    batch_size = opts.batch_size or getattr(run, "batch_size", None) or opts.default_batch_size(dev.type == "cpu")
    if not paths:
        return
    k = min(opts.topk, num_classes)
    if pre.decoder == "cuda" or (pre.decoder == "auto" and dev.type == "cuda"):
        rows = RowMaker(dev, k, names, opts.include_logits, pre.normalize)
        yield from _device_decode(paths, pre, _RoundRobin(runners) if runners else run, rows, batch_size)
        return
    # a GPU gets uint8 pixels (a quarter of the bytes through the decoding processes' shared memory
    # and the host-to-device copy) and normalises them itself; the CPU normalises as it decodes
    pixels = opts.pixel_batches if opts.pixel_batches is not None else dev.type != "cpu"
    rows = RowMaker(dev, k, names, opts.include_logits, pre.normalize if pixels else None)
    eager_cpu = runner is None and dev.type == "cpu"
    lanes = len(runners) if runners else (opts.threads or available_cores()) if eager_cpu else 1
    workers = opts.workers
    if (eager_cpu or runners) and (workers == 0 or (workers is None and lanes <= LANES_DECODE_UP_TO)):
        _, batch_size = plan(paths, batch_size, lanes)
        yield from _lanes_decode_and_classify(paths, pre, runners or [run] * lanes, rows, batch_size)
        return
    if runners:  # decoding processes, and the lanes' backends as the model lanes
        eager_cpu, run = True, _RoundRobin(runners)
    loader = decoding_loader(
        paths, pre, batch_size, workers, pixels=pixels, hold=lanes + 1, pin_memory=dev.type == "cuda"
    )
    yield from _workers_decode(loader, run, rows, lanes, one_thread=eager_cpu)


def decoding_loader(
    paths: Sequence[str | os.PathLike],
    pre: Preprocess,
    batch_size: int,
    workers: int | None,
    *,
    pixels: bool = False,
    hold: int = 1,
    pin_memory: bool = False,
    persistent: bool = False,
) -> SharedBatches:
    """The batches of ``levit predict``'s decoding processes: ``workers`` of them (:func:`plan`
    fits them and the batch to the files), each batch normalised float, or with ``pixels`` uint8
    pixels that the model's device normalises; with processes and no ``pin_memory``, in shared memory
    reused batch after batch (the consumer holding at most ``hold``;
    :class:`~levit.data.shared_batches.SharedBatches`);
    ``persistent``: the processes stay between passes (benchmarks/decoders.py times passes of the
    same loader)."""
    workers, batch_size = plan(paths, batch_size, workers)
    return SharedBatches(
        paths, pre, batch_size, workers, pixels=pixels, hold=hold, pin_memory=pin_memory, persistent=persistent
    )


def _backend(
    model: nn.Module, runner: Runner | None, device: str | None
) -> tuple[Callable[[Tensor], Tensor], list | None, torch.device]:
    """``(run, lanes' runners or None, device)``: the model's inference form on ``device`` (default: its
    own), or the given backend (one, or a list of CPU lanes)."""
    runners = list(runner) if isinstance(runner, (list, tuple)) else None
    if runners is not None and not runners:
        raise LeViTError("runner: an empty list of backends")
    if runners is not None and len(runners) == 1:
        runner, runners = runners[0], None
    if runner is None:
        model = inference_model(model)
        if device is not None:
            model = model.to(device)
        return model, None, torch.device(next(model.parameters()).device)
    run = runners[0] if runners else runner
    dev = torch.device(device if device is not None else getattr(run, "device", "cpu"))
    if runners is not None and dev.type != "cpu":
        raise LeViTError(f"a list of runners (lanes) runs on the CPU, not on {dev}")
    return run, runners, dev  # type: ignore[return-value]


def preprocess_for(model: nn.Module, options: PredictOptions) -> Preprocess:
    """The model's own :class:`~levit.data.preprocess.Preprocess` with the options' overrides."""
    return Preprocess.from_model(
        model,
        crop_pct=options.crop_pct,
        fast_decode=options.fast_decode,
        max_pixels=options.max_pixels,
        decoder=options.decoder,
    )


def _workers_decode(
    loader: SharedBatches,
    run: Callable[[Tensor], Tensor],
    rows: RowMaker,
    lanes: int,
    one_thread: bool,
) -> Iterator[list[dict]]:
    """The layout with decoding processes: the ``loader``'s workers decode the batches, ``lanes``
    threads run ``run`` on them (with ``one_thread``, each on one torch thread), rows in input order.
    A lane releases its batch's memory to the loader as soon as its rows are made: at most ``lanes``
    batches are held when the next one is asked for."""

    def work(batch: Batch) -> list[dict]:
        try:
            return rows(run, batch)
        finally:
            loader.release(batch)

    batches = iter(loader)  # workers start here, before any model thread exists (fork-safe)
    with num_threads(1 if one_thread else None), ThreadPoolExecutor(lanes) as pool:
        pending: collections.deque[tuple[Batch, Future | None]] = collections.deque()
        try:
            for batch in batches:
                pending.append((batch, pool.submit(work, batch)))
                if len(pending) > lanes:
                    yield pending.popleft()[1].result()
            while pending:
                yield pending.popleft()[1].result()
        finally:
            for _, fut in pending:
                fut.cancel()
            del batches  # stops the workers now, not at garbage collection


class _StoppedError(Exception):
    """A lane was told to stop (the consumer closed the iterator or raised)."""


class _RoundRobin:
    """Several backends called as one from concurrent model lanes: each call takes a free one."""

    def __init__(self, runs: Sequence[Callable[[Tensor], Tensor]]) -> None:
        import queue

        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for r in runs:
            self._free.put(r)

    def __call__(self, x: Tensor) -> Tensor:
        run = self._free.get()
        try:
            return run(x)
        finally:
            self._free.put(run)


def _lanes_decode_and_classify(
    paths: list[str],
    pre: Preprocess,
    runs: Sequence[Callable[[Tensor], Tensor]],
    rows: RowMaker,
    batch_size: int,
) -> Iterator[list[dict]]:
    """The CPU lane layout: one thread per backend in ``runs`` (the same eager model, or one
    one-thread copy of a backend each), on one torch thread, every one decoding a batch and then
    classifying it; rows of each batch yielded in input order. One more batch than there are lanes is
    queued, so a lane that finishes starts the next batch while this thread writes rows."""
    stop = threading.Event()
    lanes = len(runs)
    run = _RoundRobin(runs)

    def lane(batch_paths: list[str]) -> list[dict]:
        items = []
        for path in batch_paths:
            if stop.is_set():
                raise _StoppedError
            items.append(load_item(pre, path, rows.normalize is not None))
        return rows(run, collate(items))

    pending: collections.deque[Future] = collections.deque()
    with num_threads(1), ThreadPoolExecutor(lanes, thread_name_prefix="levit-lane") as pool:
        try:
            for start in range(0, len(paths), batch_size):
                pending.append(pool.submit(lane, paths[start : start + batch_size]))
                if len(pending) > lanes:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            stop.set()
            for fut in pending:
                fut.cancel()


def _device_decode(
    paths: list[str], pre: Preprocess, run: Callable[[Tensor], Tensor], rows: RowMaker, batch_size: int
) -> Iterator[list[dict]]:
    """The ``cuda`` decoder's layout: one thread reads the next batches' files and decodes them on the
    model's device (:meth:`levit.data.preprocess.Preprocess.pixels_batch`: JPEGs in one call there)
    while this thread classifies the current one; rows in input order. Two batches are prepared
    ahead, so the device always has the next batch's decode queued behind this batch's model."""
    starts = iter(range(0, len(paths), batch_size))
    pending: collections.deque[Future] = collections.deque()
    with ThreadPoolExecutor(1, thread_name_prefix="levit-decode") as pool:

        def ahead() -> None:
            start = next(starts, None)
            if start is not None:
                pending.append(pool.submit(pre.pixels_batch, paths[start : start + batch_size], rows.device))

        ahead()
        ahead()
        try:
            while pending:
                batch = pending.popleft().result()
                ahead()
                yield rows(run, batch)
        finally:
            for fut in pending:
                fut.cancel()
