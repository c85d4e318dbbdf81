"""The Open Inference Protocol (KServe v2) over HTTP, beside ``/v1/classify``: the field's wire
protocol, so that KServe's and Triton's clients (``tritonclient.http``) talk to ``levit serve``.

Routes (:func:`add_v2_routes`): ``GET /v2/health/live``, ``/v2/health/ready``, ``/v2`` (server
metadata), ``/v2/models/{name}`` (model metadata), ``/v2/models/{name}/ready``,
``POST /v2/models/{name}/infer`` (each model route also under ``/versions/{v}``, the version
serving), Triton's model configuration extension (``GET /v2/models/{name}/config``: what Triton's
``perf_analyzer`` reads before it sends a request, :func:`model_config`) and its model repository
extension: ``POST /v2/repository/index`` (each model's versions and their state) and
``POST /v2/repository/models/{name}/load`` (load the next version, from the checkpoint named by the
request's ``parameters.checkpoint`` or the one the model was read from).

An inference request has one input of datatype ``BYTES`` (any name, shape ``[N]`` or ``[N, 1]``): N
encoded images, each as :meth:`levit.runtime.serve_app.LeViTService.classify` takes them, sent with
the binary tensor extension (the ``Inference-Header-Content-Length`` header; each element a 4-byte
little-endian length then the bytes, as ``tritonclient`` sends them) or in the JSON as base64 strings.
The request parameter ``topk`` sets the classes per image; ``timeout`` (microseconds, as Triton's
clients send it) is a deadline, as ``X-Request-Timeout-Ms`` is. The outputs, each of shape
``[N, topk]``: ``class`` (INT64), ``label`` (BYTES) and ``prob`` (FP32), in JSON unless the request
asks for binary (``binary_data_output`` or an output's ``binary_data``).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .serve_http import ClientError

if TYPE_CHECKING:
    from .serve_app import LeViTService

__all__ = [
    "HEADER_LENGTH",
    "MODEL_VERSION",
    "OUTPUTS",
    "V2Request",
    "add_repository_routes",
    "add_v2_routes",
    "bytes_elements",
    "encode_response",
    "encode_tensor",
    "model_config",
    "parse_request",
]

# The binary tensor extension: the length of the JSON part of a body whose tensors follow it.
HEADER_LENGTH = "inference-header-content-length"
OUTPUTS = {"class": "INT64", "label": "BYTES", "prob": "FP32"}
MODEL_VERSION = "1"


@dataclass
class V2Request:
    """An inference request, parsed: the images, the answer's shape and how each output is sent."""

    images: list[bytes]
    topk: int | None = None
    id: str | None = None
    timeout_s: float | None = None
    outputs: dict[str, bool] = field(default_factory=dict)  # name -> binary


