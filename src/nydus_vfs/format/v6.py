"""RAFS v6 (EROFS-compatible) on-disk structures (reference/rafs-format.md §2), sans-IO.

File layout written by the current builder::

    abs 0      1024 zero bytes
    abs 1024   RafsV6SuperBlock (EROFS superblock, 128)
    abs 1152   RafsV6SuperBlockExt (256)
    abs 1408   RafsV6Device * nblobs (128 each; s_devt_slotoff = 11)
    B          RafsV6Blob * nblobs (256 each), then the prefetch table (u32 nids)
    M          one all-zero block (so the root nid is never 0), then inodes on
               32-byte slots: inode, inline xattrs, then chunk indexes (regular
               files) or the inline directory/symlink tail
    C          chunk table: RafsV5ChunkInfo * n

An inode lives at ``meta_blkaddr * block_size + nid * 32``; Nydus uses the nid
as the inode number.  Field names are EROFS's.
"""

from __future__ import annotations

import stat
from typing import Any, Iterable, Union

from ..errors import FormatError
from ._common import (
    MAX_CHUNK_SIZE,
    MAX_NAME_LEN,
    U32,
    EntryList,
    OnDisk,
    XattrPairs,
    check_super_flags,
    decode_blob_id,
    encode_blob_id,
    layout_slots,
    need,
)
from .types import BlobFeatures, BlobInfo, Cipher, Compressor, Digester, SuperFlags
from .v5 import RafsV5PrefetchTable

__all__ = [
    "EROFS_SUPER_OFFSET",
    "EROFS_SUPER_MAGIC_V1",
    "EROFS_FEATURE_COMPAT_RAFS_V6",
    "EROFS_FEATURE_INCOMPAT_CHUNKED_FILE",
    "EROFS_FEATURE_INCOMPAT_DEVICE_TABLE",
    "EROFS_DEVTABLE_OFFSET",
    "EROFS_INODE_SLOT_SIZE",
    "EROFS_INODE_FLAT_PLAIN",
    "EROFS_INODE_FLAT_INLINE",
    "EROFS_INODE_CHUNK_BASED",
    "EROFS_CHUNK_FORMAT_INDEXES",
    "EROFS_NULL_ADDR",
    "EROFS_FT",
    "DT_FROM_EROFS_FT",
    "XATTR_INDEXES",
    "RafsV6SuperBlock",
    "RafsV6SuperBlockExt",
    "RafsV6Device",
    "RafsV6Blob",
    "RafsV6InodeCompact",
    "RafsV6InodeExtended",
    "RafsV6Inode",
    "decode_inode",
    "RafsV6Dirent",
    "RafsV6DirentBlock",
    "RafsV6InodeChunkAddr",
    "RafsV6Xattrs",
    "RafsV6PrefetchTable",
    "chunk_format",
]

EROFS_SUPER_OFFSET = 1024
EROFS_SUPER_MAGIC_V1 = 0xE0F5E1E2
EROFS_FEATURE_COMPAT_RAFS_V6 = 0x4000_0000
EROFS_FEATURE_INCOMPAT_CHUNKED_FILE = 0x4
EROFS_FEATURE_INCOMPAT_DEVICE_TABLE = 0x8
EROFS_DEVTABLE_OFFSET = 1408
EROFS_INODE_SLOT_SIZE = 32
EROFS_INODE_FLAT_PLAIN = 0
EROFS_INODE_FLAT_INLINE = 2
EROFS_INODE_CHUNK_BASED = 4
EROFS_CHUNK_FORMAT_INDEXES = 0x20
#: A chunk index with this block address is a hole (Nydus never writes one).
EROFS_NULL_ADDR = 0xFFFF_FFFF
_BLOCK_BITS = {12: 4096, 9: 512}
_BLOB_MAX_UNCOMPRESSED = 1 << 44
_BLOB_MAX_COMPRESSED = 1 << 40
_MAX_CHUNKS_PER_BLOB = 1 << 24
_XATTR_HEADER_SIZE = 12
_XATTR_ENTRY_SIZE = 4

#: EROFS dirent ``file_type`` values.
EROFS_FT = {
    "UNKNOWN": 0, "REG_FILE": 1, "DIR": 2, "CHRDEV": 3, "BLKDEV": 4, "FIFO": 5, "SOCK": 6, "SYMLINK": 7,
}
#: EROFS file_type -> ``DT_*`` (as ``S_IFMT(mode) >> 12``); out-of-range types map to DT_UNKNOWN (0).
DT_FROM_EROFS_FT = (0, 8, 4, 2, 6, 1, 12, 10)
_EROFS_FT_FROM_IFMT = {stat.S_IFREG: 1, stat.S_IFDIR: 2, stat.S_IFCHR: 3, stat.S_IFBLK: 4,
                       stat.S_IFIFO: 5, stat.S_IFSOCK: 6, stat.S_IFLNK: 7}

