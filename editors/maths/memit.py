"""MEMIT per-layer update maths (Meng et al. 2023).

For one layer with keys ``K`` (``d_in × n``, one column per request), residual targets ``R`` (``d_out × n``)
and second moment ``C``, MEMIT takes the minimiser of ``‖ΔW K − R‖²_F + λ tr(ΔW C ΔWᵀ)``, whose normal
equations ``ΔW (λC + K Kᵀ) = R Kᵀ`` give ``ΔW = R Kᵀ (λC + K Kᵀ)⁻¹``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from editors.maths import MathsError


def distribute_residual(z: Tensor, h: Tensor, layers_left: int) -> Tensor:
    """The share of the residual ``z − h`` this layer must write: ``(z − h) / layers_left``.

    ``z`` and ``h`` are ``d × n`` (one column per request) or ``d``; ``layers_left`` counts this layer.
    """
    if z.shape != h.shape:
        raise MathsError(f"distribute_residual: z has shape {tuple(z.shape)} but h has {tuple(h.shape)}")
    if isinstance(layers_left, bool) or not isinstance(layers_left, int) or layers_left < 1:
        raise MathsError(f"layers_left: expected an int >= 1, got {layers_left!r}")
    return (z - h) / layers_left


@dataclass(frozen=True, eq=False)
class MemitUpdate:
    """One layer's MEMIT update and the diagnostics of the system it solved, as plain numbers."""

    delta: Tensor
    delta_fro: float
    delta_max_abs: float
    condition_number: float
    n_requests: int
    residual_fro: float

    def diagnostics(self) -> dict[str, float | int]:
        return {
            "delta_fro": self.delta_fro,
            "delta_max_abs": self.delta_max_abs,
            "condition_number": self.condition_number,
            "n_requests": self.n_requests,
            "residual_fro": self.residual_fro,
        }


def check_key_system(K: Tensor, R: Tensor, **squares: Tensor | None) -> tuple[int, int]:
    """``K`` (``d_in × n``) and ``R`` (``d_out × n``) as a batch update needs them, and every named ``d_in × d_in``
    matrix in ``squares`` (None: absent) of the keys' width; ``(d_in, n)``, or a MathsError naming what does not
    fit."""
    if K.dim() != 2 or R.dim() != 2:
        raise MathsError(f"K and R must be 2-D; got K {tuple(K.shape)}, R {tuple(R.shape)}")
    d_in, n = K.shape
    if R.shape[1] != n:
        raise MathsError(f"R: expected {n} columns (one per request, as in K), got {R.shape[1]}")
    for name, square in squares.items():
        if square is not None and square.shape != (d_in, d_in):
            raise MathsError(f"{name}: expected shape ({d_in}, {d_in}) to match K, got {tuple(square.shape)}")
    return d_in, n


def memit_layer_update(
    K: Tensor,
    R: Tensor,
    C: Tensor,
    lam: float,
    *,
    out_dtype: torch.dtype | None = None,
    with_condition: bool = True,
) -> MemitUpdate:
    """``ΔW = R Kᵀ (λC + K Kᵀ)⁻¹``, solved in float64, returned in ``out_dtype`` (default ``R``'s dtype).

    ``with_condition=False`` skips the eigen-decomposition behind ``condition_number`` (reported as
    ``nan``) when a caller with a very wide layer only needs the update.
    """
    d_in, n = check_key_system(K, R, C=C)
    if not math.isfinite(lam) or lam < 0:
        raise MathsError(f"lam: expected a finite mom2_update_weight >= 0, got {lam!r}")
    dev = R.device
    K64 = K.to(device=dev, dtype=torch.float64)
    R64 = R.to(torch.float64)
    A = lam * C.to(device=dev, dtype=torch.float64) + K64 @ K64.T
    # C from a statistics pass is symmetric only up to rounding; the maths assumes exact symmetry
    A = 0.5 * (A + A.T)
    # Since A is symmetric, R Kᵀ A⁻¹ = R (A⁻¹ K)ᵀ. Solving A X = K has n right-hand sides (the requests)
    # instead of d_out for A Y = K Rᵀ, never forms an inverse, and yields ΔW = R Xᵀ as an explicit product
    # of rank <= n. float64 because λC (λ ~ 1e4) plus K Kᵀ is routinely conditioned beyond float32's reach.
    try:
        X = torch.linalg.solve(A, K64)
    except torch.linalg.LinAlgError as err:
        raise MathsError(f"memit_layer_update: λC + K Kᵀ is singular (lam={lam}); {err}") from err
    delta = R64 @ X.T
    if with_condition:
        eig = torch.linalg.eigvalsh(A).abs()
        lo, hi = float(eig.min()), float(eig.max())
        condition = math.inf if lo == 0.0 else hi / lo
    else:
        condition = math.nan
    return MemitUpdate(
        delta=delta.to(out_dtype or R.dtype),
        delta_fro=float(torch.linalg.matrix_norm(delta)),
        delta_max_abs=float(delta.abs().max()) if delta.numel() else 0.0,
        condition_number=condition,
        n_requests=n,
        residual_fro=float(torch.linalg.matrix_norm(R64)),
    )
