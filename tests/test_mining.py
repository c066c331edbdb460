"""Mining a dataset by ROME's denominator: the pure ranking, the key maths, the command end to end on a
micro organism (its file replays through the certification suite), and on tiny-gpt2 and tiny-gpt2-sink
whether the ranking puts the known hard cases first."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pytest_editsafety.cases import EditCase, load_cases, resolve_cases
from pytest_editsafety.mining import (
    MiningError,
    ScoredCase,
    hardness_summary,
    mined_case_set,
    rank_cases,
)

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "suites" / "test_certify.py"


def _case(case_id: str, hard: bool | None = None) -> EditCase:
    return EditCase(case_id=case_id, subject="Alpha", prompt="{} lives in", target_new="Paris",
                    ground_truth="Rome", is_hard=hard, metadata={"relation": "city"})


def _measure(denominator: float) -> dict[str, float]:
    """An editor's denominator report, as ``RomeEditor.denominator`` returns it (``KeyMeasure.as_dict()``)."""
    return {"denominator": denominator, "raw_denominator": 2 * denominator, "key_cosine": 0.9, "key_norm": 1.0,
            "mean_key_norm": 1.0}


def _scored(case_id: str, denominator: float, hard: bool | None = None, source: str = "pool") -> ScoredCase:
    return ScoredCase(_case(case_id, hard), source, _measure(denominator))


@pytest.fixture()
def one_torch_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------- pure parts


def test_cases_rank_by_smallest_denominator_nan_first_ties_in_pool_order() -> None:
    ranked, median = rank_cases([_scored("a", 4.0), _scored("b", 1.0), _scored("c", math.nan), _scored("d", 4.0),
                                 _scored("e", 2.0)])
    assert [m.case.case_id for m in ranked] == ["c", "b", "e", "a", "d"]
    assert [m.rank for m in ranked] == [1, 2, 3, 4, 5]
    assert median == 3.0  # over the finite denominators
    assert ranked[1].median_ratio == pytest.approx(1 / 3) and math.isnan(ranked[0].median_ratio)
    with pytest.raises(MiningError, match="no cases"):
        rank_cases([])


def test_a_scored_case_reads_the_editors_report() -> None:
    scored = ScoredCase(_case("a"), "pool", {"denominator": 0.25, "key_cosine": 0.5})
    assert scored.denominator == 0.25 and scored.get("key_cosine") == 0.5
    assert math.isnan(scored.get("raw_denominator"))  # a measure the editor does not report
    ranked, _ = rank_cases([scored])
    (row,) = mined_case_set(ranked, editor="other", model="m").cases
    assert row.metadata["mined_denominator"] == 0.25 and row.metadata["mined_key_cosine"] == 0.5


def test_an_editor_without_a_denominator_cannot_be_mined() -> None:
    from types import SimpleNamespace

    from pytest_editsafety.mining import score_case_sets

    editor = SimpleNamespace(denominator=lambda model, tokenizer, family, request: None)
    hub = SimpleNamespace(prepared_editor=lambda model, name: editor,
                          loaded=lambda model: SimpleNamespace(model=None, tokenizer=None, family=None),
                          cases=lambda model, slug: SimpleNamespace(cases=(_case("a"),)))
    with pytest.raises(MiningError, match="--editor: 'ft-linf' reports no denominator"):
        score_case_sets(hub, "m", "ft-linf", [("pool", "pool")], progress=False)


def test_hardness_summary_measures_how_early_hard_cases_come() -> None:
    ranked, _ = rank_cases([_scored(str(i), float(i), hard=i < 2) for i in range(8)])
    summary = hardness_summary(ranked, top=4)
    assert (summary.n_cases, summary.n_hard, summary.hard_in_top, summary.top) == (8, 2, 2, 4)
    assert summary.hard_mean_rank_percentile == pytest.approx(((1 - 0.5) / 8 + (2 - 0.5) / 8) / 2)
    assert summary.hard_share_of_top == 0.5
    reversed_order, _ = rank_cases([_scored(str(i), float(-i), hard=i < 2) for i in range(8)])
    assert hardness_summary(reversed_order, top=4).hard_mean_rank_percentile > 0.8


