"""Whether a case fits the model's context window, checked before any edit (with the lengths) rather than
failing deep inside the model with an IndexError or being truncated silently."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pytest_editsafety.cases import EditCase

__all__ = ["CaseTooLongError", "check_fits_context", "edit_tokens_over_context"]


class CaseTooLongError(ValueError):
    """A case whose texts do not fit the model's context window."""


def edit_tokens_over_context(loaded: Any, text: str, target_new: str, templates: Sequence[str]
                             ) -> tuple[int, str, int] | None:
    """``(tokens, text, context)`` for the longest text an edit of ``text`` (the prompt with its subject) towards
    ``target_new`` reads (a context template around it and the target but its last token) when that passes the
    model's context; None when every one fits or the model has no position limit."""
    from editors.text import position_limit

    limit = position_limit(loaded.model)
    if limit is None:
        return None
    n_tokens, longest = max(_edit_lengths(loaded.tokenizer, text, target_new, templates), key=lambda pair: pair[0])
    return (n_tokens, longest, limit) if n_tokens > limit else None


def _edit_lengths(tokenizer: Any, text: str, target_new: str, templates: Sequence[str]) -> list[tuple[int, str]]:
    # an edit reads a context template around the prompt and the new target but its last token
    filled = [t.replace("{}", text, 1) for t in templates]
    return [(len(tokenizer(f"{f} {target_new}")["input_ids"]) - 1, f) for f in filled]


def check_fits_context(loaded: Any, case: EditCase, templates: Sequence[str]) -> None:
    """Refuse, with the lengths, a case whose longest text (a context template around the prompt and its target,
    a paraphrase, a neighbourhood prompt) exceeds the model's positions: it would fail deep inside the model
    with an IndexError, or be truncated silently."""
    from editors.text import position_limit

    limit = position_limit(loaded.model)
    if limit is None:
        return
    tokenizer = loaded.tokenizer

    def length(text: str) -> int:
        return len(tokenizer(text)["input_ids"])

    # the edit's texts, then the metrics': the rewrite, paraphrase and neighbourhood prompts followed by each answer
    # they score
    lengths = _edit_lengths(tokenizer, case.rewrite_prompt, case.target_new, templates)
    lengths += [(length(f"{p} {a}"), p) for p in (case.rewrite_prompt, *case.paraphrase_prompts)
                for a in (case.target_new, case.ground_truth)]
    lengths += [(length(f"{n.prompt} {a}"), n.prompt) for n in case.neighborhood for a in (n.answer, case.target_new)]
    n_tokens, text = max(lengths, key=lambda pair: pair[0])
    if n_tokens > limit:
        raise CaseTooLongError(f"case {case.case_id!r} needs {n_tokens} tokens ({text[:60]!r}...), more than the "
                               f"model's context of {limit}: shorten the case, or certify it on a model with a longer "
                               "context (an edit reads a context template around the prompt and its target)")
