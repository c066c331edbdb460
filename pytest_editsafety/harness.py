"""What a certification run runs and how one test runs it, with no pytest in sight.

Two halves:

* **The plan** (pure Python, cheap): the selected editors × models × case sets turned into ``PlanItem``s
  with stable ids (``rome-tiny-gpt2-hard-0007``; sequential runs ``rome-tiny-gpt2-seq-hard``). Built the
  same way on the controller and on every xdist worker, from the options alone: nothing random, timed or
  device-dependent. No torch here, so the plugin can validate options and collect without loading a model.
* **The hub** (``ModelHub``, owned by a session fixture, one per worker): loads each model once, caches what
  every test of that model shares (baseline perplexity, context templates, editors, unedited probes, the
  ROME denominator floor) and runs one single-edit case (``run_case``) or one sequential run
  (``run_sequential``), returning the record as plain JSON-able data plus its verdict.

torch, transformers and the editors are imported inside the hub's methods only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import re
import statistics
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pytest_editsafety.bounds import Bounds, Verdict, judge
from pytest_editsafety.cases import CaseSet, EditCase, resolve_cases
from pytest_editsafety.registry import ModelSpec, resolve_model

log = logging.getLogger(__name__)

__all__ = [
    "HubOptions",
    "ModelChoice",
    "ModelHub",
    "Plan",
    "PlanError",
    "PlanItem",
    "RunOutcome",
    "SelectedCaseSet",
    "build_plan",
    "controller_identity",
    "default_ppl_corpus",
    "error_record",
    "is_organism",
    "slugify",
]

SEQUENTIAL_TAG = "seq"
ORGANISM_CORPUS = "organism-ppl"
# C for the organisms comes from other text than the perplexity corpus (ROME: Wikipedia, scored on ME-PPL);
# real models take it from their perplexity corpus unless --stats-corpus or --stats-dir says otherwise.
ORGANISM_STATS_CORPUS = "organism-heldout"
REAL_CORPUS = "me-ppl-50"
# The case sets whose normal cases define a model's reference ROME denominator.
ORGANISM_REFERENCE_SET = "normal"
REAL_REFERENCE_SET = "real-normal"
PPL_BATCH_SIZE = 32
FLOOR_CACHE_FORMAT = "pytest-editsafety/denominator-median/1"

_SLUG_BAD = re.compile(r"[^A-Za-z0-9._-]+")


class PlanError(ValueError):
    """The selection cannot form a run: an empty selection, a bad limit; the message names the option."""


# --------------------------------------------------------------------------------------------------
# The plan


def slugify(text: str, *, fallback: str = "x") -> str:
    """``text`` as a test-id fragment: letters, digits, ``.``, ``_`` and ``-`` only, no edge punctuation."""
    slug = _SLUG_BAD.sub("_", text).strip("._-")
    return slug or fallback


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def is_organism(spec: ModelSpec) -> bool:
    """A project organism: a zoo name, or a local directory whose config carries the recipe hash."""
    if spec.source == "zoo":
        return True
    if spec.source != "local":
        return False
    try:
        config = json.loads((Path(spec.location) / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and bool(config.get("editsafety_recipe_hash"))


def default_ppl_corpus(spec: ModelSpec) -> str:
    """The perplexity corpus a model is scored on unless the caller names one."""
    return ORGANISM_CORPUS if is_organism(spec) else REAL_CORPUS


def _model_slug(spec: ModelSpec) -> str:
    if spec.source == "zoo" or spec.name in _builtin_names():
        return slugify(spec.name)
    if spec.source == "hub":
        text = spec.location.rsplit("/", 1)[-1]
        return slugify(f"{text}-{spec.revision}" if spec.revision else text)
    return slugify(Path(spec.location).name)


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


@dataclass(frozen=True)
class SelectedCaseSet:
    given: str
    slug: str
    case_set: CaseSet  # already limited to --editsafety-limit cases


@dataclass(frozen=True)
class PlanItem:
    """One certification test; plain strings only, so it is hashable and identical on every worker."""

    test_id: str
    kind: Literal["case", "sequential"]
    editor: str
    model: str  # ModelChoice.slug
    case_set: str  # SelectedCaseSet.slug
    case_id: str = ""  # empty for sequential runs


@dataclass(frozen=True)
class Plan:
    editors: tuple[str, ...]
    models: tuple[ModelChoice, ...]
    case_sets: tuple[SelectedCaseSet, ...]
    items: tuple[PlanItem, ...]
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

    def item(self, test_id: str) -> PlanItem | None:
        return self._items_by_id.get(test_id)


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
    models: Sequence[str],
    case_sets: Sequence[str],
    *,
    ppl_corpus: str | None = None,
    limit: int | None = None,
    sequential: bool = False,
    resolve: Callable[[str], CaseSet] = resolve_cases,
) -> Plan:
    """The run's items, model-major (a worker finishes one model before the next), then editor, case set
    and the case file's order. Raises ``UnknownModelError``/``CaseValidationError`` from the resolvers and
    ``PlanError`` for an empty selection; editors are validated by the caller (the registry)."""
    editors = _dedupe([e for e in editors if e])
    models = _dedupe([m for m in models if m])
    case_sets = _dedupe([c for c in case_sets if c])
    if limit is not None and limit < 1:
        raise PlanError(f"--editsafety-limit must be at least 1, got {limit}")
    for what, values in (("editor", editors), ("model", models), ("case set", case_sets)):
        if not values:
            raise PlanError(f"empty selection: no {what} selected")

    specs = [resolve_model(m) for m in models]
    model_slugs = _unique([_model_slug(s) for s in specs], [s.location for s in specs])
    choices = []
    for given, spec, slug in zip(models, specs, model_slugs):
        organism = is_organism(spec)
        choices.append(ModelChoice(
            given=given, slug=slug, spec=spec, organism=organism,
            ppl_corpus=ppl_corpus or (ORGANISM_CORPUS if organism else REAL_CORPUS),
            stats_corpus=ORGANISM_STATS_CORPUS if organism else (ppl_corpus or REAL_CORPUS),
            reference_set=ORGANISM_REFERENCE_SET if organism else REAL_REFERENCE_SET,
        ))

    loaded = [resolve(c) for c in case_sets]
    set_slugs = _unique([slugify(s.name, fallback="cases") for s in loaded], [str(s.source) for s in loaded])
    selected = []
    for given, case_set, slug in zip(case_sets, loaded, set_slugs):
        cases = case_set.cases[:limit] if limit is not None else case_set.cases
        if not cases:
            raise PlanError(f"empty selection: case set {given!r} ({case_set.source}) holds no cases")
        selected.append(SelectedCaseSet(given=given, slug=slug, case_set=case_set.with_cases(cases)))

    items: list[PlanItem] = []
    for choice in choices:
        for editor in editors:
            prefix = f"{slugify(editor)}-{choice.slug}"
            for chosen in selected:
                ids = [slugify(c.case_id, fallback="case") for c in chosen.case_set.cases]
                # the organism's ids already name their set ("hard-0007"); others get it prepended so two
                # files numbered from 0 cannot collide
                parts = [i if i.startswith(f"{chosen.slug}-") else f"{chosen.slug}-{i}" for i in ids]
                parts = _unique(parts, [c.case_id for c in chosen.case_set.cases])
                for case, part in zip(chosen.case_set.cases, parts):
                    items.append(PlanItem(f"{prefix}-{part}", "case", editor, choice.slug, chosen.slug, case.case_id))
            if sequential:
                for chosen in selected:
                    items.append(PlanItem(f"{prefix}-{SEQUENTIAL_TAG}-{chosen.slug}", "sequential", editor,
                                          choice.slug, chosen.slug))
    counts = Counter(item.test_id for item in items)
    duplicates = sorted(test_id for test_id, n in counts.items() if n > 1)
    if duplicates:  # only reachable with hostile names; refuse rather than merge two tests' records
        raise PlanError(f"test ids collide: {', '.join(duplicates[:5])}")
    return Plan(tuple(editors), tuple(choices), tuple(selected), tuple(items))


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


def error_record(plan: Plan, item: PlanItem, message: str, *, duration_s: float = 0.0) -> dict[str, Any]:
    """A record for a test that produced none itself (a setup error, a crashed worker)."""
    from pytest_editsafety.results import CaseRecord, SequentialRecord

    violations = (f"error: {message}",)
    if item.kind == "sequential":
        n_edits = len(plan.case_set(item.case_set).case_set.cases)
        return SequentialRecord(
            test_id=item.test_id, editor=item.editor, model=item.model, case_set=item.case_set, n_edits=n_edits,
            ppl_after_each=(), ppl_unedited=math.nan, certified=False, collapse=False, violations=violations,
            outcome="error", duration_s=duration_s,
        ).to_dict()
    case = plan.case(item)
    return CaseRecord(
        test_id=item.test_id, editor=item.editor, model=item.model, case_set=item.case_set, case_id=case.case_id,
        is_hard=bool(case.is_hard), subject=case.subject, prompt=case.prompt, target_new=case.target_new,
        ground_truth=case.ground_truth, metrics={}, certified=False, collapse=False, violations=violations,
        outcome="error", duration_s=duration_s,
    ).to_dict()


# --------------------------------------------------------------------------------------------------
# The hub


@dataclass(frozen=True)
class HubOptions:
    bounds: Bounds = field(default_factory=Bounds)
    dtype: str | None = None
    device_map: str | None = None
    # ROME/MEMIT .npz statistics directory; without it, C is computed over the statistics corpus
    stats_dir: str | None = None
    # corpus for second-moment statistics; None = each model's perplexity corpus
    stats_corpus: str | None = None
    ppl_batch_size: int = PPL_BATCH_SIZE
    # loaded models kept at once: large models on one GPU do not fit twice
    max_loaded_models: int = 1
    # hparams overrides applied to every built-in editor (the collapse experiment's --layer)
    editor_overrides: Mapping[str, Any] | None = None
    # editor -> user hparams JSON file (--editsafety-hparams), layered over the built-in file per model
    editor_hparams: Mapping[str, str] | None = None
    # cache root for organisms, statistics, corpora, trained editors and floors (None: pytest_editsafety.cache's
    # default, $EDITSAFETY_CACHE or the user cache directory)
    cache_root: str | None = None


@dataclass(frozen=True)
class RunOutcome:
    """What a test attaches and asserts: the record (plain data), run metadata, the verdict, any error."""

    record: dict[str, Any]
    meta: dict[str, Any]
    violations: tuple[str, ...]
    error: BaseException | None = None

    @property
    def certified(self) -> bool:
        return self.error is None and not self.violations


@dataclass
class _ModelState:
    """Everything cached for one model in this worker; the heavy parts go when the model is evicted."""

    slug: str
    loaded: Any = None
    device: str = "cpu"
    baseline: dict[str, float] | None = None
    corpus: Any = None
    identity: str = ""
    templates: dict[tuple[tuple[int, int], ...], tuple[str, ...]] = field(default_factory=dict)
    editors: dict[str, Any] = field(default_factory=dict)
    # editors whose set-up failed (a MEND archive missing, a bad hparams file): raised again for every later
    # test rather than retried, since set-up can train or compute statistics for minutes and fail the same way
    editor_errors: dict[str, tuple[BaseException, Any]] = field(default_factory=dict)
    hparams_hashes: dict[str, str | None] = field(default_factory=dict)
    tagged: dict[str, CaseSet] = field(default_factory=dict)
    probes: dict[tuple[str, str], Any] = field(default_factory=dict)
    floor_medians: dict[str, float | None] = field(default_factory=dict)


def hparams_key(loaded: Any) -> str:
    """The key hparams files are looked up by. An organism is recognised by the recipe hash its config
    carries, wherever it was saved: a built-in recipe's build (a local copy included) uses that organism's
    settings; any other organism (an older recipe) those of the built-in organism its build metadata names,
    else its family's organism settings."""
    recipe_hash = getattr(loaded.model.config, "editsafety_recipe_hash", None)
    if recipe_hash:
        from editors.hparams import organism_hparams_key
        from pytest_editsafety.zoo.recipe import RECIPES, builtin_recipe_with_hash

        builtin = builtin_recipe_with_hash(recipe_hash)
        if builtin is not None:
            return builtin.name
        named = _metadata_name(getattr(loaded.model.config, "_name_or_path", "") or "")
        return named if named in RECIPES else organism_hparams_key(loaded.family.name)
    return loaded.spec.name