def test_mined_set_keeps_ids_unique_records_the_score_and_round_trips(tmp_path: Path) -> None:
    from pytest_editsafety.cases import dump_cases

    ranked, _ = rank_cases([_scored("0000", 1.5, source="a.json"), _scored("0000", 0.5, source="b.json"),
                            _scored("0001", math.nan, source="a.json")])
    mined = mined_case_set(ranked, editor="rome", model="tiny-gpt2")
    assert [c.case_id for c in mined.cases] == ["0001", "b.json-0000", "a.json-0000"]
    first, second = mined.cases[0].metadata, mined.cases[1].metadata
    assert "mined_denominator" not in first and first["mined_rank"] == 1  # NaN is no JSON number
    assert second["mined_denominator"] == 0.5 and second["mined_from"] == "b.json" and second["relation"] == "city"
    path = dump_cases(mined, tmp_path / "deep" / "mined.json")
    again = load_cases(path)
    assert again.cases == mined.cases and again.format == "canonical" and again.name == "mined"
    assert not list(path.parent.glob(".*.tmp"))  # the atomic write left no temporary file


def test_measured_denominator_is_the_one_rome_divides_by() -> None:
    import torch

    from editors.maths.rome import covariance_solver, measure_keys, rome_update

    generator = torch.Generator().manual_seed(0)
    d = 16
    k_bare, k_mean = torch.randn(d, generator=generator), torch.randn(d, generator=generator)
    W, v = torch.randn(8, d, generator=generator), torch.randn(8, generator=generator)
    A = torch.randn(d, 3 * d, generator=generator)
    covariance = A @ A.T / (3 * d)
    for C in (None, covariance):
        measured = measure_keys(k_bare, k_mean, covariance_solver(C) if C is not None else None)
        update = rome_update(W, k_bare, k_mean, v, consistent=False, covariance=C)
        assert measured.denominator == pytest.approx(update.abs_denominator, rel=1e-6)
        # the edit's own report names the same quantity "denominator"
        assert measured.as_dict()["denominator"] == pytest.approx(update.diagnostics()["denominator"], rel=1e-6)
        assert measured.key_cosine == pytest.approx(update.key_cosine)
        direction = k_mean.double() if C is None else torch.linalg.solve(C.double(), k_mean.double())
        assert measured.raw_denominator == pytest.approx(abs(float(direction @ k_bare.double())), rel=1e-9)
        # C-ROME divides by |uᵀk̄|: the consistent measure is that one, not rome's
        consistent = measure_keys(k_bare, k_mean, covariance_solver(C) if C is not None else None, consistent=True)
        c_update = rome_update(W, k_bare, k_mean, v, consistent=True, covariance=C)
        assert consistent.denominator == pytest.approx(c_update.abs_denominator, rel=1e-6)
        assert consistent.denominator != pytest.approx(measured.denominator, rel=1e-3)
    assert math.isnan(measure_keys(k_bare, torch.zeros(d)).denominator)  # no u at all: ranked first


def test_interference_is_the_share_of_the_update_other_keys_receive() -> None:
    import torch

    from editors.maths import MathsError
    from editors.maths.rome import interference, measure_keys, rank_one_update

    u, k = torch.tensor([1.0, 0.0]), torch.tensor([2.0, 5.0])
    others = torch.tensor([[1.0, 1.0], [0.0, 3.0], [-3.0, 0.0]])
    # |uᵀk'| = 1, 0, 3 against |uᵀk| = 2
    assert interference(u, k, others) == pytest.approx((1 + 0 + 3) / 3 / 2)
    assert interference(7.5 * u, k, others) == pytest.approx(interference(u, k, others))  # u's scale cancels
    assert interference(u, torch.tensor([0.0, 1.0]), others) == math.inf  # nothing to divide by
    with pytest.raises(MathsError, match="other_keys"):
        interference(u, k, torch.zeros(0, 2))
    # it is what a rank-one update does: each other key's output moves by that share of the edited key's
    generator = torch.Generator().manual_seed(3)
    d = 6
    W, key, v = torch.randn(4, d, generator=generator), torch.randn(d, generator=generator), torch.randn(4, generator=generator)
    direction, rows = torch.randn(d, generator=generator), torch.randn(5, d, generator=generator)
    delta = rank_one_update(W, direction, key, v).delta.double()
    moved = (rows.double() @ delta.T).norm(dim=1) / (delta @ key.double()).norm()
    assert float(moved.mean()) == pytest.approx(interference(direction, key, rows), rel=1e-5)
    # measure_keys carries it only when given ordinary keys, for the key the editor divides by
    k_bare, k_mean = torch.randn(d, generator=generator), torch.randn(d, generator=generator)
    assert "interference" not in measure_keys(k_bare, k_mean).as_dict()
    for consistent, key_used in ((False, k_bare), (True, k_mean)):
        measured = measure_keys(k_bare, k_mean, consistent=consistent, other_keys=rows).as_dict()
        assert measured["interference"] == pytest.approx(interference(k_mean, key_used, rows))


