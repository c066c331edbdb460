"""The built-in hyper-parameters of the real models are the papers' public configs, field by field.

The tables below are the pin: CI cannot read the papers' repositories, so each value was copied by hand from
the file named above its rows, at the commit named here, and every built-in file must hold exactly these
values. A change to a file that is not a change to its source config fails here.

- The collapse papers' code, WanliYoung/Collapse-in-Model-Editing at commit
  678beddf656385b660281de93a6650bb1b485ee9: hparams/{ROME,MEMIT,FT,MEND}/<model>.yaml, and the constants of
  easyeditor/models/rome/compute_v.py, easyeditor/models/memit/{memit_main,compute_z}.py and
  easyeditor/models/ft/ft_main.py for fields the yaml files do not carry.
- ROME's original code, kmeng01/rome at commit 0874014cd9837e4365f3e6f3c71400ef11509e04: hparams/ROME/*.json
  and hparams/FT/*_constr.json, the named set ``kmeng01``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from editors.hparams import (
    HparamsError,
    builtin_hparams_keys,
    layer_hparams,
    load_hparams,
    named_hparams_sets,
    resolve_hparams_layers,
    resolve_layers,
    schema_for,
)

PAPERS_REPO = "WanliYoung/Collapse-in-Model-Editing"
PAPERS_COMMIT = "678beddf656385b660281de93a6650bb1b485ee9"
ROME_REPO = "kmeng01/rome"
ROME_COMMIT = "0874014cd9837e4365f3e6f3c71400ef11509e04"
HPARAMS = Path(__file__).resolve().parent.parent / "editors" / "hparams"

# the papers' yaml file for each of our model keys (the file names of their hparams/<METHOD>/ folders)
PAPERS_FILE = {"gpt2-xl": "gpt2-xl", "gpt-j": "gpt-j-6B", "llama2-7b": "llama-7b", "mistral-7b": "mistral-7b"}

# (editor, model, field, value): what the papers' configs say, by source file.
PAPERS: list[tuple[str, str, str, object]] = [
    # hparams/ROME/gpt2-xl.yaml
    *[("rome", "gpt2-xl", f, v) for f, v in {
        "layer": 17, "v_num_grad_steps": 20, "v_lr": 0.5, "v_weight_decay": 0.5, "clamp_norm_factor": 4.0,
        "kl_factor": 0.0625, "mom2_adjustment": False, "mom2_n_samples": 100000,
        "context_templates": [[5, 10], [10, 10]]}.items()],
    # hparams/ROME/gpt-j-6B.yaml
    *[("rome", "gpt-j", f, v) for f, v in {
        "layer": 5, "v_num_grad_steps": 20, "v_lr": 0.5, "v_weight_decay": 0.5, "clamp_norm_factor": 4.0,
        "kl_factor": 0.0625, "mom2_adjustment": False, "mom2_n_samples": 100000,
        "context_templates": [[5, 10], [10, 10]]}.items()],
    # hparams/ROME/llama-7b.yaml (model_name llama-2-7b)
    *[("rome", "llama2-7b", f, v) for f, v in {
        "layer": 5, "v_num_grad_steps": 25, "v_lr": 0.5, "v_weight_decay": 1e-3, "clamp_norm_factor": 4.0,
        "kl_factor": 0.0625, "mom2_adjustment": False, "mom2_n_samples": 100000,
        "context_templates": [[5, 10], [10, 10]]}.items()],
    # hparams/ROME/mistral-7b.yaml
    *[("rome", "mistral-7b", f, v) for f, v in {
        "layer": 5, "v_num_grad_steps": 25, "v_lr": 0.5, "v_weight_decay": 1e-3, "clamp_norm_factor": 4.0,
        "kl_factor": 0.0625, "mom2_adjustment": False, "mom2_n_samples": 100000,
        "context_templates": [[5, 10], [10, 10]]}.items()],
    # easyeditor/models/rome/compute_v.py: kl_prompts ["{} is a"], "if loss < 5e-2: break" (the whole loss),
    # "target = target_init + delta" (C-ROME's value: the bare prompt's output plus delta)
    # compute_u.py: C⁻¹ of C as it is (get_inv_cov, torch.inverse), no ridge
    *[("rome", m, f, v) for m in PAPERS_FILE for f, v in {
        "kl_prompt": "{} is a", "early_stop_on": "loss", "early_stop_below": 0.05, "c_rome_target": "bare",
        "mom2_ridge": 0.0}.items()],
    # hparams/MEMIT/gpt2-xl.yaml
    *[("memit", "gpt2-xl", f, v) for f, v in {
        "layers": [13, 14, 15, 16, 17], "clamp_norm_factor": 0.75, "v_num_grad_steps": 20, "v_lr": 0.5,
        "v_weight_decay": 0.5, "kl_factor": 0.0625, "mom2_adjustment": True, "mom2_update_weight": 20000.0,
        "mom2_n_samples": 100000}.items()],
    # hparams/MEMIT/gpt-j-6B.yaml
    *[("memit", "gpt-j", f, v) for f, v in {
        "layers": [3, 4, 5, 6, 7, 8], "clamp_norm_factor": 0.75, "v_num_grad_steps": 25, "v_lr": 0.5,
        "v_weight_decay": 0.5, "kl_factor": 0.0625, "mom2_adjustment": True, "mom2_update_weight": 15000.0,
        "mom2_n_samples": 100000}.items()],
    # hparams/MEMIT/llama-7b.yaml
    *[("memit", "llama2-7b", f, v) for f, v in {
        "layers": [4, 5, 6, 7, 8], "clamp_norm_factor": 4.0, "v_num_grad_steps": 25, "v_lr": 0.5,
        "v_weight_decay": 1e-3, "kl_factor": 0.0625, "mom2_adjustment": True, "mom2_update_weight": 15000.0,
        "mom2_n_samples": 100000}.items()],
    # hparams/MEMIT/mistral-7b.yaml
    *[("memit", "mistral-7b", f, v) for f, v in {
        "layers": [4, 5, 6, 7, 8], "clamp_norm_factor": 4.0, "v_num_grad_steps": 25, "v_lr": 0.5,
        "v_weight_decay": 1e-3, "kl_factor": 0.0625, "mom2_adjustment": True, "mom2_update_weight": 15000.0,
        "mom2_n_samples": 100000}.items()],
    # easyeditor/models/memit/memit_main.py get_context_templates: "for length, n_gen in [(10, 5)]" (5 prefixes
    # of 10 tokens); compute_z.py: kl_prompts ["{} is a"], "if loss < 5e-2: break"
    *[("memit", m, f, v) for m in PAPERS_FILE for f, v in {
        "context_templates": [[10, 5]], "kl_prompt": "{} is a", "early_stop_on": "loss",
        "early_stop_below": 0.05}.items()],
    # not a setting of the papers: how the search for v* (and z) runs, over a cached prefix (editors.suffix); the
    # same numbers either way, to float rounding
    *[(e, m, "v_cached_prefix", True) for e in ("rome", "memit") for m in PAPERS_FILE],
    # hparams/FT/gpt2-xl.yaml (norm_constraint 5e-4 -> eps)
    *[("ft-linf", "gpt2-xl", f, v) for f, v in {
        "layer": 0, "num_steps": 25, "lr": 5e-4, "weight_decay": 0.0, "eps": 5e-4}.items()],
    # hparams/FT/gpt-j-6B.yaml (norm_constraint false: eps is chosen, see CHOSEN)
    *[("ft-linf", "gpt-j", f, v) for f, v in {"layer": 21, "num_steps": 25, "lr": 5e-4, "weight_decay": 0.0}.items()],
    # hparams/FT/llama-7b.yaml (norm_constraint false: eps is chosen, see CHOSEN)
    *[("ft-linf", "llama2-7b", f, v) for f, v in {
        "layer": 21, "num_steps": 25, "lr": 5e-4, "weight_decay": 0.0}.items()],
    # hparams/FT/mistral-7b.yaml (norm_constraint 5e-5 -> eps)
    *[("ft-linf", "mistral-7b", f, v) for f, v in {
        "layer": 21, "num_steps": 25, "lr": 5e-4, "weight_decay": 0.0, "eps": 5e-5}.items()],
    # easyeditor/models/ft/ft_main.py: "if loss.item() >= 1e-2" (no step below it)
    *[("ft-linf", m, "early_stop_nll", 0.01) for m in PAPERS_FILE],
    # hparams/MEND/<model>.yaml inner_params (and hparams/TRAINING/MEND/<model>.yaml, the same)
    ("mend", "gpt2-xl", "layers", [45, 46, 47]), ("mend", "gpt2-xl", "modules", ["mlp_in", "mlp_out"]),  # c_fc/c_proj
    ("mend", "gpt-j", "layers", [25, 26, 27]), ("mend", "gpt-j", "modules", ["mlp_in", "mlp_out"]),  # fc_in/fc_out
    ("mend", "llama2-7b", "layers", [29, 30, 31]),
    ("mend", "llama2-7b", "modules", ["gate_proj", "up_proj", "down_proj"]),
    ("mend", "mistral-7b", "layers", [29, 30, 31]),
    ("mend", "mistral-7b", "modules", ["gate_proj", "up_proj", "down_proj"]),
    # the same method section in all four: rank, n_hidden, edit_lr, lr, lr_lr, cedit, cloc, accumulate_bs 10
    # (edits per outer step: batch_size), max_iters 100000 of one edit (steps: 100000 / 10), grad_clip, seed
    *[("mend", m, f, v) for m in PAPERS_FILE for f, v in {
        "rank": 1920, "n_hidden": 1, "edit_lr": 1e-4, "lr": 1e-6, "lr_lr": 1e-4, "c_edit": 0.1, "c_loc": 1.0,
        "batch_size": 10, "steps": 10000, "grad_clip": 100.0, "seed": 42}.items()],
]

# (editor, model, field, value) where the papers' configs give no value: the project's choice, argued in the
# file's _comment.
CHOSEN: list[tuple[str, str, str, object]] = [
    # the papers run FT unconstrained on GPT-J and Llama-2 (norm_constraint false), which FT-L-infinity is not:
    # the radius of ROME's constrained GPT-J config and of the papers' own Mistral-7B config
    ("ft-linf", "gpt-j", "eps", 5e-5),
    ("ft-linf", "llama2-7b", "eps", 5e-5),
    # MEND: the project's own training and cache settings
    *[("mend", m, f, v) for m in PAPERS_FILE for f, v in {"norm_batches": 100, "threads": 1, "archive": ""}.items()],
]

# files that hold another model's values, by what they stand for: a family default holds its reference model's
# file; Llama-3-8B, without a public config in the papers' repo, holds Llama-2-7b's by family
SAME_AS = {"gpt2": "gpt2-xl", "gptj": "gpt-j", "llama": "llama2-7b", "mistral": "mistral-7b", "llama3-8b": "llama2-7b"}

# (editor, model, field, value) of the named set kmeng01, ROME's original configs
KMENG01: list[tuple[str, str, str, object]] = [
    # kmeng01/rome hparams/ROME/gpt2-xl.json
    *[("rome", "gpt2-xl", f, v) for f, v in {
        "layer": 17, "v_num_grad_steps": 20, "v_lr": 0.5, "v_weight_decay": 0.5, "clamp_norm_factor": 4.0,
        "kl_factor": 0.0625, "mom2_adjustment": True, "mom2_n_samples": 100000,
        "context_templates": [[5, 10], [10, 10]]}.items()],
    # kmeng01/rome hparams/ROME/EleutherAI_gpt-j-6B.json
    *[("rome", "gpt-j", f, v) for f, v in {
        "layer": 5, "v_num_grad_steps": 20, "v_lr": 0.5, "v_weight_decay": 0.5, "clamp_norm_factor": 4.0,
        "kl_factor": 0.0625, "mom2_adjustment": True, "mom2_n_samples": 100000,
        "context_templates": [[5, 10], [10, 10]]}.items()],
    # kmeng01/rome rome/compute_v.py: kl_prompts ["{} is a"], "if loss < 5e-2: break" (the whole loss)
    # kmeng01/rome rome/compute_u.py: get_inv_cov inverts C as it is (no ridge)
    *[("rome", m, f, v) for m in ("gpt2-xl", "gpt-j") for f, v in {
        "kl_prompt": "{} is a", "early_stop_on": "loss", "early_stop_below": 0.05, "mom2_ridge": 0.0}.items()],
    # ROME's code has no C-ROME: the value C-ROME maps k-bar to is the collapse papers' (their compute_v), so
    # that the named set differs from the defaults in C alone
    *[("rome", m, "c_rome_target", "bare") for m in ("gpt2-xl", "gpt-j")],
    *[("rome", m, "v_cached_prefix", True) for m in ("gpt2-xl", "gpt-j")],
    # kmeng01/rome hparams/FT/gpt2-xl_constr.json
    *[("ft-linf", "gpt2-xl", f, v) for f, v in {
        "layer": 0, "num_steps": 25, "lr": 5e-4, "weight_decay": 0.0, "eps": 5e-4}.items()],
    # kmeng01/rome hparams/FT/EleutherAI_gpt-j-6B_constr.json
    *[("ft-linf", "gpt-j", f, v) for f, v in {
        "layer": 0, "num_steps": 25, "lr": 5e-4, "weight_decay": 0.0, "eps": 5e-5}.items()],
    # kmeng01/rome baselines/ft/ft_main.py: "if loss.item() >= 1e-2"
    *[("ft-linf", m, "early_stop_nll", 0.01) for m in ("gpt2-xl", "gpt-j")],
]
KMENG01_SAME_AS = {"gpt2": "gpt2-xl", "gptj": "gpt-j"}
KMENG01_FILE = {("rome", "gpt2-xl"): "hparams/ROME/gpt2-xl.json", ("rome", "gpt-j"): "hparams/ROME/EleutherAI_gpt-j-6B.json",
                ("ft-linf", "gpt2-xl"): "hparams/FT/gpt2-xl_constr.json",
                ("ft-linf", "gpt-j"): "hparams/FT/EleutherAI_gpt-j-6B_constr.json"}

REAL_KEYS = ("gpt2-xl", "gpt-j", "llama2-7b", "mistral-7b", "llama3-8b", "gpt2", "gptj", "llama", "mistral")
EDITOR_DIRS = ("rome", "memit", "ft-linf", "mend")
METHOD_DIR = {"rome": "ROME", "memit": "MEMIT", "ft-linf": "FT", "mend": "MEND"}


def _raw(*parts: str) -> dict:
    return json.loads(HPARAMS.joinpath(*parts).read_text(encoding="utf-8"))


def _expected(table, same_as) -> dict[tuple[str, str], dict[str, object]]:
    out: dict[tuple[str, str], dict[str, object]] = {}
    for editor, model, field, value in table:
        out.setdefault((editor, model), {})[field] = value
    for (editor, model), values in list(out.items()):
        for alias, reference in same_as.items():
            if model == reference:
                out.setdefault((editor, alias), {}).update(values)
    return out


# a family default's layers, written as a share of the depth ('K/N') or from the end ('last-N'): every model of the
# family gets layers it has, and on the reference model they are its file's own (test_..._scaled_layers_...)
SCALED_LAYERS = {("rome", "gpt2"): "17/48", ("memit", "gpt2"): ["13/48", "14/48", "15/48", "16/48", "17/48"],
                 ("mend", "gpt2"): ["last-2", "last-1", "last"]}
KMENG01_SCALED_LAYERS = {("rome", "gpt2"): "17/48"}


def _with_layers(expected: dict, scaled: dict) -> dict:
    for (editor, model), value in scaled.items():
        field = schema_for(editor).layer_key
        expected[(editor, model)] = {**expected[(editor, model)], field: value}
    return expected


EXPECTED = _with_layers(_expected(PAPERS + CHOSEN, SAME_AS), SCALED_LAYERS)
EXPECTED_KMENG01 = _with_layers(_expected(KMENG01, KMENG01_SAME_AS), KMENG01_SCALED_LAYERS)


@pytest.mark.parametrize(("editor", "model", "scaled", "named"),
                         [(e, m, v, None) for (e, m), v in SCALED_LAYERS.items()]
                         + [(e, m, v, "kmeng01") for (e, m), v in KMENG01_SCALED_LAYERS.items()])
def test_a_family_defaults_scaled_layers_are_its_reference_models_on_that_model(editor, model, scaled, named) -> None:
    from types import SimpleNamespace

    reference = (KMENG01_SAME_AS if named else SAME_AS)[model]
    field = schema_for(editor).layer_key
    raw = _raw(editor, *((named,) if named else ()), f"{reference}.json")[field]
    xl = SimpleNamespace(n_layer=48)
    assert resolve_layers(scaled, xl) == resolve_layers(raw, xl)
    if editor == "rome":  # ROME's own GPT-2 medium and large files edit layers 8 and 12; GPT-2 small has none
        assert [resolve_layers(scaled, SimpleNamespace(n_layer=n)) for n in (24, 36, 12)] == [[8], [12], [4]]


def test_the_tables_have_no_duplicate_rows() -> None:
    for table in (PAPERS, CHOSEN, KMENG01):
        cells = [(editor, model, field) for editor, model, field, _ in table]
        assert len(cells) == len(set(cells))
    assert not {(e, m, f) for e, m, f, _ in PAPERS} & {(e, m, f) for e, m, f, _ in CHOSEN}


@pytest.mark.parametrize("editor", EDITOR_DIRS)
@pytest.mark.parametrize("model", REAL_KEYS)
def test_every_real_model_file_is_the_pinned_config_field_by_field(editor: str, model: str) -> None:
    raw = _raw(editor, f"{model}.json")
    raw.pop("_comment")
    expected = EXPECTED[(editor, model)]
    # every field is pinned: from the papers' files, or a choice the table names
    assert set(expected) == set(raw) == set(schema_for(editor).field_names()), (editor, model)
    for field, value in expected.items():
        assert raw[field] == value and type(raw[field]) is type(value), (editor, model, field, raw[field], value)


@pytest.mark.parametrize("editor", EDITOR_DIRS)
@pytest.mark.parametrize("model", REAL_KEYS)
def test_every_real_model_file_cites_the_config_it_reproduces(editor: str, model: str) -> None:
    comment = _raw(editor, f"{model}.json")["_comment"]
    assert not re.search(r"\{[A-Za-z_]+\}", comment), (editor, model)  # no template left unfilled
    reference = SAME_AS.get(model, model)
    assert PAPERS_REPO in comment and PAPERS_COMMIT in comment, (editor, model)
    assert f"hparams/{METHOD_DIR[editor]}/{PAPERS_FILE[reference]}.yaml" in comment, (editor, model)
    if model == "llama3-8b":  # no public config in the papers' repo: says so, and what was chosen
        assert "no config for it" in comment or "no public" in comment
        assert "Chosen: the Llama-2-7b values by family" in comment


def test_the_issue_numbers() -> None:
    rome = load_hparams("rome", "gpt2-xl")
    assert (rome["mom2_adjustment"], rome["layer"], rome["v_num_grad_steps"]) == (False, 17, 20)
    mistral = load_hparams("rome", "mistral-7b")
    assert (mistral["layer"], mistral["v_num_grad_steps"], mistral["v_weight_decay"]) == (5, 25, 1e-3)
    for editor in ("rome", "c-rome", "c-rome-prefix", "memit", "ft-linf", "mend"):  # no alias without hparams
        for model in ("mistral-7b", "llama3-8b"):
            assert load_hparams(editor, model)


# ------------------------------------------------------------------------------------- the named set kmeng01


def test_kmeng01_is_the_only_named_set_and_covers_rome_and_ft() -> None:
    assert named_hparams_sets("rome") == named_hparams_sets("c-rome") == ("kmeng01",)
    assert named_hparams_sets("ft-linf") == ("kmeng01",)
    assert named_hparams_sets("memit") == named_hparams_sets("mend") == ()
    # a named set is not a model key: the defaults' listing holds files only
    assert "kmeng01" not in builtin_hparams_keys("rome")


@pytest.mark.parametrize(("editor", "model"), sorted(EXPECTED_KMENG01))
def test_kmeng01_files_are_romes_configs_field_by_field(editor: str, model: str) -> None:
    raw = _raw(editor, "kmeng01", f"{model}.json")
    comment = raw.pop("_comment")
    expected = EXPECTED_KMENG01[(editor, model)]
    assert set(expected) == set(raw) == set(schema_for(editor).field_names()), (editor, model)
    for field, value in expected.items():
        assert raw[field] == value and type(raw[field]) is type(value), (editor, model, field)
    reference = KMENG01_SAME_AS.get(model, model)
    assert not re.search(r"\{[A-Za-z_]+\}", comment), (editor, model)
    assert ROME_REPO in comment and ROME_COMMIT in comment and KMENG01_FILE[(editor, reference)] in comment
    assert "never a default" in comment


def test_kmeng01_differs_from_the_papers_rome_only_in_c() -> None:
    for model in ("gpt2-xl", "gpt-j"):
        papers, original = load_hparams("rome", model), load_hparams("rome", model, user_file="kmeng01")
        assert {k for k in papers if papers[k] != original[k]} == {"mom2_adjustment"}
        assert (papers["mom2_adjustment"], original["mom2_adjustment"]) == (False, True)


def test_a_named_set_is_selected_by_name_where_a_user_file_is_taken(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    layered = layer_hparams("c-rome", "gpt2-xl", user_file="kmeng01", overrides={"layer": 16})
    assert [layer.role for layer in layered.layers] == ["built-in", "named", "overrides"]
    assert layered.layers[1].label == "editors/hparams/rome/kmeng01/gpt2-xl.json"
    assert layered.sources["mom2_adjustment"] == "editors/hparams/rome/kmeng01/gpt2-xl.json"
    assert (layered.values["layer"], layered.sources["layer"]) == (16, "overrides")
    assert "kmeng01" in layered.layers[1].comment and ROME_COMMIT in layered.layers[1].comment
    # by the same keys and family as the defaults: a pinned revision, a Hugging Face id of the family
    assert load_hparams("rome", "gpt-j@abc", user_file="kmeng01")["mom2_adjustment"] is True
    assert load_hparams("rome", "EleutherAI/gpt-j-6B", user_file="kmeng01", family="gptj")["layer"] == 5
    with pytest.raises(HparamsError, match=r"'kmeng01' have no file for model 'llama2-7b'.*cover: gpt-j, gpt2"):
        load_hparams("rome", "llama2-7b", user_file="kmeng01")
    with pytest.raises(HparamsError, match=r"kmeng02: no such hyper-parameters file, nor a built-in named set.*"
                                           r"named sets: kmeng01"):
        load_hparams("rome", "gpt2-xl", user_file="kmeng02")
    with pytest.raises(HparamsError, match="named sets: none"):
        load_hparams("memit", "gpt2-xl", user_file="kmeng01")
    # the editor registry (what the plugin's hub, the API and the guard/train commands call) takes it as a user file
    from types import SimpleNamespace

    from editors.registry import build_editor

    model = SimpleNamespace(config=SimpleNamespace(num_hidden_layers=48, model_type="gpt2"))
    assert build_editor("rome", "gpt2-xl", model, user_hparams="kmeng01").hparams.mom2_adjustment is True
    assert build_editor("rome", "gpt2-xl", model).hparams.mom2_adjustment is False
    # a file of that name in the working directory is the user's file, not the named set
    monkeypatch.chdir(tmp_path)
    (tmp_path / "kmeng01").write_text(json.dumps({"v_lr": 0.25}))
    mine = layer_hparams("rome", "gpt2-xl", user_file="kmeng01")
    assert [layer.role for layer in mine.layers] == ["built-in", "user"]
    assert (mine.values["v_lr"], mine.values["mom2_adjustment"]) == (0.25, False)


# ------------------------------------------------------------------------------------- the hparams command


@pytest.fixture()
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No built organism and no Hugging Face cache: what the command can know without either."""
    monkeypatch.setenv("EDITSAFETY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def _hparams_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict | str, str]:
    from pytest_editsafety.cli import main

    code = main(["hparams", *args])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if "--json" in args and out else out), err


