"""MEND's maths (Mitchell et al. 2022, "Fast Model Editing at Scale"): gradient factors in, weight update out.

For a linear layer ``y = W k`` (``W`` of shape ``(d_out, d_in)``) the fine-tuning gradient of a loss over a
sequence is a sum of rank-one terms, ``∇W = Σ_t δ_t u_tᵀ``, with ``u_t`` the layer's input at token ``t``
and ``δ_t = ∂L/∂y_t`` the gradient at its output. MEND never forms ``∇W``: an editor network ``g`` maps
each pair ``(u_t, δ_t)`` to ``(ũ_t, δ̃_t)`` and the update is

    ΔW = −α · Σ_t δ̃_t ũ_tᵀ        (α a learned step size per edited weight)

``g`` (the reference code's ``GradientTransform`` with ``combine=True``) normalises ``u`` and ``δ`` by
per-coordinate mean and standard deviation, concatenates them and applies residual blocks that start as the
identity: ``x ← x + max(0, s_m ⊙ (U V x + b) + t_m)``, with ``U`` zero-initialised, ``V`` low-rank, and a scale
``s_m`` and shift ``t_m`` per *mode*, the index of the edited weight among those of its shape that share one
network. The reference code clamps at 0 rather than using ReLU so that the all-zero pre-activation of the
identity start still passes gradient, and clamps after the last block too; both are kept here.

The reference code *adds* ``α·Σ δ̃ ũᵀ`` and learns its way to the sign; the paper (and this module) subtracts,
so the identity-initialised network starts as a normalised gradient-descent step.

Pure functions on tensors, ``(out, in)`` orientation (see :mod:`editors.maths`); no hooks, no models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from editors.maths import MathsError

# The reference code's guard against a zero standard deviation (a coordinate constant over the data).
NORM_EPS = 1e-7


@dataclass(frozen=True)
class ResidualBlock:
    """One identity-initialised block of the editor network over ``dim = d_in + d_out`` features.

    ``u``: ``(dim, rank)``, ``v``: ``(rank, dim)``, ``bias``: ``(dim,)``, ``scale`` and ``shift``:
    ``(n_modes, dim)``, one row per edited weight sharing the network.
    """

    u: Tensor
    v: Tensor
    bias: Tensor
    scale: Tensor
    shift: Tensor


@dataclass(frozen=True)
class FactorNorm:
    """Per-coordinate mean and standard deviation of the inputs ``u`` (``d_in``) and gradients ``δ`` (``d_out``)."""

    u_mean: Tensor
    u_std: Tensor
    delta_mean: Tensor
    delta_std: Tensor


def block_forward(x: Tensor, block: ResidualBlock, mode: int) -> Tensor:
    """``x + max(0, s_m ⊙ (U V x + b) + t_m)`` row-wise over ``x`` of shape ``(..., dim)``."""
    pre = (x @ block.v.T) @ block.u.T + block.bias
    pre = pre * block.scale[mode] + block.shift[mode]
    # clamp, not relu: at the identity start every pre-activation is exactly 0, where relu's gradient is 0
    return x + pre.clamp(min=0)


def editor_network(x: Tensor, blocks: Sequence[ResidualBlock], mode: int) -> Tensor:
    """The editor MLP: the residual blocks in order (``n_hidden + 1`` of them in the reference code)."""
    for block in blocks:
        x = block_forward(x, block, mode)
    return x


def normalise(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    return (x - mean) / (std + NORM_EPS)


def transform_factors(u: Tensor, delta: Tensor, norm: FactorNorm, blocks: Sequence[ResidualBlock],
                      mode: int) -> tuple[Tensor, Tensor]:
    """``(ũ, δ̃)`` for inputs ``u`` (``(..., d_in)``) and output gradients ``delta`` (``(..., d_out)``)."""
    if u.shape[:-1] != delta.shape[:-1]:
        raise MathsError(f"u {tuple(u.shape)} and delta {tuple(delta.shape)} must agree on every axis but the last")
    d_in = u.shape[-1]
    if norm.u_mean.shape[-1] != d_in or norm.delta_mean.shape[-1] != delta.shape[-1]:
        raise MathsError(f"norm statistics ({norm.u_mean.shape[-1]}, {norm.delta_mean.shape[-1]}) do not match "
                         f"the factors' widths ({d_in}, {delta.shape[-1]})")
    x = torch.cat([normalise(u, norm.u_mean, norm.u_std), normalise(delta, norm.delta_mean, norm.delta_std)], -1)
    y = editor_network(x, blocks, mode)
    return y[..., :d_in], y[..., d_in:]


def nonzero_tokens(u: Tensor, delta: Tensor) -> Tensor:
    """Tokens that carry a gradient term (the reference code's ``nz_mask``): ``u ≠ 0`` and ``δ ≠ 0``.

    Padding and the positions after the last scored token have ``δ = 0``; they must not reach the sum,
    since the network maps a zero pair to a non-zero one (its inputs are mean-centred).
    """
    return (u != 0).any(-1) & (delta != 0).any(-1)


def assemble_update(u_tilde: Tensor, delta_tilde: Tensor, lr: Tensor | float, mask: Tensor | None = None) -> Tensor:
    """``ΔW = −lr · Σ_t δ̃_t ũ_tᵀ`` summed over the token axis (``-2``): ``(..., T, d)`` in,
    ``(..., d_out, d_in)`` out.

    ``mask`` (``(..., T)``, bool) drops tokens from the sum.
    """
    if u_tilde.shape[:-1] != delta_tilde.shape[:-1]:
        raise MathsError(f"u_tilde {tuple(u_tilde.shape)} and delta_tilde {tuple(delta_tilde.shape)} disagree")
    if mask is not None:
        if mask.shape != u_tilde.shape[:-1]:
            raise MathsError(f"mask: expected shape {tuple(u_tilde.shape[:-1])}, got {tuple(mask.shape)}")
        delta_tilde = delta_tilde * mask.unsqueeze(-1).to(delta_tilde.dtype)
    return -lr * torch.einsum("...to,...ti->...oi", delta_tilde, u_tilde)


def mend_update(u: Tensor, delta: Tensor, norm: FactorNorm, blocks: Sequence[ResidualBlock], mode: int,
                lr: Tensor | float, mask: Tensor | None = None) -> Tensor:
    """The whole map: gradient factors of one weight (``(..., T, d_in)``, ``(..., T, d_out)``) to its ``ΔW``.

    Without ``mask`` the tokens whose factors are zero are dropped (:func:`nonzero_tokens`).
    """
    if mask is None:
        mask = nonzero_tokens(u, delta)
    u_tilde, delta_tilde = transform_factors(u, delta, norm, blocks, mode)
    return assemble_update(u_tilde, delta_tilde, lr, mask)


class MomentAccumulator:
    """Mean and unbiased standard deviation per coordinate over streamed rows, accumulated in float64.

    MEND's reference code keeps a running (Welford) estimate over every factor seen in training; the factors
    come from the frozen base model, so the same statistics over a fixed set of training edits are a pure
    function of the data, and are taken that way here before training starts.
    """

    def __init__(self, dim: int) -> None:
        self.count = 0
        self._sum = torch.zeros(dim, dtype=torch.float64)
        self._sumsq = torch.zeros(dim, dtype=torch.float64)

    def add(self, rows: Tensor) -> None:
        rows = rows.detach().reshape(-1, rows.shape[-1]).to(device="cpu", dtype=torch.float64)
        if rows.shape[-1] != self._sum.shape[0]:
            raise MathsError(f"rows: expected width {self._sum.shape[0]}, got {rows.shape[-1]}")
        self.count += rows.shape[0]
        self._sum += rows.sum(0)
        self._sumsq += rows.pow(2).sum(0)

    def mean_std(self) -> tuple[Tensor, Tensor]:
        if self.count < 2:
            raise MathsError(f"need at least 2 rows for a standard deviation, got {self.count}")
        mean = self._sum / self.count
        var = (self._sumsq - self.count * mean.pow(2)) / (self.count - 1)
        return mean.float(), var.clamp(min=0).sqrt().float()
