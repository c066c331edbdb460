"""Small measured values kept on disk under the cache root, keyed by everything they depend on: an editor's
denominator floor, a model's context templates, an unedited model's perplexity.

Each value is one JSON file ``<root>/<kind>/<name>-<hash of the key>.json`` holding the key, the value and a digest
of both. A file is used only when its key is exactly the one asked for and its digest matches (a value edited by
hand or damaged is named in a warning and measured again); it is written atomically under a lock, so workers
that need the same value at once measure it once, and a killed writer leaves nothing half-written. Values are
plain JSON (what crosses processes), never tensors.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from editors.storage import atomic_write_text, build_lock, slugify, stable_hash

log = logging.getLogger(__name__)

__all__ = ["TRAINED_ACTIVATION_FIELD", "cached_value", "entry_path", "read_entry", "weights_key", "write_entry"]

# the config field in which a load that swapped a model's activation kernel names the one it was trained with
TRAINED_ACTIVATION_FIELD = "editsafety_trained_activation"


def weights_key(loaded: Any) -> dict[str, str]:
    """What a value measured on a loaded model (``registry.LoadedModel``) depends on through its weights: their
    identity, dtype and device kind (a GPU's numbers are not a CPU's), and the activation kernel where the load
    swapped the one the model was trained with (an organism's gelu_new runs as its fused twin:
    registry.ORGANISM_ACTIVATIONS)."""
    parameter = next(loaded.model.parameters())
    key = {"identity": loaded.identity, "dtype": str(parameter.dtype), "device": parameter.device.type}
    config = getattr(loaded.model, "config", None)
    if getattr(config, TRAINED_ACTIVATION_FIELD, None) is not None:
        key["activation"] = str(config.activation_function)
    return key


def entry_path(root: Path, kind: str, name: str, key: Mapping[str, Any]) -> Path:
    return root / kind / f"{slugify(name)}-{stable_hash(dict(key))}.json"


def _digest(key: Mapping[str, Any], value: Any) -> str:
    return stable_hash({"key": dict(key), "value": value}, 64)


def read_entry(path: Path, key: Mapping[str, Any], *, valid: Callable[[Any], bool] = lambda value: True) -> Any:
    """The value stored at ``path`` for exactly ``key``, or None (no file, another key, unreadable, a value that is
    not ``valid``, or one that does not match its digest: those last three are logged, naming the file)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        log.warning("ignoring unreadable cache entry %s: %s", path, err)
        return None
    if not isinstance(data, dict) or data.get("key") != dict(key) or "value" not in data:
        return None
    value = data["value"]
    if data.get("digest") != _digest(key, value):
        log.warning("cache entry %s does not match the digest written with it (edited or damaged); measuring again",
                    path)
        return None
    if not valid(value):
        log.warning("cache entry %s holds a value of the wrong shape; measuring again", path)
        return None
    return value


def write_entry(path: Path, key: Mapping[str, Any], value: Any) -> None:
    atomic_write_text(path, json.dumps({"key": dict(key), "value": value, "digest": _digest(key, value)}, indent=1))


def cached_value(root: Path | None, kind: str, name: str, key: Mapping[str, Any], measure: Callable[[], Any], *,
                 valid: Callable[[Any], bool] = lambda value: True) -> Any:
    """The value for ``key`` from the cache under ``root``, else ``measure()``'s, then stored (a None is not
    stored: there is nothing to keep). ``root`` None measures without the cache (a key that cannot name
    everything the value depends on)."""
    if root is None:
        return measure()
    path = entry_path(root, kind, name, key)
    value = read_entry(path, key, valid=valid)
    if value is not None:
        return value
    with build_lock(path):
        value = read_entry(path, key, valid=valid)
        if value is not None:
            return value
        value = measure()
        if value is not None:
            write_entry(path, key, value)
        return value
