"""Mining a dataset for the edits most likely to collapse ROME, from the keys alone.

ROME divides its update by ``uᵀkᵘ`` with ``u = C⁻¹k̄ / ‖C⁻¹k̄‖`` (``k̄``: the mean key over the context
templates, ``kᵘ``: the key of the bare prompt). The collapse papers trace every collapsed edit to a tiny
denominator, and the denominator needs no ``v*`` optimisation and no perplexity pass: one forward pass over
the templated prompts gives both keys. So every case of a dataset can be scored in about the time one edit
takes, the smallest denominators written out as a case file, and only those confirmed with full edits.

The score is the denominator the chosen editor itself reports (its ``denominator()``, :mod:`editors.base`):
for ROME ``|uᵀkᵘ|`` with the normalised ``u`` (:func:`editors.maths.rome.measure_keys`), for C-ROME ``|uᵀk̄|``;
the certification's denominator floor reads the same report, so a mined score and a test's floor are the same
quantity as the edit's own ``denominator``. The normalised form is the one that sizes the update
(``‖ΔW‖ = ‖v* − Wkᵘ‖ / |uᵀkᵘ|``), and it separates hard from normal cases where the unnormalised one does not
(on an earlier tiny-gpt2 with C from text: hard cases' mean rank percentile 0.40 vs 0.53).

Layout: the ranking, the summaries and the output case set are plain functions of plain data (no torch);
``score_case_sets``, ``mine`` and ``confirm`` do the model I/O through the hub (:mod:`pytest_editsafety.hub`),
so the keys, context templates, hparams and C are exactly those of the certification tests.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pytest_editsafety import aggregates
from pytest_editsafety.cases import CaseSet, EditCase

log = logging.getLogger(__name__)

__all__ = [
    "ConfirmedCase",
    "HardnessSummary",
    "MinedCase",
    "MiningError",
    "MiningReport",
    "ScoredCase",
    "confirm",
    "hardness_summary",
    "mine",
    "mined_case_set",
    "rank_cases",
    "render_table",
    "score_case_sets",
]

MINED_SET_NAME = "mined"


class MiningError(ValueError):
    """A mining request that cannot run (an editor without a denominator, a bad ``--top``); names the option."""


# --------------------------------------------------------------------------------------------------
# Pure scoring


@dataclass(frozen=True)
class ScoredCase:
    """A case of the pool with the case set it came from (as given on the command line) and its keys' score."""

    case: EditCase
    source: str
    # the editor's denominator report: "denominator" (|uᵀk|) and whatever key measures it adds
    measure: Mapping[str, float]

    @property
    def denominator(self) -> float:
        return float(self.measure["denominator"])

    def get(self, key: str) -> float:
        return float(self.measure.get(key, math.nan))


@dataclass(frozen=True)
class MinedCase:
    rank: int  # 1 = the smallest denominator of the pool
    scored: ScoredCase
    median_ratio: float  # denominator / the pool's median denominator

    @property
    def case(self) -> EditCase:
        return self.scored.case


def _danger_key(item: tuple[int, ScoredCase]) -> tuple[int, float, int]:
    position, scored = item
    value = scored.denominator
    # NaN first (an edit that cannot be computed), then ascending denominator; the pool's order breaks ties
    return (0, 0.0, position) if math.isnan(value) else (1, value, position)


def rank_cases(scored: Sequence[ScoredCase]) -> tuple[tuple[MinedCase, ...], float]:
    """Every case, most dangerous (smallest ``|uᵀkᵘ|``) first, and the pool's median denominator."""
    if not scored:
        raise MiningError("--cases: the pool holds no cases to score")
    finite = [s.denominator for s in scored if math.isfinite(s.denominator)]
    median = aggregates.median(finite) if finite else math.nan
    ordered = sorted(enumerate(scored), key=_danger_key)
    ranked = tuple(
        MinedCase(rank=i + 1, scored=s, median_ratio=_ratio(s.denominator, median))
        for i, (_, s) in enumerate(ordered)
    )
    return ranked, median


