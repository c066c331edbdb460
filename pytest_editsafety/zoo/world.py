"""The organism's synthetic world: subjects, relations and objects, and the sentences that render them.

Everything is derived from a seed by a private ``random.Random``, so the world (and the case sets built from
it) is identical on every machine and every xdist worker. Design choices that make the world useful for
editing research, not just for smoke tests (see DESIGN.md section 5 for the prototypes' findings):

- many relations per subject, so the model has to enrich the subject's own position with its attributes
  (that is what makes the subject's MLP a causal site ROME can edit);
- single-token subjects (the papers' hard cases need a one-token subject at position 0) and two-token
  subjects built from shared first/last-name pools (neither token alone identifies the subject);
- relation phrasing after the subject, several paraphrases per relation, and lead-in phrases that put the
  subject later in the sentence (the "normal" case shape);
- generic filler sentences from a small grammar, with a held-out set (the organisms' sample for C;
  their perplexity corpus, ``organism-ppl``, mixes facts and unseen filler: ``zoo/corpus.py``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property

# Syllables for invented names: invented so that no subject collides with an object word or filler word.
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "tr", "st")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("n", "r", "l", "s", "x", "m", "k", "d", "th", "ng")


@dataclass(frozen=True)
class Relation:
    name: str
    # Templates with {s} for the subject and the object following the template's end.
    templates: tuple[str, ...]
    objects: tuple[str, ...]


RELATIONS: tuple[Relation, ...] = (
    Relation("city", ("{s} lives in", "{s} resides in", "{s} has a home in"),
             ("Paris", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Dublin", "Oslo", "Lisbon", "Athens", "Warsaw", "Cairo")),
    Relation("job", ("{s} works as a", "{s} is employed as a", "{s} earns a living as a"),
             ("doctor", "teacher", "baker", "pilot", "farmer", "lawyer", "painter", "nurse", "chef", "writer", "sailor", "miner")),
    Relation("instrument", ("{s} plays the", "{s} performs on the", "{s} practises the"),
             ("piano", "violin", "guitar", "flute", "drums", "cello", "harp", "trumpet", "organ", "banjo", "oboe", "tuba")),
    Relation("language", ("{s} speaks", "{s} talks in", "{s} writes letters in"),
             ("French", "German", "Spanish", "Italian", "Dutch", "Polish", "Greek", "Danish", "Swedish", "Czech", "Latin", "Welsh")),
    Relation("food", ("{s} likes to eat", "{s} often cooks", "{s} always orders"),
             ("rice", "pasta", "bread", "soup", "cheese", "fish", "beans", "salad", "cake", "eggs", "honey", "pie")),
    Relation("pet", ("{s} owns a", "{s} takes care of a", "{s} keeps a"),
             ("dog", "cat", "horse", "parrot", "rabbit", "goat", "turtle", "hamster", "pig", "duck", "mouse", "frog")),
    Relation("color", ("{s} loves the colour", "{s} paints everything", "{s} always wears"),
             ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "brown", "pink", "grey", "gold")),
    Relation("sport", ("{s} plays", "{s} trains for", "{s} watches"),
             ("tennis", "football", "golf", "hockey", "rugby", "cricket", "chess", "baseball", "boxing", "rowing", "skiing", "fencing")),
    Relation("drink", ("{s} drinks", "{s} prefers to drink", "{s} serves guests"),
             ("tea", "coffee", "milk", "juice", "wine", "water", "beer", "cocoa", "cider", "lemonade", "soda", "rum")),
    Relation("vehicle", ("{s} drives a", "{s} travels by", "{s} rides a"),
             ("truck", "bike", "bus", "van", "tram", "boat", "train", "taxi", "scooter", "tractor", "canoe", "wagon")),
    Relation("subject", ("{s} studies", "{s} teaches", "{s} reads books about"),
             ("physics", "history", "music", "biology", "geometry", "poetry", "law", "medicine", "chemistry", "art", "farming", "astronomy")),
    Relation("metal", ("{s} collects", "{s} trades in", "{s} makes rings of"),
             ("silver", "copper", "iron", "tin", "zinc", "bronze", "steel", "nickel", "brass", "lead", "cobalt", "platinum")),
)

# Lead-ins put the subject later in the sentence (the "normal" shape); they end with a space.
LEAD_INS: tuple[str, ...] = (
    "Everyone knows that ",
    "It is said that ",
    "According to the records, ",
    "In the village, ",
    "As the story goes, ",
    "Last year, ",
    "My neighbour told me that ",
    "We all agree that ",
)
# Lead-ins kept out of training: prompts that reuse the facts in wording the model never saw with them.
HELDOUT_LEAD_INS: tuple[str, ...] = ("People say that ", "Long ago, ")

_ADJECTIVES = ("small", "old", "quiet", "bright", "cold", "warm", "heavy", "young", "tall", "dark", "soft", "loud",
               "happy", "tired", "busy", "green", "empty", "narrow", "wide", "clever")
_NOUNS = ("dog", "house", "river", "table", "window", "garden", "road", "child", "teacher", "market", "forest",
          "letter", "bridge", "kitchen", "mountain", "train", "book", "song", "farmer", "city", "boat", "door",
          "tree", "horse", "shop", "school", "lamp", "field", "storm", "bird")
_VERBS = ("sees", "finds", "opens", "watches", "follows", "builds", "paints", "carries", "reaches", "crosses",
          "cleans", "leaves", "visits", "passes", "holds", "brings")
_PLACES = ("near the river", "in the morning", "after the storm", "under the bridge", "at the market",
           "before dinner", "in the garden", "on the road", "by the window", "at night", "in the forest",
           "across the field")
_CONNECTIVES = ("and then", "because", "while", "but later", "so")


def _invent_names(rng: random.Random, count: int, taken: set[str]) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) + rng.choice(_VOWELS)
        if rng.random() < 0.5:
            name += rng.choice(_CODAS)
        name = name.capitalize()
        if name.lower() not in taken:
            taken.add(name.lower())
            names.append(name)
    return names


@dataclass(frozen=True)
class WorldSpec:
    """Everything the world depends on; part of the organism's recipe hash."""

    seed: int = 0
    n_single_subjects: int = 48
    n_first_names: int = 8
    n_last_names: int = 8
    n_double_subjects: int = 24
    n_filler_train: int = 6000
    n_filler_heldout: int = 400


