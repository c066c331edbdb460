"""Whether ``editors`` on the path is this project's.

The editing algorithms are the top-level package ``editors`` (importable without pytest). A project with a
top-level ``editors`` package of its own puts a second one on the path, and whichever Python finds first hides the
other. So the modules pytest imports with the plugin at every start load nothing of ``editors`` until a function
needs it: a project that asks for no certification keeps its own package. A run that asks for one checks here
first, and stops with a usage error naming both, rather than failing later on a module the other package lacks.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["EditorsPackageError", "check_editors_package"]

OURS = Path(__file__).resolve().parent.parent / "editors"


class EditorsPackageError(ImportError):
    """The ``editors`` package Python finds first is not pytest-editsafety's."""


def check_editors_package() -> None:
    """Raise :class:`EditorsPackageError` when ``import editors`` would not give this project's package."""
    spec = importlib.util.find_spec("editors")
    found = [Path(location).resolve() for location in (spec.submodule_search_locations or [])] if spec else []
    if found[:1] != [OURS]:
        where = ", ".join(map(str, found)) or (spec.origin if spec else "nowhere")
        raise EditorsPackageError(
            f"the package 'editors' that Python finds first is {where}, not pytest-editsafety's ({OURS}): a project's "
            f"own top-level 'editors' package hides the editing algorithms. Rename yours, or run from a directory "
            f"that does not put it on sys.path")
