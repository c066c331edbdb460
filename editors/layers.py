"""Layer settings and the layers they name on a model: an index, ``"causal"`` (the organism's recorded causal layer),
``"causal+N"``, ``"last"``, ``"last-N"``, ``"K/N"`` (layer K of N at the same share of this model's depth), or a
list of them. :func:`parse_layers` checks a setting without a model (a file as it is read), :func:`resolve_layers`
turns it into indices for a model. Torch-free, as :mod:`editors.hparams` is."""

from __future__ import annotations

import re
from typing import Any

from editors.hparams_errors import HparamsError, LayerOutOfRangeError

__all__ = ["LAYER_FORMS", "is_symbolic", "parse_layers", "resolve_layers"]

_CAUSAL_RE = re.compile(r"^causal(?:\+(\d+))?$")
_LAST_RE = re.compile(r"^last(?:-(\d+))?$")
# "K/N": layer K of an N-layer model, at the same share of this model's depth (rounded down)
_SCALED_RE = re.compile(r"^(\d+)/(\d+)$")
LAYER_FORMS = "an int, 'causal', 'causal+N', 'last', 'last-N' or 'K/N'"


def _n_layers(config: Any) -> int:
    for attr in ("num_hidden_layers", "n_layer"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    raise HparamsError(f"model config {type(config).__name__} has no positive num_hidden_layers/n_layer")


def resolve_layers(value: Any, model: Any, *, source: str = "") -> list[int]:
    """Layer indices for ``value`` (an int, ``"causal"``, ``"causal+N"``, ``"last"``, ``"last-N"``, ``"K/N"`` or a
    list of them) on ``model``.

    ``"causal"`` reads ``model.config.editsafety_causal_layer`` (0 when the model does not record one).
    ``"K/N"`` is layer K of an N-layer model at the same share of this model's depth, rounded down
    (``K * layers // N``): GPT-2-XL's layer 17 written ``"17/48"`` is layer 17 of its 48, 8 of GPT-2 medium's 24
    and 12 of large's 36 (the layers of ROME's files for those models) and 4 of GPT-2 small's 12.
    A relative ``"causal+N"`` past the last layer is dropped, so ``["causal", "causal+1"]`` means "the
    causal layer and the next one if there is one"; likewise ``"last-N"`` before layer 0, so
    ``["last-2", "last-1", "last"]`` is "the last three layers, or all of them"; an absolute index out of
    range is an error. The result is sorted and free of duplicates. ``model`` may also be a config. ``source``
    (e.g. ``"layer from rome/kmeng01/gpt2.json"``) opens the message of an error about ``value``.
    """
    where = f"{source}: " if source else ""
    items = parse_layers(value, where)
    config = getattr(model, "config", model)
    n_layers = _n_layers(config)
    causal = getattr(config, "editsafety_causal_layer", None)
    causal = 0 if causal is None else causal
    if not isinstance(causal, int) or isinstance(causal, bool) or not 0 <= causal < n_layers:
        raise HparamsError(f"model config: editsafety_causal_layer={causal!r} is not a layer of {n_layers}")
    out: set[int] = set()
    for kind, k, of in items:
        if kind == "index":
            if not k < n_layers:
                raise LayerOutOfRangeError(f"{where}layer {k} is out of range for a model with {n_layers} layers")
            layer = k
        elif kind == "causal":
            layer = causal + k
        elif kind == "last":
            layer = n_layers - 1 - k
        else:  # "scaled"
            layer = k * n_layers // of
        if 0 <= layer < n_layers:
            out.add(layer)
    if not out:
        raise LayerOutOfRangeError(f"{where}layers {value!r}: no layer left on a model with {n_layers} layers")
    return sorted(out)


def parse_layers(value: Any, where: str = "") -> list[tuple[str, int, int]]:
    """The layer forms of ``value`` (see :func:`resolve_layers`) as ``(kind, k, n)``: ``("index", i, 0)``,
    ``("causal", N, 0)``, ``("last", N, 0)`` or ``("scaled", K, N)``; what can be refused without a model is refused
    here (a malformed item, a negative index, ``K/N`` with K not below N, an empty list), ``where`` opening the
    message."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise HparamsError(f"{where}layers: empty list")
    parsed: list[tuple[str, int, int]] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise HparamsError(f"{where}layer {item!r}: expected {LAYER_FORMS}")
        if isinstance(item, int):
            if item < 0:
                raise HparamsError(f"{where}layer {item}: a layer index is >= 0")
            parsed.append(("index", item, 0))
            continue
        causal = _CAUSAL_RE.match(item.strip())
        last = _LAST_RE.match(item.strip())
        scaled = _SCALED_RE.match(item.strip())
        if causal:
            parsed.append(("causal", int(causal.group(1) or 0), 0))
        elif last:
            parsed.append(("last", int(last.group(1) or 0), 0))
        elif scaled and int(scaled.group(1)) < int(scaled.group(2)):
            parsed.append(("scaled", int(scaled.group(1)), int(scaled.group(2))))
        elif scaled:
            raise HparamsError(f"{where}layer {item!r}: 'K/N' is layer K of N layers, so K must be below N")
        else:
            raise HparamsError(f"{where}layer {item!r}: expected {LAYER_FORMS}")
    return parsed


def is_symbolic(value: Any) -> bool:
    """Whether ``value`` holds a layer form that only a model resolves (not a plain index)."""
    if isinstance(value, str):
        return bool(_CAUSAL_RE.match(value.strip()) or _LAST_RE.match(value.strip())
                    or _SCALED_RE.match(value.strip()))
    return isinstance(value, (list, tuple)) and any(is_symbolic(v) for v in value)