BUILTIN_EDITORS = ("rome", "c-rome", "c-rome-prefix", "memit", "ft-linf", "mend")
# the built-in aliases, and Hugging Face ids of each family that reach its family default
MODELS_AND_FILES = {"gpt2-xl": "gpt2-xl", "gpt-j": "gpt-j", "llama2-7b": "llama2-7b", "mistral-7b": "mistral-7b",
                    "llama3-8b": "llama3-8b", "gpt2": "gpt2", "openai-community/gpt2-xl": "gpt2",
                    "EleutherAI/gpt-j-6B": "gptj", "meta-llama/Llama-2-7b-hf": "llama",
                    "mistralai/Mistral-7B-v0.1": "mistral", "tiny-gpt2": "tiny-gpt2", "tiny-gptj": "tiny-gptj",
                    "tiny-llama": "tiny-llama", "tiny-gpt2-sink": None}


def test_hparams_command_resolves_every_builtin_alias_and_editor(isolated: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from types import SimpleNamespace

    from pytest_editsafety.registry import BUILTIN_MODELS, PUBLISHED_DEPTHS, resolve_model

    assert set(BUILTIN_MODELS) <= set(MODELS_AND_FILES)
    assert {spec.location for spec in BUILTIN_MODELS.values() if spec.source == "hub"} == set(PUBLISHED_DEPTHS)
    for model, key in MODELS_AND_FILES.items():
        for editor in BUILTIN_EDITORS:
            code, payload, err = _hparams_cli(capsys, "--model", model, "--editor", editor, "--json")
            assert code == 0 and not err and not payload["problems"], (model, editor, err)
            schema = schema_for(editor)
            file_key = key
            if file_key is None:  # tiny-gpt2-sink: its own rome file, else its family's organism file
                file_key = "tiny-gpt2-sink" if schema.directory == "rome" else "tiny-gpt2"
            file = f"editors/hparams/{schema.directory}/{file_key}.json"
            assert set(payload["sources"].values()) == {file}, (model, editor)
            assert payload["layers"][0]["label"] == file and payload["layers"][0]["comment"]
            expected = load_hparams(editor, file_key)
            layers = expected[schema.layer_key]
            if not model.startswith("tiny-"):  # resolved against the published depth: nothing was downloaded
                depth = PUBLISHED_DEPTHS[resolve_model(model).location]
                resolved = resolve_hparams_layers(editor, expected, SimpleNamespace(n_layer=depth))
                assert payload["values"] == resolved and not payload["unresolved"], (model, editor)
                assert any(f"published depth, {depth} layers" in note for note in payload["notes"])
                continue
            assert any("not built" in note for note in payload["notes"])
            if all(item.startswith("last") for item in layers):  # MEND: the recipe's depth is enough
                assert payload["values"] == {**expected, schema.layer_key: [3, 4, 5]}, (model, editor)
                assert payload["symbolic"] == {schema.layer_key: layers}
            else:  # the causal layer: measured by a build that has not happened here
                assert payload["values"] == expected and schema.layer_key in payload["unresolved"], (model, editor)


def test_hparams_command_resolves_layers_against_a_readable_config(isolated: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from pytest_editsafety.cache import cache_root
    from pytest_editsafety.zoo.build import organism_dir
    from pytest_editsafety.zoo.recipe import RECIPES

    # a built organism: its config.json, without loading it
    recipe = RECIPES["tiny-llama"]
    built = organism_dir(recipe, cache_root())
    built.mkdir(parents=True)
    (built / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 6,
                                                   "editsafety_causal_layer": 2,
                                                   "editsafety_recipe_hash": recipe.recipe_hash}))
    code, payload, _ = _hparams_cli(capsys, "--model", "tiny-llama", "--editor", "memit", "--json")
    assert code == 0 and payload["values"]["layers"] == [2, 3]
    assert payload["symbolic"] == {"layers": ["causal", "causal+1"]} and payload["config"] == str(built / "config.json")
    # an unbuilt organism: 'last-N' from the recipe's depth, 'causal' left as it is, and why
    code, payload, _ = _hparams_cli(capsys, "--model", "tiny-gptj", "--editor", "mend", "--json")
    assert code == 0 and payload["values"]["layers"] == [3, 4, 5]
    code, payload, _ = _hparams_cli(capsys, "--model", "tiny-gptj", "--editor", "rome", "--json")
    assert code == 0 and payload["values"]["layer"] == "causal" and "measured" in payload["unresolved"]["layer"]
    # a local directory (an organism's copy edits with its organism's files)
    local = isolated / "copy"
    local.mkdir()
    (local / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 6, "editsafety_causal_layer": 1,
                                                   "editsafety_recipe_hash": RECIPES["tiny-gpt2"].recipe_hash}))
    code, payload, _ = _hparams_cli(capsys, "--model", str(local), "--editor", "c-rome", "--json")
    assert code == 0 and (payload["values"]["layer"], payload["hparams_keys"][0]) == (1, "tiny-gpt2")
    # a Hugging Face id whose config.json is in the local cache: the cached config's depth, not the published one
    snapshot = isolated / "hf" / "models--openai-community--gpt2" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 6}))
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("a" * 40)
    code, payload, _ = _hparams_cli(capsys, "--model", "gpt2", "--editor", "rome", "--json")
    assert code == 0 and payload["values"]["layer"] == 2 and payload["symbolic"] == {"layer": "17/48"}
    assert payload["config"].endswith("config.json")
    code, payload, _ = _hparams_cli(capsys, "--model", "gpt2", "--editor", "rome", "--set", "layer=8", "--json")
    assert code == 1 and payload["problems"] == ["layer: layer 8 is out of range for a model with 6 layers"]
    code, payload, _ = _hparams_cli(capsys, "--model", "gpt2", "--editor", "rome", "--set", "layer=5", "--json")
    assert code == 0 and (payload["values"]["layer"], payload["sources"]["layer"]) == (5, "overrides")
    # a form no model takes
    code, payload, _ = _hparams_cli(capsys, "--model", "gpt2", "--editor", "rome", "--set", 'layer="48/48"', "--json")
    assert code == 1 and payload["problems"] == ["layer: layer '48/48': 'K/N' is layer K of N layers, so K must be "
                                                 "below N"]


