"""The ``http-proxy`` backend: blobs as plain files of an HTTP(S) server or a Unix-socket server.

``addr`` is an ``http://``/``https://`` URL or an absolute Unix socket path
(nydus-surface.md §2.3).  Blob ``<id>`` is ``addr + path + "/" + <id>`` with
the **bare** id (no ``sha256:``); over a Unix socket ``path`` is ignored and
the request goes to ``/<id>``.  ``HEAD`` gives the size, ``GET`` with
``Range`` the data.  A Unix socket path must exist when the backend is
created (``ConfigError`` otherwise).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Hashable
from urllib.parse import quote

from ...config import HttpProxyConfig
from ...errors import ConfigError
from ._object import HttpBlobBackend
from .base import RetryPolicy

__all__ = ["HttpProxyBackend"]


class HttpProxyBackend(HttpBlobBackend):
    """Blobs from ``addr``; see the module docstring."""

    type_name = "http-proxy"

    def __init__(self, cfg: HttpProxyConfig, *, retry: RetryPolicy | None = None) -> None:
        socket_path = None
        if not cfg.addr.startswith(("http://", "https://")):
            try:
                mode = os.stat(cfg.addr).st_mode
            except OSError as exc:
                raise ConfigError(f"http-proxy addr {cfg.addr!r}: {exc.strerror}") from None
            if not stat.S_ISSOCK(mode):
                raise ConfigError(f"http-proxy addr {cfg.addr!r} is neither an http(s) URL nor a Unix socket")
            socket_path = cfg.addr
        super().__init__(cfg, retry=retry, unix_socket=socket_path)
        if socket_path is not None:
            self._base = "http://localhost"
        else:
            self._base = cfg.addr.rstrip("/") + ("/" + cfg.path.strip("/") if cfg.path.strip("/") else "")

    def _location(self) -> Hashable:
        return (self.cfg.addr, self.cfg.path)

    def _url(self, blob_id: str) -> str:
        return f"{self._base}/{quote(blob_id, safe='-_.~')}"
