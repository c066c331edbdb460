"""Strict JSON for files people write by hand (hyper-parameters, case files, results): the standard library's
parser with the three things it lets through refused, each with a clear message.

* a key given twice in one object (``json.loads`` silently keeps the last);
* the non-standard constants ``NaN``, ``Infinity`` and ``-Infinity``, where a caller refuses them;
* nesting deep enough to exhaust Python's recursion (an INTERNALERROR traceback otherwise);
* integers longer than Python reads (thousands of digits), a ValueError that named no file.

Syntax errors stay ``json.JSONDecodeError`` (callers report their line and column); the rest raise
:class:`StrictJsonError`, a ``ValueError``.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["StrictJsonError", "loads_strict"]


class StrictJsonError(ValueError):
    """Valid JSON syntax that the project refuses (a duplicate key, a non-standard constant, absurd nesting)."""


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise StrictJsonError(f"duplicate key {key!r} in an object")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise StrictJsonError(f"non-standard JSON constant {name}; write \"nan\", \"inf\" or \"-inf\" as strings")


def loads_strict(text: str, *, allow_constants: bool = True) -> Any:
    """``json.loads`` refusing duplicate keys, too-deep nesting and, unless ``allow_constants``, NaN/Infinity."""
    kwargs: dict[str, Any] = {"object_pairs_hook": _no_duplicate_keys}
    if not allow_constants:
        kwargs["parse_constant"] = _reject_constant
    try:
        return json.loads(text, **kwargs)
    except RecursionError:
        raise StrictJsonError("nested too deeply (arrays or objects inside each other hundreds of levels deep)") from None
    except (json.JSONDecodeError, StrictJsonError):
        raise
    except ValueError as err:  # Python's cap on integer digits (sys.get_int_max_str_digits), hit while parsing
        raise StrictJsonError(f"a number too long to read: {err}") from None
