"""Process logging set up the way nydusd does it: same levels, line format and file rules.

Only the CLI calls :func:`setup_logging` (once, at start); the HTTP API calls
:func:`set_level` when ``PUT /api/v1/daemon`` asks for another level.  Library
modules just use ``logging.getLogger(__name__)``; the extra ``TRACE`` level is
used as ``log.log(TRACE, ...)``.

Line format (tools parse it)::

    [2024-01-02 03:04:05.123456 +08:00] INFO message
    [2024-01-02 03:04:05.123456 +08:00] WARN [nydus_vfs/config.py:42] message

Level names are upstream's (``WARN``, not ``WARNING``); every level but INFO
carries ``[file:line]``, with the file given relative to the directory that
holds the ``nydus_vfs`` package.

Differences from upstream, on purpose: colour is used on stderr only when it
is a terminal (Kata pipes stderr into its own log), and size rotation keeps
10 *plain* old files (``nydusd.log.1`` ... ``.10``) where flexi_logger keeps 10
compressed, timestamp-named ones.
"""

from __future__ import annotations

import datetime
import logging
import logging.handlers
import os
import sys
from pathlib import Path

from ..errors import ConfigError

__all__ = [
    "TRACE",
    "LOG_LEVELS",
    "API_LOG_LEVELS",
    "parse_level",
    "setup_logging",
    "set_level",
    "NydusFormatter",
    "resolve_log_path",
]

#: Below DEBUG, for per-request chatter (upstream's ``trace!``).
TRACE = 5
logging.addLevelName(TRACE, "TRACE")

#: What ``--log-level`` accepts.
LOG_LEVELS = ("trace", "debug", "info", "warn", "error")
#: What the API's ``PUT /daemon {"log_level": ...}`` accepts: the CLI levels plus ``off``.
API_LOG_LEVELS = LOG_LEVELS + ("off",)

_OFF = logging.CRITICAL + 10
_LEVELS = {"trace": TRACE, "debug": logging.DEBUG, "info": logging.INFO,
           "warn": logging.WARNING, "error": logging.ERROR, "off": _OFF}
_NAMES = {TRACE: "TRACE", logging.DEBUG: "DEBUG", logging.INFO: "INFO",
          logging.WARNING: "WARN", logging.ERROR: "ERROR", logging.CRITICAL: "ERROR"}
_COLOURS = {"TRACE": "\x1b[2m", "DEBUG": "\x1b[34m", "WARN": "\x1b[33m", "ERROR": "\x1b[1;31m"}
_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent.parent) + os.sep
_ROTATE_KEEP = 10
# Marks the handler this module installed so a second setup replaces only ours.
_OURS = "_nydus_vfs_handler"


def parse_level(level: str) -> int:
    """The logging level for a nydusd level name (case-insensitive); ConfigError if unknown."""
    if isinstance(level, str):
        found = _LEVELS.get(level.strip().lower())
        if found is not None:
            return found
    raise ConfigError(f"invalid log level {level!r} (expected one of {', '.join(API_LOG_LEVELS)})")


def _level_name(levelno: int) -> str:
    if levelno in _NAMES:
        return _NAMES[levelno]
    # Custom levels between the standard ones print as the next one down.
    for threshold in (logging.ERROR, logging.WARNING, logging.INFO, logging.DEBUG):
        if levelno > threshold:
            return _NAMES[threshold]
    return "TRACE"


def _timestamp(created: float) -> str:
    now = datetime.datetime.fromtimestamp(created).astimezone()
    offset = now.utcoffset() or datetime.timedelta(0)
    minutes = int(offset.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    minutes = abs(minutes)
    return f"{now:%Y-%m-%d %H:%M:%S.%f} {sign}{minutes // 60:02d}:{minutes % 60:02d}"


def _source(record: logging.LogRecord) -> str:
    path = record.pathname or "<unnamed>"
    if path.startswith(_PACKAGE_PARENT):
        return path[len(_PACKAGE_PARENT):]
    return path


class NydusFormatter(logging.Formatter):
    """``[date time.micros +hh:mm] LEVEL [file:line] message`` (no ``[file:line]`` for INFO)."""

    def __init__(self, colour: bool = False) -> None:
        super().__init__()
        self._colour = colour

    def format(self, record: logging.LogRecord) -> str:
        name = _level_name(record.levelno)
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            message = f"{message}\n{record.exc_text}"
        if record.stack_info:
            message = f"{message}\n{self.formatStack(record.stack_info)}"
        stamp = _timestamp(record.created)
        if self._colour and name in _COLOURS:
            on, off = _COLOURS[name], "\x1b[0m"
            stamp, shown, message = f"{on}{stamp}{off}", f"{on}{name}{off}", f"{on}{message}{off}"
        else:
            shown = name
        if record.levelno == logging.INFO:
            return f"[{stamp}] {shown} {message}"
        return f"[{stamp}] {shown} [{_source(record)}:{record.lineno}] {message}"


def resolve_log_path(log_file: str | os.PathLike[str]) -> Path:
    """Where ``--log-file`` writes: ``.log`` added when the name has no extension,
    a relative path taken against the current directory.  ConfigError for a path
    with no file name."""
    path = Path(os.fspath(log_file))
    if not path.name or path.name in (".", ".."):
        raise ConfigError(f"invalid log file name {os.fspath(log_file)!r}")
    if not path.suffix:
        path = path.with_name(path.name + ".log")
    if not path.is_absolute():
        path = Path.cwd() / path
    return path


def setup_logging(level: str, log_file: str | os.PathLike[str] | None = None,
                  rotation_size_mb: int = 0) -> Path | None:
    """Send the process's logs to ``log_file`` (appending) or to stderr, at ``level``.

    ``level`` is one of :data:`API_LOG_LEVELS`.  ``rotation_size_mb`` > 0 rotates
    the file at that size and keeps 10 old files; 0 disables rotation.  The
    handler goes on the root logger so dependencies' warnings are kept too;
    calling this again replaces the handler installed before (never anyone
    else's).  Returns the resolved log file path, or None for stderr.  Raises
    ConfigError for a bad level, file name or rotation size, or a file that
    cannot be opened.
    """
    levelno = parse_level(level)
    if type(rotation_size_mb) is not int or rotation_size_mb < 0:
        raise ConfigError(f"invalid log rotation size {rotation_size_mb!r} (MiB, 0 disables rotation)")
    path: Path | None = None
    handler: logging.Handler
    if log_file is not None:
        path = resolve_log_path(log_file)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if rotation_size_mb:
                handler = logging.handlers.RotatingFileHandler(
                    path, mode="a", maxBytes=rotation_size_mb * 1024 * 1024,
                    backupCount=_ROTATE_KEEP, encoding="utf-8")
            else:
                handler = logging.FileHandler(path, mode="a", encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot open log file {path}: {exc.strerror or exc}") from None
        handler.setFormatter(NydusFormatter(colour=False))
    else:
        handler = logging.StreamHandler(sys.stderr)
        isatty = getattr(sys.stderr, "isatty", None)
        handler.setFormatter(NydusFormatter(colour=bool(isatty and isatty())))
    setattr(handler, _OURS, True)

    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _OURS, False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(levelno)
    return path


def set_level(level: str) -> None:
    """Change the level at run time (``PUT /api/v1/daemon``); ``off`` silences everything."""
    logging.getLogger().setLevel(parse_level(level))
