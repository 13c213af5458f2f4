"""Test helpers a user of the library can use from an installed package.

* ``InMemoryBackend`` and ``check_blob_backend``: a blob backend held in memory
  and the conformance checks every ``BlobBackend`` must pass.
* ``FuseRequestFactory``: FUSE requests as a Linux 6.1 client encodes them.
* ``BytesPayload``: WRITE data as the virtio-fs transport hands over a long
  WRITE (a ``WritePayload``), held in memory.

Nothing here needs the project checkout; tooling that does (booting the QEMU
test guest from ``qemu/``) lives in the checkout's ``tests/guest.py``.
"""

from .backend import InMemoryBackend as InMemoryBackend
from .backend import check_blob_backend as check_blob_backend
from .fuse_factory import FuseRequestFactory as FuseRequestFactory
from .payload import BytesPayload as BytesPayload

__all__ = ["InMemoryBackend", "check_blob_backend", "FuseRequestFactory", "BytesPayload"]
