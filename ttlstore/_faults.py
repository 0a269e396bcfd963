"""Fault logging for hot paths: at most one line per interval per component, with a count.

A backend that is down fails every request; a line (let alone a traceback) per failure floods
the logs exactly when an operator reads them. :class:`FaultLog` logs the first fault at once,
then at most one line per :data:`INTERVAL` seconds saying how many faults happened since the
last line and what the last one was.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

__all__ = ["INTERVAL", "FaultLog"]

logger = logging.getLogger("ttlstore")

INTERVAL = 10.0
"""Seconds between two lines of one :class:`FaultLog`."""

clock: Callable[[], float] = time.monotonic
"""Where every FaultLog reads the time: looked up on each fault, so a test may replace it."""


def _describe(problem: BaseException | str) -> str:
    if isinstance(problem, BaseException):
        text = str(problem)
        return f"{type(problem).__name__}: {text}" if text else type(problem).__name__
    return problem


class FaultLog:
    """Counts the faults of one component and logs them on ``ttlstore``, rate-limited.

    ``log(problem)`` counts a fault; the first one, and then the first one after each
    :data:`INTERVAL` seconds, writes one line with the number of faults since the previous
    line and the description of this (the last) one: a WARNING, or an ERROR with the
    exception's traceback for ``traceback=True`` (a fault that is a bug, not an outage).
    Thread-safe; O(1) per fault.
    """

    __slots__ = ("_lock", "_next", "_pending", "count", "what")

    def __init__(self, what: str) -> None:
        self.what = what
        """The component named at the start of each line."""
        self.count = 0
        """Faults counted since the component was made (for metrics)."""
        self._pending = 0
        self._next = -float("inf")
        self._lock = threading.Lock()

    def log(
        self, problem: BaseException | str, context: str = "", *, traceback: bool = False
    ) -> None:
        """Count one fault; log it if the last line is at least :data:`INTERVAL` s old.

        ``context`` (say ``"on begin()"``) follows the component's name in the line.
        """
        now = clock()
        with self._lock:
            self.count += 1
            self._pending += 1
            if now < self._next:
                return
            self._next = now + INTERVAL
            pending, self._pending = self._pending, 0
        logger.log(
            logging.ERROR if traceback else logging.WARNING,
            "%s%s: %s (%d time(s) since the last report; reported at most every %g s)",
            self.what,
            f" {context}" if context else "",
            _describe(problem),
            pending,
            INTERVAL,
            exc_info=problem if traceback and isinstance(problem, BaseException) else None,
        )

    def __repr__(self) -> str:
        return f"<FaultLog {self.what!r} count={self.count}>"