def test_a_confirmation_edit_that_raises_is_recorded_and_the_others_still_run() -> None:
    from types import SimpleNamespace

    from pytest_editsafety.hub import RunOutcome
    from pytest_editsafety.plan import PlanItem
    from pytest_editsafety.mining import confirm

    ranked, _ = rank_cases([_scored("a", 1.0), _scored("b", 2.0), _scored("c", 3.0)])
    plan = SimpleNamespace(
        case_sets=[SimpleNamespace(given="pool", slug="pool")],
        items=[PlanItem(f"rome-m-pool-{i}", "case", "rome", "m", "pool", i) for i in "abc"],
    )
    runs = []

    def run(item):
        runs.append(item.case_id)
        if item.case_id == "a":
            return RunOutcome({"metrics": {}}, {}, ("error: MathsError: degenerate",), MemoryError("out of memory"))
        return RunOutcome({"metrics": {"ppl_ratio": 1.5}}, {}, ())

    confirmed = confirm(SimpleNamespace(run=run), plan, ranked, "rome", progress=False)
    assert runs == ["a", "b", "c"]
    assert [(c.case_id, c.certified, c.error) for c in confirmed] == [
        ("a", False, "MemoryError: out of memory"), ("b", True, None), ("c", True, None)]
    assert confirmed[0].to_dict()["error"] == "MemoryError: out of memory"


def test_solver_falls_back_when_c_is_not_positive_definite() -> None:
    import torch

    from editors.maths.rome import covariance_solver

    indefinite = torch.diag(torch.tensor([2.0, -1.0, 3.0], dtype=torch.float64))
    x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert torch.allclose(covariance_solver(indefinite)(x), torch.linalg.solve(indefinite, x))


# ---------------------------------------------------------------------------------------------- the command


