"""The plan: what a certification run runs, as plain data (no torch, no pytest).

The selected editors × models × case sets become ``PlanItem``s with stable ids (``rome-tiny-gpt2-hard-0007``;
sequential runs ``rome-tiny-gpt2-seq-hard``, ``rome-tiny-gpt2-seq10-hard`` for 10 edits; with a batch size K,
batches ``memit-tiny-gpt2-normal-k8-batch-003``), built the same way on the controller and on every xdist worker
from the options alone: nothing random, timed or device-dependent. The plugin validates options and collects
with it without loading a model.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pytest_editsafety.cases import CaseSet, EditCase, resolve_cases
from pytest_editsafety.organisms import is_organism
from pytest_editsafety.registry import ModelSpec, resolve_model
from pytest_editsafety.sequential import REAL_SEQUENTIAL_CORPUS, sequential_length

log = logging.getLogger(__name__)

__all__ = [
    "ModelChoice",
    "Plan",
    "PlanError",
    "PlanItem",
    "SelectedCaseSet",
    "build_plan",
    "case_set_sha256",
    "controller_identity",
    "default_ppl_corpus",
    "error_record",
]

SEQUENTIAL_TAG = "seq"
BATCH_TAG = "batch"
ORGANISM_CORPUS = "organism-ppl"
# C comes from other text than the perplexity corpus (ROME: Wikipedia, scored on ME-PPL): for the organisms their
# encyclopedia (organism-wiki: the held-out generic sentences and sentences stating the world's facts, as Wikipedia
# names the entities the cases edit), and for real models wikitext-103 (Wikipedia articles, through the datasets cache), unless
# --editsafety-stats-corpus or --editsafety-stats-dir says otherwise. Never the perplexity corpus by default: 50
# ME-PPL sentences hold fewer keys than GPT-2-XL's 6400 dimensions, and C would be measured on the scored text.
ORGANISM_STATS_CORPUS = "organism-wiki"
REAL_STATS_CORPUS = "wikitext-103"
REAL_CORPUS = "me-ppl-50"
# The case sets whose normal cases define a model's reference ROME denominator.
ORGANISM_REFERENCE_SET = "normal"
REAL_REFERENCE_SET = "real-normal"


def _slugify(text: str, **kwargs: Any) -> str:
    from editors.storage import slugify  # lazily: see pytest_editsafety.editors_package

    return slugify(text, **kwargs)


class PlanError(ValueError):
    """The selection cannot form a run: an empty selection, a bad limit; the message names the option."""


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def default_ppl_corpus(spec: ModelSpec) -> str:
    """The perplexity corpus a model is scored on unless the caller names one."""
    return ORGANISM_CORPUS if is_organism(spec) else REAL_CORPUS


def _model_slug(spec: ModelSpec) -> str:
    if spec.source == "zoo" or spec.name in _builtin_names():
        return _slugify(spec.name)
    if spec.source == "hub":
        text = spec.location.rsplit("/", 1)[-1]
        return _slugify(f"{text}-{spec.revision}" if spec.revision else text)
    return _slugify(Path(spec.location).name)


def _builtin_names() -> frozenset[str]:
    from pytest_editsafety.registry import BUILTIN_MODELS

    return frozenset(BUILTIN_MODELS)


@dataclass(frozen=True)
class ModelChoice:
    """One ``--model`` value: its spec, the slug tests and reports call it by, and its corpora."""

    given: str
    slug: str
    spec: ModelSpec
    organism: bool
    ppl_corpus: str
    stats_corpus: str  # the default sample for C (--stats-corpus overrides it)
    # the case set whose normal cases give the reference denominator (organism or real-text cases)
    reference_set: str
    # the corpus sequential runs are scored on: the papers' ME-PPL_1k for real models, an organism's ppl_corpus
    sequential_ppl_corpus: str


def case_set_sha256(cases: Sequence[EditCase]) -> str:
    """The content hash of cases: sha256 of their canonical dicts, in order (the name and the file's path and
    format do not count, so one set read from another place or format hashes the same)."""
    text = json.dumps([case.to_dict() for case in cases], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class SelectedCaseSet:
    given: str
    slug: str
    case_set: CaseSet  # already limited to --editsafety-limit cases
    n_cases: int  # cases in the whole set, before the limit
    sha256: str  # case_set_sha256 of the whole set, before the limit

    @property
    def narrowed(self) -> bool:
        """Whether --editsafety-limit left cases of the set out."""
        return len(self.case_set.cases) < self.n_cases


@dataclass(frozen=True)
class PlanItem:
    """One certification test; plain strings only, so it is hashable and identical on every worker."""

    test_id: str
    kind: Literal["case", "sequential", "batch"]
    editor: str
    model: str  # ModelChoice.slug
    case_set: str  # SelectedCaseSet.slug
    case_id: str = ""  # empty for sequential runs and batches
    # a batch's member cases, in the case file's order (--editsafety-batch-size); empty for other kinds
    case_ids: tuple[str, ...] = ()
    # each member's part of the id the case has as a single-edit test ("normal-0024"): member records are named
    # "<batch test id>/<part>"
    case_parts: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    editors: tuple[str, ...]
    models: tuple[ModelChoice, ...]
    case_sets: tuple[SelectedCaseSet, ...]
    items: tuple[PlanItem, ...]
    limit: int | None = None  # --editsafety-limit
    sequential_edits: int | None = None  # --editsafety-sequential-edits; None: sequential.sequential_length's default
    # lookups the controller makes once per test report: kept as indexes, not scans
    _items_by_id: Mapping[str, PlanItem] = field(init=False, repr=False, compare=False)
    _cases: Mapping[tuple[str, str], EditCase] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_items_by_id", {item.test_id: item for item in self.items})
        object.__setattr__(self, "_cases", {
            (selected.slug, case.case_id): case for selected in self.case_sets for case in selected.case_set.cases
        })

    def model(self, slug: str) -> ModelChoice:
        for choice in self.models:
            if choice.slug == slug:
                return choice
        raise KeyError(f"no model {slug!r} in the plan")

    def case_set(self, slug: str) -> SelectedCaseSet:
        for selected in self.case_sets:
            if selected.slug == slug:
                return selected
        raise KeyError(f"no case set {slug!r} in the plan")

    def case(self, item: PlanItem) -> EditCase:
        return self._cases[(item.case_set, item.case_id)]

    def members(self, item: PlanItem) -> tuple[EditCase, ...]:
        """A batch's member cases, in order."""
        return tuple(self._cases[(item.case_set, case_id)] for case_id in item.case_ids)
    def sequential_cases(self, item: PlanItem) -> tuple[EditCase, ...]:
        """The edits of a sequential run, in the case file's order: its set's first ``sequential_length`` cases."""
        cases = self.case_set(item.case_set).case_set.cases
        return tuple(cases[:sequential_length(self.sequential_edits, len(cases))])

    def item(self, test_id: str) -> PlanItem | None:
        return self._items_by_id.get(test_id)

    @functools.cached_property
    def record(self) -> Any:
        """The plan as a results file records it (``pytest_editsafety.results.RunPlan``, plain data)."""
        from pytest_editsafety.results import PlannedCaseSet, RunPlan

        return RunPlan.build(
            editors=self.editors,
            models=tuple(m.slug for m in self.models),
            case_sets=tuple(PlannedCaseSet(c.slug, c.given, c.sha256, c.n_cases, len(c.case_set.cases))
                            for c in self.case_sets),
            limit=self.limit,
            test_ids=tuple(item.test_id for item in self.items),
        )

    @property
    def plan_hash(self) -> str:
        """The plan's identity, equal on every shard and worker of one command (no paths, nothing timed)."""
        return self.record.plan_hash


