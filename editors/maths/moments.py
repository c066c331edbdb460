"""Is a second moment ``C = E[k kᵀ]`` well posed enough to be solved with, and how to make one that is not.

ROME solves ``C u = k̄`` and MEMIT ``(λC + K Kᵀ)``; a ``C`` estimated from too few keys, or whose smallest
eigenvalues are rounding noise, turns those solves into amplified noise, silently. :func:`assess_second_moment`
measures the sample (tokens against the key dimension) and the matrix (numerical rank, condition number);
:func:`second_moment_problems` says, with the numbers, why one is refused; :func:`ridged` regularises one whose
rank is the model's own. No I/O: the statistics module decides where the matrix comes from and what to tell the user.

Thresholds, and why (measured on the model organisms, d = 512 keys, 2 CPU cores):

- ``token_count >= d``: fewer keys than dimensions give a singular ``C`` by construction.
- numerical rank ``== d``, counting eigenvalues above ``d · eps(float64) · λ_max`` (the usual ``matrix_rank``
  tolerance for the float64 arithmetic the solves use) and above ``|λ_min|`` when ``λ_min < 0`` (a second moment
  has no negative eigenvalues, so a negative one is the rounding of the stored entries): a ``C`` from too few
  keys is not positive definite once stored; tiny-gpt2's layer-0 ``C`` from 552 keys (1.08 per dimension)
  still had 19 negative eigenvalues, from 831 keys none.
- condition number ``λ_max / λ_min <= MAX_CONDITION`` (1e10): the organisms' statistics over their 400
  held-out sentences (6,533 keys) measure 3.5e6 to 2.9e9 (tiny-gpt2 layer 1), and they edit well; beyond 1e10 a float64 solve keeps
  fewer than 6 of its 16 digits and the smallest eigenvalues sit below the float32 rounding of the stored
  entries (6e-8 of each), so ``u`` would be decided by storage noise.

The rank and condition thresholds refuse only a thin sample, fewer than ``WELL_SAMPLED_TOKENS_PER_DIM`` (10)
keys per dimension (~10x the key dimension in tokens suffices for MEMIT's edits, FastMEMIT 2025; ROME's own
``C`` uses 100,000 Wikipedia texts): past that a singular or ill-conditioned ``C`` is the model's (dead
neurons), more text would not change it, and it is reported rather than refused. A thin sample that passes
is reported too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from editors.maths import MathsError

__all__ = [
    "MAX_CONDITION",
    "WELL_SAMPLED_TOKENS_PER_DIM",
    "SecondMomentQuality",
    "assess_second_moment",
    "ridged",
    "second_moment_concerns",
    "second_moment_problems",
]

MAX_CONDITION = 1e10
WELL_SAMPLED_TOKENS_PER_DIM = 10


@dataclass(frozen=True)
class SecondMomentQuality:
    """What :func:`assess_second_moment` measured; ``condition`` is ``inf`` when ``C`` is not positive definite."""

    dim: int
    token_count: int
    rank: int
    condition: float
    min_eigenvalue: float
    max_eigenvalue: float

    @property
    def tokens_per_dim(self) -> float:
        return self.token_count / self.dim

    @property
    def well_sampled(self) -> bool:
        return self.token_count >= WELL_SAMPLED_TOKENS_PER_DIM * self.dim

    def describe(self) -> str:
        return (f"{self.token_count} tokens for key dimension {self.dim} ({self.tokens_per_dim:.3g} per dimension), "
                f"numerical rank {self.rank}/{self.dim}, condition number {self.condition:.3g}")

    def as_metadata(self) -> dict[str, str]:
        """The numbers as strings, for a statistics file's metadata (``repr`` keeps floats exact)."""
        return {"quality_rank": str(self.rank), "quality_condition": repr(self.condition),
                "quality_min_eigenvalue": repr(self.min_eigenvalue), "quality_max_eigenvalue": repr(self.max_eigenvalue)}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str], *, dim: int, token_count: int) -> SecondMomentQuality | None:
        """The numbers :meth:`as_metadata` wrote, or None when a field is missing or unreadable."""
        try:
            return cls(dim=dim, token_count=token_count, rank=int(metadata["quality_rank"]),
                       condition=float(metadata["quality_condition"]),
                       min_eigenvalue=float(metadata["quality_min_eigenvalue"]),
                       max_eigenvalue=float(metadata["quality_max_eigenvalue"]))
        except (KeyError, ValueError):
            return None


