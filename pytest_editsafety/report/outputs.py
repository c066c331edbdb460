"""What a run leaves behind: the rendered report, the JSON and markdown files, the job summary, the exit code."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from editors.storage import atomic_write_text
from pytest_editsafety.report.markdown import render
from pytest_editsafety.report.plots import report_plots
from pytest_editsafety.results import Regression, RunResult, compare, write_result

log = logging.getLogger(__name__)

__all__ = ["GITHUB_STEP_SUMMARY", "ReportOutputs", "exit_code", "render_markdown", "write_outputs"]

GITHUB_STEP_SUMMARY = "GITHUB_STEP_SUMMARY"


def render_markdown(
    result: RunResult,
    *,
    baseline: RunResult | None = None,
    plots_dir: str | os.PathLike[str] | None = None,
) -> str:
    """The report. With ``plots_dir``, sequential plots are written there and linked as
    ``<plots_dir name>/<file>``, i.e. relative to the directory that holds ``plots_dir`` (where
    ``write_outputs`` puts the markdown)."""
    regressions = compare(result, baseline) if baseline is not None else []
    links, _, note = report_plots(result, plots_dir)
    return render(result, baseline=baseline, regressions=regressions, plot_links=links, plot_note=note)


def exit_code(result: RunResult, regressions: Sequence[Regression]) -> int:
    """0 when every record is certified and nothing regressed against the baseline, else 1."""
    return 0 if result.certified and not regressions else 1


@dataclass(frozen=True)
class ReportOutputs:
    json_path: Path
    md_path: Path
    plots: tuple[Path, ...]
    regressions: tuple[Regression, ...]
    exit_code: int


def write_outputs(
    result: RunResult,
    json_path: str | os.PathLike[str],
    md_path: str | os.PathLike[str],
    *,
    baseline: RunResult | None = None,
) -> ReportOutputs:
    """Write the JSON results and the markdown report (plots in ``<md stem>_plots/`` beside it), each
    atomically, and append the markdown to ``$GITHUB_STEP_SUMMARY`` when that is set."""
    md = Path(md_path)
    regressions = compare(result, baseline) if baseline is not None else []
    plots_dir = md.parent / f"{md.stem}_plots"
    links, plots, note = report_plots(result, plots_dir)
    write_result(result, json_path)
    atomic_write_text(md, render(result, baseline=baseline, regressions=regressions, plot_links=links, plot_note=note))
    summary_path = os.environ.get(GITHUB_STEP_SUMMARY)
    if summary_path:
        # relative image links do not resolve in a job summary; the plots live with the report artifact
        summary_note = "Sequential plots are in the report's directory (not shown in the job summary)." if result.sequential else None
        summary = render(result, baseline=baseline, regressions=regressions, plot_links={}, plot_note=summary_note)
        with open(summary_path, "a", encoding="utf-8") as handle:
            handle.write(summary)
        log.info("appended the certification report to %s", summary_path)
    return ReportOutputs(Path(json_path), md, plots, tuple(regressions), exit_code(result, regressions))
