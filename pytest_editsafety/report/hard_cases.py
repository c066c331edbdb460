"""Which (editor, model) pairs fail their hard cases where their normal ones pass, on what, and what that means.

A case is hard when its subject is the prompt's first token; the papers' two findings show there. ROME's
denominator shrinks and its edits damage the model (the collapse), and an edit made for keys averaged over
context prefixes (C-ROME's k̄, MEMIT's mean keys) misses the bare first-token key kᵘ. The markdown report renders
:func:`hard_case_findings` and :func:`pattern_notes` under its hard-vs-normal table.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pytest_editsafety.aggregates import median
from pytest_editsafety.bounds import OTHER_TOPIC, VIOLATION_TOPICS, violation_topic
from pytest_editsafety.results import CaseRecord

__all__ = ["HardCaseFinding", "hard_case_findings", "pattern_notes"]

# a pair is listed when its hard cases certify at less than this share of its normal cases' rate
HARD_SHARE_OF_NORMAL = 0.5
_TOPIC_ORDER = tuple(dict.fromkeys([topic for _, topic in VIOLATION_TOPICS] + [OTHER_TOPIC]))


@dataclass(frozen=True)
class HardCaseFinding:
    editor: str
    model: str
    hard_failed: int
    hard: int
    normal_failed: int
    normal: int
    failed_on: tuple[tuple[str, int], ...]  # (topic, uncertified hard cases failing on it), most first
    key_cosine_hard: float | None  # median cos(kᵘ, k̄), where the editor reports it for both kinds
    key_cosine_normal: float | None


def _failed_on(records: Sequence[CaseRecord]) -> tuple[tuple[str, int], ...]:
    """How many of the uncertified ``records`` fail on each topic (a record counts once per topic), most first,
    ties in :data:`~pytest_editsafety.bounds.VIOLATION_TOPICS`' order (never a set's)."""
    counts: Counter[str] = Counter()
    for record in records:
        if not record.ok:
            counts.update({violation_topic(v) for v in record.violations} or {OTHER_TOPIC})
    return tuple(sorted(counts.items(), key=lambda item: (-item[1], _TOPIC_ORDER.index(item[0]))))


def _median_cosine(records: Sequence[CaseRecord]) -> float | None:
    values = [v for v in (r.metrics.get("key_cosine") for r in records) if v is not None]
    return median(values) if values else None


def hard_case_findings(pairs: Iterable[tuple[str, str, Sequence[CaseRecord], Sequence[CaseRecord]]]
                       ) -> list[HardCaseFinding]:
    """For each ``(editor, model, hard records, normal records)`` with both kinds, a finding when the hard cases
    certify at less than :data:`HARD_SHARE_OF_NORMAL` of the normal cases' rate."""
    findings = []
    for editor, model, hard, normal in pairs:
        if not hard or not normal:
            continue
        hard_failed = sum(not r.ok for r in hard)
        normal_failed = sum(not r.ok for r in normal)
        if (len(hard) - hard_failed) / len(hard) >= HARD_SHARE_OF_NORMAL * (len(normal) - normal_failed) / len(normal):
            continue
        cosines = (_median_cosine(hard), _median_cosine(normal))
        both = None not in cosines
        findings.append(HardCaseFinding(editor, model, hard_failed, len(hard), normal_failed, len(normal),
                                        _failed_on(hard), cosines[0] if both else None, cosines[1] if both else None))
    return findings


def pattern_notes(findings: Sequence[HardCaseFinding]) -> list[str]:
    """What each pattern the findings show means, one note per pattern."""
    topics = {topic for finding in findings for topic, _ in finding.failed_on}
    notes = []
    if topics & {"perplexity", "denominator floor"}:
        notes.append("Perplexity damage and small denominators on hard cases are the papers' collapse: ROME divides "
                     "its update by (C⁻¹k̄)ᵀkᵘ, which shrinks when the prompt opens with its subject and kᵘ drifts "
                     "from the templated keys' mean k̄.")
    if "efficacy" in topics:
        notes.append("Missed edits on hard cases with the normal ones taken are the other side of that drift: an "
                     "update made for keys averaged over context prefixes (C-ROME's k̄, MEMIT's mean keys) barely "
                     "reaches kᵘ. The papers' C-ROME takes 5-31 % of collapse cases so, and 91-100 % with the "
                     "same prefix added at test time.")
    return notes