def assess_second_moment(covariance: Tensor, token_count: int) -> SecondMomentQuality:
    """Rank and condition number of the symmetric ``covariance`` (eigenvalues in float64 on its own device;
    a GPU does GPT-2-XL's 6400x6400 in about a second, two CPU cores in about 30 s) and the sample size."""
    if covariance.dim() != 2 or covariance.shape[0] != covariance.shape[1] or covariance.shape[0] == 0:
        raise MathsError(f"covariance: expected a non-empty square matrix, got shape {tuple(covariance.shape)}")
    if isinstance(token_count, bool) or not isinstance(token_count, int) or token_count < 0:
        raise MathsError(f"token_count: expected an integer >= 0, got {token_count!r}")
    c64 = covariance.detach().to(torch.float64)
    if not bool(torch.isfinite(c64).all()):
        d = c64.shape[0]
        return SecondMomentQuality(d, token_count, 0, math.inf, math.nan, math.nan)
    # symmetrised: a float32 accumulation may leave the two triangles a rounding apart
    eigenvalues = torch.linalg.eigvalsh((c64 + c64.T) / 2).cpu()
    d = int(eigenvalues.shape[0])
    lo, hi = float(eigenvalues[0]), float(eigenvalues[-1])
    # a positive semi-definite matrix has no negative eigenvalues, so the most negative one measures the rounding
    # of the stored entries: eigenvalues no larger than it are indistinguishable from zero
    tol = max(d * torch.finfo(torch.float64).eps * max(hi, 0.0), -lo)
    rank = int((eigenvalues > tol).sum()) if hi > 0 else 0
    condition = hi / lo if lo > 0 and rank == d else math.inf
    return SecondMomentQuality(dim=d, token_count=token_count, rank=rank, condition=condition,
                               min_eigenvalue=lo, max_eigenvalue=hi)


def second_moment_problems(quality: SecondMomentQuality, *, max_condition: float = MAX_CONDITION) -> list[str]:
    """Why ``quality``'s ``C`` must not be solved with, one reason per entry; empty when it is well posed.

    A poor rank or conditioning refuses ``C`` only while the sample is thin (fewer than 10 keys per dimension):
    from a well-sampled ``C`` it is the model's own (neurons that never fire: tiny-gptj's layer-0 keys span 88
    of 512 dimensions over 6,533 tokens), which more text cannot fix; :func:`second_moment_concerns` reports it.
    """
    if quality.well_sampled:
        return []
    return _problems(quality, max_condition)


def second_moment_concerns(quality: SecondMomentQuality, *, max_condition: float = MAX_CONDITION) -> list[str]:
    """Rank or conditioning problems of a well-sampled ``C`` (the model's, not the sample's): to be reported."""
    return _problems(quality, max_condition) if quality.well_sampled else []


def _problems(quality: SecondMomentQuality, max_condition: float) -> list[str]:
    problems = []
    if quality.token_count < quality.dim:
        problems.append(f"{quality.token_count} tokens are fewer than the key dimension {quality.dim}, so C is "
                        f"singular by construction")
    if quality.rank < quality.dim:
        problems.append(f"numerical rank {quality.rank} < key dimension {quality.dim} (C is not positive definite; "
                        f"smallest eigenvalue {quality.min_eigenvalue:.3g}, largest {quality.max_eigenvalue:.3g})")
    elif not quality.condition <= max_condition:
        problems.append(f"condition number {quality.condition:.3g} exceeds {max_condition:.3g}")
    return problems


def ridged(covariance: Tensor, ridge: float) -> Tensor:
    """``C + ridge · (tr C / d) · I``: ``covariance`` with ``ridge`` times its mean eigenvalue added to the diagonal,
    in float64 (the precision every solve with C runs in; in half precision a small ridge rounds away); ``C`` itself
    when ``ridge`` is 0.

    Scaled by the mean eigenvalue so that one setting means the same whatever the keys' scale. A ``C`` whose numerical
    rank is below the key dimension (the model's own, e.g. keys that are one per distinct token) leaves ``C u = k̄``
    without a unique solution: a plain solve then fills the missing directions with amplified rounding, and ``u``
    reaches keys that ``C`` never saw. The ridge gives those directions a definite, small weight instead.
    """
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not math.isfinite(ridge) or ridge < 0:
        raise MathsError(f"ridge: expected a finite number >= 0, got {ridge!r}")
    if ridge == 0:
        return covariance
    if covariance.dim() != 2 or covariance.shape[0] != covariance.shape[1] or covariance.shape[0] == 0:
        raise MathsError(f"covariance: expected a non-empty square matrix, got shape {tuple(covariance.shape)}")
    c64 = covariance.detach().to(torch.float64)
    d = c64.shape[0]
    mean_eigenvalue = float(torch.diagonal(c64).sum()) / d
    if not math.isfinite(mean_eigenvalue) or mean_eigenvalue <= 0:
        raise MathsError(f"covariance: mean eigenvalue {mean_eigenvalue} is not positive, so a ridge relative to it "
                         f"is undefined")
    return c64 + (ridge * mean_eigenvalue) * torch.eye(d, dtype=torch.float64, device=c64.device)
