"""Starting or joining Ray for levit's two Ray paths (``levit predict --ray``, :mod:`levit.runtime.ray_data`;
``levit serve --ray``, :mod:`levit.runtime.serve_ray`): an unreachable address is one line within
seconds, and Ray's start-up notices stay off the user's terminal."""

from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile

from ..errors import LeViTError
from . import ray_reaper

__all__ = ["RAY_CONNECT_TIMEOUT_S", "check_reachable", "init_quietly"]

RAY_CONNECT_TIMEOUT_S = 10.0  # how long a cluster's address may take to accept a connection

# Left to the user when set: Ray's documented switch for its C++ log lines, and gRPC's for its own
# (Ray's processes log "skipping fork() handlers" at INFO each time a thread of a replica forks)
QUIET_ENV = {"RAY_BACKEND_LOG_LEVEL": "fatal", "GRPC_VERBOSITY": "ERROR"}


def check_reachable(address: str, timeout: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """Raise :class:`LeViTError` unless something accepts a TCP connection at a ``host:port`` Ray
    address (``ray://`` too) within ``timeout`` seconds: ``ray.init`` itself retries an unreachable
    address for minutes. Other addresses (``auto``, ``local``) are left to Ray."""
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout):
            pass
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__).lower()
        raise LeViTError(
            f"no Ray cluster answers at {address} ({reason}): start one there (`ray start --head`) or fix the address"
        ) from None


def init_quietly(address: str | None = None, *, num_cpus: int | None = None, log_to_driver: bool = False) -> None:
    """``ray.init`` (join ``address``, or start a one-machine cluster of ``num_cpus`` CPUs) without Ray's
    start-up notices on the user's terminal. The token-authentication notice of a local cluster and
    "Started a local Ray instance" are ``ray`` logger records: that logger is raised to ERROR for the
    call. The C++ error lines of the core workers (Ray Data's actor pool gets one per actor about
    restartable constructor arguments, though the restarts are what keeps a job going) and gRPC's INFO
    lines follow :data:`QUIET_ENV`, set unless the user set them (the first only when the workers'
    output stays with them: each would print Ray's line about it), which the processes of a local
    cluster inherit; setting ``RAY_BACKEND_LOG_LEVEL`` makes Ray print one line saying so, so the C++
    writes of the call go through a file and every other line of it is passed on to stderr. A local
    cluster gets a reaper (:func:`levit.runtime.ray_reaper.watch`).
    ``log_to_driver``: the workers' own stdout and stderr on this process's. Failures still raise."""
    import ray

    if address:
        check_reachable(address)
    # with the workers' output passed on, each worker would print Ray's line about the C++ switch
    ours = {k for k in QUIET_ENV if k not in os.environ and not (log_to_driver and k == "RAY_BACKEND_LOG_LEVEL")}
    for k in ours:
        os.environ[k] = QUIET_ENV[k]
    ray_logger = logging.getLogger("ray")
    level = ray_logger.level
    ray_logger.setLevel(logging.ERROR)
    sys.stderr.flush()
    before = ray_reaper.children(os.getpid()) if not address else set()
    saved = os.dup(2)
    with tempfile.TemporaryFile("w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            ray.init(
                address=address,
                num_cpus=None if address else num_cpus,
                include_dashboard=False,
                log_to_driver=log_to_driver,
                configure_logging=False,
            )
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            ray_logger.setLevel(level)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if not any(k in line for k in ours):
                    sys.stderr.write(line)
    if not address:
        # a local cluster: the processes ray.init started here end when this process does, even by
        # kill -9 (Ray's agents would outlive it by a minute or more: levit.runtime.ray_reaper)
        ray_reaper.watch(ray_reaper.children(os.getpid()) - before)
