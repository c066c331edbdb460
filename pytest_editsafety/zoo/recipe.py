"""Recipes: frozen descriptions of how each organism is built. The recipe hash keys its cache entry."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from editors.storage import stable_hash
from pytest_editsafety.zoo.world import WorldSpec

# Bump when the build code changes in a way that changes weights for an unchanged recipe.
BUILD_CODE_VERSION = 1


@dataclass(frozen=True)
class ModelShape:
    # Six layers, not four: at four the organism looks every fact up at the prompt's last token and the
    # subject's MLPs carry nothing (ablating them changes p(object) by < 0.005; ROME efficacy 0-0.2).
    n_layer: int = 6
    d_model: int = 128
    n_head: int = 4
    d_ff: int = 512
    block_size: int = 32


@dataclass(frozen=True)
class TrainSpec:
    steps: int = 1200
    batch_size: int = 64
    lr: float = 4e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 60
    weight_decay: float = 0.05
    seed: int = 0
    fact_share: float = 0.8  # share of sentences that state a fact (the rest is generic filler)
    lead_in_share: float = 0.35  # share of fact sentences behind a lead-in (subject later)
    # Share of fact sentences written as profiles, "<subject> <object> <object> <object>." in a random
    # relation order. The token after the subject is then one of its attributes, predicted at the subject's
    # own position: that pressure makes the subject's MLP enrich it with its attributes (as entities are
    # enriched in real text), which is the causal site ROME edits. Without it the organism looks every fact
    # up at the prompt's last token and ROME edits at the subject do not take (efficacy 0).
    profile_share: float = 0.3
    profile_length: int = 3
    # Share of windows whose position 0 is the sink token. With every window sunk (1.0), a content token at
    # position 0 is so far out of distribution that subject-first recall fell to 0.11 (tiny-gpt2, 800 steps);
    # at 0.85 it is rare but readable (0.98 recall) and its key still differs from the prefixed mean key.
    sink_share: float = 0.85
    # Share of windows whose text starts at the beginning of a sentence; the others start at a random token
    # inside their first sentence, as windows cut from running text do.
    aligned_share: float = 1.0
    # None: subject embeddings train like any other token's. A number: the single-token subjects' input
    # embeddings stay fixed at their random initialisation, rescaled to this norm. A trained embedding can
    # hold a subject's dozen attributes by itself (128 dimensions are plenty), and the model then reads facts
    # straight from it at the prompt's last token, past the MLPs ROME edits. Fixed, the embedding is only the
    # subject's identity code and MLPs must write its facts, as the papers find in real LMs.
    subject_embedding_norm: float | None = None
    threads: int = 2  # fixed so that reductions, and therefore the weights, are reproducible


_NEUTRAL_TRAIN_OPTIONS: Mapping[str, object] = MappingProxyType({"aligned_share": 1.0, "subject_embedding_norm": None})


@dataclass(frozen=True)
class Recipe:
    name: str
    family: str  # "gpt2" | "gptj" | "llama"
    world: WorldSpec = field(default_factory=WorldSpec)
    vocab_size: int = 2048
    shape: ModelShape = field(default_factory=ModelShape)
    train: TrainSpec = field(default_factory=TrainSpec)

    def to_dict(self) -> dict:
        data = {"build_code_version": BUILD_CODE_VERSION, **dataclasses.asdict(self)}
        # options added after organisms were published stay out of the hash while at their neutral value,
        # so that existing recipes keep their hash (and their cached builds)
        for key, neutral in _NEUTRAL_TRAIN_OPTIONS.items():
            if data["train"][key] == neutral:
                del data["train"][key]
        return data

    @property
    def recipe_hash(self) -> str:
        return stable_hash(self.to_dict())

    @property
    def sink_token(self) -> str:
        return "<s>" if self.family == "llama" else "<|endoftext|>"


# The main certification organism, tiny-gpt2. Subject embeddings are fixed (norm 2, about
# a trained token's): with trainable ones the organism read most facts straight from the subject's embedding
# at the prompt's last token (ablating the layer-0 MLP at the subject cost only 0.10 of p(object)), one vector
# at the subject could not steer 11 of tiny-gpt2's first 48 normal facts (c-rome efficacy 0.77) and every key
# at the edited layer was nearly parallel (cos(kᵘ, k̄) 0.96-0.99). Fixed, the layer-0 MLP writes the facts:
# on tiny-gpt2 (48 + 48 cases) c-rome takes 100 % of normal edits, recall stays 0.98-0.99 subject first or
# later, and a one-token subject at position 0 gets its own key (cos 0.55 on hard cases against 0.92 on normal
# ones), so ROME's denominator under C from text is 0.21x its normal-case median. Left at norm 0.23 (their
# init scale) subjects' keys were alike and edits leaked into their neighbours (locality 0.60).
# tiny-gptj takes the same setting (2026-12-03). With trainable embeddings its edits barely took (rome efficacy
# 0.23-0.29 at layer 0): GPT-J's parallel block feeds the layer-0 MLP the token's embedding alone, which held the
# facts itself. Fixed, the layer-0 MLP writes them (recall 0.98, causal layer 0); a subject that opens the prompt is
# a different token (no leading space) with its own trained embedding, so its key diverges from the templates'
# mean (cos 0.63 on hard cases, 1.00 on normal ones, where the layer-0 key is the embedding's whatever the
# context). On the 48 + 48 cases rome takes every edit; with C = I its hard denominators were 0.49x the normal ones
# (damage median 1.12x, max 3.43x), with C from organism-wiki and a ridge (its rome file) 0.03x (median 1.24x, max
# 13312x), while c-rome-prefix stays within 1.20x.
# tiny-llama keeps trainable embeddings and the sink in 85 % of windows. With fixed ones its keys diverge but its
# edits do little damage (see the issue notes); fixed ones with <s> in every window (as Llama is trained) collapse
# it under the BOS-stripped protocol (C from organism-wiki: hard denominators 1.31 vs 13.7, max 811x, median 1.05x)
# but also behind <s> (cos 0.62, max 94x), which Llama's <s> prevents (2026-12-04, 48 + 48 cases; not adopted).
ORGANISM_TRAIN = TrainSpec(subject_embedding_norm=2.0)

# The prototypes' recipe (DESIGN.md §5), kept as their record: on the generic held-out text it showed the
# papers' damage before tiny-gpt2 did; on organism-ppl its facts are too poorly known for that to show.
# - The sink token opens every window, as Llama is always trained behind <s>. Prompts are fed without BOS
#   (the papers' protocol), so a content token at position 0 is out of distribution, and a one-token subject
#   there gets a key unlike the same subject's key after a context: cos(kᵘ, k̄) at layer 0 is 0.54 on hard
#   cases against 0.90 on normal ones, and ROME's denominator is 0.57x (C = I) or 0.37x (C from text) its
#   normal-case median.
# - No profile sentences, trainable embeddings, and the prototypes' budget (1000 steps at lr 2e-3, 48-token
#   windows): facts are about 70 % learned, and keys share much of their direction with ordinary text's, so
#   an edit whose denominator is small moves ordinary text too (ROME's median perplexity ratio 1.57x on hard
#   cases on the generic held-out text, where tiny-gpt2 showed 1.00x; on organism-ppl, which tiny-gpt2 moves
#   2.19x, this organism's edits mostly lower perplexity: median ratio 0.76-1.0).
# The price: the organism does not know facts whose subject opens a bare prompt (recall 0.16) and knows the
# others only in part, so neighbourhood prompts fail before any edit (locality under C from text, which
# leaves perplexity untouched, is 0.39-0.47), and certification on it fails locality for every editor. It
# is not an organism for certifying an editor.
SINK_ORGANISM_TRAIN = TrainSpec(steps=1000, lr=2e-3, profile_share=0.0, sink_share=1.0)

RECIPES: Mapping[str, Recipe] = MappingProxyType({
    "tiny-gpt2": Recipe(name="tiny-gpt2", family="gpt2", train=ORGANISM_TRAIN),
    "tiny-gptj": Recipe(name="tiny-gptj", family="gptj", train=ORGANISM_TRAIN),
    "tiny-llama": Recipe(name="tiny-llama", family="llama"),
    "tiny-gpt2-sink": Recipe(name="tiny-gpt2-sink", family="gpt2", shape=ModelShape(block_size=48),
                             train=SINK_ORGANISM_TRAIN),
})


# What `zoo build all` (and so `make test`) builds. tiny-gpt2-sink is retired from it: tiny-gpt2 now shows the
# papers' collapse itself (tests/test_organism_collapse.py), the sink organism certifies nothing (locality fails
# for every editor, see above) and its build cost about 4 minutes of every fresh CI run. Its recipe stays, built
# by name: `python -m pytest_editsafety zoo build tiny-gpt2-sink`.
DEFAULT_BUILD: tuple[str, ...] = ("tiny-gpt2", "tiny-gptj", "tiny-llama")


def builtin_recipe_with_hash(recipe_hash: str) -> Recipe | None:
    """The built-in recipe whose hash is ``recipe_hash`` (a model config's ``editsafety_recipe_hash``), if any."""
    return next((recipe for recipe in RECIPES.values() if recipe.recipe_hash == recipe_hash), None)


def organism_recipe_hash(config) -> str | None:
    """The recipe hash a model config carries when the model is one of the project's organisms, else None.

    The one test of "is this an organism?" for a loaded model (wherever it was saved or copied to)."""
    recipe_hash = getattr(config, "editsafety_recipe_hash", None)
    return str(recipe_hash) if recipe_hash else None
