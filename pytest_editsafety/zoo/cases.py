"""The organism's built-in case sets, derived from its world: the same facts, subject first vs later.

``hard``: a single-token subject at position 0 of the prompt (no sink/BOS in front for GPT-style models),
the shape of the papers' collapse cases. ``normal``: the same facts behind a lead-in, so the subject comes
later. Paraphrases use the relation's other templates; neighbourhood prompts ask the same relation of other
subjects, whose true answers must survive the edit.
"""

from __future__ import annotations

import random

from pytest_editsafety.cases.model import CaseSet, EditCase, NeighborhoodPrompt
from pytest_editsafety.zoo.world import LEAD_INS, RELATIONS, World, WorldSpec

N_NEIGHBOURS = 3
CERTIFICATION_SETS = ("hard", "normal")


def organism_cases(kind: str, spec: WorldSpec | None = None) -> CaseSet:
    if kind not in ("hard", "normal"):
        raise ValueError(f"organism case sets are 'hard' and 'normal', not {kind!r}")
    world = World(spec or WorldSpec())
    rng = random.Random(f"editsafety-cases-{world.spec.seed}")  # the same draws for both kinds
    cases = []
    for index, subject in enumerate(world.single_subjects):
        relation = RELATIONS[index % len(RELATIONS)]
        true = world.object_of(subject, relation.name)
        target = rng.choice([o for o in relation.objects if o != true])
        lead_in = "" if kind == "hard" else LEAD_INS[index % len(LEAD_INS)]
        template, *others = relation.templates
        others_subjects = [s for s in world.single_subjects if s != subject]
        neighbours = rng.sample(others_subjects, N_NEIGHBOURS)
        cases.append(EditCase(
            case_id=f"{kind}-{index:04d}",
            subject=subject,
            prompt=lead_in + template.format(s="{}"),
            target_new=target,
            ground_truth=true,
            paraphrase_prompts=tuple(lead_in + t.format(s=subject) for t in others),
            neighborhood=tuple(
                NeighborhoodPrompt(lead_in + template.format(s=n), world.object_of(n, relation.name))
                for n in neighbours if world.object_of(n, relation.name) != target
            ),
            metadata={"relation": relation.name, "source": "organism"},
        ))
    return CaseSet(name=kind, cases=tuple(cases), source="organism world", format="organism")


def certified_pairs(spec: WorldSpec | None = None) -> frozenset[tuple[str, str]]:
    """The (subject, relation) pairs the built-in certification sets edit."""
    return frozenset((c.subject, str(c.metadata["relation"])) for kind in CERTIFICATION_SETS
                     for c in organism_cases(kind, spec).cases)
