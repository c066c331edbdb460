"""Values kept on disk across processes (pytest_editsafety.keyed_cache): measured once per key, read back exactly,
refused when edited; a model's context templates and its unedited perplexity are kept this way, so a worker and a
later run read them instead of measuring again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_editsafety.keyed_cache import cached_value, entry_path, read_entry


def test_a_value_is_measured_once_per_key_and_read_back(tmp_path: Path) -> None:
    calls = []

    def measure():
        calls.append(1)
        return {"mean": 3.25, "texts": ["a", "b"]}

    key = {"identity": "m", "corpus": "c"}
    assert cached_value(tmp_path, "kind", "m", key, measure) == {"mean": 3.25, "texts": ["a", "b"]}
    assert cached_value(tmp_path, "kind", "m", key, measure) == {"mean": 3.25, "texts": ["a", "b"]}
    assert len(calls) == 1
    cached_value(tmp_path, "kind", "m", {**key, "corpus": "other"}, measure)  # another key: measured
    assert len(calls) == 2


def test_without_a_root_or_with_nothing_to_keep_nothing_is_written(tmp_path: Path) -> None:
    assert cached_value(None, "kind", "m", {"k": 1}, lambda: 5) == 5
    assert cached_value(tmp_path, "kind", "m", {"k": 1}, lambda: None) is None
    assert not entry_path(tmp_path, "kind", "m", {"k": 1}).exists()


def test_an_edited_or_misshapen_entry_is_named_and_measured_again(tmp_path: Path, caplog) -> None:
    key = {"k": 1}
    cached_value(tmp_path, "kind", "m", key, lambda: [1.0, 2.0])
    path = entry_path(tmp_path, "kind", "m", key)
    stored = json.loads(path.read_text())
    stored["value"] = [1.0, 999.0]
    path.write_text(json.dumps(stored))
    with caplog.at_level("WARNING"):
        assert cached_value(tmp_path, "kind", "m", key, lambda: [1.0, 2.0]) == [1.0, 2.0]
    assert str(path) in caplog.text and "digest" in caplog.text
    assert read_entry(path, key) == [1.0, 2.0]  # written again, whole
    with caplog.at_level("WARNING"):
        assert read_entry(path, key, valid=lambda value: isinstance(value, dict)) is None
    assert "wrong shape" in caplog.text
    path.write_text("{not json")
    assert read_entry(path, key) is None


@pytest.mark.organism
@pytest.mark.xdist_group("tiny-gpt2")
def test_templates_and_the_unedited_perplexity_are_read_back_by_another_hub(monkeypatch, one_torch_thread) -> None:
    """A second hub on the same cache root (another worker, a later run) samples no template and measures no
    unedited perplexity: it reads both, and they are the first hub's exactly. (The session's cache root, where the
    organism and its statistics already are: a fresh root would compute C and the floor again, minutes.)"""
    import editors.context
    from pytest_editsafety.hub import HubOptions, ModelHub
    from pytest_editsafety.plan import build_plan

    plan = build_plan(["rome"], ["tiny-gpt2"], ["normal"], limit=1)
    item = plan.items[0]
    first = ModelHub(plan, HubOptions())
    measured = first.run(item)
    assert measured.error is None
    state = first._state("tiny-gpt2")
    templates, baseline = state.provided["rome"].context_templates, state.baseline

    def refuse(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(editors.context, "sample_context_templates", refuse)
    second = ModelHub(plan, HubOptions())
    original = ModelHub._perplexity

    def edited_only(self, state, corpus=None, **kwargs):
        assert state.baseline is not None, "the unedited perplexity was measured again"
        return original(self, state, corpus, **kwargs)

    monkeypatch.setattr(ModelHub, "_perplexity", edited_only)
    again = second.run(item)
    assert again.error is None
    state = second._state("tiny-gpt2")
    assert state.provided["rome"].context_templates == templates
    assert state.baseline == baseline
    assert again.record["metrics"]["ppl_ratio"] == measured.record["metrics"]["ppl_ratio"]


def test_the_weights_key_names_identity_dtype_device_kind_and_a_swapped_activation() -> None:
    """A value measured in float16, on another kind of device, or with the activation kernel a load swapped in is
    another value: the key must say so."""
    from types import SimpleNamespace

    import torch

    from pytest_editsafety.keyed_cache import weights_key

    def loaded(dtype):
        return SimpleNamespace(identity="abc", model=torch.nn.Linear(2, 2).to(dtype))

    assert weights_key(loaded(torch.float32)) == {"identity": "abc", "dtype": "torch.float32", "device": "cpu"}
    assert weights_key(loaded(torch.float16))["dtype"] == "torch.float16"
    configured = loaded(torch.float32)
    configured.model.config = SimpleNamespace(activation_function="gelu_new")
    assert "activation" not in weights_key(configured)  # a model that runs what it was trained with: no field
    configured.model.config = SimpleNamespace(activation_function="gelu_pytorch_tanh",
                                              editsafety_trained_activation="gelu_new")
    assert weights_key(configured)["activation"] == "gelu_pytorch_tanh"


@pytest.mark.organism
@pytest.mark.xdist_group("tiny-gpt2")
def test_two_corpora_of_one_name_are_measured_on_their_own_texts(one_torch_thread) -> None:
    """Corpus files are named by their stem (a/ppl.json and b/ppl.json are both "ppl"): the hub keeps each one's
    token ids apart, so the second is not measured on the first's."""
    from editors.corpus import Corpus
    from pytest_editsafety.hub import HubOptions, ModelHub
    from pytest_editsafety.perplexity import perplexity
    from pytest_editsafety.plan import build_plan

    plan = build_plan(["rome"], ["tiny-gpt2"], ["normal"], limit=1)
    hub = ModelHub(plan, HubOptions())
    state = hub._state("tiny-gpt2")
    first = Corpus.from_texts("ppl", ["The cat sat on the mat.", "A dog ran far away."])
    second = Corpus.from_texts("ppl", ["The cat sat on the mat today.", "Nobody knows where the road ends."])
    for corpus in (first, second, first):
        expected = perplexity(state.loaded.model, state.loaded.tokenizer, corpus.texts).mean_ppl
        assert hub._perplexity(state, corpus)["mean"] == expected
