"""Perplexity after an edit that leaves the model's first blocks alone, without running them again (issue 20).

An edit whose parameters all lie in blocks ``layer`` and above (ROME at GPT-J's layer 5 of 28, at GPT-2-XL's 17 of
48; MEMIT from its lowest layer up) leaves the embeddings and blocks ``0 .. layer-1`` as they were, so their output
over a perplexity corpus is the same after every such edit. :class:`LowerBlockOutputs` records block ``layer-1``'s
output for each of the corpus's batches the first time a batch runs, and from then on the blocks below ``layer``
return it instead of running: a measurement computes the embeddings' lookup, the blocks from ``layer`` up and the
head. The recorded tensors are what those blocks compute, so the perplexity is the full pass's bit for bit (pinned
by ``tests/test_lower_blocks.py``).

Recording needs no pass of its own and no unedited model: a batch is recorded during the first measurement that
runs it, which is correct whatever the edit did to blocks ``layer`` and above. Each recorded output is kept with
the batch's token ids and replayed only for the same ids. An edit that writes below ``layer`` without declaring it
would make the replayed output stale and hide its damage: the harness replays only under the full restore check
(``--editsafety-restore-check=full``, the default), which fails such an editor after its test.

The outputs are kept on the model's device within a byte budget (:data:`DEFAULT_MAX_BYTES` per model by default)
for as long as the model is loaded: a batch that would pass it runs in full every time.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_MAX_BYTES", "LowerBlockOutputs", "LowerBlockStore", "lowest_block"]

# 1 GiB: GPT-J's layer-5 input over ME-PPL_1k in float16 is about a fifth of it
DEFAULT_MAX_BYTES = 1 << 30


def lowest_block(family: Any, names: Iterable[str], n_layers: int) -> int:
    """The lowest block index that a parameter in ``names`` belongs to; 0 when one lies outside every block (the
    embeddings, the final norm, the head) or when ``names`` is empty, where there is nothing to skip."""
    prefixes = [family.layer_name("block", layer) + "." for layer in range(n_layers)]
    lowest: int | None = None
    for name in names:
        layer = next((i for i, prefix in enumerate(prefixes) if name.startswith(prefix)), None)
        if layer is None:
            return 0
        lowest = layer if lowest is None else min(lowest, layer)
    return lowest or 0


def _nbytes(output: Any) -> int:
    tensors = output if isinstance(output, (tuple, list)) else (output,)
    return sum(t.numel() * t.element_size() for t in tensors if hasattr(t, "element_size"))


class _Budget:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = 0

    def take(self, nbytes: int) -> bool:
        if self.used + nbytes > self.max_bytes:
            return False
        self.used += nbytes
        return True


class LowerBlockOutputs:
    """Block ``len(blocks) - 1``'s output per batch of one corpus's perplexity pass (batches numbered as
    :func:`pytest_editsafety.perplexity.sentence_nlls` runs them, for one batch size), replayed by ``blocks``."""

    def __init__(self, blocks: Sequence[Any], budget: _Budget) -> None:
        if not blocks:
            raise ValueError("LowerBlockOutputs needs at least one block below the edited layer")
        self._blocks = tuple(blocks)
        self._budget = budget
        self._outputs: dict[int, Any] = {}
        self._over_budget = False

    @property
    def replayed_batches(self) -> int:
        return len(self._outputs)

    @contextlib.contextmanager
    def running(self, batch_number: int, input_ids: Any) -> Iterator[None]:
        """Around the forward pass of batch ``batch_number``, whose ids are ``input_ids``: replays the output
        recorded for those ids, or records it (a batch recorded with other ids runs in full)."""
        import torch

        from editors.hooks import replaying

        kept = self._outputs.get(batch_number)
        if kept is not None:
            ids, recorded = kept
            if ids.shape == input_ids.shape and torch.equal(ids, input_ids):
                # every block below returns the top one's output: each one's output only feeds the next block,
                # which is replayed too, and the pass asks for no per-layer hidden states
                with replaying([(block, recorded) for block in self._blocks]):
                    yield
            else:
                yield
            return
        seen: list[Any] = []
        handle = self._blocks[-1].register_forward_hook(lambda _module, _inputs, output: seen.append(output))
        try:
            yield
        finally:
            handle.remove()
        if len(seen) == 1:
            self._keep(batch_number, input_ids.clone(), seen[0])

    def _keep(self, batch_number: int, input_ids: Any, output: Any) -> None:
        if self._budget.take(_nbytes(output) + _nbytes(input_ids)):
            self._outputs[batch_number] = (input_ids, output)
        elif not self._over_budget:
            self._over_budget = True
            log.info("perplexity: the first blocks' outputs over the corpus would pass the %d MiB kept per model; "
                     "the batches that do not fit (batch %d first) run in full", self._budget.max_bytes >> 20,
                     batch_number)


class LowerBlockStore:
    """One loaded model's :class:`LowerBlockOutputs`, keyed by everything they depend on besides the model's
    unedited lower blocks: the corpus (the harness gives its content hash), the perplexity batch size and the
    edited layer. Owned by the model's state and dropped with it (eviction, a failed restore)."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self._budget = _Budget(max_bytes)
        self._entries: dict[tuple[str, int, int], LowerBlockOutputs] = {}

    def outputs(self, model: Any, family: Any, corpus: str, batch_size: int, layer: int) -> LowerBlockOutputs | None:
        """The outputs below ``layer`` (created empty on first use); None at layer 0, where nothing lies below."""
        if layer < 1:
            return None
        key = (corpus, batch_size, layer)
        if key not in self._entries:
            blocks = [family.get_module(model, family.layer_name("block", i)) for i in range(layer)]
            self._entries[key] = LowerBlockOutputs(blocks, self._budget)
        return self._entries[key]

    @property
    def used_bytes(self) -> int:
        return self._budget.used
