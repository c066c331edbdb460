"""The Python API: ``certify`` is the plugin's code path with the caller's objects, ``guard`` refuses before
any weight moves (and, applying, rolls back bit-exactly)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytestmark = [pytest.mark.organism, pytest.mark.xdist_group("tiny-gpt2")]


@pytest.fixture(scope="module")
def organism():
    import torch

    from pytest_editsafety.registry import load_model

    torch.set_num_threads(1)
    return load_model("tiny-gpt2")


def _comparable(record):
    """A record without what names the run rather than the case (the model's slug is its directory here, its
    name there) and without its timing."""
    out = record.to_dict()
    for key in ("duration_s", "test_id", "model"):
        out.pop(key)
    return out


def test_certify_a_loaded_model_with_an_editor_object_equals_the_plugin(organism, tmp_path):
    from editors.registry import build_editor
    from pytest_editsafety.api import certify
    from pytest_editsafety.cases import resolve_cases
    from pytest_editsafety.organisms import hparams_keys
    from pytest_editsafety.results import from_json

    editor = build_editor("c-rome", hparams_keys(organism), organism.model)
    normal = resolve_cases("normal")
    cases = normal.with_cases(normal.cases[:3])  # a CaseSet in hand
    before = {name: p.detach().clone() for name, p in organism.model.named_parameters()}
    certificate = certify(organism.model, organism.tokenizer, editor, cases)
    assert certificate.certified and len(certificate.cases) == 3
    # the model is left as it was given
    assert all(bool((p == before[name]).all()) for name, p in organism.model.named_parameters())
    # the same records as the plugin's path: the model by name, the editor by its registered name
    by_name = certify("tiny-gpt2", None, "c-rome", "normal", limit=3)
    assert [_comparable(r) for r in certificate.cases] == [_comparable(r) for r in by_name.cases]
    # and the same JSON format: it reads back, and writes as the plugin writes
    assert from_json(certificate.to_json()).cases == certificate.result.cases
    certificate.write(tmp_path / "c.json", tmp_path / "c.md")
    assert "c-rome" in (tmp_path / "c.md").read_text()


def test_a_held_model_changed_in_memory_is_not_given_the_second_moments_of_its_original(organism, tmp_path):
    """A model object's identity names where its weights came from; C is kept under it plus the weights' digest,
    so a copy changed in memory (fine-tuned, edited) gets its own C, and the same weights find theirs again."""
    import torch

    from pytest_editsafety.api import certify
    from pytest_editsafety.cases import resolve_cases
    from pytest_editsafety.registry import load_model

    normal = resolve_cases("normal")
    one = normal.with_cases(normal.cases[:1])
    with_c = {"mom2_adjustment": True}
    cache = tmp_path / "cache"

    def stats_files() -> set[str]:
        return {p.name for p in (cache / "stats").glob("*.safetensors")}

    certify(organism.model, organism.tokenizer, "rome", one, hparams=with_c, cache_root=str(cache))
    original = stats_files()
    assert len(original) == 1
    changed = load_model("tiny-gpt2")
    with torch.no_grad():
        changed.model.transformer.h[0].mlp.c_fc.weight.mul_(3)  # the layer-0 keys are no longer the original's
    certify(changed.model, changed.tokenizer, "rome", one, hparams=with_c, cache_root=str(cache))
    assert len(stats_files()) == 2
    # the original's weights again: its C is found, not measured a third time
    certify(organism.model, organism.tokenizer, "rome", one, hparams=with_c, cache_root=str(cache))
    assert len(stats_files()) == 2


def test_certify_several_editors_in_one_run_gives_each_editors_own_records(organism):
    """One call for rome and c-rome (a name list and an object): the searches are shared, the records are each editor
    certified alone; per-editor hparams reach only the editor they name."""
    from editors.registry import build_editor
    from pytest_editsafety.api import certify
    from pytest_editsafety.organisms import hparams_keys

    c_rome = build_editor("c-rome", hparams_keys(organism), organism.model)
    together = certify(organism.model, organism.tokenizer, ["rome", c_rome], "hard", limit=2)
    assert sorted({record.editor for record in together.cases}) == ["c-rome", "rome"]
    for name in ("rome", "c-rome"):
        alone = certify(organism.model, organism.tokenizer, name, "hard", limit=2)
        assert ([_comparable(r) for r in together.cases if r.editor == name]
                == [_comparable(r) for r in alone.cases]), name
    same = certify("tiny-gpt2", None, "rome, c-rome", "hard", limit=1)
    assert sorted(record.editor for record in same.cases) == ["c-rome", "rome"]
    shorter = certify(organism.model, organism.tokenizer, ["rome", "c-rome"], "hard", limit=1,
                      hparams={"rome": {"v_num_grad_steps": 2}})
    hashes = shorter.result.metadata.hparams_hashes
    assert hashes["rome"] != together.result.metadata.hparams_hashes["rome"]
    assert hashes["c-rome"] == together.result.metadata.hparams_hashes["c-rome"]
    # the certificate names the mapping as the source of the one value it set, the built-in file of the rest
    model = next(iter(shorter.result.metadata.models))
    sources = shorter.result.metadata.hparams_sources["rome"][model]
    assert sources["v_num_grad_steps"] == "overrides"
    built_in = {label for key, label in sources.items() if key != "v_num_grad_steps"}
    assert built_in == {"editors/hparams/rome/tiny-gpt2.json"}
    # an editor object carries its own hyper-parameters: no file to name
    assert "c-rome" not in together.result.metadata.hparams_sources


def test_hparams_layer_files_and_named_sets_in_the_order_given():
    from pytest_editsafety.api_inputs import hparams_options

    layered = hparams_options(["kmeng01", Path("my.json")], {"rome": "rome"})
    assert layered == {"editor_hparams": {"rome": ("kmeng01", "my.json")}}
    per_editor = hparams_options({"rome": ("kmeng01",), "c-rome": "c.json"}, {"rome": "rome", "c-rome": "c-rome"})
    assert per_editor == {"editor_hparams": {"rome": ("kmeng01",), "c-rome": "c.json"}}


@pytest.mark.parametrize(("editor", "hparams", "message"), [
    (["rome", "rome"], None, "rome given more than once"),
    ([], None, "got none"),
    (["rome", "c-rome"], {"memit": {"layers": [0]}}, "memit is not one of rome, c-rome"),
    (["rome", "c-rome"], "rome.json", "expected a mapping from editor name"),
    (["rome", 3], None, "neither an editor name nor an editor object"),
    ([Path("rome")], None, "neither an editor name nor an editor object"),
    (["rome", "c-rome"], {"rome": 20}, r"hparams\['rome'\]: expected a JSON file or named set"),
    ("rome", 20, "a non-empty sequence of them, or a mapping of fields; got int"),
    ("rome", [], "a non-empty sequence of them"),
    ("rome", ["kmeng01", {"v_lr": 0.1}], "a non-empty sequence of them"),
])
def test_certify_refuses_a_bad_editor_list_before_loading_anything(editor, hparams, message):
    from pytest_editsafety.api import certify

    with pytest.raises(ValueError, match=message):
        certify("tiny-gpt2", None, editor, "normal", hparams=hparams)


def test_hparams_never_reach_an_editor_given_as_an_object(organism):
    from editors.registry import build_editor
    from pytest_editsafety.api import certify
    from pytest_editsafety.organisms import hparams_keys

    c_rome = build_editor("c-rome", hparams_keys(organism), organism.model)
    for editors, hparams in ((c_rome, {"v_num_grad_steps": 2}), (["rome", c_rome], {"c-rome": {"v_num_grad_steps": 2}})):
        with pytest.raises(ValueError, match="given as an (editor )?object"):
            certify(organism.model, organism.tokenizer, editors, "hard", limit=1, hparams=hparams)


def test_one_editor_takes_the_per_editor_form_too(organism):
    from pytest_editsafety.api import certify

    plain = certify(organism.model, organism.tokenizer, "rome", "hard", limit=1, hparams={"v_num_grad_steps": 2})
    per_editor = certify(organism.model, organism.tokenizer, ["rome"], "hard", limit=1,
                         hparams={"rome": {"v_num_grad_steps": 2}})
    assert plain.result.metadata.hparams_hashes == per_editor.result.metadata.hparams_hashes
    assert [_comparable(r) for r in plain.cases] == [_comparable(r) for r in per_editor.cases]


def test_guard_judges_one_editor():
    from pytest_editsafety.api import guard

    with pytest.raises(ValueError, match="guard judges the edits of one editor"):
        guard("tiny-gpt2", None, "rome,c-rome", [])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"fraction": math.nan}, "fraction: expected a finite number >= 0, got nan"),
    ({"fraction": math.inf}, "fraction: expected a finite number >= 0, got inf"),
    ({"fraction": -1.0}, "fraction: expected a finite number >= 0"),
    ({"max_ppl_ratio": -1.0}, "max_ppl_ratio: expected a finite number >= 0"),
    ({"floor": math.inf}, "floor: expected None or a finite number >= 0"),
    ({"interference_factor": -2.0}, "interference_factor: expected None or a finite number >= 0"),
    ({"interference_factor": "high"}, "interference_factor: expected None or a finite number >= 0"),
    ({"max_ppl_ratio": math.nan}, "max_ppl_ratio: expected a finite number >= 0 or inf, got nan"),
    ({"probe_texts": 0}, "probe_texts: expected an integer >= 1, got 0"),
])
def test_guard_refuses_a_bound_no_edit_could_be_judged_by_before_loading_anything(kwargs, message):
    from pytest_editsafety.api import guard

    with pytest.raises(ValueError, match=message):
        guard("no-such-model-is-loaded", None, "rome", [], **kwargs)


def test_guard_and_certify_take_one_case_and_name_a_request_of_the_wrong_kind(organism):
    from pytest_editsafety.api import certify, guard
    from pytest_editsafety.cases import resolve_cases

    case = resolve_cases("normal").cases[0]
    (decision,) = guard(organism.model, organism.tokenizer, "rome", case)
    assert decision.subject == case.subject
    assert len(certify(organism.model, organism.tokenizer, "rome", case).cases) == 1
    as_dict = {"subject": case.subject, "prompt": case.prompt, "target_new": case.target_new}
    with pytest.raises(ValueError, match=r"requests\[0\]: expected an EditRequest or an EditCase, got dict"):
        guard(organism.model, organism.tokenizer, "rome", [as_dict])
    with pytest.raises(ValueError, match="limit: expected None or an integer >= 1, got 0"):
        certify(organism.model, organism.tokenizer, "rome", case, limit=0)


def test_second_moments_over_the_scored_texts_are_warned_about(organism, caplog):
    """C taken from the perplexity corpus itself (organism-ppl): the run says so, once, with the count; every
    certificate says where its C came from."""
    import logging

    from pytest_editsafety.api import certify

    from pytest_editsafety.report.markdown import render

    with caplog.at_level(logging.WARNING, logger="pytest_editsafety.hub"):
        scored = certify(organism.model, organism.tokenizer, "rome", "normal", limit=1, stats_corpus="organism-ppl",
                         bounds={"min_denominator_fraction": 0})
    warned = [r.getMessage() for r in caplog.records if "second moments C are taken from" in r.getMessage()]
    assert len(warned) == 1
    assert "taken from organism-ppl, which is the perplexity corpus itself: an update whitened by C" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pytest_editsafety.hub"):  # the default: organism-wiki, apart
        apart = certify(organism.model, organism.tokenizer, "rome", "normal", limit=1,
                        bounds={"min_denominator_fraction": 0})
    assert not [r for r in caplog.records if "second moments C are taken from" in r.getMessage()]
    # each certificate says where its C came from: the corpus, its hash, the texts and keys behind it
    for certificate, corpus, texts in ((scored, "organism-ppl", 500), (apart, "organism-wiki", 616)):
        ((model, layers),) = certificate.result.metadata.second_moments.items()
        assert list(layers) == ["0"] and layers["0"].startswith(f"{corpus} (sha256 ")
        assert f", {texts} texts, " in layers["0"] and layers["0"].endswith(" keys)")
        report = render(certificate.result, baseline=None, regressions=(), plot_links={}, plot_note=None)
        assert f"- **Second moments C:** {model} layer 0: {corpus} (sha256 " in report


def test_certify_raises_a_setting_that_does_not_fit_the_model_naming_where_it_came_from(organism, tmp_path):
    import re

    from editors.hparams import HparamsError, UnknownHparamsKeyError
    from pytest_editsafety.api import certify

    with pytest.raises(HparamsError, match="^layer from overrides: layer 99 is out of range for a model with 6"):
        certify(organism.model, organism.tokenizer, "rome", "normal", hparams={"layer": 99})
    deep = tmp_path / "deep.json"
    deep.write_text('{"layer": 17}')
    with pytest.raises(HparamsError, match=f"layer from {re.escape(str(deep))}: layer 17 is out of range"):
        certify(organism.model, organism.tokenizer, "rome", "normal", hparams=str(deep))
    with pytest.raises(UnknownHparamsKeyError, match="unknown hyper-parameter 'layerz'"):
        certify(organism.model, organism.tokenizer, "rome", "normal", hparams={"layerz": 3})


def test_certify_refuses_an_unknown_editor_name_before_loading_anything():
    from pytest_editsafety.api import certify

    with pytest.raises(ValueError, match="unknown editor 'no-such-editor'"):
        certify("tiny-gpt2", None, "no-such-editor", "normal")


def test_guard_refuses_small_denominators_and_rolls_back_a_damaging_edit(organism):
    from editors.restore import model_digest
    from pytest_editsafety.api import guard
    from pytest_editsafety.cases import resolve_cases

    hard = resolve_cases("hard").cases[:6]
    decisions = guard(organism.model, organism.tokenizer, "rome", hard)
    assert len(decisions) == 6
    for d in decisions:
        assert d.subject_first and d.floor is not None and d.floor > 0 and d.interference_limit > 0
        assert d.allowed == (d.denominator >= d.floor and d.measures["interference"] <= d.interference_limit), d
        assert "key_cosine" in d.measures and not d.applied
    # an impossible perplexity bound: every applied edit is rolled back, bit-exactly
    digest = model_digest(organism.model)
    applied = guard(organism.model, organism.tokenizer, "rome", resolve_cases("normal").cases[:2], apply=True,
                    max_ppl_ratio=0.0, probe_texts=8)
    assert all(not d.allowed and not d.applied and "rolled back" in d.reason for d in applied)
    assert all(d.ppl_ratio is not None and math.isfinite(d.ppl_ratio) for d in applied)
    assert model_digest(organism.model) == digest


def test_a_guard_built_once_decides_as_guard_does_and_then_measures_only_the_requests(organism, monkeypatch):
    """A platform judging edit after edit: the editor's set-up and the floor's reference cases are paid once, when
    the Guard is built; each check asks the editor for the requests' own reports and nothing more."""
    from editors.registry import build_editor
    from pytest_editsafety.api import Guard, guard
    from pytest_editsafety.cases import resolve_cases
    from pytest_editsafety.organisms import hparams_keys

    rome = build_editor("rome", hparams_keys(organism), organism.model)
    asked = []
    report = rome.denominator
    monkeypatch.setattr(rome, "denominator", lambda *args: asked.append(args[-1].subject) or report(*args))
    hard = resolve_cases("hard").cases[:3]
    gate = Guard(organism.model, organism.tokenizer, rome)
    at_set_up = len(asked)
    assert at_set_up >= 40  # the normal reference cases the floor is the median of
    first, second = gate.check(hard), gate.check(hard[0])
    assert asked[at_set_up:] == [c.subject for c in hard] + [hard[0].subject]
    assert gate.floor > 0 and gate.interference_limit > 0
    once = guard(organism.model, organism.tokenizer, "rome", hard)
    assert [d.allowed for d in first] == [d.allowed for d in once] and second[0].allowed == first[0].allowed
    for mine, theirs in zip(first, once):
        assert mine.floor == pytest.approx(theirs.floor, rel=1e-6) == gate.floor
        assert mine.denominator == pytest.approx(theirs.denominator, rel=1e-6)


