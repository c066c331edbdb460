"""What an edit did to the model: efficacy, generalization and locality in both metric families.

- CounterFact (ROME/MEMIT papers): per prompt, the length-normalised log-probability of " o*" against
  " o". Efficacy = P(o*) > P(o) on the rewrite prompt; generalization = the same share over paraphrases;
  locality = share of neighbourhood prompts whose true answer still beats o*.
- EasyEdit: teacher-forced token accuracy of the target on the rewrite prompt (rewrite_acc) and the
  paraphrases (rephrase_acc); locality = share of neighbourhood answer tokens whose argmax prediction is
  unchanged from the unedited model (needs the unedited predictions, taken before the edit).
- Generation (``gen_*``): what the edited model *says*. Greedy decoding of the rewrite prompt and the paraphrases;
  an edit takes when the continuation starts with the new target as a whole word (``gen_efficacy``,
  ``gen_generalization``); locality = share of neighbourhood prompts whose greedy continuation, as long as their
  answer, is the unedited model's (``gen_locality``). Teacher forcing scores the target's tokens given the
  target's own earlier tokens, so it can call an edit done that the model never produces ("The Mirage of Model
  Editing", 2025: 38.5 % generated against 96.8 % reported); both are recorded, and the bounds read either.

Targets are stored without a leading space; scoring prepends one (" o*"), as the CounterFact code does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from pytest_editsafety.cases.model import EditCase


@dataclass(frozen=True)
class Continuation:
    prompt: str
    answer: str


def _encode_pairs(tokenizer, pairs: Sequence[Continuation]):
    rows = []
    for pair in pairs:
        prompt_ids = tokenizer(pair.prompt)["input_ids"]
        answer_ids = tokenizer(" " + pair.answer.strip(), add_special_tokens=False)["input_ids"]
        rows.append((prompt_ids, answer_ids))
    return rows


def answer_scores(model, tokenizer, pairs: Sequence[Continuation], *, batch_size: int = 64):
    """Per pair: (mean log-prob of the answer tokens, teacher-forced argmax tokens at the answer positions)."""
    import torch

    from editors.text import pad_id, padded

    rows = _encode_pairs(tokenizer, pairs)
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    results: list[tuple[float, tuple[int, ...]]] = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            # right padding: positions stay those of the unpadded text
            ids, mask = padded([p + a for p, a in chunk], pad)
            log_probs = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().log_softmax(-1)
            for i, (prompt_ids, answer_ids) in enumerate(chunk):
                cols = torch.arange(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(answer_ids), device=device)
                lp = log_probs[i, cols, torch.tensor(answer_ids, device=device)]
                results.append((float(lp.mean()), tuple(log_probs[i, cols].argmax(-1).tolist())))
    return results


def _share(values: Sequence[float]) -> float | None:
    """Mean of 0/1 flags or accuracies; None when there is nothing to measure (no paraphrases, say)."""
    return sum(values) / len(values) if values else None


def with_prefix(prompt: str, prefix: str | None) -> str:
    return prompt if not prefix else f"{prefix.rstrip()} {prompt}"


def greedy_tokens(model, tokenizer, prompts: Sequence[str], n_tokens: int, *, batch_size: int = 64
                  ) -> list[tuple[int, ...]]:
    """The first ``n_tokens`` tokens the model generates after each prompt, greedily (argmax, no sampling)."""
    import torch

    from editors.text import pad_id, padded

    rows = [list(tokenizer(prompt)["input_ids"]) for prompt in prompts]
    starts = [len(row) for row in rows]
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    with torch.no_grad():
        for _ in range(n_tokens):
            for first in range(0, len(rows), batch_size):
                chunk = rows[first:first + batch_size]
                # right padding: each row's next token is read at its own last position
                ids, mask = padded(chunk, pad)
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                last = torch.tensor([len(row) - 1 for row in chunk], device=device)
                for row, token in zip(chunk, logits[torch.arange(len(chunk), device=device), last].argmax(-1).tolist()):
                    row.append(int(token))
    return [tuple(row[start:]) for row, start in zip(rows, starts)]


def says(tokenizer, generated: Sequence[int], answer: str) -> bool:
    """Whether a generated continuation starts with ``answer`` as a whole word (``" Paris,"``, not ``" Parisian"``)."""
    text = tokenizer.decode(list(generated), skip_special_tokens=True).lstrip()
    answer = answer.strip()
    return text.startswith(answer) and not text[len(answer):len(answer) + 1].isalnum()


def _answer_length(tokenizer, answer: str) -> int:
    return len(tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class Probe:
    """The unedited model's answers, taken once before an edit: its teacher-forced argmax tokens (EasyEdit locality)
    and its greedy continuations (generation locality) of each neighbourhood prompt."""

    neighbour_argmax: tuple[tuple[int, ...], ...]
    neighbour_generated: tuple[tuple[int, ...], ...] = ()


def probe_before(model, tokenizer, case: EditCase) -> Probe:
    pairs = [Continuation(n.prompt, n.answer) for n in case.neighborhood]
    n_tokens = max((_answer_length(tokenizer, n.answer) for n in case.neighborhood), default=0)
    generated = greedy_tokens(model, tokenizer, [n.prompt for n in case.neighborhood], n_tokens) if n_tokens else []
    return Probe(tuple(argmax for _, argmax in answer_scores(model, tokenizer, pairs)),
                 tuple(tokens[:_answer_length(tokenizer, n.answer)] for tokens, n in zip(generated, case.neighborhood)))


def edit_metrics(model, tokenizer, case: EditCase, before: Probe, *, test_prefix: str | None = None) -> dict[str, float | None]:
    """Both metric families for an edited model. ``test_prefix`` (C-ROME + prefix) is prepended to the
    rewrite and paraphrase prompts; neighbourhood prompts are asked as they are."""
    rewrite = with_prefix(case.rewrite_prompt, test_prefix)
    paraphrases = [with_prefix(p, test_prefix) for p in case.paraphrase_prompts]
    pairs: list[Continuation] = []
    for prompt in [rewrite, *paraphrases]:
        pairs += [Continuation(prompt, case.target_new), Continuation(prompt, case.ground_truth)]
    for n in case.neighborhood:
        pairs += [Continuation(n.prompt, n.answer), Continuation(n.prompt, case.target_new)]
    scores = answer_scores(model, tokenizer, pairs)
    target_ids = tokenizer(" " + case.target_new.strip(), add_special_tokens=False)["input_ids"]
    n_prompts = 1 + len(paraphrases)
    wins = [scores[2 * i][0] > scores[2 * i + 1][0] for i in range(n_prompts)]
    accs = [_token_accuracy(scores[2 * i][1], target_ids) for i in range(n_prompts)]
    neighbour_scores = scores[2 * n_prompts:]
    keeps = [neighbour_scores[2 * j][0] > neighbour_scores[2 * j + 1][0] for j in range(len(case.neighborhood))]
    unchanged = [_token_accuracy(neighbour_scores[2 * j][1], before.neighbour_argmax[j])
                 for j in range(len(case.neighborhood))]
    # generation: the target's length and one token more (the whole-word check), neighbours their answers' lengths
    prompts = [rewrite, *paraphrases, *(n.prompt for n in case.neighborhood)]
    lengths = [len(target_ids) + 1] * n_prompts + [len(a) for a in before.neighbour_generated]
    generated = greedy_tokens(model, tokenizer, prompts, max(lengths))
    said = [says(tokenizer, tokens, case.target_new) for tokens in generated[:n_prompts]]
    kept = [tokens[:len(unedited)] == unedited
            for tokens, unedited in zip(generated[n_prompts:], before.neighbour_generated)]
    return {
        "cf_efficacy": float(wins[0]),
        "cf_generalization": _share(wins[1:]),
        "cf_locality": _share(keeps),
        "cf_efficacy_margin": math.exp(scores[0][0]) - math.exp(scores[1][0]),
        "ee_rewrite_acc": accs[0],
        "ee_rephrase_acc": _share(accs[1:]),
        "ee_locality": _share(unchanged),
        "gen_efficacy": float(said[0]),
        "gen_generalization": _share(said[1:]),
        "gen_locality": _share(kept),
    }


def case_metrics(model, tokenizer, case: EditCase, before: Probe, *, test_prefix: str | None) -> dict[str, float | None]:
    """:func:`edit_metrics` behind ``test_prefix`` (C-ROME + prefix asks hard cases behind it) and, with a prefix,
    ``cf_efficacy_without_prefix``: the edit's CounterFact efficacy asked without it."""
    metrics = edit_metrics(model, tokenizer, case, before, test_prefix=test_prefix)
    if test_prefix:
        metrics["cf_efficacy_without_prefix"] = rewrite_efficacy(model, tokenizer, [case])[0]
    return metrics


def rewrite_efficacy(model, tokenizer, cases: Sequence[EditCase],
                     prefixes: Sequence[str | None] | None = None) -> list[float]:
    """Each case's CounterFact efficacy (1.0 when P(o*) > P(o) on its rewrite prompt, else 0.0), exactly as
    ``edit_metrics`` scores it, for many cases in one batched pass; ``prefixes`` are their test-time prefixes."""
    prefixes = list(prefixes) if prefixes is not None else [None] * len(cases)
    if len(prefixes) != len(cases):
        raise ValueError(f"{len(prefixes)} prefixes for {len(cases)} cases")
    pairs: list[Continuation] = []
    for case, prefix in zip(cases, prefixes):
        prompt = with_prefix(case.rewrite_prompt, prefix)
        pairs += [Continuation(prompt, case.target_new), Continuation(prompt, case.ground_truth)]
    scores = answer_scores(model, tokenizer, pairs)
    return [float(scores[2 * i][0] > scores[2 * i + 1][0]) for i in range(len(cases))]


def _token_accuracy(predicted: Sequence[int], expected: Sequence[int]) -> float:
    if not expected:
        return float("nan")
    return sum(int(p == e) for p, e in zip(predicted, expected)) / len(expected)
