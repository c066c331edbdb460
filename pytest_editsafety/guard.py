"""The guard: allow or refuse an edit before any weight moves, for a platform that holds a loaded model.

:func:`guard` decides from what the editor can say about an edit without making it (its ``denominator`` report:
ROME's ``|uᵀk|`` against a floor derived like the certification's, and the update's interference); with
``apply=True`` it also makes the edit, measures perplexity on a probe set and rolls the edit back, bit-exactly,
when a bound breaks. :class:`Guard` is the same judge set up once (the editor, the floor) for a platform that asks
it about edit after edit. Both are exported by :mod:`pytest_editsafety.api`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pytest_editsafety.api_inputs import (
    check_bound,
    edit_requests,
    editors_by_name,
    is_organism_plan,
    measuring,
    plan_and_hub,
)
from pytest_editsafety.model_pool import HeldModelChangedError

# texts of the model's perplexity corpus a guarded edit is measured on (the corpus's first ones)
GUARD_PROBE_TEXTS = 64
# the guard refuses an edit whose interference (how much of the update every ordinary token receives) is above
# this multiple of the normal reference cases' median: on tiny-gpt2, rome over the hard and normal sets, 1.75 is the
# smallest multiple at which at most a tenth of the normal cases are refused (benchmarks/guard.py sweeps it)
GUARD_INTERFERENCE_FACTOR = 1.75


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
                 probe_texts: int = GUARD_PROBE_TEXTS, hparams: str | Sequence[str] | Mapping[str, Any] | None = None,
                 stats_corpus: str | None = None, stats_dir: str | None = None, cache_root: str | None = None,
                 dtype: str | None = None, strip_bos: bool = False) -> None:
        if len(editors_by_name(editor)) != 1:
            raise ValueError(f"editor: guard judges the edits of one editor; got {editor!r}")
        # a NaN would compare False everywhere and let every edit through; a negative bound would refuse every one
        check_bound("fraction", fraction)
        check_bound("floor", floor, none_ok=True)
        check_bound("interference_factor", interference_factor, none_ok=True)
        check_bound("max_ppl_ratio", max_ppl_ratio, infinite_ok=True)  # inf: apply every allowed edit, roll none back
        if isinstance(probe_texts, bool) or not isinstance(probe_texts, int) or probe_texts < 1:
            raise ValueError(f"probe_texts: expected an integer >= 1, got {probe_texts!r}")
        reference_cases = "normal" if is_organism_plan(model) else "real-normal"
        plan, hub = plan_and_hub(model, tokenizer, editor, [reference_cases], bounds=None, corpus=None, limit=1,
                                 sequential=False, hparams=hparams, stats_corpus=stats_corpus, stats_dir=stats_dir,
                                 cache_root=cache_root, dtype=dtype, strip_bos=strip_bos)
        slug = plan.models[0].slug
        self.editor_name: str = plan.editors[0]
        self._hub, self._slug = hub, slug
        self._loaded = hub.loaded(slug)
        with measuring(self._loaded.model):
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
        requests = edit_requests(requests)
        loaded = self._loaded
        # with an infinite bound nothing is rolled back, so nothing is measured for it
        probing = apply and math.isfinite(self.max_ppl_ratio)
        first_kept = None  # the parameters as they were before the call's first kept edit
        decisions = []
        with measuring(loaded.model):
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
          probe_texts: int = GUARD_PROBE_TEXTS, hparams: str | Sequence[str] | Mapping[str, Any] | None = None,
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
    requests = edit_requests(requests)  # a request of the wrong kind is refused before anything loads
    return Guard(model, tokenizer, editor, fraction=fraction, floor=floor, interference_factor=interference_factor,
                 max_ppl_ratio=max_ppl_ratio, probe_texts=probe_texts, hparams=hparams, stats_corpus=stats_corpus,
                 stats_dir=stats_dir, cache_root=cache_root, dtype=dtype, strip_bos=strip_bos
                 ).check(requests, apply=apply)
