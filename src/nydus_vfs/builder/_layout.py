"""What a bootstrap writer needs to know, independent of the RAFS version."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..format.types import BlobInfo, Compressor, Digester
from ._tree import Indexed, Node, index_order

__all__ = ["ImageSpec"]


@dataclass
class ImageSpec:
    """A finished tree plus the image-wide settings, ready to be laid out.

    Every regular file's ``inode.chunks`` must already reference ``blobs`` by
    position (``ChunkInfo.blob_index``).  ``prefetch`` lists the paths whose
    inodes go into the prefetch table, in pattern order.  ``explicit_uidgid``
    false means owners are stored as 0 (``--repeatable``).  ``order`` is
    ``index_order(root)`` when the caller already has it (the tree must not
    have changed since); otherwise it is computed on first use.
    """

    root: Node
    chunk_size: int
    compressor: Compressor
    digester: Digester
    blobs: list[BlobInfo] = field(default_factory=list)
    explicit_uidgid: bool = True
    prefetch: list[tuple[bytes, ...]] = field(default_factory=list)
    order: list[Indexed] | None = None

    def index_order(self) -> list[Indexed]:
        if self.order is None:
            self.order = index_order(self.root)
        return self.order