#: Inline xattr name index -> prefix; the first matching prefix wins when encoding.
XATTR_INDEXES = (
    (1, b"user."),
    (2, b"system.posix_acl_access"),
    (3, b"system.posix_acl_default"),
    (4, b"trusted."),
    (6, b"security."),
)
_XATTR_PREFIX_BY_INDEX = dict(XATTR_INDEXES)


def chunk_format(chunk_size: int, blkszbits: int = 12) -> int:
    """The ``i_u`` of a chunk-based inode whose chunks are ``chunk_size`` bytes."""
    bits = chunk_size.bit_length() - 1
    if chunk_size <= 0 or chunk_size & (chunk_size - 1) or bits < blkszbits or bits - blkszbits > 0x1F:
        raise FormatError("RafsV6Inode", "i_u", chunk_size, "chunk size must be a power of two >= block size")
    return EROFS_CHUNK_FORMAT_INDEXES | (bits - blkszbits)


class RafsV6SuperBlock(OnDisk):
    """The EROFS superblock at absolute offset 1024 (128 bytes, rafs-format.md §2.2).

    ``from_bytes(buf, EROFS_SUPER_OFFSET)`` decodes it from a whole bootstrap.
    """

    _LAYOUT = (
        ("s_magic", "I"),
        ("s_checksum", "I"),
        ("s_feature_compat", "I"),
        ("s_blkszbits", "B"),
        ("s_extslots", "B"),
        ("s_root_nid", "H"),
        ("s_inos", "Q"),
        ("s_build_time", "Q"),
        ("s_build_time_nsec", "I"),
        ("s_blocks", "I"),
        ("s_meta_blkaddr", "I"),
        ("s_xattr_blkaddr", "I"),
        ("s_uuid", "16s"),
        ("s_volume_name", "16s"),
        ("s_feature_incompat", "I"),
        ("s_u", "H"),
        ("s_extra_devices", "H"),
        ("s_devt_slotoff", "H"),
        ("s_reserved", "38s"),
    )
    __slots__ = layout_slots(_LAYOUT)
    _INIT = {
        "s_magic": EROFS_SUPER_MAGIC_V1,
        "s_feature_compat": EROFS_FEATURE_COMPAT_RAFS_V6,
        "s_blkszbits": 12,
        "s_feature_incompat": EROFS_FEATURE_INCOMPAT_CHUNKED_FILE | EROFS_FEATURE_INCOMPAT_DEVICE_TABLE,
        "s_devt_slotoff": EROFS_DEVTABLE_OFFSET // 128,
    }

    @staticmethod
    def probe(buf: Any) -> bool:
        """True when ``buf`` has the EROFS magic at offset 1024."""
        return len(buf) >= EROFS_SUPER_OFFSET + 4 and \
            U32.unpack_from(buf, EROFS_SUPER_OFFSET)[0] == EROFS_SUPER_MAGIC_V1

    @property
    def block_size(self) -> int:
        """4096, or 512 for tar-tarfs images (anything else is refused by ``validate``)."""
        return _BLOCK_BITS.get(self.s_blkszbits, 4096)

    def validate(self, meta_size: int) -> None:
        """The loader's (strict) checks for a bootstrap of ``meta_size`` bytes (rafs-format.md §2.2, trap 7)."""
        n = self.NAME
        if self.s_magic != EROFS_SUPER_MAGIC_V1:
            raise FormatError(n, "s_magic", self.s_magic, f"expected {EROFS_SUPER_MAGIC_V1:#x}")
        if self.s_blkszbits not in _BLOCK_BITS:
            raise FormatError(n, "s_blkszbits", self.s_blkszbits, "block size bits must be 12 or 9")
        bs = self.block_size
        if meta_size < 4096 or meta_size % bs:
            raise FormatError(n, "meta_size", meta_size, f"must be >= 4096 and a multiple of {bs}")
        if self.s_meta_blkaddr * bs > meta_size:
            raise FormatError(n, "s_meta_blkaddr", self.s_meta_blkaddr, "metadata starts past the end of the file")
        if self.s_checksum != 0:
            raise FormatError(n, "s_checksum", self.s_checksum, "must be 0 (Nydus never sets SB_CHKSUM)")
        if self.s_extslots != 0:
            raise FormatError(n, "s_extslots", self.s_extslots, "must be 0")
        if self.s_inos == 0:
            raise FormatError(n, "s_inos", 0, "an image has at least the root inode")
        if self.s_u != 0:
            raise FormatError(n, "s_u", self.s_u, "compression configuration must be 0")
        if self.s_xattr_blkaddr != 0:
            raise FormatError(n, "s_xattr_blkaddr", self.s_xattr_blkaddr, "shared xattrs are not supported")
        if self.s_extra_devices == 0 and self.s_blocks not in (0, 4096):
            raise FormatError(n, "s_blocks", self.s_blocks, "an image without blobs must have 0 (or 4096) blocks")
        if self.s_devt_slotoff * 128 != EROFS_DEVTABLE_OFFSET:
            raise FormatError(n, "s_devt_slotoff", self.s_devt_slotoff, "device table must start at 1408 (slot 11)")
        if EROFS_DEVTABLE_OFFSET + 128 * self.s_extra_devices > meta_size:
            raise FormatError(n, "s_extra_devices", self.s_extra_devices, "device table runs past the end")
        wanted = EROFS_FEATURE_INCOMPAT_CHUNKED_FILE | EROFS_FEATURE_INCOMPAT_DEVICE_TABLE
        if self.s_feature_incompat != wanted:
            raise FormatError(n, "s_feature_incompat", self.s_feature_incompat, f"must be exactly {wanted:#x}")
        if not self.s_feature_compat & EROFS_FEATURE_COMPAT_RAFS_V6:
            raise FormatError(n, "s_feature_compat", self.s_feature_compat,
                              f"RAFS v6 bit {EROFS_FEATURE_COMPAT_RAFS_V6:#x} is missing")
        if self.s_root_nid == 0:
            raise FormatError(n, "s_root_nid", 0, "root nid 0 is reserved (the first meta block stays empty)")


