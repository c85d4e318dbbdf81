"""One serving process: its log lines, its listening socket, uvicorn with draining on SIGTERM, and the
frozen heap.

This module owns what belongs to the process rather than to the application
(:class:`levit.runtime.serve.LeViTService`): where log lines go, binding the port before the model
loads (a taken port fails at once), the single-process server (:func:`run_server`: the app on
uvicorn, which drains in-flight requests on SIGTERM and exits 0), and :func:`freeze_heap`, which a
process that only serves runs once its model is loaded.
"""

from __future__ import annotations

import logging
import signal
import socket
import time
from typing import TYPE_CHECKING, Any

from ..errors import LeViTError

if TYPE_CHECKING:
    from .serve_app import LeViTService

__all__ = ["freeze_heap", "listen", "run_server", "setup_logging"]

log = logging.getLogger("levit.serve")


def setup_logging(quiet: bool) -> None:
    """One line per event on stderr; the access log only without ``quiet``."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    for logger in (log, logging.getLogger("levit.serve.access")):
        logger.handlers[:] = [handler]
        logger.propagate = False
        logger.setLevel(logging.WARNING if quiet else logging.INFO)


def freeze_heap() -> None:
    """Put everything alive once the model is loaded (the libraries, the model) out of the garbage
    collector's reach, in a process that only serves. Python's full collections scan every tracked
    object while holding the GIL; the libraries a server imports make that a long pause, during which
    the event loop stops and the model lanes wait for batches, so the requests of that moment make
    the tail latency. Frozen, a full collection scans only what requests create. Objects made before
    the freeze are never collected as cycles, only by reference count, which is why a library user's
    process is left alone. (docs/serving.md measures the pause and the tail latency before and after.)"""
    import gc

    gc.collect()
    gc.freeze()


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one), or :class:`~levit.errors.LeViTError`
    saying why not."""
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


def run_server(service: LeViTService, sock: socket.socket | None = None) -> int:
    """Serve ``service`` until SIGTERM (drains, returns 0) or Ctrl+C, on ``sock`` (default: a socket
    on the configured host and port).

    The socket listens before the model is warmed up: ``/health`` answers at once and ``/ready``
    once the model has run. A model that fails to load stops the server with
    :class:`~levit.errors.LeViTError`.
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
