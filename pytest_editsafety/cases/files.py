"""Loading case files (any container, any entry format, detected from content) and dumping case sets in the
canonical envelope.

Every problem of a file is collected before raising, each naming the file, the entry (index, id, line) and
the field as the *source* format spells it (``requested_rewrite.target_new.str``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from pytest_editsafety.cases.containers import ENVELOPE_FORMAT, ENVELOPE_VERSION, RawEntry, parse_document
from pytest_editsafety.cases.formats import CANONICAL, detect_entry_format, entry_to_case, unknown_shape
from pytest_editsafety.cases.model import CaseSet, EditCase, duplicate_id_problems
from pytest_editsafety.cases.problems import CaseFormatError, CaseProblem, CaseValidationError

log = logging.getLogger(__name__)

__all__ = ["case_set_to_document", "cases_from_text", "dump_cases", "dumps_cases", "load_cases"]


def _read_text(path: Path) -> str:
    where = str(path)
    if not path.exists():
        raise CaseFormatError([CaseProblem("(file)", "does not exist", file=where)])
    if path.is_dir():
        raise CaseFormatError([CaseProblem("(file)", "is a directory, not a case file", file=where)])
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise CaseFormatError(
            [CaseProblem("(file)", f"is not UTF-8 text (byte {error.start}: {error.reason})", file=where)]
        ) from None
    except OSError as error:
        raise CaseFormatError([CaseProblem("(file)", f"cannot be read: {error.strerror}", file=where)]) from None


def cases_from_text(
    text: str, *, source: str, name: str | None = None, skip_invalid: bool = False
) -> CaseSet:
    """Parse, detect, convert and validate; raises with every problem found.

    The set's name is ``name``, else the envelope's ``name``, else the source's file stem.
    """
    parsed = parse_document(text)
    if name is None:
        name = parsed.name or Path(source).stem or "cases"
    problems: list[CaseProblem] = list(parsed.problems)
    structural = bool(problems)  # an unreadable container is a format error, not a case error
    entries = parsed.entries
    if not entries and not problems:
        problems.append(CaseProblem("cases", "the file holds no cases"))
        structural = True

    file_format: str | None = CANONICAL if parsed.container == "envelope" else None
    entry_formats: dict[int, str] = {}
    for entry in entries:
        found = CANONICAL if parsed.container == "envelope" else detect_entry_format(entry.data)
        if found is None:
            problems.append(unknown_shape(entry.data, index=entry.index).located(line=entry.line))
            structural = True
            continue
        if file_format is None:
            file_format = found
        if found != file_format:
            problems.append(
                CaseProblem(
                    "(keys)",
                    f"looks like a {found} entry, but the file's first entry is {file_format}; "
                    "a case file holds one format",
                    index=entry.index,
                    line=entry.line,
                )
            )
            structural = True
            continue
        entry_formats[entry.index] = found

    cases: list[tuple[RawEntry, EditCase]] = []
    for entry in entries:
        fmt = entry_formats.get(entry.index)
        if fmt is None:
            continue
        case, found_problems = entry_to_case(entry.data, fmt, default_id=f"{entry.index:04d}")
        if case is None:
            problems += [p.located(index=entry.index, line=entry.line) for p in found_problems]
        else:
            cases.append((entry, case))

    duplicates = duplicate_id_problems(
        [case for _, case in cases],
        indices=[entry.index for entry, _ in cases],
        lines=[entry.line for entry, _ in cases],
    )
    problems += duplicates
    dropped = {problem.index for problem in duplicates}
    kept = [case for entry, case in cases if entry.index not in dropped]

    # Report in file order: file-level problems first, then entry by entry.
    problems.sort(key=lambda p: -1 if p.index is None else p.index)
    located = [p.located(file=source) for p in problems]
    if located and (structural or not skip_invalid):
        error_type = CaseFormatError if structural else CaseValidationError
        raise error_type(located)
    if located:
        skipped = len({p.index for p in located})
        log.warning("skipping %d invalid case(s) of %s:\n%s", skipped, source, CaseValidationError(located))
    if not kept:
        raise CaseValidationError(
            [CaseProblem("cases", "no valid cases left after skipping invalid ones", file=source)]
        )
    return CaseSet(name=name, cases=tuple(kept), source=source, format=file_format or CANONICAL)


def load_cases(path: str | os.PathLike[str], *, name: str | None = None, skip_invalid: bool = False) -> CaseSet:
    """Load a case file of any supported format and container, detected from its content.

    ``skip_invalid`` drops entries with case-level problems (logging each) instead of raising; a file
    that cannot be parsed or holds an unrecognised shape still raises ``CaseFormatError``.
    """
    file = Path(path)
    return cases_from_text(_read_text(file), source=str(file), name=name, skip_invalid=skip_invalid)


def case_set_to_document(case_set: CaseSet) -> dict[str, Any]:
    return {
        "format": ENVELOPE_FORMAT,
        "version": ENVELOPE_VERSION,
        "name": case_set.name,
        "cases": [case.to_dict() for case in case_set.cases],
    }


def dumps_cases(case_set: CaseSet) -> str:
    return json.dumps(case_set_to_document(case_set), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def dump_cases(case_set: CaseSet, path: str | os.PathLike[str]) -> Path:
    """Write ``case_set`` in the canonical envelope, atomically (temporary file + rename)."""
    from editors.storage import atomic_write_text  # lazily: see pytest_editsafety.editors_package

    target = Path(path)
    atomic_write_text(target, dumps_cases(case_set))
    return target
