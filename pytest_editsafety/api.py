"""The Python API, for callers that are not at a pytest prompt: a platform that holds a loaded model.

* :func:`certify` runs certification tests exactly as the plugin does (the same plan, hub, bounds and record
  format) and returns a :class:`Certificate` whose JSON is the plugin's ``editsafety.json``.
* :func:`guard` decides, before any weight moves, whether an edit is safe to make, from what the editor can say
  about it without editing (its ``denominator`` report: ROME's ``|uᵀk|`` against a floor derived like the
  certification's); with ``apply=True`` it also makes the edit, measures perplexity on a probe set and rolls the
  edit back, bit-exactly, when a bound breaks. :class:`Guard` is the same judge set up once (the editor, the floor)
  for a platform that asks it about edit after edit.

A model is a name (built-in, Hugging Face id, local directory: loaded as the plugin loads it) or a model object
with its tokenizer; an editor is a registered name or an editor object (:mod:`editors.base`), and :func:`certify`
also takes several (names separated by commas, or a sequence of names and objects); cases are a case set name, a
case file, a ``CaseSet`` or a sequence of ``EditCase``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import numbers
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pytest_editsafety.bounds import Bounds
from pytest_editsafety.cases import CaseSet, EditCase
from pytest_editsafety.model_pool import HeldModelChangedError

log = logging.getLogger(__name__)

__all__ = ["Certificate", "Guard", "GuardDecision", "HeldModelChangedError", "certify", "guard"]

API_CASE_SET = "cases"
# texts of the model's perplexity corpus a guarded edit is measured on (the corpus's first ones)
GUARD_PROBE_TEXTS = 64
# the guard refuses an edit whose interference (how much of the update every ordinary token receives) is above
# this multiple of the normal reference cases' median: on tiny-gpt2, rome over the hard and normal sets, 1.75 is the
# smallest multiple at which at most a tenth of the normal cases are refused (benchmarks/guard.py sweeps it)
GUARD_INTERFERENCE_FACTOR = 1.75


@dataclass(frozen=True)
class Certificate:
    """What :func:`certify` found: the run's result (``results.RunResult``, the plugin's JSON) and its verdict."""

    result: Any
    certified: bool

    @property
    def coverage(self) -> Any:
        """How much of its plan the run covered (``results.Coverage``: ``status`` ``complete`` or ``partial``, and
        each gap with the reason). A partial run, e.g. under ``limit``, is never certified, whatever its records."""
        return self.result.coverage

    @property
    def cases(self) -> tuple[Any, ...]:
        """Every measured case's record (``results.CaseRecord``): the single edits', or with ``batch_size`` the
        batches' members."""
        return self.result.edited_cases

    @property
    def batches(self) -> tuple[Any, ...]:
        """The batch tests' records (``results.BatchRecord``); empty without ``batch_size``."""
        return self.result.batches

    def to_json(self) -> str:
        from pytest_editsafety.results import to_json

        return to_json(self.result)

    def write(self, json_path: str | Path, md_path: str | Path) -> None:
        """Write the certificate as the plugin does, each file atomically: the JSON and the markdown report.
        Raises ``output_lock.OutputsInUseError`` while a certification run holds either path."""
        from pytest_editsafety.output_lock import holding_outputs
        from pytest_editsafety.report import write_outputs

        with holding_outputs((json_path, md_path), command="pytest_editsafety.certify(...).write"):
            write_outputs(self.result, Path(json_path), Path(md_path))


