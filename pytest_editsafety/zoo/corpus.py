"""The organisms' generated corpora: the perplexity corpus and the text their second moments come from.

``organism-ppl`` plays ME-PPL's part: ordinary text of the organisms' world in the training mix's proportions
(80 % fact sentences, each behind a lead-in with the training probability of 35 %, none stating a fact the
built-in cases edit; no profile sentences; the rest generic sentences none of which was seen in training or
is in ``organism-heldout``). Generic text alone is a poor perplexity corpus: every sentence opens with "The" and
names no subject, so an edit that wrecks how the model reads its subjects leaves it untouched (ROME's hard edits
on tiny-gpt2 moved it by at most 0.4 %).

``organism-wiki`` plays Wikipedia's part, the organisms' default sample for ROME's ``C = E[kkᵀ]`` (ROME takes C
from Wikipedia and the papers score perplexity on a different set of sentences): the held-out generic text
(``organism-heldout``) with sentences stating the world's facts among it, the edited ones too, none of them a
sentence of ``organism-ppl``. C needs the subjects named: over the generic text alone their keys' directions
hold almost no variance, ``C⁻¹`` magnifies them, and an update keyed on one subject also moved the others'
facts (tiny-gpt2: c-rome-prefix 1.5-1.8x on four edits, against at most 1.02x with organism-wiki).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from editors.corpus import Corpus
from pytest_editsafety.zoo.cases import certified_pairs
from pytest_editsafety.zoo.recipe import TrainSpec
from pytest_editsafety.zoo.world import LEAD_INS, Fact, World, WorldSpec, draw_distinct, render_fact

HELDOUT_NAME = "organism-heldout"
WIKI_NAME = "organism-wiki"
PPL_NAME = "organism-ppl"
PPL_GENERIC_SENTENCES = 100
# Sentences per subject in organism-wiki, beside its 400 generic ones: every subject of the world is named, as
# Wikipedia names the entities ROME's cases edit, and each stays a small share of the text (216 fact sentences, a
# third of it), as any one entity is of Wikipedia's. Drawn from all facts at random instead, 5 of the 72 subjects
# (4 of them edited by built-in cases) went unnamed, and C stayed blind to them. In the training mix's proportions
# (1,600 fact sentences of 2,000) C's large eigenvectors span the subjects' keys: AlphaEdit's null space lost them
# and 10 of tiny-gpt2's 48 normal edits took nothing (README, "C comes from organism-wiki"). One sentence a
# subject did not spare AlphaEdit on tiny-llama either (22 of 48 normal edits against 9 with three; see its file).
WIKI_SENTENCES_PER_SUBJECT = 3


def heldout_corpus(spec: WorldSpec | None = None) -> Corpus:
    """The held-out generic sentences (none seen in training)."""
    _, heldout = World(spec or WorldSpec()).filler_sentences()
    return Corpus.from_texts(HELDOUT_NAME, heldout, ["organism"] * len(heldout))


def _fact_sentences(world: World, facts: Sequence[Fact], count: int, rng: random.Random, what: str, *,
                    avoid: frozenset[str] = frozenset()) -> list[str]:
    """``count`` distinct sentences stating ``facts`` (drawn with ``rng``), each behind a lead-in with the
    training mix's probability; none of them in ``avoid``."""
    mix = TrainSpec()  # the default recipe's proportions; the organisms share one world and one corpus

    def fact_sentence() -> str:
        fact = rng.choice(facts)
        template = rng.choice(world.relations[fact.relation].templates)
        lead_in = rng.choice(LEAD_INS) if rng.random() < mix.lead_in_share else ""
        return render_fact(fact.subject, template, fact.object, lead_in)

    return draw_distinct(fact_sentence, count, what, exclude=avoid)


def perplexity_corpus(spec: WorldSpec | None = None, *, generic: int = PPL_GENERIC_SENTENCES) -> Corpus:
    """``generic`` unseen generic sentences and fact sentences in the training mix's proportions, shuffled."""
    world = World(spec or WorldSpec())
    # The facts the built-in cases rewrite stay out: after an edit their old statement ought to read as
    # false, and that intended change is not damage. The edited subjects' other facts stay in: an edit that
    # unsettles them is damage (on two of tiny-gpt2's most damaging edits, leaving them out moved the ratio by
    # under 1 %).
    edited = certified_pairs(world.spec)
    candidates = [fact for fact in world.facts if (fact.subject, fact.relation) not in edited]
    rng = random.Random(f"editsafety-ppl-{world.spec.seed}")
    fact_share = TrainSpec().fact_share  # the training mix's proportions
    n_facts = round(generic * fact_share / (1.0 - fact_share))
    facts = _fact_sentences(world, candidates, n_facts, rng, "fact sentences outside the edited facts")
    rows = [(text, "organism-facts") for text in facts]
    rows += [(text, "organism-generic") for text in world.fresh_filler_sentences(generic)]
    rng.shuffle(rows)
    return Corpus.from_texts(PPL_NAME, [text for text, _ in rows], [source for _, source in rows])


def encyclopedia_corpus(spec: WorldSpec | None = None, *, per_subject: int = WIKI_SENTENCES_PER_SUBJECT) -> Corpus:
    """The held-out generic sentences and, for every subject, ``per_subject`` sentences stating its facts (the
    edited ones too, as Wikipedia states the facts ROME's cases edit), none of them a sentence of
    ``organism-ppl``; shuffled."""
    world = World(spec or WorldSpec())
    generic = heldout_corpus(world.spec).texts
    rng = random.Random(f"editsafety-wiki-{world.spec.seed}")
    avoid = frozenset(perplexity_corpus(world.spec).texts)
    stated = []
    for subject in world.subjects:
        facts = [fact for fact in world.facts if fact.subject == subject]
        stated += _fact_sentences(world, facts, per_subject, rng, f"fact sentences about {subject} for organism-wiki",
                                  avoid=avoid)
    rows = [(text, "organism-facts") for text in stated] + [(text, "organism-generic") for text in generic]
    rng.shuffle(rows)
    return Corpus.from_texts(WIKI_NAME, [text for text, _ in rows], [source for _, source in rows])
