"""RAFS v5 on-disk structures (reference/rafs-format.md §1), sans-IO.

File layout (the loader does not require this order, only that the tables lie
inside ``[8192, len)`` and do not overlap)::

    0      RafsV5SuperBlock (8192)
    8192   inode table        u32[entries], zero-padded to align8
           prefetch table     u32[entries], zero-padded to align8
           blob table         variable, zero-padded to align8
           ext blob table     64 bytes * n
           inode records      RafsV5Inode(128) + name + [symlink] + [xattrs] + [chunks]

Each class decodes with ``from_bytes`` (length checks only), checks the
loader's rules with ``validate`` and encodes byte-exactly with ``to_bytes``.
"""

from __future__ import annotations

import enum
import stat
import sys
from array import array
from typing import Any, Iterable

from ..errors import FormatError
from ._common import (
    MAX_CHUNK_SIZE,
    U32,
    U64,
    EntryList,
    OnDisk,
    XattrPairs,
    align8,
    algorithms_from_flags,
    check_super_flags,
    layout_slots,
    need,
)
from .types import BlobFeatures, ChunkInfo, Compressor, Digester

__all__ = [
    "RAFSV5_MAGIC",
    "RAFSV5_VERSION",
    "RAFSV5_SUPERBLOCK_SIZE",
    "RAFSV5_ROOT_INODE",
    "InodeFlags",
    "RafsV5SuperBlock",
    "RafsV5InodeTable",
    "RafsV5PrefetchTable",
    "RafsV5BlobEntry",
    "RafsV5BlobTable",
    "RafsV5ExtBlobEntry",
    "RafsV5ExtBlobTable",
    "RafsV5Inode",
    "RafsV5ChunkInfo",
    "RafsV5Xattrs",
    "RafsV5InodeRecord",
]

RAFSV5_MAGIC = 0x52414653
RAFSV5_VERSION = 0x500
RAFSV5_SUPERBLOCK_SIZE = 8192
RAFSV5_ROOT_INODE = 1
#: Inode table values are record offsets >> 3 and must stay below this.
_INODE_TABLE_LIMIT = 1 << 29


_U32_ITEM = "I" if array("I").itemsize == 4 else "L"


class InodeFlags(enum.IntFlag):
    """``RafsInodeFlags`` (v5 ``i_flags``); synthesized for v6 by the reader."""

    SYMLINK = 0x1
    HARDLINK = 0x2
    XATTR = 0x4
    HAS_HOLE = 0x8


def _u32_array(buf: Any, offset: int, count: int, structure: str) -> array:
    need(buf, offset, count * 4, structure)
    out = array(_U32_ITEM)
    out.frombytes(bytes(buf[offset:offset + count * 4]))
    if sys.byteorder != "little":
        out.byteswap()
    return out


def _u32_bytes(values: Iterable[int], structure: str) -> bytes:
    try:
        out = array(_U32_ITEM, values)
    except OverflowError:
        raise FormatError(structure, "entries", None, "an entry does not fit in u32") from None
    if sys.byteorder != "little":
        out.byteswap()
    return out.tobytes()


def _overlaps(a_off: int, a_size: int, b_off: int, b_size: int) -> bool:
    return a_size > 0 and b_size > 0 and a_off < b_off + b_size and b_off < a_off + a_size


