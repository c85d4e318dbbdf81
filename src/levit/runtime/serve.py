"""``levit serve``: image classification over HTTP with dynamic batching, in one process or as Ray
Serve replicas. :func:`serve` is the one call the command line makes.

The server, by concern:

- :mod:`levit.runtime.serve_app`: the application, :class:`LeViTService` (model lanes, metrics,
  routes) and its settings, :class:`ServeConfig`;
- :mod:`levit.runtime.batcher`: the batching rule and the bounded queue, an asyncio module of its own;
- :mod:`levit.runtime.serve_http`: the HTTP protocol (reading a request, the refusals, the access log);
- :mod:`levit.runtime.serve_process`: one serving process (logging, the socket, uvicorn with draining
  on SIGTERM, the frozen heap);
- :mod:`levit.runtime.serve_kserve`, :mod:`levit.runtime.serve_grpc`: the Open Inference Protocol
  (KServe v2) over HTTP and over gRPC; :mod:`levit.runtime.serve_torchserve`: TorchServe's
  inference API, for its clients;
- :mod:`levit.runtime.serve_models`: the models' versions (hot reload) and reading a checkpoint;
- :mod:`levit.runtime.serve_ray`: the same application as a Ray Serve deployment of N replicas,
  behind :mod:`levit.runtime.serve_ray_front` (retries on a lost replica), with
  :mod:`levit.runtime.serve_ray_metrics` (every replica's metrics in every scrape).

One process runs the app on uvicorn, which starts in seconds and adds no hop per request; Ray Serve
runs the same class when there are replicas to spread the load over (docs/serving.md compares the
two engines on one machine).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from ..errors import LeViTError
from .options import OptionError
from .serve_app import LeViTService, ServeConfig
from .serve_http import ROUTES, ClientError
from .serve_process import listen, run_server, setup_logging

__all__ = [
    "ROUTES",
    "ClientError",
    "LeViTService",
    "ServeConfig",
    "check_installed",
    "listen",
    "run_server",
    "serve",
    "setup_logging",
]

# the serve extra: module -> the package that provides it (Ray only for --ray)
_EXTRA = {
    "fastapi": "fastapi",
    "uvicorn": "uvicorn",
    "prometheus_client": "prometheus-client",
    "multipart": "python-multipart",
}


def check_installed(ray: bool = False) -> None:
    """The serve extra's packages (and Ray Serve's with ``ray``), checked without importing them:
    :class:`~levit.errors.LeViTError` naming the missing ones, in one line."""
    import importlib.util

    needed = {**_EXTRA, "ray": "ray[serve]"} if ray else _EXTRA
    missing = [pkg for mod, pkg in needed.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise LeViTError(f"levit serve needs {', '.join(missing)}: pip install 'levit[serve]'")


def serve(
    model: nn.Module | Mapping[str, nn.Module] | Callable[[], nn.Module | Mapping[str, nn.Module]],
    config: ServeConfig | None = None,
    *,
    ray: str | None = None,
    replicas: int = 1,
    replica_cpus: float = 1.0,
) -> int:
    """Serve ``model`` per ``config`` (default: :class:`ServeConfig`'s defaults) until SIGTERM or
    Ctrl+C; returns 0 once drained.

    ``model``: the model, or several by name (the first is the default: requests that name no model),
    or a function that returns either, called once the port is bound, so that a taken port fails
    before a model loads (or the demo model trains). ``ray``: ``None`` serves from
    this process (:func:`levit.runtime.serve_process.run_server`); ``""`` as a Ray Serve deployment on
    a new local Ray, an address joins that cluster (:func:`levit.runtime.serve_ray.run_ray`), with
    ``replicas`` copies reserving ``replica_cpus`` CPUs each. Raises
    :class:`~levit.runtime.options.OptionError` for a bad engine option and
    :class:`~levit.errors.LeViTError` when the serve extra is missing or a port is taken.
    """
    if replicas < 1:
        raise OptionError("replicas", f"must be >= 1, got {replicas}")
    if ray is None and replicas != 1:
        raise OptionError("replicas", "needs {ray} (one process serves one copy of the model)")
    if ray is not None and config is not None and config.grpc_port is not None:
        raise OptionError("grpc_port", "serves from one process: not with {ray}")
    if not replica_cpus > 0:
        raise OptionError("replica_cpus", f"must be > 0, got {replica_cpus}")
    config = config or ServeConfig()
    check_installed(ray is not None)
    if ray is not None:
        from .serve_ray import run_ray

        if not ray:  # a new local cluster, whose proxy binds the port here: taken, one line before Ray starts
            listen(config.host, config.port).close()
        return run_ray(_built(model), config, address=ray or None, replicas=replicas, replica_cpus=replica_cpus)
    sock = listen(config.host, config.port)
    if config.grpc_port:  # taken: one line before a model loads, as for the HTTP port (closed for gRPC to bind)
        try:
            listen(config.host, config.grpc_port, "--grpc-port").close()
        except BaseException:
            sock.close()
            raise
    try:
        service = LeViTService(_built(model), config)
    except BaseException:
        sock.close()
        raise
    return run_server(service, sock)


def _built(model: Any) -> nn.Module | Mapping[str, nn.Module]:
    return model if isinstance(model, nn.Module | Mapping) else model()
