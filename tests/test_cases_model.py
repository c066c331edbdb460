"""The edit-case model: construction, canonical dict round trip, validation messages."""

from __future__ import annotations

import json
import pickle

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pytest_editsafety.cases.model import (
    CaseSet,
    EditCase,
    FrozenMetadata,
    NeighborhoodPrompt,
    case_problems,
    template_problems,
)
from pytest_editsafety.cases.problems import CaseProblem, CaseValidationError


def make_case(**overrides: object) -> EditCase:
    fields: dict[str, object] = {
        "case_id": "c1",
        "subject": "Twitter",
        "prompt": "{} was acquired by",
        "target_new": "Microsoft",
        "ground_truth": "Elon Musk",
        "paraphrase_prompts": ("In a famous deal, Twitter was bought by",),
        "neighborhood": (NeighborhoodPrompt("Instagram was acquired by", "Facebook"),),
        "metadata": {"relation": "acquired_by", "year": 2022},
    }
    fields.update(overrides)
    return EditCase(**fields)  # type: ignore[arg-type]


def problem_fields(error: CaseValidationError) -> list[str]:
    return [p.field for p in error.problems]


# --- construction ------------------------------------------------------------------------------


def test_rewrite_prompt_fills_the_subject_and_reports_its_span() -> None:
    case = make_case(prompt="The headquarters of {} are in", subject="Nokia")
    assert case.rewrite_prompt == "The headquarters of Nokia are in"
    start, end = case.subject_span
    assert case.rewrite_prompt[start:end] == "Nokia"
    assert start == len("The headquarters of ")


def test_rewrite_prompt_keeps_other_braces_literal() -> None:
    # str.format would choke on (or consume) other braces; the template only has one placeholder.
    case = make_case(prompt="{} uses {{config}} files and", subject="Emacs")
    assert case.rewrite_prompt == "Emacs uses {{config}} files and"


def test_lists_and_dicts_are_frozen_into_hashable_forms() -> None:
    case = make_case(paraphrase_prompts=["a Twitter b"], neighborhood=[NeighborhoodPrompt("x y", "z")])
    assert isinstance(case.paraphrase_prompts, tuple)
    assert isinstance(case.neighborhood, tuple)
    assert isinstance(case.metadata, FrozenMetadata)
    same = make_case(paraphrase_prompts=("a Twitter b",), neighborhood=(NeighborhoodPrompt("x y", "z"),))
    assert case == same and hash(case) == hash(same)
    with pytest.raises(AttributeError):
        case.subject = "Other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        case.metadata["year"] = 1999  # type: ignore[index]


def test_with_hard_returns_a_copy_and_leaves_the_original() -> None:
    case = make_case()
    hard = case.with_hard(True)
    assert hard.is_hard is True and case.is_hard is None
    assert hard != case
    assert hard.with_hard(None) == case


def test_cases_pickle_for_worker_processes() -> None:
    case = make_case(is_hard=False)
    assert pickle.loads(pickle.dumps(case)) == case
    case_set = CaseSet(name="s", cases=(case,), source="mem", format="canonical")
    assert pickle.loads(pickle.dumps(case_set)) == case_set


def test_metadata_equality_keeps_bools_and_ints_apart() -> None:
    # A canonical round trip must not turn a flag into a count or back.
    assert FrozenMetadata({"a": True}) != FrozenMetadata({"a": 1})
    assert FrozenMetadata({"a": 1, "b": "x"}) == FrozenMetadata({"b": "x", "a": 1})
    assert FrozenMetadata({"a": 1}) == {"a": 1}


# --- canonical dict ----------------------------------------------------------------------------


def test_to_dict_is_plain_json_and_from_dict_inverts_it() -> None:
    case = make_case(is_hard=True)
    data = case.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["neighborhood"] == [{"prompt": "Instagram was acquired by", "answer": "Facebook"}]
    assert data["is_hard"] is True
    assert EditCase.from_dict(json.loads(json.dumps(data))) == case


def test_to_dict_omits_an_unset_hardness() -> None:
    assert "is_hard" not in make_case().to_dict()


