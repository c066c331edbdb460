"""The fuzzer: strategies and the search as plain functions, then the fuzz suite end to end (pytester) on a
micro organism with a no-op editor (it fails the default bounds on the simplest generated case and passes
loose ones on every case), and once on the real tiny-gpt2 with rome."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings

from pytest_editsafety.cases import load_cases, resolve_cases
from pytest_editsafety.fuzz import (
    FuzzTarget,
    case_from_draw,
    edit_cases,
    failure_case_set,
    fuzz_out_path,
    fuzz_search,
    fuzz_settings,
    world_from_organism,
)
from pytest_editsafety.zoo.world import World
from tests.editor_packages import write_editor_package
from tests.zoo_helpers import micro_recipe

REPO = Path(__file__).resolve().parents[1]
CERTIFY = REPO / "suites" / "test_certify.py"
FUZZ = REPO / "suites" / "test_fuzz.py"
WORLD = world_from_organism(World(micro_recipe().world))

FAKE_EDITOR = '''
from editors.base import EditOutcome, EditorBase

class Noop(EditorBase):
    """Changes nothing: every case it is asked to edit fails efficacy."""
    name = "fuzz-noop"
    def parameters_touched(self, model, family):
        return ()
    def apply(self, model, tokenizer, family, requests):
        return EditOutcome(edited=())

def make_noop(hparams):
    return Noop()
'''

SENTENCES = (
    "The river runs past the old mill and into the valley.",
    "A small dog sleeps under the table all afternoon.",
    "People often walk to the market on sunny days.",
    "The teacher wrote a long list on the board.",
)
LOOSE = ("--editsafety-min-efficacy=0", "--editsafety-min-generalization=0", "--editsafety-min-locality=0")


# ---------------------------------------------------------------------------------------------- pure parts


@settings(max_examples=60, deadline=None)
@given(edit_cases(WORLD))
def test_generated_cases_are_valid_edits_of_the_world(case) -> None:
    relation = case.metadata["relation"]
    subject = next(s for s in WORLD.subjects if s.name == case.subject)
    assert case.ground_truth == subject.fact(relation) != case.target_new
    assert case.metadata["subject_first"] is case.prompt.startswith("{}")
    lead_in = case.prompt[: case.prompt.index("{}")]
    assert lead_in in WORLD.lead_ins
    templates = next(r.templates for r in WORLD.relations if r.name == relation)
    assert len(case.paraphrase_prompts) == len(templates) - 1
    assert all(p.startswith(lead_in + case.subject) for p in case.paraphrase_prompts)
    assert case.neighborhood and all(n.answer != case.target_new and not n.prompt.startswith(lead_in + case.subject + " ")
                                     for n in case.neighborhood)
    again = case_from_draw(WORLD, WORLD.subjects.index(subject), [r.name for r in WORLD.relations].index(relation),
                           templates.index(case.prompt[len(lead_in):]), WORLD.lead_ins.index(lead_in),
                           [o for o in next(r.objects for r in WORLD.relations if r.name == relation)
                            if o != case.ground_truth].index(case.target_new))
    assert again == case  # the id names the content: one case, one id


def test_the_derandomized_profile_generates_the_same_cases_twice() -> None:
    def first_cases() -> list[str]:
        seen: list[str] = []
        fuzz_search(lambda case: seen.append(case.case_id) or (), edit_cases(WORLD), fuzz_settings(15))
        return seen

    first = first_cases()
    assert len(first) == 15 and len(set(first)) > 5
    assert first_cases() == first


def test_the_search_shrinks_to_the_simplest_failing_case_and_keeps_every_failure(tmp_path: Path) -> None:
    def check(case):
        broken = case.metadata["relation"] == "sport" and not case.metadata["subject_first"]
        return ("sport behind a lead-in",) if broken else ()

    findings = fuzz_search(check, edit_cases(WORLD), fuzz_settings(30))
    sport = [r.name for r in WORLD.relations].index("sport")
    # shrunk on every axis: first subject, first phrasing, first false target, the first lead-in that is not ""
    assert findings.minimal == case_from_draw(WORLD, 0, sport, 0, 1, 0)
    assert len(findings.failures) > 1  # the first failing case found was not already the minimal one
    assert all(check(case) for case, _ in findings.failures)
    cases = failure_case_set(findings, editor="rome", model="tiny-gpt2")
    assert cases.cases[0].case_id == findings.minimal.case_id and cases.cases[0].metadata["fuzz_minimal"] is True
    assert len(cases) == len(findings.failures) and not any(c.metadata["fuzz_minimal"] for c in cases.cases[1:])
    assert cases.cases[0].metadata["fuzz_violations"] == "sport behind a lead-in"


def test_shrinking_stops_at_the_run_budget_with_the_smallest_failure_found() -> None:
    def check(case):
        return ("sport behind a lead-in",) if case.metadata["relation"] == "sport" and not case.metadata[
            "subject_first"] else ()

    unbounded = fuzz_search(check, edit_cases(WORLD), fuzz_settings(30))
    assert unbounded.tried > 10 and not unbounded.budget_spent
    capped = fuzz_search(check, edit_cases(WORLD), fuzz_settings(30), max_runs=10)
    assert capped.tried == 10 and capped.budget_spent
    assert capped.failures and check(capped.minimal)  # a failing case found so far, reported as the minimal one
    assert capped.failures == unbounded.failures[: len(capped.failures)]  # the same search, cut short
    with pytest.raises(ValueError, match="at least 1"):
        fuzz_search(check, edit_cases(WORLD), fuzz_settings(3), max_runs=0)


def test_the_settings_leave_hypothesis_profiles_alone() -> None:
    from hypothesis import settings as hypothesis_settings

    before = hypothesis_settings._current_profile, dict(hypothesis_settings._profiles)
    chosen = fuzz_settings(7)
    assert chosen.max_examples == 7 and chosen.derandomize and chosen.database is None
    assert (hypothesis_settings._current_profile, dict(hypothesis_settings._profiles)) == before


def test_case_ids_name_everything_the_probe_reads() -> None:
    import dataclasses

    from pytest_editsafety.cases import NeighborhoodPrompt
    from pytest_editsafety.fuzz import _case_id

    case = case_from_draw(WORLD, 0, 0, 0, 0, 0)
    assert case.case_id == _case_id(case)
    other_neighbours = dataclasses.replace(case, neighborhood=(NeighborhoodPrompt("Zed lives in", "Oslo"),))
    other_paraphrases = dataclasses.replace(case, paraphrase_prompts=(case.subject + " was born in",))
    # same subject, prompt, target and truth, but another probe: another id, so no cached probe is reused
    assert len({_case_id(c) for c in (case, other_neighbours, other_paraphrases)}) == 3


def test_a_case_that_raises_is_a_failing_case() -> None:
    def check(case):
        raise IndexError("prompt longer than the model's context")

    findings = fuzz_search(check, edit_cases(WORLD), fuzz_settings(5))
    assert findings.minimal == case_from_draw(WORLD, 0, 0, 0, 0, 0)
    assert findings.violations_of(findings.minimal) == ("error: IndexError: prompt longer than the model's context",)


def test_out_paths_name_editor_and_model() -> None:
    target = FuzzTarget("c-rome", "tiny-gpt2", "tiny-gpt2")
    assert fuzz_out_path("reports/fuzz-{editor}-{model}.json", target) == Path("reports/fuzz-c-rome-tiny-gpt2.json")
    assert fuzz_out_path("/x/all.json", target) == Path("/x/all.json")


def test_vocabulary_subjects_are_single_tokens_at_the_start_and_mid_text(micro_model: Path) -> None:
    from transformers import AutoTokenizer

    from pytest_editsafety.fuzz import vocabulary_words

    tokenizer = AutoTokenizer.from_pretrained(micro_model)
    words = vocabulary_words(tokenizer, limit=5, exclude=WORLD.subjects[0].name.split())
    assert 0 < len(words) <= 5 and len(set(words)) == len(words)
    assert WORLD.subjects[0].name not in words
    for word in words:
        assert word[0].isupper() and word.isalpha()
        assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1
        assert len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1
    assert vocabulary_words(tokenizer, limit=5, exclude=WORLD.subjects[0].name.split()) == words


# ---------------------------------------------------------------------------------------------- the suite


@pytest.fixture(scope="module")
def noop_editor(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory that, on sys.path, installs the editor ``fuzz-noop`` through the editors' entry point."""
    return write_editor_package(tmp_path_factory.mktemp("fuzz-editor"), "editsafety_fuzz_noop", FAKE_EDITOR,
                                {"fuzz-noop": "make_noop"})


