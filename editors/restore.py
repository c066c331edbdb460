"""Bit-exact apply/restore of the few tensors an edit touches, without deep-copying the model.

A snapshot keeps a clone of each named parameter (on its own device) plus a sha256 of its bytes. Restoring
copies the clones back in place, then checks the model holds exactly the saved bits; a snapshot whose
clone no longer matches its digest refuses to restore from it. Comparisons are bitwise (``uint8`` views)
rather than ``torch.equal``, because ``torch.equal`` calls ``nan != nan`` and ``0.0 == -0.0``, and "bit-exact"
means neither.

The snapshot covers only the tensors an editor declares (``parameters_touched``); the rest of the model is
covered by :class:`editors.fingerprint.ModelFingerprint`, which :func:`edit_session` checks after the restore.
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


class RestoreError(RuntimeError):
    """A restore could not bring a tensor back bit-exactly (or its saved copy was corrupted)."""


class UnknownParameterError(KeyError):
    """A dotted parameter name that does not resolve on the model."""

    def __str__(self) -> str:
        # KeyError's default repr-quotes the message; show it as written
        return str(self.args[0]) if self.args else ""


def _bytes_view(t: Tensor) -> Tensor:
    """The tensor's raw bytes as a flat ``uint8`` tensor on its own device (works for bf16/fp16, 0-d)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def tensor_digest(t: Tensor) -> str:
    """sha256 over dtype, shape and raw bytes, so equal digests mean bit-identical tensors."""
    h = hashlib.sha256()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(_bytes_view(t).cpu().numpy().tobytes())
    return h.hexdigest()


