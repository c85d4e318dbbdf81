"""``levit serve``: image classification over HTTP with dynamic batching.

One application class, :class:`LeViTService`, runs in two engines:

- one process: its FastAPI app on uvicorn (:func:`run_server`), the default;
- Ray Serve: the same class as a deployment of N replicas behind Ray's router
  (:mod:`levit.runtime.serve_ray`).

Requests are batched by Ray Serve's batcher (``ray.serve.batch``) in both: concurrent requests that
arrive within ``max_wait_ms`` of each other (while every model lane is busy, until the first is
free: :meth:`LeViTService._retune_wait`) run as one forward pass of up to ``max_batch_size`` images.
A batch with a lane free for it goes as soon as no request is being decoded to join it
(:meth:`LeViTService._batch_size`): a lone request does not wait ``max_wait_ms``, and the requests of
a burst go together rather than the first one or two decoded taking the lane alone.
Decoding and preprocessing are :class:`levit.runtime.pipeline.Preprocess` (the code ``levit predict``
runs), on a bounded thread pool off the event loop. The model runs as *lanes*, as in
``levit predict``: on a CPU, one copy of the backend (:func:`levit.deploy`, fused when the model can
be) per core, each on one thread and each computing its own batch, so that up to that many batches
are in flight at once. Requests under load come in ones and twos: a backend splitting a batch of 1
or 2 over all the cores spends most of the extra threads waiting (LeViT-128S on OpenVINO, 2-core
machine: 10.6 CPU ms per image at batch 1 on 2 threads against 8.0 on 1 thread; 9.0 against 7.7 at
batch 2). On a GPU one lane runs one batch at a time.

Bad input never reaches a batch: it is answered 400 (not an image, truncated, empty, too many
pixels), 413 (body over the limit) or 415 (not an image media type) by the request's own coroutine.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import LeViTError
from ..models.config import DEFAULT_CROP_PCT
from ..utils import available_cpus, first_line
from .pipeline import ImageError, Preprocess, lane_layout

__all__ = ["ROUTES", "ClientError", "LeViTService", "ServeConfig", "listen", "run_server", "setup_logging"]

log = logging.getLogger("levit.serve")
access_log = logging.getLogger("levit.serve.access")

ROUTES = ("/v1/classify", "/health", "/ready", "/metrics", "/docs", "/openapi.json")
# Content types read as image bytes (the decoder sniffs the format); anything else is 415.
_IMAGE_TYPES = ("image/", "application/octet-stream")
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class ServeConfig:
    """Everything the service and its server need besides the model (picklable, for Ray replicas)."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 32  # levit predict's CPU batch
    max_wait_ms: float = 5.0
    max_body_mb: float = 20.0
    max_pixels: int = 50_000_000  # header check before decoding: a 30000x30000 PNG never gets decoded
    topk: int = 5
    crop_pct: float = DEFAULT_CROP_PCT
    backend: str = "auto"
    precision: str = "fp32"
    threads: int | None = None  # CPU threads per model lane (None: cores // lanes; pipeline.lane_layout)
    lanes: int | None = None  # batches computed at once (None: cores // threads, or a lane per core up to 8)
    decode_workers: int | None = None  # threads decoding at once (None: the CPU count); bounds memory too
    read_timeout_s: float = 30.0  # a client that has not sent its whole body by then gets 408
    drain_timeout_s: float = 30.0  # SIGTERM: longest wait for in-flight requests
    quiet: bool = False
    model_name: str | None = None  # reported in each answer (default: the model's variant)
    calibration: tuple[str, ...] | None = None  # int8: calibration image files/folders


