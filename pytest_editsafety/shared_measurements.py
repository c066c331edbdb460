"""What one editor measured for a case on an unedited model, kept for the other editors of the run that declare the
same measurement (:meth:`editors.base.EditorBase.measurement_key`): ROME's v* measured for ``rome`` is the one
``c-rome``, ``c-rome-prefix`` and ``r-rome`` would measure with the same settings, MEMIT's z the one EMMET and
AlphaEdit would. Each editor still applies, measures and restores its own edit; only the search is not run again,
so the records are the ones each editor gets alone: bit for bit when each search runs alone (a search batch of 1,
the CPU default), to float rounding where a search batch (a GPU's default) measured the value.

One store per loaded model (``ModelState.shared``), valid while the model is the unedited one it was measured on:
the hub restores every edit and checks the whole model, and drops the store with the model when a restore fails
or the check finds a change (with ``--editsafety-restore-check=off`` it relies on the restore alone, as every later
test of the run does).
Bounded, oldest first out: the plan runs a case's editors one after another (case-major), so a value is wanted
within a few tests of its measurement.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_MAX_ENTRIES", "SharedMeasurements"]

# a case's editors follow each other in the plan, and a GPU's search batch measures 8 cases ahead for each editor
# family; 64 keeps every value until its last sharer runs, at ~220 KB per ROME value (5 vectors) at a 7B model's
# 11,008 dims. Under --dist loadgroup, which keeps each (model, editor) on one worker, a case's editors run far apart
# or on other workers, and most values are gone or elsewhere when a sharer comes: it then searches for itself
DEFAULT_MAX_ENTRIES = 64


class SharedMeasurements:
    """Prepared values by measurement key, at most ``max_entries`` (least recently used out first)."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"SharedMeasurements.max_entries must be an integer >= 1, got {max_entries!r}")
        self.max_entries = max_entries
        self._values: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable) -> Any | None:
        """The value measured under ``key``, or None."""
        if key in self._values:
            self._values.move_to_end(key)
            return self._values[key]
        return None

    def put(self, key: Hashable, value: Any) -> None:
        self._values[key] = value
        self._values.move_to_end(key)
        while len(self._values) > self.max_entries:
            self._values.popitem(last=False)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._values

    def __len__(self) -> int:
        return len(self._values)

    def clear(self) -> None:
        self._values.clear()
