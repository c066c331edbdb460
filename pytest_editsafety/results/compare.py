"""Comparing a run against a baseline run: what was certified (or better) before and is not any more."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pytest_editsafety.bounds import format_number
from pytest_editsafety.results.records import RunResult
from pytest_editsafety.results.summary import summarize_groups

__all__ = ["MAX_PPL_RATIO_GROWTH", "Regression", "compare", "missing_from"]

# A per-(editor, model) max perplexity ratio that grows by more than this share over the baseline is a
# regression: run-to-run float noise on CPU vs GPU stays far below 10 %, a newly collapsing case far above.
MAX_PPL_RATIO_GROWTH = 0.10


@dataclass(frozen=True)
class Regression:
    """Something certified (or better) in the baseline that is not any more."""

    kind: str  # "case" | "sequential" | "missing" | "certified-share" | "max-ppl-ratio"
    editor: str
    model: str
    test_id: str | None
    baseline: float | None
    current: float | None
    message: str


def missing_from(current: RunResult, baseline: RunResult) -> list[tuple[str, str, str]]:
    """(test id, editor, model) of every baseline test, case, sequential or batch, that ``current`` lacks."""
    have = {r.test_id for r in current.tests}
    return [(r.test_id, r.editor, r.model) for r in baseline.tests if r.test_id not in have]


def compare(current: RunResult, baseline: RunResult, *, allow_missing: bool = False) -> list[Regression]:
    """Regressions of ``current`` against ``baseline``. Rules:

    * ``missing``: a test of the baseline (certified or not) has no record now, unless ``allow_missing``:
      dropping a test, failing or not, must not pass for an improvement;
    * ``case`` / ``sequential`` / ``batch``: a test id certified in the baseline (verdict and outcome) is not now;
    * ``certified-share``: an (editor, model)'s share of certified cases is lower than in the baseline;
    * ``max-ppl-ratio``: an (editor, model)'s max perplexity ratio grew by more than
      ``MAX_PPL_RATIO_GROWTH`` (10 %) over the baseline's (NaN counts as +inf, so a newly broken model
      regresses; a baseline already at +inf cannot grow).

    Tests only in ``current`` are new, not regressions; the per-pair rules compare pairs both runs have.
    """
    out: list[Regression] = []
    if not allow_missing:
        out += [Regression("missing", editor, model, test_id, None, None,
                           f"{test_id} is in the baseline and not in this run")
                for test_id, editor, model in missing_from(current, baseline)]
    for kind, now, before in (
        ("case", current.cases, baseline.cases),
        ("sequential", current.sequential, baseline.sequential),
        ("batch", current.batches, baseline.batches),
    ):
        now_by_id = {r.test_id: r for r in now}
        for old in before:
            new = now_by_id.get(old.test_id)
            if new is not None and old.ok and not new.ok:
                reason = "; ".join(new.violations) or f"outcome {new.outcome}"
                out.append(
                    Regression(kind, new.editor, new.model, new.test_id, 1.0, 0.0,
                               f"{new.test_id} was certified in the baseline and is not now: {reason}")
                )
    before_groups = {(g.editor, g.model): g for g in summarize_groups(baseline)}
    for group in summarize_groups(current):
        old = before_groups.get((group.editor, group.model))
        if old is None:
            continue
        pair = f"{group.editor} on {group.model}"
        share_now, share_before = group.certified_share, old.certified_share
        if share_now is not None and share_before is not None and share_now < share_before - 1e-12:
            out.append(
                Regression("certified-share", group.editor, group.model, None, share_before, share_now,
                           f"{pair}: certified share fell from {_pct(share_before)} "
                           f"({old.n_certified}/{old.n_cases}) to {_pct(share_now)} "
                           f"({group.n_certified}/{group.n_cases})")
            )
        ratio_now, ratio_before = group.max_ppl_ratio, old.max_ppl_ratio
        if (
            ratio_now is not None
            and ratio_before is not None
            and not math.isinf(ratio_before)
            and ratio_now > ratio_before * (1.0 + MAX_PPL_RATIO_GROWTH)
        ):
            out.append(
                Regression("max-ppl-ratio", group.editor, group.model, None, ratio_before, ratio_now,
                           f"{pair}: max perplexity ratio grew from {format_number(ratio_before)}x to "
                           f"{format_number(ratio_now)}x (more than {_pct(MAX_PPL_RATIO_GROWTH)})")
            )
    return out


def _pct(share: float) -> str:
    return f"{format_number(100.0 * share)} %"

