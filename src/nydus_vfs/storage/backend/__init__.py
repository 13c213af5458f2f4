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
from .http_proxy import HttpProxyBackend as HttpProxyBackend
from .oss import OssBackend as OssBackend
from ._registry_auth import RegistryAuth as RegistryAuth
from .registry import RegistryBackend as RegistryBackend
from .s3 import S3Backend as S3Backend

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
