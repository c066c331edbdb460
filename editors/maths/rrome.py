"""r-ROME (Gupta et al. 2024, "Rebuilding ROME") update maths: ROME with consistent keys, as its authors run it.

r-ROME keeps ROME's ``u = C⁻¹k̄ / ‖C⁻¹k̄‖`` (k̄ the mean key over the context templates) and makes the key of the
residual and the denominator consistent with it (scalable-model-editing/rebuilding-rome rome/compute_v.py:169-209,
``enable_random_prefix_keys``, the default of rome/rome_hparams.py): ``cur_input`` and ``cur_output`` are the
key and the MLP output *averaged over the templates*, the target is ``target_init + δ`` with ``target_init`` the
MLP output of the bare prompt (:87, the first rewriting prompt is the ``"{}"`` template), and the right vector is
``(target − cur_output) / (cur_inputᵀ u)``. So, in ``(d_out, d_in)``:

    ΔW = (out_bare + δ − out_mean) uᵀ / (uᵀ k̄)

and since an MLP output is ``W k + b`` (the bias cancels), the residual is ``δ + W(kᵘ − k̄)``: the update maps
``k̄`` to ``W kᵘ + δ``, the bare prompt's value plus the searched ``δ``. That is C-ROME as the collapse papers'
fork computes it (:func:`editors.maths.rome.rome_update` with ``consistent=True`` and ``v* = W kᵘ + δ``).
"""

from __future__ import annotations

from torch import Tensor

from editors.maths import MathsError, compute_dtype
from editors.maths.rome import RomeUpdate, rome_update


def r_rome_residual(out_bare: Tensor, out_mean: Tensor, delta: Tensor) -> Tensor:
    """``out_bare + δ − out_mean``: r-ROME's ``target − cur_output`` (compute_v.py:190, :209)."""
    if not (out_bare.shape == out_mean.shape == delta.shape) or out_bare.dim() != 1:
        raise MathsError(f"out_bare, out_mean, delta: expected vectors of one length, got "
                         f"{tuple(out_bare.shape)}, {tuple(out_mean.shape)}, {tuple(delta.shape)}")
    cdt = compute_dtype(out_bare, out_mean, delta)
    return out_bare.to(cdt) + delta.to(device=out_bare.device, dtype=cdt) - out_mean.to(device=out_bare.device,
                                                                                         dtype=cdt)


def r_rome_update(W: Tensor, k_bare: Tensor, k_mean: Tensor, out_bare: Tensor, out_mean: Tensor, delta: Tensor, *,
                  covariance: Tensor | None = None) -> RomeUpdate:
    """r-ROME's rank-one update from the keys and MLP outputs (bare prompt and template mean) and ``δ``:
    the value ``v* = W k̄ + (out_bare + δ − out_mean)`` for the mean key, through ROME's consistent-key update."""
    residual = r_rome_residual(out_bare, out_mean, delta)
    cdt = compute_dtype(W, k_mean, residual)
    v_star = W.to(cdt) @ k_mean.to(device=W.device, dtype=cdt) + residual.to(device=W.device, dtype=cdt)
    return rome_update(W, k_bare, k_mean, v_star, consistent=True, covariance=covariance)
