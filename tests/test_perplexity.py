"""Perplexity: batched and padded scoring must equal a plain one-sentence-at-a-time reference."""

from __future__ import annotations

import json
import logging
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from pytest_editsafety.perplexity import (  # noqa: E402
    PerplexityError,
    PerplexityResult,
    perplexity,
    sentence_nlls,
    summarize,
)

WORDS = (
    "the a river city old king paper moved quickly under bright stone music was is of and near over "
    "seven blue garden market letter window engine whisper forest harbour silver winter tall quiet"
).split()


def _sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 25))) for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_sentences(400, seed=1), trainer=trainer)
    # no pad token on purpose: the scorer must cope without mutating the tokenizer
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


# ids of "<s>" and "</s>" in the test tokenizer; the configs' defaults (50256) lie outside its vocabulary
SPECIAL_IDS = {"bos_token_id": 0, "eos_token_id": 1}


def _gpt2(vocab: int, n_positions: int = 256) -> torch.nn.Module:
    cfg = transformers.GPT2Config(
        vocab_size=vocab, n_positions=n_positions, n_layer=2, n_embd=32, n_head=2, **SPECIAL_IDS
    )
    return transformers.GPT2LMHeadModel(cfg)


def _llama(vocab: int) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, **SPECIAL_IDS,
    )
    return transformers.LlamaForCausalLM(cfg)


def _gptj(vocab: int) -> torch.nn.Module:
    # eager: GPT-J under sdpa in transformers 5 can drop the causal mask (see DESIGN.md section 5)
    cfg = transformers.GPTJConfig(
        vocab_size=vocab, n_positions=256, n_embd=32, n_layer=2, n_head=2, rotary_dim=8,
        attn_implementation="eager", **SPECIAL_IDS,
    )
    return transformers.GPTJForCausalLM(cfg)


BUILDERS = {"gpt2": _gpt2, "llama": _llama, "gptj": _gptj}