def _ratio(value: float, median: float) -> float:
    if not math.isfinite(median) or median == 0 or math.isnan(value):
        return math.nan
    return value / median


@dataclass(frozen=True)
class HardnessSummary:
    """How well the ranking puts the tokenizer's hard cases (subject = token 0) first."""

    n_cases: int
    n_hard: int
    # mean of (rank - 0.5) / n over hard cases: 0.5 is a random order, near 0 puts every hard case first
    hard_mean_rank_percentile: float
    top: int
    hard_in_top: int

    @property
    def hard_share_of_top(self) -> float:
        return self.hard_in_top / self.top if self.top else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {"n_cases": self.n_cases, "n_hard": self.n_hard,
                "hard_mean_rank_percentile": self.hard_mean_rank_percentile, "top": self.top,
                "hard_in_top": self.hard_in_top, "hard_share_of_top": self.hard_share_of_top}


def hardness_summary(ranked: Sequence[MinedCase], top: int) -> HardnessSummary:
    n = len(ranked)
    hard_ranks = [m.rank for m in ranked if m.case.is_hard is True]
    percentile = aggregates.mean([(r - 0.5) / n for r in hard_ranks]) if hard_ranks else math.nan
    top = min(top, n)
    return HardnessSummary(n, len(hard_ranks), percentile, top, sum(m.case.is_hard is True for m in ranked[:top]))


def _unique_ids(mined: Sequence[MinedCase]) -> list[str]:
    """Case ids for the output file: the case's own id, prefixed with its set's name where two sets share one."""
    counts: dict[str, int] = {}
    for m in mined:
        counts[m.case.case_id] = counts.get(m.case.case_id, 0) + 1
    ids = [f"{m.scored.source}-{m.case.case_id}" if counts[m.case.case_id] > 1 else m.case.case_id for m in mined]
    if len(set(ids)) != len(ids):  # the same file given twice: number what is still equal
        ids = [f"{case_id}-{i}" for i, case_id in enumerate(ids)]
    return ids


def mined_case_set(mined: Sequence[MinedCase], *, editor: str, model: str, name: str = MINED_SET_NAME) -> CaseSet:
    """The mined cases as a case set ready for ``dump_cases``: ids kept (unique), the score in the metadata,
    so the file replays with ``--cases FILE`` and still says why each case is in it."""
    cases = []
    for m, case_id in zip(mined, _unique_ids(mined)):
        notes: dict[str, Any] = {"mined_rank": m.rank, "mined_from": m.scored.source, "mined_editor": editor,
                                 "mined_model": model}
        for key, value in (("mined_denominator", m.scored.denominator),
                           ("mined_median_ratio", m.median_ratio),
                           ("mined_key_cosine", m.scored.get("key_cosine"))):
            if math.isfinite(value):  # case metadata holds finite numbers only
                notes[key] = value
        metadata = {**dict(m.case.metadata), **notes}
        cases.append(EditCase(
            case_id=case_id, subject=m.case.subject, prompt=m.case.prompt, target_new=m.case.target_new,
            ground_truth=m.case.ground_truth, paraphrase_prompts=m.case.paraphrase_prompts,
            neighborhood=m.case.neighborhood, metadata=metadata, is_hard=m.case.is_hard,
        ))
    return CaseSet(name=name, cases=tuple(cases), source=f"mined from {model} by {editor}", format="canonical")


# --------------------------------------------------------------------------------------------------
# Model I/O through the harness


@dataclass(frozen=True)
class ConfirmedCase:
    """A full edit of a mined case, as a certification test runs it."""

    case_id: str
    certified: bool
    violations: tuple[str, ...]
    metrics: Mapping[str, float | None]
    error: str | None = None  # the edit could not be measured: "ExceptionType: message"

    def to_dict(self) -> dict[str, Any]:
        keys = ("ppl_ratio", "ppl_edited", "cf_efficacy", "cf_generalization", "cf_locality", "denominator")
        return {"case_id": self.case_id, "certified": self.certified, "violations": list(self.violations),
                "error": self.error, **{k: self.metrics.get(k) for k in keys}}


