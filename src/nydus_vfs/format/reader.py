"""One read-only view over a RAFS v5 or v6 bootstrap held in memory (sans-IO).

``Bootstrap.from_bytes(data)`` takes ``bytes``, a ``memoryview`` or an ``mmap``
and returns a :class:`BootstrapV5` or :class:`BootstrapV6`; both expose the same
interface, so the filesystem layer never asks which version it serves.

Goals and plan:

* **Lazy.**  Loading decodes the superblock(s) and the small tables only.  An
  inode is decoded when first asked for (O(1): v5 goes through the inode table,
  v6 computes the slot from the nid) and then cached, so the hot GETATTR and
  LOOKUP paths are a dict hit.  Caches are bounded (cleared wholesale when full;
  they are cheap to refill) so a huge image cannot grow them without limit.
* **Hostile input.**  Every offset and size is checked against the buffer
  before it is used; counts are bounded by what the buffer can hold before
  anything is allocated from them; names are length-checked.  Only
  :class:`~nydus_vfs.errors.FormatError` escapes (:class:`NoSuchInodeError`, a
  subclass, for inode numbers that name nothing).  Directory *walks* must also
  terminate on a malicious image: :meth:`Bootstrap.walk` enters each directory
  once, and v5 children always have larger indexes than their parent.
* **Inode numbers** are what the FS hands to the kernel: v5 ``i_ino`` (the
  table index of the first name; hardlinks share it), v6 the nid (root = the
  superblock's root nid, 128 with the current builder).
* **Directory positions** (``children(dir, start)``): position 0 is ``.`` and
  1 is ``..`` for v5 (synthesized; ``..`` of the root is the root); for v6 the
  position is the index of the dirent in on-disk order, ``.`` and ``..``
  included where they sort.  Each item carries the position of the next one,
  the readdir resume cookie.
* **Chunks** (``chunks(ino)``) are in file order and cover the whole file
  without gaps: each chunk starts at its ``file_offset`` (``k * chunk_size``
  for chunk k) and its ``uncompressed_size`` is the number of file bytes it
  covers.  A hole (a v6 index with block address ``0xFFFFFFFF``) is
  ``ChunkInfo(digest=b"", blob_index=-1, index=-1, ...)``: the storage layer
  returns zeros for it.  The one exception to ``k * chunk_size``: a gap in a
  v5 ``HAS_HOLE`` file (never produced by upstream builders) is a single hole
  entry spanning the whole gap, so a hostile ``i_size`` cannot make the list huge.

Not thread-safe: the daemon serves metadata from one event-loop thread.
"""

from __future__ import annotations

import abc
import posixpath
import stat
import struct
from typing import Any, Iterator, Mapping

from ..errors import FormatError
from ._common import (
    MAX_NAME_LEN,
    U16,
    U32,
    U64,
    NoSuchInodeError,
    algorithms_from_flags,
    align8,
    need,
)
from .blob import BlobTail
from .types import BlobFeatures, BlobInfo, ChunkInfo, Compressor, Digester, SuperFlags
from .v5 import (
    RAFSV5_ROOT_INODE,
    RAFSV5_SUPERBLOCK_SIZE,
    InodeFlags,
    RafsV5BlobTable,
    RafsV5ChunkInfo,
    RafsV5ExtBlobTable,
    RafsV5Inode,
    RafsV5InodeRecord,
    RafsV5InodeTable,
    RafsV5PrefetchTable,
    RafsV5SuperBlock,
    RafsV5Xattrs,
)
from .v6 import (
    DT_FROM_EROFS_FT,
    EROFS_DEVTABLE_OFFSET,
    EROFS_INODE_CHUNK_BASED,
    EROFS_INODE_FLAT_INLINE,
    EROFS_INODE_SLOT_SIZE,
    EROFS_NULL_ADDR,
    EROFS_SUPER_OFFSET,
    RafsV6Blob,
    RafsV6Device,
    RafsV6DirentBlock,
    RafsV6InodeCompact,
    RafsV6InodeExtended,
    RafsV6PrefetchTable,
    RafsV6SuperBlock,
    RafsV6SuperBlockExt,
    RafsV6Xattrs,
)

__all__ = [
    "Bootstrap",
    "BootstrapV5",
    "BootstrapV6",
    "InodeInfo",
    "NoSuchInodeError",
    "blob_id_from_meta_path",
]

_S_IFMT = 0o170000
_S_IFDIR = stat.S_IFDIR
_S_IFREG = stat.S_IFREG
_S_IFLNK = stat.S_IFLNK
_DT_DIR = 4
_MAX_SYMLINK = 4096
_STRUCT_V5_CHUNK = RafsV5ChunkInfo._STRUCT
_STRUCT_V6_CHUNK_ADDR = struct.Struct("<HHI")
_STRUCT_DIRENT = struct.Struct("<QHBB")
_MISSING = object()


