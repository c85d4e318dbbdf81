"""The serving application: :class:`LeViTService`, the model, its lanes, the metrics and the routes
(``/v1/classify``, health, the KServe v2 protocol's and TorchServe's); the same object runs in one process (:func:`levit.runtime.serve_process.run_server`)
and as each Ray Serve replica (:mod:`levit.runtime.serve_ray`).

Decoding and preprocessing are :meth:`levit.data.preprocess.Preprocess.from_model`, the code and the
settings ``levit predict`` uses (the model's ``pretrained_cfg``, ``crop_pct`` overridable), so an
image gets the same answer from both: a bounded thread pool off the event loop decodes, resizes and
crops each image to uint8 pixels (:meth:`~levit.data.preprocess.Preprocess.pixels`), and the lane
that computes its batch normalizes the whole batch at once (:class:`Lane`), bit for bit what
``levit predict`` computes image by image. A request waiting for its batch holds a quarter of the
memory of its float tensor.

The model runs as *lanes*, as in ``levit predict``: on a CPU one copy of the backend
(:func:`levit.runtime.deploy.deploy_lanes`, fused when the model can be) per core, each on one thread
and each computing its own batch, so that up to that many batches are in flight at once. Requests
under load come in ones and twos, and a backend that splits a batch of one or two over every core
spends the extra threads waiting for one another; one-thread lanes do not wait. On a GPU one lane runs
one batch at a time.

The batching rule (when a batch closes, which lane takes it) and the bounded queue are
:class:`levit.runtime.batcher.Batcher`'s, one asyncio module with no Ray in it: the single-process
server and each Ray Serve replica run it on their own event loop.

Bad input never reaches a batch: :mod:`levit.runtime.serve_http` refuses it in the request's own
coroutine.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import math
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..data.preprocess import Preprocess
from ..errors import ImageError
from ..utils import available_cpus, first_line
from .batcher import Batcher, QueueFullError
from .options import OptionError
from .pipeline import class_names_for, lane_layout
from .serve_config import ServeConfig
from .serve_http import (
    CLASSIFY_OPENAPI,
    LOADING_RETRY_AFTER_S,
    AccessLog,
    ClientError,
    answer_within,
    client_error_response,
    error_response,
    json_errors,
    parse_timeout,
    parse_topk,
    read_body,
    read_image,
)
from .serve_kserve import HEADER_LENGTH, add_v2_routes, encode_response, parse_request
from .serve_models import LoadError, ModelEntry, ModelVersion, naming, read_checkpoint
from .serve_process import freeze_heap, setup_logging
from .serve_torchserve import add_torchserve_routes, torchserve_body

__all__ = ["Lane", "LeViTService", "ServeConfig"]

log = logging.getLogger("levit.serve")

_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# an image of more pixels than this (its header says) decodes on threads of its own, at most half the
# decoding threads, and stays out of the batcher's count and timing of the decodes a batch waits for:
# a burst of huge images would otherwise hold every decoding thread and stretch every batch's wait,
# so that the other clients wait for them (docs/serving.md, "Faults at full size", has the figures)
LARGE_IMAGE_PIXELS = 4_000_000
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def header_pixels(data: bytes) -> int:
    """The pixel count an encoded image's header gives, without decoding it (0 when the header cannot
    be read: the decode then says why)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except Exception:  # not an image Pillow knows: decoded (and refused) as any other
        return 0
    return w * h


