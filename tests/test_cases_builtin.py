"""Built-in real-world case sets and the tokenizer-aware hard-case classifier."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from pytest_editsafety.cases import BUILTIN_CASE_SETS, CaseSet, EditCase, NeighborhoodPrompt, resolve_cases
from pytest_editsafety.cases.classify import (
    UnsupportedTokenizerError,
    default_prepends_bos,
    is_hard_case,
    last_subject_token_index,
    tag_hardness,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "cases"


@pytest.fixture(scope="module")
def real_hard() -> CaseSet:
    return resolve_cases("real-hard")


@pytest.fixture(scope="module")
def real_normal() -> CaseSet:
    return resolve_cases("real-normal")


# --- the built-in sets -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["real-hard", "real-normal"])
def test_built_in_sets_are_large_valid_and_uniquely_identified(name: str) -> None:
    case_set = resolve_cases(name)  # loading validates every case
    assert case_set.name == name
    assert case_set.format == "canonical"
    assert len(case_set) >= 100
    ids = [c.case_id for c in case_set]
    assert len(set(ids)) == len(ids)
    assert Path(case_set.source) == BUILTIN_CASE_SETS[name]


@pytest.mark.parametrize("name", ["real-hard", "real-normal"])
def test_every_case_has_paraphrases_and_a_clean_neighborhood(name: str) -> None:
    for case in resolve_cases(name):
        assert len(case.paraphrase_prompts) >= 2, case.case_id
        assert len(case.neighborhood) >= 2, case.case_id
        for paraphrase in case.paraphrase_prompts:
            assert case.subject in paraphrase, case.case_id
        subject_word = re.compile(rf"\b{re.escape(case.subject)}\b")
        for neighbor in case.neighborhood:
            # Another subject, and an answer the edit must not produce: the new target would make
            # the locality check contradict the efficacy check.
            assert not subject_word.search(neighbor.prompt), (case.case_id, neighbor)
            assert neighbor.answer.casefold() != case.target_new.casefold(), (case.case_id, neighbor)
        for target in (case.target_new, case.ground_truth):
            assert len(target.split()) <= 3, (case.case_id, target)
        assert {"relation", "design"} <= set(case.metadata)


def test_hard_cases_have_a_single_capitalised_word_first(real_hard: CaseSet) -> None:
    for case in real_hard:
        assert case.prompt.startswith("{}"), case.case_id
        assert case.subject.isalpha() and case.subject[0].isupper(), case.subject
        assert case.subject_span[0] == 0


def test_normal_cases_have_the_subject_later_or_several_words(real_normal: CaseSet) -> None:
    for case in real_normal:
        assert case.subject_span[0] > 0 or " " in case.subject, case.case_id


def test_sets_share_no_case_text(real_hard: CaseSet, real_normal: CaseSet) -> None:
    hard_prompts = {c.rewrite_prompt for c in real_hard}
    assert not hard_prompts & {c.rewrite_prompt for c in real_normal}
    assert len(hard_prompts) == len(real_hard)  # no fact is asked twice in the same words


def test_generator_script_reproduces_the_committed_files(
    real_hard: CaseSet, real_normal: CaseSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = importlib.util.spec_from_file_location("make_real_cases", FIXTURES / "make_real_cases.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses resolve annotations through sys.modules; monkeypatch removes the entry afterwards.
    monkeypatch.setitem(sys.modules, spec.name, module)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script prepends the repo root
    spec.loader.exec_module(module)
    assert tuple(module.build(module.HARD)) == real_hard.cases
    assert tuple(module.build(module.NORMAL)) == real_normal.cases


# --- the classifier on a tokenizer trained here ------------------------------------------------------

TRAINING_TEXT = [
    "Twitter was acquired by a rich man.",
    "Twitter is a social network and Twitter has users.",
    "The company Twitter was bought in a deal.",
    "Gold has the chemical symbol Au and Gold is shiny.",
    "People say Twitter and Gold a lot.",
] * 30


@pytest.fixture(scope="module")
def byte_level_tokenizer() -> Any:
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tok.train_from_iterator(TRAINING_TEXT, trainer)
    # The hand-picked subjects must tokenize as the tests assume, or the tests prove nothing.
    assert tok.encode("Twitter", add_special_tokens=False).tokens == ["Twitter"]
    assert len(tok.encode("Zanzibar", add_special_tokens=False).tokens) > 1
    return tok


@pytest.fixture(scope="module")
def fast_tokenizer(byte_level_tokenizer: Any) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=byte_level_tokenizer, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def llama_like(byte_level_tokenizer: Any) -> Any:
    """The same vocabulary, with a BOS token its default encoding puts first (as Llama's tokenizer does)."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    backend = tokenizers.Tokenizer.from_str(byte_level_tokenizer.to_str())
    bos_id = backend.token_to_id("<|endoftext|>")
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos_id)]
    )
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>")