@pytest.fixture()
def suites(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, noop_editor: Path,
           micro_model: Path) -> pytest.Pytester:
    import torch

    monkeypatch.setenv("EDITSAFETY_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    monkeypatch.syspath_prepend(str(noop_editor))
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # micro models run far faster on one thread, on a shared CPU many times faster
    pytester.makepyfile(test_certify=CERTIFY.read_text(), test_fuzz=FUZZ.read_text())
    corpus = pytester.path / "corpus.json"
    corpus.write_text(json.dumps([{"Corpus": "test", "Text": t} for t in SENTENCES]))
    cases = pytester.path / "one.json"
    cases.write_text(json.dumps([{"case_id": "one", "subject": "Alpha", "prompt": "{} lives in",
                                  "target_new": "Paris", "ground_truth": "Rome"}]))
    yield pytester
    torch.set_num_threads(previous)
    sys.modules.pop("editsafety_fuzz_noop", None)


def _args(pytester: pytest.Pytester, micro_model: Path, *extra: str) -> list[str]:
    out = pytester.path / "out"
    return [f"--model={micro_model}", "--editor=fuzz-noop", f"--cases={pytester.path / 'one.json'}",
            f"--editsafety-ppl-corpus={pytester.path / 'corpus.json'}", f"--editsafety-report={out / 'r.md'}",
            f"--editsafety-json={out / 'r.json'}", f"--editsafety-fuzz-out={out / 'fuzz-{editor}-{model}.json'}",
            "-p", "no:cacheprovider", *extra]


def _fuzz_file(pytester: pytest.Pytester, micro_model: Path) -> Path:
    return pytester.path / "out" / f"fuzz-fuzz-noop-{micro_model.name}.json"


def test_fuzz_tests_are_deselected_unless_m_names_them(suites: pytest.Pytester, micro_model: Path) -> None:
    bare = suites.runpytest(*_args(suites, micro_model, *LOOSE))
    bare.assert_outcomes(passed=1, deselected=1)  # the certification test ran, the fuzz test did not
    assert not _fuzz_file(suites, micro_model).exists()

    not_fuzz = suites.runpytest(*_args(suites, micro_model, *LOOSE, "-m", "not editsafety_fuzz"))
    not_fuzz.assert_outcomes(passed=1, deselected=1)

    fuzz = suites.runpytest(*_args(suites, micro_model, "-m", "editsafety_fuzz", "--editsafety-fuzz-examples=3"))
    assert fuzz.ret == pytest.ExitCode.TESTS_FAILED
    fuzz.assert_outcomes(failed=1, deselected=1)
    fuzz.stdout.fnmatch_lines([f"*test_generated_cases_keep_the_bounds?fuzz-noop-{micro_model.name}?*",
                               "*failing case(s) in * tried; the minimal one:*", "*replay with: pytest*"])


def test_the_fuzz_file_loads_and_the_certification_suite_replays_it_as_failures(
    suites: pytest.Pytester, micro_model: Path,
) -> None:
    result = suites.runpytest(*_args(suites, micro_model, "-m", "editsafety_fuzz", "--editsafety-fuzz-examples=3"))
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    path = _fuzz_file(suites, micro_model)
    loaded = load_cases(path)
    assert loaded.format == "canonical" and loaded.name == "fuzz"
    assert resolve_cases(str(path)).cases == loaded.cases
    minimal = loaded.cases[0]
    # the untrained micro model prefers some targets already, but the simplest case the world holds (hypothesis
    # tries it first) fails one bound or another, so it is the minimal one
    assert minimal.metadata["fuzz_minimal"] is True and minimal.prompt == "{} lives in"
    assert minimal.subject == WORLD.subjects[0].name
    assert all(c.metadata["fuzz_violations"] for c in loaded.cases)

    replay = suites.runpytest(*_args(suites, micro_model)[:2], f"--cases={path}", *_args(suites, micro_model)[3:])
    assert replay.ret == pytest.ExitCode.TESTS_FAILED
    replay.assert_outcomes(failed=len(loaded), deselected=1)
    replay.stdout.fnmatch_lines([f"*test_edit_is_safe?fuzz-noop-{micro_model.name}-{minimal.case_id}?*"])


def test_derandomized_fuzz_runs_try_the_same_cases(suites: pytest.Pytester, micro_model: Path) -> None:
    def tried() -> list[str]:
        # within loose bounds a no-op passes every case: the search tries its whole budget and writes nothing
        result = suites.runpytest(*_args(suites, micro_model, *LOOSE, "-m", "editsafety_fuzz",
                                         "--editsafety-fuzz-examples=6",
                                         "-o", "log_cli=true", "--log-cli-level=INFO"))
        result.assert_outcomes(passed=1, deselected=1)
        return [line for line in result.outlines if re.search(r"fuzz fuzz-noop-\S+: fuzz-[0-9a-f]+ ", line)]

    first = tried()
    assert len(first) == 6
    assert tried() == first
    assert not _fuzz_file(suites, micro_model).exists()


@pytest.mark.parametrize("option", ["--editsafety-fuzz-examples", "--editsafety-fuzz-max-runs"])
def test_fuzz_budgets_must_be_positive(suites: pytest.Pytester, micro_model: Path, option: str) -> None:
    result = suites.runpytest(*_args(suites, micro_model, "-m", "editsafety_fuzz", f"{option}=0"))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert f"{option}: must be at least 1, got 0" in result.stderr.str()


@pytest.mark.slow
@pytest.mark.organism
def test_fuzzing_rome_on_the_organism_finds_a_case_the_certification_suite_fails(tmp_path: Path) -> None:
    out = tmp_path / "fuzz-{editor}-{model}.json"
    env = {k: v for k, v in os.environ.items() if k != "GITHUB_STEP_SUMMARY"}
    env.setdefault("OMP_NUM_THREADS", "1")
    common = ["--editor=rome", "--model=tiny-gpt2", f"--editsafety-report={tmp_path / 'r.md'}",
              f"--editsafety-json={tmp_path / 'r.json'}", "-p", "no:cacheprovider", "-q"]
    fuzz = subprocess.run([sys.executable, "-m", "pytest", str(REPO / "suites"), "-m", "editsafety_fuzz",
                           "--editsafety-fuzz-examples=8", f"--editsafety-fuzz-out={out}", *common], cwd=REPO,
                          capture_output=True, text=True, timeout=1200, env=env)
    assert fuzz.returncode == 1, fuzz.stdout[-3000:] + fuzz.stderr[-3000:]
    written = tmp_path / "fuzz-rome-tiny-gpt2.json"
    minimal = load_cases(written).cases[0]
    replay = subprocess.run([sys.executable, "-m", "pytest", str(CERTIFY), f"--cases={written}",
                             "--editsafety-limit=1", *common], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env=env)
    assert replay.returncode == 1, replay.stdout[-3000:] + replay.stderr[-3000:]
    assert f"rome-tiny-gpt2-{minimal.case_id}" in replay.stdout
