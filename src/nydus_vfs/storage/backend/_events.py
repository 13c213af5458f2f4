"""The bounded ring of backend error strings behind ``GET /api/v1/daemon/events``.

nydusd keeps one process-wide holder of the last backend read failures
(nydus-surface.md §3.2): at most ``max_errors`` (500) strings whose lengths sum
to at most ``max_size`` (51200) bytes; pushing past either bound drops the
oldest entries first.  ``total_errors`` and ``total_size`` describe what the
ring holds *now* (as upstream serialises them), not a lifetime count.

Entries are the final error of a read after its retries, never a secret:
backends build their messages from blob ids and URLs without query strings.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

__all__ = ["ErrorRing", "backend_events", "record_backend_error", "MAX_ERRORS", "MAX_SIZE"]

MAX_ERRORS = 500
MAX_SIZE = 51200


class ErrorRing:
    """A FIFO of strings bounded by count and by total UTF-8 size (thread-safe)."""

    def __init__(self, max_errors: int = MAX_ERRORS, max_size: int = MAX_SIZE) -> None:
        self.max_errors = max_errors
        self.max_size = max_size
        self._errors: deque[str] = deque()
        self._size = 0
        self._lock = threading.Lock()

    def push(self, message: str) -> None:
        """Append ``message`` (truncated to ``max_size`` bytes), evicting the oldest as needed."""
        raw = message.encode("utf-8", "replace")
        if len(raw) > self.max_size:
            message = raw[: self.max_size].decode("utf-8", "ignore")
            raw = message.encode()
        with self._lock:
            while self._errors and (len(self._errors) >= self.max_errors
                                    or self._size + len(raw) > self.max_size):
                self._size -= len(self._errors.popleft().encode("utf-8", "replace"))
            self._errors.append(message)
            self._size += len(raw)

    def snapshot(self) -> dict[str, Any]:
        """``{max_errors, total_errors, max_size, total_size, errors}`` as the API serialises it."""
        with self._lock:
            return {"max_errors": self.max_errors, "total_errors": len(self._errors),
                    "max_size": self.max_size, "total_size": self._size, "errors": list(self._errors)}

    def clear(self) -> None:
        with self._lock:
            self._errors.clear()
            self._size = 0


_RING = ErrorRing()


def record_backend_error(message: str) -> None:
    """Add one final backend failure to the process-wide ring."""
    _RING.push(message)


def backend_events() -> dict[str, Any]:
    """The process-wide ring in the ``/api/v1/daemon/events`` shape."""
    return _RING.snapshot()
