"""The records of a run: its metadata, one record per single-edit, batch or sequential test, and the run itself.

Field types are the file's schema (``schema.Record``); the checks here are the invariants across fields.
Timestamps are ISO 8601 with a timezone (``2025-01-01T12:00:00+00:00``; a trailing ``Z`` is accepted), so
that shards written on machines in different zones merge into one run.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pytest_editsafety.aggregates import worst
from pytest_editsafety.bounds import Bounds, BoundsError
from pytest_editsafety.results.errors import RecordError, ResultsFormatError
from pytest_editsafety.results.coverage import Coverage, RunPlan, Session, coverage_of, shown_ids
from pytest_editsafety.results.schema import (
    OPTIONAL,
    READABLE_SCHEMAS,
    SCHEMA,
    SCHEMA_V1,
    JsonValue,
    Record,
    describe_json,
)

__all__ = ["BOS_NOTHING_TO_STRIP", "BOS_NOT_LOADED", "BOS_PROTOCOL_VALUES", "BOS_STRIPPED", "OUTCOMES", "BatchRecord",
           "CaseRecord", "RunMetadata", "RunResult", "SequentialRecord"]

OUTCOMES = ("passed", "failed", "error")
# what the BOS-stripped protocol did to a model (pytest_editsafety.bos), as RunMetadata.bos_protocol records it
BOS_STRIPPED = "stripped"
BOS_NOTHING_TO_STRIP = "no BOS to strip"
BOS_NOT_LOADED = "not loaded"
BOS_PROTOCOL_VALUES = (BOS_STRIPPED, BOS_NOTHING_TO_STRIP, BOS_NOT_LOADED)
# record fields v2 added: where a test ran (null in a v1 file)
_V2_RECORD_FIELDS = ("worker", "device")


def _parse_time(text: str) -> datetime:
    stamp = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    if stamp.tzinfo is None:
        raise ValueError("timestamp has no timezone")
    return stamp


def _check_duration(duration_s: float) -> None:
    if not (math.isfinite(duration_s) and duration_s >= 0):
        raise RecordError("duration_s", f"must be a finite number >= 0, got {duration_s!r}")


@dataclass(frozen=True)
class RunMetadata(Record):
    """What a run certified and under which conditions."""

    editors: tuple[str, ...]
    # model name -> identity: the Hugging Face revision, or the organism's recipe hash
    models: Mapping[str, str]
    # editor -> model -> sha256 of the resolved hyper-parameters
    hparams_hashes: Mapping[str, Mapping[str, str]]
    # Bounds.to_dict(); stored as a plain dict so a file records exactly what was enforced
    bounds: Mapping[str, Any]
    corpus: str
    corpus_sha256: str
    library_versions: Mapping[str, str]
    hardware: str
    started: str
    finished: str
    duration_s: float
    # the command line(s) that produced the result: one per run, one per shard after a merge
    commands: tuple[str, ...]
    # the BOS-stripped protocol (--editsafety-strip-bos; the papers' A.2): model name -> what it did to that model
    # (BOS_PROTOCOL_VALUES); empty when the run did not use it. Optional: absent from files of runs without it, and
    # from every file written before it existed
    bos_protocol: Mapping[str, str] = field(default_factory=dict, metadata={OPTIONAL: True})
    # editor -> model -> the hyper-parameters the run edited with (layers resolved, plain JSON values): what
    # hparams_hashes hashes, so that a reader sees and can rerun the settings behind each verdict. Optional: absent
    # from files written before it existed, and for an editor whose hyper-parameters are no JSON values
    hparams: Mapping[str, Mapping[str, Mapping[str, JsonValue]]] = field(default_factory=dict,
                                                                          metadata={OPTIONAL: True})
    # model -> layer (as a string) -> where the second moment C the editors whitened with came from: a ROME
    # statistics file, or the corpus (its sha256, the texts and keys behind C). Optional: absent when no editor used C
    second_moments: Mapping[str, Mapping[str, str]] = field(default_factory=dict, metadata={OPTIONAL: True})
    # editor -> model -> hyper-parameter -> where its value came from: the built-in file
    # (editors/hparams/rome/gpt2-xl.json), the user's file by its path, or "overrides" (a mapping the caller
    # gave); a key not listed is the editor's own default. Optional: absent from files written before it existed,
    # and for an editor object given to the API, which carries its own hyper-parameters
    hparams_sources: Mapping[str, Mapping[str, Mapping[str, str]]] = field(default_factory=dict,
                                                                          metadata={OPTIONAL: True})

    def _listed(self, name: str, per_editor: Mapping[str, Mapping[str, Any]]) -> Iterator[tuple[str, str, str, Any]]:
        """``(where, editor, model, value)`` for each entry of the editor -> model -> value field ``name``, its editor
        and model checked to be listed."""
        for editor, per_model in per_editor.items():
            for model, value in per_model.items():
                where = f"{name}.{editor}.{model}"
                if editor not in self.editors or model not in self.models:
                    raise RecordError(where, "editor or model is not listed in 'editors' / 'models'")
                yield where, editor, model, value

    def _validate(self) -> None:
        if len(set(self.editors)) != len(self.editors):
            raise RecordError("editors", f"duplicate editor names in {list(self.editors)}")
        try:
            bounds = Bounds.from_mapping(self.bounds)
        except BoundsError as err:
            raise RecordError("bounds", str(err)) from None
        object.__setattr__(self, "bounds", bounds.to_dict())
        for name in ("started", "finished"):
            try:
                _parse_time(getattr(self, name))
            except ValueError as err:
                raise RecordError(name, f"not an ISO 8601 timestamp with a timezone: {err}") from None
        _check_duration(self.duration_s)
        for editor, per_model in self.hparams_hashes.items():
            if editor not in self.editors:
                raise RecordError(f"hparams_hashes.{editor}", "editor is not listed in 'editors'")
            for model in per_model:
                if model not in self.models:
                    raise RecordError(f"hparams_hashes.{editor}.{model}", "model is not listed in 'models'")
        if self.hparams:
            from editors.hparams import hparams_hash
        for where, editor, model, values in self._listed("hparams", self.hparams):
            digest = self.hparams_hashes.get(editor, {}).get(model)
            if digest is not None and hparams_hash(dict(values), len(digest)) != digest:
                raise RecordError(where, f"the values do not hash to hparams_hashes.{editor}.{model} ({digest})")
        for where, editor, model, sources in self._listed("hparams_sources", self.hparams_sources):
            values = self.hparams.get(editor, {}).get(model)
            unknown = sorted(set(sources) - set(values)) if values is not None else []
            if unknown:
                raise RecordError(where, f"names hyper-parameters the values lack: {', '.join(unknown)}")
        for model in self.second_moments:
            if model not in self.models:
                raise RecordError(f"second_moments.{model}", "model is not listed in 'models'")
        for model, what in self.bos_protocol.items():
            if model not in self.models:
                raise RecordError(f"bos_protocol.{model}", "model is not listed in 'models'")
            if what not in BOS_PROTOCOL_VALUES:
                raise RecordError(f"bos_protocol.{model}", f"must be one of {', '.join(BOS_PROTOCOL_VALUES)}, got "
                                                           f"{what!r}")

    @property
    def parsed_bounds(self) -> Bounds:
        return Bounds.from_mapping(self.bounds)

    @property
    def started_at(self) -> datetime:
        return _parse_time(self.started)

    @property
    def finished_at(self) -> datetime:
        return _parse_time(self.finished)


def _check_test(record: CaseRecord | SequentialRecord | BatchRecord, noun: str) -> None:
    """The invariants every test's record shares; ``noun`` names the test in messages."""
    for name in ("test_id", "editor", "model"):
        if not getattr(record, name):
            raise RecordError(name, "must not be empty")
    if record.outcome not in OUTCOMES:
        raise RecordError("outcome", f"must be one of {', '.join(OUTCOMES)}, got {record.outcome!r}")
    _check_duration(record.duration_s)
    if record.certified and record.violations:
        raise RecordError("certified", f"a certified {noun} cannot list violations")
    for name in _V2_RECORD_FIELDS:
        if getattr(record, name) == "":
            raise RecordError(name, "must not be empty (null when unknown)")


