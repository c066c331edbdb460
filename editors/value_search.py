"""v*'s search (ROME's compute_v; MEMIT's compute_z is the same search at its last layer), for one request or
several at once.

Each request gets a vector ``δ`` added to one layer's MLP output at its subject's last token, optimised so that
every templated prompt predicts ``target_new`` (NLL + KL on ``kl_prompt`` + weight decay, norm clamped), as
compute_v does: it evaluates the loss, then stops (``hp.early_stop_on``/``early_stop_below``, see
:func:`editors.maths.rome.value_search_stops`) or, on the last of ``v_num_grad_steps`` passes, ends without
stepping.

Several requests searched together share one batch: their rows are independent in a causal model and each
request's ``δ`` is its own row of one Adam parameter (Adam is elementwise), so each request's search is the one it
would have alone, to float rounding; a request that stops early keeps the ``δ`` it stopped with while the others
go on. With ``hp.v_cached_prefix`` each step runs only the positions ``δ`` reaches, from the edited layer up
(:mod:`editors.suffix`; from the layer above it where the family's MLP output joins the residual stream as it is,
``δ`` then added to the edited block's fixed output), and the LM head only where the loss reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from editors.base import EditRequest
from editors.hooks import add_at_positions, frozen, narrowed_input
from editors.maths.rome import value_search_stops
from editors.text import fill, right_padded, subject_last_index


# every setting of ``hp`` that :func:`search_value_deltas` reads: two searches with equal settings, templates and
# request on the same model find the same δ (editors share a search through it: :func:`search_settings`)
SEARCH_SETTINGS = ("layer", "v_num_grad_steps", "v_lr", "v_weight_decay", "clamp_norm_factor", "kl_factor",
                   "kl_prompt", "early_stop_on", "early_stop_below", "v_cached_prefix")


def search_settings(hp) -> tuple[tuple[str, object], ...]:
    """``hp``'s values of :data:`SEARCH_SETTINGS`, as ``(name, value)`` pairs: the search's part of a
    measurement key (:meth:`editors.base.EditorBase.measurement_key`)."""
    return tuple((name, getattr(hp, name)) for name in SEARCH_SETTINGS)


@dataclass(frozen=True)
class ValueFit:
    """v*'s search: ``δ``, the NLL and whole loss at the step it stopped on, and the forward passes it took."""

    delta: torch.Tensor
    nll: float
    loss: float
    steps: int


class _PlainForward:
    """The whole batch every step (``v_cached_prefix`` off): columns are the rows' own positions."""

    def __init__(self, batch):
        self.batch = batch

    def read_logits(self, model, rows, cols, lm_head):
        """Logits at ``(rows[j], cols[j])``, ``[len(rows), vocabulary]``, from the full pass's logits."""
        logits = model(input_ids=self.batch.input_ids, attention_mask=self.batch.attention_mask).logits
        return logits[rows, cols]

    def column(self, row: int, position: int) -> int:
        return position


class _SuffixForward:
    """Each row from its subject's last token on, over the cached prefix (:mod:`editors.suffix`); the LM head runs
    only at the positions the loss reads (with GPT-2 124M's vocabulary it is a third of the pass)."""

    def __init__(self, suffix):
        self.suffix = suffix

    def read_logits(self, model, rows, cols, lm_head):
        with narrowed_input(lm_head, rows, cols):
            logits = self.suffix.logits(model)
        if logits.shape[:2] != (1, len(rows)):  # the model did not send its LM head's input through the head
            raise RuntimeError(f"the LM head's narrowed input did not reach the logits (got shape "
                               f"{tuple(logits.shape)}); run with v_cached_prefix false")
        return logits[0]

    def column(self, row: int, position: int) -> int:
        return self.suffix.column(row, position)


def _value_forward(model, batch, subject_positions, *, cached_prefix: bool, fixed_blocks=()):
    if not cached_prefix:
        return _PlainForward(batch)
    from editors.suffix import split_rows

    return _SuffixForward(split_rows(model, batch.input_ids, batch.lengths, subject_positions,
                                     fixed_blocks=fixed_blocks))


@dataclass(frozen=True)
class _Rows:
    """One request's rows in the shared batch: its templated prompts, then its KL prompt."""

    first: int
    n_rewrite: int
    target: list[int]
    kl_pos: int


def _request_rows(tokenizer, hp, contexts, request: EditRequest, first: int) -> tuple[_Rows, list[str], list[int]]:
    target_ids = tokenizer(" " + request.target_new.strip(), add_special_tokens=False)["input_ids"]
    decoded_prefix = tokenizer.decode(target_ids[:-1]) if len(target_ids) > 1 else ""
    texts = [fill(c, request.text) + decoded_prefix for c in contexts]
    positions = [subject_last_index(tokenizer, c, request.prompt, request.subject) for c in contexts]
    kl_pos = subject_last_index(tokenizer, "{}", hp.kl_prompt, request.subject)
    rows = _Rows(first=first, n_rewrite=len(texts), target=list(target_ids), kl_pos=kl_pos)
    return rows, texts + [fill(hp.kl_prompt, request.subject)], positions + [kl_pos]


