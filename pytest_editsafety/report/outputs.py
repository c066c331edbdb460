"""What a run leaves behind: the rendered report, the JSON and markdown files, the job summary, the exit code."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from editors.storage import atomic_write_text
from pytest_editsafety.report.markdown import render
from pytest_editsafety.report.plots import prune_stale_plots, report_denominator_plots, report_plots
from pytest_editsafety.report.verdict import exit_code, verdict
from pytest_editsafety.results import Regression, RunResult, compare, missing_from, write_result

log = logging.getLogger(__name__)

__all__ = ["GITHUB_STEP_SUMMARY", "ReportOutputs", "render_markdown", "write_outputs"]

GITHUB_STEP_SUMMARY = "GITHUB_STEP_SUMMARY"


def _against(result: RunResult, baseline: RunResult | None, allow_missing: bool) -> tuple[list[Regression], list[str]]:
    """The regressions, and the baseline's test ids this run lacks when ``allow_missing`` lets them pass."""
    if baseline is None:
        return [], []
    allowed = [test_id for test_id, _, _ in missing_from(result, baseline)] if allow_missing else []
    return compare(result, baseline, allow_missing=allow_missing), allowed


def render_markdown(
    result: RunResult,
    *,
    baseline: RunResult | None = None,
    allow_missing: bool = False,
    plots_dir: str | os.PathLike[str] | None = None,
) -> str:
    """The report. With ``plots_dir``, the figures (sequential plots, the perplexity ratio against the
    denominator) are written there and linked as ``<plots_dir name>/<file>``, i.e. relative to the directory
    that holds ``plots_dir`` (where ``write_outputs`` puts the markdown)."""
    regressions, allowed = _against(result, baseline, allow_missing)
    links, _, note = report_plots(result, plots_dir)
    figures, _, figure_note = report_denominator_plots(result, plots_dir)
    return render(result, baseline=baseline, regressions=regressions, allowed_missing=allowed, plot_links=links,
                  plot_note=note, denominator_figures=figures, denominator_note=figure_note)


@dataclass(frozen=True)
class ReportOutputs:
    json_path: Path
    md_path: Path
    plots: tuple[Path, ...]  # sequential plots, then the perplexity-ratio-against-denominator figures
    regressions: tuple[Regression, ...]
    verdict: str  # CERTIFIED, NOT CERTIFIED or PARTIAL
    exit_code: int


def write_outputs(
    result: RunResult,
    json_path: str | os.PathLike[str],
    md_path: str | os.PathLike[str],
    *,
    baseline: RunResult | None = None,
    allow_missing: bool = False,
    job_summary: bool = True,
) -> ReportOutputs:
    """Write the JSON results and the markdown report (plots in ``<md stem>_plots/`` beside it, the figures of an
    earlier report there removed), each atomically, and append the markdown to ``$GITHUB_STEP_SUMMARY`` when that
    is set and ``job_summary``.
    ``allow_missing``: baseline tests this run lacks are listed, not regressions."""
    md = Path(md_path)
    regressions, allowed = _against(result, baseline, allow_missing)
    plots_dir = md.parent / f"{md.stem}_plots"
    links, plots, note = report_plots(result, plots_dir)
    figures, figure_files, figure_note = report_denominator_plots(result, plots_dir)
    prune_stale_plots(plots_dir, plots + figure_files)
    write_result(result, json_path)
    atomic_write_text(md, render(result, baseline=baseline, regressions=regressions, allowed_missing=allowed,
                                 plot_links=links, plot_note=note, denominator_figures=figures,
                                 denominator_note=figure_note))
    summary_path = os.environ.get(GITHUB_STEP_SUMMARY)
    if summary_path and job_summary:
        # relative image links do not resolve in a job summary; the plots live with the report artifact
        summary_note = "Sequential plots are in the report's directory (not shown in the job summary)." if result.sequential else None
        figure_summary_note = ("The perplexity-ratio-against-denominator figures are in the report's directory "
                               "(not shown in the job summary)." if figures else figure_note)
        summary = render(result, baseline=baseline, regressions=regressions, allowed_missing=allowed, plot_links={},
                         plot_note=summary_note, denominator_note=figure_summary_note)
        with open(summary_path, "a", encoding="utf-8") as handle:
            handle.write(summary)
        log.info("appended the certification report to %s", summary_path)
    return ReportOutputs(Path(json_path), md, plots + figure_files, tuple(regressions), verdict(result, regressions),
                         exit_code(result, regressions))
