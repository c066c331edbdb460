"""Mean, median and worst value of measurements that may hold NaN or infinity.

A collapsed model yields NaN and infinite perplexities; these helpers decide what an aggregate of such
values means instead of leaving it to sort order. No values give ``None``, so a table can show a dash.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable

__all__ = ["mean", "median", "nan_as_worst", "spearman", "worst"]


def mean(values: Iterable[float]) -> float | None:
    """``fsum`` mean, exact over many values; NaN and infinities propagate."""
    values = list(values)
    return math.fsum(values) / len(values) if values else None


def median(values: Iterable[float]) -> float | None:
    """The median; NaN when any value is NaN, because with NaN the sort order (and so the median) is arbitrary."""
    values = list(values)
    if not values:
        return None
    return math.nan if any(math.isnan(v) for v in values) else float(statistics.median(values))


def nan_as_worst(values: Iterable[float]) -> list[float]:
    """The values with NaN as +inf: for measurements where bigger is worse (a perplexity that is NaN means the
    model is broken, the worst outcome)."""
    return [math.inf if math.isnan(v) else v for v in values]


def worst(values: Iterable[float]) -> float | None:
    """The maximum, NaN ranking as +inf."""
    return max(nan_as_worst(values), default=None)


def _ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing the mean of their ranks."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x: Iterable[float], y: Iterable[float]) -> float | None:
    """Spearman's rank correlation of paired finite values (ties ranked by their mean rank); None for fewer than
    three pairs or a constant side. +inf ranks above every finite value; a NaN pair is left out."""
    pairs = [(a, b) for a, b in zip(x, y) if not (math.isnan(a) or math.isnan(b))]
    if len(pairs) < 3:
        return None
    rx, ry = _ranks([a for a, _ in pairs]), _ranks([b for _, b in pairs])
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = math.fsum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = math.fsum((a - mx) ** 2 for a in rx), math.fsum((b - my) ** 2 for b in ry)
    return None if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)
