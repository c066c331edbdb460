"""Training MEND's editor network on edit requests, the base model frozen (Mitchell et al. 2022, Algorithm 1).

Per outer step, for a batch of ``batch_size`` training edits (the reference configs' ``accumulate_bs``):

1. the gradient factors of each edit's loss on the *unedited* model (one forward and one backward pass to the
   edited layers' outputs; :func:`editors.mend.gradient_factors`);
2. each edit's ``ΔW`` per weight from the network (differentiable in the network's parameters);
3. the edit loss: mean target NLL with ``W + ΔW`` on the edit prompt and on an equivalent prompt (the
   reference code's ``edit_outer``); the update enters as ``x ΔWᵀ`` added to each edited module's output by a
   hook, so the model's tensors are never written;
4. the locality loss: ``KL(p(·|x_loc; W) ‖ p(·|x_loc; W + ΔW))`` over every token of the edit's locality texts;
5. ``c_edit · edit + c_loc · locality`` back-propagated into the network only, gradient norm clipped, Adam on
   the network (``lr``) and on the per-weight step sizes (``lr_lr``), as in the reference trainer.

Before the first step the factors' per-coordinate mean and standard deviation are taken over the first
``norm_batches`` batches of the schedule (the reference code accumulates the same statistics on the fly).
Everything is seeded (network initialisation, data order) and runs at a fixed thread count, so a rerun
gives bit-identical tensors.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from editors.base import TrainingCase
from editors.ft import per_request_nll, target_batch
from editors.maths.mend import MomentAccumulator
from editors.hooks import frozen
from editors.mend_network import MendHparams, MendNetwork, MendTarget, edit_targets, gradient_factors
from editors.text import right_padded

log = logging.getLogger(__name__)

__all__ = ["added_updates", "train_mend"]


@contextlib.contextmanager
def added_updates(model, family, targets: Sequence[MendTarget], deltas: Mapping[str, Tensor],
                  rows_per_edit: int) -> Iterator[None]:
    """Run ``model`` as if each target's weight were ``W + ΔW_e`` for batch rows of edit ``e``.

    ``deltas[name]`` is ``(E, d_out, d_in)``; the batch holds ``E × rows_per_edit`` rows, edit-major. The hook
    adds ``x ΔW_eᵀ`` to the module's output: the same function as the edited weight, differentiable in ``ΔW``.
    """
    handles = []

    def make(delta: Tensor):
        def post(_module, args, output):
            x = args[0]
            n_edits = delta.shape[0]
            if x.shape[0] != n_edits * rows_per_edit:
                raise ValueError(f"added_updates: {x.shape[0]} rows for {n_edits} edits x {rows_per_edit}")
            # the network (and so ΔW) may sit on another device than this layer under a device_map
            grouped = x.reshape(n_edits, rows_per_edit, *x.shape[1:-1], x.shape[-1]).to(delta.device, delta.dtype)
            added = torch.einsum("ek...i,eoi->ek...o", grouped, delta).reshape(*output.shape)
            return output + added.to(output.device, output.dtype)

        return post

    try:
        for t in targets:
            handles.append(family.get_module(model, t.module).register_forward_hook(make(deltas[t.name])))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _schedule(n_cases: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Batches of case indices: seeded shuffled passes over the cases, batches running across passes."""
    rng = random.Random(f"editsafety-mend-order-{seed}")
    pending: list[int] = []
    while True:
        while len(pending) < batch_size:
            order = list(range(n_cases))
            rng.shuffle(order)
            pending.extend(order)
        yield pending[:batch_size]
        pending = pending[batch_size:]


def _norm_statistics(network: MendNetwork, model, tokenizer, family, targets, cases, batches, device) -> None:
    groups = {t.group: (MomentAccumulator(t.d_in), MomentAccumulator(t.d_out)) for t in targets}
    for indices in batches:
        chosen = [cases[i].edit for i in indices]
        factors, _ = gradient_factors(model, family, targets, target_batch(tokenizer, chosen, device), len(chosen))
        for t in targets:
            f = factors[t.name]
            groups[t.group][0].add(f.u[f.mask])
            groups[t.group][1].add(f.delta[f.mask])
    for group, (u_acc, d_acc) in groups.items():
        u_mean, u_std = u_acc.mean_std()
        d_mean, d_std = d_acc.mean_std()
        network.set_norm(group, u_mean.to(device), u_std.to(device), d_mean.to(device), d_std.to(device))


@dataclass
class _Step:
    edit_nll: float
    loc_kl: float
    nll_before: float
    nll_after: float


