"""The errors of hyper-parameters: a bad file, key or value, and a layer the model does not have.

Apart from :mod:`editors.hparams` so that :mod:`editors.layers` raises them without importing it; both modules
export them."""

from __future__ import annotations

__all__ = ["HparamsError", "LayerOutOfRangeError", "UnknownHparamsKeyError"]


class HparamsError(ValueError):
    """Bad hyper-parameters: names the file (or ``overrides``) and the key at fault."""


class UnknownHparamsKeyError(HparamsError):
    pass


class LayerOutOfRangeError(HparamsError):
    """A layer setting that names no layer of the model (an index past its depth, relative layers none of which
    is left)."""
