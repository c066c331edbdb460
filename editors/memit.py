"""MEMIT (Meng et al. 2023): one or many facts written over several layers' MLP output matrices.

For each request the target ``z`` is the last edited layer's output at the subject's last token (bare prompt)
plus a vector ``δ*`` found exactly like ROME's ``v* − v`` (:func:`editors.value_search.search_value_deltas` with that
layer): adding ``δ`` to the MLP output of a layer adds it to the layer's output, since the MLP output joins the
residual stream there. Then, layer by layer in order, with the earlier layers already updated:
``K`` = the mean key over the context templates per request, ``h`` = the last layer's current output,
``R = (z − h) / (layers left)`` and ``ΔW = R Kᵀ (λC + K Kᵀ)⁻¹`` (:mod:`editors.maths.memit`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from editors.base import EditorBase, EditOutcome, EditRequest, Needs, Provided, SecondMomentNeed, prepared_by
from editors.domain import check_number
from editors.ft import target_nll
from editors.hooks import capture_output, eval_mode, rows_at
from editors.maths import as_out_in, delta_to_storage
from editors.maths.memit import distribute_residual, memit_layer_update
from editors.rome import RomeHparams, check_value_settings, keys_and_outputs
from editors.value_search import search_settings, search_value_deltas
from editors.text import right_padded, subject_last_index

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class MemitHparams:
    layers: tuple[int, ...]
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    # True: use the covariance provider's C when one is given; False (or no provider): isotropic C
    mom2_adjustment: bool = True
    mom2_update_weight: float = 20000.0
    # texts of the statistics corpus behind C; read by whoever provides C, part of its cache key
    mom2_n_samples: int = 100000
    context_templates: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))
    kl_prompt: str = "{} is a"
    # as RomeHparams: MEMIT's compute_z stops its search on the whole loss too ("if loss < 5e-2: break")
    early_stop_on: str = "loss"
    early_stop_below: float = 0.05
    # as RomeHparams: z's steps run over a cached prefix (same numbers); False runs the plain full forward
    v_cached_prefix: bool = True

    def __post_init__(self) -> None:
        layers = tuple(self.layers)
        if not layers or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in layers):
            raise ValueError(f"MemitHparams.layers: expected layer indices >= 0, got {self.layers!r}")
        if list(layers) != sorted(set(layers)):
            raise ValueError(f"MemitHparams.layers: expected increasing, distinct layers, got {self.layers!r}")
        object.__setattr__(self, "layers", layers)
        check_number(self, ("mom2_update_weight",))
        check_value_settings(self)

    def value_hparams(self) -> RomeHparams:
        """ROME's v* settings at the last edited layer: the same optimisation finds MEMIT's δ*."""
        return RomeHparams(
            layer=self.layers[-1],
            v_num_grad_steps=self.v_num_grad_steps,
            v_lr=self.v_lr,
            v_weight_decay=self.v_weight_decay,
            clamp_norm_factor=self.clamp_norm_factor,
            kl_factor=self.kl_factor,
            mom2_adjustment=self.mom2_adjustment,
            context_templates=self.context_templates,
            kl_prompt=self.kl_prompt,
            early_stop_on=self.early_stop_on,
            early_stop_below=self.early_stop_below,
            v_cached_prefix=self.v_cached_prefix,
        )


def layer_outputs(model, tokenizer, family, layer: int, requests: Sequence[EditRequest]) -> Tensor:
    """The output of block ``layer`` at each request's last subject token, bare prompt: ``d × n``."""
    device = next(model.parameters()).device
    positions = [subject_last_index(tokenizer, "{}", r.prompt, r.subject) for r in requests]
    batch = right_padded(tokenizer, [r.text for r in requests], device)
    store: dict[str, Tensor] = {}
    block = family.get_module(model, family.layer_name("block", layer))
    with torch.no_grad(), capture_output(block, store):
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    return rows_at(store["output"], positions).float().T


def isotropic_second_moment(keys: Tensor) -> Tensor:
    """``(mean ‖k‖² / d) I``: the isotropic second moment with the keys' energy (``tr C = mean ‖k‖²``).

    MEMIT needs ``C`` to weigh preservation against the new facts; without corpus statistics this keeps
    ``λ`` on the scale it has with real statistics, where ``tr C = E‖k‖²`` too.
    """
    d = keys.shape[-1]
    scale = float(keys.double().pow(2).sum(-1).mean()) / d
    return torch.eye(d, dtype=torch.float64, device=keys.device) * scale


