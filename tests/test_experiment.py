"""The collapse experiment: its summary maths, and a run through the certification harness."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from pytest_editsafety.experiment import render_table, run_collapse, summarise


def test_summary_takes_medians_and_means_over_measured_values_only():
    metrics = [
        {"denominator": 1.0, "numerator": 10.0, "key_cosine": 0.5, "ppl_ratio": 1.0, "ppl_edited": 6.0,
         "cf_efficacy": 1.0, "cf_generalization": None, "cf_locality": 1.0},
        {"denominator": 3.0, "numerator": 30.0, "key_cosine": 0.7, "ppl_ratio": 4.0, "ppl_edited": 24.0,
         "cf_efficacy": 0.0, "cf_generalization": 0.5, "cf_locality": 0.5},
        {"denominator": float("nan"), "numerator": 20.0, "key_cosine": 0.9, "ppl_ratio": 2.0, "ppl_edited": 12.0,
         "cf_efficacy": 1.0, "cf_generalization": 1.0, "cf_locality": 0.0},
    ]
    s = summarise(metrics)
    assert s["n"] == 3
    assert s["denominator_median"] == 2.0  # the NaN is left out, not ranked
    assert s["numerator_median"] == 20.0 and s["key_cosine_median"] == 0.7
    assert s["ppl_ratio_median"] == 2.0 and s["ppl_ratio_max"] == 4.0 and s["ppl_edited_max"] == 24.0
    assert s["efficacy"] == pytest.approx(2 / 3)
    assert s["generalization"] == 0.75  # None means "nothing to measure", not zero
    assert s["locality"] == 0.5
    assert "efficacy_without_prefix" not in s
    with_prefix = summarise([{**m, "cf_efficacy_without_prefix": 0.0} for m in metrics])
    assert with_prefix["efficacy_without_prefix"] == 0.0
    assert math.isnan(summarise([{"denominator": None}])["denominator_median"])


def test_collapse_experiment_runs_every_editor_and_case_set_through_the_harness(micro_model: Path):
    summary = run_collapse(str(micro_model), editors=("rome", "c-rome-prefix"), case_sets=("hard", "normal"),
                           limit=2, progress=False)
    assert set(summary) == {"rome", "c-rome-prefix", "_baseline"}
    for editor in ("rome", "c-rome-prefix"):
        assert set(summary[editor]) == {"hard", "normal"}
        for s in summary[editor].values():
            assert s["n"] == 2
            assert 0.0 <= s["efficacy"] <= 1.0
            assert s["denominator_median"] > 0 and math.isfinite(s["numerator_median"])
            assert s["ppl_ratio_median"] > 0
    assert summary["_baseline"]["mean_ppl"] > 1.0
    assert "c-rome-prefix" in render_table(summary)


def test_layer_override_reaches_the_editor(micro_model: Path):
    from pytest_editsafety.hub import HubOptions, ModelHub
    from pytest_editsafety.plan import build_plan

    plan = build_plan(["rome"], [str(micro_model)], ["normal"], limit=1)
    hub = ModelHub(plan, HubOptions(editor_overrides={"layer": 1}))
    record = hub.run(plan.items[0]).record
    assert record["outcome"] != "error"
    metrics = record["metrics"]
    assert metrics["layer"] == 1.0
    # the edit's report under the papers' names: |uᵀk| as "denominator", its sign kept beside it
    assert metrics["denominator"] == pytest.approx(abs(metrics["denominator_signed"]))
    assert metrics["denominator"] > 0
    assert metrics["numerator"] > 0 and {"abs_denominator", "numerator_norm"}.isdisjoint(metrics)


def test_hyper_parameters_set_for_the_experiment_reach_every_editor_and_are_recorded(micro_model: Path):
    """``--set`` on ``experiment collapse``: the values are the editors' (an unknown field fails the edit, naming
    it), and the summary and its table say which were set."""
    summary = run_collapse(str(micro_model), editors=("rome",), case_sets=("normal",), limit=1, progress=False,
                           overrides={"mom2_ridge": 0.5}, layer=1)
    assert summary["_baseline"]["overrides"] == {"mom2_ridge": 0.5, "layer": 1}
    assert "hyper-parameters set over the files': mom2_ridge=0.5, layer=1" in render_table(summary)
    with pytest.raises(RuntimeError, match="could not be measured") as failure:
        run_collapse(str(micro_model), editors=("rome",), case_sets=("normal",), limit=1, progress=False,
                     overrides={"no_such_field": 1})
    assert "no_such_field" in repr(failure.value.__cause__)


def test_the_collapse_command_parses_repeated_sets() -> None:
    from pytest_editsafety.cli import _parse_overrides, build_parser

    args = build_parser().parse_args(["experiment", "collapse", "--editors", "rome", "--set", "mom2_ridge=0.001",
                                      "--set", "mom2_adjustment=true"])
    assert _parse_overrides(args.set) == {"mom2_ridge": 0.001, "mom2_adjustment": True}
