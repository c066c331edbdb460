"""ROME and C-ROME step for step as the papers' code (issue 17): the three rules that moved certified numbers.

1. v*'s search stops on its *whole* loss (NLL + KL + weight decay) below 5e-2, as compute_v's
   ``if loss < 5e-2: break``; the NLL alone is the named variant ``early_stop_on="nll"``.
2. C-ROME maps ``k̄`` to the bare prompt's value plus ``δ``: the fork's residual is (output of the bare prompt
   + δ − mean output over the templates), i.e. ``δ + W(kᵘ − k̄)``; ``c_rome_target="mean"`` is the variant.
3. A context template's length counts its start word (and a tokenizer's own first token), as generate_fast's
   ``max_out_len`` bounds the whole sequence; ``count // 5`` prefixes per start word, start word by start word.

The models are test_memit_ft's tiny random GPT-2 and Llama (a BPE tokenizer trained here; Llama's adds <s>).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import editors.value_search as value_search_module
from editors.base import Provided
from editors.context import START_WORDS, prefixes_per_start_word, sample_context_templates
from editors.maths import MathsError, as_out_in
from editors.maths.rome import rome_update, value_search_stops, value_target
from editors.rome import RomeEditor, RomeHparams, keys_and_outputs, search_value_delta
from tests.test_memit_ft import ARCHS, CONTEXTS, REQUESTS, _family, _model, _tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def tokenizer(arch: str):
    return _tokenizer(arch)


# ------------------------------------------------------------------------------------ 1. the early stop


def test_the_early_stop_tests_the_whole_loss_by_default() -> None:
    # the target is learned (NLL 0.01) but the decay keeps the whole loss at 0.3: ROME's code goes on
    assert not value_search_stops(0.01, 0.3, below=0.05)
    assert value_search_stops(0.01, 0.04, below=0.05)
    assert value_search_stops(0.01, 0.3, below=0.05, on="nll")
    assert not value_search_stops(0.06, 0.04, below=0.05, on="nll")
    with pytest.raises(MathsError, match="on"):
        value_search_stops(0.01, 0.3, below=0.05, on="kl")  # type: ignore[arg-type]


def test_the_hparams_default_to_romes_rules_and_reject_unknown_ones() -> None:
    hp = RomeHparams(layer=0)
    assert (hp.early_stop_on, hp.early_stop_below, hp.c_rome_target) == ("loss", 0.05, "bare")
    with pytest.raises(ValueError, match="early_stop_on"):
        RomeHparams(layer=0, early_stop_on="kl")
    with pytest.raises(ValueError, match="c_rome_target"):
        RomeHparams(layer=0, c_rome_target="templates")
    assert hp.mom2_ridge == 0.0  # ROME solves C u = k̄ as it is
    with pytest.raises(ValueError, match="mom2_ridge"):
        RomeHparams(layer=0, mom2_ridge=-1e-4)


def _search(model, tokenizer, hp: RomeHparams, monkeypatch=None, record=None):
    family = _family(model)
    request = REQUESTS[0]
    _, outputs, _ = keys_and_outputs(model, tokenizer, family, hp.layer, CONTEXTS, request)
    if record is not None:
        def recording(nll, loss, *, below, on="loss"):
            record.append((nll, loss))
            return value_search_stops(nll, loss, below=below, on=on)

        monkeypatch.setattr(value_search_module, "value_search_stops", recording)
    return search_value_delta(model, tokenizer, family, hp, CONTEXTS, request, outputs[0])


def test_a_search_whose_decay_stays_above_the_threshold_runs_every_step(arch, tokenizer, monkeypatch) -> None:
    """The case the issue measured: the target's NLL drops below the threshold while the decay term keeps the
    whole loss above it. ROME's rule runs all steps; the NLL variant stops at that step."""
    model = _model(arch, len(tokenizer))
    steps = 8
    base = dict(layer=0, v_num_grad_steps=steps, v_weight_decay=1e4, clamp_norm_factor=50.0)
    record: list[tuple[float, float]] = []
    full = _search(model, tokenizer, RomeHparams(**base, early_stop_below=0.0), monkeypatch, record)
    assert full.steps == steps and len(record) == steps
    assert math.isclose(record[0][0], record[0][1], rel_tol=1e-6)  # δ = 0 at the first pass: no KL, no decay
    assert all(loss > nll for nll, loss in record[1:])  # the whole loss is what the rule is handed
    assert (full.nll, full.loss) == record[-1]
    (nll0, _), (nll1, loss1) = record[0], record[1]
    assert nll1 < nll0 < loss1, record[:2]  # the first step lowered the NLL; the decay took the loss above it
    below = (nll0 + nll1) / 2  # passed by the NLL at the second pass, never by the whole loss
    assert all(loss > below for _, loss in record)
    monkeypatch.undo()
    by_loss = _search(model, tokenizer, RomeHparams(**base, early_stop_below=below))
    by_nll = _search(model, tokenizer, RomeHparams(**base, early_stop_below=below, early_stop_on="nll"))
    assert by_loss.steps == steps
    assert torch.equal(by_loss.delta, full.delta)
    assert by_nll.steps == 2 and by_nll.nll < below
    assert not torch.equal(by_nll.delta, by_loss.delta)


