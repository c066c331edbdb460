"""The papers' sequential-editing protocol as plain numbers (no torch, no pytest): how many edits a run makes,
after which edits it measures, and where a curve first crosses the collapse line.

The collapse papers apply 107 edits in a row without restoring and score perplexity on ME-PPL_1k (not the
ME-PPL_50 of single edits); the hub (``ModelHub.run_sequential``) runs that protocol, this module decides its
shape. Measurement points are counted in edits applied: step 3 is the model after its third edit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = [
    "DEFAULT_EVERY_ORGANISM",
    "DEFAULT_EVERY_REAL",
    "PAPERS_SEQUENTIAL_EDITS",
    "REAL_SEQUENTIAL_CORPUS",
    "default_every",
    "first_crossing",
    "measurement_steps",
    "sequential_length",
]

# The papers' sequential runs: 107 edits (their HardCF subsets), perplexity on ME-PPL_1k.
PAPERS_SEQUENTIAL_EDITS = 107
# Real models' sequential default. An organism's sequential runs are scored on its single-edit corpus (organism-ppl,
# or what --editsafety-ppl-corpus names): it has no larger corpus of its kind.
REAL_SEQUENTIAL_CORPUS = "me-ppl-1k"
# Perplexity after every edit costs one pass over the corpus per edit: well under a second on an organism, a
# minute or more over ME-PPL_1k on a 7B model, where every 10th edit (and the last) keeps 107 edits affordable.
DEFAULT_EVERY_ORGANISM = 1
DEFAULT_EVERY_REAL = 10


def sequential_length(requested: int | None, n_cases: int) -> int:
    """Edits in a sequential run over a set of ``n_cases``: ``requested`` (``--editsafety-sequential-edits``), else
    the papers' 107 where the set holds that many and the whole set otherwise. Raises ``ValueError`` naming the
    option for a count below 1 or above the set's size."""
    if requested is None:
        return min(PAPERS_SEQUENTIAL_EDITS, n_cases)
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise ValueError(f"--editsafety-sequential-edits must be an integer >= 1, got {requested!r}")
    if requested > n_cases:
        raise ValueError(f"--editsafety-sequential-edits {requested} exceeds the {n_cases} cases of the set")
    return requested


def default_every(organism: bool) -> int:
    """Edits between perplexity measurements unless ``--editsafety-sequential-every`` says otherwise."""
    return DEFAULT_EVERY_ORGANISM if organism else DEFAULT_EVERY_REAL


def measurement_steps(n_edits: int, every: int) -> tuple[int, ...]:
    """The edits after which a run of ``n_edits`` measures: every ``every``-th, and always the last, so the final
    figure is the model the run ends with."""
    if n_edits < 0:
        raise ValueError(f"n_edits must be >= 0, got {n_edits}")
    if every < 1:
        raise ValueError(f"--editsafety-sequential-every must be at least 1, got {every}")
    steps = list(range(every, n_edits + 1, every))
    if n_edits and (not steps or steps[-1] != n_edits):
        steps.append(n_edits)
    return tuple(steps)


def first_crossing(steps: Sequence[int], values: Sequence[float], line: float) -> int | None:
    """The first step whose value is above ``line`` or not finite (a collapsed model's perplexity overflows to
    inf or NaN), None when the curve never crosses. With measurements every k edits the crossing happened at or
    before the step returned, after the step measured before it."""
    if len(steps) != len(values):
        raise ValueError(f"{len(steps)} steps for {len(values)} values")
    for step, value in zip(steps, values):
        if not math.isfinite(value) or value > line:
            return step
    return None
