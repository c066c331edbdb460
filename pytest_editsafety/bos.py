"""The BOS-stripped protocol (the collapse paper's Appendix A.2): run a BOS family without its BOS.

Llama, Mistral and Llama-3 tokenizers put ``<s>`` first, so a subject that opens a prompt is the *second* token
the model sees, ROME's key for it is an ordinary later-position key, and these models do not collapse on the
GPT-2/GPT-J collapse cases. The paper removes the prepended token and they collapse too. Here that is one switch
on the *tokenizer*, applied once where a model is loaded (:func:`pytest_editsafety.registry.load_model`, or to a
copy of a tokenizer given to the Python API): everything that feeds the model text through the tokenizer's
default encoding (editors' keys and v* prompts, context templates and their sampling, second-moment statistics,
efficacy / generalization / locality probes, the hard-case classification) then runs without BOS, and no call
site has to know. Perplexity is unaffected: it is scored without special tokens under either protocol (the
papers' convention, :mod:`pytest_editsafety.perplexity`), its first token serving as context only.

A stripped model's identity gets :data:`STRIPPED_SUFFIX`, so everything cached per identity (second moments,
denominator floors, trained networks) is measured again without BOS instead of being reused from the model run
behind BOS. A tokenizer that puts no BOS first (GPT-2, GPT-J) already runs the papers' protocol: stripping is a
no-op there, the identity is unchanged, and the report says so.

Imports nothing heavy; the tokenizer is whatever transformers object the caller holds.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from pytest_editsafety.results.records import BOS_NOTHING_TO_STRIP, BOS_STRIPPED

log = logging.getLogger(__name__)

__all__ = ["BosStripError", "NOTHING_TO_STRIP", "OPTION", "STRIPPED", "STRIPPED_SUFFIX", "strip_bos",
           "stripped_identity"]

OPTION = "--editsafety-strip-bos"
# appended to a model's identity (registry.LoadedModel.identity) when its BOS was stripped: the caches keyed by
# identity hold keys and statistics measured without BOS apart from those measured behind it
STRIPPED_SUFFIX = "+strip-bos"
# what a run records per model under the option (results.RunMetadata.bos_protocol, whose schema owns the values)
STRIPPED = BOS_STRIPPED
NOTHING_TO_STRIP = BOS_NOTHING_TO_STRIP

# texts whose encodings must lose exactly their first id: a single word, a subject-first prompt, a sentence
_PROBES: tuple[str, ...] = ("x", "Paris is the capital of", "The quick brown fox jumps over the lazy dog.")


class BosStripError(ValueError):
    """The tokenizer prepends BOS and could not be made to stop (it has no ``add_bos_token`` switch, or the
    switch did not remove exactly the leading BOS)."""


def _encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    return [list(tokenizer(text)["input_ids"]) for text in texts]


def strip_bos(tokenizer: Any, model: str) -> bool:
    """Make ``tokenizer`` (changed in place) stop prepending its BOS by default; True when it did prepend one,
    False when there was none to strip (a no-op). Verified by encoding: every probe text must lose exactly its
    leading BOS id and nothing else, or this raises :class:`BosStripError` naming ``model``."""
    from pytest_editsafety.cases.classify import default_prepends_bos

    if not default_prepends_bos(tokenizer):
        log.info("model %s: its tokenizer prepends no BOS; %s changes nothing", model, OPTION)
        return False
    before = _encode(tokenizer, _PROBES)
    if not hasattr(type(tokenizer), "add_bos_token"):
        raise BosStripError(f"{OPTION}: model {model}: tokenizer {type(tokenizer).__name__} prepends BOS and has no "
                            "add_bos_token switch to turn it off")
    # transformers 5.x: the setter rebuilds the fast tokenizer's post-processor (TokenizersBackend
    # .update_post_processor), which is what actually adds BOS; setting a plain attribute would change nothing
    tokenizer.add_bos_token = False
    after = _encode(tokenizer, _PROBES)
    bos_id = tokenizer.bos_token_id
    for text, old, new in zip(_PROBES, before, after):
        if old[:1] != [bos_id] or new != old[1:]:
            raise BosStripError(f"{OPTION}: model {model}: tokenizer {type(tokenizer).__name__} encodes {text!r} as "
                                f"{new} after add_bos_token=False (was {old}); expected only the leading BOS "
                                f"{bos_id} removed")
    log.info("model %s: BOS %r stripped (the papers' A.2 protocol)", model, tokenizer.bos_token)
    return True


def stripped_identity(identity: str) -> str:
    """The identity of a model whose BOS was stripped: caches keyed by it never mix the two protocols."""
    return identity + STRIPPED_SUFFIX
