"""MEMIT and FT-L∞ on tiny random GPT-2 and Llama models with a byte-level BPE tokenizer trained here.

The models are built from a config (2 layers, 64 wide, no download). Their weights are drawn at
``initializer_range=0.1`` rather than the default 0.02: at 0.02 a random model's next-token distribution
barely depends on its inputs, so no edit could visibly raise a target's probability.
"""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from editors.base import EditRequest, Needs, Provided, SecondMomentNeed
from editors.ft import FtHparams, FtLinfEditor, target_nll
from editors.maths import as_out_in
from editors.memit import MemitEditor, MemitHparams
from editors.provision import ProvisionError, SimpleProvider, set_up
from editors.restore import edit_session, model_digest, tensor_digest
from editors.families import family_for_model_type

ARCHS = ("gpt2", "llama")
CONTEXTS = ("{}", "The day was long. {}", "I think so. {}")
REQUESTS = (
    EditRequest("Danielle Darrieux", "{} is linked to", "Finland"),
    EditRequest("Toko Yasuda", "The music of {} is played on the", "violin"),
    EditRequest("Apple", "{} was acquired by", "Nokia"),
)
CORPUS = (
    "Danielle Darrieux is linked to France. Toko Yasuda plays the guitar. Apple was acquired by Microsoft.",
    "The music of Toko Yasuda is played on the guitar, not the violin. Nokia is a company in Finland.",
    "The day was long and the night was short. I think so, because you said so.",
)
# Settings under which edits show on a random model: a loose clamp and little decay on the target
# vector, and a small λ so that the isotropic stand-in for C does not dominate the update.
MEMIT_HP = dict(clamp_norm_factor=4.0, v_weight_decay=1e-3, mom2_update_weight=100.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tokenizer(arch: str) -> PreTrainedTokenizerFast:
    specials = ["<s>", "</s>"] if arch == "llama" else ["<|endoftext|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(CORPUS) * 4, trainer=trainer)
    if arch == "llama":
        # Llama's tokenizer prepends <s>: the editors must count it in every position they compute
        bos = ("<s>", tok.token_to_id("<s>"))
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[bos])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0], eos_token=specials[0])