def _train_step(network: MendNetwork, model, tokenizer, family, targets: Sequence[MendTarget],
                batch_cases: Sequence[TrainingCase], hp: MendHparams, device) -> tuple[Tensor, _Step]:
    n_edits = len(batch_cases)
    edits = [c.edit for c in batch_cases]
    factors, nll_before = gradient_factors(model, family, targets, target_batch(tokenizer, edits, device), n_edits)
    deltas = {t.name: network.update(i, factors[t.name].u, factors[t.name].delta, factors[t.name].mask)
              for i, t in enumerate(targets)}

    rows = [r for c in batch_cases for r in (c.edit, c.equivalent)]
    loss_batch = target_batch(tokenizer, rows, device)
    with added_updates(model, family, targets, deltas, rows_per_edit=2):
        nll = per_request_nll(model, loss_batch, len(rows))
    edit_loss = nll.mean()

    n_loc = len(batch_cases[0].locality)
    loc = right_padded(tokenizer, [t for c in batch_cases for t in c.locality], device)
    with torch.no_grad():
        base = model(input_ids=loc.input_ids, attention_mask=loc.attention_mask).logits.float().log_softmax(-1)
    with added_updates(model, family, targets, deltas, rows_per_edit=n_loc):
        edited = model(input_ids=loc.input_ids, attention_mask=loc.attention_mask).logits.float().log_softmax(-1)
    kl = (base.exp() * (base - edited)).sum(-1)
    weights = loc.attention_mask.to(kl.dtype)
    loc_loss = (kl * weights).sum() / weights.sum()

    loss = hp.c_edit * edit_loss + hp.c_loc * loc_loss
    step = _Step(float(edit_loss.detach()), float(loc_loss.detach()), float(nll_before.mean()),
                 float(nll.detach()[0::2].mean()))
    return loss, step


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else float("nan")


def train_mend(model, tokenizer, family, hparams: MendHparams, cases: Sequence[TrainingCase], *,
               progress: bool = True, description: str = "training MEND") -> tuple[MendNetwork, dict[str, Any]]:
    """Train an editor network for ``model`` on ``cases``; returns it and a report of plain numbers."""
    from tqdm.auto import tqdm

    if not cases:
        raise ValueError("MEND training: no training cases")
    n_loc = {len(c.locality) for c in cases}
    if len(n_loc) != 1:
        raise ValueError(f"MEND training: every case needs the same number of locality texts, got {sorted(n_loc)}")
    hp = hparams
    started = time.perf_counter()
    device = next(model.parameters()).device
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(hp.threads)
    try:
        targets = edit_targets(model, family, hp.layers, hp.modules)
        network = MendNetwork(targets, rank=hp.rank, n_hidden=hp.n_hidden, edit_lr=hp.edit_lr, seed=hp.seed).to(device)
        schedule = _schedule(len(cases), hp.batch_size, hp.seed)
        history: list[_Step] = []
        with frozen(model):
            stats_schedule = _schedule(len(cases), hp.batch_size, hp.seed)
            norm_batches = [next(stats_schedule) for _ in range(min(hp.norm_batches, hp.steps))]
            _norm_statistics(network, model, tokenizer, family, targets, cases, norm_batches, device)
            lrs = [network.edit_lrs]
            others = [p for p in network.parameters() if p is not network.edit_lrs]
            optimiser = torch.optim.Adam(others, lr=hp.lr)
            lr_optimiser = torch.optim.Adam(lrs, lr=hp.lr_lr)
            bar = tqdm(range(hp.steps), desc=description, disable=not progress, mininterval=2.0)
            for _ in bar:
                batch_cases = [cases[i] for i in next(schedule)]
                loss, step = _train_step(network, model, tokenizer, family, targets, batch_cases, hp, device)
                optimiser.zero_grad(set_to_none=True)
                lr_optimiser.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(network.parameters(), hp.grad_clip)
                optimiser.step()
                lr_optimiser.step()
                history.append(step)
                if len(history) % 10 == 0:
                    recent = history[-10:]
                    bar.set_postfix(edit=f"{_mean([s.edit_nll for s in recent]):.3f}",
                                    kl=f"{_mean([s.loc_kl for s in recent]):.4f}")
    finally:
        torch.set_num_threads(previous_threads)
    network.eval()
    tail = history[-max(1, len(history) // 10):]
    head = history[: max(1, len(history) // 10)]
    report = {
        "seconds": round(time.perf_counter() - started, 2),
        "steps": hp.steps,
        "n_cases": len(cases),
        "edit_nll_first": _mean([s.edit_nll for s in head]),
        "edit_nll_last": _mean([s.edit_nll for s in tail]),
        "loc_kl_first": _mean([s.loc_kl for s in head]),
        "loc_kl_last": _mean([s.loc_kl for s in tail]),
        "nll_before_edit": _mean([s.nll_before for s in tail]),
        "nll_after_edit_last": _mean([s.nll_after for s in tail]),
        "edit_lrs": [float(x) for x in network.edit_lrs.detach().cpu()],
    }
    log.info("MEND trained in %.1f s: %s", report["seconds"], report)
    return network, report
