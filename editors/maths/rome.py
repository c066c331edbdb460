"""ROME and C-ROME rank-one update maths.

ROME is Meng et al. 2022; C-ROME, the consistent-key variant, is from Yang et al., "Understanding the
Collapse of LLMs in Model Editing" (the same key choice as r-ROME).

``ΔW = (v* − W k) uᵀ / (uᵀ k)`` with ``u = C⁻¹ k̄ / ‖C⁻¹ k̄‖``. Original ROME takes ``k = k^u`` (the key of
the bare, unprefixed prompt) in both the residual and the denominator, while ``u`` is built from the mean key
``k̄`` over the context templates; C-ROME takes ``k = k̄`` everywhere. When ``k^u`` is nearly orthogonal to
``u`` the denominator collapses and the update explodes; that blow-up is the phenomenon the project
certifies against, so nothing here guards against it: a zero denominator yields ``inf``/``nan`` entries and
no exception. Guards belong to the editors, which can report them.

``v*`` is the bare prompt's value plus the searched ``δ`` for both methods (:func:`value_target`), so C-ROME's
residual is ``δ + W(kᵘ − k̄)``, as the papers' fork computes it. ``C⁻¹k̄`` is a float64 solve, where ROME's
code inverts C with float32-cast ``torch.inverse`` (rome/compute_u.py get_inv_cov): a stated deviation, since
an explicit float32 inverse loses the small eigen-directions of an ill-conditioned C that ``u`` depends on.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from editors.maths import MathsError, compute_dtype

log = logging.getLogger(__name__)

KeyConvention = Literal["bare", "mean"]


def _vector(name: str, t: Tensor, dim: int | None = None) -> Tensor:
    """Accept ``(d,)``, ``(d, 1)`` or ``(1, d)``: hooks hand keys over in any of these shapes."""
    if t.dim() == 2 and 1 in t.shape:
        t = t.reshape(-1)
    if t.dim() != 1:
        raise MathsError(f"{name}: expected a vector, got shape {tuple(t.shape)}")
    if dim is not None and t.shape[0] != dim:
        raise MathsError(f"{name}: expected length {dim}, got {t.shape[0]}")
    return t


def _matrix(name: str, t: Tensor) -> Tensor:
    if t.dim() != 2:
        raise MathsError(f"{name}: expected a 2-D matrix, got shape {tuple(t.shape)}")
    return t


def second_moment(keys: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
    """Uncentred second moment ``E[k kᵀ]`` of ``keys`` (``n × d``), accumulated in float64.

    Returned in ``dtype``, by default the keys' dtype promoted to at least float32.
    """
    keys = _matrix("keys", keys)
    if keys.shape[0] == 0:
        raise MathsError("keys: need at least one key to estimate a second moment")
    k64 = keys.to(torch.float64)
    mom = (k64.T @ k64) / keys.shape[0]
    return mom.to(dtype or compute_dtype(keys))


class SecondMomentAccumulator:
    """Streaming ``E[k kᵀ]`` over batches of keys, for statistics passes over a corpus.

    Summing ``kᵀk`` per batch in float64 and dividing once at the end gives the same value as
    :func:`second_moment` over the concatenated keys, without holding the whole corpus in memory.
    """

    def __init__(self, dim: int, *, device: torch.device | str | None = None) -> None:
        if dim <= 0:
            raise MathsError(f"dim: expected a positive key dimension, got {dim}")
        self.dim = dim
        self._sum = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self._count = 0

    @property
    def count(self) -> int:
        return self._count

    def update(self, keys: Tensor) -> None:
        keys = _matrix("keys", keys)
        if keys.shape[1] != self.dim:
            raise MathsError(f"keys: expected {self.dim} columns, got {keys.shape[1]}")
        k64 = keys.to(device=self._sum.device, dtype=torch.float64)
        self._sum += k64.T @ k64
        self._count += keys.shape[0]

    def mean(self, *, dtype: torch.dtype = torch.float32) -> Tensor:
        if self._count == 0:
            raise MathsError("SecondMomentAccumulator: no keys were added")
        return (self._sum / self._count).to(dtype)


def left_direction(
    k_bar: Tensor, c_inv: Tensor | None = None, *, covariance: Tensor | None = None
) -> Tensor:
    """``u = C⁻¹ k̄ / ‖C⁻¹ k̄‖``.

    Pass the second moment as ``covariance`` (preferred: solved, never inverted) or an already inverted
    ``c_inv``; with neither, ``C = I`` (``mom2_adjustment`` off) and ``u`` is ``k̄`` normalised. The solve
    runs in float64 because real second moments are badly conditioned; ``u`` is returned in float32, or
    float64 when any input is float64.
    """
    k_bar = _vector("k_bar", k_bar)
    d = k_bar.shape[0]
    if c_inv is not None and covariance is not None:
        raise MathsError("left_direction: give either c_inv or covariance, not both")
    out_dtype = compute_dtype(*(t for t in (k_bar, c_inv, covariance) if t is not None))
    k64 = k_bar.to(torch.float64)
    if covariance is not None:
        cov = _square("covariance", covariance, d).to(device=k64.device, dtype=torch.float64)
        try:
            direction = torch.linalg.solve(cov, k64)
        except torch.linalg.LinAlgError as err:
            raise MathsError(f"covariance: singular second moment, cannot solve C u = k_bar ({err})") from err
    elif c_inv is not None:
        direction = _square("c_inv", c_inv, d).to(device=k64.device, dtype=torch.float64) @ k64
    else:
        direction = k64
    norm = torch.linalg.vector_norm(direction)
    if not bool(torch.isfinite(norm)) or float(norm) == 0.0:
        raise MathsError(f"left_direction: C⁻¹k̄ has norm {float(norm)}; k_bar or the covariance is degenerate")
    return (direction / norm).to(out_dtype)


def covariance_solver(covariance: Tensor) -> Callable[[Tensor], Tensor]:
    """``x -> C⁻¹x`` in float64 for a second moment C, factorised once for many keys.

    A pool of thousands of cases on a large model would otherwise pay a full solve (O(d³), d = 6400 for
    GPT-2-XL) per case; a Cholesky factor makes each case O(d²). C estimated from text can be singular
    enough to defeat Cholesky; an LU factor takes over then, as :func:`left_direction`'s plain solve would.
    """
    c64 = covariance.detach().to(torch.float64)
    factor, info = torch.linalg.cholesky_ex(c64)
    if int(info) == 0:
        return lambda x: torch.cholesky_solve(x.reshape(-1, 1).to(c64.device), factor).reshape(-1)
    log.info("C is not positive definite to float64 precision; solving with an LU factor")
    lu, pivots = torch.linalg.lu_factor(c64)
    return lambda x: torch.linalg.lu_solve(lu, pivots, x.reshape(-1, 1).to(c64.device)).reshape(-1)


@dataclass(frozen=True)
class KeyMeasure:
    """ROME's denominator for one edit from its keys alone, with the key statistics the papers report."""

    # |uᵀk|, u = C⁻¹k̄ / ‖C⁻¹k̄‖, k = kᵘ (rome) or k̄ (C-ROME): what an edit of this case divides by
    denominator: float
    raw_denominator: float  # |(C⁻¹k̄)ᵀk|
    key_cosine: float  # cos(kᵘ, k̄)
    key_norm: float  # ‖kᵘ‖
    mean_key_norm: float  # ‖k̄‖
    # mean |uᵀk'| / |uᵀk| over ordinary text's keys k' (:func:`interference`); None without such keys
    interference: float | None = None

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def interference(direction: Tensor, key: Tensor, other_keys: Tensor) -> float:
    """How much of an edit every other token receives: the mean of ``|uᵀk'| / |uᵀk|`` over the rows ``k'`` of
    ``other_keys``, for the update's left vector ``u`` (``direction``, any scale) and the key ``k`` it divides by.

    A rank-one update moves the layer's output for a key ``k'`` by ``(v* − Wk) · uᵀk' / uᵀk``: the edited key gets
    the whole residual, every other key this fraction of it. A small denominator raises it for all text at once
    (the papers' collapse); a ``u`` aligned with keys that ordinary text uses raises it at an ordinary
    denominator. ``inf`` when ``uᵀk`` is 0, NaN when a value is not finite.
    """
    u = _vector("direction", direction).detach().to(torch.float64)
    k = _vector("key", key, u.shape[0]).detach().to(device=u.device, dtype=torch.float64)
    if other_keys.ndim != 2 or other_keys.shape[1] != u.shape[0] or other_keys.shape[0] == 0:
        raise MathsError(f"other_keys: expected a non-empty [n, {u.shape[0]}] matrix, got {tuple(other_keys.shape)}")
    # the product in the keys' own precision (a float64 copy of 4,096 keys is 200 MB at GPT-2-XL's width)
    keys = other_keys.detach()
    reach = (keys @ u.to(device=keys.device, dtype=keys.dtype)).abs().to(torch.float64).mean().to(u.device)
    own = torch.dot(u, k).abs()
    if not (math.isfinite(float(reach)) and math.isfinite(float(own))):
        return math.nan
    return math.inf if float(own) == 0.0 else float(reach / own)


