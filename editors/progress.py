"""Progress of a long measurement as lines of text, for callers without a progress bar (a certification run's
set-up, where pytest captures the terminal): a line at most every few seconds, with what is done, the share, the
time spent and an estimate of the time left; nothing for a measurement quicker than that."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["REPORT_EVERY_SECONDS", "ThrottledProgress"]

# often enough to show a set-up is alive, seldom enough not to flood a terminal or a log
REPORT_EVERY_SECONDS = 15.0


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class ThrottledProgress:
    """``advance(n)`` as work is done; ``report`` receives a line at most every ``every`` seconds (default
    :data:`REPORT_EVERY_SECONDS`, read when the progress starts), and a last one from ``finish()`` when any was
    sent."""

    def __init__(self, what: str, total: int, unit: str, report: Callable[[str], None], *,
                 every: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.what, self.total, self.unit = what, max(0, total), unit
        self._report, self._clock = report, clock
        self._every = REPORT_EVERY_SECONDS if every is None else every
        self._start = self._last = clock()
        self.done = 0
        self.lines = 0

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = self._clock()
        if now - self._last >= self._every:
            self._last = now
            elapsed = now - self._start
            left = elapsed * (self.total - self.done) / self.done if 0 < self.done < self.total else 0.0
            share = f" ({self.done / self.total:.0%})" if self.total else ""
            self._send(f"{self.what}: {self.done:,}/{self.total:,} {self.unit}{share}, {_duration(elapsed)} spent, "
                       f"about {_duration(left)} left")

    def finish(self) -> None:
        if self.lines:
            self._send(f"{self.what}: {self.done:,} {self.unit} in {_duration(self._clock() - self._start)}")

    def _send(self, line: str) -> None:
        self.lines += 1
        self._report(line)
