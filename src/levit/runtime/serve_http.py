"""The server's HTTP protocol: what a classify request may carry and how each refusal is answered.

This module owns the wire side of :class:`levit.runtime.serve.LeViTService`: reading the image of a
``POST /v1/classify`` (raw bytes of an image media type, or the one file of a multipart form, or its
field named ``data``), the limits a body must meet (size, read time), the ``topk`` parameter, the
one-line JSON errors, the OpenAPI description of the route and the access log. Bad input is refused here, by the request's own
coroutine, before any batch sees it: 400 (not an image, truncated, empty, bad ``topk``, a form without
a file), 408 (body too slow), 413 (body over the limit), 415 (not an image media type), 499 (the
client left mid-upload, for the metrics).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from ..utils import first_line

__all__ = [
    "CLASSIFY_OPENAPI",
    "IMAGE_TYPES",
    "INFER_ROUTE",
    "PREDICTIONS_ROUTE",
    "ROUTES",
    "TIMEOUT_HEADER",
    "AccessLog",
    "ClientError",
    "answer_within",
    "client_error_response",
    "error_response",
    "parse_timeout",
    "parse_topk",
    "read_body",
    "read_image",
    "route_of",
]

access_log = logging.getLogger("levit.serve.access")

ROUTES = (
    "/v1/classify",
    "/health",
    "/ready",
    "/metrics",
    "/docs",
    "/openapi.json",
    "/v2/health/live",
    "/v2/health/ready",
    "/v2",
    "/v2/repository/index",
    "/ping",
)
INFER_ROUTE = "/v2/models/{name}/infer"  # the metrics' label for every model's inference route
PREDICTIONS_ROUTE = "/predictions/{name}"  # and for TorchServe's, whatever the model and version


def route_of(path: str) -> str:
    """The metrics' route label of a request path: one of :data:`ROUTES`, the v2 inference route
    (whatever the model name), the other v2 model routes, TorchServe's predictions, or ``other``."""
    if path in ROUTES:
        return path
    if path.startswith("/v2/models/"):
        return INFER_ROUTE if path.endswith("/infer") else "/v2/models/{name}"
    if path.startswith("/v2/repository/models/"):
        return "/v2/repository/models/{name}/load"
    if path.startswith("/predictions/"):
        return PREDICTIONS_ROUTE
    return "other"


# Content types read as image bytes (the decoder sniffs the format); anything else is 415.
IMAGE_TYPES = ("image/", "application/octet-stream")
# Statuses after which the connection is closed: the rest of the body may still be on its way.
CLOSE_AFTER = (408, 413, 499)


