"""The alphaedit, emmet and r-rome editors on a tiny random GPT-2 (no download), and r-rome against c-rome on the
organism: what each writes, what it leaves alone, and what it reports."""

from __future__ import annotations

import math

import pytest
import torch

from editors.alphaedit import AlphaEditEditor, AlphaEditHparams
from editors.base import EditRequest, Provided
from editors.emmet import EmmetEditor, EmmetHparams
from editors.ft import target_nll
from editors.hparams import load_hparams, schema_for
from editors.maths import as_out_in
from editors.maths.rome import second_moment
from editors.builtin import make_r_rome
from editors.registry import available_editors, get_editor
from editors.restore import edit_session
from tests.test_memit_ft import CONTEXTS, CORPUS, REQUESTS, _changed, _family, _model, _snapshot, _tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# loose z settings under which edits show on a random model (as tests/test_memit_ft.py's MEMIT_HP)
Z_HP = dict(clamp_norm_factor=4.0, v_weight_decay=1e-3, v_num_grad_steps=20)


@pytest.fixture(scope="module")
def tokenizer():
    return _tokenizer("gpt2")


@pytest.fixture()
def model(tokenizer):
    return _model("gpt2", len(tokenizer))


def _corpus_moment(model, tokenizer, layer: int) -> torch.Tensor:
    """C from the keys of every token of the corpus at ``layer`` (what the harness's statistics pass does)."""
    from editors.hooks import capture_input

    family = _family(model)
    store: dict[str, torch.Tensor] = {}
    module = family.get_module(model, family.layer_name("mlp_out", layer))
    keys = []
    for text in CORPUS:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad(), capture_input(module, store):
            model(input_ids=ids)
        keys.append(store["input"].reshape(-1, store["input"].shape[-1]))
    return second_moment(torch.cat(keys), dtype=torch.float64)


def _weight(model, layer: int) -> torch.Tensor:
    family = _family(model)
    w = family.get_module(model, family.layer_name("mlp_out", layer)).weight
    return as_out_in(w.detach(), family.weight_transposed).double().clone()


# ---------------------------------------------------------------------------------------------- registry


def test_the_three_are_builtin_entry_points_with_hparams_files() -> None:
    assert {"alphaedit", "emmet", "r-rome"} <= set(available_editors())
    for name, key in (("alphaedit", "gpt2-xl"), ("emmet", "gpt2-xl"), ("r-rome", "gpt2-xl"), ("alphaedit", "tiny-gpt2"),
                      ("emmet", "tiny-gpt2"), ("r-rome", "tiny-gpt2")):
        assert schema_for(name) is not None
        values = load_hparams(name, key)
        if name != "r-rome":
            values = {**values, "layers": [0]}
        else:
            values = {**values, "layer": 0}
        assert get_editor(name, values).name == name
    # the papers' numbers, as published
    ae = load_hparams("alphaedit", "gpt2-xl")
    assert (ae["layers"], ae["nullspace_threshold"], ae["l2"]) == ([13, 14, 15, 16, 17], 0.02, 10.0)
    em = load_hparams("emmet", "gpt2-xl")
    assert (em["layers"], em["mom2_update_weight"], em["emmet_lambda"]) == ([17], 1000.0, 0.1)
    assert load_hparams("emmet", "gpt-j")["mom2_update_weight"] == 1.0
    rr = load_hparams("r-rome", "gpt-j")
    assert (rr["layer"], rr["mom2_adjustment"]) == (5, True)


def test_hparams_domains_are_checked_by_name() -> None:
    with pytest.raises(ValueError, match="AlphaEditHparams.mom2_adjustment"):
        AlphaEditHparams(layers=(0,), mom2_adjustment=False)
    with pytest.raises(ValueError, match="AlphaEditHparams.nullspace_threshold"):
        AlphaEditHparams(layers=(0,), nullspace_threshold=-1.0)
    with pytest.raises(ValueError, match="EmmetHparams.emmet_lambda"):
        EmmetHparams(layers=(0,), emmet_lambda=math.nan)
    with pytest.raises(ValueError, match="EmmetHparams.mom2_update_weight"):
        EmmetHparams(layers=(0,), mom2_update_weight=0.0)


