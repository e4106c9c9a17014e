"""Client-supplied strings on their way to a log line: escaped and bounded, and refusals logged at a
bounded rate. A request id with a newline must not forge a log line, a NUL must not reach the log,
and a 100,000-character id must not make a 100 kB line."""
from __future__ import annotations

import logging
import threading
import time

MAX_LOGGED_CHARS = 200


def loggable(text, limit: int = MAX_LOGGED_CHARS) -> str:
    """`text` with every non-printable character (newlines, NUL, other controls, Unicode line
    separators) and backslash escaped, cut to `limit` characters with a note of how many were cut."""
    text = str(text)
    head, cut = text[:limit], len(text) - limit
    escaped = "".join(c if c.isprintable() and c != "\\" else _escape(c) for c in head)
    return escaped + (f"...(+{cut} chars)" if cut > 0 else "")


_NAMED = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(c: str) -> str:
    if c in _NAMED:
        return _NAMED[c]
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


class RateLimitedLog:
    """At most `burst` lines per `interval` seconds through `logger`; lines beyond that are counted
    and reported in one line with the first refusal after the interval (or at `flush()`, on
    shutdown), so a flood of bad requests cannot fill the disk and nothing goes unaccounted."""

    def __init__(self, logger: logging.Logger, burst: int = 50, interval: float = 10.0):
        self.logger, self.burst, self.interval = logger, burst, interval
        self._lock = threading.Lock()
        self._window_start = time.monotonic()
        self._logged = self._suppressed = 0

    def info(self, fmt: str, *args) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._window_start >= self.interval:
                self._report(now)
            if self._logged >= self.burst:
                self._suppressed += 1
                return
            self._logged += 1
        self.logger.info(fmt, *args)

    def flush(self) -> None:
        """Reports lines suppressed so far (at shutdown)."""
        with self._lock:
            self._report(time.monotonic())

    def _report(self, now: float) -> None:
        if self._suppressed:
            self.logger.info("%d more refused requests were not logged in the last %.0f s",
                             self._suppressed, now - self._window_start)
        self._window_start, self._logged, self._suppressed = now, 0, 0