@dataclass(frozen=True)
class GuardDecision:
    """Allow or refuse one edit, with the reason and the numbers it rests on (plain values)."""

    allowed: bool
    reason: str
    subject: str
    prompt: str
    target_new: str
    denominator: float | None  # |uᵀk| the edit would divide by; None for an editor without one
    floor: float | None  # the floor it was held against
    subject_first: bool  # the subject is the prompt's first token (no BOS): the papers' collapse pattern
    measures: Mapping[str, float] = field(default_factory=dict)  # the editor's other key measures
    # the limit its interference (measures["interference"]) was held against: interference_factor × the normal
    # reference cases' median; None when the editor reports no interference
    interference_limit: float | None = None
    applied: bool = False  # apply=True and the edit was kept
    ppl_ratio: float | None = None  # apply=True: probe perplexity after the edit / just before it
    # apply=True: probe perplexity after the edit / the guard's reference (the model as its first applying check
    # found it): the number max_ppl_ratio bounds
    ppl_ratio_total: float | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _held_model(model: Any, tokenizer: Any, strip_bos: bool = False) -> Any:
    """A model object in hand as the registry's ``LoadedModel``: its family, layers and identity. ``strip_bos``
    strips the BOS of a *copy* of ``tokenizer`` (:mod:`pytest_editsafety.bos`): the caller's own is left as given."""
    from editors.families import family_for_model_type
    from pytest_editsafety.registry import LoadedModel, ModelSpec, UnknownModelError, local_identity, resolve_model
    from pytest_editsafety.zoo.recipe import organism_recipe_hash

    if tokenizer is None:
        raise ValueError("tokenizer: a model object needs its tokenizer (pass a model name to load both)")
    if isinstance(tokenizer, (str, Path)) or not callable(tokenizer):
        raise ValueError(f"tokenizer: expected the model's tokenizer object (a transformers tokenizer), got "
                         f"{type(tokenizer).__name__}")
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "named_parameters"):
        raise ValueError(f"model: expected a model name or a transformers model (with a .config), got "
                         f"{type(model).__name__}")
    family = family_for_model_type(config.model_type)
    name = str(getattr(config, "_name_or_path", "") or "")
    try:
        spec = resolve_model(name) if name else None
    except (UnknownModelError, ValueError):
        spec = None
    if spec is None:
        spec = ModelSpec(name=name or type(model).__name__, source="local", location=name, family=family.name,
                         revision=None, description="a model object passed to the API")
    recipe_hash = organism_recipe_hash(config)
    if recipe_hash is not None:
        identity = recipe_hash
    elif name and spec.source == "local" and Path(spec.location).is_dir():
        identity = local_identity(Path(spec.location))
    elif name:
        identity = f"{name}@{getattr(config, '_commit_hash', None) or 'unpinned'}"
    else:  # a model built in memory names nothing: its weights are its identity (the caches are keyed by it)
        from editors.restore import model_digest

        identity = f"{type(model).__name__}:{model_digest(model)[:32]}"
    stripped = False
    if strip_bos:
        import copy

        from pytest_editsafety.bos import strip_bos as strip, stripped_identity

        tokenizer = copy.deepcopy(tokenizer)
        stripped = strip(tokenizer, spec.name)
        identity = stripped_identity(identity) if stripped else identity
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, family=family,
                       n_layers=family.n_layers(config), identity=identity, bos_stripped=stripped)


def _case_sets(cases: Any) -> list[str | CaseSet]:
    if isinstance(cases, (str, Path)):  # names or files, comma-separated as on the command line
        return [part.strip() for part in str(cases).split(",") if part.strip()]
    if isinstance(cases, CaseSet):
        return [cases]
    if isinstance(cases, EditCase):
        cases = (cases,)
    elif not isinstance(cases, Iterable):
        raise ValueError(f"cases: expected a case set name, a case file, a CaseSet or a non-empty sequence of "
                         f"EditCase; got {type(cases).__name__}")
    cases = tuple(cases)
    if not cases or not all(isinstance(c, EditCase) for c in cases):
        raise ValueError("cases: expected a case set name, a case file, a CaseSet or a non-empty sequence of EditCase")
    return [CaseSet(name=API_CASE_SET, cases=cases, source="given to certify()", format="canonical")]


def _editors(editor: Any) -> dict[str, Any]:
    """``editor`` by name, in the order given, each a registered name or an editor object: one name, names separated
    by commas (as ``--editor`` takes them), one editor object, or a sequence of names and objects; unknown names and
    repeats are errors."""
    from editors.registry import available_editors

    if isinstance(editor, str):
        given: list[Any] = [part.strip() for part in editor.split(",") if part.strip()]
    elif _is_editor_object(editor) or not isinstance(editor, Sequence):
        given = [editor]
    else:
        given = list(editor)
    if not given:
        raise ValueError("editor: expected an editor name, an editor object or a sequence of them; got none")
    by_name: dict[str, Any] = {}
    for each in given:
        if isinstance(each, str) and each not in available_editors():
            raise ValueError(f"editor: unknown editor {each!r}; available: {', '.join(available_editors())}")
        name = each if isinstance(each, str) else getattr(each, "name", None)
        if _is_editor_object(each) and (not isinstance(name, str) or not name.strip()):
            raise ValueError(f"editor: {each!r} has no name (its 'name' attribute is {name!r}); an editor object "
                             f"names itself in records and reports")
        if not (isinstance(each, str) or _is_editor_object(each)) or not isinstance(name, str) or not name:
            raise ValueError(f"editor: {each!r} is neither an editor name nor an editor object (editors.base: a name "
                             f"and an apply method)")
        if name in by_name:
            raise ValueError(f"editor: {name} given more than once")
        by_name[name] = each
    return by_name