def _count_bits(value: int) -> int:
    return bin(value).count("1")


class RafsV6SuperBlockExt(OnDisk):
    """The Nydus extended superblock at absolute offset 1152 (256 bytes, rafs-format.md §2.3)."""

    _LAYOUT = (
        ("s_flags", "Q"),
        ("s_blob_table_offset", "Q"),
        ("s_blob_table_size", "I"),
        ("s_chunk_size", "I"),
        ("s_chunk_table_offset", "Q"),
        ("s_chunk_table_size", "Q"),
        ("s_prefetch_table_offset", "Q"),
        ("s_prefetch_table_size", "I"),
        ("s_padding", "I"),
        ("s_reserved", "200s"),
    )
    __slots__ = layout_slots(_LAYOUT)
    OFFSET = EROFS_SUPER_OFFSET + RafsV6SuperBlock.SIZE

    def validate(self, meta_size: int, devslot_end: int) -> None:
        """Loader checks; ``devslot_end`` is where the device table ends (1408 + 128 * n)."""
        n = self.NAME
        check_super_flags(self.s_flags, n)
        comp = self.s_flags & (SuperFlags.COMPRESSION_NONE | SuperFlags.COMPRESSION_LZ4
                               | SuperFlags.COMPRESSION_GZIP | SuperFlags.COMPRESSION_ZSTD)
        if _count_bits(comp) != 1:
            raise FormatError(n, "s_flags", self.s_flags, "exactly one compression bit must be set")
        if _count_bits(self.s_flags & (SuperFlags.HASH_BLAKE3 | SuperFlags.HASH_SHA256)) != 1:
            raise FormatError(n, "s_flags", self.s_flags, "exactly one hash bit must be set")
        cs = self.s_chunk_size
        if cs & (cs - 1) or not 0x1000 <= cs <= MAX_CHUNK_SIZE:
            raise FormatError(n, "s_chunk_size", cs, "chunk size must be a power of two in 4 KiB..16 MiB")
        off, size = self.s_blob_table_offset, self.s_blob_table_size
        if off % 4096 or off < 4096 or off < devslot_end or size % RafsV6Blob.SIZE or off + size > meta_size:
            raise FormatError(n, "s_blob_table_offset", off,
                              f"blob table ({size} bytes) must be 4 KiB aligned, after the device table, "
                              "a multiple of 256 bytes and inside the file")
        blob_range = (off, size)
        chunk_range = (0, 0)
        if self.s_chunk_table_size:
            c_off, c_size = self.s_chunk_table_offset, self.s_chunk_table_size
            if c_off % 4096 or c_off < 4096 or c_off < devslot_end or c_size % 80 or c_off + c_size > meta_size:
                raise FormatError(n, "s_chunk_table_offset", c_off,
                                  f"chunk table ({c_size} bytes) must be 4 KiB aligned, a multiple of 80 bytes "
                                  "and inside the file")
            if _intersects(blob_range, (c_off, c_size)):
                raise FormatError(n, "s_chunk_table_offset", c_off, "chunk table overlaps the blob table")
            chunk_range = (c_off, c_size)
        if self.s_prefetch_table_size and self.s_prefetch_table_offset:
            p_off, p_size = self.s_prefetch_table_offset, self.s_prefetch_table_size
            if p_off < 4096 or p_size % 4 or p_off < devslot_end or p_off + p_size > meta_size:
                raise FormatError(n, "s_prefetch_table_offset", p_off,
                                  f"prefetch table ({p_size} bytes) must be after the device table, "
                                  "a multiple of 4 bytes and inside the file")
            if _intersects(blob_range, (p_off, p_size)) or _intersects(chunk_range, (p_off, p_size)):
                raise FormatError(n, "s_prefetch_table_offset", p_off, "prefetch table overlaps another table")


