"""ROME's context templates: short texts sampled from the model itself, each followed by ". {}".

As the papers' code (the collapse papers' fork, easyeditor/models/rome/rome_main.py get_context_templates and
easyeditor/util/generate.py generate_fast; MEMIT's memit_main.py the same), each ``(length, count)`` pair gives
``count // 5`` prefixes for each start word of ``START_WORDS`` in turn, and ``length`` counts every token of a
prefix *including its start word* (and any token the tokenizer itself puts first, such as Llama's ``<s>``):
generate_fast samples while the whole sequence, prompt included, is shorter than ``max_out_len``. A start word
of one token gets ``length - 1`` sampled tokens, so the papers' ``[[5, 10], [10, 10]]`` are prefixes of 5 and
10 tokens. (kmeng01/rome's original samples from ``<|endoftext|>`` under the same count: 4 and 9 real tokens.)

The papers' code samples them unseeded and keeps them in a module global; here they are a pure function
of (model, tokenizer, recipe, seed), so every xdist worker and every rerun sees the same templates. The
caller owns any caching (keyed by the model's identity and these arguments).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import MappingProxyType

import torch

from editors.hooks import eval_mode

START_WORDS: tuple[str, ...] = ("The", "Therefore", "Because", "I", "You")
TEMPLATE_SEED = 0
TEMPLATE_TOP_K = 5
# what the templates depend on besides the model, the tokenizer and the recipe: the defaults and this sampler's
# own version, for callers that keep templates (a cache key); bump the version when the sampling changes
SAMPLER_SETTINGS = MappingProxyType({"sampler": "editors.context/1", "start_words": list(START_WORDS),
                                     "seed": TEMPLATE_SEED, "top_k": TEMPLATE_TOP_K})


def prefixes_per_start_word(count: int) -> tuple[int, ...]:
    """How many of ``count`` prefixes begin with each start word, in ``START_WORDS`` order.

    The papers take ``count // 5`` of each (``n_gen_per_prompt=n_gen // 5``), so a count that is not a multiple
    of five loses its remainder there; here the remainder goes to the first words, one each, so that a recipe
    always yields the ``count`` it names (identical to the papers' for their counts, 5 and 10)."""
    base, extra = divmod(count, len(START_WORDS))
    return tuple(base + (1 if i < extra else 0) for i in range(len(START_WORDS)))


def sample_context_templates(
    model,
    tokenizer,
    lengths_and_counts: Sequence[tuple[int, int]] = ((5, 10), (10, 10)),
    *,
    seed: int = TEMPLATE_SEED,
    top_k: int = TEMPLATE_TOP_K,
) -> tuple[str, ...]:
    """``("{}",)`` plus, for each ``(length, count)``, ``count`` sampled prefixes of ``length`` tokens (start word
    included), start word by start word, each as ``"<text>. {}"``.

    A start word that alone is ``length`` tokens or longer is kept as it is, as generate_fast leaves it."""
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    templates: list[str] = ["{}"]
    # no dropout, whatever mode the caller's model is in: the seeded sampler then draws the same templates
    with torch.no_grad(), eval_mode(model):
        for length, count in lengths_and_counts:
            for start, n in zip(START_WORDS, prefixes_per_start_word(count)):
                for _ in range(n):
                    ids = list(tokenizer(start)["input_ids"])
                    while len(ids) < length:
                        logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].float().cpu()
                        top = torch.topk(logits, top_k)
                        probs = torch.softmax(top.values, -1)
                        choice = int(torch.multinomial(probs, 1, generator=generator))
                        ids.append(int(top.indices[choice]))
                    text = tokenizer.decode(ids, skip_special_tokens=True)
                    # braces would break str.format. Whitespace is collapsed to single spaces, where the papers only
                    # turn '\n\n' into ' ': a template stays one line whatever the model samples
                    text = " ".join(text.replace("{", " ").replace("}", " ").split())
                    templates.append(f"{text}. {{}}")
    return tuple(templates)
