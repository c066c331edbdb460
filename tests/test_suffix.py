"""v*'s search over a cached prefix (editors.suffix, ``v_cached_prefix``) gives the plain full-forward search's
numbers: the suffix pass's logits, the optimised δ and the weight update agree to 1e-5 relative on random models of
the three families, on the three organisms, and on a GPT-2-shaped (124M) random model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPTJConfig, GPTJForCausalLM, LlamaConfig, LlamaForCausalLM

from editors.base import EditRequest
from editors.families import family_for_model_type
from editors.memit import MemitHparams
from editors.provision import SimpleProvider, set_up
from editors.restore import edit_session
from editors.rome import RomeHparams, keys_and_outputs, search_value_delta
from editors.suffix import split_rows
from tests.test_memit_ft import CONTEXTS, REQUESTS, _tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RELATIVE = 1e-5


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _random_model(arch: str, vocab: int, *, layers: int = 2, width: int = 64, heads: int = 2):
    torch.manual_seed(0)
    if arch == "gpt2":
        config = GPT2Config(n_layer=layers, n_embd=width, n_head=heads, n_inner=4 * width, vocab_size=vocab,
                            n_positions=64, bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(config).eval()
    if arch == "gptj":
        config = GPTJConfig(n_layer=layers, n_embd=width, n_head=heads, rotary_dim=width // heads // 2,
                            n_inner=4 * width, vocab_size=vocab, n_positions=64, bos_token_id=0, eos_token_id=0)
        return GPTJForCausalLM(config).eval()
    config = LlamaConfig(num_hidden_layers=layers, hidden_size=width, num_attention_heads=heads,
                         num_key_value_heads=heads, intermediate_size=2 * width, vocab_size=vocab,
                         max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("arch", ["gpt2", "gptj", "llama"])
def test_the_suffix_pass_gives_the_full_passs_logits(arch: str) -> None:
    """Rows of different lengths, starts anywhere (0, mid-row, the last token): every suffix position's logits
    are the full right-padded pass's at the same position."""
    torch.manual_seed(1)
    model = _random_model(arch, 300)
    lengths = [9, 4, 12, 7, 1]
    starts = [0, 3, 5, 6, 0]
    ids = torch.randint(0, 300, (len(lengths), max(lengths)))
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = 0
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        batch = split_rows(model, ids, lengths, starts)
        suffix = batch.logits(model)
    for i, (n, s) in enumerate(zip(lengths, starts)):
        assert _relative(suffix[i, : n - s], full[i, s:n]) < RELATIVE, (arch, i)
    assert [batch.column(i, s + 1) for i, s in enumerate(starts)] == [1] * len(starts)
    with pytest.raises(ValueError, match="row 1: position 2 falls before the suffix's start 3"):
        batch.column(1, 2)


@pytest.mark.parametrize("arch", ["gpt2", "gptj", "llama"])
def test_fixed_blocks_are_run_once_and_replayed(arch: str) -> None:
    """The blocks below the edited layer run at the split only: afterwards their weights can be anything, the suffix
    logits stay the full pass's; a forward the caller set on a block (accelerate's hooks do) comes back."""
    torch.manual_seed(2)
    model = _random_model(arch, 300, layers=3)
    family = family_for_model_type(model.config.model_type)
    blocks = [family.get_module(model, family.layer_name("block", i)) for i in range(2)]
    lengths, starts = [9, 4, 12], [2, 3, 0]
    ids = torch.randint(2, 300, (3, 12))
    mask = (torch.arange(12)[None, :] < torch.tensor(lengths)[:, None]).long()
    sentinel = blocks[1].forward
    blocks[1].forward = sentinel  # an instance attribute, as accelerate leaves one
    above = family.get_module(model, family.layer_name("block", 2))
    calls = []
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        handle = above.register_forward_pre_hook(lambda *_: calls.append(1))
        batch = split_rows(model, ids, lengths, starts, fixed_blocks=blocks)
        handle.remove()
        # the prefix pass runs the block above once; the pass that records the fixed blocks stops below it
        assert len(calls) == 1
        for block in blocks:
            for p in block.parameters():
                p.fill_(float("nan"))
        suffix = batch.logits(model)
    for i, (n, s) in enumerate(zip(lengths, starts)):
        assert _relative(suffix[i, : n - s], full[i, s:n]) < RELATIVE, (arch, i)
    assert blocks[1].__dict__["forward"] is sentinel and "forward" not in blocks[0].__dict__


