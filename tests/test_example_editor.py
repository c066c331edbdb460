"""The example third-party editor (tests/example_editor_pkg): one module plus an entry point is a new editor.

It declares C at its layer and the context templates, gets them from the harness through the contract of
``editors.base`` (the same second moment and templates the built-in editors of that model get), and certifies
on the organism like any built-in.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.editor_packages import copy_editor_package

PACKAGE = Path(__file__).parent / "example_editor_pkg" / "editsafety_lsq_example"


@pytest.fixture()
def installed(tmp_path, monkeypatch):
    root = copy_editor_package(tmp_path, PACKAGE, {"template-lsq": "make_editor"})
    monkeypatch.syspath_prepend(str(root))
    yield root
    sys.modules.pop("editsafety_lsq_example", None)


def test_the_example_is_listed_after_the_built_ins(installed):
    from editors.registry import available_editors

    names = available_editors()
    assert names[-1] == "template-lsq" and "rome" in names[:-1]


@pytest.mark.organism
def test_the_example_gets_c_and_templates_through_the_contract_and_certifies(installed):
    import torch

    from pytest_editsafety.bounds import Bounds
    from pytest_editsafety.hub import HubOptions, ModelHub
    from pytest_editsafety.plan import build_plan

    torch.set_num_threads(1)
    plan = build_plan(["template-lsq", "c-rome"], ["tiny-gpt2"], ["normal"], limit=3)
    hub = ModelHub(plan, HubOptions(bounds=Bounds()))
    provided = hub.provided("tiny-gpt2", "template-lsq")
    builtin = hub.provided("tiny-gpt2", "c-rome")
    # C over the organism's statistics corpus, at the editor's layer, and the model's own templates: the same
    # objects the built-in editors of this model are given
    assert set(provided.second_moments) == {0}
    assert torch.equal(provided.second_moments[0], builtin.second_moments[0])
    assert provided.context_templates == builtin.context_templates and len(provided.context_templates) == 21
    outcomes = [hub.run(item) for item in plan.items if item.editor == "template-lsq"]
    assert len(outcomes) == 3
    for outcome in outcomes:
        assert outcome.error is None, outcome.error
        assert outcome.certified, outcome.violations
        metrics = outcome.record["metrics"]
        assert metrics["cf_efficacy"] == 1.0 and metrics["n_keys"] == 21
        assert metrics["denominator"] is None  # it has no rank-one denominator, and says so


def test_a_certificate_names_the_distribution_and_version_of_an_installed_editor(installed):
    from editors.registry import editor_distributions
    from pytest_editsafety.controller import _library_versions

    assert editor_distributions(["template-lsq", "rome", "no-such-editor"]) == {"editsafety-lsq-example": "0.1"}
    versions = _library_versions(("rome", "template-lsq"))
    assert versions["editsafety-lsq-example"] == "0.1" and "pytest-editsafety" in versions