def _build(kind: str, vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = BUILDERS[kind](vocab)
    model.eval()
    return model


@pytest.fixture(scope="module")
def models(tokenizer) -> dict[str, torch.nn.Module]:
    return {kind: _build(kind, len(tokenizer)) for kind in BUILDERS}


def reference_nlls(model, tokenizer, texts, add_bos=False) -> list[tuple[float, int]]:
    """Independent reference: one forward per sentence, no padding, no mask, NLL summed by hand."""
    out = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer.encode(text, add_special_tokens=False)
            if add_bos:
                ids = [tokenizer.bos_token_id, *ids]
            logits = model(torch.tensor([ids])).logits[0].double()
            nll = 0.0
            for j in range(1, len(ids)):
                nll -= float(torch.log_softmax(logits[j - 1], dim=-1)[ids[j]])
            out.append((nll, len(ids) - 1))
    return out


def _varied_texts() -> list[str]:
    # lengths from 2 tokens to well over 100, so every batch mixes heavy and light padding
    rng = random.Random(7)
    long = " " + " ".join(rng.choice(WORDS) for _ in range(60))
    return [" of", long, " seven", " a quiet garden near the old market", long[:150], " king of", " is the"]


@pytest.mark.parametrize("kind", sorted(BUILDERS))
@pytest.mark.parametrize("side", ["right", "left"])
def test_batched_equals_unbatched_reference(models, tokenizer, monkeypatch, kind, side):
    model = models[kind]
    texts = _varied_texts()
    expected = reference_nlls(model, tokenizer, texts)
    assert min(n for _, n in expected) == 1 and max(n for _, n in expected) > 150
    monkeypatch.setattr(tokenizer, "padding_side", side)
    for batch_size in range(1, len(texts) + 1):
        got = sentence_nlls(model, tokenizer, texts, batch_size=batch_size)
        assert [n for _, n in got] == [n for _, n in expected]
        for (g, _), (e, _) in zip(got, expected):
            assert g == pytest.approx(e, rel=1e-5), (kind, side, batch_size)


@pytest.mark.parametrize("side", ["right", "left"])
def test_summary_matches_reference(models, tokenizer, monkeypatch, side):
    model = models["gpt2"]
    texts = _varied_texts()
    monkeypatch.setattr(tokenizer, "padding_side", side)
    result = perplexity(model, tokenizer, texts, batch_size=3)
    expected = reference_nlls(model, tokenizer, texts)
    ppls = [math.exp(nll / n) for nll, n in expected]
    assert result.n_sentences == len(texts)
    assert result.n_tokens == sum(n for _, n in expected)
    assert result.per_sentence == pytest.approx(ppls, rel=1e-5)
    assert result.mean_ppl == pytest.approx(sum(ppls) / len(ppls), rel=1e-5)
    total = sum(nll for nll, _ in expected) / sum(n for _, n in expected)
    assert result.corpus_ppl == pytest.approx(math.exp(total), rel=1e-5)
    assert result.max_ppl == pytest.approx(max(ppls), rel=1e-5)
    assert result.median_ppl == pytest.approx(sorted(ppls)[len(ppls) // 2], rel=1e-5)
    # a random model over a ~300-token vocabulary is near-uniform: ppl in the hundreds, not 1 or 1e6
    assert 50 < result.mean_ppl < 2000


def test_add_bos_scores_every_original_token(models, tokenizer):
    model = models["llama"]
    texts = _varied_texts()
    plain = sentence_nlls(model, tokenizer, texts, batch_size=4)
    with_bos = sentence_nlls(model, tokenizer, texts, batch_size=4, add_bos=True)
    assert [n for _, n in with_bos] == [n + 1 for _, n in plain]
    expected = reference_nlls(model, tokenizer, texts, add_bos=True)
    for (g, n), (e, m) in zip(with_bos, expected):
        assert n == m
        assert g == pytest.approx(e, rel=1e-5)


def test_add_bos_makes_one_token_sentence_scorable(models, tokenizer):
    one = " a"
    assert len(tokenizer.encode(one, add_special_tokens=False)) == 1
    result = perplexity(models["gpt2"], tokenizer, [one], add_bos=True)
    assert result.n_sentences == 1 and result.n_tokens == 1


def test_add_bos_without_bos_token_is_an_error(models, tokenizer):
    from tokenizers import Tokenizer

    bare = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    )
    assert bare.bos_token_id is None
    with pytest.raises(PerplexityError, match="bos"):
        perplexity(models["gpt2"], bare, _varied_texts(), add_bos=True)


def test_short_sentences_are_skipped_with_warning(models, tokenizer, caplog):
    texts = [" the river flows", "", " a", " a quiet garden"]
    with caplog.at_level(logging.WARNING, logger="pytest_editsafety.perplexity"):
        pairs = sentence_nlls(models["gpt2"], tokenizer, texts, batch_size=2)
        result = perplexity(models["gpt2"], tokenizer, texts, batch_size=2)
    assert [n for _, n in pairs][1:3] == [0, 0]
    assert pairs[0][1] > 0 and pairs[3][1] > 0
    assert result.n_sentences == 2
    assert len(result.per_sentence) == 2
    assert result.n_tokens == pairs[0][1] + pairs[3][1]
    assert "fewer than 2 tokens" in caplog.text


def test_nothing_scorable_is_an_error(models, tokenizer):
    with pytest.raises(PerplexityError, match="fewer than 2 tokens"):
        perplexity(models["gpt2"], tokenizer, ["", " a"])


def test_nan_lm_head_gives_nan_not_exception(tokenizer):
    model = _build("llama", len(tokenizer))
    with torch.no_grad():
        model.lm_head.weight.fill_(math.nan)
    result = perplexity(model, tokenizer, _varied_texts(), batch_size=3)
    assert all(math.isnan(p) for p in result.per_sentence)
    for value in (result.mean_ppl, result.corpus_ppl, result.median_ppl, result.max_ppl):
        assert math.isnan(value)
    json.dumps(result.to_dict())  # non-finite floats still serialise


def test_inf_lm_head_gives_non_finite_not_exception(tokenizer):
    model = _build("llama", len(tokenizer))
    with torch.no_grad():
        model.lm_head.weight.fill_(math.inf)
    result = perplexity(model, tokenizer, _varied_texts(), batch_size=2)
    assert not any(math.isfinite(p) for p in result.per_sentence)
    assert not math.isfinite(result.mean_ppl)


def test_huge_weights_give_inf_perplexity(tokenizer):
    model = _build("llama", len(tokenizer))
    with torch.no_grad():
        model.lm_head.weight.normal_().mul_(1e30)
    result = perplexity(model, tokenizer, _varied_texts(), batch_size=4)
    # logits ~1e31 are finite in float32, so NLLs are finite but exp overflows: inf, never NaN
    assert result.max_ppl == math.inf
    assert result.mean_ppl == math.inf and result.corpus_ppl == math.inf
    assert not any(math.isnan(p) for p in result.per_sentence)


def test_nan_in_one_sentence_does_not_leak_into_others(models, tokenizer, monkeypatch):
    """A NaN produced at pad positions must not spill into real tokens' sums."""
    model = models["gpt2"]
    texts = _varied_texts()
    expected = reference_nlls(model, tokenizer, texts)
    original_forward = model.forward

    def forward_with_nan_pads(*args, **kwargs):
        out = original_forward(*args, **kwargs)
        pads = kwargs["attention_mask"] == 0
        out.logits[pads] = math.nan
        return out

    monkeypatch.setattr(model, "forward", forward_with_nan_pads)
    for side in ("left", "right"):
        monkeypatch.setattr(tokenizer, "padding_side", side)
        got = sentence_nlls(model, tokenizer, texts, batch_size=len(texts))
        for (g, _), (e, _) in zip(got, expected):
            assert g == pytest.approx(e, rel=1e-5)


def test_training_flags_restored_and_tokenizer_untouched(tokenizer):
    model = _build("gpt2", len(tokenizer))
    model.train()
    model.transformer.h[0].eval()  # a mixed state must come back exactly, not flattened
    before = {name: m.training for name, m in model.named_modules()}
    pad_before = tokenizer.pad_token
    perplexity(model, tokenizer, _varied_texts(), batch_size=3)
    assert {name: m.training for name, m in model.named_modules()} == before
    assert tokenizer.pad_token == pad_before
    assert not any(p.grad is not None for p in model.parameters())


def test_training_mode_does_not_change_numbers(tokenizer):
    # dropout is on in train mode; the scorer must switch it off, or repeated runs would differ
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=len(tokenizer), n_layer=2, n_embd=32, n_head=2, resid_pdrop=0.5, embd_pdrop=0.5,
        **SPECIAL_IDS,
    )
    model = transformers.GPT2LMHeadModel(cfg)
    texts = _varied_texts()
    model.eval()
    expected = reference_nlls(model, tokenizer, texts)
    model.train()
    got = sentence_nlls(model, tokenizer, texts, batch_size=2)
    for (g, _), (e, _) in zip(got, expected):
        assert g == pytest.approx(e, rel=1e-5)


def test_long_sentences_truncated_to_model_context(tokenizer):
    torch.manual_seed(0)
    model = _gpt2(len(tokenizer), n_positions=32)
    rng = random.Random(3)
    text = " " + " ".join(rng.choice(WORDS) for _ in range(80))
    assert len(tokenizer.encode(text, add_special_tokens=False)) > 32
    result = perplexity(model, tokenizer, [text, " the river"])
    assert result.n_tokens == 31 + len(tokenizer.encode(" the river", add_special_tokens=False)) - 1
    explicit = sentence_nlls(model, tokenizer, [text], max_length=10)
    assert explicit[0][1] == 9


def test_progress_bar_runs(models, tokenizer):
    plain = perplexity(models["gpt2"], tokenizer, _varied_texts(), batch_size=2)
    shown = perplexity(models["gpt2"], tokenizer, _varied_texts(), batch_size=2, progress=True)
    assert shown.per_sentence == pytest.approx(plain.per_sentence, rel=1e-6)


def test_to_dict_is_plain_json(models, tokenizer):
    result = perplexity(models["gpt2"], tokenizer, _varied_texts())
    data = result.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert isinstance(data["per_sentence"], list)
    assert all(type(v) is float for v in data["per_sentence"])
    assert type(data["n_tokens"]) is int


# ---- pure aggregation -----------------------------------------------------------------------------

pairs_strategy = st.lists(
    st.tuples(st.floats(min_value=0.0, max_value=50.0), st.integers(min_value=1, max_value=40)),
    min_size=1, max_size=30,
)


@settings(max_examples=60, deadline=None)
@given(pairs_strategy)
def test_summarize_properties(pairs):
    result = summarize(pairs)
    ppls = [math.exp(nll / n) for nll, n in pairs]
    assert result.n_sentences == len(pairs)
    assert result.n_tokens == sum(n for _, n in pairs)
    assert result.mean_ppl == pytest.approx(sum(ppls) / len(ppls), rel=1e-9)
    assert min(ppls) * (1 - 1e-12) <= result.median_ppl <= max(ppls) * (1 + 1e-12)
    assert result.max_ppl == max(ppls)
    # exp is convex, so the mean of per-token-averaged ppl (weighted) bounds corpus ppl from above
    weighted = sum(p * n for p, (_, n) in zip(ppls, pairs)) / result.n_tokens
    assert result.corpus_ppl <= weighted * (1 + 1e-9)
    assert isinstance(result, PerplexityResult)


def test_summarize_non_finite():
    assert summarize([(1.0, 1), (math.inf, 2)]).max_ppl == math.inf
    assert summarize([(1.0, 1), (math.inf, 2)]).median_ppl == math.inf
    assert summarize([(1.0, 1), (2000.0, 1)]).max_ppl == math.inf  # exp overflow is inf, not an error
    mixed = summarize([(1.0, 1), (math.nan, 2), (math.inf, 1)])
    assert math.isnan(mixed.max_ppl) and math.isnan(mixed.median_ppl) and math.isnan(mixed.mean_ppl)
    assert math.isnan(mixed.corpus_ppl)
    skipped = summarize([(0.0, 0), (math.log(4.0), 1)])
    assert skipped.n_sentences == 1 and skipped.per_sentence == pytest.approx((4.0,))


def test_length_batches_keep_each_batch_within_the_logits_budget():
    from pytest_editsafety.perplexity import length_batches

    lengths = [40, 30, 30, 10, 10, 10, 5]
    order = list(range(len(lengths)))
    # no vocabulary known: batch_size rows each, as before
    assert length_batches(order, lengths, 3, None) == [[0, 1, 2], [3, 4, 5], [6]]
    # 100 columns, 2,000 logits: a 40-token row alone, then 30-token rows alone, then 2 rows of 10
    batches = length_batches(order, lengths, 3, 100, max_logits=2_000)
    assert batches == [[0], [1], [2], [3, 4], [5, 6]]
    assert all(len(b) * max(lengths[i] for i in b) * 100 <= 2_000 for b in batches if len(b) > 1)
    # a row alone over the budget still runs, alone
    assert length_batches([0, 1], [50, 50], 8, 100, max_logits=10) == [[0], [1]]
    assert [i for b in batches for i in b] == order


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_a_small_logits_budget_gives_smaller_batches_and_the_same_numbers(models, tokenizer, monkeypatch, kind):
    import pytest_editsafety.perplexity as ppl

    model = models[kind]
    texts = _varied_texts()
    expected = reference_nlls(model, tokenizer, texts)
    head = model.get_output_embeddings()
    rows_seen: list[int] = []
    handle = head.register_forward_hook(lambda _m, inputs, _out: rows_seen.append(inputs[0].shape[0]))
    try:
        whole = sentence_nlls(model, tokenizer, texts, batch_size=len(texts))
        assert len(rows_seen) == 1  # the default budget keeps every text in one batch
        rows_seen.clear()
        # ~60 positions of logits per batch, and log-probabilities one row at a time (a row holds more than 3 positions)
        monkeypatch.setattr(ppl, "MAX_BATCH_LOGITS", 60 * len(tokenizer))
        monkeypatch.setattr(ppl, "NLL_CHUNK_ELEMENTS", 3 * len(tokenizer))
        small = sentence_nlls(model, tokenizer, texts, batch_size=len(texts))
    finally:
        handle.remove()
    assert len(rows_seen) > 1 and rows_seen[0] == 1  # the longest text runs alone
    assert [n for _, n in small] == [n for _, n in expected]
    for (s, _), (w, _), (e, _) in zip(small, whole, expected):
        assert s == pytest.approx(e, rel=1e-5) and s == pytest.approx(w, rel=1e-6)


def test_row_chunks_of_the_log_softmax_give_the_same_sums_bit_for_bit(monkeypatch):
    import pytest_editsafety.perplexity as ppl

    torch.manual_seed(0)
    logits = torch.randn(5, 9, 37, dtype=torch.bfloat16)
    ids = torch.randint(0, 37, (5, 9))
    mask = (torch.rand(5, 9) > 0.2).long()
    whole = ppl.masked_token_nll(logits, ids, mask)
    monkeypatch.setattr(ppl, "NLL_CHUNK_ELEMENTS", 2 * 8 * 37)  # two rows at a time
    assert torch.equal(ppl.masked_token_nll(logits, ids, mask), whole)
    monkeypatch.setattr(ppl, "NLL_CHUNK_ELEMENTS", 1)  # one row at a time
    assert torch.equal(ppl.masked_token_nll(logits, ids, mask), whole)
    reference = -torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    assert torch.allclose(whole, (reference * mask[:, 1:]).double().sum(-1))