class ClientError(Exception):
    """A request the service refuses: its status code and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


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
        self.queue_depth = Gauge("levit_queue_depth", "decoded images waiting for a batch", registry=r)
        self.in_flight = Gauge("levit_in_flight", "POST /v1/classify requests being handled", registry=r)
        self.ready = Gauge("levit_ready", "1 once the model is loaded and warmed up", registry=r)

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _allow_batching_outside_a_replica() -> None:
    """Let Ray Serve's batcher run in a plain asyncio process (the single-process server).

    ``ray.serve.batch`` needs no Ray cluster: its queue is an ``asyncio.Queue`` on the running loop.
    The one call that assumes a replica is a warning check on creating the queue, which compares the
    batch size with the replica's ``max_ongoing_requests``; outside a replica there is no such limit,
    so there (and only there: the check raises ``RayServeException``) it is skipped.
    """
    from ray.serve import batching
    from ray.serve.exceptions import RayServeException

    queue = batching._BatchQueue
    original = queue._warn_if_max_batch_size_exceeds_max_ongoing_requests
    if getattr(original, "_levit_wrapped", False):
        return

    def check(self: Any) -> None:
        with contextlib.suppress(RayServeException):
            original(self)

    check._levit_wrapped = True  # type: ignore[attr-defined]
    queue._warn_if_max_batch_size_exceeds_max_ongoing_requests = check


def _warmup_image(size: int = 320) -> bytes:
    """A photo-like PNG (smooth gradients and edges) for the warm-up requests."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    rgb = np.stack([x, y, (x * y + ((x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.1)) / 2], -1)
    buf = io.BytesIO()
    Image.fromarray((rgb * 255).clip(0, 255).astype("uint8")).save(buf, format="PNG")
    return buf.getvalue()


