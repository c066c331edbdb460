"""Downstream tasks on the edited model (--editsafety-downstream): lm-evaluation-harness on the model in memory,
over the organisms' own task files, offline; each task's score before and after every edit in the records and the
report, and the bound on its drop."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
# imported before the in-process pytester run below (see tests/test_search_batch.py)
import torch  # noqa: F401
import transformers  # noqa: F401

from pytest_editsafety.bounds import Bounds, judge
from pytest_editsafety.downstream import DownstreamError, downstream_metrics
from tests.test_plugin import isolated, one_torch_thread  # noqa: F401  (fixtures, used by name)

TASKS = ("organism_mc", "organism_cloze")


def test_the_organism_tasks_ask_about_facts_no_case_edits(tmp_path: Path) -> None:
    from pytest_editsafety.zoo.cases import certified_pairs
    from pytest_editsafety.zoo.tasks import QUESTIONS_PER_TASK, write_organism_tasks
    from pytest_editsafety.zoo.world import World, WorldSpec

    directory = write_organism_tasks(tmp_path)
    assert write_organism_tasks(tmp_path) == directory  # written once
    world = World(WorldSpec())
    facts = {(f.subject, f.relation): f.object for f in world.facts}
    edited = certified_pairs()
    mc = [json.loads(line) for line in (directory / "organism_mc.jsonl").read_text().splitlines()]
    cloze = [json.loads(line) for line in (directory / "organism_cloze.jsonl").read_text().splitlines()]
    assert len(mc) == len(cloze) == QUESTIONS_PER_TASK
    for row in mc:
        fact = (row["subject"], row["relation"])
        assert fact not in edited and row["query"].startswith(row["subject"])
        assert row["choices"][row["gold"]] == f" {facts[fact]}" and len(set(row["choices"])) == 4
    for row in cloze:
        fact = (row["subject"], row["relation"])
        assert fact not in edited and row["target"] == f" {facts[fact]}"
    for task in TASKS:
        config = json.loads((directory / f"{task}.yaml").read_text())
        assert config["task"] == task and Path(config["dataset_kwargs"]["data_files"]["test"]).exists()


def test_the_record_holds_each_tasks_score_unedited_edited_and_the_drop() -> None:
    assert downstream_metrics({"a": 0.9, "b": 0.5}, {"a": 0.6, "b": 0.5}) == pytest.approx({
        "downstream_a": 0.6, "downstream_a_unedited": 0.9, "downstream_a_drop": 0.3,
        "downstream_b": 0.5, "downstream_b_unedited": 0.5, "downstream_b_drop": 0.0})


def _healthy(**extra: float) -> dict[str, float]:
    return {"ppl_ratio": 1.0, "ppl_edited": 40.0, "cf_efficacy": 1.0, "cf_generalization": 1.0, "cf_locality": 1.0,
            **extra}


def test_the_drop_bound_fails_an_edit_that_breaks_a_task() -> None:
    metrics = _healthy(downstream_organism_mc_drop=0.3, downstream_organism_cloze_drop=0.01)
    assert judge(Bounds(), metrics, denominator_floor=None).certified  # recorded, not bounded by default
    verdict = judge(Bounds(max_downstream_drop=0.05), metrics, denominator_floor=None)
    assert verdict.violations == ("downstream task organism_mc: the score dropped by 0.3, more than the bound 0.05",)
    nan = judge(Bounds(max_downstream_drop=0.05), _healthy(downstream_x_drop=math.nan), denominator_floor=None)
    assert not nan.certified and "not a finite number" in nan.violations[0]
    assert Bounds.from_mapping({"max_downstream_drop": "none"}).max_downstream_drop is None
    with pytest.raises(ValueError, match="max_downstream_drop"):
        Bounds(max_downstream_drop=-0.1)


def test_without_lm_eval_the_option_is_a_usage_error_naming_the_extra(isolated: pytest.Pytester, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    result = isolated.runpytest("--editsafety-downstream=organism_mc")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--editsafety-downstream: downstream tasks need lm-evaluation-harness" in result.stderr.str()
    assert "pytest-editsafety[downstream]" in result.stderr.str()


@pytest.mark.organism
@pytest.mark.xdist_group("tiny-gpt2")
def test_a_run_records_every_tasks_score_before_and_after_each_edit(one_torch_thread) -> None:
    from pytest_editsafety.api import certify
    from pytest_editsafety.report import escape_md, render_markdown

    certificate = certify("tiny-gpt2", None, "rome", "hard", limit=2, downstream=TASKS, downstream_limit=40,
                          bounds=Bounds(max_downstream_drop=1.0))
    for record in certificate.cases:
        for task in TASKS:
            before, after = record.metrics[f"downstream_{task}_unedited"], record.metrics[f"downstream_{task}"]
            assert 0.9 <= before <= 1.0  # the organism knows its world
            assert 0.0 <= after <= 1.0
            assert record.metrics[f"downstream_{task}_drop"] == pytest.approx(before - after)
    assert len({r.metrics["downstream_organism_mc_unedited"] for r in certificate.cases}) == 1  # measured once
    report = render_markdown(certificate.result)
    assert "## Downstream tasks" in report and escape_md("organism_cloze") in report


@pytest.mark.organism
@pytest.mark.xdist_group("tiny-gpt2")
def test_an_unknown_task_is_named(tmp_path: Path, one_torch_thread) -> None:
    from pytest_editsafety.downstream import DownstreamTasks

    with pytest.raises(DownstreamError, match="unknown downstream task.*no_such_task"):
        DownstreamTasks(["organism_mc", "no_such_task"], limit=1, root=tmp_path)._task_manager()


def test_spearman_ranks_ties_by_their_mean_rank_and_refuses_too_little() -> None:
    from pytest_editsafety.aggregates import spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)  # scipy.stats.spearmanr's
    assert spearman([1, math.inf, 3, 2], [1, 4, 3, 2]) == pytest.approx(1.0)  # a collapse ranks highest
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None


@pytest.mark.organism
@pytest.mark.xdist_group("tiny-gpt2")
def test_the_surrogate_check_pairs_each_edits_ratio_with_each_tasks_drop(one_torch_thread) -> None:
    from pytest_editsafety.experiment import render_surrogate, run_surrogate

    summary = run_surrogate("tiny-gpt2", tasks=["organism_mc"], editors=["rome"], limit=2, sequential_edits=2,
                            sequential_every=1, task_limit=30, progress=False)
    kinds = [p["kind"] for p in summary["points"]]
    assert kinds == ["single"] * 4 + ["sequential"] * 2  # 2 hard + 2 normal single edits, 2 checkpoints
    assert all(p["ppl_ratio"] > 0 and set(p["drops"]) == {"organism_mc"} for p in summary["points"])
    assert summary["n_points"] == 6 and summary["spearman"]["organism_mc"] is not None
    assert "Spearman ρ" in render_surrogate(summary)