def test_an_applying_check_that_refuses_every_request_measures_nothing_more(organism, monkeypatch):
    """No whole-model checksum for a call whose requests are all refused, and no probe perplexity but the
    reference, which the first applying check measures whatever it decides; a call that allows an edit pays both
    before its first edit (here rolled back by an impossible bound)."""
    import editors.fingerprint
    from editors.restore import model_digest
    from pytest_editsafety.api import Guard
    from pytest_editsafety.cases import resolve_cases

    digest = model_digest(organism.model)
    refusing = Guard(organism.model, organism.tokenizer, "rome", floor=1e9, probe_texts=8)
    probes, fingerprints = [], []
    monkeypatch.setattr(refusing, "_probe_perplexity", lambda texts: probes.append(len(texts)) or 10.0)
    taken = editors.fingerprint.ModelFingerprint.of
    monkeypatch.setattr(editors.fingerprint.ModelFingerprint, "of",
                        staticmethod(lambda *args: fingerprints.append(1) or taken(*args)))
    decisions = refusing.check(resolve_cases("normal").cases[:3], apply=True)
    assert [d.allowed for d in decisions] == [False] * 3 and (probes, fingerprints) == ([8], [])
    assert refusing.probe_reference == 10.0
    refusing.check(resolve_cases("normal").cases[3:5], apply=True)
    assert (probes, fingerprints) == ([8], [])  # nothing more
    probes.clear()
    allowing = Guard(organism.model, organism.tokenizer, "rome", max_ppl_ratio=0.0, probe_texts=8)
    monkeypatch.setattr(allowing, "_probe_perplexity", lambda texts: probes.append(len(texts)) or 10.0 + len(probes))
    fingerprints.clear()  # building a Guard fingerprints the model it holds (the pool's restore check)
    (decision,) = allowing.check(resolve_cases("normal").cases[0], apply=True)
    assert "rolled back" in decision.reason and probes == [8, 8] and fingerprints == [1]
    assert model_digest(organism.model) == digest


