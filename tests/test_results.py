"""Results: JSON round trips, non-finite numbers, strict validation, shard merging, baseline comparison.

The plan, the sessions and coverage (what a run left out of its plan) are in ``test_coverage.py``."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_editsafety.bounds import Bounds
from pytest_editsafety.results import (
    SCHEMA,
    CaseRecord,
    MergeError,
    RecordError,
    ResultsError,
    ResultsFormatError,
    RunMetadata,
    RunResult,
    SequentialRecord,
    compare,
    decode_float,
    encode_float,
    from_json,
    merge,
    read_result,
    summarize_groups,
    to_json,
    write_result,
)
from tests.results_helpers import replanned, shards

GOLDEN = Path(__file__).parent / "golden"

# ---------------------------------------------------------------------------------------------------
# Strategies

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
any_float = st.floats(allow_nan=True, allow_infinity=True)
text = st.text(max_size=40)  # any unicode, newlines and quotes included
workers = st.one_of(st.none(), st.sampled_from(["main", "gw0", "gw13"]))
devices = st.one_of(st.none(), st.sampled_from(["cpu", "cuda:0", "cuda:0 (GPU 3)", "cuda:1 (GPU-8f2e)"]))


def metadata_for(editor_names: tuple[str, ...], model_names: tuple[str, ...], **overrides: Any) -> RunMetadata:
    fields: dict[str, Any] = dict(
        editors=editor_names,
        models={m: f"rev-{m}" for m in model_names},
        hparams_hashes={e: {m: f"{e}-{m}-hash" for m in model_names} for e in editor_names},
        bounds=Bounds().to_dict(),
        corpus="organism-heldout",
        corpus_sha256="ab" * 32,
        library_versions={"torch": "2.13.0"},
        hardware="cpu",
        started="2025-03-01T10:00:00+00:00",
        finished="2025-03-01T10:05:00+00:00",
        duration_s=300.0,
        commands=("pytest",),
    )
    fields.update(overrides)
    return RunMetadata(**fields)


@st.composite
def case_records(draw: st.DrawFn, editor: str, model: str, test_id: str) -> CaseRecord:
    certified = draw(st.booleans())
    return CaseRecord(
        test_id=test_id,
        editor=editor,
        model=model,
        case_set=draw(names),
        case_id=draw(names),
        is_hard=draw(st.booleans()),
        subject=draw(text),
        prompt=draw(text),
        target_new=draw(text),
        ground_truth=draw(text),
        metrics=draw(st.dictionaries(st.sampled_from(["ppl_ratio", "ppl_edited", "ppl_unedited", "denominator",
                                                      "numerator", "cf_efficacy", "ee_locality", "delta_fro"]),
                                     st.one_of(st.none(), any_float))),
        certified=certified,
        collapse=draw(st.booleans()),
        violations=() if certified else tuple(draw(st.lists(text, max_size=3))),
        outcome=draw(st.sampled_from(["passed", "failed", "error"])),
        duration_s=draw(st.floats(min_value=0, max_value=1e4)),
        worker=draw(workers),
        device=draw(devices),
    )


@st.composite
def sequential_records(draw: st.DrawFn, editor: str, model: str, test_id: str) -> SequentialRecord:
    ppls = tuple(draw(st.lists(any_float, max_size=8)))
    certified = draw(st.booleans())
    return SequentialRecord(
        test_id=test_id,
        editor=editor,
        model=model,
        case_set=draw(names),
        n_edits=len(ppls) + draw(st.integers(0, 3)),
        ppl_after_each=ppls,
        ppl_unedited=draw(any_float),
        certified=certified,
        collapse=draw(st.booleans()),
        violations=() if certified else tuple(draw(st.lists(text, max_size=2))),
        outcome=draw(st.sampled_from(["passed", "failed", "error"])),
        duration_s=draw(st.floats(min_value=0, max_value=1e4)),
        worker=draw(workers),
        device=draw(devices),
    )


@st.composite
def run_results(draw: st.DrawFn) -> RunResult:
    editors = tuple(draw(st.lists(names, min_size=1, max_size=3, unique=True)))
    models = tuple(draw(st.lists(names, min_size=1, max_size=2, unique=True)))
    ids = draw(st.lists(names, max_size=8, unique=True))
    n_cases = draw(st.integers(0, len(ids)))
    cases = [draw(case_records(draw(st.sampled_from(editors)), draw(st.sampled_from(models)), i)) for i in ids[:n_cases]]
    seq = [draw(sequential_records(draw(st.sampled_from(editors)), draw(st.sampled_from(models)), i))
           for i in ids[n_cases:]]
    return RunResult(metadata_for(editors, models), tuple(cases), tuple(seq))


# ---------------------------------------------------------------------------------------------------
# Round trips and numbers


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(run_results())
def test_json_round_trip(result: RunResult) -> None:
    text = to_json(result)
    again = from_json(text)
    # NaN != NaN, so compare the canonical serialisation and the records field by field
    assert to_json(again) == text
    assert [r.test_id for r in again.cases] == [r.test_id for r in result.cases]
    for before, after in zip(result.cases, again.cases):
        assert before.metrics.keys() == after.metrics.keys()
        for key, value in before.metrics.items():
            got = after.metrics[key]
            assert (value is None and got is None) or (math.isnan(value) and math.isnan(got)) or value == got
        assert dataclasses.replace(before, metrics={}) == dataclasses.replace(after, metrics={})


@settings(max_examples=30)
@given(run_results())
def test_records_travel_as_plain_json_dicts(result: RunResult) -> None:
    for record in (*result.cases, *result.sequential):
        plain = json.loads(json.dumps(record.to_dict(), allow_nan=False))
        again = type(record).from_dict(plain)
        assert again.to_dict() == plain


def test_non_finite_numbers_are_strings_in_the_file() -> None:
    meta = metadata_for(("rome",), ("m",))
    record = CaseRecord("t1", "rome", "m", "hard", "0001", True, "s", "{} is", "a", "b",
                        {"ppl_ratio": math.nan, "ppl_edited": math.inf, "key_cosine": -math.inf, "denominator": None},
                        False, True, ("collapse",), "failed", 1.0)
    text = to_json(RunResult(meta, (record,)))
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text)
    assert data["schema"] == SCHEMA
    assert data["cases"][0]["metrics"] == {"denominator": None, "key_cosine": "-inf", "ppl_edited": "inf",
                                           "ppl_ratio": "nan"}
    metrics = from_json(text).cases[0].metrics
    assert math.isnan(metrics["ppl_ratio"]) and metrics["ppl_edited"] == math.inf
    assert metrics["key_cosine"] == -math.inf and metrics["denominator"] is None


def test_bounds_with_an_infinite_collapse_line_round_trip() -> None:
    meta = metadata_for(("rome",), ("m",), bounds=Bounds(collapse_ppl=math.inf, min_denominator_abs=2.0).to_dict())
    text = to_json(RunResult(meta))
    assert json.loads(text)["metadata"]["bounds"]["collapse_ppl"] == "inf"
    assert from_json(text).metadata.parsed_bounds == Bounds(collapse_ppl=math.inf, min_denominator_abs=2.0)


@given(any_float)
def test_encode_decode_float(x: float) -> None:
    y = decode_float(json.loads(json.dumps(encode_float(x), allow_nan=False)))
    assert (math.isnan(x) and math.isnan(y)) or x == y


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "1.5", True, None, [1.0]])
def test_decode_float_rejects_other_values(bad: Any) -> None:
    with pytest.raises(ValueError):
        decode_float(bad)


def test_records_are_sorted_and_copied() -> None:
    metrics = {"ppl_ratio": 1.0}
    meta = metadata_for(("rome",), ("m",))
    b = CaseRecord("b", "rome", "m", "s", "1", False, "s", "p", "x", "y", metrics, True, False, (), "passed", 0.0)
    a = dataclasses.replace(b, test_id="a")
    result = RunResult(meta, (b, a))
    assert [r.test_id for r in result.cases] == ["a", "b"]
    metrics["ppl_ratio"] = 99.0  # a caller mutating its dict afterwards changes nothing
    assert result.cases[0].metrics["ppl_ratio"] == 1.0


def test_golden_files_are_valid_and_write_atomically(tmp_path: Path) -> None:
    result = read_result(GOLDEN / "run.json")
    assert len(result.cases) == 9 and len(result.sequential) == 2
    out = tmp_path / "sub" / "editsafety.json"
    write_result(result, out)
    assert out.read_text(encoding="utf-8") == (GOLDEN / "run.json").read_text(encoding="utf-8")
    assert [p.name for p in out.parent.iterdir()] == ["editsafety.json"]  # no temporary files left behind


# ---------------------------------------------------------------------------------------------------
# Validation errors name the file and the JSON path


def golden_data() -> dict[str, Any]:
    return json.loads((GOLDEN / "run.json").read_text(encoding="utf-8"))


def write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "shard.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def mutate(data: dict[str, Any], path: str, value: Any) -> None:
    target: Any = data
    parts = path.split(".")
    for part in parts[:-1]:
        target = target[int(part)] if isinstance(target, list) else target[part]
    last = parts[-1]
    if value is KeyError:
        del target[last]
    else:
        target[int(last) if isinstance(target, list) else last] = value


@pytest.mark.parametrize(
    ("where", "value", "json_path", "problem"),
    [
        ("cases.1.metrics.ppl_ratio", "high", "$.cases[1].metrics.ppl_ratio", "expected a number"),
        ("cases.1.metrics.ppl_ratio", True, "$.cases[1].metrics.ppl_ratio", "expected a number"),
        ("cases.0.outcome", "skipped", "$.cases[0].outcome", "must be one of passed, failed, error"),
        ("cases.2.is_hard", "yes", "$.cases[2].is_hard", "expected true or false"),
        ("cases.3.violations", "boom", "$.cases[3].violations", "expected a list"),
        ("cases.3.violations", ["a", 3], "$.cases[3].violations[1]", "expected a string"),
        ("cases.0.surprise", 1, "$.cases[0].surprise", "unknown field"),
        ("cases.0.subject", KeyError, "$.cases[0]", "missing field(s) 'subject'"),
        ("cases.4.test_id", "c-rome-tiny-gpt2-hard-0000", "$.cases[4].test_id", "duplicate test id"),
        ("cases.0.editor", "memit", "$.cases[0].editor", "not in metadata.editors"),
        ("sequential.1.ppl_after_each", [1.0, "x"], "$.sequential[1].ppl_after_each[1]", "expected a number"),
        ("sequential.0.n_edits", -1, "$.sequential[0].n_edits", "expected an integer >= 0"),
        ("sequential.0.n_edits", 2, "$.sequential[0].ppl_after_each", "5 measurements for 2 edits"),
        ("metadata.started", "yesterday", "$.metadata.started", "ISO 8601"),
        ("metadata.finished", "2025-03-01T10:04:12", "$.metadata.finished", "timezone"),
        ("metadata.bounds.max_ppl_ratio", -2, "$.metadata.bounds", "'max_ppl_ratio'"),
        ("metadata.bounds.typo", 1, "$.metadata.bounds", "'typo'"),
        ("metadata.models.tiny-gpt2", 5, "$.metadata.models.tiny-gpt2", "expected a string"),
        ("metadata.duration_s", "inf", "$.metadata.duration_s", "finite"),
        ("schema", "pytest-editsafety/v0", "$.schema", "unsupported schema"),
        ("cases", {}, "$.cases", "expected a list"),
    ],
)
def test_validation_errors_name_file_and_path(tmp_path: Path, where: str, value: Any, json_path: str,
                                              problem: str) -> None:
    data = golden_data()
    mutate(data, where, value)
    path = write(tmp_path, data)
    with pytest.raises(ResultsFormatError) as info:
        read_result(path)
    err = info.value
    assert err.source == str(path)
    assert err.path == json_path
    assert problem in err.problem
    assert str(err).startswith(f"{path}: {json_path}: ")


def test_non_standard_constants_and_broken_json_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "nan.json"
    path.write_text(json.dumps(golden_data()).replace('"nan"', "NaN", 1), encoding="utf-8")
    with pytest.raises(ResultsFormatError, match=r"nan\.json: \$: non-standard JSON constant NaN"):
        read_result(path)
    path.write_text('{"schema": ', encoding="utf-8")
    with pytest.raises(ResultsFormatError, match=r"nan\.json: \$: not valid JSON"):
        read_result(path)
    path.write_text('{"schema": "a", "schema": "b"}', encoding="utf-8")
    with pytest.raises(ResultsFormatError, match="duplicate key 'schema'"):
        read_result(path)
    path.write_text("[]", encoding="utf-8")
    with pytest.raises(ResultsFormatError, match=r"\$: expected an object"):
        read_result(path)


def test_missing_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.json"
    with pytest.raises(ResultsError, match="nowhere.json: cannot read"):
        read_result(missing)


def test_record_constructors_check_invariants() -> None:
    with pytest.raises(RecordError, match="certified: a certified case cannot list violations"):
        CaseRecord("t", "e", "m", "s", "1", False, "s", "p", "x", "y", {}, True, False, ("x",), "passed", 0.0)
    with pytest.raises(RecordError, match="metrics"):
        CaseRecord("t", "e", "m", "s", "1", False, "s", "p", "x", "y", {"a": "1"}, False, False, (), "failed", 0.0)  # type: ignore[dict-item]
    with pytest.raises(RecordError, match="test_id: must not be empty"):
        SequentialRecord("", "e", "m", "s", 1, (1.0,), 1.0, True, False, (), "passed", 0.0)
    with pytest.raises(RecordError, match=r"device: must not be empty \(null when unknown\)"):
        SequentialRecord("t", "e", "m", "s", 1, (1.0,), 1.0, True, False, (), "passed", 0.0, "gw0", "")


# ---------------------------------------------------------------------------------------------------
# Merging shards


def split(result: RunResult, first_ids: set[str]) -> tuple[RunResult, RunResult]:
    meta = result.metadata
    rest = {r.test_id for r in (*result.cases, *result.sequential)} - first_ids
    shard1, shard2 = shards(result, [first_ids, rest])
    shard1 = dataclasses.replace(shard1, metadata=dataclasses.replace(
        meta, finished="2025-03-01T10:02:00+00:00", duration_s=100.0, commands=("pytest --group 1",),
        hardware="gpu-a"))
    shard2 = dataclasses.replace(shard2, metadata=dataclasses.replace(
        meta, started="2025-03-01T09:59:00+01:00", duration_s=150.0, commands=("pytest --group 2",),
        hardware="gpu-b", library_versions={**meta.library_versions, "torch": "2.13.1"}))
    return shard1, shard2


def test_merge_two_shard_files(tmp_path: Path) -> None:
    whole = read_result(GOLDEN / "run.json")
    first = {r.test_id for r in whole.cases[::2]} | {whole.sequential[0].test_id}
    shard1, shard2 = split(whole, first)
    write_result(shard1, tmp_path / "a.json")
    write_result(shard2, tmp_path / "b.json")
    merged = merge([read_result(tmp_path / "a.json"), read_result(tmp_path / "b.json")])
    assert [r.to_dict() for r in merged.cases] == [r.to_dict() for r in whole.cases]
    assert [r.to_dict() for r in merged.sequential] == [r.to_dict() for r in whole.sequential]
    meta = merged.metadata
    assert meta.editors == whole.metadata.editors
    assert meta.bounds == whole.metadata.bounds
    assert meta.started == "2025-03-01T09:59:00+01:00"  # 08:59 UTC, earlier than shard 1's 10:00 UTC
    assert meta.finished == whole.metadata.finished
    assert meta.duration_s == 250.0
    assert meta.commands == ("pytest --group 1", "pytest --group 2")
    assert meta.hardware == "gpu-a; gpu-b"
    assert meta.library_versions["torch"] == "2.13.0 | 2.13.1"
    assert merged.plan == whole.plan and merged.coverage.complete
    assert [s.shard.group for s in merged.sessions] == [1, 2]
    assert merged.certified == whole.certified


def test_merge_unions_editors_and_models() -> None:
    a = RunResult(metadata_for(("rome",), ("m1",)))
    b = RunResult(metadata_for(("memit", "rome"), ("m2",)))
    meta = merge([a, b]).metadata
    assert meta.editors == ("rome", "memit")
    assert meta.models == {"m1": "rev-m1", "m2": "rev-m2"}
    assert meta.hparams_hashes == {"memit": {"m2": "memit-m2-hash"}, "rome": {"m1": "rome-m1-hash", "m2": "rome-m2-hash"}}


def test_the_hyper_parameters_behind_each_hash_travel_with_it() -> None:
    from editors.hparams import hparams_hash

    values = {"layer": 0, "v_lr": 0.5, "kl_prompt": "{} is a", "context_templates": [[5, 10], [10, 10]]}
    digest = hparams_hash(values)
    meta = metadata_for(("rome",), ("m1",), hparams_hashes={"rome": {"m1": digest}}, hparams={"rome": {"m1": values}})
    again = RunMetadata.from_dict(json.loads(json.dumps(meta.to_dict())))
    assert again.hparams == {"rome": {"m1": values}} and again == meta
    assert type(again.hparams["rome"]["m1"]["layer"]) is int  # written as given: its hash is over the values
    with pytest.raises(RecordError, match="plain JSON value"):
        metadata_for(("rome",), ("m1",), hparams={"rome": {"m1": {"v_lr": float("nan")}}})
    # optional: a run without them writes no field, and older files read as before
    assert "hparams" not in metadata_for(("rome",), ("m1",)).to_dict()
    with pytest.raises(RecordError, match=r"hparams\.rome\.m1.*do not hash to hparams_hashes\.rome\.m1"):
        metadata_for(("rome",), ("m1",), hparams_hashes={"rome": {"m1": digest}},
                     hparams={"rome": {"m1": {**values, "layer": 1}}})
    with pytest.raises(RecordError, match=r"hparams\.memit\.m1"):
        metadata_for(("rome",), ("m1",), hparams={"memit": {"m1": values}})
    # shards that agree on the hashes merge their values
    other = metadata_for(("rome",), ("m2",), hparams_hashes={"rome": {"m2": digest}}, hparams={"rome": {"m2": values}})
    merged = merge([RunResult(meta), RunResult(other)]).metadata
    assert merged.hparams == {"rome": {"m1": values, "m2": values}}


def test_the_file_behind_each_hyper_parameter_travels_with_it() -> None:
    from editors.hparams import hparams_hash

    values = {"layer": 0, "v_lr": 0.5}
    digest = hparams_hash(values)
    sources = {"layer": "my-rome.json", "v_lr": "editors/hparams/rome/gpt2.json"}
    meta = metadata_for(("rome",), ("m1",), hparams_hashes={"rome": {"m1": digest}}, hparams={"rome": {"m1": values}},
                        hparams_sources={"rome": {"m1": sources}})
    assert RunMetadata.from_dict(json.loads(json.dumps(meta.to_dict()))).hparams_sources == {"rome": {"m1": sources}}
    assert "hparams_sources" not in metadata_for(("rome",), ("m1",)).to_dict()  # optional, as the values are
    with pytest.raises(RecordError, match=r"hparams_sources\.rome\.m1: names hyper-parameters the values lack: "
                                          r"kl_prompt"):
        metadata_for(("rome",), ("m1",), hparams_hashes={"rome": {"m1": digest}}, hparams={"rome": {"m1": values}},
                     hparams_sources={"rome": {"m1": {**sources, "kl_prompt": "x.json"}}})
    with pytest.raises(RecordError, match=r"hparams_sources\.memit\.m1"):
        metadata_for(("rome",), ("m1",), hparams_sources={"memit": {"m1": sources}})
    other = metadata_for(("rome",), ("m2",), hparams_sources={"rome": {"m2": {"layer": "overrides"}}})
    merged = merge([RunResult(meta), RunResult(other)]).metadata
    assert merged.hparams_sources == {"rome": {"m1": sources, "m2": {"layer": "overrides"}}}
    # shards whose equal values came from other files name both
    elsewhere = metadata_for(("rome",), ("m1",), hparams_hashes={"rome": {"m1": digest}},
                             hparams={"rome": {"m1": values}}, hparams_sources={"rome": {"m1": {"layer": "b.json"}}})
    both = merge([RunResult(meta), RunResult(elsewhere)]).metadata.hparams_sources["rome"]["m1"]
    assert both == {"layer": "my-rome.json; b.json", "v_lr": "editors/hparams/rome/gpt2.json"}


def test_merge_keeps_agreeing_duplicates_and_rejects_conflicts() -> None:
    whole = read_result(GOLDEN / "run.json")
    # re-run elsewhere: other durations, workers and devices, the same measurements
    rerun = dataclasses.replace(whole, cases=tuple(
        dataclasses.replace(r, duration_s=r.duration_s + 1, worker="gw7", device="cuda:0 (GPU 7)")
        for r in whole.cases))
    assert merge([whole, rerun]).cases == whole.cases
    flipped = [dataclasses.replace(r, outcome="error", certified=False, violations=("boom",)) if i in (0, 3) else r
               for i, r in enumerate(whole.cases)]
    other = dataclasses.replace(whole, cases=tuple(flipped))
    with pytest.raises(MergeError) as info:
        merge([whole, other], sources=["a.json", "b.json"])
    message = str(info.value)
    assert whole.cases[0].test_id in message and whole.cases[3].test_id in message
    assert whole.cases[1].test_id not in message
    assert "a.json vs b.json" in message


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"bounds": Bounds(max_ppl_ratio=2.0).to_dict()}, "b.json was run with other bounds than a.json (max_ppl_ratio: 1.5 vs 2.0)"),
        ({"corpus": "me-ppl-50"}, "corpus 'me-ppl-50'"),
        ({"models": {"m": "rev-other"}}, "model 'm' is 'rev-m' in a.json but 'rev-other' in b.json"),
        ({"hparams_hashes": {"rome": {"m": "other"}}}, "hparams of 'rome' on 'm' differ"),
    ],
)
def test_merge_rejects_incompatible_shards(override: dict[str, Any], message: str) -> None:
    a = RunResult(metadata_for(("rome",), ("m",)))
    b = RunResult(metadata_for(("rome",), ("m",), **override))
    with pytest.raises(MergeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        merge([a, b], sources=["a.json", "b.json"])


def test_merge_of_nothing_is_an_error() -> None:
    with pytest.raises(MergeError):
        merge([])


# ---------------------------------------------------------------------------------------------------
# Summaries and baseline comparison


def test_summaries_of_the_golden_run() -> None:
    groups = {(g.editor, g.model): g for g in summarize_groups(read_result(GOLDEN / "run.json"))}
    rome = groups[("rome", "tiny-gpt2")]
    assert (rome.n_cases, rome.n_certified, rome.n_collapses, rome.n_failed) == (5, 2, 2, 3)
    assert rome.max_ppl_ratio == math.inf  # the NaN perplexity ranks as the worst
    assert math.isnan(rome.min_denominator)
    assert not rome.certified
    crome = groups[("c-rome", "tiny-gpt2")]
    assert (crome.n_cases, crome.n_certified, crome.n_errors, crome.n_sequential_certified) == (4, 3, 1, 1)
    assert crome.min_denominator == pytest.approx(8.8)
    assert crome.mean_efficacy == pytest.approx((1.0 + 0.9 + 1.0 + 1.0) / 4)


def test_compare_finds_each_kind_of_regression() -> None:
    current = read_result(GOLDEN / "run.json")
    baseline = read_result(GOLDEN / "baseline.json")
    found = {(r.kind, r.editor, r.test_id) for r in compare(current, baseline)}
    assert found == {
        ("case", "c-rome", "c-rome-tiny-gpt2-normal-0008"),
        ("certified-share", "c-rome", None),
        ("max-ppl-ratio", "c-rome", None),
    }
    assert compare(current, current) == []
    assert compare(baseline, current) == []  # improvements are not regressions


def test_a_test_of_the_baseline_missing_now_is_a_regression_unless_allowed() -> None:
    # the forgery the rule is for: drop the failing tests, and the rest looks better than the baseline
    baseline = read_result(GOLDEN / "run.json")
    failing = {r.test_id for r in (*baseline.cases, *baseline.sequential) if not r.ok}
    current = replanned(baseline, drop=failing)
    assert current.certified
    found = compare(current, baseline)
    assert {(r.kind, r.test_id) for r in found} == {("missing", t) for t in failing}
    assert all(r.message == f"{r.test_id} is in the baseline and not in this run" for r in found)
    assert compare(current, baseline, allow_missing=True) == []


def ratio_run(ratios: list[float], *, certified: bool = True, seq_ok: bool | None = None) -> RunResult:
    cases = tuple(
        CaseRecord(f"t{i}", "rome", "m", "s", str(i), False, "s", "p", "x", "y",
                   {"ppl_ratio": r, "ppl_edited": 40.0 * r}, certified, False, () if certified else ("bad",),
                   "passed" if certified else "failed", 0.0)
        for i, r in enumerate(ratios)
    )
    seq = ()
    if seq_ok is not None:
        seq = (SequentialRecord("seq", "rome", "m", "s", 1, (41.0,), 40.0, seq_ok, False, () if seq_ok else ("x",),
                                "passed" if seq_ok else "failed", 0.0),)
    return RunResult(metadata_for(("rome",), ("m",)), cases, seq)


def test_max_ratio_growth_threshold_is_ten_percent() -> None:
    baseline = ratio_run([1.0, 1.2])
    assert compare(ratio_run([1.0, 1.31]), baseline) == []  # +9.2 %
    (regression,) = compare(ratio_run([1.0, 1.33]), baseline)  # +10.8 %
    assert regression.kind == "max-ppl-ratio"
    assert (regression.baseline, regression.current) == (1.2, 1.33)
    assert "1.2x to 1.33x" in regression.message
    # a model that now produces NaN has regressed; a baseline already at inf cannot grow
    assert [r.kind for r in compare(ratio_run([1.0, math.nan]), baseline)] == ["max-ppl-ratio"]
    assert compare(ratio_run([math.inf]), ratio_run([math.inf])) == []


def test_sequential_and_share_regressions() -> None:
    kinds = sorted(r.kind for r in compare(ratio_run([1.0], seq_ok=False), ratio_run([1.0], seq_ok=True)))
    assert kinds == ["sequential"]
    kinds = sorted(r.kind for r in compare(ratio_run([1.0, 1.0], certified=False), ratio_run([1.0, 1.0])))
    assert kinds == ["case", "case", "certified-share"]
    # a pair only in the baseline: its tests are missing (allowed here), and there is no pair to compare
    other = RunResult(metadata_for(("memit",), ("m",)))
    assert [r.kind for r in compare(other, ratio_run([1.0]))] == ["missing"]
    assert compare(other, ratio_run([1.0]), allow_missing=True) == []


def test_empty_run_is_not_certified() -> None:
    assert not RunResult(metadata_for(("rome",), ("m",))).certified
    assert replanned(ratio_run([1.0])).certified
    assert not replanned(ratio_run([1.0], seq_ok=False)).certified
    assert not ratio_run([1.0]).certified  # no plan: what the run left out is unknown


def test_only_hyper_parameters_whose_json_hashes_alike_are_recorded() -> None:
    from editors.rome import RomeHparams
    from pytest_editsafety.hparams_record import hparams_digest, recorded_hparams_values

    def values_of(hp):
        return recorded_hparams_values(hp, hparams_digest(hp))

    rome = RomeHparams(layer=3)
    values = values_of(rome)
    assert values["layer"] == 3 and values["context_templates"] == [list(p) for p in rome.context_templates]
    assert hparams_digest(values) == hparams_digest(rome)
    # a third-party mapping with integer keys: JSON makes them strings that sort otherwise, so no values
    assert values_of({"weights": {1: 0.5, 10: 0.2, 2: 0.3}}) is None
    assert values_of({"scale": float("nan")}) is None and values_of(object()) is None


def test_where_each_models_second_moments_came_from_travels_and_merges() -> None:
    source = {"17": "ROME statistics file transformer.h.17.mlp.c_proj_float32_mom2_100000.npz (4000000 keys)"}
    meta = metadata_for(("rome",), ("m1",), second_moments={"m1": source})
    assert RunMetadata.from_dict(json.loads(json.dumps(meta.to_dict()))).second_moments == {"m1": source}
    assert "second_moments" not in metadata_for(("rome",), ("m1",)).to_dict()
    with pytest.raises(RecordError, match=r"second_moments\.m9"):
        metadata_for(("rome",), ("m1",), second_moments={"m9": source})
    other = metadata_for(("rome",), ("m2",), second_moments={"m2": {"5": "wikitext (sha256 abc, 3000 texts, 1 keys)"}})
    assert merge([RunResult(meta), RunResult(other)]).metadata.second_moments == {"m1": source, **other.second_moments}
    # a shard whose editors used another C at the same layer: both are named, once each
    again = metadata_for(("rome",), ("m1",), second_moments={"m1": {"17": "wikitext (sha256 abc, 10000 texts, 9 keys)"}})
    merged = merge([RunResult(meta), RunResult(again), RunResult(meta)]).metadata.second_moments
    assert merged == {"m1": {"17": source["17"] + "; wikitext (sha256 abc, 10000 texts, 9 keys)"}}


def test_the_report_names_each_models_second_moments_once_per_source() -> None:
    from pytest_editsafety.report.markdown import render

    sources = {"m1": {"13": "wiki (sha256 ab, 9 texts, 90 keys)", "14": "wiki (sha256 ab, 9 texts, 90 keys)",
                      "2": "ROME statistics file x.npz (5 keys)"}}
    report = render(RunResult(metadata_for(("memit",), ("m1",), second_moments=sources)), baseline=None,
                    regressions=(), plot_links={}, plot_note=None)
    assert ("- **Second moments C:** m1 layer 2: ROME statistics file x.npz (5 keys); m1 layers 13, 14: wiki "
            "(sha256 ab, 9 texts, 90 keys)") in report
    assert "Second moments C" not in render(RunResult(metadata_for(("memit",), ("m1",))), baseline=None,
                                            regressions=(), plot_links={}, plot_note=None)


def test_workers_reporting_one_layers_second_moments_keep_every_source_once() -> None:
    from datetime import datetime, timezone

    from pytest_editsafety.controller import RunRecords, absorb_meta

    records = RunRecords(started=datetime.now(timezone.utc), t0=0.0)
    for sources in ("wiki (616 texts)", "wiki (616 texts); ROME statistics file x.npz (5 keys)", "wiki (616 texts)"):
        absorb_meta(records, {"model": "m1", "editor": "rome", "second_moments": {"0": sources}})
    assert records.second_moments == {"m1": {"0": "wiki (616 texts); ROME statistics file x.npz (5 keys)"}}