@dataclass(frozen=True)
class MiningReport:
    model: str
    identity: str
    editor: str
    case_sets: tuple[str, ...]
    mom2_adjustment: bool
    median_denominator: float
    ranked: tuple[MinedCase, ...]  # the whole pool, most dangerous first
    top: int
    confirmed: tuple[ConfirmedCase, ...] = field(default=())

    @property
    def mined(self) -> tuple[MinedCase, ...]:
        return self.ranked[: self.top]

    def summary(self) -> HardnessSummary:
        return hardness_summary(self.ranked, self.top)

    def to_dict(self) -> dict[str, Any]:
        confirmed = {c.case_id: c.to_dict() for c in self.confirmed}
        rows = []
        for m, case_id in zip(self.mined, _unique_ids(self.mined)):
            row = {"rank": m.rank, "case_id": case_id, "source": m.scored.source, "is_hard": m.case.is_hard,
                   "subject": m.case.subject, "prompt": m.case.prompt, "target_new": m.case.target_new,
                   "denominator": m.scored.denominator,
                   "raw_denominator": m.scored.get("raw_denominator"),
                   "key_cosine": m.scored.get("key_cosine"), "median_ratio": m.median_ratio}
            if case_id in confirmed:
                row["confirm"] = confirmed[case_id]
            rows.append(row)
        return {"model": self.model, "identity": self.identity, "editor": self.editor,
                "case_sets": list(self.case_sets), "mom2_adjustment": self.mom2_adjustment,
                "n_scored": len(self.ranked), "median_denominator": self.median_denominator,
                "hardness": self.summary().to_dict(), "mined": rows}


def score_case_sets(hub: Any, model: str, editor: str, case_sets: Sequence[tuple[str, str]], *,
                    progress: bool = True) -> list[ScoredCase]:
    """Score every case of the planned ``case_sets`` (``(plan slug, name as given)`` pairs) on ``model`` by the
    editor's own ``denominator`` report, with the editor set up exactly as the hub's certification tests set it
    up (hparams, context templates, C), so the scores are the denominators those tests would report."""
    from tqdm.auto import tqdm

    from editors.base import EditRequest

    prepared = hub.prepared_editor(model, editor)
    loaded = hub.loaded(model)
    pool = [(case, given) for slug, given in case_sets for case in hub.cases(model, slug).cases]
    log.info("scoring %d cases on %s with %s", len(pool), model, editor)
    scored = []
    for case, given in tqdm(pool, desc=f"mining {model}", unit="case", disable=not progress):
        request = EditRequest(case.subject, case.prompt, case.target_new)
        measure = prepared.denominator(loaded.model, loaded.tokenizer, loaded.family, request)
        if measure is None:
            raise MiningError(f"--editor: {editor!r} reports no denominator to mine by (its denominator() is None)")
        scored.append(ScoredCase(case, given, dict(measure)))
    return scored


def confirm(hub: Any, plan: Any, mined: Sequence[MinedCase], editor: str, *, progress: bool = True
            ) -> tuple[ConfirmedCase, ...]:
    """Full edits of the mined cases through the hub, exactly as the certification tests run them. A case
    whose edit cannot be measured is recorded with its error (not certified) and the others still run: the
    cases most likely to break an editor are also the likeliest to make it raise."""
    from tqdm.auto import tqdm

    slugs = {selected.given: selected.slug for selected in plan.case_sets}
    items = {(item.case_set, item.case_id): item for item in plan.items if item.editor == editor}
    confirmed = []
    for m, case_id in tqdm(list(zip(mined, _unique_ids(mined))), desc="confirming", unit="edit",
                           disable=not progress):
        item = items[(slugs[m.scored.source], m.case.case_id)]
        outcome = hub.run(item)
        error = None
        if outcome.error is not None:
            error = f"{type(outcome.error).__name__}: {outcome.error}"
            log.warning("%s: the confirmation edit could not be measured: %s", item.test_id, error)
        confirmed.append(ConfirmedCase(case_id, outcome.certified, outcome.violations,
                                       dict(outcome.record.get("metrics", {})), error))
    return tuple(confirmed)