def test_guard_refuses_an_edit_that_reaches_ordinary_text_though_its_denominator_is_ordinary(organism):
    """With C from generic text that names no subject (organism-heldout), normal-0010 divides by more than the
    normal median, yet its u lies along keys the organism's ordinary text uses: its interference is above the
    limit, and certification fails it on perplexity. (With the default C, organism-wiki, which names the
    subjects, u stays off ordinary text's keys and the edit certifies.)"""
    heldout = {"stats_corpus": "organism-heldout"}
    from pytest_editsafety.api import GUARD_INTERFERENCE_FACTOR as FACTOR, certify, guard
    from pytest_editsafety.cases import resolve_cases

    normal = resolve_cases("normal")
    reaching, ordinary = normal.by_id("normal-0010"), normal.by_id("normal-0001")
    decisions = guard(organism.model, organism.tokenizer, "rome", [reaching, ordinary], **heldout)
    refused, allowed = decisions
    median = refused.interference_limit / FACTOR
    assert refused.denominator > 2 * refused.floor  # above the normal median: no floor refuses it
    assert not refused.allowed and refused.reason.startswith("interference")
    assert refused.measures["interference"] > FACTOR * median
    assert allowed.allowed and allowed.measures["interference"] < median
    # without the interference check it passes (None and 0 both turn it off); a negative factor is refused
    for off in (None, 0):
        assert all(d.allowed and d.interference_limit is None
                   for d in guard(organism.model, organism.tokenizer, "rome", [reaching], interference_factor=off,
                         **heldout))
    with pytest.raises(ValueError, match="interference_factor"):
        guard(organism.model, organism.tokenizer, "rome", [reaching], interference_factor=-1.0, **heldout)
    # and the edit does what the guard feared
    record = certify(organism.model, organism.tokenizer, "rome", normal.with_cases((reaching,)), **heldout).cases[0]
    assert any("perplexity" in v for v in record.violations), record.violations
    # the certification's record carries the same interference, measured as the edit is made
    assert record.metrics["interference"] == pytest.approx(refused.measures["interference"], rel=1e-5)


