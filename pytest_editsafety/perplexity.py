"""Perplexity of a causal language model over a list of sentences, the way the collapse papers measure it.

Convention (the papers' code): each sentence is tokenized on its own without special tokens, the first
token is context only and every later token is scored; no BOS unless asked for, in which case the BOS is the
context and every original token is scored. The paper-compatible figure is the *mean of per-sentence
perplexities*; the corpus perplexity ``exp(ΣNLL / Σtokens)``, the median and the max come with it.

A collapsed model is the thing we measure, so non-finite numbers are results, not errors: an edit that
drives the logits to inf/NaN yields inf/NaN perplexities instead of an exception.

torch is imported inside functions so that the plugin can import this module at startup cheaply.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from pytest_editsafety.aggregates import mean, median

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class PerplexityError(ValueError):
    """The inputs cannot be scored at all (no scorable sentence, no BOS token when one is asked for)."""


@dataclass(frozen=True)
class PerplexityResult:
    per_sentence: tuple[float, ...]
    mean_ppl: float
    corpus_ppl: float
    median_ppl: float
    max_ppl: float
    n_sentences: int
    n_tokens: int

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["per_sentence"] = [float(p) for p in self.per_sentence]
        for key in ("mean_ppl", "corpus_ppl", "median_ppl", "max_ppl"):
            out[key] = float(out[key])
        out["n_sentences"] = int(self.n_sentences)
        out["n_tokens"] = int(self.n_tokens)
        return out


# --------------------------------------------------------------------------------------------------
# Pure maths


def safe_exp(x: float) -> float:
    """``exp`` that returns inf on overflow: a collapsed model's mean NLL can exceed ~709."""
    if math.isnan(x):
        return math.nan
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _max(values: Sequence[float]) -> float:
    # NaN, not +inf (aggregates.worst), when a sentence's perplexity is NaN: the figure is reported as measured
    if any(math.isnan(v) for v in values):
        return math.nan
    return max(values)


def summarize(nlls: Sequence[tuple[float, int]]) -> PerplexityResult:
    """Aggregate per-sentence ``(sum NLL, scored tokens)`` pairs; pairs with 0 tokens are skipped."""
    scored = [(nll, n) for nll, n in nlls if n > 0]
    if not scored:
        raise PerplexityError("no sentence has a scorable token (every sentence has fewer than 2 tokens)")
    per_sentence = tuple(safe_exp(nll / n) for nll, n in scored)
    total_tokens = sum(n for _, n in scored)
    total_nll = math.fsum(nll for nll, _ in scored)
    return PerplexityResult(
        per_sentence=per_sentence,
        # per_sentence is not empty, so neither aggregate is None; a NaN perplexity (a model producing
        # garbage) makes the median and the max NaN rather than letting sort order hide it
        mean_ppl=mean(per_sentence),
        corpus_ppl=safe_exp(total_nll / total_tokens),
        median_ppl=median(per_sentence),
        max_ppl=_max(per_sentence),
        n_sentences=len(scored),
        n_tokens=total_tokens,
    )


# the float32 log-probabilities masked_token_nll holds at once (rows x positions x vocabulary): with a real
# vocabulary a batch's log-softmax and its float32 copy are the pass's largest tensors (twice the batch's
# MAX_BATCH_LOGITS in float32), so rows are taken a few at a time; each row's numbers are the same bit for bit
# either way (it is its own softmax)
NLL_CHUNK_ELEMENTS = 1 << 24