class _Metrics:
    """The Prometheus series, in a registry of their own (one per service instance)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("levit_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram(
            "levit_request_latency_seconds",
            "POST /v1/classify, arrival to answer",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram("levit_batch_size", "images per forward pass", buckets=_SIZE_BUCKETS, registry=r)
        self.batch_latency = Histogram(
            "levit_batch_latency_seconds", "one forward pass", buckets=_LATENCY_BUCKETS, registry=r
        )
        # beside the wall time: a pass that waited for a core is longer, not dearer
        self.batch_cpu = Counter(
            "levit_batch_cpu_seconds", "CPU time of the thread running each forward pass", registry=r
        )
        self.queue_depth = Gauge("levit_queue_depth", "decoded images waiting for a batch", registry=r)
        self.in_flight = Gauge("levit_in_flight", "POST /v1/classify requests being handled", registry=r)
        self.ready = Gauge("levit_ready", "1 once the model is loaded and warmed up", registry=r)
        self.version = Gauge("levit_model_version", "the version of each model serving", ["model"], registry=r)
        self.loads = Counter(
            "levit_model_loads", "versions loaded, by result (ok, failed)", ["model", "result"], registry=r
        )
        self.answers = Counter(
            "levit_images",
            "images answered, by model and the version that computed them",
            ["model", "version"],
            registry=r,
        )

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _warmup_image(size: int = 320) -> bytes:
    """A photo-like PNG (smooth gradients and edges) for the warm-up requests."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    rgb = np.stack([x, y, (x * y + ((x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.1)) / 2], -1)
    buf = io.BytesIO()
    Image.fromarray((rgb * 255).clip(0, 255).astype("uint8")).save(buf, format="PNG")
    return buf.getvalue()


class Lane:
    """One model lane of the batcher: its predictor, and the batch tensors it stacks and normalizes
    every batch into.

    Images arrive as uint8 pixels and are stacked into the lane's uint8 batch, then normalized into its
    float batch (``normalize``: the version's :meth:`~levit.data.preprocess.Preprocess.normalize`);
    images that arrive as float tensors are stacked into the float batch as they are.

    Both batch tensors are allocated once and reused: a fresh one per batch is megabytes of memory that
    the C allocator hands back to the system whenever someone calls ``malloc_trim`` (protobuf's
    Python runtime does, once every 10,000 arena blocks it frees, so a gRPC server meets it often:
    docs/serving.md), after which every page of the next batch faults in again. The batcher gives a
    lane one batch at a time and takes it back only once the lane's thread has returned, so no two
    batches share them."""

    def __init__(self, predictor: Callable[[Tensor], Tensor], normalize: Callable[..., Tensor] | None = None) -> None:
        self.predictor, self.normalize = predictor, normalize
        self._kept: dict[torch.dtype, Tensor] = {}

    def _memory(self, n: int, like: Tensor, dtype: torch.dtype) -> Tensor:
        """The lane's (n, *like.shape) tensor of ``dtype`` on ``like``'s device; new memory only for a
        larger batch, other images, or across inference mode (torch refuses to write a tensor made in
        inference mode outside it)."""
        b = self._kept.get(dtype)
        if (
            b is None
            or len(b) < n
            or (b.shape[1:], b.device) != (like.shape, like.device)
            or b.is_inference() != torch.is_inference_mode_enabled()
        ):
            b = self._kept[dtype] = torch.empty((n, *like.shape), dtype=dtype, device=like.device)
        return b[:n]

    def stack(self, images: list[Tensor]) -> Tensor:
        """``images`` (each (3, H, W), all alike) as one float (N, 3, H, W) batch, in the lane's own memory."""
        first, n = images[0], len(images)
        if first.dtype != torch.uint8 or self.normalize is None:
            return torch.stack(images, out=self._memory(n, first, first.dtype))
        pixels = torch.stack(images, out=self._memory(n, first, torch.uint8))
        return self.normalize(pixels, out=self._memory(n, first, torch.float32))