def test_a_rome_editor_without_ordinary_text_reports_no_interference(organism):
    from editors.provision import SimpleProvider, set_up
    from editors.registry import build_editor
    from editors.base import EditRequest
    from pytest_editsafety.organisms import hparams_keys

    import torch

    request = EditRequest("Vosa", "{} lives in", "Paris")
    reports = []
    for texts in ((), ("Ordinary text about nothing in particular.", "More of it.")):
        editor = build_editor("rome", hparams_keys(organism), organism.model)
        layer = editor.hparams.layer
        d_in = organism.family.get_module(organism.model, organism.family.layer_name("mlp_out", layer)).weight.shape[0]
        provided = set_up(editor, organism.model, organism.tokenizer, organism.family,
                          SimpleProvider(organism.model, organism.tokenizer, ordinary_texts=texts,
                                         second_moments={layer: torch.eye(d_in)}))
        assert provided.ordinary_texts == texts
        reports.append(editor.denominator(organism.model, organism.tokenizer, organism.family, request))
    assert "interference" not in reports[0]
    assert reports[1]["interference"] > 0 and reports[1]["denominator"] == reports[0]["denominator"]

    class ProviderOfBefore:  # written before ordinary text was a need: no ordinary_texts method
        identity = ""

        def second_moment(self, layer, n_samples):
            return torch.eye(d_in)

        def context_templates(self, recipe):
            return editor.context_templates

    older = build_editor("rome", hparams_keys(organism), organism.model)
    assert set_up(older, organism.model, organism.tokenizer, organism.family, ProviderOfBefore()).ordinary_texts == ()
    assert "interference" not in older.denominator(organism.model, organism.tokenizer, organism.family, request)


