"""(filled in by its owner)."""

from .backend import InMemoryBackend as InMemoryBackend
from .backend import check_blob_backend as check_blob_backend
from .fuse_factory import FuseRequestFactory as FuseRequestFactory
