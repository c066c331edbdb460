"""ROME (Meng et al. 2022) and C-ROME (consistent keys; Yang et al.), driven through activation hooks.

The update maths lives in :mod:`editors.maths.rome`; this module gathers its inputs from the model:
keys (inputs of the MLP output projection at the subject's last token), the mean key over context
templates, and the target value ``v*`` found by optimising a vector added to the MLP output.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from editors.base import EditorBase, EditOutcome, EditRequest, Needs, Provided, SecondMomentNeed, prepared_by
from editors.domain import check_count, check_number, check_template_recipe
from editors.hooks import capture_input, capture_output, eval_mode, input_of, rows_at
from editors.maths import as_out_in, delta_to_storage
from editors.maths.moments import ridged
from editors.maths.rome import (
    CONSISTENT_TARGETS,
    EARLY_STOP_ON,
    covariance_solver,
    measure_keys,
    rome_update,
    value_target,
)
from editors.text import fill, position_limit, right_padded, subject_last_index
# v*'s search has its own module; editors outside this package know it by ROME's name (optimise_value_delta)
from editors.value_search import (
    ValueFit,
    optimise_value_delta,
    search_settings,
    search_value_delta,
    search_value_deltas,
)

log = logging.getLogger(__name__)

__all__ = ["RomeEditor", "RomeHparams", "RomeInputs", "ValueFit", "check_value_settings", "keys_and_outputs",
           "optimise_value_delta", "search_value_delta", "search_value_deltas"]


@dataclass(frozen=True)
class RomeHparams:
    layer: int
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    mom2_adjustment: bool = False
    # texts of the statistics corpus behind C; read by whoever provides C, part of its cache key
    mom2_n_samples: int = 100000
    # ROME solves C u = k̄ as it is (0, the papers' code); a number adds that many times C's mean eigenvalue to its
    # diagonal first (editors.maths.moments.ridged), for a C whose rank falls short of the key dimension. Only read
    # with mom2_adjustment on (with C = I there is nothing to regularise)
    mom2_ridge: float = 0.0
    context_templates: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))
    kl_prompt: str = "{} is a"
    # v*'s search stops at the first step whose loss is below early_stop_below; "loss" (NLL + KL + decay) is
    # ROME's compute_v, "nll" (the target's NLL alone) a named variant: see value_search_stops
    early_stop_on: str = "loss"
    early_stop_below: float = 0.05
    # the value C-ROME maps k̄ to: "bare" (W kᵘ + δ, the papers' fork) or "mean" (W k̄ + δ): see value_target
    c_rome_target: str = "bare"
    # v*'s steps run only the positions δ reaches, over the key/value cache of the positions before the subject's
    # last token (editors.suffix), computed once; False runs the plain full forward every step. Same numbers to
    # float rounding (tests/test_suffix.py), a fraction of the cost: benchmarks/speed.py
    v_cached_prefix: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"RomeHparams.layer: expected an int >= 0, got {self.layer!r}")
        check_value_settings(self)
        check_number(self, ("mom2_ridge",))
        if self.c_rome_target not in CONSISTENT_TARGETS:
            raise ValueError(f"RomeHparams.c_rome_target: expected one of {CONSISTENT_TARGETS}, "
                             f"got {self.c_rome_target!r}")


def check_value_settings(hp) -> None:
    """The domain of v*'s settings, shared by ROME and MEMIT (whose δ* is found the same way)."""
    check_count(hp, ("v_num_grad_steps", "mom2_n_samples"))
    check_number(hp, ("v_lr", "clamp_norm_factor"), strict=True)
    check_number(hp, ("v_weight_decay", "kl_factor", "early_stop_below"))
    if hp.early_stop_on not in EARLY_STOP_ON:
        raise ValueError(f"{type(hp).__name__}.early_stop_on: expected one of {EARLY_STOP_ON}, got {hp.early_stop_on!r}")
    check_template_recipe(hp)
    if not isinstance(hp.v_cached_prefix, bool):
        raise ValueError(f"{type(hp).__name__}.v_cached_prefix: expected true or false, got {hp.v_cached_prefix!r}")
    if not isinstance(hp.kl_prompt, str) or hp.kl_prompt.count("{}") != 1:
        raise ValueError(f"{type(hp).__name__}.kl_prompt: expected a text with one '{{}}', got {hp.kl_prompt!r}")


@dataclass(frozen=True)
class RomeInputs:
    """Everything measured on the unedited model for one request (tensors stay in this process)."""

    k_bare: torch.Tensor
    k_mean: torch.Tensor
    out_bare: torch.Tensor  # MLP output (with bias) at the subject, bare prompt
    out_mean: torch.Tensor  # mean MLP output over context templates
    delta: torch.Tensor  # optimised addition to the MLP output at the subject (v* - the bare prompt's output)
    final_nll: float
    final_loss: float
    steps: int
    subject_positions: tuple[int, ...] = field(default=())


