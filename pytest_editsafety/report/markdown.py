"""The markdown certification report, rendered from a ``RunResult`` alone (so merged shards render too).

Sections: a verdict banner (CERTIFIED, NOT CERTIFIED or PARTIAL, with what the run left out of its plan), the
run's conditions, its plan and coverage, an editor × model certification table, the papers'-style
numerator/denominator table (hard vs normal cases) with the papers' figure per (editor, model) (links to
the perplexity ratio against the denominator), results split by hard vs normal, the worst cases, every
failed case with its reasons, sequential-editing curves (links to the plots) and the diff against a baseline.
The sections on the run itself (conditions, plan and coverage, hyper-parameters) are in
:mod:`pytest_editsafety.report.run_sections`; escaping and number formatting in :mod:`pytest_editsafety.report.text`.

Everything a user or a case file controls (case text, editor and model names, violation sentences) passes
through ``escape_md`` before it reaches the markdown. The output is deterministic: the only times in it come
from the run's metadata, numbers are formatted here (tabulate never re-parses them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from pytest_editsafety.aggregates import mean, median
from pytest_editsafety.bounds import format_number
from pytest_editsafety.report.hard_cases import hard_case_findings, pattern_notes
from pytest_editsafety.report.run_sections import hparams_section, plan_section, run_section
from pytest_editsafety.report.text import (
    DASH,
    escape_md,
    markdown_table,
    number_text,
    percent_text,
    ratio_text,
)
from pytest_editsafety.report.verdict import CERTIFIED, PARTIAL, verdict
from pytest_editsafety.results import (
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

# escape_md is this module's for callers that escape text the way the report does
__all__ = ["WORST_CASES", "FigureLink", "escape_md", "render"]

WORST_CASES = 10
# Beyond this many failed cases the report points to the JSON, which has them all.
MAX_FAILED_LISTED = 100


class FigureLink(NamedTuple):
    """A figure the report links: its alt text, its link (relative to the report) and the caption shown
    under it (plain text, escaped here)."""

    alt: str
    link: str
    caption: str


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


def _certification_table(result: RunResult) -> list[str]:
    rows = []
    for g in summarize_groups(result):
        rows.append(
            [
                escape_md(g.editor),
                escape_md(g.model),
                "certified" if g.certified else "**not certified**",
                str(g.n_cases),
                f"{g.n_certified} ({percent_text(g.certified_share)})" if g.n_cases else DASH,
                str(g.n_collapses),
                ratio_text(g.max_ppl_ratio),
                ratio_text(g.median_ppl_ratio),
                number_text(g.min_denominator),
                percent_text(g.mean_efficacy),
                percent_text(g.mean_generalization),
                percent_text(g.mean_locality),
                f"{g.n_sequential_certified}/{g.n_sequential}" if g.n_sequential else DASH,
            ]
        )
    headers = ["editor", "model", "verdict", "cases", "certified", "collapses", "max ppl ratio",
               "median ppl ratio", "min denominator", "efficacy", "generalization", "locality", "sequential"]
    family = result.metadata.parsed_bounds.metric_family
    return [
        "## Certification by editor and model",
        "",
        markdown_table(headers, rows),
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
             number_text(mean(numerators)), number_text(median(numerators)),
             number_text(mean(denominators)), number_text(median(denominators))]
        )
    lines = ["## ROME update: numerator and denominator, hard vs normal cases", ""]
    if not rows:
        return lines + ["No editor in this run reports a rank-one update denominator."]
    headers = ["editor", "model", "kind", "cases", "numerator mean", "numerator median",
               "denominator mean", "denominator median"]
    return lines + [
        markdown_table(headers, rows),
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
             f"{s.n_certified} ({percent_text(s.certified_share)})", str(s.n_collapses),
             ratio_text(s.median_ppl_ratio), ratio_text(s.max_ppl_ratio), percent_text(s.mean_efficacy),
             percent_text(s.mean_locality)]
        )
    lines = ["## Hard vs normal cases", ""]
    if not rows:
        return lines + ["No single-edit cases in this run."]
    headers = ["editor", "model", "kind", "cases", "certified", "collapses", "median ppl ratio", "max ppl ratio",
               "efficacy", "locality"]
    return lines + [
        markdown_table(headers, rows),
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
            line += (f" Median cos(kᵘ, k̄) {number_text(f.key_cosine_hard)} on hard cases, "
                     f"{number_text(f.key_cosine_normal)} on "
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
         *(percent_text(_mean_of(records, key)) for key in ("cf_efficacy", "ee_rewrite_acc", "gen_efficacy",
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
        markdown_table(headers, rows),
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
                         number_text(_mean_of(records, f"downstream_{task}_unedited")),
                         number_text(_mean_of(records, f"downstream_{task}")),
                         number_text(sum(drops) / len(drops) if drops else None),
                         number_text(max(drops) if drops else None)])
    if not rows:
        return []
    bound = result.metadata.parsed_bounds.max_downstream_drop
    return [
        "## Downstream tasks",
        "",
        markdown_table(["editor", "model", "kind", "task", "unedited", "edited (mean)", "drop (mean)", "drop (max)"],
                       rows),
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
            [str(i), escape_md(r.test_id), _kind(r), ratio_text(r.metrics.get("ppl_ratio")),
             number_text(r.metrics.get("ppl_edited")), number_text(r.metrics.get("denominator")),
             percent_text(r.metrics.get(family.efficacy)), _verdict_cell(r), _case_text(r)]
        )
    headers = ["#", "test", "kind", "ppl ratio", "edited ppl", "denominator", "efficacy", "verdict", "case"]
    return lines + [markdown_table(headers, rows)]


def _failures(result: RunResult) -> list[str]:
    # a failing batch is listed once, its violations naming the members that fail
    failed = [r for r in result.tests if not r.ok]
    if not failed:
        return []
    rows = []
    for r in failed[:MAX_FAILED_LISTED]:
        reasons = "; ".join(r.violations) if r.violations else f"test outcome: {r.outcome}"
        rows.append([escape_md(r.test_id), r.outcome, _verdict_cell(r), escape_md(reasons)])
    lines = ["## Not certified", "", markdown_table(["test", "outcome", "verdict", "reasons"], rows)]
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
             ratio_text(r.metrics.get("ppl_ratio")), percent_text(mean(efficacy)) if efficacy else DASH,
             percent_text(min(efficacy)) if efficacy else DASH,
             percent_text(mean(metric_values(members, family.locality))),
             escape_md(shown) or DASH, _verdict_cell(r)]
        )
    headers = ["batch", "cases", "certified", "ppl ratio", "efficacy", "min efficacy", "locality",
               "members not certified", "verdict"]
    return [
        "## Batches",
        "",
        markdown_table(headers, rows),
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
               f"{len(r.ppl_after_each)}/{r.n_edits}", number_text(r.ppl_unedited), number_text(final),
               number_text(worst), ratio_text(ratio)]
        if protocol:
            norms = r.max_norm_ratios
            crossing = DASH if not r.steps else ("never" if r.collapse_step is None else str(r.collapse_step))
            retained = DASH if r.edits_retained is None else f"{r.edits_retained}/{r.n_edits}"
            row += [escape_md(r.ppl_corpus) or DASH, crossing, ratio_text(norms[-1]) if norms else DASH, retained]
        rows.append(row + [_verdict_cell(r)])
    headers = ["editor", "model", "case set", "edits measured", "unedited ppl", "final ppl", "max ppl", "max ratio"]
    if protocol:
        headers[3] = "measurements/edits"
        headers += ["corpus", "collapse at edit", "final norm ratio", "retained"]
    lines = ["## Sequential editing", "", markdown_table(headers + ["verdict"], rows), ""]
    if protocol:
        lines += ["Collapse at edit: the first measured edit after which perplexity is above the collapse line "
                  f"({number_text(result.metadata.parsed_bounds.collapse_ppl)}). Final norm ratio: the largest "
                  "‖W‖/‖W₀‖ "
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
        run_section(result),
        plan_section(result),
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
        hparams_section(result),
        [f"<sub>Rendered by pytest-editsafety from a {SCHEMA} results file.</sub>"],
    ]
    return "\n\n".join("\n".join(s) for s in sections if s) + "\n"

