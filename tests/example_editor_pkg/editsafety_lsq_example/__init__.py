"""``template-lsq``: a third-party editor written against pytest-editsafety's editor contract.

It writes a fact into one MLP output projection W by least squares over the keys of the prompt placed after
every context template: each key ``k_t`` must map to ``W k_t + δ`` (δ: ROME's optimised value change at the
subject), while keys in general keep their outputs, weighted by their second moment C:
``ΔW = R Kᵀ (λC + K Kᵀ)⁻¹`` with ``K = [k_1 … k_T]`` and ``R = [δ … δ]``. Unlike ROME it has no rank-one
denominator (so it reports none), and unlike MEMIT it spreads one fact over the templates' keys, not over
layers.

What it needs, it declares (``needs``): C at its layer and the context templates; the caller provides them
(``setup``). It computes nothing of that itself, builds on the library's pieces (keys, v*, the least-squares
update) and resolves a symbolic layer ("causal") against the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from editors.base import EditorBase, EditOutcome, EditRequest, Needs, Provided, SecondMomentNeed
from editors.hparams import resolve_layers
from editors.maths import as_out_in, delta_to_storage
from editors.maths.memit import memit_layer_update
from editors.rome import RomeHparams, keys_and_outputs, optimise_value_delta


@dataclass(frozen=True)
class LsqHparams:
    layer: Any = "causal"  # an index, or a symbolic layer resolved against the model ("causal", "last-N")
    mom2_update_weight: float = 10.0
    mom2_n_samples: int = 10000
    v_num_grad_steps: int = 40
    v_weight_decay: float = 0.05
    context_templates: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))


class TemplateLeastSquaresEditor(EditorBase):
    name = "template-lsq"

    def __init__(self, hparams: Mapping[str, Any]) -> None:
        known = LsqHparams.__dataclass_fields__
        unknown = sorted(set(hparams) - set(known))
        if unknown:
            raise ValueError(f"template-lsq: unknown hyper-parameter(s) {', '.join(unknown)}; known: {', '.join(known)}")
        values = dict(hparams)
        if "context_templates" in values:
            values["context_templates"] = tuple(tuple(pair) for pair in values["context_templates"])
        self.hparams = LsqHparams(**values)
        self.second_moment: torch.Tensor | None = None
        self.templates: tuple[str, ...] = ()

    def layer(self, model: Any) -> int:
        (layer,) = resolve_layers(self.hparams.layer, model)
        return layer

    def needs(self, model: Any, family: Any) -> Needs:
        return Needs(second_moments=SecondMomentNeed((self.layer(model),), self.hparams.mom2_n_samples),
                     context_templates=self.hparams.context_templates)

    def setup(self, model: Any, tokenizer: Any, family: Any, provided: Provided) -> None:
        super().setup(model, tokenizer, family, provided)
        self.second_moment = provided.second_moments[self.layer(model)]
        self.templates = tuple(provided.context_templates or ())

    def parameters_touched(self, model: Any, family: Any) -> tuple[str, ...]:
        return (family.layer_name("mlp_out", self.layer(model)) + ".weight",)

    def apply(self, model: Any, tokenizer: Any, family: Any, requests: list[EditRequest]) -> EditOutcome:
        if self.second_moment is None or not self.templates:
            raise RuntimeError("template-lsq: not set up (call editors.provision.set_up first)")
        layer = self.layer(model)
        value_hparams = RomeHparams(layer=layer, v_num_grad_steps=self.hparams.v_num_grad_steps,
                                    v_weight_decay=self.hparams.v_weight_decay)
        keys, residuals = [], []
        for request in requests:
            k, outputs, _ = keys_and_outputs(model, tokenizer, family, layer, self.templates, request)
            delta, _ = optimise_value_delta(model, tokenizer, family, value_hparams, self.templates, request, outputs[0])
            keys.append(k.T)  # d_in × T
            residuals.append(delta.float()[:, None].expand(-1, k.shape[0]))
        K, R = torch.cat(keys, 1), torch.cat(residuals, 1)
        update = memit_layer_update(K, R, self.second_moment, self.hparams.mom2_update_weight)
        name = self.parameters_touched(model, family)[0]
        weight = family.get_module(model, name.rsplit(".", 1)[0]).weight
        if tuple(as_out_in(weight.detach(), family.weight_transposed).shape) != tuple(update.delta.shape):
            raise ValueError(f"template-lsq: update shape {tuple(update.delta.shape)} does not fit {name}")
        with torch.no_grad():
            weight.add_(delta_to_storage(update.delta, family.weight_transposed).to(weight.dtype))
        diagnostics = {"layer": layer, "n_keys": int(K.shape[1]),
                       **{key: float(value) for key, value in update.diagnostics().items()}}
        return EditOutcome(edited=(name,), diagnostics=diagnostics)


def make_editor(hparams: Mapping[str, Any]) -> TemplateLeastSquaresEditor:
    return TemplateLeastSquaresEditor(hparams)
