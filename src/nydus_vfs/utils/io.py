"""I/O value types shared by layers that must not import each other.

``FileSegment`` is produced by ``storage`` (cache hits, zero-copy blob ranges)
and consumed by the transports through ``fuse.ops.ReadData``; ``WritePayload``
is produced by a transport (virtio-fs WRITE data left in guest memory) and
consumed by filesystems through ``fuse.ops.WriteData``.  They live here, below
all of them, so that storage and the filesystems never import fuse or a
transport (see the layer order in the package docstring); ``fuse.ops``
re-exports them.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

__all__ = ["FileSegment", "WritePayload"]


class FileSegment(NamedTuple):
    """``length`` bytes at ``offset`` of the open file ``fd``.

    A READ reply made of file segments lets the transport move data from the
    cache file straight into its destination (guest memory for virtio-fs) with
    ``preadv``, with no intermediate copy in Python.  The producer guarantees
    the range lies inside the file (cache files are sized to the blob's
    uncompressed size), so a short read is an I/O error, not EOF.  The fd stays
    owned by its producer: it is valid until the producing device or backend is
    closed, and the consumer must never close it.
    """

    fd: int
    offset: int
    length: int


class WritePayload(Protocol):
    """WRITE data the transport did not copy: it stays where it arrived (virtio-fs: guest memory).

    A filesystem's ``write`` gets one instead of a bytes-like object when the
    request was too long for the transport to copy; it moves the data to a file
    with :meth:`pwrite` (no copy in Python: a ``pwritev`` from guest memory)
    or, when it must hold the bytes, takes a private copy with :meth:`tobytes`.

    Lifetime: valid until the transport completes the request, which is after
    the filesystem's ``write`` returned, or after the awaitable a server
    returned for the request finished.  Used later, every method but ``len``
    raises ``ValueError``, as a released ``memoryview`` does; it never reaches
    memory the request no longer owns.

    The bytes may change while they are read: a guest can rewrite its own
    buffer at any time.  That can only change what ends up in the guest's
    file, so never validate or parse them; take :meth:`tobytes` first.
    """

    def __len__(self) -> int:
        """The number of data bytes."""
        ...

    def __getitem__(self, key: slice) -> WritePayload:
        """The bytes ``[key.start, key.stop)`` as a payload of the same lifetime (no step)."""
        ...

    def pwrite(self, fd: int, offset: int) -> int:
        """Write every byte to ``fd`` at ``offset`` with one system call, as ``os.pwrite`` does.

        Returns the bytes written (short only where ``os.pwrite`` could be);
        a failed system call raises ``OSError`` with its errno.
        """
        ...

    def tobytes(self) -> bytes:
        """A private copy of the bytes as they are now."""
        ...
