"""Where the project's caches live: one root for organisms, statistics, corpora, trained editors and floors.

``cache_root(configured)`` is the caller's choice when given (``--editsafety-cache``, a Python API argument),
else ``EDITSAFETY_CACHE``, else the platform's per-user cache directory. The root is resolved once by whoever
owns a run and passed down explicitly; the storage primitives themselves (hashing, locks, atomic writes) live
in :mod:`editors.storage`, below both layers.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "EDITSAFETY_CACHE"


def cache_root(configured: str | os.PathLike[str] | None = None) -> Path:
    if configured:
        return Path(configured).expanduser()
    from_env = os.environ.get(CACHE_ENV)
    if from_env:
        return Path(from_env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("pytest-editsafety", appauthor=False))
