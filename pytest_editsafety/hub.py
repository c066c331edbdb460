"""The model hub: how one certification test runs, with no pytest in sight.

``ModelHub`` (owned by a session fixture, one per worker) loads each model once, caches what every test of that
model shares (baseline perplexity, editors set up through their declared needs, unedited probes, the denominator
floor) and runs one single-edit case (``run_case``), one batch of cases edited at once (``run_batch``) or one
sequential run (``run_sequential``), returning the
record as plain JSON-able data plus its verdict. torch, transformers and the editors are imported inside its
methods only.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from editors.storage import stable_hash
from pytest_editsafety.bounds import Bounds, Verdict, judge
from pytest_editsafety.cache import cache_root
from pytest_editsafety.cases import CaseSet, EditCase, resolve_cases
from pytest_editsafety.context_fit import check_fits_context
from pytest_editsafety.hparams_record import hparams_digest, recorded_hparams_values
from pytest_editsafety.hub_options import DEFAULT_RESTORE_CHECK, PPL_BATCH_SIZE, RESTORE_CHECKS, HubOptions
from pytest_editsafety.model_pool import ModelPool, ModelState
from pytest_editsafety.plan import Plan, PlanItem
from pytest_editsafety.preparation import Preparations
from pytest_editsafety.sequential import default_every, first_crossing, measurement_steps

log = logging.getLogger(__name__)

# the options' names stay importable from here, where they lived before hub_options.py
__all__ = ["DEFAULT_RESTORE_CHECK", "PPL_BATCH_SIZE", "RESTORE_CHECKS", "BatchSizeError", "HubOptions", "ModelHub",
           "RunOutcome"]


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


# a perplexity measurement's figures, as the hub keeps them (and the baselines cache stores them)
_PPL_FIELDS = ("mean", "corpus", "median", "max")
BASELINE_CACHE_FORMAT = "pytest-editsafety/unedited-perplexity/1"

def _outcome(editor: str, outcome: Any) -> Any:
    """What an editor's apply returned, when it is the EditOutcome the contract asks for."""
    from editors.base import EditOutcome

    if not isinstance(outcome, EditOutcome):
        raise TypeError(f"editor {editor!r}: apply() returned {type(outcome).__name__}; it must return an "
                        f"editors.base.EditOutcome (the edited parameters' names, diagnostics, test prefix)")
    return outcome


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