# ---------------------------------------------------------------------------------------------- EMMET


@pytest.mark.parametrize("n_requests", [1, 3])
def test_emmet_writes_every_request_exactly_and_reports_its_denominator(model, tokenizer, n_requests: int) -> None:
    family = _family(model)
    C = _corpus_moment(model, tokenizer, 0)
    # C from three sentences is nearly singular in 128 dimensions: update_norm_lambda (EMMET's μ) keeps C' = C + μI
    # from steering u into directions no text uses, which the bare prompt's key does not share either
    editor = EmmetEditor(EmmetHparams(layers=(0,), mom2_update_weight=1.0, update_norm_lambda=1.0, emmet_lambda=0.0,
                                      **Z_HP))
    editor.setup(model, tokenizer, family, Provided(context_templates=CONTEXTS, second_moments={0: C}))
    requests = list(REQUESTS[:n_requests])
    before = _snapshot(model)
    nll_before = target_nll(model, tokenizer, requests)
    reports = [editor.denominator(model, tokenizer, family, r) for r in requests]

    outcome = editor.apply(model, tokenizer, family, requests)

    assert _changed(before, model) == set(editor.parameters_touched(model, family))
    d = outcome.diagnostics
    assert d["constraint_error_L0"] < 1e-5  # (W + ΔW) kᵢ = W kᵢ + rᵢ for each request of the batch
    assert d["d_n_requests_L0"] == n_requests
    # the one-request report is what a one-request edit divides by (the harness compares the two)
    if n_requests == 1:
        assert math.isclose(d["denominator"], reports[0]["denominator"], rel_tol=1e-6)
        assert reports[0]["d_condition"] == 1.0
    assert all(set(r) >= {"denominator", "d_min_eigenvalue", "d_min_diagonal", "d_condition"} for r in reports)
    nll_after = target_nll(model, tokenizer, requests)
    assert sum(nll_after) < sum(nll_before) - 0.05 * n_requests


# ---------------------------------------------------------------------------------------------- AlphaEdit


def test_alphaedit_needs_c_and_leaves_the_preserved_span_alone(model, tokenizer) -> None:
    family = _family(model)
    hp = AlphaEditHparams(layers=(0,), nullspace_threshold=1e-3, l2=1.0, **Z_HP)
    needless = AlphaEditEditor(hp)
    assert needless.needs(model, family).second_moments.layers == (0,)
    needless.setup(model, tokenizer, family, Provided(context_templates=CONTEXTS))
    with pytest.raises(ValueError, match="no second moment C for layer 0"):
        needless.apply(model, tokenizer, family, list(REQUESTS[:1]))

    C = _corpus_moment(model, tokenizer, 0)
    editor = AlphaEditEditor(hp)
    editor.setup(model, tokenizer, family, Provided(context_templates=CONTEXTS, second_moments={0: C}))
    W0 = _weight(model, 0)
    outcome = editor.apply(model, tokenizer, family, list(REQUESTS[:2]))
    delta = _weight(model, 0) - W0
    # ΔW = ΔW P and ‖P C‖₂ < threshold: what the statistics' keys read through the layer barely moves
    assert float(torch.linalg.matrix_norm(delta @ C)) <= 1e-3 * float(torch.linalg.matrix_norm(delta)) * 1.01
    assert float(torch.linalg.matrix_norm(delta)) > 0
    assert 0 < outcome.diagnostics["nullspace_rank_L0"] < C.shape[0]
    assert outcome.diagnostics["previous_edits"] == 0


