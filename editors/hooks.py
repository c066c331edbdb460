"""Activation hooks the editors need: read a module's input at chosen token positions, and add a vector
to a module's output at chosen positions. Hooks are always removed, also when the forward pass raises.
Plus :func:`frozen`, the model state every editor that differentiates through the model runs in."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


@contextlib.contextmanager
def capture_input(module: nn.Module, store: dict[str, Tensor]) -> Iterator[None]:
    """Record the module's first positional input (the key for an MLP's output projection) in ``store['input']``."""

    def hook(_module, inputs):
        store["input"] = inputs[0]

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def capture_output(module: nn.Module, store: dict[str, Tensor]) -> Iterator[None]:
    def hook(_module, _inputs, output):
        store["output"] = _hidden(output)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def add_at_positions(module: nn.Module, positions: Sequence[int], delta: Tensor) -> Iterator[None]:
    """Add ``delta`` to the module's output at ``positions[i]`` of batch row ``i``."""
    rows = torch.arange(len(positions))
    cols = torch.tensor(list(positions))

    def hook(_module, _inputs, output):
        hidden = _hidden(output)
        added = torch.zeros_like(hidden)
        added[rows, cols] = delta.to(hidden.dtype)
        hidden = hidden + added
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def rows_at(tensor: Tensor, positions: Sequence[int]) -> Tensor:
    """``tensor[i, positions[i]]`` for each batch row ``i``."""
    return tensor[torch.arange(len(positions)), torch.tensor(list(positions), device=tensor.device)]


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """No parameter of ``model`` requires grad and dropout is off, inside; flags and mode restored after.

    An edit must be deterministic (no dropout) and must not leave gradients on the caller's weights; the
    caller's own flags (a parameter it froze itself) come back unchanged, also when the body raises.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
