"""EMMET (Gupta et al. 2024, "A Unified Framework for Model Editing"): batched ROME with equality constraints.

Maths in :mod:`editors.maths.emmet`; the frame (target ``z``, keys, residual shares over ``layers``) is MEMIT's
(:mod:`editors.spread`), as in the official code. The published configs edit one layer (GPT-2-XL 17, GPT-J and
Llama-2-7b 5), where EMMET with one request is C-ROME's update with C' = λC + μI. Its batch denominator
``D = Kᵀ C'⁻¹ K`` is reported by :meth:`EmmetEditor.denominator` and in each edit's diagnostics, on ROME's scale
(``|uᵀk|`` for one request), so the certification's denominator floor and case mining apply to it unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from editors.base import EditRequest
from editors.domain import check_number
from editors.maths.emmet import emmet_denominator, emmet_layer_update, preservation_matrix
from editors.memit import MemitHparams, isotropic_second_moment
from editors.spread import SpreadEditor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmmetHparams(MemitHparams):
    """MEMIT's settings (``z``, the layers, ``mom2_update_weight`` λ) plus EMMET's two regularisers.

    C' = λC + μI with μ = ``update_norm_lambda``; ``emmet_lambda`` is added to D's diagonal for batches."""

    update_norm_lambda: float = 0.0
    emmet_lambda: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self, ("mom2_update_weight",), strict=True)
        check_number(self, ("update_norm_lambda", "emmet_lambda"))


class EmmetEditor(SpreadEditor):
    """``emmet``: one or many requests per call, each written with equality (up to ``emmet_lambda``)."""

    def __init__(self, hparams: EmmetHparams, *, name: str = "emmet"):
        super().__init__(hparams, name=name)
        self._preservation: dict[int, Tensor] = {}

    def setup(self, model, tokenizer, family, provided) -> None:
        super().setup(model, tokenizer, family, provided)
        self._preservation = {}

    def preservation(self, layer: int, keys: Tensor) -> Tensor:
        """C' at ``layer``: from the provided C, or (no statistics) MEMIT's isotropic stand-in over ``keys``,
        which depends on the request's keys and so is not kept."""
        hp = self.hparams
        C = self.second_moments.get(layer) if hp.mom2_adjustment else None
        if C is None:
            return preservation_matrix(isotropic_second_moment(keys), hp.mom2_update_weight, hp.update_norm_lambda)
        if layer not in self._preservation:
            self._preservation[layer] = preservation_matrix(C, hp.mom2_update_weight, hp.update_norm_lambda)
        return self._preservation[layer]

    def layer_update(self, index: int, layer: int, K: Tensor, R: Tensor, per_request_keys: Sequence[Tensor]):
        C_prime = self.preservation(layer, torch.cat(list(per_request_keys), 0))
        update = emmet_layer_update(K, R, C_prime.to(R.device), emmet_lambda=float(self.hparams.emmet_lambda),
                                    out_dtype=torch.float32)
        return update.delta, update.diagnostics()

    def denominator(self, model, tokenizer, family, request: EditRequest) -> dict[str, float]:
        """D for ``request`` alone at the first edited layer, from its keys on the unedited model: for one
        request ``denominator`` is ``|uᵀk̄|`` with ``u = C'⁻¹k̄ / ‖C'⁻¹k̄‖`` (what the edit divides by), the rest
        ``D``'s eigenvalues, diagonal and condition (all 1x1 here; they describe batches)."""
        layer = self.hparams.layers[0]
        K, per_request = self.mean_keys(model, tokenizer, family, layer, [request])
        C_prime = self.preservation(layer, torch.cat(per_request, 0))
        return emmet_denominator(K, C_prime.to(K.device), emmet_lambda=float(self.hparams.emmet_lambda)).as_dict()