def bitwise_equal(a: Tensor, b: Tensor) -> bool:
    """True when ``a`` and ``b`` have the same dtype, shape and bits (nan-safe, distinguishes ±0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(_bytes_view(a), _bytes_view(b.to(a.device)))


def _resolve(model: nn.Module, name: str) -> tuple[nn.Module, str, nn.Parameter]:
    owner_path, _, attr = name.rpartition(".")
    try:
        owner = model.get_submodule(owner_path) if owner_path else model
    except AttributeError:
        owner = None
    param = owner._parameters.get(attr) if owner is not None else None
    if param is None:
        known = [n for n, _ in model.named_parameters(remove_duplicate=False)]
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise UnknownParameterError(f"model {type(model).__name__} has no parameter {name!r}{hint}")
    return owner, attr, param


def named_parameter(model: nn.Module, name: str) -> nn.Parameter:
    """The parameter at dotted ``name`` (e.g. ``transformer.h.0.mlp.c_proj.weight``); KeyError naming it."""
    return _resolve(model, name)[2]


@dataclass
class _Entry:
    name: str
    live: Tensor
    saved: Tensor
    digest: str
    requires_grad: bool
    grad: Tensor | None
    owner: nn.Module | None
    attr: str | None


class ParameterSnapshot:
    """Saved copies of selected tensors, restorable bit-exactly in place.

    Build it from ``(name, tensor)`` pairs, or with :meth:`from_model` from parameter names, which also
    lets :meth:`restore` re-attach a parameter object the edit replaced. Besides values it records each
    tensor's ``requires_grad`` and ``.grad``: on restore a gradient that did not exist is removed, one that did
    is put back bit-exactly.
    """

    def __init__(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        self._entries: list[_Entry] = []
        for name, tensor in named_tensors:
            self._add(name, tensor, None, None)

    @classmethod
    def from_model(cls, model: nn.Module, names: Sequence[str]) -> ParameterSnapshot:
        if isinstance(names, str):
            raise TypeError("names: expected a sequence of parameter names, got a single string")
        snap = cls(())
        for name in dict.fromkeys(names):
            owner, attr, param = _resolve(model, name)
            snap._add(name, param, owner, attr)
        return snap

    def _add(self, name: str, tensor: Tensor, owner: nn.Module | None, attr: str | None) -> None:
        if any(e.name == name for e in self._entries):
            raise ValueError(f"ParameterSnapshot: {name!r} given twice")
        with torch.no_grad():
            saved = tensor.detach().clone(memory_format=torch.preserve_format)
            # only leaves carry .grad; reading it on a non-leaf warns and means nothing
            grad = tensor.grad.detach().clone() if tensor.is_leaf and tensor.grad is not None else None
        self._entries.append(
            _Entry(
                name=name,
                live=tensor,
                saved=saved,
                digest=tensor_digest(saved),
                requires_grad=tensor.requires_grad,
                grad=grad,
                owner=owner,
                attr=attr,
            )
        )

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self._entries)

    @property
    def digests(self) -> dict[str, str]:
        return {e.name: e.digest for e in self._entries}

    @property
    def nbytes(self) -> int:
        return sum(e.saved.numel() * e.saved.element_size() for e in self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def saved(self, name: str) -> Tensor:
        """The saved copy of ``name`` (read it, do not write it: restore would refuse a tampered copy)."""
        for e in self._entries:
            if e.name == name:
                return e.saved
        raise UnknownParameterError(f"snapshot holds no tensor named {name!r}; it holds {list(self.names)}")

    def verify(self) -> bool:
        """True when every live tensor holds exactly the bits it had when the snapshot was taken."""
        return all(tensor_digest(self._current(e)) == e.digest for e in self._entries)

    def restore(self) -> None:
        """Copy every saved tensor back in place, then check the bits; RestoreError lists what failed.

        Every entry is attempted even after one fails, so a single bad tensor does not leave the others
        edited. An entry whose saved copy no longer matches its digest is not copied from.
        """
        failures: list[str] = []
        with torch.no_grad():
            for e in self._entries:
                try:
                    problem = self._restore_one(e)
                except Exception as err:  # report every tensor, not just the first that fails
                    problem = f"{type(err).__name__}: {err}"
                if problem:
                    failures.append(f"{e.name}: {problem}")
        if failures:
            raise RestoreError("restore failed for " + "; ".join(failures))

    def _current(self, e: _Entry) -> Tensor:
        if e.owner is not None and e.attr is not None:
            current = e.owner._parameters.get(e.attr)
            if current is not None:
                return current
        return e.live

    def _restore_one(self, e: _Entry) -> str | None:
        if tensor_digest(e.saved) != e.digest:
            return "the snapshot's saved copy was modified after it was taken; not restoring from it"
        if e.owner is not None and e.attr is not None and e.owner._parameters.get(e.attr) is not e.live:
            # the edit swapped in a new Parameter object; put the original one back
            e.owner._parameters[e.attr] = e.live
        live = e.live
        if live.shape != e.saved.shape or live.dtype != e.saved.dtype or live.device != e.saved.device:
            live.data = torch.empty_like(e.saved)
        live.copy_(e.saved)
        if live.is_leaf:
            live.requires_grad_(e.requires_grad)
            if e.grad is None:
                live.grad = None
            elif live.grad is None or live.grad.shape != e.grad.shape or live.grad.dtype != e.grad.dtype:
                live.grad = e.grad.clone()
            else:
                live.grad.copy_(e.grad)
        if not bitwise_equal(live, e.saved):
            return "tensor differs from its saved copy after copy_"
        if e.grad is not None and (live.grad is None or not bitwise_equal(live.grad, e.grad)):
            return "gradient differs from its saved copy after copy_"
        return None


@contextmanager
def edit_session(model: nn.Module, param_names: Sequence[str], *, reference: Any = None,
                 editor: str = "") -> Iterator[ParameterSnapshot]:
    """Snapshot ``param_names`` on entry and restore them on exit, whatever happens in the body.

    An exception from the body propagates after the restore. If the restore itself fails, its
    RestoreError is raised instead (chained to the body's exception), since a model that could not be
    restored is the more serious problem for everything that runs after.

    With ``reference`` (the model's ``editors.fingerprint.ModelFingerprint`` as loaded), the whole model is then checked against it,
    the declared parameters aside (the restore has just put them back bit-exactly): anything else that
    changed raises ``UndeclaredChangeError`` naming ``editor`` and the tensors, again chained to any
    exception of the body.
    """
    snapshot = ParameterSnapshot.from_model(model, param_names)
    try:
        yield snapshot
    finally:
        snapshot.restore()
        if reference is not None:
            reference.check(model, editor=editor, declared=snapshot)


def model_digest(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (tied ones under each name), in name order."""
    h = hashlib.sha256()
    named: dict[str, Tensor] = {}
    named.update(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    for name in sorted(named):
        h.update(name.encode())
        h.update(b"\0")
        h.update(tensor_digest(named[name]).encode())
    return h.hexdigest()
