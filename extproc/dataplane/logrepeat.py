"""One log line per repeated message per window, not one per request.

During a Redis outage every refused request used to log the same WARNING (1,874 lines in
3 s): the one useful line was lost in them, and the log volume itself became a cost. This
filter lets the first occurrence of a message through at once, drops identical ones for
`window` seconds, and adds to the next one it lets through how many it dropped. Messages
are compared as formatted (logger, level and text), so distinct events (another workspace,
another error) are never merged, only the same line said again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

WINDOW_SECONDS = 10.0
_MAX_TRACKED = 4096


@dataclass(slots=True)
class _Seen:
    since: float
    dropped: int = 0


class RepeatFilter(logging.Filter):
    """A `logging.Filter` for handlers: identical records within `window` become one line."""

    def __init__(
        self, window: float = WINDOW_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.window = window
        self._clock = clock
        self._seen: dict[tuple[str, int, str], _Seen] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # a malformed call: let logging report it as it would
            return True
        key = (record.name, record.levelno, text)
        now = self._clock()
        seen = self._seen.get(key)
        if seen is not None and now - seen.since < self.window:
            seen.dropped += 1
            return False
        if seen is not None and seen.dropped:
            # The text was fixed by getMessage(); keep it so, with the count appended.
            record.msg = (
                f"{text} [{seen.dropped} more like this in the last {now - seen.since:.0f} s]"
            )
            record.args = None
        self._remember(key, now)
        return True

    def _remember(self, key: tuple[str, int, str], now: float) -> None:
        if len(self._seen) >= _MAX_TRACKED:
            # Lines that never repeat (request ids in them) must not grow this without end.
            self._seen = {k: s for k, s in self._seen.items() if now - s.since < self.window}
            if len(self._seen) >= _MAX_TRACKED:
                self._seen.clear()
        self._seen[key] = _Seen(now)


def install(logger: logging.Logger | None = None, window: float = WINDOW_SECONDS) -> RepeatFilter:
    """Put one `RepeatFilter` on every handler of `logger` (the root logger by default)."""
    target = logger or logging.getLogger()
    repeat = RepeatFilter(window)
    for handler in target.handlers:
        if not any(isinstance(f, RepeatFilter) for f in handler.filters):
            handler.addFilter(repeat)
    return repeat