def test_guard_command_exits_1_when_an_edit_is_refused_and_prints_one_decision_per_request(tmp_path):
    import json
    import subprocess
    import sys

    from pytest_editsafety.cases import dump_cases, resolve_cases

    hard, normal = resolve_cases("hard"), resolve_cases("normal")
    # the hard case with the smallest denominator the organism has, and an ordinary normal case
    mixed = normal.with_cases((hard.by_id("hard-0000"), normal.cases[0]))
    path = dump_cases(mixed, tmp_path / "mixed.json")
    done = subprocess.run([sys.executable, "-m", "pytest_editsafety", "guard", "--model", "tiny-gpt2", "--editor",
                           "rome", "--cases", str(path), "--floor", "1.0", "--json"],
                          capture_output=True, text=True, timeout=600)
    payload = json.loads(done.stdout)
    assert len(payload["decisions"]) == 2
    # hard-0000 divides by |uᵀk| ~0.87 on tiny-gpt2, an ordinary normal case by ~2.5
    assert [d["allowed"] for d in payload["decisions"]] == [False, True]
    assert done.returncode == 1
    refused = payload["decisions"][0]
    assert refused["floor"] == 1.0 and refused["subject_first"] and "< floor 1" in refused["reason"]


def _nudge_editor(scale: float, *, fail_after: int | None = None):
    """An editor object that adds the same seeded random matrix, times ``scale``, to layer 0's MLP output
    projection at every edit (each edit small, their sum not), raising instead after ``fail_after`` edits."""
    import torch

    from editors.base import EditOutcome, EditorBase

    class Nudge(EditorBase):
        name = "nudge"
        hparams = {}
        made = 0

        def parameters_touched(self, model, family):
            return (family.layer_name("mlp_out", 0) + ".weight",)

        def apply(self, model, tokenizer, family, requests):
            if fail_after is not None and self.made == fail_after:
                raise RuntimeError("the editor failed on this request")
            weight = family.get_module(model, family.layer_name("mlp_out", 0)).weight
            noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                weight.add_(scale * noise)
            self.made += 1
            return EditOutcome(edited=self.parameters_touched(model, family))

    return Nudge()