safe_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="{}"), min_size=1, max_size=12
)
word = safe_text.filter(lambda s: s.strip() == s and bool(s.strip()))
scalar = st.one_of(
    st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=False, allow_infinity=False), safe_text
)


@st.composite
def edit_cases(draw: st.DrawFn) -> EditCase:
    subject = draw(word)
    prefix = draw(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=8))
    suffix = draw(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=8))
    prompt = f"{prefix}{{}}{suffix}"
    assume(not template_problems(prompt))
    target_new = draw(word)
    ground_truth = draw(word)
    assume(target_new.casefold() != ground_truth.casefold())
    paraphrases = draw(st.lists(word, max_size=3))
    neighborhood = draw(st.lists(st.builds(NeighborhoodPrompt, word, word), max_size=3))
    metadata = draw(st.dictionaries(safe_text, scalar, max_size=3))
    return EditCase(
        case_id=draw(word),
        subject=subject,
        prompt=prompt,
        target_new=target_new,
        ground_truth=ground_truth,
        paraphrase_prompts=tuple(paraphrases),
        neighborhood=tuple(neighborhood),
        metadata=metadata,
        is_hard=draw(st.sampled_from([None, True, False])),
    )


@settings(max_examples=60, deadline=None)
@given(edit_cases())
def test_canonical_round_trip_through_json_is_exact(case: EditCase) -> None:
    text = json.dumps(case.to_dict(), ensure_ascii=False)
    again = EditCase.from_dict(json.loads(text))
    assert again == case
    assert again.to_dict() == case.to_dict()
    for (key, value), (key2, value2) in zip(sorted(case.metadata.items()), sorted(again.metadata.items())):
        assert key == key2 and type(value) is type(value2)


# --- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        ({"subject": ""}, "subject", "empty"),
        ({"subject": "   "}, "subject", "empty"),
        ({"subject": " Twitter"}, "subject", "whitespace"),
        ({"prompt": "was acquired by"}, "prompt", "no '{}'"),
        ({"prompt": "{} and {} were acquired by"}, "prompt", "2 '{}'"),
        ({"prompt": "{}"}, "prompt", "nothing but"),
        ({"target_new": ""}, "target_new", "empty"),
        ({"target_new": " \t"}, "target_new", "empty"),
        ({"target_new": " Microsoft"}, "target_new", "leading or trailing"),
        ({"target_new": "elon musk "}, "target_new", None),
        ({"target_new": "ELON MUSK"}, "target_new", "equals the ground truth"),
        ({"ground_truth": ""}, "ground_truth", "empty"),
        ({"paraphrase_prompts": "Twitter was bought by"}, "paraphrase_prompts", "list of strings"),
        ({"paraphrase_prompts": ("ok Twitter", 3)}, "paraphrase_prompts[1]", "must be a string"),
        ({"paraphrase_prompts": ("{} was bought by",)}, "paraphrase_prompts[0]", "'{}'"),
        ({"neighborhood": (("Instagram was acquired by", "Facebook"),)}, "neighborhood[0]", "NeighborhoodPrompt"),
        ({"neighborhood": (NeighborhoodPrompt("Instagram was acquired by", ""),)}, "neighborhood[0].answer", "empty"),
        ({"neighborhood": (NeighborhoodPrompt("{} was acquired by", "Facebook"),)}, "neighborhood[0].prompt", "'{}'"),
        ({"metadata": {"tags": ["a"]}}, "metadata.tags", "string, number or boolean"),
        ({"metadata": {"x": float("nan")}}, "metadata.x", "finite"),
        ({"metadata": "relation=x"}, "metadata", "object"),
        ({"is_hard": "yes"}, "is_hard", "true, false or null"),
        ({"case_id": ""}, "case_id", "empty"),
        ({"case_id": 7}, "case_id", "must be a string"),
    ],
)
def test_each_invalid_field_is_named(overrides: dict[str, object], field: str, words: str | None) -> None:
    with pytest.raises(CaseValidationError) as caught:
        make_case(**overrides)
    assert field in problem_fields(caught.value)
    problem = next(p for p in caught.value.problems if p.field == field)
    if words is not None:
        assert words in problem.message
    assert f"field {field!r}" in str(caught.value)


