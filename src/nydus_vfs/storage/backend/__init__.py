"""Blob backends: where blob bytes are stored (local files, registries, object stores, HTTP).

* owns: the ``BlobBackend`` contract, error mapping and retry policy shared by
  every backend, the backends (``localfs``, ``registry``, ``oss``, ``s3``,
  ``http-proxy``), :func:`create_backend`, the shared HTTP client and the
  ``/daemon/events`` error ring (:func:`backend_events`).
* does not own: caching, decompression or validation (``storage.device``).
"""

from .base import BackendMetrics as BackendMetrics
from .base import BlobBackend as BlobBackend
from .base import RetryPolicy as RetryPolicy
from .base import backend_error_from_http_status as backend_error_from_http_status
from .base import backend_error_from_os as backend_error_from_os
from .base import check_blob_id as check_blob_id
from .localfs import LocalfsBackend as LocalfsBackend
from ._events import backend_events as backend_events
from .factory import create_backend as create_backend

# The HTTP backends pull in aiohttp (a quarter of a second of imports, most of
# it building aiohttp's default SSL context).  A daemon serving local blobs
# never needs them, and one that does imports only its own type (the factory
# imports by type), so they load on first attribute access (PEP 562).
_LAZY = {
    "HttpProxyBackend": ".http_proxy",
    "OssBackend": ".oss",
    "RegistryAuth": "._registry_auth",
    "RegistryBackend": ".registry",
    "S3Backend": ".s3",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value

__all__ = [
    "BackendMetrics",
    "BlobBackend",
    "RetryPolicy",
    "backend_error_from_http_status",
    "backend_error_from_os",
    "check_blob_id",
    "LocalfsBackend",
    "RegistryBackend",
    "RegistryAuth",
    "OssBackend",
    "S3Backend",
    "HttpProxyBackend",
    "backend_events",
    "create_backend",
]
