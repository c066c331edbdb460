"""The verdict on a run and its exit code: one rule for the terminal, the markdown report and the report CLI."""

from __future__ import annotations

from collections.abc import Sequence

from pytest_editsafety.results import Regression, RunResult

__all__ = ["CERTIFIED", "NOT_CERTIFIED", "PARTIAL", "exit_code", "verdict"]

CERTIFIED = "CERTIFIED"
NOT_CERTIFIED = "NOT CERTIFIED"
PARTIAL = "PARTIAL"


def verdict(result: RunResult, regressions: Sequence[Regression]) -> str:
    """``NOT CERTIFIED`` when a record is not certified, something regressed against the baseline or the run
    holds nothing; else ``PARTIAL`` when the records do not cover the whole plan (or the plan is unknown);
    else ``CERTIFIED``."""
    records = result.tests
    if regressions or any(not r.ok for r in records) or (not records and result.plan is None):
        return NOT_CERTIFIED
    return CERTIFIED if result.certified else PARTIAL


def exit_code(result: RunResult, regressions: Sequence[Regression]) -> int:
    """0 when the run is certified (every planned test recorded and certified, nothing regressed against the
    baseline), else 1: a partial run is never a certificate."""
    return 0 if verdict(result, regressions) == CERTIFIED else 1
