"""Measurements of what an organism knows: top-1 fact recall, subject first and subject later."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from pytest_editsafety.zoo.world import LEAD_INS, World, render_fact


@dataclass(frozen=True)
class FactPrompt:
    subject: str
    relation: str
    template: str
    lead_in: str
    object: str

    @property
    def text(self) -> str:
        return render_fact(self.subject, self.template, None, self.lead_in)


def fact_prompts(world: World, *, lead_ins: Sequence[str] = ("",), subjects: Sequence[str] | None = None) -> list[FactPrompt]:
    chosen = world.subjects if subjects is None else subjects
    return [
        FactPrompt(s, rel.name, template, lead_in, world.object_of(s, rel.name))
        for s in chosen
        for rel in world.relations.values()
        for template in rel.templates
        for lead_in in lead_ins
    ]


def next_token_predictions(model, tokenizer, texts: Sequence[str], batch_size: int = 256, *,
                           add_special_tokens: bool = True) -> list[int]:
    """Argmax next token after each text, encoded as the model is used (the tokenizer's own specials, unless
    ``add_special_tokens`` is False: the papers' prompts carry no BOS)."""
    import torch

    encoded = tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, ids in enumerate(encoded):
        by_length[len(ids)].append(index)
    predictions = [0] * len(encoded)
    device = next(model.parameters()).device
    with torch.no_grad():
        for indices in by_length.values():  # equal lengths: no padding, so no padding subtleties here
            for start in range(0, len(indices), batch_size):
                chunk = indices[start:start + batch_size]
                batch = torch.tensor([encoded[i] for i in chunk], device=device)
                logits = model(input_ids=batch).logits[:, -1, :]
                for i, token in zip(chunk, logits.argmax(-1).tolist()):
                    predictions[i] = token
    return predictions


def object_token(tokenizer, obj: str) -> int:
    return tokenizer(" " + obj, add_special_tokens=False)["input_ids"][0]


def recall(model, tokenizer, prompts: Sequence[FactPrompt], *, prefix: str | None = None) -> float:
    """Share of prompts whose top-1 next token is the first token of the true object.

    With ``prefix`` (e.g. the sink token's text) each prompt is that text followed by the prompt, and the
    tokenizer adds no specials of its own, so the prefix alone decides what precedes the prompt: ``""`` is
    the bare prompt with nothing in front. Without it the tokenizer's own specials apply, as in the harness
    (which therefore feeds Llama-style models their ``<s>``, and GPT-2/GPT-J-style models nothing)."""
    if not prompts:
        return float("nan")
    if prefix is None:
        predicted = next_token_predictions(model, tokenizer, [p.text for p in prompts])
    else:
        predicted = next_token_predictions(model, tokenizer, [prefix + p.text for p in prompts],
                                           add_special_tokens=False)
    hits = sum(int(tok == object_token(tokenizer, p.object)) for tok, p in zip(predicted, prompts))
    return hits / len(prompts)


def knowledge_report(model, tokenizer, world: World) -> dict[str, float]:
    single = world.single_subjects
    return {
        "recall_subject_first": recall(model, tokenizer, fact_prompts(world, subjects=single)),
        "recall_subject_later": recall(model, tokenizer, fact_prompts(world, lead_ins=LEAD_INS[:3], subjects=single)),
        "recall_two_token_subjects": recall(model, tokenizer, fact_prompts(world, subjects=world.double_subjects)),
    }
