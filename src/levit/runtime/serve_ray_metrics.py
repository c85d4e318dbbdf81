"""``/metrics`` under ``levit serve --ray``: every replica's series in every scrape, each labelled with
its replica.

Ray Serve's proxy sends each scrape to whichever replica its router picks, and each replica counts
only what it served: scraped through the proxy, a counter would jump between replicas' values, which
Prometheus reads as resets. So each replica posts its own exposition to one board (a named Ray actor,
:class:`MetricsBoard`) when it is scraped and every few seconds, and answers a scrape with every
replica's latest exposition, each series labelled ``replica="host:pid"`` (:func:`merge_expositions`);
another replica's series are at most a second or so behind its own.
A replica that is gone keeps its last values on the board, so no series ever goes down; a replica
started in its place is a new label. The board lives as long as the Ray cluster (or until the
application's driver removes it).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

__all__ = ["BOARD_NAME", "NAMESPACE", "MetricsBoard", "board", "merge_expositions", "remove_board", "scrape"]

BOARD_NAME = "levit-serve-metrics"
NAMESPACE = "levit"
PUSH_EVERY_S = 1.0  # a replica nobody scrapes still posts its values this often (one small actor call)


class MetricsBoard:
    """The Ray actor holding each replica's latest exposition (Prometheus text), by replica."""

    def __init__(self) -> None:
        self.latest: dict[str, str] = {}

    def put(self, replica: str, text: str) -> dict[str, str]:
        """Record ``replica``'s exposition; returns every replica's latest."""
        self.latest[replica] = text
        return dict(self.latest)


def board() -> Any:
    """The board's actor handle, made on first use (any replica may be first)."""
    import ray

    cls = ray.remote(num_cpus=0)(MetricsBoard)
    return cls.options(name=BOARD_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True).remote()


def remove_board() -> None:
    """Remove the board (the application is gone); nothing when there is none."""
    import ray

    with contextlib.suppress(ValueError):
        ray.kill(ray.get_actor(BOARD_NAME, namespace=NAMESPACE))


def merge_expositions(texts: dict[str, str]) -> bytes:
    """One Prometheus exposition of several replicas' ``texts`` (replica -> its exposition), every
    sample with a ``replica`` label, each metric family once."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    for replica, text in sorted(texts.items()):
        for fam in text_string_to_metric_families(text):
            merged = families.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type, fam.unit))
            merged.samples.extend(s._replace(labels={**s.labels, "replica": replica}) for s in fam.samples)

    class Board:
        def collect(self) -> Any:
            return iter(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Board())
    return generate_latest(registry)


async def scrape(replica: str, own: bytes, handle: Any) -> bytes:
    """A replica's answer to a scrape: its ``own`` exposition posted to the board ``handle``, then every
    replica's, merged (:func:`merge_expositions`)."""
    return merge_expositions(await handle.put.remote(replica, own.decode()))


async def post_every(replica: str, exposition: Any, handle: Any, seconds: float = PUSH_EVERY_S) -> None:
    """Post ``exposition()`` to the board now and every ``seconds``, for the replica's life."""
    while True:
        with contextlib.suppress(Exception):  # the board gone with the application: nothing to post to
            await handle.put.remote(replica, exposition().decode())
        await asyncio.sleep(seconds)