def test_a_guard_bounds_what_its_kept_edits_do_together(organism):
    """Each nudge moves the probe perplexity by a few percent; the guard keeps them until together they pass
    max_ppl_ratio against its reference, and refuses the one that would, though alone it is small."""
    import copy

    from pytest_editsafety.api import Guard
    from pytest_editsafety.cases import resolve_cases

    model = copy.deepcopy(organism.model)
    gate = Guard(model, organism.tokenizer, _nudge_editor(0.02), max_ppl_ratio=1.2, probe_texts=16)
    decisions = gate.check(resolve_cases("normal").cases[:10], apply=True)
    kept = [d for d in decisions if d.applied]
    refused = [d for d in decisions if not d.applied]
    assert kept and refused and decisions[: len(kept)] == tuple(kept)  # kept until the bound, then refused
    assert all(d.ppl_ratio_total <= 1.2 for d in kept)
    assert all(d.ppl_ratio < 1.2 < d.ppl_ratio_total and "rolled back" in d.reason for d in refused)
    assert kept[-1].ppl_ratio_total == pytest.approx(
        math.prod(d.ppl_ratio for d in kept), rel=1e-6)  # each edit's ratio is against the one before it
    assert gate.probe_reference is not None


def test_a_check_that_fails_midway_leaves_none_of_its_edits_in_the_model(organism):
    import copy

    from editors.restore import model_digest
    from pytest_editsafety.api import Guard
    from pytest_editsafety.cases import resolve_cases

    model = copy.deepcopy(organism.model)
    digest = model_digest(model)
    gate = Guard(model, organism.tokenizer, _nudge_editor(0.001, fail_after=2), max_ppl_ratio=math.inf,
                 probe_texts=4)
    with pytest.raises(RuntimeError, match="failed on this request"):
        gate.check(resolve_cases("normal").cases[:3], apply=True)  # two edits kept, then the error
    assert model_digest(model) == digest