def _unique(slugs: Sequence[str], keys: Sequence[str]) -> list[str]:
    """Disambiguate equal slugs of different inputs with a short hash of the input (stable per input)."""
    counts: dict[str, int] = {}
    for slug in slugs:
        counts[slug] = counts.get(slug, 0) + 1
    return [f"{slug}-{_short_hash(key)}" if counts[slug] > 1 else slug for slug, key in zip(slugs, keys)]


def _dedupe(values: Sequence[str]) -> tuple[str, ...]:
    seen: list[str] = []
    for value in values:
        if value not in seen:
            seen.append(value)
    return tuple(seen)


def build_plan(
    editors: Sequence[str],
    models: Sequence[str | ModelSpec],
    case_sets: Sequence[str | CaseSet],
    *,
    ppl_corpus: str | None = None,
    limit: int | None = None,
    sequential: bool = False,
    batch_size: int = 1,
    sequential_edits: int | None = None,
    sequential_ppl_corpus: str | None = None,
    resolve: Callable[[str], CaseSet] = resolve_cases,
) -> Plan:
    """The run's items, model-major (a worker finishes one model before the next), then case set, the case file's
    order and editor (each case's editors in a row, where a measurement they share is at hand), then the
    sequential runs. A model is a name or an already resolved ``ModelSpec``, a case set a name, a file
    or a ``CaseSet`` in hand. A sequential run makes ``sequential_edits`` edits (default: the papers' 107, or the
    whole set where it holds fewer), scored on ``sequential_ppl_corpus`` (default ME-PPL_1k, an organism's own
    perplexity corpus for organisms). A ``batch_size`` above 1 makes each case set's cases, in order, into batches
    of that many (the last may be smaller), one test per batch, instead of one test per case. Raises
    ``UnknownModelError``/``CaseValidationError`` from the resolvers and ``PlanError`` for an empty selection;
    editors are validated by the caller (the registry)."""
    editors = _dedupe([e for e in editors if e])
    spec_of = {m.name: m for m in models if isinstance(m, ModelSpec)}
    models = _dedupe([m.name if isinstance(m, ModelSpec) else m for m in models if m])
    in_hand = {c.name: c for c in case_sets if isinstance(c, CaseSet)}
    case_sets = _dedupe([c.name if isinstance(c, CaseSet) else c for c in case_sets if c])
    if limit is not None and limit < 1:
        raise PlanError(f"--editsafety-limit must be at least 1, got {limit}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise PlanError(f"--editsafety-batch-size must be an integer >= 1, got {batch_size!r}")
    if sequential_edits is not None and (isinstance(sequential_edits, bool) or not isinstance(sequential_edits, int)
                                         or sequential_edits < 1):
        raise PlanError(f"--editsafety-sequential-edits must be an integer >= 1, got {sequential_edits!r}")
    for what, values in (("editor", editors), ("model", models), ("case set", case_sets)):
        if not values:
            raise PlanError(f"empty selection: no {what} selected")

    specs = [spec_of[m] if m in spec_of else resolve_model(m) for m in models]
    # one model under two names (a built-in alias and its Hugging Face id) is certified once, under the first
    first: dict[tuple[str, str, str | None], str] = {}
    kept = []
    for given, spec in zip(models, specs):
        same = first.setdefault((spec.source, spec.location, spec.revision), given)
        if same == given:
            kept.append((given, spec))
        else:
            log.warning("--model: %r names the same model as %r; certifying it once", given, same)
    models, specs = [g for g, _ in kept], [s for _, s in kept]
    model_slugs = _unique([_model_slug(s) for s in specs], [s.location for s in specs])
    choices = []
    for given, spec, slug in zip(models, specs, model_slugs):
        organism = is_organism(spec)
        model_corpus = ppl_corpus or (ORGANISM_CORPUS if organism else REAL_CORPUS)
        choices.append(ModelChoice(
            given=given, slug=slug, spec=spec, organism=organism,
            ppl_corpus=model_corpus,
            stats_corpus=ORGANISM_STATS_CORPUS if organism else REAL_STATS_CORPUS,
            reference_set=ORGANISM_REFERENCE_SET if organism else REAL_REFERENCE_SET,
            sequential_ppl_corpus=sequential_ppl_corpus or (model_corpus if organism else REAL_SEQUENTIAL_CORPUS),
        ))

    loaded = [in_hand[c] if c in in_hand else resolve(c) for c in case_sets]
    set_slugs = _unique([_slugify(s.name, fallback="cases") for s in loaded], [str(s.source) for s in loaded])
    selected = []
    for given, case_set, slug in zip(case_sets, loaded, set_slugs):
        cases = case_set.cases[:limit] if limit is not None else case_set.cases
        if not cases:
            raise PlanError(f"empty selection: case set {given!r} ({case_set.source}) holds no cases")
        selected.append(SelectedCaseSet(given=given, slug=slug, case_set=case_set.with_cases(cases),
                                        n_cases=len(case_set.cases), sha256=case_set_sha256(case_set.cases)))
        if sequential:
            try:
                sequential_length(sequential_edits, len(cases))
            except ValueError as err:
                narrowed = ", as --editsafety-limit narrows it" if len(cases) < len(case_set.cases) else ""
                raise PlanError(f"{err} (case set {given!r}{narrowed})") from None

    items: list[PlanItem] = []
    for choice in choices:
        prefixes = [f"{_slugify(editor)}-{choice.slug}" for editor in editors]
        for chosen in selected:
            ids = [_slugify(c.case_id, fallback="case") for c in chosen.case_set.cases]
            # the organism's ids already name their set ("hard-0007"); others get it prepended so two
            # files numbered from 0 cannot collide
            parts = [i if i.startswith(f"{chosen.slug}-") else f"{chosen.slug}-{i}" for i in ids]
            parts = _unique(parts, [c.case_id for c in chosen.case_set.cases])
            per_editor = [
                _batches(prefix, choice.slug, editor, chosen, parts, batch_size) if batch_size > 1 else
                [PlanItem(f"{prefix}-{part}", "case", editor, choice.slug, chosen.slug, case.case_id)
                 for case, part in zip(chosen.case_set.cases, parts)]
                for editor, prefix in zip(editors, prefixes)
            ]
            # case-major: a case's editors run one after another, so the editors that share its measurement
            # (editors.base.EditorBase.measurement_key) find it in the worker that ran the first of them
            for same_case in zip(*per_editor):
                items.extend(same_case)
        if sequential:
            for editor, prefix in zip(editors, prefixes):
                for chosen in selected:
                    items.append(PlanItem(f"{prefix}-{_sequential_tag(sequential_edits, chosen)}-{chosen.slug}",
                                          "sequential", editor, choice.slug, chosen.slug))
    counts = Counter(item.test_id for item in items)
    duplicates = sorted(test_id for test_id, n in counts.items() if n > 1)
    if duplicates:  # only reachable with hostile names; refuse rather than merge two tests' records
        raise PlanError(f"test ids collide: {', '.join(duplicates[:5])}")
    return Plan(tuple(editors), tuple(choices), tuple(selected), tuple(items), limit, sequential_edits)


def _sequential_tag(requested: int | None, chosen: SelectedCaseSet) -> str:
    """``seq`` for a sequential run of the default length, ``seq10`` for one of 10 edits otherwise: the length is in
    the test id, so the plan's hash tells runs of different lengths apart and a baseline never compares them."""
    n_cases = len(chosen.case_set.cases)
    length = sequential_length(requested, n_cases)
    return SEQUENTIAL_TAG if length == sequential_length(None, n_cases) else f"{SEQUENTIAL_TAG}{length}"


def _batches(prefix: str, model: str, editor: str, chosen: SelectedCaseSet, parts: Sequence[str], size: int
             ) -> list[PlanItem]:
    """A case set's cases in order, ``size`` at a time: ``<editor>-<model>-<set>-k<size>-batch-000``, ... (numbered
    from 0, as the organism's cases are; three digits keep them sorted up to 1000 batches). The id names the batch
    size: 48 cases make six batches with K = 8 and with K = 9, and the plan's hash, a baseline and a merge tell tests
    apart by their ids alone."""
    cases = chosen.case_set.cases
    out = []
    for number, start in enumerate(range(0, len(cases), size)):
        members = cases[start:start + size]
        test_id = f"{prefix}-{chosen.slug}-k{size}-{BATCH_TAG}-{number:03d}"
        out.append(PlanItem(test_id, "batch", editor, model, chosen.slug,
                            case_ids=tuple(c.case_id for c in members), case_parts=tuple(parts[start:start + size])))
    return out


def member_test_id(item: PlanItem, part: str) -> str:
    """The name of a batch member's record: the batch's test id and the case's part of its single-edit id."""
    return f"{item.test_id}/{part}"


def controller_identity(choice: ModelChoice) -> str:
    """The model's identity without loading weights, for metadata when no worker reported it."""
    spec = choice.spec
    try:
        if spec.source == "zoo":
            from pytest_editsafety.zoo import recipe_for

            return recipe_for(spec.location).recipe_hash
        if spec.source == "local":
            from pytest_editsafety.registry import local_identity

            return local_identity(Path(spec.location))
    except Exception as err:  # metadata is best effort once the tests have run
        log.warning("cannot compute the identity of model %s: %s", choice.slug, err)
        return "unknown"
    return f"{spec.location}@{spec.revision or 'unresolved'}"


def error_record(plan: Plan, item: PlanItem, message: str, *, duration_s: float = 0.0, worker: str | None = None,
                 device: str | None = None) -> dict[str, Any]:
    """A record for a test that produced none itself (a setup error, a crashed worker), which ran on ``worker``
    and ``device`` where known."""
    from pytest_editsafety.results import BatchRecord, CaseRecord, SequentialRecord

    violations = (f"error: {message}",)
    if item.kind == "batch":
        return BatchRecord(
            test_id=item.test_id, editor=item.editor, model=item.model, case_set=item.case_set,
            case_ids=item.case_ids, members=(), metrics={}, certified=False, collapse=False, violations=violations,
            outcome="error", duration_s=duration_s, worker=worker, device=device,
        ).to_dict()
    if item.kind == "sequential":
        n_edits = len(plan.sequential_cases(item))
        return SequentialRecord(
            test_id=item.test_id, editor=item.editor, model=item.model, case_set=item.case_set, n_edits=n_edits,
            ppl_after_each=(), ppl_unedited=math.nan, certified=False, collapse=False, violations=violations,
            outcome="error", duration_s=duration_s, worker=worker, device=device,
        ).to_dict()
    case = plan.case(item)
    return CaseRecord(
        test_id=item.test_id, editor=item.editor, model=item.model, case_set=item.case_set, case_id=case.case_id,
        is_hard=bool(case.is_hard), subject=case.subject, prompt=case.prompt, target_new=case.target_new,
        ground_truth=case.ground_truth, metrics={}, certified=False, collapse=False, violations=violations,
        outcome="error", duration_s=duration_s, worker=worker, device=device,
    ).to_dict()
