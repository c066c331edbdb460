"""The record journal of a running certification (pytest_editsafety.results.journal); the plugin writing it
and ``report`` reading it after a kill are in test_plugin.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pytest_editsafety.results import Session, read_result
from pytest_editsafety.results.journal import IN_PROGRESS, RecordJournal, journal_path, recover_from_journal

GOLDEN = Path(__file__).parent / "golden"


def _in_progress_and_journal(tmp_path: Path):
    """The golden run as its in-progress report (no records) and a journal of all its records."""
    run = read_result(GOLDEN / "run.json")
    empty = dataclasses.replace(run, cases=(), sequential=(), sessions=(Session("", "", None, (), IN_PROGRESS),))
    journal = RecordJournal(journal_path(tmp_path / "editsafety.json"))
    journal.start(run.plan.plan_hash)
    for record in run.cases:
        journal.append(record.test_id, "case", record.to_dict())
    for record in run.sequential:
        journal.append(record.test_id, "sequential", record.to_dict())
    journal.close()
    return run, empty, journal.path


def test_a_journal_gives_back_every_record_and_a_torn_last_line_costs_only_itself(tmp_path: Path) -> None:
    run, empty, path = _in_progress_and_journal(tmp_path)
    assert path == tmp_path / "editsafety.records.jsonl"
    recovered = recover_from_journal(empty, path)
    assert recovered.n_records == len(run.cases) + len(run.sequential)
    assert (recovered.result.cases, recovered.result.sequential) == (run.cases, run.sequential)
    assert not recovered.result.certified  # the session is still in progress: PARTIAL at best

    text = path.read_text(encoding="utf-8")
    path.write_text(text[: len(text) - 40], encoding="utf-8")  # killed while writing the last line
    torn = recover_from_journal(empty, path)
    assert torn.n_records == recovered.n_records - 1
    assert torn.result.sequential == run.sequential[:-1]


def test_a_journal_of_another_plan_is_not_applied(tmp_path: Path) -> None:
    run, empty, path = _in_progress_and_journal(tmp_path)
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text(lines[0].replace(run.plan.plan_hash, "0" * 64) + "".join(lines[1:]), encoding="utf-8")
    recovered = recover_from_journal(empty, path)
    assert (recovered.n_records, recovered.result) == (0, empty)
    assert "belongs to another plan" in recovered.note
    assert recover_from_journal(empty, tmp_path / "absent.jsonl") is None


def test_discarding_removes_the_journal_and_a_start_truncates_an_older_one(tmp_path: Path) -> None:
    run, _, path = _in_progress_and_journal(tmp_path)
    journal = RecordJournal(path)
    journal.start(run.plan.plan_hash)
    assert len(path.read_text(encoding="utf-8").splitlines()) == 1  # only the header of the new run
    journal.discard()
    assert not path.exists()