class RafsV5SuperBlock(OnDisk):
    """The 8192-byte v5 superblock at offset 0 (rafs-format.md §1.2)."""

    _LAYOUT = (
        ("s_magic", "I"),
        ("s_fs_version", "I"),
        ("s_sb_size", "I"),
        ("s_block_size", "I"),
        ("s_flags", "Q"),
        ("s_inodes_count", "Q"),
        ("s_inode_table_offset", "Q"),
        ("s_prefetch_table_offset", "Q"),
        ("s_blob_table_offset", "Q"),
        ("s_inode_table_entries", "I"),
        ("s_prefetch_table_entries", "I"),
        ("s_blob_table_size", "I"),
        ("s_extended_blob_table_entries", "I"),
        ("s_extended_blob_table_offset", "Q"),
        ("s_reserved", "8112s"),
    )
    __slots__ = layout_slots(_LAYOUT)
    _INIT = {
        "s_magic": RAFSV5_MAGIC,
        "s_fs_version": RAFSV5_VERSION,
        "s_sb_size": RAFSV5_SUPERBLOCK_SIZE,
        "s_block_size": 0x100000,
        "s_inode_table_offset": RAFSV5_SUPERBLOCK_SIZE,
    }

    @staticmethod
    def probe(buf: Any) -> bool:
        """True when ``buf`` starts with a v5 superblock header (magic and version)."""
        return len(buf) >= 8 and U32.unpack_from(buf, 0)[0] == RAFSV5_MAGIC \
            and U32.unpack_from(buf, 4)[0] == RAFSV5_VERSION

    @property
    def chunk_size(self) -> int:
        return self.s_block_size

    @property
    def algorithms(self) -> tuple[Compressor, Digester]:
        return algorithms_from_flags(self.s_flags)

    def validate(self, meta_size: int) -> None:
        """Apply the loader's checks for a bootstrap of ``meta_size`` bytes."""
        n = self.NAME
        if self.s_magic != RAFSV5_MAGIC:
            raise FormatError(n, "s_magic", self.s_magic, f"expected {RAFSV5_MAGIC:#x}")
        if self.s_fs_version != RAFSV5_VERSION:
            raise FormatError(n, "s_fs_version", self.s_fs_version, f"expected {RAFSV5_VERSION:#x}")
        if self.s_sb_size != RAFSV5_SUPERBLOCK_SIZE:
            raise FormatError(n, "s_sb_size", self.s_sb_size, f"expected {RAFSV5_SUPERBLOCK_SIZE}")
        if meta_size <= RAFSV5_SUPERBLOCK_SIZE or meta_size % 8:
            raise FormatError(n, "meta_size", meta_size,
                              "a v5 bootstrap must be longer than 8192 bytes and a multiple of 8")
        cs = self.s_block_size
        if cs & (cs - 1) or cs < 0x1000 or cs > MAX_CHUNK_SIZE:
            raise FormatError(n, "s_block_size", cs, "chunk size must be a power of two in 4 KiB..16 MiB")
        check_super_flags(self.s_flags, n)
        entries = self.s_inode_table_entries
        if entries == 0:
            raise FormatError(n, "s_inode_table_entries", 0, "an image has at least the root inode")
        if self.s_inodes_count > entries:
            raise FormatError(n, "s_inodes_count", self.s_inodes_count,
                              f"more inodes than inode table entries ({entries})")
        lo, hi = RAFSV5_SUPERBLOCK_SIZE, meta_size

        def inside(field: str, off: int, size: int) -> None:
            if off < lo or off + size > hi:
                raise FormatError(n, field, off, f"table of {size} bytes does not fit in [{lo:#x}, {hi:#x})")

        it_off, it_size = self.s_inode_table_offset, entries * 4
        inside("s_inode_table_offset", it_off, it_size)
        bt_off, bt_size = self.s_blob_table_offset, self.s_blob_table_size
        inside("s_blob_table_offset", bt_off, bt_size)
        if _overlaps(bt_off, bt_size, it_off, it_size):
            raise FormatError(n, "s_blob_table_offset", bt_off, "blob table overlaps the inode table")
        et_off, et_size = self.s_extended_blob_table_offset, self.s_extended_blob_table_entries * 64
        if et_size:
            inside("s_extended_blob_table_offset", et_off, et_size)
            if _overlaps(et_off, et_size, it_off, it_size) or _overlaps(et_off, et_size, bt_off, bt_size):
                raise FormatError(n, "s_extended_blob_table_offset", et_off,
                                  "extended blob table overlaps another table")
        pt_off, pt_size = self.s_prefetch_table_offset, self.s_prefetch_table_entries * 4
        if pt_size:
            inside("s_prefetch_table_offset", pt_off, pt_size)
            if _overlaps(pt_off, pt_size, it_off, it_size) or _overlaps(pt_off, pt_size, bt_off, bt_size) \
                    or _overlaps(pt_off, pt_size, et_off, et_size):
                raise FormatError(n, "s_prefetch_table_offset", pt_off, "prefetch table overlaps another table")


class _U32Table(EntryList):
    """A ``u32[]`` zero-padded to 8 bytes on disk."""

    __slots__ = ()
    NAME = "u32 table"

    def __init__(self, entries: Iterable[int] = ()) -> None:
        self.entries = array(_U32_ITEM, entries)

    @classmethod
    def from_bytes(cls, buf: Any, offset: int = 0, count: int = 0) -> Any:
        """Decode ``count`` little-endian u32 at ``offset`` (padding is not read)."""
        obj = cls.__new__(cls)
        obj.entries = _u32_array(buf, offset, count, cls.NAME)
        return obj

    def to_bytes(self) -> bytes:
        raw = _u32_bytes(self.entries, self.NAME)
        return raw + b"\0" * (align8(len(raw)) - len(raw))

    def __repr__(self) -> str:
        return f"{self.NAME}({list(self.entries[:16])}{'…' if len(self.entries) > 16 else ''})"


