"""TorchServe's inference API on ``levit serve``, so that TorchServe's clients work unchanged:
``GET /ping`` and ``POST``/``PUT`` ``/predictions/{name}[/{version}]``.

The image is the body (``curl -T cat.jpg``, which PUTs) or a form's field named ``data`` or ``body``
(``curl -F data=@cat.jpg``, ``perf_analyzer --service-kind=torchserve``), read, limited, batched and
classified exactly as ``POST /v1/classify`` does
(:meth:`levit.runtime.serve_app.LeViTService.handle_torchserve`). The answer is what TorchServe's
built-in image classifier returns: one JSON object mapping each of the top-k labels to its
probability, the most probable first (``?topk=N``, default ``--topk``). Errors keep this server's
``{"error": ...}`` body and status codes (503 loading, 429, 413, 504...).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .serve_app import LeViTService

__all__ = ["PREDICTIONS_OPENAPI", "add_torchserve_routes", "torchserve_body"]

_BINARY = {"schema": {"type": "string", "format": "binary"}}
PREDICTIONS_OPENAPI = {  # the route's entry on /docs: FastAPI cannot infer a body read by hand
    "summary": "Classify one image (TorchServe's inference API)",
    "description": "The body is the image, whatever its media type, or a multipart form with a field named "
    "data (or body, or one file). Answers `{label: probability}`, the most probable first; errors as "
    "/v1/classify's, and 404 for an unknown model or version.",
    "parameters": [{"name": "topk", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1}}],
    "requestBody": {
        "required": True,
        "content": {
            "*/*": _BINARY,
            "multipart/form-data": {"schema": {"type": "object", "properties": {"data": _BINARY["schema"]}}},
        },
    },
}


def torchserve_body(top: list[dict]) -> dict[str, float]:
    """``{label: probability}`` for the rows ``top`` (``{"class", "label", "prob"}``, most probable
    first), as TorchServe's image classifier answers. A label that two classes share (a checkpoint's
    own class names may repeat one) is written with its class index the second time, so that no row is
    lost to a repeated key."""
    body: dict[str, float] = {}
    for row in top:
        key = row["label"] if row["label"] not in body else f"{row['label']} ({row['class']})"
        body[key] = row["prob"]
    return body


def add_torchserve_routes(app: Any, service: LeViTService) -> None:
    """``GET /ping`` and ``POST``/``PUT`` ``/predictions/{name}[/{version}]`` on the FastAPI ``app``,
    answered by ``service``."""
    from fastapi import Request
    from fastapi.responses import JSONResponse, Response

    async def ping() -> Response:
        return service.unready_response() or JSONResponse({"status": "Healthy"})

    async def predictions(request: Request, name: str, version: str | None = None) -> Response:
        return await service.handle_torchserve(request, name, version)

    predictions.__annotations__ = {"request": Request, "name": str, "version": str | None, "return": Response}
    ping.__annotations__["return"] = Response
    app.get("/ping", response_model=None)(ping)
    for path in ("/predictions/{name}", "/predictions/{name}/{version}"):
        for method in (app.post, app.put):  # a route each: an OpenAPI operation id each
            method(path, response_model=None, openapi_extra=PREDICTIONS_OPENAPI)(predictions)
