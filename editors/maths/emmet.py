"""EMMET (Gupta et al. 2024, "A Unified Framework for Model Editing") per-layer update maths.

EMMET is ROME for a batch: it preserves the layer's outputs on the statistics' keys (least squares weighted by
``C``) under *equality* constraints ``(W + ΔW) kᵢ = W kᵢ + rᵢ`` for every request, where MEMIT only asks for them
in least squares. The Lagrangian gives ``ΔW = R D⁻¹ Kᵀ C'⁻¹`` with ``D = Kᵀ C'⁻¹ K`` (``n × n``), so
``ΔW K = R D⁻¹ D = R``: every constraint holds exactly. This is the official code
(scalable-model-editing/unified-model-editing emmet/emmet_main.py:219-256): ``C' = λ C + μ I`` with
``λ = mom2_update_weight`` (:220-221) and ``μ = update_norm_lambda`` (:223-224), ``D = Kᵀ C'⁻¹ K`` (:235) plus
``emmet_lambda · I`` when the batch has more than one request (:237-238, "to counter ill-conditioned D"; with
it the constraints hold only approximately), and ``ΔW = R (D⁻¹ Kᵀ C'⁻¹)`` (:250, :256).

With one request ``D`` is the number ``kᵀ C'⁻¹ k`` and ``ΔW = r (C'⁻¹k)ᵀ / (kᵀ C'⁻¹ k)``: ROME's rank-one
update with ``u = C'⁻¹k / ‖C'⁻¹k‖`` and the same key in the residual and the denominator, i.e. C-ROME's
(:func:`editors.maths.rome.rome_update` with ``consistent=True``). ``D`` is the batch's denominator: a small
eigenvalue of ``D`` is what a small ``uᵀk`` is to ROME. :func:`emmet_denominator` reports it on ROME's scale
(``D`` normalised by ``‖C'⁻¹kᵢ‖``, which for one request is exactly ``|uᵀk|``) with ``D``'s conditioning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from editors.maths import MathsError


def _check_weights(mom2_update_weight: float, update_norm_lambda: float, emmet_lambda: float) -> None:
    for name, value, strict in (("mom2_update_weight", mom2_update_weight, True),
                                ("update_norm_lambda", update_norm_lambda, False),
                                ("emmet_lambda", emmet_lambda, False)):
        bad = isinstance(value, bool) or not math.isfinite(value) or (value <= 0 if strict else value < 0)
        if bad:
            raise MathsError(f"{name}: expected a finite number {'>' if strict else '>='} 0, got {value!r}")


def preservation_matrix(C: Tensor, mom2_update_weight: float = 1.0, update_norm_lambda: float = 0.0) -> Tensor:
    """``C' = λ C + μ I`` in float64 (symmetrised: a statistics pass leaves C symmetric only up to rounding)."""
    _check_weights(mom2_update_weight, update_norm_lambda, 0.0)
    if C.dim() != 2 or C.shape[0] != C.shape[1]:
        raise MathsError(f"C: expected a square matrix, got shape {tuple(C.shape)}")
    c64 = C.detach().to(torch.float64)
    c64 = 0.5 * (c64 + c64.T) * mom2_update_weight
    if update_norm_lambda:
        c64 = c64 + update_norm_lambda * torch.eye(c64.shape[0], dtype=torch.float64, device=c64.device)
    return c64


@dataclass(frozen=True)
class DMeasure:
    """EMMET's batch denominator ``D = Kᵀ C'⁻¹ K`` (plus ``emmet_lambda · I`` for batches) in plain numbers.

    ``denominator`` is the smallest eigenvalue of ``D`` normalised as ROME's ``|uᵀk|`` is (rows and columns
    divided by ``sqrt(‖C'⁻¹kᵢ‖)``): for one request it is ``|uᵀk|`` with ``u = C'⁻¹k/‖C'⁻¹k‖``, the number the
    denominator floor compares. The rest describe ``D`` as it is inverted."""

    denominator: float
    d_min_eigenvalue: float
    d_max_eigenvalue: float
    d_min_diagonal: float
    d_condition: float
    n_requests: int

    def as_dict(self) -> dict[str, float]:
        return {"denominator": self.denominator, "d_min_eigenvalue": self.d_min_eigenvalue,
                "d_max_eigenvalue": self.d_max_eigenvalue, "d_min_diagonal": self.d_min_diagonal,
                "d_condition": self.d_condition, "d_n_requests": float(self.n_requests)}


def _measure(D: Tensor, C_inv_K: Tensor) -> DMeasure:
    n = D.shape[0]
    eig = torch.linalg.eigvalsh(0.5 * (D + D.T))
    lo, hi = float(eig.min()), float(eig.max())
    scale = torch.linalg.vector_norm(C_inv_K, dim=0).rsqrt()
    normalised = torch.linalg.eigvalsh(0.5 * (D + D.T) * scale[:, None] * scale[None, :])
    condition = math.inf if lo <= 0.0 else hi / lo
    return DMeasure(denominator=abs(float(normalised.min())) if n == 1 else float(normalised.min()),
                    d_min_eigenvalue=lo, d_max_eigenvalue=hi, d_min_diagonal=float(torch.diagonal(D).min()),
                    d_condition=condition, n_requests=n)