class InodeInfo:
    """The attributes of one inode, decoded once and cached by the bootstrap.

    ``flags`` are :class:`~nydus_vfs.format.v5.InodeFlags` bits (v5 ``i_flags``
    as stored; synthesized for v6: SYMLINK, XATTR).  ``uid``/``gid`` are the
    stored values: when the image lacks ``EXPLICIT_UID_GID`` they are 0 and the
    FS substitutes its own ids.  ``rdev`` is meaningful for char/block devices
    only (0 otherwise).  ``mtime`` is 0 for v6 compact inodes (no timestamp).
    Treat instances as immutable; ``_aux`` belongs to the bootstrap.
    """

    __slots__ = ("ino", "mode", "uid", "gid", "size", "nlink", "mtime", "mtime_nsec",
                 "rdev", "blocks", "flags", "_aux")

    def __init__(self, ino: int, mode: int, uid: int, gid: int, size: int, nlink: int, mtime: int,
                 mtime_nsec: int, rdev: int, blocks: int, flags: int, _aux: tuple = ()) -> None:
        self.ino = ino
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.size = size
        self.nlink = nlink
        self.mtime = mtime
        self.mtime_nsec = mtime_nsec
        self.rdev = rdev
        self.blocks = blocks
        self.flags = flags
        self._aux = _aux

    @property
    def file_type(self) -> int:
        """``S_IFMT(mode)``."""
        return self.mode & _S_IFMT

    @property
    def dtype(self) -> int:
        """The ``DT_*`` value readdir reports (``S_IFMT(mode) >> 12``)."""
        return (self.mode & _S_IFMT) >> 12

    @property
    def is_dir(self) -> bool:
        return self.mode & _S_IFMT == _S_IFDIR

    @property
    def is_reg(self) -> bool:
        return self.mode & _S_IFMT == _S_IFREG

    @property
    def is_symlink(self) -> bool:
        return self.mode & _S_IFMT == _S_IFLNK

    @property
    def is_chr(self) -> bool:
        return self.mode & _S_IFMT == stat.S_IFCHR

    @property
    def is_blk(self) -> bool:
        return self.mode & _S_IFMT == stat.S_IFBLK

    @property
    def is_fifo(self) -> bool:
        return self.mode & _S_IFMT == stat.S_IFIFO

    @property
    def is_sock(self) -> bool:
        return self.mode & _S_IFMT == stat.S_IFSOCK

    @property
    def has_xattr(self) -> bool:
        """False means ``xattrs()`` is empty: the FS can answer without asking."""
        return bool(self.flags & InodeFlags.XATTR)

    def __repr__(self) -> str:
        return (f"InodeInfo(ino={self.ino}, mode={self.mode:#o}, size={self.size}, nlink={self.nlink}, "
                f"uid={self.uid}, gid={self.gid}, mtime={self.mtime}, flags={self.flags:#x})")


def blob_id_from_meta_path(path: str) -> str:
    """The blob id nydusd derives from a meta/bootstrap file path: the base name
    with every extension stripped (``/x/abc.blob.meta`` -> ``abc``)."""
    name = posixpath.basename(path)
    while True:
        stem, ext = posixpath.splitext(name)
        if not ext or not stem:
            break
        name = stem
    if not name or name.startswith("."):
        raise FormatError("Bootstrap", "meta_path", path, "cannot derive a blob id from this file name")
    return name


def _hole(file_offset: int, size: int) -> ChunkInfo:
    return ChunkInfo(digest=b"", blob_index=-1, index=-1, flags=0, compressed_offset=0, compressed_size=0,
                     uncompressed_offset=0, uncompressed_size=size, file_offset=file_offset)


