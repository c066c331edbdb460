"""MEND training edits drawn from the organism's world, disjoint from the certification case sets.

The certification sets ``hard`` and ``normal`` edit one (subject, relation) pair per single-token subject
(:mod:`pytest_editsafety.zoo.cases`). MEND learns from every *other* pair of the world: the single-token
subjects' other eleven relations and every relation of the two-token subjects, so no certification edit,
and no certified (subject, relation) fact, is ever seen in training, neither as an edit nor as a locality
text. Each training edit asks for a random wrong object, phrased with a random template, subject first or
behind a lead-in (both shapes the certification asks about); its equivalent uses another phrasing; its
locality texts are a true fact of the same relation about another subject whose (subject, relation) pair
is not certified (what the certification's neighbourhood prompts probe) and a filler sentence (what
perplexity measures). The held-out lead-ins stay unseen, as in the organism's training.
"""

from __future__ import annotations

import dataclasses
import random

from editors.base import EditRequest
from editors.base import TrainingCase
from pytest_editsafety.zoo.cases import certified_pairs
from pytest_editsafety.zoo.world import LEAD_INS, World, WorldSpec, render_fact

__all__ = ["certified_pairs", "mend_training_cases", "training_pairs"]


def training_pairs(world: World, held_out: frozenset[tuple[str, str]] | None = None) -> tuple[tuple[str, str], ...]:
    """Every (subject, relation) pair of ``world`` outside ``held_out`` (default: the certified pairs)."""
    held_out = certified_pairs(world.spec) if held_out is None else held_out
    return tuple((s, r) for s in world.subjects for r in world.relations if (s, r) not in held_out)


def _phrasing(rng: random.Random, templates: tuple[str, ...]) -> tuple[str, str]:
    lead_in = rng.choice(("",) + LEAD_INS)  # subject first (the hard shape) or later (the normal shape)
    return lead_in, rng.choice(templates)


def mend_training_cases(spec: WorldSpec, n: int, *, seed: int) -> tuple[TrainingCase, ...]:
    """``n`` training edits, drawn in seeded shuffled passes over the training pairs."""
    world = World(spec)
    held_out = certified_pairs(spec)
    pairs = list(training_pairs(world, held_out))
    if not pairs:
        raise ValueError("the organism's world has no (subject, relation) pair outside the certification sets")
    fillers, _ = world.filler_sentences()
    rng = random.Random(f"editsafety-mend-data-{spec.seed}-{seed}")
    order: list[tuple[str, str]] = []
    cases: list[TrainingCase] = []
    while len(cases) < n:
        if not order:
            order = pairs[:]
            rng.shuffle(order)
        subject, relation_name = order.pop()
        relation = world.relations[relation_name]
        true = world.object_of(subject, relation_name)
        target = rng.choice([o for o in relation.objects if o != true])
        lead_in, template = _phrasing(rng, relation.templates)
        edit = EditRequest(subject, lead_in + template.format(s="{}"), target)
        while True:  # the equivalent must differ in wording
            lead_in2, template2 = _phrasing(rng, relation.templates)
            if (lead_in2, template2) != (lead_in, template):
                break
        equivalent = EditRequest(subject, lead_in2 + template2.format(s="{}"), target)
        # a neighbour whose fact of this relation is no certified pair: training must not see those facts
        neighbour = rng.choice([s for s in world.subjects if s != subject and (s, relation_name) not in held_out])
        n_lead, n_template = _phrasing(rng, relation.templates)
        neighbour_text = render_fact(neighbour, n_template, world.object_of(neighbour, relation_name), n_lead)
        cases.append(TrainingCase(edit, equivalent, (neighbour_text, rng.choice(fillers))))
    return tuple(cases)


def world_description(spec: WorldSpec) -> dict[str, object]:
    return {"source": "organism world", "world": dataclasses.asdict(spec)}