def _module(model, family, kind: str, layer: int):
    return family.get_module(model, family.layer_name(kind, layer))


def keys_and_outputs(model, tokenizer, family, layer: int, contexts, request: EditRequest):
    """Keys (MLP output-projection inputs) and MLP outputs at the subject's last token, per context, without
    dropout whatever mode the caller's model is in (a key measured in train mode differs at every call)."""
    device = next(model.parameters()).device
    texts = [fill(c, request.text) for c in contexts]
    positions = [subject_last_index(tokenizer, c, request.prompt, request.subject) for c in contexts]
    batch = right_padded(tokenizer, texts, device)
    store: dict[str, torch.Tensor] = {}
    with torch.no_grad(), eval_mode(model), capture_input(_module(model, family, "mlp_out", layer), store), \
            capture_output(_module(model, family, "mlp", layer), store):
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    return rows_at(store["input"], positions).float(), rows_at(store["output"], positions).float(), positions


# tokens of ordinary text whose keys say how far an edit reaches (the denominator report's interference): enough
# for a stable mean (2,048 and all 4,408 of the organism's corpus rank its cases alike), 100 MiB of keys at
# GPT-2-XL's 6,400 dimensions
INTERFERENCE_TOKENS = 4096
_ORDINARY_BATCH = 8


def ordinary_keys(model, tokenizer, family, layer: int, texts, max_tokens: int) -> torch.Tensor | None:
    """Keys (MLP output-projection inputs) at ``layer`` of the first ``max_tokens`` tokens of ``texts``, in order,
    ``[n, d]`` in float32; None when the texts hold no token. The pass stops at the layer."""
    device = next(model.parameters()).device
    module = _module(model, family, "mlp_out", layer)
    limit = position_limit(model)  # a text longer than the model's context is read up to it
    found: list[torch.Tensor] = []
    remaining = max_tokens
    for start in range(0, len(texts), _ORDINARY_BATCH):
        if remaining <= 0:
            break
        batch = right_padded(tokenizer, texts[start:start + _ORDINARY_BATCH], device)
        ids, mask = batch.input_ids[:, :limit], batch.attention_mask[:, :limit]
        with torch.no_grad():
            keys = input_of(model, module, input_ids=ids, attention_mask=mask)
        if keys is None:
            return None
        found.append(keys[mask.bool()][:remaining].float())
        remaining -= found[-1].shape[0]
    keys = torch.cat(found) if found else None
    return keys if keys is not None and keys.shape[0] else None


