"""A search batch (--editsafety-search-batch): the edit searches of several single-edit cases (ROME's v*, MEMIT's
z; an editor's prepare()) run together on the unedited model, each case then applied, measured and restored alone.
The records are the ones each case measures alone, to float rounding; the batch takes only cases the run selected,
of the same (editor, model, case set); a batch that fails leaves each case to run alone."""

from __future__ import annotations

import logging
import math

import pytest

from editors.base import EditorBase, EditOutcome, EditRequest, prepare_requests
from pytest_editsafety.hub import HubOptions, ModelHub
from pytest_editsafety.preparation import CPU_SEARCH_BATCH, GPU_SEARCH_BATCH, default_search_batch
from pytest_editsafety.model_pool import ModelState
from pytest_editsafety.plan import build_plan
from tests.test_plugin import isolated, one_torch_thread  # noqa: F401  (fixtures, used by name)


def test_the_default_batches_on_a_gpu_and_not_on_a_cpu() -> None:
    assert default_search_batch("cuda:0") == GPU_SEARCH_BATCH > 1
    assert default_search_batch("cpu") == default_search_batch(None) == CPU_SEARCH_BATCH == 1
    with pytest.raises(ValueError, match="search_batch"):
        HubOptions(search_batch=0)


def test_an_editor_that_only_follows_the_protocol_prepares_nothing() -> None:
    class Protocol:
        name = "protocol-only"

    assert prepare_requests(Protocol(), None, None, None, [EditRequest("A", "{} is", "B")]) == {}
    assert EditorBase().prepare(None, None, None, [EditRequest("A", "{} is", "B")]) == {}


def _hub(run_order=None) -> ModelHub:
    plan = build_plan(["rome", "memit"], ["tiny-gpt2"], ["hard", "normal"], limit=5)
    return ModelHub(plan, HubOptions(search_batch=4), run_order=run_order)


def test_a_batch_takes_the_next_cases_of_its_editor_and_case_set() -> None:
    hub = _hub()
    state = ModelState("tiny-gpt2")
    first = hub.plan.item("rome-tiny-gpt2-hard-0000")
    assert [i.case_id for i in hub._preparations.next_cases(state, first, 3)] == ["hard-0001", "hard-0002", "hard-0003"]
    # the set's last cases: the batch ends with the set, not in the next set or editor
    fourth = hub.plan.item("rome-tiny-gpt2-hard-0003")
    assert [i.case_id for i in hub._preparations.next_cases(state, fourth, 3)] == ["hard-0004"]
    # a case already searched is not searched again
    state.prepared[("rome", "hard", "hard-0001")] = {}
    assert [i.case_id for i in hub._preparations.next_cases(state, first, 2)] == ["hard-0002", "hard-0003"]


def test_a_batch_takes_only_the_cases_the_run_selected() -> None:
    selected = ["rome-tiny-gpt2-hard-0001", "rome-tiny-gpt2-hard-0003", "memit-tiny-gpt2-hard-0000"]
    hub = _hub(run_order=selected)
    state = ModelState("tiny-gpt2")
    assert [i.case_id for i in hub._preparations.next_cases(state, hub.plan.item(selected[0]), 3)] == ["hard-0003"]
    # a case the run does not hold in its order (an ad hoc fuzz case) is searched alone
    assert hub._preparations.next_cases(state, hub.plan.item("rome-tiny-gpt2-hard-0000"), 3) == []


def test_the_plugin_hands_the_hub_the_selected_tests_in_order(isolated: pytest.Pytester) -> None:
    from pytest_editsafety.plugin import run_order

    class Selection:
        order: list[str] = []

        def pytest_collection_finish(self, session: pytest.Session) -> None:
            self.order = run_order(session.items)

    selection = Selection()
    isolated.inline_run("--collect-only", "--editor=rome", "--cases=hard", "--editsafety-limit=4", "-k",
                        "hard-0003 or hard-0001", plugins=[selection])
    assert selection.order == ["rome-tiny-gpt2-hard-0001", "rome-tiny-gpt2-hard-0003"]


def test_a_bad_search_batch_is_a_usage_error_naming_the_option(isolated: pytest.Pytester) -> None:
    result = isolated.runpytest("--editsafety-search-batch=0")
    assert result.ret == pytest.ExitCode.USAGE_ERROR, (result.ret, result.stdout.str()[-3000:])
    assert "--editsafety-search-batch: must be at least 1, got 0" in result.stderr.str(), result.stderr.str()[-2000:]


def _same_records(alone, together) -> None:
    assert [r.case_id for r in alone] == [r.case_id for r in together]
    for a, b in zip(alone, together):
        assert (a.certified, a.collapse, a.violations) == (b.certified, b.collapse, b.violations), a.case_id
        assert set(a.metrics) == set(b.metrics)
        for key, value in a.metrics.items():
            if value is None or (isinstance(value, float) and math.isnan(value)):
                assert b.metrics[key] is None or math.isnan(b.metrics[key]), key
            else:
                assert math.isclose(b.metrics[key], value, rel_tol=1e-5, abs_tol=1e-6), (a.case_id, key)


@pytest.mark.organism
@pytest.mark.xdist_group("tiny-gpt2")
@pytest.mark.parametrize(("editor", "cases"), [("rome", "hard"), ("memit", "normal")])
def test_a_search_batch_certifies_what_each_case_alone_does(editor: str, cases: str, one_torch_thread) -> None:
    from pytest_editsafety.api import certify

    alone = certify("tiny-gpt2", None, editor, cases, limit=4, search_batch=1)
    together = certify("tiny-gpt2", None, editor, cases, limit=4, search_batch=3)
    _same_records(alone.cases, together.cases)