# ------------------------------------------------------------------------------------ 2. C-ROME's residual


def _problem(seed: int = 0, d_out: int = 5, d_in: int = 4):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(d_out, d_in, generator=g, dtype=torch.float64), torch.randn(d_in, generator=g,
            dtype=torch.float64), torch.randn(d_in, generator=g, dtype=torch.float64),
            torch.randn(d_out, generator=g, dtype=torch.float64))


def test_c_rome_maps_the_mean_key_to_the_bare_prompts_value_plus_delta() -> None:
    W, k_bare, k_bar, delta = _problem()
    v_star = value_target(W, k_bare, k_bar, delta, consistent=True)
    assert torch.allclose(v_star, W @ k_bare + delta)
    update = rome_update(W, k_bare, k_bar, v_star, consistent=True)
    u = k_bar / k_bar.norm()  # C = I
    residual = delta + W @ (k_bare - k_bar)  # the fork's (out_bare + δ) − out_mean, the bias cancelling
    assert torch.allclose(update.delta, torch.outer(residual, u) / torch.dot(u, k_bar))
    assert math.isclose(update.numerator_norm, float(residual.norm()), rel_tol=1e-12)
    assert torch.allclose((W + update.delta) @ k_bar, W @ k_bare + delta)


def test_the_mean_anchor_variant_and_rome_itself() -> None:
    W, k_bare, k_bar, delta = _problem(1)
    mean = value_target(W, k_bare, k_bar, delta, consistent=True, anchor="mean")
    assert torch.allclose(mean - W @ k_bar, delta)  # residual δ: the project's earlier C-ROME
    for anchor in ("bare", "mean"):  # ROME edits kᵘ: its residual is δ whatever the C-ROME anchor
        v_star = value_target(W, k_bare, k_bar, delta, consistent=False, anchor=anchor)
        update = rome_update(W, k_bare, k_bar, v_star, consistent=False)
        assert torch.allclose((W + update.delta) @ k_bare, W @ k_bare + delta)
        assert math.isclose(update.numerator_norm, float(delta.norm()), rel_tol=1e-12)
    with pytest.raises(MathsError, match="anchor"):
        value_target(W, k_bare, k_bar, delta, consistent=True, anchor="templates")  # type: ignore[arg-type]


