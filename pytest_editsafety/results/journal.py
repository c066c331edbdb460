"""The records of a running certification, appended as its tests finish, so a crash keeps what ran.

While a run is in progress its JSON is an in-progress report (PARTIAL, no records) and beside it
``<json stem>.records.jsonl`` grows by one line per finished test. A run that ends writes its certificate
and deletes the journal; a run that is killed (SIGKILL, a power cut, an out-of-memory kill) leaves both,
and ``report`` on the in-progress JSON reads the journal into a PARTIAL report of everything that ran.

The first line names the plan (its hash), so a journal is never applied to another run's report; every
later line is ``{"test_id", "kind", "record"}``, the last line for a test id wins, and a line torn by a
crash mid-write is ignored.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

from pytest_editsafety.results.records import BatchRecord, CaseRecord, RunResult, SequentialRecord

log = logging.getLogger(__name__)

__all__ = ["IN_PROGRESS", "JOURNAL_FORMAT", "RecordJournal", "Recovered", "journal_path", "recover_from_journal"]

JOURNAL_FORMAT = "pytest-editsafety/journal-v1"
# the interruption an in-progress report carries until the run replaces it with its final one
IN_PROGRESS = ("the run has not finished: still running, or killed before it wrote its report (the records of "
               "its finished tests are appended to the .records.jsonl file beside its JSON, which `report` reads)")


def journal_path(json_path: str | os.PathLike[str]) -> Path:
    """Where the records of the run writing ``json_path`` are journaled."""
    path = Path(json_path)
    return path.with_name(f"{path.stem}.records.jsonl")


class RecordJournal:
    """The journal of one run: :meth:`start` (a new, empty journal for ``plan_hash``), :meth:`append` per
    record, :meth:`discard` once the certificate is written. Owned by the run's controller."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._handle: IO[str] | None = None

    def start(self, plan_hash: str) -> None:
        self.close()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - held open for the whole run
        self._write({"format": JOURNAL_FORMAT, "plan_hash": plan_hash, "pid": os.getpid()})

    def append(self, test_id: str, kind: str, record: dict[str, Any]) -> None:
        if self._handle is not None:
            self._write({"test_id": test_id, "kind": kind, "record": record})

    def _write(self, entry: dict[str, Any]) -> None:
        assert self._handle is not None
        try:
            self._handle.write(json.dumps(entry, ensure_ascii=False, allow_nan=False) + "\n")
            self._handle.flush()  # the point of a journal: on disk before the next test starts
        except (OSError, ValueError) as err:
            log.warning("could not append to the record journal %s (%s); it is no longer kept", self.path, err)
            self.close()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def discard(self) -> None:
        """Close and delete the journal (also an older run's journal left at this path)."""
        self.close()
        self.path.unlink(missing_ok=True)


@dataclass(frozen=True)
class Recovered:
    result: RunResult
    n_records: int  # records the journal added or replaced
    note: str  # what happened, for the user


def _read_lines(path: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    header: dict[str, Any] | None = None
    entries: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                entry = json.loads(line)
            except ValueError:
                log.warning("%s: line %d is torn or not JSON (a crash while it was written); ignored", path, number)
                continue
            if not isinstance(entry, dict):
                continue
            if number == 1:
                header = entry
            else:
                entries.append(entry)
    return header, entries


def recover_from_journal(result: RunResult, path: str | os.PathLike[str]) -> Recovered | None:
    """``result`` (an in-progress report) with the records of the journal at ``path``; None without one.

    A journal of another plan, or records that do not validate, leave ``result`` as it is and say why."""
    path = Path(path)
    if not path.is_file():
        return None
    header, entries = _read_lines(path)
    if header is None or header.get("format") != JOURNAL_FORMAT:
        return Recovered(result, 0, f"{path} is not a record journal; ignored")
    if result.plan is None or header.get("plan_hash") != result.plan.plan_hash:
        return Recovered(result, 0, f"{path} belongs to another plan than the report's; ignored")
    cases = {r.test_id: r for r in result.cases}
    sequential = {r.test_id: r for r in result.sequential}
    batches = {r.test_id: r for r in result.batches}
    n = 0
    for entry in entries:
        kind, record, test_id = entry.get("kind"), entry.get("record"), entry.get("test_id")
        target, cls = {"sequential": (sequential, SequentialRecord),
                       "batch": (batches, BatchRecord)}.get(kind, (cases, CaseRecord))
        try:
            target[test_id] = cls.from_dict(record, source=f"{path} ({test_id})")
        except Exception as err:  # one bad line must not cost the others
            log.warning("%s: the record of %s is invalid (%s); ignored", path, test_id, err)
            continue
        n += 1
    try:
        recovered = replace(result, cases=tuple(cases[k] for k in sorted(cases)),
                            sequential=tuple(sequential[k] for k in sorted(sequential)),
                            batches=tuple(batches[k] for k in sorted(batches)))
    except Exception as err:
        return Recovered(result, 0, f"{path}: its records do not fit the report ({err}); ignored")
    return Recovered(recovered, n, f"recovered {n} records of finished tests from {path}")
