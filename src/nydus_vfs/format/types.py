"""Descriptor types shared by the format layer and the storage layer.

These are the *decoded* views of on-disk records that the rest of the program
passes around: which blob a chunk lives in, where its compressed bytes are, how
big it is once inflated, and what digest it must have.  The storage layer
imports them from here (storage depends on format's descriptors, never the
reverse, as in upstream nydus where rafs -> storage).

Encodings (reference/rafs-format.md §0.1, trap 3): the superblock stores the
algorithms as flag *bits*, the v6 blob table and ci header as enum *values*.
``Compressor``/``Digester`` are the enum values; ``SuperFlags`` holds the bits.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NewType

__all__ = [
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
]

Inode = NewType("Inode", int)
BlobIndex = NewType("BlobIndex", int)
ChunkIndex = NewType("ChunkIndex", int)


class Compressor(enum.IntEnum):
    """Compression algorithm, as the enum value used by v6 blob tables and ci headers."""

    NONE = 0
    LZ4_BLOCK = 1
    GZIP = 2
    ZSTD = 3

    @property
    def cli_name(self) -> str:
        return {0: "none", 1: "lz4_block", 2: "gzip", 3: "zstd"}[self.value]

    @classmethod
    def from_cli(cls, name: str) -> "Compressor":
        table = {"none": cls.NONE, "lz4_block": cls.LZ4_BLOCK, "gzip": cls.GZIP, "zstd": cls.ZSTD}
        try:
            return table[name.lower()]
        except KeyError:
            raise ValueError(f"unknown compressor {name!r} (expected one of {', '.join(table)})") from None


class Digester(enum.IntEnum):
    """Digest algorithm, as the enum value used by v6 blob tables (blake3 = 0!)."""

    BLAKE3 = 0
    SHA256 = 1

    @property
    def cli_name(self) -> str:
        return "blake3" if self is Digester.BLAKE3 else "sha256"

    @classmethod
    def from_cli(cls, name: str) -> "Digester":
        name = name.lower()
        if name == "blake3":
            return cls.BLAKE3
        if name == "sha256":
            return cls.SHA256
        raise ValueError(f"unknown digester {name!r} (expected blake3 or sha256)")


class Cipher(enum.IntEnum):
    NONE = 0
    AES128_XTS = 1
    AES256_XTS = 2
    AES256_GCM = 3


class SuperFlags(enum.IntFlag):
    """``RafsSuperFlags`` (u64) as stored in the v5 superblock and v6 ext superblock."""

    COMPRESSION_NONE = 0x1
    COMPRESSION_LZ4 = 0x2
    HASH_BLAKE3 = 0x4
    HASH_SHA256 = 0x8
    EXPLICIT_UID_GID = 0x10
    HAS_XATTR = 0x20
    COMPRESSION_GZIP = 0x40
    COMPRESSION_ZSTD = 0x80
    INLINED_CHUNK_DIGEST = 0x100
    TARTFS_MODE = 0x200
    ENCRYPTION_NONE = 0x0100_0000
    ENCRYPTION_ASE_128_XTS = 0x0200_0000
    PRESERVED_COMPAT_5 = 0x0400_0000
    PRESERVED_COMPAT_4 = 0x0800_0000
    PRESERVED_COMPAT_3 = 0x1000_0000
    PRESERVED_COMPAT_2 = 0x2000_0000
    PRESERVED_COMPAT_1 = 0x4000_0000
    PRESERVED_COMPAT_0 = 0x8000_0000


class BlobFeatures(enum.IntFlag):
    """``BlobFeatures`` (u32), rafs-format.md §3.2."""

    ALIGNED = 0x1
    INLINED_FS_META = 0x2
    CHUNK_INFO_V2 = 0x4
    ZRAN = 0x8
    SEPARATE = 0x10
    INLINED_CHUNK_DIGEST = 0x20
    TARFS = 0x40
    BATCH = 0x80
    ENCRYPTED = 0x100
    IS_CHUNKDICT_GENERATED = 0x200
    IS_SEPARATED_WITH_PREFETCH_FILES = 0x400
    EXTERNAL = 0x800
    HAS_TAR_HEADER = 0x1000_0000
    HAS_TOC = 0x2000_0000
    CAP_TAR_TOC = 0x4000_0000
    V5_NO_EXT_BLOB_TABLE = 0x8000_0000


class ChunkFlags(enum.IntFlag):
    """``BlobChunkFlags`` of a v5/v6 chunk record (rafs-format.md §1.5)."""

    COMPRESSED = 0x1
    HOLECHUNK = 0x2
    ENCRYPTED = 0x4
    BATCH = 0x8
    HAS_CRC32 = 0x10


@dataclass(frozen=True, slots=True)
class ChunkInfo:
    """Where one chunk of a file lives and what it must look like.

    ``compressed_offset``/``compressed_size`` locate the stored bytes in the blob
    file; ``uncompressed_offset`` is the chunk's place in the uncompressed blob
    (the cache file ``<id>.blob.data``); ``file_offset`` is where it starts in the
    file that references it.  ``digest`` is the digest of the *uncompressed* data
    under the image's digester.  ``index`` is the chunk's index in its blob.
    """

    digest: bytes
    blob_index: int
    index: int
    flags: int
    compressed_offset: int
    compressed_size: int
    uncompressed_offset: int
    uncompressed_size: int
    file_offset: int
    crc32: int = 0

    # ``int & IntFlag`` would go through the enum's slow __rand__: compare ints.
    @property
    def is_compressed(self) -> bool:
        return bool(self.flags & 0x1)

    @property
    def is_encrypted(self) -> bool:
        return bool(self.flags & 0x4)

    @property
    def has_crc32(self) -> bool:
        return bool(self.flags & 0x10)


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """One entry of a bootstrap's blob table, merged from every place that describes it.

    For v5 the compressor/digester come from the superblock flags; the sizes and
    features from the extended blob table when present (else 0 and
    ``V5_NO_EXT_BLOB_TABLE``).  For v6 everything comes from the ``RafsV6Blob``
    entry.  ``blob_id`` may be replaced after loading (inlined-meta images carry a
    placeholder id; see rafs-format.md §3.8) with :meth:`with_blob_id`.
    """

    index: int
    blob_id: str
    chunk_count: int
    chunk_size: int
    compressor: Compressor
    digester: Digester
    features: int
    compressed_size: int
    uncompressed_size: int
    readahead_offset: int = 0
    readahead_size: int = 0
    ci_compressor: Compressor = Compressor.NONE
    ci_offset: int = 0
    ci_compressed_size: int = 0
    ci_uncompressed_size: int = 0
    blob_toc_size: int = 0
    blob_toc_digest: bytes = b""
    blob_meta_digest: bytes = b""
    blob_meta_size: int = 0
    cipher: Cipher = Cipher.NONE
    cipher_iv: bytes = b""

    def with_blob_id(self, blob_id: str) -> "BlobInfo":
        from dataclasses import replace

        return replace(self, blob_id=blob_id)

    @property
    def has_inlined_meta(self) -> bool:
        return bool(self.features & BlobFeatures.INLINED_FS_META)