def _json_part(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    try:
        n = len(body) if header_length is None else int(header_length)
        if not 0 < n <= len(body):
            raise ValueError
        head = json.loads(body[:n])
    except (ValueError, UnicodeDecodeError):
        raise ClientError(400, "the body is not a KServe v2 inference request (JSON, then binary tensors)") from None
    if not isinstance(head, dict):
        raise ClientError(400, "the inference request must be a JSON object")
    return head, body[n:]


def bytes_elements(blob: bytes, count: int) -> list[bytes]:
    """BYTES elements of the binary extension: each a 4-byte little-endian length then the bytes."""
    out, at = [], 0
    for _ in range(count):
        if at + 4 > len(blob):
            raise ClientError(400, f"binary BYTES data holds fewer than the {count} elements its shape says")
        (n,) = struct.unpack_from("<I", blob, at)
        out.append(blob[at + 4 : at + 4 + n])
        at += 4 + n
    if at != len(blob):
        raise ClientError(400, "binary BYTES data does not match its binary_data_size")
    return out


def _input_images(head: dict, blob: bytes) -> list[bytes]:
    inputs = head.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ClientError(400, "expected one input: the encoded images, datatype BYTES, shape [N] or [N, 1]")
    tensor = inputs[0]
    if tensor.get("datatype") != "BYTES":
        raise ClientError(400, f"input datatype must be BYTES (encoded images), got {tensor.get('datatype')!r}")
    shape = tensor.get("shape")
    if not (isinstance(shape, list) and shape and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise ClientError(400, f"input shape must be a list of sizes, [N] or [N, 1], got {shape!r}")
    count = math.prod(shape)
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if size != len(blob):
            raise ClientError(400, f"binary_data_size {size} but {len(blob)} bytes follow the JSON")
        return bytes_elements(blob, count)
    data = tensor.get("data")
    if not isinstance(data, list) or len(data) != count or not all(isinstance(d, str) for d in data):
        raise ClientError(400, f"input data must be {count} base64 strings (or use the binary tensor extension)")
    try:
        return [base64.b64decode(d, validate=True) for d in data]
    except binascii.Error:
        raise ClientError(400, "BYTES data in JSON must be base64 strings of the images") from None


def parse_request(body: bytes, header_length: str | None) -> V2Request:
    """The :class:`V2Request` in a ``POST .../infer`` body (``header_length``: the
    ``Inference-Header-Content-Length`` header, None without); :class:`ClientError` 400 otherwise."""
    head, blob = _json_part(body, header_length)
    images = _input_images(head, blob)
    if not images:
        raise ClientError(400, "no image in the request (input shape [0])")
    params = head.get("parameters") or {}
    topk, timeout_us = params.get("topk"), params.get("timeout")
    if topk is not None and (not isinstance(topk, int) or isinstance(topk, bool)):
        raise ClientError(400, f"parameter topk must be an integer, got {topk!r}")
    if timeout_us is not None and not (isinstance(timeout_us, int | float) and timeout_us > 0):
        raise ClientError(400, f"parameter timeout must be a positive number of microseconds, got {timeout_us!r}")
    wanted = head.get("outputs")
    binary_all = bool(params.get("binary_data_output", False))
    if wanted is None:
        outputs = dict.fromkeys(OUTPUTS, binary_all)
    else:
        outputs = {}
        for o in wanted if isinstance(wanted, list) else [None]:
            name = o.get("name") if isinstance(o, dict) else None
            if name not in OUTPUTS:
                raise ClientError(400, f"unknown output {name!r}: the outputs are {', '.join(OUTPUTS)}")
            outputs[name] = bool((o.get("parameters") or {}).get("binary_data", binary_all))
    request_id = head.get("id")
    return V2Request(
        images=images,
        topk=topk,
        id=str(request_id) if request_id is not None else None,
        timeout_s=timeout_us / 1e6 if timeout_us is not None else None,
        outputs=outputs,
    )


def encode_tensor(name: str, rows: list[list[dict]], binary: bool) -> tuple[dict, bytes]:
    """The output ``name`` (one of :data:`OUTPUTS`) of ``rows`` (per image, its top-k): its JSON
    description, with its data inline, or with its ``binary_data_size`` and the raw bytes (row-major;
    BYTES elements each a 4-byte little-endian length then the UTF-8 text)."""
    values = [t[name] for row in rows for t in row]
    out: dict[str, Any] = {"name": name, "datatype": OUTPUTS[name], "shape": [len(rows), len(rows[0])]}
    if not binary:
        out["data"] = values
        return out, b""
    if name == "class":
        raw = struct.pack(f"<{len(values)}q", *values)
    elif name == "prob":
        raw = struct.pack(f"<{len(values)}f", *values)
    else:
        raw = b"".join(struct.pack("<I", len(b)) + b for b in (v.encode() for v in values))
    out["parameters"] = {"binary_data_size": len(raw)}
    return out, raw


def encode_response(
    request: V2Request, rows: list[list[dict]], model_name: str, version: str = MODEL_VERSION
) -> tuple[bytes, dict[str, str]]:
    """The body and headers answering ``request`` with ``rows`` (per image, its top-k as
    ``{"class", "label", "prob"}``) computed by ``version`` of the model: JSON, then the binary outputs
    (with their header) if any."""
    outputs, blobs = [], []
    for name, binary in request.outputs.items():
        tensor, raw = encode_tensor(name, rows, binary)
        outputs.append(tensor)
        blobs.append(raw)
    head: dict[str, Any] = {"model_name": model_name, "model_version": version, "outputs": outputs}
    if request.id is not None:
        head["id"] = request.id
    text = json.dumps(head).encode()
    if not any(blobs):
        return text, {"content-type": "application/json"}
    return text + b"".join(blobs), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(text))}


async def _json_body(request: Any) -> dict:
    """A small JSON object body (the repository API's), ``{}`` when empty; :class:`ClientError` 400 otherwise."""
    body = await request.body()
    if len(body) > 2**16:
        raise ClientError(413, "a repository request's body is at most 64 KB")
    try:
        data = json.loads(body) if body.strip() else {}
    except ValueError:
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("parameters", {}), dict):
        raise ClientError(400, "the body must be a JSON object (with an optional parameters object)")
    return data


def _metadata(service: LeViTService, name: str) -> dict:
    return {
        "name": name,
        "versions": [service.entries[name].serving.label],
        "platform": "levit",
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1, 1]}],
        "outputs": [{"name": n, "datatype": t, "shape": [-1, -1]} for n, t in OUTPUTS.items()],
    }


