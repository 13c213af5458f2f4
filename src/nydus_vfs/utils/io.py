"""I/O value types shared by layers that must not import each other.

``FileSegment`` is produced by ``storage`` (cache hits, zero-copy blob ranges)
and consumed by the transports through ``fuse.ops.ReadData``.  It lives here,
below both, so that storage never imports fuse (see the layer order in the
package docstring); ``fuse.ops`` re-exports it.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["FileSegment"]


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