def _is_editor_object(value: Any) -> bool:
    return not isinstance(value, (str, Path)) and callable(getattr(value, "apply", None))


def _hparams_options(hparams: Any, editors: Mapping[str, Any]) -> dict[str, Any]:
    """HubOptions' ``editor_hparams`` for ``hparams`` as :func:`certify` takes it: for one editor, a JSON file or a
    mapping of fields; for any number, a mapping from (some of) the editors' names to a file or a mapping of fields
    each. Hyper-parameters reach only editors given by name: an editor object carries its own."""
    if hparams is None or (isinstance(hparams, Mapping) and not hparams):
        return {}
    names = list(editors)
    if not (isinstance(hparams, Mapping) and set(hparams) <= set(names)):  # not the per-editor form
        if len(names) == 1:
            hparams = {names[0]: hparams}
        elif isinstance(hparams, Mapping):
            raise ValueError(f"hparams: with several editors, its keys name editors; "
                             f"{', '.join(sorted(map(str, set(hparams) - set(names))))} is not one of {', '.join(names)}")
        else:
            raise ValueError(f"hparams: with several editors ({', '.join(names)}), expected a mapping from editor "
                             f"name to its JSON file or fields, got {type(hparams).__name__}")
    given_as_objects = sorted(name for name in hparams if not isinstance(editors[name], str))
    if given_as_objects:
        raise ValueError(f"hparams: {', '.join(given_as_objects)} was given as an editor object, which carries its "
                         f"own hyper-parameters; build it with the ones you want instead")
    per_name: dict[str, Any] = {}
    for name, value in hparams.items():
        if isinstance(value, (str, Path)):
            per_name[name] = str(value)
        elif isinstance(value, Mapping):
            per_name[name] = dict(value)
        else:
            raise ValueError(f"hparams[{name!r}]: expected a JSON file or a mapping of fields, got "
                             f"{type(value).__name__}")
    return {"editor_hparams": per_name}


def _hub(model: Any, tokenizer: Any, editor: Any, case_sets: Sequence[str | CaseSet], *, bounds: Bounds | Mapping[str, Any] | None,
         corpus: str | None, limit: int | None, sequential: bool, hparams: Any,
         stats_corpus: str | None, stats_dir: str | None, cache_root: str | None, dtype: str | None,
         strip_bos: bool, sequential_edits: int | None = None, sequential_every: int | None = None,
         sequential_corpus: str | None = None, batch_size: int = 1,
         search_batch: int | None = None, downstream: Sequence[str] = (),
         downstream_limit: int | None = None) -> tuple[Any, Any]:
    """The plan and the hub for one model and its editors (:func:`_editors`): the plugin's own, with the caller's
    objects in it."""
    from pytest_editsafety.hub import HubOptions, ModelHub
    from pytest_editsafety.plan import build_plan

    editors = _editors(editor)
    hparams_options = _hparams_options(hparams, editors)
    checked_bounds = _bounds(bounds)
    if isinstance(model, str) and tokenizer is not None:
        raise ValueError(f"tokenizer: model {model!r} is given by name and loads its own tokenizer; pass None, or "
                         f"pass the model object with its tokenizer")
    if not isinstance(model, str) and dtype is not None:
        raise ValueError(f"dtype: a model you hold runs in its own dtype; convert it first (model.to(...)) or give "
                         f"the model by name to load it in {dtype!r}")
    held = None if isinstance(model, str) else _held_model(model, tokenizer, strip_bos)
    plan = build_plan(list(editors), [model if held is None else held.spec], list(case_sets), ppl_corpus=corpus,
                      limit=limit, sequential=sequential, sequential_edits=sequential_edits,
                      sequential_ppl_corpus=sequential_corpus, batch_size=batch_size)
    options = HubOptions(
        bounds=checked_bounds, dtype=dtype, stats_dir=stats_dir, stats_corpus=stats_corpus, cache_root=cache_root,
        strip_bos=strip_bos, sequential_every=sequential_every, search_batch=search_batch,
        downstream=tuple(downstream), downstream_limit=downstream_limit, **hparams_options,
    )
    slug = plan.models[0].slug
    objects = {name: each for name, each in editors.items() if not isinstance(each, str)}
    hub = ModelHub(plan, options, models={slug: held} if held is not None else None, editors=objects or None)
    return plan, hub