class _BatchRefusingRome(EditorBase):
    """ROME (the organism's own), whose searches of more than one request fail with ``error``."""

    def __init__(self, rome, error: Exception) -> None:
        self.rome = rome
        self.name = rome.name
        self.hparams = rome.hparams
        self.error = error
        self.batches: list[int] = []

    def needs(self, model, family):
        return self.rome.needs(model, family)

    def setup(self, model, tokenizer, family, provided) -> None:
        self.rome.setup(model, tokenizer, family, provided)

    def parameters_touched(self, model, family):
        return self.rome.parameters_touched(model, family)

    def denominator(self, model, tokenizer, family, request):
        return self.rome.denominator(model, tokenizer, family, request)

    def prepare(self, model, tokenizer, family, requests):
        self.batches.append(len(requests))
        if len(requests) > 1:
            raise self.error
        return self.rome.prepare(model, tokenizer, family, requests)

    def apply(self, model, tokenizer, family, requests) -> EditOutcome:
        return self.rome.apply(model, tokenizer, family, requests)


class OutOfMemoryError(RuntimeError):
    """Named as torch.cuda's: the hub tells it by name (it imports no torch)."""


@pytest.mark.organism
@pytest.mark.xdist_group("tiny-gpt2")
@pytest.mark.parametrize(("error", "batches"), [
    (RuntimeError("a case the batch could not take"), [3, 1]),  # that batch's cases alone, the next batch tried
    (OutOfMemoryError("CUDA out of memory (simulated)"), [3]),  # no batch of that editor again
])
def test_a_failed_search_batch_leaves_its_cases_to_run_alone(one_torch_thread, caplog, error, batches) -> None:
    from editors.registry import build_editor
    from pytest_editsafety.api import certify
    from pytest_editsafety.organisms import hparams_keys
    from pytest_editsafety.registry import load_model

    loaded = load_model("tiny-gpt2")
    editor = _BatchRefusingRome(build_editor("rome", hparams_keys(loaded), loaded.model), error)
    with caplog.at_level(logging.WARNING, logger="pytest_editsafety.preparation"):
        certificate = certify(loaded.model, loaded.tokenizer, editor, "hard", limit=4, search_batch=3)
    # each batch tried once; its cases then measured alone by apply(), the last case (a batch of one) prepared
    assert editor.batches == batches
    assert [record.outcome != "error" for record in certificate.cases] == [True] * 4
    assert f"the search batch of 3 cases failed ({type(error).__name__}: {error})" in caplog.text


@pytest.mark.organism
@pytest.mark.xdist_group("tiny-gpt2")
def test_the_batchs_searches_are_the_ones_its_cases_apply(one_torch_thread, monkeypatch) -> None:
    """One search of three requests before the first case; no case searches again when it is applied."""
    import editors.rome
    from pytest_editsafety.api import certify

    calls: list[int] = []
    real = editors.rome.search_value_deltas

    def counting(model, tokenizer, family, hp, contexts, requests, out_bares):
        calls.append(len(requests))
        return real(model, tokenizer, family, hp, contexts, requests, out_bares)

    monkeypatch.setattr(editors.rome, "search_value_deltas", counting)
    certify("tiny-gpt2", None, "rome", "hard", limit=3, search_batch=3)
    assert calls == [3]


@pytest.mark.organism
@pytest.mark.xdist_group("tiny-gpt2")
def test_a_generated_case_outside_the_plan_is_searched_alone(one_torch_thread) -> None:
    """The fuzzer runs cases of its own under a case set the plan does not hold: no batch, no error."""
    import dataclasses

    from pytest_editsafety.cases import resolve_cases
    from pytest_editsafety.plan import PlanItem

    hub = ModelHub(build_plan(["rome"], ["tiny-gpt2"], ["hard"], limit=2), HubOptions(search_batch=4))
    case = dataclasses.replace(resolve_cases("hard").cases[0], case_id="fuzz-0001")
    item = PlanItem("rome-tiny-gpt2-fuzz-fuzz-0001", "case", "rome", "tiny-gpt2", "fuzz", "fuzz-0001")
    outcome = hub.run_case(item, case)
    assert outcome.error is None, outcome.error
    assert hub._state("tiny-gpt2").prepared == {}


def test_values_measured_on_a_held_model_or_an_unpinned_revision_stay_in_the_process(tmp_path) -> None:
    """The templates and the unedited perplexity are kept on disk by the model's identity: not for a model object
    the caller holds (changed in memory, maybe) nor for a hub model at no pinned revision."""
    from types import SimpleNamespace

    hub = ModelHub(build_plan(["rome"], ["tiny-gpt2"], ["hard"], limit=1), HubOptions(cache_root=str(tmp_path)))
    state = ModelState("tiny-gpt2", loaded=SimpleNamespace(identity="2f8b493ccc23ffba"))
    assert hub._values_root(state) == tmp_path
    state.loaded.identity = "gpt2-xl@unpinned"
    assert hub._values_root(state) is None
    state.loaded.identity = "gpt2-xl@0123abc"
    hub._held_models["tiny-gpt2"] = state.loaded
    assert hub._values_root(state) is None
