"""A certificate covers its plan: plan hashes, coverage gaps, files that lie about them, refused merges, tests
of the baseline missing from a run, older files without a plan. Results are built by hand here; the
plugin's side (a ``-k`` run, an interrupted run, pytest-split shards) is in ``test_plugin.py``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from pytest_editsafety import report_cli
from pytest_editsafety.cases import CaseSet, EditCase
from pytest_editsafety.plan import build_plan
from pytest_editsafety.report import NOT_CERTIFIED, PARTIAL, exit_code, plots, render_markdown, verdict
from pytest_editsafety.results import (
    SCHEMA,
    SCHEMA_V1,
    MergeError,
    PlannedCaseSet,
    RecordError,
    ResultsFormatError,
    RunPlan,
    RunResult,
    Session,
    Shard,
    from_json,
    merge,
    read_result,
    to_json,
    write_result,
)
from tests.results_helpers import WHOLE_SESSION, plan_of, replanned, shards

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture
def run() -> RunResult:
    return read_result(GOLDEN / "run.json")


@pytest.fixture
def good(run: RunResult) -> RunResult:
    """The golden run's certified records as a complete run of their own."""
    return replanned(run, drop={r.test_id for r in (*run.cases, *run.sequential) if not r.ok})


def ids_of(result: RunResult) -> list[str]:
    return [r.test_id for r in (*result.cases, *result.sequential)]


# ---------------------------------------------------------------------------------------------------
# The plan and its hash


def _cases(*targets: str) -> tuple[EditCase, ...]:
    return tuple(EditCase(case_id=f"c{i}", subject="Alpha", prompt="{} lives in", target_new=t, ground_truth="Rome")
                 for i, t in enumerate(targets))


def test_the_plan_hash_is_the_content_not_the_place() -> None:
    here = CaseSet(name="mine", cases=_cases("Paris", "Oslo", "Lima"), source="/home/ci/a/mine.json",
                   format="canonical")
    there = dataclasses.replace(here, source="/builds/b/mine.jsonl", format="easyedit")
    changed = dataclasses.replace(here, cases=_cases("Paris", "Oslo", "Quito"))

    def plan(case_set: CaseSet, **kwargs: Any) -> Any:
        return build_plan(["rome"], ["tiny-gpt2"], ["mine"], resolve=lambda _: case_set, **kwargs)

    assert plan(here).plan_hash == plan(there).plan_hash  # another machine's checkout, another format
    assert plan(here).plan_hash != plan(changed).plan_hash  # one case's target changed
    assert plan(here).plan_hash != plan(here, limit=2).plan_hash
    assert plan(here).plan_hash != plan(here, sequential=True).plan_hash
    limited = plan(here, limit=2)
    (chosen,) = limited.case_sets
    assert (chosen.n_cases, len(chosen.case_set.cases), chosen.narrowed) == (3, 2, True)
    assert chosen.sha256 == plan(here).case_sets[0].sha256  # the set's hash is the whole set's
    record = limited.record
    assert record.case_sets == (PlannedCaseSet("mine", "mine", chosen.sha256, 3, 2),)
    assert record.limit == 2 and record.test_ids == tuple(i.test_id for i in limited.items)
    assert RunPlan.from_dict(json.loads(json.dumps(record.to_dict()))) == record


def test_plans_edited_by_hand_and_records_outside_them_are_refused(tmp_path: Path) -> None:
    data = json.loads((GOLDEN / "run.json").read_text(encoding="utf-8"))
    data["plan"]["test_ids"].pop()  # a test dropped from the plan so that the run looks complete
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ResultsFormatError, match=r"edited\.json: \$\.plan\.plan_hash: does not match the plan"):
        read_result(path)

    run = read_result(GOLDEN / "run.json")
    with pytest.raises(RecordError, match=r"cases\[0\]\.test_id: test id 'c-rome-tiny-gpt2-hard-0000' is not in "
                                          r"plan\.test_ids"):
        dataclasses.replace(run, plan=plan_of(run, ids_of(run)[1:]))


def _as_v1(data: dict[str, Any]) -> None:
    """A v2 document relabelled v1 without the v1-unknown top-level fields (its records keep theirs)."""
    data.update(schema=SCHEMA_V1)
    for name in ("plan", "sessions", "coverage"):
        del data[name]


