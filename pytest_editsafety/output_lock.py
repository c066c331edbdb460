"""One writer per certificate: a run holds an exclusive lock on each output path for as long as it may write it.

Two runs given the same ``reports/editsafety.json`` would otherwise both write it and the last one to finish
would silently replace the other's certificate. The second run is refused at start-up instead, with the pid,
host, start time and command of the run that holds the path, so the user can wait for it or choose other
paths. The lock is an ``flock`` on ``<output>.lock``: the operating system drops it when its holder dies, so
a killed run never leaves a stale lock behind, and the lock file holds a description of its holder for the
message. The lock file is removed when the run ends.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["OutputLock", "OutputsInUseError", "holding_outputs", "lock_outputs"]

# a lock file that vanished or was replaced between opening and locking it (its holder was releasing it)
_RETRIES = 5


class OutputsInUseError(RuntimeError):
    """An output path is held by another running certification; the message names that run."""


def _lock_path(output: Path) -> Path:
    return output.with_name(output.name + ".lock")


def _describe_holder(raw: bytes) -> str:
    try:
        holder = json.loads(raw.decode("utf-8"))
        return (f"pid {holder['pid']} on {holder['host']}, started {holder['started']}, "
                f"command: {holder['command']}")
    except (ValueError, KeyError, TypeError):
        return "a run that has not yet said who it is"


@dataclass
class OutputLock:
    """The locks this run holds on its outputs; :meth:`release` gives them back (idempotent)."""

    outputs: tuple[Path, ...]
    _held: list[tuple[Path, int]] = field(default_factory=list, repr=False)

    def release(self) -> None:
        while self._held:
            lock_path, fd = self._held.pop()
            try:
                # unlinked while still locked, so no other process can lock the name we are about to free
                lock_path.unlink(missing_ok=True)
            except OSError as err:
                log.debug("could not remove lock file %s: %s", lock_path, err)
            os.close(fd)


def _acquire_one(output: Path, description: bytes) -> int:
    import fcntl

    lock_path = _lock_path(output)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(_RETRIES):
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(os.pread(fd, 4096, 0))
            os.close(fd)
            raise OutputsInUseError(
                f"{output} is being written by another editsafety run ({holder}); wait for it to finish or give "
                f"this run other output paths (--editsafety-json and --editsafety-report)"
            ) from None
        try:
            same_file = os.path.samestat(os.fstat(fd), os.stat(lock_path))
        except FileNotFoundError:
            same_file = False
        if same_file:
            os.ftruncate(fd, 0)
            os.pwrite(fd, description, 0)
            return fd
        os.close(fd)  # the holder released and removed it while we opened it: lock the new file instead
    raise OutputsInUseError(f"{output}: could not lock {lock_path}; another run keeps replacing it")


def lock_outputs(outputs: Iterable[str | os.PathLike[str]], *, command: str | None = None) -> OutputLock:
    """Lock every path of ``outputs`` for this process, or raise :class:`OutputsInUseError` holding none."""
    paths = tuple(sorted({Path(os.path.abspath(p)) for p in outputs}))
    description = json.dumps({
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else " ".join(sys.argv),
    }).encode("utf-8")
    lock = OutputLock(paths)
    if sys.platform == "win32":  # no flock: concurrent runs there are not detected
        log.debug("output locks are not available on this platform")
        return lock
    try:
        for path in paths:  # in sorted order, so two runs on overlapping paths cannot each hold half
            lock._held.append((_lock_path(path), _acquire_one(path, description)))
    except BaseException:
        lock.release()
        raise
    return lock


@contextmanager
def holding_outputs(outputs: Iterable[str | os.PathLike[str]], *, command: str | None = None) -> Iterator[OutputLock]:
    """:func:`lock_outputs` for the duration of a ``with`` block (one write: the API, ``report``)."""
    lock = lock_outputs(outputs, command=command)
    try:
        yield lock
    finally:
        lock.release()
