"""Activation hooks the editors and the statistics need: read a module's input (optionally stopping the forward
pass there) or output, and add a vector to a module's output at chosen positions. Hooks are always removed,
also when the forward pass raises. Plus the model states code runs the model in: :func:`eval_mode` (dropout
off, every submodule's flag back afterwards) and :func:`frozen` (that, and no parameter requires grad), the
state every editor that differentiates through the model runs in."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


class _StopForward(Exception):
    """Raised by a stopping input hook once the input is captured: the layers above are not needed."""


@contextlib.contextmanager
def capture_input(module: nn.Module, store: dict[str, Tensor], *, stop: bool = False) -> Iterator[None]:
    """Record the module's first positional input (the key for an MLP's output projection) in ``store['input']``.

    With ``stop`` the forward pass ends there (the hook raises); :func:`input_of` runs such a pass.
    """

    def hook(_module, inputs):
        store["input"] = inputs[0]
        if stop:
            raise _StopForward

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def input_of(model: nn.Module, module: nn.Module, **inputs) -> Tensor | None:
    """``module``'s first positional input in the forward pass ``model(**inputs)``, which stops at ``module``
    (the layers above it are not run); None when the pass never calls ``module``."""
    store: dict[str, Tensor] = {}
    with capture_input(module, store, stop=True):
        try:
            model(**inputs)
        except _StopForward:
            pass
    return store.get("input")


def outputs_of(model: nn.Module, modules: Sequence[nn.Module], **inputs) -> list:
    """Each of ``modules``' whole output (tuples as returned) in the pass ``model(**inputs)``, which stops once the
    last of them has returned; None for a module the pass never called."""
    outputs: list = [None] * len(modules)

    def record(i: int):
        def hook(_module, _inputs, output):
            outputs[i] = output
            if i == len(modules) - 1:
                raise _StopForward

        return hook

    handles = [module.register_forward_hook(record(i)) for i, module in enumerate(modules)]
    try:
        model(**inputs)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return outputs


@contextlib.contextmanager
def replaying(fixed: Sequence[tuple[nn.Module, Any]]) -> Iterator[None]:
    """Each block returns its recorded output instead of running (an instance attribute shadows the class's
    ``forward``; removed after, also when the pass raises). A block skipped this way writes nothing to the key/value
    cache: the layers above read only their own layers of it, and the positions come from the cache's first layer,
    which still holds the prefix, as it did before the pass."""
    # a forward set on the instance already (accelerate's device hooks set one) comes back as it was
    shadowed = [block.__dict__.get("forward") for block, _ in fixed]
    for block, output in fixed:
        block.forward = lambda *args, _output=output, **kwargs: _output
    try:
        yield
    finally:
        for (block, _), previous in zip(fixed, shadowed):
            if previous is None:
                del block.forward
            else:
                block.forward = previous


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


@contextlib.contextmanager
def narrowed_input(module: nn.Module, rows: Tensor, cols: Tensor) -> Iterator[None]:
    """The module sees only its input's positions ``(rows[j], cols[j])``, as one row ``[1, len(rows), ...]``:
    an LM head asked for the logits a loss reads rather than for every position of the batch."""

    def hook(_module, inputs):
        return (inputs[0][rows, cols].unsqueeze(0),) + tuple(inputs[1:])

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def rows_at(tensor: Tensor, positions: Sequence[int]) -> Tensor:
    """``tensor[i, positions[i]]`` for each batch row ``i``."""
    return tensor[torch.arange(len(positions)), torch.tensor(list(positions), device=tensor.device)]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off inside; every submodule's own train/eval flag back afterwards, also when the body raises.

    Per module, not ``model.train(flag)``: a model whose submodules were in mixed modes gets them back.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """No parameter of ``model`` requires grad and dropout is off, inside; flags and modes restored after.

    An edit must be deterministic (no dropout) and must not leave gradients on the caller's weights; the
    caller's own flags (a parameter it froze itself, a submodule it left in eval mode) come back unchanged,
    also when the body raises.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    with eval_mode(model):
        try:
            for p, _ in flags:
                p.requires_grad_(False)
            yield
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
