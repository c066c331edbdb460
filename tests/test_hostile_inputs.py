"""Hostile inputs end in a clear error naming their source: hyper-parameters outside their domain (a NaN clamp
or a negative decay would otherwise edit silently wrong), JSON with a key given twice (silently the last one)
or nested deep enough to crash the parser."""

from __future__ import annotations

import json
import math

import pytest

from editors.hparams import HparamsError, hparams_from_mapping


@pytest.mark.parametrize(("cls_path", "base", "field", "value", "message"), [
    ("editors.rome:RomeHparams", {"layer": 3}, "clamp_norm_factor", math.nan, "clamp_norm_factor: expected a finite number > 0"),
    ("editors.rome:RomeHparams", {"layer": 3}, "v_weight_decay", -0.5, "v_weight_decay: expected a finite number >= 0"),
    ("editors.rome:RomeHparams", {"layer": 3}, "v_lr", 0.0, "v_lr: expected a finite number > 0"),
    ("editors.rome:RomeHparams", {"layer": 3}, "v_num_grad_steps", 0, "v_num_grad_steps: expected an integer >= 1"),
    ("editors.rome:RomeHparams", {"layer": 3}, "context_templates", [[-5, 10]], "context_templates[0]: the length"),
    ("editors.rome:RomeHparams", {"layer": 3}, "context_templates", [[5, -1]], "context_templates[0]: the count"),
    ("editors.rome:RomeHparams", {"layer": 3}, "kl_prompt", "{} is {}", "kl_prompt: expected a text with one"),
    ("editors.rome:RomeHparams", {"layer": 3}, "mom2_n_samples", 0, "mom2_n_samples: expected an integer >= 1"),
    ("editors.memit:MemitHparams", {"layers": [3]}, "kl_factor", math.inf, "kl_factor: expected a finite number"),
    ("editors.memit:MemitHparams", {"layers": [3]}, "mom2_update_weight", -1.0, "mom2_update_weight"),
    ("editors.ft:FtHparams", {"layer": 0}, "lr", -1e-3, "lr: expected a finite number > 0"),
    ("editors.ft:FtHparams", {"layer": 0}, "weight_decay", math.nan, "weight_decay: expected a finite number >= 0"),
])
def test_a_value_outside_its_domain_is_refused_naming_field_and_source(cls_path, base, field, value, message):
    import importlib

    module, _, name = cls_path.partition(":")
    cls = getattr(importlib.import_module(module), name)
    with pytest.raises(HparamsError) as err:
        hparams_from_mapping(cls, {**base, field: value}, source="my-hparams.json")
    assert str(err.value).startswith("my-hparams.json: ") and message in str(err.value)


def test_every_builtin_file_is_inside_the_domain():
    """The built-in files pass the same checks (resolved against a model deep enough for every file)."""
    from types import SimpleNamespace

    from editors.hparams import builtin_hparams_keys, load_hparams, resolve_hparams_layers, schema_for

    config = SimpleNamespace(num_hidden_layers=48, editsafety_causal_layer=0)
    for editor in ("rome", "memit", "ft-linf", "mend"):
        schema = schema_for(editor)
        for key in builtin_hparams_keys(editor):
            hparams = resolve_hparams_layers(editor, load_hparams(editor, key), config)
            hparams_from_mapping(schema.dataclass(), hparams, source=f"{editor}/{key}.json")


def test_a_user_file_outside_the_domain_fails_when_the_editor_is_built(tmp_path):
    from types import SimpleNamespace

    from editors.registry import build_editor

    user = tmp_path / "bad-rome.json"
    user.write_text(json.dumps({"clamp_norm_factor": -1}))
    model = SimpleNamespace(config=SimpleNamespace(model_type="gpt2", num_hidden_layers=48, editsafety_causal_layer=0))
    with pytest.raises(HparamsError, match="clamp_norm_factor: expected a finite number > 0"):
        build_editor("rome", "gpt2-xl", model, user_hparams=user)


@pytest.mark.parametrize("text", [
    '{"layer": 3, "layer": 4}',
    "[" * 100_000 + "]" * 100_000,
])
def test_hparams_files_refuse_duplicate_keys_and_absurd_nesting(tmp_path, text):
    from editors.hparams import read_hparams_file

    path = tmp_path / "h.json"
    path.write_text(text)
    with pytest.raises(HparamsError, match=r"h\.json: (duplicate key 'layer'|nested too deeply)"):
        read_hparams_file(path)


@pytest.mark.parametrize(("text", "problem"), [
    ('[{"case_id": "a", "subject": "Paris", "subject": "Rome", "prompt": "{} is in", "target_new": "Spain",'
     ' "ground_truth": "France"}]', "duplicate key 'subject'"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"case_id": "a", "case_id": "b"}\n{"case_id": "c"}\n', "duplicate key 'case_id'"),
])
def test_case_files_refuse_duplicate_keys_and_absurd_nesting(tmp_path, text, problem):
    from pytest_editsafety.cases import CaseValidationError, load_cases

    path = tmp_path / "cases.json"
    path.write_text(text)
    with pytest.raises(CaseValidationError, match=problem):
        load_cases(path)


def test_bidi_controls_and_invisible_characters_are_shown_in_the_report():
    from pytest_editsafety.report.markdown import escape_md

    shown = escape_md("Sub\u202eject\u200b\u2066x\u2069\ufeff")
    assert shown == "Sub(U+202E)ject(U+200B)(U+2066)x(U+2069)(U+FEFF)"
    assert not any(ch in shown for ch in "\u202e\u200b\u2066\u2069\ufeff")


