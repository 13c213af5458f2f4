"""The storage layer: chunk bytes from backends through caches to the filesystem.

* owns: backends (``backend``), the per-daemon ``BlobLayer`` whose per-blob
  state (file cache, in-flight fetches) is shared by every mount, the
  ``BlobDevice`` each RAFS instance reads through, and the chunk decode
  pipeline (decompress, CRC/digest check).
* does not own: image metadata (``format``; storage uses only its descriptor
  types), file offsets to chunks (``fs``), errno (``fs`` maps our errors).
"""

from ..utils.io import FileSegment as FileSegment
from .backend import BackendMetrics as BackendMetrics
from .backend import BlobBackend as BlobBackend
from .backend import LocalfsBackend as LocalfsBackend
from .backend import RetryPolicy as RetryPolicy
from .cache import CacheSpec as CacheSpec
from .device import HOLE_BLOB_INDEX as HOLE_BLOB_INDEX
from .device import MAX_CHUNK_SIZE as MAX_CHUNK_SIZE
from .device import BlobCacheMetrics as BlobCacheMetrics
from .device import BlobDevice as BlobDevice
from .device import BlobLayer as BlobLayer
from .device import IoVec as IoVec

__all__ = [
    "FileSegment",
    "BackendMetrics",
    "BlobBackend",
    "LocalfsBackend",
    "RetryPolicy",
    "CacheSpec",
    "HOLE_BLOB_INDEX",
    "MAX_CHUNK_SIZE",
    "BlobCacheMetrics",
    "BlobDevice",
    "BlobLayer",
    "IoVec",
]
