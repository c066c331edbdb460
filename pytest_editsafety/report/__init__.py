"""The certification report of a run: markdown (``markdown``), sequential plots (``plots``), and the files,
job summary and exit code a run leaves (``outputs``)."""

from __future__ import annotations

from pytest_editsafety.report.markdown import WORST_CASES, escape_md
from pytest_editsafety.report.outputs import GITHUB_STEP_SUMMARY, ReportOutputs, exit_code, render_markdown, write_outputs
from pytest_editsafety.report.plots import write_sequential_plots

__all__ = [
    "GITHUB_STEP_SUMMARY",
    "WORST_CASES",
    "ReportOutputs",
    "escape_md",
    "exit_code",
    "render_markdown",
    "write_outputs",
    "write_sequential_plots",
]
