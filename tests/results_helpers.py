"""Results built by hand for the tests: a plan around records, shards of one plan."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence

from pytest_editsafety.results import PlannedCaseSet, RunPlan, RunResult, Session, Shard

WHOLE_SESSION = Session("", "", None, (), None)


def plan_of(result: RunResult, test_ids: Sequence[str] | None = None) -> RunPlan:
    """A plan of ``test_ids`` (default: the result's own records), one case set per set the records name."""
    records = (*result.cases, *result.sequential)
    ids = tuple(test_ids) if test_ids is not None else tuple(r.test_id for r in records)
    sets = sorted({r.case_set for r in records} or {"cases"})
    return RunPlan.build(editors=result.metadata.editors, models=tuple(result.metadata.models),
                         case_sets=tuple(PlannedCaseSet(s, s, "ab" * 32, 4, 4) for s in sets), limit=None,
                         test_ids=ids)


def replanned(result: RunResult, *, drop: Collection[str] = ()) -> RunResult:
    """``result`` less the records in ``drop``, planned as exactly its records by one whole session: what an
    honest run of a narrower plan leaves."""
    kept = dataclasses.replace(result, cases=tuple(r for r in result.cases if r.test_id not in drop),
                               sequential=tuple(r for r in result.sequential if r.test_id not in drop),
                               plan=None, sessions=())
    return dataclasses.replace(kept, plan=plan_of(kept), sessions=(WHOLE_SESSION,))


def shards(result: RunResult, groups: Sequence[Collection[str]]) -> list[RunResult]:
    """``result`` (with a plan) split as pytest-split would: shard i holds the records of ``groups[i]`` and
    deselected every other planned test."""
    assert result.plan is not None
    out = []
    for i, ids in enumerate(groups, 1):
        session = Session("", "", Shard("pytest-split", i, len(groups)),
                          tuple(t for t in result.plan.test_ids if t not in ids), None)
        out.append(dataclasses.replace(result, cases=tuple(r for r in result.cases if r.test_id in ids),
                                       sequential=tuple(r for r in result.sequential if r.test_id in ids),
                                       sessions=(session,)))
    return out
