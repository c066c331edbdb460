"""The collapse papers' figure, one per (editor, model): the perplexity ratio against ROME's denominator
``|uᵀk|``, log-log, one point per case.

Collapsing edits sit top left (a tiny denominator, a huge ratio), healthy ones bottom right, so the mechanism
shows at a glance. Drawn over the points: the run's perplexity-ratio bound, the collapse line and the
denominator floor, each taken from what the results file records (see ``_collapse_ratio`` and ``_floor``).

The data preparation (``denominator_figures``) is pure and returns plain values, so tests check what is drawn
without comparing images; ``draw`` only turns it into matplotlib calls on a figure it is given (this module
never imports matplotlib, so the report stays importable without it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pytest_editsafety.bounds import Bounds, format_number
from pytest_editsafety.results import CaseRecord, RunResult
from pytest_editsafety.results.summary import group_keys

__all__ = ["DenominatorFigure", "Series", "case_set_colours", "denominator_figures", "draw", "log_limits"]

# Tab10 without red, which the collapse line uses (as in the sequential plots), and without grey, which the
# bound lines use: a set's colour never reads as a bound.
_PALETTE = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
_MARKERS = {True: "^", False: "o"}  # hard cases as triangles, normal ones as circles
# Floors recorded per record are one float computed once per (editor, model); merged shards may carry the
# same median through a JSON round trip, so compare with a tolerance rather than exactly.
_SAME = 1e-9
# Each log axis spans at least this many decades: the papers' figure spans 0.01 to 10 on |uᵀk|, and a
# narrower span makes matplotlib label minor ticks ("9×10⁰") and magnifies differences that do not matter.
_MIN_DECADES = 2.0
_MARGIN = 1.5  # a factor of room beyond the outermost point or line


@dataclass(frozen=True)
class Series:
    """One scatter call: the cases of one case set and kind with one verdict."""

    label: str
    colour: str
    marker: str
    filled: bool  # certified cases filled, the others hollow
    xs: list[float]  # |uᵀk|
    ys: list[float]  # perplexity ratio


@dataclass(frozen=True)
class DenominatorFigure:
    """What one (editor, model) figure shows. Lines that cannot be drawn are None and ``notes`` says why."""

    editor: str
    model: str
    series: tuple[Series, ...]
    n_cases: int  # every case record of the group
    not_drawn: tuple[str, ...]  # test ids whose ratio or denominator is missing, non-finite or not positive
    ratio_bound: float  # max_ppl_ratio
    collapse_ppl: float  # the bound: an absolute edited perplexity
    unedited_ppl: float | None  # the group's unedited perplexity, when the records agree on one
    collapse_ratio: float | None  # collapse_ppl / unedited_ppl: the collapse line on the ratio axis
    floor: float | None
    notes: tuple[str, ...]

    @property
    def n_drawn(self) -> int:
        return sum(len(s.xs) for s in self.series)

    @property
    def title(self) -> str:
        return f"{self.editor} on {self.model}: perplexity ratio against |uᵀk|"

    @property
    def caption(self) -> str:
        """What the figure shows, in words: counts, the lines and where they come from, what is missing."""
        parts = [f"{self.title}, log-log: {self.n_drawn} of {self.n_cases} cases drawn"]
        if self.not_drawn:
            parts[0] += f" ({len(self.not_drawn)} not: a missing, non-finite or non-positive value)"
        parts.append("filled: certified, hollow: not; triangles: hard cases, circles: normal ones")
        lines = [f"the ratio bound {format_number(self.ratio_bound)}x (dashed)"]
        if self.collapse_ratio is not None:
            unedited = format_number(self.unedited_ppl if self.unedited_ppl is not None else math.nan)
            lines.append(f"the collapse line {format_number(self.collapse_ratio)}x (dotted: edited perplexity "
                         f"{format_number(self.collapse_ppl)} over the unedited {unedited})")
        if self.floor is not None:
            lines.append(f"the denominator floor {format_number(self.floor)} (dash-dotted)")
        parts.append("lines: " + ", ".join(lines))
        return "; ".join(parts + list(self.notes)) + "."


def case_set_colours(names: Iterable[str]) -> dict[str, str]:
    """A colour per case set, by sorted name: the same set has the same colour in every figure of a run."""
    return {name: _PALETTE[i % len(_PALETTE)] for i, name in enumerate(sorted(set(names)))}


def _drawable(record: CaseRecord) -> tuple[float, float] | None:
    """(|denominator|, ratio) when both can sit on log axes, else None."""
    denominator, ratio = record.metrics.get("denominator"), record.metrics.get("ppl_ratio")
    if denominator is None or ratio is None:
        return None
    x = abs(denominator)
    if not (math.isfinite(x) and math.isfinite(ratio) and x > 0 and ratio > 0):
        return None
    return x, ratio


def _set_label(case_set: str, hard: bool) -> str:
    kind = "hard" if hard else "normal"
    # the built-in sets are named after their kind; say it once
    return case_set if case_set == kind else f"{case_set} ({kind})"


def _series(records: Sequence[CaseRecord], colours: Mapping[str, str]) -> tuple[tuple[Series, ...], tuple[str, ...]]:
    groups: dict[tuple[str, bool, bool], tuple[list[float], list[float]]] = {}
    not_drawn = []
    for r in records:
        point = _drawable(r)
        if point is None:
            not_drawn.append(r.test_id)
            continue
        xs, ys = groups.setdefault((r.case_set, r.is_hard, r.ok), ([], []))
        xs.append(point[0])
        ys.append(point[1])
    series = []
    # sets by name, hard before normal, certified before not: a stable legend order
    for (case_set, hard, ok), (xs, ys) in sorted(groups.items(), key=lambda kv: (kv[0][0], not kv[0][1], not kv[0][2])):
        verdict = "certified" if ok else "not certified"
        series.append(Series(f"{_set_label(case_set, hard)}: {verdict} ({len(xs)})", colours[case_set],
                             _MARKERS[hard], ok, xs, ys))
    return tuple(series), tuple(not_drawn)


def _distinct(values: Iterable[float]) -> list[float]:
    out: list[float] = []
    for v in sorted(values):
        if not out or abs(v - out[-1]) > _SAME * max(abs(v), abs(out[-1])):
            out.append(v)
    return out


def _unedited(records: Sequence[CaseRecord]) -> tuple[float | None, str | None]:
    """The group's unedited perplexity, or None and why not (for the collapse line's note)."""
    unedited = _distinct(u for r in records if (u := r.metrics.get("ppl_unedited")) is not None
                         and math.isfinite(u) and u > 0)
    if not unedited:
        return None, "collapse line not drawn: no record holds the unedited perplexity"
    if len(unedited) > 1:
        return None, (f"collapse line not drawn: the unedited perplexity differs between records "
                      f"({format_number(unedited[0])} to {format_number(unedited[-1])})")
    return unedited[0], None


def _collapse_ratio(unedited: float | None, bounds: Bounds) -> float | None:
    """The collapse line on the ratio axis, or None when it cannot be drawn.

    The bound is an absolute edited perplexity (``collapse_ppl``), so on a ratio axis it sits at
    ``collapse_ppl`` over the unedited perplexity, which is one number per model (the same corpus, the same
    unedited weights): each record stores it as ``ppl_unedited``.
    """
    if unedited is None or not math.isfinite(bounds.collapse_ppl):
        return None
    return bounds.collapse_ppl / unedited


def _record_floor(record: CaseRecord, bounds: Bounds) -> float | None:
    """The floor ``judge`` held this record to: the larger of the model-derived floor the harness recorded
    (``denominator_floor``, None when there was none) and ``min_denominator_abs``."""
    relative = record.metrics.get("denominator_floor")
    candidates = [f for f in (relative, bounds.min_denominator_abs) if f is not None and math.isfinite(f)]
    return max(candidates) if candidates else None


def _floor(records: Sequence[CaseRecord], bounds: Bounds) -> tuple[float | None, str | None]:
    """The group's denominator floor, or None and why not.

    Records written by the harness hold the model-derived floor under ``denominator_floor`` (once per
    (editor, model), so one value per group); a file without that key (one built by hand or by another tool)
    leaves only ``min_denominator_abs`` known.
    """
    measured = [r for r in records if r.metrics.get("denominator") is not None]
    if any("denominator_floor" not in r.metrics for r in measured):
        if bounds.min_denominator_abs is not None:
            return bounds.min_denominator_abs, ("the model-derived denominator floor is not recorded; the line is "
                                                "the absolute floor")
        if bounds.min_denominator_fraction == 0:
            return None, "no denominator floor (both floors are off)"
        return None, "denominator floor not drawn: the results do not record it"
    floors = _distinct(f for r in measured if (f := _record_floor(r, bounds)) is not None)
    if not floors:
        return None, "no denominator floor applied"
    if len(floors) > 1:
        return None, (f"denominator floor not drawn: it differs between records "
                      f"({format_number(floors[0])} to {format_number(floors[-1])})")
    return floors[0], None


def denominator_figures(result: RunResult) -> list[DenominatorFigure]:
    """One figure per (editor, model) with at least one case whose editor reported a denominator, in the
    run's editor and model order; editors without one (MEMIT, FT, MEND) get none."""
    bounds = result.metadata.parsed_bounds
    colours = case_set_colours(r.case_set for r in result.edited_cases)
    figures = []
    for editor, model in group_keys(result):
        records = [r for r in result.edited_cases if (r.editor, r.model) == (editor, model)]
        if not any(r.metrics.get("denominator") is not None for r in records):
            continue
        series, not_drawn = _series(records, colours)
        unedited, collapse_note = _unedited(records)
        if not math.isfinite(bounds.collapse_ppl):
            collapse_note = "no collapse line (collapse_ppl is off)"
        floor, floor_note = _floor(records, bounds)
        figures.append(DenominatorFigure(
            editor=editor, model=model, series=series, n_cases=len(records), not_drawn=not_drawn,
            ratio_bound=bounds.max_ppl_ratio, collapse_ppl=bounds.collapse_ppl, unedited_ppl=unedited,
            collapse_ratio=_collapse_ratio(unedited, bounds), floor=floor,
            notes=tuple(n for n in (collapse_note, floor_note) if n is not None),
        ))
    return figures