def certify(model: Any, tokenizer: Any, editor: Any, cases: Any, *,
            bounds: Bounds | Mapping[str, Any] | None = None, corpus: str | None = None, limit: int | None = None,
            sequential: bool = False, hparams: str | Path | Mapping[str, Any] | None = None,
            stats_corpus: str | None = None,
            stats_dir: str | None = None, cache_root: str | None = None, dtype: str | None = None,
            strip_bos: bool = False, sequential_edits: int | None = None, sequential_every: int | None = None,
            sequential_corpus: str | None = None, batch_size: int = 1,
            search_batch: int | None = None, downstream: Sequence[str] = (),
            downstream_limit: int | None = None) -> Certificate:
    """Certify ``editor`` on ``model`` over ``cases`` as ``pytest --editor=... --model=... --cases=...`` would.

    ``editor`` is a registered name, an editor object, names separated by commas, or a sequence of names and objects:
    several editors certify in one run, where those that declare the same measurement (ROME and its C-ROME
    variants' v*, MEMIT, EMMET and AlphaEdit's z) search once per case and share it, as in the plugin.
    Every case is edited from the unedited model, measured, restored bit-exactly and judged against ``bounds``
    (default ``Bounds()``, the plugin's defaults). ``hparams`` is a JSON file or a mapping layered over the
    editor's built-in hyper-parameters; with several editors, a mapping from editor name to such a file or
    mapping (an editor it does not name keeps its built-in ones); ``corpus`` the perplexity corpus (default: the
    model's, as the plugin picks it). ``strip_bos`` runs the papers' BOS-stripped protocol (A.2,
    ``--editsafety-strip-bos``): a tokenizer that prepends BOS runs without it (a copy of a tokenizer given here is
    stripped), recorded in the certificate.
    ``sequential`` adds the papers' sequential run per case set: ``sequential_edits`` edits (default 107 or the
    whole set), measured every ``sequential_every`` edits and after the last, on ``sequential_corpus`` (the
    plugin's ``--editsafety-sequential-*`` options and defaults). ``batch_size`` K > 1 certifies batches, as
    ``--editsafety-batch-size K`` does: the cases K at a time applied in one edit (``Certificate.batches``; the
    members' records in ``Certificate.cases``); the editor must declare it takes K requests at once
    (``max_requests_per_apply``), else every batch records the error. ``search_batch`` N runs the edit searches
    of N single-edit cases at once (``--editsafety-search-batch``; None: 8 on a GPU, 1 on a CPU).
    ``downstream`` names lm-eval tasks scored before and after every single edit, at most ``downstream_limit``
    examples each (``--editsafety-downstream``, :mod:`pytest_editsafety.downstream`). The model is left as it was
    given. A model that cannot be loaded, or an editor that cannot be set up for it (a hyper-parameter unknown, of
    the wrong type or out of range, a missing trained network, statistics too poor to solve with), raises that
    error (an ``editors.hparams.HparamsError`` names the key) before any case runs, whichever of several editors it
    is; errors of a single case are recorded. Set-up is therefore not in any record's ``duration_s``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit: expected None or an integer >= 1, got {limit!r}")
    from editors.restore import RestoreError
    from pytest_editsafety.controller import RunRecords, absorb_meta, build_result
    from pytest_editsafety.results import Session

    started = datetime.now(timezone.utc)
    t0 = time.monotonic()
    plan, hub = _hub(model, tokenizer, editor, _case_sets(cases), bounds=bounds, corpus=corpus, limit=limit,
                     sequential=sequential, hparams=hparams, stats_corpus=stats_corpus, stats_dir=stats_dir,
                     cache_root=cache_root, dtype=dtype, strip_bos=strip_bos, sequential_edits=sequential_edits,
                     sequential_every=sequential_every, sequential_corpus=sequential_corpus, batch_size=batch_size,
                     search_batch=search_batch, downstream=downstream, downstream_limit=downstream_limit)
    # every editor set up first, so that a caller hears of a bad setting as an exception naming it, not as an
    # error recorded against every case of an uncertified certificate (the plugin, which must report per test,
    # records it so)
    records = RunRecords(started=started, t0=t0, seen=True, strip_bos=strip_bos)
    # a model you hold is measured as the plugin's own loads are, in eval mode (dropout off), and given back in the
    # modes it came in
    with _measuring(model):
        for planned_model in plan.models:
            for name in plan.editors:
                try:
                    hub.prepared_editor(planned_model.slug, name)
                except RestoreError as err:  # an editor's set-up wrote to the model: yours, if you hold it
                    changed = hub.held_model_changed(planned_model.slug)
                    if changed is None:
                        raise
                    raise changed from err
        for item in plan.items:
            outcome = hub.run(item)
            absorb_meta(records, outcome.meta)
            records.records[item.test_id] = outcome.record
            changed = hub.held_model_changed(item.model)
            if changed is not None:  # the caller's object is not what they gave: no certificate can say otherwise
                raise changed
    # one session that selected the whole plan and ran it to the end: the certificate covers its plan or says why not
    session = Session(keyword="", markexpr="", shard=None, deselected=(), interrupted=None)
    result = build_result(plan, hub.options.bounds, records, ("pytest_editsafety.api.certify",), session)
    return Certificate(result=result, certified=result.certified)


class Guard:
    """:func:`guard` set up once, for a platform that judges edit after edit on a model it holds.

    Building one does what every :func:`guard` call does before its first request: it loads the model (when
    named), sets the editor up (C, context templates) and derives the floor and the interference limit from the
    model's normal reference cases. :meth:`check` then costs, per request, the editor's ``denominator`` report
    (one forward pass over the templated prompts) and, applying, the edit and a probe perplexity. On tiny-gpt2
    (rome, one CPU thread) a :func:`guard` call spends about 1.5 s before its first decision, a :meth:`check` about
    0.02 s per request (``benchmarks/guard.py`` prints both).

    The floor and the limit describe the model as it was when the guard was built: edits it keeps
    (``apply=True``), or that the caller makes, do not move them. ``max_ppl_ratio`` bounds the probe perplexity
    against the guard's reference, the model as its first applying check found it, so kept edits cannot drift
    past it one small step at a time. Build a new guard when the model has changed enough that its normal cases no
    longer describe it. One check at a time: a guard is not thread-safe.
    """

    def __init__(self, model: Any, tokenizer: Any, editor: Any, *,
                 fraction: float = 0.5, floor: float | None = None,
                 interference_factor: float | None = GUARD_INTERFERENCE_FACTOR, max_ppl_ratio: float = 1.5,
                 probe_texts: int = GUARD_PROBE_TEXTS, hparams: str | Mapping[str, Any] | None = None,
                 stats_corpus: str | None = None, stats_dir: str | None = None, cache_root: str | None = None,
                 dtype: str | None = None, strip_bos: bool = False) -> None:
        if len(_editors(editor)) != 1:
            raise ValueError(f"editor: guard judges the edits of one editor; got {editor!r}")
        # a NaN would compare False everywhere and let every edit through; a negative bound would refuse every one
        _check_bound("fraction", fraction)
        _check_bound("floor", floor, none_ok=True)
        _check_bound("interference_factor", interference_factor, none_ok=True)
        _check_bound("max_ppl_ratio", max_ppl_ratio, infinite_ok=True)  # inf: apply every allowed edit, roll none back
        if isinstance(probe_texts, bool) or not isinstance(probe_texts, int) or probe_texts < 1:
            raise ValueError(f"probe_texts: expected an integer >= 1, got {probe_texts!r}")
        plan, hub = _hub(model, tokenizer, editor, ["normal" if _is_organism_plan(model) else "real-normal"],
                         bounds=None, corpus=None, limit=1, sequential=False, hparams=hparams,
                         stats_corpus=stats_corpus, stats_dir=stats_dir, cache_root=cache_root, dtype=dtype,
                         strip_bos=strip_bos)
        slug = plan.models[0].slug
        self.editor_name: str = plan.editors[0]
        self._hub, self._slug = hub, slug
        self._loaded = hub.loaded(slug)
        with _measuring(self._loaded.model):
            self._editor = hub.prepared_editor(slug, self.editor_name)
            self._templates = hub.provided(slug, self.editor_name).context_templates or ("{}",)
            # the normal cases' medians are measured (or read) only when a limit is derived from them
            medians = hub.reference_medians(slug, self.editor_name) if floor is None or interference_factor else {}
        if floor is None:
            median = medians.get("denominator")
            floor = None if median is None or not math.isfinite(median) else fraction * abs(median)
        # plain floats: a decision holds them and goes to JSON
        self.floor: float | None = None if floor is None else float(floor)
        self._interference_median = medians.get("interference")
        self._interference_factor = None if interference_factor is None else float(interference_factor)
        self.interference_limit: float | None = None
        if self._interference_factor and self._interference_median is not None \
                and math.isfinite(self._interference_median) and self._interference_median > 0:
            self.interference_limit = self._interference_factor * float(self._interference_median)
        self.max_ppl_ratio = float(max_ppl_ratio)
        self.probe_texts = probe_texts
        self._probe: tuple[tuple[str, ...], float] | None = None  # the probe texts and the reference perplexity
        self._broken: BaseException | None = None  # an edit changed the model beyond restoring

    @property
    def probe_reference(self) -> float | None:
        """The probe perplexity ``max_ppl_ratio`` is held against; None before the first check that applies."""
        return None if self._probe is None else self._probe[1]

    def check(self, requests: Any, *, apply: bool = False) -> tuple[GuardDecision, ...]:
        """One decision per request, as :func:`guard` makes them. With ``apply=True`` each allowed edit is made and
        kept while the probe perplexity stays within ``max_ppl_ratio`` of the reference, else rolled back
        bit-exactly and refused. A request whose edit would not fit the model's context is refused with the
        lengths. A call that raises (an editor's error midway) leaves no edit of its own in the model: the ones it
        had kept are rolled back too, as the caller never learns of them."""
        from editors.fingerprint import ModelFingerprint
        from editors.restore import ParameterSnapshot

        if self._broken is not None:
            raise HeldModelChangedError(f"this guard's model was changed beyond restoring ({self._broken}); load the "
                                        f"model afresh and build a new Guard")
        requests = _requests(requests)
        loaded = self._loaded
        # with an infinite bound nothing is rolled back, so nothing is measured for it
        probing = apply and math.isfinite(self.max_ppl_ratio)
        first_kept = None  # the parameters as they were before the call's first kept edit
        decisions = []
        with _measuring(loaded.model):
            current, fingerprint = None, None
            if probing and self._probe is None:  # the reference: the model as the first applying check finds it
                current = self._probe_before_edits()
            try:
                for request in requests:
                    started = time.perf_counter()
                    decision = self._decide(request)
                    if decision.allowed and apply:
                        if fingerprint is None:  # the call's first edit: the model as the call found it
                            if probing and current is None:  # the caller may have changed it since the last call
                                current = self._probe_before_edits()
                            # every tensor but the editor's declared ones must come out of an edit, kept or rolled
                            # back, as it was
                            fingerprint = ModelFingerprint.of(loaded.model)
                        # the editor declares the same parameters for every request: the first kept edit's
                        # snapshot is all a rollback of the whole call needs
                        snapshot = ParameterSnapshot.from_model(
                            loaded.model, self._editor.parameters_touched(loaded.model, loaded.family))
                        decision, after = self._apply(request, decision, snapshot, fingerprint, current)
                        if decision.applied:
                            current = after
                            first_kept = snapshot if first_kept is None else first_kept
                    decisions.append(dataclasses.replace(decision, seconds=time.perf_counter() - started))
            except BaseException:
                if first_kept is not None:
                    first_kept.restore()
                raise
        return tuple(decisions)

    def _probe_before_edits(self) -> float:
        """The probe's perplexity on the model as it is, before a call's first edit; the first applying check's is
        the reference ``max_ppl_ratio`` bounds every kept edit against."""
        texts = self._probe[0] if self._probe is not None else tuple(
            self._hub.corpus_texts(self._slug)[: self.probe_texts])
        current = self._probe_perplexity(texts)
        if self._probe is None:
            self._probe = (texts, current)
        return current

    def _probe_perplexity(self, texts: Sequence[str]) -> float:
        from pytest_editsafety.perplexity import perplexity

        return perplexity(self._loaded.model, self._loaded.tokenizer, texts).mean_ppl

    def _decide(self, request: Any) -> GuardDecision:
        """The decision on ``request`` before any weight moves."""
        from editors.text import subject_last_index
        from pytest_editsafety.context_fit import edit_tokens_over_context

        loaded, threshold, reach_limit = self._loaded, self.floor, self.interference_limit
        first = subject_last_index(loaded.tokenizer, "{}", request.prompt, request.subject) == 0
        decided = functools.partial(GuardDecision, subject=request.subject, prompt=request.prompt,
                                    target_new=request.target_new, floor=threshold, subject_first=first)
        too_long = edit_tokens_over_context(loaded, request.text, request.target_new, self._templates)
        if too_long is not None:
            n_tokens, text, limit = too_long
            return decided(allowed=False, denominator=None,
                           reason=f"the edit reads {n_tokens} tokens ({text[:60]!r}...), more than the model's "
                                  f"context of {limit}")
        report = self._editor.denominator(loaded.model, loaded.tokenizer, loaded.family, request)
        if report is not None and "denominator" not in report:
            raise ValueError(f"editor {self.editor_name!r}: its denominator() report has no 'denominator' key "
                             f"(got {sorted(report)})")
        measures = {k: float(v) for k, v in (report or {}).items() if k != "denominator"}
        value = float(report["denominator"]) if report is not None else None
        allowed, reason = True, "no denominator to judge by" if report is None else "denominator above the floor"
        if value is not None and not math.isfinite(value):
            allowed, reason = False, f"|uᵀk| is {value}: the update cannot be computed"
        elif value is not None and threshold is not None and value < threshold:
            allowed, reason = False, f"|uᵀk| {value:.4g} < floor {threshold:.4g}"
        elif reach_limit is not None and "interference" in measures and not measures["interference"] <= reach_limit:
            allowed, reason = False, (f"interference {measures['interference']:.4g} > {reach_limit:.4g} "
                                      f"({self._interference_factor:g} × the normal cases' median): ordinary "
                                      f"text's keys receive "
                                      f"{measures['interference'] / self._interference_median:.2g}x the usual "
                                      f"share of the update")
        return decided(allowed=allowed, reason=reason, denominator=value, measures=measures,
                       interference_limit=reach_limit if "interference" in measures else None)

    def _apply(self, request: Any, decision: GuardDecision, snapshot: Any, fingerprint: Any,
               before: float | None) -> tuple[GuardDecision, float | None]:
        """Make the allowed edit of ``request`` and keep it, or roll it back (``snapshot``) when the probe
        perplexity (``before``: the model's just now; None: not measured, the bound being infinite) passes the
        bound; the decision and the probe perplexity after. An edit that raises midway is undone before the
        error goes on; one that wrote outside its declared parameters (``fingerprint``: the model before the
        call) is an error, and retires the guard."""
        from editors.base import EditRequest
        from editors.fingerprint import UndeclaredChangeError

        loaded = self._loaded
        try:
            self._editor.apply(loaded.model, loaded.tokenizer, loaded.family,
                               [EditRequest(request.subject, request.prompt, request.target_new)])
            after = None if before is None else self._probe_perplexity(self._probe[0])
        except BaseException:
            snapshot.restore()
            raise
        step = total = None
        keep = after is None
        if after is not None:
            step, total = after / before, after / self._probe[1]
            keep = total <= self.max_ppl_ratio  # NaN counts as broken
        if not keep:
            snapshot.restore()
        try:
            fingerprint.check(loaded.model, editor=self.editor_name, declared=snapshot)
        except UndeclaredChangeError as err:
            snapshot.restore()
            self._broken = err
            raise HeldModelChangedError(f"{err}; the guard restored what the editor declares, but the model keeps "
                                        f"those changes: load it afresh") from err
        if not keep:
            return dataclasses.replace(decision, allowed=False, ppl_ratio=step, ppl_ratio_total=total,
                                       reason=f"probe perplexity {total:.4g}x the reference (this edit {step:.4g}x) "
                                              f"> {self.max_ppl_ratio:g}: edit rolled back"), None
        measured = "" if total is None else f", probe perplexity {total:.4g}x the reference (this edit {step:.4g}x)"
        return dataclasses.replace(decision, applied=True, ppl_ratio=step, ppl_ratio_total=total,
                                   reason=f"{decision.reason}; applied{measured}"), after


def guard(model: Any, tokenizer: Any, editor: Any, requests: Any, *,
          fraction: float = 0.5, floor: float | None = None,
          interference_factor: float | None = GUARD_INTERFERENCE_FACTOR, apply: bool = False, max_ppl_ratio: float = 1.5,
          probe_texts: int = GUARD_PROBE_TEXTS, hparams: str | Mapping[str, Any] | None = None,
          stats_corpus: str | None = None, stats_dir: str | None = None, cache_root: str | None = None,
          dtype: str | None = None, strip_bos: bool = False) -> tuple[GuardDecision, ...]:
    """One decision per request (an ``editors.base.EditRequest``, an ``EditCase``, or cases as :func:`certify`
    takes them), made before any weight moves.

    An edit is refused when the editor's ``denominator`` report is below ``floor``, by default ``fraction`` ×
    the editor's median over the model's normal reference cases (the certification's floor, derived the same
    way and shared through the same cache, with a fraction of its own: the certification's 0.1 targets the
    papers' ~100x collapse gap, a guard must also stop the 2-5x gaps that already damage a model), or is not
    finite; or when the report's ``interference`` (ROME's: the mean share of the update that ordinary text's
    keys receive, :func:`editors.maths.rome.interference`) is above ``interference_factor`` × its median over the
    same cases (None or 0: not judged; a negative or non-finite factor is a ValueError). An editor without a
    denominator is allowed on that count; an edit that would not fit the model's context is refused. With
    ``apply=True`` an allowed edit is made and the perplexity of the first ``probe_texts`` texts of the model's
    perplexity corpus measured; the edit is rolled back bit-exactly (and refused) when that perplexity passes
    ``max_ppl_ratio`` × the model's as the call found it, so the kept edits, which stay in the model one after
    another, stay within the bound together. An error midway rolls back every edit of the call. ``strip_bos`` judges the edits as the model runs under the BOS-stripped protocol
    (:func:`certify`), with the floor derived under it.

    Each call sets the editor up and derives the floor anew; to judge edits one after another on a model you
    hold, build a :class:`Guard` once and call its :meth:`Guard.check`.
    """
    requests = _requests(requests)  # a request of the wrong kind is refused before anything loads
    return Guard(model, tokenizer, editor, fraction=fraction, floor=floor, interference_factor=interference_factor,
                 max_ppl_ratio=max_ppl_ratio, probe_texts=probe_texts, hparams=hparams, stats_corpus=stats_corpus,
                 stats_dir=stats_dir, cache_root=cache_root, dtype=dtype, strip_bos=strip_bos
                 ).check(requests, apply=apply)


def _measuring(model: Any) -> Any:
    """Around the measurements of a model the caller holds: eval mode (dropout off), each module's mode given back
    after (:func:`editors.hooks.eval_mode`); nothing for a model given by name, which loads in eval mode."""
    import contextlib

    if isinstance(model, str):
        return contextlib.nullcontext()
    from editors.hooks import eval_mode

    return eval_mode(model)


def _bounds(bounds: Any) -> Bounds:
    """``bounds`` as certify takes it: None (the plugin's defaults), a ``Bounds``, or a mapping of its fields."""
    if bounds is None:
        return Bounds()
    if isinstance(bounds, Bounds):
        return bounds
    if isinstance(bounds, Mapping):
        return Bounds.from_mapping(bounds)
    raise ValueError(f"bounds: expected None, a pytest_editsafety.bounds.Bounds or a mapping of its fields, got "
                     f"{type(bounds).__name__}")


def _is_organism_plan(model: Any) -> bool:
    from pytest_editsafety.organisms import is_organism, is_organism_model
    from pytest_editsafety.registry import resolve_model

    return is_organism(resolve_model(model)) if isinstance(model, str) else is_organism_model(model)


def _check_bound(name: str, value: Any, *, none_ok: bool = False, infinite_ok: bool = False) -> None:
    if value is None and none_ok:
        return
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and value >= 0 \
        and (math.isfinite(value) or (infinite_ok and value == math.inf))
    if not ok:
        allowed = ("None or " if none_ok else "") + "a finite number >= 0" + (" or inf" if infinite_ok else "")
        raise ValueError(f"{name}: expected {allowed}, got {value!r}")


def _requests(requests: Any) -> list[Any]:
    from editors.base import EditRequest
    from pytest_editsafety.cases import resolve_cases

    if isinstance(requests, Mapping):
        raise ValueError("requests: a mapping is not a request; pass EditRequest(**it) (subject, prompt, target_new)")
    if isinstance(requests, (EditRequest, EditCase)):
        requests = [requests]
    elif isinstance(requests, (str, Path)):  # case set names or files, comma-separated as on the command line
        requests = [c for part in str(requests).split(",") if part.strip() for c in resolve_cases(part.strip()).cases]
    elif isinstance(requests, CaseSet):
        requests = requests.cases
    elif not isinstance(requests, Iterable):
        raise ValueError(f"requests: expected an EditRequest, an EditCase, a sequence of them, a CaseSet or case set "
                         f"names; got {type(requests).__name__}")
    out = []
    for i, r in enumerate(requests):
        if isinstance(r, EditRequest):
            out.append(r)
        elif isinstance(r, EditCase):
            out.append(EditRequest(r.subject, r.prompt, r.target_new))
        else:
            raise ValueError(f"requests[{i}]: expected an EditRequest or an EditCase, got {type(r).__name__} "
                             f"(a mapping of subject, prompt, target_new is EditRequest(**it))")
    return out