def test_hparams_command_layers_a_named_set_a_user_file_and_overrides(isolated: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    code, payload, _ = _hparams_cli(capsys, "--model", "gpt2-xl", "--editor", "rome", "--hparams", "kmeng01",
                                    "--set", "kl_prompt={} was a", "--set", "v_lr=0.25", "--json")
    assert code == 0 and payload["values"]["mom2_adjustment"] is True
    assert payload["sources"]["mom2_adjustment"] == "editors/hparams/rome/kmeng01/gpt2-xl.json"
    assert (payload["values"]["kl_prompt"], payload["values"]["v_lr"]) == ("{} was a", 0.25)
    assert [layer["role"] for layer in payload["layers"]] == ["built-in", "named", "overrides"]
    user = isolated / "mine.json"
    user.write_text(json.dumps({"_comment": "mine", "v_num_grad_steps": 7}))
    code, text, _ = _hparams_cli(capsys, "--model", "gpt2-xl", "--editor", "memit", "--hparams", str(user))
    assert code == 0 and re.search(rf"\| v_num_grad_steps +\| 7 +\| {re.escape(str(user))}", text)
    assert "editors/hparams/memit/gpt2-xl.json" in text and PAPERS_COMMIT in text
    # --hparams repeats: the named set, then the user's file over it
    code, payload, _ = _hparams_cli(capsys, "--model", "gpt2-xl", "--editor", "rome", "--hparams", "kmeng01",
                                    "--hparams", str(user), "--json")
    assert code == 0 and [layer["role"] for layer in payload["layers"]] == ["built-in", "named", "user"]
    assert (payload["values"]["mom2_adjustment"], payload["values"]["v_num_grad_steps"]) == (True, 7)
    assert payload["sources"]["v_num_grad_steps"] == str(user)
    # the named set's GPT-2 layer is a share of the depth on any GPT-2, an organism too (its 6 layers: 2, not the
    # organism's causal layer)
    code, payload, _ = _hparams_cli(capsys, "--model", "tiny-gpt2", "--editor", "rome", "--hparams", "kmeng01", "--json")
    assert code == 0 and payload["values"]["layer"] == 2 and payload["symbolic"] == {"layer": "17/48"}
    assert payload["sources"]["layer"] == "editors/hparams/rome/kmeng01/gpt2.json"


@pytest.mark.parametrize(("args", "message"), [
    (("--model", "no-such-model", "--editor", "rome"), "unknown model 'no-such-model'"),
    (("--model", "gpt2-xl", "--editor", "romee"), "unknown editor 'romee'; available: alphaedit, c-rome"),
    (("--model", "llama2-7b", "--editor", "rome", "--hparams", "kmeng01"), "have no file for model 'llama2-7b'"),
    (("--model", "gpt2-xl", "--editor", "rome", "--set", "lr=1"), "overrides: unknown hyper-parameter 'lr'"),
    (("--model", "gpt2-xl", "--editor", "rome", "--set", "layer"), "--set 'layer': expected KEY=VALUE"),
])
def test_hparams_command_errors_exit_2_with_one_line(isolated: Path, capsys: pytest.CaptureFixture[str], args,
                                                     message: str) -> None:
    code, out, err = _hparams_cli(capsys, *args)
    assert code == 2 and not out
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_the_train_and_guard_commands_layer_their_hparams_too() -> None:
    from pytest_editsafety.cli import build_parser

    parser = build_parser()
    for command in (["train", "--editor", "mend", "--model", "gpt2-xl"],
                    ["guard", "--editor", "rome", "--model", "gpt2-xl", "--cases", "normal"]):
        args = parser.parse_args([*command, "--hparams", "kmeng01", "--hparams", "my.json"])
        assert args.hparams == ["kmeng01", "my.json"], command