@pytest.mark.parametrize(("edit", "json_path", "problem"), [
    (lambda d: d["cases"].pop(2), "$.coverage", "says complete with 0 planned test(s) missing, but the plan, "
                                                "sessions and records make it partial with 1 missing"),
    (lambda d: d["coverage"].update(status="partial"), "$.coverage.gaps", "a partial coverage lists why"),
    (lambda d: d.pop("coverage"), "$", "missing field(s) 'coverage'"),
    (lambda d: d["sessions"][0].update(deselected=["nope"]), "$.sessions[0].deselected", "not in plan.test_ids: nope"),
    (lambda d: d["sessions"][0].update(shard={"plugin": "pytest-split", "group": 4, "splits": 3}),
     "$.sessions[0].shard.group", "must be between 1 and splits (3), got 4"),
    (lambda d: d["plan"]["case_sets"][0].update(n_planned=4), "$.plan.case_sets[0].n_planned", "between 1 and"),
    (lambda d: d["plan"]["case_sets"][0].update(n_planned=2), "$.plan.case_sets[0].n_planned",
     "2 planned of 3 cases does not follow from limit None"),
    (lambda d: d.update(schema=SCHEMA_V1), "$.plan", "unknown field in a pytest-editsafety/v1 file"),
    (lambda d: _as_v1(d), "$.cases[0].worker", "unknown field in a pytest-editsafety/v1 file"),
])
def test_a_file_that_misstates_its_coverage_is_refused(tmp_path: Path, edit: Any, json_path: str,
                                                       problem: str) -> None:
    data = json.loads((GOLDEN / "run.json").read_text(encoding="utf-8"))
    edit(data)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ResultsFormatError) as info:
        read_result(path)
    assert (info.value.path, info.value.source) == (json_path, str(path))
    assert problem in info.value.problem


def test_v1_files_render_but_never_certify(tmp_path: Path) -> None:
    old = read_result(GOLDEN / "run_v1.json")
    assert (old.plan, old.sessions, old.coverage.status) == (None, (), "unknown")
    # the same records, except that a v1 file does not say where its tests ran
    assert all(r.worker is None and r.device is None for r in (*old.cases, *old.sequential))
    current = read_result(GOLDEN / "run.json").cases
    assert old.cases == tuple(dataclasses.replace(r, worker=None, device=None) for r in current)
    all_certified = dataclasses.replace(old, cases=tuple(r for r in old.cases if r.ok),
                                        sequential=tuple(r for r in old.sequential if r.ok))
    assert not all_certified.certified
    assert verdict(all_certified, []) == PARTIAL and exit_code(all_certified, []) == 1
    md = render_markdown(all_certified)
    assert "> ⚠️ **PARTIAL**: 5 of 5 cases certified; 1 of 1 sequential runs certified." in md
    assert "No plan recorded: the results record no plan (a file older than pytest-editsafety/v2)" in md
    assert "**Workers:**" not in md
    # written again, a v1 result is a v2 file that still says it has no plan
    write_result(old, tmp_path / "again.json")
    data = json.loads((tmp_path / "again.json").read_text(encoding="utf-8"))
    assert (data["schema"], data["plan"], data["coverage"]["status"]) == (SCHEMA, None, "unknown")
    assert read_result(tmp_path / "again.json") == old


# ---------------------------------------------------------------------------------------------------
# Coverage


def test_a_complete_run_and_its_gaps(good: RunResult) -> None:
    ids = ids_of(good)
    assert good.coverage.status == "complete" and good.certified and good.coverage.planned == len(ids)

    deselected = dataclasses.replace(good, cases=good.cases[2:], sessions=(Session("rome", "", None, tuple(ids[:2]),
                                                                                   None),))
    (gap,) = deselected.coverage.gaps
    assert (gap.kind, gap.test_ids) == ("deselected", tuple(ids[:2]))
    assert gap.message == f"2 planned tests deselected (-k 'rome'): {ids[0]}, {ids[1]}"
    assert deselected.coverage.summary() == f"2 of {len(ids)} planned tests have no record: {gap.message}"
    assert not deselected.certified and verdict(deselected, []) == PARTIAL

    stopped = dataclasses.replace(good, cases=good.cases[:1], sequential=(),
                                  sessions=(Session("", "", None, (), "KeyboardInterrupt (Ctrl-C)"),))
    (gap,) = stopped.coverage.gaps
    assert gap.kind == "interrupted" and gap.test_ids == tuple(sorted(ids[1:], key=ids.index))
    assert gap.message.startswith(f"interrupted (KeyboardInterrupt (Ctrl-C)): {len(ids) - 1} planned tests not run")

    # interrupted after its last test: nothing is missing, and it still is no certificate
    late = dataclasses.replace(good, sessions=(Session("", "", None, (), "pytest.exit: enough"),))
    assert [g.kind for g in late.coverage.gaps] == ["interrupted"] and late.coverage.missing == ()
    assert verdict(late, []) == PARTIAL

    lost = dataclasses.replace(good, cases=good.cases[1:])
    assert [(g.kind, g.test_ids) for g in lost.coverage.gaps] == [("missing", (ids[0],))]
    unknown_selection = dataclasses.replace(lost, sessions=(Session("", "", None, None, None),))
    assert [g.kind for g in unknown_selection.coverage.gaps] == ["missing"]


