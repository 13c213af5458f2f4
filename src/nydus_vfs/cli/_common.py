"""What the command-line tools share: running a subcommand with one log line per failure."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from ..errors import NydusError

__all__ = ["run_subcommand"]


def run_subcommand(call: Callable[[], int], log: logging.Logger, *, expected: tuple[type[Exception], ...] = (),
                   statuses: Mapping[type[Exception], tuple[int, str]] | None = None) -> int:
    """Run ``call``; what a user can cause becomes one ERROR line and an exit status, never a traceback.

    NydusError, OSError and ``expected`` exit 1 (``statuses`` maps an error
    type to another status and log format, e.g. nydus-image merge's 2),
    Ctrl-C exits 130.  Anything else is a bug and propagates.
    """
    try:
        return call()
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except (NydusError, OSError, *expected) as exc:
        for kind, (status, fmt) in (statuses or {}).items():
            if isinstance(exc, kind):
                log.error(fmt, exc)
                return status
        log.error("%s", exc)
        return 1
