"""Domain checks for hyper-parameter dataclasses: every field finite, of the right sign and range, named.

A NaN clamp, a negative weight decay or a negative template length would otherwise pass through the loaders and
turn into a silent no-op, an explosion or an IndexError far from the file that caused it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

__all__ = ["check_count", "check_number", "check_template_recipe"]


def _owner(obj: Any) -> str:
    return type(obj).__name__


def check_number(obj: Any, names: Iterable[str], *, minimum: float = 0.0, strict: bool = False) -> None:
    """Each field is a finite number ``>= minimum`` (``> minimum`` when ``strict``)."""
    for name in names:
        value = getattr(obj, name)
        bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
        if bad or (value <= minimum if strict else value < minimum):
            relation = ">" if strict else ">="
            raise ValueError(f"{_owner(obj)}.{name}: expected a finite number {relation} {minimum:g}, got {value!r}")


def check_count(obj: Any, names: Iterable[str], *, minimum: int = 1) -> None:
    """Each field is an integer ``>= minimum``."""
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{_owner(obj)}.{name}: expected an integer >= {minimum}, got {value!r}")


def check_template_recipe(obj: Any, name: str = "context_templates") -> None:
    """ROME's ``[[length, count], ...]``: lengths >= 1 token, counts >= 0."""
    recipe = getattr(obj, name)
    for i, pair in enumerate(recipe):
        if len(pair) != 2:
            raise ValueError(f"{_owner(obj)}.{name}[{i}]: expected [length, count], got {pair!r}")
        length, count = pair
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"{_owner(obj)}.{name}[{i}]: the length must be an integer >= 1, got {length!r}")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"{_owner(obj)}.{name}[{i}]: the count must be an integer >= 0, got {count!r}")
