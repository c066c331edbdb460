"""The denominator floor: an editor's median ``|uᵀk|`` over a model's normal reference cases.

A certification test fails an edit whose denominator falls below a fraction of that median (the papers'
collapse cases divide by ~100x less than normal ones). The median is measured from keys alone through the
editor's own ``denominator`` report (:mod:`editors.base`), once per (editor, model), and kept on disk under the
cache root, keyed by everything it depends on, so other workers and later runs read it instead of measuring
again. An editor without a denominator has no floor.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from editors.base import EditRequest
from editors.storage import atomic_write_text, build_lock, slugify, stable_hash
from pytest_editsafety import aggregates

log = logging.getLogger(__name__)

__all__ = ["FLOOR_CACHE_FORMAT", "denominator_median", "provided_digest"]

# /2: keyed by the editor's provided resources (templates, C per layer) instead of ROME's attributes
# /3: each entry carries a digest of its payload, checked on read
FLOOR_CACHE_FORMAT = "pytest-editsafety/denominator-median/3"


def provided_digest(provided: Any) -> dict[str, Any]:
    """What an editor was given, as plain digests: its context templates and each layer's C."""
    from editors.restore import tensor_digest

    return {
        "templates": stable_hash(list(provided.context_templates or ())),
        "second_moments": {str(layer): tensor_digest(c) for layer, c in sorted(provided.second_moments.items())},
        "trained_network": str(provided.trained_network) if provided.trained_network is not None else None,
    }


def _read(path: Path, key_fields: Mapping[str, Any]) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        log.warning("ignoring unreadable denominator cache %s: %s", path, err)
        return None
    if not isinstance(data, dict) or data.get("key") != dict(key_fields):
        return None
    median = data.get("median")
    if median is not None and not isinstance(median, (int, float)):
        return None
    if data.get("digest") != _digest(data):
        log.warning("denominator cache %s does not match the digest written with it (edited or damaged); "
                    "measuring the median again", path)
        return None
    return data


def _digest(entry: Mapping[str, Any]) -> str:
    return stable_hash({"key": entry.get("key"), "median": entry.get("median"), "n": entry.get("n")}, 64)


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

    if root is None:
        finite = measure()
        return None if finite is None else aggregates.median(finite)
    key = {"format": FLOOR_CACHE_FORMAT, **key_fields}
    path = root / "denominators" / f"{slugify(str(key_fields.get('editor', 'editor')))}-{stable_hash(key)}.json"
    cached = _read(path, key)
    if cached is not None:
        return cached["median"]
    with build_lock(path):
        cached = _read(path, key)
        if cached is not None:
            return cached["median"]
        finite = measure()
        if finite is None:  # the first case already said so: nothing is written for such an editor
            return None
        median = aggregates.median(finite)
        entry = {"key": key, "median": median, "n": len(finite)}
        atomic_write_text(path, json.dumps({**entry, "digest": _digest(entry)}, indent=1))
        log.info("%s: median |uᵀk| over %d normal cases = %s", key_fields.get("editor"), len(finite), median)
        return median
