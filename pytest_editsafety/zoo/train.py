"""Deterministic training of an organism: seeded init, fixed data order, fixed thread count."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from pytest_editsafety.zoo.data import WindowStream
from pytest_editsafety.zoo.recipe import Recipe

log = logging.getLogger(__name__)


def lr_at(step: int, recipe: Recipe) -> float:
    spec = recipe.train
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    progress = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    floor = spec.lr * spec.min_lr_ratio
    return floor + (spec.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def train(model, recipe: Recipe, stream: WindowStream, *, progress: bool = True,
          frozen_token_ids: Sequence[int] = ()) -> list[float]:
    """Train in place; returns the loss every 50 steps.

    The input-embedding rows of ``frozen_token_ids`` are rescaled to ``recipe.train.subject_embedding_norm``
    and keep that value: their gradient is zeroed and embeddings sit in the group without weight decay, so
    AdamW never moves them. GPT-2 ties its output head to these rows, so there the subjects' output rows are
    fixed too; GPT-J and Llama organisms have their own head."""
    import torch
    from tqdm.auto import tqdm

    spec = recipe.train
    if frozen_token_ids and spec.subject_embedding_norm is None:
        raise ValueError(f"recipe {recipe.name}: frozen_token_ids given but train.subject_embedding_norm is None")
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (decay if param.dim() >= 2 and "wte" not in name and "embed" not in name else no_decay).append(param)
    embedding = model.get_input_embeddings().weight
    if frozen_token_ids and any(param is embedding for param in decay):
        raise ValueError(f"recipe {recipe.name}: the input embedding would get weight decay, which moves fixed rows")
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr, betas=(0.9, 0.98), eps=1e-8,
    )
    hook = None
    losses: list[float] = []
    bar = tqdm(range(spec.steps), desc=f"training {recipe.name}", disable=not progress, mininterval=2.0)
    previous_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(spec.threads)
        torch.manual_seed(spec.seed)
        model.train()
        if frozen_token_ids:
            rows = torch.tensor(sorted(set(frozen_token_ids)), dtype=torch.long)
            with torch.no_grad():
                embedding[rows] *= spec.subject_embedding_norm / embedding[rows].norm(dim=1, keepdim=True)

            def _freeze_rows(grad):
                grad = grad.clone()
                grad[rows] = 0
                return grad

            hook = embedding.register_hook(_freeze_rows)
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, recipe)
            batch = torch.from_numpy(stream.batch())
            out = model(input_ids=batch, labels=batch)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step % 50 == 0 or step == spec.steps - 1:
                losses.append(float(out.loss.detach()))
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        if hook is not None:
            hook.remove()
        torch.set_num_threads(previous_threads)
        model.eval()
    return losses
