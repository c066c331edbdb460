"""MEND's editor network and the gradient factors it reads; the editor that uses them is :mod:`editors.mend`.

``MendHparams`` says which weights are edited (``layers`` × ``modules``: family kinds such as ``mlp_in`` and
``mlp_out``, or names inside the layer's MLP module such as Llama's ``gate_proj``) and how the network is shaped
and trained. ``MendNetwork`` holds one shared network per weight shape (the paper's ``shared`` setting), with a
mode (scale and shift) and a step size per weight; ``gradient_factors`` reads, with hooks, the rank-one factors
(layer input ``u_t``, gradient at the output ``δ_t``) of one teacher-forced NLL's gradient.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from editors.ft import TargetBatch, per_request_nll
from editors.maths import as_out_in
from editors.maths.mend import FactorNorm, ResidualBlock, mend_update, nonzero_tokens

log = logging.getLogger(__name__)

__all__ = [
    "GradientFactors",
    "MendHparams",
    "MendNetwork",
    "MendTarget",
    "edit_targets",
    "gradient_factors",
]

_FAMILY_KINDS = ("mlp_in", "mlp_out")


@dataclass(frozen=True)
class MendHparams:
    """What the network looks like (``layers``, ``modules``, ``rank``, ``n_hidden``), how it is trained (the
    rest) and where a trained one is (``archive``: a directory; empty = the cache entry for this model and
    these hyper-parameters). Names follow the reference configs (``edit_lr``, ``lr_lr``, ``cedit``/``cloc``
    as ``c_edit``/``c_loc``); ``batch_size`` is their ``accumulate_bs``, edits per outer step."""

    layers: tuple[int, ...]
    modules: tuple[str, ...] = _FAMILY_KINDS
    rank: int = 1920
    n_hidden: int = 1
    edit_lr: float = 1e-4
    lr: float = 1e-6
    lr_lr: float = 1e-4
    c_edit: float = 0.1
    c_loc: float = 1.0
    steps: int = 10000
    batch_size: int = 10
    grad_clip: float = 100.0
    norm_batches: int = 100
    seed: int = 42
    threads: int = 1
    archive: str = ""

    def __post_init__(self) -> None:
        layers = tuple(self.layers)
        if not layers or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in layers):
            raise ValueError(f"MendHparams.layers: expected layer indices >= 0, got {self.layers!r}")
        if list(layers) != sorted(set(layers)):
            raise ValueError(f"MendHparams.layers: expected increasing, distinct layers, got {self.layers!r}")
        object.__setattr__(self, "layers", layers)
        modules = tuple(self.modules)
        if not modules or len(set(modules)) != len(modules) or not all(isinstance(m, str) and m for m in modules):
            raise ValueError(f"MendHparams.modules: expected distinct non-empty names, got {self.modules!r}")
        object.__setattr__(self, "modules", modules)
        for name in ("rank", "steps", "batch_size", "norm_batches", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"MendHparams.{name}: expected >= 1, got {getattr(self, name)}")
        if self.n_hidden < 0:
            raise ValueError(f"MendHparams.n_hidden: expected >= 0, got {self.n_hidden}")
        for name in ("edit_lr", "lr_lr", "c_edit", "c_loc"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"MendHparams.{name}: expected a finite number >= 0, got {value}")
        # lr 0 trains nothing and grad_clip 0 zeroes every step: both would train a network that never moves
        for name in ("lr", "grad_clip"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"MendHparams.{name}: expected a finite number > 0, got {value}")

    def network_key(self) -> dict[str, Any]:
        """Everything a trained archive depends on: all fields but ``archive`` (where to find one)."""
        from dataclasses import asdict

        out = asdict(self)
        out.pop("archive")
        out["layers"] = list(self.layers)
        out["modules"] = list(self.modules)
        return out


@dataclass(frozen=True)
class MendTarget:
    """One edited weight: its parameter name, shape as ``(d_out, d_in)`` and place in the shared networks."""

    name: str
    module: str
    layer: int
    kind: str
    d_out: int
    d_in: int
    transposed: bool
    group: str  # the shape key, "d_out x d_in": weights of one shape share a network
    mode: int  # index among the weights of its group

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "layer": self.layer, "kind": self.kind, "d_out": self.d_out, "d_in": self.d_in,
                "transposed": self.transposed, "group": self.group, "mode": self.mode}


def module_name(family, kind: str, layer: int) -> str:
    """Dotted module name of ``kind`` at ``layer``: a family kind, else a child of the layer's MLP module."""
    if kind in _FAMILY_KINDS:
        return family.layer_name(kind, layer)
    return f"{family.layer_name('mlp', layer)}.{kind}"


