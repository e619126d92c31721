"""Logging what arrives from the wire, safely.

Anyone who reaches a port can make the daemon log. Two rules keep that from flooding or forging
the daemon's own log:

- :func:`wire` escapes a value from the wire (a newline in a node id must not start a forged
  log line) and truncates it (a 1 MiB ``log_name`` is not echoed whole).
- :class:`RateLimited` logs bad input at most once per reason per interval, as one line (never a
  traceback), and the next line says how many were suppressed meanwhile. The counters in
  ``meshaudit_rejected_total`` stay exact; the log only samples.

A library's log is sampled the same way (:class:`LibraryLogLimit`): the Kafka client logs every
failed attempt of every connection, about 30 lines a second per client while a broker is away,
which the daemon's own lines and metrics already say once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final

MAX_CHARS: Final = 200
INTERVAL_SECS: Final = 10.0
# Reasons are few and fixed (code, not wire), but bound the table anyway.
_MAX_REASONS: Final = 1024


def wire(value: object, limit: int = MAX_CHARS) -> str:
    """A value from the wire, fit for one log line: control characters, quotes and backslashes
    escaped, non-ASCII kept readable, at most ``limit`` characters (then "...(N chars)")."""
    text = value if isinstance(value, str) else repr(value) if isinstance(value, bytes) else str(value)
    total = len(text)
    if total > limit:
        text = text[:limit]
    # unicode_escape turns \n, \r, \x1b, \u2028 ... into visible escapes; it also escapes
    # non-ASCII, which is the price of a log line no value can break.
    out = text.encode("unicode_escape").decode("ascii").replace('"', '\\"')
    if total > limit:
        out += f"...({total} chars)"
    return out


class RateLimited:
    """At most one log line per ``reason`` per ``interval`` seconds, with a suppressed count."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = INTERVAL_SECS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self._next: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, level: int, reason: str, msg: str, *args: object) -> bool:
        """Log ``msg % args`` unless ``reason`` was logged less than ``interval`` ago; True when
        a line was written. Pass wire values through :func:`wire` first."""
        now = self.clock()
        due = self._next.get(reason)
        if due is not None and now < due:
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
            return False
        if due is None and len(self._next) >= _MAX_REASONS:
            self._next.clear()
            self._suppressed.clear()
        self._next[reason] = now + self.interval
        skipped = self._suppressed.pop(reason, 0)
        if skipped:
            msg += " (%d more like this in the last %.0f s not logged)"
            args = (*args, skipped, self.interval)
        self.logger.log(level, msg, *args)
        return True

    def warning(self, reason: str, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, reason, msg, *args)

    def error(self, reason: str, msg: str, *args: object) -> bool:
        return self.log(logging.ERROR, reason, msg, *args)


class LibraryLogLimit(logging.Filter):
    """On a handler: records of the loggers under ``prefixes`` (a library's) pass at most once per
    (logger, level, message template) per ``interval``; the next that passes says how many were
    held back meanwhile. Every other record passes untouched."""

    def __init__(
        self, prefixes: tuple[str, ...], interval: float = INTERVAL_SECS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.prefixes = prefixes
        self.interval = interval
        self.clock = clock
        self._next: dict[tuple[str, int, str], float] = {}
        self._held: dict[tuple[str, int, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        if not any(name == p or name.startswith(p + ".") for p in self.prefixes):
            return True
        key = (name, record.levelno, str(record.msg))
        now = self.clock()
        due = self._next.get(key)
        if due is not None and now < due:
            self._held[key] = self._held.get(key, 0) + 1
            return False
        if due is None and len(self._next) >= _MAX_REASONS:
            self._next.clear()
            self._held.clear()
        self._next[key] = now + self.interval
        held = self._held.pop(key, 0)
        if held:
            record.msg = f"{record.getMessage()} ({held} more like this in the last {self.interval:.0f} s not logged)"
            record.args = None
        return True
