"""AlphaEdit (Fang et al., ICLR 2025): MEMIT's residual spread with each layer's update projected onto the null
space of the preserved knowledge's keys.

Maths in :mod:`editors.maths.alphaedit`; the frame (target ``z``, keys, residual shares) is MEMIT's
(:mod:`editors.spread`). Per edited layer, the projector ``P`` comes from the layer's ``C`` (declared as a
:class:`~editors.base.SecondMomentNeed`, measured on the unedited model, as the official code computes ``P`` once
before any edit). In a sequential run the keys of the edits already made are kept (the official ``cache_c``):
the next edit's solve includes them, so it disturbs its predecessors as little as the preserved knowledge.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from editors.base import EditRequest, Needs, SecondMomentNeed
from editors.domain import check_number
from editors.maths.alphaedit import NullSpace, alphaedit_layer_update, null_space_projector
from editors.memit import MemitHparams
from editors.restore import tensor_digest
from editors.spread import SpreadEditor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AlphaEditHparams(MemitHparams):
    """MEMIT's settings (``z`` and the layers), the null space's threshold and the update's ``L2``.

    ``mom2_update_weight`` is carried because the official configs carry it (MEMIT's), but AlphaEdit's update
    never reads it: ``C`` enters only through ``P``. ``mom2_adjustment`` must be true: without ``C`` there is no
    null space."""

    # eigenvalues of C (unscaled, E[k kᵀ]) below this span the null space; official 2e-2 on every model
    nullspace_threshold: float = 2e-2
    # the official "L2": the ridge on the projected system
    l2: float = 10.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self, ("nullspace_threshold", "l2"), strict=True)
        if not self.mom2_adjustment:
            raise ValueError("AlphaEditHparams.mom2_adjustment: must be true (the null space is C's)")


class AlphaEditEditor(SpreadEditor):
    """``alphaedit``: one or many requests per call; sequential edits accumulate the earlier edits' keys."""

    def __init__(self, hparams: AlphaEditHparams, *, name: str = "alphaedit"):
        super().__init__(hparams, name=name)
        self._null_spaces: dict[int, NullSpace] = {}
        self._previous: dict[int, Tensor] = {}
        # digests of the edited weights right after this editor's last edit: the next edit continues a sequence
        # (keeps the earlier keys) only if the weights are still exactly those
        self._after_last_edit: tuple[str, ...] | None = None
        self._n_previous = 0

    def needs(self, model, family) -> Needs:
        hp = self.hparams
        return Needs(second_moments=SecondMomentNeed(hp.layers, hp.mom2_n_samples),
                     context_templates=hp.context_templates)

    def setup(self, model, tokenizer, family, provided) -> None:
        super().setup(model, tokenizer, family, provided)
        self._null_spaces = {}
        self._forget()

    def _forget(self) -> None:
        self._previous = {}
        self._after_last_edit = None
        self._n_previous = 0

    def null_space(self, layer: int) -> NullSpace:
        if layer not in self._null_spaces:
            C = self.second_moments.get(layer)
            if C is None:
                raise ValueError(f"{self.name}: no second moment C for layer {layer}: set the editor up with one "
                                 "(editors.provision.set_up); its null space is C's")
            space = null_space_projector(C, float(self.hparams.nullspace_threshold))
            log.info("%s: layer %d null space %d of %d dimensions (eigenvalues < %g; largest %.3g)", self.name,
                     layer, space.rank, space.dim, space.threshold, space.largest_eigenvalue)
            self._null_spaces[layer] = space
        return self._null_spaces[layer]

    def _weights_digest(self, model, family) -> tuple[str, ...]:
        params = dict(model.named_parameters())
        return tuple(tensor_digest(params[name].detach()) for name in self.parameters_touched(model, family))

    def _apply(self, model, tokenizer, family, requests: list[EditRequest]):
        # a model restored (or edited by anyone else) since this editor's last edit starts a new sequence: the
        # keys kept from before belong to edits that are no longer in it
        if self._after_last_edit is not None and self._after_last_edit != self._weights_digest(model, family):
            log.debug("%s: the weights changed since the last edit; starting a new sequence", self.name)
            self._forget()
        before = self._n_previous
        outcome = super()._apply(model, tokenizer, family, requests)
        self._after_last_edit = self._weights_digest(model, family)
        return dataclasses.replace(outcome, diagnostics={**outcome.diagnostics, "previous_edits": before})

    def layer_update(self, index: int, layer: int, K: Tensor, R: Tensor, per_request_keys: Sequence[Tensor]):
        space = self.null_space(layer)
        previous = self._previous.get(layer)
        update = alphaedit_layer_update(K, R, space.projector, float(self.hparams.l2), previous=previous,
                                        out_dtype=torch.float32)
        return update.delta, {**update.diagnostics(), **space.diagnostics()}

    def after_edit(self, model, tokenizer, family, requests: Sequence[EditRequest]) -> None:
        # the official cache_c: Σ k kᵀ of the edited keys, measured on the model as edited (AlphaEdit_main.py:146-148)
        for layer in self.hparams.layers:
            K, _ = self.mean_keys(model, tokenizer, family, layer, requests)
            K64 = K.to(torch.float64)
            added = K64 @ K64.T
            self._previous[layer] = added if layer not in self._previous else self._previous[layer] + added
        self._n_previous += len(requests)

    @property
    def previous_keys(self) -> Mapping[int, Tensor]:
        """``K_pK_pᵀ`` per layer: the earlier edits of the current sequence (empty after a restore)."""
        return dict(self._previous)