class Bootstrap(abc.ABC):
    """A decoded bootstrap; see the module docstring for the conventions.

    Attributes: ``version`` (5 or 6), ``flags`` (:class:`SuperFlags`),
    ``chunk_size``, ``compressor``, ``digester``, ``explicit_uid_gid``,
    ``has_xattr``, ``root_ino``, ``max_ino`` (no valid inode number is larger),
    ``inodes_count`` (as stored, informational), ``blobs``
    (``list[BlobInfo]``), ``prefetch_inodes`` (inode numbers, up to the first 0),
    ``block_size`` (EROFS block size for v6; 4096 for v5, the ``st_blksize``
    nydusd reports), ``is_tarfs`` and ``inlined`` (True when the bootstrap was
    extracted from a data blob with inlined meta, rafs-format.md §7.1 step 3).

    Callers should check an inode's type before ``readlink``/``chunks``/
    ``children``: asking a file for its children yields nothing, asking a
    non-symlink for a target raises FormatError.
    """

    version: int
    flags: SuperFlags
    chunk_size: int
    compressor: Compressor
    digester: Digester
    root_ino: int
    max_ino: int
    inodes_count: int
    blobs: list[BlobInfo]
    prefetch_inodes: list[int]
    block_size: int
    is_tarfs: bool

    #: Cache bounds: entries kept before a cache is emptied and refilled.
    INODE_CACHE_LIMIT = 1 << 18
    LOOKUP_CACHE_LIMIT = 1 << 18
    CHUNK_CACHE_LIMIT = 1 << 12

    def __init__(self, buf: Any) -> None:
        self._buf = buf
        self._size = len(buf)
        self._icache: dict[int, InodeInfo] = {}
        self._lcache: dict[tuple[int, bytes], int | None] = {}
        self._ccache: dict[int, list[ChunkInfo]] = {}
        self.inlined = False

    # ----------------------------------------------------------------- loading

    @classmethod
    def from_bytes(cls, data: Any) -> "Bootstrap":
        """Detect the version (rafs-format.md §7.1) and load; raises FormatError with the reason.

        Order: v5 magic and version at 0; else EROFS magic at 1024 (a v6 file
        shorter than 8 KiB is refused like nydusd, which probes v5 by reading 8
        KiB first); else a data blob whose tail holds ``image.boot`` (inlined
        meta): the bootstrap is extracted and loaded with ``inlined = True``,
        and :meth:`placeholder_blob_indexes` tells which blob ids to replace.

        ``data`` is used in place, not copied: it must not change while the
        bootstrap is in use (call :meth:`release` before closing an mmap).
        """
        buf = cls._as_buffer(data)
        found = cls._load_plain(buf)
        if found is not None:
            return found
        boot = cls._extract_inlined(buf)
        if boot is None:
            head = bytes(buf[:4]) if len(buf) >= 4 else bytes(buf)
            raise FormatError("Bootstrap", "magic", head,
                              f"{len(buf)} bytes are neither a RAFS v5 bootstrap (magic 0x52414653 at 0), "
                              "nor a v6 one (EROFS magic 0xe0f5e1e2 at 1024), nor a blob with inlined image.boot")
        inner = cls._load_plain(boot)
        if inner is None:
            raise FormatError("Bootstrap", "image.boot", bytes(boot[:4]),
                              "the image.boot section inlined in the blob is not a RAFS bootstrap")
        inner.inlined = True
        return inner

    @staticmethod
    def _as_buffer(data: Any) -> Any:
        if isinstance(data, bytes):
            return data
        try:
            view = memoryview(data)
        except TypeError:
            raise FormatError("Bootstrap", "data", type(data).__name__, "not a bytes-like object") from None
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        return view

    @classmethod
    def _load_plain(cls, buf: Any) -> "Bootstrap | None":
        size = len(buf)
        if RafsV5SuperBlock.probe(buf):
            if size < RAFSV5_SUPERBLOCK_SIZE:
                raise FormatError("Bootstrap", "length", size, "a v5 bootstrap is at least 8192 bytes (truncated?)")
            return BootstrapV5(buf)
        if RafsV6SuperBlock.probe(buf):
            if size < RAFSV5_SUPERBLOCK_SIZE:
                raise FormatError("Bootstrap", "length", size,
                                  "a v6 bootstrap shorter than 8 KiB is refused (nydusd reads 8 KiB to probe v5 first)")
            return BootstrapV6(buf)
        return None

    @staticmethod
    def _extract_inlined(buf: Any) -> bytes | None:
        try:
            tail = BlobTail.parse(buf)
        except FormatError:
            return None
        if "image.boot" not in tail:
            return None
        return tail.extract("image.boot", buf)

    def release(self) -> None:
        """Drop the reference to the buffer (needed before closing an mmap) and the caches."""
        if isinstance(self._buf, memoryview):
            self._buf.release()
        self._buf = b""
        self._size = 0
        self._icache.clear()
        self._lcache.clear()
        self._ccache.clear()

    # ------------------------------------------------------------- blob ids

    def replace_blob_ids(self, mapping: Mapping[int, str]) -> None:
        """Set the id of blob ``index`` to ``mapping[index]`` (inlined-meta placeholders, rafs-format.md §3.8)."""
        for index, blob_id in mapping.items():
            if not 0 <= index < len(self.blobs):
                raise FormatError("Bootstrap", "blob_index", index, f"image has {len(self.blobs)} blob(s)")
            if not blob_id or not isinstance(blob_id, str):
                raise FormatError("Bootstrap", "blob_id", blob_id, "must be a non-empty string")
            self.blobs[index] = self.blobs[index].with_blob_id(blob_id)

    def placeholder_blob_indexes(self) -> list[int]:
        """Blobs whose stored id must be replaced by the meta file's name / layer digest.

        Like nydusd: blobs with ``INLINED_FS_META``; and when the bootstrap came
        out of a blob (``inlined``), also blobs built before ``CAP_TAR_TOC``.
        """
        out = []
        for blob in self.blobs:
            if blob.features & BlobFeatures.INLINED_FS_META or \
                    (self.inlined and not blob.features & BlobFeatures.CAP_TAR_TOC):
                out.append(blob.index)
        return out

    def set_blob_id_from_meta(self, blob_id: str) -> list[int]:
        """Give every placeholder blob (see above) the id ``blob_id``; returns their indexes."""
        indexes = self.placeholder_blob_indexes()
        self.replace_blob_ids({i: blob_id for i in indexes})
        return indexes

    # ------------------------------------------------------------ interface

    def inode(self, ino: int) -> InodeInfo:
        """The attributes of inode ``ino``; NoSuchInodeError if it names nothing."""
        try:
            return self._icache[ino]
        except KeyError:
            pass
        info = self._load_inode(ino)
        if len(self._icache) >= self.INODE_CACHE_LIMIT:
            self._icache.clear()
        self._icache[ino] = info
        return info

    def lookup(self, dir_ino: int, name: bytes) -> int | None:
        """Inode number of ``name`` in directory ``dir_ino``, or None.

        ``.`` and ``..`` resolve too.  A non-directory has no entries (None).
        """
        if type(name) is not bytes:
            name = bytes(name)
        key = (dir_ino, name)
        found = self._lcache.get(key, _MISSING)
        if found is not _MISSING:
            return found  # type: ignore[return-value]
        info = self.inode(dir_ino)
        if not info.is_dir or not name or len(name) > MAX_NAME_LEN or b"/" in name:
            found = None
        else:
            found = self._lookup(info, name)
        if len(self._lcache) >= self.LOOKUP_CACHE_LIMIT:
            self._lcache.clear()
        self._lcache[key] = found
        return found

    def children(self, dir_ino: int, start: int = 0) -> Iterator[tuple[int, bytes, int, int]]:
        """Yield ``(next_pos, name, ino, dtype)`` from position ``start`` in on-disk order.

        ``dtype`` is a ``DT_*`` value.  Errors in the directory data surface as
        FormatError while iterating.  A non-directory yields nothing.
        """
        info = self.inode(dir_ino)
        if not info.is_dir or start < 0:
            return iter(())
        return self._children(info, start)

    def child_count(self, dir_ino: int) -> int:
        """Entries of the directory, ``.`` and ``..`` excluded (0 for non-directories)."""
        info = self.inode(dir_ino)
        if not info.is_dir:
            return 0
        return self._child_count(info)

    def readlink(self, ino: int) -> bytes:
        """The target of symlink ``ino``."""
        info = self.inode(ino)
        if not info.is_symlink:
            raise FormatError("Bootstrap", "ino", ino, "readlink on an inode that is not a symlink")
        return self._readlink(info)

    def xattrs(self, ino: int) -> dict[bytes, bytes]:
        """All xattrs of ``ino`` by full name (``b"user.foo"``)."""
        info = self.inode(ino)
        if not info.flags & InodeFlags.XATTR:
            return {}
        return self._xattrs(info)

    def chunks(self, ino: int) -> list[ChunkInfo]:
        """Chunks of regular file ``ino`` in file order, covering the whole file.

        Non-regular files have none.  The list is cached: do not mutate it.
        """
        cached = self._ccache.get(ino)
        if cached is not None:
            return cached
        info = self.inode(ino)
        result = self._chunks(info) if info.is_reg and info.size else []
        if len(self._ccache) >= self.CHUNK_CACHE_LIMIT:
            self._ccache.clear()
        self._ccache[ino] = result
        return result

    def walk(self, start: int | None = None) -> Iterator[tuple[bytes, int, InodeInfo]]:
        """Depth-first pre-order ``(path, ino, info)`` from ``start`` (default: the root).

        Each directory is entered once, so the walk terminates even when a
        malicious image links a directory into its own subtree.
        """
        root = self.root_ino if start is None else start
        stack: list[tuple[bytes, int]] = [(b"/", root)]
        entered: set[int] = set()
        while stack:
            path, ino = stack.pop()
            info = self.inode(ino)
            yield path, ino, info
            if info.is_dir and ino not in entered:
                entered.add(ino)
                prefix = path if path.endswith(b"/") else path + b"/"
                kids = [(prefix + name, child) for _, name, child, _ in self._children(info, 0)
                        if name != b"." and name != b".."]
                stack.extend(reversed(kids))

    # ------------------------------------------------- version-specific parts

    @abc.abstractmethod
    def _load_inode(self, ino: int) -> InodeInfo:
        """Decode and check inode ``ino`` (uncached)."""

    @abc.abstractmethod
    def _lookup(self, info: InodeInfo, name: bytes) -> int | None:
        """Search directory ``info`` for ``name`` on disk."""

    @abc.abstractmethod
    def _children(self, info: InodeInfo, start: int) -> Iterator[tuple[int, bytes, int, int]]:
        """Entries of directory ``info`` from position ``start``."""

    @abc.abstractmethod
    def _child_count(self, info: InodeInfo) -> int:
        """Entries of directory ``info`` without ``.`` and ``..``."""

    @abc.abstractmethod
    def _readlink(self, info: InodeInfo) -> bytes:
        """Target of symlink ``info``."""

    @abc.abstractmethod
    def _xattrs(self, info: InodeInfo) -> dict[bytes, bytes]:
        """Xattrs of ``info`` (which has the XATTR flag)."""

    @abc.abstractmethod
    def _chunks(self, info: InodeInfo) -> list[ChunkInfo]:
        """Chunks of non-empty regular file ``info``."""

    def _bad_ino(self, ino: Any, reason: str) -> NoSuchInodeError:
        return NoSuchInodeError("Bootstrap", "ino", ino if isinstance(ino, int) else repr(ino), reason)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(chunk_size={self.chunk_size:#x}, flags={int(self.flags):#x}, "
                f"root_ino={self.root_ino}, blobs={[b.blob_id for b in self.blobs]})")


class BootstrapV5(Bootstrap):
    """A RAFS v5 bootstrap (rafs-format.md §1).  Use :meth:`Bootstrap.from_bytes`."""

    def __init__(self, buf: Any) -> None:
        super().__init__(buf)
        sb = RafsV5SuperBlock.from_bytes(buf)
        sb.validate(self._size)
        self.superblock = sb
        self.version = 5
        self.flags = SuperFlags(sb.s_flags)
        self.chunk_size = sb.s_block_size
        self.compressor, self.digester = algorithms_from_flags(sb.s_flags)
        self.explicit_uid_gid = bool(sb.s_flags & SuperFlags.EXPLICIT_UID_GID)
        self.has_xattr = bool(sb.s_flags & SuperFlags.HAS_XATTR)
        self.is_tarfs = False
        self.block_size = 4096
        self.root_ino = RAFSV5_ROOT_INODE
        self.inodes_count = sb.s_inodes_count
        self._table = RafsV5InodeTable.from_bytes(buf, sb.s_inode_table_offset, sb.s_inode_table_entries).entries
        self._max_ino = self.max_ino = sb.s_inode_table_entries
        self._check_records_inside()
        self.blobs = self._load_blobs(buf, sb)
        prefetch = RafsV5PrefetchTable.from_bytes(buf, sb.s_prefetch_table_offset, sb.s_prefetch_table_entries)
        self.prefetch_inodes = prefetch.inodes
        root = self.inode(RAFSV5_ROOT_INODE)
        if not root.is_dir:
            raise FormatError("RafsV5Inode", "i_mode", root.mode, "root is not a directory")

    def _check_records_inside(self) -> None:
        """Refuse a bootstrap whose inode records do not all lie inside it (a truncated file).

        The superblock does not record where the records end, so the last one is
        found through the table (its largest offset, one C-level ``max``) and
        decoded whole: name, symlink, xattrs and chunks must fit in the file.
        Upstream nydusd maps the same file and would fault on the first access to
        a missing record; refusing at load names the cause instead.
        """
        table = self._table
        last = max(table)
        slot = table.index(last) + 1
        off = RafsV5InodeTable.check_entry(slot, last, self._size)
        try:
            record = RafsV5InodeRecord.from_bytes(self._buf, off)
        except FormatError as exc:
            raise FormatError("RafsV5InodeTable", f"entries[{slot - 1}]", last,
                              f"the last inode record (at {off:#x}) runs past the end of the "
                              f"{self._size:#x}-byte bootstrap (truncated?): {exc.field}: {exc.reason}") from None
        end = off + record.size
        if end > self._size:
            raise FormatError("RafsV5InodeTable", f"entries[{slot - 1}]", last,
                              f"the last inode record ends at {end:#x}, past the end of the "
                              f"{self._size:#x}-byte bootstrap (truncated?)")

    def _load_blobs(self, buf: Any, sb: RafsV5SuperBlock) -> list[BlobInfo]:
        table = RafsV5BlobTable.from_bytes(buf, sb.s_blob_table_offset, sb.s_blob_table_size)
        table.validate()
        ext = None
        if sb.s_extended_blob_table_entries:
            ext = RafsV5ExtBlobTable.from_bytes(buf, sb.s_extended_blob_table_offset,
                                               sb.s_extended_blob_table_entries).entries
            if len(ext) < len(table.entries):
                raise FormatError("RafsV5SuperBlock", "s_extended_blob_table_entries", len(ext),
                                  f"fewer than the {len(table.entries)} blob table entries")
        blobs = []
        for i, entry in enumerate(table.entries):
            if ext is not None:
                ext[i].validate(i)
                count, features = ext[i].chunk_count, ext[i].features
                usize, csize = ext[i].uncompressed_size, ext[i].compressed_size
            else:
                count, features, usize, csize = 0, int(BlobFeatures.V5_NO_EXT_BLOB_TABLE), 0, 0
            blobs.append(BlobInfo(index=i, blob_id=entry.blob_id, chunk_count=count, chunk_size=self.chunk_size,
                                  compressor=self.compressor, digester=self.digester, features=features,
                                  compressed_size=csize, uncompressed_size=usize,
                                  readahead_offset=entry.readahead_offset, readahead_size=entry.readahead_size))
        return blobs

    # aux = (record offset, parent, child_index, child_count, name_size, symlink_size)

    def _slot_offset(self, slot: int) -> int:
        if not 1 <= slot <= self._max_ino:
            raise FormatError("RafsV5InodeTable", "index", slot, f"outside 1..{self._max_ino}")
        return RafsV5InodeTable.check_entry(slot, self._table[slot - 1], self._size)

    def _load_inode(self, ino: int) -> InodeInfo:
        if type(ino) is not int or not 1 <= ino <= self._max_ino:
            raise self._bad_ino(ino, f"v5 inode numbers are 1..{self._max_ino}")
        off = self._slot_offset(ino)
        inode = RafsV5Inode.from_bytes(self._buf, off)
        if inode.i_ino != ino:
            raise self._bad_ino(ino, f"table slot {ino} is another name of inode {inode.i_ino}")
        inode.validate(self._max_ino)
        need(self._buf, off + RafsV5Inode.SIZE, inode.i_name_size, "RafsV5Inode", "i_name_size")
        mode = inode.i_mode
        rdev = inode.i_rdev if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else 0
        return InodeInfo(ino, mode, inode.i_uid, inode.i_gid, inode.i_size, inode.i_nlink, inode.i_mtime,
                         inode.i_mtime_nsec, rdev, inode.i_blocks, inode.i_flags,
                         (off, inode.i_parent, inode.i_child_index, inode.i_child_count,
                          inode.i_name_size, inode.i_symlink_size))

    def _slot_entry(self, slot: int) -> tuple[bytes, int, int]:
        """(name, ino, mode) of the record in table slot ``slot``, checked."""
        buf = self._buf
        off = self._slot_offset(slot)
        name_size = U16.unpack_from(buf, off + 100)[0]
        if not 1 <= name_size <= 256 or off + RafsV5Inode.SIZE + name_size > self._size:
            raise FormatError("RafsV5Inode", "i_name_size", name_size, f"bad name of the record in slot {slot}")
        name = bytes(buf[off + 128:off + 128 + name_size])
        ino = U64.unpack_from(buf, off + 40)[0]
        mode = U32.unpack_from(buf, off + 60)[0]
        # Only regular files are hardlinked: their later names carry the first
        # name's (smaller) index; everything else must sit in its own slot.
        if ino != slot and not (mode & _S_IFMT == _S_IFREG and 1 <= ino < slot):
            raise FormatError("RafsV5Inode", "i_ino", ino, f"record in table slot {slot} claims another inode")
        return name, ino, mode

    def _lookup(self, info: InodeInfo, name: bytes) -> int | None:
        _, parent, child_index, child_count, _, _ = info._aux
        if name == b".":
            return info.ino
        if name == b"..":
            return parent or info.ino
        lo, hi = child_index, child_index + child_count - 1
        while lo <= hi:
            mid = (lo + hi) >> 1
            entry_name, ino, _ = self._slot_entry(mid)
            if entry_name == name:
                return ino
            if entry_name < name:
                lo = mid + 1
            else:
                hi = mid - 1
        return None

    def _children(self, info: InodeInfo, start: int) -> Iterator[tuple[int, bytes, int, int]]:
        _, parent, child_index, child_count, _, _ = info._aux
        if start <= 0:
            yield 1, b".", info.ino, _DT_DIR
        if start <= 1:
            yield 2, b"..", parent or info.ino, _DT_DIR
        for k in range(max(start - 2, 0), child_count):
            name, ino, mode = self._slot_entry(child_index + k)
            yield k + 3, name, ino, (mode & _S_IFMT) >> 12

    def _child_count(self, info: InodeInfo) -> int:
        return info._aux[3]

    def _readlink(self, info: InodeInfo) -> bytes:
        off, _, _, _, name_size, symlink_size = info._aux
        start = off + RafsV5Inode.SIZE + align8(name_size)
        need(self._buf, start, symlink_size, "RafsV5Inode", "i_symlink_size")
        return bytes(self._buf[start:start + symlink_size])

    def _tail_offset(self, info: InodeInfo) -> int:
        off, _, _, _, name_size, symlink_size = info._aux
        return off + RafsV5Inode.SIZE + align8(name_size) + align8(symlink_size)

    def _xattrs(self, info: InodeInfo) -> dict[bytes, bytes]:
        return RafsV5Xattrs.from_bytes(self._buf, self._tail_offset(info)).as_dict()

    def _chunks(self, info: InodeInfo) -> list[ChunkInfo]:
        buf = self._buf
        pos = self._tail_offset(info)
        if info.flags & InodeFlags.XATTR:
            need(buf, pos, 8, "RafsV5Xattrs", "total")
            pos += 8 + align8(U64.unpack_from(buf, pos)[0])
        count = info._aux[3]
        need(buf, pos, count * RafsV5ChunkInfo.SIZE, "RafsV5Inode", "i_child_count")
        cs, size = self.chunk_size, info.size
        expected = -(-size // cs)
        has_hole = bool(info.flags & InodeFlags.HAS_HOLE)
        if count > expected or (count != expected and not has_hole):
            raise FormatError("RafsV5Inode", "i_child_count", count,
                              f"inode {info.ino} of {size} bytes needs {expected} chunk(s) of {cs:#x}")
        nblobs = len(self.blobs)
        out: list[ChunkInfo] = []
        next_fo = 0
        for rec in _STRUCT_V5_CHUNK.iter_unpack(buf[pos:pos + count * RafsV5ChunkInfo.SIZE]):
            (digest, blob_index, flags, csize, usize, coff, uoff, fo, index, crc) = rec
            if fo != next_fo and not (has_hole and fo > next_fo and fo % cs == 0):
                raise FormatError("RafsV5ChunkInfo", "file_offset", fo,
                                  f"chunk {len(out)} of inode {info.ino} should start at {next_fo:#x}")
            if fo >= size:
                raise FormatError("RafsV5ChunkInfo", "file_offset", fo, f"past the end of inode {info.ino}")
            if next_fo < fo:
                # One entry per gap: a hostile i_size must not make us allocate per chunk.
                out.append(_hole(next_fo, fo - next_fo))
            covered = min(cs, size - fo)
            if usize != covered:
                raise FormatError("RafsV5ChunkInfo", "uncompressed_size", usize,
                                  f"chunk at {fo:#x} of inode {info.ino} must cover {covered} bytes")
            if blob_index >= nblobs:
                raise FormatError("RafsV5ChunkInfo", "blob_index", blob_index, f"image has {nblobs} blob(s)")
            out.append(ChunkInfo(digest, blob_index, index, flags, coff, csize, uoff, usize, fo, crc))
            next_fo = fo + cs
        if next_fo < size:
            out.append(_hole(next_fo, size - next_fo))
        return out


class BootstrapV6(Bootstrap):
    """A RAFS v6 bootstrap (rafs-format.md §2).  Use :meth:`Bootstrap.from_bytes`."""

    def __init__(self, buf: Any) -> None:
        super().__init__(buf)
        size = self._size
        sb = RafsV6SuperBlock.from_bytes(buf, EROFS_SUPER_OFFSET)
        sb.validate(size)
        devslot_end = EROFS_DEVTABLE_OFFSET + 128 * sb.s_extra_devices
        ext = RafsV6SuperBlockExt.from_bytes(buf, RafsV6SuperBlockExt.OFFSET)
        ext.validate(size, devslot_end)
        self.superblock = sb
        self.superblock_ext = ext
        self.version = 6
        flags = ext.s_flags
        self.flags = SuperFlags(flags)
        self.chunk_size = ext.s_chunk_size
        self.compressor, self.digester = algorithms_from_flags(flags)
        self.explicit_uid_gid = bool(flags & SuperFlags.EXPLICIT_UID_GID)
        self.has_xattr = bool(flags & SuperFlags.HAS_XATTR)
        self.is_tarfs = bool(flags & SuperFlags.TARTFS_MODE)
        self.block_size = sb.block_size
        self.root_ino = sb.s_root_nid
        self.inodes_count = sb.s_inos
        self.devices = []
        for i in range(sb.s_extra_devices):
            dev = RafsV6Device.from_bytes(buf, EROFS_DEVTABLE_OFFSET + 128 * i)
            dev.validate(i)
            self.devices.append(dev)
        self.blobs = []
        for i in range(ext.s_blob_table_size // RafsV6Blob.SIZE):
            entry = RafsV6Blob.from_bytes(buf, ext.s_blob_table_offset + i * RafsV6Blob.SIZE)
            entry.validate(i, self.chunk_size, flags)
            self.blobs.append(entry.to_blob_info())
        self.prefetch_inodes = []
        if ext.s_prefetch_table_size and ext.s_prefetch_table_offset:
            self.prefetch_inodes = RafsV6PrefetchTable.from_bytes(
                buf, ext.s_prefetch_table_offset, ext.s_prefetch_table_size // 4).inodes
        self._meta_offset = sb.s_meta_blkaddr * self.block_size
        self._max_nid = self.max_ino = (size - self._meta_offset - RafsV6InodeCompact.SIZE) // EROFS_INODE_SLOT_SIZE
        self._chunk_map: dict[tuple[int, int, int], int] | None = None
        root = self.inode(self.root_ino)
        if not root.is_dir:
            raise FormatError("RafsV6SuperBlock", "s_root_nid", self.root_ino, "root inode is not a directory")

    # aux = (inode offset, data layout, inode size, xattr size, i_u, i_xattr_icount)

    def _load_inode(self, nid: int) -> InodeInfo:
        if type(nid) is not int or not 1 <= nid <= self._max_nid:
            raise self._bad_ino(nid, f"v6 nids of this image are 1..{self._max_nid}")
        buf = self._buf
        off = self._meta_offset + nid * EROFS_INODE_SLOT_SIZE
        if buf[off] & 1:
            inode = RafsV6InodeExtended.from_bytes(buf, off)
            mtime, mtime_nsec = inode.i_mtime, inode.i_mtime_nsec
        else:
            inode = RafsV6InodeCompact.from_bytes(buf, off)
            # Newer EROFS keeps compact mtimes relative to the superblock epoch.
            mtime = self.superblock.s_build_time + inode.i_mtime
            mtime_nsec = self.superblock.s_build_time_nsec
        inode.validate()
        isize, xsize = inode.SIZE, inode.xattr_size
        need(buf, off, isize + xsize, inode.NAME, "i_xattr_icount")
        mode = inode.i_mode
        flags = 0
        if xsize:
            flags |= InodeFlags.XATTR
        if mode & _S_IFMT == _S_IFLNK:
            flags |= InodeFlags.SYMLINK
        rdev = inode.i_u if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else 0
        size = inode.i_size
        return InodeInfo(nid, mode, inode.i_uid, inode.i_gid, size, inode.i_nlink, mtime, mtime_nsec, rdev,
                         (size + 511) >> 9, int(flags),
                         (off, inode.layout, isize, xsize, inode.i_u, inode.i_xattr_icount))

    # Directory blocks ------------------------------------------------------

    def _block(self, info: InodeInfo, i: int, nblocks: int) -> tuple[int, int]:
        """(offset, length) of directory/symlink data block ``i`` of ``nblocks``."""
        off, layout, isize, xsize, i_u, _ = info._aux
        bs = self.block_size
        length = bs if i + 1 < nblocks else info.size - i * bs
        if layout == EROFS_INODE_FLAT_INLINE and i + 1 == nblocks:
            start = off + isize + xsize
        else:
            start = (i_u + i) * bs
        need(self._buf, start, length, "RafsV6Inode", "i_u")
        return start, length

    def _dirent(self, start: int, length: int, count: int, i: int) -> tuple[bytes, int, int]:
        buf = self._buf
        nid, nameoff, ft, _ = _STRUCT_DIRENT.unpack_from(buf, start + 12 * i)
        end = _STRUCT_DIRENT.unpack_from(buf, start + 12 * i + 12)[1] if i + 1 < count else length
        name = RafsV6DirentBlock._name(buf, start, length, count, i, nameoff, end)
        return name, nid, ft

    def _nblocks(self, info: InodeInfo) -> int:
        bs = self.block_size
        nblocks = (info.size + bs - 1) // bs
        if nblocks * bs > self._size + bs:
            raise FormatError("RafsV6Inode", "i_size", info.size,
                              f"directory {info.ino} is larger than the bootstrap")
        return nblocks

    def _lookup(self, info: InodeInfo, name: bytes) -> int | None:
        nblocks = self._nblocks(info)
        count_of = RafsV6DirentBlock.entry_count
        lo, hi = 0, nblocks - 1
        while lo <= hi:
            mid = (lo + hi) >> 1
            start, length = self._block(info, mid, nblocks)
            count = count_of(self._buf, start, length)
            first = self._dirent(start, length, count, 0)[0]
            if name < first:
                hi = mid - 1
                continue
            last = self._dirent(start, length, count, count - 1)[0]
            if name > last:
                lo = mid + 1
                continue
            a, b = 0, count - 1
            while a <= b:
                m = (a + b) >> 1
                entry_name, nid, _ = self._dirent(start, length, count, m)
                if entry_name == name:
                    return nid
                if entry_name < name:
                    a = m + 1
                else:
                    b = m - 1
            return None
        return None

    def _children(self, info: InodeInfo, start: int) -> Iterator[tuple[int, bytes, int, int]]:
        nblocks = self._nblocks(info)
        pos = 0
        for i in range(nblocks):
            bstart, length = self._block(info, i, nblocks)
            count = RafsV6DirentBlock.entry_count(self._buf, bstart, length)
            if pos + count <= start:
                pos += count
                continue
            for j in range(max(start - pos, 0), count):
                name, nid, ft = self._dirent(bstart, length, count, j)
                yield pos + j + 1, name, nid, DT_FROM_EROFS_FT[ft] if ft < 8 else 0
            pos += count

    def _child_count(self, info: InodeInfo) -> int:
        nblocks = self._nblocks(info)
        total = 0
        for i in range(nblocks):
            start, length = self._block(info, i, nblocks)
            total += RafsV6DirentBlock.entry_count(self._buf, start, length)
        return max(total - 2, 0)

    def _readlink(self, info: InodeInfo) -> bytes:
        if not 0 < info.size <= _MAX_SYMLINK:
            raise FormatError("RafsV6Inode", "i_size", info.size, f"symlink {info.ino} target must be 1..4096 bytes")
        nblocks = -(-info.size // self.block_size)
        parts = []
        for i in range(nblocks):
            start, length = self._block(info, i, nblocks)
            parts.append(bytes(self._buf[start:start + length]))
        return b"".join(parts)

    def _xattrs(self, info: InodeInfo) -> dict[bytes, bytes]:
        off, _, isize, _, _, icount = info._aux
        return RafsV6Xattrs.from_bytes(self._buf, off + isize, icount).as_dict()

    # Chunks ------------------------------------------------------------------

    def _load_chunk_map(self) -> dict[tuple[int, int, int], int]:
        ext = self.superblock_ext
        off, size = ext.s_chunk_table_offset, ext.s_chunk_table_size
        bs = self.block_size
        table: dict[tuple[int, int, int], int] = {}
        if size:
            view = memoryview(self._buf)[off:off + size]
            for idx, rec in enumerate(_STRUCT_V5_CHUNK.iter_unpack(view)):
                table.setdefault((rec[1], rec[8], rec[6] // bs), idx)
        return table

    def _chunks(self, info: InodeInfo) -> list[ChunkInfo]:
        off, layout, isize, xsize, _, _ = info._aux
        if layout != EROFS_INODE_CHUNK_BASED:
            raise FormatError("RafsV6Inode", "i_format", layout,
                              f"regular file {info.ino} is not chunk-based (layout {layout})")
        cs, size, bs = self.chunk_size, info.size, self.block_size
        count = -(-size // cs)
        base = off + align8(isize + xsize)
        need(self._buf, base, count * 8, "RafsV6InodeChunkAddr", "count")
        if self._chunk_map is None and not self.is_tarfs:
            self._chunk_map = self._load_chunk_map()
        chunk_map = self._chunk_map
        ct_off = self.superblock_ext.s_chunk_table_offset
        nblobs = len(self.blobs)
        out: list[ChunkInfo] = []
        view = memoryview(self._buf)[base:base + count * 8]
        for k, (lo, hi, blkaddr) in enumerate(_STRUCT_V6_CHUNK_ADDR.iter_unpack(view)):
            fo = k * cs
            covered = min(cs, size - fo)
            if blkaddr == EROFS_NULL_ADDR:
                out.append(_hole(fo, covered))
                continue
            dev = hi & 0xFF
            if dev == 0 or dev > nblobs:
                raise FormatError("RafsV6InodeChunkAddr", "c_blob_addr_hi", hi,
                                  f"device id {dev} of chunk {k} of inode {info.ino}: image has {nblobs} blob(s)")
            blob_index = dev - 1
            ci_index = ((hi >> 8) << 16) | lo
            if self.is_tarfs:
                # tarfs: the blob is the tar itself and chunk data are plain ranges of it.
                pos = blkaddr * bs
                out.append(ChunkInfo(b"\0" * 32, blob_index, ci_index, 0, pos, covered, pos, covered, fo))
                continue
            idx = chunk_map.get((blob_index, ci_index, blkaddr))  # type: ignore[union-attr]
            if idx is None:
                raise FormatError("RafsV6InodeChunkAddr", "c_blk_addr", blkaddr,
                                  f"chunk {k} of inode {info.ino} (blob {blob_index}, ci {ci_index}) "
                                  "has no chunk table record")
            (digest, rec_blob, flags, csize, usize, coff, uoff, _, index, crc) = \
                _STRUCT_V5_CHUNK.unpack_from(self._buf, ct_off + idx * RafsV5ChunkInfo.SIZE)
            if usize != covered:
                raise FormatError("RafsV5ChunkInfo", "uncompressed_size", usize,
                                  f"chunk {k} of inode {info.ino} must cover {covered} bytes")
            out.append(ChunkInfo(digest, rec_blob, index, flags, coff, csize, uoff, usize, fo, crc))
        return out
