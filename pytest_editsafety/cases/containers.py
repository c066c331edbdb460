"""The containers a case file may use, told apart by content (the file name never decides anything): a JSON
list of entries, the canonical envelope ``{"format": "editsafety-cases", "version": 1, "cases": [...]}``,
or JSON Lines. Parsing yields the raw entries with their line numbers, and syntax errors as problems.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pytest_editsafety.cases.model import MISSING
from pytest_editsafety.cases.problems import CaseProblem

__all__ = ["ENVELOPE_FORMAT", "ENVELOPE_VERSION", "ParsedFile", "RawEntry", "is_envelope", "parse_document"]

ENVELOPE_FORMAT = "editsafety-cases"
ENVELOPE_VERSION = 1
ENVELOPE_KEYS = ("format", "version", "name", "description", "cases")


def is_envelope(obj: object) -> bool:
    return isinstance(obj, Mapping) and ("cases" in obj or obj.get("format") == ENVELOPE_FORMAT)


@dataclass(frozen=True)
class RawEntry:
    index: int
    line: int | None
    data: Any


@dataclass(frozen=True)
class ParsedFile:
    container: str  # "list", "envelope", "jsonl", "object"
    entries: tuple[RawEntry, ...]
    name: str | None
    problems: tuple[CaseProblem, ...]


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _array_element_lines(text: str, pos: int) -> list[int]:
    """Line numbers of the elements of the JSON array starting at ``pos`` (already known valid)."""
    decoder = json.JSONDecoder()
    lines: list[int] = []
    pos = _skip_ws(text, pos + 1)
    while pos < len(text) and text[pos] != "]":
        lines.append(_line_of(text, pos))
        _, pos = decoder.raw_decode(text, pos)
        pos = _skip_ws(text, pos)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
    return lines


def _envelope_case_lines(text: str, pos: int) -> list[int]:
    """Line numbers of the entries of the top-level object's ``cases`` array."""
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, pos + 1)
    while pos < len(text) and text[pos] != "}":
        key, pos = decoder.raw_decode(text, pos)
        pos = _skip_ws(text, pos)
        pos = _skip_ws(text, pos + 1)  # the ':'
        if key == "cases" and text[pos] == "[":
            return _array_element_lines(text, pos)
        _, pos = decoder.raw_decode(text, pos)
        pos = _skip_ws(text, pos)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
    return []


def _looks_like_jsonl(text: str) -> bool:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return len(lines) > 1 and all(ln.startswith("{") and ln.endswith("}") for ln in lines)


def _syntax_problem(error: json.JSONDecodeError, *, line_offset: int = 0, index: int | None = None) -> CaseProblem:
    return CaseProblem(
        "(json)",
        f"invalid JSON: {error.msg}",
        index=index,
        line=error.lineno + line_offset,
        column=error.colno,
    )


def _parse_jsonl(text: str) -> ParsedFile:
    from editors.jsontext import StrictJsonError, loads_strict  # lazily: see pytest_editsafety.editors_package

    entries: list[RawEntry] = []
    problems: list[CaseProblem] = []
    index = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            data = loads_strict(raw)
        except json.JSONDecodeError as error:
            problems.append(_syntax_problem(error, line_offset=number - 1, index=index))
        except StrictJsonError as error:
            problems.append(CaseProblem("(json)", str(error), index=index, line=number))
        else:
            entries.append(RawEntry(index=index, line=number, data=data))
        index += 1
    return ParsedFile("jsonl", tuple(entries), None, tuple(problems))


def _parse_envelope(doc: Mapping[str, Any], text: str) -> ParsedFile:
    problems: list[CaseProblem] = []
    for key in sorted(str(k) for k in doc if k not in ENVELOPE_KEYS):
        problems.append(CaseProblem(key, f"is not an envelope field (known: {', '.join(ENVELOPE_KEYS)})"))
    fmt = doc.get("format", MISSING)
    if fmt is MISSING:
        problems.append(CaseProblem("format", f'is missing; an envelope needs "format": "{ENVELOPE_FORMAT}"'))
    elif fmt != ENVELOPE_FORMAT:
        problems.append(CaseProblem("format", f"is {fmt!r}; this reader knows envelopes of format {ENVELOPE_FORMAT!r}"))
    version = doc.get("version", MISSING)
    if version is MISSING:
        problems.append(CaseProblem("version", f"is missing (this reader writes version {ENVELOPE_VERSION})"))
    elif isinstance(version, bool) or not isinstance(version, int):
        problems.append(CaseProblem("version", f"must be an integer, got {type(version).__name__}"))
    elif version != ENVELOPE_VERSION:
        problems.append(CaseProblem("version", f"is {version}; this reader supports version {ENVELOPE_VERSION} only"))
    name = doc.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        problems.append(CaseProblem("name", "must be a non-empty string"))
        name = None
    cases = doc.get("cases", MISSING)
    if cases is MISSING:
        problems.append(CaseProblem("cases", "is missing; an envelope holds its cases in a list"))
        cases = []
    elif not isinstance(cases, list):
        problems.append(CaseProblem("cases", f"must be a list of case objects, got {type(cases).__name__}"))
        cases = []
    lines = _envelope_case_lines(text, _skip_ws(text, 0)) if cases else []
    entries = tuple(
        RawEntry(index=i, line=lines[i] if i < len(lines) else None, data=item) for i, item in enumerate(cases)
    )
    return ParsedFile("envelope", entries, name, tuple(problems))


def parse_document(text: str) -> ParsedFile:
    """Split a file's text into raw entries, whatever the container; syntax errors become problems."""
    from editors.jsontext import StrictJsonError, loads_strict  # lazily: see pytest_editsafety.editors_package

    if not text.strip():
        return ParsedFile("empty", (), None, (CaseProblem("(file)", "is empty"),))
    try:
        doc = loads_strict(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data" or _looks_like_jsonl(text):
            return _parse_jsonl(text)
        return ParsedFile("json", (), None, (_syntax_problem(error),))
    except StrictJsonError as error:
        return ParsedFile("json", (), None, (CaseProblem("(json)", str(error)),))
    start = _skip_ws(text, 0)
    if isinstance(doc, list):
        lines = _array_element_lines(text, start)
        return ParsedFile(
            "list",
            tuple(RawEntry(i, lines[i] if i < len(lines) else None, item) for i, item in enumerate(doc)),
            None,
            (),
        )
    if is_envelope(doc):
        return _parse_envelope(doc, text)
    if isinstance(doc, dict):
        # A one-line JSON Lines file, or a single case written as one object.
        return ParsedFile("object", (RawEntry(0, _line_of(text, start), doc),), None, ())
    return ParsedFile(
        "json",
        (),
        None,
        (
            CaseProblem(
                "(file)",
                f"top level is a {type(doc).__name__}; expected a list of cases, an "
                f'{{"format": "{ENVELOPE_FORMAT}", ...}} envelope, or one JSON object per line',
            ),
        ),
    )

