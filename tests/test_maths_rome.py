"""ROME / C-ROME update maths against an explicit float64 re-derivation and the update's defining properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from editors.maths import MathsError, as_out_in, delta_to_storage
from editors.maths.moments import ridged
from editors.maths.rome import (
    SecondMomentAccumulator,
    key_cosine,
    left_direction,
    rank_one_update,
    rome_update,
    second_moment,
)

SETTINGS = settings(max_examples=50, deadline=None, derandomize=True)


class Problem:
    """A random small ROME problem in float64 numpy (the reference) and torch (the input)."""

    def __init__(self, d_out: int, d_in: int, seed: int, with_cov: bool) -> None:
        rng = np.random.default_rng(seed)
        self.W = rng.normal(size=(d_out, d_in))
        self.k_bare = rng.normal(size=d_in)
        # k̄ correlated with k^u, as a mean over prefixed prompts would be
        self.k_bar = 0.6 * self.k_bare + rng.normal(size=d_in)
        self.v_star = rng.normal(size=d_out) * 3.0
        if with_cov:
            A = rng.normal(size=(d_in, d_in))
            self.C = A @ A.T + 0.1 * np.eye(d_in)
        else:
            self.C = None

    def t(self, name: str) -> torch.Tensor:
        return torch.from_numpy(getattr(self, name).copy())

    def cov(self) -> torch.Tensor | None:
        return None if self.C is None else self.t("C")


def reference_u(k_bar: np.ndarray, C: np.ndarray | None) -> np.ndarray:
    z = k_bar if C is None else np.linalg.solve(C, k_bar)
    return z / math.sqrt(sum(x * x for x in z))


def reference_delta(W: np.ndarray, u: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """ΔW[i, j] = (v_i − Σ_m W_im k_m) u_j / (Σ_m u_m k_m), element by element."""
    d_out, d_in = W.shape
    denom = sum(u[m] * k[m] for m in range(d_in))
    delta = np.zeros((d_out, d_in))
    for i in range(d_out):
        resid_i = v[i] - sum(W[i, m] * k[m] for m in range(d_in))
        for j in range(d_in):
            delta[i, j] = resid_i * u[j] / denom
    return delta


problems = st.builds(
    Problem,
    d_out=st.integers(2, 8),
    d_in=st.integers(2, 8),
    seed=st.integers(0, 2**32 - 1),
    with_cov=st.booleans(),
)


def _tol(update_norm: float, x: np.ndarray) -> float:
    # the products below involve ‖ΔW‖‖x‖-sized terms that cancel; tolerance scales with them
    return 1e-9 * max(1.0, update_norm * float(np.linalg.norm(x)))


@SETTINGS
@given(p=problems, consistent=st.booleans())
def test_delta_matches_explicit_rederivation(p: Problem, consistent: bool) -> None:
    upd = rome_update(p.t("W"), p.t("k_bare"), p.t("k_bar"), p.t("v_star"), consistent=consistent, covariance=p.cov())
    u = reference_u(p.k_bar, p.C)
    k = p.k_bar if consistent else p.k_bare
    expected = reference_delta(p.W, u, k, p.v_star)
    got = upd.delta.numpy()
    assert upd.delta.dtype == torch.float64
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6 * scale)
    np.testing.assert_allclose(upd.u.numpy(), u, rtol=1e-6, atol=1e-9)
    denom = float(np.dot(u, k))
    assert upd.denominator == pytest.approx(denom, rel=1e-6, abs=1e-12)
    assert upd.abs_denominator == pytest.approx(abs(denom), rel=1e-6, abs=1e-12)
    resid = p.v_star - p.W @ k
    assert upd.numerator_norm == pytest.approx(np.linalg.norm(np.outer(resid, u)), rel=1e-6)
    assert upd.delta_fro == pytest.approx(np.linalg.norm(expected), rel=1e-6)
    assert upd.delta_max_abs == pytest.approx(np.abs(expected).max(), rel=1e-6)
    cos = np.dot(p.k_bare, p.k_bar) / (np.linalg.norm(p.k_bare) * np.linalg.norm(p.k_bar))
    assert upd.key_cosine == pytest.approx(cos, rel=1e-9, abs=1e-12)
    assert upd.key_convention == ("mean" if consistent else "bare")


@SETTINGS
@given(p=problems, consistent=st.booleans())
def test_edited_layer_maps_the_edit_key_to_v_star(p: Problem, consistent: bool) -> None:
    upd = rome_update(p.t("W"), p.t("k_bare"), p.t("k_bar"), p.t("v_star"), consistent=consistent, covariance=p.cov())
    W_new = p.W + upd.delta.numpy()
    k = p.k_bar if consistent else p.k_bare
    np.testing.assert_allclose(W_new @ k, p.v_star, rtol=0, atol=_tol(upd.delta_fro, k))
    # the other key is generally *not* mapped to v*: the two methods really differ
    other = p.k_bare if consistent else p.k_bar
    if abs(np.dot(upd.u.numpy(), other) - np.dot(upd.u.numpy(), k)) > 1e-3:
        assert not np.allclose(W_new @ other, p.v_star, atol=1e-6)


@SETTINGS
@given(p=problems, consistent=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_keys_orthogonal_to_u_are_unchanged(p: Problem, consistent: bool, seed: int) -> None:
    upd = rome_update(p.t("W"), p.t("k_bare"), p.t("k_bar"), p.t("v_star"), consistent=consistent, covariance=p.cov())
    u = upd.u.numpy()
    x = np.random.default_rng(seed).normal(size=u.shape[0])
    x -= np.dot(u, x) * u  # u is unit-norm
    assert abs(np.dot(u, x)) < 1e-12 * max(1.0, np.linalg.norm(x))
    W_new = p.W + upd.delta.numpy()
    np.testing.assert_allclose(W_new @ x, p.W @ x, rtol=0, atol=_tol(upd.delta_fro, x))


@SETTINGS
@given(p=problems, consistent=st.booleans())
def test_delta_has_rank_at_most_one(p: Problem, consistent: bool) -> None:
    upd = rome_update(p.t("W"), p.t("k_bare"), p.t("k_bar"), p.t("v_star"), consistent=consistent, covariance=p.cov())
    s = np.linalg.svd(upd.delta.numpy(), compute_uv=False)
    assert s[0] > 0
    assert np.all(s[1:] <= 1e-10 * s[0])


@SETTINGS
@given(p=problems, shrink=st.floats(1e-4, 1.0))
def test_shrinking_the_denominator_scales_the_update_inversely(p: Problem, shrink: float) -> None:
    W, v = p.t("W"), p.t("v_star")
    u = left_direction(p.t("k_bar"), covariance=p.cov())
    k = p.t("k_bare")
    base = rank_one_update(W, u, k, v)
    # move k along u so that uᵀk shrinks by `shrink`, and move v* with W k so the residual stays put
    k_small = k + (shrink - 1.0) * torch.dot(u, k) * u
    v_small = v + W @ (k_small - k)
    small = rank_one_update(W, u, k_small, v_small)
    assert small.denominator == pytest.approx(shrink * base.denominator, rel=1e-9, abs=1e-15)
    assert small.numerator_norm == pytest.approx(base.numerator_norm, rel=1e-9)
    assert small.delta_fro == pytest.approx(base.delta_fro / shrink, rel=1e-6)
    assert small.delta_max_abs == pytest.approx(base.delta_max_abs / shrink, rel=1e-6)


@SETTINGS
@given(p=problems, consistent=st.booleans())
def test_identity_covariance_equals_no_covariance(p: Problem, consistent: bool) -> None:
    args = (p.t("W"), p.t("k_bare"), p.t("k_bar"), p.t("v_star"))
    eye = torch.eye(p.W.shape[1], dtype=torch.float64)
    with_i = rome_update(*args, consistent=consistent, covariance=eye)
    without = rome_update(*args, consistent=consistent)
    torch.testing.assert_close(with_i.delta, without.delta, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(with_i.u, without.u, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(p=problems)
def test_inverse_and_solve_paths_agree(p: Problem) -> None:
    if p.C is None:
        return
    via_solve = left_direction(p.t("k_bar"), covariance=p.t("C"))
    via_inv = left_direction(p.t("k_bar"), torch.from_numpy(np.linalg.inv(p.C)))
    torch.testing.assert_close(via_solve, via_inv, rtol=1e-7, atol=1e-9)
    assert float(torch.linalg.vector_norm(via_solve)) == pytest.approx(1.0, abs=1e-12)
    args = (p.t("W"), p.t("k_bare"), p.t("k_bar"), p.t("v_star"))
    solved = rome_update(*args, consistent=False, covariance=p.t("C"))
    inverted = rome_update(*args, consistent=False, c_inv=torch.from_numpy(np.linalg.inv(p.C)))
    torch.testing.assert_close(solved.delta, inverted.delta, rtol=1e-6, atol=1e-9 * max(1.0, solved.delta_max_abs))
    with pytest.raises(MathsError, match="not both"):
        left_direction(p.t("k_bar"), p.t("C"), covariance=p.t("C"))


def test_original_rome_and_c_rome_share_u_but_not_delta() -> None:
    p = Problem(4, 6, seed=3, with_cov=True)
    args = (p.t("W"), p.t("k_bare"), p.t("k_bar"), p.t("v_star"))
    rome = rome_update(*args, consistent=False, covariance=p.cov())
    crome = rome_update(*args, consistent=True, covariance=p.cov())
    torch.testing.assert_close(rome.u, crome.u)
    assert not torch.allclose(rome.delta, crome.delta)
    assert rome.key_cosine == crome.key_cosine


def test_zero_denominator_blows_up_without_raising() -> None:
    W = torch.ones(3, 4)
    u = torch.tensor([1.0, 0.0, 0.0, 0.0])
    k = torch.tensor([0.0, 2.0, 0.0, 0.0])  # exactly orthogonal to u
    upd = rank_one_update(W, u, k, torch.tensor([5.0, 5.0, 5.0]))
    assert upd.denominator == 0.0 and upd.abs_denominator == 0.0
    assert not bool(torch.isfinite(upd.delta).all())
    assert torch.isinf(upd.delta[:, 0]).all()  # residual 3 × u_0 = 1 over 0
    assert torch.isnan(upd.delta[:, 1:]).all()  # residual × 0 over 0
    # the matrix holds 0/0 = nan entries, but the diagnostics report the blow-up itself: infinite
    assert math.isinf(upd.delta_fro)
    assert math.isinf(upd.delta_max_abs)
    assert upd.numerator_norm == pytest.approx(math.sqrt(3) * 3.0)


def test_rome_update_with_orthogonal_bare_key_blows_up() -> None:
    W = torch.zeros(2, 3)
    k_bar = torch.tensor([1.0, 0.0, 0.0])
    k_bare = torch.tensor([0.0, 1.0, 0.0])
    upd = rome_update(W, k_bare, k_bar, torch.tensor([1.0, 1.0]), consistent=False)
    assert upd.abs_denominator == 0.0 and math.isinf(upd.delta_fro)
    assert upd.key_cosine == 0.0
    # the consistent key is immune to this case
    ok = rome_update(W, k_bare, k_bar, torch.tensor([1.0, 1.0]), consistent=True)
    assert ok.abs_denominator == 1.0 and math.isfinite(ok.delta_fro)


def test_diagnostics_use_the_reports_names_with_the_denominator_as_a_magnitude() -> None:
    # a key pointing against u: uᵀk < 0, so the signed and reported denominators differ in sign only
    W = torch.zeros(2, 3, dtype=torch.float64)
    k_bar = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    k_bare = torch.tensor([-0.5, 1.0, 0.0], dtype=torch.float64)
    v = torch.tensor([1.0, 2.0], dtype=torch.float64)
    upd = rome_update(W, k_bare, k_bar, v, consistent=False)
    assert upd.denominator == pytest.approx(-0.5) and upd.abs_denominator == pytest.approx(0.5)
    d = upd.diagnostics()
    assert d["denominator"] == upd.abs_denominator == pytest.approx(0.5)  # |uᵀk|, what the papers report
    assert d["denominator_signed"] == upd.denominator
    assert d["numerator"] == upd.numerator_norm
    assert d["delta_fro"] == pytest.approx(d["numerator"] / d["denominator"])
    assert {"abs_denominator", "numerator_norm"}.isdisjoint(d)
    plain = rank_one_update(W, k_bar, k_bare, v).diagnostics()
    assert (plain["denominator"], plain["denominator_signed"]) == (pytest.approx(0.5), pytest.approx(-0.5))
    assert plain["numerator"] == pytest.approx(float(torch.linalg.vector_norm(v)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_delta_keeps_w_dtype_and_diagnostics_are_floats(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(5, 7, generator=g).to(dtype)
    kb, km, v = torch.randn(7, generator=g), torch.randn(7, generator=g), torch.randn(5, generator=g)
    upd = rome_update(W, kb.to(dtype), km.to(dtype), v.to(dtype), consistent=True)
    assert upd.delta.dtype == dtype and upd.delta.shape == W.shape
    for value in upd.diagnostics().values():
        assert type(value) in (float, str)
    # low precision inputs are computed in float32: the edited key still lands near v*
    W_new = W.double() + upd.delta.double()
    err = (W_new @ km.to(dtype).double() - v.to(dtype).double()).abs().max()
    assert float(err) < {torch.float64: 1e-10, torch.float32: 1e-4}.get(dtype, 0.1)


def test_keys_in_column_or_row_shape_are_accepted_and_bad_shapes_named() -> None:
    W = torch.randn(3, 4, dtype=torch.float64)
    k = torch.randn(4, dtype=torch.float64)
    v = torch.randn(3, dtype=torch.float64)
    flat = rank_one_update(W, k / k.norm(), k, v)
    col = rank_one_update(W, (k / k.norm())[:, None], k[None, :], v[:, None])
    torch.testing.assert_close(flat.delta, col.delta)
    with pytest.raises(MathsError, match="v_star"):
        rank_one_update(W, k, k, torch.randn(4))
    with pytest.raises(MathsError, match="k_bar"):
        rome_update(W, k, torch.randn(5), v, consistent=True)
    with pytest.raises(MathsError, match="covariance"):
        left_direction(k, covariance=torch.eye(3))
    with pytest.raises(MathsError, match="singular"):
        left_direction(k, covariance=torch.zeros(4, 4))
    with pytest.raises(MathsError, match="degenerate"):
        left_direction(torch.zeros(4))


def test_key_cosine_of_zero_vector_is_nan() -> None:
    assert math.isnan(key_cosine(torch.zeros(3), torch.ones(3)))
    assert key_cosine(torch.ones(3), -2 * torch.ones(3)) == pytest.approx(-1.0)


@SETTINGS
@given(n=st.integers(1, 20), d=st.integers(1, 6), seed=st.integers(0, 2**32 - 1), split=st.integers(0, 20))
def test_second_moment_is_mean_outer_product(n: int, d: int, seed: int, split: int) -> None:
    keys = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    expected = sum(np.outer(k.astype(np.float64), k.astype(np.float64)) for k in keys) / n
    got = second_moment(torch.from_numpy(keys))
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)
    acc = SecondMomentAccumulator(d)
    cut = min(split, n)
    for part in (keys[:cut], keys[cut:]):
        if len(part):
            acc.update(torch.from_numpy(part))
    assert acc.count == n
    np.testing.assert_allclose(acc.mean(dtype=torch.float64).numpy(), expected, rtol=1e-12, atol=1e-12)


def test_second_moment_rejects_empty_and_mismatched_keys() -> None:
    with pytest.raises(MathsError, match="keys"):
        second_moment(torch.zeros(0, 3))
    acc = SecondMomentAccumulator(3)
    with pytest.raises(MathsError, match="3 columns"):
        acc.update(torch.zeros(2, 4))
    with pytest.raises(MathsError, match="no keys"):
        acc.mean()


def test_conv1d_layout_round_trip() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(nf=5, nx=3)  # stores weight as (in=3, out=5)
    x = torch.randn(3)
    W = as_out_in(conv.weight.detach(), transposed=True)
    assert W.shape == (5, 3)
    torch.testing.assert_close(W @ x + conv.bias.detach(), conv(x[None])[0])
    k, v = torch.randn(3), torch.randn(5)
    upd = rank_one_update(W, k / k.norm(), k, v)
    with torch.no_grad():
        conv.weight.add_(delta_to_storage(upd.delta, transposed=True))
    torch.testing.assert_close(conv(k[None])[0] - conv.bias.detach(), v, rtol=1e-5, atol=1e-5)
    assert delta_to_storage(upd.delta, transposed=False) is upd.delta


def test_a_ridge_makes_a_rank_deficient_second_moment_solvable_and_keeps_its_span() -> None:
    """A C of rank 3 in 6 dimensions (keys one per distinct token, as tiny-gptj's layer 0): the plain solve's u is
    decided by rounding along the directions C never saw; with a ridge u is definite and, for a k̄ inside C's span,
    stays inside it up to the ridge's share."""
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(6, 6)))[0]
    span, null = basis[:, :3], basis[:, 3:]
    C = torch.tensor(span @ np.diag([4.0, 2.0, 1.0]) @ span.T)
    k_bar = torch.tensor(span @ np.array([1.0, -0.5, 0.25]))
    ridge = 1e-4
    regularised = ridged(C, ridge)
    mean_eigenvalue = 7.0 / 6
    assert torch.allclose(regularised - C, ridge * mean_eigenvalue * torch.eye(6, dtype=C.dtype))
    u = left_direction(k_bar, covariance=regularised).numpy()
    assert np.linalg.norm(null.T @ u) < 1e-9
    expected = span @ (np.array([1.0, -0.5, 0.25]) / (np.array([4.0, 2.0, 1.0]) + ridge * mean_eigenvalue))
    assert np.allclose(u, expected / np.linalg.norm(expected), atol=1e-12)


def test_a_zero_ridge_is_romes_own_solve_and_bad_ridges_are_named() -> None:
    C = torch.eye(3, dtype=torch.float32) * 2
    assert ridged(C, 0.0) is C
    # the solves' precision: in half precision a small ridge would round away
    assert ridged(C.half(), 1e-4).dtype == torch.float64
    assert float(ridged(C.half(), 1e-4)[0, 0]) == 2 + 2e-4
    for bad in (-1e-3, float("nan"), float("inf"), True):
        with pytest.raises(MathsError, match="ridge"):
            ridged(C, bad)
    with pytest.raises(MathsError, match="mean eigenvalue"):
        ridged(torch.zeros(3, 3), 1e-4)
