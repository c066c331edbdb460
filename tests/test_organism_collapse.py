"""The papers' phenomena on the organisms, pinned: a reduced collapse experiment per organism (a few hard and
normal cases through the certification harness, about a minute on 2 CPU cores) whose assertions fail when the
collapse vanishes.

The margins are stated against figures measured on 2026-12-03 (8 cases per set, the organism files' hparams, C
from organism-wiki): on tiny-gpt2 rome's hard denominator median is 0.075x its normal one (0.117 vs 1.55), its
hard edits' perplexity ratio median 1.83x (max 159x) against 1.002x on normal cases, and C-ROME's consistent keys
(k̄ in place of kᵘ) close both gaps (hard denominator median 2.27, hard ratio median 1.001x, max 1.005x). On all
48 + 48 cases: 0.116 vs 1.523 (13.1x), rome hard median 2.72x, max 4278x; c-rome-prefix max 1.016x.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from pytest_editsafety.experiment import run_collapse

pytestmark = [pytest.mark.organism, pytest.mark.usefixtures("one_torch_thread")]

CASES_PER_SET = 8
# rome's hard denominators must sit at most this fraction of its normal ones (measured 0.075)
MAX_HARD_DENOMINATOR_SHARE = 0.25
# rome's hard edits must damage the model: median ratio at least this (measured 1.83x), and this many times the
# normal cases' median (measured 1.83x), and one of them collapse it (measured max 159x)
MIN_HARD_RATIO_MEDIAN = 1.5
MIN_HARD_OVER_NORMAL = 1.5
MIN_HARD_RATIO_MAX = 10.0
# C-ROME with its test-time prefix must stay safe on the same hard cases (measured median 1.001x, max 1.005x;
# the target for the median is 1.05x)
MAX_SAFE_RATIO_MEDIAN = 1.05
MAX_SAFE_RATIO = 1.15
MIN_EFFICACY = 0.9


def collapse_shown(editor: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """What is missing from an editor's summary for it to show the papers' collapse (empty: it is shown)."""
    hard, normal = editor["hard"], editor["normal"]
    missing = []
    share = hard["denominator_median"] / normal["denominator_median"]
    if share > MAX_HARD_DENOMINATOR_SHARE:
        missing.append(f"hard denominator median is {share:.2f}x the normal one (> {MAX_HARD_DENOMINATOR_SHARE})")
    if hard["ppl_ratio_median"] < MIN_HARD_RATIO_MEDIAN:
        missing.append(f"hard perplexity ratio median {hard['ppl_ratio_median']:.3f} < {MIN_HARD_RATIO_MEDIAN}")
    if hard["ppl_ratio_max"] < MIN_HARD_RATIO_MAX:
        missing.append(f"hard perplexity ratio max {hard['ppl_ratio_max']:.3f} < {MIN_HARD_RATIO_MAX}")
    if hard["ppl_ratio_median"] < MIN_HARD_OVER_NORMAL * normal["ppl_ratio_median"]:
        missing.append(f"hard ratio median {hard['ppl_ratio_median']:.3f} is not {MIN_HARD_OVER_NORMAL}x the "
                       f"normal one {normal['ppl_ratio_median']:.3f}")
    if hard["efficacy"] < MIN_EFFICACY:
        missing.append(f"hard efficacy {hard['efficacy']:.2f} < {MIN_EFFICACY} (an edit that does not take "
                       f"cannot collapse the model)")
    return missing


def stays_safe(editor: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """What makes an editor's summary unsafe on the hard and normal cases (empty: it is safe)."""
    problems = []
    for kind in ("hard", "normal"):
        s = editor[kind]
        if s["ppl_ratio_median"] > MAX_SAFE_RATIO_MEDIAN:
            problems.append(f"{kind} perplexity ratio median {s['ppl_ratio_median']:.3f} > {MAX_SAFE_RATIO_MEDIAN}")
        if s["ppl_ratio_max"] > MAX_SAFE_RATIO:
            problems.append(f"{kind} perplexity ratio max {s['ppl_ratio_max']:.3f} > {MAX_SAFE_RATIO}")
        if s["efficacy"] < MIN_EFFICACY:
            problems.append(f"{kind} efficacy {s['efficacy']:.2f} < {MIN_EFFICACY}")
    return problems


# Both organisms whose family has no BOS collapse. tiny-gptj does since its rome file takes C from organism-wiki with
# a ridge (mom2_ridge 1e-4: its layer-0 keys are one per distinct token, so C spans 365 of 512 dimensions); measured
# 2026-12-04, 8 cases per set: hard denominator median 0.020 against 4.69, hard perplexity ratio median 3.08x, max
# 13312x, normal 1.0002x; c-rome-prefix median 1.0004x, max 1.004x. With C = I (its file before) the collapse check
# failed: denominators 0.49x, median 1.15x, max 3.43x. Over all 48 hard cases tiny-gptj's median is 1.24x: its damage
# concentrates on the subjects organism-wiki names only sentence-first (README), 5 of these 8, so the median margin
# holds for these cases, not for the whole set. Each organism's tests share one worker (its xdist group).
COLLAPSING = [pytest.param(name, marks=pytest.mark.xdist_group(name), id=name) for name in ("tiny-gpt2", "tiny-gptj")]


@pytest.fixture(scope="module", params=COLLAPSING)
def collapse(request: pytest.FixtureRequest) -> dict[str, Any]:
    return run_collapse(request.param, editors=("rome", "c-rome-prefix"), limit=CASES_PER_SET, progress=False)


def test_rome_collapses_the_organism_on_first_token_subjects(collapse) -> None:
    assert collapse["_baseline"]["subject_first_cases"] == {"hard": CASES_PER_SET, "normal": 0}
    assert collapse_shown(collapse["rome"]) == []


def test_c_rome_prefix_keeps_the_organism_safe_on_the_same_cases(collapse) -> None:
    assert stays_safe(collapse["c-rome-prefix"]) == []


def test_the_collapse_check_fails_when_the_edit_uses_consistent_keys(collapse) -> None:
    """The same edits keyed on k̄ (C-ROME: ROME's update with the mean key in place of kᵘ) do not collapse the
    model, and the collapse check says so: a change that removed the collapse would fail the test above."""
    missing = collapse_shown(collapse["c-rome-prefix"])
    assert any("denominator" in m for m in missing)
    assert any("perplexity ratio median" in m for m in missing)


@pytest.mark.xdist_group("tiny-llama")
def test_llamas_bos_keeps_rome_from_collapsing_tiny_llama() -> None:
    """The papers' Appendix A.2: Llama's ``<s>`` keeps the subject off position 0, so ROME does not collapse it
    (4 hard cases, measured 2026-12-03: ratio median 1.01x, max 1.03x, hard denominators 0.89x the normal ones).
    The BOS-stripped protocol does not collapse this organism either (tests/test_bos_strip.py, README)."""
    summary = run_collapse("tiny-llama", editors=("rome",), limit=4, progress=False)
    assert summary["_baseline"]["subject_first_cases"]["hard"] == 0  # the BOS is position 0
    assert stays_safe(summary["rome"]) == []
