"""Building the backend a config describes (the one place that maps ``backend.type`` to a class).

``create_backend(cfg, backend_id=...)`` returns a new :class:`~.base.BlobBackend`
for every type nydusd accepts except ``localdisk`` (refused with a
``ConfigError`` that says so).  ``retry_limit`` comes from the config; the
registry backend reads ``IMAGE_PULL_AUTH`` from the environment.  Two backends
built from equal configs have equal ``identity`` (so the daemon can share one).
"""

from __future__ import annotations

import logging

from ...config import BackendConfig
from ...errors import ConfigError
from .base import BlobBackend

__all__ = ["create_backend"]

log = logging.getLogger("nydus_vfs.storage")


def create_backend(cfg: BackendConfig, *, backend_id: str = "/") -> BlobBackend:
    """A new backend for ``cfg`` (its ``type`` and the matching section).

    ``backend_id`` is the mountpoint whose hot-reloaded settings
    (``PUT /api/v1/config``) apply to it.  Raises ``ConfigError`` for a missing
    section, an unsupported type, invalid credentials or unreadable CA files.
    """
    if cfg is None:
        raise ConfigError("backend: a RAFS mount needs a backend section")
    sub = cfg.active
    if sub is None:
        raise ConfigError(f"backend.type {cfg.type!r}: its configuration section is missing")
    proxy = getattr(sub, "proxy", None)
    if proxy is not None and proxy.dragonfly_scheduler_endpoint:
        log.warning("backend %s: proxy.dragonfly_scheduler_endpoint (Dragonfly SDK mode) is not supported; "
                    "using the HTTP proxy %r%s", backend_id, proxy.url,
                    "" if proxy.url else " (none set: requests go direct)")
    if cfg.type == "localfs":
        from .localfs import LocalfsBackend
        return LocalfsBackend(dir=sub.dir or None, blob_file=sub.blob_file or None, alt_dirs=tuple(sub.alt_dirs))
    if cfg.type == "registry":
        from .registry import RegistryBackend
        return RegistryBackend(sub, backend_id=backend_id)
    if cfg.type == "oss":
        from .oss import OssBackend
        return OssBackend(sub)
    if cfg.type == "s3":
        from .s3 import S3Backend
        return S3Backend(sub)
    if cfg.type == "http-proxy":
        from .http_proxy import HttpProxyBackend
        return HttpProxyBackend(sub)
    raise ConfigError(f"backend.type: {cfg.type!r} is not supported by this nydusd "
                      f"(supported: localfs, registry, oss, s3, http-proxy)")
