"""AlphaEdit (Fang et al., ICLR 2025) per-layer update maths: MEMIT's update projected onto a null space.

The preserved knowledge is summarised by the second moment ``C = E[k kᵀ]`` of the layer's keys over text.
Its eigenvectors whose eigenvalues fall below ``nullspace_threshold`` span the directions that text (almost)
never uses; ``P = Û Ûᵀ`` projects onto them (:func:`null_space_projector`, jianghoucheng/AlphaEdit
experiments/evaluate.py:405-422 ``get_project``: an SVD of the unscaled C, singular values below the
threshold). An update of the form ``ΔW = X P`` maps every preserved key ``k0`` (``P k0 = 0``) to zero, so what
the layer computes for that text does not move.

The update (:func:`alphaedit_layer_update`) is the official code's solve (AlphaEdit/AlphaEdit_main.py:130-132):
``ΔWᵀ = (P (K₁K₁ᵀ + K_pK_pᵀ) + L2·I)⁻¹ P K₁ Rᵀ``, with ``K₁`` the new edits' keys, ``R`` their residual share,
``K_pK_pᵀ`` the sum of ``k kᵀ`` over the keys of earlier edits in a sequential run (the official ``cache_c``,
:137-148: accumulated after each batch, from the keys of the edited model) and ``L2`` the official ``L2``.
Transposed, with ``M = K₁K₁ᵀ + K_pK_pᵀ`` symmetric: ``ΔW = R K₁ᵀ P (M P + L2·I)⁻¹``, the paper's
``ΔW = R K₁ᵀ P (K_pK_pᵀ P + K₁K₁ᵀ P + αI)⁻¹`` (Eq. 14). ``ΔW k0 = 0`` whenever ``P k0 = 0``, exactly: with
``y = (M P + L2·I)⁻¹ k0``, ``L2·P y = P k0 − P M P y`` gives ``(L2·I + P M P) P y = 0``, so ``P y = 0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from editors.maths import MathsError
from editors.maths.memit import MemitUpdate, check_key_system


@dataclass(frozen=True, eq=False)
class NullSpace:
    """The projector onto ``C``'s eigenvectors with eigenvalue below the threshold, and what it kept."""

    projector: Tensor  # d × d, float64
    rank: int  # dimensions of the null space (P's rank)
    dim: int
    threshold: float
    largest_eigenvalue: float

    def diagnostics(self) -> dict[str, float | int]:
        return {"nullspace_rank": self.rank, "nullspace_share": self.rank / self.dim if self.dim else 0.0}


def null_space_projector(C: Tensor, threshold: float) -> NullSpace:
    """``P = Û Ûᵀ`` over the eigenvectors of the (symmetrised) second moment ``C`` whose eigenvalues are below
    ``threshold``, computed in float64.

    The official code takes an SVD of C; for a symmetric positive semi-definite C its singular values are its
    eigenvalues and its singular vectors its eigenvectors, so the symmetric eigendecomposition gives the same
    projector (and stays real when rounding leaves C slightly indefinite: a tiny negative eigenvalue is below
    any positive threshold, as its singular value would be).
    """
    if C.dim() != 2 or C.shape[0] != C.shape[1]:
        raise MathsError(f"C: expected a square matrix, got shape {tuple(C.shape)}")
    if isinstance(threshold, bool) or not math.isfinite(threshold) or threshold < 0:
        raise MathsError(f"threshold: expected a finite number >= 0, got {threshold!r}")
    c64 = C.detach().to(torch.float64)
    c64 = 0.5 * (c64 + c64.T)
    eigenvalues, eigenvectors = torch.linalg.eigh(c64)
    # |λ| as the singular value the official SVD compares with the threshold
    kept = eigenvectors[:, eigenvalues.abs() < threshold]
    projector = kept @ kept.T
    return NullSpace(projector=projector, rank=int(kept.shape[1]), dim=int(C.shape[0]), threshold=float(threshold),
                     largest_eigenvalue=float(eigenvalues.abs().max()) if eigenvalues.numel() else 0.0)


@dataclass(frozen=True, eq=False)
class AlphaEditUpdate(MemitUpdate):
    """One layer's AlphaEdit update: MEMIT's diagnostics plus how much of the new keys the projection keeps."""

    projected_key_share: float  # ‖P K₁‖_F / ‖K₁‖_F: how much of the new keys lies in the null space

    def diagnostics(self) -> dict[str, float | int]:
        return {**super().diagnostics(), "projected_key_share": self.projected_key_share}


def alphaedit_layer_update(
    K: Tensor,
    R: Tensor,
    P: Tensor,
    l2: float,
    *,
    previous: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    with_condition: bool = True,
) -> AlphaEditUpdate:
    """``ΔW = R Kᵀ P ((K Kᵀ + K_pK_pᵀ) P + l2·I)⁻¹`` in float64 (``(d_out, d_in)``, returned in ``out_dtype``,
    default ``R``'s dtype).

    ``K`` is ``d_in × n`` (one key per request), ``R`` ``d_out × n``, ``P`` the ``d_in × d_in`` projector
    (:func:`null_space_projector`), ``previous`` the ``d_in × d_in`` sum ``K_pK_pᵀ`` of earlier edits' keys
    (None: no earlier edits). ``l2 > 0`` keeps the system invertible on the directions ``P`` removes.
    """
    d_in, n = check_key_system(K, R, P=P, previous=previous)
    if isinstance(l2, bool) or not math.isfinite(l2) or l2 <= 0:
        raise MathsError(f"l2: expected a finite number > 0, got {l2!r}")
    dev = R.device
    K64 = K.to(device=dev, dtype=torch.float64)
    R64 = R.to(torch.float64)
    P64 = P.to(device=dev, dtype=torch.float64)
    M = K64 @ K64.T
    if previous is not None:
        M = M + previous.to(device=dev, dtype=torch.float64)
    # The official left-hand side, P M + l2·I (not symmetric: P and M do not commute). Solving it against P K
    # (n right-hand sides) gives ΔWᵀ = X Rᵀ without forming d_out right-hand sides or an inverse.
    A = P64 @ M + l2 * torch.eye(d_in, dtype=torch.float64, device=dev)
    try:
        X = torch.linalg.solve(A, P64 @ K64)
    except torch.linalg.LinAlgError as err:
        raise MathsError(f"alphaedit_layer_update: P(K Kᵀ + K_pK_pᵀ) + l2·I is singular (l2={l2}); {err}") from err
    delta = R64 @ X.T
    if with_condition:
        singular = torch.linalg.svdvals(A)
        lo, hi = float(singular.min()), float(singular.max())
        condition = math.inf if lo == 0.0 else hi / lo
    else:
        condition = math.nan
    key_norm = float(torch.linalg.matrix_norm(K64))
    share = float(torch.linalg.matrix_norm(P64 @ K64)) / key_norm if key_norm > 0 else math.nan
    return AlphaEditUpdate(
        delta=delta.to(out_dtype or R.dtype),
        delta_fro=float(torch.linalg.matrix_norm(delta)),
        delta_max_abs=float(delta.abs().max()) if delta.numel() else 0.0,
        condition_number=condition,
        n_requests=n,
        residual_fro=float(torch.linalg.matrix_norm(R64)),
        projected_key_share=share,
    )
