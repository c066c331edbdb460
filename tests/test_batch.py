"""Batch certification (--editsafety-batch-size): the plan's batches, the editor contract's declared capacity, the
batch record in the results file and its report, a batch of one against the single edit, and the plugin end to
end (the batch tests of an editor that edits one request at a time error, naming it and the option)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from editors.base import EditorBase, max_requests_per_apply
from pytest_editsafety.cases import CaseSet, EditCase
from pytest_editsafety.plan import PlanError, build_plan
from pytest_editsafety.results import (
    BatchRecord,
    CaseRecord,
    RecordError,
    RunResult,
    Session,
    from_json,
    to_json,
)
from tests.test_results import metadata_for
from tests.test_plugin import (  # noqa: F401  (fixtures, used by name)
    SUITE,
    corpus_file,
    isolated,
    one_torch_thread,
    run_args,
    write_cases,
)


def _case_set(n: int) -> CaseSet:
    cases = tuple(EditCase(case_id=f"c{i}", subject=f"S{i}", prompt="{} lives in", target_new="Paris",
                           ground_truth="Rome") for i in range(n))
    return CaseSet(name="set", cases=cases, source="/data/set.json", format="canonical")


# ---------------------------------------------------------------------------------------------- the plan


def test_batches_take_the_cases_in_order_k_at_a_time_the_last_one_smaller() -> None:
    plan = build_plan(["memit", "emmet"], ["tiny-gpt2"], ["set"], resolve=lambda _: _case_set(7), batch_size=3)
    assert [i.test_id for i in plan.items] == [
        f"{e}-tiny-gpt2-set-k3-batch-{n:03d}" for n in range(3) for e in ("memit", "emmet")]
    assert {i.kind for i in plan.items} == {"batch"}
    assert [i.case_ids for i in plan.items[::2]] == [("c0", "c1", "c2"), ("c3", "c4", "c5"), ("c6",)]
    # each member keeps its single-edit id's part, which names its record inside the batch
    assert plan.items[0].case_parts == ("set-c0", "set-c1", "set-c2")
    assert [c.case_id for c in plan.members(plan.items[4])] == ["c6"]
    # every planned test is a batch: the plan's record lists them, not the cases
    assert plan.record.test_ids == tuple(i.test_id for i in plan.items)


def test_batch_ids_name_the_batch_size() -> None:
    # 48 cases make six batches of 8 and six of 9: the ids (and so the plan's hash, baselines and merges) differ
    eight, nine = (build_plan(["memit"], ["tiny-gpt2"], ["set"], resolve=lambda _: _case_set(48), batch_size=k)
                   for k in (8, 9))
    assert len(eight.items) == len(nine.items) == 6
    assert not {i.test_id for i in eight.items} & {i.test_id for i in nine.items}
    assert eight.plan_hash != nine.plan_hash


def test_a_batch_size_of_one_is_the_single_edit_plan() -> None:
    single = build_plan(["memit"], ["tiny-gpt2"], ["set"], resolve=lambda _: _case_set(3))
    assert build_plan(["memit"], ["tiny-gpt2"], ["set"], resolve=lambda _: _case_set(3), batch_size=1) == single
    assert {i.kind for i in single.items} == {"case"}


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "8"])
def test_a_bad_batch_size_is_refused_naming_the_option(bad) -> None:
    with pytest.raises(PlanError, match="--editsafety-batch-size must be an integer >= 1"):
        build_plan(["memit"], ["tiny-gpt2"], ["set"], resolve=lambda _: _case_set(3), batch_size=bad)


# ------------------------------------------------------------------------------------ the editor contract


def test_editors_declare_how_many_requests_one_apply_takes() -> None:
    from editors.alphaedit import AlphaEditEditor
    from editors.emmet import EmmetEditor
    from editors.ft import FtLinfEditor
    from editors.memit import MemitEditor
    from editors.mend import MendEditor
    from editors.rome import RomeEditor

    for one_at_a_time in (RomeEditor, FtLinfEditor, MendEditor):
        assert one_at_a_time.max_requests_per_apply == 1
    for batched in (MemitEditor, EmmetEditor, AlphaEditEditor):
        assert batched.max_requests_per_apply is None
    assert max_requests_per_apply(EditorBase()) == 1

    class ProtocolOnly:  # an editor of the protocol that declares nothing takes the contract's default
        name = "bare"

    assert max_requests_per_apply(ProtocolOnly()) == 1

    class Four(EditorBase):
        max_requests_per_apply = 4

    assert max_requests_per_apply(Four()) == 4


@pytest.mark.parametrize("declared", [0, True, 2.0, "many"])
def test_a_malformed_declaration_is_an_error_naming_the_editor(declared) -> None:
    class Odd(EditorBase):
        name = "odd"
        max_requests_per_apply = declared

    with pytest.raises(ValueError, match="editor 'odd': max_requests_per_apply must be an integer >= 1 or None"):
        max_requests_per_apply(Odd())


# ------------------------------------------------------------------------------------- the results file


def _member(batch: str, case_id: str, *, certified: bool = True, ratio: float = 1.1) -> CaseRecord:
    return CaseRecord(
        test_id=f"{batch}/set-{case_id}", editor="memit", model="tiny-gpt2", case_set="set", case_id=case_id,
        is_hard=False, subject="S", prompt="{} lives in", target_new="Paris", ground_truth="Rome",
        metrics={"ppl_ratio": ratio, "cf_efficacy": 1.0 if certified else 0.0, "cf_locality": 1.0,
                 "denominator": None},
        certified=certified, collapse=False, violations=() if certified else ("efficacy 0 % (cf_efficacy) is below",),
        outcome="passed" if certified else "failed", duration_s=0.5, worker="main", device="cpu")


def _batch_run() -> RunResult:
    plan = build_plan(["memit"], ["tiny-gpt2"], ["set"], resolve=lambda _: _case_set(3), batch_size=2)
    first, second = plan.items
    batches = (
        BatchRecord(test_id=first.test_id, editor="memit", model="tiny-gpt2", case_set="set", case_ids=("c0", "c1"),
                    members=(_member(first.test_id, "c0"), _member(first.test_id, "c1", certified=False)),
                    metrics={"ppl_ratio": 1.1, "n_requests": 2.0}, certified=False, collapse=False,
                    violations=("c1: efficacy 0 % (cf_efficacy) is below",), outcome="failed", duration_s=1.0,
                    worker="main", device="cpu"),
        BatchRecord(test_id=second.test_id, editor="memit", model="tiny-gpt2", case_set="set", case_ids=("c2",),
                    members=(_member(second.test_id, "c2"),), metrics={"ppl_ratio": 1.1}, certified=True,
                    collapse=False, violations=(), outcome="passed", duration_s=0.5, worker="main", device="cpu"),
    )
    return RunResult(metadata_for(("memit",), ("tiny-gpt2",)), plan=plan.record,
                     sessions=(Session(keyword="", markexpr="", shard=None, deselected=(), interrupted=None),),
                     batches=batches)


def test_a_batch_run_records_each_batch_with_its_members_and_reads_back() -> None:
    run = _batch_run()
    data = json.loads(to_json(run))
    assert [b["case_ids"] for b in data["batches"]] == [["c0", "c1"], ["c2"]]
    assert [m["test_id"] for m in data["batches"][0]["members"]] == [
        "memit-tiny-gpt2-set-k2-batch-000/set-c0", "memit-tiny-gpt2-set-k2-batch-000/set-c1"]
    assert data["cases"] == [] and data["coverage"]["status"] == "complete"
    again = from_json(to_json(run))
    assert again == run
    # the members are the run's measured cases; the failing member makes its batch, and the run, uncertified
    assert [r.case_id for r in again.edited_cases] == ["c0", "c1", "c2"]
    assert not again.certified


def test_a_run_without_batches_writes_the_file_as_before() -> None:
    run = _batch_run()
    plain = RunResult(run.metadata, plan=run.plan, sessions=run.sessions)
    assert "batches" not in json.loads(to_json(plain))
    assert from_json(to_json(plain)).batches == ()


def test_a_killed_batch_run_gives_its_batches_back_from_the_journal(tmp_path: Path) -> None:
    import dataclasses

    from pytest_editsafety.results.journal import IN_PROGRESS, RecordJournal, journal_path, recover_from_journal

    run = _batch_run()
    empty = dataclasses.replace(run, batches=(), sessions=(Session("", "", None, (), IN_PROGRESS),))
    journal = RecordJournal(journal_path(tmp_path / "editsafety.json"))
    journal.start(run.plan.plan_hash)
    journal.append(run.batches[0].test_id, "batch", run.batches[0].to_dict())
    journal.close()
    recovered = recover_from_journal(empty, journal.path)
    assert recovered.n_records == 1 and recovered.result.batches == run.batches[:1]
    assert recovered.result.coverage.status == "partial"


def test_batches_merge_from_shards_and_regress_against_a_baseline() -> None:
    import dataclasses

    from pytest_editsafety.results import compare, merge

    run = _batch_run()
    first, second = run.batches
    shard_a = dataclasses.replace(run, batches=(first,))
    shard_b = dataclasses.replace(run, batches=(second,))
    assert merge([shard_a, shard_b]).batches == run.batches
    # the certified batch failing now is a regression of that batch; a baseline batch this run lacks is missing
    broken = dataclasses.replace(second, certified=False, outcome="failed", violations=("perplexity ratio 9x",))
    kinds = {(r.kind, r.test_id) for r in compare(dataclasses.replace(run, batches=(first, broken)), run)}
    assert ("batch", second.test_id) in kinds
    kinds = {(r.kind, r.test_id) for r in compare(shard_a, run)}
    assert ("missing", second.test_id) in kinds


def test_a_batch_record_must_hold_what_it_says() -> None:
    run = _batch_run()
    good = run.batches[0]
    fields = {name: getattr(good, name) for name in good.__dataclass_fields__}
    with pytest.raises(RecordError, match="members"):  # members out of order
        BatchRecord(**{**fields, "members": tuple(reversed(good.members))})
    with pytest.raises(RecordError, match="certified"):  # certified with a failing member
        BatchRecord(**{**fields, "certified": True, "violations": ()})
    other = _member("another-batch", "c0")
    with pytest.raises(RecordError, match="not named after its batch"):
        BatchRecord(**{**fields, "case_ids": ("c0",), "members": (other,)})


def test_the_report_lists_batches_and_counts_their_members() -> None:
    from pytest_editsafety.report.markdown import render
    from pytest_editsafety.results import summarize_groups

    run = _batch_run()
    text = render(run, baseline=None, regressions=(), plot_links={}, plot_note=None)
    assert "1 of 2 batches certified; 2 of 3 member cases certified" in text
    assert "## Batches" in text
    assert "| memit-tiny-gpt2-set-k2-batch-000 | 2       | 1/2 " in text
    (group,) = summarize_groups(run)
    assert (group.n_cases, group.n_certified, group.n_batches, group.n_batches_certified) == (3, 2, 2, 1)


def test_a_batch_that_errored_counts_its_cases_as_errors() -> None:
    from pytest_editsafety.plan import error_record
    from pytest_editsafety.results import summarize_groups

    run = _batch_run()
    plan = build_plan(["memit"], ["tiny-gpt2"], ["set"], resolve=lambda _: _case_set(3), batch_size=2)
    errored = BatchRecord.from_dict(error_record(plan, plan.items[0], "boom"))
    assert errored.members == () and errored.case_ids == ("c0", "c1") and errored.outcome == "error"
    run = RunResult(run.metadata, plan=run.plan, sessions=run.sessions, batches=(errored, run.batches[1]))
    (group,) = summarize_groups(run)
    assert (group.n_cases, group.n_errors, group.n_certified) == (3, 2, 1) and not group.certified


# ------------------------------------------------------------------------ the organism: a batch of one


@pytest.fixture(scope="module")
def organism_hub(one_torch_thread_module):
    from pytest_editsafety.hub import ModelHub

    # three cases in batches of two: the second batch holds one case
    plan = build_plan(["emmet", "memit", "rome"], ["tiny-gpt2"], ["normal"], limit=3, batch_size=2)
    return ModelHub(plan)


@pytest.fixture(scope="module")
def one_torch_thread_module():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.organism
@pytest.mark.xdist_group("tiny-gpt2")
@pytest.mark.parametrize("editor", ["emmet", "memit"])
def test_a_batch_of_one_measures_what_the_single_edit_measures(organism_hub, editor: str) -> None:
    from pytest_editsafety.plan import PlanItem

    hub = organism_hub
    (batch_item,) = [i for i in hub.plan.items if i.editor == editor and len(i.case_ids) == 1]
    (case_id,) = batch_item.case_ids
    single_item = PlanItem(f"{editor}-tiny-gpt2-{case_id}", "case", editor, "tiny-gpt2", "normal", case_id)
    single = hub.run(single_item)
    batch = hub.run(batch_item)
    assert single.error is None and batch.error is None
    (member,) = batch.record["members"]
    # the record names the case as the single edit does, and reaches the same verdict
    for key in ("case_id", "is_hard", "subject", "prompt", "target_new", "ground_truth", "certified", "collapse",
                "violations", "outcome"):
        assert member[key] == single.record[key], key
    assert batch.record["certified"] == single.record["certified"]
    # every number of the single edit is the member's (its own measurements) or the batch's (the edit's
    # diagnostics, the perplexity), equal to float tolerance
    together = {**batch.record["metrics"], **member["metrics"]}
    assert set(together) == set(single.record["metrics"])
    for key, value in single.record["metrics"].items():
        if value is None:
            assert together[key] is None, key
        else:
            assert math.isclose(together[key], value, rel_tol=1e-5, abs_tol=1e-7), (key, together[key], value)
    if editor == "emmet":  # the member's denominator is its own, from its keys, as the floor's are measured
        assert member["metrics"]["denominator"] is not None
        assert member["metrics"]["denominator_floor"] is not None


@pytest.mark.organism
@pytest.mark.xdist_group("tiny-gpt2")
def test_a_batch_holds_every_member_measured_after_the_whole_batch(organism_hub) -> None:
    hub = organism_hub
    batch_item = next(i for i in hub.plan.items if i.editor == "memit" and len(i.case_ids) == 2)
    outcome = hub.run(batch_item)
    assert outcome.error is None
    record = BatchRecord.from_dict(outcome.record)
    assert record.case_ids == batch_item.case_ids == ("normal-0000", "normal-0001")
    assert record.metrics["n_requests"] == 2.0  # one edit wrote both
    # the perplexity is measured once and every member carries it
    assert {m.metrics["ppl_ratio"] for m in record.members} == {record.metrics["ppl_ratio"]}
    assert record.certified == all(m.certified for m in record.members) and outcome.certified == record.certified


@pytest.mark.organism
@pytest.mark.xdist_group("tiny-gpt2")
def test_an_editor_that_edits_one_request_at_a_time_refuses_a_batch_before_any_weight_moves(organism_hub) -> None:
    from pytest_editsafety.hub import BatchSizeError

    hub = organism_hub
    batch_item = next(i for i in hub.plan.items if i.editor == "rome" and len(i.case_ids) == 2)
    model = hub.loaded("tiny-gpt2").model
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    outcome = hub.run(batch_item)
    assert isinstance(outcome.error, BatchSizeError)
    assert "editor 'rome' applies at most 1 request at once" in str(outcome.error)
    assert "--editsafety-batch-size" in str(outcome.error)
    assert outcome.record["outcome"] == "error" and outcome.record["members"] == []
    assert all(bool((p == before[name]).all()) for name, p in model.named_parameters())


# --------------------------------------------------------------------------------------- the plugin


@pytest.mark.parametrize(("args", "message"), [
    (["--editsafety-batch-size=0"], "--editsafety-batch-size: must be at least 1, got 0"),
    (["--editsafety-batch-size=two"], "--editsafety-batch-size: expected an integer, got 'two'"),
    (["--editsafety-batch-size=2.5"], "--editsafety-batch-size: expected an integer, got '2.5'"),
])
def test_a_bad_batch_size_is_a_usage_error_naming_the_option(pytester: pytest.Pytester, args, message) -> None:
    pytester.makepyfile(test_certify=SUITE.read_text())
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()


def test_a_bad_batch_size_in_the_ini_file_names_the_ini_key(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_certify=SUITE.read_text())
    pytester.makeini("[pytest]\neditsafety_batch_size = 0\n")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "ini editsafety_batch_size" in result.stderr.str()


def test_the_batch_size_reaches_the_plan_from_the_command_line(pytester: pytest.Pytester) -> None:
    from pytest_editsafety.plugin import get_plan, get_settings

    config = pytester.parseconfigure("--editor=memit", "--cases=normal", "--editsafety-batch-size=8")
    assert get_settings(config).batch_size == 8
    plan = get_plan(config)
    assert [i.test_id for i in plan.items][:2] == ["memit-tiny-gpt2-normal-k8-batch-000",
                                                  "memit-tiny-gpt2-normal-k8-batch-001"]
    assert len(plan.items) == 6 and all(len(i.case_ids) == 8 for i in plan.items)


LOOSE_BOUNDS = ["--editsafety-min-efficacy=0", "--editsafety-min-locality=0", "--editsafety-max-ppl-ratio=1000",
                "--editsafety-collapse-ppl=inf", "--editsafety-min-denominator-fraction=0"]


def test_a_batch_run_end_to_end_records_membership_and_refuses_single_request_editors(
    isolated: pytest.Pytester, micro_model: Path, corpus_file: Path, tmp_path: Path,
) -> None:
    cases = write_cases(tmp_path / "cases.json", [
        {"case_id": c, "subject": s, "prompt": "{} lives in", "target_new": "Paris", "ground_truth": "Rome"}
        for c, s in (("one", "Alpha"), ("two", "Beta"), ("three", "Gamma"))
    ])
    out = tmp_path / "out"
    result = isolated.runpytest(*run_args(micro_model, corpus_file, out, "--editor=memit,c-rome", f"--cases={cases}",
                                          "--editsafety-batch-size=2", *LOOSE_BOUNDS))
    # memit's two batches pass under loose bounds; c-rome edits one request at a time, so its batch of two errors
    # (naming it and the option) while its last batch, of one case, fits what it declares and runs
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["*editor 'c-rome' applies at most 1 request at once*--editsafety-batch-size*"])
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    run = json.loads((out / "r.json").read_text())
    micro = micro_model.name
    by_id = {b["test_id"]: b for b in run["batches"]}
    assert sorted(by_id) == [f"c-rome-{micro}-cases-k2-batch-000", f"c-rome-{micro}-cases-k2-batch-001",
                             f"memit-{micro}-cases-k2-batch-000", f"memit-{micro}-cases-k2-batch-001"]
    memit = by_id[f"memit-{micro}-cases-k2-batch-000"]
    assert memit["case_ids"] == ["one", "two"] and memit["outcome"] == "passed"
    assert [m["test_id"] for m in memit["members"]] == [f"memit-{micro}-cases-k2-batch-000/cases-one",
                                                         f"memit-{micro}-cases-k2-batch-000/cases-two"]
    refused = by_id[f"c-rome-{micro}-cases-k2-batch-000"]
    assert refused["outcome"] == "error" and refused["members"] == [] and refused["case_ids"] == ["one", "two"]
    assert "editor 'c-rome' applies at most 1 request" in refused["violations"][0]
    assert by_id[f"c-rome-{micro}-cases-k2-batch-001"]["outcome"] == "passed"
    assert run["coverage"]["status"] == "complete" and run["cases"] == []
    assert "## Batches" in (out / "r.md").read_text()