def masked_token_nll(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Per-row summed NLL of ``input_ids[:, 1:]`` given ``logits[:, :-1]``, counting only ``loss_mask[:, 1:]``.

    ``logits`` (batch, seq, vocab), ``input_ids``/``loss_mask`` (batch, seq). The log-softmax runs in
    float32 whatever the model's dtype, over as many rows at a time as fit :data:`NLL_CHUNK_ELEMENTS`, and masked
    positions are *selected* out rather than multiplied by 0, so a NaN at a pad position cannot leak into a
    sentence's sum. Returns float64 sums (batch,).
    """
    import torch

    rows, length, vocabulary = logits.shape
    step = max(1, NLL_CHUNK_ELEMENTS // max(1, (length - 1) * vocabulary))
    sums = []
    for start in range(0, rows, step):
        chunk = slice(start, start + step)
        logprobs = torch.log_softmax(logits[chunk, :-1, :].float(), dim=-1)
        nll = -logprobs.gather(-1, input_ids[chunk, 1:].unsqueeze(-1)).squeeze(-1)
        del logprobs
        keep = loss_mask[chunk, 1:].bool()
        nll = torch.where(keep, nll, torch.zeros((), dtype=nll.dtype, device=nll.device))
        sums.append(nll.double().sum(dim=-1))
    return torch.cat(sums) if len(sums) > 1 else sums[0]


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift a sentence's positions."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


# --------------------------------------------------------------------------------------------------
# Tokenization and batching


def model_context(model: Any) -> int | None:
    """The most positions ``model`` takes (:func:`editors.text.position_limit`)."""
    from editors.text import position_limit

    return position_limit(model)


def encode(
    tokenizer: Any, texts: Sequence[str], *, add_bos: bool = False, max_length: int | None = None
) -> list[list[int]]:
    """Token ids per sentence under the papers' convention (no special tokens; optional leading BOS)."""
    bos: int | None = None
    if add_bos:
        bos = getattr(tokenizer, "bos_token_id", None)
        if not isinstance(bos, int):
            raise PerplexityError(f"add_bos=True but tokenizer {type(tokenizer).__name__} has no bos_token_id")
    encoded: list[list[int]] = []
    for text in texts:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if bos is not None:
            ids = [bos, *ids]
        if max_length is not None and len(ids) > max_length:
            ids = ids[:max_length]
        encoded.append(ids)
    return encoded


# the logits one perplexity batch may produce (rows x longest row x vocabulary): the model's output over a batch
# of long texts with a large vocabulary (Llama-3's 128,256 columns) would otherwise be the run's largest tensor,
# gigabytes beside the model. 2^26 is 128 MiB in bfloat16, 256 MiB in float32: the organism's batches (32 rows of
# at most 32 tokens x 1,244 columns) are far below it and keep their 32 rows. A text in a smaller batch may be
# padded to another length, which moves its NLL at float rounding (2.7e-9 relative in float32, 3.5e-6 in bfloat16,
# measured on a random GPT-2): the unedited baselines' cache key holds this budget
MAX_BATCH_LOGITS = 1 << 26


def length_batches(order: Sequence[int], lengths: Sequence[int], batch_size: int, vocabulary: int | None,
                   max_logits: int = MAX_BATCH_LOGITS) -> list[list[int]]:
    """``order`` (indices into ``lengths``, longest first) cut into consecutive batches of at most ``batch_size``
    rows whose logits (rows x the batch's longest row x ``vocabulary``) stay within ``max_logits``; a row alone
    over it is a batch of its own. ``vocabulary`` None: ``batch_size`` rows each."""
    batches: list[list[int]] = []
    at = 0
    while at < len(order):
        rows = batch_size
        if vocabulary:
            longest = max(lengths[i] for i in order[at:at + batch_size])
            rows = max(1, min(batch_size, max_logits // max(1, longest * vocabulary)))
        batches.append(list(order[at:at + rows]))
        at += rows
    return batches


def output_vocabulary(model: Any) -> int | None:
    """The number of logits per position ``model`` produces (its output embedding's rows, else the config's
    ``vocab_size``); None when neither says."""
    head = getattr(model, "get_output_embeddings", None)
    weight = getattr(head() if callable(head) else None, "weight", None)
    if weight is not None and getattr(weight, "ndim", 0) == 2:
        return int(weight.shape[0])
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return size if isinstance(size, int) and size > 0 else None


def _accepts_position_ids(model: Any) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return True
    return "position_ids" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _model_device(model: Any) -> torch.device:
    import torch

    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# Measurement


def sentence_nlls(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 16,
    add_bos: bool = False,
    max_length: int | None = None,
    device: Any = None,
    progress: bool = False,
    encoded: Sequence[Sequence[int]] | None = None,
    lower_blocks: Any = None,
) -> list[tuple[float, int]]:
    """``(sum NLL, scored tokens)`` per input sentence, in input order.

    ``encoded``: the texts' ids as :func:`encode` gives them with the same ``add_bos`` and ``max_length``, for a
    caller that measures one corpus many times (the tokenizer is then not run; ``texts`` only names sentences).
    ``lower_blocks``: a :class:`pytest_editsafety.lower_blocks.LowerBlockOutputs` for these texts and this batch
    size, which the pass of each batch runs within (the first blocks replayed rather than run, where it holds them).

    A sentence with fewer than 2 tokens (after the optional BOS) cannot be scored: its entry is
    ``(0.0, 0)`` and a warning is logged; ``summarize``/``perplexity`` leave such entries out.
    ``max_length`` truncates each sentence's tokens; by default the model's context length does.
    Sentences run longest first, ``batch_size`` at a time, or fewer where a batch's logits would pass
    :data:`MAX_BATCH_LOGITS` (:func:`length_batches`; numbers equal to float rounding either way).
    """
    import torch

    from editors.hooks import eval_mode
    from editors.text import pad_id, padded, pads_left

    if batch_size < 1:
        raise PerplexityError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(texts, str):
        raise PerplexityError("texts must be a sequence of sentences, not a single string")
    if max_length is None:
        max_length = model_context(model)
    if encoded is None:
        encoded = encode(tokenizer, texts, add_bos=add_bos, max_length=max_length)
    elif len(encoded) != len(texts):
        raise PerplexityError(f"{len(encoded)} encoded sentences for {len(texts)} texts")

    results: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
    scorable = [i for i, ids in enumerate(encoded) if len(ids) >= 2]
    skipped = len(encoded) - len(scorable)
    if skipped:
        first = next(i for i, ids in enumerate(encoded) if len(ids) < 2)
        log.warning(
            "skipping %d of %d sentences with fewer than 2 tokens (first: index %d, %r)",
            skipped, len(encoded), first, texts[first][:60],
        )
    if not scorable:
        return results

    # Sorting by length keeps padding (and wasted compute) small; results go back to input order.
    order = sorted(scorable, key=lambda i: len(encoded[i]), reverse=True)
    dev = torch.device(device) if device is not None else _model_device(model)
    pad = pad_id(tokenizer)
    left = pads_left(tokenizer)
    pass_positions = _accepts_position_ids(model)

    batches: Any = length_batches(order, [len(ids) for ids in encoded], batch_size, output_vocabulary(model),
                                  MAX_BATCH_LOGITS)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="perplexity", unit="batch")

    with eval_mode(model), torch.inference_mode():
        for number, batch in enumerate(batches):
            ids, mask = padded([encoded[i] for i in batch], pad, left=left)
            ids, mask = ids.to(dev), mask.to(dev)
            kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
            if pass_positions:
                kwargs["position_ids"] = position_ids_from_mask(mask)
            with lower_blocks.running(number, ids) if lower_blocks is not None else contextlib.nullcontext():
                logits = model(**kwargs, use_cache=False).logits
            # The first real token is context only: in left padding it sits after the pads, so
            # loss_mask[:, 1:] (the target mask) must exclude it explicitly.
            target_mask = mask.clone()
            first_real = mask.argmax(dim=-1)
            target_mask[torch.arange(len(batch), device=dev), first_real] = 0
            sums = masked_token_nll(logits, ids, target_mask).cpu().tolist()
            for row, i in enumerate(batch):
                results[i] = (float(sums[row]), len(encoded[i]) - 1)
    return results


def perplexity(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 16,
    add_bos: bool = False,
    max_length: int | None = None,
    device: Any = None,
    progress: bool = False,
    encoded: Sequence[Sequence[int]] | None = None,
    lower_blocks: Any = None,
) -> PerplexityResult:
    """Perplexity summary over ``texts``; see ``sentence_nlls`` for the scoring convention."""
    pairs = sentence_nlls(
        model, tokenizer, texts,
        batch_size=batch_size, add_bos=add_bos, max_length=max_length, device=device, progress=progress,
        encoded=encoded, lower_blocks=lower_blocks,
    )
    return summarize(pairs)