def test_a_limit_below_a_case_set_is_a_deliberate_narrowing(good: RunResult) -> None:
    plan = good.plan
    narrowed = RunPlan.build(editors=plan.editors, models=plan.models, limit=2, test_ids=plan.test_ids,
                             case_sets=(PlannedCaseSet("hard", "hard", "cd" * 32, 48, 2),))
    quick = dataclasses.replace(good, plan=narrowed)
    (gap,) = quick.coverage.gaps
    assert (gap.kind, gap.test_ids) == ("limit", ())
    assert gap.message == "--editsafety-limit 2 planned 2 of 48 cases of hard: a quick run, not a certificate"
    assert quick.coverage.status == "partial" and verdict(quick, []) == PARTIAL
    md = render_markdown(quick)
    banner = "> ⚠️ **PARTIAL**: 5 of 5 cases certified; 1 of 1 sequential runs certified.\n>\n> Not a certificate"
    assert banner in md
    assert "  - **limit**: --editsafety-limit 2 planned 2 of 48 cases of hard" in md
    exact = RunPlan.build(editors=plan.editors, models=plan.models, limit=48, test_ids=plan.test_ids,
                          case_sets=(PlannedCaseSet("hard", "hard", "cd" * 32, 48, 48),))
    assert dataclasses.replace(good, plan=exact).certified  # a limit the set does not exceed leaves nothing out


def test_failing_and_partial_says_both(run: RunResult) -> None:
    half = dataclasses.replace(run, cases=run.cases[1:])
    assert verdict(half, []) == NOT_CERTIFIED
    md = render_markdown(half)
    assert "> ❌ **NOT CERTIFIED**: 4 of 8 cases certified" in md
    assert f"> Not a certificate of the whole plan: 1 of 11 planned tests have no record: 1 planned test " \
           f"selected but without a record (not run, skipped or lost): {run.cases[0].test_id}." in md


# ---------------------------------------------------------------------------------------------------
# Merging shards


def test_merged_shards_cover_the_plan_only_together(good: RunResult) -> None:
    ids = ids_of(good)
    parts = shards(good, [set(ids[:2]), set(ids[2:4]), set(ids[4:])])
    assert all(verdict(part, []) == PARTIAL for part in parts)  # a shard alone is no certificate
    (gap,) = parts[0].coverage.gaps
    assert gap.kind == "shard" and gap.message.startswith("pytest-split groups 2, 3 of 3 not merged")
    whole = merge(parts)
    assert whole.coverage.complete and whole.certified and len(whole.sessions) == 3
    two = merge([parts[0], parts[2]])
    (gap,) = two.coverage.gaps
    assert (gap.kind, gap.test_ids) == ("shard", tuple(ids[2:4]))
    assert gap.message == f"pytest-split group 2 of 3 not merged (2 planned tests no shard ran: {ids[2]}, {ids[3]})"
    assert from_json(to_json(two)).coverage == two.coverage


def test_shards_of_other_plans_do_not_merge(good: RunResult, run: RunResult) -> None:
    a, b = shards(good, [set(ids_of(good)[:2]), set(ids_of(good)[2:])])
    other = dataclasses.replace(b, plan=plan_of(good, ids_of(good) + ["rome-tiny-gpt2-hard-9999"]))
    with pytest.raises(MergeError, match=r"b\.json is a shard of another plan than a\.json \(plan [0-9a-f]{12} vs "
                                         r"[0-9a-f]{12}: test ids \(6 vs 7\)\)"):
        merge([a, other], sources=["a.json", "b.json"])
    old = read_result(GOLDEN / "run_v1.json")
    with pytest.raises(MergeError, match=r"old\.json records no plan .* but new\.json does"):
        merge([run, old], sources=["new.json", "old.json"])
    assert merge([old, old]).plan is None


# ---------------------------------------------------------------------------------------------------
# The report CLI


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Any:
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    monkeypatch.setattr(plots, "_load_matplotlib", lambda: (_ for _ in ()).throw(ImportError("skip")))
    out = ["--json", str(tmp_path / "out.json"), "--md", str(tmp_path / "out.md")]

    def call(*results: RunResult | Path, extra: tuple[str, ...] = ()) -> tuple[int, str, str]:
        paths = []
        for i, result in enumerate(results):
            if isinstance(result, Path):
                paths.append(str(result))
                continue
            path = tmp_path / f"shard{i + 1}.json"
            write_result(result, path)
            paths.append(str(path))
        code = report_cli.main([*paths, *out, *extra])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return call


