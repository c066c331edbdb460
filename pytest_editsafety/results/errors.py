"""What goes wrong with results: a bad record, a malformed file."""

from __future__ import annotations

__all__ = ["RecordError", "ResultsError", "ResultsFormatError"]


class ResultsError(ValueError):
    """A results file or record cannot be used; the message says which and why."""


class RecordError(ResultsError):
    """A record's field is inconsistent; ``field`` is the JSON path below the record (``outcome``, ``cases[2]``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.problem = message


class ResultsFormatError(ResultsError):
    """A results JSON document is malformed: names the file (``source``) and the JSON path of the bad field."""

    def __init__(self, source: str, path: str, problem: str) -> None:
        super().__init__(f"{source}: {path}: {problem}")
        self.source = source
        self.path = path
        self.problem = problem
