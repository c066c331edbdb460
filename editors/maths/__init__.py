"""Pure update maths for the editors: tensors in, tensors and plain-float diagnostics out.

Everything here uses the (out, in) orientation: a linear layer computes ``y = W k`` with ``W`` of shape
``(d_out, d_in)``. Layers that store the transpose (GPT-2's ``Conv1D`` keeps ``(d_in, d_out)``) go through
:func:`as_out_in` on the way in and :func:`delta_to_storage` on the way out, so the formulas are written once.

No hooks, no models, no I/O: the editors gather keys and values with hooks and call into these modules.
"""

from __future__ import annotations

import torch
from torch import Tensor


class MathsError(ValueError):
    """Bad input to an update formula (shape, dtype, degenerate vector); names the offending argument."""


def as_out_in(weight: Tensor, transposed: bool) -> Tensor:
    """Return ``weight`` seen as ``(d_out, d_in)``.

    ``transposed`` is True for layers that store ``(d_in, d_out)`` (GPT-2 ``Conv1D``). The result is a view,
    so the caller must not write into it expecting a copy.
    """
    if weight.dim() != 2:
        raise MathsError(f"weight: expected a 2-D matrix, got shape {tuple(weight.shape)}")
    return weight.t() if transposed else weight


def delta_to_storage(delta_out_in: Tensor, transposed: bool) -> Tensor:
    """Turn an ``(d_out, d_in)`` update into the layout the layer stores, ready for ``weight.add_``."""
    if delta_out_in.dim() != 2:
        raise MathsError(f"delta_out_in: expected a 2-D matrix, got shape {tuple(delta_out_in.shape)}")
    # contiguous so that a stored or cached delta has the same strides as the weight it is added to
    return delta_out_in.t().contiguous() if transposed else delta_out_in


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype the rank-one arithmetic runs in: float64 if any input is, else float32 (never half)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32

__all__ = ["MathsError", "as_out_in", "compute_dtype", "delta_to_storage"]