def search_value_deltas(model, tokenizer, family, hp, contexts, requests: Sequence[EditRequest],
                        out_bares: Sequence[torch.Tensor]) -> list[ValueFit]:
    """Each request's ``δ`` (see the module's docstring), ``out_bares[i]`` the output at its subject that the
    clamp and the decay are relative to; ``hp`` carries the settings (``RomeHparams``)."""
    if len(requests) != len(out_bares) or not requests:
        raise ValueError(f"search_value_deltas: {len(requests)} requests, {len(out_bares)} outputs")
    device = next(model.parameters()).device
    layouts: list[_Rows] = []
    texts: list[str] = []
    positions: list[int] = []
    for request in requests:
        rows, request_texts, request_positions = _request_rows(tokenizer, hp, contexts, request, len(texts))
        layouts.append(rows)
        texts += request_texts
        positions += request_positions
    batch = right_padded(tokenizer, texts, device)
    # δ enters at hp.layer's MLP: the blocks below it give the same outputs at every step. Where the MLP's output
    # joins the residual stream as it is (family.mlp_joins_residual), δ added to it is δ added to the block's
    # output, so the edited block's own pass is fixed too and δ is added after it (on tiny-gpt2, edited at layer 0
    # of 6, a step costs 7 % less)
    edited_block = family.get_module(model, family.layer_name("block", hp.layer))
    replay_edited = hp.v_cached_prefix and family.mlp_joins_residual
    fixed = [family.get_module(model, family.layer_name("block", layer)) for layer in range(hp.layer)]
    if replay_edited:
        fixed.append(edited_block)
    with frozen(model):
        forward = _value_forward(model, batch, positions, cached_prefix=hp.v_cached_prefix, fixed_blocks=fixed)
    # The input holds the prompt and target[:-1]; target token j is predicted at position (prompt end - 1 + j),
    # i.e. the last len(target) positions of each row. The loss reads, per request, each rewrite row's target
    # positions (row-major) and then the KL prompt's subject, in the coordinates of the rows forward() runs.
    read_rows: list[int] = []
    read_cols: list[int] = []
    read_start: list[int] = []
    for rows in layouts:
        read_start.append(len(read_rows))
        n_target = len(rows.target)
        for r in range(rows.first, rows.first + rows.n_rewrite):
            read_rows += [r] * n_target
            read_cols += [forward.column(r, p) for p in range(batch.lengths[r] - n_target, batch.lengths[r])]
        kl_row = rows.first + rows.n_rewrite
        read_rows.append(kl_row)
        read_cols.append(forward.column(kl_row, rows.kl_pos))
    read_rows_t = torch.tensor(read_rows, device=device)
    read_cols_t = torch.tensor(read_cols, device=device)
    step_positions = [forward.column(r, p) for r, p in enumerate(positions)]
    row_request = torch.tensor([i for i, rows in enumerate(layouts) for _ in range(rows.n_rewrite + 1)], device=device)
    targets = [torch.tensor(rows.target, device=device) for rows in layouts]
    added_at = edited_block if replay_edited else family.get_module(model, family.layer_name("mlp", hp.layer))
    lm_head = family.get_module(model, family.layer_name("lm_head"))
    out_norms = [out.norm() for out in out_bares]
    max_norms = [hp.clamp_norm_factor * float(norm) for norm in out_norms]
    delta = torch.zeros(len(requests), out_bares[0].shape[-1], device=device, requires_grad=True)
    optimiser = torch.optim.Adam([delta], lr=hp.v_lr)
    kl_references: list[torch.Tensor | None] = [None] * len(requests)
    fits: list[ValueFit | None] = [None] * len(requests)
    with frozen(model):  # only delta is optimised; the model's flags and mode come back as they were
        for step in range(hp.v_num_grad_steps):
            optimiser.zero_grad()
            with add_at_positions(added_at, step_positions, delta[row_request]):
                logits = forward.read_logits(model, read_rows_t, read_cols_t, lm_head).float()
            log_probs = logits.log_softmax(-1)
            searching = []
            for i, rows in enumerate(layouts):
                if fits[i] is not None:
                    continue
                n_target = len(rows.target)
                mine = log_probs[read_start[i]: read_start[i] + rows.n_rewrite * n_target + 1]
                token_lp = mine[:-1].gather(1, targets[i].repeat(rows.n_rewrite)[:, None]).view(rows.n_rewrite, n_target)
                nll_loss = -token_lp.mean(1).mean()
                kl_log_probs = mine[-1]
                if kl_references[i] is None:
                    kl_references[i] = kl_log_probs.detach()
                # KL(edited || unedited) on the KL prompt, and a decay linear in ||δ|| over ||out||²: both exactly
                # as ROME's compute_v writes them (a squared decay holds v* back once δ outgrows its output)
                kl = torch.nn.functional.kl_div(kl_references[i], kl_log_probs, log_target=True, reduction="sum")
                decay = hp.v_weight_decay * delta[i].norm() / out_norms[i] ** 2
                loss = nll_loss + hp.kl_factor * kl + decay
                nll, total = float(nll_loss.detach()), float(loss.detach())
                if (value_search_stops(nll, total, below=hp.early_stop_below, on=hp.early_stop_on)
                        or step == hp.v_num_grad_steps - 1):
                    fits[i] = ValueFit(delta[i].detach().clone(), nll, total, step + 1)
                else:
                    searching.append((i, loss))
            if not searching:
                break
            sum(loss for _, loss in searching).backward()
            optimiser.step()
            with torch.no_grad():
                for i, _ in searching:
                    norm = float(delta[i].norm())
                    if norm > max_norms[i]:
                        delta[i].mul_(max_norms[i] / norm)
    return [fit for fit in fits if fit is not None]


def search_value_delta(model, tokenizer, family, hp, contexts, request: EditRequest,
                       out_bare: torch.Tensor) -> ValueFit:
    """One request's search: :func:`search_value_deltas` of ``[request]``."""
    return search_value_deltas(model, tokenizer, family, hp, contexts, [request], [out_bare])[0]


def optimise_value_delta(model, tokenizer, family, hp, contexts, request: EditRequest,
                         out_bare: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``(δ, final NLL)`` of :func:`search_value_delta`: the form editors outside this package call."""
    fit = search_value_delta(model, tokenizer, family, hp, contexts, request, out_bare)
    return fit.delta, fit.nll
