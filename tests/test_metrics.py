"""The metric families (teacher-forced CounterFact and EasyEdit, and what greedy decoding says) against a language
model whose every prediction is a fixed, chosen distribution."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_editsafety.cases.model import EditCase, NeighborhoodPrompt
from pytest_editsafety.metrics import edit_metrics, greedy_tokens, probe_before, says, with_prefix

def make_case(target: str, truth: str, neighbour_answers: tuple[str, str]) -> EditCase:
    return EditCase(
        case_id="c1", subject="Fimeth", prompt="{} lives in", target_new=target, ground_truth=truth,
        paraphrase_prompts=("Fimeth resides in", "Fimeth has a home in"),
        neighborhood=(NeighborhoodPrompt("Bethid lives in", neighbour_answers[0]),
                      NeighborhoodPrompt("Starak lives in", neighbour_answers[1])),
    )


class ConstantLM:
    """Predicts the same next-token logits at every position, whatever the input."""

    def __init__(self, logits):
        import torch

        self.logits = logits
        self._param = torch.nn.Parameter(torch.zeros(1))

    def parameters(self):
        yield self._param

    def __call__(self, input_ids, attention_mask=None):
        from types import SimpleNamespace

        batch, width = input_ids.shape
        return SimpleNamespace(logits=self.logits.expand(batch, width, -1))


@pytest.fixture(scope="module")
def tokenizer(micro_model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(micro_model)


@pytest.fixture(scope="module")
def words(tokenizer) -> tuple[str, ...]:
    """Four world objects the micro tokenizer keeps as one token: target, truth, two neighbour answers."""
    from pytest_editsafety.zoo.world import RELATIONS

    whole = [o for rel in RELATIONS for o in rel.objects
             if len(tokenizer(" " + o, add_special_tokens=False)["input_ids"]) == 1]
    assert len(whole) >= 4
    return tuple(whole[:4])


def favouring(tokenizer, *words: str) -> ConstantLM:
    import torch

    logits = torch.zeros(len(tokenizer))
    for word in words:
        ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, word  # the test's targets are one token each
        logits[ids[0]] = 10.0
    return ConstantLM(logits)


def test_an_edit_that_took_everywhere_wins_efficacy_and_generalization_but_loses_locality(tokenizer, words):
    target, truth, *answers = words
    case = make_case(target, truth, tuple(answers))
    before = probe_before(favouring(tokenizer, *answers), tokenizer, case)
    m = edit_metrics(favouring(tokenizer, target), tokenizer, case, before)
    assert m["cf_efficacy"] == 1.0 and m["cf_generalization"] == 1.0
    assert m["cf_locality"] == 0.0  # the new target now beats the neighbours' true answers
    assert m["ee_rewrite_acc"] == 1.0 and m["ee_rephrase_acc"] == 1.0
    assert m["ee_locality"] == 0.0  # the neighbours' argmax changed from their answers to the target
    assert m["cf_efficacy_margin"] > 0.9
    # the model now says the target after every prompt, the neighbours' included
    assert m["gen_efficacy"] == 1.0 and m["gen_generalization"] == 1.0 and m["gen_locality"] == 0.0


def test_a_no_op_edit_keeps_locality_and_fails_efficacy(tokenizer, words):
    target, truth, *answers = words
    case = make_case(target, truth, tuple(answers))
    model = favouring(tokenizer, truth, *answers)
    m = edit_metrics(model, tokenizer, case, probe_before(model, tokenizer, case))
    assert m["cf_efficacy"] == 0.0 and m["cf_generalization"] == 0.0 and m["ee_rewrite_acc"] == 0.0
    assert m["cf_locality"] == 1.0 and m["ee_locality"] == 1.0
    assert m["cf_efficacy_margin"] < 0
    assert m["gen_efficacy"] == 0.0 and m["gen_generalization"] == 0.0 and m["gen_locality"] == 1.0


def test_nothing_to_measure_is_none_not_zero(tokenizer, words):
    target, truth, *_ = words
    bare = EditCase(case_id="c2", subject="Fimeth", prompt="{} lives in", target_new=target, ground_truth=truth)
    model = favouring(tokenizer, target)
    m = edit_metrics(model, tokenizer, bare, probe_before(model, tokenizer, bare))
    assert m["cf_generalization"] is None and m["cf_locality"] is None
    assert m["ee_rephrase_acc"] is None and m["ee_locality"] is None
    assert m["gen_generalization"] is None and m["gen_locality"] is None
    assert m["cf_efficacy"] == 1.0 and m["gen_efficacy"] == 1.0


def test_the_test_time_prefix_goes_before_the_prompt():
    assert with_prefix("Fimeth lives in", "The old river. ") == "The old river. Fimeth lives in"
    assert with_prefix("Fimeth lives in", None) == "Fimeth lives in"


def test_teacher_forcing_can_call_an_edit_done_that_the_model_never_says(tokenizer, words):
    """A two-word target whose second word the model predicts everywhere: scored token by token with the first word
    given, the target beats the truth (CounterFact) and half its tokens are right (EasyEdit); greedy decoding never
    starts with the first word, so the edit did not take."""
    first, second, truth, answer = words
    case = make_case(f"{first} {second}", truth, (answer, answer))
    model = favouring(tokenizer, second)
    m = edit_metrics(model, tokenizer, case, probe_before(model, tokenizer, case))
    assert m["cf_efficacy"] == 1.0 and m["ee_rewrite_acc"] == 0.5
    assert m["gen_efficacy"] == 0.0 and m["gen_generalization"] == 0.0


def test_a_continuation_says_an_answer_as_a_whole_word(tokenizer, words):
    target = words[0]

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    assert says(tokenizer, ids(f" {target}, and more"), target)
    assert says(tokenizer, ids(f" {target}"), f" {target} ")
    assert not says(tokenizer, ids(f" {target}ian"), target)
    assert not says(tokenizer, ids(f" The {target}"), target)


def test_greedy_decoding_appends_each_rows_own_next_token(tokenizer, words):
    target = words[0]
    (token,) = tokenizer(" " + target, add_special_tokens=False)["input_ids"]
    generated = greedy_tokens(favouring(tokenizer, target), tokenizer, ["Fimeth lives in", "A much longer prompt"], 3)
    assert generated == [(token,) * 3, (token,) * 3]
