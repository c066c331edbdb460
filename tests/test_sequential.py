"""The papers' sequential protocol: its length, measurement points and collapse crossing (pure), the plan's
sequential edits and corpus, the record's curves, a real run on the organism, and the report's figure."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from pytest_editsafety.bounds import Bounds
from pytest_editsafety.plan import PlanError, build_plan
from pytest_editsafety.report import write_outputs
from pytest_editsafety.report.sequential_figure import sequential_figures
from pytest_editsafety.results import RecordError, RunResult, SequentialRecord, read_result
from pytest_editsafety.sequential import (
    PAPERS_SEQUENTIAL_EDITS,
    first_crossing,
    measurement_steps,
    sequential_length,
)
from tests.results_helpers import plan_of

GOLDEN = Path(__file__).parent / "golden"


# ---- the protocol's shape (pure) ------------------------------------------------------------------


def test_measurement_steps_take_every_kth_edit_and_always_the_last() -> None:
    assert measurement_steps(5, 1) == (1, 2, 3, 4, 5)
    assert measurement_steps(107, 10) == (10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 107)
    assert measurement_steps(20, 10) == (10, 20)  # the last edit is not measured twice
    assert measurement_steps(3, 10) == (3,)
    assert measurement_steps(0, 1) == ()
    with pytest.raises(ValueError, match="--editsafety-sequential-every"):
        measurement_steps(5, 0)


def test_sequential_length_is_the_papers_107_or_the_whole_set() -> None:
    assert sequential_length(None, 48) == 48
    assert sequential_length(None, 500) == PAPERS_SEQUENTIAL_EDITS == 107
    assert sequential_length(10, 48) == 10
    with pytest.raises(ValueError, match="--editsafety-sequential-edits 49 exceeds the 48 cases"):
        sequential_length(49, 48)
    with pytest.raises(ValueError, match="--editsafety-sequential-edits must be an integer >= 1"):
        sequential_length(0, 48)


def test_first_crossing_finds_the_first_step_above_the_line() -> None:
    steps = [10, 20, 30, 40]
    assert first_crossing(steps, [50.0, 900.0, 1000.0, 2e4], 1000.0) == 40  # equal to the line is not above it
    assert first_crossing(steps, [50.0, 1500.0, 800.0, 2e4], 1000.0) == 20  # the first, even if it recovers
    assert first_crossing(steps, [50.0, 60.0, 70.0, 80.0], 1000.0) is None
    # a collapsed model's perplexity overflows: inf and NaN are past any line
    assert first_crossing(steps, [50.0, math.inf, 70.0, 80.0], 1000.0) == 20
    assert first_crossing(steps, [math.nan, 60.0, 70.0, 80.0], 1000.0) == 10
    assert first_crossing(steps, [50.0, 60.0, 70.0, 80.0], math.inf) is None
    assert first_crossing([], [], 1000.0) is None
    with pytest.raises(ValueError, match="3 steps for 2 values"):
        first_crossing([1, 2, 3], [1.0, 2.0], 1000.0)


# ---- the plan -------------------------------------------------------------------------------------


def test_the_plan_takes_the_first_n_cases_and_the_sequential_corpus() -> None:
    plan = build_plan(["rome"], ["tiny-gpt2"], ["hard"], sequential=True)
    (item,) = [i for i in plan.items if i.kind == "sequential"]
    hard = plan.case_set("hard").case_set.cases
    assert len(hard) == 48 and plan.sequential_cases(item) == hard  # fewer than 107: the whole set
    assert plan.models[0].sequential_ppl_corpus == "organism-ppl"

    plan = build_plan(["rome"], ["tiny-gpt2"], ["hard"], sequential=True, sequential_edits=5,
                      sequential_ppl_corpus="organism-heldout")
    (item,) = [i for i in plan.items if i.kind == "sequential"]
    assert plan.sequential_cases(item) == hard[:5]
    assert plan.models[0].sequential_ppl_corpus == "organism-heldout"
    assert plan.models[0].ppl_corpus == "organism-ppl"  # single edits keep theirs
    # an organism has one corpus of its kind: its sequential runs follow the one the caller chose for it
    plan = build_plan(["rome"], ["tiny-gpt2"], ["hard"], sequential=True, ppl_corpus="organism-heldout")
    assert plan.models[0].sequential_ppl_corpus == "organism-heldout"


def test_the_test_id_names_a_length_other_than_the_default() -> None:
    def ids(**kwargs) -> list[str]:
        plan = build_plan(["rome"], ["tiny-gpt2"], ["hard"], sequential=True, **kwargs)
        return [i.test_id for i in plan.items if i.kind == "sequential"]

    assert ids() == ids(sequential_edits=48) == ["rome-tiny-gpt2-seq-hard"]  # 48: the whole set, the default
    assert ids(sequential_edits=10) == ["rome-tiny-gpt2-seq10-hard"]
    assert ids(limit=5) == ["rome-tiny-gpt2-seq-hard"]  # the limit narrows the set, and the default with it
    plan = build_plan(["rome"], ["tiny-gpt2"], ["hard"], sequential=True, sequential_edits=10)
    assert plan.plan_hash != build_plan(["rome"], ["tiny-gpt2"], ["hard"], sequential=True).plan_hash


def test_real_models_default_to_me_ppl_1k_for_sequential_runs() -> None:
    plan = build_plan(["rome"], ["gpt2-xl"], ["hard"], sequential=True)  # a spec only: nothing is loaded
    assert (plan.models[0].ppl_corpus, plan.models[0].sequential_ppl_corpus) == ("me-ppl-50", "me-ppl-1k")
    # the papers score sequential runs on ME-PPL_1k whatever single edits are scored on
    plan = build_plan(["rome"], ["gpt2-xl"], ["hard"], sequential=True, ppl_corpus="organism-heldout")
    assert plan.models[0].sequential_ppl_corpus == "me-ppl-1k"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"sequential_edits": 49}, r"--editsafety-sequential-edits 49 exceeds the 48 cases of the set \(case set 'hard'\)"),
    ({"sequential_edits": 0}, "--editsafety-sequential-edits must be an integer >= 1, got 0"),
    ({"sequential_edits": 4, "limit": 3}, "as --editsafety-limit narrows it"),
])
def test_the_plan_refuses_impossible_sequential_lengths(kwargs: dict, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        build_plan(["rome"], ["tiny-gpt2"], ["hard"], sequential=True, **kwargs)


def test_an_error_record_counts_the_runs_edits() -> None:
    from pytest_editsafety.plan import error_record

    plan = build_plan(["rome"], ["tiny-gpt2"], ["hard"], sequential=True, sequential_edits=7)
    (item,) = [i for i in plan.items if i.kind == "sequential"]
    assert error_record(plan, item, "boom")["n_edits"] == 7


# ---- the record ---------------------------------------------------------------------------------


def _record(**changes) -> SequentialRecord:
    fields = dict(
        test_id="memit-tiny-gpt2-seq-hard", editor="memit", model="tiny-gpt2", case_set="hard", n_edits=5,
        ppl_after_each=(4.0, 9.0, 1500.0), ppl_unedited=3.6, certified=False, collapse=True,
        violations=("collapse",), outcome="failed", duration_s=1.0, steps=(2, 4, 5),
        norm_ratios={"a.weight": (1.5, 2.5, 4.0), "b.weight": (1.2, 3.0, 3.5)}, collapse_step=5,
        ppl_corpus="organism-ppl", ppl_corpus_sha256="ab" * 32,
        efficacy_after_edit=(1.0, 1.0, 0.0, 1.0, 1.0), efficacy_at_end=(0.0, 1.0, 0.0, 0.0, 1.0),
    )
    fields.update(changes)
    return SequentialRecord(**fields)


def test_the_record_carries_its_curves_and_counts_retention() -> None:
    record = _record()
    assert record.measured_steps == (2, 4, 5)
    assert record.max_norm_ratios == (1.5, 3.0, 4.0)  # the largest edited parameter at each step
    assert (record.edits_took, record.edits_retained) == (4, 2)
    assert SequentialRecord.from_dict(record.to_dict()) == record
    never = _record(collapse_step=None)
    assert "collapse_step" not in never.to_dict()  # absent: the curve never crosses


def test_a_record_from_before_the_protocol_reads_with_one_measurement_per_edit() -> None:
    run = read_result(GOLDEN / "run.json")
    record = run.sequential[0]
    assert not record.steps and record.measured_steps == (1, 2, 3, 4, 5)
    assert record.edits_retained is None and record.max_norm_ratios == ()
    assert "steps" not in record.to_dict()  # re-written as it was read


@pytest.mark.parametrize(("changes", "field", "message"), [
    ({"steps": (2, 4)}, "steps", "2 steps for 3 perplexities"),
    ({"steps": (2, 2, 5)}, "steps", "must increase within 1..5"),
    ({"steps": (2, 4, 6)}, "steps", "must increase within 1..5"),
    ({"steps": (1, 2, 4), "collapse_step": 4}, "steps", "a finished run's last measurement is after edit 5"),
    ({"norm_ratios": {"a.weight": (1.0, 2.0)}}, "norm_ratios.a.weight", "2 values for 3 steps"),
    ({"collapse_step": 3}, "collapse_step", "3 is not a measured step"),
    ({"efficacy_at_end": (1.0, 1.0)}, "efficacy_at_end", "2 values for 5 edits"),
    ({"efficacy_after_edit": (1.0,) * 6}, "efficacy_after_edit", "6 values for 5 edits"),
])
def test_inconsistent_curves_are_refused(changes: dict, field: str, message: str) -> None:
    with pytest.raises(RecordError, match=message) as err:
        _record(**changes)
    assert err.value.field == field


def test_a_run_that_stopped_on_an_error_keeps_the_steps_it_measured() -> None:
    record = _record(outcome="error", steps=(2, 4), ppl_after_each=(4.0, 9.0), collapse_step=None,
                     norm_ratios={"a.weight": (1.5, 2.5)}, efficacy_at_end=(), efficacy_after_edit=(1.0,) * 4)
    assert record.measured_steps == (2, 4) and record.edits_retained is None


# ---- a real run on the organism ----------------------------------------------------------------------


@pytest.mark.organism
@pytest.mark.xdist_group("tiny-gpt2")
@pytest.mark.usefixtures("one_torch_thread")
def test_a_sequential_run_measures_the_papers_curves(tmp_path: Path) -> None:
    from pytest_editsafety.hub import HubOptions, ModelHub

    plan = build_plan(["rome"], ["tiny-gpt2"], ["hard"], sequential=True, sequential_edits=3)
    (item,) = [i for i in plan.items if i.kind == "sequential"]
    # a collapse line just above the unedited perplexity (3.6 on this corpus), so the crossing is found on a
    # real curve: ROME's first hard edit takes it to ~13
    hub = ModelHub(plan, HubOptions(bounds=Bounds(collapse_ppl=5.0), sequential_every=2))
    weight = dict(hub.loaded("tiny-gpt2").model.named_parameters())["transformer.h.0.mlp.c_proj.weight"]
    before = weight.detach().clone()
    outcome = hub.run_sequential(item)
    assert outcome.error is None
    record = SequentialRecord.from_dict(outcome.record)
    assert record.n_edits == 3 and record.steps == (2, 3)  # every 2nd edit, and the last
    assert len(record.ppl_after_each) == len(record.steps)
    assert record.norm_ratios.keys() == {"transformer.h.0.mlp.c_proj.weight"}
    (norms,) = record.norm_ratios.values()
    assert len(norms) == 2 and all(n > 1.0 for n in norms)  # ROME's rank-one updates grow the weight
    assert record.collapse_step == first_crossing(record.steps, record.ppl_after_each, 5.0) == 2
    assert record.collapse and not record.certified
    assert len(record.efficacy_after_edit) == len(record.efficacy_at_end) == 3
    assert record.edits_retained == sum(v == 1.0 for v in record.efficacy_at_end)
    assert record.ppl_corpus == "organism-ppl" and len(record.ppl_corpus_sha256) == 64
    assert record.ppl_unedited == pytest.approx(hub._baseline(hub._state("tiny-gpt2"))["mean"])
    assert weight.equal(before)  # restored at the end


@pytest.mark.organism
@pytest.mark.xdist_group("tiny-gpt2")
@pytest.mark.usefixtures("one_torch_thread")
def test_a_sequential_run_scores_its_own_corpus() -> None:
    from pytest_editsafety.hub import ModelHub

    plan = build_plan(["rome"], ["tiny-gpt2"], ["hard"], sequential=True, sequential_edits=1,
                      sequential_ppl_corpus="organism-heldout")
    (item,) = [i for i in plan.items if i.kind == "sequential"]
    hub = ModelHub(plan)
    record = SequentialRecord.from_dict(hub.run_sequential(item).record)
    assert record.ppl_corpus == "organism-heldout"
    state = hub._state("tiny-gpt2")
    assert state.baseline is None  # the single edits' corpus was never needed
    single = hub._baseline(state)["mean"]  # organism-ppl
    assert record.ppl_unedited != pytest.approx(single)


# ---- the report's figure ------------------------------------------------------------------------


def _run_with(*records: SequentialRecord) -> RunResult:
    golden = read_result(GOLDEN / "run.json")
    editors = tuple(sorted({r.editor for r in records}))
    metadata = dataclasses.replace(golden.metadata, editors=editors, hparams_hashes={})
    result = RunResult(metadata, (), records)
    return dataclasses.replace(result, plan=plan_of(result))


def test_every_editor_shares_one_figure_per_model_and_case_set(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    memit = _record()
    alphaedit = _record(test_id="alphaedit-tiny-gpt2-seq-hard", editor="alphaedit", ppl_after_each=(3.7, 3.9, 4.2),
                        collapse_step=None, collapse=False, certified=True, violations=(), outcome="passed",
                        norm_ratios={"a.weight": (1.01, 1.02, 1.03)})
    run = _run_with(memit, alphaedit)
    (figure,) = sequential_figures(run)
    assert [c.editor for c in figure.curves] == ["alphaedit", "memit"]
    curve = figure.curves[1]
    assert curve.steps == [0, 2, 4, 5] and curve.ppl == [3.6, 4.0, 9.0, 1500.0]  # from the unedited model
    assert curve.norm == [1.0, 1.5, 3.0, 4.0]
    assert "memit: 3 measurements over 5 edits, crosses 1000 at edit 5" in figure.caption
    assert "alphaedit: 3 measurements over 5 edits, never crosses 1000" in figure.caption
    assert "2 of 5 edits hold at the end, 4 took when made" in figure.caption

    out = write_outputs(run, tmp_path / "r.json", tmp_path / "r.md", job_summary=False)
    (png,) = out.plots
    assert png.read_bytes().startswith(b"\x89PNG") and png.parent == tmp_path / "r_plots"
    md = out.md_path.read_text(encoding="utf-8")
    assert f"![sequential editing on tiny-gpt2, hard](r_plots/{png.name})" in md
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[4:14]]
            for line in md.splitlines() if line.startswith(("| memit", "| alphaedit"))}
    # measurements/edits, unedited, final, max ppl, max ratio, corpus, collapse at edit, final norm ratio, retained
    assert rows["memit"] == ["3/5", "3.6", "1500", "1500", "417x", "organism-ppl", "5", "4x", "2/5", "**collapse**"]
    assert rows["alphaedit"][6:9] == ["never", "1.03x", "2/5"]


@pytest.mark.organism
@pytest.mark.xdist_group("tiny-gpt2")
@pytest.mark.usefixtures("one_torch_thread")
def test_the_python_api_runs_the_same_protocol() -> None:
    from pytest_editsafety.api import certify

    certificate = certify("tiny-gpt2", None, "c-rome", "normal", limit=2, sequential=True, sequential_edits=2,
                          sequential_every=5, sequential_corpus="organism-heldout")
    (record,) = certificate.result.sequential
    assert (record.n_edits, record.steps, record.ppl_corpus) == (2, (2,), "organism-heldout")
    assert len(record.efficacy_at_end) == 2