class RafsV5InodeTable(_U32Table):
    """``table[idx-1] = record_offset >> 3`` for inode index ``idx`` (rafs-format.md §1.3)."""

    __slots__ = ()
    NAME = "RafsV5InodeTable"

    def validate(self, meta_size: int) -> None:
        for idx, value in enumerate(self.entries, 1):
            self.check_entry(idx, value, meta_size)

    @classmethod
    def check_entry(cls, idx: int, value: int, meta_size: int) -> int:
        """Return the record offset of slot ``idx``; refuse values outside the records area."""
        if not (RAFSV5_SUPERBLOCK_SIZE >> 3) < value < _INODE_TABLE_LIMIT:
            raise FormatError(cls.NAME, f"entries[{idx - 1}]", value,
                              f"record offset {value << 3:#x} is outside the metadata area")
        off = value << 3
        if off + RafsV5Inode.SIZE > meta_size:
            raise FormatError(cls.NAME, f"entries[{idx - 1}]", value,
                              f"record at {off:#x} runs past the end of the bootstrap ({meta_size:#x})")
        return off


class RafsV5PrefetchTable(_U32Table):
    """Inode numbers (``i_ino``) to prefetch; the loader stops at the first 0 (rafs-format.md §1.9)."""

    __slots__ = ()
    NAME = "RafsV5PrefetchTable"

    @property
    def inodes(self) -> list[int]:
        out = []
        for ino in self.entries:
            if ino == 0:
                break
            out.append(ino)
        return out


class RafsV5BlobEntry:
    """One blob table entry: ``u32 readahead_offset, u32 readahead_size, blob id``."""

    __slots__ = ("readahead_offset", "readahead_size", "blob_id")

    def __init__(self, blob_id: str, readahead_offset: int = 0, readahead_size: int = 0) -> None:
        self.blob_id = blob_id
        self.readahead_offset = readahead_offset
        self.readahead_size = readahead_size

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RafsV5BlobEntry):
            return NotImplemented
        return (self.blob_id, self.readahead_offset, self.readahead_size) == \
            (other.blob_id, other.readahead_offset, other.readahead_size)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"RafsV5BlobEntry({self.blob_id!r}, {self.readahead_offset}, {self.readahead_size})"


class RafsV5BlobTable(EntryList):
    """The variable-size v5 blob table (rafs-format.md §1.6): entries separated by NUL, padded to 8."""

    __slots__ = ()
    NAME = "RafsV5BlobTable"
    entries: list[RafsV5BlobEntry]

    @classmethod
    def from_bytes(cls, buf: Any, offset: int = 0, size: int = 0) -> "RafsV5BlobTable":
        """Decode ``size`` bytes (``s_blob_table_size``, padding included) at ``offset``."""
        need(buf, offset, size, cls.NAME)
        data = bytes(buf[offset:offset + size])
        entries = []
        pos = 0
        # Same walk as the loader: the zero padding (< 8 bytes) ends the last id.
        while len(data) - pos > 8:
            ra_off, ra_size = U32.unpack_from(data, pos)[0], U32.unpack_from(data, pos + 4)[0]
            end = data.find(b"\0", pos + 8)
            if end < 0:
                end = len(data)
            raw_id = data[pos + 8:end]
            try:
                blob_id = raw_id.decode("utf-8")
            except UnicodeDecodeError:
                raise FormatError(cls.NAME, f"entries[{len(entries)}].blob_id", raw_id,
                                  "blob id is not UTF-8") from None
            entries.append(RafsV5BlobEntry(blob_id, ra_off, ra_size))
            pos = end + 1
        return cls(entries)

    def to_bytes(self) -> bytes:
        parts = []
        for i, e in enumerate(self.entries):
            raw = e.blob_id.encode("utf-8")
            if not raw or b"\0" in raw:
                raise FormatError(self.NAME, f"entries[{i}].blob_id", raw, "blob id must be non-empty without NUL")
            parts.append(U32.pack(e.readahead_offset) + U32.pack(e.readahead_size) + raw)
        data = b"\0".join(parts)
        return data + b"\0" * (align8(len(data)) - len(data))

    def validate(self) -> None:
        for i, e in enumerate(self.entries):
            if not e.blob_id:
                raise FormatError(self.NAME, f"entries[{i}].blob_id", e.blob_id, "blob id is empty")