def log_limits(values: Iterable[float], min_decades: float = _MIN_DECADES) -> tuple[float, float] | None:
    """Limits for a log axis holding ``values`` (positive and finite; others ignored): a margin beyond
    them, widened about their geometric centre to at least ``min_decades``; None without any value."""
    usable = [v for v in values if math.isfinite(v) and v > 0]
    if not usable:
        return None
    lo, hi = min(usable) / _MARGIN, max(usable) * _MARGIN
    span = math.log10(hi / lo)
    if span < min_decades:
        widen = 10 ** ((min_decades - span) / 2)
        lo, hi = lo / widen, hi * widen
    return lo, hi


def _plain(text: str) -> str:
    # matplotlib reads text between two "$" as mathtext; a model or set name may hold them
    return text.replace("$", r"\$")


def draw(data: DenominatorFigure, fig: Any) -> None:
    """Draw ``data`` on an empty matplotlib ``Figure`` (which already has its canvas)."""
    ax = fig.add_subplot()
    for s in data.series:
        ax.scatter(s.xs, s.ys, s=28, marker=s.marker, linewidths=1.2, edgecolors=s.colour,
                   facecolors=s.colour if s.filled else "none", label=_plain(s.label), zorder=3)
    ax.axhline(data.ratio_bound, linestyle="--", color="0.35", linewidth=1,
               label=f"ratio bound ({format_number(data.ratio_bound)}x)")
    if data.collapse_ratio is not None:
        ax.axhline(data.collapse_ratio, linestyle=":", color="tab:red", linewidth=1.2,
                   label=f"collapse line (ppl {format_number(data.collapse_ppl)} = "
                         f"{format_number(data.collapse_ratio)}x)")
    if data.floor is not None:
        ax.axvline(data.floor, linestyle="-.", color="0.35", linewidth=1,
                   label=f"denominator floor ({format_number(data.floor)})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    xs = [x for s in data.series for x in s.xs]
    ys = [y for s in data.series for y in s.ys]
    # the lines are part of the picture: a reader should see how far the points sit from each; the ratio 1
    # (an edit that leaves perplexity alone) anchors the y axis
    x_limits = log_limits([*xs, *([data.floor] if data.floor is not None else [])])
    y_limits = log_limits([*ys, 1.0, data.ratio_bound,
                           *([data.collapse_ratio] if data.collapse_ratio is not None else [])])
    if x_limits is not None:
        ax.set_xlim(*x_limits)
    else:  # nothing to place on x: the papers' range
        ax.set_xlim(0.01, 100)
    if y_limits is not None:
        ax.set_ylim(*y_limits)
    ax.set_xlabel("ROME denominator |uᵀk|")
    ax.set_ylabel("perplexity ratio (edited / unedited)")
    title = f"{data.editor} on {data.model}"
    if data.not_drawn:
        title += f" ({len(data.not_drawn)} of {data.n_cases} cases not drawn: missing or non-finite)"
    ax.set_title(_plain(title), fontsize=10)
    ax.grid(True, which="major", linewidth=0.4, alpha=0.5)
    ax.legend(fontsize=7, loc="best")
