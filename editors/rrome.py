"""r-ROME (Gupta et al. 2024, "Rebuilding ROME") on :class:`editors.rome.RomeEditor`'s measurements.

r-ROME measures what C-ROME measures (the keys and MLP outputs over the context templates, ``δ`` from v*'s
search) and edits with :func:`editors.maths.rrome.r_rome_update`: the mean key ``k̄`` is mapped to the bare
prompt's value plus ``δ``. It differs from this project's ``c-rome`` (as of this module) in one place, the value
``k̄`` is mapped to: ``c-rome`` maps it to ``W k̄ + δ`` (residual ``δ``), r-ROME to ``W kᵘ + δ`` (residual
``δ + W(kᵘ − k̄)``). v*'s search is ``RomeEditor``'s (its early stop included). Where ``RomeHparams`` has a
setting for C-ROME's value (``c_rome_target``, ``"bare"`` being r-ROME's), the two coincide and ``r-rome`` can
become a name for ``c-rome``; ``tests/test_new_editors.py`` checks that on the organism.
"""

from __future__ import annotations

import logging

import torch

from editors.base import EditOutcome, EditRequest
from editors.maths import as_out_in, delta_to_storage
from editors.maths.rrome import r_rome_update
from editors.rome import RomeEditor, RomeHparams

log = logging.getLogger(__name__)


class RRomeEditor(RomeEditor):
    """``r-rome``: C-ROME's keys (and denominator ``|uᵀk̄|``), r-ROME's value."""

    def __init__(self, hparams: RomeHparams, *, name: str = "r-rome"):
        super().__init__(name, hparams, consistent=True, test_prefix=False)

    def apply(self, model, tokenizer, family, requests: list[EditRequest]) -> EditOutcome:
        if len(requests) != 1:
            raise ValueError(f"{self.name} edits one request at a time (got {len(requests)}); emmet is its batch form")
        inputs = self.measure(model, tokenizer, family, requests[0])
        name = self.parameters_touched(model, family)[0]
        param = family.get_module(model, name.rsplit(".", 1)[0]).weight
        W = as_out_in(param.detach(), family.weight_transposed).float()
        update = r_rome_update(W, inputs.k_bare, inputs.k_mean, inputs.out_bare, inputs.out_mean, inputs.delta,
                               covariance=self.covariance)
        with torch.no_grad():
            param.add_(delta_to_storage(update.delta, family.weight_transposed).to(param.dtype))
        diagnostics = {**update.diagnostics(), "layer": self.hparams.layer, "v_final_nll": inputs.final_nll,
                       "delta_norm": float(inputs.delta.norm()), "subject_position_bare": inputs.subject_positions[0]}
        return EditOutcome(edited=(name,), diagnostics=diagnostics)