class ClientError(Exception):
    """A request the service refuses: its status code and a one-line message (``retry_after``: seconds,
    for a 429's ``Retry-After``)."""

    def __init__(self, status: int, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


def client_error_response(error: ClientError) -> Any:
    """The JSON answer to a :class:`ClientError`: its status, its ``Retry-After`` if it has one (a 429,
    a 503 while loading), the connection closed after a status of :data:`CLOSE_AFTER` (the rest of
    the body may still be on its way)."""
    return error_response(error.status, str(error), close=error.status in CLOSE_AFTER, retry_after=error.retry_after)


# The request's own deadline: this header, or the ``timeout_ms`` query parameter.
TIMEOUT_HEADER = "x-request-timeout-ms"


def parse_timeout(request: Any) -> float | None:
    """The request's deadline in seconds (``X-Request-Timeout-Ms`` header or ``?timeout_ms=``), None
    without one; 400 unless a positive number."""
    text = request.headers.get(TIMEOUT_HEADER) or request.query_params.get("timeout_ms")
    if text is None:
        return None
    try:
        ms = float(text)
    except ValueError:
        ms = 0.0
    if not 0 < ms < float("inf"):
        raise ClientError(400, f"{TIMEOUT_HEADER} / timeout_ms must be a positive number of ms, got {text!r}")
    return ms / 1e3


async def answer_within(work: Awaitable[Any], request: Any, timeout_s: float | None, t0: float) -> Any:
    """Await ``work`` unless the client leaves first (:class:`ClientError` 499) or the deadline
    ``timeout_s`` after ``t0`` (``time.perf_counter()``) passes (504); either way ``work`` is cancelled,
    so a request still in the batcher's queue is never computed."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_client_gone(request))
    left = None if timeout_s is None else timeout_s - (time.perf_counter() - t0)
    try:
        if left is not None and left <= 0:
            raise ClientError(504, f"no answer within the request's deadline of {timeout_s * 1e3:g} ms")
        done, _ = await asyncio.wait({task, gone}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        if gone in done:
            raise ClientError(499, "client disconnected before its answer")
        raise ClientError(504, f"no answer within the request's deadline of {timeout_s * 1e3:g} ms")
    finally:
        task.cancel()
        gone.cancel()


async def _client_gone(request: Any) -> None:
    """Returns once the client has disconnected (the body already read, the next ASGI message is the
    disconnect); never returns where the server cannot tell."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception:  # a server that cannot say: wait for the answer or the deadline
        await asyncio.Event().wait()


# ``Retry-After`` of a 503 while the model loads (one process, or Ray's replicas): clients poll about once
# a second instead of at once in a loop
LOADING_RETRY_AFTER_S = 1


def error_response(status: int, message: str, *, close: bool = False, retry_after: int | None = None) -> Any:
    """The JSON answer ``{"error": message}`` with ``status`` (``close``: the connection closes after it;
    ``retry_after``: seconds, its ``Retry-After``)."""
    from fastapi.responses import JSONResponse

    headers = {"connection": "close"} if close else {}
    if retry_after is not None:
        headers["retry-after"] = str(retry_after)
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


def json_errors(app: Any) -> None:
    """Answer the framework's own refusals (404 no such route, 405 wrong method, 422 a bad path
    parameter) as every other error is: ``{"error": ...}``, FastAPI's headers (``Allow``) kept."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    async def http_error(request: Any, exc: HTTPException) -> Any:
        response = error_response(exc.status_code, str(exc.detail))
        response.headers.update(exc.headers or {})
        return response

    async def invalid(request: Any, exc: RequestValidationError) -> Any:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(422, f"{where}: {first.get('msg', 'invalid request')}")

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)


def parse_topk(text: str | None, default: int, num_classes: int) -> int:
    """The ``?topk=`` of a request (``default`` when absent); 400 unless an integer in 1..``num_classes``."""
    if text is None:
        return default
    try:
        k = int(text)
    except ValueError:
        k = 0
    if not 1 <= k <= num_classes:
        raise ClientError(400, f"topk must be an integer from 1 to {num_classes}, got {text!r}")
    return k


async def read_image(request: Any, *, max_body_mb: float, read_timeout_s: float, any_type: bool = False) -> bytes:
    """The image in a request: the raw body (an image media type, or none: the bytes are sniffed) or the
    one file of a multipart form; :class:`ClientError` 415, 413, 408, 499 or 400 otherwise.
    ``any_type``: a body of any other media type is the image's bytes too, sniffed, as TorchServe reads
    one (``curl --data-binary @cat.jpg`` labels it ``application/x-www-form-urlencoded``)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    multipart = ctype == "multipart/form-data"
    if ctype and not multipart and not any_type and not ctype.startswith(IMAGE_TYPES):
        raise ClientError(
            415,
            f"unsupported media type {ctype!r}: send the image bytes (image/jpeg, image/png, image/webp, "
            "application/octet-stream) or multipart/form-data with one file",
        )
    body = await read_body(request, max_body_mb, read_timeout_s)
    if multipart:
        body = await _form_file(request.headers, body)
    if not body:
        raise ClientError(400, "empty body: expected the bytes of one image (JPEG, PNG, WebP, ...)")
    return body


async def read_body(request: Any, max_body_mb: float, read_timeout_s: float) -> bytes:
    """The request body, refused (413) as soon as it passes the limit, (408) if it takes too long."""
    import anyio
    from starlette.requests import ClientDisconnect

    limit = int(max_body_mb * 2**20)
    too_big = ClientError(413, f"request body over the {max_body_mb:g} MB limit (--max-body-mb)")
    declared = request.headers.get("content-length", "")
    chunks, n = [], 0
    try:
        if declared.isdigit() and int(declared) > limit:
            await _discard(request.stream(), limit)
            raise too_big
        with anyio.fail_after(read_timeout_s):
            async for chunk in request.stream():
                n += len(chunk)
                if n > limit:
                    await _discard(request.stream(), limit)
                    raise too_big
                chunks.append(chunk)
    except TimeoutError:
        raise ClientError(408, f"request body not received within {read_timeout_s:g} s") from None
    except ClientDisconnect:
        raise ClientError(499, "client disconnected before sending the whole body") from None
    return b"".join(chunks)


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


# The form fields that carry an image without being a file part: TorchServe's inference API reads the
# image from a field named "data" or "body", and so its clients (perf_analyzer --service-kind=torchserve,
# `curl -F 'data=<img.jpg'`) send it as a part without a filename.
IMAGE_FIELDS = (b"data", b"body")
MAX_FORM_PARTS = 16


async def _form_file(headers: Any, body: bytes) -> bytes:
    """The image in a multipart/form-data body: its one file part, else a field named as in
    :data:`IMAGE_FIELDS`; 400 if there is neither, more than one file, or the body is malformed.

    Parsed with python-multipart's streaming parser, which hands over each part's bytes as they are
    (Starlette's form parser decodes a part without a filename as text)."""
    from python_multipart import MultipartParser
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import parse_options_header

    boundary = parse_options_header(headers.get("content-type", ""))[1].get(b"boundary")
    if not boundary:
        raise ClientError(400, "malformed multipart/form-data: no boundary in its content-type")
    parts: list[tuple[dict, bytearray]] = []  # each part's Content-Disposition parameters and bytes
    field, value = bytearray(), bytearray()

    def header_end() -> None:
        if bytes(field).strip().lower() == b"content-disposition":
            parts[-1][0].update(parse_options_header(bytes(value))[1])
        field.clear()
        value.clear()

    callbacks = {
        "on_part_begin": lambda: parts.append(({}, bytearray())),
        "on_header_field": lambda data, start, end: field.extend(data[start:end]),
        "on_header_value": lambda data, start, end: value.extend(data[start:end]),
        "on_header_end": header_end,
        "on_part_data": lambda data, start, end: parts[-1][1].extend(data[start:end]),
    }
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except FormParserError as e:
        raise ClientError(400, f"malformed multipart/form-data: {first_line(e)}") from None
    if len(parts) > MAX_FORM_PARTS:
        raise ClientError(400, f"multipart/form-data with {len(parts)} parts: at most {MAX_FORM_PARTS}")
    files = [bytes(data) for opts, data in parts if b"filename" in opts]
    if len(files) > 1:
        raise ClientError(400, f"multipart/form-data with {len(files)} files: expected one image")
    fields = [bytes(data) for opts, data in parts if opts.get(b"name") in IMAGE_FIELDS]
    if not files and not fields:
        raise ClientError(
            400, "multipart/form-data without a file: expected one image file field (or a field named data)"
        )
    return (files or fields)[0]


CLASSIFY_OPENAPI = {
    "summary": "Classify one image",
    "description": "The body is the image (JPEG, PNG, WebP, 16-bit PNG, ...) or a multipart form with one file "
    "(or a field named data or body, as TorchServe's clients send it). "
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


class AccessLog:
    """ASGI middleware: one access-log line (unless ``quiet``) and the request counter per HTTP request.

    ``metrics`` has the Prometheus series ``requests`` (by route and status) and ``latency`` (classify
    requests answered 200)."""

    def __init__(self, app: Any, metrics: Any, *, quiet: bool = False) -> None:
        self.app, self.metrics, self.quiet = app, metrics, quiet

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
            route = route_of(path)
            self.metrics.requests.labels(route, str(status)).inc()
            if route in ("/v1/classify", INFER_ROUTE, PREDICTIONS_ROUTE) and status == 200:
                self.metrics.latency.observe(dt)
            if not self.quiet:
                client = "{}:{}".format(*scope["client"]) if scope.get("client") else "-"
                qs = scope.get("query_string", b"").decode("latin-1")
                target = f"{path}?{qs}" if qs else path
                access_log.info(
                    '%s "%s %s" %d %.1fms %dB', client, scope["method"], target, status, dt * 1e3, state["bytes"]
                )
