"""The papers' figure: the perplexity ratio against the denominator, per (editor, model).

The data behind each figure is checked as plain values (``denominator_figures``); the PNGs only for being
written, linked from the markdown, left out of the job summary and byte-for-byte reproducible.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pytest_editsafety.report import plots, write_outputs
from pytest_editsafety.report.denominator_figure import (
    DenominatorFigure,
    case_set_colours,
    denominator_figures,
    log_limits,
)
from pytest_editsafety.results import CaseRecord, RunResult, read_result
from tests.results_helpers import replanned

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture
def run() -> RunResult:
    return read_result(GOLDEN / "run.json")


def with_cases(run: RunResult, change: Callable[[CaseRecord], CaseRecord]) -> RunResult:
    """``run`` with every case record passed through ``change``, replanned so the plan still matches."""
    return replanned(dataclasses.replace(run, cases=tuple(change(r) for r in run.cases)))


def with_metrics(record: CaseRecord, **metrics: Any) -> CaseRecord:
    """``record`` with ``metrics`` set; a value of ``...`` removes the key."""
    merged = {**record.metrics, **metrics}
    return dataclasses.replace(record, metrics={k: v for k, v in merged.items() if v is not ...})


def with_bounds(run: RunResult, **bounds: Any) -> RunResult:
    metadata = dataclasses.replace(run.metadata, bounds={**run.metadata.bounds, **bounds})
    return dataclasses.replace(run, metadata=metadata)


def by_editor(result: RunResult) -> dict[str, DenominatorFigure]:
    return {f.editor: f for f in denominator_figures(result)}


# ---------------------------------------------------------------------------------------------------
# The data behind the figure


def test_one_figure_per_editor_and_model_with_a_denominator(run: RunResult) -> None:
    figures = denominator_figures(run)
    assert [(f.editor, f.model) for f in figures] == [("rome", "tiny-gpt2"), ("c-rome", "tiny-gpt2")]
    rome = figures[0]
    assert (rome.n_cases, rome.n_drawn) == (5, 4)
    # hard-0002 has a NaN ratio and denominator: skipped and counted, in the title and the caption
    assert rome.not_drawn == ("rome-tiny-gpt2-hard-0002",)
    assert "4 of 5 cases drawn (1 not: a missing, non-finite or non-positive value)" in rome.caption
    series = {s.label: s for s in rome.series}
    assert list(series) == ["hard: not certified (2)", "normal: certified (2)"]
    hard, normal = series.values()
    assert hard.xs == [0.031, 0.52] and hard.ys == pytest.approx([1200.0, 2.342168674698795])
    assert (hard.marker, hard.filled, normal.marker, normal.filled) == ("^", False, "o", True)
    assert normal.xs == [9.2, 11.4]
    # c-rome's normal-0008 errored: not certified, drawn hollow beside its certified neighbour
    c_rome = figures[1]
    assert [(s.label, s.filled, s.xs) for s in c_rome.series] == [
        ("hard: certified (2)", True, [8.8, 9.9]),
        ("normal: certified (1)", True, [9.4]),
        ("normal: not certified (1)", False, [10.1]),
    ]
    assert c_rome.not_drawn == () and "4 of 4 cases drawn;" in c_rome.caption


def test_no_figure_for_an_editor_without_a_denominator(run: RunResult) -> None:
    # as MEMIT, FT and MEND record it: the denominator does not apply
    no_c_rome = with_cases(run, lambda r: with_metrics(r, denominator=None) if r.editor == "c-rome" else r)
    assert [f.editor for f in denominator_figures(no_c_rome)] == ["rome"]
    none = with_cases(run, lambda r: with_metrics(r, denominator=None))
    assert denominator_figures(none) == []
    links, files, note = plots.report_denominator_plots(none, None)
    assert (links, files, note) == ([], (), None)


def test_missing_non_finite_and_non_positive_values_are_skipped_and_counted(run: RunResult) -> None:
    changes = {
        "c-rome-tiny-gpt2-hard-0000": {"ppl_ratio": math.inf},
        "c-rome-tiny-gpt2-hard-0001": {"denominator": 0.0},
        "c-rome-tiny-gpt2-normal-0007": {"ppl_ratio": ...},  # never measured: the test errored first
        "c-rome-tiny-gpt2-normal-0008": {"denominator": -10.1},  # signed: drawn at its magnitude
    }
    changed = with_cases(run, lambda r: with_metrics(r, **changes.get(r.test_id, {})))
    figure = by_editor(changed)["c-rome"]
    assert (figure.n_cases, figure.n_drawn) == (4, 1)
    assert figure.not_drawn == ("c-rome-tiny-gpt2-hard-0000", "c-rome-tiny-gpt2-hard-0001",
                                "c-rome-tiny-gpt2-normal-0007")
    assert [s.xs for s in figure.series] == [[10.1]]
    assert "1 of 4 cases drawn (3 not:" in figure.caption


def test_collapse_line_is_the_edited_perplexity_line_over_the_unedited(run: RunResult) -> None:
    figure = by_editor(run)["rome"]
    assert figure.collapse_ratio == pytest.approx(1000.0 / 41.5)
    assert (figure.ratio_bound, figure.unedited_ppl) == (1.5, 41.5)
    assert "the collapse line 24.1x (dotted: edited perplexity 1000 over the unedited 41.5)" in figure.caption

    off = by_editor(with_bounds(run, collapse_ppl=math.inf))["rome"]
    assert off.collapse_ratio is None and "no collapse line (collapse_ppl is off)" in off.notes

    def other_baseline(r: CaseRecord) -> CaseRecord:
        return with_metrics(r, ppl_unedited=50.0) if r.test_id.endswith("normal-0007") else r

    differs = by_editor(with_cases(run, other_baseline))["rome"]
    assert differs.collapse_ratio is None
    assert "collapse line not drawn: the unedited perplexity differs between records (41.5 to 50)" in differs.notes


def test_floor_is_what_the_records_were_judged_against(run: RunResult) -> None:
    # the golden records predate the recorded floor: nothing to draw but an absolute floor
    figure = by_editor(run)["rome"]
    assert figure.floor is None and "denominator floor not drawn: the results do not record it" in figure.notes
    absolute = by_editor(with_bounds(run, min_denominator_abs=0.5))["rome"]
    assert absolute.floor == 0.5 and any("not recorded; the line is the absolute floor" in n for n in absolute.notes)

    # the harness records the model-derived floor on every record; the binding floor is the larger one
    recorded = with_cases(run, lambda r: with_metrics(r, denominator_floor=0.96))
    assert by_editor(recorded)["rome"].floor == 0.96
    assert "the denominator floor 0.96 (dash-dotted)" in by_editor(recorded)["rome"].caption
    assert by_editor(with_bounds(recorded, min_denominator_abs=2.0))["rome"].floor == 2.0
    assert by_editor(with_cases(run, lambda r: with_metrics(r, denominator_floor=None)))["rome"].notes[-1] == (
        "no denominator floor applied")

    def two_floors(r: CaseRecord) -> CaseRecord:
        return with_metrics(r, denominator_floor=0.5 if r.is_hard else 0.96)

    differs = by_editor(with_cases(run, two_floors))["rome"]
    assert differs.floor is None
    assert "denominator floor not drawn: it differs between records (0.5 to 0.96)" in differs.notes


def test_case_sets_are_coloured_by_name_not_by_a_fixed_list(run: RunResult) -> None:
    colours = case_set_colours(["normal", "real-hard", "hard", "normal"])
    assert list(colours) == ["hard", "normal", "real-hard"] and len(set(colours.values())) == 3
    assert "tab:red" not in colours.values()  # the collapse line's colour
    assert len(set(case_set_colours(f"set{i}" for i in range(20)).values())) == 8  # the cycle repeats

    def rename(r: CaseRecord) -> CaseRecord:
        return dataclasses.replace(r, case_set="real-hard") if r.test_id.endswith("hard-0001") else r

    figures = by_editor(with_cases(run, rename))
    labels = {s.label: s.colour for f in figures.values() for s in f.series}
    # a set named otherwise than its cases' kind says both; one set, one colour, in every figure
    assert labels["real-hard (hard): not certified (1)"] == labels["real-hard (hard): certified (1)"]
    assert labels["hard: not certified (1)"] != labels["real-hard (hard): certified (1)"]


def test_log_limits_span_two_decades_around_the_values() -> None:
    lo, hi = log_limits([8.8, 10.1]) or (0, 0)
    assert lo < 8.8 and hi > 10.1 and math.log10(hi / lo) == pytest.approx(2.0)
    lo, hi = log_limits([0.031, 11.4, math.nan, -1.0, math.inf]) or (0, 0)
    assert lo == pytest.approx(0.031 / 1.5) and hi == pytest.approx(11.4 * 1.5)
    assert log_limits([math.nan, 0.0]) is None


# ---------------------------------------------------------------------------------------------------
# The files, the links, the job summary


def figure_links(md: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]*denominator-[^)]+)\)", md)


def test_figures_are_written_linked_under_the_denominator_table_and_reproducible(
        tmp_path: Path, run: RunResult, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    first = write_outputs(run, tmp_path / "a" / "r.json", tmp_path / "a" / "r.md")
    second = write_outputs(run, tmp_path / "b" / "r.json", tmp_path / "b" / "r.md")
    md = first.md_path.read_text(encoding="utf-8")
    links = figure_links(md)
    assert links == ["r_plots/denominator-rome-tiny-gpt2-e1119f68.png",
                     "r_plots/denominator-c-rome-tiny-gpt2-5f8e7f73.png"]
    section = md.split("## ROME update")[1].split("\n## ")[0]
    assert all(link in section for link in links)
    assert "_rome on tiny-gpt2: perplexity ratio against \\|uᵀk\\|, log-log: 4 of 5 cases drawn" in section
    for link in links:
        png = first.md_path.parent / link
        assert png in first.plots
        assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
        assert png.read_bytes() == (second.md_path.parent / link).read_bytes()  # no timestamp, no version


def test_a_report_written_again_keeps_only_the_figures_it_links(tmp_path: Path, run: RunResult,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    first = write_outputs(run, tmp_path / "r.json", tmp_path / "r.md")
    folder = tmp_path / "r_plots"
    assert {p.name for p in folder.iterdir()} == {p.name for p in first.plots} and len(first.plots) == 4
    run = replanned(dataclasses.replace(run, sequential=()))  # the denominator figures alone from here on
    users_own = folder / "notes.png"
    users_own.write_bytes(b"mine")
    rome_only = replanned(dataclasses.replace(run, cases=tuple(r for r in run.cases if r.editor == "rome")))
    second = write_outputs(rome_only, tmp_path / "r.json", tmp_path / "r.md")
    links = figure_links(second.md_path.read_text(encoding="utf-8"))
    assert links == ["r_plots/denominator-rome-tiny-gpt2-e1119f68.png"]
    # c-rome's figure of the first run is gone; a file the report never names stays
    assert sorted(p.name for p in folder.iterdir()) == ["denominator-rome-tiny-gpt2-e1119f68.png", "notes.png"]
    users_own.unlink()
    nothing = replanned(dataclasses.replace(run, cases=tuple(r for r in run.cases if r.editor not in ("rome", "c-rome"))))
    third = write_outputs(nothing, tmp_path / "r.json", tmp_path / "r.md")
    assert third.plots == () and not folder.exists()


def test_a_group_whose_values_are_all_unusable_still_gets_its_figure(tmp_path: Path, run: RunResult,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    broken = with_cases(run, lambda r: with_metrics(r, ppl_ratio=math.nan) if r.editor == "c-rome" else r)
    assert by_editor(broken)["c-rome"].n_drawn == 0
    out = write_outputs(broken, tmp_path / "r.json", tmp_path / "r.md")
    assert len(figure_links(out.md_path.read_text(encoding="utf-8"))) == 2
    assert "0 of 4 cases drawn (4 not:" in out.md_path.read_text(encoding="utf-8")


def test_figures_stay_out_of_the_job_summary(tmp_path: Path, run: RunResult, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    out = write_outputs(run, tmp_path / "r.json", tmp_path / "r.md")
    assert len(figure_links(out.md_path.read_text(encoding="utf-8"))) == 2
    text = summary.read_text(encoding="utf-8")
    # relative links do not resolve in a job summary
    assert "![" not in text
    assert ("The perplexity-ratio-against-denominator figures are in the report's directory (not shown in the "
            "job summary).") in text


def test_figures_are_skipped_with_a_note_without_matplotlib(tmp_path: Path, run: RunResult,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plots, "_load_matplotlib", lambda: (_ for _ in ()).throw(ImportError("no matplotlib")))
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    out = write_outputs(run, tmp_path / "r.json", tmp_path / "r.md")
    note = "Perplexity-ratio-against-denominator figures skipped: matplotlib is not installed"
    assert note in out.md_path.read_text(encoding="utf-8") and note in summary.read_text(encoding="utf-8")
    assert out.plots == () and not figure_links(out.md_path.read_text(encoding="utf-8"))
