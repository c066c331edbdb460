"""FT-L∞ (the papers' constrained fine-tuning baseline): Adam on one MLP output matrix, kept in an L∞ box.

Only the weight of ``mlp_out`` at ``layer`` is trained; after every optimiser step it is projected back into
``[W₀ − ε, W₀ + ε]`` (:func:`editors.maths.ft.clamp_to_linf_ball`). The loss is the teacher-forced NLL of all
of ``" " + target_new``'s tokens after the request's prompt. The teacher-forced batch and its NLL are also
what MEMIT reports as ``final_nll``, so they live here as small functions.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from editors.base import EditorBase, EditOutcome, EditRequest
from editors.domain import check_count, check_number
from editors.hooks import frozen
from editors.maths.ft import clamp_to_linf_ball, linf_distance
from editors.text import pad_id, padded

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FtHparams:
    layer: int
    num_steps: int = 25
    lr: float = 5e-4
    eps: float = 5e-4  # the papers' norm_constraint: the L∞ radius around the unedited weight
    weight_decay: float = 0.0
    early_stop_nll: float = 0.01

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"FtHparams.layer: expected an int >= 0, got {self.layer!r}")
        check_count(self, ("num_steps",))
        check_number(self, ("lr",), strict=True)
        check_number(self, ("eps", "weight_decay", "early_stop_nll"))


@dataclass(frozen=True)
class TargetBatch:
    """Prompts followed by their target tokens, right-padded; ``pred_*`` index the logits that predict them."""

    input_ids: Tensor
    attention_mask: Tensor
    pred_rows: Tensor  # (total target tokens,)
    pred_cols: Tensor
    target_ids: Tensor
    owner: Tensor  # which request each target token belongs to


def target_batch(tokenizer, requests: Sequence[EditRequest], device) -> TargetBatch:
    """Encode ``prompt + " " + target_new`` per request as prompt ids then target ids.

    Ids are concatenated rather than re-encoding the joined text, so the scored tokens are exactly the
    target's own tokenisation (the one every editor and metric uses for ``" " + target_new``).
    """
    seqs: list[list[int]] = []
    rows: list[int] = []
    cols: list[int] = []
    targets: list[int] = []
    owner: list[int] = []
    for index, request in enumerate(requests):
        prompt_ids = list(tokenizer(request.text)["input_ids"])
        target_ids = list(tokenizer(" " + request.target_new.strip(), add_special_tokens=False)["input_ids"])
        if not prompt_ids or not target_ids:
            raise ValueError(f"request {request!r}: prompt or target encodes to no tokens")
        for j, tok in enumerate(target_ids):
            rows.append(index)
            cols.append(len(prompt_ids) + j - 1)  # the logit one step before the token predicts it
            targets.append(tok)
            owner.append(index)
        seqs.append(prompt_ids + target_ids)
    ids, mask = padded(seqs, pad_id(tokenizer))
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    return TargetBatch(ids.to(device), mask.to(device), as_long(rows), as_long(cols), as_long(targets),
                       as_long(owner))


def per_request_nll(model, batch: TargetBatch, n_requests: int) -> Tensor:
    """Mean target-token NLL per request (differentiable; float32)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    token_nll = -logits.log_softmax(-1)[batch.pred_rows, batch.pred_cols, batch.target_ids]
    sums = torch.zeros(n_requests, device=token_nll.device).index_add(0, batch.owner, token_nll)
    counts = torch.bincount(batch.owner, minlength=n_requests).to(sums.dtype)
    return sums / counts


def target_nll(model, tokenizer, requests: Sequence[EditRequest]) -> list[float]:
    """Each request's mean target-token NLL on the model as it is now (no gradients)."""
    device = next(model.parameters()).device
    batch = target_batch(tokenizer, requests, device)
    with torch.no_grad():
        return [float(x) for x in per_request_nll(model, batch, len(requests))]


class FtLinfEditor(EditorBase):
    """``ft-linf``: constrained fine-tuning of one layer's MLP output weight (one or many requests)."""

    def __init__(self, hparams: FtHparams, *, name: str = "ft-linf"):
        self.name = name
        self.hparams = hparams

    def parameters_touched(self, model, family) -> tuple[str, ...]:
        return (family.layer_name("mlp_out", self.hparams.layer) + ".weight",)

    def apply(self, model, tokenizer, family, requests: list[EditRequest]) -> EditOutcome:
        if not requests:
            raise ValueError(f"{self.name}: no edit requests")
        hp = self.hparams
        name = self.parameters_touched(model, family)[0]
        weight = family.get_module(model, family.layer_name("mlp_out", hp.layer)).weight
        device = weight.device
        batch = target_batch(tokenizer, requests, device)
        W0 = weight.detach().clone()
        previous_grad = weight.grad
        initial_nll = final_nll = float("nan")
        steps = 0
        try:
            # no dropout (the edit must be deterministic) and only the edited weight trains; frozen() gives
            # every flag back, the edited weight's included
            with frozen(model):
                weight.requires_grad_(True)
                weight.grad = None
                optimiser = torch.optim.Adam([weight], lr=hp.lr, weight_decay=hp.weight_decay)
                for step in range(hp.num_steps):
                    optimiser.zero_grad(set_to_none=True)
                    loss = per_request_nll(model, batch, len(requests)).mean()
                    if step == 0:
                        initial_nll = float(loss.detach())
                    if float(loss.detach()) < hp.early_stop_nll:
                        break
                    loss.backward()
                    optimiser.step()
                    clamp_to_linf_ball(weight.detach(), W0, hp.eps, out=weight.detach())
                    steps += 1
                with torch.no_grad():
                    final_nll = float(per_request_nll(model, batch, len(requests)).mean())
        finally:
            weight.grad = previous_grad
        with torch.no_grad():
            delta = weight.detach().float() - W0.float()
            diagnostics = {
                "layer": hp.layer,
                "linf": linf_distance(weight.detach(), W0),
                "eps": float(hp.eps),
                "delta_fro": float(torch.linalg.matrix_norm(delta)),
                "initial_nll": initial_nll,
                "final_nll": final_nll,
                "steps": steps,
                "n_requests": len(requests),
            }
        log.debug("%s at layer %d: %s", self.name, hp.layer, diagnostics)
        return EditOutcome(edited=(name,), diagnostics=diagnostics)
