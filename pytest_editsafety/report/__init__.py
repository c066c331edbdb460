"""The certification report of a run: markdown (``markdown``), sequential plots and the perplexity ratio
against the denominator (``plots``, ``denominator_figure``), the files and
job summary a run leaves (``outputs``), its verdict and exit code (``verdict``)."""

from __future__ import annotations

from pytest_editsafety.report.markdown import WORST_CASES
from pytest_editsafety.report.outputs import GITHUB_STEP_SUMMARY, ReportOutputs, render_markdown, write_outputs
from pytest_editsafety.report.plots import write_denominator_plots, write_sequential_plots
from pytest_editsafety.report.text import escape_md
from pytest_editsafety.report.verdict import CERTIFIED, NOT_CERTIFIED, PARTIAL, exit_code, verdict

__all__ = [
    "CERTIFIED",
    "GITHUB_STEP_SUMMARY",
    "NOT_CERTIFIED",
    "PARTIAL",
    "WORST_CASES",
    "ReportOutputs",
    "escape_md",
    "exit_code",
    "render_markdown",
    "verdict",
    "write_denominator_plots",
    "write_outputs",
    "write_sequential_plots",
]