def model_config(service: LeViTService, name: str) -> dict:
    """Triton's model configuration of ``name``, in its JSON form: a batching model whose
    ``max_batch_size`` is the most images one request may carry (the server's queue bound,
    :attr:`levit.runtime.serve_app.LeViTService.max_queue`), whose input ``image`` is one encoded
    image per batch item (``TYPE_STRING``, dims ``[1]``: shape ``[N, 1]``; ``[N]`` is taken too) and
    whose outputs have ``topk`` values per image; ``dynamic_batching`` gives the server's batch and
    wait (``--max-batch-size``, ``--max-wait-ms``)."""
    c = service.config
    out_types = {"INT64": "TYPE_INT64", "BYTES": "TYPE_STRING", "FP32": "TYPE_FP32"}
    return {
        "name": name,
        "platform": "levit",
        "backend": "levit",
        "max_batch_size": service.max_queue,
        "input": [{"name": "image", "data_type": "TYPE_STRING", "dims": [1]}],
        "output": [{"name": n, "data_type": out_types[t], "dims": [-1]} for n, t in OUTPUTS.items()],
        "dynamic_batching": {
            "preferred_batch_size": [c.max_batch_size],
            "max_queue_delay_microseconds": round(c.max_wait_ms * 1e3),
        },
    }


def add_v2_routes(app: Any, service: LeViTService) -> None:
    """The Open Inference Protocol's HTTP routes on the FastAPI ``app``, answered by ``service``."""
    from fastapi import Request
    from fastapi.responses import JSONResponse, Response

    from .serve_http import error_response

    def known(name: str, version: str | None) -> Response | None:
        try:
            service.version_for(name, version)
        except ClientError as e:
            return error_response(e.status, str(e))
        return None

    def ready_now() -> bool:
        return service.ready and not service.draining

    async def live() -> dict:
        return {"live": True}

    async def ready() -> Response:
        return JSONResponse({"ready": ready_now()}, status_code=200 if ready_now() else 503)

    async def server() -> dict:
        from .._version import __version__

        return {"name": "levit", "version": __version__, "extensions": ["binary_tensor_data"]}

    async def model(name: str, version: str | None = None) -> Response:
        return known(name, version) or JSONResponse(_metadata(service, name))

    async def config(name: str, version: str | None = None) -> Response:
        return known(name, version) or JSONResponse(model_config(service, name))

    async def model_ready(name: str, version: str | None = None) -> Response:
        return known(name, version) or JSONResponse(
            {"name": name, "ready": ready_now()}, status_code=200 if ready_now() else 503
        )

    async def infer(request: Request, name: str, version: str | None = None) -> Response:
        return await service.handle_v2_infer(request, name, version)

    infer.__annotations__ = {"request": Request, "name": str, "version": str | None, "return": Response}
    for f in (ready, model, config, model_ready):
        f.__annotations__["return"] = Response

    app.get("/v2/health/live")(live)
    app.get("/v2/health/ready", response_model=None)(ready)
    app.get("/v2")(server)
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        app.get(prefix, response_model=None)(model)
        app.get(prefix + "/ready", response_model=None)(model_ready)
        app.get(prefix + "/config", response_model=None)(config)
        app.post(prefix + "/infer", response_model=None)(infer)
    add_repository_routes(app, service, known)


def add_repository_routes(app: Any, service: LeViTService, known: Callable[[str, str | None], Any]) -> None:
    """Triton's model repository extension on ``app``: ``POST /v2/repository/index`` (the versions and
    their state) and ``POST /v2/repository/models/{name}/load`` (the next version, from the request's
    ``parameters.checkpoint`` or the file the model was read from). ``known(name, version)``: the 404
    answer for a model this server does not serve, else None."""
    from fastapi import Request
    from fastapi.responses import JSONResponse, Response

    from .serve_http import client_error_response, error_response
    from .serve_models import LoadError

    def ready_now() -> bool:
        return service.ready and not service.draining

    async def index(request: Request) -> Response:
        try:
            params = await _json_body(request)
        except ClientError as e:
            return client_error_response(e)
        rows = [row for entry in service.entries.values() for row in entry.index(ready_now())]
        if params.get("ready") is True:
            rows = [r for r in rows if r["state"] == "READY"]
        return JSONResponse(rows)

    async def load(request: Request, name: str) -> Response:
        if (unknown := known(name, None)) is not None:
            return unknown
        if not service.config.model_control:
            return error_response(403, "loading models is off on this server (--no-model-control)")
        if service.ray_board is not None:
            return error_response(
                501,
                "under --ray each replica is a process of its own: send SIGHUP to levit serve, which rolls "
                "every replica over to the checkpoint",
            )
        try:
            path = (await _json_body(request)).get("parameters", {}).get("checkpoint")
        except ClientError as e:
            return client_error_response(e)
        if path is not None and not isinstance(path, str):
            return error_response(400, f"parameters.checkpoint must be a path on the server, got {path!r}")
        try:
            version = await service.load_version(path, model=name)
        except LoadError as e:
            return error_response(400, str(e))
        return JSONResponse({"name": name, "version": version.label, "state": "READY"})

    index.__annotations__ = {"request": Request, "return": Response}
    load.__annotations__ = {"request": Request, "name": str, "return": Response}
    app.post("/v2/repository/index", response_model=None)(index)
    app.post("/v2/repository/models/{name}/load", response_model=None)(load)