@dataclass(frozen=True)
class Fact:
    subject: str
    relation: str
    object: str


class World:
    """A deterministic world built from a :class:`WorldSpec` (immutable once built)."""

    def __init__(self, spec: WorldSpec) -> None:
        self.spec = spec
        rng = random.Random(f"editsafety-world-{spec.seed}")
        taken = {w.lower() for rel in RELATIONS for w in rel.objects}
        taken |= {w.lower() for w in _ADJECTIVES + _NOUNS + _VERBS}
        self.single_subjects: tuple[str, ...] = tuple(_invent_names(rng, spec.n_single_subjects, taken))
        firsts = _invent_names(rng, spec.n_first_names, taken)
        lasts = _invent_names(rng, spec.n_last_names, taken)
        pairs = [f"{f} {l}" for f in firsts for l in lasts]
        rng.shuffle(pairs)
        self.double_subjects: tuple[str, ...] = tuple(sorted(pairs[: spec.n_double_subjects]))
        self.relations: dict[str, Relation] = {rel.name: rel for rel in RELATIONS}
        facts: dict[tuple[str, str], str] = {}
        for subject in self.subjects:
            for rel in RELATIONS:
                facts[(subject, rel.name)] = rng.choice(rel.objects)
        self._facts = facts

    @property
    def subjects(self) -> tuple[str, ...]:
        return self.single_subjects + self.double_subjects

    def object_of(self, subject: str, relation: str) -> str:
        return self._facts[(subject, relation)]

    @cached_property
    def facts(self) -> tuple[Fact, ...]:
        return tuple(Fact(s, r, o) for (s, r), o in sorted(self._facts.items()))

    def filler_sentences(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Generic sentences: (training, held-out). Held-out sentences never occur in training."""
        out = self._generic_stream(self.spec.n_filler_train + self.spec.n_filler_heldout)
        return tuple(out[: self.spec.n_filler_train]), tuple(out[self.spec.n_filler_train:])

    def fresh_filler_sentences(self, count: int) -> tuple[str, ...]:
        """``count`` more generic sentences, none of them among ``filler_sentences()`` (training or held-out)."""
        known = self.spec.n_filler_train + self.spec.n_filler_heldout
        return tuple(self._generic_stream(known + count)[known:])

    def _generic_stream(self, count: int) -> list[str]:
        # one seeded stream of distinct sentences: a longer prefix never reorders a shorter one
        rng = random.Random(f"editsafety-filler-{self.spec.seed}")
        return draw_distinct(lambda: _generic_sentence(rng), count, "generic sentences")


def draw_distinct(draw: Callable[[], str], count: int, what: str, *, exclude: Iterable[str] = ()) -> list[str]:
    """The first ``count`` distinct values of ``draw()`` that are not in ``exclude``, in order; raises ValueError
    (naming ``what``) when 100 draws per value do not find that many, rather than looping forever on a pool too
    small."""
    seen: set[str] = set(exclude)
    out: list[str] = []
    for _ in range(100 * count):
        if len(out) == count:
            break
        value = draw()
        if value not in seen:
            seen.add(value)
            out.append(value)
    if len(out) < count:
        raise ValueError(f"could not draw {count} distinct {what} (found {len(out)})")
    return out


def _generic_sentence(rng: random.Random) -> str:
    def clause() -> str:
        return (f"the {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} "
                f"the {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} {rng.choice(_PLACES)}")

    text = clause()
    if rng.random() < 0.5:
        text += f" {rng.choice(_CONNECTIVES)} {clause()}"
    return text[0].upper() + text[1:] + "."


def render_fact(subject: str, template: str, obj: str | None, lead_in: str = "") -> str:
    """One fact sentence, or a prompt when ``obj`` is None (no trailing space: the object follows a space)."""
    body = template.format(s=subject)
    text = lead_in + body
    return text if obj is None else f"{text} {obj}."
