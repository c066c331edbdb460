"""Editors that declare the same measurement (editors.base.EditorBase.measurement_key) share it: the first editor of a
case measures ROME's v* or MEMIT's z on the unedited model and the others take it, each still applying, measuring and
restoring its own edit. The records must be the ones each editor gets alone, bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

from editors.base import EditorBase, EditRequest, Provided, measurement_key
from editors.emmet import EmmetEditor, EmmetHparams
from editors.memit import MemitEditor, MemitHparams
from editors.rome import RomeEditor, RomeHparams
from editors.value_search import SEARCH_SETTINGS, search_value_deltas
from pytest_editsafety.hub import HubOptions, ModelHub
from pytest_editsafety.plan import build_plan
from pytest_editsafety.shared_measurements import SharedMeasurements
from tests.test_plugin import one_torch_thread  # noqa: F401  (a fixture, used by name)

TEMPLATES = ("{}", "The day began. {}")
REQUEST = EditRequest("Twitter", "{} was acquired by", "Google")


def _set_up(editor: EditorBase, templates: tuple[str, ...] = TEMPLATES) -> EditorBase:
    editor.setup(None, None, None, Provided(context_templates=templates))
    return editor


def _rome(name: str = "rome", **settings) -> RomeEditor:
    return _set_up(RomeEditor(name, RomeHparams(layer=1, **settings), consistent=name != "rome",
                              test_prefix=name == "c-rome-prefix"))


# ---------------------------------------------------------------------------------------------- the keys


def test_rome_and_its_c_rome_variants_declare_one_measurement() -> None:
    keys = {measurement_key(_rome(name), REQUEST) for name in ("rome", "c-rome", "c-rome-prefix", "r-rome")}
    assert len(keys) == 1 and None not in keys


def test_memit_and_its_spread_editors_declare_one_measurement_and_not_romes() -> None:
    memit = _set_up(MemitEditor(MemitHparams(layers=(0, 1))))
    emmet = _set_up(EmmetEditor(EmmetHparams(layers=(0, 1)), name="emmet"))
    assert measurement_key(memit, REQUEST) == measurement_key(emmet, REQUEST) is not None
    # MEMIT's z is the residual at its last layer plus δ; ROME's inputs are an MLP's: never the same value
    assert measurement_key(memit, REQUEST) != measurement_key(_rome(), REQUEST)


@pytest.mark.parametrize("setting", [("v_lr", 0.25), ("v_num_grad_steps", 7), ("kl_prompt", "{} was a"),
                                     ("early_stop_on", "nll"), ("clamp_norm_factor", 2.0)])
def test_a_search_setting_templates_or_request_of_its_own_measure_alone(setting) -> None:
    name, value = setting
    key = measurement_key(_rome(), REQUEST)
    assert measurement_key(_rome(**{name: value}), REQUEST) != key
    assert measurement_key(_set_up(RomeEditor("rome", RomeHparams(layer=1), consistent=False), ("{}",)),
                           REQUEST) != key
    assert measurement_key(_rome(), EditRequest("Twitter", "{} was acquired by", "Apple")) != key


def test_nothing_is_shared_before_set_up_by_default_or_by_a_subclass_that_measures_otherwise() -> None:
    assert measurement_key(RomeEditor("rome", RomeHparams(layer=1), consistent=False), REQUEST) is None
    assert measurement_key(EditorBase(), REQUEST) is None

    class Protocol:  # an editor that only follows the protocol declares nothing
        name = "protocol-only"

    assert measurement_key(Protocol(), REQUEST) is None

    class OwnSearch(RomeEditor):
        def prepare(self, model, tokenizer, family, requests):
            return {}

    own = _set_up(OwnSearch("rome", RomeHparams(layer=1), consistent=False))
    assert measurement_key(own, REQUEST) not in (None, measurement_key(_rome(), REQUEST))

    class OwnTemplates(RomeEditor):  # the templates the search runs over are the value's too
        def _contexts(self, model, tokenizer):
            return ("{}",)

    other = _set_up(OwnTemplates("rome", RomeHparams(layer=1), consistent=False))
    assert measurement_key(other, REQUEST) not in (None, measurement_key(_rome(), REQUEST))


class _Recording:
    """Hyper-parameters that note every field read."""

    def __init__(self, hp, read: set[str]) -> None:
        self._hp = hp
        self._read = read

    def __getattr__(self, name: str):
        self._read.add(name)
        return getattr(self._hp, name)


def _random_gpt2():
    from editors.families import family_for_model_type
    from tests.test_memit_ft import _tokenizer
    from tests.test_suffix import _random_model

    tokenizer = _tokenizer("gpt2")
    return _random_model("gpt2", len(tokenizer), layers=2), tokenizer, family_for_model_type("gpt2")


def test_the_search_and_romes_prepare_read_no_setting_the_key_leaves_out() -> None:
    """A setting read by the measurement but missing from SEARCH_SETTINGS would let two different searches share."""
    from tests.test_memit_ft import CONTEXTS, REQUESTS

    model, tokenizer, family = _random_gpt2()
    read: set[str] = set()
    hp = RomeHparams(layer=1, v_num_grad_steps=2)
    search_value_deltas(model, tokenizer, family, _Recording(hp, read), CONTEXTS, REQUESTS[:1],
                        [torch.ones(model.config.n_embd)])
    assert read and read <= set(SEARCH_SETTINGS), sorted(read - set(SEARCH_SETTINGS))
    read.clear()
    rome = _set_up(RomeEditor("rome", hp, consistent=False), tuple(CONTEXTS))
    rome.hparams = _Recording(hp, read)
    rome.prepare(model, tokenizer, family, REQUESTS[:1])
    assert read and read <= set(SEARCH_SETTINGS), sorted(read - set(SEARCH_SETTINGS))


def test_memits_prepare_reads_its_search_through_value_hparams_alone() -> None:
    from tests.test_memit_ft import CONTEXTS, REQUESTS

    model, tokenizer, family = _random_gpt2()
    read: set[str] = set()
    hp = MemitHparams(layers=(0, 1), v_num_grad_steps=2)
    memit = _set_up(MemitEditor(hp), tuple(CONTEXTS))
    memit.hparams = _Recording(hp, read)
    memit.prepare(model, tokenizer, family, REQUESTS[:1])
    # the key holds value_hparams()'s search settings; "layers" is read to check them against the model
    assert read == {"value_hparams", "layers"}, read


# ---------------------------------------------------------------------------------------------- the store


def test_the_store_keeps_the_latest_entries_and_counts_what_it_served() -> None:
    store = SharedMeasurements(max_entries=2)
    store.put("a", 1)
    store.put("b", 2)
    assert store.get("a") == 1  # "a" is now the most recent
    store.put("c", 3)
    assert "b" not in store and "a" in store and "c" in store and len(store) == 2
    assert store.get("b") is None
    with pytest.raises(ValueError, match="max_entries"):
        SharedMeasurements(max_entries=0)
    with pytest.raises(ValueError, match="share_measurements"):
        HubOptions(share_measurements="yes")


# ---------------------------------------------------------------------------------------------- a run


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


@pytest.mark.organism
@pytest.mark.xdist_group("tiny-gpt2")
def test_a_shared_measurement_certifies_bit_for_bit_what_each_editor_measures_alone(one_torch_thread,
                                                                                     monkeypatch) -> None:
    import editors.memit
    import editors.rome

    searches: list[int] = []
    real = search_value_deltas

    def counting(model, tokenizer, family, hp, contexts, requests, out_bares):
        searches.append(len(requests))
        return real(model, tokenizer, family, hp, contexts, requests, out_bares)

    monkeypatch.setattr(editors.rome, "search_value_deltas", counting)
    monkeypatch.setattr(editors.memit, "search_value_deltas", counting)
    plan = build_plan(["rome", "c-rome", "memit", "emmet", "alphaedit", "ft-linf"], ["tiny-gpt2"], ["hard"], limit=2)
    runs = {}
    for share in (True, False):
        searches.clear()
        hub = ModelHub(plan, HubOptions(share_measurements=share))
        runs[share] = {item.test_id: hub.run(item).record for item in plan.items}
        # each case searched once per family when shared (2 cases x rome's and memit's), else once per editor
        assert len(searches) == (4 if share else 10), (share, searches)
    for test_id, alone in runs[False].items():
        shared = runs[True][test_id]
        assert (shared["certified"], shared["violations"]) == (alone["certified"], alone["violations"]), test_id
        assert set(shared["metrics"]) == set(alone["metrics"]), test_id
        for key, value in alone["metrics"].items():
            assert _same(shared["metrics"][key], value), (test_id, key, shared["metrics"][key], value)


@pytest.mark.organism
@pytest.mark.xdist_group("tiny-gpt2")
def test_sharing_a_search_batchs_values_certifies_what_each_editor_measures_alone(one_torch_thread) -> None:
    """With a search batch, the first editor's batch serves its sharers' cases too: the same records, to rounding."""
    from pytest_editsafety.results import CaseRecord
    from tests.test_search_batch import _same_records

    plan = build_plan(["c-rome-prefix", "r-rome", "rome"], ["tiny-gpt2"], ["hard"], limit=3)
    records = {}
    for share in (True, False):
        hub = ModelHub(plan, HubOptions(share_measurements=share, search_batch=3))
        records[share] = [CaseRecord.from_dict(hub.run(item).record) for item in plan.items]
    _same_records(records[False], records[True])