class LeViTService:
    """The application: model, preprocessing, batching, metrics and the HTTP routes.

    ``LeViTService(model, config)`` then :meth:`build_app` gives the ASGI app; the model is deployed
    and warmed up by :meth:`load` (at start-up in the background when ``load_now`` is False, so that
    ``/health`` answers while ``/ready`` still says 503). Ray Serve builds the same app per replica
    through ``__serve_build_asgi_app__``.
    """

    def __init__(self, model: nn.Module, config: ServeConfig = ServeConfig(), *, load_now: bool = False) -> None:
        from ray import serve

        from .predict import class_names_for

        _allow_batching_outside_a_replica()
        self.config = config
        self.model = model.eval()
        self.model_name = config.model_name or model.config.name
        self.names = class_names_for(model)
        self.num_classes = len(self.names)
        self.preprocess = Preprocess.for_model(model, crop_pct=config.crop_pct, max_pixels=config.max_pixels)
        self.metrics = _Metrics()
        self.lanes, self.lane_threads = lane_layout(config.lanes, config.threads, available_cpus())
        if next(model.parameters()).device.type != "cpu":  # a GPU runs one batch at a time
            self.lanes, self.lane_threads = 1, config.threads
        self._free: list[Callable[[Tensor], Tensor]] = []  # the lanes' predictors not computing a batch
        self._lanes_changed = asyncio.Event()  # set (and replaced) when a lane frees or a batch stops waiting
        self._waiting: dict[int, int] = {}  # batches formed, waiting for a lane: images, in arrival order
        self._forming = 0  # images handed to the batcher and not yet in a batch
        self._running: dict[int, tuple[float, int]] = {}  # batches being computed: (start, images)
        self._per_image_s = 0.0  # a lane's seconds per image (moving average; from the warm-up at first)
        self._decoding = 0  # requests decoding their image or waiting for a decoding thread
        self._per_decode_s = 0.0  # one decode's seconds (moving average; from the warm-up at first)
        self._decoded_at: dict[int, float] = {}  # an image (its id) given to the batcher -> when
        self.ready = False
        self.draining = False
        self.in_flight = 0
        self.load_error: str | None = None
        self.replica = f"{socket.gethostname()}:{os.getpid()}"  # which process answered (a header)
        self.own_process = False  # run_server's process serves only this: _load_logged freezes the heap
        self._limiters: tuple | None = None
        # Ray Serve's batcher, made per instance so that its queue lives on this instance's event loop.
        # It hands over up to two batches per lane (_run_batch waits for a lane, so that the batches
        # waiting are known to _retune_wait; with the stretched wait more than one rarely waits)
        self._classify = serve.batch(
            max_batch_size=config.max_batch_size,
            batch_wait_timeout_s=config.max_wait_ms / 1e3,
            max_concurrent_batches=2 * self.lanes,
            batch_size_fn=self._batch_size,
        )(self._run_batch)
        if load_now:
            self.load()

    # ---- the model ------------------------------------------------------------------------------
    def load(self) -> None:
        """Deploy the model on the configured backend, once per lane, and warm each lane up (batch 1
        and a full batch)."""
        from .deploy import deploy_lanes

        c = self.config
        t0 = time.perf_counter()
        if self.lanes > 1 and self.lane_threads:
            # every lane's predictor sets torch to the same count: set it once, so that no lane's
            # restore (levit.utils.num_threads) changes another lane's count mid-batch
            torch.set_num_threads(self.lane_threads)
        lanes = deploy_lanes(
            self.model,
            self.lanes,
            threads=self.lane_threads,
            backend=c.backend,
            precision=c.precision,
            batch_size=c.max_batch_size,
            calibration=list(c.calibration) if c.calibration else None,
        )
        first = lanes[0]
        x, self._per_decode_s = self._decode(_warmup_image())
        for p in lanes:
            for n in (1, c.max_batch_size, 1):
                t = time.perf_counter()
                self._forward(p, x.expand(n, *x.shape).contiguous())
                if n > 1:
                    self._per_image_s = (time.perf_counter() - t) / n
        self._free = lanes
        self.ready = True
        self.metrics.ready.set(1)
        log.info(
            "model %s ready: %s %s, %d lane(s) of %s thread(s), batches of up to %d within %g ms, warm-up %.1f s",
            self.model_name,
            getattr(first, "backend", "?"),
            getattr(first, "precision", "?"),
            self.lanes,
            self.lane_threads or "the runtime's",
            c.max_batch_size,
            c.max_wait_ms,
            time.perf_counter() - t0,
        )

    @staticmethod
    @torch.inference_mode()
    def _forward(predictor: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        return predictor(x).float().softmax(-1)

    @classmethod
    def _forward_images(cls, predictor: Callable[[Tensor], Tensor], images: list[Tensor]) -> list[Tensor]:
        """:meth:`_forward` on a batch stacked on the lane's thread, not on the event loop (a batch of 32
        is 19 MB to copy)."""
        return list(cls._forward(predictor, torch.stack(images)).unbind(0))

    def _decode(self, data: bytes) -> tuple[Tensor, float]:
        """:attr:`preprocess` on a decoding thread, with its seconds (for :meth:`_batch_size`)."""
        t0 = time.perf_counter()
        x = self.preprocess(data)
        return x, time.perf_counter() - t0

    def _limiter(self, which: int):
        import anyio

        if self._limiters is None:  # made on the event loop that uses them
            workers = self.config.decode_workers or os.cpu_count() or 1
            self._limiters = (anyio.CapacityLimiter(workers), anyio.CapacityLimiter(self.lanes))
        return self._limiters[which]

    async def _run_batch(self, images: list[Tensor]) -> list[Tensor]:
        """One forward pass for the images the batcher collected (each (3, H, W)) -> their probabilities,
        on the first model lane free (batches take the lanes in the order they were formed)."""
        import anyio

        m, n, key = self.metrics, len(images), id(images)
        self._forming = max(0, self._forming - n)
        self._waiting[key] = n
        try:
            self._retune_wait()
            # FIFO: a batch goes once it is the oldest waiting and a lane is free
            while not (self._free and next(iter(self._waiting)) == key):
                await self._lanes_changed.wait()
            predictor = self._free.pop()
        finally:
            del self._waiting[key]
            self._wake()
        m.queue_depth.dec(n)
        m.batch_size.observe(n)
        t0 = time.perf_counter()
        self._running[key] = (t0, n)
        self._retune_wait()
        try:
            probs = await anyio.to_thread.run_sync(self._forward_images, predictor, images, limiter=self._limiter(1))
        finally:
            dt = time.perf_counter() - t0
            del self._running[key]
            self._free.append(predictor)
            self._per_image_s = 0.8 * self._per_image_s + 0.2 * dt / n
            self._retune_wait()
            self._wake()
        m.batch_latency.observe(dt)
        return probs

    def _batch_size(self, images: list[Tensor]) -> int:
        """The size Ray Serve's batcher gives a forming batch (its ``batch_size_fn``, read each time a
        request joins): the image count, or ``max_batch_size``, which closes the batch at once, when a
        lane is free for it and waiting longer would only add latency: no request is being decoded (so
        none is about to join), the batch has its share of those here and being decoded (one batch per
        free lane: a burst on two free lanes goes as two batches, computed at once), or the oldest
        image has waited as long as decoding a full batch takes.

        With only the wait (``max_wait_ms`` while a lane is free), a burst (the clients of a full batch
        just answered, sending again) split: the first one or two decoded took the free lane alone and
        the rest waited a whole batch for the next lane (LeViT-128S, 64 clients, 2-core machine: a
        third of the batches had under 9 images). The wait is stretched meanwhile (:meth:`_retune_wait`),
        so that the batch does not close before the burst is decoded. (With this hook Ray's batcher
        moves an image that would overflow the batch to the back of its queue: that takes more images
        arriving between two of its turns than the batch has room left for.)"""
        n, full = len(images), self.config.max_batch_size
        free = len(self._free) - len(self._waiting)  # lanes free for this batch
        if n >= full or free <= 0:
            return n  # full, or no lane for it yet: _retune_wait's wait closes it
        # its share of the requests here and on their way, with the free lanes taking one batch each
        if self._decoding and n * free < n + self._decoding:
            now = time.perf_counter()
            if now - self._decoded_at.get(id(images[0]), now) < self._full_decode_s():
                return n
        return full

    def _full_decode_s(self) -> float:
        """Seconds to decode a full batch on the decoding threads (the wait for a burst)."""
        threads = self._limiter(0).total_tokens
        return self.config.max_batch_size * self._per_decode_s / min(threads, self.config.max_batch_size)

    def _wake(self) -> None:
        """Let the batches waiting for a lane look again (a lane freed, or the oldest stopped waiting)."""
        event, self._lanes_changed = self._lanes_changed, asyncio.Event()
        event.set()

    def _retune_wait(self) -> None:
        """Ray Serve's batcher closes a batch when its wait ends whether or not a lane is free to
        compute it, so under load it would queue batches of one or two images behind busy lanes.
        So the wait for the next batch is stretched to when a lane should be free for it: after the
        batches computing, those waiting and the one forming (at most two full batches' time). The
        requests that would wait for a lane anyway then fill one batch. With a lane free for it, the
        wait is ``max_wait_ms``. (The batcher reads the wait when a batch starts forming.)"""
        import heapq

        wait = self.config.max_wait_ms / 1e3
        per = self._per_image_s
        ahead = list(self._waiting.values())
        if self._forming:
            ahead.append(min(self._forming, self.config.max_batch_size))
        if per > 0 and (ahead or len(self._running) >= self.lanes):
            now = time.perf_counter()
            free_at = [t0 + per * n for t0, n in self._running.values()]
            free_at += [now] * (self.lanes - len(free_at))
            heapq.heapify(free_at)
            for n in ahead:  # the batches waiting and forming take the lanes in turn
                heapq.heappush(free_at, max(heapq.heappop(free_at), now) + per * n)
            wait = max(wait, min(free_at[0] - now, 2 * per * self.config.max_batch_size))
        if self._decoding:  # wait for the requests being decoded (_batch_size closes the batch sooner)
            wait = max(wait, self._full_decode_s())
        self._classify.set_batch_wait_timeout_s(wait)

    async def classify(self, data: bytes, topk: int) -> list[dict]:
        """Decode ``data`` (off the event loop), batch it with concurrent requests, return its top-k."""
        import anyio

        self._decoding += 1
        try:
            x, seconds = await anyio.to_thread.run_sync(self._decode, data, limiter=self._limiter(0))
        except ImageError as e:
            raise ClientError(400, str(e)) from None
        finally:
            self._decoding -= 1
        self._per_decode_s = 0.9 * self._per_decode_s + 0.1 * seconds
        self.metrics.queue_depth.inc()
        self._forming += 1
        self._decoded_at[id(x)] = time.perf_counter()
        self._retune_wait()  # the batcher reads the wait when this image starts a batch
        try:
            probs = await self._classify(x)
        finally:
            del self._decoded_at[id(x)]
        p, i = probs.topk(min(topk, self.num_classes))
        return [{"class": c, "label": self.names[c], "prob": round(v, 6)} for v, c in zip(p.tolist(), i.tolist())]

    # ---- reading a request ----------------------------------------------------------------------
    def _topk(self, text: str | None) -> int:
        if text is None:
            return self.config.topk
        try:
            k = int(text)
        except ValueError:
            k = 0
        if not 1 <= k <= self.num_classes:
            raise ClientError(400, f"topk must be an integer from 1 to {self.num_classes}, got {text!r}")
        return k

    async def _read_body(self, request: Any) -> bytes:
        """The request body, refused (413) as soon as it passes the limit, (408) if it takes too long."""
        import anyio
        from starlette.requests import ClientDisconnect

        limit = int(self.config.max_body_mb * 2**20)
        too_big = ClientError(413, f"request body over the {self.config.max_body_mb:g} MB limit (--max-body-mb)")
        declared = request.headers.get("content-length", "")
        chunks, n = [], 0
        try:
            if declared.isdigit() and int(declared) > limit:
                await _discard(request.stream(), limit)
                raise too_big
            with anyio.fail_after(self.config.read_timeout_s):
                async for chunk in request.stream():
                    n += len(chunk)
                    if n > limit:
                        await _discard(request.stream(), limit)
                        raise too_big
                    chunks.append(chunk)
        except TimeoutError:
            raise ClientError(408, f"request body not received within {self.config.read_timeout_s:g} s") from None
        except ClientDisconnect:
            raise ClientError(499, "client disconnected before sending the whole body") from None
        return b"".join(chunks)

    async def _image_bytes(self, request: Any) -> bytes:
        """The image in a request: the raw body (an image media type) or the one file of a multipart form."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        multipart = ctype == "multipart/form-data"
        if ctype and not multipart and not ctype.startswith(_IMAGE_TYPES):
            raise ClientError(
                415,
                f"unsupported media type {ctype!r}: send the image bytes (image/jpeg, image/png, image/webp, "
                "application/octet-stream) or multipart/form-data with one file",
            )
        body = await self._read_body(request)
        if multipart:
            body = await _form_file(request.headers, body)
        if not body:
            raise ClientError(400, "empty body: expected the bytes of one image (JPEG, PNG, WebP, ...)")
        return body

    # ---- HTTP --------------------------------------------------------------------------------------
    async def _handle_classify(self, request: Any) -> Any:
        from fastapi.responses import JSONResponse

        t0 = time.perf_counter()
        if self.draining:
            return _error(503, "server is shutting down", close=True)
        if not self.ready:
            return _error(503, "model is loading: retry when GET /ready answers 200")
        self.in_flight += 1
        self.metrics.in_flight.inc()
        try:
            topk = self._topk(request.query_params.get("topk"))
            top = await self.classify(await self._image_bytes(request), topk)
        except ClientError as e:
            return _error(e.status, str(e), close=e.status in (408, 413, 499))
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()
        ms = (time.perf_counter() - t0) * 1e3
        body = {"top": top, "model": self.model_name, "latency_ms": round(ms, 2)}
        return JSONResponse(body, headers={"x-levit-replica": self.replica})

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
        app.post("/v1/classify", openapi_extra=_CLASSIFY_OPENAPI, response_model=None)(classify)

        @app.get("/health")
        async def health() -> dict:
            return {"status": "alive"}

        @app.get("/ready", response_model=None)
        async def ready() -> Response:
            if self.draining:
                return _error(503, "shutting down")
            if not self.ready:
                return _error(503, self.load_error or "model is loading")
            return JSONResponse({"status": "ready", "model": self.model_name})

        @app.get("/metrics", response_model=None)
        async def metrics() -> Response:
            body, ctype = self.metrics.exposition()
            return Response(body, media_type=ctype)

        return _AccessLog(app, self)

    def __serve_build_asgi_app__(self) -> Any:  # Ray Serve: the app of each replica (its log goes to Ray's)
        setup_logging(self.config.quiet)
        if self.ready:  # loaded in the replica's constructor, in a process that only serves it
            _freeze_heap()
        return self.build_app()

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Any) -> AsyncIterator[None]:
        task = None
        if not self.ready and self.load_error is None:
            task = asyncio.get_running_loop().run_in_executor(None, self._load_logged)
        yield
        if task is not None:
            with contextlib.suppress(BaseException):
                await task

    def _load_logged(self) -> None:
        try:
            self.load()
        except Exception as e:  # reported by the server, which then exits 1
            self.load_error = f"the model failed to load: {first_line(e)}"
            log.error(self.load_error)
            return
        if self.own_process:
            _freeze_heap()


def _freeze_heap() -> None:
    """Put everything alive once the model is loaded (the libraries, the model) out of the garbage
    collector's reach, in a process that only serves: a full collection then scans what requests
    create, not the ~460,000 objects of torch, OpenVINO, FastAPI and Ray. Each full collection took
    about 220-270 ms, holding the GIL: the event loop stopped, the lanes waited for batches, and the
    requests of that moment made the p99 (LeViT-128S, 64 clients, 2-core machine: one such pause per
    20 s of load). Objects made before it are never collected as cycles, only by reference count."""
    import gc

    gc.collect()
    gc.freeze()


async def _discard(stream: AsyncIterator[bytes], limit: int, seconds: float = 2.0) -> None:
    """Read and drop up to ``4 * limit`` more bytes, for at most ``seconds``, before a 413 (a lingering
    close, as nginx does): a client still uploading then reads the answer instead of a reset connection."""
    import anyio

    budget = 4 * limit
    with anyio.move_on_after(seconds):
        async for chunk in stream:
            budget -= len(chunk)
            if budget <= 0:
                break


def _error(status: int, message: str, *, close: bool = False) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status, headers={"connection": "close"} if close else None)


async def _form_file(headers: Any, body: bytes) -> bytes:
    """The bytes of the one file in a multipart/form-data body (400 if there is none or it is malformed)."""
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def stream() -> AsyncIterator[bytes]:
        yield body

    try:
        form = await MultiPartParser(headers, stream(), max_files=1, max_fields=16).parse()
    except MultiPartException as e:
        raise ClientError(400, f"malformed multipart/form-data: {first_line(e)}") from None
    try:
        files = [v for v in form.values() if isinstance(v, UploadFile)]
        if not files:
            raise ClientError(400, "multipart/form-data without a file: expected one image file field")
        return await files[0].read()
    finally:
        await form.close()


_CLASSIFY_OPENAPI = {
    "summary": "Classify one image",
    "description": "The body is the image (JPEG, PNG, WebP, 16-bit PNG, ...) or a multipart form with one file. "
    "Answers `{top: [{class, label, prob}], model, latency_ms}`; 400 unreadable image, 413 body too "
    "large, 415 unsupported media type, 503 loading or shutting down.",
    "parameters": [
        {"name": "topk", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1}},
    ],
    "requestBody": {
        "required": True,
        "content": {
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}
            },
        },
    },
}


class _AccessLog:
    """ASGI middleware: one access-log line and the request counter per HTTP request."""

    def __init__(self, app: Any, service: LeViTService) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        state = {"status": 500, "bytes": 0}

        async def send_logged(message: dict) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            elif message["type"] == "http.response.body":
                state["bytes"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_logged)
        finally:
            dt = time.perf_counter() - t0
            path, status = scope["path"], state["status"]
            route = path if path in ROUTES else "other"
            m = self.service.metrics
            m.requests.labels(route, str(status)).inc()
            if route == "/v1/classify" and status == 200:
                m.latency.observe(dt)
            if not self.service.config.quiet:
                client = "{}:{}".format(*scope["client"]) if scope.get("client") else "-"
                qs = scope.get("query_string", b"").decode("latin-1")
                target = f"{path}?{qs}" if qs else path
                access_log.info(
                    '%s "%s %s" %d %.1fms %dB', client, scope["method"], target, status, dt * 1e3, state["bytes"]
                )


# ---- the single-process server -------------------------------------------------------------------
def setup_logging(quiet: bool) -> None:
    """One line per event on stderr; the access log only without ``quiet``."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    for logger in (log, access_log):
        logger.handlers[:] = [handler]
        logger.propagate = False
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    access_log.setLevel(logging.WARNING if quiet else logging.INFO)


def _server_class() -> type:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn, with SIGTERM draining: new requests get 503 while the in-flight ones finish, then
        the listener closes and the process exits 0 (uvicorn alone would re-raise the signal)."""

        service: LeViTService
        drain_deadline: float | None = None

        def handle_exit(self, sig: int, frame: Any) -> None:
            if sig == signal.SIGTERM and not self.should_exit:
                if self.drain_deadline is None:
                    self.service.draining = True
                    self.drain_deadline = time.monotonic() + self.service.config.drain_timeout_s
                    log.info("SIGTERM: draining %d in-flight request(s)", self.service.in_flight)
                return
            super().handle_exit(sig, frame)

        async def on_tick(self, counter: int) -> bool:
            s = self.service
            if self.drain_deadline is not None and (s.in_flight == 0 or time.monotonic() > self.drain_deadline):
                self.should_exit = True
            if s.load_error is not None:
                self.should_exit = True
            return await super().on_tick(counter)

    return DrainingServer


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one), or :class:`LeViTError` saying why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise LeViTError(f"cannot listen on {host}:{port} (--host/--port): {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def run_server(service: LeViTService, sock: socket.socket | None = None) -> int:
    """Serve ``service`` until SIGTERM (drains, returns 0) or Ctrl+C, on ``sock`` (default: a socket
    on the configured host and port).

    The socket listens before the model is warmed up: ``/health`` answers at once and ``/ready``
    once the model has run. A model that fails to load stops the server with :class:`LeViTError`.
    """
    import uvicorn

    c = service.config
    setup_logging(c.quiet)
    sock = sock or listen(c.host, c.port)
    host, port = sock.getsockname()[:2]
    log.warning("serving %s on http://%s:%d (ready once GET /ready answers 200)", service.model_name, host, port)
    config = uvicorn.Config(
        service.build_app(),
        host=c.host,
        port=c.port,
        log_level="warning" if c.quiet else "info",
        access_log=False,  # ours has the latency and the size
        timeout_graceful_shutdown=int(c.drain_timeout_s) + 1,
        lifespan="on",
    )
    server = _server_class()(config)
    server.service = service
    service.own_process = True
    server.run(sockets=[sock])
    if service.load_error is not None:
        raise LeViTError(service.load_error)
    return 0
