"""MEMIT's residual spread with a replaceable per-layer solve: the frame AlphaEdit and EMMET share with MEMIT.

Both methods' official code is MEMIT's ``execute_memit`` with one line changed, the solve that turns a layer's
keys ``K`` and residual share ``R`` into ``ΔW`` (jianghoucheng/AlphaEdit AlphaEdit/AlphaEdit_main.py:107-145,
scalable-model-editing/unified-model-editing emmet/emmet_main.py:174-310): the target ``z`` at the last edited
layer (found like ROME's ``v*``), then layer by layer in order, with the earlier layers already updated,
``K`` = each request's mean key over the context templates, ``R = (z − h) / (layers left)``. This module keeps
that frame once (:class:`SpreadEditor`, over :class:`editors.memit.MemitEditor`'s targets, set-up and needs)
and leaves the solve to :meth:`SpreadEditor.layer_update`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from editors.base import EditOutcome, EditRequest
from editors.maths import as_out_in, delta_to_storage
from editors.maths.memit import distribute_residual
from editors.memit import MemitEditor, layer_outputs
from editors.rome import keys_and_outputs

log = logging.getLogger(__name__)


class SpreadEditor(MemitEditor):
    """MEMIT's frame; subclasses implement :meth:`layer_update` (and may use :meth:`after_edit`)."""

    def layer_update(self, index: int, layer: int, K: Tensor, R: Tensor, per_request_keys: Sequence[Tensor]
                     ) -> tuple[Tensor, dict[str, float | int]]:
        """``(ΔW in (d_out, d_in), diagnostics)`` for the ``index``-th edited layer ``layer``: ``K`` is
        ``d_in × n`` (mean keys), ``R`` ``d_out × n`` (this layer's residual share), ``per_request_keys`` each
        request's keys over the context templates (rows)."""
        raise NotImplementedError

    def after_edit(self, model, tokenizer, family, requests: Sequence[EditRequest]) -> None:
        """Called once every layer is written (AlphaEdit records the new keys here)."""

    def mean_keys(self, model, tokenizer, family, layer: int, requests: Sequence[EditRequest]
                  ) -> tuple[Tensor, list[Tensor]]:
        """``K`` (``d_in × n``, each request's key averaged over the context templates, as MEMIT's) and the
        per-template keys of each request."""
        contexts = self._contexts(model, tokenizer)
        per_request = [keys_and_outputs(model, tokenizer, family, layer, contexts, r)[0] for r in requests]
        return torch.stack([keys.mean(0) for keys in per_request], 1), per_request

    def _apply(self, model, tokenizer, family, requests: list[EditRequest]) -> EditOutcome:
        hp = self.hparams
        self._check_layers(model, family)
        z, z_nlls = self.targets(model, tokenizer, family, requests)
        last = hp.layers[-1]
        diagnostics: dict[str, Any] = {
            "layers": ",".join(str(x) for x in hp.layers),
            "n_requests": len(requests),
            "z_final_nll": float(sum(z_nlls) / len(z_nlls)),
        }
        for index, layer in enumerate(hp.layers):
            K, per_request = self.mean_keys(model, tokenizer, family, layer, requests)
            h = layer_outputs(model, tokenizer, family, last, requests)
            if index == 0:
                diagnostics["residual_initial_fro"] = float(torch.linalg.matrix_norm(z - h))
            R = distribute_residual(z, h, len(hp.layers) - index)
            delta, layer_diagnostics = self.layer_update(index, layer, K, R, per_request)
            weight = family.get_module(model, family.layer_name("mlp_out", layer)).weight
            if tuple(as_out_in(weight.detach(), family.weight_transposed).shape) != tuple(delta.shape):
                raise ValueError(f"{self.name}: update shape {tuple(delta.shape)} does not fit layer {layer}")
            with torch.no_grad():
                weight.add_(delta_to_storage(delta.to(weight.device), family.weight_transposed).to(weight.dtype))
            for key, value in layer_diagnostics.items():
                if key == "n_requests":
                    continue
                # the first layer's numbers also go unsuffixed: the harness reads "denominator" there
                if index == 0 and key == "denominator":
                    diagnostics[key] = float(value)
                diagnostics[f"{key}_L{layer}"] = float(value)
        self.after_edit(model, tokenizer, family, requests)
        return self._finish(model, tokenizer, family, requests, z, diagnostics)