@dataclass(frozen=True)
class CaseRecord(Record):
    """One single-edit test: the case, its measurements and its verdict, as plain values."""

    test_id: str
    editor: str
    model: str
    case_set: str
    case_id: str
    is_hard: bool
    subject: str
    prompt: str
    target_new: str
    ground_truth: str
    # ppl_ratio, ppl_edited, ppl_unedited, denominator, numerator, key_cosine, delta_fro, cf_efficacy,
    # cf_generalization, cf_locality, ee_rewrite_acc, ee_rephrase_acc, ee_locality, and any diagnostic an
    # editor adds; None = does not apply to this editor
    metrics: Mapping[str, float | None]
    certified: bool
    collapse: bool
    violations: tuple[str, ...]
    outcome: str
    duration_s: float
    # the process that ran the test: an xdist worker id ("gw0") or "main"; None when unknown (a v1 file)
    worker: str | None = None
    # the device the model sat on, as torch names it in that process plus the GPU that is when
    # CUDA_VISIBLE_DEVICES renumbers them ("cuda:0 (GPU 3)", "cpu"); None when unknown (the test produced no
    # record of its own, a device map that never placed the model, a v1 file)
    device: str | None = None

    def _validate(self) -> None:
        if "" in self.metrics:
            raise RecordError("metrics", "a metric name must not be empty")
        _check_test(self, "case")

    @property
    def ok(self) -> bool:
        """Counts as certified: the verdict holds and the test itself passed (an error certifies nothing)."""
        return self.certified and self.outcome == "passed"

    def metric(self, name: str) -> float | None:
        return self.metrics.get(name)


@dataclass(frozen=True)
class SequentialRecord(Record):
    """One sequential-editing test: cases applied in order without restoring, measured as it goes.

    The curves are plain lists over the run's measurement points (``steps``: edits applied, every k-th and the
    last, ``pytest_editsafety.sequential``): perplexity on the run's corpus, and for each edited parameter its
    Frobenius norm over its unedited norm. Files written before the papers' protocol have one perplexity per edit
    and none of the optional fields; ``measured_steps`` reads both."""

    test_id: str
    editor: str
    model: str
    case_set: str
    n_edits: int
    # perplexity at each measurement point (``measured_steps``): after every edit in files that have no ``steps``
    ppl_after_each: tuple[float, ...]
    ppl_unedited: float
    certified: bool
    collapse: bool
    violations: tuple[str, ...]
    outcome: str
    duration_s: float
    # as in CaseRecord
    worker: str | None = None
    device: str | None = None
    # The papers' protocol (optional: absent from files written before it). Edits applied at each measurement
    # point, increasing; the last is n_edits unless the run stopped on an error.
    steps: tuple[int, ...] = field(default=(), metadata={OPTIONAL: True})
    # edited parameter -> ||W_step||_F / ||W_unedited||_F at each step (norm growth: sequential collapse follows
    # exponential growth of the edited weights' norm)
    norm_ratios: Mapping[str, tuple[float, ...]] = field(default_factory=dict, metadata={OPTIONAL: True})
    # the first step whose perplexity is above the collapse line (or not finite); absent when it never crosses
    collapse_step: int | None = field(default=None, metadata={OPTIONAL: True})
    # the corpus the curve is scored on (ME-PPL_1k for real models) and its content hash
    ppl_corpus: str = field(default="", metadata={OPTIONAL: True})
    ppl_corpus_sha256: str = field(default="", metadata={OPTIONAL: True})
    # each edit's efficacy (CounterFact: P(o*) > P(o) on its rewrite prompt, 1.0 or 0.0) right after it was made,
    # and re-measured after the last edit (retention: whether the later edits left it standing)
    efficacy_after_edit: tuple[float, ...] = field(default=(), metadata={OPTIONAL: True})
    efficacy_at_end: tuple[float, ...] = field(default=(), metadata={OPTIONAL: True})

    def _validate(self) -> None:
        _check_test(self, "run")
        # a run that errors midway records the edits it measured before stopping
        if len(self.ppl_after_each) > self.n_edits:
            raise RecordError(
                "ppl_after_each", f"{len(self.ppl_after_each)} measurements for {self.n_edits} edits"
            )
        if self.steps:
            if len(self.steps) != len(self.ppl_after_each):
                raise RecordError("steps", f"{len(self.steps)} steps for {len(self.ppl_after_each)} perplexities")
            if any(b <= a for a, b in zip(self.steps, self.steps[1:])) or self.steps[0] < 1 \
                    or self.steps[-1] > self.n_edits:
                raise RecordError("steps", f"must increase within 1..{self.n_edits}, got {list(self.steps)}")
            if self.outcome != "error" and self.steps[-1] != self.n_edits:
                raise RecordError("steps", f"a finished run's last measurement is after edit {self.n_edits}, not "
                                           f"{self.steps[-1]}")
        for name, ratios in self.norm_ratios.items():
            if len(ratios) != len(self.steps):
                raise RecordError(f"norm_ratios.{name}", f"{len(ratios)} values for {len(self.steps)} steps")
        if self.collapse_step is not None and self.collapse_step not in self.steps:
            raise RecordError("collapse_step", f"{self.collapse_step} is not a measured step")
        if len(self.efficacy_after_edit) > self.n_edits:
            raise RecordError("efficacy_after_edit", f"{len(self.efficacy_after_edit)} values for {self.n_edits} "
                                                     f"edits")
        if self.efficacy_at_end and len(self.efficacy_at_end) != self.n_edits:
            raise RecordError("efficacy_at_end", f"{len(self.efficacy_at_end)} values for {self.n_edits} edits")

    @property
    def ok(self) -> bool:
        return self.certified and self.outcome == "passed"

    @property
    def max_ppl(self) -> float | None:
        return worst(self.ppl_after_each)

    @property
    def measured_steps(self) -> tuple[int, ...]:
        """The edits applied at each perplexity measurement (every edit in files written before ``steps``)."""
        return self.steps or tuple(range(1, len(self.ppl_after_each) + 1))

    @property
    def max_norm_ratios(self) -> tuple[float, ...]:
        """At each step, the largest norm ratio over the edited parameters (empty without norm curves)."""
        if not self.norm_ratios:
            return ()
        return tuple(max(values) for values in zip(*self.norm_ratios.values()))

    @property
    def edits_took(self) -> int | None:
        """Edits whose efficacy held right after they were made (None when not measured)."""
        return sum(v >= 0.5 for v in self.efficacy_after_edit) if self.efficacy_after_edit else None

    @property
    def edits_retained(self) -> int | None:
        """Edits whose efficacy still holds after the last edit (None when not measured)."""
        return sum(v >= 0.5 for v in self.efficacy_at_end) if self.efficacy_at_end else None


