"""The BOS-stripped protocol (the collapse paper's A.2, ``--editsafety-strip-bos``): the tokenizer really drops BOS,
caches key on it, the certificate records it, the flags reach it, and on tiny-llama it shows what ``<s>`` hides."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pytest_editsafety.bos import OPTION, STRIPPED_SUFFIX, BosStripError, strip_bos
from pytest_editsafety.results import (
    BOS_NOT_LOADED,
    BOS_NOTHING_TO_STRIP,
    BOS_STRIPPED,
    MergeError,
    RecordError,
    RunMetadata,
    RunResult,
    merge,
)

TEXTS = ("Fimeth is a", "Everyone knows that the city of Paris", "x")


@pytest.fixture(scope="module")
def llama() -> tuple[Any, Any]:
    """tiny-llama as it runs by default and under the protocol (two loads: the tokenizer is switched in place)."""
    from pytest_editsafety.registry import LoadOptions, load_model

    return load_model("tiny-llama"), load_model("tiny-llama", LoadOptions(strip_bos=True))


def test_the_stripped_tokenizer_encodes_every_text_without_its_leading_bos(llama: tuple[Any, Any]) -> None:
    from pytest_editsafety.cases.classify import default_prepends_bos

    default, stripped = llama
    bos = default.tokenizer.bos_token_id
    for text in TEXTS:
        ids = default.tokenizer(text)["input_ids"]
        assert ids[0] == bos and stripped.tokenizer(text)["input_ids"] == ids[1:]
    # batches (the editors' and the metrics' path) and encode() too, not only single calls
    assert stripped.tokenizer(list(TEXTS))["input_ids"] == [default.tokenizer(t)["input_ids"][1:] for t in TEXTS]
    assert stripped.tokenizer.encode(TEXTS[0]) == default.tokenizer.encode(TEXTS[0])[1:]
    assert default_prepends_bos(default.tokenizer) and not default_prepends_bos(stripped.tokenizer)
    assert (default.bos_stripped, stripped.bos_stripped) == (False, True)


def test_a_stripped_model_has_its_own_identity_so_no_cache_mixes_the_protocols(llama: tuple[Any, Any]) -> None:
    from editors.stats import StatsKey
    from pytest_editsafety.trained import network_dir

    default, stripped = llama
    assert stripped.identity == default.identity + STRIPPED_SUFFIX
    # second moments, denominator floors and trained networks are all keyed by the identity: keys measured
    # without BOS are other keys, so none of them is reused across the protocols
    keys = [StatsKey(model_identity=m.identity, layer=0, module="m", n_samples=1, corpus="c", max_length=8)
            for m in llama]
    assert keys[0].digest() != keys[1].digest()
    need = SimpleNamespace(kind="mend", key={"layers": [4, 5]})
    assert network_dir(need, default.identity, "float32", Path("/c")) != network_dir(need, stripped.identity,
                                                                                      "float32", Path("/c"))


def test_the_hub_tags_llamas_subject_first_cases_hard_only_under_the_protocol() -> None:
    from pytest_editsafety.hub import HubOptions, ModelHub
    from pytest_editsafety.plan import build_plan

    plan = build_plan(["rome"], ["tiny-llama"], ["hard"])
    default, stripped = ModelHub(plan), ModelHub(plan, HubOptions(strip_bos=True))
    slug, cases = plan.models[0].slug, plan.case_sets[0].slug
    # behind <s> the subject is the second token: nothing is hard; without it every hard case is hard again
    assert not any(c.is_hard for c in default.cases(slug, cases).cases)
    assert all(c.is_hard for c in stripped.cases(slug, cases).cases)
    meta = stripped.meta(plan.items[0])
    assert meta["identity"].endswith(STRIPPED_SUFFIX) and meta["bos_protocol"] == BOS_STRIPPED
    assert "bos_protocol" not in default.meta(plan.items[0])


def test_a_tokenizer_without_bos_is_left_alone_and_keeps_its_identity() -> None:
    from pytest_editsafety.registry import LoadOptions, load_model

    default, option = load_model("tiny-gpt2"), load_model("tiny-gpt2", LoadOptions(strip_bos=True))
    assert option.identity == default.identity and option.bos_stripped is False
    for text in TEXTS:
        assert option.tokenizer(text)["input_ids"] == default.tokenizer(text)["input_ids"]


class _Encoding(dict):
    pass


class _NoSwitch:
    """A tokenizer that always prepends BOS 1 and offers no way to stop."""

    bos_token_id = 1
    bos_token = "<s>"

    def __call__(self, text: str, add_special_tokens: bool = True) -> _Encoding:
        ids = [ord(c) + 10 for c in text]
        return _Encoding(input_ids=[1, *ids] if add_special_tokens else ids)


class _BrokenSwitch(_NoSwitch):
    """A switch that does not take: the BOS stays."""

    add_bos_token = True


def test_a_tokenizer_that_cannot_stop_prepending_bos_is_an_error_naming_the_model_and_option() -> None:
    with pytest.raises(BosStripError, match=f"{OPTION}: model my-llama: .*no add_bos_token switch"):
        strip_bos(_NoSwitch(), "my-llama")
    with pytest.raises(BosStripError, match=f"{OPTION}: model my-llama: .*expected only the leading BOS 1 removed"):
        strip_bos(_BrokenSwitch(), "my-llama")


def test_the_api_strips_a_copy_and_leaves_the_callers_tokenizer_as_given(llama: tuple[Any, Any]) -> None:
    from pytest_editsafety.api_inputs import held_model as _held_model

    default, _ = llama
    held = _held_model(default.model, default.tokenizer, strip_bos=True)
    assert held.bos_stripped and held.identity.endswith(STRIPPED_SUFFIX)
    assert held.tokenizer is not default.tokenizer
    assert default.tokenizer("x")["input_ids"][0] == default.tokenizer.bos_token_id


# ---- the certificate ---------------------------------------------------------------------------------


def _metadata(**changes: Any) -> RunMetadata:
    base = dict(editors=("rome",), models={"tiny-llama": "abc+strip-bos", "tiny-gpt2": "def"}, hparams_hashes={},
                bounds={}, corpus="organism-ppl", corpus_sha256="0" * 64, library_versions={}, hardware="cpu",
                started="2026-12-02T00:00:00+00:00", finished="2026-12-02T00:01:00+00:00", duration_s=60.0,
                commands=("pytest --editsafety-strip-bos",))
    return RunMetadata(**{**base, **changes})


def test_the_protocol_is_recorded_and_read_back_and_absent_from_files_of_runs_without_it() -> None:
    used = _metadata(bos_protocol={"tiny-llama": BOS_STRIPPED, "tiny-gpt2": BOS_NOTHING_TO_STRIP})
    plain = used.to_dict()
    assert plain["bos_protocol"] == {"tiny-gpt2": BOS_NOTHING_TO_STRIP, "tiny-llama": BOS_STRIPPED}
    assert RunMetadata.from_dict(json.loads(json.dumps(plain))) == used
    # a run without the option writes the file it wrote before the field existed, and such a file still reads
    unused = _metadata().to_dict()
    assert "bos_protocol" not in unused and RunMetadata.from_dict(unused).bos_protocol == {}


def test_old_golden_files_still_read() -> None:
    golden = Path(__file__).parent / "golden" / "run.json"
    assert RunResult.from_dict(json.loads(golden.read_text()), source=str(golden)).metadata.bos_protocol == {}


@pytest.mark.parametrize("protocol, field", [({"tiny-llama": "removed"}, "bos_protocol.tiny-llama"),
                                             ({"gpt2-xl": BOS_STRIPPED}, "bos_protocol.gpt2-xl")])
def test_a_bad_protocol_entry_is_refused_naming_the_field(protocol: dict[str, str], field: str) -> None:
    with pytest.raises(RecordError) as err:
        _metadata(bos_protocol=protocol)
    assert err.value.field == field


def test_the_markdown_report_says_the_run_used_the_protocol() -> None:
    from pytest_editsafety.report import render_markdown

    used = RunResult(_metadata(bos_protocol={"tiny-llama": BOS_STRIPPED, "tiny-gpt2": BOS_NOTHING_TO_STRIP}))
    md = render_markdown(used)
    line = next(line for line in md.splitlines() if "BOS-stripped protocol" in line)
    assert "--editsafety-strip-bos" in line and "tiny-llama: its tokenizer's BOS removed" in line
    assert "tiny-gpt2: its tokenizer prepends no BOS" in line and "changed nothing" in line
    assert "BOS-stripped" not in render_markdown(RunResult(_metadata()))


def test_shards_merge_only_under_one_protocol() -> None:
    def run(protocol: dict[str, str]) -> RunResult:
        return RunResult(_metadata(bos_protocol=protocol))

    merged = merge([run({"tiny-llama": BOS_NOT_LOADED, "tiny-gpt2": BOS_NOTHING_TO_STRIP}),
                    run({"tiny-llama": BOS_STRIPPED, "tiny-gpt2": BOS_NOT_LOADED})])
    assert merged.metadata.bos_protocol == {"tiny-llama": BOS_STRIPPED, "tiny-gpt2": BOS_NOTHING_TO_STRIP}
    with pytest.raises(MergeError, match="ran the BOS-stripped protocol .* did not"):
        merge([run({}), run({"tiny-llama": BOS_STRIPPED, "tiny-gpt2": BOS_NOT_LOADED})])
    with pytest.raises(MergeError, match="'tiny-gpt2'"):
        merge([run({"tiny-llama": BOS_STRIPPED, "tiny-gpt2": BOS_NOTHING_TO_STRIP}),
               run({"tiny-llama": BOS_STRIPPED, "tiny-gpt2": BOS_STRIPPED})])


# ---- the switches ------------------------------------------------------------------------------------


def test_the_cli_switches_parse() -> None:
    from pytest_editsafety.cli import build_parser

    parser = build_parser()
    collapse = ["experiment", "collapse", "--model", "tiny-llama", "--editors", "rome"]
    assert parser.parse_args([*collapse, "--strip-bos"]).strip_bos is True
    assert parser.parse_args(collapse).strip_bos is False
    assert parser.parse_args(["guard", "--model", "m", "--editor", "rome", "--cases", "hard", "--strip-bos"]).strip_bos


def test_the_plugin_option_and_its_ini_twin_reach_the_settings(pytester: pytest.Pytester) -> None:
    from pytest_editsafety.plugin import get_settings

    assert get_settings(pytester.parseconfigure("--editsafety-strip-bos")).strip_bos is True
    assert get_settings(pytester.parseconfigure("--editor=rome")).strip_bos is False
    pytester.makeini("[pytest]\neditsafety_strip_bos = true\n")
    assert get_settings(pytester.parseconfigure()).strip_bos is True


def test_the_controller_records_what_the_protocol_did_to_each_planned_model() -> None:
    """What a worker's test metadata says reaches the certificate; a model no test loaded is "not loaded"."""
    import time
    from datetime import datetime, timezone

    from pytest_editsafety.bounds import Bounds
    from pytest_editsafety.controller import RunRecords, absorb_meta, build_result
    from pytest_editsafety.plan import build_plan
    from pytest_editsafety.results import Session

    plan = build_plan(["rome"], ["tiny-llama", "tiny-gpt2"], ["hard"], limit=1)
    session = Session(keyword="", markexpr="", shard=None, deselected=(), interrupted=None)

    def certificate(strip: bool, *metas: dict[str, Any]) -> RunResult:
        records = RunRecords(started=datetime.now(timezone.utc), t0=time.monotonic(), strip_bos=strip)
        for meta in metas:
            absorb_meta(records, meta)
        return build_result(plan, Bounds(), records, ("pytest",), session)

    llama = {"model": "tiny-llama", "editor": "rome", "identity": "abc" + STRIPPED_SUFFIX, "bos_protocol": BOS_STRIPPED}
    assert certificate(True, llama).metadata.bos_protocol == {"tiny-llama": BOS_STRIPPED, "tiny-gpt2": BOS_NOT_LOADED}
    assert certificate(False).metadata.bos_protocol == {}


