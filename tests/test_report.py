"""The markdown report: golden rendering, escaping of hostile text, plots, job summary, the report CLI.

Golden files: ``tests/golden/report.md`` and ``report_vs_baseline.md`` are rendered from the fixed
``run.json`` / ``baseline.json``. After an intended change to the report, regenerate them with
``EDITSAFETY_UPDATE_GOLDEN=1 pytest tests/test_report.py`` and review the diff.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from pytest_editsafety import report_cli
from pytest_editsafety.report import escape_md, exit_code, plots, render_markdown, write_outputs
from pytest_editsafety.results import RunResult, compare, read_result, write_result
from tests.results_helpers import replanned, shards

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("EDITSAFETY_UPDATE_GOLDEN") == "1"


@pytest.fixture
def run() -> RunResult:
    return read_result(GOLDEN / "run.json")


@pytest.fixture
def baseline() -> RunResult:
    return read_result(GOLDEN / "baseline.json")


def certified_only(result: RunResult) -> RunResult:
    """The certified records, planned as a run of exactly those (a narrower plan, fully covered)."""
    return replanned(result, drop={r.test_id for r in (*result.cases, *result.sequential) if not r.ok})


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.write_text(text, encoding="utf-8")
        return
    assert path.exists(), f"{path} is missing; create it with EDITSAFETY_UPDATE_GOLDEN=1"
    assert text == path.read_text(encoding="utf-8"), f"{name} differs; EDITSAFETY_UPDATE_GOLDEN=1 to accept"


# ---------------------------------------------------------------------------------------------------
# Golden rendering


def test_golden_report(run: RunResult) -> None:
    check_golden("report.md", render_markdown(run))


def test_golden_report_against_baseline(run: RunResult, baseline: RunResult) -> None:
    check_golden("report_vs_baseline.md", render_markdown(run, baseline=baseline))


def test_report_content(run: RunResult, baseline: RunResult) -> None:
    md = render_markdown(run, baseline=baseline)
    assert md.splitlines()[2].startswith("> ❌ **NOT CERTIFIED**: 5 of 9 cases certified (3 failed, 1 error, 2 collapses)")
    assert "3 baseline regressions" in md
    for heading in ("## Certification by editor and model", "## ROME update: numerator and denominator",
                    "## Hard vs normal cases", "## Worst cases", "## Not certified", "## Sequential editing",
                    "## Against the baseline"):
        assert heading in md
    # every failing case appears with its reasons
    for record in run.cases:
        if not record.ok:
            assert escape_md(record.violations[0]) in md
    assert "2025-03-01T10:00:00+00:00" in md
    assert render_markdown(run, baseline=baseline) == md  # deterministic


def test_certified_banner_and_no_failure_section(run: RunResult) -> None:
    md = render_markdown(certified_only(run))
    assert "> ✅ **CERTIFIED**: 5 of 5 cases certified; 1 of 1 sequential runs certified." in md
    assert "## Not certified" not in md
    assert "## Against the baseline" not in md
    assert "**not certified**" not in md


def test_empty_run_is_not_certified(run: RunResult) -> None:
    empty = RunResult(run.metadata)
    assert "NOT CERTIFIED**: the run holds no records" in render_markdown(empty)
    assert exit_code(empty, []) == 1


def test_exit_codes(run: RunResult, baseline: RunResult) -> None:
    assert exit_code(run, []) == 1
    good = certified_only(run)
    assert exit_code(good, []) == 0
    assert exit_code(good, compare(good, baseline)) == 1  # a lost case fails even an all-certified run
    assert exit_code(good, compare(good, baseline, allow_missing=True)) == 1  # c-rome's max ppl ratio grew
    assert exit_code(shards(good, [{good.cases[0].test_id}])[0], []) == 1  # a shard alone is partial


# ---------------------------------------------------------------------------------------------------
# Escaping

HOSTILE = "Olm|st `rm -rf` *x* _y_ [a](javascript:x) <script>alert(1)</script>\n# head\r\n| --- |\\|~~z~~ $x$ &amp;"
SPECIAL = "\\`*_[]#|~$"


def unescaped_specials(text: str) -> list[str]:
    """Markdown specials in ``text`` not preceded by an odd number of backslashes."""
    found = []
    for m in re.finditer(r"(\\*)([`*_\[\]#|~$])", text):
        if len(m.group(1)) % 2 == 0:
            found.append(m.group(2))
    return found


def unescape(text: str) -> str:
    text = re.sub(r"\\(.)", r"\1", text)
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def test_escape_md_hostile_text() -> None:
    out = escape_md(HOSTILE)
    assert "\n" not in out and "\r" not in out
    assert "<" not in out and ">" not in out
    assert "&lt;script&gt;" in out
    assert unescaped_specials(out) == []
    assert "\\|" in out and "\\`rm -rf\\`" in out and "\\[a\\](javascript:x)" in out
    assert escape_md("&lt;") == "&amp;lt;"  # an entity typed by a user stays literal text
    assert escape_md("a\x00b\u2028c") == "ab c"


@given(st.text())
@example("a\u2060b\u202ec")  # found by hypothesis: invisible characters are shown, not kept
def test_escape_md_is_inert_and_lossless(text: str) -> None:
    out = escape_md(text)
    assert not re.search(r"[\r\n\u2028\u2029<>]", out)
    assert unescaped_specials(out) == []
    expected = re.sub(r"\r\n|[\r\n\t\v\f\x1c-\x1e\x85\u2028\u2029]", " ", text)
    expected = re.sub(r"[\x00-\x08\x0e-\x1b\x1f\x7f-\x84\x86-\x9f]", "", expected)
    # bidi controls and invisible characters are shown by their code point, not kept
    expected = re.sub("[\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]",
                      lambda m: f"(U+{ord(m.group()):04X})", expected)
    assert unescape(out) == expected


def cells(row: str) -> list[str]:
    """Split a markdown table row on unescaped pipes."""
    parts = re.split(r"(?<!\\)\|", row)
    return [p.strip() for p in parts[1:-1]]


def test_hostile_case_text_cannot_break_the_tables(run: RunResult) -> None:
    hostile = [
        dataclasses.replace(r, subject="S|u`b", prompt=HOSTILE + " {}", target_new="<img src=x onerror=alert(1)>",
                            violations=r.violations + ("reason | with\nnewline <b>",))
        if not r.ok else r
        for r in run.cases
    ]
    md = render_markdown(dataclasses.replace(run, cases=tuple(hostile)))
    assert "<script" not in md and "<img" not in md and "<b>" not in md
    for table in re.findall(r"(?:^\|.*\n)+", md, flags=re.M):
        rows = table.strip("\n").split("\n")
        width = len(cells(rows[0]))
        assert all(len(cells(row)) == width for row in rows), table
    assert "&lt;img src=x onerror=alert(1)&gt;" in md


# ---------------------------------------------------------------------------------------------------
# Outputs, plots and the job summary


def test_write_outputs_writes_json_markdown_and_plots(tmp_path: Path, run: RunResult,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    out = write_outputs(run, tmp_path / "r" / "editsafety.json", tmp_path / "r" / "editsafety.md")
    assert out.exit_code == 1
    assert read_result(out.json_path).to_dict() == run.to_dict()
    md = out.md_path.read_text(encoding="utf-8")
    # the sequential plots, then one perplexity-ratio-against-denominator figure per (editor, model)
    n_sequential = len({(r.editor, r.model, r.case_set) for r in run.sequential})
    n_denominator = len({(r.editor, r.model) for r in run.cases if r.metrics.get("denominator") is not None})
    assert (n_sequential, n_denominator) == (2, 2)
    assert len(out.plots) == n_sequential + n_denominator
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == len(out.plots)
    for link in links:
        png = out.md_path.parent / link
        assert png in out.plots
        data = png.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    assert not [p for p in out.md_path.parent.rglob("*.tmp")]


def test_plots_are_skipped_with_a_note_without_matplotlib(tmp_path: Path, run: RunResult,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> None:
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(plots, "_load_matplotlib", missing)
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    out = write_outputs(run, tmp_path / "a.json", tmp_path / "a.md")
    md = out.md_path.read_text(encoding="utf-8")
    assert "Sequential plots skipped: matplotlib is not installed" in md
    assert out.plots == () and "![" not in md


def test_no_plots_without_sequential_records_or_denominators(tmp_path: Path, run: RunResult,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    # as a MEMIT, FT or MEND run records it: no denominator, so no perplexity-ratio-against-denominator figure
    cases = tuple(dataclasses.replace(r, metrics={**r.metrics, "denominator": None}) for r in run.cases)
    out = write_outputs(dataclasses.replace(run, sequential=(), cases=cases), tmp_path / "a.json", tmp_path / "a.md")
    assert out.plots == ()
    assert not (tmp_path / "a_plots").exists()
    md = out.md_path.read_text(encoding="utf-8")
    assert "## Sequential editing" not in md and "figures" not in md


def test_github_step_summary_is_appended(tmp_path: Path, run: RunResult, baseline: RunResult,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plots, "_load_matplotlib", lambda: (_ for _ in ()).throw(ImportError("no")))
    summary = tmp_path / "summary.md"
    summary.write_text("previous step\n", encoding="utf-8")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    out = write_outputs(run, tmp_path / "a.json", tmp_path / "a.md", baseline=baseline)
    text = summary.read_text(encoding="utf-8")
    assert text.startswith("previous step\n# Model-editing certification report\n")
    assert "3 baseline regressions" in text
    assert len(out.regressions) == 3 and out.exit_code == 1
    write_outputs(run, tmp_path / "a.json", tmp_path / "a.md")
    assert summary.read_text(encoding="utf-8").count("# Model-editing certification report") == 2


# ---------------------------------------------------------------------------------------------------
# The report CLI


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = report_cli.main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def quiet_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    # plots are covered above; the CLI tests need not pay for matplotlib
    monkeypatch.setattr(plots, "_load_matplotlib", lambda: (_ for _ in ()).throw(ImportError("skip")))


@pytest.mark.usefixtures("quiet_cli")
def test_cli_rerenders_with_the_same_verdict(tmp_path: Path, run: RunResult,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out_json, out_md = tmp_path / "o.json", tmp_path / "o.md"
    code, stdout, _ = cli([str(GOLDEN / "run.json"), "--json", str(out_json), "--md", str(out_md)], capsys)
    assert code == 1
    assert stdout.startswith("NOT CERTIFIED: 5/9 cases certified, 1/2 sequential runs")
    assert read_result(out_json).to_dict() == run.to_dict()
    assert "NOT CERTIFIED" in out_md.read_text(encoding="utf-8")

    good = tmp_path / "good.json"
    write_result(certified_only(run), good)
    code, stdout, _ = cli([str(good), "--json", str(out_json), "--md", str(out_md)], capsys)
    assert code == 0 and stdout.startswith("CERTIFIED: 5/5 cases certified")


@pytest.mark.usefixtures("quiet_cli")
def test_cli_merges_shards_and_applies_the_baseline(tmp_path: Path, run: RunResult,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    good = certified_only(run)
    ids = [r.test_id for r in good.cases]
    a, b = shards(good, [{*ids[:2], *(r.test_id for r in good.sequential)}, set(ids[2:])])
    write_result(a, tmp_path / "a.json")
    write_result(b, tmp_path / "b.json")
    out_json, out_md = tmp_path / "merged.json", tmp_path / "merged.md"
    args = [str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--json", str(out_json), "--md", str(out_md)]
    code, _, _ = cli(args, capsys)
    assert code == 0
    assert [r.test_id for r in read_result(out_json).cases] == sorted(ids)
    # the baseline's failing tests are not in these shards: each is a regression
    code, stdout, _ = cli(args + ["--baseline", str(GOLDEN / "baseline.json")], capsys)
    assert code == 1
    assert "6 baseline regression(s)" in stdout
    assert "**missing**: rome-tiny-gpt2-hard-0002 is in the baseline and not in this run" in out_md.read_text("utf-8")
    # allowed to be missing, they are listed; every record is certified, yet c-rome's max ppl ratio grew from
    # 1.04x to 1.16x over the baseline's
    code, stdout, _ = cli(args + ["--baseline", str(GOLDEN / "baseline.json"), "--allow-missing"], capsys)
    assert code == 1
    assert "1 baseline regression(s)" in stdout
    md = out_md.read_text(encoding="utf-8")
    assert "**max-ppl-ratio**: c-rome on tiny-gpt2: max perplexity ratio grew from 1.04x to 1.16x" in md
    assert "5 tests of the baseline are not in this run (allowed to be missing): " in md


@pytest.mark.usefixtures("quiet_cli")
def test_cli_usage_errors_exit_4_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = ["--json", str(tmp_path / "o.json"), "--md", str(tmp_path / "o.md")]
    missing = tmp_path / "missing.json"
    code, _, err = cli([str(missing), *out], capsys)
    assert code == 4 and str(missing) in err

    bad = tmp_path / "bad.json"
    data = json.loads((GOLDEN / "run.json").read_text(encoding="utf-8"))
    data["cases"][2]["metrics"]["ppl_ratio"] = "lots"
    bad.write_text(json.dumps(data), encoding="utf-8")
    code, _, err = cli([str(GOLDEN / "run.json"), str(bad), *out], capsys)
    assert code == 4 and f"{bad}: $.cases[2].metrics.ppl_ratio" in err

    code, _, err = cli([str(GOLDEN / "run.json"), "--baseline", str(missing), *out], capsys)
    assert code == 4 and str(missing) in err

    other_bounds = tmp_path / "other.json"
    data = json.loads((GOLDEN / "run.json").read_text(encoding="utf-8"))
    data["metadata"]["bounds"]["max_ppl_ratio"] = 3.0
    other_bounds.write_text(json.dumps(data), encoding="utf-8")
    code, _, err = cli([str(GOLDEN / "run.json"), str(other_bounds), *out], capsys)
    assert code == 4 and f"{other_bounds} was run with other bounds" in err

    code, _, err = cli([*out], capsys)  # no results file at all
    assert code == 4 and "RESULTS.json" in err
    code, _, err = cli([str(GOLDEN / "run.json"), "--bogus"], capsys)
    assert code == 4 and "--bogus" in err
    assert not (tmp_path / "o.md").exists()


def test_the_report_shows_generated_efficacy_beside_the_teacher_forced(run: RunResult) -> None:
    assert "## Efficacy: scored and said" not in render_markdown(run)  # results from before generation was measured
    said = tuple(dataclasses.replace(r, metrics={**r.metrics, "gen_efficacy": 0.0, "gen_generalization": 0.25})
                 for r in run.cases)
    md = render_markdown(dataclasses.replace(run, cases=said))
    section = md.split("## Efficacy: scored and said", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows and all(cells(row)[5] == "0 %" and cells(row)[7] == "25 %" for row in rows), rows
    assert "A gap means edits that score without being said." in section


def test_hard_cases_that_fail_where_normal_ones_pass_are_explained_per_editor(run: RunResult) -> None:
    def findings(result: RunResult) -> tuple[list[str], str]:
        section = render_markdown(result).split("## Hard vs normal cases", 1)[1].split("\n## ", 1)[0]
        return [line for line in section.splitlines() if line.startswith("- **")], section

    # rome's three hard cases all fail (on every bound but generalization), its two normal ones pass; c-rome's
    # hard cases pass, so it has no line
    lines, section = findings(run)
    assert lines == ["- **rome** on tiny-gpt2: 3 of 3 hard cases not certified against 0 of 2 normal ones; the hard "
                     "ones fail on perplexity 3, denominator floor 3, locality 2, efficacy 1. Median cos(kᵘ, k̄) "
                     "0.4 on hard cases, 0.9 on normal ones."]
    assert "papers' collapse" in section and "averaged over context prefixes" in section
    # an editor that reports no key cosine gets the counts without it; an error is counted as one
    hard = [r for r in run.cases if r.is_hard and r.editor == "rome"]
    changed = {hard[0].test_id: {"violations": ("error: RuntimeError: boom",)}}
    cases = tuple(dataclasses.replace(r, metrics={k: v for k, v in r.metrics.items() if k != "key_cosine"},
                                      **changed.get(r.test_id, {})) for r in run.cases)
    lines, section = findings(dataclasses.replace(run, cases=cases))
    # (the record turned into an error had failed efficacy and locality besides)
    assert lines[0].endswith("fail on perplexity 2, denominator floor 2, error 1, efficacy 1, locality 1.")
    # only efficacy failures: the note says nothing of a collapse
    only_efficacy = tuple(dataclasses.replace(r, violations=("efficacy 0 % (cf_efficacy) is below the bound 80 %",))
                          if r in hard else r for r in run.cases)
    lines, section = findings(dataclasses.replace(run, cases=only_efficacy))
    assert "fail on efficacy 3." in lines[0] and "averaged over context prefixes" in section
    assert "papers' collapse" not in section
    # hard cases that pass leave no finding
    healed = tuple(dataclasses.replace(r, certified=True, violations=(), outcome="passed") if r.is_hard else r
                   for r in run.cases)
    assert findings(dataclasses.replace(run, cases=healed))[0] == []
    assert "Hard cases that fail where normal ones pass" not in render_markdown(dataclasses.replace(run, cases=healed))
