"""The denominator floor: an editor's median ``|uᵀk|`` over a model's normal reference cases.

A certification test fails an edit whose denominator falls below a fraction of that median (the papers'
collapse cases divide by ~100x less than normal ones). The median is measured from keys alone through the
editor's own ``denominator`` report (:mod:`editors.base`), once per (editor, model), and kept on disk under the
cache root, keyed by everything it depends on, so other workers and later runs read it instead of measuring
again. An editor without a denominator has no floor.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from editors.base import EditRequest
from editors.storage import stable_hash
from pytest_editsafety import aggregates
from pytest_editsafety.keyed_cache import cached_value

log = logging.getLogger(__name__)

__all__ = ["FLOOR_CACHE_FORMAT", "denominator_median", "provided_digest"]

# /2: keyed by the editor's provided resources (templates, C per layer) instead of ROME's attributes
# /3: each entry carries a digest of its payload, checked on read
# /4: stored as pytest_editsafety.keyed_cache entries (the median and count under "value")
FLOOR_CACHE_FORMAT = "pytest-editsafety/denominator-median/4"


def provided_digest(provided: Any) -> dict[str, Any]:
    """What an editor was given, as plain digests: its context templates and each layer's C."""
    from editors.restore import tensor_digest

    return {
        "templates": stable_hash(list(provided.context_templates or ())),
        "second_moments": {str(layer): tensor_digest(c) for layer, c in sorted(provided.second_moments.items())},
        "trained_network": str(provided.trained_network) if provided.trained_network is not None else None,
    }


def _valid(entry: Any) -> bool:
    """A stored floor: the median of ``n`` finite denominators (None when none was finite)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("n"), int):
        return False
    median = entry.get("median")
    return median is None or (isinstance(median, (int, float)) and not isinstance(median, bool))


def _denominators(editor: Any, loaded: Any, cases: Sequence[Any]) -> list[float] | None:
    """``|uᵀk|`` as ``editor`` reports it for each case, or None for an editor without a denominator."""
    values = []
    for case in cases:
        report = editor.denominator(loaded.model, loaded.tokenizer, loaded.family,
                                    EditRequest(case.subject, case.prompt, case.target_new))
        if report is None:
            return None
        if "denominator" not in report:
            raise ValueError(f"editor {editor.name!r}: its denominator() report has no 'denominator' key "
                             f"(got {sorted(report)})")
        values.append(float(report["denominator"]))
    return values


def denominator_median(editor: Any, loaded: Any, normal_cases: Sequence[Any], *, key_fields: Mapping[str, Any],
                       root: Path | None, verify: Callable[[], None] = lambda: None) -> float | None:
    """Median ``|uᵀk|`` of ``editor`` over ``normal_cases`` on ``loaded``, from the cache under ``root`` when
    an entry with exactly ``key_fields`` (plus this module's format) is there; None without a denominator.
    ``root`` None measures without the disk cache (a key that cannot name everything the median depends on).
    ``verify`` runs after the reports and before anything is written (it raises when the model was changed)."""
    if not normal_cases:
        return None

    def measure() -> list[float] | None:
        values = _denominators(editor, loaded, normal_cases)
        # the reports ran the editor's code: a model it changed must not leave a median behind for later runs
        verify()
        return None if values is None else [v for v in values if math.isfinite(v)]

    def measured_entry() -> dict[str, Any] | None:
        finite = measure()
        if finite is None:  # the first case already said so: nothing is kept for such an editor
            return None
        median = aggregates.median(finite)
        log.info("%s: median |uᵀk| over %d normal cases = %s", key_fields.get("editor"), len(finite), median)
        return {"median": median, "n": len(finite)}

    key = {"format": FLOOR_CACHE_FORMAT, **key_fields}
    entry = cached_value(root, "denominators", str(key_fields.get("editor", "editor")), key, measured_entry,
                         valid=_valid)
    return None if entry is None else entry["median"]
