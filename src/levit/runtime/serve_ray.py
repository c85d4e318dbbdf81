"""``levit serve --ray``: the same :class:`~levit.runtime.serve_app.LeViTService` as a Ray Serve deployment.

N replicas, each the whole application (its own model, batcher and metrics), behind Ray Serve's HTTP
proxy, a front deployment and Ray Serve's router. Locally ``ray.init()`` starts a one-machine cluster; with an address the
deployment joins that cluster (the model's weights travel with the deployment, so the nodes need no
shared file system). Its preprocessing travels with it too (``model.pretrained_cfg``, and
``ServeConfig.crop_pct`` when set): each replica builds the same
:class:`~levit.data.preprocess.Preprocess` as the single-process server and ``levit predict``.

Start-up: the application is first deployed as :class:`Starting`, a replica with no model and no CPU
reserved that answers 503 (``/health`` 200) at once, so that clients polling ``/ready`` get an answer
rather than waiting in the proxy for a replica; the model's replicas then replace it, Ray Serve's
``max_surge_percent`` keeping it serving until they are ready. SIGHUP re-reads the checkpoint and
deploys it the same way as the next version (old replicas serve until the new ones are ready when the
cluster has the CPUs for both, else Ray Serve's rolling update replaces them a few at a time, each
draining its requests). ``/metrics`` on any replica gives every replica's series
(:mod:`levit.runtime.serve_ray_metrics`). Requests reach the replicas through a front deployment
(:mod:`levit.runtime.serve_ray_front`) that retries them on another replica when theirs is lost.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Any

from torch import nn

from ..errors import LeViTError
from ..utils import first_line
from .pipeline import lane_layout
from .ray_setup import check_reachable, init_quietly
from .serve_app import LeViTService, ServeConfig
from .serve_process import setup_logging
from .serve_ray_front import Front, Starting

__all__ = [
    "APP_NAME",
    "Starting",
    "check_capacity",
    "cluster_gone",
    "deployment",
    "drain",
    "exit_when_the_cluster_stops",
    "init_ray",
    "replica_config",
    "run_deployment",
    "run_ray",
    "start_ray",
]

APP_NAME = "levit"
FRONT = "Front"  # the ingress deployment's name (Starting, then the front)
# Ray Serve's controller, proxy and replicas log each deployment step, endpoint update and request at
# INFO: levit's own lines say what a user needs (serving on, stopping, its access log); warnings and
# errors still reach the terminal
SERVE_LOGGING = {"log_level": "WARNING", "enable_access_log": False}
log = logging.getLogger("levit.serve")


def replica_config(config: ServeConfig, lanes: int) -> ServeConfig:
    """``config`` for a replica of ``lanes`` model lanes: unless ``--max-queue`` is given, a replica
    takes two full batches per lane, about twice the single process's bound
    (:meth:`ServeConfig.queue_bound`). When one of R >= 2 replicas is lost, each of the others gets
    R / (R - 1) <= 2 times its share until Ray Serve replaces it, and that is no overload to shed
    (docs/serving.md, "Back-pressure and deadlines", has ``benchmarks/serve_ray_kill.py``'s figures)."""
    if config.max_queue is not None:
        return config
    return config.replace(max_queue=2 * lanes * config.max_batch_size)


def deployment(
    model: nn.Module,
    config: ServeConfig,
    *,
    replicas: int = 1,
    replica_cpus: float = 1.0,
    version: int = 1,
    surge: bool = True,
) -> Any:
    """The bound Ray Serve application: :class:`~levit.runtime.serve_ray_front.Front`, which takes every
    HTTP request and retries it when its replica is lost, before ``replicas`` copies of
    :class:`LeViTService` serving ``version`` of the model, each loading and warming up its model in its
    constructor (a replica is routed to only once it is ready). ``surge``: replacing a running version,
    its replicas serve until all the new ones are ready (the cluster needs the CPUs of both)."""
    import dataclasses

    from ray import serve

    if config.lanes is None and config.threads is None:  # a one-thread lane per CPU the replica reserves
        config = dataclasses.replace(config, lanes=max(1, int(replica_cpus)), threads=1)
    lanes = lane_layout(config.lanes, config.threads, max(1, int(replica_cpus)))[0]
    config = replica_config(config, lanes)
    cls = serve.deployment(
        LeViTService,
        name="LeViTService",
        num_replicas=replicas,
        # the router lets in more than the replica's queue admits, so that past it a client gets the
        # replica's 429 with Retry-After rather than waiting in the proxy
        max_ongoing_requests=config.queue_bound(lanes) + lanes * config.max_batch_size,
        ray_actor_options={"num_cpus": replica_cpus},
        graceful_shutdown_timeout_s=config.drain_timeout_s,
        max_surge_percent=100 if surge else 0,
        logging_config=SERVE_LOGGING,
    )
    front = serve.deployment(
        Front,
        name=FRONT,
        ray_actor_options={"num_cpus": 0},  # it only reads and forwards requests
        max_ongoing_requests=replicas * (config.queue_bound(lanes) + lanes * config.max_batch_size),
        max_surge_percent=100,
        logging_config=SERVE_LOGGING,
    )
    return front.bind(cls.bind(model, config, load_now=True, version=version), config)


def init_ray(address: str | None = None, *, num_cpus: int | None = None, quiet: bool = False) -> bool:
    """Join the Ray cluster at ``address``, or start a one-machine one, without Ray's start-up notices
    (:func:`~levit.runtime.ray_setup.init_quietly`; ``quiet``: the replicas' own output not passed
    on); returns whether this call started Ray (and so should shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    init_quietly(address, num_cpus=num_cpus, log_to_driver=not quiet)
    return True


def cluster_gone(gcs_address: str) -> bool:
    """Whether the Ray cluster at ``gcs_address`` no longer accepts connections (checked within a
    second)."""
    try:
        check_reachable(gcs_address, timeout=1.0)
    except LeViTError:
        return True
    return False


def exit_when_the_cluster_stops(gcs_address: str, stop: threading.Event, finished: threading.Event) -> None:
    """Once ``stop`` is set (SIGTERM or Ctrl+C) and until ``finished``: end the process with exit status 0
    as soon as the Ray cluster at ``gcs_address`` has stopped. A signal to the whole process group
    (systemd's stop, ``timeout``, ``kill -- -PGID``) stops a local cluster's processes with this one,
    whatever this one was doing (deploying, serving, draining), and every Ray call would then wait a
    minute for the cluster and abort. Tearing Ray's client down under a call still waiting on the gone
    cluster can crash in Ray's C++ core, so the process ends here, its output flushed. Runs in a
    daemon thread."""
    stop.wait()
    while not finished.wait(0.5):
        if cluster_gone(gcs_address):
            log.warning("Ray's cluster has stopped too (its processes got the signal): nothing left to drain")
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)


def drain() -> None:
    """Delete the application (Ray Serve drains each replica), then stop Ray Serve."""
    from ray import serve

    from .serve_ray_metrics import remove_board

    serve.delete(APP_NAME)
    remove_board()
    serve.shutdown()


def check_capacity(replicas: int, replica_cpus: float) -> None:
    """Raise :class:`~levit.errors.LeViTError` when the Ray cluster has fewer CPUs than ``replicas``
    replicas of ``replica_cpus`` each ask for: Ray Serve would wait for them for ever. Called for the
    one-machine cluster this process started, which cannot grow (an autoscaling cluster can)."""
    import ray

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


def run_deployment(
    model: nn.Module, config: ServeConfig, *, replicas: int = 1, replica_cpus: float = 1.0, version: int = 1
) -> None:
    """Run the deployment (``version`` of the model) on the Ray this process is connected to; blocks
    until every replica is ready. Version 1 starts behind :class:`Starting`; a later one replaces the
    running one (the module docstring says how)."""
    import ray
    from ray import serve

    try:
        serve.start(http_options={"host": config.host, "port": config.port}, logging_config=SERVE_LOGGING)
    except ray.exceptions.RayTaskError as e:  # the proxy actor's start, on whichever node runs it
        cause = e.cause if e.cause is not None else e
        raise LeViTError(
            f"Ray Serve cannot listen on {config.host}:{config.port} (--host/--port): {first_line(cause)}"
        ) from None
    if version == 1:
        starting = serve.deployment(
            Starting, name=FRONT, ray_actor_options={"num_cpus": 0}, logging_config=SERVE_LOGGING
        )
        serve.run(starting.bind(), name=APP_NAME, route_prefix="/")
    surge = ray.available_resources().get("CPU", 0) >= replicas * replica_cpus
    app = deployment(model, config, replicas=replicas, replica_cpus=replica_cpus, version=version, surge=surge)
    serve.run(app, name=APP_NAME, route_prefix="/")


def _roll_over(model: nn.Module, config: ServeConfig, version: int, **deploy: Any) -> tuple[nn.Module, int]:
    """SIGHUP: the checkpoint read again and deployed as ``version + 1``; the model and version serving
    afterwards (the old ones, logged, when the checkpoint does not load)."""
    from .serve_models import LoadError, read_checkpoint

    models = model if isinstance(model, dict) else {None: model}
    files = {**dict(config.checkpoints), None: config.checkpoint}
    if not any(files.get(name) for name in models):
        log.error("SIGHUP: no model was read from a file (--checkpoint): nothing to load again")
        return model, version
    log.warning("SIGHUP: loading the checkpoints again as version %d", version + 1)
    try:
        new = {name: read_checkpoint(files[name], m) if files.get(name) else m for name, m in models.items()}
        new = new if isinstance(model, dict) else new[None]
    except LoadError as e:
        log.error("version %d not loaded: %s; version %d keeps serving", version + 1, e, version)
        return model, version
    run_deployment(new, config, version=version + 1, **deploy)
    log.warning("version %d serving on every replica", version + 1)
    return new, version + 1


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
    (Ray Serve drains each replica for up to ``drain_timeout_s``) and return 0. When the cluster has
    stopped with this process (the signal went to the whole process group), the process exits 0 at
    once: there is nothing left to drain."""
    import ray
    import ray.serve  # sets its logger's level when imported: levit's goes after

    setup_logging(config.quiet)
    # the driver's Ray Serve lines ("Started Serve", "Application ... is ready") say what levit's own
    # "serving ... on" line says
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    stop, hup, finished = threading.Event(), threading.Event(), threading.Event()
    previous: dict = {}
    started = False
    try:
        started = init_ray(address, num_cpus=num_cpus, quiet=config.quiet)
        if started and not address:
            check_capacity(replicas, replica_cpus)
        # after ray.init, whose core worker installs a SIGTERM handler of its own that aborts the process
        previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda *_: hup.set())
        try:
            gcs = ray.get_runtime_context().gcs_address
        except Exception:  # a connection that does not expose it (Ray Client): nothing to watch
            gcs = None
        if gcs:
            watch = threading.Thread(
                target=exit_when_the_cluster_stops, args=(gcs, stop, finished), daemon=True, name="levit-cluster-watch"
            )
            watch.start()
        run_deployment(model, config, replicas=replicas, replica_cpus=replica_cpus)
        log.warning(
            "serving %s on http://%s:%d with %d Ray Serve replica(s)",
            ", ".join(model) if isinstance(model, dict) else config.model_name or model.config.name,
            config.host,
            config.port,
            replicas,
        )
        version = 1
        while not stop.wait(0.5):
            if hup.is_set():
                hup.clear()
                model, version = _roll_over(model, config, version, replicas=replicas, replica_cpus=replica_cpus)
        log.warning("stopping: draining the replicas")
        drain()
    finally:
        finished.set()
        if started:
            ray.shutdown()
        for s, h in previous.items():
            if h is not None:  # None: a handler installed from C (Ray's), which Python cannot put back
                signal.signal(s, h)
    return 0