class RafsV5ExtBlobEntry(OnDisk):
    """Extended blob table entry, 64 bytes, same order as the blob table (rafs-format.md §1.7)."""

    _LAYOUT = (
        ("chunk_count", "I"),
        ("features", "I"),
        ("uncompressed_size", "Q"),
        ("compressed_size", "Q"),
        ("reserved", "40s"),
    )
    __slots__ = layout_slots(_LAYOUT)

    def validate(self, index: int = 0) -> None:
        if self.features & BlobFeatures.V5_NO_EXT_BLOB_TABLE or self.features & 0xF000:
            raise FormatError(self.NAME, f"[{index}].features", self.features,
                              "unknown or internal-only blob feature bits")


class RafsV5ExtBlobTable(EntryList):
    """``s_extended_blob_table_entries`` consecutive :class:`RafsV5ExtBlobEntry`."""

    __slots__ = ()
    NAME = "RafsV5ExtBlobTable"
    entries: list[RafsV5ExtBlobEntry]

    @classmethod
    def from_bytes(cls, buf: Any, offset: int = 0, count: int = 0) -> "RafsV5ExtBlobTable":
        return cls(RafsV5ExtBlobEntry.array_from_bytes(buf, offset, count, cls.NAME))

    def to_bytes(self) -> bytes:
        return b"".join(e.to_bytes() for e in self.entries)


class RafsV5Inode(OnDisk):
    """The fixed 128-byte part of a v5 inode record (rafs-format.md §1.4)."""

    _LAYOUT = (
        ("i_digest", "32s"),
        ("i_parent", "Q"),
        ("i_ino", "Q"),
        ("i_uid", "I"),
        ("i_gid", "I"),
        ("i_projid", "I"),
        ("i_mode", "I"),
        ("i_size", "Q"),
        ("i_blocks", "Q"),
        ("i_flags", "Q"),
        ("i_nlink", "I"),
        ("i_child_index", "I"),
        ("i_child_count", "I"),
        ("i_name_size", "H"),
        ("i_symlink_size", "H"),
        ("i_rdev", "I"),
        ("i_mtime_nsec", "I"),
        ("i_mtime", "Q"),
        ("i_reserved", "8s"),
    )
    __slots__ = layout_slots(_LAYOUT)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.i_mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.i_mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.i_mode)

    @property
    def is_hardlink(self) -> bool:
        """The loader's notion: a regular file with more than one name."""
        return stat.S_ISREG(self.i_mode) and self.i_nlink > 1

    @property
    def xattr_offset(self) -> int:
        """Offset of the xattr block (or the chunk records) from the record start."""
        return self.SIZE + align8(self.i_name_size) + align8(self.i_symlink_size)

    def validate(self, max_ino: int) -> None:
        """Loader checks (rafs-format.md §1.4); ``max_ino`` is ``s_inode_table_entries``."""
        n = self.NAME
        if self.i_ino == 0 or self.i_ino > max_ino:
            raise FormatError(n, "i_ino", self.i_ino, f"inode number must be in 1..{max_ino}")
        if self.i_ino != RAFSV5_ROOT_INODE and self.i_parent == 0:
            raise FormatError(n, "i_parent", 0, f"non-root inode {self.i_ino} has no parent")
        if self.i_nlink == 0:
            raise FormatError(n, "i_nlink", 0, f"inode {self.i_ino} has no links")
        if not 1 <= self.i_name_size <= 256:
            raise FormatError(n, "i_name_size", self.i_name_size, "name length must be 1..256")
        if not self.is_hardlink and self.i_parent >= self.i_ino:
            raise FormatError(n, "i_parent", self.i_parent,
                              f"parent must have a smaller index than inode {self.i_ino}")
        if stat.S_IFMT(self.i_mode) not in _VALID_TYPES:
            raise FormatError(n, "i_mode", self.i_mode, "unknown file type")
        if self.is_dir and self.i_child_count:
            ci, cc = self.i_child_index, self.i_child_count
            if ci <= self.i_ino or ci + cc - 1 > max_ino:
                raise FormatError(n, "i_child_index", ci,
                                  f"children [{ci}, {ci + cc}) of inode {self.i_ino} are outside (ino, {max_ino}]")
        if self.is_symlink and self.i_symlink_size == 0:
            raise FormatError(n, "i_symlink_size", 0, f"symlink inode {self.i_ino} has an empty target")