@pytest.mark.parametrize("arch", ["gptj", "llama"])
def test_a_search_above_the_first_layer_is_the_plain_one(arch: str) -> None:
    """The edit at layer 2 of 4 (not the last: there no later position sees δ, the target's gradient is zero and
    Adam's first steps turn rounding into direction)."""
    tokenizer = _tokenizer("gpt2")
    model = _random_model(arch, len(tokenizer), layers=4)
    plain, cached = _searches(model, tokenizer, RomeHparams(layer=2, v_num_grad_steps=4), CONTEXTS, REQUESTS[0])
    assert cached.steps == plain.steps == 4
    assert _relative(cached.delta, plain.delta) < RELATIVE


def test_a_split_refuses_a_start_outside_its_row() -> None:
    model = _random_model("gpt2", 300)
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="inside its row"):
        split_rows(model, ids, [5, 3], [0, 3])


def test_the_switch_is_a_boolean_and_on_by_default() -> None:
    assert RomeHparams(layer=0).v_cached_prefix is True
    assert MemitHparams(layers=(0,)).value_hparams().v_cached_prefix is True
    assert MemitHparams(layers=(0,), v_cached_prefix=False).value_hparams().v_cached_prefix is False
    with pytest.raises(ValueError, match="v_cached_prefix"):
        RomeHparams(layer=0, v_cached_prefix="yes")  # type: ignore[arg-type]


def _searches(model, tokenizer, hp: RomeHparams, contexts, request: EditRequest):
    family = family_for_model_type(model.config.model_type)
    _, outputs, _ = keys_and_outputs(model, tokenizer, family, hp.layer, contexts, request)
    return [search_value_delta(model, tokenizer, family, dataclasses.replace(hp, v_cached_prefix=cached),
                               contexts, request, outputs[0]) for cached in (False, True)]


def test_a_gpt2_shaped_models_value_search_is_the_plain_ones() -> None:
    """GPT-2 small's shape (12 layers, 768 wide, 12 heads; random weights, the tokenizer of test_memit_ft), the
    edit at layer 5 (the benchmarks' GPT-2 small layer): δ after a few steps of the search is the plain search's."""
    tokenizer = _tokenizer("gpt2")
    model = _random_model("gpt2", len(tokenizer), layers=12, width=768, heads=12)
    hp = RomeHparams(layer=5, v_num_grad_steps=4)
    for request in REQUESTS[:2]:
        plain, cached = _searches(model, tokenizer, hp, CONTEXTS, request)
        assert cached.steps == plain.steps == 4
        assert _relative(cached.delta, plain.delta) < RELATIVE
        assert cached.loss == pytest.approx(plain.loss, rel=RELATIVE)


ORGANISMS = [pytest.param(name, marks=[pytest.mark.organism, pytest.mark.xdist_group(name)], id=name)
             for name in ("tiny-gpt2", "tiny-gptj", "tiny-llama")]


@pytest.fixture(scope="module", params=ORGANISMS)
def organism(request):
    from pytest_editsafety.registry import load_model, resolve_model

    return load_model(resolve_model(request.param))


def _weight_update(loaded, editor_name: str, cached: bool, request: EditRequest) -> tuple[torch.Tensor, dict]:
    """The parameter change one edit makes (C = I, so no statistics are needed), the model restored after."""
    from editors.registry import build_editor
    from pytest_editsafety.organisms import hparams_keys

    model, tokenizer, family = loaded.model, loaded.tokenizer, loaded.family
    editor = build_editor(editor_name, hparams_keys(loaded), model,
                          overrides={"v_cached_prefix": cached, "mom2_adjustment": False})
    set_up(editor, model, tokenizer, family, SimpleProvider(model, tokenizer))
    (name,) = editor.parameters_touched(model, family)[:1]
    before = dict(model.named_parameters())[name].detach().clone()
    with edit_session(model, editor.parameters_touched(model, family)):
        outcome = editor.apply(model, tokenizer, family, [request])
        after = dict(model.named_parameters())[name].detach().clone()
    return after - before, outcome.diagnostics