def measure_keys(k_bare: Tensor, k_mean: Tensor, solve: Callable[[Tensor], Tensor] | None = None, *,
                 consistent: bool = False, other_keys: Tensor | None = None) -> KeyMeasure:
    """The denominator ``rome`` (``consistent`` False: ``|uᵀkᵘ|``) or C-ROME (True: ``|uᵀk̄|``) divides by for
    keys ``kᵘ`` and ``k̄``; ``solve`` is ``x -> C⁻¹x`` (:func:`covariance_solver`), or None for ``C = I``.
    With ``other_keys`` (keys of ordinary text at the same layer), the measure also carries the edit's
    :func:`interference`.

    The arithmetic is :func:`left_direction`'s (float64, u = C⁻¹k̄ / ‖C⁻¹k̄‖), so the score is the
    ``denominator`` an edit reports, to float rounding. A zero or non-finite ``C⁻¹k̄`` gives NaN, which ranks
    as most dangerous: an edit of such a case cannot be computed at all.
    """
    kb = _vector("k_bare", k_bare).detach().to(torch.float64)
    km = _vector("k_mean", k_mean, kb.shape[0]).detach().to(device=kb.device, dtype=torch.float64)
    direction = km if solve is None else solve(km).to(km.device)
    norm = float(torch.linalg.vector_norm(direction))
    cosine, key_norm, mean_norm = key_cosine(kb, km), float(kb.norm()), float(km.norm())
    if not math.isfinite(norm) or norm == 0.0:
        log.warning("C⁻¹k̄ has norm %s (a degenerate mean key or covariance); scoring the case as NaN", norm)
        return KeyMeasure(math.nan, math.nan, cosine, key_norm, mean_norm, None if other_keys is None else math.nan)
    key = km if consistent else kb
    raw = float(torch.dot(direction, key))
    reach = None if other_keys is None else interference(direction, key, other_keys)
    return KeyMeasure(abs(raw) / norm, abs(raw), cosine, key_norm, mean_norm, reach)