_VALID_TYPES = frozenset({stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK,
                          stat.S_IFIFO, stat.S_IFSOCK})


class RafsV5ChunkInfo(OnDisk):
    """An 80-byte chunk record (rafs-format.md §1.5); also the v6 chunk table entry (§2.12)."""

    _LAYOUT = (
        ("block_id", "32s"),
        ("blob_index", "I"),
        ("flags", "I"),
        ("compressed_size", "I"),
        ("uncompressed_size", "I"),
        ("compressed_offset", "Q"),
        ("uncompressed_offset", "Q"),
        ("file_offset", "Q"),
        ("index", "I"),
        ("crc32", "I"),
    )
    __slots__ = layout_slots(_LAYOUT)

    def to_chunk_info(self, file_offset: int | None = None) -> ChunkInfo:
        """The descriptor the storage layer uses; ``file_offset`` overrides the record's."""
        return ChunkInfo(
            digest=self.block_id,
            blob_index=self.blob_index,
            index=self.index,
            flags=self.flags,
            compressed_offset=self.compressed_offset,
            compressed_size=self.compressed_size,
            uncompressed_offset=self.uncompressed_offset,
            uncompressed_size=self.uncompressed_size,
            file_offset=self.file_offset if file_offset is None else file_offset,
            crc32=self.crc32,
        )

    @classmethod
    def from_chunk_info(cls, chunk: ChunkInfo) -> "RafsV5ChunkInfo":
        return cls(block_id=chunk.digest, blob_index=chunk.blob_index, flags=chunk.flags,
                   compressed_size=chunk.compressed_size, uncompressed_size=chunk.uncompressed_size,
                   compressed_offset=chunk.compressed_offset, uncompressed_offset=chunk.uncompressed_offset,
                   file_offset=chunk.file_offset, index=chunk.index, crc32=chunk.crc32)

    def validate(self, chunk_size: int, blob_count: int) -> None:
        n = self.NAME
        if self.blob_index >= blob_count:
            raise FormatError(n, "blob_index", self.blob_index, f"image has {blob_count} blob(s)")
        if self.flags & ~0x1F:
            raise FormatError(n, "flags", self.flags, "unknown chunk flag bits")
        if self.uncompressed_size == 0 or self.uncompressed_size > chunk_size:
            raise FormatError(n, "uncompressed_size", self.uncompressed_size,
                              f"must be 1..chunk size {chunk_size:#x}")




class RafsV5Xattrs(XattrPairs):
    """The v5 xattr block (rafs-format.md §1.8): ``u64 total`` then ``u32 size, key NUL value`` pairs.

    ``pairs`` keeps the on-disk order (HashMap order upstream: random per build).
    """

    __slots__ = ()
    NAME = "RafsV5Xattrs"

    @classmethod
    def from_bytes(cls, buf: Any, offset: int = 0) -> "RafsV5Xattrs":
        n = cls.NAME
        need(buf, offset, 8, n)
        total = U64.unpack_from(buf, offset)[0]
        need(buf, offset + 8, total, n, "total")
        data = bytes(buf[offset + 8:offset + 8 + total])
        pairs = []
        pos = 0
        while pos < total:
            if total - pos < 4:
                raise FormatError(n, "pair_size", total - pos, "truncated pair size")
            size = U32.unpack_from(data, pos)[0]
            pos += 4
            if size > total - pos:
                raise FormatError(n, f"pairs[{len(pairs)}].size", size,
                                  f"pair runs past the xattr block ({total - pos} bytes left)")
            pair = data[pos:pos + size]
            sep = pair.find(b"\0")
            if sep <= 0:
                raise FormatError(n, f"pairs[{len(pairs)}]", pair, "pair has no 'name NUL value' form")
            pairs.append((pair[:sep], pair[sep + 1:]))
            pos += size
        return cls(pairs)

    @property
    def total(self) -> int:
        return sum(4 + len(k) + 1 + len(v) for k, v in self.pairs)

    @property
    def size(self) -> int:
        """Bytes the block occupies on disk, padding included."""
        return 8 + align8(self.total)

    def to_bytes(self) -> bytes:
        body = b"".join(U32.pack(len(k) + 1 + len(v)) + k + b"\0" + v for k, v in self.pairs)
        return U64.pack(len(body)) + body + b"\0" * (align8(len(body)) - len(body))