@pytest.mark.parametrize(("target", "papers"), [("bare", True), ("mean", False)])
def test_c_rome_edit_uses_the_forks_residual_from_measured_outputs(arch, tokenizer, target, papers) -> None:
    """On a model: the numerator is ‖out_bare + δ − out_mean‖ (outputs read at the MLP, bias and all), as the
    fork's compute_v computes it; the variant's is ‖δ‖."""
    model = _model(arch, len(tokenizer))
    family = _family(model)
    editor = RomeEditor("c-rome", RomeHparams(layer=0, v_num_grad_steps=4, c_rome_target=target), consistent=True)
    editor.setup(model, tokenizer, family, Provided(context_templates=CONTEXTS))
    (name,) = editor.parameters_touched(model, family)
    param = dict(model.named_parameters())[name]
    W0 = as_out_in(param.detach(), family.weight_transposed).float().clone()
    inputs = editor.measure(model, tokenizer, family, REQUESTS[0])
    outcome = editor.apply(model, tokenizer, family, [REQUESTS[0]])
    W1 = as_out_in(param.detach(), family.weight_transposed).float()
    forks = inputs.out_bare + inputs.delta - inputs.out_mean
    # the MLP's outputs are W k + b at each template: their difference is W's alone
    assert torch.allclose(forks, inputs.delta + W0 @ (inputs.k_bare - inputs.k_mean), atol=1e-4)
    residual = forks if papers else inputs.delta
    assert math.isclose(outcome.diagnostics["numerator"], float(residual.norm()), rel_tol=1e-4)
    assert torch.allclose(W1 @ inputs.k_mean, W0 @ inputs.k_mean + residual, atol=1e-3)
    assert outcome.diagnostics["v_steps"] == inputs.steps


# ------------------------------------------------------------------------------------ 3. template lengths


class _CountingModel(torch.nn.Module):
    """A stand-in language model that records each input's length; uniform logits, so top-k sampling picks one of
    the first ``top_k`` tokens."""

    def __init__(self, vocab: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.vocab = vocab
        self.lengths: list[int] = []

    def forward(self, input_ids):
        self.lengths.append(int(input_ids.shape[1]))
        return SimpleNamespace(logits=torch.zeros(1, input_ids.shape[1], self.vocab))


def _prefix_lengths(calls: list[int], starts: list[int]) -> list[int]:
    """Split the recorded input lengths into prefixes (each starts at its start word's token count) and return
    each prefix's final length: its last input plus the token sampled from it."""
    out, i = [], 0
    for start in starts:
        n = 0
        while i < len(calls) and calls[i] == start + n:
            i, n = i + 1, n + 1
        out.append(start + n)
    assert i == len(calls)
    return out


def test_template_lengths_count_the_start_word(arch, tokenizer) -> None:
    recipe = ((5, 10), (10, 10))
    model = _CountingModel(len(tokenizer))
    templates = sample_context_templates(model, tokenizer, recipe)
    assert templates[0] == "{}" and len(templates) == 21 and all(t.endswith(". {}") for t in templates[1:])
    start_tokens = {w: len(tokenizer(w)["input_ids"]) for w in START_WORDS}
    if arch == "llama":  # the tokenizer's <s> is part of the count, as in generate_fast
        assert all(n >= 2 for n in start_tokens.values())
    order = [w for _, count in recipe for w, n in zip(START_WORDS, prefixes_per_start_word(count)) for _ in range(n)]
    assert order[:4] == ["The", "The", "Therefore", "Therefore"]  # start word by start word, as the papers batch
    lengths = _prefix_lengths(model.lengths, [start_tokens[w] for w in order])
    assert lengths == [max(5, start_tokens[w]) for w in order[:10]] + [max(10, start_tokens[w]) for w in order[10:]]
    for template, word in zip(templates[1:], order):
        assert template.startswith(word)


def test_prefixes_per_start_word_are_the_papers_n_gen_over_five() -> None:
    assert prefixes_per_start_word(10) == (2, 2, 2, 2, 2)
    assert prefixes_per_start_word(5) == (1, 1, 1, 1, 1)
    # the papers' n_gen // 5 would drop the remainder; here it goes to the first words
    assert prefixes_per_start_word(7) == (2, 2, 1, 1, 1)
    assert prefixes_per_start_word(3) == (1, 1, 1, 0, 0)
    assert prefixes_per_start_word(0) == (0, 0, 0, 0, 0)


def test_a_start_word_longer_than_the_length_is_kept_whole(tokenizer) -> None:
    model = _CountingModel(len(tokenizer))
    templates = sample_context_templates(model, tokenizer, ((1, 5),))
    assert model.lengths == []  # nothing sampled: every start word is already >= 1 token
    assert list(templates[1:]) == [f"{w}. {{}}" for w in START_WORDS]
