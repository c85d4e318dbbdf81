"""One serving process: its log lines, its listening socket, uvicorn with draining on SIGTERM, and the
frozen heap.

This module owns what belongs to the process rather than to the application
(:class:`levit.runtime.serve.LeViTService`): where log lines go, binding the port before the model
loads (a taken port fails at once), the single-process server (:func:`run_server`: the app on
uvicorn, which drains in-flight requests on SIGTERM and exits 0), and :func:`freeze_heap`, which a
process that only serves runs once its model is loaded.
"""

from __future__ import annotations

import asyncio
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


def listen(host: str, port: int, flag: str = "--host/--port") -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one), or :class:`~levit.errors.LeViTError`
    saying why not, naming the option ``flag`` that set the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise LeViTError(f"cannot listen on {host}:{port} ({flag}): {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def _raw_error(status: int, reason: str, message: str) -> bytes:
    """A whole HTTP/1.1 answer ``{"error": message}`` that closes the connection, for the refusals made
    before a request reaches the application."""
    import json

    body = json.dumps({"error": message}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


class _HeadLimits:
    """The limits of a request head, mixed into either of uvicorn's HTTP/1.1 protocols (the class its
    ``http`` setting takes): a head over ``max_header_bytes`` gets 431, a connection whose head has
    not arrived ``header_timeout_s`` after its first byte (or after the connection opened) gets 408
    and is closed, so that slow clients cannot hold connections open by trickling headers, and a
    request the parser cannot read gets a JSON 400. A protocol says whether a head is awaited
    (:meth:`awaiting_head`) and passes the start of one to :meth:`head_checked`."""

    max_header_bytes: int
    header_timeout_s: float
    head_timer: asyncio.TimerHandle | None = None
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self.head_timer = self.loop.call_later(self.header_timeout_s, self.head_too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_head_timer()
        super().connection_lost(exc)  # type: ignore[misc]

    def awaiting_head(self) -> bool:
        raise NotImplementedError

    def head_checked(self, pending: bytes) -> bool:
        """False (and 431 sent) when ``pending``, the start of a request head, is over the limit;
        else, while the head is unfinished, the head timer runs from now if it was not running."""
        end = pending.find(b"\r\n\r\n")
        if (end if end >= 0 else len(pending)) > self.max_header_bytes:
            self.refuse(
                431,
                "Request Header Fields Too Large",
                f"request head over {self.max_header_bytes // 1024} KB (--max-header-kb)",
            )
            return False
        if end < 0 and self.head_timer is None:
            self.head_timer = self.loop.call_later(self.header_timeout_s, self.head_too_slow)
        return True

    def stop_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def head_too_slow(self) -> None:
        self.head_timer = None
        if self.awaiting_head() and not self.transport.is_closing():
            self.refuse(
                408,
                "Request Timeout",
                f"request head not received within {self.header_timeout_s:g} s (--header-timeout)",
            )

    def send_400_response(self, msg: str) -> None:
        self.refuse(400, "Bad Request", msg)

    def refuse(self, status: int, reason: str, message: str) -> None:
        self.stop_head_timer()
        if not self.transport.is_closing():
            self.transport.write(_raw_error(status, reason, message))
            self.transport.close()


def _h11_head_limits() -> type:
    """uvicorn's h11 protocol (pure Python) with :class:`_HeadLimits`."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class H11HeadLimits(_HeadLimits, H11Protocol):
        def awaiting_head(self) -> bool:
            return self.conn.their_state is h11.IDLE

        def data_received(self, data: bytes) -> None:
            if self.awaiting_head() and not self.head_checked(self.conn.trailing_data[0] + data):
                return
            super().data_received(data)
            if not self.awaiting_head():  # the head is in
                self.stop_head_timer()

    return H11HeadLimits


def _httptools_head_limits() -> type:
    """uvicorn's httptools protocol (llhttp, in C) with :class:`_HeadLimits`."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HttptoolsHeadLimits(_HeadLimits, HttpToolsProtocol):
        # llhttp keeps no unparsed bytes: the start of a head received so far is kept here (at most
        # max_header_bytes of it), and the head is awaited from the end of one request to the end of
        # the next one's headers
        head = b""
        waiting = True

        def awaiting_head(self) -> bool:
            return self.waiting

        def data_received(self, data: bytes) -> None:
            if self.waiting:
                pending = self.head + data if self.head else data
                if not self.head_checked(pending):
                    return
                self.head = pending if pending.find(b"\r\n\r\n") < 0 else b""
            super().data_received(data)

        def on_headers_complete(self) -> None:
            self.waiting, self.head = False, b""
            self.stop_head_timer()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self.waiting = True

    return HttptoolsHeadLimits


def _protocol_class(max_header_bytes: int, header_timeout_s: float, parser: str = "auto") -> type:
    """uvicorn's HTTP/1.1 protocol with the limits of a request head (:class:`_HeadLimits`).

    ``parser``: ``"httptools"`` (llhttp, in C), ``"h11"`` (pure Python) or ``"auto"``, httptools where it
    is installed, as uvicorn's own default. httptools parses and writes HTTP in C: every request then
    takes less of the event loop, which under overload reads and refuses the most (docs/serving.md:
    "Event loop")."""
    if parser == "auto":
        try:
            import httptools  # noqa: F401

            parser = "httptools"
        except ImportError:
            parser = "h11"
    base = _httptools_head_limits() if parser == "httptools" else _h11_head_limits()
    limits = {"max_header_bytes": max_header_bytes, "header_timeout_s": header_timeout_s}
    return type(base.__name__, (base,), limits)


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
        http=_protocol_class(c.max_header_bytes, c.header_timeout_s),
        h11_max_incomplete_event_size=c.max_header_bytes,
    )
    server = _server_class()(config)
    server.service = service
    service.own_process = True
    server.run(sockets=[sock])
    if service.load_error is not None:
        raise LeViTError(service.load_error)
    return 0
