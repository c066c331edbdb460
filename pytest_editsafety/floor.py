"""The denominator floor: an editor's median ``|uᵀk|`` over a model's normal reference cases.

A certification test fails an edit whose denominator falls below a fraction of that median (the papers'
collapse cases divide by ~100x less than normal ones). The median is measured from keys alone through the
editor's own ``denominator`` report (:mod:`editors.base`), once per (editor, model), and kept on disk under the
cache root, keyed by everything it depends on, so other workers and later runs read it instead of measuring
again. The median of every other number in the report (ROME's ``interference``, ``key_cosine``, ...) is kept
beside it: the pre-flight guard judges an edit against the normal cases' medians. An editor without a
denominator has no floor.
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

__all__ = ["FLOOR_CACHE_FORMAT", "provided_digest", "reference_medians"]

# /2: keyed by the editor's provided resources (templates, C per layer) instead of ROME's attributes
# /3: each entry carries a digest of its payload, checked on read
# /4: stored as pytest_editsafety.keyed_cache entries (the median and count under "value")
# /5: the median of every number in the report under "medians"; keyed by the ordinary texts an editor was given
FLOOR_CACHE_FORMAT = "pytest-editsafety/denominator-median/5"


def provided_digest(provided: Any) -> dict[str, Any]:
    """What an editor was given, as plain digests: its context templates, each layer's C, its ordinary texts."""
    from editors.restore import tensor_digest

    return {
        "templates": stable_hash(list(provided.context_templates or ())),
        "second_moments": {str(layer): tensor_digest(c) for layer, c in sorted(provided.second_moments.items())},
        "trained_network": str(provided.trained_network) if provided.trained_network is not None else None,
        "ordinary_texts": stable_hash(list(provided.ordinary_texts)),
    }


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _valid(entry: Any) -> bool:
    """A stored floor: the median of ``n`` finite denominators (None when none was finite), and the medians of the
    report's other numbers (each None when none was finite)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("n"), int):
        return False
    medians = entry.get("medians")
    if not isinstance(medians, dict) or not all(v is None or _is_number(v) for v in medians.values()):
        return False
    return medians.get("denominator") == entry.get("median") and (entry["median"] is None or _is_number(entry["median"]))


def _reports(editor: Any, loaded: Any, cases: Sequence[Any], progress: Callable[[str], None]
             ) -> list[dict[str, float]] | None:
    """``editor``'s denominator report for each case, or None for an editor without a denominator; ``progress``
    takes a line every few seconds."""
    from editors.progress import ThrottledProgress

    lines = ThrottledProgress(f"denominator floor of {editor.name}: reference cases", len(cases), "cases", progress)
    reports = []
    for case in cases:
        report = editor.denominator(loaded.model, loaded.tokenizer, loaded.family,
                                    EditRequest(case.subject, case.prompt, case.target_new))
        if report is None:
            return None
        if "denominator" not in report:
            raise ValueError(f"editor {editor.name!r}: its denominator() report has no 'denominator' key "
                             f"(got {sorted(report)})")
        numbers = {}
        for name, value in report.items():
            try:
                numbers[name] = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"editor {editor.name!r}: its denominator() report's {name!r} is not a number "
                                 f"(got {value!r})") from None
        reports.append(numbers)
        lines.advance()
    lines.finish()
    return reports


def reference_medians(editor: Any, loaded: Any, normal_cases: Sequence[Any], *, key_fields: Mapping[str, Any],
                      root: Path | None, verify: Callable[[], None] = lambda: None,
                      progress: Callable[[str], None] = lambda line: None) -> dict[str, float | None] | None:
    """The median of each number in ``editor``'s denominator report over ``normal_cases`` on ``loaded`` (non-finite
    values left out; None where none is finite), ``"denominator"`` the floor's; None for an editor without a
    denominator. Read from the cache under ``root`` when an entry with exactly ``key_fields`` (plus this module's
    format) is there; ``root`` None measures without the disk cache (a key that cannot name everything the medians
    depend on). ``verify`` runs after the reports and before anything is written (it raises when the model was
    changed); ``progress`` takes a line every few seconds while the reports run."""
    if not normal_cases:
        return None

    def measured_entry() -> dict[str, Any] | None:
        reports = _reports(editor, loaded, normal_cases, progress)
        # the reports ran the editor's code: a model it changed must not leave a median behind for later runs
        verify()
        if reports is None:  # the first case already said so: nothing is kept for such an editor
            return None
        medians: dict[str, float | None] = {}
        for name in sorted({k for report in reports for k in report}):
            medians[name] = aggregates.median(r[name] for r in reports if name in r and math.isfinite(r[name]))
        n = sum(1 for r in reports if math.isfinite(r["denominator"]))
        log.info("%s: median |uᵀk| over %d normal cases = %s", key_fields.get("editor"), n, medians["denominator"])
        return {"median": medians["denominator"], "n": n, "medians": medians}

    key = {"format": FLOOR_CACHE_FORMAT, **key_fields}
    entry = cached_value(root, "denominators", str(key_fields.get("editor", "editor")), key, measured_entry,
                         valid=_valid)
    return None if entry is None else dict(entry["medians"])
