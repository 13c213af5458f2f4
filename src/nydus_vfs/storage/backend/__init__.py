"""Blob backends: where blob bytes are stored (local files now; registries and object stores next).

* owns: the ``BlobBackend`` contract, error mapping and retry policy shared by
  every backend, and the ``localfs`` backend.
* does not own: caching, decompression or validation (``storage.device``).
"""

from .base import BackendMetrics as BackendMetrics
from .base import BlobBackend as BlobBackend
from .base import RetryPolicy as RetryPolicy
from .base import backend_error_from_http_status as backend_error_from_http_status
from .base import backend_error_from_os as backend_error_from_os
from .base import check_blob_id as check_blob_id
from .localfs import LocalfsBackend as LocalfsBackend

__all__ = [
    "BackendMetrics",
    "BlobBackend",
    "RetryPolicy",
    "backend_error_from_http_status",
    "backend_error_from_os",
    "check_blob_id",
    "LocalfsBackend",
]
