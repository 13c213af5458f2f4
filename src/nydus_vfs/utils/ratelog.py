"""Log lines that a stream of failures can trigger, bounded: one per key, and few per second.

A walk over a damaged image fails thousands of reads; logging each one buries
the cause and fills disks.  :class:`LogLimiter` logs a message once per *key*
(say, ``(blob, chunk, reason)``) per ``key_window`` seconds, and at most
``burst`` lines per ``window`` seconds whatever the keys.  What it drops it
counts, and the next line it lets through after a window ends is preceded by
one summary line with the count.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

__all__ = ["LogLimiter"]


class LogLimiter:
    """Rate-limited logging onto ``logger``; see the module docstring.

    ``clock`` is injectable for tests.  At most ``max_keys`` keys are
    remembered (oldest forgotten first), so memory stays bounded however many
    distinct chunks fail.
    """

    def __init__(self, logger: logging.Logger, *, burst: int = 20, window: float = 10.0,
                 key_window: float = 60.0, max_keys: int = 4096,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log = logger
        self._burst = burst
        self._window = window
        self._key_window = key_window
        self._max_keys = max_keys
        self._clock = clock
        self._keys: OrderedDict[Hashable, float] = OrderedDict()
        self._start = clock()
        self._used = 0
        self.suppressed = 0

    def log(self, level: int, key: Hashable, msg: str, *args: object) -> bool:
        """Log ``msg % args`` unless ``key`` was logged recently or the budget is spent.

        Returns True when the line was written.
        """
        if not self._log.isEnabledFor(level):
            return False
        now = self._clock()
        seen = self._keys.get(key)
        if seen is not None and now - seen < self._key_window:
            self.suppressed += 1
            return False
        if now - self._start >= self._window:
            self._roll(now)
        if self._used >= self._burst:
            self.suppressed += 1
            return False
        self._used += 1
        self._keys[key] = now
        self._keys.move_to_end(key)
        while len(self._keys) > self._max_keys:
            self._keys.popitem(last=False)
        self._log.log(level, msg, *args, stacklevel=2)
        return True

    def _roll(self, now: float) -> None:
        if self.suppressed:
            self._log.warning("%d similar messages suppressed in the last %.0fs", self.suppressed,
                              now - self._start)
        self._start = now
        self._used = 0
        self.suppressed = 0
