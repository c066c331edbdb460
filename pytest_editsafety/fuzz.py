"""Fuzzing editors for cases that break the certification bounds: hypothesis strategies and the search.

A *fuzz world* is what generated cases are made of, taken from the model itself: single-token subjects
(the organism's own one-token names with their true facts, plus capitalised words of the model's vocabulary
with the answer the model itself prefers), relations with their phrasings and objects, and lead-ins that
move the subject from position 0 (the papers' hard shape) to later in the prompt. ``edit_cases`` draws
cases from it; every draw is a plain index into one of the world's fixed tuples, so hypothesis shrinks
towards the first subject, no lead-in (subject first), the first relation and phrasing, and the first false
target.

``fuzz_search`` runs one check per generated case (the suite's check is a full certification test through
the harness) and keeps every failing case in the order found; the last one is hypothesis's shrunk,
minimal example. ``failure_case_set`` turns them into a case file that ``--cases`` replays.

The plugin imports this module at startup, so hypothesis is imported inside the functions that use it and
torch never: the model is touched only by ``build_fuzz_world`` (through the caller's loaded model) to read
its vocabulary and its own answers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_editsafety.cases import CaseSet, EditCase, NeighborhoodPrompt

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_EXAMPLES",
    "DEFAULT_OUT",
    "MAX_RUNS_PER_EXAMPLE",
    "FuzzFindings",
    "FuzzRelation",
    "FuzzSubject",
    "FuzzTarget",
    "FuzzWorld",
    "build_fuzz_world",
    "case_from_draw",
    "default_max_runs",
    "edit_cases",
    "failure_case_set",
    "fuzz_out_path",
    "fuzz_search",
    "fuzz_settings",
    "fuzz_target",
    "organism_world_spec",
    "vocabulary_words",
    "world_from_organism",
]

DEFAULT_EXAMPLES = 24
# default cap on certification runs per search, per example asked for: generation plus a bounded shrink
MAX_RUNS_PER_EXAMPLE = 4
DEFAULT_OUT = "reports/fuzz-{editor}-{model}.json"
FUZZ_SET_NAME = "fuzz"
N_NEIGHBOURS = 3
N_VOCABULARY_SUBJECTS = 8


# --------------------------------------------------------------------------------------------------
# The world generated cases are drawn from


@dataclass(frozen=True)
class FuzzRelation:
    name: str
    templates: tuple[str, ...]  # with "{}" for the subject; the object follows after a space
    objects: tuple[str, ...]


@dataclass(frozen=True)
class FuzzSubject:
    name: str
    origin: str  # "world": an organism subject and its true facts; "vocabulary": the model's own answers
    facts: tuple[tuple[str, str], ...]  # (relation, object), one per relation of the world

    def fact(self, relation: str) -> str:
        for name, obj in self.facts:
            if name == relation:
                return obj
        raise KeyError(f"subject {self.name!r} has no fact for relation {relation!r}")


@dataclass(frozen=True)
class FuzzWorld:
    subjects: tuple[FuzzSubject, ...]
    relations: tuple[FuzzRelation, ...]
    lead_ins: tuple[str, ...]  # "" first: the subject at position 0

    def __post_init__(self) -> None:
        if not self.subjects or not self.relations or not self.lead_ins:
            raise ValueError("a fuzz world needs subjects, relations and lead-ins")
        if self.lead_ins[0] != "":
            raise ValueError("a fuzz world's first lead-in must be '' (subject first), the shape fuzzing shrinks to")
        names = {r.name for r in self.relations}
        for subject in self.subjects:
            missing = names - {name for name, _ in subject.facts}
            if missing:
                raise ValueError(f"fuzz subject {subject.name!r} lacks facts for {', '.join(sorted(missing))}")
        for relation in self.relations:
            if len(set(relation.objects)) < 2 or not relation.templates:
                raise ValueError(f"fuzz relation {relation.name!r} needs two objects and a template")


def _relations() -> tuple[FuzzRelation, ...]:
    from pytest_editsafety.zoo.world import RELATIONS

    return tuple(FuzzRelation(r.name, tuple(t.format(s="{}") for t in r.templates), r.objects) for r in RELATIONS)


def _lead_ins() -> tuple[str, ...]:
    from pytest_editsafety.zoo.world import HELDOUT_LEAD_INS, LEAD_INS

    return ("", *LEAD_INS, *HELDOUT_LEAD_INS)


def world_from_organism(world: Any, extra_subjects: Sequence[FuzzSubject] = ()) -> FuzzWorld:
    """The organism's one-token subjects with their true facts, its relations and lead-ins (training and
    held-out), plus ``extra_subjects`` (vocabulary words)."""
    relations = _relations()
    subjects = tuple(
        FuzzSubject(s, "world", tuple((r.name, world.object_of(s, r.name)) for r in relations))
        for s in world.single_subjects
    )
    taken = {s.name for s in subjects}
    return FuzzWorld(subjects + tuple(s for s in extra_subjects if s.name not in taken), relations, _lead_ins())


def vocabulary_words(tokenizer: Any, *, limit: int, exclude: Sequence[str] = ()) -> tuple[str, ...]:
    """Up to ``limit`` capitalised alphabetic words that are one token of the model's vocabulary both at a
    text's start and after a space (the shape a hard case needs), spread evenly over the vocabulary ids."""
    excluded = {w.casefold() for w in exclude}
    candidates: list[tuple[int, str]] = []
    for token, token_id in tokenizer.get_vocab().items():
        word = tokenizer.convert_tokens_to_string([token]).strip()
        if len(word) >= 3 and word.isalpha() and word.isascii() and word[0].isupper() and word.casefold() not in excluded:
            candidates.append((token_id, word))
    words: list[str] = []
    seen: set[str] = set()
    for _, word in sorted(candidates):
        if word in seen:
            continue
        seen.add(word)
        if all(len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 1 for text in (word, " " + word)):
            words.append(word)
    if len(words) <= limit:
        return tuple(words)
    step = len(words) / limit
    return tuple(words[int(i * step)] for i in range(limit))