class LeViTService:
    """The application: model, preprocessing, batching, metrics and the HTTP routes.

    ``LeViTService(model, config)`` then :meth:`build_app` gives the ASGI app; the model is deployed
    and warmed up by :meth:`load` (at start-up in the background when ``load_now`` is False, so that
    ``/health`` answers while ``/ready`` still says 503). Ray Serve builds the same app per replica
    through ``__serve_build_asgi_app__``.
    """

    def __init__(
        self,
        model: nn.Module | Mapping[str, nn.Module],
        config: ServeConfig = ServeConfig(),
        *,
        load_now: bool = False,
        version: int = 1,
    ) -> None:
        self.config = config
        models = dict(model) if isinstance(model, Mapping) else {config.model_name or model.config.name: model}
        if not models:
            raise OptionError("model", "no model to serve")
        files = dict(config.checkpoints)
        self.model_name = next(iter(models))  # the default model: requests that name none
        self.entries = {
            name: ModelEntry(name, self._version(name, version, m.eval(), files.get(name, config.checkpoint)))
            for name, m in models.items()
        }
        self.entry = self.entries[self.model_name]
        self.metrics = _Metrics()
        self.lanes, self.lane_threads = lane_layout(config.lanes, config.threads, available_cpus())
        if next(self.model.parameters()).device.type != "cpu":  # a GPU runs one batch at a time
            self.lanes, self.lane_threads = 1, config.threads
        self.metrics.queue_depth.set_function(
            lambda: sum(e.serving.batcher.queued for e in self.entries.values() if e.serving.batcher)
        )
        self._reloading: dict[str, asyncio.Lock] = {}  # one load at a time per model (made on the serving loop)
        self._background: set[asyncio.Task] = set()  # reloads and retirements (the loop keeps weak references)
        self.ray_board: Any = None  # under Ray Serve: the board every replica posts its metrics to
        self._app: Any = None  # the app forward() runs requests through (made on first use)
        self.ready = False
        self.draining = False
        self.in_flight = 0
        self.load_error: str | None = None
        self.replica = f"{socket.gethostname()}:{os.getpid()}"  # which process answered (a header)
        self.own_process = False  # run_server's process serves only this: _load_logged freezes the heap
        self._limiters: tuple | None = None
        if load_now:
            self.load()

    # ---- the version serving (requests bind to it when they arrive) ------------------------------
    @property
    def serving(self) -> ModelVersion:
        """The version that takes new requests."""
        return self.entry.serving

    @property
    def model(self) -> nn.Module:
        """The serving version's model."""
        return self.serving.model

    @property
    def names(self) -> list[str]:
        """The serving version's class names."""
        return self.serving.names

    @property
    def num_classes(self) -> int:
        """The serving version's number of classes."""
        return self.serving.num_classes

    @property
    def preprocess(self) -> Preprocess:
        """The serving version's decoding and preprocessing."""
        return self.serving.preprocess

    @property
    def batcher(self) -> Batcher | None:
        """The serving version's batcher (None until :meth:`load`)."""
        return self.serving.batcher

    def _version(self, name: str, number: int, model: nn.Module, checkpoint: str | None) -> ModelVersion:
        c = self.config
        preprocess = Preprocess.from_model(model, crop_pct=c.crop_pct, max_pixels=c.max_pixels, decoder=c.decoder)
        return ModelVersion(number, model, preprocess, class_names_for(model), checkpoint, name=name)

    def entry_for(self, name: str | None) -> ModelEntry:
        """The model named ``name`` (None: the default one, the first);
        :class:`~levit.runtime.serve_http.ClientError` 404 naming the served ones otherwise."""
        if name is None:
            return self.entry
        entry = self.entries.get(name)
        if entry is None:
            served = ", ".join(repr(n) for n in self.entries)
            raise ClientError(404, f"unknown model {name!r}: this server serves {served}")
        return entry

    def version_for(self, name: str | None, version: str | None = None) -> ModelVersion:
        """The version of the model ``name`` (None: the default one) serving now; ``version`` (a label
        such as ``"2"``, or None for whichever serves) must be that one:
        :class:`~levit.runtime.serve_http.ClientError` 404 naming the model or the version otherwise."""
        serving = self.entry_for(name).serving
        if version not in (None, serving.label):
            raise ClientError(
                404, f"unknown version {version!r} of {serving.name!r}: the version serving is {serving.label}"
            )
        return serving

    @property
    def max_queue(self) -> int:
        """Classify requests admitted at once (:meth:`ServeConfig.queue_bound`)."""
        return self.config.queue_bound(self.lanes)

    # ---- the model ------------------------------------------------------------------------------
    def load(self) -> None:
        """Deploy each model on the configured backend, once per lane, and warm each lane up (batch 1
        and a full batch)."""
        for entry in self.entries.values():
            t0 = time.perf_counter()
            v = entry.serving
            v.batcher = self._deploy(v)
            self.metrics.version.labels(entry.name).set(v.version)
            first = v.batcher.free[0]
            log.info(
                "model %s version %s ready: %s %s, %d lane(s) of %s thread(s), batches of up to %d within %g ms, "
                "warm-up %.1f s",
                entry.name,
                v.label,
                getattr(first, "backend", "?"),
                getattr(first, "precision", "?"),
                self.lanes,
                self.lane_threads or "the runtime's",
                self.config.max_batch_size,
                self.config.max_wait_ms,
                time.perf_counter() - t0,
            )
        self.ready = True
        self.metrics.ready.set(1)

    def _deploy(self, version: ModelVersion) -> Batcher:
        """``version``'s lanes, warmed up (batch 1 and a full batch), behind a batcher of their own."""
        from .deploy import deploy_lanes

        c = self.config
        if self.lanes > 1 and self.lane_threads:
            # every lane's predictor sets torch to the same count: set it once, so that no lane's
            # restore (levit.utils.num_threads) changes another lane's count mid-batch
            torch.set_num_threads(self.lane_threads)
        predictors = deploy_lanes(
            version.model,
            self.lanes,
            threads=self.lane_threads,
            backend=c.backend,
            precision=c.precision,
            batch_size=c.max_batch_size,
            calibration=list(c.calibration) if c.calibration else None,
        )
        lanes = [Lane(p, version.preprocess.normalize) for p in predictors]
        batcher = Batcher(
            lanes,
            lambda lane, images: self._run_batch(batcher, lane, images),
            max_batch_size=c.max_batch_size,
            max_wait_s=c.max_wait_ms / 1e3,
            max_queue=self.max_queue,
            decode_threads=c.decode_workers or os.cpu_count() or 1,
        )
        x, seconds = self._decode(_warmup_image(), version)
        batcher.observe_decode(seconds)
        for lane in lanes:
            for n in (1, c.max_batch_size, 1):
                t = time.perf_counter()
                self._forward_images(lane, [x] * n)
                if n > 1:
                    batcher.observe_batch(time.perf_counter() - t, n)
        return batcher

    async def load_version(self, checkpoint: str | None = None, *, model: str | None = None) -> ModelVersion:
        """Load the next version of the model named ``model`` (default: the default one) from
        ``checkpoint`` (default: the file its serving version was read from) beside the one serving,
        warm it up, then make it the one serving; the requests already taken finish on the version they
        arrived on. One load at a time per model.

        Raises :class:`~levit.runtime.serve_models.LoadError` saying why when it cannot load: the
        serving version goes on, and the repository index shows the failure until a load succeeds."""
        import anyio

        entry = self.entries[model or self.model_name]
        async with self._reloading.setdefault(entry.name, asyncio.Lock()):
            old = entry.serving
            number, path = old.version + 1, checkpoint or old.checkpoint
            entry.loading = number
            try:
                if not self.ready:
                    raise LoadError("the server is still loading its first version")
                if path is None:
                    raise LoadError("this model was not read from a file: name a checkpoint (parameters.checkpoint)")
                new = await anyio.to_thread.run_sync(self._next_version, old, number, path)
            except LoadError as e:
                why = f"version {number} of {entry.name} not loaded: {e}; version {old.label} keeps serving"
                entry.failure = (number, why)
                self.metrics.loads.labels(entry.name, "failed").inc()
                log.error(why)
                raise LoadError(why) from None
            finally:
                entry.loading = None
            entry.serving, entry.failure = new, None  # the swap: requests arriving from now on bind to it
            self.metrics.loads.labels(entry.name, "ok").inc()
            self.metrics.version.labels(entry.name).set(number)
            log.warning(
                "model %s version %d serving, from %s (version %d retires)", entry.name, number, path, old.version
            )
        self._retire(old)
        return new

    def _next_version(self, old: ModelVersion, number: int, path: str) -> ModelVersion:
        """Version ``number`` after ``old``, read from ``path``, deployed and warmed up (on a worker thread)."""
        device = next(old.model.parameters()).device
        model = read_checkpoint(path, old.model).to(device)
        try:
            version = self._version(old.name, number, model, path)
            version.batcher = self._deploy(version)
        except Exception as e:  # a checkpoint that reads but does not deploy or run: the same answer
            raise LoadError(naming(path, e)) from None
        return version

    def _retire(self, old: ModelVersion) -> None:
        """Close ``old``'s batcher once the requests it took are answered (its lanes are then freed)."""
        batcher = old.batcher

        async def when_idle() -> None:
            while batcher.busy:
                await asyncio.sleep(0.05)
            batcher.close()
            old.batcher = None

        task = asyncio.get_running_loop().create_task(when_idle())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _on_sighup(self) -> None:
        """SIGHUP: load each model's checkpoint file again as its next version (failures are logged)."""
        log.warning(
            "SIGHUP: loading %s again", ", ".join(e.serving.checkpoint or e.name for e in self.entries.values())
        )

        async def reload() -> None:
            for name in self.entries:
                with contextlib.suppress(LoadError):
                    await self.load_version(model=name)

        task = asyncio.ensure_future(reload())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @staticmethod
    @torch.inference_mode()
    def _forward(predictor: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        return predictor(x).float().softmax(-1)

    @classmethod
    def _forward_images(cls, lane: Lane, images: list[Tensor]) -> tuple[list[Tensor], float]:
        """:meth:`_forward` on a batch stacked on the lane's thread, not on the event loop: a full batch is
        megabytes to copy, and the event loop only does HTTP. Returns the probabilities and the CPU
        seconds this thread spent (a backend's own threads not counted)."""
        cpu = time.thread_time()
        probs = list(cls._forward(lane.predictor, lane.stack(images)).unbind(0))
        return probs, time.thread_time() - cpu

    def _decode(self, data: bytes, version: ModelVersion) -> tuple[Tensor, float]:
        """``version``'s uint8 pixels of ``data`` on a decoding thread (its lane normalizes them), with
        the seconds taken (the batcher's wait for a burst)."""
        t0 = time.perf_counter()
        x = version.preprocess.pixels(data)
        return x, time.perf_counter() - t0

    def _limiter(self, which: int):
        import anyio

        if self._limiters is None:  # made on the event loop that uses them: decoding, lanes, large images
            workers = self.config.decode_workers or os.cpu_count() or 1
            limits = (workers, self.lanes, max(1, workers // 2))
            self._limiters = tuple(anyio.CapacityLimiter(n) for n in limits)
        return self._limiters[which]

    async def _run_batch(self, batcher: Batcher, lane: Lane, images: list[Tensor]) -> list[Tensor]:
        """One forward pass on the lane ``batcher`` gave (each image (3, H, W)) -> their probabilities."""
        import anyio

        self.metrics.batch_size.observe(len(images))
        t0 = time.perf_counter()
        probs, cpu = await anyio.to_thread.run_sync(self._forward_images, lane, images, limiter=self._limiter(1))
        dt = time.perf_counter() - t0
        batcher.observe_batch(dt, len(images))
        self.metrics.batch_latency.observe(dt)
        self.metrics.batch_cpu.inc(cpu)
        return probs

    async def classify(self, data: bytes, topk: int) -> list[dict]:
        """Decode ``data`` (off the event loop), batch it with concurrent requests, return its top-k.

        Raises :class:`~levit.runtime.serve_http.ClientError` 400 for an unreadable image. Cancelling
        it before its batch closes drops the image from the queue."""
        return (await self.classify_many([data], topk))[0]

    async def classify_many(
        self, images: list[bytes], topk: int, version: ModelVersion | None = None
    ) -> list[list[dict]]:
        """:meth:`classify` for several images at once, each batched as its own request, by ``version``
        (default: the one serving now; a request passes the one serving when it arrived)."""
        import anyio

        version = version or self.serving
        batcher = version.batcher

        async def one(data: bytes) -> Tensor:
            large = header_pixels(data) > LARGE_IMAGE_PIXELS  # its own threads, not a batch's wait
            with contextlib.nullcontext() if large else batcher.decoding_one():
                try:
                    limiter = self._limiter(2 if large else 0)
                    x, seconds = await anyio.to_thread.run_sync(self._decode, data, version, limiter=limiter)
                except ImageError as e:
                    raise ClientError(400, str(e)) from None
            if not large:
                batcher.observe_decode(seconds)
            return await batcher.submit(x)

        tasks = [asyncio.ensure_future(one(d)) for d in images]
        try:
            rows = await asyncio.gather(*tasks)
        finally:  # one image refused, or the caller gone: the others leave the queue too
            for t in tasks:
                t.cancel()
        k, names = min(topk, version.num_classes), version.names
        out = []
        for probs in rows:
            p, i = probs.topk(k)
            out.append([{"class": c, "label": names[c], "prob": round(v, 6)} for v, c in zip(p.tolist(), i.tolist())])
        self.metrics.answers.labels(version.name, version.label).inc(len(out))
        return out

    # ---- HTTP --------------------------------------------------------------------------------------
    def unready_response(self) -> Any:
        """The 503 a readiness probe (``/ready``, TorchServe's ``/ping``) gets while the server drains, its
        model failed to load (the server then stops) or is loading (with ``Retry-After``); None once ready."""
        if self.draining:
            return error_response(503, "shutting down")
        if self.load_error:
            return error_response(503, self.load_error)
        if not self.ready:
            return error_response(503, "model is loading", retry_after=LOADING_RETRY_AFTER_S)
        return None

    def _refusal(self) -> Any:
        """The 503 for a request arriving while loading or draining, else None."""
        if self.draining:
            return error_response(503, "server is shutting down", close=True)
        if not self.ready:
            return error_response(
                503, "model is loading: retry when GET /ready answers 200", retry_after=LOADING_RETRY_AFTER_S
            )
        return None

    @contextlib.asynccontextmanager
    async def _admitted(self, version: ModelVersion) -> AsyncIterator[None]:
        """One request through ``version``'s bounded queue: 429 with ``Retry-After`` beyond ``max_queue``."""
        self.in_flight += 1
        self.metrics.in_flight.inc()
        try:
            with version.batcher.admitted():
                yield
        except QueueFullError as e:
            raise ClientError(429, f"{e} (--max-queue {self.max_queue})", retry_after=e.retry_after_s) from None
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()

    async def _classify_request(
        self, request: Any, t0: float, model: str | None, version: str | None = None, *, any_type: bool = False
    ) -> tuple[list[dict], ModelVersion]:
        """The one image of ``request`` (its body, or its form's image part) classified by the version of
        ``model`` serving when it arrived (``version``: 404 unless that one), under the queue bound, the
        deadline counted from ``t0`` and the body limits: its top-k rows and the version;
        :class:`~levit.runtime.serve_http.ClientError` for a refusal. ``any_type``: as
        :func:`~levit.runtime.serve_http.read_image`'s."""
        serving = self.version_for(model, version)
        async with self._admitted(serving):
            topk = parse_topk(request.query_params.get("topk"), self.config.topk, serving.num_classes)
            timeout_s = parse_timeout(request)
            c = self.config
            data = await read_image(
                request, max_body_mb=c.max_body_mb, read_timeout_s=c.read_timeout_s, any_type=any_type
            )
            rows = await answer_within(self.classify_many([data], topk, serving), request, timeout_s, t0)
        return rows[0], serving

    async def _handle_classify(self, request: Any) -> Any:
        from fastapi.responses import JSONResponse

        t0 = time.perf_counter()
        if (refused := self._refusal()) is not None:
            return refused
        try:
            top, version = await self._classify_request(request, t0, request.query_params.get("model"))
        except ClientError as e:
            return client_error_response(e)
        ms = (time.perf_counter() - t0) * 1e3
        body = {"top": top, "model": version.name, "version": version.label, "latency_ms": round(ms, 2)}
        return JSONResponse(body, headers={"x-levit-replica": self.replica})

    async def handle_torchserve(self, request: Any, name: str, version: str | None = None) -> Any:
        """``POST`` or ``PUT /predictions/{name}[/{version}]`` (:mod:`levit.runtime.serve_torchserve`):
        the image classified as ``/v1/classify`` does, answered as TorchServe's image classifier answers."""
        from fastapi.responses import JSONResponse

        t0 = time.perf_counter()
        if (refused := self._refusal()) is not None:
            return refused
        try:
            top, serving = await self._classify_request(request, t0, name, version, any_type=True)
        except ClientError as e:
            return client_error_response(e)
        headers = {"x-levit-replica": self.replica, "x-levit-model-version": serving.label}
        return JSONResponse(torchserve_body(top), headers=headers)

    async def infer_images(
        self,
        images: list[bytes],
        topk: int,
        timeout_s: float | None = None,
        *,
        model: str | None = None,
        label: str | None = None,
    ) -> tuple[list[list[dict]], str]:
        """The top-``topk`` of each encoded image by the model named ``model`` (None: the default one)
        and the version that computed them (404 unless it is ``label``, where one is named), under the
        queue bound and the deadline ``timeout_s``, for a caller with no HTTP request (gRPC);
        :class:`~levit.runtime.serve_http.ClientError` for a refusal (503 loading or draining, 429,
        400, 404, 504)."""
        if self.draining:
            raise ClientError(503, "server is shutting down")
        if not self.ready:
            raise ClientError(503, "model is loading", retry_after=LOADING_RETRY_AFTER_S)
        version = self.version_for(model, label)
        topk = parse_topk(str(topk), self.config.topk, version.num_classes)
        async with self._admitted(version):
            if len(images) > self.max_queue:
                raise ClientError(400, f"{len(images)} images in one request: at most {self.max_queue}")
            try:
                return await asyncio.wait_for(self.classify_many(images, topk, version), timeout_s), version.label
            except TimeoutError:
                raise ClientError(504, f"no answer within the request's deadline of {timeout_s * 1e3:g} ms") from None

    async def handle_v2_infer(self, request: Any, name: str | None = None, label: str | None = None) -> Any:
        """``POST /v2/models/{name}[/versions/{label}]/infer`` (:mod:`levit.runtime.serve_kserve`): its
        images batched as classify requests are, under the same queue bound, deadline and limits, by the
        version of the model ``name`` (None: the default one) serving when it arrived (404 unless it is
        ``label``, where one is named)."""
        from fastapi.responses import Response

        t0 = time.perf_counter()
        if (refused := self._refusal()) is not None:
            return refused
        c = self.config
        try:
            version = self.version_for(name, label)
            async with self._admitted(version):
                timeout_s = parse_timeout(request)
                body = await read_body(request, max_body_mb=c.max_body_mb, read_timeout_s=c.read_timeout_s)
                req = parse_request(body, request.headers.get(HEADER_LENGTH))
                topk = parse_topk(None if req.topk is None else str(req.topk), c.topk, version.num_classes)
                if len(req.images) > self.max_queue:
                    raise ClientError(400, f"{len(req.images)} images in one request: at most {self.max_queue}")
                timeout_s = min(t for t in (timeout_s, req.timeout_s, math.inf) if t is not None)
                work = self.classify_many(req.images, topk, version)
                rows = await answer_within(work, request, None if timeout_s == math.inf else timeout_s, t0)
        except ClientError as e:
            return client_error_response(e)
        content, headers = encode_response(req, rows, version.name, version.label)
        return Response(content, headers={**headers, "x-levit-replica": self.replica})

    def build_app(self) -> Any:
        """The FastAPI app: ``POST /v1/classify``, ``GET /health``, ``/ready``, ``/metrics`` and ``/docs``."""
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse, Response

        app = FastAPI(
            title="levit serve",
            description=f"LeViT image classification: {self.model_name}",
            lifespan=self._lifespan,
        )

        async def classify(request):  # type: ignore[no-untyped-def]
            return await self._handle_classify(request)

        # FastAPI reads the annotations as objects: the module's `from __future__ import annotations`
        # would leave the string "Request", which it cannot resolve from inside this function
        classify.__annotations__ = {"request": Request, "return": Response}
        app.post("/v1/classify", openapi_extra=CLASSIFY_OPENAPI, response_model=None)(classify)

        @app.get("/health")
        async def health() -> dict:
            return {"status": "alive"}

        @app.get("/ready", response_model=None)
        async def ready() -> Response:
            if (unready := self.unready_response()) is not None:
                return unready
            models = {name: e.serving.label for name, e in self.entries.items()}
            return JSONResponse(
                {"status": "ready", "model": self.model_name, "version": self.serving.label, "models": models}
            )

        @app.get("/metrics", response_model=None)
        async def metrics() -> Response:
            body, ctype = self.metrics.exposition()
            if self.ray_board is not None:  # every replica's series, each labelled with its replica
                from .serve_ray_metrics import scrape

                body = await scrape(self.replica, body, self.ray_board)
            return Response(body, media_type=ctype)

        add_v2_routes(app, self)
        add_torchserve_routes(app, self)
        json_errors(app)

        return AccessLog(app, self.metrics, quiet=self.config.quiet)

    async def forward(
        self, method: str, path: str, query: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """One HTTP request, whole, through this service's own app in this process: its status, headers
        and body. What a Ray Serve replica answers for :class:`levit.runtime.serve_ray_front.Front`,
        which reads the request and retries it on another replica when this one is lost."""
        if self._app is None:
            from .serve_ray_metrics import board, post_every

            setup_logging(self.config.quiet)
            self.ray_board = board()
            self._app = self.build_app()
            exposition = lambda: self.metrics.exposition()[0]  # noqa: E731
            poster = asyncio.get_running_loop().create_task(post_every(self.replica, exposition, self.ray_board))
            self._background.add(poster)
            if self.ready:  # loaded in the replica's constructor, in a process that only serves it
                freeze_heap()
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query.encode(),
            "root_path": "",
            "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
            "client": ("ray", 0),
            "server": ("levit", 80),
        }
        sent = [{"type": "http.request", "body": body, "more_body": False}]
        answer: dict[str, Any] = {"status": 500, "headers": [], "body": []}

        async def receive() -> dict:
            if sent:
                return sent.pop()
            await asyncio.Event().wait()  # the whole body was given: the client never leaves
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
                answer["headers"] = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message["headers"]]
            elif message["type"] == "http.response.body":
                answer["body"].append(message.get("body", b""))

        await self._app(scope, receive, send)
        return answer["status"], answer["headers"], b"".join(answer["body"])

    def __serve_build_asgi_app__(self) -> Any:  # Ray Serve: the app of each replica (its log goes to Ray's)
        from .serve_ray_metrics import board

        setup_logging(self.config.quiet)
        self.ray_board = board()
        if self.ready:  # loaded in the replica's constructor, in a process that only serves it
            freeze_heap()
        return self.build_app()

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Any) -> AsyncIterator[None]:
        grpc_server = await self._start_grpc()
        task = None
        loop = asyncio.get_running_loop()
        if not self.ready and self.load_error is None:
            task = loop.run_in_executor(None, self._load_logged)
        if self.own_process and hasattr(signal, "SIGHUP"):
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        poster = None
        if self.ray_board is not None:
            from .serve_ray_metrics import post_every

            poster = loop.create_task(post_every(self.replica, lambda: self.metrics.exposition()[0], self.ray_board))
        yield
        if poster is not None:
            poster.cancel()
        if self.own_process and hasattr(signal, "SIGHUP"):
            loop.remove_signal_handler(signal.SIGHUP)
        if grpc_server is not None:  # in-flight calls were drained with the HTTP ones (in_flight)
            await grpc_server.stop(grace=1.0)
        if task is not None:
            with contextlib.suppress(BaseException):
                await task

    async def _start_grpc(self) -> Any:
        """The KServe v2 gRPC server on ``config.grpc_port`` (None: none); a port that cannot be bound
        stops the server as a model that fails to load does."""
        c = self.config
        if c.grpc_port is None or not self.own_process:
            return None
        from .serve_grpc import start_grpc

        try:
            return (await start_grpc(self, c.host, c.grpc_port))[0]
        except RuntimeError as e:
            self.load_error = f"{first_line(e)} (--grpc-port)"
            log.error(self.load_error)
            return None

    def _load_logged(self) -> None:
        try:
            self.load()
        except Exception as e:  # reported by the server, which then exits 1
            self.load_error = f"the model failed to load: {first_line(e)}"
            log.error(self.load_error)
            return
        if self.own_process:
            freeze_heap()
