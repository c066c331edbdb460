"""Run a batch of texts again and again from a position on, each row's earlier positions computed once.

v*'s search (ROME's compute_v, MEMIT's z) adds its vector at the subject's last token and runs the model on
the same prompts for tens of steps. In a causal model nothing before that position can change, at any layer:
its keys and values are the same at every step. :func:`split_rows` runs those prefixes once (no gradient) and
keeps their key/value cache; :meth:`SuffixBatch.logits` then runs only each row's suffix, attending to the
cached prefix. The numbers are the plain forward pass's, to float rounding (pinned by ``tests/test_suffix.py``).

Layout: the prefix pass runs the batch's first ``max(starts)`` columns with every position unmasked: past its
start a row holds its later tokens or padding, which only ever attend to earlier positions of the same row (so the
real prefix is exact, and no attention row is empty, so no NaN reaches the cache). The suffix pass masks those
fillers out: a suffix token attends to exactly its row's real prefix and its own earlier suffix.
Position ids are the rows' own, so absolute (GPT-2, GPT-J) and rotary (Llama) positions are both unchanged.

Below the edited layer nothing changes at the suffix positions either: the blocks under it see the same tokens and
the same prefix at every step. With ``fixed_blocks`` (the blocks below the layer ``δ`` is added at) the split runs
the suffix through them once more, without gradient, and keeps each one's output; every later pass returns those
outputs instead of running the blocks, so a step computes only the edited layer and the layers above it.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from editors.hooks import outputs_of, replaying
from editors.text import position_limit


@dataclasses.dataclass(frozen=True)
class SuffixBatch:
    """The suffix half of a split batch: suffix col ``j`` of row ``i`` is position ``starts[i] + j`` of the row."""

    input_ids: Tensor  # [rows, suffix length], right-padded
    attention_mask: Tensor  # [rows, prefix length + suffix length]: the real prefix, then the real suffix
    position_ids: Tensor  # [rows, suffix length]
    prefix_cache: Any  # the model's key/value cache after the prefix pass; None when every prefix is empty
    starts: tuple[int, ...]
    # blocks whose outputs over the suffix are fixed, each with the output it gave (run once, without gradient)
    fixed: tuple[tuple[nn.Module, Any], ...] = ()

    def logits(self, model: nn.Module) -> Tensor:
        """The model's logits over the suffix positions, ``[rows, suffix length, vocabulary]``."""
        with replaying(self.fixed):
            return model(**self.model_inputs()).logits

    def model_inputs(self) -> dict[str, Any]:
        """The keyword arguments of one suffix pass (a fresh copy of the prefix's cache in each)."""
        inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}
        if self.prefix_cache is not None:
            inputs.update(past_key_values=_fresh(self.prefix_cache), use_cache=True)
        return inputs

    def column(self, row: int, position: int) -> int:
        """The suffix column of row ``row``'s absolute ``position`` (which must not lie before the row's start)."""
        column = position - self.starts[row]
        if column < 0:
            raise ValueError(f"row {row}: position {position} falls before the suffix's start {self.starts[row]}")
        return column


def _fresh(cache: Any) -> Any:
    """A cache holding the prefix's keys and values that the next pass may grow, leaving ``cache`` as it is.

    transformers' dynamic layers grow by concatenation (a new tensor, never written in place), so a copy of the
    cache and its layer objects shares the prefix's tensors safely (a deep copy cost 40 ms a case on the
    organism); any other kind of cache is deep-copied."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    layers = getattr(cache, "layers", None)
    if type(cache) is DynamicCache and layers is not None and all(type(layer) is DynamicLayer for layer in layers):
        fresh = copy.copy(cache)
        fresh.layers = [copy.copy(layer) for layer in layers]
        return fresh
    return copy.deepcopy(cache)


def split_rows(model: nn.Module, input_ids: Tensor, lengths: Sequence[int], starts: Sequence[int], *,
               fixed_blocks: Sequence[nn.Module] = ()) -> SuffixBatch:
    """Run every row's first ``starts[i]`` tokens of ``input_ids`` (right-padded, real length ``lengths[i]``)
    once, without gradient, and return the rest as a :class:`SuffixBatch` over the cached prefix; the outputs of
    ``fixed_blocks`` (the model's first blocks, in order: those below the layer a search changes) over the suffix
    are recorded once and replayed by every later pass."""
    rows = len(lengths)
    if len(starts) != rows or input_ids.shape[0] != rows:
        raise ValueError(f"split_rows: {input_ids.shape[0]} rows of ids, {rows} lengths, {len(starts)} starts")
    if any(not 0 <= s < n for s, n in zip(starts, lengths)):
        raise ValueError(f"split_rows: every start must lie inside its row: starts {list(starts)}, "
                         f"lengths {list(lengths)}")
    device = input_ids.device
    prefix_len = max(starts)
    suffix_len = max(n - s for n, s in zip(lengths, starts))
    limit = position_limit(model)
    suffix_ids = torch.zeros(rows, suffix_len, dtype=input_ids.dtype, device=device)
    suffix_mask = torch.zeros(rows, suffix_len, dtype=torch.long, device=device)
    positions = torch.zeros(rows, suffix_len, dtype=torch.long, device=device)
    for i, (n, s) in enumerate(zip(lengths, starts)):
        suffix_ids[i, : n - s] = input_ids[i, s:n]
        suffix_ids[i, n - s:] = input_ids[i, n - 1]
        suffix_mask[i, : n - s] = 1
        # padding columns are never attended to nor read: any position the model accepts will do
        row_positions = torch.arange(s, s + suffix_len, device=device)
        positions[i] = row_positions if limit is None else row_positions.clamp(max=limit - 1)
    if prefix_len == 0:
        return _with_fixed(model, SuffixBatch(suffix_ids, suffix_mask, positions, None, tuple(starts)), fixed_blocks)
    # the batch's own first columns: past a row's start they hold its later tokens or padding, both valid ids at
    # positions the model accepts, computed (never empty attention rows) and then masked out of the suffix pass
    prefix_ids = input_ids[:, :prefix_len]
    prefix_real = (torch.arange(prefix_len, device=device)[None, :]
                   < torch.tensor(list(starts), device=device)[:, None]).long()
    prefix_positions = torch.arange(prefix_len, device=device).expand(rows, -1)
    with torch.no_grad():
        out = model(input_ids=prefix_ids, attention_mask=torch.ones_like(prefix_real), position_ids=prefix_positions,
                    use_cache=True)
    batch = SuffixBatch(suffix_ids, torch.cat([prefix_real, suffix_mask], dim=1), positions, out.past_key_values,
                        tuple(starts))
    return _with_fixed(model, batch, fixed_blocks)


def _with_fixed(model: nn.Module, batch: SuffixBatch, blocks: Sequence[nn.Module]) -> SuffixBatch:
    if not blocks:
        return batch
    with torch.no_grad():  # the pass stops after the last fixed block: nothing above it is needed
        outputs = outputs_of(model, blocks, **batch.model_inputs())
    missing = [i for i, output in enumerate(outputs) if output is None]
    if missing:
        raise RuntimeError(f"split_rows: fixed block(s) {missing} (in the order given) were not called by the "
                           f"model's forward pass")
    return dataclasses.replace(batch, fixed=tuple(zip(blocks, outputs)))