class MemitEditor(EditorBase):
    """``memit``: mass editing over ``hparams.layers`` (one or many requests per call).

    Needs context templates and, with ``mom2_adjustment``, C at every edited layer; without C (used outside
    :func:`editors.provision.set_up`, or ``mom2_adjustment`` off) it takes the isotropic stand-in."""

    # one update solves for every request's key at once (EMMET and AlphaEdit inherit this through SpreadEditor)
    max_requests_per_apply = None

    def __init__(self, hparams: MemitHparams, *, name: str = "memit"):
        self.name = name
        self.hparams = hparams
        self.context_templates: tuple[str, ...] | None = None
        self.second_moments: Mapping[int, Tensor] = {}

    def needs(self, model, family) -> Needs:
        hp = self.hparams
        moments = SecondMomentNeed(hp.layers, hp.mom2_n_samples) if hp.mom2_adjustment else None
        return Needs(second_moments=moments, context_templates=hp.context_templates)

    def setup(self, model, tokenizer, family, provided: Provided) -> None:
        super().setup(model, tokenizer, family, provided)
        self.context_templates = provided.context_templates
        self.second_moments = dict(provided.second_moments)

    def parameters_touched(self, model, family) -> tuple[str, ...]:
        return tuple(family.layer_name("mlp_out", layer) + ".weight" for layer in self.hparams.layers)

    def _contexts(self, model, tokenizer) -> tuple[str, ...]:
        if self.context_templates is None:
            from editors.context import sample_context_templates

            self.context_templates = sample_context_templates(model, tokenizer, self.hparams.context_templates)
        return self.context_templates

    def targets(self, model, tokenizer, family, requests: Sequence[EditRequest]) -> tuple[Tensor, list[float]]:
        """``z`` per request (``d × n``) at the last edited layer, and each optimisation's final NLL (those
        :meth:`prepare` measured, for the requests it did)."""
        in_hand = {r: self.prepared_for(r) for r in requests}
        measured = {**in_hand, **self.prepare(model, tokenizer, family, [r for r, v in in_hand.items() if v is None])}
        return torch.stack([measured[r][0] for r in requests], 1), [measured[r][1] for r in requests]

    def prepare(self, model, tokenizer, family,
                requests: Sequence[EditRequest]) -> dict[EditRequest, tuple[Tensor, float]]:
        """Each request's ``(z, final NLL)`` on the model as it is; the searches run together."""
        if not requests:
            return {}
        self._check_layers(model, family)
        contexts = self._contexts(model, tokenizer)
        value_hp = self.hparams.value_hparams()
        with eval_mode(model):  # as apply() measures: no dropout in the residual z starts from
            h0 = layer_outputs(model, tokenizer, family, value_hp.layer, requests)
        # the layer output as the norm reference: MEMIT clamps and decays δ relative to the residual
        fits = search_value_deltas(model, tokenizer, family, value_hp, contexts, requests,
                                   [h0[:, i] for i in range(len(requests))])
        return {r: (h0[:, i] + fit.delta.float(), fit.nll) for i, (r, fit) in enumerate(zip(requests, fits))}

    def measurement_key(self, request: EditRequest):
        """:meth:`prepare`'s ``(z, final NLL)`` depends on the search at the last edited layer and the templates
        only, so MEMIT, EMMET and AlphaEdit with the same settings share it; None before set-up."""
        if self.context_templates is None:
            return None
        return (prepared_by(self, ("prepare", "_contexts")), search_settings(self.hparams.value_hparams()),
                self.context_templates, request)

    def apply(self, model, tokenizer, family, requests: list[EditRequest]) -> EditOutcome:
        if not requests:
            raise ValueError(f"{self.name}: no edit requests")
        with eval_mode(model):  # keys and residuals without dropout: the same edit every time
            return self._apply(model, tokenizer, family, requests)

    def _check_layers(self, model, family) -> None:
        n_layers = family.n_layers(model.config)
        if self.hparams.layers[-1] >= n_layers:
            raise ValueError(f"{self.name}: layer {self.hparams.layers[-1]} out of range for a model with "
                             f"{n_layers} layers")

    def _apply(self, model, tokenizer, family, requests: list[EditRequest]) -> EditOutcome:
        hp = self.hparams
        self._check_layers(model, family)
        provided = self.second_moments if hp.mom2_adjustment else {}
        contexts = self._contexts(model, tokenizer)
        z, z_nlls = self.targets(model, tokenizer, family, requests)
        last = hp.layers[-1]
        diagnostics: dict[str, float | int | str] = {
            "layers": ",".join(str(x) for x in hp.layers),
            "n_requests": len(requests),
            "z_final_nll": float(sum(z_nlls) / len(z_nlls)),
        }
        for index, layer in enumerate(hp.layers):
            per_request = [keys_and_outputs(model, tokenizer, family, layer, contexts, r)[0] for r in requests]
            K = torch.stack([keys.mean(0) for keys in per_request], 1)  # d_in × n
            h = layer_outputs(model, tokenizer, family, last, requests)
            if index == 0:
                diagnostics["residual_initial_fro"] = float(torch.linalg.matrix_norm(z - h))
            R = distribute_residual(z, h, len(hp.layers) - index)
            # without statistics, the isotropic stand-in uses the keys as they are now (this layer's
            # inputs after the earlier layers' updates, like K itself)
            C = provided[layer] if provided else isotropic_second_moment(torch.cat(per_request, 0))
            update = memit_layer_update(K, R, C, float(hp.mom2_update_weight))
            weight = family.get_module(model, family.layer_name("mlp_out", layer)).weight
            if tuple(as_out_in(weight.detach(), family.weight_transposed).shape) != tuple(update.delta.shape):
                raise ValueError(f"{self.name}: update shape {tuple(update.delta.shape)} does not fit layer {layer}")
            with torch.no_grad():
                weight.add_(delta_to_storage(update.delta, family.weight_transposed).to(weight.dtype))
            for key, value in update.diagnostics().items():
                if key != "n_requests":
                    diagnostics[f"{key}_L{layer}"] = float(value)
        diagnostics["covariance"] = "provided" if provided else "isotropic"
        return self._finish(model, tokenizer, family, requests, z, diagnostics)

    def _finish(self, model, tokenizer, family, requests: Sequence[EditRequest], z: Tensor,
                diagnostics: dict[str, Any]) -> EditOutcome:
        """The outcome once every layer is written: how far the last layer's outputs still are from ``z``, and
        the targets' NLL on the edited model."""
        last = self.hparams.layers[-1]
        diagnostics["residual_final_fro"] = float(
            torch.linalg.matrix_norm(z - layer_outputs(model, tokenizer, family, last, requests)))
        nlls = target_nll(model, tokenizer, requests)
        diagnostics["final_nll"] = float(sum(nlls) / len(nlls))
        log.debug("%s on layers %s: %s", self.name, self.hparams.layers, diagnostics)
        return EditOutcome(edited=self.parameters_touched(model, family), diagnostics=diagnostics)
