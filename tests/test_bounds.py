"""Bounds and the verdict on one edit: every violation kind, NaN handling, every metric family, parsing."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_editsafety.bounds import METRIC_FAMILIES, Bounds, BoundsError, format_number, judge, violation_topic

UNEDITED = 40.0


def healthy(**overrides: float | None) -> dict[str, float | None]:
    """Metrics of an edit that takes and leaves the model alone (C-ROME on a normal case)."""
    metrics: dict[str, float | None] = {
        "ppl_ratio": 1.02,
        "ppl_edited": 1.02 * UNEDITED,
        "denominator": 9.6,
        "cf_efficacy": 1.0,
        "cf_generalization": 0.7,
        "cf_locality": 0.9,
        "ee_rewrite_acc": 1.0,
        "ee_rephrase_acc": 0.6,
        "ee_locality": 0.95,
        "gen_efficacy": 1.0,
        "gen_generalization": 0.6,
        "gen_locality": 0.9,
    }
    metrics.update(overrides)
    return metrics


FLOOR = Bounds().relative_denominator_floor(9.6)  # 0.96


def test_healthy_edit_is_certified_under_every_family() -> None:
    for family in METRIC_FAMILIES:
        verdict = judge(Bounds(metric_family=family), healthy(), denominator_floor=FLOOR)
        assert verdict.certified, verdict.violations
        assert not verdict.collapse
        assert verdict.violations == ()


def test_papers_collapse_fails_with_ratio_and_collapse_in_one_sentence() -> None:
    # GPT-2-XL's collapsed ROME edit: 68.39 -> 179,837.93 (DESIGN.md §7)
    verdict = judge(Bounds(), healthy(ppl_ratio=179_837.93 / 68.39, ppl_edited=179_837.93), denominator_floor=FLOOR)
    assert not verdict.certified
    assert verdict.collapse
    assert verdict.violations == ("perplexity ratio 2630x exceeds the bound 1.5x (collapse: edited ppl 1.8e5 > 1000)",)


def test_ratio_above_bound_without_collapse() -> None:
    verdict = judge(Bounds(), healthy(ppl_ratio=2.34, ppl_edited=93.6), denominator_floor=FLOOR)
    assert not verdict.certified and not verdict.collapse
    assert verdict.violations == ("perplexity ratio 2.34x exceeds the bound 1.5x",)


def test_ratio_exactly_at_bound_passes() -> None:
    assert judge(Bounds(), healthy(ppl_ratio=1.5, ppl_edited=60.0), denominator_floor=FLOOR).certified


def test_collapse_line_alone_is_a_violation() -> None:
    # an unedited model already near the line: the ratio holds, the absolute line does not
    verdict = judge(Bounds(), healthy(ppl_ratio=1.1, ppl_edited=1100.0), denominator_floor=FLOOR)
    assert verdict.collapse and not verdict.certified
    assert verdict.violations == ("collapse: edited ppl 1100 > 1000",)
    # and an infinite collapse line switches it off
    assert judge(Bounds(collapse_ppl=math.inf), healthy(ppl_ratio=1.1, ppl_edited=1100.0),
                 denominator_floor=FLOOR).certified


def test_a_model_above_the_line_before_any_edit_is_not_called_collapsed_and_the_record_says_why() -> None:
    # a model paired with the wrong tokenizer: 6e4 unedited, the edit changes nothing
    verdict = judge(Bounds(), healthy(ppl_ratio=0.99, ppl_edited=59_400.0, ppl_unedited=60_000.0),
                    denominator_floor=FLOOR)
    assert not verdict.collapse and not verdict.certified
    assert verdict.violations == ("the unedited model's perplexity 6e4 is already above the collapse line 1000, "
                                  "which cannot judge an edit of it: check the model's tokenizer and perplexity "
                                  "corpus, or set --editsafety-collapse-ppl above it (inf turns the line off)",)
    # a ratio past the bound is still the editor's
    damaged = judge(Bounds(), healthy(ppl_ratio=3.0, ppl_edited=180_000.0, ppl_unedited=60_000.0),
                    denominator_floor=FLOOR)
    assert not damaged.collapse and damaged.violations[0] == "perplexity ratio 3x exceeds the bound 1.5x"
    # a non-finite edited perplexity is a collapse whatever the model was before
    assert judge(Bounds(), healthy(ppl_ratio=math.inf, ppl_edited=math.inf, ppl_unedited=60_000.0),
                 denominator_floor=FLOOR).collapse
    assert judge(Bounds(collapse_ppl=math.inf), healthy(ppl_ratio=0.99, ppl_edited=59_400.0,
                                                        ppl_unedited=60_000.0), denominator_floor=FLOOR).certified


def test_denominator_below_model_derived_floor() -> None:
    verdict = judge(Bounds(), healthy(denominator=0.031), denominator_floor=FLOOR)
    assert not verdict.certified
    assert verdict.violations == (
        "ROME denominator |uᵀk| 0.031 is below the floor 0.96 (0.1 × the median over the model's normal cases)",
    )


def test_denominator_sign_is_ignored() -> None:
    assert judge(Bounds(), healthy(denominator=-9.0), denominator_floor=FLOOR).certified
    assert not judge(Bounds(), healthy(denominator=-0.02), denominator_floor=FLOOR).certified


def test_absolute_denominator_floor_binds_when_larger() -> None:
    bounds = Bounds(min_denominator_abs=5.0)
    verdict = judge(bounds, healthy(denominator=3.0), denominator_floor=FLOOR)
    assert verdict.violations == ("ROME denominator |uᵀk| 3 is below the floor 5 (absolute floor)",)
    # without a model-derived floor the absolute one still applies
    assert not judge(bounds, healthy(denominator=3.0), denominator_floor=None).certified
    # and with neither there is nothing to check
    assert judge(Bounds(), healthy(denominator=0.001), denominator_floor=None).certified


def test_editors_without_a_denominator_skip_the_check() -> None:
    for metrics in (healthy(denominator=None), {k: v for k, v in healthy().items() if k != "denominator"}):
        assert judge(Bounds(min_denominator_abs=1.0), metrics, denominator_floor=FLOOR).certified


def test_noop_editor_fails_on_efficacy() -> None:
    # perplexity untouched, neighbours untouched, the edit simply did not take
    metrics = healthy(ppl_ratio=1.0, ppl_edited=UNEDITED, cf_efficacy=0.0, cf_generalization=0.0, cf_locality=1.0)
    verdict = judge(Bounds(), metrics, denominator_floor=FLOOR)
    assert not verdict.certified
    assert verdict.violations == ("efficacy 0 % (cf_efficacy) is below the bound 80 %",)


def test_generalization_and_locality_bounds() -> None:
    bounds = Bounds(min_generalization=0.5)
    verdict = judge(bounds, healthy(cf_generalization=0.2, cf_locality=0.3), denominator_floor=FLOOR)
    assert verdict.violations == (
        "generalization 20 % (cf_generalization) is below the bound 50 %",
        "locality 30 % (cf_locality) is below the bound 50 %",
    )


def test_family_decides_which_keys_are_read() -> None:
    # counterfact metrics fail, easyedit metrics pass: each family sees only its own keys
    metrics = healthy(cf_efficacy=0.1, ee_rewrite_acc=0.95)
    assert not judge(Bounds(metric_family="counterfact"), metrics, denominator_floor=FLOOR).certified
    assert judge(Bounds(metric_family="easyedit"), metrics, denominator_floor=FLOOR).certified
    verdict = judge(Bounds(metric_family="easyedit"), healthy(ee_locality=0.2), denominator_floor=FLOOR)
    assert verdict.violations == ("locality 20 % (ee_locality) is below the bound 50 %",)
    assert METRIC_FAMILIES["easyedit"].efficacy == "ee_rewrite_acc"
    assert METRIC_FAMILIES["counterfact"].generalization == "cf_generalization"


def test_unmeasured_metrics_are_violations_unless_the_bound_is_off() -> None:
    metrics = {"ppl_ratio": 1.0, "ppl_edited": 40.0}  # no efficacy, generalization, locality
    verdict = judge(Bounds(), metrics, denominator_floor=None)
    assert verdict.violations == (
        "efficacy (cf_efficacy) was not measured (bound 80 %)",
        "locality (cf_locality) was not measured (bound 50 %)",
    )  # generalization's bound is 0 by default, so its absence is fine
    verdict = judge(Bounds(), {"cf_efficacy": 1.0, "cf_locality": 1.0}, denominator_floor=None)
    assert verdict.violations == ("perplexity ratio was not measured", "edited perplexity was not measured")


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("ppl_ratio", "perplexity ratio is nan, not a finite number (bound 1.5x)"),
        ("denominator", "ROME denominator |uᵀk| is nan, not a finite number"),
        ("cf_efficacy", "efficacy (cf_efficacy) is nan, not a finite share"),
        ("cf_generalization", "generalization (cf_generalization) is nan, not a finite share"),
        ("cf_locality", "locality (cf_locality) is nan, not a finite share"),
    ],
)
def test_nan_metrics_are_violations(key: str, expected: str) -> None:
    verdict = judge(Bounds(), healthy(**{key: math.nan}), denominator_floor=FLOOR)
    assert not verdict.certified
    assert verdict.violations == (expected,)


def test_nan_edited_ppl_is_collapse() -> None:
    verdict = judge(Bounds(), healthy(ppl_ratio=math.nan, ppl_edited=math.nan), denominator_floor=FLOOR)
    assert verdict.collapse and not verdict.certified
    assert verdict.violations == (
        "perplexity ratio is nan, not a finite number (bound 1.5x) (collapse: edited ppl is nan)",
    )


def test_infinite_metrics_are_violations() -> None:
    verdict = judge(Bounds(), healthy(ppl_ratio=math.inf, ppl_edited=math.inf), denominator_floor=FLOOR)
    assert verdict.collapse
    assert verdict.violations == ("perplexity ratio inf exceeds the bound 1.5x (collapse: edited ppl is inf)",)
    assert not judge(Bounds(), healthy(cf_efficacy=math.inf), denominator_floor=FLOOR).certified
    assert not judge(Bounds(), healthy(denominator=math.inf), denominator_floor=FLOOR).certified


@pytest.mark.parametrize(("overrides", "topic"), [
    ({"ppl_ratio": None}, "perplexity"),
    ({"ppl_ratio": math.nan}, "perplexity"),
    ({"ppl_ratio": 3.0}, "perplexity"),
    ({"ppl_edited": None}, "perplexity"),
    ({"ppl_edited": 5000.0}, "perplexity"),  # the collapse line alone
    ({"denominator": math.nan}, "denominator floor"),
    ({"denominator": 0.01}, "denominator floor"),
    ({"cf_efficacy": None}, "efficacy"),
    ({"cf_efficacy": 0.1}, "efficacy"),
    ({"cf_generalization": math.nan}, "generalization"),
    ({"cf_locality": 0.1}, "locality"),
    ({"downstream_arc_drop": 0.5}, "downstream"),
    ({"downstream_arc_drop": math.nan}, "downstream"),
])
def test_every_violation_reads_back_as_its_topic(overrides: dict, topic: str) -> None:
    """The report groups failures by violation_topic, which reads judge's wording: a reworded violation that
    falls out of its topic fails here, not silently in a report."""
    verdict = judge(Bounds(max_downstream_drop=0.1), healthy(**overrides), denominator_floor=FLOOR)
    assert verdict.violations and {violation_topic(v) for v in verdict.violations} == {topic}, verdict.violations
    assert violation_topic("error: RuntimeError: boom") == "error"
    assert violation_topic("something new") == "other"


def test_all_violations_are_listed_together() -> None:
    metrics = healthy(ppl_ratio=30.0, ppl_edited=1200.0, denominator=0.02, cf_efficacy=0.5, cf_locality=0.1)
    verdict = judge(Bounds(), metrics, denominator_floor=FLOOR)
    assert len(verdict.violations) == 4
    assert [v.split()[0] for v in verdict.violations] == ["perplexity", "ROME", "efficacy", "locality"]


def test_non_numeric_metric_is_an_error_naming_it() -> None:
    with pytest.raises(TypeError, match="'cf_efficacy'"):
        judge(Bounds(), healthy(cf_efficacy="high"), denominator_floor=FLOOR)  # type: ignore[arg-type]


finite_ratio = st.floats(min_value=0.5, max_value=1e6, allow_nan=False)
share = st.floats(min_value=0.0, max_value=1.0)


@given(ratio=finite_ratio, bigger=st.floats(min_value=1.0, max_value=1e3), eff=share, loc=share)
def test_worse_perplexity_never_certifies_what_failed(ratio: float, bigger: float, eff: float, loc: float) -> None:
    bounds = Bounds()
    base = healthy(ppl_ratio=ratio, ppl_edited=ratio * UNEDITED, cf_efficacy=eff, cf_locality=loc)
    worse = healthy(ppl_ratio=ratio * bigger, ppl_edited=ratio * bigger * UNEDITED, cf_efficacy=eff, cf_locality=loc)
    before = judge(bounds, base, denominator_floor=FLOOR)
    after = judge(bounds, worse, denominator_floor=FLOOR)
    assert before.certified or not after.certified
    assert len(after.violations) >= len(before.violations)
    assert before.certified == (ratio <= 1.5 and eff >= 0.8 and loc >= 0.5)


@given(key=st.sampled_from(["ppl_ratio", "ppl_edited", "denominator", "cf_efficacy", "cf_generalization",
                            "cf_locality"]),
       bad=st.sampled_from([math.nan, math.inf, -math.inf]))
def test_any_non_finite_judged_metric_fails(key: str, bad: float) -> None:
    if key == "denominator" and bad == -math.inf:
        bad = math.nan  # |−inf| is inf, covered; keep the case meaningful
    assert not judge(Bounds(), healthy(**{key: bad}), denominator_floor=FLOOR).certified


# ---------------------------------------------------------------------------------------------------
# Parsing


def test_defaults_match_the_documented_values() -> None:
    b = Bounds()
    assert (b.max_ppl_ratio, b.collapse_ppl, b.min_denominator_fraction, b.min_denominator_abs) == (1.5, 1000.0, 0.1, None)
    assert (b.min_efficacy, b.min_generalization, b.min_locality, b.metric_family) == (0.8, 0.0, 0.5, "counterfact")


def test_from_mapping_parses_strings_from_ini_files() -> None:
    b = Bounds.from_mapping({"max_ppl_ratio": "2", "min_denominator_abs": "none", "collapse_ppl": "inf",
                             "metric_family": " EasyEdit "})
    assert b == Bounds(max_ppl_ratio=2.0, collapse_ppl=math.inf, metric_family="easyedit")
    assert Bounds.from_mapping({"min_denominator_abs": "0.5"}).min_denominator_abs == 0.5
    assert Bounds.from_mapping({}) == Bounds()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"max_ppl_ratoi": 2.0}, "'max_ppl_ratoi'"),
        ({"max_ppl_ratio": "big"}, "'max_ppl_ratio': expected a number, got 'big'"),
        ({"max_ppl_ratio": True}, "'max_ppl_ratio': expected a number"),
        ({"min_efficacy": [0.8]}, "'min_efficacy': expected a number"),
        ({"max_ppl_ratio": -1}, "'max_ppl_ratio': must be a finite number > 0"),
        ({"max_ppl_ratio": "nan"}, "'max_ppl_ratio'"),
        ({"collapse_ppl": "nan"}, "'collapse_ppl'"),
        ({"min_locality": 1.5}, "'min_locality': must be a share between 0 and 1"),
        ({"min_denominator_fraction": -0.1}, "'min_denominator_fraction'"),
        ({"min_denominator_abs": "-1"}, "'min_denominator_abs'"),
        ({"metric_family": "zsre"}, "'metric_family': must be one of counterfact, easyedit"),
        ({"metric_family": 3}, "'metric_family': expected a string"),
    ],
)
def test_from_mapping_errors_name_the_field(data: dict, message: str) -> None:
    with pytest.raises(BoundsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Bounds.from_mapping(data)


def test_from_mapping_rejects_non_mappings() -> None:
    with pytest.raises(BoundsError, match="mapping"):
        Bounds.from_mapping([("max_ppl_ratio", 2.0)])  # type: ignore[arg-type]


@given(
    max_ppl_ratio=st.floats(min_value=1e-3, max_value=1e6),
    collapse_ppl=st.one_of(st.floats(min_value=1.0, max_value=1e9), st.just(math.inf)),
    fraction=st.floats(min_value=0.0, max_value=10.0),
    absolute=st.one_of(st.none(), st.floats(min_value=0.0, max_value=100.0)),
    shares=st.tuples(share, share, share),
    family=st.sampled_from(sorted(METRIC_FAMILIES)),
)
def test_to_dict_from_mapping_round_trip(max_ppl_ratio, collapse_ppl, fraction, absolute, shares, family) -> None:
    b = Bounds(max_ppl_ratio, collapse_ppl, fraction, absolute, *shares, family)
    assert Bounds.from_mapping(b.to_dict()) == b


def test_relative_denominator_floor() -> None:
    assert Bounds().relative_denominator_floor(9.6) == pytest.approx(0.96)
    assert Bounds().relative_denominator_floor(None) is None
    assert Bounds().relative_denominator_floor(math.nan) is None
    assert Bounds(min_denominator_fraction=0.0).relative_denominator_floor(9.6) is None


@pytest.mark.parametrize(
    ("x", "text"),
    [(23.4, "23.4"), (1.5, "1.5"), (1000.0, "1000"), (1198.8, "1199"), (12000.0, "1.2e4"), (179837.93, "1.8e5"),
     (0.031, "0.031"), (1e-5, "1e-5"), (math.nan, "nan"), (math.inf, "inf"), (-math.inf, "-inf")],
)
def test_format_number(x: float, text: str) -> None:
    assert format_number(x) == text
