"""Tell hard cases from normal ones for a given model's tokenizer.

A case is *hard* exactly when ROME reads the subject's key at position 0: the subject's last token is the
very first token the model sees, ROME's key for it is then a position-0 representation, whose distribution
differs from that of every later position, and the update's denominator ``u^T k`` can shrink towards zero
(the collapse papers).

The position is ROME's own: :func:`editors.text.subject_last_index` for the bare rewrite prompt, the index
ROME and MEMIT read keys at, counted with the special tokens the tokenizer adds by default, which is how the
editors and the harness run the model. A tokenizer that prepends BOS (Llama's ``<s>``) puts BOS at position
0, so no case is hard for it; such families collapse on these cases only when BOS is dropped, as the papers
found for Llama without ``<s>``.

Any ``transformers`` tokenizer does, fast or slow. Importing this module imports neither torch nor
transformers; the editors' text helpers (which import torch) are imported when a case is classified.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pytest_editsafety.cases.model import CaseSet, EditCase


class UnsupportedTokenizerError(TypeError):
    """The tokenizer cannot encode text the way the editors do (``tokenizer(text)["input_ids"]``)."""



def _require_encoder(tokenizer: Any) -> None:
    if not callable(tokenizer):
        raise UnsupportedTokenizerError(
            f"{type(tokenizer).__name__} cannot encode text as the editors do (tokenizer(text)['input_ids']); "
            "pass the model's transformers tokenizer (wrap a raw tokenizers.Tokenizer with "
            "PreTrainedTokenizerFast(tokenizer_object=...)) to classify hard cases"
        )


def _check_prepends_bos(tokenizer: Any, prepends_bos: bool | None) -> None:
    if prepends_bos is None:
        return
    default = default_prepends_bos(tokenizer)
    if prepends_bos != default:
        raise ValueError(
            f"prepends_bos={prepends_bos}, but {type(tokenizer).__name__} {'puts' if default else 'puts no'} BOS "
            "first by default: hardness is the position ROME reads the key at, and ROME encodes prompts with the "
            "tokenizer's default special tokens; leave prepends_bos out"
        )


def last_subject_token_index(case: EditCase, tokenizer: Any) -> int:
    """ROME's key index for ``case``: the position of the subject's last token in the bare rewrite prompt,
    special tokens included as the tokenizer adds them by default (:func:`editors.text.subject_last_index`)."""
    from editors.text import subject_last_index

    _require_encoder(tokenizer)
    return subject_last_index(tokenizer, "{}", case.prompt, case.subject)


def is_hard_case(case: EditCase, tokenizer: Any, *, prepends_bos: bool | None = None) -> bool:
    """True when ROME reads the case's key at position 0 (:func:`last_subject_token_index` is 0).

    ``prepends_bos``, when given, is how the caller runs the model; it must agree with the tokenizer's default
    encoding (:func:`default_prepends_bos`), the one ROME's keys come from, or this raises ValueError.
    """
    _require_encoder(tokenizer)
    _check_prepends_bos(tokenizer, prepends_bos)
    return last_subject_token_index(case, tokenizer) == 0


def tag_hardness(case_set: CaseSet, tokenizer: Any, *, prepends_bos: bool | None = None) -> CaseSet:
    """A copy of ``case_set`` with every case's ``is_hard`` set for this tokenizer (see :func:`is_hard_case`)."""
    _require_encoder(tokenizer)
    _check_prepends_bos(tokenizer, prepends_bos)
    return case_set.with_cases(
        case.with_hard(last_subject_token_index(case, tokenizer) == 0) for case in case_set.cases
    )


def default_prepends_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer's own default encoding puts its BOS token first (Llama: yes, GPT-2: no).

    It does for every prompt ROME encodes, so then no case is hard for this tokenizer.
    """
    _require_encoder(tokenizer)
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return False
    ids: Sequence[int] = tokenizer("x", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos_id