def test_alphaedit_keeps_earlier_keys_in_a_sequence_and_forgets_them_after_a_restore(model, tokenizer) -> None:
    family = _family(model)
    C = _corpus_moment(model, tokenizer, 0)
    editor = AlphaEditEditor(AlphaEditHparams(layers=(0,), nullspace_threshold=1e-3, l2=1.0, **Z_HP))
    editor.setup(model, tokenizer, family, Provided(context_templates=CONTEXTS, second_moments={0: C}))
    with edit_session(model, editor.parameters_touched(model, family)):
        first = editor.apply(model, tokenizer, family, [REQUESTS[0]])
        second = editor.apply(model, tokenizer, family, [REQUESTS[1]])
        assert (first.diagnostics["previous_edits"], second.diagnostics["previous_edits"]) == (0, 1)
        assert set(editor.previous_keys) == {0}
    # restored: the next edit starts a new sequence, as the official run starts with an empty cache
    again = editor.apply(model, tokenizer, family, [REQUESTS[2]])
    assert again.diagnostics["previous_edits"] == 0


# ---------------------------------------------------------------------------------------------- r-ROME


def test_r_rome_edits_with_the_official_update_on_its_own_measurements(model, tokenizer) -> None:
    family = _family(model)
    C = _corpus_moment(model, tokenizer, 0).float()
    editor = make_r_rome(dict(layer=0, mom2_adjustment=True, clamp_norm_factor=4.0, v_weight_decay=1e-3))
    assert editor.name == "r-rome" and editor.consistent and not editor.test_prefix
    editor.setup(model, tokenizer, family, Provided(context_templates=CONTEXTS, second_moments={0: C}))
    request = REQUESTS[0]
    inputs = editor.measure(model, tokenizer, family, request)  # deterministic: the edit measures the same
    W0 = _weight(model, 0).float()
    # rebuilding-rome compute_u/compute_v: u = C⁻¹k̄/‖C⁻¹k̄‖, right = (out_bare + δ − mean out) / (k̄ᵀu)
    u = torch.linalg.solve(C.double(), inputs.k_mean.double())
    u = u / u.norm()
    right = (inputs.out_bare.double() + inputs.delta.double() - inputs.out_mean.double()) / (inputs.k_mean.double() @ u)
    expected = torch.outer(right, u).float()
    report = editor.denominator(model, tokenizer, family, request)
    outcome = editor.apply(model, tokenizer, family, [request])
    assert torch.allclose(_weight(model, 0).float() - W0, expected, atol=1e-5 * float(expected.abs().max()) + 1e-7)
    # keys are C-ROME's: the mean key in the update and in the reported denominator, which the edit divides by
    assert outcome.diagnostics["key_convention"] == "mean"
    assert math.isclose(outcome.diagnostics["denominator"], report["denominator"], rel_tol=1e-5)
    with pytest.raises(ValueError, match="one request at a time"):
        editor.apply(model, tokenizer, family, list(REQUESTS[:2]))


def test_r_rome_refuses_the_other_value_anchor() -> None:
    with pytest.raises(ValueError, match="c_rome_target"):
        make_r_rome(dict(layer=0, c_rome_target="mean"))


@pytest.mark.organism
@pytest.mark.xdist_group("tiny-gpt2")
def test_r_rome_equals_c_rome_with_the_bare_anchor_on_the_organism() -> None:
    """r-ROME is C-ROME as the collapse papers' fork computes it: with the same hparams, c-rome's ΔW is r-rome's
    on the organism, so r-rome is a name for c-rome (with files of its own)."""
    from editors.provision import SimpleProvider, set_up
    from editors.registry import build_editor
    from pytest_editsafety.organisms import hparams_keys
    from pytest_editsafety.registry import load_model

    torch.set_num_threads(1)
    loaded = load_model("tiny-gpt2")
    model, tokenizer, family = loaded.model, loaded.tokenizer, loaded.family
    deltas = {}
    for name in ("c-rome", "r-rome"):
        editor = build_editor(name, hparams_keys(loaded), model, overrides={"mom2_adjustment": False,
                                                                             "c_rome_target": "bare"})
        set_up(editor, model, tokenizer, family, SimpleProvider(model, tokenizer))
        layer = editor.hparams.layer
        W0 = _weight(model, layer)
        with edit_session(model, editor.parameters_touched(model, family)):
            editor.apply(model, tokenizer, family, [EditRequest("Fimeth", "{} lives in the city of", "Paris")])
            deltas[name] = _weight(model, layer) - W0
    assert torch.equal(deltas["c-rome"], deltas["r-rome"])