class ModelHub(ModelPool):
    """Loads models once per process and runs certification tests against them.

    Not thread-safe; one hub per xdist worker (a session fixture). Models are evicted least recently used
    beyond ``options.max_loaded_models``; what was measured on them (baselines, templates, probes, floors)
    stays, since it is a pure function of the weights.

    Each load takes a fingerprint of every parameter and buffer (``options.restore_check``); after every
    test's restore, and after an editor's set-up and denominator reports, the model is checked against it.
    An editor that changed anything it does not declare fails that test (``UndeclaredChangeError``, naming
    the tensors) and the model is evicted, so the next test loads the weights again.

    A model that fails to load fails that test with the reason, and every later test of the model in this hub
    with the same error and traceback, without loading again.
    """

    def __init__(self, plan: Plan, options: HubOptions | None = None, *,
                 models: Mapping[str, Any] | None = None, editors: Mapping[str, Any] | None = None,
                 run_order: Sequence[str] | None = None) -> None:
        """``models`` maps a plan model slug to a model the caller already holds (a ``registry.LoadedModel``: the
        hub uses it as it is, on its own device, and never loads or releases it); ``editors`` maps an editor
        name of the plan to an editor object (set up through its declared needs like a registered one);
        ``run_order`` the test ids the run selected, in the order it runs them (default: the whole plan), from
        which a search batch takes the cases after the one under way."""
        options = options or HubOptions()
        super().__init__(plan, options, cache_root(options.cache_root), models)
        order = tuple(run_order) if run_order is not None else tuple(item.test_id for item in plan.items)
        self._preparations = Preparations(plan, order, search_batch=options.search_batch,
                                          share=options.share_measurements)
        self._editor_objects = dict(editors or {})
        self._downstream: Any = None
        self._stats_cache: Any = None
        self._corpora: dict[str, Any] = {}
        # (model, statistics corpus sha256) pairs already warned about sharing texts with the perplexity corpus
        self._overlap_warned: set[tuple[str, str]] = set()
        self._hardware: str | None = None

    # ---- public entry points ---------------------------------------------------------------------

    def run(self, item: PlanItem, case: EditCase | None = None) -> RunOutcome:
        if item.kind == "batch":
            return self.run_batch(item)
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
            outcome=outcome, duration_s=time.perf_counter() - started, worker=self.options.worker,
            device=self._device_of(item.model),
        )
        return RunOutcome(record.to_dict(), self.meta(item), violations, error)

    def run_batch(self, item: PlanItem) -> RunOutcome:
        """A batch's cases applied in one edit from the unedited model, then each member measured on the model
        holding the whole batch (perplexity once), restored, judged: each member on its own bounds and the batch's
        perplexity; the batch is certified when every member is."""
        from pytest_editsafety.plan import member_test_id
        from pytest_editsafety.results import BatchRecord, CaseRecord

        started = time.perf_counter()
        error: BaseException | None = None
        batch_metrics: dict[str, float | None] = {}
        measured: list[tuple[EditCase, dict[str, float | None], Verdict]] = []
        batch_verdict = Verdict(certified=False, collapse=False, violations=())
        try:
            state = self._state(item.model)
            tagged = self._tagged(item.model, item.case_set)
            cases = [tagged.by_id(case_id) for case_id in item.case_ids]
            batch_metrics, measured = self._edit_batch_and_measure(state, item, cases)
            # the batch's own bound: its perplexity, judged once on exactly the figures every member carries
            batch_verdict = judge(_perplexity_only(self.options.bounds),
                                  {key: batch_metrics.get(key) for key in ("ppl_ratio", "ppl_edited", "ppl_unedited")},
                                  denominator_floor=None)
        except Exception as err:  # the record says what happened; the test re-raises it with its traceback
            log.warning("%s: the batch could not be measured: %s: %s", item.test_id, type(err).__name__, err)
            error = err
        duration = time.perf_counter() - started
        worker, device = self.options.worker, self._device_of(item.model)
        members = tuple(
            CaseRecord(
                test_id=member_test_id(item, part), editor=item.editor, model=item.model, case_set=item.case_set,
                case_id=case.case_id, is_hard=bool(case.is_hard), subject=case.subject, prompt=case.prompt,
                target_new=case.target_new, ground_truth=case.ground_truth, metrics=metrics,
                certified=verdict.certified, collapse=verdict.collapse, violations=verdict.violations,
                outcome="passed" if verdict.certified else "failed",
                # the members were edited and measured together: each is given an equal share of the batch's time
                duration_s=duration / len(measured), worker=worker, device=device,
            )
            for part, (case, metrics, verdict) in zip(item.case_parts, measured)
        )
        if error is not None:
            violations: tuple[str, ...] = (f"error: {type(error).__name__}: {error}",)
        else:
            # the batch's perplexity violations once, then each member's own (its perplexity ones are the same
            # strings, from the same figures and bounds, so they are not repeated per member)
            violations = batch_verdict.violations + tuple(
                f"{m.case_id}: {v}" for m in members for v in m.violations if v not in batch_verdict.violations)
        certified = error is None and batch_verdict.certified and all(m.certified for m in members)
        record = BatchRecord(
            test_id=item.test_id, editor=item.editor, model=item.model, case_set=item.case_set,
            case_ids=item.case_ids, members=members, metrics=batch_metrics, certified=certified,
            collapse=batch_verdict.collapse, violations=violations,
            outcome="error" if error is not None else ("passed" if certified else "failed"),
            duration_s=duration, worker=worker, device=device,
        )
        return RunOutcome(record.to_dict(), self.meta(item), violations, error)

    def run_sequential(self, item: PlanItem) -> RunOutcome:
        """The papers' sequential protocol: the run's edits (``Plan.sequential_cases``) in order without
        restoring, restored at the end. After every k-th edit and the last, perplexity on the run's corpus and each
        edited parameter's norm over its unedited norm; each edit's efficacy right after it and, after the last,
        for every edit again (retention).

        Judged on the perplexity ratio after the last edit and on collapse at any measured step (the papers'
        sequential protocol); efficacy and retention are reported, not judged (the single-edit tests judge
        efficacy)."""
        from pytest_editsafety.results import SequentialRecord

        started = time.perf_counter()
        n_edits = len(self.plan.sequential_cases(item))
        progress = _SequentialProgress()
        unedited = math.nan
        corpus_name, corpus_sha = "", ""
        error: BaseException | None = None
        verdict = Verdict(certified=False, collapse=False, violations=())
        try:
            state = self._state(item.model)
            corpus_given = self.plan.model(item.model).sequential_ppl_corpus
            corpus = self._corpus(corpus_given)
            corpus_name, corpus_sha = corpus.name, corpus.sha256
            unedited = self._corpus_baseline(state, corpus_given)["mean"]
            verdict = self._sequential_edits(state, item, corpus, progress)
        except Exception as err:
            log.warning("%s: the sequential run stopped after %d edits: %s: %s", item.test_id,
                        len(progress.efficacy_after_edit), type(err).__name__, err)
            error = err
        violations = verdict.violations if error is None else (
            f"error after {len(progress.efficacy_after_edit)} of {n_edits} edits: {type(error).__name__}: {error}",)
        outcome = "error" if error is not None else ("passed" if verdict.certified else "failed")
        steps = tuple(progress.steps)
        record = SequentialRecord(
            test_id=item.test_id, editor=item.editor, model=item.model, case_set=item.case_set,
            n_edits=n_edits, ppl_after_each=tuple(progress.ppls), ppl_unedited=unedited,
            certified=error is None and verdict.certified, collapse=verdict.collapse, violations=violations,
            outcome=outcome, duration_s=time.perf_counter() - started, worker=self.options.worker,
            device=self._device_of(item.model), steps=steps,
            norm_ratios={name: tuple(values) for name, values in progress.norm_ratios.items()},
            collapse_step=first_crossing(steps, progress.ppls, self.options.bounds.collapse_ppl),
            ppl_corpus=corpus_name, ppl_corpus_sha256=corpus_sha,
            efficacy_after_edit=tuple(progress.efficacy_after_edit), efficacy_at_end=tuple(progress.efficacy_at_end),
        )
        return RunOutcome(record.to_dict(), self.meta(item), violations, error)

    def loaded(self, model: str) -> Any:
        """Model ``model`` (a plan slug) loaded as the tests use it: ``registry.LoadedModel``."""
        return self._state(model).loaded

    def downstream_tasks(self) -> Any:
        """The run's downstream tasks (``pytest_editsafety.downstream.DownstreamTasks``), to score a model with."""
        return self._downstream_tasks()

    def prepared_editor(self, model: str, editor: str) -> Any:
        """Editor ``editor`` set up for ``model`` exactly as this hub's tests use it: hparams for the model and
        everything it declared it needs (:func:`editors.provision.set_up`)."""
        return self._editor(self._state(model), editor)

    def floor_median(self, model: str, editor: str) -> float | None:
        """The editor's median |uᵀk| over ``model``'s normal reference cases, as the denominator floor uses it
        (None for an editor without a denominator, or with the floor switched off)."""
        return self._floor_median(self._state(model), editor)

    def _progress_line(self, line: str) -> None:
        log.info(line)
        if self.options.progress is not None:
            self.options.progress(line)

    def reference_medians(self, model: str, editor: str) -> dict[str, float | None]:
        """The median of each number in the editor's denominator report over ``model``'s normal reference cases
        (:func:`pytest_editsafety.floor.reference_medians`; a number with no finite value has None); empty for an
        editor without a denominator or with the floor switched off."""
        return dict(self._reference_medians(self._state(model), editor) or {})

    def corpus_texts(self, model: str) -> tuple[str, ...]:
        """The texts of ``model``'s perplexity corpus (read, not measured: no baseline perplexity pass)."""
        return tuple(self._corpus(self.plan.model(model).ppl_corpus).texts)

    def provided(self, model: str, editor: str) -> Any:
        """What ``editor`` was given at set-up on ``model`` (:class:`editors.base.Provided`)."""
        state = self._state(model)
        self._editor(state, editor)
        return state.provided[editor]

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
            if state.bos_protocol:
                out["bos_protocol"] = state.bos_protocol
            if state.resources is not None and state.resources.second_moment_sources:
                out["second_moments"] = {str(layer): "; ".join(sources) for layer, sources
                                         in sorted(state.resources.second_moment_sources.items())}
            digest = state.hparams_hashes.get(item.editor)
            if digest:
                out["hparams_hash"] = digest
                if item.editor in state.hparams_values:
                    out["hparams"] = state.hparams_values[item.editor]
                if state.hparams_sources.get(item.editor):
                    out["hparams_sources"] = state.hparams_sources[item.editor]
            # a trained editor (MEND) says which network it loaded: its archive's tensors sha256 and dtype
            editor = state.editors.get(item.editor)
            provenance = dict(editor.provenance()) if editor is not None else {}
            if provenance:
                out["editor_provenance"] = provenance
            if state.corpus is not None:
                out["corpus"] = state.corpus.name
                out["corpus_sha256"] = state.corpus.sha256
        return out

    def hardware(self) -> str:
        if self._hardware is None:
            self._hardware = _describe_hardware()
        return self._hardware

    # ---- the measurements ------------------------------------------------------------------------

    def _edit_and_measure(self, state: ModelState, item: PlanItem, case: EditCase
                          ) -> tuple[dict[str, float | None], Verdict]:
        from editors.base import EditRequest
        from editors.restore import RestoreError, edit_session
        from pytest_editsafety.metrics import case_metrics

        loaded = state.loaded
        model, tokenizer, family = loaded.model, loaded.tokenizer, loaded.family
        editor = self._editor(state, item.editor)
        check_fits_context(loaded, case, state.provided[item.editor].context_templates or ("{}",))
        baseline = self._baseline(state)
        downstream_before = self._downstream_unedited(state)
        floor_median = self._floor_median(state, item.editor)
        floor = self.options.bounds.relative_denominator_floor(floor_median)
        probe = self._probe(state, item.case_set, case)
        request = EditRequest(case.subject, case.prompt, case.target_new)
        touched = editor.parameters_touched(model, family)
        try:
            # restored bit-exactly, then the whole model checked against its fingerprint: an editor that wrote
            # outside parameters_touched fails here (UndeclaredChangeError, a RestoreError)
            with edit_session(model, touched, reference=state.reference, editor=item.editor):
                prepared = self._prepared(state, item, editor)
                if request in prepared:
                    outcome = _outcome(item.editor, editor.apply_prepared(model, tokenizer, family, [request],
                                                                          prepared))
                else:
                    outcome = _outcome(item.editor, editor.apply(model, tokenizer, family, [request]))
                measured = case_metrics(model, tokenizer, case, probe,
                                        test_prefix=outcome.test_prefix if case.is_hard else None)
                edited = self._perplexity(state, touched=touched)
                if downstream_before:
                    from pytest_editsafety.downstream import downstream_metrics

                    after = self._downstream_tasks().scores(model, tokenizer)
                    measured.update(downstream_metrics(downstream_before, after))
        except RestoreError as err:
            self._evict(item.model, err)  # the weights in memory are not the model any more
            raise
        metrics: dict[str, float | None] = {"denominator": None}  # None: a method without a denominator
        for key, value in outcome.diagnostics.items():
            number = _float_or_none(value)
            if number is not None and key not in _HARNESS_METRICS:
                metrics[key] = number
        metrics["denominator_floor"] = floor
        metrics.update(measured)
        metrics.update(_perplexity_metrics(baseline, edited))
        return metrics, judge(self.options.bounds, metrics, denominator_floor=floor)

    def _prepared(self, state: ModelState, item: PlanItem, editor: Any) -> Mapping[Any, Any]:
        """What the editor's prepare() measured for ``item``'s case on the unedited model (``{request: value}``):
        :meth:`pytest_editsafety.preparation.Preparations.for_item`."""
        return self._preparations.for_item(state, item, editor, lambda: self._tagged(item.model, item.case_set))

    def _edit_batch_and_measure(
        self, state: ModelState, item: PlanItem, cases: Sequence[EditCase],
    ) -> tuple[dict[str, float | None], list[tuple[EditCase, dict[str, float | None], Verdict]]]:
        """The batch's metrics (the edit's diagnostics and the perplexity figures) and each member's metrics and
        verdict, under the same keys and bounds as a single edit's."""
        from editors.base import EditRequest, max_requests_per_apply
        from editors.restore import RestoreError, edit_session
        from pytest_editsafety.metrics import case_metrics

        loaded = state.loaded
        model, tokenizer, family = loaded.model, loaded.tokenizer, loaded.family
        editor = self._editor(state, item.editor)
        limit = max_requests_per_apply(editor)
        if limit is not None and len(cases) > limit:
            raise BatchSizeError(
                f"editor {item.editor!r} applies at most {limit} request{'s' if limit != 1 else ''} at once (its "
                f"declared max_requests_per_apply), so it cannot certify this batch of {len(cases)} cases: run it "
                f"without --editsafety-batch-size{f' or with a batch size of at most {limit}' if limit > 1 else ''}")
        for case in cases:
            check_fits_context(loaded, case, state.provided[item.editor].context_templates or ("{}",))
        baseline = self._baseline(state)
        floor = self.options.bounds.relative_denominator_floor(self._floor_median(state, item.editor))
        probes = [self._probe(state, item.case_set, case) for case in cases]
        requests = [EditRequest(case.subject, case.prompt, case.target_new) for case in cases]
        touched = editor.parameters_touched(model, family)
        try:
            with edit_session(model, touched, reference=state.reference, editor=item.editor):
                # each member's denominator from its keys on the unedited model, as the floor's reference is
                # measured: the edit's own diagnostics describe the batch as a whole
                reports = [editor.denominator(model, tokenizer, family, request) for request in requests]
                outcome = _outcome(item.editor, editor.apply(model, tokenizer, family, requests))
                measured = [case_metrics(model, tokenizer, case, probe,
                                         test_prefix=outcome.test_prefix if case.is_hard else None)
                            for case, probe in zip(cases, probes)]
                edited = self._perplexity(state, touched=touched)
        except RestoreError as err:
            self._evict(item.model, err)
            raise
        ppl = _perplexity_metrics(baseline, edited)
        batch_metrics: dict[str, float | None] = {}
        for key, value in outcome.diagnostics.items():
            number = _float_or_none(value)
            if number is not None and key not in _HARNESS_METRICS:
                batch_metrics[key] = number
        batch_metrics.update(ppl)
        members = []
        for case, report, metrics in zip(cases, reports, measured):
            denominator = _float_or_none((report or {}).get("denominator"))
            member: dict[str, float | None] = {"denominator": denominator, "denominator_floor": floor}
            member.update(metrics)
            member.update(ppl)
            members.append((case, member, judge(self.options.bounds, member, denominator_floor=floor)))
        return batch_metrics, members

    def _sequential_edits(self, state: ModelState, item: PlanItem, corpus: Any, progress: _SequentialProgress
                          ) -> Verdict:
        import torch

        from editors.base import EditRequest
        from editors.restore import RestoreError, edit_session
        from pytest_editsafety.metrics import rewrite_efficacy

        loaded = state.loaded
        model, tokenizer, family = loaded.model, loaded.tokenizer, loaded.family
        editor = self._editor(state, item.editor)
        baseline = self._corpus_baseline(state, self.plan.model(item.model).sequential_ppl_corpus)["mean"]
        n_edits = len(self.plan.sequential_cases(item))
        cases = self._tagged(item.model, item.case_set).cases[:n_edits]
        every = self.options.sequential_every or default_every(self.plan.model(item.model).organism)
        steps = set(measurement_steps(n_edits, every))
        for case in cases:  # before the first edit, not midway through the sequence
            check_fits_context(loaded, case, state.provided[item.editor].context_templates or ("{}",))
        touched = editor.parameters_touched(model, family)
        parameters = dict(model.named_parameters())

        def frobenius(name: str) -> float:
            with torch.no_grad():  # float64: a bfloat16 norm of a large matrix loses the growth being measured
                return float(torch.linalg.vector_norm(parameters[name].detach().double()))

        unedited_norms = {name: frobenius(name) for name in touched}
        prefixes: list[str | None] = []
        try:
            # the editor names the same parameters whatever the request, so one snapshot covers every edit (and
            # the whole-model check runs once, after the restore at the end)
            with edit_session(model, touched, reference=state.reference, editor=item.editor):
                for index, case in enumerate(cases, start=1):
                    outcome = _outcome(item.editor, editor.apply(model, tokenizer, family,
                                                                 [EditRequest(case.subject, case.prompt,
                                                                              case.target_new)]))
                    # a hard case is asked behind the editor's test-time prefix (C-ROME + prefix), as single edits are
                    prefixes.append(outcome.test_prefix if case.is_hard else None)
                    progress.efficacy_after_edit.extend(rewrite_efficacy(model, tokenizer, [case], prefixes[-1:]))
                    if index in steps:
                        progress.ppls.append(self._perplexity(state, corpus, touched=touched)["mean"])
                        for name in touched:
                            progress.norm_ratios.setdefault(name, []).append(
                                _ratio(frobenius(name), unedited_norms[name]))
                        progress.steps.append(index)
                progress.efficacy_at_end.extend(rewrite_efficacy(model, tokenizer, cases, prefixes))
        except RestoreError as err:
            self._evict(item.model, err)
            raise
        bounds = dataclasses.replace(self.options.bounds, min_efficacy=0.0, min_generalization=0.0, min_locality=0.0)
        metrics = {"ppl_ratio": _ratio(progress.ppls[-1], baseline), "ppl_edited": _worst(progress.ppls),
                   "ppl_unedited": baseline}
        return judge(bounds, metrics, denominator_floor=None)

    # ---- per-model caches ------------------------------------------------------------------------

    def _corpus(self, name: str) -> Any:
        if name not in self._corpora:
            from pytest_editsafety.corpora import resolve_corpus

            self._corpora[name] = resolve_corpus(name)
        return self._corpora[name]

    def _perplexity(self, state: ModelState, corpus: Any = None, *, touched: Sequence[str] = ()) -> dict[str, float]:
        """Perplexity on ``corpus``, by default the model's single-edit corpus (``state.corpus``), of the model as it
        is now: unedited, or edited in the parameters ``touched`` alone (the blocks below them are then replayed)."""
        from pytest_editsafety.perplexity import encode, model_context, perplexity

        loaded = state.loaded
        corpus = corpus if corpus is not None else state.corpus
        # by content: two corpus files of the same name (a/ppl.json, b/ppl.json) are two corpora
        encoded = state.encoded_corpora.get(corpus.sha256)
        if encoded is None:
            encoded = encode(loaded.tokenizer, corpus.texts, max_length=model_context(loaded.model))
            state.encoded_corpora[corpus.sha256] = encoded
        result = perplexity(loaded.model, loaded.tokenizer, corpus.texts, batch_size=self.options.ppl_batch_size,
                            encoded=encoded, lower_blocks=self._lower_blocks(state, corpus.sha256, touched))
        return dict(zip(_PPL_FIELDS, (result.mean_ppl, result.corpus_ppl, result.median_ppl, result.max_ppl)))

    def _lower_blocks(self, state: ModelState, corpus_sha256: str, touched: Sequence[str]) -> Any:
        """What a perplexity pass on the corpus of that content hash replays below the lowest block in ``touched``;
        None where nothing is (no edit, an edit of the embeddings or of block 0, HubOptions.ppl_skip_unedited_blocks
        off) and where an undeclared write below it could go unseen: the replay would hide its damage, and only the
        full restore check fails such an editor."""
        if not touched or not self.options.ppl_skip_unedited_blocks or self.options.restore_check != "full":
            return None
        from pytest_editsafety.lower_blocks import LowerBlockStore, lowest_block

        loaded = state.loaded
        layer = lowest_block(loaded.family, touched, loaded.n_layers)
        if layer == 0:
            return None
        if state.lower_blocks is None:
            state.lower_blocks = LowerBlockStore()
        return state.lower_blocks.outputs(loaded.model, loaded.family, corpus_sha256, self.options.ppl_batch_size,
                                          layer)

    def _baseline(self, state: ModelState) -> dict[str, float]:
        if state.baseline is None:
            slug = state.slug
            state.corpus = self._corpus(self.plan.model(slug).ppl_corpus)
            state.baseline = self._unedited_perplexity(state, state.corpus)
            log.info("model %s: unedited mean ppl %.4g on %s", slug, state.baseline["mean"], state.corpus.name)
        return state.baseline

    def _downstream_tasks(self) -> Any:
        if self._downstream is None:
            from pytest_editsafety.downstream import DownstreamTasks

            self._downstream = DownstreamTasks(self.options.downstream, limit=self.options.downstream_limit,
                                               root=self._root)
        return self._downstream

    def _downstream_unedited(self, state: ModelState) -> dict[str, float]:
        """The downstream tasks' scores on the unedited model, measured once per model; empty without tasks."""
        if not self.options.downstream:
            return {}
        if state.downstream_unedited is None:
            state.downstream_unedited = self._downstream_tasks().scores(state.loaded.model, state.loaded.tokenizer)
            log.info("model %s: unedited downstream scores %s", state.slug, state.downstream_unedited)
        return state.downstream_unedited

    def _weights_pinned(self, state: ModelState) -> bool:
        """Whether the model's identity pins its weights: not for a model object the caller holds (it may have been
        changed in memory since it was loaded) nor for a hub model at an unpinned revision."""
        identity = state.loaded.identity
        return not (state.slug in self._held_models or not identity or identity.endswith("@unpinned"))

    def _values_root(self, state: ModelState) -> Any:
        """Where values measured on the unedited model are kept across processes (templates, perplexity), or None
        where the identity does not pin the weights (:meth:`_weights_pinned`)."""
        return self._root if self._weights_pinned(state) else None

    def _unedited_perplexity(self, state: ModelState, corpus: Any) -> dict[str, float]:
        """The unedited model's perplexity on ``corpus``: measured once, and kept under the cache root for the other
        workers and later runs, keyed by the weights (their dtype and device kind) and the corpus's texts."""
        from pytest_editsafety.keyed_cache import cached_value, weights_key
        from pytest_editsafety.perplexity import MAX_BATCH_LOGITS

        # the batching moves the numbers at float rounding (a text padded to another length): what sets it is keyed
        key = {"format": BASELINE_CACHE_FORMAT, **weights_key(state.loaded), "corpus": corpus.name,
               "texts": stable_hash(list(corpus.texts), 32), "batch_size": self.options.ppl_batch_size,
               "max_batch_logits": MAX_BATCH_LOGITS}
        return cached_value(self._values_root(state), "baselines", state.slug, key,
                            lambda: self._perplexity(state, corpus),
                            valid=lambda value: isinstance(value, dict) and set(value) == set(_PPL_FIELDS))

    def _corpus_baseline(self, state: ModelState, name: str) -> dict[str, float]:
        """The unedited model's perplexity on corpus ``name``: the single-edit baseline when it is that corpus, else
        measured on its own (so a run of sequential tests alone never needs the single-edit corpus, ME-PPL_50)."""
        if name == self.plan.model(state.slug).ppl_corpus:
            return self._baseline(state)
        if name not in state.other_baselines:
            corpus = self._corpus(name)
            state.other_baselines[name] = self._unedited_perplexity(state, corpus)
            log.info("model %s: unedited mean ppl %.4g on %s", state.slug, state.other_baselines[name]["mean"],
                     corpus.name)
        return state.other_baselines[name]

    def _tagged(self, slug: str, set_slug: str) -> CaseSet:
        """A planned case set with hardness set for this model's tokenizer."""
        return self._tag(self._state(slug), set_slug, lambda: self.plan.case_set(set_slug).case_set)

    def _tag(self, state: ModelState, key: str, source: Callable[[], CaseSet]) -> CaseSet:
        if key not in state.tagged:
            from pytest_editsafety.cases.classify import UnsupportedTokenizerError, tag_hardness

            cases = source()
            tokenizer = state.loaded.tokenizer
            try:
                # hardness as the harness runs the model: with whatever the tokenizer adds by default
                state.tagged[key] = tag_hardness(cases, tokenizer)
            except UnsupportedTokenizerError as err:
                log.warning("model %s: cannot classify hard cases (%s); keeping the case file's flags", state.slug, err)
                state.tagged[key] = cases
        return state.tagged[key]

    def _tag_case(self, state: ModelState, case: EditCase) -> EditCase:
        """One case outside the plan with its hardness set as ``_tag`` sets it for planned cases."""
        from pytest_editsafety.cases.classify import UnsupportedTokenizerError, is_hard_case

        tokenizer = state.loaded.tokenizer
        try:
            return case.with_hard(is_hard_case(case, tokenizer))
        except UnsupportedTokenizerError:
            return case

    def _probe(self, state: ModelState, set_slug: str, case: EditCase) -> Any:
        key = (set_slug, case.case_id)
        if key not in state.probes:
            from pytest_editsafety.metrics import probe_before

            state.probes[key] = probe_before(state.loaded.model, state.loaded.tokenizer, case)
        return state.probes[key]

    def _resources(self, state: ModelState) -> Any:
        """What this model provides to editors' needs (:mod:`pytest_editsafety.resources`)."""
        if state.resources is None:
            from editors.stats import SecondMomentCache
            from pytest_editsafety.resources import ModelResources

            if self._stats_cache is None:
                self._stats_cache = SecondMomentCache(self._root / "stats")
            corpus_name = self.options.stats_corpus or self.plan.model(state.slug).stats_corpus
            # resolved when C is first computed: editors with C = I, or ROME's files, need no corpus (and no network)
            state.resources = ModelResources(state.loaded, cache_root=self._root,
                                             values_root=self._values_root(state),
                                             stats_corpus=lambda: self._stats_corpus(state, corpus_name),
                                             stats_cache=self._stats_cache, stats_dir=self.options.stats_dir,
                                             ordinary_texts=lambda: self.corpus_texts(state.slug),
                                             weights_pinned=self._weights_pinned(state),
                                             progress=self._progress_line)
        return state.resources

    def _stats_corpus(self, state: ModelState, name: str) -> Any:
        """The corpus C is taken from for ``state``'s model (resolved when C is computed or looked up), with a
        warning when it holds texts the perplexity corpus scores: C whitens the update away from the keys of its own
        text, so the perplexity there may understate the damage (ME-PPL_1k holds the whole of ME-PPL_50)."""
        from pytest_editsafety.corpora import shared_texts

        corpus = self._corpus(name)
        scored = self._corpus(self.plan.model(state.slug).ppl_corpus)
        shared = shared_texts(corpus, scored)
        if shared and (state.slug, corpus.sha256) not in self._overlap_warned:
            self._overlap_warned.add((state.slug, corpus.sha256))
            what = ("is the perplexity corpus itself" if corpus.sha256 == scored.sha256 else
                    f"holds {shared} of the {len({t.strip() for t in scored.texts})} texts of the perplexity corpus "
                    f"{scored.name}")
            message = (f"model {state.slug}: the second moments C are taken from {corpus.name}, which {what}: an "
                       "update whitened by C avoids the keys of the text C was taken over, so the perplexity there may "
                       "understate the damage; take C from other text (--editsafety-stats-corpus)")
            log.warning(message)
            if self.options.progress is not None:  # the terminal, while pytest captures the test that needed C
                self.options.progress(f"warning: {message}")
        return corpus

    def _editor(self, state: ModelState, name: str) -> Any:
        failed = state.editor_errors.get(name)  # first: a floor that failed after set-up is recorded here too
        if failed is not None:
            error, traceback = failed
            raise error.with_traceback(traceback)  # the set-up's own traceback, not one grown by every test
        if name in state.editors:
            return state.editors[name]
        try:
            editor = self._build_editor(state, name)
            # once per editor and load: a set-up that wrote the weights would taint everything measured after it
            self._verify_intact(state, name, "set-up")
            return editor
        except Exception as err:
            log.warning("model %s: editor %s could not be set up (%s); every later use of it on this model raises the "
                        "same error", state.slug, name, type(err).__name__)
            state.editor_errors[name] = (err, err.__traceback__)
            raise

    def _build_editor(self, state: ModelState, name: str) -> Any:
        from editors.provision import set_up
        from editors.registry import build_editor_with_sources
        from pytest_editsafety.organisms import hparams_keys

        loaded = state.loaded
        editor = self._editor_objects.get(name)
        sources: dict[str, str] = {}  # an editor object carries its own hyper-parameters: no file to name
        if editor is None:
            user_hparams = (self.options.editor_hparams or {}).get(name)
            editor, sources = build_editor_with_sources(name, hparams_keys(loaded), loaded.model,
                                                        user_hparams=user_hparams,
                                                        overrides=self.options.editor_overrides)
        # everything the editor needs is measured now, on the unedited model: a statistics cache miss inside a
        # sequential run would otherwise measure an edited model's keys
        state.provided[name] = set_up(editor, loaded.model, loaded.tokenizer, loaded.family, self._resources(state))
        state.editors[name] = editor
        state.hparams_hashes[name] = hparams_digest(editor.hparams)
        values = recorded_hparams_values(editor.hparams, state.hparams_hashes[name])
        if values is not None:
            state.hparams_values[name] = values
            # a third-party factory may drop or rename what its file gave: name the files of recorded values only
            sources = {key: label for key, label in sources.items() if key in values}
        state.hparams_sources[name] = sources
        return editor

    # ---- the denominator floor ------------------------------------------------------------------

    def _floor_median(self, state: ModelState, name: str) -> float | None:
        """The editor's median |uᵀk| over the model's normal reference cases (None without a denominator)."""
        return (self._reference_medians(state, name) or {}).get("denominator")

    def _reference_medians(self, state: ModelState, name: str) -> dict[str, float | None] | None:
        if name in state.reference_medians:
            return state.reference_medians[name]
        from pytest_editsafety.floor import provided_digest, reference_medians

        editor = self._editor(state, name)
        medians = None
        if self.options.bounds.min_denominator_fraction != 0:
            choice = self.plan.model(state.slug)
            # the whole reference set, whatever --editsafety-limit says: the floor must not depend on the selection
            reference = self._tag(state, f"reference:{choice.reference_set}",
                                  lambda: resolve_cases(choice.reference_set))
            normal = [c for c in reference.cases if c.is_hard is False]
            if not normal:
                log.warning("model %s: no normal cases in %r; no relative denominator floor", state.slug,
                            choice.reference_set)
            loaded = state.loaded
            key_fields = {
                "model": loaded.identity,
                "dtype": str(next(loaded.model.parameters()).dtype),
                "editor": name,
                "hparams": state.hparams_hashes.get(name),
                "cases": stable_hash([c.to_dict() for c in normal]),
                "provided": provided_digest(state.provided[name]),
                # what the editor asked for, e.g. how many tokens of ordinary text its interference reads
                "needs": repr(editor.needs(loaded.model, loaded.family)),
            }
            # once per editor: the denominator reports run the editor's code on the unedited model, before any
            # edit session could catch a write; checked before the median is cached, and the editor's later
            # tests report the same error, as for a set-up
            try:
                # hyper-parameters that cannot be hashed cannot key a file: measured, not cached
                # and a model whose identity does not pin its weights: measured in each process, as its templates
                root = self._values_root(state) if key_fields["hparams"] is not None else None
                medians = reference_medians(editor, loaded, normal, key_fields=key_fields, root=root,
                                            verify=lambda: self._verify_intact(state, name, "denominator reports"),
                                            progress=self._progress_line)
            except Exception as err:
                state.editor_errors[name] = (err, err.__traceback__)
                raise
        state.reference_medians[name] = medians
        return medians


