"""What is wrong with edit cases: one ``CaseProblem`` per problem, located in its file, entry and field, and
the errors that carry every problem found at once."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_PROBLEM_LIMIT", "CaseFormatError", "CaseProblem", "CaseValidationError"]

# How many problems an error message spells out before it summarises the rest as a count.
DEFAULT_PROBLEM_LIMIT = 20


@dataclass(frozen=True)
class CaseProblem:
    """One thing wrong with a case file: where (file, entry, line, field) and what."""

    field: str
    message: str
    file: str | None = None
    index: int | None = None
    case_id: str | None = None
    line: int | None = None
    column: int | None = None

    def located(
        self,
        *,
        file: str | None = None,
        index: int | None = None,
        case_id: str | None = None,
        line: int | None = None,
    ) -> CaseProblem:
        """The same problem with the location filled in where it was still unknown."""
        return dataclasses.replace(
            self,
            file=self.file if self.file is not None else file,
            index=self.index if self.index is not None else index,
            case_id=self.case_id if self.case_id is not None else case_id,
            line=self.line if self.line is not None else line,
        )

    def where(self) -> str:
        parts: list[str] = []
        if self.file is not None:
            parts.append(self.file)
        entry: list[str] = []
        if self.index is not None:
            entry.append(f"entry {self.index}")
        if self.case_id is not None:
            entry.append(f"id {self.case_id!r}")
        if self.line is not None:
            entry.append(f"line {self.line}" + (f" column {self.column}" if self.column is not None else ""))
        if entry:
            parts.append(" ".join(entry[:1]) + (f" ({', '.join(entry[1:])})" if len(entry) > 1 else ""))
        return ": ".join(parts)

    def __str__(self) -> str:
        where = self.where()
        head = f"{where}: " if where else ""
        return f"{head}field {self.field!r}: {self.message}"


class CaseValidationError(ValueError):
    """One or more problems with edit cases; ``problems`` holds every one found, in file order."""

    def __init__(self, problems: Sequence[CaseProblem], *, limit: int = DEFAULT_PROBLEM_LIMIT) -> None:
        if not problems:
            raise ValueError("CaseValidationError needs at least one problem")
        self.problems: tuple[CaseProblem, ...] = tuple(problems)
        self.limit = limit
        super().__init__(self._format())

    def _format(self) -> str:
        files = {p.file for p in self.problems if p.file is not None}
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''} with edit cases"
        if len(files) == 1:
            head += f" in {next(iter(files))}"
        lines = [head + ":"]
        lines += [f"  - {p}" for p in self.problems[: self.limit]]
        if n > self.limit:
            lines.append(f"  ... and {n - self.limit} more problem{'s' if n - self.limit != 1 else ''}")
        return "\n".join(lines)

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions pickle through their args by default; ours are built from problems instead.
        return (type(self), (self.problems,), {"limit": self.limit})

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        self.limit = state.get("limit", DEFAULT_PROBLEM_LIMIT)


class CaseFormatError(CaseValidationError):
    """The file cannot be read as cases at all: not JSON, an unknown shape, a bad container."""

