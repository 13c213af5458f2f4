"""Listening unix sockets at a path, as daemons need them: stale files replaced, live ones refused.

A socket file left by a daemon that died is *stale*: nothing accepts on it, and
a new daemon may take the path.  One another daemon still serves is *live*:
taking it would silently cut that daemon off (its clients would reach us), so
it is refused.  Anything that is not a socket is never replaced.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat

from ..errors import ConfigError, TransportError

__all__ = ["listen_unix", "probe_unix", "remove_unix_socket"]

log = logging.getLogger("nydus_vfs")


def probe_unix(path: str, timeout: float = 1.0) -> OSError | None:
    """None when something accepts connections at ``path``, else the error connecting gave."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(timeout)
        probe.connect(path)
    except OSError as exc:
        return exc
    finally:
        probe.close()
    return None


def remove_unix_socket(path: str) -> None:
    """Remove the socket file at ``path`` (our own, on shutdown); anything else there is left alone."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


def listen_unix(path: str, *, flag: str, backlog: int, mode: int | None = None) -> socket.socket:
    """A non-blocking socket listening at ``path`` (``flag`` names the option in errors).

    ``mode`` (e.g. 0o600) is applied before anyone can connect.  Raises
    ConfigError when a non-socket file is in the way, TransportError when a
    live daemon serves the path or the bind fails.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"{flag} {path}: exists and is not a socket; refusing to replace it")
        exc = probe_unix(path)
        if exc is None:
            raise TransportError(f"{flag} {path}: another daemon is serving there")
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise TransportError(f"{flag} {path}: cannot tell whether it is in use: {exc.strerror}") from None
        log.info("replacing stale socket %s", path)
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if mode is not None:
            # Bind under a umask that yields ``mode``: no window in which others could connect.
            old = os.umask(0o777 & ~mode)
            try:
                sock.bind(path)
            finally:
                os.umask(old)
            os.chmod(path, mode)
        else:
            sock.bind(path)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise TransportError(f"cannot listen on {flag} {path}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock
