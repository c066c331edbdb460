"""What a run planned, what each of its pytest sessions left out, and how much of the plan its records cover.

A certificate covers its whole plan or it is not one: a run narrowed by ``-k``/``-m``, cut to
``--editsafety-limit`` cases, split into shards of which one is lost, or interrupted holds records that may
all be certified while the cases it skipped are not. ``coverage_of`` turns the plan (``RunPlan``), the
sessions that ran it (``Session``, one per pytest session or shard) and the ids that have a record into a
``Coverage``: ``complete``, ``partial`` (with a ``Gap`` per reason, naming the planned tests without a
record) or ``unknown`` (a file that records no plan, written before plans were recorded).

The plan's hash covers what identifies the work to do (editors, model slugs, each case set's content hash
and size, the limit, the test ids) and nothing machine-specific (paths), so the shards of one command run
on different machines share it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pytest_editsafety.results.errors import RecordError
from pytest_editsafety.results.schema import Record

__all__ = ["COVERAGE_STATUSES", "GAP_KINDS", "Coverage", "Gap", "PlannedCaseSet", "RunPlan", "Session", "Shard",
           "coverage_of", "describe_plan_difference", "plan_digest", "shown_ids"]

COVERAGE_STATUSES = ("complete", "partial", "unknown")
# in the order a report lists them: why the plan itself is narrower, then why planned tests have no record
GAP_KINDS = ("no-plan", "limit", "shard", "deselected", "interrupted", "missing")
# test ids named in one sentence before "and N more"; the JSON lists every one
SHOWN_IDS = 10


def shown_ids(test_ids: Sequence[str], limit: int = SHOWN_IDS) -> str:
    """``a, b, c and 7 more``: test ids for a message."""
    shown = ", ".join(test_ids[:limit])
    return shown + (f" and {len(test_ids) - limit} more" if len(test_ids) > limit else "")


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


@dataclass(frozen=True)
class PlannedCaseSet(Record):
    """One case set of the plan."""

    slug: str
    # the --cases value, for the reader; not hashed (a path differs from machine to machine)
    given: str
    # sha256 of the whole set's canonical case dicts as resolved, before --editsafety-limit
    sha256: str
    n_cases: int  # cases in the set
    n_planned: int  # cases the plan takes from it: fewer under --editsafety-limit

    def _validate(self) -> None:
        if not self.slug:
            raise RecordError("slug", "must not be empty")
        if not 1 <= self.n_planned <= self.n_cases:
            raise RecordError("n_planned", f"must be between 1 and n_cases ({self.n_cases}), got {self.n_planned}")

    @property
    def narrowed(self) -> bool:
        return self.n_planned < self.n_cases


def plan_digest(editors: Sequence[str], models: Sequence[str], case_sets: Sequence[PlannedCaseSet],
                limit: int | None, test_ids: Sequence[str]) -> str:
    """The plan's identity: sha256 of its canonical JSON (machine-independent fields only)."""
    canonical = {
        "editors": list(editors),
        "models": list(models),
        "case_sets": [{"slug": c.slug, "sha256": c.sha256, "n_cases": c.n_cases, "n_planned": c.n_planned}
                      for c in case_sets],
        "limit": limit,
        "test_ids": list(test_ids),
    }
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class RunPlan(Record):
    """What the run set out to certify: every test id of editors × models × case sets (and sequential runs)."""

    plan_hash: str  # plan_digest of the fields below; equal for every shard of one command
    editors: tuple[str, ...]
    models: tuple[str, ...]  # model slugs, as the records name them
    case_sets: tuple[PlannedCaseSet, ...]
    limit: int | None  # --editsafety-limit
    test_ids: tuple[str, ...]  # in the plan's order

    def _validate(self) -> None:
        for i, case_set in enumerate(self.case_sets):
            expected = case_set.n_cases if self.limit is None else min(case_set.n_cases, self.limit)
            if case_set.n_planned != expected:
                raise RecordError(f"case_sets[{i}].n_planned", f"{case_set.n_planned} planned of {case_set.n_cases} "
                                                               f"cases does not follow from limit {self.limit}")
        seen: set[str] = set()
        for i, test_id in enumerate(self.test_ids):
            if test_id in seen:
                raise RecordError(f"test_ids[{i}]", f"duplicate test id {test_id!r}")
            seen.add(test_id)
        expected = plan_digest(self.editors, self.models, self.case_sets, self.limit, self.test_ids)
        if self.plan_hash != expected:
            # a plan edited by hand (tests dropped from it to make a run look complete) no longer matches
            raise RecordError("plan_hash", f"does not match the plan it heads (its content hashes to {expected})")

    @classmethod
    def build(cls, *, editors: Sequence[str], models: Sequence[str], case_sets: Sequence[PlannedCaseSet],
              limit: int | None, test_ids: Sequence[str]) -> RunPlan:
        """The plan with its hash computed."""
        digest = plan_digest(editors, models, case_sets, limit, test_ids)
        return cls(digest, tuple(editors), tuple(models), tuple(case_sets), limit, tuple(test_ids))


