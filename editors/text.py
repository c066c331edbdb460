"""Tokenisation helpers shared by the editors and the harness: padded batches (the pad id, the padding side,
the padding itself) and the subject's last-token index, the position ROME and MEMIT read keys at."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


class SubjectNotFoundError(ValueError):
    pass


def position_limit(model) -> int | None:
    """The most positions ``model`` takes (its config's ``n_positions``, ``max_position_embeddings`` or ``n_ctx``),
    or None when the config does not say."""
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def fill(template: str, subject: str) -> str:
    return template.replace("{}", subject, 1)


def subject_last_index(tokenizer, context: str, prompt: str, subject: str) -> int:
    """Index (special tokens included) of the subject's last token in ``context.format(prompt.format(subject))``.

    ``context`` and ``prompt`` each hold one ``{}``. The text before the end of the subject is encoded on its
    own; byte-level BPE splits words at spaces, so the prefix's tokens are the full text's first tokens.
    """
    text = fill(context, fill(prompt, subject))
    head_end = fill(context, fill(prompt, "\0")).index("\0") + len(subject)
    if text[head_end - len(subject):head_end] != subject:
        raise SubjectNotFoundError(f"subject {subject!r} not found in {text!r}")
    return len(tokenizer(text[:head_end])["input_ids"]) - 1


def pad_id(tokenizer) -> int:
    """The id that fills padded slots: the tokenizer's pad token, else its EOS token, else 0.

    Padded slots are masked out of attention and out of every score, so any valid embedding index does;
    the caller's tokenizer is never given a pad token behind its back.
    """
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def pads_left(tokenizer) -> bool:
    """Whether the tokenizer asks for left padding (its ``padding_side``; right when it says nothing)."""
    return getattr(tokenizer, "padding_side", "right") == "left"


def padded(sequences: Sequence[Sequence[int]], pad: int, *, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, long tensors on the CPU: ``sequences`` padded with ``pad`` to the longest.

    Right padding keeps every real token at its unpadded position; with ``left`` the real tokens end the row
    (the caller then derives positions from the mask). An empty sequence is an all-pad, all-masked row, and
    the width is at least 1. Padding is done here rather than by the tokenizer so that tokenizers without a
    pad token work too.
    """
    width = max((len(seq) for seq in sequences), default=0)
    ids = torch.full((len(sequences), max(width, 1)), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        if not seq:
            continue
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, span] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths: tuple[int, ...]


def right_padded(tokenizer, texts: Sequence[str], device) -> Batch:
    """Encode ``texts`` (with the tokenizer's own special tokens), right-padded so positions are unshifted."""
    encoded = tokenizer(list(texts))["input_ids"]
    ids, mask = padded(encoded, pad_id(tokenizer))
    return Batch(ids.to(device), mask.to(device), tuple(len(s) for s in encoded))
