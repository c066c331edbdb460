"""AlphaEdit, EMMET and r-ROME update maths, each against an explicit re-derivation in numpy and its defining
property: AlphaEdit leaves preserved keys' outputs alone, EMMET meets its equality constraints and is ROME for one
request, r-ROME is C-ROME mapping k̄ to the bare prompt's value."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from editors.maths import MathsError
from editors.maths.alphaedit import alphaedit_layer_update, null_space_projector
from editors.maths.emmet import emmet_denominator, emmet_layer_update, preservation_matrix
from editors.maths.rome import left_direction, rome_update, value_target

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)
t = torch.from_numpy


def _spd(rng: np.random.Generator, d: int, rank: int | None = None) -> np.ndarray:
    """A second moment E[k kᵀ] of ``rank`` (default d) directions, as a statistics pass would give."""
    A = rng.normal(size=(d, rank or d))
    return A @ A.T / (rank or d)


# ---------------------------------------------------------------------------------------------- AlphaEdit


class Alpha:
    """Preserved keys spanning ``rank`` of ``d_in`` dimensions (C of that rank), new keys, residuals."""

    def __init__(self, d_out: int, d_in: int, rank: int, n: int, n_prev: int, l2: float, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.basis = np.linalg.qr(rng.normal(size=(d_in, d_in)))[0]
        spread = rng.uniform(1.0, 3.0, size=rank)
        # C's range: the first ``rank`` basis vectors with eigenvalues 1-3; the rest exactly 0
        self.C = (self.basis[:, :rank] * spread) @ self.basis[:, :rank].T
        self.rank = rank
        self.K = rng.normal(size=(d_in, n))
        self.R = rng.normal(size=(d_out, n))
        Kp = rng.normal(size=(d_in, n_prev))
        self.previous = Kp @ Kp.T if n_prev else None
        self.l2 = l2

    def P(self, threshold: float = 0.5) -> np.ndarray:
        return null_space_projector(t(self.C), threshold).projector.numpy()

    def run(self, **kwargs: object):
        prev = None if self.previous is None else t(self.previous.copy())
        return alphaedit_layer_update(t(self.K.copy()), t(self.R.copy()), t(self.P()), self.l2, previous=prev,
                                      **kwargs)


alphas = st.builds(Alpha, d_out=st.integers(2, 7), d_in=st.integers(3, 9), rank=st.integers(1, 2),
                   n=st.integers(1, 4), n_prev=st.integers(0, 3), l2=st.sampled_from([0.1, 1.0, 10.0]),
                   seed=st.integers(0, 2**32 - 1))


@SETTINGS
@given(a=alphas)
def test_alphaedit_matches_the_papers_formula(a: Alpha) -> None:
    # ΔW = R K₁ᵀ P (K_pK_pᵀ P + K₁K₁ᵀ P + L2·I)⁻¹ (the paper's Eq. 14), written out with an explicit inverse
    P = a.P()
    prev = a.previous if a.previous is not None else np.zeros_like(P)
    expected = a.R @ a.K.T @ P @ np.linalg.inv(prev @ P + a.K @ a.K.T @ P + a.l2 * np.eye(P.shape[0]))
    got = a.run().delta.numpy()
    assert np.allclose(got, expected, atol=1e-9 * (1 + np.abs(expected).max()))


@SETTINGS
@given(a=alphas, seed=st.integers(0, 2**32 - 1))
def test_alphaedit_leaves_preserved_keys_outputs_unchanged(a: Alpha, seed: int) -> None:
    # any key in C's range (the preserved knowledge's span) is mapped by ΔW to zero
    rng = np.random.default_rng(seed)
    K0 = a.basis[:, : a.rank] @ rng.normal(size=(a.rank, 5))
    delta = a.run().delta.numpy()
    assert np.abs(delta @ K0).max() <= 1e-10 * (1 + np.abs(delta).max() * np.abs(K0).max())


def test_projector_is_the_null_space_of_c_and_matches_the_official_svd() -> None:
    rng = np.random.default_rng(3)
    C = _spd(rng, 8, rank=5)
    space = null_space_projector(t(C), 1e-8)
    P = space.projector.numpy()
    assert space.rank == 3 and space.dim == 8
    assert np.allclose(P @ P, P, atol=1e-12) and np.allclose(P, P.T, atol=1e-12)
    assert np.allclose(P @ C, 0, atol=1e-10)
    # the official get_project: SVD of C, singular vectors with singular value below the threshold
    U, S, _ = np.linalg.svd(C)
    Uk = U[:, S < 1e-8]
    assert np.allclose(P, Uk @ Uk.T, atol=1e-10)
    assert null_space_projector(t(C), 0.0).rank == 0  # nothing is below 0: P = 0, no update at all


def test_alphaedit_without_null_space_writes_nothing_and_with_full_null_space_is_ridge() -> None:
    rng = np.random.default_rng(0)
    K, R = rng.normal(size=(6, 2)), rng.normal(size=(4, 2))
    zero = alphaedit_layer_update(t(K), t(R), torch.zeros(6, 6, dtype=torch.float64), 1.0)
    assert float(zero.delta.abs().max()) == 0.0 and zero.projected_key_share == 0.0
    # P = I: ΔW = R Kᵀ (K Kᵀ + L2 I)⁻¹, MEMIT's update with λC = L2·I
    full = alphaedit_layer_update(t(K), t(R), torch.eye(6, dtype=torch.float64), 2.0).delta.numpy()
    assert np.allclose(full, R @ K.T @ np.linalg.inv(K @ K.T + 2.0 * np.eye(6)), atol=1e-12)


def test_alphaedit_earlier_edits_keys_are_protected_as_l2_shrinks() -> None:
    # with K_p in the solve, an earlier edit's key (inside the null space) moves less than without it
    rng = np.random.default_rng(1)
    P = torch.eye(8, dtype=torch.float64)
    k_prev = rng.normal(size=(8, 1))
    K, R = rng.normal(size=(8, 1)), rng.normal(size=(3, 1))
    free = alphaedit_layer_update(t(K), t(R), P, 1e-3).delta.numpy()
    kept = alphaedit_layer_update(t(K), t(R), P, 1e-3, previous=t(k_prev @ k_prev.T)).delta.numpy()
    assert np.linalg.norm(kept @ k_prev) < 0.1 * np.linalg.norm(free @ k_prev)


def test_alphaedit_rejects_bad_inputs_by_name() -> None:
    K, R, P = torch.zeros(4, 2), torch.zeros(3, 2), torch.eye(4)
    with pytest.raises(MathsError, match="l2"):
        alphaedit_layer_update(K, R, P, 0.0)
    with pytest.raises(MathsError, match="P: expected shape"):
        alphaedit_layer_update(K, R, torch.eye(3), 1.0)
    with pytest.raises(MathsError, match="previous"):
        alphaedit_layer_update(K, R, P, 1.0, previous=torch.eye(2))
    with pytest.raises(MathsError, match="threshold"):
        null_space_projector(torch.eye(3), math.nan)


# ---------------------------------------------------------------------------------------------- EMMET


class Batch:
    def __init__(self, d_out: int, d_in: int, n: int, lam: float, mu: float, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.W = rng.normal(size=(d_out, d_in))
        self.K = rng.normal(size=(d_in, n))
        self.V = rng.normal(size=(d_out, n))
        self.C = _spd(rng, d_in) + 0.05 * np.eye(d_in)
        self.lam, self.mu = lam, mu

    @property
    def C_prime(self) -> np.ndarray:
        return self.lam * self.C + self.mu * np.eye(self.C.shape[0])

    def run(self, emmet_lambda: float = 0.0):
        Cp = preservation_matrix(t(self.C), self.lam, self.mu)
        return emmet_layer_update(t(self.K), t(self.V - self.W @ self.K), Cp, emmet_lambda=emmet_lambda)


batches = st.builds(Batch, d_out=st.integers(2, 7), d_in=st.integers(5, 9), n=st.integers(1, 4),
                    lam=st.sampled_from([1.0, 80.0, 1000.0]), mu=st.sampled_from([0.0, 0.5]),
                    seed=st.integers(0, 2**32 - 1))


@SETTINGS
@given(b=batches)
def test_emmet_matches_the_official_formula(b: Batch) -> None:
    # emmet_main.py: C_inv = inverse(λC + μI); D = Kᵀ C_inv K (+ emmet_lambda I, n > 1); ΔW = R (D⁻¹ Kᵀ C_inv)
    C_inv = np.linalg.inv(b.C_prime)
    D = b.K.T @ C_inv @ b.K
    if D.shape[0] > 1:
        D = D + 0.1 * np.eye(D.shape[0])
    expected = (b.V - b.W @ b.K) @ np.linalg.inv(D) @ b.K.T @ C_inv
    got = b.run(emmet_lambda=0.1).delta.numpy()
    assert np.allclose(got, expected, atol=1e-8 * (1 + np.abs(expected).max()))


@SETTINGS
@given(b=batches)
def test_emmet_meets_every_equality_constraint(b: Batch) -> None:
    update = b.run(emmet_lambda=0.0)
    edited = b.W + update.delta.numpy()
    assert np.allclose(edited @ b.K, b.V, atol=1e-8 * (1 + np.abs(b.V).max()))  # (W + ΔW) kᵢ = vᵢ for all i
    assert update.constraint_error < 1e-8


@SETTINGS
@given(b=batches)
def test_emmet_minimises_the_preservation_cost_among_exact_updates(b: Batch) -> None:
    # any other ΔW' with ΔW' K = R differs by E with E K = 0, and costs tr(ΔW' C' ΔW'ᵀ) at least as much
    delta = b.run().delta.numpy()
    rng = np.random.default_rng(0)
    null = np.eye(b.K.shape[0]) - b.K @ np.linalg.pinv(b.K)
    E = rng.normal(size=delta.shape) @ null

    def cost(M: np.ndarray) -> float:
        return float(np.trace(M @ b.C_prime @ M.T))

    assert np.allclose(E @ b.K, 0, atol=1e-9)
    assert cost(delta) <= cost(delta + 1e-3 * E) + 1e-12 and cost(delta) <= cost(delta + E)


@SETTINGS
@given(b=batches)
def test_emmet_with_one_request_is_c_rome(b: Batch) -> None:
    k, v = b.K[:, 0], b.V[:, 0]
    one = Batch.__new__(Batch)
    one.W, one.K, one.V, one.C, one.lam, one.mu = b.W, b.K[:, :1], b.V[:, :1], b.C, b.lam, 0.0
    emmet = one.run(emmet_lambda=0.1)  # emmet_lambda never applies to a 1x1 D
    rome = rome_update(t(b.W), t(k), t(k), t(v), consistent=True, covariance=t(b.C))
    assert np.allclose(emmet.delta.numpy(), rome.delta.numpy(), atol=1e-9 * (1 + np.abs(rome.delta.numpy()).max()))
    # and its denominator is ROME's |uᵀk|, whatever λ
    assert math.isclose(emmet.measure.denominator, rome.abs_denominator, rel_tol=1e-9)
    measured = emmet_denominator(t(k), preservation_matrix(t(b.C), b.lam))
    assert math.isclose(measured.denominator, rome.abs_denominator, rel_tol=1e-9)
    assert measured.d_condition == 1.0 and measured.n_requests == 1


def test_emmet_denominator_reports_d_and_its_conditioning() -> None:
    rng = np.random.default_rng(2)
    C = _spd(rng, 6) + 0.1 * np.eye(6)
    k = rng.normal(size=6)
    K = np.stack([k, k + 1e-4 * rng.normal(size=6)], 1)  # two nearly equal keys: D nearly singular
    Cp = preservation_matrix(t(C))
    raw = emmet_denominator(t(K), Cp)
    D = K.T @ np.linalg.inv(C) @ K
    eig = np.linalg.eigvalsh(D)
    assert math.isclose(raw.d_min_eigenvalue, eig[0], rel_tol=1e-6, abs_tol=1e-12)
    assert math.isclose(raw.d_condition, eig[1] / eig[0], rel_tol=1e-4)
    assert math.isclose(raw.d_min_diagonal, float(np.diag(D).min()), rel_tol=1e-12)
    assert raw.d_condition > 1e6 and raw.denominator < 1e-3 * emmet_denominator(t(K[:, :1]), Cp).denominator
    # emmet_lambda bounds D's smallest eigenvalue from below, as the official code intends
    damped = emmet_denominator(t(K), Cp, emmet_lambda=0.1)
    assert damped.d_min_eigenvalue >= 0.1 - 1e-9 and damped.d_condition < raw.d_condition


def test_emmet_rejects_bad_inputs_by_name() -> None:
    with pytest.raises(MathsError, match="mom2_update_weight"):
        preservation_matrix(torch.eye(3), 0.0)
    with pytest.raises(MathsError, match="emmet_lambda"):
        emmet_layer_update(torch.ones(3, 1), torch.ones(2, 1), torch.eye(3, dtype=torch.float64), emmet_lambda=-1.0)
    with pytest.raises(MathsError, match="R: expected 1 columns"):
        emmet_layer_update(torch.ones(3, 1), torch.ones(2, 2), torch.eye(3, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------- r-ROME


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), with_c=st.booleans())
def test_c_rome_with_the_bare_anchor_is_r_romes_official_update(seed: int, with_c: bool) -> None:
    # compute_v.py: right = (target_init + δ − mean output) / (mean keyᵀ u); compute_u: u = C⁻¹k̄/‖C⁻¹k̄‖;
    # ΔW (out, in) = right uᵀ. The MLP outputs carry a bias b, which cancels.
    rng = np.random.default_rng(seed)
    d_out, d_in, n_ctx = 5, 7, 4
    W, b = rng.normal(size=(d_out, d_in)), rng.normal(size=d_out)
    keys = rng.normal(size=(n_ctx, d_in))
    outs = keys @ W.T + b
    delta = rng.normal(size=d_out)
    C = _spd(rng, d_in) + 0.1 * np.eye(d_in) if with_c else None
    k_bar = keys.mean(0)
    u = (np.linalg.solve(C, k_bar) if with_c else k_bar)
    u = u / np.linalg.norm(u)
    right = (outs[0] + delta - outs.mean(0)) / (k_bar @ u)
    expected = np.outer(right, u)
    # r-rome is c-rome with the papers' anchor: k̄ mapped to the bare prompt's value W kᵘ + δ
    v_star = value_target(t(W), t(keys[0]), t(k_bar), t(delta), consistent=True, anchor="bare")
    got = rome_update(t(W), t(keys[0]), t(k_bar), v_star, consistent=True, covariance=None if C is None else t(C))
    assert np.allclose(got.delta.numpy(), expected, atol=1e-9 * (1 + np.abs(expected).max()))
    assert got.key_convention == "mean"
    uk = left_direction(t(k_bar), covariance=None if C is None else t(C)).numpy()
    assert math.isclose(got.abs_denominator, abs(float(uk @ k_bar)), rel_tol=1e-9)

