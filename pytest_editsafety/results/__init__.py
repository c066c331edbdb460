"""Certification results: typed records, the versioned JSON file, shard merging and baseline comparison.

The JSON file (``"schema": "pytest-editsafety/v1"``) is the certificate a run leaves behind; the markdown
report is rendered from it alone, so shards run on other machines can be merged and re-rendered later.

Layout::

    {"schema": "pytest-editsafety/v1",
     "metadata":   {RunMetadata fields},
     "cases":      [{CaseRecord fields}, ...],       # sorted by test_id
     "sequential": [{SequentialRecord fields}, ...]} # sorted by test_id

Non-finite floats are the strings ``"nan"``, ``"inf"``, ``"-inf"``; ``null`` appears only where a value is
optional (a metric an editor does not have, e.g. ``denominator`` for MEMIT). Validation is strict: unknown
or missing fields, wrong types and inconsistent records are errors whose message names the file and the
JSON path (``run.json: $.cases[3].metrics.ppl_ratio: expected a number``).

Modules: ``schema`` (field types to and from JSON), ``records`` (the record types and their invariants),
``io`` (the file), ``merge`` (shards into one run), ``summary`` (per editor and model), ``compare``
(regressions against a baseline).
"""

from __future__ import annotations

from pytest_editsafety.results.compare import MAX_PPL_RATIO_GROWTH, Regression, compare
from pytest_editsafety.results.errors import RecordError, ResultsError, ResultsFormatError
from pytest_editsafety.results.io import from_json, read_result, to_json, write_result
from pytest_editsafety.results.merge import MergeError, merge
from pytest_editsafety.results.records import OUTCOMES, CaseRecord, RunMetadata, RunResult, SequentialRecord
from pytest_editsafety.results.schema import SCHEMA, decode_float, encode_float
from pytest_editsafety.results.summary import GroupSummary, group_keys, summarize_cases, summarize_groups

__all__ = [
    "MAX_PPL_RATIO_GROWTH",
    "OUTCOMES",
    "SCHEMA",
    "CaseRecord",
    "GroupSummary",
    "MergeError",
    "RecordError",
    "Regression",
    "ResultsError",
    "ResultsFormatError",
    "RunMetadata",
    "RunResult",
    "SequentialRecord",
    "compare",
    "decode_float",
    "encode_float",
    "from_json",
    "group_keys",
    "merge",
    "read_result",
    "summarize_cases",
    "summarize_groups",
    "to_json",
    "write_result",
]