# ---- what <s> hides --------------------------------------------------------------------------------


def test_on_tiny_llama_stripping_bos_moves_roms_hard_case_keys_to_position_0() -> None:
    """The direction of A.2 on the organism, from rome's keys alone (its denominator report, no edit): behind <s>
    a hard case's bare key is an ordinary later-position key, as consistent with its templated keys as a normal
    case's; without <s> it is the first token's key and less so (cos(kᵘ, k̄) and |uᵀkᵘ| fall).

    The perplexity damage the issue asks for does not follow on this organism (README, "The BOS-stripped
    protocol": hard median 1.02x, max 1.07x over all 48 cases), so it is not what this test pins."""
    from editors.base import EditRequest
    from pytest_editsafety.aggregates import median
    from pytest_editsafety.hub import HubOptions, ModelHub
    from pytest_editsafety.plan import build_plan

    plan = build_plan(["rome"], ["tiny-llama"], ["hard", "normal"])
    slug = plan.models[0].slug

    def keys(hub: ModelHub, set_slug: str) -> tuple[float, float]:
        loaded, editor = hub.loaded(slug), hub.prepared_editor(slug, "rome")
        reports = [editor.denominator(loaded.model, loaded.tokenizer, loaded.family,
                                      EditRequest(c.subject, c.prompt, c.target_new))
                   for c in hub.cases(slug, set_slug).cases[:CASES]]
        return median([r["key_cosine"] for r in reports]), median([r["denominator"] for r in reports])

    hard, normal = (s.slug for s in plan.case_sets)
    behind, stripped = ModelHub(plan), ModelHub(plan, HubOptions(strip_bos=True))
    (cos_behind, den_behind), (cos_stripped, den_stripped) = keys(behind, hard), keys(stripped, hard)
    cos_normal, _ = keys(stripped, normal)  # normal cases keep a context before the subject under either protocol
    assert cos_stripped < cos_behind and den_stripped < den_behind
    assert cos_stripped < cos_normal


CASES = 12