def model_answers(model: Any, tokenizer: Any, words: Sequence[str], relations: Sequence[FuzzRelation]
                  ) -> tuple[FuzzSubject, ...]:
    """``words`` as subjects whose "facts" are the objects the model itself prefers after each relation's
    first phrasing: a false target is then one the model does not already predict."""
    from pytest_editsafety.metrics import Continuation, answer_scores

    pairs = [Continuation(r.templates[0].replace("{}", w, 1), o) for w in words for r in relations for o in r.objects]
    scores = iter(score for score, _ in answer_scores(model, tokenizer, pairs))
    subjects = []
    for word in words:
        facts = []
        for relation in relations:
            by_object = [(next(scores), obj) for obj in relation.objects]
            facts.append((relation.name, max(by_object, key=lambda pair: pair[0])[1]))
        subjects.append(FuzzSubject(word, "vocabulary", tuple(facts)))
    return tuple(subjects)


def organism_world_spec(loaded: Any) -> Any:
    """The ``WorldSpec`` a model organism was trained on, or None for a model that is no organism. An organism
    whose world cannot be told raises (``zoo.build.organism_world`` names the file it needed)."""
    from pytest_editsafety.organisms import is_organism_model
    from pytest_editsafety.zoo.build import organism_world

    if not is_organism_model(loaded.model):
        return None
    return organism_world(loaded.model.config)


def build_fuzz_world(loaded: Any, *, n_vocabulary: int = N_VOCABULARY_SUBJECTS) -> FuzzWorld:
    """The fuzz world of a loaded model: its organism world when it is one, plus ``n_vocabulary`` words of
    its own vocabulary (for any model), each with the model's own answers."""
    from pytest_editsafety.zoo.world import World

    relations = _relations()
    spec = organism_world_spec(loaded)
    world = World(spec) if spec is not None else None
    exclude = [*(world.single_subjects if world else ()), *(o for r in relations for o in r.objects)]
    words = vocabulary_words(loaded.tokenizer, limit=n_vocabulary, exclude=exclude)
    vocabulary = model_answers(loaded.model, loaded.tokenizer, words, relations) if words else ()
    if world is not None:
        return world_from_organism(world, vocabulary)
    if not vocabulary:
        raise ValueError(f"model {loaded.spec.name}: no single-token capitalised words in its vocabulary to fuzz with")
    return FuzzWorld(vocabulary, relations, _lead_ins())


# --------------------------------------------------------------------------------------------------
# Cases from draws


def _case_id(case: EditCase) -> str:
    """Named by the whole content (every field but the id): the harness caches the unedited model's probe,
    which reads the paraphrases and neighbours too, by id; and replays stay stable."""
    content = {key: value for key, value in case.to_dict().items() if key != "case_id"}
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:10]
    return f"{FUZZ_SET_NAME}-{digest}"