def test_guard_refuses_an_edit_too_long_for_the_context_and_judges_the_rest(organism):
    from editors.base import EditRequest
    from pytest_editsafety.api import guard
    from pytest_editsafety.cases import resolve_cases

    too_long = EditRequest("Fimeth " * 40, "{} lives in", "Athens")  # the organism's context is 32 tokens
    ordinary = resolve_cases("normal").cases[0]
    refused, judged = guard(organism.model, organism.tokenizer, "rome", [too_long, ordinary])
    assert not refused.allowed and refused.denominator is None
    assert "more than the model's context of 32" in refused.reason
    assert judged.denominator is not None


def test_a_guard_judges_a_model_in_train_mode_with_dropout_as_in_eval_mode(organism):
    """Keys measured with dropout on would differ at every call: the floor and every report are measured
    without it, whatever mode the caller's model is in, and the mode comes back."""
    import copy

    import torch

    from pytest_editsafety.api import Guard
    from pytest_editsafety.cases import resolve_cases

    model = copy.deepcopy(organism.model)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.1  # GPT-2's own; the organism trains without it
    case = resolve_cases("hard").cases[0]
    reference = Guard(model.eval(), organism.tokenizer, "rome")
    expected = reference.check(case)[0].denominator
    model.train()
    gate = Guard(model, organism.tokenizer, "rome")
    assert gate.floor == pytest.approx(reference.floor, rel=1e-6)
    assert [gate.check(case)[0].denominator for _ in range(3)] == pytest.approx([expected] * 3, rel=1e-6)
    assert model.training


@pytest.mark.parametrize(("call", "message"), [
    (lambda m, t: __import__("pytest_editsafety.api").api.guard(m, t, "rome", [], dtype="bfloat16"),
     "dtype: a model you hold runs in its own dtype"),
    (lambda m, t: __import__("pytest_editsafety.api").api.guard("tiny-gpt2", t, "rome", []),
     "tokenizer: model 'tiny-gpt2' is given by name and loads its own tokenizer"),
    (lambda m, t: __import__("pytest_editsafety.api").api.guard(m, "gpt2", "rome", []),
     "tokenizer: expected the model's tokenizer object"),
    (lambda m, t: __import__("pytest_editsafety.api").api.certify(object(), t, "rome", "normal"),
     "model: expected a model name or a transformers model"),
    (lambda m, t: __import__("pytest_editsafety.api").api.certify(m, t, "rome", "normal", bounds={"max_ppl": 2}),
     "max_ppl"),
    (lambda m, t: __import__("pytest_editsafety.api").api.certify(m, t, "rome", "normal", bounds=2.0),
     "bounds: expected None, a pytest_editsafety.bounds.Bounds or a mapping"),
    (lambda m, t: __import__("pytest_editsafety.api").api.guard(m, t, "rome", {"subject": "x"}),
     r"requests: a mapping is not a request; pass EditRequest\(\*\*it\)"),
])
def test_an_argument_the_api_cannot_use_is_an_error_naming_it(organism, call, message):
    with pytest.raises(ValueError, match=message):
        call(organism.model, organism.tokenizer)


def test_a_guard_decision_holds_plain_numbers_whatever_numbers_it_was_given(organism):
    import json

    import numpy as np

    from pytest_editsafety.api import guard
    from pytest_editsafety.cases import resolve_cases

    (decision,) = guard(organism.model, organism.tokenizer, "rome", resolve_cases("normal").cases[0],
                        fraction=np.float32(0.5), interference_factor=np.float64(1.75))
    assert type(decision.floor) is float and type(decision.interference_limit) is float
    json.dumps(decision.to_dict())