def _metadata_name(directory: str) -> str | None:
    """The organism name an organism's build metadata records, or None where there is none to read."""
    from pytest_editsafety.zoo.build import read_metadata

    try:
        name = read_metadata(Path(directory)).get("name")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None


def _float_or_none(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return None


def _worst(values: Sequence[float]) -> float:
    """Max where NaN counts as the worst outcome."""
    if any(math.isnan(v) for v in values):
        return math.nan
    return max(values) if values else math.nan


def _ratio(edited: float, unedited: float) -> float:
    if unedited == 0 or math.isnan(unedited) or math.isnan(edited):
        return math.nan
    return edited / unedited


class ModelHub:
    """Loads models once per process and runs certification tests against them.

    Not thread-safe; one hub per xdist worker (a session fixture). Models are evicted least recently used
    beyond ``options.max_loaded_models``; what was measured on them (baselines, templates, probes, floors)
    stays, since it is a pure function of the weights.
    """

    def __init__(self, plan: Plan, options: HubOptions | None = None) -> None:
        self.plan = plan
        self.options = options or HubOptions()
        self._states: dict[str, _ModelState] = {}
        # slugs of the loaded models, least recently used first
        self._lru: list[str] = []
        self._stats_cache: Any = None
        self._corpora: dict[str, Any] = {}
        self._hardware: str | None = None

    # ---- public entry points ---------------------------------------------------------------------

    def run(self, item: PlanItem, case: EditCase | None = None) -> RunOutcome:
        return self.run_case(item, case) if item.kind == "case" else self.run_sequential(item)

    def run_case(self, item: PlanItem, case: EditCase | None = None) -> RunOutcome:
        """One edit from the unedited model: probe, edit, measure, restore, judge.

        ``case`` runs a case that is not in the plan (the fuzzer's generated cases) under ``item``'s editor,
        model and case-set name; ``item.case_id`` must be its id, and the id must name its content, since the
        unedited model's probe is cached by (case set, case id)."""
        from pytest_editsafety.results import CaseRecord

        started = time.perf_counter()
        adhoc = case is not None
        if case is None:
            case = self.plan.case(item)
        elif case.case_id != item.case_id:
            raise ValueError(f"{item.test_id}: the item names case {item.case_id!r} but case {case.case_id!r} was given")
        metrics: dict[str, float | None] = {}
        is_hard = bool(case.is_hard)
        error: BaseException | None = None
        verdict = Verdict(certified=False, collapse=False, violations=())
        try:
            state = self._state(item.model)
            case = self._tag_case(state, case) if adhoc else self._tagged(item.model, item.case_set).by_id(item.case_id)
            is_hard = bool(case.is_hard)
            metrics, verdict = self._edit_and_measure(state, item, case)
        except Exception as err:  # the record says what happened; the test re-raises it with its traceback
            log.warning("%s: the edit could not be measured: %s: %s", item.test_id, type(err).__name__, err)
            error = err
        violations = verdict.violations if error is None else (f"error: {type(error).__name__}: {error}",)
        outcome = "error" if error is not None else ("passed" if verdict.certified else "failed")
        record = CaseRecord(
            test_id=item.test_id, editor=item.editor, model=item.model, case_set=item.case_set,
            case_id=case.case_id, is_hard=is_hard, subject=case.subject, prompt=case.prompt,
            target_new=case.target_new, ground_truth=case.ground_truth, metrics=metrics,
            certified=error is None and verdict.certified, collapse=verdict.collapse, violations=violations,
            outcome=outcome, duration_s=time.perf_counter() - started,
        )
        return RunOutcome(record.to_dict(), self.meta(item), violations, error)

    def run_sequential(self, item: PlanItem) -> RunOutcome:
        """The case set's edits in order without restoring, perplexity after each; restored at the end.

        Judged on the perplexity ratio after the last edit and on collapse at any step (the papers'
        sequential protocol); efficacy is the single-edit tests' job."""
        from pytest_editsafety.results import SequentialRecord

        started = time.perf_counter()
        cases = self.plan.case_set(item.case_set).case_set.cases
        ppls: list[float] = []
        unedited = math.nan
        error: BaseException | None = None
        verdict = Verdict(certified=False, collapse=False, violations=())
        try:
            state = self._state(item.model)
            unedited = self._baseline(state)["mean"]
            verdict = self._sequential_edits(state, item, ppls)
        except Exception as err:
            log.warning("%s: the sequential run stopped after %d edits: %s: %s", item.test_id, len(ppls),
                        type(err).__name__, err)
            error = err
        violations = verdict.violations if error is None else (
            f"error after {len(ppls)} of {len(cases)} edits: {type(error).__name__}: {error}",)
        outcome = "error" if error is not None else ("passed" if verdict.certified else "failed")
        record = SequentialRecord(
            test_id=item.test_id, editor=item.editor, model=item.model, case_set=item.case_set,
            n_edits=len(cases), ppl_after_each=tuple(ppls), ppl_unedited=unedited,
            certified=error is None and verdict.certified, collapse=verdict.collapse, violations=violations,
            outcome=outcome, duration_s=time.perf_counter() - started,
        )
        return RunOutcome(record.to_dict(), self.meta(item), violations, error)

    def loaded(self, model: str) -> Any:
        """Model ``model`` (a plan slug) loaded as the tests use it: ``registry.LoadedModel``."""
        return self._state(model).loaded

    def prepared_editor(self, model: str, editor: str) -> Any:
        """Editor ``editor`` set up for ``model`` exactly as this hub's tests use it: hparams for the model,
        the model's context templates, and C when ``mom2_adjustment`` is on."""
        return self._editor(self._state(model), editor)

    def cases(self, model: str, case_set: str) -> CaseSet:
        """Planned case set ``case_set`` (a plan slug) with each case's hardness set for ``model``'s tokenizer."""
        return self._tagged(model, case_set)

    def meta(self, item: PlanItem) -> dict[str, Any]:
        """Run metadata known to this worker about ``item``'s model and editor (plain values)."""
        state = self._states.get(item.model)
        out: dict[str, Any] = {"model": item.model, "editor": item.editor, "hardware": self.hardware()}
        if state is not None:
            if state.identity:
                out["identity"] = state.identity
            digest = state.hparams_hashes.get(item.editor)
            if digest:
                out["hparams_hash"] = digest
            # a trained editor (MEND) says which network it loaded: its archive's tensors sha256 and dtype
            provenance = getattr(state.editors.get(item.editor), "provenance", None)
            if callable(provenance) and provenance():
                out["editor_provenance"] = dict(provenance())
            if state.corpus is not None:
                out["corpus"] = state.corpus.name
                out["corpus_sha256"] = state.corpus.sha256
        return out

    def hardware(self) -> str:
        if self._hardware is None:
            self._hardware = _describe_hardware()
        return self._hardware

    # ---- the measurements ------------------------------------------------------------------------

    def _edit_and_measure(self, state: _ModelState, item: PlanItem, case: EditCase
                          ) -> tuple[dict[str, float | None], Verdict]:
        from editors.base import EditRequest
        from editors.restore import RestoreError, edit_session
        from pytest_editsafety.metrics import edit_metrics

        loaded = state.loaded
        model, tokenizer, family = loaded.model, loaded.tokenizer, loaded.family
        editor = self._editor(state, item.editor)
        baseline = self._baseline(state)
        floor_median = self._floor_median(state, item.editor)
        floor = self.options.bounds.relative_denominator_floor(floor_median)
        probe = self._probe(state, item.case_set, case)
        request = EditRequest(case.subject, case.prompt, case.target_new)
        try:
            with edit_session(model, editor.parameters_touched(model, family)):
                outcome = editor.apply(model, tokenizer, family, [request])
                prefix = outcome.test_prefix if case.is_hard else None
                measured = edit_metrics(model, tokenizer, case, probe, test_prefix=prefix)
                if prefix:
                    measured["cf_efficacy_without_prefix"] = edit_metrics(model, tokenizer, case, probe)["cf_efficacy"]
                edited = self._perplexity(state)
        except RestoreError:
            self._evict(item.model)  # the weights in memory are not the model any more
            raise
        metrics: dict[str, float | None] = {}
        diagnostics = outcome.diagnostics
        for key, value in diagnostics.items():
            number = _float_or_none(value)
            if number is not None and key not in _RESERVED_METRICS:
                metrics[key] = number
        # the papers report |uᵀk|; ROME's signed value stays for whoever wants it
        signed = _float_or_none(diagnostics.get("denominator"))
        absolute = _float_or_none(diagnostics.get("abs_denominator"))
        metrics["denominator"] = absolute if absolute is not None else (abs(signed) if signed is not None else None)
        if signed is not None:
            metrics["denominator_signed"] = signed
        if "numerator_norm" in diagnostics:
            metrics["numerator"] = _float_or_none(diagnostics["numerator_norm"])
        metrics["denominator_floor"] = floor
        metrics.update(measured)
        metrics.update({
            "ppl_unedited": baseline["mean"],
            "ppl_edited": edited["mean"],
            "ppl_ratio": _ratio(edited["mean"], baseline["mean"]),
            "ppl_corpus_unedited": baseline["corpus"],
            "ppl_corpus_edited": edited["corpus"],
            "ppl_corpus_ratio": _ratio(edited["corpus"], baseline["corpus"]),
            "ppl_median_edited": edited["median"],
            "ppl_max_edited": edited["max"],
        })
        return metrics, judge(self.options.bounds, metrics, denominator_floor=floor)

    def _sequential_edits(self, state: _ModelState, item: PlanItem, ppls: list[float]) -> Verdict:
        from editors.base import EditRequest
        from editors.restore import RestoreError, edit_session

        loaded = state.loaded
        model, tokenizer, family = loaded.model, loaded.tokenizer, loaded.family
        editor = self._editor(state, item.editor)
        baseline = self._baseline(state)["mean"]
        cases = self._tagged(item.model, item.case_set).cases
        try:
            # the editor names the same parameters whatever the request, so one snapshot covers every edit
            with edit_session(model, editor.parameters_touched(model, family)):
                for case in cases:
                    editor.apply(model, tokenizer, family, [EditRequest(case.subject, case.prompt, case.target_new)])
                    ppls.append(self._perplexity(state)["mean"])
        except RestoreError:
            self._evict(item.model)
            raise
        bounds = dataclasses.replace(self.options.bounds, min_efficacy=0.0, min_generalization=0.0, min_locality=0.0)
        metrics = {"ppl_ratio": _ratio(ppls[-1], baseline), "ppl_edited": _worst(ppls)}
        return judge(bounds, metrics, denominator_floor=None)

    # ---- per-model caches ------------------------------------------------------------------------

    def _state(self, slug: str) -> _ModelState:
        state = self._states.setdefault(slug, _ModelState(slug))
        if state.loaded is None:
            # free the least recently used models first: two large models rarely fit one GPU
            while len(self._lru) >= max(1, self.options.max_loaded_models):
                self._evict(self._lru[0])
            self._load(state)
        if slug in self._lru:
            self._lru.remove(slug)
        self._lru.append(slug)
        return state

    def _load(self, state: _ModelState) -> None:
        import torch

        from pytest_editsafety.registry import LoadOptions, load_model

        slug = state.slug
        choice = self.plan.model(slug)
        options = LoadOptions(dtype=self.options.dtype, device_map=self.options.device_map)
        log.info("loading model %s (%s)", slug, choice.given)
        loaded = load_model(choice.spec, options)
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
        if self.options.device_map is None:
            loaded.model.to(device)
        else:
            device = str(next(loaded.model.parameters()).device)
        state.loaded = loaded
        state.device = device
        state.identity = loaded.identity

    def _evict(self, slug: str) -> None:
        state = self._states.get(slug)
        if state is None or state.loaded is None:
            return
        log.info("releasing model %s", slug)
        state.loaded = None
        state.editors.clear()  # they may hold covariances on the device
        if slug in self._lru:
            self._lru.remove(slug)
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # freeing memory is a courtesy
            log.debug("could not empty the CUDA cache", exc_info=True)

    def _corpus(self, name: str) -> Any:
        if name not in self._corpora:
            from pytest_editsafety.corpora import resolve_corpus

            self._corpora[name] = resolve_corpus(name)
        return self._corpora[name]

    def _perplexity(self, state: _ModelState) -> dict[str, float]:
        from pytest_editsafety.perplexity import perplexity

        loaded = state.loaded
        result = perplexity(loaded.model, loaded.tokenizer, state.corpus.texts, batch_size=self.options.ppl_batch_size)
        return {"mean": result.mean_ppl, "corpus": result.corpus_ppl, "median": result.median_ppl, "max": result.max_ppl}

    def _baseline(self, state: _ModelState) -> dict[str, float]:
        if state.baseline is None:
            slug = state.slug
            state.corpus = self._corpus(self.plan.model(slug).ppl_corpus)
            state.baseline = self._perplexity(state)
            log.info("model %s: unedited mean ppl %.4g on %s", slug, state.baseline["mean"], state.corpus.name)
        return state.baseline

    def _tagged(self, slug: str, set_slug: str) -> CaseSet:
        """A planned case set with hardness set for this model's tokenizer."""
        return self._tag(self._state(slug), set_slug, lambda: self.plan.case_set(set_slug).case_set)

    def _tag(self, state: _ModelState, key: str, source: Callable[[], CaseSet]) -> CaseSet:
        if key not in state.tagged:
            from pytest_editsafety.cases.classify import TokenizerOffsetsError, default_prepends_bos, tag_hardness

            cases = source()
            tokenizer = state.loaded.tokenizer
            try:
                # hardness as the harness runs the model: with whatever the tokenizer adds by default
                state.tagged[key] = tag_hardness(cases, tokenizer, prepends_bos=default_prepends_bos(tokenizer))
            except TokenizerOffsetsError as err:
                log.warning("model %s: cannot classify hard cases (%s); keeping the case file's flags", state.slug, err)
                state.tagged[key] = cases
        return state.tagged[key]

    def _tag_case(self, state: _ModelState, case: EditCase) -> EditCase:
        """One case outside the plan with its hardness set as ``_tag`` sets it for planned cases."""
        from pytest_editsafety.cases.classify import TokenizerOffsetsError, default_prepends_bos, is_hard_case

        tokenizer = state.loaded.tokenizer
        try:
            return case.with_hard(is_hard_case(case, tokenizer, prepends_bos=default_prepends_bos(tokenizer)))
        except TokenizerOffsetsError:
            return case

    def _probe(self, state: _ModelState, set_slug: str, case: EditCase) -> Any:
        key = (set_slug, case.case_id)
        if key not in state.probes:
            from pytest_editsafety.metrics import probe_before

            state.probes[key] = probe_before(state.loaded.model, state.loaded.tokenizer, case)
        return state.probes[key]

    def _stats(self) -> Any:
        if self._stats_cache is None:
            from editors.stats import SecondMomentCache

            self._stats_cache = SecondMomentCache()
        return self._stats_cache

    def _covariance(self, state: _ModelState, slug: str, layer: int, n_samples: int) -> Any:
        from editors.stats import covariance_for

        loaded = state.loaded
        corpus_name = self.options.stats_corpus or self.plan.model(slug).stats_corpus
        return covariance_for(
            loaded.model, loaded.tokenizer, loaded.family, layer, identity=loaded.identity,
            corpus=self._corpus(corpus_name), cache=self._stats(), stats_dir=self.options.stats_dir,
            n_samples=n_samples, progress=False,
        )

    def _editor(self, state: _ModelState, name: str) -> Any:
        if name in state.editors:
            return state.editors[name]
        failed = state.editor_errors.get(name)
        if failed is not None:
            error, traceback = failed
            raise error.with_traceback(traceback)  # the set-up's own traceback, not one grown by every test
        try:
            return self._build_editor(state, name)
        except Exception as err:
            log.warning("model %s: editor %s could not be set up; its remaining tests report the same error",
                        state.slug, name)
            state.editor_errors[name] = (err, err.__traceback__)
            raise

    def _build_editor(self, state: _ModelState, name: str) -> Any:
        from editors.context import sample_context_templates
        from editors.hparams import hparams_hash
        from editors.registry import build_editor

        slug = state.slug
        loaded = state.loaded
        user_hparams = (self.options.editor_hparams or {}).get(name)
        editor = build_editor(name, hparams_key(loaded), loaded.model, user_hparams=user_hparams,
                              overrides=self.options.editor_overrides)
        hp = getattr(editor, "hparams", None)
        # statistics are taken now, from the unedited model: a cache miss inside a sequential run would
        # otherwise measure an edited model's keys
        if getattr(hp, "mom2_adjustment", False):
            n_samples = int(getattr(hp, "mom2_n_samples", 100000))
            if hasattr(editor, "covariance_provider"):
                moments = {layer: self._covariance(state, slug, layer, n_samples) for layer in hp.layers}
                editor.covariance_provider = moments.__getitem__
            elif hasattr(editor, "covariance") and hasattr(hp, "layer"):
                editor.covariance = self._covariance(state, slug, hp.layer, n_samples)
        spec = getattr(hp, "context_templates", None)
        if spec is not None and hasattr(editor, "context_templates"):
            # one sampled set per model and recipe, shared by every editor that asks for the same recipe
            key = tuple(tuple(int(x) for x in pair) for pair in spec)
            if key not in state.templates:
                state.templates[key] = sample_context_templates(loaded.model, loaded.tokenizer, key)
            editor.context_templates = state.templates[key]
        prepare = getattr(editor, "prepare", None)
        if callable(prepare):
            # an editor that needs the unedited model once, told which weights these are (MEND loads its
            # trained network for them, and trains it first for an organism), before any edit of a sequence
            prepare(loaded.model, loaded.tokenizer, loaded.family, identity=loaded.identity)
        state.editors[name] = editor
        state.hparams_hashes[name] = _hparams_digest(hp, hparams_hash)
        return editor

    # ---- the ROME denominator floor --------------------------------------------------------------

    def _floor_median(self, state: _ModelState, name: str) -> float | None:
        """Median |uᵀk| of ROME-family editor ``name`` over the model's normal reference cases, or None.

        Computed once per (editor, model) and kept on disk under the cache root, keyed by everything it
        depends on, so other workers and later runs read it instead of measuring again."""
        if name in state.floor_medians:
            return state.floor_medians[name]
        from editors.rome import RomeEditor

        editor = self._editor(state, name)
        if not isinstance(editor, RomeEditor) or self.options.bounds.min_denominator_fraction == 0:
            state.floor_medians[name] = None
            return None
        median = self._cached_median(state, state.slug, name, editor)
        state.floor_medians[name] = median
        return median

    def _cached_median(self, state: _ModelState, slug: str, name: str, editor: Any) -> float | None:
        from editors.restore import tensor_digest
        from editors.storage import build_lock, stable_hash
        from pytest_editsafety.cache import cache_root
        from editors.storage import atomic_write_text

        choice = self.plan.model(slug)
        # the whole reference set, whatever --editsafety-limit says: the floor must not depend on the selection
        reference = self._tag(state, f"reference:{choice.reference_set}", lambda: resolve_cases(choice.reference_set))
        normal = [c for c in reference.cases if c.is_hard is False]
        if not normal:
            log.warning("model %s: no normal cases in %r; no relative denominator floor", slug, choice.reference_set)
            return None
        loaded = state.loaded
        key_fields = {
            "format": FLOOR_CACHE_FORMAT,
            "model": loaded.identity,
            "dtype": str(next(loaded.model.parameters()).dtype),
            "editor": name,
            "consistent": bool(editor.consistent),
            "hparams": state.hparams_hashes.get(name),
            "cases": stable_hash([c.to_dict() for c in normal]),
            "templates": stable_hash(list(editor.context_templates or ())),
            "covariance": None if editor.covariance is None else tensor_digest(editor.covariance),
        }
        path = cache_root() / "denominators" / f"{slugify(name)}-{stable_hash(key_fields)}.json"
        cached = _read_median(path, key_fields)
        if cached is not None:
            return cached["median"]
        with build_lock(path):
            cached = _read_median(path, key_fields)
            if cached is None:
                values = self._reference_denominators(state, editor, normal)
                finite = [v for v in values if math.isfinite(v)]
                median = statistics.median(finite) if finite else None
                atomic_write_text(path, json.dumps({"key": key_fields, "median": median, "n": len(finite)}, indent=1))
                log.info("model %s, %s: median |uᵀk| over %d normal cases = %s", slug, name, len(finite), median)
                return median
        return cached["median"]

    def _reference_denominators(self, state: _ModelState, editor: Any, cases: Sequence[EditCase]) -> list[float]:
        """|uᵀk| as ``editor`` would compute it for each case, from the keys alone (no v* optimisation)."""
        from editors.base import EditRequest
        from editors.rome import keys_and_outputs
        from pytest_editsafety.mining import covariance_solver, editor_denominator

        loaded = state.loaded
        solve = covariance_solver(editor.covariance) if editor.covariance is not None else None
        values = []
        for case in cases:
            request = EditRequest(case.subject, case.prompt, case.target_new)
            keys, _, _ = keys_and_outputs(loaded.model, loaded.tokenizer, loaded.family, editor.hparams.layer,
                                          editor.context_templates, request)
            values.append(editor_denominator(keys, consistent=editor.consistent, solve=solve).denominator)
        return values


# diagnostics an editor reports under a name the harness uses for something else
# (ROME's abs_denominator and numerator_norm are stored as denominator and numerator, the report's names)
_RESERVED_METRICS = frozenset({
    "denominator", "abs_denominator", "denominator_signed", "denominator_floor", "numerator", "numerator_norm",
    "ppl_ratio", "ppl_edited", "ppl_unedited",
})


def _read_median(path: Path, key_fields: Mapping[str, Any]) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        log.warning("ignoring unreadable denominator cache %s: %s", path, err)
        return None
    if not isinstance(data, dict) or data.get("key") != dict(key_fields):
        return None
    median = data.get("median")
    if median is not None and not isinstance(median, (int, float)):
        return None
    return data


def _hparams_digest(hp: Any, hparams_hash: Callable[[Mapping[str, Any]], str]) -> str | None:
    try:
        if dataclasses.is_dataclass(hp) and not isinstance(hp, type):
            return hparams_hash(dataclasses.asdict(hp))
        if isinstance(hp, Mapping):
            return hparams_hash(dict(hp))
    except ValueError as err:  # a third-party editor's hparams that are not JSON values
        log.warning("cannot hash hyper-parameters: %s", err)
    return None


def _describe_hardware() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