def case_from_draw(world: FuzzWorld, subject: int, relation: int, template: int, lead_in: int, target: int
                   ) -> EditCase:
    """The case the indices pick (each taken modulo its range). Paraphrases are the relation's other
    phrasings behind the same lead-in; neighbours the next subjects of the world, asked the same way, whose
    answer is not the new target."""
    chosen = world.subjects[subject % len(world.subjects)]
    rel = world.relations[relation % len(world.relations)]
    lead = world.lead_ins[lead_in % len(world.lead_ins)]
    phrasing = rel.templates[template % len(rel.templates)]
    truth = chosen.fact(rel.name)
    false_targets = [o for o in rel.objects if o != truth]
    new = false_targets[target % len(false_targets)]
    prompt = lead + phrasing
    others = world.subjects[subject % len(world.subjects) + 1:] + world.subjects[: subject % len(world.subjects)]
    neighbours = [s for s in others if s.fact(rel.name) != new][:N_NEIGHBOURS]
    case = EditCase(
        case_id=FUZZ_SET_NAME,  # replaced below by the id of the content
        subject=chosen.name,
        prompt=prompt,
        target_new=new,
        ground_truth=truth,
        paraphrase_prompts=tuple(lead + t.replace("{}", chosen.name, 1) for t in rel.templates if t != phrasing),
        neighborhood=tuple(NeighborhoodPrompt(prompt.replace("{}", n.name, 1), n.fact(rel.name)) for n in neighbours),
        metadata={"relation": rel.name, "source": "fuzz", "subject_origin": chosen.origin,
                  "subject_first": lead == ""},
    )
    return dataclasses.replace(case, case_id=_case_id(case))


def edit_cases(world: FuzzWorld) -> Any:
    """A hypothesis strategy of edit cases from ``world`` (shrinking towards index 0 of every choice)."""
    from hypothesis import strategies as st

    def indices(n: int) -> Any:
        return st.integers(min_value=0, max_value=n - 1)

    @st.composite
    def draw_case(draw: Any) -> EditCase:
        relation = draw(indices(len(world.relations)))
        rel = world.relations[relation]
        # the lead-in is drawn first among the shape choices: subject-first vs later is the axis that matters
        lead_in = draw(indices(len(world.lead_ins)))
        subject = draw(indices(len(world.subjects)))
        template = draw(indices(len(rel.templates)))
        target = draw(indices(len(rel.objects) - 1))
        return case_from_draw(world, subject, relation, template, lead_in, target)

    return draw_case()


# --------------------------------------------------------------------------------------------------
# The search


def fuzz_settings(max_examples: int = DEFAULT_EXAMPLES) -> Any:
    """The derandomized settings: the same cases in the same order on every run and machine, no example
    database, no deadline (an edit takes seconds), and no ``explain`` phase (it would rerun variations of
    the failing case, an edit each). A ``settings`` object, not a registered profile: hypothesis's profile
    registry is process-global, and a run must not change what other hypothesis tests see."""
    from hypothesis import HealthCheck, Phase, settings

    if max_examples < 1:
        raise ValueError(f"fuzz examples must be at least 1, got {max_examples}")
    return settings(
        derandomize=True,
        database=None,
        max_examples=max_examples,
        deadline=None,
        phases=(Phase.explicit, Phase.generate, Phase.shrink),
        report_multiple_bugs=False,
        suppress_health_check=(HealthCheck.too_slow,),
        print_blob=False,
    )


def default_max_runs(max_examples: int) -> int:
    """Certification runs a search may take by default: its examples, and three times as many to shrink."""
    return MAX_RUNS_PER_EXAMPLE * max_examples


@dataclass(frozen=True)
class FuzzTarget:
    """One (editor, model) pair the fuzz suite searches: ``model`` is the plan's slug, ``given`` the
    ``--model`` value it came from (what a replay command names)."""

    editor: str
    model: str
    given: str

    @property
    def test_id(self) -> str:
        from editors.storage import slugify

        return f"{slugify(self.editor)}-{self.model}"


class _BoundsBroken(AssertionError):
    """Raised inside the search for every failing case, from one place, so hypothesis sees one bug."""


class _RunsSpent(BaseException):
    """Ends a search whose run budget is spent. Not an ``Exception``: hypothesis would take one for a failing
    case and shrink on; anything else it lets through, ending the search where it stands."""


@dataclass
class FuzzFindings:
    """Every failing case seen (first-found order, each once) and the violations of each."""

    tried: int = 0
    failures: list[tuple[EditCase, tuple[str, ...]]] = field(default_factory=list)
    minimal: EditCase | None = None  # the last failing case checked: hypothesis's shrunk example
    flaky: bool = False  # a failing case passed when hypothesis replayed it
    budget_spent: bool = False  # stopped at max_runs: ``minimal`` is the smallest failing case found by then

    def add(self, case: EditCase, violations: Sequence[str]) -> None:
        if all(case != seen for seen, _ in self.failures):
            self.failures.append((case, tuple(violations)))
        self.minimal = case

    def violations_of(self, case: EditCase) -> tuple[str, ...]:
        for seen, violations in self.failures:
            if seen == case:
                return violations
        return ()


