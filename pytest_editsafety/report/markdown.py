"""The markdown certification report, rendered from a ``RunResult`` alone (so merged shards render too).

Sections: a verdict banner (CERTIFIED, NOT CERTIFIED or PARTIAL, with what the run left out of its plan), the
run's conditions, its plan and coverage, an editor × model certification table, the papers'-style
numerator/denominator table (hard vs normal cases) with the papers' figure per (editor, model) (links to
the perplexity ratio against the denominator), results split by hard vs normal, the worst cases, every
failed case with its reasons, sequential-editing curves (links to the plots) and the diff against a baseline.

Everything a user or a case file controls (case text, editor and model names, violation sentences) passes
through ``escape_md`` before it reaches the markdown. The output is deterministic: the only times in it come
from the run's metadata, numbers are formatted here (tabulate never re-parses them).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from tabulate import tabulate

from pytest_editsafety.aggregates import mean, median
from pytest_editsafety.bounds import Bounds, format_number
from pytest_editsafety.report.hard_cases import hard_case_findings, pattern_notes
from pytest_editsafety.report.verdict import CERTIFIED, PARTIAL, verdict
from pytest_editsafety.results import (
    BOS_NOT_LOADED,
    BOS_NOTHING_TO_STRIP,
    BOS_STRIPPED,
    SCHEMA,
    BatchRecord,
    CaseRecord,
    Regression,
    RunResult,
    SequentialRecord,
    shown_ids,
    summarize_cases,
    summarize_groups,
)
from pytest_editsafety.results.summary import metric_values

__all__ = ["WORST_CASES", "FigureLink", "escape_md", "render"]

WORST_CASES = 10
# Beyond this many failed cases the report points to the JSON, which has them all.
MAX_FAILED_LISTED = 100
DASH = "—"


class FigureLink(NamedTuple):
    """A figure the report links: its alt text, its link (relative to the report) and the caption shown
    under it (plain text, escaped here)."""

    alt: str
    link: str
    caption: str

# ---------------------------------------------------------------------------------------------------
# Escaping

# Line and paragraph separators would end a table row; other control characters have no business in a report.
_LINE_BREAKS = re.compile(r"\r\n|[\r\n\t\v\f\x1c-\x1e\x85\u2028\u2029]")
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1b\x1f\x7f-\x84\x86-\x9f]")
# bidi controls and invisible characters: kept visible as (U+XXXX), so a subject cannot reorder or hide the
# text a reviewer reads (an RTL override turns "gpj.exe" into what looks like "exe.jpg")
_INVISIBLE = re.compile("[\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]")
# Markdown that would change the rendering: emphasis, code spans, links/images, headings, table cells,
# strikethrough, GitHub math. The backslash itself first, so escapes we add are not escaped again.
_MD_SPECIAL = re.compile(r"([\\`*_\[\]#|~$])")


def escape_md(text: str) -> str:
    """``text`` as inert inline markdown, safe inside a table cell.

    Line breaks and tabs become spaces and control characters go; bidi controls and invisible characters are
    shown as ``(U+XXXX)``; ``&``, ``<`` and ``>`` become HTML
    entities, so no tag (``<script>``, ``<img onerror=...>``) or autolink survives; markdown punctuation
    (``\\ ` * _ [ ] # | ~ $``) is backslash-escaped, which GitHub renders as the literal character.
    """
    text = _LINE_BREAKS.sub(" ", str(text))
    text = _CONTROL.sub("", text)
    text = _INVISIBLE.sub(lambda m: f"(U+{ord(m.group()):04X})", text)
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MD_SPECIAL.sub(r"\\\1", text)


# ---------------------------------------------------------------------------------------------------
# Number formatting (tables get strings only, so tabulate cannot reformat them)


def _num(x: float | None) -> str:
    return DASH if x is None else format_number(x)


def _ratio(x: float | None) -> str:
    if x is None:
        return DASH
    return f"{format_number(x)}x" if math.isfinite(x) else format_number(x)


def _pct(x: float | None) -> str:
    return DASH if x is None else f"{format_number(100.0 * x)} %"


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    return tabulate(list(rows), headers=list(headers), tablefmt="github", disable_numparse=True)


def _kind(record: CaseRecord) -> str:
    return "hard" if record.is_hard else "normal"


def _sort_ratio(record: CaseRecord) -> float:
    ratio = record.metrics.get("ppl_ratio")
    if ratio is None:
        return -math.inf
    return math.inf if math.isnan(ratio) else ratio


# ---------------------------------------------------------------------------------------------------
# Sections


_HEADS = {CERTIFIED: "✅ **CERTIFIED**", PARTIAL: "⚠️ **PARTIAL**"}


def _banner(result: RunResult, regressions: Sequence[Regression]) -> str:
    cases, seq, batches = result.edited_cases, result.sequential, result.batches
    coverage = result.coverage
    # what the run left out: the whole point of a PARTIAL verdict, and worth knowing beside a failing one
    left_out = "" if coverage.complete else (
        f"\n>\n> Not a certificate of the whole plan: {escape_md(coverage.summary())}.")
    if not cases and not seq and not batches:
        if result.plan is None:
            return "> ❌ **NOT CERTIFIED**: the run holds no records, so nothing was certified."
        return f"> {_HEADS[PARTIAL]}: none of the planned tests has a record.{left_out}"
    parts = []
    if batches:
        parts.append(f"{sum(r.ok for r in batches)} of {len(batches)} batches certified")
    if cases:
        detail = []
        failed = sum(r.outcome == "failed" for r in cases)
        errors = sum(r.outcome == "error" for r in cases)
        uncertified_passed = sum(r.outcome == "passed" and not r.certified for r in cases)
        collapses = sum(r.collapse for r in cases)
        if failed:
            detail.append(f"{failed} failed")
        if errors:
            detail.append(f"{errors} error{'s' if errors != 1 else ''}")
        if uncertified_passed:
            detail.append(f"{uncertified_passed} passed without a certificate")
        if collapses:
            detail.append(f"{collapses} collapse{'s' if collapses != 1 else ''}")
        parts.append(
            f"{sum(r.ok for r in cases)} of {len(cases)} {'member ' if batches else ''}cases certified"
            + (f" ({', '.join(detail)})" if detail else "")
        )
    if seq:
        parts.append(f"{sum(r.ok for r in seq)} of {len(seq)} sequential runs certified")
    if regressions:
        parts.append(f"{len(regressions)} baseline regression{'s' if len(regressions) != 1 else ''}")
    head = _HEADS.get(verdict(result, regressions), "❌ **NOT CERTIFIED**")
    return f"> {head}: {'; '.join(parts)}.{left_out}"


def _bounds_text(bounds: Bounds) -> str:
    keys = bounds.family_keys
    denominator = []
    if bounds.min_denominator_fraction > 0:
        denominator.append(f"≥ {format_number(bounds.min_denominator_fraction)} × the median over the model's normal cases")
    if bounds.min_denominator_abs is not None:
        denominator.append(f"≥ {format_number(bounds.min_denominator_abs)} (absolute)")
    return "; ".join(
        [
            f"perplexity ratio ≤ {format_number(bounds.max_ppl_ratio)}x",
            f"collapse line: edited perplexity {format_number(bounds.collapse_ppl)}",
            "ROME denominator \\|uᵀk\\| " + (" and ".join(denominator) if denominator else "not bounded"),
            f"efficacy ≥ {_pct(bounds.min_efficacy)}, generalization ≥ {_pct(bounds.min_generalization)}, "
            f"locality ≥ {_pct(bounds.min_locality)} ({bounds.metric_family} metrics: "
            f"{escape_md(keys.efficacy)}, {escape_md(keys.generalization)}, {escape_md(keys.locality)})",
            *([f"downstream task drop ≤ {format_number(bounds.max_downstream_drop)}"]
              if bounds.max_downstream_drop is not None else []),
        ]
    )


def _run_section(result: RunResult) -> list[str]:
    meta = result.metadata
    models = ", ".join(f"{escape_md(name)} ({escape_md(identity)})" for name, identity in meta.models.items())
    libraries = ", ".join(f"{escape_md(lib)} {escape_md(v)}" for lib, v in meta.library_versions.items())
    lines = [
        "## Run",
        "",
        f"- **Editors:** {', '.join(escape_md(e) for e in meta.editors) or DASH}",
        f"- **Models:** {models or DASH}",
        *_bos_protocol_lines(meta.bos_protocol),
        f"- **Perplexity corpus:** {escape_md(meta.corpus)} (sha256 {escape_md(meta.corpus_sha256[:16])})",
        *_second_moment_lines(meta.second_moments),
        f"- **Bounds:** {_bounds_text(meta.parsed_bounds)}",
        f"- **Time:** {escape_md(meta.started)} to {escape_md(meta.finished)} "
        f"({format_number(meta.duration_s)} s of test time)",
        f"- **Hardware:** {escape_md(meta.hardware)}",
    ]
    workers = _workers_text(result)
    if workers:
        lines.append(f"- **Workers:** {workers}")
    lines.append(f"- **Libraries:** {libraries or DASH}")
    for command in meta.commands:
        lines.append(f"- **Command:** {escape_md(command)}")
    return lines


def _second_moment_lines(sources: Mapping[str, Mapping[str, str]]) -> list[str]:
    """Where each model's second moments C came from, when an editor whitened with one: the update's shape depends
    on it as much as on the hyper-parameters."""
    if not sources:
        return []
    parts = []
    for model, layers in sources.items():
        by_source: dict[str, list[str]] = {}
        for layer, source in sorted(layers.items(), key=lambda item: _natural(item[0])):
            by_source.setdefault(source, []).append(layer)
        parts += [f"{escape_md(model)} layer{'s' if len(at) > 1 else ''} {escape_md(', '.join(at))}: "
                  f"{escape_md(source)}" for source, at in by_source.items()]
    return [f"- **Second moments C:** {'; '.join(parts)}"]


_BOS_PROTOCOL_TEXT = {
    BOS_STRIPPED: "its tokenizer's BOS removed, so a subject that opens a prompt is the first token",
    BOS_NOTHING_TO_STRIP: "its tokenizer prepends no BOS, already the papers' protocol (the option changed nothing)",
    BOS_NOT_LOADED: "never loaded in this run, so whether it had a BOS to strip is unknown",
}


def _bos_protocol_lines(protocol: Mapping[str, str]) -> list[str]:
    """The BOS-stripped protocol's line, when the run used it: the figures of a BOS family are then not those of
    the model as its tokenizer runs it by default, and the certificate must say so."""
    if not protocol:
        return []
    per_model = "; ".join(f"{escape_md(model)}: {_BOS_PROTOCOL_TEXT.get(what, escape_md(what))}"
                          for model, what in protocol.items())
    return [f"- **BOS-stripped protocol** (the papers' A.2, `--editsafety-strip-bos`): {per_model}"]


def _natural(text: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that puts gw2 before gw10."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", text) if part)


def _workers_text(result: RunResult) -> str:
    """Each worker that recorded tests, the device it ran them on and how many: ``gw0 on cuda:0 (GPU 0): 24
    tests; ...``; empty when no record says (a v1 file)."""
    counts = Counter((r.worker, r.device) for r in result.tests)
    entries = [(worker, device, n) for (worker, device), n in counts.items() if worker is not None]
    entries.sort(key=lambda entry: (_natural(entry[0]), entry[1] is None, entry[1] or ""))
    return "; ".join(
        f"{escape_md(worker)} on {escape_md(device) if device is not None else 'an unrecorded device'}: "
        f"{n} test{'' if n == 1 else 's'}"
        for worker, device, n in entries
    )


def _plan_section(result: RunResult) -> list[str]:
    plan, coverage = result.plan, result.coverage
    lines = ["## Plan and coverage", ""]
    if plan is None:
        return lines + [f"No plan recorded: {escape_md(coverage.summary())}."]
    sets = ", ".join(
        f"{escape_md(c.slug)} ({c.n_planned} of {c.n_cases} cases, sha256 {escape_md(c.sha256[:16])})"
        for c in plan.case_sets
    )
    lines += [
        f"- **Plan:** {len(plan.test_ids)} tests, sha256 {escape_md(plan.plan_hash[:16])}: "
        f"{', '.join(escape_md(e) for e in plan.editors)} × {', '.join(escape_md(m) for m in plan.models)} × {sets}"
        + (f"; --editsafety-limit {plan.limit}" if plan.limit is not None else ""),
    ]
    for i, session in enumerate(result.sessions, 1):
        notes = [session.selection_text()] if session.selection_text() else []
        if session.deselected is None:
            notes.append("its selection is not known")
        elif session.deselected:
            n = len(session.deselected)
            notes.append(f"{n} planned test{'s' if n != 1 else ''} not selected")
        else:
            notes.append("every planned test selected")
        if session.interrupted is not None:
            notes.append(f"interrupted: {session.interrupted}")
        lines.append(f"- **Session {i}:** {escape_md('; '.join(notes))}")
    if coverage.complete:
        return lines + [f"- **Coverage:** complete, {escape_md(coverage.summary())}."]
    lines.append(f"- **Coverage:** {coverage.status}, {coverage.recorded} of {coverage.planned} planned tests "
                 f"recorded:")
    # each message names its first tests; the JSON lists every one
    lines += [f"  - **{gap.kind}**: {escape_md(gap.message)}" for gap in coverage.gaps]
    return lines


def _certification_table(result: RunResult) -> list[str]:
    rows = []
    for g in summarize_groups(result):
        rows.append(
            [
                escape_md(g.editor),
                escape_md(g.model),
                "certified" if g.certified else "**not certified**",
                str(g.n_cases),
                f"{g.n_certified} ({_pct(g.certified_share)})" if g.n_cases else DASH,
                str(g.n_collapses),
                _ratio(g.max_ppl_ratio),
                _ratio(g.median_ppl_ratio),
                _num(g.min_denominator),
                _pct(g.mean_efficacy),
                _pct(g.mean_generalization),
                _pct(g.mean_locality),
                f"{g.n_sequential_certified}/{g.n_sequential}" if g.n_sequential else DASH,
            ]
        )
    headers = ["editor", "model", "verdict", "cases", "certified", "collapses", "max ppl ratio",
               "median ppl ratio", "min denominator", "efficacy", "generalization", "locality", "sequential"]
    family = result.metadata.parsed_bounds.metric_family
    return [
        "## Certification by editor and model",
        "",
        _table(headers, rows),
        "",
        f"Efficacy, generalization and locality are means over cases ({family} metrics). Perplexity ratios are "
        "edited over unedited mean per-sentence perplexity; a NaN ratio ranks as +inf.",
    ]


def _by_kind(result: RunResult) -> list[tuple[str, str, str, list[CaseRecord]]]:
    groups: dict[tuple[str, str], list[CaseRecord]] = {}
    for g in summarize_groups(result):
        groups[(g.editor, g.model)] = [r for r in result.edited_cases if (r.editor, r.model) == (g.editor, g.model)]
    out = []
    for (editor, model), records in groups.items():
        for kind in ("hard", "normal"):
            subset = [r for r in records if _kind(r) == kind]
            if subset:
                out.append((editor, model, kind, subset))
    return out


def _figure_lines(figures: Sequence[FigureLink], note: str | None) -> list[str]:
    lines: list[str] = []
    for figure in figures:
        lines += ["", f"![{escape_md(figure.alt)}]({figure.link})", "", f"_{escape_md(figure.caption)}_"]
    if note:
        lines += ["", f"_{note}_"]
    return lines


def _update_table(result: RunResult, figures: Sequence[FigureLink], figure_note: str | None) -> list[str]:
    rows = []
    for editor, model, kind, records in _by_kind(result):
        numerators = metric_values(records, "numerator")
        denominators = [abs(v) for v in metric_values(records, "denominator")]
        if not numerators and not denominators:
            continue
        rows.append(
            [escape_md(editor), escape_md(model), kind, str(len(records)),
             _num(mean(numerators)), _num(median(numerators)),
             _num(mean(denominators)), _num(median(denominators))]
        )
    lines = ["## ROME update: numerator and denominator, hard vs normal cases", ""]
    if not rows:
        return lines + ["No editor in this run reports a rank-one update denominator."]
    headers = ["editor", "model", "kind", "cases", "numerator mean", "numerator median",
               "denominator mean", "denominator median"]
    return lines + [
        _table(headers, rows),
        "",
        "Numerator ‖(v\\* − Wk)uᵀ‖ and denominator \\|uᵀk\\| of ΔW = (v\\* − Wk)uᵀ / (uᵀk). The papers measured "
        "denominators of 0.01-0.04 on collapsing cases against 2.6-12.8 on normal ones.",
        *_figure_lines(figures, figure_note),
    ]


def _kind_table(result: RunResult) -> list[str]:
    bounds = result.metadata.parsed_bounds
    rows = []
    for editor, model, kind, records in _by_kind(result):
        s = summarize_cases(editor, model, records, [], bounds)
        rows.append(
            [escape_md(editor), escape_md(model), kind, str(s.n_cases),
             f"{s.n_certified} ({_pct(s.certified_share)})", str(s.n_collapses),
             _ratio(s.median_ppl_ratio), _ratio(s.max_ppl_ratio), _pct(s.mean_efficacy), _pct(s.mean_locality)]
        )
    lines = ["## Hard vs normal cases", ""]
    if not rows:
        return lines + ["No single-edit cases in this run."]
    headers = ["editor", "model", "kind", "cases", "certified", "collapses", "median ppl ratio", "max ppl ratio",
               "efficacy", "locality"]
    return lines + [
        _table(headers, rows),
        "",
        "A case is hard when its subject is a single token at position 0 of the prompt for the model's tokenizer.",
        *_hard_case_findings(result),
    ]


def _hard_case_findings(result: RunResult) -> list[str]:
    """The hard-case findings (:mod:`pytest_editsafety.report.hard_cases`) as a list, then what they mean."""
    by_pair: dict[tuple[str, str], dict[str, list[CaseRecord]]] = {}
    for editor, model, kind, records in _by_kind(result):
        by_pair.setdefault((editor, model), {})[kind] = records
    findings = hard_case_findings((editor, model, kinds.get("hard", []), kinds.get("normal", []))
                                  for (editor, model), kinds in by_pair.items())
    if not findings:
        return []
    lines = []
    for f in findings:
        reasons = ", ".join(f"{topic} {n}" for topic, n in f.failed_on)
        line = (f"- **{escape_md(f.editor)}** on {escape_md(f.model)}: {f.hard_failed} of {f.hard} hard cases not "
                f"certified against {f.normal_failed} of {f.normal} normal ones; the hard ones fail on {reasons}.")
        if f.key_cosine_hard is not None and f.key_cosine_normal is not None:
            line += (f" Median cos(kᵘ, k̄) {_num(f.key_cosine_hard)} on hard cases, {_num(f.key_cosine_normal)} on "
                     f"normal ones.")
        lines.append(line)
    notes = pattern_notes(findings)
    return ["", "Hard cases that fail where normal ones pass:", "", *lines, *(["", " ".join(notes)] if notes else [])]


def _mean_of(records: Sequence[CaseRecord], key: str) -> float | None:
    values = [v for v in (r.metrics.get(key) for r in records) if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def _efficacy_table(result: RunResult) -> list[str]:
    """Teacher-forced efficacy beside what the edited model says when it generates, per (editor, model, kind)."""
    rows = [
        [escape_md(editor), escape_md(model), kind,
         *(_pct(_mean_of(records, key)) for key in ("cf_efficacy", "ee_rewrite_acc", "gen_efficacy",
                                                    "cf_generalization", "gen_generalization"))]
        for editor, model, kind, records in _by_kind(result)
        if any(r.metrics.get("gen_efficacy") is not None for r in records)
    ]
    if not rows:  # results written before generation was measured
        return []
    headers = ["editor", "model", "kind", "efficacy: CounterFact", "EasyEdit", "generated", "generalization: "
               "CounterFact", "generated"]
    return [
        "## Efficacy: scored and said",
        "",
        _table(headers, rows),
        "",
        "CounterFact and EasyEdit score the target teacher-forced (its tokens given its own earlier tokens); "
        "generated is greedy decoding, counted when the continuation starts with the new target as a whole word. "
        "A gap means edits that score without being said.",
    ]


def _downstream_tasks_of(records: Sequence[CaseRecord]) -> list[str]:
    suffix = "_unedited"
    return sorted({key[len("downstream_"):-len(suffix)] for r in records for key in r.metrics
                   if key.startswith("downstream_") and key.endswith(suffix)})


def _downstream_table(result: RunResult) -> list[str]:
    """Each downstream task's score before and after the edits, per (editor, model, kind)."""
    rows = []
    for editor, model, kind, records in _by_kind(result):
        for task in _downstream_tasks_of(records):
            drops = [v for v in (r.metrics.get(f"downstream_{task}_drop") for r in records)
                     if v is not None and math.isfinite(v)]
            rows.append([escape_md(editor), escape_md(model), kind, escape_md(task),
                         _num(_mean_of(records, f"downstream_{task}_unedited")),
                         _num(_mean_of(records, f"downstream_{task}")),
                         _num(sum(drops) / len(drops) if drops else None), _num(max(drops) if drops else None)])
    if not rows:
        return []
    bound = result.metadata.parsed_bounds.max_downstream_drop
    return [
        "## Downstream tasks",
        "",
        _table(["editor", "model", "kind", "task", "unedited", "edited (mean)", "drop (mean)", "drop (max)"], rows),
        "",
        "Scores from lm-evaluation-harness on the model in memory, unedited and after each edit (each case's own in "
        "the JSON results). " + (f"An edit fails when a task drops by more than {format_number(bound)}."
                                 if bound is not None else "No bound on the drop (--editsafety-max-downstream-drop)."),
    ]


def _case_text(record: CaseRecord) -> str:
    filled = record.prompt.replace("{}", record.subject)
    return escape_md(f"{filled} → {record.target_new} (was {record.ground_truth})")


def _verdict_cell(record: CaseRecord | SequentialRecord | BatchRecord) -> str:
    if record.ok:
        return "certified"
    text = "collapse" if record.collapse else "not certified"
    if record.outcome == "error":
        text += ", error"
    return f"**{text}**"


def _worst_cases(result: RunResult) -> list[str]:
    family = result.metadata.parsed_bounds.family_keys
    ranked = sorted(result.edited_cases, key=lambda r: (-_sort_ratio(r), r.test_id))[:WORST_CASES]
    lines = [f"## Worst cases (top {WORST_CASES} by perplexity ratio)", ""]
    if not ranked:
        return lines + ["No single-edit cases in this run."]
    rows = []
    for i, r in enumerate(ranked, 1):
        rows.append(
            [str(i), escape_md(r.test_id), _kind(r), _ratio(r.metrics.get("ppl_ratio")),
             _num(r.metrics.get("ppl_edited")), _num(r.metrics.get("denominator")),
             _pct(r.metrics.get(family.efficacy)), _verdict_cell(r), _case_text(r)]
        )
    headers = ["#", "test", "kind", "ppl ratio", "edited ppl", "denominator", "efficacy", "verdict", "case"]
    return lines + [_table(headers, rows)]


def _failures(result: RunResult) -> list[str]:
    # a failing batch is listed once, its violations naming the members that fail
    failed = [r for r in result.tests if not r.ok]
    if not failed:
        return []
    rows = []
    for r in failed[:MAX_FAILED_LISTED]:
        reasons = "; ".join(r.violations) if r.violations else f"test outcome: {r.outcome}"
        rows.append([escape_md(r.test_id), r.outcome, _verdict_cell(r), escape_md(reasons)])
    lines = ["## Not certified", "", _table(["test", "outcome", "verdict", "reasons"], rows)]
    if len(failed) > MAX_FAILED_LISTED:
        lines += ["", f"… and {len(failed) - MAX_FAILED_LISTED} more; the JSON results list every one."]
    return lines


def _batch_section(result: RunResult) -> list[str]:
    """One row per batch: its members' verdicts and their efficacy and locality, measured after the whole batch,
    and the perplexity measured once for it."""
    if not result.batches:
        return []
    family = result.metadata.parsed_bounds.family_keys
    rows = []
    for r in result.batches:
        members = r.members
        efficacy = metric_values(members, family.efficacy)
        failing = [m.case_id for m in members if not m.ok]
        shown = ", ".join(failing[:5]) + (f" and {len(failing) - 5} more" if len(failing) > 5 else "")
        rows.append(
            [escape_md(r.test_id), str(len(r.case_ids)),
             f"{sum(m.ok for m in members)}/{len(r.case_ids)}" if members else DASH,
             _ratio(r.metrics.get("ppl_ratio")), _pct(mean(efficacy)) if efficacy else DASH,
             _pct(min(efficacy)) if efficacy else DASH, _pct(mean(metric_values(members, family.locality))),
             escape_md(shown) or DASH, _verdict_cell(r)]
        )
    headers = ["batch", "cases", "certified", "ppl ratio", "efficacy", "min efficacy", "locality",
               "members not certified", "verdict"]
    return [
        "## Batches",
        "",
        _table(headers, rows),
        "",
        "Each batch's cases are applied in one edit; every member's efficacy, generalization and locality are then "
        "measured on the model holding the whole batch, and its perplexity once. A batch is certified when every "
        "member meets its bounds and the batch's perplexity ratio holds.",
    ]


def _sequential_section(result: RunResult, plot_links: Mapping[str, str], plot_note: str | None) -> list[str]:
    if not result.sequential:
        return []
    # the papers' protocol's columns, for records that carry its curves (files written before it have none)
    protocol = any(r.steps for r in result.sequential)
    rows = []
    for r in result.sequential:
        final = r.ppl_after_each[-1] if r.ppl_after_each else None
        worst = r.max_ppl
        ratio = worst / r.ppl_unedited if worst is not None and r.ppl_unedited > 0 else None
        row = [escape_md(r.editor), escape_md(r.model), escape_md(r.case_set),
               f"{len(r.ppl_after_each)}/{r.n_edits}", _num(r.ppl_unedited), _num(final), _num(worst), _ratio(ratio)]
        if protocol:
            norms = r.max_norm_ratios
            crossing = DASH if not r.steps else ("never" if r.collapse_step is None else str(r.collapse_step))
            retained = DASH if r.edits_retained is None else f"{r.edits_retained}/{r.n_edits}"
            row += [escape_md(r.ppl_corpus) or DASH, crossing, _ratio(norms[-1]) if norms else DASH, retained]
        rows.append(row + [_verdict_cell(r)])
    headers = ["editor", "model", "case set", "edits measured", "unedited ppl", "final ppl", "max ppl", "max ratio"]
    if protocol:
        headers[3] = "measurements/edits"
        headers += ["corpus", "collapse at edit", "final norm ratio", "retained"]
    lines = ["## Sequential editing", "", _table(headers + ["verdict"], rows), ""]
    if protocol:
        lines += ["Collapse at edit: the first measured edit after which perplexity is above the collapse line "
                  f"({_num(result.metadata.parsed_bounds.collapse_ppl)}). Final norm ratio: the largest ‖W‖/‖W₀‖ "
                  "over the edited weights after the last edit. Retained: edits whose efficacy still holds after the "
                  "last edit.", ""]
    for caption, link in plot_links.items():
        title = caption.split(":", 1)[0]  # a figure's caption opens with its title
        lines += [f"![{escape_md(title)}]({link})", "", f"_{escape_md(caption)}_", ""]
    if plot_note:
        lines += [f"_{plot_note}_", ""]
    return lines[:-1]


def _baseline_section(
    result: RunResult, baseline: RunResult | None, regressions: Sequence[Regression], allowed_missing: Sequence[str]
) -> list[str]:
    if baseline is None:
        return []
    lines = ["## Against the baseline", ""]
    if baseline.metadata.bounds != result.metadata.bounds:
        lines += ["Note: the baseline was certified under other bounds; verdicts are compared as recorded.", ""]
    if allowed_missing:
        lines += [f"{len(allowed_missing)} test{'s' if len(allowed_missing) != 1 else ''} of the baseline "
                  f"{'are' if len(allowed_missing) != 1 else 'is'} not in this run (allowed to be missing): "
                  f"{escape_md(shown_ids(allowed_missing, MAX_FAILED_LISTED))}.", ""]
    shared_cases = len({r.test_id for r in result.cases} & {r.test_id for r in baseline.cases})
    shared_seq = len({r.test_id for r in result.sequential} & {r.test_id for r in baseline.sequential})
    if not regressions:
        return lines + [
            f"No regressions ({shared_cases} cases and {shared_seq} sequential runs in both runs; "
            f"baseline from {escape_md(baseline.metadata.started)})."
        ]
    lines.append(f"{len(regressions)} regression{'s' if len(regressions) != 1 else ''} "
                 f"(baseline from {escape_md(baseline.metadata.started)}):")
    lines.append("")
    lines += [f"- **{r.kind}**: {escape_md(r.message)}" for r in regressions]
    return lines


def _hparams_value(value: Any) -> str:
    # as JSON, exactly: numbers unrounded, true/false, quoted strings (a prompt such as "{} is a"), lists
    return json.dumps(value, separators=(",", ":"))


def _hparams_origin(sources: Mapping[str, str]) -> str:
    """Where an editor's values came from: the file that set most of them, then each other file with its keys."""
    keys_by_label: dict[str, list[str]] = {}
    for key, label in sources.items():
        keys_by_label.setdefault(label, []).append(key)
    if not keys_by_label:
        return DASH
    base = max(keys_by_label, key=lambda label: (len(keys_by_label[label]), label))
    others = [f"{escape_md(label)} ({escape_md(', '.join(sorted(keys)))})"
              for label, keys in sorted(keys_by_label.items()) if label != base]
    return "; ".join([escape_md(base), *others])


def _hparams_section(result: RunResult) -> list[str]:
    """The hyper-parameters each editor edited each model with, as the run resolved them, and the files they came
    from: the settings behind the verdicts, for a reader who reruns or reviews them (runs written before the
    values were recorded have none)."""
    meta = result.metadata
    rows = [[escape_md(editor), escape_md(model), escape_md(meta.hparams_hashes.get(editor, {}).get(model) or DASH),
             escape_md(", ".join(f"{key} {_hparams_value(value)}" for key, value in values.items())),
             _hparams_origin(meta.hparams_sources.get(editor, {}).get(model, {}))]
            for editor, per_model in meta.hparams.items() for model, values in per_model.items()]
    if not rows:
        return []
    return ["## Hyper-parameters", "", "As each editor edited each model, layers resolved (the sha256 is the JSON's "
            "`hparams_hashes` entry). *From* names the file that set most values, then any other with the keys it "
            "set (`overrides`: given by the caller); a value no file set is the editor's own default:", "",
            _table(["editor", "model", "sha256", "values", "from"], rows)]


def render(
    result: RunResult,
    *,
    baseline: RunResult | None,
    regressions: Sequence[Regression],
    plot_links: Mapping[str, str],
    plot_note: str | None,
    allowed_missing: Sequence[str] = (),
    denominator_figures: Sequence[FigureLink] = (),
    denominator_note: str | None = None,
) -> str:
    """The report; ``plot_links`` maps each sequential plot's caption to its link, ``plot_note`` says why
    plots are missing (or where they are), ``allowed_missing`` lists the baseline's tests this run lacks
    that were allowed to be missing; ``denominator_figures`` and ``denominator_note`` are the same for the
    perplexity ratio against the denominator, shown under the numerator/denominator table."""
    sections: list[list[str]] = [
        ["# Model-editing certification report", "", _banner(result, regressions)],
        _run_section(result),
        _plan_section(result),
        _certification_table(result),
        _update_table(result, denominator_figures, denominator_note),
        _kind_table(result),
        _efficacy_table(result),
        _downstream_table(result),
        _worst_cases(result),
        _failures(result),
        _batch_section(result),
        _sequential_section(result, plot_links, plot_note),
        _baseline_section(result, baseline, regressions, allowed_missing),
        _hparams_section(result),
        [f"<sub>Rendered by pytest-editsafety from a {SCHEMA} results file.</sub>"],
    ]
    return "\n\n".join("\n".join(s) for s in sections if s) + "\n"