def test_merging_two_of_three_shards_is_refused_naming_the_missing_one(good: RunResult, cli: Any,
                                                                        tmp_path: Path) -> None:
    ids = ids_of(good)
    first, second, third = shards(good, [set(ids[:2]), set(ids[2:4]), set(ids[4:])])
    code, out, err = cli(first, third)
    assert code == 1 and out == ""
    assert "error: these shards do not add up to their plan: 2 of 6 planned tests have no record: pytest-split " \
           "group 2 of 3 not merged" in err
    assert f"missing test ids: {ids[2]}, {ids[3]}" in err and "--allow-partial" in err
    assert not (tmp_path / "out.json").exists() and not (tmp_path / "out.md").exists()

    code, out, _ = cli(first, third, extra=("--allow-partial",))
    assert code == 1 and out.startswith("PARTIAL: 3/3 cases certified, 1/1 sequential runs; 2 of 6 planned tests")
    md = (tmp_path / "out.md").read_text(encoding="utf-8")
    assert md.splitlines()[2] == "> ⚠️ **PARTIAL**: 3 of 3 cases certified; 1 of 1 sequential runs certified."
    coverage = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))["coverage"]
    assert coverage["status"] == "partial" and coverage["gaps"][0]["test_ids"] == ids[2:4]

    code, out, _ = cli(first, second, third)
    assert code == 0 and out.startswith("CERTIFIED: 5/5 cases certified")


def test_the_cli_refuses_other_plans_and_one_file_for_both_outputs(good: RunResult, cli: Any, tmp_path: Path) -> None:
    a, b = shards(good, [set(ids_of(good)[:2]), set(ids_of(good)[2:])])
    other = dataclasses.replace(b, plan=plan_of(good, ids_of(good)[:-1]), sequential=())
    code, _, err = cli(a, other)
    assert code == 4 and "shard2.json is a shard of another plan than" in err
    code = report_cli.main([str(GOLDEN / "run.json"), "--json", str(tmp_path / "x"), "--md", str(tmp_path / "x")])
    assert code == 4


def test_the_golden_run_with_cases_removed_fails_against_the_golden_baseline(run: RunResult, good: RunResult,
                                                                               cli: Any, tmp_path: Path) -> None:
    baseline = GOLDEN / "baseline.json"
    # the forgery: the failing cases left out of the plan; all that is left is certified and covers its plan
    assert good.certified
    code, out, _ = cli(good, extra=("--baseline", str(baseline)))
    assert code == 1 and out.startswith("NOT CERTIFIED: 5/5 cases certified, 1/1 sequential runs, 6 baseline")
    md = (tmp_path / "out.md").read_text(encoding="utf-8")
    dropped = sorted(set(ids_of(run)) - set(ids_of(good)))
    for test_id in dropped:
        assert f"- **missing**: {test_id} is in the baseline and not in this run" in md

    # one case less than a certified baseline is the only regression; allowed, it is listed
    one_less = replanned(good, drop={good.cases[0].test_id})
    write_result(good, tmp_path / "good.json")
    code, out, _ = cli(one_less, extra=("--baseline", str(tmp_path / "good.json")))
    assert code == 1 and out.startswith("NOT CERTIFIED: 4/4 cases certified, 1/1 sequential runs, 1 baseline")
    code, out, _ = cli(one_less, extra=("--baseline", str(tmp_path / "good.json"), "--allow-missing"))
    assert code == 0 and out.startswith("CERTIFIED")
    md = (tmp_path / "out.md").read_text(encoding="utf-8")
    assert f"1 test of the baseline is not in this run (allowed to be missing): {good.cases[0].test_id}." in md

    # the same plan with a record gone: a partial run, refused
    gone = run.cases[0].test_id
    code, _, err = cli(dataclasses.replace(run, cases=run.cases[1:]), extra=("--baseline", str(baseline)))
    assert code == 1 and f"missing test ids: {gone}" in err

    # the record cut out of the file by hand: the file's coverage no longer holds
    data = json.loads((GOLDEN / "run.json").read_text(encoding="utf-8"))
    data["cases"] = [c for c in data["cases"] if c["test_id"] != gone]
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(data), encoding="utf-8")
    code, _, err = cli(forged, extra=("--baseline", str(baseline)))
    assert code == 4 and "forged.json: $.coverage: says complete" in err


def test_a_whole_session_is_written_and_read_back(good: RunResult, tmp_path: Path) -> None:
    session = Session("not slow", "editsafety", Shard("pytest-split", 1, 1), (), None)
    result = dataclasses.replace(good, sessions=(WHOLE_SESSION, session))
    write_result(result, tmp_path / "r.json")
    assert read_result(tmp_path / "r.json") == result