def _intersects(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[1] > 0 and b[1] > 0 and a[0] < b[0] + b[1] and b[0] < a[0] + a[1]


class RafsV6Device(OnDisk):
    """An EROFS device slot (128 bytes, rafs-format.md §2.4): one per blob, device id = index + 1."""

    _LAYOUT = (
        ("blob_id", "64s"),
        ("blocks", "I"),
        ("mapped_blkaddr", "I"),
        ("reserved", "56s"),
    )
    __slots__ = layout_slots(_LAYOUT)

    @property
    def blob_id_str(self) -> str:
        return decode_blob_id(self.blob_id, self.NAME)

    def validate(self, index: int = 0) -> None:
        decode_blob_id(self.blob_id, self.NAME, f"[{index}].blob_id")
        if self.blocks == 0:
            raise FormatError(self.NAME, f"[{index}].blocks", 0, "a device has at least one block")


class RafsV6Blob(OnDisk):
    """A v6 blob table entry (256 bytes, rafs-format.md §2.5)."""

    _LAYOUT = (
        ("blob_id", "64s"),
        ("blob_index", "I"),
        ("chunk_size", "I"),
        ("chunk_count", "I"),
        ("compression_algo", "I"),
        ("digest_algo", "I"),
        ("features", "I"),
        ("compressed_size", "Q"),
        ("uncompressed_size", "Q"),
        ("blob_toc_size", "I"),
        ("ci_compressor", "I"),
        ("ci_offset", "Q"),
        ("ci_compressed_size", "Q"),
        ("ci_uncompressed_size", "Q"),
        ("blob_toc_digest", "32s"),
        ("blob_meta_digest", "32s"),
        ("blob_meta_size", "Q"),
        ("cipher_iv", "8s"),
        ("cipher_algo", "I"),
        ("reserved", "36s"),
    )
    __slots__ = layout_slots(_LAYOUT)

    def validate(self, index: int, chunk_size: int, flags: int) -> None:
        """Loader checks for entry ``index`` of an image with this chunk size and flags."""
        n = f"{self.NAME}[{index}]"
        decode_blob_id(self.blob_id, n)
        if self.blob_index != index:
            raise FormatError(n, "blob_index", self.blob_index, f"must equal the entry position {index}")
        cs = self.chunk_size
        if cs & (cs - 1) or not 0x1000 <= cs <= MAX_CHUNK_SIZE or cs != chunk_size:
            raise FormatError(n, "chunk_size", cs, f"must equal the superblock chunk size {chunk_size:#x}")
        if self.chunk_count > _MAX_CHUNKS_PER_BLOB:
            raise FormatError(n, "chunk_count", self.chunk_count, "more than 2^24 chunks")
        for field, enum_type in (("compression_algo", Compressor), ("ci_compressor", Compressor),
                                 ("digest_algo", Digester), ("cipher_algo", Cipher)):
            value = getattr(self, field)
            if value not in enum_type._value2member_map_:
                raise FormatError(n, field, value, f"unknown {enum_type.__name__} value")
        if self.uncompressed_size > _BLOB_MAX_UNCOMPRESSED:
            raise FormatError(n, "uncompressed_size", self.uncompressed_size, "larger than 2^44")
        if self.compressed_size > _BLOB_MAX_COMPRESSED:
            raise FormatError(n, "compressed_size", self.compressed_size, "larger than 2^40")
        feat = self.features
        if feat & 0xF000 or feat & BlobFeatures.V5_NO_EXT_BLOB_TABLE:
            raise FormatError(n, "features", feat, "unknown incompatible or internal-only feature bits")
        tarfs = bool(flags & SuperFlags.TARTFS_MODE)
        aligned = bool(feat & BlobFeatures.ALIGNED)
        if not aligned and not tarfs:
            raise FormatError(n, "features", feat, "ALIGNED must be set (except in tarfs mode)")
        if aligned and tarfs:
            raise FormatError(n, "features", feat, "ALIGNED must not be set in tarfs mode")
        if self.ci_compressed_size > self.ci_uncompressed_size:
            raise FormatError(n, "ci_compressed_size", self.ci_compressed_size,
                              f"larger than ci_uncompressed_size {self.ci_uncompressed_size:#x}")
        count = self.chunk_count
        special = feat & (BlobFeatures.BATCH | BlobFeatures.ZRAN | BlobFeatures.ENCRYPTED)
        ci = self.ci_uncompressed_size
        if feat & BlobFeatures.CHUNK_INFO_V2:
            if (ci < 24 * count) if special else (ci != 24 * count):
                raise FormatError(n, "ci_uncompressed_size", ci, f"inconsistent with {count} v2 ci entries")
        elif special:
            raise FormatError(n, "features", feat, "BATCH/ZRAN/ENCRYPTED need CHUNK_INFO_V2")
        elif not feat & BlobFeatures.IS_CHUNKDICT_GENERATED and not tarfs and ci != 16 * count:
            raise FormatError(n, "ci_uncompressed_size", ci, f"inconsistent with {count} v1 ci entries")

    def to_blob_info(self) -> BlobInfo:
        """The shared descriptor; raises FormatError for enum values it cannot name."""
        n = f"{self.NAME}[{self.blob_index}]"
        try:
            return BlobInfo(
                index=self.blob_index,
                blob_id=decode_blob_id(self.blob_id, n),
                compressor=Compressor(self.compression_algo),
                digester=Digester(self.digest_algo),
                ci_compressor=Compressor(self.ci_compressor),
                blob_toc_digest=self.blob_toc_digest,
                blob_meta_digest=self.blob_meta_digest,
                cipher=Cipher(self.cipher_algo),
                cipher_iv=self.cipher_iv,
                **{name: getattr(self, name) for name in _BLOB_INFO_SAME},
            )
        except ValueError as exc:
            raise FormatError(n, "algorithm", None, str(exc)) from None

    @classmethod
    def from_blob_info(cls, blob: BlobInfo) -> "RafsV6Blob":
        """Encode a descriptor (the builder's direction)."""
        return cls(
            blob_id=encode_blob_id(blob.blob_id, 64, cls.NAME),
            blob_index=blob.index,
            compression_algo=int(blob.compressor),
            digest_algo=int(blob.digester),
            ci_compressor=int(blob.ci_compressor),
            blob_toc_digest=blob.blob_toc_digest.ljust(32, b"\0"),
            blob_meta_digest=blob.blob_meta_digest.ljust(32, b"\0"),
            cipher_iv=blob.cipher_iv.ljust(8, b"\0"),
            cipher_algo=int(blob.cipher),
            **{name: getattr(blob, name) for name in _BLOB_INFO_SAME},
        )


#: The integer fields ``RafsV6Blob`` and ``BlobInfo`` share under the same name;
#: both conversions copy them as they are (the others are renamed or re-typed).
_BLOB_INFO_SAME = ("chunk_count", "chunk_size", "features", "compressed_size", "uncompressed_size",
                   "blob_toc_size", "ci_offset", "ci_compressed_size", "ci_uncompressed_size", "blob_meta_size")


class _V6InodeMixin:
    """What compact and extended inodes have in common."""

    __slots__ = ()
    i_format: int
    i_xattr_icount: int
    i_mode: int

    @property
    def is_extended(self) -> bool:
        return bool(self.i_format & 1)

    @property
    def layout(self) -> int:
        """Data layout: FLAT_PLAIN (0), FLAT_INLINE (2) or CHUNK_BASED (4)."""
        return (self.i_format >> 1) & 0x7

    @property
    def xattr_size(self) -> int:
        """Bytes of inline xattrs following the inode (0 when ``i_xattr_icount`` is 0)."""
        icount = self.i_xattr_icount
        return _XATTR_HEADER_SIZE + (icount - 1) * _XATTR_ENTRY_SIZE if icount else 0

    def validate(self) -> None:
        n = self.NAME  # type: ignore[attr-defined]
        if self.i_format & ~0xF:
            raise FormatError(n, "i_format", self.i_format, "bits above the data layout are not supported")
        if self.layout not in (EROFS_INODE_FLAT_PLAIN, EROFS_INODE_FLAT_INLINE, EROFS_INODE_CHUNK_BASED):
            raise FormatError(n, "i_format", self.i_format, f"data layout {self.layout} (compressed) is not supported")
        if stat.S_IFMT(self.i_mode) not in _EROFS_FT_FROM_IFMT:
            raise FormatError(n, "i_mode", self.i_mode, "unknown file type")
        if self.i_nlink == 0:  # type: ignore[attr-defined]
            raise FormatError(n, "i_nlink", 0, "inode has no links")
        if stat.S_ISDIR(self.i_mode) or stat.S_ISLNK(self.i_mode):
            if self.layout == EROFS_INODE_CHUNK_BASED:
                raise FormatError(n, "i_format", self.i_format, "directories and symlinks must be flat")


class RafsV6InodeCompact(_V6InodeMixin, OnDisk):
    """EROFS compact inode (32 bytes): no mtime, 16-bit uid/gid/nlink, 32-bit size."""

    _LAYOUT = (
        ("i_format", "H"),
        ("i_xattr_icount", "H"),
        ("i_mode", "H"),
        ("i_nlink", "H"),
        ("i_size", "I"),
        ("i_mtime", "I"),
        ("i_u", "I"),
        ("i_ino", "I"),
        ("i_uid", "H"),
        ("i_gid", "H"),
        ("i_reserved", "4s"),
    )
    __slots__ = layout_slots(_LAYOUT)


class RafsV6InodeExtended(_V6InodeMixin, OnDisk):
    """EROFS extended inode (64 bytes), the form the current builder always writes."""

    _LAYOUT = (
        ("i_format", "H"),
        ("i_xattr_icount", "H"),
        ("i_mode", "H"),
        ("i_reserved", "H"),
        ("i_size", "Q"),
        ("i_u", "I"),
        ("i_ino", "I"),
        ("i_uid", "I"),
        ("i_gid", "I"),
        ("i_mtime", "Q"),
        ("i_mtime_nsec", "I"),
        ("i_nlink", "I"),
        ("i_reserved2", "16s"),
    )
    __slots__ = layout_slots(_LAYOUT)
    _INIT = {"i_format": 1}


RafsV6Inode = Union[RafsV6InodeCompact, RafsV6InodeExtended]


def decode_inode(buf: Any, offset: int) -> RafsV6Inode:
    """Decode the compact or extended inode at ``offset`` (chosen by ``i_format`` bit 0)."""
    need(buf, offset, 2, "RafsV6Inode")
    if buf[offset] & 1:
        return RafsV6InodeExtended.from_bytes(buf, offset)
    return RafsV6InodeCompact.from_bytes(buf, offset)


class RafsV6Dirent(OnDisk):
    """EROFS directory entry (12 bytes): ``nid``, ``nameoff`` in the block, ``file_type``."""

    _LAYOUT = (
        ("e_nid", "Q"),
        ("e_nameoff", "H"),
        ("e_file_type", "B"),
        ("e_reserved", "B"),
    )
    __slots__ = layout_slots(_LAYOUT)


class RafsV6DirentBlock(EntryList):
    """One directory block: all dirents, then all names without separators (rafs-format.md §2.7).

    ``entries`` is a list of ``(name, nid, file_type)`` in on-disk order.  The
    number of entries is ``dirent[0].nameoff / 12``; a name ends at the next
    entry's ``nameoff``, the last one at the end of the block (or of the
    directory) or at the first NUL.
    """

    __slots__ = ()
    NAME = "RafsV6DirentBlock"

    def __init__(self, entries: Iterable[tuple[bytes, int, int]] = ()) -> None:
        self.entries = [(bytes(name), nid, ft) for name, nid, ft in entries]

    @classmethod
    def from_bytes(cls, buf: Any, offset: int = 0, length: int | None = None) -> "RafsV6DirentBlock":
        """Decode the block of ``length`` bytes at ``offset`` (default: to the end of ``buf``)."""
        if length is None:
            length = len(buf) - offset
        n = cls.NAME
        need(buf, offset, length, n, "length")
        count = cls.entry_count(buf, offset, length)
        entries = []
        for i in range(count):
            nid, nameoff, ft, _ = RafsV6Dirent._STRUCT.unpack_from(buf, offset + 12 * i)
            end = RafsV6Dirent._STRUCT.unpack_from(buf, offset + 12 * i + 12)[1] if i + 1 < count else length
            entries.append((cls._name(buf, offset, length, count, i, nameoff, end), nid, ft))
        return cls(entries)

    @classmethod
    def entry_count(cls, buf: Any, offset: int, length: int) -> int:
        """Entries in the block, from the first ``nameoff``; refuses impossible values."""
        if length < 12:
            raise FormatError(cls.NAME, "length", length, "a directory block holds at least one dirent")
        nameoff0 = RafsV6Dirent._STRUCT.unpack_from(buf, offset)[1]
        if nameoff0 < 12 or nameoff0 % 12 or nameoff0 >= length:
            raise FormatError(cls.NAME, "e_nameoff", nameoff0,
                              f"first name offset must be a non-zero multiple of 12 below {length}")
        return nameoff0 // 12

    @classmethod
    def _name(cls, buf: Any, offset: int, length: int, count: int, i: int, start: int, end: int) -> bytes:
        """Name ``i`` spans ``[start, end)`` of the block; the last one stops at NUL."""
        if not count * 12 <= start < end <= length:
            raise FormatError(cls.NAME, f"[{i}].e_nameoff", start,
                              f"name [{start}, {end}) is not inside the name area [{count * 12}, {length})")
        raw = bytes(buf[offset + start:offset + end])
        if i + 1 == count:
            nul = raw.find(b"\0")
            if nul >= 0:
                raw = raw[:nul]
        if not raw or len(raw) > MAX_NAME_LEN:
            raise FormatError(cls.NAME, f"[{i}].name", raw, "name must be 1..255 bytes")
        return raw

    def validate(self) -> None:
        """Names are valid path components in strictly increasing raw-byte order (lookup bisects them)."""
        previous = None
        for i, (name, _, ft) in enumerate(self.entries):
            if not name or len(name) > MAX_NAME_LEN or b"/" in name or b"\0" in name:
                raise FormatError(self.NAME, f"[{i}].name", name, "not a valid file name")
            if ft > 7:
                raise FormatError(self.NAME, f"[{i}].e_file_type", ft, "unknown EROFS file type")
            if previous is not None and name <= previous:
                raise FormatError(self.NAME, f"[{i}].name", name, f"not sorted after {previous!r}")
            previous = name

    @property
    def size(self) -> int:
        """Bytes the block uses (dirents and names, no padding)."""
        return sum(12 + len(name) for name, _, _ in self.entries)

    def to_bytes(self, pad_to: int | None = None) -> bytes:
        """Encode; with ``pad_to`` the block is zero-padded to that many bytes."""
        n = self.NAME
        if not self.entries:
            raise FormatError(n, "entries", 0, "a directory block holds at least one dirent")
        nameoff = 12 * len(self.entries)
        heads, names = [], []
        for i, (name, nid, ft) in enumerate(self.entries):
            if not name or len(name) > MAX_NAME_LEN:
                raise FormatError(n, f"[{i}].name", name, "name must be 1..255 bytes")
            if nameoff > 0xFFFF:
                raise FormatError(n, f"[{i}].e_nameoff", nameoff, "block is too large")
            heads.append(RafsV6Dirent._STRUCT.pack(nid, nameoff, ft, 0))
            names.append(name)
            nameoff += len(name)
        data = b"".join(heads) + b"".join(names)
        if pad_to is not None:
            if len(data) > pad_to:
                raise FormatError(n, "size", len(data), f"does not fit in {pad_to} bytes")
            data += b"\0" * (pad_to - len(data))
        return data

    @classmethod
    def pack(cls, entries: Iterable[tuple[bytes, int, int]], block_size: int = 4096) -> list["RafsV6DirentBlock"]:
        """Split name-sorted entries into blocks; an entry never crosses a block.

        The directory's ``i_size`` is then ``(len(blocks) - 1) * block_size +
        blocks[-1].size``.
        """
        blocks: list[RafsV6DirentBlock] = []
        cur: list[tuple[bytes, int, int]] = []
        used = 0
        for entry in entries:
            need_bytes = 12 + len(entry[0])
            if need_bytes > block_size:
                raise FormatError(cls.NAME, "name", entry[0], f"entry does not fit in a {block_size}-byte block")
            if used + need_bytes > block_size:
                blocks.append(cls(cur))
                cur, used = [], 0
            cur.append(entry)
            used += need_bytes
        if cur:
            blocks.append(cls(cur))
        return blocks

    @staticmethod
    def file_type(mode: int) -> int:
        """The EROFS ``file_type`` for an ``st_mode``."""
        return _EROFS_FT_FROM_IFMT.get(stat.S_IFMT(mode), 0)


class RafsV6InodeChunkAddr(OnDisk):
    """A chunk index of a chunk-based inode (8 bytes, rafs-format.md §2.8, trap 2).

    ``c_blob_addr_hi`` low byte = blob index + 1 (the EROFS device id), high byte
    = bits 16..23 of the ci index; ``c_blob_addr_lo`` = ci index bits 0..15;
    ``c_blk_addr`` = uncompressed offset / block size.
    """

    _LAYOUT = (
        ("c_blob_addr_lo", "H"),
        ("c_blob_addr_hi", "H"),
        ("c_blk_addr", "I"),
    )
    __slots__ = layout_slots(_LAYOUT)

    @classmethod
    def new(cls, blob_index: int, ci_index: int, blkaddr: int) -> "RafsV6InodeChunkAddr":
        if not 0 <= blob_index < 0xFF:
            raise FormatError(cls.NAME, "blob_index", blob_index, "must be 0..254")
        if not 0 <= ci_index <= 0xFF_FFFF:
            raise FormatError(cls.NAME, "ci_index", ci_index, "must fit in 24 bits")
        return cls(c_blob_addr_lo=ci_index & 0xFFFF,
                   c_blob_addr_hi=((ci_index >> 16) << 8) | (blob_index + 1),
                   c_blk_addr=blkaddr)

    @property
    def is_hole(self) -> bool:
        return self.c_blk_addr == EROFS_NULL_ADDR

    @property
    def blob_index(self) -> int:
        """0-based blob index; device id 0 (the bootstrap itself) is refused."""
        dev = self.c_blob_addr_hi & 0xFF
        if dev == 0:
            raise FormatError(self.NAME, "c_blob_addr_hi", self.c_blob_addr_hi, "device id 0 is not a blob")
        return dev - 1

    @property
    def blob_ci_index(self) -> int:
        return ((self.c_blob_addr_hi >> 8) << 16) | self.c_blob_addr_lo

    @property
    def block_addr(self) -> int:
        return self.c_blk_addr

    def validate(self, blob_count: int) -> None:
        if not self.is_hole and self.blob_index >= blob_count:
            raise FormatError(self.NAME, "c_blob_addr_hi", self.c_blob_addr_hi,
                              f"blob index {self.blob_index} but the image has {blob_count} blob(s)")


class RafsV6Xattrs(XattrPairs):
    """Inline xattrs of a v6 inode (rafs-format.md §2.10).

    A 12-byte ``erofs_xattr_ibody_header`` (shared count must be 0), then
    entries ``u8 e_name_len, u8 e_name_index, u16 e_value_size, suffix, value``
    each padded to 4 bytes.  ``pairs`` holds full names (``b"user.foo"``) in
    on-disk order.
    """

    __slots__ = ("header",)
    NAME = "RafsV6Xattrs"

    def __init__(self, pairs: Iterable[tuple[bytes, bytes]] = (), header: bytes = b"\0" * 12) -> None:
        super().__init__(pairs)
        self.header = bytes(header)

    @classmethod
    def from_bytes(cls, buf: Any, offset: int = 0, icount: int = 0) -> "RafsV6Xattrs":
        """Decode the inline xattrs of an inode with ``i_xattr_icount = icount``."""
        n = cls.NAME
        if icount == 0:
            return cls()
        size = _XATTR_HEADER_SIZE + (icount - 1) * _XATTR_ENTRY_SIZE
        need(buf, offset, size, n, "i_xattr_icount")
        header = bytes(buf[offset:offset + _XATTR_HEADER_SIZE])
        if header[4] != 0:
            raise FormatError(n, "h_shared_count", header[4], "shared xattrs are not supported")
        pairs = []
        pos = offset + _XATTR_HEADER_SIZE
        remaining = size - _XATTR_HEADER_SIZE
        while remaining > 0:
            if remaining < _XATTR_ENTRY_SIZE:
                raise FormatError(n, "entries", remaining, "truncated xattr entry")
            name_len, index, value_size = buf[pos], buf[pos + 1], int.from_bytes(buf[pos + 2:pos + 4], "little")
            entry = _XATTR_ENTRY_SIZE + name_len + value_size
            if entry > remaining:
                raise FormatError(n, f"pairs[{len(pairs)}].e_name_len", name_len,
                                  f"entry of {entry} bytes overruns the {remaining} bytes left")
            prefix = _XATTR_PREFIX_BY_INDEX.get(index)
            if prefix is None:
                raise FormatError(n, f"pairs[{len(pairs)}].e_name_index", index, "unknown xattr name index")
            start = pos + _XATTR_ENTRY_SIZE
            name = prefix + bytes(buf[start:start + name_len])
            value = bytes(buf[start + name_len:start + name_len + value_size])
            pairs.append((name, value))
            step = (entry + 3) & ~3
            pos += step
            remaining -= step
        return cls(pairs, header)

    @staticmethod
    def split_name(name: bytes) -> tuple[int, bytes]:
        """``(e_name_index, suffix)`` for a full xattr name (first matching prefix wins)."""
        for index, prefix in XATTR_INDEXES:
            if name.startswith(prefix):
                return index, name[len(prefix):]
        raise FormatError(RafsV6Xattrs.NAME, "name", name, "xattr name has no supported prefix")

    def _body(self) -> bytes:
        parts = []
        for i, (name, value) in enumerate(self.pairs):
            index, suffix = self.split_name(name)
            if len(suffix) > 255:
                raise FormatError(self.NAME, f"pairs[{i}].name", name, "name suffix longer than 255 bytes")
            if len(value) > 0xFFFF:
                raise FormatError(self.NAME, f"pairs[{i}].value", len(value), "value larger than 65535 bytes")
            raw = bytes((len(suffix), index)) + len(value).to_bytes(2, "little") + suffix + value
            parts.append(raw + b"\0" * (-len(raw) % 4))
        return b"".join(parts)

    def to_bytes(self) -> bytes:
        """Header and entries; empty bytes when there are no pairs (``i_xattr_icount`` 0)."""
        if not self.pairs:
            return b""
        return self.header + self._body()

    @property
    def size(self) -> int:
        return len(self.to_bytes())

    @property
    def icount(self) -> int:
        """The ``i_xattr_icount`` that describes these xattrs."""
        size = self.size
        return (size - _XATTR_HEADER_SIZE) // _XATTR_ENTRY_SIZE + 1 if size else 0

    def __eq__(self, other: object) -> bool:
        # The header is compared too: its reserved bytes survive a round trip.
        if type(other) is not type(self):
            return NotImplemented
        return self.pairs == other.pairs and self.header == other.header


class RafsV6PrefetchTable(RafsV5PrefetchTable):
    """``u32`` nids at ``s_prefetch_table_offset`` (rafs-format.md §2.11); not padded on disk."""

    __slots__ = ()
    NAME = "RafsV6PrefetchTable"

    @classmethod
    def from_bytes(cls, buf: Any, offset: int = 0, count: int = 0) -> "RafsV6PrefetchTable":
        """Decode ``count`` entries (``s_prefetch_table_size / 4``)."""
        return super().from_bytes(buf, offset, count)

    def to_bytes(self) -> bytes:
        return super().to_bytes()[:4 * len(self.entries)]
