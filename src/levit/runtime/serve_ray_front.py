"""The front of ``levit serve --ray``: the deployment Ray Serve's proxy sends every HTTP request to,
which hands it, whole, to a replica of the model deployment and retries it on another when the replica
is lost; and :class:`Starting`, the placeholder deployed in its place while the replicas load. Both
hold no model: this module imports no torch, so that their replicas start in a second.

Ray Serve's proxy does not retry a request once a replica has it: a replica killed mid-request fails
its requests with a plain 500 until Ray Serve replaces it. Classification is idempotent, so the
front reads each request (within ``--max-body-mb`` and ``--read-timeout``), sends it to a replica
through a ``DeploymentHandle`` (:meth:`levit.runtime.serve_app.LeViTService.forward`) and, when the
call fails because that replica died or cannot be reached (Ray's ``ActorDiedError``,
``ActorUnavailableError``), sends it again, to a replica the router still has. Requests that change
something (the repository routes) are not retried. ``/health`` is the front's own; ``/ready`` says
503 at once until a replica has answered it with 200.
"""

from __future__ import annotations

import logging
from typing import Any

from .serve_config import ServeConfig
from .serve_http import LOADING_RETRY_AFTER_S, ClientError, client_error_response, error_response, read_body

__all__ = ["RETRIES", "Front", "Starting", "idempotent"]

log = logging.getLogger("levit.serve")
RETRIES = 3  # tries after the first, each on a replica the router still has


def idempotent(method: str, path: str) -> bool:
    """Whether a request may be sent again after its replica was lost: reading, or classifying (POST,
    or PUT as TorchServe's clients send an image), not loading a model version."""
    return method in ("GET", "HEAD") or (method in ("POST", "PUT") and not path.startswith("/v2/repository/"))


class Starting:
    """The application while its replicas load the model: ``/health`` and ``/v2/health/live`` answer
    200, every other request 503 with ``Retry-After``, at once."""

    async def __call__(self, request: Any) -> Any:
        """The answer to any request (a Starlette request, from Ray Serve's proxy)."""
        from starlette.responses import JSONResponse

        if request.url.path in ("/health", "/v2/health/live"):
            return JSONResponse({"status": "alive"})
        message = "starting: the replicas are loading the model; retry when GET /ready answers 200"
        return error_response(503, message, retry_after=LOADING_RETRY_AFTER_S)


class Front:
    """The ingress deployment: every request read whole, forwarded to the model deployment's
    ``handle``, retried on another replica if its replica is lost (the module docstring says when)."""

    def __init__(self, handle: Any, config: ServeConfig) -> None:
        self.handle = handle
        self.config = config
        self.seen_ready = False  # a replica has answered /ready with 200

    async def __call__(self, request: Any) -> Any:
        """The answer to one HTTP request (a Starlette request, from Ray Serve's proxy)."""
        from starlette.responses import JSONResponse, Response

        path = request.url.path
        if path in ("/health", "/v2/health/live"):
            return JSONResponse({"status": "alive"} if path == "/health" else {"live": True})
        if not self.seen_ready and path in ("/ready", "/v2/health/ready", "/ping"):
            return await self._ready_now(path)
        c = self.config
        try:
            body = await read_body(request, max_body_mb=c.max_body_mb, read_timeout_s=c.read_timeout_s)
        except ClientError as e:
            return client_error_response(e)
        call = (request.method, path, request.url.query, list(request.headers.items()), body)
        try:
            status, headers, content = await self._forward(call, RETRIES if idempotent(request.method, path) else 0)
        except LookupError as e:
            return error_response(503, str(e), close=False)
        return Response(content, status_code=status, headers=dict(headers))

    async def _forward(self, call: tuple, retries: int) -> tuple[int, list[tuple[str, str]], bytes]:
        """``call`` on a replica, again on another up to ``retries`` times when its replica is lost;
        ``LookupError`` once every try has failed so."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError

        for attempt in range(retries + 1):
            try:
                return await self.handle.forward.remote(*call)
            except (ActorDiedError, ActorUnavailableError) as e:
                log.warning(
                    "%s %s: its replica was lost (%s); try %d of %d",
                    call[0],
                    call[1],
                    type(e).__name__,
                    attempt + 1,
                    retries + 1,
                )
        raise LookupError(f"no replica could answer: {retries + 1} tried and lost; retry")

    async def _ready_now(self, path: str) -> Any:
        """``/ready`` before any replica said it was: asked with a short wait, 503 if none answers."""
        import asyncio

        from starlette.responses import Response

        try:
            status, headers, content = await asyncio.wait_for(self._forward(("GET", path, "", [], b""), 0), 0.5)
        except (TimeoutError, LookupError):
            message = "starting: the replicas are loading the model; retry when GET /ready answers 200"
            return error_response(503, message)
        self.seen_ready = status == 200
        return Response(content, status_code=status, headers=dict(headers))
