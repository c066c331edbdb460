"""Mean, median and worst value of measurements that may hold NaN or infinity.

A collapsed model yields NaN and infinite perplexities; these helpers decide what an aggregate of such
values means instead of leaving it to sort order. No values give ``None``, so a table can show a dash.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable

__all__ = ["mean", "median", "nan_as_worst", "worst"]


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