class RafsV5InodeRecord:
    """A whole inode record: inode, name, symlink target, xattrs and chunk records.

    Layout: ``inode(128) | name, pad8 | [target, pad8] | [xattrs] | [chunks * 80]``.
    The target is present for symlinks, the xattr block when ``i_flags & XATTR``,
    the chunk records (``i_child_count`` of them) for regular files.
    """

    __slots__ = ("inode", "name", "symlink", "xattrs", "chunks")
    NAME = "RafsV5InodeRecord"

    def __init__(self, inode: RafsV5Inode, name: bytes, symlink: bytes = b"",
                 xattrs: RafsV5Xattrs | None = None, chunks: Iterable[RafsV5ChunkInfo] = ()) -> None:
        self.inode = inode
        self.name = bytes(name)
        self.symlink = bytes(symlink)
        self.xattrs = xattrs
        self.chunks = list(chunks)

    @classmethod
    def from_bytes(cls, buf: Any, offset: int = 0) -> "RafsV5InodeRecord":
        n = cls.NAME
        inode = RafsV5Inode.from_bytes(buf, offset)
        pos = offset + RafsV5Inode.SIZE
        need(buf, pos, inode.i_name_size, n, "name")
        name = bytes(buf[pos:pos + inode.i_name_size])
        pos += align8(inode.i_name_size)
        symlink = b""
        if inode.is_symlink:
            need(buf, pos, inode.i_symlink_size, n, "symlink")
            symlink = bytes(buf[pos:pos + inode.i_symlink_size])
        pos += align8(inode.i_symlink_size)
        xattrs = None
        if inode.i_flags & InodeFlags.XATTR:
            xattrs = RafsV5Xattrs.from_bytes(buf, pos)
            pos += xattrs.size
        chunks = []
        if inode.is_reg and inode.i_child_count:
            chunks = RafsV5ChunkInfo.array_from_bytes(buf, pos, inode.i_child_count, n, "chunks")
        return cls(inode, name, symlink, xattrs, chunks)

    @property
    def size(self) -> int:
        size = RafsV5Inode.SIZE + align8(len(self.name)) + align8(len(self.symlink))
        if self.xattrs is not None:
            size += self.xattrs.size
        return size + RafsV5ChunkInfo.SIZE * len(self.chunks)

    def to_bytes(self) -> bytes:
        parts = [self.inode.to_bytes(), self.name, b"\0" * (align8(len(self.name)) - len(self.name))]
        if self.symlink:
            parts += [self.symlink, b"\0" * (align8(len(self.symlink)) - len(self.symlink))]
        if self.xattrs is not None:
            parts.append(self.xattrs.to_bytes())
        parts += [c.to_bytes() for c in self.chunks]
        return b"".join(parts)

    def validate(self, max_ino: int, chunk_size: int, blob_count: int) -> None:
        """Inode checks plus consistency of the tail with the inode fields."""
        n = self.NAME
        ino = self.inode
        ino.validate(max_ino)
        if len(self.name) != ino.i_name_size or not self.name or b"\0" in self.name:
            raise FormatError(n, "name", self.name, f"must be i_name_size ({ino.i_name_size}) bytes without NUL")
        if ino.is_symlink and len(self.symlink) != ino.i_symlink_size:
            raise FormatError(n, "symlink", self.symlink, f"must be i_symlink_size ({ino.i_symlink_size}) bytes")
        if bool(ino.i_flags & InodeFlags.XATTR) != (self.xattrs is not None):
            raise FormatError(n, "xattrs", ino.i_flags, "XATTR flag and xattr block disagree")
        if self.xattrs is not None:
            self.xattrs.validate()
        if ino.is_reg:
            if len(self.chunks) != ino.i_child_count:
                raise FormatError(n, "chunks", len(self.chunks), f"i_child_count says {ino.i_child_count}")
            for c in self.chunks:
                c.validate(chunk_size, blob_count)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return (self.inode, self.name, self.symlink, self.xattrs, self.chunks) == \
            (other.inode, other.name, other.symlink, other.xattrs, other.chunks)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"RafsV5InodeRecord({self.inode!r}, name={self.name!r}, chunks={len(self.chunks)})"
