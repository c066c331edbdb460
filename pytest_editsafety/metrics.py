"""What an edit did to the model: efficacy, generalization and locality in both metric families.

- CounterFact (ROME/MEMIT papers): per prompt, the length-normalised log-probability of " o*" against
  " o". Efficacy = P(o*) > P(o) on the rewrite prompt; generalization = the same share over paraphrases;
  locality = share of neighbourhood prompts whose true answer still beats o*.
- EasyEdit: teacher-forced token accuracy of the target on the rewrite prompt (rewrite_acc) and the
  paraphrases (rephrase_acc); locality = share of neighbourhood answer tokens whose argmax prediction is
  unchanged from the unedited model (needs the unedited predictions, taken before the edit).

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


@dataclass(frozen=True)
class Probe:
    """The unedited model's answers, taken once before an edit (EasyEdit locality compares against them)."""

    neighbour_argmax: tuple[tuple[int, ...], ...]


def probe_before(model, tokenizer, case: EditCase) -> Probe:
    pairs = [Continuation(n.prompt, n.answer) for n in case.neighborhood]
    return Probe(tuple(argmax for _, argmax in answer_scores(model, tokenizer, pairs)))


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
    return {
        "cf_efficacy": float(wins[0]),
        "cf_generalization": _share(wins[1:]),
        "cf_locality": _share(keeps),
        "cf_efficacy_margin": math.exp(scores[0][0]) - math.exp(scores[1][0]),
        "ee_rewrite_acc": accs[0],
        "ee_rephrase_acc": _share(accs[1:]),
        "ee_locality": _share(unchanged),
    }


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