@dataclass(frozen=True)
class BatchRecord(Record):
    """One batch test (--editsafety-batch-size): its member cases applied in one edit, then each member measured.

    ``members`` are the member cases' records (``test_id`` ``"<batch test id>/<case>"``), each judged on its own
    efficacy, generalization, locality and denominator and on the batch's perplexity, which every member carries;
    ``metrics`` holds what belongs to the batch: its perplexity figures and the edit's diagnostics (an editor's
    ``denominator`` there describes the whole batch, e.g. EMMET's smallest eigenvalue of D, and is reported, not
    judged). The batch is certified when every member is; ``violations`` lists theirs, each prefixed with its
    case id. A batch that errored before its members were measured has no members."""

    test_id: str
    editor: str
    model: str
    case_set: str
    # the member cases' ids in the case set, in the order they were applied (also for an errored batch)
    case_ids: tuple[str, ...]
    members: tuple[CaseRecord, ...]
    metrics: Mapping[str, float | None]
    certified: bool
    collapse: bool
    violations: tuple[str, ...]
    outcome: str
    duration_s: float
    worker: str | None = None
    device: str | None = None

    def _validate(self) -> None:
        _check_test(self, "batch")
        if not self.case_ids:
            raise RecordError("case_ids", "a batch has at least one case")
        if len(set(self.case_ids)) != len(self.case_ids):
            raise RecordError("case_ids", f"duplicate case ids in {list(self.case_ids)}")
        if self.members and tuple(m.case_id for m in self.members) != self.case_ids:
            raise RecordError("members", f"the members' case ids {[m.case_id for m in self.members]} are not "
                                         f"case_ids {list(self.case_ids)}")
        for i, member in enumerate(self.members):
            if (member.editor, member.model, member.case_set) != (self.editor, self.model, self.case_set):
                raise RecordError(f"members[{i}]", "names another editor, model or case set than its batch")
            if not member.test_id.startswith(f"{self.test_id}/"):
                raise RecordError(f"members[{i}].test_id", f"{member.test_id!r} is not named after its batch "
                                                           f"{self.test_id!r}")
        if self.certified and not (self.members and all(m.certified for m in self.members)):
            raise RecordError("certified", "a certified batch needs every member certified")

    @property
    def ok(self) -> bool:
        return self.certified and self.outcome == "passed"


