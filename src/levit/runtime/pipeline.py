"""The one inference pipeline: image files -> decode + preprocess -> batches -> backend -> top-k rows.

``levit predict``, :func:`levit.runtime.predict.predict_paths` / :func:`levit.runtime.predict.iter_predictions`, the
Ray Data job (``levit predict --ray``) and the HTTP server all decode and preprocess with
:class:`Preprocess`, so an image gets the same tensor, and the same answer, whichever way it comes in.

How a local run is laid out, and why (measured with ``benchmarks/predict_e2e.py``, docs/predict.md):

- the eager model on the CPU runs as ``threads`` *lanes* (default: the cores this process may use),
  Python threads on ONE torch thread each (``torch.set_num_threads(1)`` for the run, restored after),
  every lane decoding and preprocessing a batch and then classifying it. Torch's intra-op pool splits
  every op across threads that then wait for one another; when another job shares the cores, a
  descheduled thread stalls the rest (LeViT-128S, batch 32, on a busy 2-core machine: 15-33 img/s on
  2 intra-op threads against 62-118 img/s as two one-thread lanes). Independent lanes never wait on
  each other, and with the decoding in the lanes too there are as many busy threads as cores: no
  batch crosses a process boundary and decoding never preempts the model (600 photos of 500x375 on
  2 cores, ``benchmarks/predict_e2e.py --layouts``: 1.13x the img/s of decoding in 2 worker processes
  beside 2 model lanes, 13.4 CPU ms per image against 15.2; on 4032x3024 phone photos the two layouts
  measured the same). Pillow and
  torch release the GIL while they decode, resize and compute; beyond :data:`LANES_DECODE_UP_TO`
  lanes, or with ``workers=N``, N worker processes decode instead;
- ONNX Runtime and OpenVINO run the same lanes when given one one-thread copy per lane (a list of
  runners, :func:`levit.runtime.deploy.deploy_lanes`, as ``levit predict`` builds them: OpenVINO
  1.34x and ONNX Runtime 1.41x the img/s of one two-thread runtime fed by decoding processes, same
  photos and benchmark);
- one runner (an int8 model calibrated once, CUDA) runs one batch at a time with its own threading,
  while DataLoader worker processes (``workers``; default: the available cores), each on one torch
  thread, decode the next batches: decoding and the model overlap instead of taking turns;
- the batches have the backend's size (:attr:`levit.runtime.deploy.Predictor.batch_size`) at most, and a
  job of few batches is spread over at least as many batches as there are lanes or decoding
  processes (:func:`plan`): 24 phone photos at batch 32 are two batches of 12 decoded side by side,
  not one batch decoded on one core while the other idles;
- results come out in input order, one batch at a time, so memory does not grow with the number of
  images;
- an unreadable image becomes an ``error`` row; the run goes on.
"""

from __future__ import annotations

import collections
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from ..data.datasets import imagenet_class_names
from ..data.images import open_rgb
from ..data.transforms import DEFAULT_CROP_PCT, IMAGENET_MEAN, IMAGENET_STD, eval_transform, resize_size
from ..errors import ImageError, LeViTError
from ..utils import available_cpus, first_line, num_threads

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "LANES_DECODE_UP_TO",
    "Batch",
    "ImageError",
    "ImageFiles",
    "Preprocess",
    "Runner",
    "available_cores",
    "class_names_for",
    "iter_batches",
    "iter_batches_ray",
    "lane_layout",
    "make_rows",
    "plan",
]

