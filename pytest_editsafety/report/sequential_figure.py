"""The papers' sequential-editing figure, one per (model, case set) with every editor on it: perplexity against
the number of edits applied (log y, the collapse line across it) above the edited weights' norm growth (the
largest ‖W‖_F / ‖W₀‖_F over each editor's edited parameters), so an editor that survives longer shows as a curve
that stays under the line, and collapse shows next to the norm growth that drives it.

As in ``denominator_figure``, the data preparation (``sequential_figures``) is pure and returns plain values, so
tests check what is drawn without comparing images, and ``draw`` only turns it into matplotlib calls on a figure
it is given (this module never imports matplotlib).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pytest_editsafety.bounds import format_number
from pytest_editsafety.report.denominator_figure import case_set_colours
from pytest_editsafety.results import RunResult, SequentialRecord

__all__ = ["EditorCurve", "SequentialFigure", "draw", "sequential_figures"]


@dataclass(frozen=True)
class EditorCurve:
    """One editor's sequential run: its curves from step 0 (the unedited model) to its last measured edit."""

    editor: str
    test_id: str
    steps: list[int]  # 0, then the edits applied at each measurement
    ppl: list[float]  # non-finite and non-positive values as NaN (a gap on a log axis)
    norm: list[float]  # the largest norm ratio over the edited parameters; empty when the record has none
    n_edits: int
    collapse_step: int | None
    edits_retained: int | None
    edits_took: int | None
    not_finite: int  # measured perplexities that cannot sit on a log axis (a collapsed model's inf or NaN)

    def describe(self, collapse_ppl: float) -> str:
        """The run in words: where it crosses the collapse line, its last figures, its retention."""
        finite = [v for v in self.ppl[1:] if math.isfinite(v)]
        last = self.ppl[-1] if len(self.ppl) > 1 else math.nan
        parts = [f"{self.editor}: {len(self.steps) - 1} measurements over {self.n_edits} edits"]
        if self.collapse_step is not None:
            parts.append(f"crosses {format_number(collapse_ppl)} at edit {self.collapse_step}")
        else:
            parts.append(f"never crosses {format_number(collapse_ppl)}")
        parts.append(f"perplexity {format_number(self.ppl[0])} → {format_number(last)}"
                     + (f" (max {format_number(max(finite))})" if finite else ""))
        if self.norm:
            parts.append(f"norm ratio → {format_number(self.norm[-1])}")
        if self.edits_retained is not None:
            took = f", {self.edits_took} took when made" if self.edits_took is not None else ""
            parts.append(f"{self.edits_retained} of {self.n_edits} edits hold at the end{took}")
        if self.not_finite:
            parts.append(f"{self.not_finite} non-finite perplexities not drawn")
        return ", ".join(parts)


@dataclass(frozen=True)
class SequentialFigure:
    model: str
    case_set: str
    curves: tuple[EditorCurve, ...]  # by editor name
    colours: dict[str, str]  # editor -> colour
    collapse_ppl: float
    unedited_ppl: float | None  # when the runs agree on one (one corpus, one model)

    @property
    def title(self) -> str:
        return f"sequential editing on {self.model}, {self.case_set}"

    @property
    def caption(self) -> str:
        line = (f"the collapse line {format_number(self.collapse_ppl)} (dotted)" if math.isfinite(self.collapse_ppl)
                else "no collapse line (collapse_ppl is inf)")
        return (f"{self.title}: perplexity (top, log) and the largest ‖W‖/‖W₀‖ of the edited weights (bottom, log) "
                f"against edits applied, every editor, {line}. "
                + "; ".join(c.describe(self.collapse_ppl) for c in self.curves) + ".")


def _positive(value: float) -> float:
    return value if math.isfinite(value) and value > 0 else math.nan


def _curve(record: SequentialRecord) -> EditorCurve:
    steps = [0, *record.measured_steps]
    ppl = [_positive(record.ppl_unedited), *(_positive(v) for v in record.ppl_after_each)]
    norms = record.max_norm_ratios
    return EditorCurve(
        editor=record.editor, test_id=record.test_id, steps=steps, ppl=ppl,
        norm=[1.0, *(_positive(v) for v in norms)] if norms else [],
        n_edits=record.n_edits, collapse_step=record.collapse_step, edits_retained=record.edits_retained,
        edits_took=record.edits_took,
        not_finite=sum(not (math.isfinite(v) and v > 0) for v in record.ppl_after_each),
    )


def _agreed(values: Sequence[float]) -> float | None:
    finite = sorted({v for v in values if math.isfinite(v) and v > 0})
    if finite and finite[-1] - finite[0] <= 1e-9 * finite[-1]:
        return finite[0]
    return None


def sequential_figures(result: RunResult) -> list[SequentialFigure]:
    """One figure per (model, case set) with a sequential record, every editor's run on it, by model and set."""
    groups: dict[tuple[str, str], list[SequentialRecord]] = {}
    for record in result.sequential:
        groups.setdefault((record.model, record.case_set), []).append(record)
    colours = case_set_colours(r.editor for r in result.sequential)  # an editor's colour is the same everywhere
    collapse_ppl = result.metadata.parsed_bounds.collapse_ppl
    figures = []
    for (model, case_set), records in sorted(groups.items()):
        records.sort(key=lambda r: (r.editor, r.test_id))
        figures.append(SequentialFigure(
            model=model, case_set=case_set, curves=tuple(_curve(r) for r in records), colours=colours,
            collapse_ppl=collapse_ppl, unedited_ppl=_agreed([r.ppl_unedited for r in records]),
        ))
    return figures


def draw(data: SequentialFigure, fig: Any) -> None:
    """Draw ``data`` on matplotlib figure ``fig``: perplexity above, norm growth below, one shared edit axis."""
    with_norms = any(c.norm for c in data.curves)
    axes = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2)) if with_norms else [fig.add_subplot()]
    top = axes[0]
    for c in data.curves:
        colour = data.colours[c.editor]
        top.plot(c.steps, c.ppl, color=colour, marker="o" if len(c.steps) <= 60 else None, markersize=2.5,
                 linewidth=1.3, label=c.editor)
        if c.collapse_step is not None:
            top.axvline(c.collapse_step, color=colour, linestyle=":", linewidth=0.8)
    if data.unedited_ppl is not None:
        top.axhline(data.unedited_ppl, linestyle="--", color="0.4", linewidth=1,
                    label=f"unedited ({format_number(data.unedited_ppl)})")
    if math.isfinite(data.collapse_ppl):
        top.axhline(data.collapse_ppl, linestyle=":", color="tab:red", linewidth=1.2,
                    label=f"collapse line ({format_number(data.collapse_ppl)})")
    top.set_yscale("log")
    top.set_ylabel("perplexity")
    top.set_title(data.title, fontsize=10)
    top.legend(fontsize=8, loc="best")
    if with_norms:
        bottom = axes[1]
        for c in data.curves:
            if c.norm:
                bottom.plot(c.steps, c.norm, color=data.colours[c.editor], linewidth=1.3, label=c.editor)
        bottom.axhline(1.0, linestyle="--", color="0.4", linewidth=1)
        bottom.set_yscale("log")
        bottom.set_ylabel("max ‖W‖/‖W₀‖")
        bottom.set_xlabel("edits applied")
    else:
        top.set_xlabel("edits applied")
