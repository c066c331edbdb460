"""The report's figures, drawn with matplotlib when it is installed (the ``plots`` extra): sequential-editing
figures, one PNG per (model, case set) with every editor on it (``sequential_figure``), and the papers' perplexity ratio against the denominator, one PNG
per (editor, model) with a denominator (``denominator_figure``).

PNGs are reproducible: a fixed size and dpi, the Agg canvas, and no "Software" entry in their metadata."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

from editors.storage import atomic_write_bytes
from pytest_editsafety.report.denominator_figure import DenominatorFigure, denominator_figures, draw
from pytest_editsafety.report.markdown import FigureLink
from pytest_editsafety.report.sequential_figure import draw as draw_sequential
from pytest_editsafety.report.sequential_figure import sequential_figures
from pytest_editsafety.results import RunResult

log = logging.getLogger(__name__)

__all__ = ["prune_stale_plots", "report_denominator_plots", "report_plots", "write_denominator_plots",
           "write_sequential_plots"]

MATPLOTLIB_MISSING = "matplotlib is not installed (pip install 'pytest-editsafety[plots]')"


def _load_matplotlib() -> tuple[Any, Any]:
    """The object-oriented Agg API: no pyplot, so no process-wide backend switch or figure registry."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return Figure, FigureCanvasAgg


_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
# what _plot_filename writes, and nothing else: a file of another shape in the folder is the user's
_PLOT_FILENAME = re.compile(r"(sequential|denominator)-[A-Za-z0-9._-]*-[0-9a-f]{8}\.png")


def _plot_filename(kind: str, *parts: str) -> str:
    # Names can hold "/" (Hugging Face ids) or anything a user typed; the hash keeps distinct names
    # distinct after slugging.
    slug = "-".join(_UNSAFE_NAME.sub("_", part).strip("._") or "x" for part in parts)
    digest = hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()[:8]
    return f"{kind}-{slug[:80]}-{digest}.png"


def _png(fig: Any) -> bytes:
    """The figure as PNG bytes; without the "Software" entry (matplotlib's version) the bytes depend only on
    what is drawn, so golden files and artifacts stay stable."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def write_sequential_plots(result: RunResult, plots_dir: str | os.PathLike[str]) -> tuple[dict[str, Path], str | None]:
    """One PNG per (model, case set) with every editor's run on it (``sequential_figure``): perplexity after
    each measured edit with the collapse line, above the edited weights' norm growth.

    Returns ``({caption: path}, note)``; without matplotlib nothing is written and the note says why.
    """
    if not result.sequential:
        return {}, None
    try:
        Figure, FigureCanvasAgg = _load_matplotlib()
    except ImportError:
        return {}, f"Sequential plots skipped: {MATPLOTLIB_MISSING}."
    written: dict[str, Path] = {}
    for data in sequential_figures(result):
        fig = Figure(figsize=(6.4, 5.6), dpi=100)
        FigureCanvasAgg(fig)
        draw_sequential(data, fig)
        path = Path(plots_dir) / _plot_filename("sequential", data.model, data.case_set)
        atomic_write_bytes(path, _png(fig))
        written[data.caption] = path
    return written, None


def report_plots(
    result: RunResult, plots_dir: str | os.PathLike[str] | None
) -> tuple[dict[str, str], tuple[Path, ...], str | None]:
    """Write the plots into ``plots_dir`` and return (caption -> link relative to the directory that holds
    ``plots_dir``, files written, note for the report)."""
    if not result.sequential:
        return {}, (), None
    if plots_dir is None:
        return {}, (), "Sequential plots not written (no plots directory given)."
    written, note = write_sequential_plots(result, plots_dir)
    prefix = quote(Path(plots_dir).name)
    links = {caption: f"{prefix}/{quote(path.name)}" for caption, path in written.items()}
    return links, tuple(written.values()), note


def write_denominator_plots(
    figures: list[DenominatorFigure], plots_dir: str | os.PathLike[str]
) -> tuple[list[tuple[DenominatorFigure, Path]], str | None]:
    """One PNG per figure (``denominator_figures``): the perplexity ratio against |uᵀk|, log-log.

    Returns ``([(figure, path)], note)``; without matplotlib nothing is written and the note says why.
    """
    if not figures:
        return [], None
    try:
        Figure, FigureCanvasAgg = _load_matplotlib()
    except ImportError:
        return [], f"Perplexity-ratio-against-denominator figures skipped: {MATPLOTLIB_MISSING}."
    written = []
    for data in figures:
        fig = Figure(figsize=(6.4, 4.4), dpi=100)
        FigureCanvasAgg(fig)
        draw(data, fig)
        path = Path(plots_dir) / _plot_filename("denominator", data.editor, data.model)
        atomic_write_bytes(path, _png(fig))
        log.debug("wrote %s (%d of %d cases drawn)", path, data.n_drawn, data.n_cases)
        written.append((data, path))
    return written, None


def report_denominator_plots(
    result: RunResult, plots_dir: str | os.PathLike[str] | None
) -> tuple[list[FigureLink], tuple[Path, ...], str | None]:
    """Write the perplexity-ratio-against-denominator figures into ``plots_dir`` and return (one link per
    figure, relative to the directory that holds ``plots_dir``, the files written, a note for the report)."""
    figures = denominator_figures(result)
    if not figures:
        return [], (), None
    if plots_dir is None:
        return [], (), "Perplexity-ratio-against-denominator figures not written (no plots directory given)."
    written, note = write_denominator_plots(figures, plots_dir)
    prefix = quote(Path(plots_dir).name)
    links = [FigureLink(data.title, f"{prefix}/{quote(path.name)}", data.caption) for data, path in written]
    return links, tuple(path for _, path in written), note


def prune_stale_plots(plots_dir: str | os.PathLike[str], keep: tuple[Path, ...]) -> tuple[Path, ...]:
    """Remove the figures an earlier report left in ``plots_dir`` that this one did not write (``keep``), so the
    folder holds only what the report links; files not named as this module names figures stay. The folder
    goes too when that leaves it empty. Returns the files removed."""
    folder = Path(plots_dir)
    if not folder.is_dir():
        return ()
    kept = {path.name for path in keep}
    removed = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and _PLOT_FILENAME.fullmatch(path.name) and path.name not in kept:
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        log.debug("removed %d figure(s) of an earlier report from %s", len(removed), folder)
        if not any(folder.iterdir()):
            folder.rmdir()
    return tuple(removed)
