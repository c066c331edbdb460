"""Certification bounds and the verdict on one edit.

A test certifies an (editor, model, case) when every bound below holds for the edited model. The defaults
come from what the collapse papers measured (DESIGN.md §7), chosen so that a collapsed edit fails by a wide
margin, a healthy edit passes with room to spare, and an editor that does nothing fails too.

``judge`` reads a case's metrics by these keys (the same keys a ``CaseRecord`` stores):

* ``ppl_ratio``: the edited model's paper-compatible perplexity (mean of per-sentence ppl) over the
  unedited model's, on the same corpus;
* ``ppl_edited``: the edited model's paper-compatible perplexity itself, for the absolute collapse line;
* ``denominator``: ROME's ``|uᵀk|`` (absent or ``None`` for editors without one: MEMIT, FT, MEND);
* efficacy / generalization / locality under the family's own keys (``METRIC_FAMILIES``):
  ``counterfact`` reads ``cf_efficacy``, ``cf_generalization``, ``cf_locality``; ``easyedit`` reads
  ``ee_rewrite_acc``, ``ee_rephrase_acc``, ``ee_locality``; ``generation`` reads ``gen_efficacy``,
  ``gen_generalization``, ``gen_locality`` (what greedy decoding says). All are shares in [0, 1];
* ``downstream_<task>_drop``: a downstream task's unedited minus edited score, bounded by ``max_downstream_drop``.

A metric that is NaN or infinite is always a violation: a collapsed model produces exactly such numbers,
and a comparison against NaN that is silently false would certify it.

Pure Python: no torch, imported by the plugin at startup.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

__all__ = [
    "METRIC_FAMILIES",
    "Bounds",
    "BoundsError",
    "FamilyKeys",
    "Verdict",
    "format_number",
    "judge",
    "violation_topic",
]


class BoundsError(ValueError):
    """A bound has a bad name, type or value; the message names the field."""


@dataclass(frozen=True)
class FamilyKeys:
    """Which metric keys hold efficacy, generalization and locality for one metric family."""

    efficacy: str
    generalization: str
    locality: str


METRIC_FAMILIES: Mapping[str, FamilyKeys] = MappingProxyType(
    {
        # CounterFact (ROME/MEMIT papers): P(o*) > P(o) on the rewrite prompt / on paraphrases; locality is
        # the share of neighborhood prompts where P(o) > P(o*) still holds.
        "counterfact": FamilyKeys("cf_efficacy", "cf_generalization", "cf_locality"),
        # EasyEdit: teacher-forced token accuracy of the target on the rewrite prompt / on paraphrases;
        # locality is the share of neighborhood tokens whose argmax is unchanged.
        "easyedit": FamilyKeys("ee_rewrite_acc", "ee_rephrase_acc", "ee_locality"),
        # Generation: greedy decoding says o* (as a whole word) on the rewrite prompt / on paraphrases; locality
        # is the share of neighbourhood prompts whose greedy continuation is the unedited model's.
        "generation": FamilyKeys("gen_efficacy", "gen_generalization", "gen_locality"),
    }
)


def format_number(x: float) -> str:
    """A number for a human: ``23.4``, ``1000``, ``1.2e4``, ``0.031``; ``nan``/``inf`` spelled out.

    Three significant digits, whole numbers from 100 to 9999, a compact exponent from 10,000 up (the
    papers' collapsed perplexities span 1e3 to 1e11).
    """
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if 100 <= abs(x) < 9999.5:
        return f"{x:.0f}"
    text = f"{x:.3g}"
    return re.sub(r"e([+-])0*(\d)", lambda m: "e" + ("-" if m.group(1) == "-" else "") + m.group(2), text)


def _percent(x: float) -> str:
    return f"{format_number(100.0 * x)} %"


@dataclass(frozen=True)
class Bounds:
    """What a single edit must satisfy to be certified. Every field is an option/ini setting."""

    # Edited over unedited paper-compatible perplexity. The papers' collapsed edits are >= 15x the baseline
    # (GPT-2-XL 68.39 -> 179,837.93 on ME-PPL_50, i.e. ~2,600x); healthy edits stay within ~1.1x (C-ROME on
    # GPT-2-XL: max 70.71 vs 68.77 unedited = 1.03x). 1.5x sits far from both.
    max_ppl_ratio: float = 1.5
    # The papers' absolute line for models whose baseline is 37-70: above it the model has "collapsed".
    # Reported as collapse (a violation of its own); ``inf`` disables it for models whose baseline is higher.
    collapse_ppl: float = 1000.0
    # ROME-family |uᵀk| must be at least this fraction of the median over the model's normal cases (the
    # harness computes the median once per model). Papers: collapse 0.01-0.04 vs normal 2.6-12.8, a ~100x
    # gap, so 0.1x the median catches collapse while normal cases (spread well within 10x) pass. 0 disables.
    min_denominator_fraction: float = 0.1
    # An absolute floor on |uᵀk| (e.g. from the editor's hparams); None = only the model-derived floor.
    min_denominator_abs: float | None = None
    # Share of rewrite prompts where the edit takes. A no-op editor is perfectly "safe" and must fail here;
    # the papers' ROME reaches 99.9-100 % (CounterFact ES) and C-ROME + prefix 91-100 % on hard cases.
    min_efficacy: float = 0.8
    # Paraphrase success. Off by default: C-ROME + prefix keeps only 17-33 % on hard cases, which is a
    # known weakness of the method, not a safety problem.
    min_generalization: float = 0.0
    # Neighborhood prompts that must keep their true object. Papers: ROME 75-79 % (CounterFact NS), MEND
    # 38 %, C-ROME + prefix 89-100 %. 50 % fails an edit that rewrites its neighbours wholesale.
    min_locality: float = 0.5
    # Which family of efficacy / generalization / locality the three share bounds read.
    metric_family: str = "counterfact"
    # Largest drop of any downstream task's score (--editsafety-downstream; unedited minus edited, in the task's
    # own units: a share for accuracy); None = recorded, not bounded.
    max_downstream_drop: float | None = None

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> BoundsError:
            return BoundsError(f"bound {name!r}: {why} (got {getattr(self, name)!r})")

        if not (math.isfinite(self.max_ppl_ratio) and self.max_ppl_ratio > 0):
            raise bad("max_ppl_ratio", "must be a finite number > 0")
        if math.isnan(self.collapse_ppl) or self.collapse_ppl <= 0:
            raise bad("collapse_ppl", "must be a number > 0 (inf disables the collapse line)")
        if not (math.isfinite(self.min_denominator_fraction) and self.min_denominator_fraction >= 0):
            raise bad("min_denominator_fraction", "must be a finite number >= 0")
        if self.min_denominator_abs is not None and not (
            math.isfinite(self.min_denominator_abs) and self.min_denominator_abs >= 0
        ):
            raise bad("min_denominator_abs", "must be a finite number >= 0 or None")
        if self.max_downstream_drop is not None and not (
            math.isfinite(self.max_downstream_drop) and self.max_downstream_drop >= 0
        ):
            raise bad("max_downstream_drop", "must be a finite number >= 0 or None")
        for name in ("min_efficacy", "min_generalization", "min_locality"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise bad(name, "must be a share between 0 and 1")
        if self.metric_family not in METRIC_FAMILIES:
            raise bad("metric_family", f"must be one of {', '.join(sorted(METRIC_FAMILIES))}")

    @property
    def family_keys(self) -> FamilyKeys:
        return METRIC_FAMILIES[self.metric_family]

    def relative_denominator_floor(self, normal_median: float | None) -> float | None:
        """The model-derived floor: ``min_denominator_fraction`` × the median |uᵀk| over normal cases.

        None when there is no usable reference (no normal cases, a non-finite median) or the fraction is 0.
        """
        if normal_median is None or not math.isfinite(normal_median) or self.min_denominator_fraction == 0:
            return None
        return self.min_denominator_fraction * abs(normal_median)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Bounds:
        """Bounds from a mapping of field names; missing fields keep their defaults.

        Numbers may be given as strings (ini files and command lines hold strings; JSON spells non-finite
        numbers ``"inf"``); ``min_denominator_abs`` and ``max_downstream_drop`` also take ``None``, ``""`` or
        ``"none"``.
        """
        if not isinstance(data, Mapping):
            raise BoundsError(f"bounds must be a mapping of field names, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in data if k not in fields)
        if unknown:
            raise BoundsError(f"unknown bound(s) {', '.join(map(repr, unknown))}; known: {', '.join(fields)}")
        values: dict[str, Any] = {}
        for name, raw in data.items():
            if name == "metric_family":
                if not isinstance(raw, str):
                    raise BoundsError(f"bound 'metric_family': expected a string, got {type(raw).__name__}")
                values[name] = raw.strip().lower()
            elif name in ("min_denominator_abs", "max_downstream_drop") and (
                raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", "none"))
            ):
                values[name] = None
            else:
                values[name] = _coerce_float(name, raw)
        return cls(**values)


def _coerce_float(name: str, raw: Any) -> float:
    # bool is an int subclass; True as a ratio bound is a mistake, not 1.0
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise BoundsError(f"bound {name!r}: expected a number, got {type(raw).__name__} {raw!r}")
    try:
        return float(raw)
    except ValueError:
        raise BoundsError(f"bound {name!r}: expected a number, got {raw!r}") from None


@dataclass(frozen=True)
class Verdict:
    """The certificate for one edit: certified when nothing is violated; ``collapse`` flags the papers' line."""

    certified: bool
    collapse: bool
    violations: tuple[str, ...]


def _metric(metrics: Mapping[str, float | None], key: str) -> float | None:
    raw = metrics.get(key)
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise TypeError(f"metric {key!r} must be a number or None, got {type(raw).__name__} {raw!r}")
    return float(raw)


def judge(
    bounds: Bounds,
    record_metrics: Mapping[str, float | None],
    *,
    denominator_floor: float | None,
) -> Verdict:
    """Check one edited model's metrics against ``bounds``; every violation is listed, none short-circuits.

    ``denominator_floor`` is the model-derived floor (``bounds.relative_denominator_floor(median)``, computed
    once per model by the harness) or None; the binding floor is the larger of it and
    ``bounds.min_denominator_abs``. Metric keys are described in the module docstring.
    """
    violations: list[str] = []

    ppl_edited = _metric(record_metrics, "ppl_edited")
    ratio = _metric(record_metrics, "ppl_ratio")
    ppl_unedited = _metric(record_metrics, "ppl_unedited")
    # a model already above the line before any edit (a wrong tokenizer, an untrained model) says nothing of the
    # edit: the line cannot judge it, and the record says so rather than blaming the editor for a collapse
    line_blind = ppl_unedited is not None and math.isfinite(ppl_unedited) and ppl_unedited > bounds.collapse_ppl
    # a NaN or infinite edited perplexity is what a collapsed model yields, whatever the line says
    collapse = ppl_edited is not None and (not math.isfinite(ppl_edited)
                                           or (ppl_edited > bounds.collapse_ppl and not line_blind))
    collapse_note = ""
    if collapse and ppl_edited is not None:
        collapse_note = (
            f"collapse: edited ppl {format_number(ppl_edited)} > {format_number(bounds.collapse_ppl)}"
            if math.isfinite(ppl_edited)
            else f"collapse: edited ppl is {format_number(ppl_edited)}"
        )

    ratio_violated = False
    bound_text = f"{format_number(bounds.max_ppl_ratio)}x"
    if ratio is None:
        violations.append("perplexity ratio was not measured")
    elif math.isnan(ratio) or ratio == -math.inf:
        ratio_violated = True
        violations.append(
            f"perplexity ratio is {format_number(ratio)}, not a finite number (bound {bound_text})"
            + (f" ({collapse_note})" if collapse_note else "")
        )
    elif ratio > bounds.max_ppl_ratio:  # +inf lands here too
        ratio_violated = True
        shown = f"{format_number(ratio)}x" if math.isfinite(ratio) else format_number(ratio)
        violations.append(
            f"perplexity ratio {shown} exceeds the bound {bound_text}"
            + (f" ({collapse_note})" if collapse_note else "")
        )
    if ppl_edited is None:
        violations.append("edited perplexity was not measured")
    elif collapse and not ratio_violated:
        # e.g. an unedited model already near the line: the ratio holds but the absolute line does not
        violations.append(collapse_note)
    if line_blind:
        violations.append(
            f"the unedited model's perplexity {format_number(ppl_unedited)} is already above the collapse line "
            f"{format_number(bounds.collapse_ppl)}, which cannot judge an edit of it: check the model's tokenizer "
            f"and perplexity corpus, or set --editsafety-collapse-ppl above it (inf turns the line off)")

    violations.extend(_denominator_violations(bounds, record_metrics, denominator_floor))

    keys = bounds.family_keys
    for label, key, minimum in (
        ("efficacy", keys.efficacy, bounds.min_efficacy),
        ("generalization", keys.generalization, bounds.min_generalization),
        ("locality", keys.locality, bounds.min_locality),
    ):
        value = _metric(record_metrics, key)
        if value is None:
            if minimum > 0:
                violations.append(f"{label} ({key}) was not measured (bound {_percent(minimum)})")
        elif not math.isfinite(value):
            violations.append(f"{label} ({key}) is {format_number(value)}, not a finite share")
        elif value < minimum:
            violations.append(f"{label} {_percent(value)} ({key}) is below the bound {_percent(minimum)}")

    violations.extend(_downstream_violations(bounds, record_metrics))
    return Verdict(certified=not violations, collapse=collapse, violations=tuple(violations))


_DOWNSTREAM_DROP = re.compile(r"^downstream_(?P<task>.+)_drop$")


def _downstream_violations(bounds: Bounds, metrics: Mapping[str, float | None]) -> list[str]:
    """Each downstream task whose score dropped by more than the bound, or whose drop is not a number."""
    if bounds.max_downstream_drop is None:
        return []
    out = []
    for key in sorted(metrics):
        match = _DOWNSTREAM_DROP.match(key)
        drop = _metric(metrics, key) if match else None
        if match is None or drop is None:
            continue
        task = match.group("task")
        if not math.isfinite(drop):
            out.append(f"downstream task {task}: the drop is {format_number(drop)}, not a finite number")
        elif drop > bounds.max_downstream_drop:
            out.append(f"downstream task {task}: the score dropped by {format_number(drop)}, more than the bound "
                       f"{format_number(bounds.max_downstream_drop)}")
    return out


def _denominator_violations(
    bounds: Bounds, metrics: Mapping[str, float | None], relative_floor: float | None
) -> list[str]:
    denominator = _metric(metrics, "denominator")
    if denominator is None:  # editors without a rank-one denominator
        return []
    if not math.isfinite(denominator):
        return [f"ROME denominator |uᵀk| is {format_number(denominator)}, not a finite number"]
    if relative_floor is not None and not math.isfinite(relative_floor):
        raise ValueError(f"denominator_floor must be finite or None, got {relative_floor!r}")
    candidates = []
    if relative_floor is not None:
        candidates.append(
            (relative_floor, f"{format_number(bounds.min_denominator_fraction)} × the median over the model's normal cases")
        )
    if bounds.min_denominator_abs is not None:
        candidates.append((bounds.min_denominator_abs, "absolute floor"))
    if not candidates:
        return []
    floor, origin = max(candidates, key=lambda c: c[0])
    # the papers report |uᵀk|; take the magnitude so a signed value from an editor is judged the same way
    if abs(denominator) < floor:
        return [
            f"ROME denominator |uᵀk| {format_number(abs(denominator))} is below the floor "
            f"{format_number(floor)} ({origin})"
        ]
    return []


# What a violation is about, by the start of the text :func:`judge` (and the hub, for an error) words it: records
# keep violations as plain strings, so this is where their wording and their reading stay together.
VIOLATION_TOPICS = (("error", "error"), ("perplexity", "perplexity"), ("edited perplexity", "perplexity"),
                    ("collapse", "perplexity"), ("ROME denominator", "denominator floor"), ("efficacy", "efficacy"),
                    ("generalization", "generalization"), ("locality", "locality"), ("downstream", "downstream"))
OTHER_TOPIC = "other"


def violation_topic(violation: str) -> str:
    """The topic of :data:`VIOLATION_TOPICS` ``violation`` is about (:data:`OTHER_TOPIC` for none)."""
    return next((topic for start, topic in VIOLATION_TOPICS if violation.startswith(start)), OTHER_TOPIC)