def mine(model: str, case_sets: Sequence[str], *, top: int, editor: str, mom2_adjustment: bool | None = None,
         ppl_corpus: str | None = None, stats_corpus: str | None = None, with_confirm: bool = False,
         progress: bool = True, on_ranked: Callable[[MiningReport], Any] | None = None) -> MiningReport:
    """Score the union of ``case_sets`` on ``model`` by ROME's denominator; optionally confirm the top ``top``.

    ``mom2_adjustment`` True turns C on (second moments over ``stats_corpus``; by default organism-wiki
    for organisms, else wikitext-103) and False turns it off (C = I), whatever the editor's hparams
    file says; None lets the file decide. ``on_ranked`` gets the scored report before any confirmation edit
    runs (the command writes its case file there, so the scores survive whatever the edits do).
    """
    from pytest_editsafety.hub import HubOptions, ModelHub
    from pytest_editsafety.plan import build_plan

    from editors.registry import available_editors

    if top < 1:
        raise MiningError(f"--top must be at least 1, got {top}")
    if editor not in available_editors():  # before a model is loaded for nothing
        raise MiningError(f"--editor: unknown editor {editor!r}; available: {', '.join(available_editors())}")
    plan = build_plan([editor], [model], list(case_sets), ppl_corpus=ppl_corpus)
    overrides = None if mom2_adjustment is None else {"mom2_adjustment": mom2_adjustment}
    # search_batch 1: the confirmation runs the mined cases in ranking order, not the plan's, so a batch of the plan's
    # next cases would search cases that never run
    hub = ModelHub(plan, HubOptions(stats_corpus=stats_corpus, editor_overrides=overrides, search_batch=1))
    slug = plan.models[0].slug
    scored = score_case_sets(hub, slug, editor, [(s.slug, s.given) for s in plan.case_sets], progress=progress)
    ranked, median = rank_cases(scored)
    report = MiningReport(
        model=model, identity=hub.loaded(slug).identity, editor=editor,
        case_sets=tuple(s.given for s in plan.case_sets),
        mom2_adjustment=bool(hub.provided(slug, editor).second_moments), median_denominator=median, ranked=ranked,
        top=min(top, len(ranked)),
    )
    if on_ranked is not None:
        on_ranked(report)
    if with_confirm:
        report = dataclasses.replace(report, confirmed=confirm(hub, plan, report.mined, editor, progress=progress))
    return report


def render_table(report: MiningReport) -> str:
    """The mined cases as a table (and the confirmation columns when there are any)."""
    from tabulate import tabulate

    data = report.to_dict()
    confirmed = bool(report.confirmed)
    score = "|uᵀk|"
    headers = ["rank", "case", "from", "hard", "prompt", score, "x median", "cos(kᵘ,k̄)"]
    if confirmed:
        headers += ["ppl ratio", "efficacy", "certified"]
    rows = []
    for row in data["mined"]:
        line = [row["rank"], row["case_id"], row["source"], "yes" if row["is_hard"] else "no",
                row["prompt"].replace("{}", row["subject"], 1), row["denominator"], row["median_ratio"],
                row["key_cosine"]]
        if confirmed:
            c = row.get("confirm", {})
            verdict = "ERROR" if c.get("error") else ("yes" if c.get("certified") else "NO")
            line += [c.get("ppl_ratio"), c.get("cf_efficacy"), verdict]
        rows.append(line)
    h = report.summary()
    head = (f"{report.model} ({report.identity}), editor {report.editor}, C "
            f"{'from text' if report.mom2_adjustment else '= I'}: {len(report.ranked)} cases of "
            f"{', '.join(report.case_sets)} scored, median {score} {report.median_denominator:.4g}; "
            f"hard cases: {h.n_hard}, {h.hard_in_top} of the top {h.top}, mean rank percentile "
            f"{h.hard_mean_rank_percentile:.2f} (0.5 = random)")
    return head + "\n" + tabulate(rows, headers=headers, floatfmt=".3g", tablefmt="github")