# Pillow's own decompression-bomb threshold (PIL.Image.MAX_IMAGE_PIXELS, ~89.5 megapixels: a 24-bit
# image of 256 MiB). Larger images are refused with an ImageError instead of Pillow's warning.
DEFAULT_MAX_PIXELS = 89_478_485
CPU_BATCH_SIZE, GPU_BATCH_SIZE = 32, 256
# Decoding processes take ~60 ms to start (2-core machine, fork) and decoding with the evaluation
# preprocessing runs at ~10 MB of JPEG per CPU second (4.3 ms for a 500x375 JPEG of 40 kB, 140 ms for
# a 4032x3024 one of 1.9 MB; docs/predict.md): a one-batch job starts them from 1 MB of files.
WORKERS_FROM_BYTES = 1 << 20
# Eager on the CPU, up to this many lanes decode their own batches (module docstring). Decoding holds
# the GIL for ~5% of its time (500x375 JPEGs: a pure-Python thread kept 95-97% of its speed beside one
# decoding thread), so 8 lanes ask for it ~40% of the time at most; beyond that, by default, worker
# processes decode.
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
        if one_batch and (n < 2 or sum(_size(p) or 0 for p in paths) < WORKERS_FROM_BYTES):
            workers = 0
        else:
            workers = min(available_cores(), n)
    if workers > 1 and n:
        n_batches = -(-n // batch_size)
        n_batches = -(-n_batches // workers) * workers
        batch_size = -(-n // n_batches)
    return workers, batch_size


def available_cores() -> int:
    """The CPU cores this process may run on (:func:`levit.utils.available_cpus`), at least 1."""
    return max(1, available_cpus())


def _quiet_bomb_warning() -> None:
    """Silence Pillow's decompression-bomb warning (once, process-wide): :class:`Preprocess` applies
    its own ``max_pixels`` limit and reports a refused image as one :class:`ImageError` line."""
    from PIL import Image

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _image_error(src: object, e: BaseException) -> ImageError:
    """A one-line :class:`ImageError` saying why ``src`` could not be decoded."""
    from PIL import Image, UnidentifiedImageError

    name = None if isinstance(src, (bytes, bytearray)) else src
    if isinstance(e, FileNotFoundError):
        reason = "no such file"
    elif isinstance(e, IsADirectoryError):
        reason = "is a folder, not an image file"
    elif isinstance(e, PermissionError):
        reason = "permission denied"
    elif (len(src) if name is None else _size(src)) == 0:
        reason = "empty file (0 bytes)"
    elif isinstance(e, Image.DecompressionBombError):
        reason = f"image too large ({first_line(e, 160)})"
    elif isinstance(e, UnidentifiedImageError):
        reason = "not an image (Pillow cannot identify its format)"
    elif isinstance(e, OSError) and "truncated" in str(e):
        reason = "truncated image (the file ends before the picture does)"
    else:
        reason = f"cannot decode image ({type(e).__name__}: {first_line(e, 160)})"
    return ImageError(reason, name)


def _size(path: object) -> int | None:
    try:
        return os.path.getsize(path)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return None


class Preprocess:
    """Decode one image (a file path or its bytes) to the model's (3, H, W) float32 input.

    The default is the authors' evaluation preprocessing, exactly as :func:`levit.data.transforms.eval_transform`
    on :func:`levit.data.images.open_rgb` (resize the short side to ``img_size / crop_pct`` bicubic, centre
    crop, ImageNet mean/std; 16-bit images scaled to 8 bits). ``fast_decode=True`` lets the decoder of
    a JPEG at least twice the resize target skip the pixels the resize throws away (Pillow's
    DCT-domain ``draft``): five times faster on phone photos, with slightly different pixels (measured
    in docs/predict.md), hence opt-in; smaller JPEGs and other formats are unchanged. Images over
    ``max_pixels`` pixels (``None``: Pillow's own limit) are refused before decoding.

    Unreadable, truncated, empty, non-image and too-large inputs raise :class:`ImageError` (one line).
    Picklable, for DataLoader workers and Ray actors.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        crop_pct: float = DEFAULT_CROP_PCT,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        fast_decode: bool = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        if isinstance(img_size, (tuple, list)):
            img_size = (int(img_size[0]), int(img_size[1]))
            img_size = img_size[0] if img_size[0] == img_size[1] else img_size
        if max_pixels is not None and max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1 or None, got {max_pixels}")
        self.img_size, self.crop_pct = img_size, float(crop_pct)
        self.mean, self.std = tuple(map(float, mean)), tuple(map(float, std))
        self.fast_decode, self.max_pixels = bool(fast_decode), max_pixels
        self.resize = resize_size(img_size, crop_pct)  # also checks crop_pct
        self._transform = eval_transform(img_size, crop_pct, self.mean, self.std)
        _quiet_bomb_warning()

    @classmethod
    def for_model(cls, model: Any, **kw: Any) -> Preprocess:
        """The preprocessing a model expects: its input size (``model.config.img_size``, or a
        :class:`levit.runtime.deploy.Predictor`'s ``img_size``); ``kw`` sets the rest (``crop_pct``, ...)."""
        cfg = getattr(model, "config", None)
        size = getattr(cfg, "img_size", None) or getattr(model, "img_size", None)
        if size is None:
            raise LeViTError(f"cannot tell the input size of {type(model).__name__}: pass Preprocess(img_size=...)")
        kw.setdefault("img_size", size)
        return cls(**kw)

    @property
    def out_hw(self) -> tuple[int, int]:
        """The (H, W) of the tensors this returns."""
        s = self.img_size
        return (s, s) if isinstance(s, int) else s

    def __repr__(self) -> str:
        return (
            f"Preprocess(img_size={self.img_size!r}, crop_pct={self.crop_pct}, fast_decode={self.fast_decode}, "
            f"max_pixels={self.max_pixels})"
        )

    def decode(self, src: str | os.PathLike | bytes):
        """The 8-bit RGB ``PIL.Image`` of ``src`` (JPEGs drafted when ``fast_decode``); raises :class:`ImageError`."""
        try:
            return open_rgb(
                bytes(src) if isinstance(src, bytearray) else src,
                draft=self.resize if self.fast_decode else None,
                max_pixels=self.max_pixels,
            )
        except ImageError:
            raise
        except Exception as e:  # whatever Pillow raises for a bad file
            raise _image_error(src, e) from None

    def __call__(self, src: str | os.PathLike | bytes) -> Tensor:
        """The (3, H, W) float32 input tensor of one image; raises :class:`ImageError` if it cannot be read."""
        return self._transform(self.decode(src))

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**{k: state[k] for k in ("img_size", "crop_pct", "mean", "std", "fast_decode", "max_pixels")})


class _PathList:
    """File names packed in one byte buffer + offsets: DataLoader workers read them without touching
    Python objects, so their copy-on-write memory does not grow with the number of files (a list of
    str would be copied page by page into every worker as its reference counts change)."""

    def __init__(self, paths: Sequence[str | os.PathLike]) -> None:
        encoded = [os.fsencode(p) for p in paths]
        self._offsets = np.cumsum([0] + [len(b) for b in encoded], dtype=np.int64)
        self._buf = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> str:
        return os.fsdecode(self._buf[self._offsets[i] : self._offsets[i + 1]].tobytes())


class ImageFiles(torch.utils.data.Dataset):
    """Image files as ``(path, tensor or None, error or None)``: a bad file is an item with its reason."""

    def __init__(self, paths: Sequence[str | os.PathLike], preprocess: Preprocess) -> None:
        self.paths, self.preprocess = _PathList(paths), preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[str, Tensor | None, str | None]:
        return _load(self.preprocess, self.paths[i])


def _load(preprocess: Preprocess, path: str) -> tuple[str, Tensor | None, str | None]:
    try:
        return path, preprocess(path), None
    except ImageError as e:
        return path, None, e.reason


class Batch(NamedTuple):
    """Up to ``batch_size`` files in input order: ``x`` stacks the readable ones (``None`` if none),
    ``ok`` their positions in ``paths``, ``errors`` maps the other positions to their reason."""

    paths: list[str]
    x: Tensor | None
    ok: list[int]
    errors: dict[int, str]


def collate(items: list[tuple[str, Tensor | None, str | None]]) -> Batch:
    """DataLoader ``collate_fn`` for :class:`ImageFiles` (stacked in shared memory inside a worker)."""
    from torch.utils.data import default_collate

    ok = [i for i, (_, x, _) in enumerate(items) if x is not None]
    x = default_collate([items[i][1] for i in ok]) if ok else None
    return Batch([p for p, _, _ in items], x, ok, {i: e for i, (_, _, e) in enumerate(items) if e is not None})


def class_names_for(model: Any) -> list[str]:
    """Label names: the model's own (``model.class_names``), ImageNet's for 1000 classes, else numbers."""
    names = getattr(model, "class_names", None)
    n = model.config.num_classes
    if names and len(names) == n:
        return list(names)
    if n == 1000:
        return imagenet_class_names()
    return [f"class_{i}" for i in range(n)]


def _inference_form(model: nn.Module) -> nn.Module:
    """The model's inference form (:func:`levit.models.fuse.inference_form`); a fused model as it is."""
    from ..models.fuse import inference_form

    return model.eval() if getattr(model, "is_fused", False) else inference_form(model)


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


def _classify(
    run: Callable[[Tensor], Tensor], x: Tensor, device: torch.device, k: int, include_logits: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(top-k probabilities, top-k classes, logits or None) of one batch, on the CPU."""
    with torch.inference_mode():
        logits = run(x.to(device, non_blocking=True)).float()
        p, i = logits.softmax(-1).topk(k, dim=-1)
        return p.cpu(), i.cpu(), logits.cpu() if include_logits else None


def iter_batches(
    model: nn.Module,
    paths: Sequence[str | os.PathLike],
    *,
    topk: int = 5,
    batch_size: int | None = None,
    preprocess: Preprocess | None = None,
    workers: int | None = None,
    threads: int | None = None,
    device: torch.device | str | None = None,
    include_logits: bool = False,
    class_names: Sequence[str] | None = None,
    runner: Runner | None = None,
) -> Iterator[list[dict]]:
    """Classify ``paths`` (files, in this order) and yield the rows of each batch (:func:`make_rows`).

    Args:
        model: the LeViT (its class names and input size; also the forward pass unless ``runner``).
            An unfused LeViT is fused first where it can be (same outputs, faster).
        topk: classes per row. ``batch_size``: the most images per forward pass (default:
            ``runner.batch_size``, else 32 on a CPU and 256 on a GPU); :func:`plan` may run fewer.
        preprocess: decoding + preprocessing (default: ``Preprocess.for_model(model)``).
        workers: decoding processes. Default: with lanes (eager on the CPU, or a list of runners) up
            to :data:`LANES_DECODE_UP_TO` of them, none (each lane decodes its own batch; so does 0);
            otherwise the available cores (0 decodes in this thread, between batches).
        threads: CPU lanes of the eager model: that many batches are decoded and classified at
            once, one torch thread each (default: the available cores). With a list of runners, one
            lane per runner; one runner keeps its own threading.
        device: where the model runs (default: the model's device; a ``runner``'s ``device``).
            On CUDA the batches come in pinned memory and are copied without blocking.
        include_logits: add the raw logits to each row. ``class_names``: labels (default:
            :func:`class_names_for`).
        runner: a backend, e.g. a :func:`levit.deploy` predictor: (B, 3, H, W) -> (B, classes) logits;
            or a list of them on the CPU, one per lane (say ``levit.deploy(..., threads=1)`` per core):
            the lanes then decode and classify their own batches, as the eager model's do.

    Eager on the CPU sets torch to one thread while the iterator runs (restored when it finishes or
    is closed): torch work done between two batches runs on one thread too.
    """
    paths = [os.fspath(p) for p in paths]
    names = list(class_names) if class_names is not None else class_names_for(model)
    num_classes = model.config.num_classes
    if len(names) != num_classes:
        raise LeViTError(f"{len(names)} class names for a model with {num_classes} classes")
    runners = list(runner) if isinstance(runner, (list, tuple)) else None
    if runners is not None and not runners:
        raise LeViTError("runner: an empty list of backends")
    if runners is not None and len(runners) == 1:
        runner, runners = runners[0], None
    if runner is None:
        model = _inference_form(model)
        if device is not None:
            model = model.to(device)
        dev = next(model.parameters()).device
        run: Callable[[Tensor], Tensor] = model
    else:
        run = runners[0] if runners else runner  # type: ignore[assignment]
        dev = torch.device(device if device is not None else getattr(run, "device", "cpu"))
    dev = torch.device(dev)
    on_cpu = dev.type == "cpu"
    if batch_size is None:
        batch_size = getattr(run, "batch_size", None) or (CPU_BATCH_SIZE if on_cpu else GPU_BATCH_SIZE)
    if topk < 1 or batch_size < 1:
        raise LeViTError(f"topk and batch_size must be >= 1, got {topk} and {batch_size}")
    k = min(topk, num_classes)
    pre = preprocess or Preprocess.for_model(model)
    eager_cpu = runner is None and on_cpu
    if runners is not None and not on_cpu:
        raise LeViTError(f"a list of runners (lanes) runs on the CPU, not on {dev}")
    lanes = len(runners) if runners else (threads or available_cores()) if eager_cpu else 1
    if not paths:
        return
    if (eager_cpu or runners) and (workers == 0 or (workers is None and lanes <= LANES_DECODE_UP_TO)):
        # each lane decodes its own batch, then classifies it (module docstring)
        _, batch_size = plan(paths, batch_size, lanes)
        lane_runs = runners or [run] * lanes
        yield from _lanes_decode_and_classify(paths, pre, lane_runs, dev, k, include_logits, names, batch_size)
        return
    if runners:  # decoding processes, and the lanes' backends as the model lanes
        eager_cpu, run = True, _RoundRobin(runners)
    workers, batch_size = plan(paths, batch_size, workers)
    yield from _workers_decode(paths, pre, run, dev, k, include_logits, names, batch_size, workers, lanes, eager_cpu)


def _workers_decode(
    paths: list[str],
    pre: Preprocess,
    run: Callable[[Tensor], Tensor],
    dev: torch.device,
    k: int,
    include_logits: bool,
    names: Sequence[str],
    batch_size: int,
    workers: int,
    lanes: int,
    one_thread: bool,
) -> Iterator[list[dict]]:
    """The layout with decoding processes: DataLoader ``workers`` decode the batches, ``lanes``
    threads run ``run`` on them (with ``one_thread``, each on one torch thread), rows in input order."""
    loader = torch.utils.data.DataLoader(
        ImageFiles(paths, pre),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=dev.type == "cuda",
        prefetch_factor=2 if workers else None,
    )
    batches = iter(loader)  # workers start here, before any model thread exists (fork-safe)
    # eager on the CPU: lanes of one torch thread each (module docstring); other backends: as they are
    with num_threads(1 if one_thread else None), ThreadPoolExecutor(lanes) as pool:
        pending: collections.deque[tuple[Batch, Future | None]] = collections.deque()

        def rows_of(batch: Batch, fut: Future | None) -> list[dict]:
            p, c, lg = fut.result() if fut is not None else (None, None, None)
            return make_rows(batch, p, c, lg, names, include_logits)

        try:
            for batch in batches:
                fut = None if batch.x is None else pool.submit(_classify, run, batch.x, dev, k, include_logits)
                pending.append((batch, fut))
                if len(pending) > lanes:
                    yield rows_of(*pending.popleft())
            while pending:
                yield rows_of(*pending.popleft())
        finally:
            for _, fut in pending:
                if fut is not None:
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
    dev: torch.device,
    k: int,
    include_logits: bool,
    names: Sequence[str],
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
        for p in batch_paths:
            if stop.is_set():
                raise _StoppedError
            items.append(_load(pre, p))
        batch = collate(items)
        p = c = lg = None
        if batch.x is not None:
            p, c, lg = _classify(run, batch.x, dev, k, include_logits)
        return make_rows(batch, p, c, lg, names, include_logits)

    starts = iter(range(0, len(paths), batch_size))
    pending: collections.deque[Future] = collections.deque()
    with num_threads(1), ThreadPoolExecutor(lanes, thread_name_prefix="levit-lane") as pool:
        try:
            for start in starts:
                pending.append(pool.submit(lane, paths[start : start + batch_size]))
                if len(pending) > lanes:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            stop.set()
            for fut in pending:
                fut.cancel()


# ---- Ray Data --------------------------------------------------------------------------------
class _RayClassifier:
    """A Ray Data ``map_batches`` actor: the same :class:`Preprocess` and backend as a local run, one
    torch thread per actor (one actor per CPU), rows as a pyarrow table (:mod:`levit.runtime.writers` schema)."""

    def __init__(
        self,
        model_ref: tuple,
        preprocess: Preprocess,
        topk: int,
        include_logits: bool,
        names: list[str],
        backend: dict | None,
    ) -> None:
        import ray

        torch.set_num_threads(1)
        self.model = _inference_form(ray.get(model_ref[0]))  # a reference: the weights travel once per node
        self.run: Callable[[Tensor], Tensor] = self.model
        if backend:
            from .deploy import deploy

            self.run = deploy(self.model, **backend)
        self.pre, self.k, self.include_logits, self.names = preprocess, topk, include_logits, names

    def __call__(self, batch: dict[str, np.ndarray]):
        from .writers import rows_to_table

        b = collate([_load(self.pre, p) for p in batch["path"].tolist()])
        p = c = lg = None
        if b.x is not None:
            p, c, lg = _classify(self.run, b.x, torch.device("cpu"), self.k, self.include_logits)
        rows = make_rows(b, p, c, lg, self.names, self.include_logits)
        return rows_to_table(rows, include_logits=self.include_logits)


def iter_batches_ray(
    model: nn.Module,
    paths: Sequence[str | os.PathLike],
    *,
    address: str | None = None,
    topk: int = 5,
    batch_size: int = CPU_BATCH_SIZE,
    preprocess: Preprocess | None = None,
    include_logits: bool = False,
    class_names: Sequence[str] | None = None,
    backend: dict | None = None,
    actors: int | None = None,
) -> Iterator[list[dict]]:
    """:func:`iter_batches` on a Ray cluster: Ray Data ``map_batches`` over the file list, each actor
    running :class:`Preprocess` and the model (or ``levit.deploy(model, **backend)``) on one CPU.

    ``address``: a running cluster (``ray.init(address=...)``; ``None``: the one already initialised
    in this process, else a new one-machine cluster). ``actors``: how many (default: the cluster's
    CPUs). Rows come back in input order, the same rows as :func:`iter_batches`; the files must be
    readable at the same paths on every node (a shared file system).
    """
    try:
        import ray
        import ray.data
    except ImportError:
        raise LeViTError("--ray needs Ray Data: pip install 'levit[cluster]'") from None
    import logging

    paths = [os.fspath(p) for p in paths]
    names = list(class_names) if class_names is not None else class_names_for(model)
    if not paths:
        return
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the rows in input order, as a local run writes them
    ctx.enable_progress_bars = False  # levit's own bar counts the rows
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # no INFO plan dumps or progress-bar notices
    n = actors or max(1, int(ray.cluster_resources().get("CPU", 1)))
    model_ref = ray.put(_inference_form(model).cpu())
    ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=max(1, min(n * 4, len(paths))))
    ds = ds.map_batches(
        _RayClassifier,
        fn_constructor_kwargs={
            "model_ref": (model_ref,),  # in a tuple: Ray passes the reference, the actor fetches it
            "preprocess": preprocess or Preprocess.for_model(model),
            "topk": min(topk, model.config.num_classes),
            "include_logits": include_logits,
            "names": names,
            "backend": backend,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=n),
        num_cpus=1,
    )
    from .writers import table_to_rows

    for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        rows = table_to_rows(table)
        if rows:
            yield rows
    del model_ref