@dataclass(frozen=True)
class RunResult(Record):
    """A whole run. Records are kept sorted by test id, so equal runs compare and serialise equal.

    Its plain form is the results document: ``{"schema": SCHEMA, "metadata": ..., "plan": ..., "sessions":
    [...], "coverage": ..., "cases": [...], "sequential": [...]}``. ``coverage`` is derived from the plan, the
    sessions and the records; a file whose recorded coverage disagrees with them is refused. A run without a
    plan (a v1 file, or a result built by hand) has an unknown coverage and is never certified.
    """

    metadata: RunMetadata
    cases: tuple[CaseRecord, ...] = ()
    sequential: tuple[SequentialRecord, ...] = ()
    plan: RunPlan | None = None
    sessions: tuple[Session, ...] = ()
    # batch tests (--editsafety-batch-size). Optional: absent from runs without batches and from older files
    batches: tuple[BatchRecord, ...] = field(default=(), metadata={OPTIONAL: True})

    def _validate(self) -> None:
        planned = set(self.plan.test_ids) if self.plan is not None else None
        for kind in ("cases", "sequential", "batches"):
            records: tuple[CaseRecord | SequentialRecord | BatchRecord, ...] = getattr(self, kind)
            seen: set[str] = set()
            for i, record in enumerate(records):
                where = f"{kind}[{i}]"
                if record.test_id in seen:
                    raise RecordError(f"{where}.test_id", f"duplicate test id {record.test_id!r}")
                seen.add(record.test_id)
                if record.editor not in self.metadata.editors:
                    raise RecordError(f"{where}.editor", f"editor {record.editor!r} is not in metadata.editors")
                if record.model not in self.metadata.models:
                    raise RecordError(f"{where}.model", f"model {record.model!r} is not in metadata.models")
                if planned is not None and record.test_id not in planned:
                    raise RecordError(f"{where}.test_id", f"test id {record.test_id!r} is not in plan.test_ids")
            object.__setattr__(self, kind, tuple(sorted(records, key=lambda r: r.test_id)))
        overlap = {r.test_id for r in self.cases} & {r.test_id for r in self.sequential}
        if overlap:
            raise RecordError("sequential", f"test ids also used by cases: {', '.join(sorted(overlap))}")
        overlap = {r.test_id for r in self.batches} & {r.test_id for r in (*self.cases, *self.sequential)}
        if overlap:
            raise RecordError("batches", f"test ids also used by other tests: {', '.join(sorted(overlap))}")
        for i, session in enumerate(self.sessions):
            unplanned = sorted(set(session.deselected or ()) - (planned or set()))
            if unplanned:
                raise RecordError(f"sessions[{i}].deselected", f"not in plan.test_ids: {shown_ids(unplanned)}")

    @property
    def tests(self) -> tuple[CaseRecord | SequentialRecord | BatchRecord, ...]:
        """Every test's record: single edits, sequential runs and batches."""
        return (*self.cases, *self.sequential, *self.batches)

    @property
    def edited_cases(self) -> tuple[CaseRecord, ...]:
        """Every case measured after an edit: the single-edit tests' records and the batches' members (whose
        test ids name their batch), in test id order."""
        members = (m for b in self.batches for m in b.members)
        return tuple(sorted((*self.cases, *members), key=lambda r: r.test_id))

    @functools.cached_property
    def coverage(self) -> Coverage:
        return coverage_of(self.plan, self.sessions, (r.test_id for r in self.tests))

    @property
    def certified(self) -> bool:
        """Every record certified and every planned test recorded; an empty run certifies nothing."""
        records = self.tests
        return bool(records) and all(r.ok for r in records) and self.coverage.complete

    def to_dict(self) -> dict[str, Any]:
        plain = super().to_dict()
        # the plan and its coverage ahead of the records, so a reader meets them first
        out = {"schema": SCHEMA, "metadata": plain["metadata"], "plan": plain["plan"],
               "sessions": plain["sessions"], "coverage": self.coverage.to_dict(), "cases": plain["cases"],
               "sequential": plain["sequential"]}
        if "batches" in plain:  # only a run with batches writes the field, so other runs' files are as before
            out["batches"] = plain["batches"]
        return out

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "<record>", path: str = "$") -> RunResult:
        if not isinstance(data, dict):
            raise ResultsFormatError(source, path, f"expected an object, got {describe_json(data)}")
        if "schema" not in data:
            raise ResultsFormatError(source, path, "missing field 'schema' (not a pytest-editsafety results file?)")
        schema = data["schema"]
        if schema not in READABLE_SCHEMAS:
            raise ResultsFormatError(source, f"{path}.schema", f"unsupported schema {describe_json(schema)}; this "
                                                               f"version reads {', '.join(READABLE_SCHEMAS)}")
        body = {k: v for k, v in data.items() if k not in ("schema", "coverage")}
        if schema == SCHEMA_V1:
            for name in ("plan", "sessions", "coverage"):
                if name in data:
                    raise ResultsFormatError(source, f"{path}.{name}", f"unknown field in a {SCHEMA_V1} file")
            body.update(plan=None, sessions=[])
            for name in ("cases", "sequential"):
                if isinstance(body.get(name), list):
                    body[name] = [_v1_record(r, source, f"{path}.{name}[{i}]") for i, r in enumerate(body[name])]
        elif "coverage" not in data:
            raise ResultsFormatError(source, path, "missing field(s) 'coverage'")
        result = super().from_dict(body, source=source, path=path)
        if schema == SCHEMA:
            _check_coverage(result, Coverage.from_dict(data["coverage"], source=source, path=f"{path}.coverage"),
                            source, f"{path}.coverage")
        return result


def _v1_record(record: Any, source: str, path: str) -> Any:
    """A v1 file's record in v2 form: where it ran is unknown."""
    if not isinstance(record, dict):
        return record  # the record's own check reports it
    for name in _V2_RECORD_FIELDS:
        if name in record:
            raise ResultsFormatError(source, f"{path}.{name}", f"unknown field in a {SCHEMA_V1} file")
    return {**record, **dict.fromkeys(_V2_RECORD_FIELDS)}


def _check_coverage(result: RunResult, recorded: Coverage, source: str, path: str) -> None:
    """A file's coverage must be what its plan, sessions and records make it (records dropped from a
    complete run, or a partial run relabelled complete, are caught here)."""
    derived = result.coverage
    if (recorded.status, recorded.missing) != (derived.status, derived.missing):
        raise ResultsFormatError(
            source, path,
            f"says {recorded.status} with {len(recorded.missing)} planned test(s) missing, but the plan, sessions and "
            f"records make it {derived.status} with {len(derived.missing)} missing",
        )