@pytest.mark.organism
def test_a_case_longer_than_the_models_context_is_refused_with_the_lengths(tmp_path):
    from pytest_editsafety.cases import dump_cases, resolve_cases
    from pytest_editsafety.context_fit import CaseTooLongError
    from pytest_editsafety.hub import HubOptions, ModelHub
    from pytest_editsafety.plan import build_plan

    normal = resolve_cases("normal")
    long_subject = " ".join(["Grimung"] * 40)  # tiny-gpt2 reads 32 tokens
    case = normal.cases[0]
    long_case = type(case)(case_id="long", subject=long_subject, prompt=case.prompt, target_new=case.target_new,
                           ground_truth=case.ground_truth)
    path = dump_cases(normal.with_cases((long_case,)), tmp_path / "long.json")
    plan = build_plan(["rome"], ["tiny-gpt2"], [str(path)])
    outcome = ModelHub(plan, HubOptions()).run(plan.items[0])
    assert isinstance(outcome.error, CaseTooLongError)
    assert "more than the model's context of 32" in str(outcome.error) and "'long'" in str(outcome.error)


def test_a_changed_float_in_a_cached_organism_is_named_and_the_build_replaced(tmp_path, caplog):
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from editors.storage import file_sha256
    from pytest_editsafety.zoo.build import WEIGHTS_FILE, build_recipe, read_metadata
    from tests.zoo_helpers import micro_recipe

    directory = build_recipe(micro_recipe(), progress=False, root=tmp_path)
    weights = directory / WEIGHTS_FILE
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].copy()
    tensors[name].flat[0] = np.float32(tensors[name].flat[0] + 1.0)  # still finite, still loads
    save_file(tensors, str(weights), metadata={"format": "pt"})
    assert file_sha256(weights) != read_metadata(directory)["weights_sha256"]
    with caplog.at_level("WARNING"):
        again = build_recipe(micro_recipe(), progress=False, root=tmp_path)
    assert again == directory
    assert f"organism weights {weights}" in caplog.text
    assert file_sha256(again / WEIGHTS_FILE) == read_metadata(again)["weights_sha256"]  # built again, whole


def test_a_cached_floor_edited_by_hand_is_named_and_measured_again(tmp_path, caplog):
    import json

    from pytest_editsafety.floor import FLOOR_CACHE_FORMAT, _valid
    from pytest_editsafety.keyed_cache import read_entry, write_entry

    key = {"format": FLOOR_CACHE_FORMAT, "model": "m", "editor": "rome"}
    path = tmp_path / "rome-x.json"
    write_entry(path, key, {"median": 2.5, "n": 48, "medians": {"denominator": 2.5, "interference": 0.06}})
    assert read_entry(path, key, valid=_valid)["median"] == 2.5
    stored = json.loads(path.read_text())
    stored["value"]["median"] = 1e6  # the floor made harmless
    path.write_text(json.dumps(stored))
    with caplog.at_level("WARNING"):
        assert read_entry(path, key, valid=_valid) is None
    assert str(path) in caplog.text and "digest" in caplog.text


def test_a_case_id_of_thousands_of_digits_is_a_case_file_problem_not_a_model_error(tmp_path):
    from pytest_editsafety.cases import CaseValidationError, load_cases

    path = tmp_path / "ids.json"
    path.write_text('[{"case_id": ' + "7" * 5000 + ', "subject": "Paris", "prompt": "{} is in", '
                    '"target_new": "Spain", "ground_truth": "France"}]')
    with pytest.raises(CaseValidationError, match="a number too long to read"):
        load_cases(path)


def test_one_model_under_two_names_is_planned_once():
    from pytest_editsafety.plan import build_plan

    plan = build_plan(["rome"], ["gpt2-xl", "openai-community/gpt2-xl"], ["real-normal"], limit=1)
    assert [m.given for m in plan.models] == ["gpt2-xl"] and len(plan.items) == 1


def test_a_truncated_or_garbled_safetensors_file_is_named_before_any_load(micro_model, tmp_path):
    import shutil

    from editors.storage import safetensors_problem
    from pytest_editsafety.model_check import check_loadable
    from pytest_editsafety.registry import ModelUnavailableError, resolve_model

    weights = micro_model / "model.safetensors"
    assert safetensors_problem(weights) is None
    copy = tmp_path / "copy"
    shutil.copytree(micro_model, copy)
    check_loadable(resolve_model(str(copy)))
    size = weights.stat().st_size
    with open(copy / "model.safetensors", "r+b") as handle:
        handle.truncate(size - 100)
    with pytest.raises(ModelUnavailableError, match=rf"weights file {copy / 'model.safetensors'} is truncated: "
                                                    rf"{size - 100} bytes where its header describes {size}"):
        check_loadable(resolve_model(str(copy)))
    (copy / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    assert safetensors_problem(copy / "model.safetensors").startswith("truncated or not safetensors: its header claims")
    (copy / "model.safetensors").write_bytes((2).to_bytes(8, "little") + b"[]")
    assert safetensors_problem(copy / "model.safetensors") == "not safetensors: its header is not a JSON object"
    (copy / "model.safetensors").unlink()
    with pytest.raises(ModelUnavailableError, match="holds no weights file"):
        check_loadable(resolve_model(str(copy)))


def test_an_uncached_hub_model_offline_is_refused_saying_how_to_provide_it(tmp_path, monkeypatch):
    from pytest_editsafety.model_check import check_loadable
    from pytest_editsafety.registry import LoadOptions, ModelUnavailableError, resolve_model

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError) as refused:
        check_loadable(resolve_model("no-such-owner/no-such-model"))
    message = str(refused.value)
    assert message.startswith("model 'no-such-owner/no-such-model' (Hugging Face repo) is not available")
    assert "hf download no-such-owner/no-such-model" in message and str(tmp_path / "hf") in message
    check_loadable(resolve_model("no-such-owner/no-such-model"), LoadOptions(local_files_only=False))  # online: the load decides