class RomeEditor(EditorBase):
    """``rome`` (bare key ``k^u`` in the update), ``c-rome`` (mean key ``k̄``) and ``c-rome-prefix``.

    Needs its context templates and, with ``mom2_adjustment``, C at its layer; reports ``|uᵀk|`` from keys.
    Used without :func:`editors.provision.set_up`, it samples its own templates on first use and takes
    ``C = I``."""

    def __init__(self, name: str, hparams: RomeHparams, *, consistent: bool, test_prefix: bool = False):
        self.name = name
        self.hparams = hparams
        self.consistent = consistent
        self.test_prefix = test_prefix
        self.context_templates: tuple[str, ...] | None = None
        self.covariance: torch.Tensor | None = None
        self._solve: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.ordinary_texts: tuple[str, ...] = ()
        # keys of the ordinary texts at the edited layer, measured at the first report after a set-up (None: none
        # measured yet, or the texts held no token). Valid while the layers below the edited one keep their
        # weights: an edit by this editor changes only the layer's output projection, downstream of the keys, and
        # the harness restores every other edit; a caller who changes lower layers sets the editor up again
        self._ordinary_keys: torch.Tensor | None = None
        self._ordinary_measured = False

    def needs(self, model, family) -> Needs:
        hp = self.hparams
        moments = SecondMomentNeed((hp.layer,), hp.mom2_n_samples) if hp.mom2_adjustment else None
        return Needs(second_moments=moments, context_templates=hp.context_templates,
                     ordinary_text=INTERFERENCE_TOKENS)

    def setup(self, model, tokenizer, family, provided: Provided) -> None:
        super().setup(model, tokenizer, family, provided)
        self.context_templates = provided.context_templates
        covariance = provided.second_moments.get(self.hparams.layer)
        self.covariance = None if covariance is None else ridged(covariance, self.hparams.mom2_ridge)
        self._solve = None
        self.ordinary_texts = provided.ordinary_texts
        self._ordinary_keys, self._ordinary_measured = None, False

    def parameters_touched(self, model, family) -> tuple[str, ...]:
        return (family.layer_name("mlp_out", self.hparams.layer) + ".weight",)

    def _contexts(self, model, tokenizer) -> tuple[str, ...]:
        if self.context_templates is None:
            from editors.context import sample_context_templates

            self.context_templates = sample_context_templates(model, tokenizer, self.hparams.context_templates)
        return self.context_templates

    def measure(self, model, tokenizer, family, request: EditRequest) -> RomeInputs:
        """What the edit of ``request`` needs from the model as it is now (one of :meth:`prepare`'s)."""
        return self.prepare(model, tokenizer, family, [request])[request]

    def prepare(self, model, tokenizer, family, requests) -> dict[EditRequest, RomeInputs]:
        """Keys, outputs and v* of every request, measured on the model as it is; the searches run together."""
        contexts = self._contexts(model, tokenizer)
        measured = [keys_and_outputs(model, tokenizer, family, self.hparams.layer, contexts, r) for r in requests]
        fits = search_value_deltas(model, tokenizer, family, self.hparams, contexts, requests,
                                   [outputs[0] for _, outputs, _ in measured])
        return {
            # rows cloned: a value a caller keeps for other editors (measurement_key) then holds d numbers each,
            # not every template's keys and outputs
            request: RomeInputs(k_bare=keys[0].clone(), k_mean=keys.mean(0), out_bare=outputs[0].clone(),
                                out_mean=outputs.mean(0),
                                delta=fit.delta, final_nll=fit.nll, final_loss=fit.loss, steps=fit.steps,
                                subject_positions=tuple(positions))
            for request, (keys, outputs, positions), fit in zip(requests, measured, fits)
        }

    def measurement_key(self, request: EditRequest):
        """:meth:`prepare`'s :class:`RomeInputs` do not depend on the key rule or the test prefix, so ROME and its
        C-ROME variants with the same search settings and templates share them; None before set-up, where the
        templates are not known yet."""
        if self.context_templates is None:
            return None
        return (prepared_by(self, ("prepare", "_contexts")), search_settings(self.hparams), self.context_templates,
                request)

    def denominator(self, model, tokenizer, family, request: EditRequest) -> dict[str, float]:
        """``|uᵀkᵘ|`` (rome) or ``|uᵀk̄|`` (C-ROME) for ``request``, one forward pass over the templated
        prompts (row 0 is the bare prompt: the templates start with ``"{}"``), C factorised once per set-up;
        with ordinary texts provided, also the edit's ``interference`` over their keys
        (:func:`editors.maths.rome.interference`)."""
        keys, _, _ = keys_and_outputs(model, tokenizer, family, self.hparams.layer,
                                      self._contexts(model, tokenizer), request)
        return self._key_measure(model, tokenizer, family, keys[0], keys.mean(0)).as_dict()

    def _key_measure(self, model, tokenizer, family, k_bare: torch.Tensor, k_mean: torch.Tensor):
        if self.covariance is not None and self._solve is None:
            self._solve = covariance_solver(self.covariance)
        if self.ordinary_texts and not self._ordinary_measured:
            with eval_mode(model):
                self._ordinary_keys = ordinary_keys(model, tokenizer, family, self.hparams.layer,
                                                    self.ordinary_texts, INTERFERENCE_TOKENS)
            self._ordinary_measured = True
        return measure_keys(k_bare, k_mean, self._solve, consistent=self.consistent, other_keys=self._ordinary_keys)

    def apply(self, model, tokenizer, family, requests: list[EditRequest]) -> EditOutcome:
        if len(requests) != 1:
            raise ValueError(f"{self.name} edits one request at a time (got {len(requests)}); use memit for batches")
        request = requests[0]
        inputs = self.prepared_for(request) or self.measure(model, tokenizer, family, request)
        name = self.parameters_touched(model, family)[0]
        param = family.get_module(model, name.rsplit(".", 1)[0]).weight
        W = as_out_in(param.detach(), family.weight_transposed).float()
        # the value the edited layer must produce for the key it edits (rome: kᵘ, C-ROME: k̄)
        v_star = value_target(W, inputs.k_bare, inputs.k_mean, inputs.delta, consistent=self.consistent,
                              anchor=self.hparams.c_rome_target)
        update = rome_update(W, inputs.k_bare, inputs.k_mean, v_star, consistent=self.consistent,
                             covariance=self.covariance)
        # how far the update reaches into ordinary text, from the keys before it lands
        reach = self._key_measure(model, tokenizer, family, inputs.k_bare, inputs.k_mean).interference
        with torch.no_grad():
            param.add_(delta_to_storage(update.delta, family.weight_transposed).to(param.dtype))
        diagnostics = {**update.diagnostics(), "layer": self.hparams.layer, "v_final_nll": inputs.final_nll,
                       "v_final_loss": inputs.final_loss, "v_steps": inputs.steps,
                       "delta_norm": float(inputs.delta.norm()), "subject_position_bare": inputs.subject_positions[0]}
        if reach is not None:
            diagnostics["interference"] = reach
        prefix = None
        if self.test_prefix:
            prefix = self.context_templates[1].replace("{}", "") if len(self.context_templates) > 1 else None
        return EditOutcome(edited=(name,), diagnostics=diagnostics, test_prefix=prefix)