@pytest.fixture(scope="module", params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def tokenizer(arch: str) -> PreTrainedTokenizerFast:
    return _tokenizer(arch)


def _model(arch: str, vocab: int):
    torch.manual_seed(0)
    if arch == "gpt2":
        config = GPT2Config(n_layer=2, n_embd=64, n_head=2, n_inner=128, vocab_size=vocab, n_positions=64,
                            initializer_range=0.1, bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(config).eval()
    config = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=vocab, max_position_embeddings=64,
                         initializer_range=0.1, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return LlamaForCausalLM(config).eval()


@pytest.fixture()
def model(arch: str, tokenizer):
    return _model(arch, len(tokenizer))


def _family(model):
    return family_for_model_type(model.config.model_type)


def _snapshot(model) -> dict[str, str]:
    return {name: tensor_digest(p) for name, p in model.named_parameters()}


def _changed(before: dict[str, str], model) -> set[str]:
    return {name for name, digest in _snapshot(model).items() if digest != before[name]}


def _memit(model, tokenizer, layers: tuple[int, ...], **overrides) -> MemitEditor:
    """MEMIT on the fixed CONTEXTS, given no C (the isotropic stand-in): set up directly, as a caller outside
    the harness that holds no statistics would."""
    editor = MemitEditor(MemitHparams(layers=layers, **{**MEMIT_HP, **overrides}))
    editor.setup(model, tokenizer, _family(model), Provided(context_templates=CONTEXTS))
    return editor


def _assert_plain(diagnostics) -> None:
    for key, value in diagnostics.items():
        assert type(value) in (float, int, str), f"{key}: {type(value).__name__}"


# ---------------------------------------------------------------------------------------------- FT-L∞


def test_ft_linf_stays_in_the_box_and_lowers_the_target_nll(model, tokenizer) -> None:
    family = _family(model)
    eps = 1e-3
    # lr well above eps: without the projection 10 Adam steps would move entries ~10x past the box
    editor = FtLinfEditor(FtHparams(layer=0, lr=5e-3, eps=eps, num_steps=10))
    (name,) = editor.parameters_touched(model, family)
    W0 = dict(model.named_parameters())[name].detach().clone()
    embed = family.get_module(model, family.embed).weight
    embed.requires_grad_(False)  # a caller's frozen parameter must stay frozen
    before_params = _snapshot(model)
    nll_before = target_nll(model, tokenizer, REQUESTS[:1])

    outcome = editor.apply(model, tokenizer, family, list(REQUESTS[:1]))

    W = dict(model.named_parameters())[name].detach()
    assert bool(torch.all(W >= W0 - eps)) and bool(torch.all(W <= W0 + eps))
    assert outcome.diagnostics["linf"] <= eps * (1 + 1e-5)
    assert outcome.diagnostics["linf"] >= 0.99 * eps  # the box was reached, so the projection did its job
    assert _changed(before_params, model) == {name}
    nll_after = target_nll(model, tokenizer, REQUESTS[:1])
    assert nll_after[0] < nll_before[0] - 0.05
    assert math.isclose(outcome.diagnostics["final_nll"], nll_after[0], rel_tol=1e-5)
    assert outcome.diagnostics["final_nll"] < outcome.diagnostics["initial_nll"]
    assert outcome.edited == (name,)
    _assert_plain(outcome.diagnostics)
    assert not embed.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if p is not embed)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("which", ["memit", "ft-linf"])
def test_editors_are_deterministic(arch: str, tokenizer, which: str) -> None:
    digests = []
    for _ in range(2):
        model = _model(arch, len(tokenizer))
        model.train()  # the editors must not depend on the mode they are handed the model in
        if which == "memit":
            editor = _memit(model, tokenizer, (0, 1))
        else:
            editor = FtLinfEditor(FtHparams(layer=1, lr=5e-3, eps=5e-3, num_steps=5))
        editor.apply(model, tokenizer, _family(model), list(REQUESTS))
        assert model.training
        digests.append(model_digest(model))
    assert digests[0] == digests[1]


# ---------------------------------------------------------------------------------------------- MEMIT


@pytest.mark.parametrize("n_requests", [1, 3])
def test_memit_edits_only_its_layers_and_raises_each_target(model, tokenizer, n_requests: int) -> None:
    family = _family(model)
    requests = list(REQUESTS[:n_requests])
    editor = _memit(model, tokenizer, (0,))
    before_params = _snapshot(model)
    nll_before = target_nll(model, tokenizer, requests)

    outcome = editor.apply(model, tokenizer, family, requests)

    assert _changed(before_params, model) == set(editor.parameters_touched(model, family))
    assert editor.parameters_touched(model, family) == (family.layer_name("mlp_out", 0) + ".weight",)
    nll_after = target_nll(model, tokenizer, requests)
    for request, before, after in zip(requests, nll_before, nll_after):
        assert after < before - 0.05, f"{request.subject}: target NLL {before:.3f} -> {after:.3f}"
    d = outcome.diagnostics
    _assert_plain(d)
    assert d["n_requests"] == n_requests
    assert d["delta_fro_L0"] > 0 and d["condition_number_L0"] >= 1.0
    assert math.isclose(d["final_nll"], sum(nll_after) / n_requests, rel_tol=1e-5)
    assert d["covariance"] == "isotropic"


def test_memit_spreads_the_residual_over_its_layers(model, tokenizer) -> None:
    family = _family(model)
    # context templates sampled from the model (two short ones): the path an organism run takes
    hp = MemitHparams(layers=(0, 1), **{**MEMIT_HP, "mom2_update_weight": 10.0}, context_templates=((2, 2),))
    editor = MemitEditor(hp)
    before_params = _snapshot(model)

    outcome = editor.apply(model, tokenizer, family, list(REQUESTS))

    assert len(editor.context_templates) == 3
    assert _changed(before_params, model) == set(editor.parameters_touched(model, family))
    assert len(editor.parameters_touched(model, family)) == 2
    d = outcome.diagnostics
    _assert_plain(d)
    # the first of two layers is asked for half of z - h, measured before any update
    assert math.isclose(d["residual_fro_L0"], d["residual_initial_fro"] / 2, rel_tol=1e-4)
    assert d["residual_final_fro"] < 0.5 * d["residual_initial_fro"]
    assert {"delta_fro_L0", "delta_fro_L1", "condition_number_L0", "condition_number_L1"} <= set(d)


def test_memit_declares_c_at_its_layers_and_its_templates() -> None:
    hp = MemitHparams(layers=(0, 1), **MEMIT_HP, mom2_n_samples=500, context_templates=((2, 2),))
    assert MemitEditor(hp).needs(None, None) == Needs(second_moments=SecondMomentNeed((0, 1), 500),
                                                      context_templates=((2, 2),))
    off = MemitHparams(layers=(0, 1), **{**MEMIT_HP, "mom2_adjustment": False})
    assert MemitEditor(off).needs(None, None).second_moments is None  # C = isotropic: nothing to provide


def test_memit_takes_its_second_moment_from_the_unedited_model(model, tokenizer) -> None:
    family = _family(model)
    unedited = model_digest(model)
    seen: list[tuple[int, str]] = []
    weight = family.get_module(model, family.layer_name("mlp_out", 0)).weight
    d_in = as_out_in(weight, family.weight_transposed).shape[1]

    class RecordingProvider(SimpleProvider):
        def second_moment(self, layer: int, n_samples: int) -> torch.Tensor:
            # a statistics cache computes C on a miss: it must see the weights before any layer is updated
            seen.append((layer, model_digest(model)))
            return torch.eye(d_in)

    editor = MemitEditor(MemitHparams(layers=(0, 1), **MEMIT_HP))
    provided = set_up(editor, model, tokenizer, family, RecordingProvider(model, tokenizer, context_templates=CONTEXTS))
    # C is asked for once per layer at set-up, before any edit
    assert seen == [(0, unedited), (1, unedited)]
    assert set(provided.second_moments) == {0, 1} and provided.context_templates == CONTEXTS
    outcome = editor.apply(model, tokenizer, family, list(REQUESTS[:1]))
    assert seen == [(0, unedited), (1, unedited)]  # the edit asks for nothing more
    assert outcome.diagnostics["covariance"] == "provided"
    assert model_digest(model) != unedited

    fresh = _model(model.config.model_type, len(tokenizer))
    wrong = MemitEditor(MemitHparams(layers=(0,), **MEMIT_HP))
    before = model_digest(fresh)
    with pytest.raises(ProvisionError, match="memit: the second moment for layer 0 has shape"):
        set_up(wrong, fresh, tokenizer, family,
               SimpleProvider(fresh, tokenizer, second_moments={0: torch.eye(d_in + 1)}, context_templates=CONTEXTS))
    # a provider without C for a layer the editor declared is refused at set-up as well
    with pytest.raises(ProvisionError, match="no second moment given for layer 0"):
        set_up(wrong, fresh, tokenizer, family, SimpleProvider(fresh, tokenizer, context_templates=CONTEXTS))
    assert model_digest(fresh) == before


def test_memit_hparams_reject_unordered_layers() -> None:
    with pytest.raises(ValueError, match="increasing"):
        MemitHparams(layers=(1, 0))
    with pytest.raises(ValueError, match="layers"):
        MemitHparams(layers=())


# ---------------------------------------------------------------------------------------------- restore


@pytest.mark.parametrize("which", ["memit", "ft-linf"])
def test_edit_session_restores_every_bit(model, tokenizer, which: str) -> None:
    family = _family(model)
    if which == "memit":
        editor = _memit(model, tokenizer, (0, 1))
    else:
        editor = FtLinfEditor(FtHparams(layer=1, lr=5e-3, eps=5e-3, num_steps=5))
    before = model_digest(model)
    with edit_session(model, editor.parameters_touched(model, family)):
        editor.apply(model, tokenizer, family, list(REQUESTS))
        assert model_digest(model) != before
    assert model_digest(model) == before