def _undeclared_editor(returns_outcome: bool = True, layers: tuple[int, ...] = (0, 1)):
    """An editor object that declares layer 0's MLP output projection and writes those of ``layers`` (by default
    layer 1's too, which it does not declare)."""
    import torch

    from editors.base import EditOutcome, EditorBase

    class Undeclared(EditorBase):
        name = "undeclared"
        hparams = {}

        def parameters_touched(self, model, family):
            return (family.layer_name("mlp_out", 0) + ".weight",)

        def apply(self, model, tokenizer, family, requests):
            with torch.no_grad():
                for layer in layers:
                    family.get_module(model, family.layer_name("mlp_out", layer)).weight.mul_(1.01)
            return EditOutcome(edited=self.parameters_touched(model, family)) if returns_outcome else None

    return Undeclared()


def test_an_editor_that_changes_a_model_you_hold_beyond_restoring_is_an_error_naming_the_tensor(organism):
    """The plugin reloads a model an editor changed outside what it declares; a model you hold cannot be
    reloaded, so certify and a guard that applies raise rather than hand back a model that is not the one given."""
    import copy

    from pytest_editsafety.api import Guard, HeldModelChangedError, certify
    from pytest_editsafety.cases import resolve_cases

    with pytest.raises(HeldModelChangedError, match=r"changed transformer\.h\.1\.mlp\.c_proj\.weight \(values\), "
                                                    r"which it does not declare.*load the model afresh"):
        certify(copy.deepcopy(organism.model), organism.tokenizer, _undeclared_editor(), "normal", limit=2)
    gate = Guard(copy.deepcopy(organism.model), organism.tokenizer, _undeclared_editor(), probe_texts=4)
    with pytest.raises(HeldModelChangedError, match=r"transformer\.h\.1\.mlp\.c_proj\.weight.*keeps those changes"):
        gate.check(resolve_cases("normal").cases[0], apply=True)
    with pytest.raises(HeldModelChangedError, match="build a new Guard"):  # it judges that model no more
        gate.check(resolve_cases("normal").cases[1])


def test_an_apply_that_returns_no_edit_outcome_is_an_error_saying_what_it_must_return(organism):
    import copy

    from pytest_editsafety.api import certify

    (record,) = certify(copy.deepcopy(organism.model), organism.tokenizer, _undeclared_editor(returns_outcome=False, layers=(0,)),
                        "normal", limit=1).cases
    assert record.outcome == "error"
    assert "apply() returned NoneType; it must return an editors.base.EditOutcome" in record.violations[0]


def test_guard_undoes_an_edit_that_raises_midway(organism):
    import torch

    from editors.base import EditorBase
    from editors.restore import model_digest
    from pytest_editsafety.api import guard
    from pytest_editsafety.cases import resolve_cases

    class HalfEdit(EditorBase):
        name = "half-edit"
        hparams = {}

        def parameters_touched(self, model, family):
            return (family.layer_name("mlp_out", 0) + ".weight",)

        def apply(self, model, tokenizer, family, requests):
            weight = family.get_module(model, family.layer_name("mlp_out", 0)).weight
            with torch.no_grad():
                weight.mul_(3.0)
            raise RuntimeError("out of memory halfway through the edit")

    digest = model_digest(organism.model)
    with pytest.raises(RuntimeError, match="halfway"):
        guard(organism.model, organism.tokenizer, HalfEdit(), resolve_cases("normal").cases[:1], apply=True,
              probe_texts=4)
    assert model_digest(organism.model) == digest


def test_a_model_built_in_memory_is_known_by_its_weights(organism):
    import copy

    from pytest_editsafety.api_inputs import held_model as _held_model

    clone = copy.deepcopy(organism.model)
    clone.config._name_or_path = ""
    del clone.config.editsafety_recipe_hash  # no longer recognisable as an organism either
    held = _held_model(clone, organism.tokenizer)
    assert held.identity.startswith(type(clone).__name__ + ":") and len(held.identity.split(":")[1]) == 32
