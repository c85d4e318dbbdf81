"""What ``levit bench`` runs, whichever the suite: the paper's Table 3 (:mod:`levit.paper.speed`) or
LeViT against today's field (:mod:`levit.paper.field`), with the table and the picture that suit
the rows.

>>> rows = run_bench(SpeedRun(suite="modern", quick=True))
>>> print(format_bench(rows))

Every CPU protocol of the modern suite in one run (``levit bench --suite modern --protocol all``):

>>> rows = run_protocols(protocol_runs(SpeedRun(suite="modern"), "all"))
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from .field import format_protocols, plot_protocols, protocol_runs, run_field, run_protocols
from .speed import SpeedRun, format_table, plot_rows, run_speed_table

__all__ = ["SpeedRun", "format_bench", "plot_bench", "protocol_runs", "run_bench", "run_protocols"]


def _is_field(rows: Sequence[dict]) -> bool:
    return bool(rows) and "top1_source" in rows[0]


def run_bench(run: SpeedRun, *, progress: Callable[[int, int, str, dict | None], None] | None = None) -> list[dict]:
    """The rows of ``run`` (resolved first): :func:`levit.paper.speed.run_speed_table` for the paper's
    suite, :func:`levit.paper.field.run_field` for the modern one; ``progress`` as they take it."""
    run = run.resolved()
    if run.suite == "modern":
        return run_field(run, progress=progress)
    return run_speed_table(run, progress=progress)


def format_bench(rows: Sequence[dict]) -> str:
    """The plain-text table of either suite's rows (the modern suite's: one per protocol)."""
    return format_protocols(rows) if _is_field(rows) else format_table(rows)


def plot_bench(rows: Sequence[dict], path: str | os.PathLike, title: str | None = None) -> list[Path]:
    """The pictures written: Figure 1 for the paper's suite; for the modern one the Pareto picture,
    one per protocol where the rows hold several (``FILE_<protocol>.png``,
    :func:`levit.paper.field.protocol_plot_path`)."""
    return plot_protocols(rows, path) if _is_field(rows) else [plot_rows(rows, path, title)]
