"""``levit serve --ray``: the same :class:`~levit.runtime.serve_app.LeViTService` as a Ray Serve deployment.

N replicas, each the whole application (its own model, batcher and metrics), behind Ray Serve's HTTP
proxy and router. Locally ``ray.init()`` starts a one-machine cluster; with an address the
deployment joins that cluster (the model's weights travel with the deployment, so the nodes need no
shared file system). Its preprocessing travels with it too (``model.pretrained_cfg``, and
``ServeConfig.crop_pct`` when set): each replica builds the same
:class:`~levit.data.preprocess.Preprocess` as the single-process server and ``levit predict``.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from torch import nn

from .pipeline import lane_layout
from .serve_app import LeViTService, ServeConfig
from .serve_process import setup_logging

__all__ = ["APP_NAME", "check_capacity", "deployment", "init_ray", "run_deployment", "run_ray", "start_ray"]

APP_NAME = "levit"
log = logging.getLogger("levit.serve")


def deployment(model: nn.Module, config: ServeConfig, *, replicas: int = 1, replica_cpus: float = 1.0) -> Any:
    """The bound Ray Serve application: ``replicas`` copies of :class:`LeViTService`, each loading and
    warming up its model in its constructor (a replica is routed to only once it is ready)."""
    import dataclasses

    from ray import serve

    if config.lanes is None and config.threads is None:  # a one-thread lane per CPU the replica reserves
        config = dataclasses.replace(config, lanes=max(1, int(replica_cpus)), threads=1)
    lanes = lane_layout(config.lanes, config.threads, max(1, int(replica_cpus)))[0]
    cls = serve.deployment(
        serve.ingress()(LeViTService),
        name="LeViTService",
        num_replicas=replicas,
        # the router lets in more than the replica's queue admits, so that past it a client gets the
        # replica's 429 with Retry-After rather than waiting in the proxy
        max_ongoing_requests=(config.max_queue or 4 * lanes * config.max_batch_size) + lanes * config.max_batch_size,
        ray_actor_options={"num_cpus": replica_cpus},
        graceful_shutdown_timeout_s=config.drain_timeout_s,
    )
    return cls.bind(model, config, load_now=True)


def init_ray(address: str | None = None, *, num_cpus: int | None = None, quiet: bool = False) -> bool:
    """Join the Ray cluster at ``address``, or start a one-machine one; returns whether this call
    started Ray (and so should shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=not quiet)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=not quiet)
    return True


def check_capacity(replicas: int, replica_cpus: float) -> None:
    """Raise :class:`~levit.errors.LeViTError` when the Ray cluster has fewer CPUs than ``replicas``
    replicas of ``replica_cpus`` each ask for: Ray Serve would wait for them for ever. Called for the
    one-machine cluster this process started, which cannot grow (an autoscaling cluster can)."""
    import ray

    from ..errors import LeViTError

    have = ray.cluster_resources().get("CPU", 0)
    if replicas * replica_cpus > have:
        raise LeViTError(
            f"--replicas {replicas} x --replica-cpus {replica_cpus:g} need {replicas * replica_cpus:g} CPUs; "
            f"this Ray cluster has {have:g}: ask for fewer replicas or CPUs per replica"
        )


def start_ray(
    model: nn.Module,
    config: ServeConfig,
    *,
    address: str | None = None,
    replicas: int = 1,
    replica_cpus: float = 1.0,
    num_cpus: int | None = None,
) -> bool:
    """Start (or join) Ray and run the deployment on ``config.host:config.port``; returns whether this
    call started Ray. Blocks until every replica is ready."""
    started = init_ray(address, num_cpus=num_cpus, quiet=config.quiet)
    if started and not address:
        check_capacity(replicas, replica_cpus)
    run_deployment(model, config, replicas=replicas, replica_cpus=replica_cpus)
    return started


def run_deployment(model: nn.Module, config: ServeConfig, *, replicas: int = 1, replica_cpus: float = 1.0) -> None:
    """Run the deployment on the Ray this process is connected to; blocks until every replica is ready."""
    from ray import serve

    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(deployment(model, config, replicas=replicas, replica_cpus=replica_cpus), name=APP_NAME, route_prefix="/")


def run_ray(
    model: nn.Module,
    config: ServeConfig,
    *,
    address: str | None = None,
    replicas: int = 1,
    replica_cpus: float = 1.0,
    num_cpus: int | None = None,
) -> int:
    """``levit serve --ray``: serve until SIGTERM or Ctrl+C, then shut the application down gracefully
    (Ray Serve drains each replica for up to ``drain_timeout_s``) and return 0."""
    import ray
    from ray import serve

    setup_logging(config.quiet)
    stop = threading.Event()
    previous: dict = {}
    started = False
    try:
        started = init_ray(address, num_cpus=num_cpus, quiet=config.quiet)
        if started and not address:
            check_capacity(replicas, replica_cpus)
        # after ray.init, whose core worker installs a SIGTERM handler of its own that aborts the process
        previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
        run_deployment(model, config, replicas=replicas, replica_cpus=replica_cpus)
        log.warning(
            "serving %s on http://%s:%d with %d Ray Serve replica(s)",
            config.model_name or model.config.name,
            config.host,
            config.port,
            replicas,
        )
        while not stop.wait(0.5):
            pass
        log.warning("stopping: draining the replicas")
        serve.delete(APP_NAME)
        serve.shutdown()
    finally:
        if started:
            ray.shutdown()
        for s, h in previous.items():
            if h is not None:  # None: a handler installed from C (Ray's), which Python cannot put back
                signal.signal(s, h)
    return 0