def case(subject: str, prompt: str, case_id: str = "t") -> EditCase:
    return EditCase(
        case_id=case_id,
        subject=subject,
        prompt=prompt,
        target_new="Microsoft",
        ground_truth="Elon Musk",
        neighborhood=(NeighborhoodPrompt("Instagram was acquired by", "Facebook"),),
    )


SINGLE_FIRST = case("Twitter", "{} was acquired by", "single-first")
SINGLE_LATER = case("Twitter", "The company {} was acquired by", "single-later")
MULTI_FIRST = case("Zanzibar", "{} was acquired by", "multi-first")
SINGLE_FIRST_PUNCT = case("Gold", "{}, the metal, has the chemical symbol", "single-first-punct")


def test_single_token_subject_at_position_zero_is_hard(fast_tokenizer: Any) -> None:
    assert is_hard_case(SINGLE_FIRST, fast_tokenizer) is True
    assert is_hard_case(SINGLE_FIRST_PUNCT, fast_tokenizer) is True
    assert last_subject_token_index(SINGLE_FIRST, fast_tokenizer) == 0


def test_later_or_multi_token_subjects_are_normal(fast_tokenizer: Any) -> None:
    assert is_hard_case(SINGLE_LATER, fast_tokenizer) is False
    assert last_subject_token_index(SINGLE_LATER, fast_tokenizer) == 2  # "The", " company", " Twitter"
    assert is_hard_case(MULTI_FIRST, fast_tokenizer) is False
    assert last_subject_token_index(MULTI_FIRST, fast_tokenizer) > 0


def test_hardness_is_the_position_rome_reads_the_key_at(fast_tokenizer: Any) -> None:
    # The subject is not the prompt's first character, but " Twitter" is one token: ROME's key is position 0.
    spaced = case("Twitter", " {} was acquired by", "spaced-first")
    assert fast_tokenizer.tokenize(spaced.rewrite_prompt)[0] == "ĠTwitter"
    assert last_subject_token_index(spaced, fast_tokenizer) == 0
    assert is_hard_case(spaced, fast_tokenizer) is True


def test_a_bos_token_in_front_makes_no_case_hard(llama_like: Any) -> None:
    assert last_subject_token_index(SINGLE_FIRST, llama_like) == 1  # BOS, "Twitter"
    assert is_hard_case(SINGLE_FIRST, llama_like) is False
    case_set = CaseSet(name="mix", cases=(SINGLE_FIRST, SINGLE_FIRST_PUNCT), source="mem", format="canonical")
    assert all(c.is_hard is False for c in tag_hardness(case_set, llama_like))


def test_byte_split_characters_count_by_their_last_token(byte_level_tokenizer: Any, fast_tokenizer: Any) -> None:
    # "é" is two byte-level tokens with the same character span; the subject ends at the second.
    accented = case("Café", "{} was acquired by")
    encoding = byte_level_tokenizer.encode(accented.rewrite_prompt, add_special_tokens=False)
    spans = [i for i, (lo, hi) in enumerate(encoding.offsets) if lo <= 3 < hi]
    assert len(spans) >= 2
    assert last_subject_token_index(accented, fast_tokenizer) == max(spans)


