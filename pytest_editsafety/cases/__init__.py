"""Edit cases: the case model, the dataset formats users hold, and the built-in case sets.

Built-in sets are addressed by name (``real-hard``, ``real-normal``; the organism's ``hard`` and
``normal`` are registered by the organism code with ``register_case_set``). ``resolve_cases`` takes
a built-in name or a path to a case file of any supported format.

Nothing here imports torch or transformers: the plugin imports this module at collection time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType

from pytest_editsafety.cases.files import dump_cases, dumps_cases, load_cases
from pytest_editsafety.cases.formats import CANONICAL, COUNTERFACT, EASYEDIT, KNOWN_FORMATS, ZSRE, detect_format
from pytest_editsafety.cases.model import CaseSet, EditCase, FrozenMetadata, NeighborhoodPrompt
from pytest_editsafety.cases.problems import CaseFormatError, CaseProblem, CaseValidationError

__all__ = [
    "BUILTIN_CASE_SETS",
    "CANONICAL",
    "COUNTERFACT",
    "EASYEDIT",
    "KNOWN_FORMATS",
    "ZSRE",
    "CaseFormatError",
    "CaseProblem",
    "CaseSet",
    "CaseValidationError",
    "EditCase",
    "FrozenMetadata",
    "NeighborhoodPrompt",
    "UnknownCaseSetError",
    "builtin_case_set_names",
    "detect_format",
    "dump_cases",
    "dumps_cases",
    "load_cases",
    "register_case_set",
    "resolve_cases",
]

# fixtures/ sits beside the package in the repository (an editable install); see the report note on
# shipping it in wheels.
FIXTURES_DIR = Path(__file__).resolve().parents[2] / "fixtures" / "cases"

# Built-in files shipped with the project: name -> path.
BUILTIN_CASE_SETS: Mapping[str, Path] = MappingProxyType(
    {
        "real-hard": FIXTURES_DIR / "real_hard.json",
        "real-normal": FIXTURES_DIR / "real_normal.json",
    }
)

CaseSetLoader = Callable[[], CaseSet]

# Sets built by code (the organism's world) rather than read from a file. Registration is an
# explicit, idempotent act of the module that owns the set, not a cache: re-registering the same
# loader is a no-op, a different loader under a taken name is an error.
def _organism_set(kind: str) -> CaseSetLoader:
    def load() -> CaseSet:
        from pytest_editsafety.zoo.cases import organism_cases  # lazy: built from the organism's world

        return organism_cases(kind)

    return load


_REGISTERED: dict[str, CaseSetLoader] = {"hard": _organism_set("hard"), "normal": _organism_set("normal")}


class UnknownCaseSetError(CaseFormatError):
    """A ``--cases`` value that is neither a built-in set nor an existing file."""


def register_case_set(name: str, loader: CaseSetLoader) -> None:
    """Make ``resolve_cases(name)`` call ``loader()`` (e.g. the organism's ``hard``/``normal`` sets)."""
    if not name or not name.strip() or os.sep in name or name.endswith(".json") or name.endswith(".jsonl"):
        raise ValueError(f"case-set name {name!r} must be a plain name, not a path")
    if name in BUILTIN_CASE_SETS:
        raise ValueError(f"case-set name {name!r} is taken by a built-in file")
    existing = _REGISTERED.get(name)
    if existing is not None and existing is not loader:
        raise ValueError(f"case-set name {name!r} is already registered to {existing!r}")
    _REGISTERED[name] = loader


def builtin_case_set_names() -> tuple[str, ...]:
    return tuple(sorted({*BUILTIN_CASE_SETS, *_REGISTERED}))


def resolve_cases(name_or_path: str | os.PathLike[str]) -> CaseSet:
    """A built-in or registered set by name, else the case file at that path."""
    key = os.fspath(name_or_path)
    if key in _REGISTERED:
        return _REGISTERED[key]()
    if key in BUILTIN_CASE_SETS:
        return load_cases(BUILTIN_CASE_SETS[key], name=key)
    path = Path(key).expanduser()
    if path.exists():
        return load_cases(path)
    known = ", ".join(builtin_case_set_names())
    raise UnknownCaseSetError(
        [CaseProblem("(file)", f"is neither a built-in case set ({known}) nor an existing file", file=key)]
    )