def _square(name: str, t: Tensor, d: int) -> Tensor:
    if t.shape != (d, d):
        raise MathsError(f"{name}: expected shape ({d}, {d}), got {tuple(t.shape)}")
    return t


def _update_diagnostics(update: RankOneUpdate | RomeUpdate) -> dict[str, float]:
    """The papers' names: ``denominator`` is ``|uᵀk|`` (what they report), the sign is kept beside it."""
    return {
        "denominator": update.abs_denominator,
        "denominator_signed": update.denominator,
        "numerator": update.numerator_norm,
        "delta_fro": update.delta_fro,
        "delta_max_abs": update.delta_max_abs,
    }


@dataclass(frozen=True, eq=False)
class RankOneUpdate:
    """``ΔW = (v* − W k) uᵀ / (uᵀ k)`` in W's dtype, with diagnostics as plain floats."""

    delta: Tensor
    denominator: float
    abs_denominator: float
    numerator_norm: float
    delta_fro: float
    delta_max_abs: float

    def diagnostics(self) -> dict[str, float]:
        return _update_diagnostics(self)


def rank_one_update(W: Tensor, u: Tensor, k: Tensor, v_star: Tensor) -> RankOneUpdate:
    """The rank-one update that maps ``k`` to ``v_star`` and leaves every ``x`` with ``uᵀx = 0`` alone.

    Arithmetic runs in float32 (float64 if any input is); ``delta`` comes back in ``W``'s dtype and device.
    A zero ``uᵀk`` gives ``inf``/``nan`` entries rather than an exception (see the module docstring).
    """
    W = _matrix("W", W)
    d_out, d_in = W.shape
    u = _vector("u", u, d_in)
    k = _vector("k", k, d_in)
    v_star = _vector("v_star", v_star, d_out)
    cdt = compute_dtype(W, u, k, v_star)
    dev = W.device
    Wc = W.to(cdt)
    uc, kc, vc = (t.to(device=dev, dtype=cdt) for t in (u, k, v_star))
    residual = vc - Wc @ kc
    # keep the denominator a tensor: division by a zero tensor gives inf/nan, a Python float would raise
    denom = torch.dot(uc, kc)
    delta = torch.outer(residual, uc) / denom
    # For a rank-one a bᵀ / d: ‖·‖_F = ‖a‖‖b‖/|d| and max|·| = max|a| max|b| / |d|. Computing the norms this
    # way is cheaper than reducing the matrix and, at d = 0, reports the blow-up as inf instead of the nan
    # that the matrix's 0/0 entries would spread into its norm.
    numerator = torch.linalg.vector_norm(residual) * torch.linalg.vector_norm(uc)
    abs_denom = denom.abs()
    max_num = residual.abs().max() * uc.abs().max() if delta.numel() else torch.zeros((), dtype=cdt)
    return RankOneUpdate(
        delta=delta.to(W.dtype),
        denominator=float(denom),
        abs_denominator=float(abs_denom),
        numerator_norm=float(numerator),
        delta_fro=float(numerator / abs_denom),
        delta_max_abs=float(max_num / abs_denom),
    )


