"""The whole-model restore check: per-tensor checksums of every parameter and buffer, taken once per model
load and checked after each restore (:func:`editors.restore.edit_session`); an edit that changed anything it
did not declare in ``parameters_touched`` raises :class:`UndeclaredChangeError`, naming the tensors.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from editors.restore import ParameterSnapshot, RestoreError

# what ModelFingerprint.of summarises each tensor by (see its docstring); "full" is the default
FINGERPRINT_MODES = ("full", "sampled")
# words (int32) per tensor that mode "sampled" compares; a tensor of at most this many is compared whole
SAMPLED_WORDS = 4096
# the positional checksum's row length (words): each row is weighted by W, each row's sum by A
_ROW = 1024
# words converted to int64 at a time: on CPU 2 MiB, so the copy stays in cache and the tensor is read once
_CPU_CHUNK = 1 << 18
_DEVICE_CHUNK = 1 << 24
_MASK64 = (1 << 64) - 1
# splitmix64's constants as signed int64 (torch has no uint64 arithmetic); multiplication wraps mod 2^64
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


class UndeclaredChangeError(RestoreError):
    """An editor changed a tensor of the model outside what it declares in ``parameters_touched`` (or left the
    model's tensors otherwise changed: replaced, moved, re-typed, added, removed). The restore cannot repair
    that: the caller should reload the model."""

    def __init__(self, editor: str, changes: Sequence[TensorChange], *, declared: Sequence[str] = (),
                 during: str | None = None) -> None:
        self.editor = editor
        self.changes = tuple(changes)
        self.declared = tuple(declared)
        self.during = during
        super().__init__(self._message())

    @property
    def tensors(self) -> tuple[str, ...]:
        """The names of the changed tensors."""
        return tuple(c.name for c in self.changes)

    def _message(self) -> str:
        shown = [c.describe() for c in self.changes[:_SHOWN_CHANGES]]
        more = len(self.changes) - len(shown)
        listed = ", ".join(shown) + (f" and {more} more" if more else "")
        who = f"editor {self.editor!r}" if self.editor else "the editor"
        if self.during:
            return f"{who} changed {listed} during its {self.during}, which must leave the model as loaded"
        declared = ", ".join(self.declared) if self.declared else "nothing"
        hint = ""
        if self.changes and all(c.what.startswith("requires_grad") or c.what == _GRADIENT_LEFT for c in self.changes):
            hint = ("; only their requires_grad flags or gradients changed: give back the flags the edit sets and "
                    "drop the gradients it makes (editors.hooks.frozen does both) rather than declaring these")
        return (f"{who} changed {listed}, which it does not declare in parameters_touched (it declares "
                f"{declared}){hint}")


_SHOWN_CHANGES = 8
_GRADIENT_LEFT = "a gradient was left on it"


@dataclass(frozen=True)
class TensorChange:
    """One tensor that differs from the model's fingerprint: its dotted name, ``parameter`` or ``buffer``, and
    what differs."""

    name: str
    kind: str
    what: str

    def describe(self) -> str:
        return f"{'buffer ' if self.kind == 'buffer' else ''}{self.name} ({self.what})"


def _mix(idx: Tensor) -> Tensor:
    """A fixed pseudo-random int64 per index (splitmix64's finaliser, with arithmetic shifts), on idx's device."""
    x = (idx + 1) * _GOLDEN
    x = (x ^ (x >> 30)) * _MIX1
    x = (x ^ (x >> 27)) * _MIX2
    return x ^ (x >> 31)


_WEIGHTS: dict[tuple[str, str], Tensor] = {}


def _weights(kind: str, n: int, device: torch.device) -> Tensor:
    """The first ``n`` checksum weights of ``kind`` on ``device`` (cached, grown by powers of two): all odd, so
    that any change to a single word changes the weighted sum. ``row`` weights are below 2^31, so that a
    word (|v| < 2^31) times its weight never overflows; ``sum`` weights (of rows' sums) use all 64 bits."""
    key = (kind, str(device))
    cached = _WEIGHTS.get(key)
    if cached is None or cached.numel() < n:
        size = 1 << max(10, (n - 1).bit_length())
        idx = torch.arange(size, dtype=torch.int64, device=device) + (0 if kind == "row" else 1 << 40)
        mixed = _mix(idx)
        cached = ((mixed & 0x7FFFFFFF) if kind == "row" else mixed) | 1
        _WEIGHTS[key] = cached
    return cached[:n]


def _words(t: Tensor) -> Tensor:
    """The tensor's bytes as a flat integer tensor on its own device: int32 words where the byte count and
    alignment allow (every float32 and bfloat16/float16 pair), else int16, else uint8. Words of 32 bits, not
    64: a change in a word's top bit then still moves the weighted sum (mod 2^64) by 2^31 times a weight."""
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    flat = t.reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    size = flat.element_size()
    if size >= 4 and size % 4 == 0:
        return flat.view(torch.int32)
    as_bytes = flat.view(torch.uint8)
    for dtype, width in ((torch.int32, 4), (torch.int16, 2)):
        if as_bytes.numel() % width == 0:
            try:
                return as_bytes.view(dtype)
            except RuntimeError:  # an offset into its storage that is not aligned to the width
                pass
    return as_bytes


def _dot(a: Tensor, b: Tensor, blas: bool) -> Tensor:
    # torch.dot/mv have int64 kernels on CPU only; elsewhere the same sums elementwise, equal mod 2^64
    return torch.dot(a, b) if blas else (a * b).sum()


def _checksum(words: Tensor, *, chunk: int | None = None, blas: bool | None = None) -> Tensor:
    """(Σv, Σv², Σ A[r]·W[c]·v) mod 2^64 over the integer words ``v`` (``r``, ``c``: a word's row and column in
    rows of ``_ROW`` words), as an int64 tensor of 3 on the words' device.

    Exact integer arithmetic, so the result does not depend on the reduction order, the device or the number
    of threads, and it sees every bit (nan payloads, -0.0). The weighted sum has odd weights, so a change
    confined to one word always shows; a change spread over many words escapes only if its weighted sum is
    0 mod 2^64, which a permutation, a sign flip, a scaling or an update of real data does not arrange (about
    2^-33 for the worst case, two sign bits flipped); the second moment adds a non-linear term on top.
    The words are converted to int64 a chunk at a time, into a buffer small enough to stay in cache on CPU.
    """
    device = words.device
    n = words.numel()
    zero = torch.zeros((), dtype=torch.int64, device=device)
    if n == 0:
        return torch.stack([zero, zero, zero])
    cpu = device.type == "cpu"
    blas = cpu if blas is None else blas
    chunk = chunk or (_CPU_CHUNK if cpu else _DEVICE_CHUNK)
    chunk = max(_ROW, chunk - chunk % _ROW)
    row_w = _weights("row", _ROW, device)
    n_rows = -(-n // _ROW)
    row_sums = torch.empty(n_rows, dtype=torch.int64, device=device)
    buffer = torch.empty(min(chunk, n), dtype=torch.int64, device=device)
    sums, squares = [], []
    for start in range(0, n, chunk):
        part = words[start:start + chunk]
        m = part.numel()
        b = buffer[:m]
        b.copy_(part)
        sums.append(b.sum())
        squares.append(_dot(b, b, blas))
        full, rest = divmod(m, _ROW)
        first = start // _ROW
        if full:
            block = b[:full * _ROW].view(full, _ROW)
            if blas:
                torch.mv(block, row_w, out=row_sums[first:first + full])
            else:
                row_sums[first:first + full] = (block * row_w).sum(1)
        if rest:
            row_sums[first + full] = _dot(b[full * _ROW:], row_w[:rest], blas)
    weighted = _dot(row_sums, _weights("sum", n_rows, device), blas)
    return torch.stack([torch.stack(sums).sum(), torch.stack(squares).sum(), weighted])


def _sample_positions(n: int, k: int = SAMPLED_WORDS) -> Tensor | None:
    """``k`` word positions spread over ``n`` (None: compare all ``n``): ``i·step mod n`` with ``step`` near
    ``n/k`` and coprime to ``n``, so the positions are distinct and, in a matrix stored row after row, fall
    in every row band and cycle through all columns rather than a few; plus the last word."""
    if n <= k:
        return None
    step = max(1, n // k)
    while math.gcd(step, n) != 1:
        step += 1
    positions = (torch.arange(k, dtype=torch.int64) * step) % n
    return torch.cat([positions, torch.tensor([n - 1])])


def _recomputed_buffers(model: nn.Module) -> tuple[frozenset[str], frozenset[str]]:
    """Buffers the model itself may change while it runs: (names whose values may change, names that may be
    re-placed with the same values). Only these are relaxed; every other buffer must stay as loaded.

    transformers 5 (what this project supports), read from its source:

    * GPT-2 registers no buffers (the causal mask is built per call; 4.x's ``attn.bias``/``masked_bias`` were
      constant non-persistent buffers, which would be checked like any other).
    * GPT-J's ``attn.embed_positions`` (sin/cos table, non-persistent) is reassigned by
      ``GPTJAttention._get_embed_positions`` as a copy on the device of the position ids when they differ
      (a model spread over devices): same values, new storage, maybe another device.
    * Llama/Mistral's ``rotary_emb.inv_freq`` and ``original_inv_freq`` (non-persistent) never change with the
      default RoPE. With a ``dynamic`` RoPE type, ``dynamic_rope_update`` re-registers ``inv_freq`` computed
      for a longer sequence (new values) and, on a short one, re-registers ``original_inv_freq.to(device)``
      as both; with ``longrope`` it copies the long or short frequencies into ``inv_freq`` in place. Those
      ``inv_freq`` values depend on the last sequence length, so they are not compared (per layer type too:
      ``{layer_type}_inv_freq``).

    Hence: every non-persistent buffer may be re-placed (its values are still compared), and the ``inv_freq``
    buffers of a rotary module with a dynamic or longrope type are left out.
    """
    volatile: set[str] = set()
    replaceable: set[str] = set()
    for prefix, module in model.named_modules(remove_duplicate=False):
        dotted = f"{prefix}." if prefix else ""
        non_persistent = getattr(module, "_non_persistent_buffers_set", set())
        for attr in module._buffers:
            if attr in non_persistent:
                replaceable.add(dotted + attr)
        rope = getattr(module, "rope_type", None)
        rope_types = list(rope.values()) if isinstance(rope, dict) else [rope]
        if any(isinstance(r, str) and ("dynamic" in r or r == "longrope") for r in rope_types):
            for attr in module._buffers:
                if attr.endswith("inv_freq") and not attr.endswith("original_inv_freq"):
                    volatile.add(dotted + attr)
    return frozenset(volatile), frozenset(replaceable)


@dataclass
class _Print:
    name: str
    kind: str  # "parameter" or "buffer"
    ref: Any  # weakref to the tensor object
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    stride: tuple[int, ...]
    data_ptr: int
    requires_grad: bool
    grad_ptr: int | None
    replaceable: bool
    checksum: tuple[int, ...] | None = None  # mode full
    positions: Tensor | None = None  # mode sampled: word positions compared (None: all)
    sample: Tensor | None = None  # mode sampled: the words at those positions


def _named_tensors(model: nn.Module) -> dict[str, tuple[str, Tensor]]:
    named: dict[str, tuple[str, Tensor]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        named[name] = ("parameter", param)
    for name, buf in model.named_buffers(remove_duplicate=False):
        named.setdefault(name, ("buffer", buf))
    return named


def _grad_ptr(t: Tensor) -> int | None:
    grad = t.grad if t.is_leaf else None
    return None if grad is None else grad.data_ptr()


class ModelFingerprint:
    """What every parameter and buffer of a model looked like when it was taken, cheap to check again.

    Each tensor is recorded by identity (the tensor object, its storage pointer, shape, dtype, device,
    strides, ``requires_grad``, its gradient) and by a summary of its bits:

    * ``full`` (the default): :func:`_checksum` of all its bytes, computed on the tensor's own device with
      integer arithmetic (three int64 per tensor; tied tensors once). Every byte is read once per check, in
      chunks whose int64 copy stays in cache, and nothing leaves the device. Measured on this project's
      2-core CPU machine, one torch thread (``benchmarks/restore_check.py``): 4 ms for tiny-gpt2, 0.2 s for
      GPT-2 124M (about 2.4 GB/s), against 0.55 s for a sha256 of every tensor (``model_digest``, which on a
      GPU model would also copy every byte to the host each test) and 0.8 s for a single forward pass of 8
      sequences of 64 tokens. A test runs many such passes (the perplexity corpus, the metrics, the edit's
      own optimisation), so reading the weights once more costs a few per cent of it on any device; hence
      ``full`` by default whatever the model's size. (A saved copy of the model, compared exactly, would
      double its memory.) A checksum can in principle miss a change whose weighted sum is 0 mod 2^64 (see
      :func:`_checksum`): no change confined to one 32-bit word can, and no edit of real weights arranges it.
    * ``sampled``: the exact words at :data:`SAMPLED_WORDS` positions spread over each tensor (all of a
      smaller one) plus the identity checks: 3 ms for GPT-2 124M, and the cost no longer grows with the
      model. A change that misses every sampled word (one row of an embedding, a few entries) goes unseen: it
      catches dense updates (a rank-one update touches almost every word), replaced, moved or re-typed
      tensors and changes to small tensors, nothing more. For models so large that reading their weights
      once more per test matters (weights offloaded to the CPU, a slow device).

    Buffers that the model itself recomputes are relaxed (:func:`_recomputed_buffers`). Tensors on the meta
    device (offloaded) are checked by identity only.
    """

    def __init__(self, mode: str, prints: dict[str, _Print], volatile: frozenset[str]) -> None:
        self.mode = mode
        self._prints = prints
        self._volatile = volatile

    @classmethod
    def of(cls, model: nn.Module, mode: str = "full") -> ModelFingerprint:
        if mode not in FINGERPRINT_MODES:
            raise ValueError(f"restore check mode {mode!r}: expected 'full' or 'sampled'")
        volatile, replaceable = _recomputed_buffers(model)
        prints: dict[str, _Print] = {}
        with torch.no_grad(), _one_cpu_thread():
            for name, (kind, tensor) in _named_tensors(model).items():
                if name in volatile:
                    continue
                prints[name] = _Print(
                    name=name, kind=kind, ref=weakref.ref(tensor), shape=tuple(tensor.shape), dtype=tensor.dtype,
                    device=tensor.device, stride=tuple(tensor.stride()),
                    data_ptr=0 if tensor.is_meta else tensor.data_ptr(), requires_grad=tensor.requires_grad,
                    grad_ptr=_grad_ptr(tensor), replaceable=kind == "buffer" and name in replaceable,
                )
            readable = [p for p in prints.values() if not _ref(p).is_meta]
            if mode == "full":
                for p, checksum in zip(readable, _checksums([_ref(p) for p in readable]), strict=True):
                    p.checksum = checksum
            else:
                for p in readable:
                    words = _words(_ref(p))
                    positions = _sample_positions(words.numel())
                    p.positions = None if positions is None else positions.to(words.device)
                    p.sample = (words if positions is None else words[p.positions]).clone()
        return cls(mode, prints, volatile)

    @property
    def names(self) -> tuple[str, ...]:
        """The tensors checked, by name (tied ones under each name)."""
        return tuple(self._prints)

    def changes(self, model: nn.Module, *, declared: ParameterSnapshot | Iterable[str] = ()) -> list[TensorChange]:
        """What differs between ``model`` and this fingerprint, leaving out the ``declared`` parameters (names,
        or a snapshot, whose tensors are left out under every name they have)."""
        if isinstance(declared, str):
            raise TypeError("declared: expected parameter names or a ParameterSnapshot, got a single string")
        skip_names = set(declared.names if isinstance(declared, ParameterSnapshot) else declared)
        skip_ids = {id(e.live) for e in declared._entries} if isinstance(declared, ParameterSnapshot) else set()
        current = _named_tensors(model)
        found: list[TensorChange] = []
        to_sum: list[tuple[_Print, Tensor]] = []
        with torch.no_grad(), _one_cpu_thread():
            for name, p in self._prints.items():
                if name in skip_names or id(_ref(p)) in skip_ids:
                    continue
                got = current.get(name)
                if got is None:
                    found.append(TensorChange(name, p.kind, "removed from the model"))
                    continue
                tensor = got[1]
                what = self._identity_change(p, tensor)
                if what:
                    found.append(TensorChange(name, p.kind, what))
                elif tensor.is_meta or p.checksum is None and p.sample is None:
                    continue
                elif self.mode == "full":
                    to_sum.append((p, tensor))
                elif not _sample_equal(p, tensor):
                    what = "values" if p.positions is None else "values at sampled positions"
                    found.append(TensorChange(name, p.kind, what))
            for (p, _), checksum in zip(to_sum, _checksums([t for _, t in to_sum]), strict=True):
                if checksum != p.checksum:
                    found.append(TensorChange(p.name, p.kind, "values"))
            for name, (kind, _) in current.items():
                if name not in self._prints and name not in self._volatile and name not in skip_names:
                    found.append(TensorChange(name, kind, "added to the model"))
        order = {name: i for i, name in enumerate(self._prints)}
        return sorted(found, key=lambda c: order.get(c.name, len(order)))

    def check(self, model: nn.Module, *, editor: str = "", declared: ParameterSnapshot | Iterable[str] = (),
              during: str | None = None) -> None:
        """Raise :class:`UndeclaredChangeError` naming ``editor`` and every changed tensor, if any changed.
        ``during`` names what ran when the check is not after an edit (``"set-up"``)."""
        changes = self.changes(model, declared=declared)
        if changes:
            names = declared.names if isinstance(declared, ParameterSnapshot) else tuple(declared)
            raise UndeclaredChangeError(editor, changes, declared=names, during=during)

    def _identity_change(self, p: _Print, tensor: Tensor) -> str | None:
        if tensor.dtype != p.dtype:
            return f"dtype {p.dtype} -> {tensor.dtype}"
        if tuple(tensor.shape) != p.shape:
            return f"shape {list(p.shape)} -> {list(tensor.shape)}"
        if not p.replaceable:
            if tensor.device != p.device:
                return f"moved from {p.device} to {tensor.device}"
            if _ref(p) is not tensor:
                return "replaced by another tensor object"
            if not tensor.is_meta and tensor.data_ptr() != p.data_ptr:
                return "its storage was replaced"
            if tuple(tensor.stride()) != p.stride:
                return f"strides {list(p.stride)} -> {list(tensor.stride())}"
        if p.kind == "parameter":
            if tensor.requires_grad != p.requires_grad:
                return f"requires_grad {p.requires_grad} -> {tensor.requires_grad}"
            grad = _grad_ptr(tensor)
            if grad != p.grad_ptr:
                return _GRADIENT_LEFT if p.grad_ptr is None else "its gradient was replaced or removed"
        return None


def _ref(p: _Print) -> Tensor:
    tensor = p.ref()
    if tensor is None:  # the recorded tensor is gone: compare against nothing that could match
        return torch.empty(0, device="meta")
    return tensor


def _sample_equal(p: _Print, tensor: Tensor) -> bool:
    words = _words(tensor)
    if p.positions is None:
        got = words
    else:
        positions = p.positions if p.positions.device == words.device else p.positions.to(words.device)
        got = words[positions]
    return got.dtype == p.sample.dtype and got.shape == p.sample.shape and torch.equal(got, p.sample.to(got.device))


@contextmanager
def _one_cpu_thread() -> Iterator[None]:
    """Torch's CPU ops on one thread inside. The checksum is a long run of small memory-bound ops; on a CPU
    shared with other work each parallel region can wait for a busy core (seen: GPT-2 124M's check 30x slower
    on 2 threads of a loaded 2-core machine, 0.2 s -> 5.8 s), while a second thread gains little bandwidth."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _checksums(tensors: Sequence[Tensor]) -> list[tuple[int, ...]]:
    """:func:`_checksum` of each tensor, computed on its device, fetched with one transfer per device. Tied
    tensors (the same storage, layout and dtype under two names) are summed once."""
    per_device: dict[torch.device, list[Tensor]] = {}
    where: list[tuple[torch.device, int]] = []
    seen: dict[tuple[Any, ...], tuple[torch.device, int]] = {}
    with _one_cpu_thread():
        for t in tensors:
            key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
            if key not in seen:
                sums = per_device.setdefault(t.device, [])
                sums.append(_checksum(_words(t)))
                seen[key] = (t.device, len(sums) - 1)
            where.append(seen[key])
    fetched = {device: torch.stack(sums).cpu().tolist() for device, sums in per_device.items()}
    return [tuple(v & _MASK64 for v in fetched[device][i]) for device, i in where]
