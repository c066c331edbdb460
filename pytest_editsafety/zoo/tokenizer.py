"""A byte-level BPE tokenizer trained on the organism's own corpus, saved as a transformers tokenizer."""

from __future__ import annotations

from collections.abc import Iterable

from pytest_editsafety.zoo.recipe import Recipe


def train_tokenizer(recipe: Recipe, texts: Iterable[str]):
    """Train the organism's tokenizer; returns a ``PreTrainedTokenizerFast``.

    GPT-2/GPT-J style organisms add no special token when encoding (like the real GPT-2 tokenizer);
    the Llama organism prepends ``<s>`` like Llama's tokenizer does. The sink token used in training
    windows is that family's BOS/end-of-text token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    sink = recipe.sink_token
    specials = ["<s>", "</s>", "<unk>"] if recipe.family == "llama" else ["<|endoftext|>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if recipe.family == "llama":
        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
        wrapped = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>",
            model_max_length=recipe.shape.block_size,
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        wrapped = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token=sink, eos_token=sink, unk_token=sink,
            model_max_length=recipe.shape.block_size,
        )
    return wrapped


def check_single_token_subjects(tokenizer, subjects, recipe_name: str) -> None:
    """Hard cases need one-token subjects, at a document's start and mid-text alike; refuse a recipe that breaks that."""
    split = [s for s in subjects
             if len(tokenizer(s, add_special_tokens=False)["input_ids"]) != 1
             or len(tokenizer(" " + s, add_special_tokens=False)["input_ids"]) != 1]
    if split:
        raise ValueError(
            f"recipe {recipe_name!r}: {len(split)} single-token subjects are split by the trained tokenizer "
            f"({', '.join(split[:5])}...); raise vocab_size"
        )


def subject_token_ids(tokenizer, subjects) -> list[int]:
    """The ids of one-token subjects as they appear at a text's start and after a space (two tokens each)."""
    ids: set[int] = set()
    for subject in subjects:
        for text in (subject, " " + subject):
            ids.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    return sorted(ids)
