"""The certification suite: one test per (editor, model, edit case), plus sequential runs with
--editsafety-sequential.

Parametrized by the pytest-editsafety plugin from its options (``--editor``, ``--model``, ``--cases``, ...;
see ``pytest --help``), with ids such as ``rome-tiny-gpt2-hard-0007``. Each test edits the unedited model,
measures it, restores it bit-exactly and asserts the bounds; the record it attaches becomes a row of
``reports/editsafety.json`` and ``reports/editsafety.md``.
"""

from __future__ import annotations

import pytest

from pytest_editsafety.plugin import outcome_properties


def test_edit_is_safe(editsafety_item, editsafety_hub, request: pytest.FixtureRequest) -> None:
    outcome = editsafety_hub.run(editsafety_item)
    # attached before asserting, so a failing test still reports its numbers to the controller
    request.node.user_properties.extend(outcome_properties(outcome))
    if outcome.error is not None:
        raise outcome.error
    if outcome.violations:
        pytest.fail("\n".join(outcome.violations), pytrace=False)
