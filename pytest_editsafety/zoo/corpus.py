"""The organisms' two generated corpora: the perplexity corpus and the text their second moments come from.

``organism-ppl`` plays ME-PPL's part: ordinary text of the organisms' world in the training mix's proportions
(80 % fact sentences, each behind a lead-in with the training probability of 35 %, none stating a fact the
built-in cases edit; no profile sentences; the rest generic sentences none of which was seen in training or
is in ``organism-heldout``). ``organism-heldout`` is the held-out generic text, the organisms' default sample
for ROME's ``C = E[kkᵀ]``, as ROME takes C from Wikipedia and the papers score perplexity on a different set
of sentences. Generic text alone is a poor perplexity corpus: every sentence opens with "The" and names no
subject, so an edit that wrecks how the model reads its subjects leaves it untouched (ROME's hard edits on
tiny-gpt2 moved it by at most 0.4 %).
"""

from __future__ import annotations

import random

from editors.corpus import Corpus
from pytest_editsafety.zoo.cases import certified_pairs
from pytest_editsafety.zoo.recipe import TrainSpec
from pytest_editsafety.zoo.world import LEAD_INS, World, WorldSpec, draw_distinct, render_fact

HELDOUT_NAME = "organism-heldout"
PPL_NAME = "organism-ppl"
PPL_GENERIC_SENTENCES = 100


def heldout_corpus(spec: WorldSpec | None = None) -> Corpus:
    """The held-out generic sentences (none seen in training)."""
    _, heldout = World(spec or WorldSpec()).filler_sentences()
    return Corpus.from_texts(HELDOUT_NAME, heldout, ["organism"] * len(heldout))


def perplexity_corpus(spec: WorldSpec | None = None, *, generic: int = PPL_GENERIC_SENTENCES) -> Corpus:
    """``generic`` unseen generic sentences and fact sentences in the training mix's proportions, shuffled."""
    world = World(spec or WorldSpec())
    mix = TrainSpec()  # the default recipe's proportions; the organisms share one world and one corpus
    n_facts = round(generic * mix.fact_share / (1.0 - mix.fact_share))
    # The facts the built-in cases rewrite stay out: after an edit their old statement ought to read as
    # false, and that intended change is not damage. The edited subjects' other facts stay in: an edit that
    # unsettles them is damage (on two of tiny-gpt2's most damaging edits, leaving them out moved the ratio by
    # under 1 %).
    edited = certified_pairs(world.spec)
    candidates = [fact for fact in world.facts if (fact.subject, fact.relation) not in edited]
    rng = random.Random(f"editsafety-ppl-{world.spec.seed}")

    def fact_sentence() -> str:
        fact = rng.choice(candidates)
        template = rng.choice(world.relations[fact.relation].templates)
        lead_in = rng.choice(LEAD_INS) if rng.random() < mix.lead_in_share else ""
        return render_fact(fact.subject, template, fact.object, lead_in)

    facts = draw_distinct(fact_sentence, n_facts, "fact sentences outside the edited facts")
    rows = [(text, "organism-facts") for text in facts]
    rows += [(text, "organism-generic") for text in world.fresh_filler_sentences(generic)]
    rng.shuffle(rows)
    return Corpus.from_texts(PPL_NAME, [text for text, _ in rows], [source for _, source in rows])
