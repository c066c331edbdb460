"""The report's sections on the run itself rather than its results: its conditions (models, corpus, C, bounds,
hardware, workers, commands), its plan and coverage, and the hyper-parameters each editor edited with."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

from pytest_editsafety.bounds import Bounds, format_number
from pytest_editsafety.report.text import DASH, escape_md, markdown_table, percent_text
from pytest_editsafety.results import BOS_NOT_LOADED, BOS_NOTHING_TO_STRIP, BOS_STRIPPED, RunResult

__all__ = ["hparams_section", "plan_section", "run_section"]


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
            f"efficacy ≥ {percent_text(bounds.min_efficacy)}, "
            f"generalization ≥ {percent_text(bounds.min_generalization)}, "
            f"locality ≥ {percent_text(bounds.min_locality)} ({bounds.metric_family} metrics: "
            f"{escape_md(keys.efficacy)}, {escape_md(keys.generalization)}, {escape_md(keys.locality)})",
            *([f"downstream task drop ≤ {format_number(bounds.max_downstream_drop)}"]
              if bounds.max_downstream_drop is not None else []),
        ]
    )


def run_section(result: RunResult) -> list[str]:
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


def plan_section(result: RunResult) -> list[str]:
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


def hparams_section(result: RunResult) -> list[str]:
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
            markdown_table(["editor", "model", "sha256", "values", "from"], rows)]