@dataclass(frozen=True, eq=False)
class RomeUpdate:
    """A ROME or C-ROME update: the delta, the left direction ``u`` and the papers' diagnostics."""

    delta: Tensor
    u: Tensor
    denominator: float
    abs_denominator: float
    numerator_norm: float
    delta_fro: float
    delta_max_abs: float
    key_cosine: float
    key_convention: KeyConvention

    def diagnostics(self) -> dict[str, float | str]:
        """As :meth:`RankOneUpdate.diagnostics`, plus ``cos(kᵘ, k̄)`` and the key convention."""
        return {**_update_diagnostics(self), "key_cosine": self.key_cosine, "key_convention": self.key_convention}


EarlyStopOn = Literal["loss", "nll"]
EARLY_STOP_ON: tuple[str, ...] = ("loss", "nll")
ConsistentTarget = Literal["bare", "mean"]
CONSISTENT_TARGETS: tuple[str, ...] = ("bare", "mean")


def value_search_stops(nll: float, loss: float, *, below: float, on: EarlyStopOn = "loss") -> bool:
    """Whether v*'s search stops at a step whose target NLL is ``nll`` and whose whole loss is ``loss``.

    ``on="loss"`` is ROME's rule (kmeng01/rome rome/compute_v.py:150 and the collapse papers' fork,
    easyeditor/models/rome/compute_v.py:162: ``if loss < 5e-2: break``, the loss being NLL + KL + decay).
    Whenever the decay alone (``wd·‖δ‖/‖out‖²``) is above ``below``, that rule never fires and every step runs.
    ``on="nll"`` stops once the target is learned, whatever the decay: the project's earlier rule.
    """
    if on not in EARLY_STOP_ON:
        raise MathsError(f"on: expected one of {EARLY_STOP_ON}, got {on!r}")
    return (loss if on == "loss" else nll) < below