def test_every_problem_of_a_case_is_reported_at_once() -> None:
    with pytest.raises(CaseValidationError) as caught:
        make_case(subject="", prompt="no placeholder", target_new="", paraphrase_prompts="x")
    assert set(problem_fields(caught.value)) >= {"subject", "prompt", "target_new", "paraphrase_prompts"}


def test_case_problems_lists_nothing_for_a_valid_case() -> None:
    case = make_case()
    assert (
        case_problems(
            case_id=case.case_id,
            subject=case.subject,
            prompt=case.prompt,
            target_new=case.target_new,
            ground_truth=case.ground_truth,
            paraphrase_prompts=case.paraphrase_prompts,
            neighborhood=case.neighborhood,
            metadata=case.metadata,
        )
        == []
    )


def test_from_dict_names_missing_and_unknown_fields() -> None:
    data = make_case().to_dict()
    del data["target_new"]
    data["paraphrases"] = []
    data["neighborhood"] = [{"prompt": "Instagram was acquired by"}]
    with pytest.raises(CaseValidationError) as caught:
        EditCase.from_dict(data)
    fields = problem_fields(caught.value)
    assert "target_new" in fields
    assert "paraphrases" in fields
    assert "neighborhood[0].answer" in fields


def test_from_dict_accepts_an_integer_id_as_its_string() -> None:
    data = make_case().to_dict()
    data["case_id"] = 12
    assert EditCase.from_dict(data).case_id == "12"


def test_case_set_refuses_duplicate_ids_naming_both_entries() -> None:
    a, b = make_case(case_id="x"), make_case(case_id="x", subject="Skype", paraphrase_prompts=())
    with pytest.raises(CaseValidationError) as caught:
        CaseSet(name="s", cases=(a, make_case(case_id="y"), b), source="mem.json", format="canonical")
    (problem,) = caught.value.problems
    assert problem.field == "case_id" and problem.index == 2 and problem.case_id == "x"
    assert "first used by entry 0" in problem.message
    assert "mem.json" in str(caught.value)


def test_case_set_helpers_split_by_hardness() -> None:
    cases = (make_case(case_id="a", is_hard=True), make_case(case_id="b", is_hard=False), make_case(case_id="c"))
    case_set = CaseSet(name="s", cases=cases, source="mem", format="canonical")
    assert [c.case_id for c in case_set.hard()] == ["a"]
    assert [c.case_id for c in case_set.normal()] == ["b"]
    assert case_set.by_id("c") is cases[2]
    with pytest.raises(KeyError):
        case_set.by_id("zzz")
    assert len(case_set) == 3 and list(case_set) == list(cases)


def test_error_message_lists_the_first_problems_and_counts_the_rest() -> None:
    problems = [CaseProblem("target_new", "is empty", file="f.json", index=i) for i in range(25)]
    error = CaseValidationError(problems, limit=20)
    text = str(error)
    assert text.startswith("25 problems with edit cases in f.json")
    assert "entry 19" in text and "entry 20:" not in text
    assert "... and 5 more problems" in text
    assert len(error.problems) == 25


def test_errors_survive_pickling_with_their_problems() -> None:
    error = CaseValidationError([CaseProblem("subject", "is empty", file="f.json", index=3, case_id="c3", line=9)])
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is CaseValidationError
    assert again.problems == error.problems
    assert str(again) == str(error)
    assert "f.json: entry 3 (id 'c3', line 9): field 'subject': is empty" in str(again)


def test_the_cases_package_imports_no_heavy_libraries() -> None:
    # The plugin imports this package at collection time; torch/transformers must stay unloaded.
    import subprocess
    import sys

    code = (
        "import sys, pytest_editsafety.cases, pytest_editsafety.cases.classify, pytest_editsafety.cases.formats; "
        "print(sorted(m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