@dataclass(frozen=True)
class Shard(Record):
    """Which part of a split run a session was (pytest-split's ``--splits``/``--group``)."""

    plugin: str
    group: int
    splits: int

    def _validate(self) -> None:
        if not 1 <= self.group <= self.splits:
            raise RecordError("group", f"must be between 1 and splits ({self.splits}), got {self.group}")

    def __str__(self) -> str:
        return f"{self.plugin} group {self.group} of {self.splits}"


@dataclass(frozen=True)
class Session(Record):
    """One pytest session of the run (one shard): what it left out of the plan and whether it finished."""

    keyword: str  # -k, "" when not given
    markexpr: str  # -m, "" when not given
    shard: Shard | None
    # planned test ids the session did not select (-k, -m, its shard, node ids named on the command line);
    # None when it cannot tell (an xdist controller that joined the run after collection)
    deselected: tuple[str, ...] | None
    # why it stopped before running everything it selected (Ctrl-C, pytest.exit, -x, a crash); None if it did not
    interrupted: str | None

    def selection_text(self) -> str:
        """What narrowed the session's selection, for messages: ``-k 'rome', pytest-split group 1 of 3``."""
        parts = [f"-k {self.keyword!r}"] if self.keyword else []
        parts += [f"-m {self.markexpr!r}"] if self.markexpr else []
        parts += [str(self.shard)] if self.shard is not None else []
        return ", ".join(parts)


@dataclass(frozen=True)
class Gap(Record):
    """One reason a run covers less than its plan, with the planned tests it leaves without a record."""

    kind: str  # one of GAP_KINDS
    message: str
    test_ids: tuple[str, ...]

    def _validate(self) -> None:
        if self.kind not in GAP_KINDS:
            raise RecordError("kind", f"must be one of {', '.join(GAP_KINDS)}, got {self.kind!r}")


@dataclass(frozen=True)
class Coverage(Record):
    """How much of its plan a run covers. Derived from the plan, the sessions and the records."""

    status: str  # one of COVERAGE_STATUSES
    planned: int  # planned tests (0 when the plan is unknown)
    recorded: int  # tests with a record
    gaps: tuple[Gap, ...]

    def _validate(self) -> None:
        if self.status not in COVERAGE_STATUSES:
            raise RecordError("status", f"must be one of {', '.join(COVERAGE_STATUSES)}, got {self.status!r}")
        if self.status == "complete" and self.gaps:
            raise RecordError("gaps", "a complete coverage lists no gaps")
        if self.status != "complete" and not self.gaps:
            raise RecordError("gaps", f"a {self.status} coverage lists why, and there are no gaps")

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    @property
    def missing(self) -> tuple[str, ...]:
        """Planned test ids without a record, sorted."""
        return tuple(sorted({test_id for gap in self.gaps for test_id in gap.test_ids}))

    def summary(self) -> str:
        """One sentence: ``8 of 12 planned tests have no record: 8 planned tests deselected (-k 'hard'): ...``."""
        if self.status == "unknown":
            return self.gaps[0].message
        if self.complete:
            return f"all {_plural(self.planned, 'planned test')} have a record"
        reasons = "; ".join(gap.message for gap in self.gaps)
        missing = len(self.missing)
        head = (f"{missing} of {_plural(self.planned, 'planned test')} have no record" if missing
                else f"{_plural(self.planned, 'planned test')}, each with a record")
        return f"{head}: {reasons}"


def _limit_gap(plan: RunPlan) -> Gap | None:
    narrowed = [c for c in plan.case_sets if c.narrowed]
    if not narrowed:
        return None
    sets = ", ".join(f"{c.n_planned} of {c.n_cases} cases of {c.slug}" for c in narrowed)
    return Gap("limit", f"--editsafety-limit {plan.limit} planned {sets}: a quick run, not a certificate", ())


