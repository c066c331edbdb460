"""On-disk building blocks every cache of the project shares: stable hashing, file digests, atomic writes, and
the lock that lets parallel processes build an entry once.

Nothing here knows *where* the cache is: every function takes the path it works on, and whoever owns a cache
(the harness, a command-line tool, a platform's own code) chooses its root. An entry is a directory whose name
carries a hash of everything its content depends on; it is written to a temporary sibling and renamed into
place, so a reader never sees half an entry, and a ``filelock`` lock makes concurrent builders (xdist workers,
two shells) wait for the first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "build_lock",
    "build_once",
    "file_sha256",
    "safetensors_problem",
    "slugify",
    "stable_hash",
]

_SLUG_BAD = re.compile(r"[^A-Za-z0-9._-]+")


def slugify(text: str, *, fallback: str = "x", max_length: int | None = None) -> str:
    """``text`` as a file-name or test-id fragment: letters, digits, ``.``, ``_`` and ``-`` only, no edge
    punctuation, at most ``max_length`` characters; ``fallback`` when nothing is left."""
    slug = _SLUG_BAD.sub("_", text).strip("._-")
    if max_length is not None:
        slug = slug[:max_length].strip("._-")
    return slug or fallback


def stable_hash(value: Any, length: int = 16) -> str:
    """sha256 of a JSON-serialisable value with sorted keys: the same value hashes the same everywhere."""
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write via a temporary file in the same directory and rename, so readers never see half a file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; a report is for everyone who can read the directory (or keeps its old mode)
        os.chmod(tmp, target.stat().st_mode & 0o777 if target.exists() else 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def build_lock(target: Path, timeout: float = -1) -> Iterator[None]:
    """Hold an inter-process lock for building ``target`` (a file or directory path)."""
    import filelock

    target.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(target) + ".lock", timeout=timeout)
    with lock:
        yield


def build_once(target: Path, build: Callable[[Path], None], *, complete_marker: str = "COMPLETE",
               replace: bool | Callable[[Path], bool] = False) -> Path:
    """Return ``target``, building it with ``build(tmp_dir)`` first unless a complete copy exists.

    ``build`` writes into an empty temporary directory that is renamed to ``target`` only after it
    returns; a marker file written last tells complete entries from ones a crash left behind.

    ``replace`` rebuilds a complete entry too: ``True`` always, a callable when ``replace(target)`` says
    so (asked under the lock, so the decision and the rebuild are one step for concurrent builders). The
    old entry stays in place until the new one is complete: it is renamed aside, the new one renamed in,
    and only then the old one deleted, so a failed build leaves the old entry as it was.
    """
    marker = target / complete_marker
    if marker.exists() and replace is False:
        return target
    with build_lock(target):
        if marker.exists() and not _wants_replace(replace, target):
            if replace is False:  # another process finished while we waited
                log.info("reusing %s built by another process", target)
            return target
        if target.exists() and not marker.exists():
            log.warning("removing incomplete cache entry %s", target)
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent))
        try:
            build(tmp)
            (tmp / complete_marker).write_text("ok\n")
            _swap_in(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _wants_replace(replace: bool | Callable[[Path], bool], target: Path) -> bool:
    return replace(target) if callable(replace) else bool(replace)


def _swap_in(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an existing ``target`` is moved aside first and deleted last."""
    if not target.exists():
        os.replace(new, target)
        return
    aside = Path(tempfile.mkdtemp(prefix=target.name + ".", suffix=".old", dir=target.parent))
    os.replace(target, aside / target.name)
    try:
        os.replace(new, target)
    except OSError:
        os.replace(aside / target.name, target)  # put the old entry back rather than leave none
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


# a safetensors header is JSON of a few KiB per hundred tensors; anything near this is not one
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole safetensors file, or None: unreadable, a header that does not parse, or
    fewer bytes than its header describes (a truncated copy or download). Reads the header only, so it costs
    microseconds on a file of many gigabytes."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                return f"{size} bytes long, too short to hold a safetensors header"
            header_length = int.from_bytes(prefix, "little")
            if header_length > min(size - 8, _MAX_SAFETENSORS_HEADER):
                return f"truncated or not safetensors: its header claims {header_length} bytes of a {size}-byte file"
            header = json.loads(handle.read(header_length))
    except OSError as err:
        return f"unreadable ({err})"
    except (ValueError, UnicodeDecodeError) as err:
        return f"not safetensors: its header is not JSON ({err})"
    if not isinstance(header, dict):
        return "not safetensors: its header is not a JSON object"
    ends = [entry["data_offsets"][1] for name, entry in header.items()
            if name != "__metadata__" and isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list)
            and len(entry["data_offsets"]) == 2 and isinstance(entry["data_offsets"][1], int)]
    expected = 8 + header_length + max(ends, default=0)
    if size < expected:
        return f"truncated: {size} bytes where its header describes {expected}"
    return None
