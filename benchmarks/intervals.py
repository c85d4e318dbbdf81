"""What a benchmark run can tell apart on a machine whose speed drifts: an interval for the median of
paired ratios (round by round), whatever their distribution. Used by benchmarks/perf_analyzer.py and
benchmarks/decoders.py."""

from __future__ import annotations

import math


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """A distribution-free interval for the median of ``values`` (order statistics: the median lies
    between the k-th smallest and the k-th largest of n values with probability 1 - 2 P(Bin(n, 1/2) < k)):
    ``(low, high, coverage)`` for the largest k whose coverage is at least ``confidence``, or k = 1
    (the smallest and largest) with the coverage it has when too few values reach it."""
    xs, n = sorted(values), len(values)
    below = 0.0  # P(Bin(n, 1/2) < k), k = 1, 2, ...
    k, coverage = 1, 1 - 2 * 0.5**n
    for j in range(1, (n + 1) // 2):
        below += math.comb(n, j - 1) * 0.5**n
        below_next = below + math.comb(n, j) * 0.5**n
        if 1 - 2 * below_next < confidence:
            break
        k, coverage = j + 1, 1 - 2 * below_next
    return xs[k - 1], xs[n - k], coverage