def value_target(W: Tensor, k_bare: Tensor, k_bar: Tensor, delta: Tensor, *, consistent: bool,
                 anchor: ConsistentTarget = "bare") -> Tensor:
    """The value ``v*`` (bias left out) that the edited layer must produce for the key it edits.

    ``δ`` is what v*'s search adds to the layer's output at the subject. ROME's target is the bare prompt's
    output plus ``δ``, ``W kᵘ + δ`` (compute_v.py: ``target = target_init + delta``, ``target_init`` read on
    the bare prompt), so its residual ``v* − W kᵘ`` is ``δ``. C-ROME (``consistent``) maps ``k̄`` to a value:

    - ``anchor="bare"``, the papers' fork: the same ``W kᵘ + δ``; its residual ``v* − W k̄`` is
      ``δ + W(kᵘ − k̄)``, the fork's ``target − cur_output`` with ``cur_output`` the mean output over the
      templates (easyeditor/models/rome/compute_v.py:178-206, rome_main's get_module_input_output_at_word
      averaging input and output when ``if_c_rome``).
    - ``anchor="mean"``: ``W k̄ + δ``, residual ``δ``. The search added ``δ`` at every template's subject, so
      each template's output was trained towards ``W kᵢ + b + δ``; their mean is exactly ``W k̄ + b + δ``, the
      value this anchor asks of ``k̄``. The bare anchor adds ``W(kᵘ − k̄)``, which no step of the search saw.

    Arithmetic in float32 (float64 when any input is), on ``W``'s device.
    """
    W = _matrix("W", W)
    d_out, d_in = W.shape
    if anchor not in CONSISTENT_TARGETS:
        raise MathsError(f"anchor: expected one of {CONSISTENT_TARGETS}, got {anchor!r}")
    k_bare, k_bar = _vector("k_bare", k_bare, d_in), _vector("k_bar", k_bar, d_in)
    key = k_bar if consistent and anchor == "mean" else k_bare
    delta = _vector("delta", delta, d_out)
    cdt = compute_dtype(W, key, delta)
    return W.to(cdt) @ key.to(device=W.device, dtype=cdt) + delta.to(device=W.device, dtype=cdt)


def key_cosine(a: Tensor, b: Tensor) -> float:
    """``cos(a, b)`` in float64; ``nan`` when either vector is zero (no meaningful angle)."""
    a64 = _vector("a", a).to(torch.float64)
    b64 = _vector("b", b, a64.shape[0]).to(device=a64.device, dtype=torch.float64)
    na, nb = torch.linalg.vector_norm(a64), torch.linalg.vector_norm(b64)
    if float(na) == 0.0 or float(nb) == 0.0:
        return math.nan
    return float(torch.dot(a64, b64) / (na * nb))


def rome_update(
    W: Tensor,
    k_bare: Tensor,
    k_bar: Tensor,
    v_star: Tensor,
    *,
    consistent: bool,
    covariance: Tensor | None = None,
    c_inv: Tensor | None = None,
) -> RomeUpdate:
    """Original ROME (``consistent=False``: ``k = k^u``) or C-ROME (``consistent=True``: ``k = k̄``).

    ``u`` is always built from ``k̄`` (and the second moment when ``mom2_adjustment`` is on: pass it as
    ``covariance``, or as a ``c_inv`` inverted once and reused across many edits); only the key in the
    residual and the denominator differs between the two methods.
    """
    W = _matrix("W", W)
    d_in = W.shape[1]
    k_bare = _vector("k_bare", k_bare, d_in)
    k_bar = _vector("k_bar", k_bar, d_in)
    u = left_direction(k_bar, c_inv, covariance=covariance)
    key = k_bar if consistent else k_bare
    r1 = rank_one_update(W, u, key, v_star)
    return RomeUpdate(
        delta=r1.delta,
        u=u,
        denominator=r1.denominator,
        abs_denominator=r1.abs_denominator,
        numerator_norm=r1.numerator_norm,
        delta_fro=r1.delta_fro,
        delta_max_abs=r1.delta_max_abs,
        key_cosine=key_cosine(k_bare, k_bar),
        key_convention="mean" if consistent else "bare",
    )
