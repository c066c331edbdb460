"""The suites shipped with the plugin, collected in a certification run that found no editsafety test of its own.

``pip install pytest-editsafety`` and ``pytest --editor=rome --model=gpt2`` in any directory: the project there
carries no module requesting ``editsafety_item``, so without this the run would collect nothing (exit 5). When the
command line names what to certify (``--editor``, ``--model`` or ``--cases``) but no paths (pytest collects its
``testpaths`` or the invocation directory), and that collection holds no test of the plugin's fixtures,
:class:`ShippedSuites` collects :mod:`pytest_editsafety.suites` as well. A run that names paths gets exactly
those (``--pyargs pytest_editsafety.suites`` names the shipped suites alone); a project with editsafety tests of
its own (a re-export of the suites, as this repository's ``suites/``, or tests of ``editsafety_hub``) keeps them
alone; other editsafety options (``--editsafety-limit``, an ini twin) add nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest


def shipped_suite_paths() -> tuple[Path, ...]:
    """The shipped suite modules, certification first."""
    from pytest_editsafety import suites

    folder = Path(suites.__file__).parent
    return folder / "test_certify.py", folder / "test_fuzz.py"


def requests_any(items: Iterable[pytest.Item], fixtures: Iterable[str]) -> bool:
    """Whether any of ``items`` requests one of ``fixtures``."""
    names = frozenset(fixtures)
    return any(not names.isdisjoint(getattr(item, "fixturenames", ())) for item in items)


class ShippedSuites:
    """Registered when the command line names what to certify, on the controller and every xdist worker alike
    (they share the command line), so that all of them collect the same tests. ``fixtures``: the plugin's fixtures,
    which a test of the project's own editsafety tests requests (the plugin passes them: this module imports
    nothing of it, which imports this one)."""

    def __init__(self, fixtures: Iterable[str]) -> None:
        self.fixtures = tuple(fixtures)

    @pytest.hookimpl(tryfirst=True)  # before -k / -m deselect: the shipped tests are selected like any other
    def pytest_collection_modifyitems(self, session: pytest.Session, config: pytest.Config,
                                      items: list[pytest.Item]) -> None:
        if config.args_source == pytest.Config.ArgsSource.ARGS or requests_any(items, self.fixtures):
            return
        for path in shipped_suite_paths():
            # the package's own path, which no module of the project shares (pytest's id for a file outside the
            # rootdir would be "::test_certify.py"); rerun one of its tests with -k, not by this id
            module = pytest.Module.from_parent(session, path=path, nodeid=f"pytest_editsafety/suites/{path.name}")
            items.extend(session.genitems(module))