def _mine(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    from pytest_editsafety.cli import main

    code = main(["mine", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_mine_command_scores_writes_confirms_and_its_file_replays(
    micro_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    one_torch_thread: None, pytester: pytest.Pytester,
) -> None:
    monkeypatch.setenv("EDITSAFETY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "mined.json"
    # --no-mom2 overrules the organism hparams' C from text, and the replay below edits with C = I too
    code, stdout, _ = _mine(capsys, "--model", str(micro_model), "--editor", "rome", "--cases", "hard,normal",
                            "--top", "3", "--no-mom2", "--out", str(out), "--confirm", "--json", "--quiet")
    assert code == 0
    payload = json.loads(stdout)
    assert payload["n_scored"] == 96 and payload["out"] == str(out) and payload["mom2_adjustment"] is False
    rows = payload["mined"]
    assert [r["rank"] for r in rows] == [1, 2, 3]
    denominators = [r["denominator"] for r in rows]
    assert denominators == sorted(denominators) and denominators[-1] <= payload["median_denominator"]
    for row in rows:
        assert row["median_ratio"] == pytest.approx(row["denominator"] / payload["median_denominator"])
        # the keys-only score is the denominator the full rome edit then divides by
        assert row["confirm"]["denominator"] == pytest.approx(row["denominator"], rel=1e-4)
        assert isinstance(row["confirm"]["ppl_ratio"], float) and row["confirm"]["cf_efficacy"] in (0.0, 1.0)

    mined = resolve_cases(str(out))
    assert [c.case_id for c in mined.cases] == [r["case_id"] for r in rows]
    assert mined.cases[0].metadata["mined_denominator"] == pytest.approx(denominators[0])

    # the file replays through the certification suite, one test per mined case, the same denominators
    pytester.makepyfile(test_certify=SUITE.read_text())
    report = tmp_path / "replay"
    identity = tmp_path / "c-identity.json"
    identity.write_text(json.dumps({"mom2_adjustment": False}))
    result = pytester.runpytest(f"--model={micro_model}", "--editor=rome", f"--cases={out}",
                                f"--editsafety-hparams=rome={identity}",
                                f"--editsafety-json={report / 'r.json'}", f"--editsafety-report={report / 'r.md'}",
                                "-p", "no:cacheprovider")
    assert result.ret in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED)
    replayed = {r["case_id"]: r["metrics"]["denominator"] for r in json.loads((report / "r.json").read_text())["cases"]}
    assert replayed == pytest.approx({r["case_id"]: r["denominator"] for r in rows}, rel=1e-4)


def test_mine_with_c_from_text_scores_what_a_rome_edit_with_c_divides_by(
    micro_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    one_torch_thread: None,
) -> None:
    monkeypatch.setenv("EDITSAFETY_CACHE", str(tmp_path / "cache"))
    code, stdout, _ = _mine(capsys, "--model", str(micro_model), "--editor", "rome", "--cases", "hard", "--top", "1",
                            "--mom2", "--out", str(tmp_path / "m.json"), "--confirm", "--json", "--quiet")
    assert code == 0
    payload = json.loads(stdout)
    assert payload["mom2_adjustment"] is True
    (row,) = payload["mined"]
    assert row["confirm"]["denominator"] == pytest.approx(row["denominator"], rel=1e-4)
    assert list((tmp_path / "cache" / "stats").glob("*.safetensors"))  # C came from editors.stats


def test_mining_for_c_rome_scores_the_denominator_c_rome_divides_by(
    micro_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    one_torch_thread: None,
) -> None:
    monkeypatch.setenv("EDITSAFETY_CACHE", str(tmp_path / "cache"))
    common = ["--model", str(micro_model), "--cases", "hard", "--top", "2", "--json", "--quiet"]
    code, stdout, _ = _mine(capsys, *common, "--editor", "c-rome", "--out", str(tmp_path / "c.json"), "--confirm")
    assert code == 0
    payload = json.loads(stdout)
    for row in payload["mined"]:
        # |uᵀk̄|, what the c-rome edit divides by (not rome's |uᵀkᵘ|)
        assert row["confirm"]["denominator"] == pytest.approx(row["denominator"], rel=1e-4)
    code, stdout, _ = _mine(capsys, *common, "--editor", "rome", "--out", str(tmp_path / "r.json"))
    rome = {r["case_id"]: r["denominator"] for r in json.loads(stdout)["mined"]}
    c_rome = {r["case_id"]: r["denominator"] for r in payload["mined"]}
    assert all(c_rome[i] != pytest.approx(rome[i], rel=1e-3) for i in set(rome) & set(c_rome))


def test_the_case_file_is_written_before_any_confirmation_edit(
    micro_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    one_torch_thread: None,
) -> None:
    from pytest_editsafety import mining

    def crash(*args, **kwargs):
        raise RuntimeError("the machine went away")

    monkeypatch.setenv("EDITSAFETY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(mining, "confirm", crash)
    out = tmp_path / "mined.json"
    with pytest.raises(RuntimeError, match="went away"):
        _mine(capsys, "--model", str(micro_model), "--editor", "rome", "--cases", "normal", "--top", "2",
              "--out", str(out), "--confirm", "--quiet")
    assert len(load_cases(out)) == 2


def test_mine_prints_a_table_by_default(
    micro_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    one_torch_thread: None,
) -> None:
    monkeypatch.setenv("EDITSAFETY_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    code, stdout, _ = _mine(capsys, "--model", str(micro_model), "--editor", "rome", "--cases", "normal", "--top", "2",
                            "--quiet")
    assert code == 0
    default_out = tmp_path / "reports" / f"mined-rome-{micro_model.name}.json"
    assert len(load_cases(default_out)) == 2
    header = stdout.splitlines()[1]
    # the editor's own |uᵀk| (kᵘ for rome, k̄ for c-rome)
    assert header.startswith("|") and "rank" in header and "|uᵀk|" in header
    assert f"--cases={Path('reports') / default_out.name}" in stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--top", "0"], "--top must be at least 1"),
    (["--top", "2", "--editor", "nope"], "--editor: unknown editor 'nope'"),
    (["--top", "2", "--cases", "no-such-set"], "no-such-set"),
])
def test_mine_usage_errors_exit_2_and_name_the_option(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:
    base = ["--model", "tiny-gpt2", "--editor", "rome", "--cases", "hard", "--out", str(tmp_path / "x.json")]
    code, _, stderr = _mine(capsys, *base, *args)
    assert code == 2 and message in stderr
    assert not (tmp_path / "x.json").exists()


def test_mining_names_its_editor(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from pytest_editsafety.mining import mine

    with pytest.raises(SystemExit) as exit_info:
        _mine(capsys, "--model", "tiny-gpt2", "--cases", "hard", "--top", "2", "--out", str(tmp_path / "x.json"))
    assert exit_info.value.code == 2 and "--editor" in capsys.readouterr().err
    with pytest.raises(TypeError, match="editor"):
        mine("tiny-gpt2", ["hard"], top=2)  # type: ignore[call-arg]
    assert not (tmp_path / "x.json").exists()


# ---------------------------------------------------------------------------------------------- the organism

# The margin the ranking must show over an organism's 96 built-in cases (48 hard, 48 normal), per model in
# MARGINS: hard cases' mean rank percentile (0.5 = random order; 0.25 = every hard case ahead of every normal
# one) at most the first figure, and at least the second share of the 48 smallest denominators hard. Measured
# on tiny-gpt2 (recipe 2f8b493ccc23ffba, subject embeddings fixed): C = I 0.255 and 45/48, C from its held-out
# text 0.254 and 45/48 (an earlier recipe with trainable embeddings, whose keys had saturated, ranked hard
# cases later with C = I: 0.67). On tiny-gpt2-sink C = I gives 0.250 and 47/48, C from text 0.250 and 48/48.
# (Re-measured with the editor's own denominator report; the same figures as mining's own key maths gave
# before it moved into the editor.)
MARGINS = {"tiny-gpt2": (0.30, 0.85), "tiny-gpt2-sink": (0.30, 0.85)}  # (max percentile, min hard share)


@pytest.mark.organism
@pytest.mark.parametrize(("model", "mom2"), [
    pytest.param("tiny-gpt2", True, id="tiny-gpt2-C-from-text", marks=pytest.mark.xdist_group("tiny-gpt2")),
    pytest.param("tiny-gpt2", False, id="tiny-gpt2-C-identity", marks=pytest.mark.xdist_group("tiny-gpt2")),
    pytest.param("tiny-gpt2-sink", False, id="tiny-gpt2-sink-C-identity",
                 marks=pytest.mark.xdist_group("tiny-gpt2-sink")),
    pytest.param("tiny-gpt2-sink", True, id="tiny-gpt2-sink-C-from-text",
                 marks=pytest.mark.xdist_group("tiny-gpt2-sink")),
])
def test_mining_the_organism_ranks_hard_cases_first(model: str, mom2: bool, one_torch_thread: None) -> None:
    from pytest_editsafety.mining import mine

    report = mine(model, ["hard", "normal"], top=48, editor="rome", mom2_adjustment=mom2, progress=False)
    assert report.mom2_adjustment is mom2
    summary = report.summary()
    assert (summary.n_cases, summary.n_hard) == (96, 48)
    max_percentile, min_share = MARGINS[model]
    assert summary.hard_mean_rank_percentile <= max_percentile, summary
    assert summary.hard_share_of_top >= min_share, summary
