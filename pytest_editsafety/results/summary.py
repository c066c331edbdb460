"""Per-(editor, model) summaries of a run: the rows of the certification table and what baselines compare."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pytest_editsafety.aggregates import mean, median, nan_as_worst, worst
from pytest_editsafety.bounds import Bounds
from pytest_editsafety.results.records import BatchRecord, CaseRecord, RunResult, SequentialRecord

__all__ = ["GroupSummary", "group_keys", "metric_values", "summarize_cases", "summarize_groups"]


def metric_values(records: Iterable[CaseRecord], key: str) -> list[float]:
    """The records' values of one metric, leaving out those it does not apply to."""
    return [v for r in records if (v := r.metrics.get(key)) is not None]


@dataclass(frozen=True)
class GroupSummary:
    """One (editor, model) row of the certification table. Absent statistics are None."""

    editor: str
    model: str
    n_cases: int
    n_certified: int
    n_failed: int
    n_errors: int
    n_collapses: int
    max_ppl_ratio: float | None  # NaN ranks as +inf
    median_ppl_ratio: float | None  # NaN ranks as +inf
    min_denominator: float | None  # NaN if any denominator is NaN
    mean_efficacy: float | None  # of the bounds' metric family; NaN propagates
    mean_generalization: float | None
    mean_locality: float | None
    n_sequential: int
    n_sequential_certified: int
    # batch tests (--editsafety-batch-size); their member cases are counted among the cases above
    n_batches: int = 0
    n_batches_certified: int = 0

    @property
    def certified_share(self) -> float | None:
        return self.n_certified / self.n_cases if self.n_cases else None

    @property
    def certified(self) -> bool:
        total = self.n_cases + self.n_sequential
        return (total > 0 and self.n_certified == self.n_cases and self.n_sequential_certified == self.n_sequential
                and self.n_batches_certified == self.n_batches)


def summarize_cases(
    editor: str, model: str, cases: Sequence[CaseRecord], sequential: Sequence[SequentialRecord], bounds: Bounds,
    batches: Sequence[BatchRecord] = (),
) -> GroupSummary:
    """One row; ``cases`` are the measured cases (single edits and batch members alike). A batch that errored
    before its members were measured counts each of its cases as an error."""
    keys = bounds.family_keys
    unmeasured = sum(len(b.case_ids) for b in batches if not b.members)
    denominators = [abs(v) for v in metric_values(cases, "denominator")]
    return GroupSummary(
        editor=editor,
        model=model,
        n_cases=len(cases) + unmeasured,
        n_certified=sum(r.ok for r in cases),
        n_failed=sum(r.outcome == "failed" for r in cases),
        n_errors=sum(r.outcome == "error" for r in cases) + unmeasured,
        n_collapses=sum(r.collapse for r in cases),
        max_ppl_ratio=worst(metric_values(cases, "ppl_ratio")),
        median_ppl_ratio=median(nan_as_worst(metric_values(cases, "ppl_ratio"))),
        min_denominator=(math.nan if any(math.isnan(d) for d in denominators) else min(denominators))
        if denominators
        else None,
        mean_efficacy=mean(metric_values(cases, keys.efficacy)),
        mean_generalization=mean(metric_values(cases, keys.generalization)),
        mean_locality=mean(metric_values(cases, keys.locality)),
        n_sequential=len(sequential),
        n_sequential_certified=sum(r.ok for r in sequential),
        n_batches=len(batches),
        n_batches_certified=sum(r.ok for r in batches),
    )


def group_keys(result: RunResult) -> list[tuple[str, str]]:
    """The (editor, model) pairs that have records, in the run's editor and model order."""
    editor_rank = {e: i for i, e in enumerate(result.metadata.editors)}
    model_rank = {m: i for i, m in enumerate(result.metadata.models)}
    pairs = {(r.editor, r.model) for r in result.tests}
    return sorted(pairs, key=lambda p: (editor_rank[p[0]], model_rank[p[1]]))


def summarize_groups(result: RunResult) -> list[GroupSummary]:
    bounds = result.metadata.parsed_bounds
    out = []
    for editor, model in group_keys(result):
        cases = [r for r in result.edited_cases if (r.editor, r.model) == (editor, model)]
        seq = [r for r in result.sequential if (r.editor, r.model) == (editor, model)]
        batches = [r for r in result.batches if (r.editor, r.model) == (editor, model)]
        out.append(summarize_cases(editor, model, cases, seq, bounds, batches))
    return out
