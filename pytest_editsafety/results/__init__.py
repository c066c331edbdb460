"""Certification results: typed records, the versioned JSON file, shard merging and baseline comparison.

The JSON file (``"schema": "pytest-editsafety/v2"``) is the certificate a run leaves behind; the markdown
report is rendered from it alone, so shards run on other machines can be merged and re-rendered later.

Layout::

    {"schema": "pytest-editsafety/v2",
     "metadata":   {RunMetadata fields},
     "plan":       {RunPlan fields} | null,          # what the run set out to certify
     "sessions":   [{Session fields}, ...],          # one per pytest session (shard) that ran it
     "coverage":   {Coverage fields},                # derived: complete, partial (with its gaps) or unknown
     "cases":      [{CaseRecord fields}, ...],       # sorted by test_id
     "sequential": [{SequentialRecord fields}, ...], # sorted by test_id
     "batches":    [{BatchRecord fields}, ...]}      # only in runs with --editsafety-batch-size; each batch
                                                     # lists its member cases' ids and their CaseRecords

Each record names the worker that ran it (``"gw0"``, or ``"main"`` without xdist) and the device
(``"cuda:0 (GPU 3)"``, ``"cpu"``; null when unknown). ``pytest-editsafety/v1`` files (no plan, sessions,
coverage, workers or devices) are still read; their coverage is unknown, so they render but never certify.

Non-finite floats are the strings ``"nan"``, ``"inf"``, ``"-inf"``; ``null`` appears only where a value is
optional (a metric an editor does not have, e.g. ``denominator`` for MEMIT). Validation is strict: unknown
or missing fields, wrong types and inconsistent records are errors whose message names the file and the
JSON path (``run.json: $.cases[3].metrics.ppl_ratio: expected a number``).

Modules: ``schema`` (field types to and from JSON), ``records`` (the record types and their invariants),
``coverage`` (the plan, the sessions and what the records cover of the plan),
``io`` (the file), ``merge`` (shards into one run), ``summary`` (per editor and model), ``compare``
(regressions against a baseline).
"""

from __future__ import annotations

from pytest_editsafety.results.compare import MAX_PPL_RATIO_GROWTH, Regression, compare, missing_from
from pytest_editsafety.results.coverage import (
    Coverage,
    Gap,
    PlannedCaseSet,
    RunPlan,
    Session,
    Shard,
    coverage_of,
    plan_digest,
    shown_ids,
)
from pytest_editsafety.results.errors import RecordError, ResultsError, ResultsFormatError
from pytest_editsafety.results.io import from_json, read_result, to_json, write_result
from pytest_editsafety.results.merge import MergeError, merge
from pytest_editsafety.results.records import (
    BOS_NOT_LOADED,
    BOS_NOTHING_TO_STRIP,
    BOS_PROTOCOL_VALUES,
    BOS_STRIPPED,
    OUTCOMES,
    BatchRecord,
    CaseRecord,
    RunMetadata,
    RunResult,
    SequentialRecord,
)
from pytest_editsafety.results.schema import READABLE_SCHEMAS, SCHEMA, SCHEMA_V1, decode_float, encode_float
from pytest_editsafety.results.summary import GroupSummary, group_keys, summarize_cases, summarize_groups

__all__ = [
    "BOS_NOT_LOADED",
    "BOS_NOTHING_TO_STRIP",
    "BOS_PROTOCOL_VALUES",
    "BOS_STRIPPED",
    "MAX_PPL_RATIO_GROWTH",
    "OUTCOMES",
    "READABLE_SCHEMAS",
    "SCHEMA",
    "SCHEMA_V1",
    "BatchRecord",
    "CaseRecord",
    "Coverage",
    "Gap",
    "GroupSummary",
    "MergeError",
    "PlannedCaseSet",
    "RecordError",
    "Regression",
    "ResultsError",
    "ResultsFormatError",
    "RunMetadata",
    "RunPlan",
    "RunResult",
    "SequentialRecord",
    "Session",
    "Shard",
    "compare",
    "coverage_of",
    "decode_float",
    "encode_float",
    "from_json",
    "group_keys",
    "merge",
    "missing_from",
    "plan_digest",
    "read_result",
    "shown_ids",
    "summarize_cases",
    "summarize_groups",
    "to_json",
    "write_result",
]