def _keys(K: Tensor, d: int) -> Tensor:
    if K.dim() == 1:
        K = K.reshape(-1, 1)
    if K.dim() != 2 or K.shape[0] != d:
        raise MathsError(f"K: expected a {d} × n matrix of keys, got shape {tuple(K.shape)}")
    if K.shape[1] == 0:
        raise MathsError("K: no keys")
    return K


def _system(K: Tensor, C_prime: Tensor, emmet_lambda: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(K, C'⁻¹K, D)`` in float64, ``D`` with ``emmet_lambda`` on its diagonal for batches as the code adds it."""
    K64 = K.to(device=C_prime.device, dtype=torch.float64)
    try:
        C_inv_K = torch.linalg.solve(C_prime, K64)
    except torch.linalg.LinAlgError as err:
        raise MathsError(f"C' = λC + μI is singular: cannot solve C' X = K ({err})") from err
    D = K64.T @ C_inv_K
    if D.shape[0] > 1 and emmet_lambda:
        D = D + emmet_lambda * torch.eye(D.shape[0], dtype=torch.float64, device=D.device)
    return K64, C_inv_K, D


def emmet_denominator(K: Tensor, C_prime: Tensor, *, emmet_lambda: float = 0.0) -> DMeasure:
    """:class:`DMeasure` of the keys ``K`` (``d × n``, or one key ``d``) against ``C'``
    (:func:`preservation_matrix`), from keys alone."""
    _check_weights(1.0, 0.0, emmet_lambda)
    K = _keys(K, C_prime.shape[0])
    _, C_inv_K, D = _system(K, C_prime, emmet_lambda)
    return _measure(D, C_inv_K)


@dataclass(frozen=True, eq=False)
class EmmetUpdate:
    """One layer's EMMET update, with its batch denominator and the constraint residual, as plain numbers."""

    delta: Tensor
    measure: DMeasure
    delta_fro: float
    delta_max_abs: float
    residual_fro: float
    # max_i ‖ΔW kᵢ − rᵢ‖ / ‖rᵢ‖: 0 up to rounding without emmet_lambda (the equality constraints)
    constraint_error: float

    def diagnostics(self) -> dict[str, float | int]:
        return {**self.measure.as_dict(), "delta_fro": self.delta_fro, "delta_max_abs": self.delta_max_abs,
                "residual_fro": self.residual_fro, "constraint_error": self.constraint_error,
                "n_requests": self.measure.n_requests}


def emmet_layer_update(K: Tensor, R: Tensor, C_prime: Tensor, *, emmet_lambda: float = 0.0,
                       out_dtype: torch.dtype | None = None) -> EmmetUpdate:
    """``ΔW = R D⁻¹ Kᵀ C'⁻¹``, ``D = Kᵀ C'⁻¹ K (+ emmet_lambda·I when n > 1)``, in float64.

    ``K`` is ``d_in × n`` (one key per request), ``R`` ``d_out × n`` (each request's residual ``v* − W k``, or
    its share of it over several layers), ``C_prime`` ``λC + μI`` (:func:`preservation_matrix`). A singular
    ``D`` (two requests with the same key and different targets cannot both hold with equality) falls back to
    the pseudo-inverse, as the official code does.
    """
    _check_weights(1.0, 0.0, emmet_lambda)
    if R.dim() != 2:
        raise MathsError(f"R: expected a 2-D matrix, got shape {tuple(R.shape)}")
    K = _keys(K, C_prime.shape[0])
    if R.shape[1] != K.shape[1]:
        raise MathsError(f"R: expected {K.shape[1]} columns (one per request, as in K), got {R.shape[1]}")
    K64, C_inv_K, D = _system(K, C_prime, emmet_lambda)
    R64 = R.to(device=C_prime.device, dtype=torch.float64)
    # ΔW = R D⁻¹ (C'⁻¹K)ᵀ (C' symmetric): n right-hand sides, never an explicit d × d inverse
    try:
        coefficients = torch.linalg.solve(D, R64.T)  # D⁻¹ Rᵀ; D is symmetric
    except torch.linalg.LinAlgError:
        coefficients = torch.linalg.pinv(D) @ R64.T
    delta = coefficients.T @ C_inv_K.T
    achieved = delta @ K64
    per_request = torch.linalg.vector_norm(achieved - R64, dim=0) / torch.linalg.vector_norm(R64, dim=0).clamp_min(1e-300)
    return EmmetUpdate(
        delta=delta.to(out_dtype or R.dtype),
        measure=_measure(D, C_inv_K),
        delta_fro=float(torch.linalg.matrix_norm(delta)),
        delta_max_abs=float(delta.abs().max()) if delta.numel() else 0.0,
        residual_fro=float(torch.linalg.matrix_norm(R64)),
        constraint_error=float(per_request.max()),
    )