def _shard_gap(sessions: Sequence[Session], ids: Sequence[str]) -> Gap | None:
    """The planned tests no session selected, when the sessions are shards of one split: which groups lack."""
    shards = [s.shard for s in sessions]
    if not ids or not shards or any(shard is None for shard in shards):
        return None
    kinds = {(shard.plugin, shard.splits) for shard in shards if shard is not None}
    if len(kinds) != 1:
        return None
    ((plugin, splits),) = kinds
    absent = sorted(set(range(1, splits + 1)) - {shard.group for shard in shards if shard is not None})
    if not absent:
        return None
    groups = ", ".join(map(str, absent))
    return Gap("shard", f"{plugin} group{'s' if len(absent) > 1 else ''} {groups} of {splits} not merged "
                        f"({_plural(len(ids), 'planned test')} no shard ran: {shown_ids(ids)})", tuple(ids))


def coverage_of(plan: RunPlan | None, sessions: Sequence[Session], recorded: Iterable[str]) -> Coverage:
    """The coverage of a run's records over its plan; see the module's docstring."""
    have = set(recorded)
    if plan is None:
        message = ("the results record no plan (a file older than pytest-editsafety/v2), so what the run left "
                   "out cannot be told")
        return Coverage("unknown", 0, len(have), (Gap("no-plan", message, ()),))
    gaps: list[Gap] = []
    limit = _limit_gap(plan)
    if limit is not None:
        gaps.append(limit)

    interrupted, lost, deselected = [], [], []
    left_out = [None if s.deselected is None else frozenset(s.deselected) for s in sessions]
    for test_id in (t for t in plan.test_ids if t not in have):
        selected_by = [s for s, out in zip(sessions, left_out) if out is None or test_id not in out]
        if any(s.interrupted is not None for s in selected_by):
            interrupted.append(test_id)
        elif selected_by or not sessions:
            lost.append(test_id)
        else:
            deselected.append(test_id)

    shard = _shard_gap(sessions, deselected)
    if shard is not None:
        gaps.append(shard)
    elif deselected:
        narrowed = sorted({s.selection_text() for s in sessions if s.selection_text()})
        how = f" ({'; '.join(narrowed)})" if narrowed else ""
        gaps.append(Gap("deselected", f"{_plural(len(deselected), 'planned test')} deselected{how}: "
                                      f"{shown_ids(deselected)}", tuple(deselected)))
    stops = sorted({s.interrupted for s in sessions if s.interrupted is not None})
    if stops:
        # an interrupted session is incomplete even when its last selected test happened to finish
        not_run = f": {_plural(len(interrupted), 'planned test')} not run ({shown_ids(interrupted)})" if interrupted \
            else ""
        gaps.append(Gap("interrupted", f"interrupted ({'; '.join(stops)}){not_run}", tuple(interrupted)))
    if lost:
        gaps.append(Gap("missing", f"{_plural(len(lost), 'planned test')} selected but without a record "
                                   f"(not run, skipped or lost): {shown_ids(lost)}", tuple(lost)))
    return Coverage("partial" if gaps else "complete", len(plan.test_ids), len(have & set(plan.test_ids)),
                    tuple(gaps))


def describe_plan_difference(a: RunPlan, b: RunPlan) -> str:
    """What differs between two plans, for a refusal to merge: ``case set hard: sha256 1a2b… vs 3c4d…``."""
    parts: list[str] = []
    for name in ("editors", "models"):
        if getattr(a, name) != getattr(b, name):
            parts.append(f"{name} {', '.join(getattr(a, name))} vs {', '.join(getattr(b, name))}")
    sets_a = {c.slug: c for c in a.case_sets}
    sets_b = {c.slug: c for c in b.case_sets}
    for slug in sorted(set(sets_a) | set(sets_b)):
        ca, cb = sets_a.get(slug), sets_b.get(slug)
        if ca is None or cb is None:
            parts.append(f"case set {slug} only in {'the second' if ca is None else 'the first'}")
        elif ca.sha256 != cb.sha256:
            parts.append(f"case set {slug}: content sha256 {ca.sha256[:12]} vs {cb.sha256[:12]}")
        elif (ca.n_cases, ca.n_planned) != (cb.n_cases, cb.n_planned):
            parts.append(f"case set {slug}: {ca.n_planned} of {ca.n_cases} vs {cb.n_planned} of {cb.n_cases} cases")
    if a.limit != b.limit:
        parts.append(f"--editsafety-limit {a.limit} vs {b.limit}")
    if not parts and a.test_ids != b.test_ids:
        parts.append(f"test ids ({len(a.test_ids)} vs {len(b.test_ids)})")
    return "; ".join(parts) or "the plan hashes differ"

