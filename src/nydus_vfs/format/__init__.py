"""Sans-IO RAFS v5/v6 (EROFS) and data-blob on-disk formats.

* owns: decoding, validating and encoding every on-disk structure of a Nydus
  image (bootstrap, blob tables, ci headers/entries, ToC, section tar headers)
  and the read-only :class:`Bootstrap` view the filesystem serves from.
* does not own: any file or network I/O (callers pass bytes, memoryviews,
  mmaps or ``read_at`` callables), chunk decompression and caching (storage),
  building images (builder; it uses the ``to_bytes`` side of these classes).
* reference: ``reference/rafs-format.md``; field names follow EROFS / Nydus.
"""

from ._common import NoSuchInodeError, OnDisk, algorithms_from_flags, flags_from_algorithms
from .blob import (
    BatchContext,
    BlobChunkInfoV1,
    BlobChunkInfoV2,
    BlobCompressionContextHeader,
    BlobSection,
    BlobTail,
    TarHeader,
    TocEntry,
    TocEntryList,
    ZranContext,
    decode_ci_entries,
    split_blob_meta_file,
)
from .reader import Bootstrap, BootstrapV5, BootstrapV6, InodeInfo, blob_id_from_meta_path
from .types import (
    BlobFeatures,
    BlobIndex,
    BlobInfo,
    ChunkFlags,
    ChunkIndex,
    ChunkInfo,
    Cipher,
    Compressor,
    Digester,
    Inode,
    SuperFlags,
)
from .v5 import (
    InodeFlags,
    RafsV5BlobEntry,
    RafsV5BlobTable,
    RafsV5ChunkInfo,
    RafsV5ExtBlobEntry,
    RafsV5ExtBlobTable,
    RafsV5Inode,
    RafsV5InodeRecord,
    RafsV5InodeTable,
    RafsV5PrefetchTable,
    RafsV5SuperBlock,
    RafsV5Xattrs,
)
from .v6 import (
    RafsV6Blob,
    RafsV6Device,
    RafsV6Dirent,
    RafsV6DirentBlock,
    RafsV6InodeChunkAddr,
    RafsV6InodeCompact,
    RafsV6InodeExtended,
    RafsV6PrefetchTable,
    RafsV6SuperBlock,
    RafsV6SuperBlockExt,
    RafsV6Xattrs,
    chunk_format,
    decode_inode,
)

__all__ = [
    # reader
    "Bootstrap",
    "BootstrapV5",
    "BootstrapV6",
    "InodeInfo",
    "NoSuchInodeError",
    "blob_id_from_meta_path",
    # shared descriptors
    "Inode",
    "BlobIndex",
    "ChunkIndex",
    "Compressor",
    "Digester",
    "Cipher",
    "SuperFlags",
    "BlobFeatures",
    "ChunkFlags",
    "ChunkInfo",
    "BlobInfo",
    "InodeFlags",
    "OnDisk",
    "algorithms_from_flags",
    "flags_from_algorithms",
    # v5
    "RafsV5SuperBlock",
    "RafsV5InodeTable",
    "RafsV5PrefetchTable",
    "RafsV5BlobEntry",
    "RafsV5BlobTable",
    "RafsV5ExtBlobEntry",
    "RafsV5ExtBlobTable",
    "RafsV5Inode",
    "RafsV5InodeRecord",
    "RafsV5ChunkInfo",
    "RafsV5Xattrs",
    # v6
    "RafsV6SuperBlock",
    "RafsV6SuperBlockExt",
    "RafsV6Device",
    "RafsV6Blob",
    "RafsV6InodeCompact",
    "RafsV6InodeExtended",
    "RafsV6Dirent",
    "RafsV6DirentBlock",
    "RafsV6InodeChunkAddr",
    "RafsV6Xattrs",
    "RafsV6PrefetchTable",
    "decode_inode",
    "chunk_format",
    # blob
    "BlobCompressionContextHeader",
    "BlobChunkInfoV1",
    "BlobChunkInfoV2",
    "ZranContext",
    "BatchContext",
    "decode_ci_entries",
    "split_blob_meta_file",
    "TocEntry",
    "TocEntryList",
    "TarHeader",
    "BlobSection",
    "BlobTail",
]
