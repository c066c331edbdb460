"""The organism's training text: sentence pools, and a seeded stream of training windows.

Every window starts with the sink token (the family's end-of-text / BOS token), followed by sentences:
the first one without a leading space, as a document starts, the rest with one. A content token at
position 0 therefore never occurs in training, which makes it out of distribution at edit and test time,
as the papers found for real models (their prefixed and unprefixed keys differ most for such tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pytest_editsafety.zoo.recipe import Recipe
from pytest_editsafety.zoo.world import LEAD_INS, World, render_fact


@dataclass(frozen=True)
class SentencePools:
    """Token ids of every distinct training sentence, in two variants: document start and mid-text."""

    fact_start: tuple[tuple[int, ...], ...]
    fact_mid: tuple[tuple[int, ...], ...]
    fact_has_lead_in: np.ndarray  # bool per fact sentence
    filler_start: tuple[tuple[int, ...], ...]
    filler_mid: tuple[tuple[int, ...], ...]
    # Profile sentences are assembled on the fly from these: "<subject> <object> <object> <object>."
    subject_start: tuple[tuple[int, ...], ...]
    subject_mid: tuple[tuple[int, ...], ...]
    subject_objects: tuple[tuple[tuple[int, ...], ...], ...]  # per subject, per relation: " <object>" ids
    period: tuple[int, ...]


def fact_sentences(world: World) -> tuple[list[str], list[bool]]:
    texts: list[str] = []
    has_lead_in: list[bool] = []
    for fact in world.facts:
        for template in world.relations[fact.relation].templates:
            for lead_in in ("",) + LEAD_INS:
                texts.append(render_fact(fact.subject, template, fact.object, lead_in))
                has_lead_in.append(bool(lead_in))
    return texts, has_lead_in


def tokenizer_training_texts(world: World) -> list[str]:
    facts, _ = fact_sentences(world)
    filler, _ = world.filler_sentences()
    sentences = facts + list(filler)
    return sentences + [" " + s for s in sentences]


def build_pools(world: World, tokenizer) -> SentencePools:
    facts, has_lead_in = fact_sentences(world)
    filler, _ = world.filler_sentences()

    def encode(texts: list[str]) -> tuple[tuple[int, ...], ...]:
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return tuple(tuple(x) for x in ids)

    subjects = list(world.subjects)
    return SentencePools(
        fact_start=encode(facts),
        fact_mid=encode([" " + t for t in facts]),
        fact_has_lead_in=np.asarray(has_lead_in, dtype=bool),
        filler_start=encode(list(filler)),
        filler_mid=encode([" " + t for t in filler]),
        subject_start=encode(subjects),
        subject_mid=encode([" " + s for s in subjects]),
        subject_objects=tuple(
            encode([" " + world.object_of(s, rel) for rel in world.relations]) for s in subjects
        ),
        period=tuple(tokenizer(".", add_special_tokens=False)["input_ids"]),
    )


class WindowStream:
    """Deterministic batches of training windows: the same recipe yields the same token stream."""

    def __init__(self, recipe: Recipe, pools: SentencePools, sink_id: int) -> None:
        self.recipe = recipe
        self.pools = pools
        self.sink_id = sink_id
        self.rng = np.random.default_rng(recipe.train.seed)
        lead = pools.fact_has_lead_in
        self._plain_facts = np.flatnonzero(~lead)
        self._lead_facts = np.flatnonzero(lead)

    def _profile(self, start: bool) -> tuple[int, ...]:
        pools, spec = self.pools, self.recipe.train
        subject = int(self.rng.integers(len(pools.subject_start)))
        relations = self.rng.permutation(len(pools.subject_objects[subject]))[: spec.profile_length]
        ids = list((pools.subject_start if start else pools.subject_mid)[subject])
        for relation in relations:
            ids.extend(pools.subject_objects[subject][int(relation)])
        return tuple(ids) + pools.period

    def _sentence(self, start: bool) -> tuple[int, ...]:
        spec = self.recipe.train
        rng = self.rng
        if rng.random() < spec.fact_share:
            if rng.random() < spec.profile_share:
                return self._profile(start)
            group = self._lead_facts if rng.random() < spec.lead_in_share else self._plain_facts
            index = int(group[rng.integers(len(group))])
            return (self.pools.fact_start if start else self.pools.fact_mid)[index]
        pool = self.pools.filler_start if start else self.pools.filler_mid
        return pool[int(rng.integers(len(pool)))]

    def window(self) -> list[int]:
        length = self.recipe.shape.block_size
        with_sink = self.rng.random() < self.recipe.train.sink_share
        ids: list[int] = [self.sink_id] if with_sink else []
        first = self._sentence(start=True)
        aligned_share = self.recipe.train.aligned_share
        # the draw happens only when it can matter, so aligned recipes keep their data stream
        if aligned_share < 1.0 and len(first) > 1 and self.rng.random() >= aligned_share:
            first = first[int(self.rng.integers(1, len(first))):]
        ids.extend(first)
        while len(ids) < length:
            ids.extend(self._sentence(start=False))
        return ids[:length]

    def batch(self) -> np.ndarray:
        return np.asarray([self.window() for _ in range(self.recipe.train.batch_size)], dtype=np.int64)
