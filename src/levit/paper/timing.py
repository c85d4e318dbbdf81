"""One way to time things, for the library's benchmarks and the scripts under ``benchmarks/``.

A timing is a *window*: a callable runs back to back until at least ``window`` seconds have passed,
and the window reports seconds per call. Candidates that are compared run in *interleaved rounds*
(one window each per round, the order reversed every other round), so a disturbance from another
job on a shared machine falls on all of them alike; a summary (median, or the fastest window) is
taken per candidate afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["cuda_sync", "interleaved", "timed_window", "warm_up"]


def cuda_sync(device: object) -> Callable[[], None] | None:
    """A synchronize function for a CUDA device (queued kernels must finish inside a window), else ``None``."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    return lambda: torch.cuda.synchronize(device)


def warm_up(
    run: Callable[[], object], seconds: float = 0.0, *, min_calls: int = 2, sync: Callable[[], None] | None = None
) -> None:
    """Call ``run`` at least ``min_calls`` times and for at least ``seconds`` (caches, lazy inits, autotuning)."""
    n, t0 = 0, time.perf_counter()
    while n < min_calls or time.perf_counter() - t0 < seconds:
        run()
        n += 1
    if sync is not None:
        sync()


def timed_window(run: Callable[[], object], window: float, *, sync: Callable[[], None] | None = None) -> float:
    """Seconds per call of ``run``, called back to back for at least ``window`` seconds (at least once)."""
    n, t0 = 0, time.perf_counter()
    while True:
        run()
        n += 1
        if sync is not None:
            sync()
        dt = time.perf_counter() - t0
        if dt >= window:
            return dt / n


def interleaved(
    cands: dict[str, Callable[[], object]],
    *,
    rounds: int,
    window: float,
    sync: Callable[[], None] | None = None,
    warmup_calls: int = 2,
    on_round: Callable[[int, int], None] | None = None,
) -> dict[str, list[float]]:
    """``{name: [seconds per call in each round]}``: every candidate gets one timed window per round,
    in the given order on even rounds and reversed on odd ones, after ``warmup_calls`` calls each."""
    for run in cands.values():
        warm_up(run, min_calls=warmup_calls, sync=sync)
    out: dict[str, list[float]] = {k: [] for k in cands}
    for r in range(rounds):
        for name in list(cands) if r % 2 == 0 else list(cands)[::-1]:
            out[name].append(timed_window(cands[name], window, sync=sync))
        if on_round is not None:
            on_round(r + 1, rounds)
    return out