@pytest.mark.parametrize("editor_name", ["rome", "memit"])
def test_an_organisms_edit_is_the_plain_searchs_edit(organism, editor_name: str) -> None:
    """The organism's own settings (40 v* steps for ROME, 60 z steps for MEMIT), one hard case (the subject opens
    the prompt) and one normal: the weight update and v*'s final loss agree to 1e-5."""
    from pytest_editsafety.cases import resolve_cases

    for set_name in ("hard", "normal"):
        case = resolve_cases(set_name).cases[0]
        request = EditRequest(case.subject, case.prompt, case.target_new)
        plain, plain_diag = _weight_update(organism, editor_name, False, request)
        cached, cached_diag = _weight_update(organism, editor_name, True, request)
        assert float(plain.norm()) > 0
        assert _relative(cached, plain) < RELATIVE, (organism.spec.name, editor_name, set_name)
        for key in ("v_steps", "v_final_loss", "final_nll"):
            if key in plain_diag:
                assert cached_diag[key] == pytest.approx(plain_diag[key], rel=RELATIVE), key


@pytest.mark.organism
@pytest.mark.xdist_group("tiny-gptj")
@pytest.mark.parametrize("cached", [False, True], ids=["plain", "cached"])
def test_searches_run_together_are_each_the_search_run_alone(cached: bool, one_torch_thread) -> None:
    """tiny-gptj's searches for these cases stop at different steps (all 40, 26 and 6 of them, with the early stop
    on the NLL): run in one batch, each request keeps the δ, losses and step count of its own search."""
    from pytest_editsafety.cases import resolve_cases
    from pytest_editsafety.registry import load_model, resolve_model

    from editors.context import sample_context_templates
    from editors.value_search import search_value_deltas

    loaded = load_model(resolve_model("tiny-gptj"))
    model, tokenizer, family = loaded.model, loaded.tokenizer, loaded.family

    contexts = sample_context_templates(model, tokenizer, ((5, 10), (10, 10)))
    cases = [resolve_cases("hard").by_id("hard-0002"), resolve_cases("hard").by_id("hard-0000"),
             resolve_cases("normal").by_id("normal-0005")]
    requests = [EditRequest(c.subject, c.prompt, c.target_new) for c in cases]
    outputs = [keys_and_outputs(model, tokenizer, family, 0, contexts, r)[1][0] for r in requests]
    hp = RomeHparams(layer=0, v_num_grad_steps=40, v_weight_decay=0.05, early_stop_on="nll", v_cached_prefix=cached)
    together = search_value_deltas(model, tokenizer, family, hp, contexts, requests, outputs)
    alone = [search_value_delta(model, tokenizer, family, hp, contexts, r, o) for r, o in zip(requests, outputs)]
    assert len({fit.steps for fit in alone}) == 3  # the point of the case choice: three different stops
    for a, t in zip(alone, together):
        assert t.steps == a.steps
        assert _relative(t.delta, a.delta) < RELATIVE
        assert t.loss == pytest.approx(a.loss, rel=RELATIVE) and t.nll == pytest.approx(a.nll, rel=RELATIVE)


@pytest.mark.parametrize("joins", [True, False], ids=["mlp-joins-residual", "mlp-scaled"])
def test_the_edited_block_runs_once_where_its_mlp_joins_the_residual(joins: bool) -> None:
    """Where the family's MLP output joins the residual stream as it is, δ is added to the edited block's output,
    recorded once at the split: the edited MLP runs in the prefix pass and the recording pass only. A family that
    says otherwise runs it at every step. Both give the plain search's δ."""
    tokenizer = _tokenizer("gpt2")
    model = _random_model("gpt2", len(tokenizer), layers=3)
    family = dataclasses.replace(family_for_model_type("gpt2"), mlp_joins_residual=joins)
    hp = RomeHparams(layer=1, v_num_grad_steps=4)
    request = REQUESTS[0]
    _, outputs, _ = keys_and_outputs(model, tokenizer, family, hp.layer, CONTEXTS, request)
    calls: list[int] = []
    mlp = family.get_module(model, family.layer_name("mlp", hp.layer))
    handle = mlp.register_forward_hook(lambda *_: calls.append(1))
    try:
        cached = search_value_delta(model, tokenizer, family, hp, CONTEXTS, request, outputs[0])
    finally:
        handle.remove()
    plain = search_value_delta(model, tokenizer, family, dataclasses.replace(hp, v_cached_prefix=False), CONTEXTS,
                               request, outputs[0])
    assert cached.steps == plain.steps == 4
    assert _relative(cached.delta, plain.delta) < RELATIVE
    # the prefix pass, then the recording pass (joins) or each of the 4 steps (the recording stops below it)
    assert len(calls) == (2 if joins else 1 + 4)
