"""Whether a case fits the model's context window, checked before any edit (with the lengths) rather than
failing deep inside the model with an IndexError or being truncated silently."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pytest_editsafety.cases import EditCase

__all__ = ["CaseTooLongError", "check_fits_context"]


class CaseTooLongError(ValueError):
    """A case whose texts do not fit the model's context window."""


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

    # an edit reads a template around the prompt and the new target but its last token; the metrics read the
    # rewrite, paraphrase and neighbourhood prompts followed by each answer they score
    lengths = [(length(f"{t.replace('{}', case.rewrite_prompt, 1)} {case.target_new}") - 1, t) for t in templates]
    lengths += [(length(f"{p} {a}"), p) for p in (case.rewrite_prompt, *case.paraphrase_prompts)
                for a in (case.target_new, case.ground_truth)]
    lengths += [(length(f"{n.prompt} {a}"), n.prompt) for n in case.neighborhood for a in (n.answer, case.target_new)]
    n_tokens, text = max(lengths, key=lambda pair: pair[0])
    if n_tokens > limit:
        raise CaseTooLongError(f"case {case.case_id!r} needs {n_tokens} tokens ({text[:60]!r}...), more than the "
                               f"model's context of {limit}: shorten the case, or certify it on a model with a longer "
                               "context (an edit reads a context template around the prompt and its target)")