def edit_targets(model, family, layers: Sequence[int], modules: Sequence[str]) -> tuple[MendTarget, ...]:
    """The weights MEND edits on ``model``, layer-major, with their share groups and modes."""
    targets: list[MendTarget] = []
    modes: dict[str, int] = {}
    for layer in layers:
        for kind in modules:
            name = module_name(family, kind, layer)
            weight = getattr(family.get_module(model, name), "weight", None)
            if not isinstance(weight, Tensor) or weight.dim() != 2:
                raise ValueError(f"MEND: module {name!r} has no 2-D weight to edit")
            d_out, d_in = as_out_in(weight, family.weight_transposed).shape
            group = f"{d_out}x{d_in}"
            mode = modes.get(group, 0)
            modes[group] = mode + 1
            targets.append(MendTarget(name + ".weight", name, layer, kind, d_out, d_in, family.weight_transposed,
                                      group, mode))
    return tuple(targets)


class _SharedNet(nn.Module):
    """The editor network of one weight shape: residual blocks, factor statistics, one mode per weight."""

    def __init__(self, d_in: int, d_out: int, n_modes: int, rank: int, n_hidden: int,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.d_in, self.d_out, self.n_modes, self.n_blocks = d_in, d_out, n_modes, n_hidden + 1
        dim = d_in + d_out
        mid = min(rank, dim)  # the reference code's min(rank, inf)
        for j in range(self.n_blocks):
            # U starts at zero, so every block starts as the identity. V is scaled by 1/sqrt(dim) (the
            # reference code leaves it at unit variance): with unit-variance inputs the pre-activations are
            # then O(1) whatever the width, so one outer learning rate suits the organisms and large models.
            self.register_parameter(f"u{j}", nn.Parameter(torch.zeros(dim, mid)))
            self.register_parameter(f"v{j}", nn.Parameter(torch.randn(mid, dim, generator=generator) / math.sqrt(dim)))
            self.register_parameter(f"bias{j}", nn.Parameter(torch.zeros(dim)))
            self.register_parameter(f"scale{j}", nn.Parameter(torch.ones(n_modes, dim)))
            self.register_parameter(f"shift{j}", nn.Parameter(torch.zeros(n_modes, dim)))
        # NaN until set from data: an unnormalised network must not edit anything
        for name, width in (("u_mean", d_in), ("u_std", d_in), ("delta_mean", d_out), ("delta_std", d_out)):
            self.register_buffer(name, torch.full((width,), float("nan")))

    def blocks(self) -> list[ResidualBlock]:
        return [ResidualBlock(getattr(self, f"u{j}"), getattr(self, f"v{j}"), getattr(self, f"bias{j}"),
                              getattr(self, f"scale{j}"), getattr(self, f"shift{j}")) for j in range(self.n_blocks)]

    def norm(self) -> FactorNorm:
        return FactorNorm(self.u_mean, self.u_std, self.delta_mean, self.delta_std)


def _check_norm(group: str, norm: FactorNorm) -> None:
    """Raise unless the factor statistics are finite: NaN ones (never set, or taken from degenerate factors)
    would write NaN into the model's weights."""
    for name in ("u_mean", "u_std", "delta_mean", "delta_std"):
        if not bool(torch.isfinite(getattr(norm, name)).all()):
            raise ValueError(f"MEND network {group}: normalisation statistic {name} is not finite (statistics "
                             "never taken, or taken from degenerate factors); refusing to edit with it")


class MendNetwork(nn.Module):
    """The trained part of MEND for one model: a shared network per weight shape plus a step size per weight."""

    def __init__(self, targets: Sequence[MendTarget], *, rank: int, n_hidden: int, edit_lr: float,
                 seed: int = 0) -> None:
        super().__init__()
        self.targets = tuple(targets)
        if not self.targets:
            raise ValueError("MendNetwork: no weights to edit")
        self.rank, self.n_hidden = rank, n_hidden
        generator = torch.Generator().manual_seed(seed)
        shapes: dict[str, tuple[int, int, int]] = {}
        for t in self.targets:
            shapes[t.group] = (t.d_in, t.d_out, max(shapes.get(t.group, (0, 0, 0))[2], t.mode + 1))
        self.nets = nn.ModuleDict({
            group: _SharedNet(d_in, d_out, n_modes, rank, n_hidden, generator)
            for group, (d_in, d_out, n_modes) in shapes.items()
        })
        self.edit_lrs = nn.Parameter(torch.full((len(self.targets),), float(edit_lr)))

    def set_norm(self, group: str, u_mean: Tensor, u_std: Tensor, delta_mean: Tensor, delta_std: Tensor) -> None:
        net = self.nets[group]
        with torch.no_grad():
            for name, value in (("u_mean", u_mean), ("u_std", u_std), ("delta_mean", delta_mean),
                                ("delta_std", delta_std)):
                getattr(net, name).copy_(value)

    def update(self, index: int, u: Tensor, delta: Tensor, mask: Tensor | None = None) -> Tensor:
        """``ΔW`` (``(..., d_out, d_in)``, float32, on the network's device) of target ``index`` from its
        factors (``(..., T, d)``, on any device: a model spread by ``device_map`` has its layers on several)."""
        target = self.targets[index]
        net = self.nets[target.group]
        norm = net.norm()
        _check_norm(target.group, norm)
        device = self.edit_lrs.device
        if mask is not None:
            mask = mask.to(device)
        return mend_update(u.to(device=device, dtype=torch.float32), delta.to(device=device, dtype=torch.float32),
                           norm, net.blocks(), target.mode, self.edit_lrs[index], mask)


@dataclass(frozen=True)
class GradientFactors:
    """The rank-one factors of one weight's gradient: inputs ``u`` ``(B, T, d_in)``, output gradients
    ``delta`` ``(B, T, d_out)`` (float32, detached) and the tokens that carry a term, ``mask`` ``(B, T)``."""

    u: Tensor
    delta: Tensor
    mask: Tensor


def gradient_factors(model, family, targets: Sequence[MendTarget], batch: TargetBatch, n_requests: int
                     ) -> tuple[dict[str, GradientFactors], Tensor]:
    """Factors of ``∇W`` of ``Σ_requests mean target NLL`` for every target, and the per-request NLL.

    The loss is a sum over requests of each one's mean, so a request's factors are those it has alone (rows
    do not interact). Call inside :func:`frozen`: no parameter gradient is formed; the gradient is taken with
    respect to the targets' outputs, which the forward hooks make differentiable where nothing upstream is.
    """
    inputs: dict[str, Tensor] = {}
    outputs: dict[str, Tensor] = {}
    handles = []

    def hooks(name: str):
        def pre(_module, args):
            inputs[name] = args[0].detach()

        def post(_module, _args, output):
            if not output.requires_grad:  # the first edited module: nothing before it needs a gradient
                output = output.detach().requires_grad_(True)
            outputs[name] = output
            return output

        return pre, post

    try:
        for t in targets:
            module = family.get_module(model, t.module)
            pre, post = hooks(t.name)
            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post))
        with torch.enable_grad():
            nll = per_request_nll(model, batch, n_requests)
            names = [t.name for t in targets]
            grads = torch.autograd.grad(nll.sum(), [outputs[n] for n in names], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    factors = {}
    for name, grad in zip(names, grads):
        u = inputs[name].float()
        delta = torch.zeros_like(outputs[name], dtype=torch.float32) if grad is None else grad.detach().float()
        factors[name] = GradientFactors(u, delta, nonzero_tokens(u, delta))
    return factors, nll.detach()


def plain_key(key: str) -> str:
    """A module kind as a metric-name fragment (``mlp.c_fc`` -> ``mlp_c_fc``)."""
    return key.replace(".", "_")