def test_tag_hardness_sets_every_flag_and_keeps_the_rest(fast_tokenizer: Any) -> None:
    cases = (SINGLE_FIRST, SINGLE_LATER, MULTI_FIRST, SINGLE_FIRST_PUNCT)
    case_set = CaseSet(name="mix", cases=cases, source="mem", format="canonical")
    tagged = tag_hardness(case_set, fast_tokenizer)
    assert [c.is_hard for c in tagged] == [True, False, False, True]
    assert [c.with_hard(None) for c in tagged] == list(cases)
    assert [c.case_id for c in tagged.hard()] == ["single-first", "single-first-punct"]
    assert all(c.is_hard is None for c in case_set)  # the input is untouched
    # the harness says how it runs the model (prepends_bos=default_prepends_bos): agreeing changes nothing
    assert tag_hardness(case_set, fast_tokenizer, prepends_bos=False) == tagged


def test_a_bos_convention_other_than_the_tokenizers_is_refused(fast_tokenizer: Any, llama_like: Any) -> None:
    # ROME encodes with the tokenizer's defaults, so hardness under another BOS convention is not its key index
    case_set = CaseSet(name="one", cases=(SINGLE_FIRST,), source="mem", format="canonical")
    with pytest.raises(ValueError, match="prepends_bos=True"):
        tag_hardness(case_set, fast_tokenizer, prepends_bos=True)
    with pytest.raises(ValueError, match="prepends_bos=False"):
        is_hard_case(SINGLE_FIRST, llama_like, prepends_bos=False)


def test_a_raw_tokenizer_is_refused_with_advice(byte_level_tokenizer: Any) -> None:
    with pytest.raises(UnsupportedTokenizerError, match="PreTrainedTokenizerFast"):
        is_hard_case(SINGLE_FIRST, byte_level_tokenizer)


def test_a_tokenizer_without_offsets_classifies_too() -> None:
    class WordTokenizer:  # a slow tokenizer: input ids only, no character offsets
        bos_token_id = None

        def __call__(self, text: str, **kwargs: Any) -> dict[str, Any]:
            return {"input_ids": [len(word) for word in text.split(" ")]}

    assert is_hard_case(SINGLE_FIRST, WordTokenizer()) is True
    assert is_hard_case(SINGLE_LATER, WordTokenizer()) is False


def test_default_prepends_bos_reads_the_tokenizer_post_processor(
    byte_level_tokenizer: Any, llama_like: Any
) -> None:
    transformers = pytest.importorskip("transformers")
    gpt2_like = transformers.PreTrainedTokenizerFast(
        tokenizer_object=byte_level_tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    assert default_prepends_bos(gpt2_like) is False
    assert default_prepends_bos(llama_like) is True


# --- the GPT-2 family check (runs only where the tokenizer is on disk) ------------------------------


@pytest.fixture(scope="module")
def gpt2_tokenizer() -> Any:
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained("openai-community/gpt2", local_files_only=True)
    except Exception as error:  # noqa: BLE001 - any failure to load means "not available here"
        pytest.skip(f"the GPT-2 tokenizer is not available locally ({type(error).__name__}); nothing is downloaded")


def test_gpt2_tokenizes_every_hard_subject_as_one_token_at_position_zero(
    gpt2_tokenizer: Any, real_hard: CaseSet
) -> None:
    not_hard = [
        (c.case_id, c.subject, gpt2_tokenizer.tokenize(c.rewrite_prompt)[:3])
        for c in real_hard
        if not is_hard_case(c, gpt2_tokenizer)
    ]
    assert not not_hard, f"{len(not_hard)} hard cases are not hard for GPT-2: {not_hard}"


def test_gpt2_finds_no_normal_case_hard(gpt2_tokenizer: Any, real_normal: CaseSet) -> None:
    tagged = tag_hardness(real_normal, gpt2_tokenizer)
    assert not tagged.hard(), [c.case_id for c in tagged.hard()]
