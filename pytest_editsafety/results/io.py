"""The results file: strictly standard JSON text, read and written whole.

The writer never emits the non-standard ``NaN``/``Infinity`` tokens and the reader rejects them, as it
rejects an object that repeats a key: a file that a strict JSON reader elsewhere would read otherwise is
no certificate.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pytest_editsafety.results.errors import ResultsError, ResultsFormatError
from pytest_editsafety.results.records import RunResult

__all__ = ["from_json", "read_result", "to_json", "write_result"]


def to_json(result: RunResult) -> str:
    """The results document: UTF-8 text, two-space indented, strictly standard JSON."""
    return json.dumps(result.to_dict(), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def from_json(text: str, *, source: str = "<string>") -> RunResult:
    """Parse and validate a results document; errors name ``source`` and the JSON path of the bad field."""
    from editors.jsontext import StrictJsonError, loads_strict  # lazily: see pytest_editsafety.editors_package

    try:
        data = loads_strict(text, allow_constants=False)
    except json.JSONDecodeError as err:
        raise ResultsFormatError(source, "$", f"not valid JSON: {err}") from None
    except StrictJsonError as err:
        raise ResultsFormatError(source, "$", str(err)) from None
    return RunResult.from_dict(data, source=source)


def read_result(path: str | os.PathLike[str]) -> RunResult:
    """Read and validate a results file; unreadable files raise ``ResultsError`` naming the path."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ResultsError(f"{path}: cannot read results file: {err}") from None
    return from_json(text, source=str(path))


def write_result(result: RunResult, path: str | os.PathLike[str]) -> None:
    from editors.storage import atomic_write_text  # lazily: see pytest_editsafety.editors_package

    atomic_write_text(path, to_json(result))
