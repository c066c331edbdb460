"""An editor's hyper-parameters as a certificate records them: their hash, and their values as plain JSON."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from typing import Any

from editors.hparams import hparams_hash

log = logging.getLogger(__name__)

__all__ = ["hparams_digest", "recorded_hparams_values"]


def recorded_hparams_values(hp: Any, digest: str | None) -> dict[str, Any] | None:
    """The hyper-parameters as plain JSON values, for the certificate beside their hash ``digest``
    (:func:`hparams_digest`); None for hyper-parameters that are no dataclass or mapping of JSON values, or whose
    JSON form hashes otherwise (a third-party mapping whose keys JSON turns into strings): a certificate must not
    carry values its hash contradicts."""
    plain = dataclasses.asdict(hp) if dataclasses.is_dataclass(hp) and not isinstance(hp, type) else hp
    if digest is None or not isinstance(plain, Mapping):
        return None
    try:
        values = json.loads(json.dumps({k: v for k, v in plain.items() if not str(k).startswith("_")},
                                       allow_nan=False))
    except (TypeError, ValueError):
        return None
    return values if hparams_digest(values) == digest else None


def hparams_digest(hp: Any) -> str | None:
    """The hash of ``hp`` (a dataclass or a mapping of JSON values) that certificates record; None when it cannot be
    hashed (a third-party editor's hyper-parameters that are no JSON values, logged)."""
    try:
        if dataclasses.is_dataclass(hp) and not isinstance(hp, type):
            return hparams_hash(dataclasses.asdict(hp))
        if isinstance(hp, Mapping):
            return hparams_hash(dict(hp))
    except ValueError as err:  # a third-party editor's hparams that are not JSON values
        log.warning("cannot hash hyper-parameters: %s", err)
    return None