def fuzz_search(check: Callable[[EditCase], Sequence[str]], strategy: Any, profile: Any,
                max_runs: int | None = None) -> FuzzFindings:
    """Run ``check`` on cases drawn from ``strategy`` under hypothesis settings ``profile`` until one fails and
    is shrunk, the examples are spent, or ``check`` has run ``max_runs`` times (None: no cap). ``check``
    returns the case's violations (empty: it passes); an exception from it counts as a failure too, its text
    the violation (a certification test fails on it as well).

    Each check is a full certification run, and hypothesis's shrinker has no budget of its own that fits
    one (it may try hundreds of candidates), so ``max_runs`` ends the search where it stands; the smallest
    failing case found by then is ``minimal``."""
    from hypothesis import given
    from hypothesis.errors import Flaky

    if max_runs is not None and max_runs < 1:
        raise ValueError(f"fuzz max runs must be at least 1, got {max_runs}")
    findings = FuzzFindings()

    @profile
    @given(strategy)
    def search(case: EditCase) -> None:
        if max_runs is not None and findings.tried >= max_runs:
            raise _RunsSpent()
        findings.tried += 1
        try:
            violations = tuple(check(case))
        except Exception as err:  # an edit that cannot even be measured is a failing case
            log.debug("fuzz case %s raised", case.case_id, exc_info=True)
            violations = (f"error: {type(err).__name__}: {err}",)
        if violations:
            findings.add(case, violations)
            raise _BoundsBroken(f"{case.case_id}: " + "; ".join(violations))

    try:
        search()
    except _BoundsBroken:
        pass
    except _RunsSpent:
        log.warning("fuzzing stopped after %d certification runs (the run budget)%s", findings.tried,
                    "; the failing case reported is the smallest found by then" if findings.failures else "")
        findings.budget_spent = True
    except Flaky as err:
        # a case that failed once and passed when hypothesis replayed it: the failures seen are still real
        # findings (and the replay decides), so they are kept rather than lost to the error
        log.warning("fuzzing was flaky, a failing case passed on replay: %s", str(err).splitlines()[0])
        findings.flaky = True
    return findings


def fuzz_target(hub: Any, target: FuzzTarget, *, max_examples: int = DEFAULT_EXAMPLES,
                max_runs: int | None = None, n_vocabulary: int = N_VOCABULARY_SUBJECTS) -> FuzzFindings:
    """Search ``target`` with full certification tests through the harness's ``hub`` (``ModelHub``): each
    generated case is edited from the unedited model, measured, restored and judged against the run's bounds,
    exactly as ``--cases`` would run it; at most ``max_runs`` of them (default ``default_max_runs``)."""
    from pytest_editsafety.plan import PlanItem

    world = build_fuzz_world(hub.loaded(target.model), n_vocabulary=n_vocabulary)
    log.info("fuzzing %s on %s: %d subjects, %d relations, %d lead-ins, %d examples", target.editor, target.model,
             len(world.subjects), len(world.relations), len(world.lead_ins), max_examples)

    def check(case: EditCase) -> Sequence[str]:
        item = PlanItem(f"{target.test_id}-{case.case_id}", "case", target.editor, target.model, FUZZ_SET_NAME,
                        case.case_id)
        outcome = hub.run(item, case)
        log.info("fuzz %s: %s %r -> %r: %s", target.test_id, case.case_id, case.rewrite_prompt, case.target_new,
                 "error" if outcome.error is not None else ("; ".join(outcome.violations) or "within the bounds"))
        if outcome.error is not None:
            raise outcome.error
        return outcome.violations

    runs = default_max_runs(max_examples) if max_runs is None else max_runs
    return fuzz_search(check, edit_cases(world), fuzz_settings(max_examples), max_runs=runs)


def failure_case_set(findings: FuzzFindings, *, editor: str, model: str) -> CaseSet:
    """The failing cases as a replayable set: the shrunk, minimal case first, then the others as found."""
    ordered = [case for case, _ in findings.failures]
    if findings.minimal is not None:
        ordered = [findings.minimal] + [c for c in ordered if c != findings.minimal]
    cases = []
    for index, case in enumerate(ordered):
        notes: Mapping[str, Any] = {"fuzz_editor": editor, "fuzz_model": model, "fuzz_minimal": index == 0,
                                    "fuzz_violations": "; ".join(findings.violations_of(case))[:500]}
        cases.append(EditCase(
            case_id=case.case_id, subject=case.subject, prompt=case.prompt, target_new=case.target_new,
            ground_truth=case.ground_truth, paraphrase_prompts=case.paraphrase_prompts,
            neighborhood=case.neighborhood, metadata={**dict(case.metadata), **notes}, is_hard=case.is_hard,
        ))
    return CaseSet(name=FUZZ_SET_NAME, cases=tuple(cases), source=f"fuzzing {editor} on {model}", format="canonical")


def fuzz_out_path(template: str | Path, target: FuzzTarget) -> Path:
    """Where ``target``'s failing cases go: ``{editor}`` and ``{model}`` in ``template`` are replaced."""
    from editors.storage import slugify

    text = str(template)
    return Path(text.replace("{editor}", slugify(target.editor)).replace("{model}", slugify(target.model)))