class BatchSizeError(ValueError):
    """A batch holds more cases than its editor declares it can apply at once (``max_requests_per_apply``)."""


def _perplexity_only(bounds: Bounds) -> Bounds:
    """``bounds`` with only the perplexity ratio and the collapse line left to hold: a batch's own bound."""
    return dataclasses.replace(bounds, min_efficacy=0.0, min_generalization=0.0, min_locality=0.0)


def _perplexity_metrics(baseline: Mapping[str, float], edited: Mapping[str, float]) -> dict[str, float | None]:
    """The perplexity figures of an edited model against the unedited one, as a record's metrics name them."""
    return {
        "ppl_unedited": baseline["mean"],
        "ppl_edited": edited["mean"],
        "ppl_ratio": _ratio(edited["mean"], baseline["mean"]),
        "ppl_corpus_unedited": baseline["corpus"],
        "ppl_corpus_edited": edited["corpus"],
        "ppl_corpus_ratio": _ratio(edited["corpus"], baseline["corpus"]),
        "ppl_median_edited": edited["median"],
        "ppl_max_edited": edited["max"],
    }


@dataclass
class _SequentialProgress:
    """What a sequential run has measured so far, kept when it stops on an error (plain numbers, one worker)."""

    steps: list[int] = field(default_factory=list)
    ppls: list[float] = field(default_factory=list)
    norm_ratios: dict[str, list[float]] = field(default_factory=dict)
    efficacy_after_edit: list[float] = field(default_factory=list)
    efficacy_at_end: list[float] = field(default_factory=list)


# metric names the harness owns: an editor's diagnostic of the same name is dropped, never mistaken for them
_HARNESS_METRICS = frozenset({
    "denominator_floor", "ppl_ratio", "ppl_edited", "ppl_unedited", "ppl_corpus_unedited", "ppl_corpus_edited",
    "ppl_corpus_ratio", "ppl_median_edited", "ppl_max_edited",
})


def _describe_hardware() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
