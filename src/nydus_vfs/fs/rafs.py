"""One RAFS image (v5 or v6) as a read-only filesystem over a blob device.

``RafsFs`` implements :class:`~nydus_vfs.fs._seam.FileSystem` in *local* inode
numbers (v5: the inode index, v6: the nid).  It is not handed to the FUSE
server directly: the :class:`~nydus_vfs.fs.vfs.Vfs` mounts it at a pseudo path
and translates nodeids, so the FUSE root (nodeid 1) and inode numbers of
several images never collide.  It is immutable and read-only: every write
method answers EROFS (:class:`~nydus_vfs.fs._seam.ReadOnlyFs`), as does an
OPEN asking for write access or O_TRUNC.

Strategy: metadata comes from the sans-IO :class:`~nydus_vfs.format.Bootstrap`
(the bytes of the bootstrap, usually an mmap) and is memoised per inode the first
time it is needed (``Attr`` objects, chunk lists), because the FUSE hot path asks
for the same few inodes over and over.  File data is described as a list of
``(ChunkInfo, offset_in_chunk, length)`` and handed to the storage layer's
``BlobDevice``, which answers with bytes or file segments of its cache file.
"""

from __future__ import annotations

import asyncio
import bisect
import errno
import logging
import os
import stat
from collections import OrderedDict
from collections.abc import Iterator

from ..errors import FormatError, FsError, StorageError
from ..format import Bootstrap, NoSuchInodeError, blob_id_from_meta_path
from ..format.types import ChunkInfo
from ..fuse.ops import Attr, Context, DirEntry, Entry, ReadData, StatFs
from ..utils.ratelog import LogLimiter
from ._seam import ReadOnlyFs

__all__ = ["RafsFs"]

log = logging.getLogger("nydus_vfs.fs")

_CHUNK_CACHE_MAX = 4096
# Largest image (in chunks) whose blob-order index is built for amplify_io.
_ORDER_MAX_CHUNKS = 1 << 18
#: An image never changes while mounted: the kernel may cache for a day.
_TIMEOUT = 86400.0

_FOPEN_KEEP_CACHE = 1 << 1
_FOPEN_CACHE_DIR = 1 << 3
# Guest open(2) flags (asm-generic): write access modes, O_CREAT, O_EXCL, O_TRUNC.
_O_ACCMODE = 0o3
_O_WRITE_BITS = 0o100 | 0o200 | 0o1000


class RafsFs(ReadOnlyFs):
    """A RAFS instance: the bootstrap and the blob device that serves its chunks.

    Xattrs are served when ``enable_xattr`` (the upstream config key) is set *or*
    the image says it carries any (the superblock's ``HAS_XATTR`` flag, v5 and v6
    alike), as nydusd's ``xattr_supported()`` does; :attr:`xattr_supported` holds
    the result.  Otherwise GETXATTR and LISTXATTR answer ENOSYS (the kernel then
    stops asking).
    The instance owns ``device`` and closes it in :meth:`close`.
    """

    def __init__(self, bootstrap: Bootstrap, device, *, enable_xattr: bool = False,
                 source: str = "") -> None:
        self.bootstrap = bootstrap
        self.device = device
        self.enable_xattr = enable_xattr
        self.xattr_supported = bool(enable_xattr or bootstrap.has_xattr)
        self.source = source
        self.root_ino: int = bootstrap.root_ino
        self.chunk_size: int = bootstrap.chunk_size
        # Without EXPLICIT_UID_GID the stored ids are meaningless: report our own.
        self._override_ids = None if bootstrap.explicit_uid_gid else (os.geteuid(), os.getegid())
        self._attrs: dict[int, Attr] = {}
        self._chunks: OrderedDict[int, tuple[list[int], list[ChunkInfo]]] = OrderedDict()
        self._limiter = LogLimiter(log)
        # Blob-order index for amplify_io across files: None = not started.
        self._order_task: asyncio.Task | None = None

    # -- construction helpers ----------------------------------------------------
    @classmethod
    def from_paths(cls, bootstrap_path: str, blob_dir: str, *, cache_dir: str | None = None,
                   digest_validate: bool = False, enable_xattr: bool = True, layer=None) -> "RafsFs":
        """Open ``bootstrap_path`` with a localfs backend on ``blob_dir`` (tests, benchmarks)."""
        from ..storage import BlobLayer, CacheSpec, LocalfsBackend

        bootstrap = load_bootstrap(bootstrap_path)
        layer = layer or BlobLayer()
        backend = LocalfsBackend(dir=blob_dir)
        cache = CacheSpec(kind="blobcache" if cache_dir else "", work_dir=cache_dir, validate=False)
        device = layer.open_device(bootstrap.blobs, backend, cache, digest_validate=digest_validate)
        return cls(bootstrap, device, enable_xattr=enable_xattr, source=bootstrap_path)

    def close(self) -> None:
        """Release the blob device (and with the last user, its cache state)."""
        task, self._order_task = self._order_task, None
        if task is not None and not task.done():
            task.cancel()
        device, self.device = self.device, None
        if device is not None:
            device.close()

    # -- metadata -------------------------------------------------------------------
    def attr(self, ino: int) -> Attr:
        """Attributes of local inode ``ino`` (memoised); FsError(ENOENT/EIO) when invalid."""
        a = self._attrs.get(ino)
        if a is None:
            a = self._make_attr(ino)
            self._attrs[ino] = a
        return a

    def _inode(self, ino: int):
        try:
            return self.bootstrap.inode(ino)
        except NoSuchInodeError:
            raise FsError(errno.ENOENT) from None
        except FormatError as exc:
            log.error("%s: inode %d is corrupt: %s", self.source, ino, exc)
            raise FsError(errno.EIO) from None
        except LookupError:
            raise FsError(errno.ENOENT) from None

    def _make_attr(self, ino: int) -> Attr:
        node = self._inode(ino)
        uid, gid = self._override_ids or (node.uid, node.gid)
        mode = node.mode
        rdev = node.rdev if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else 0
        blocks = getattr(node, "blocks", 0) or (node.size + 511) // 512
        return Attr(ino, mode, size=node.size, blocks=blocks, nlink=node.nlink, uid=uid, gid=gid,
                    rdev=rdev, mtime=node.mtime, mtimensec=node.mtime_nsec)

    def getattr(self, ino: int, fh: int | None = None, ctx: Context | None = None) -> Attr:
        return self.attr(ino)

    def lookup(self, parent: int, name: bytes, ctx: Context | None = None) -> Entry:
        """``name`` in directory ``parent`` (local inode numbers); FsError(ENOENT/ENOTDIR/EIO)."""
        if not stat.S_ISDIR(self.attr(parent).mode):
            raise FsError(errno.ENOTDIR)
        try:
            ino = self.bootstrap.lookup(parent, name)
        except FormatError as exc:
            log.error("%s: directory %d is corrupt: %s", self.source, parent, exc)
            raise FsError(errno.EIO) from None
        if ino is None:
            raise FsError(errno.ENOENT)
        return Entry(ino, self.attr(ino), 0, _TIMEOUT, _TIMEOUT)

    def readlink(self, ino: int, ctx: Context | None = None) -> bytes:
        if not stat.S_ISLNK(self.attr(ino).mode):
            raise FsError(errno.EINVAL)
        try:
            return self.bootstrap.readlink(ino)
        except FormatError as exc:
            log.error("%s: symlink %d is corrupt: %s", self.source, ino, exc)
            raise FsError(errno.EIO) from None

    def open(self, ino: int, flags: int, ctx: Context | None = None) -> tuple[int, int]:
        """No per-open state: fh 0, page cache kept.  Directories EISDIR, devices and fifos
        ENXIO (only regular files carry data), write access or O_TRUNC EROFS."""
        mode = self.attr(ino).mode
        if stat.S_ISDIR(mode):
            raise FsError(errno.EISDIR)
        if not stat.S_ISREG(mode):
            raise FsError(errno.ENXIO)
        if flags & _O_ACCMODE or flags & _O_WRITE_BITS:
            raise FsError(errno.EROFS)
        return 0, _FOPEN_KEEP_CACHE

    def opendir(self, ino: int, flags: int, ctx: Context | None = None) -> tuple[int, int]:
        if not stat.S_ISDIR(self.attr(ino).mode):
            raise FsError(errno.ENOTDIR)
        return 0, _FOPEN_KEEP_CACHE | _FOPEN_CACHE_DIR

    def readdir(self, ino: int, fh: int, offset: int, plus: bool,
                ctx: Context | None = None) -> Iterator[DirEntry]:
        """Entries from cookie ``offset``, "." and ".." included (local inode numbers)."""
        it = self.children(ino, offset)
        if not plus:
            # tuple.__new__ builds the DirEntry without a Python-level __new__ frame:
            # this runs once per entry on the READDIR(PLUS) path.
            new = tuple.__new__
            return (new(DirEntry, (name, child, dtype, next_pos, None)) for next_pos, name, child, dtype in it)
        return self._readdirplus(it)

    def _readdirplus(self, it) -> Iterator[DirEntry]:
        for next_pos, name, child, dtype in it:
            if name == b"." or name == b"..":
                yield DirEntry(name, child, dtype, next_pos)
            else:
                yield DirEntry(name, child, dtype, next_pos, Entry(child, self.attr(child), 0, _TIMEOUT, _TIMEOUT))

    def children(self, ino: int, start: int) -> Iterator[tuple[int, bytes, int, int]]:
        """``(next_cookie, name, ino, dtype)`` from cookie ``start``; includes "." and "..".

        ENOTDIR (or ENOENT/EIO for a bad inode) is raised by the call itself;
        a directory found corrupt while iterating raises FsError(EIO) from the iterator.
        """
        if not stat.S_ISDIR(self.attr(ino).mode):
            raise FsError(errno.ENOTDIR)
        return self._iter_children(ino, start)

    def _iter_children(self, ino: int, start: int) -> Iterator[tuple[int, bytes, int, int]]:
        try:
            yield from self.bootstrap.children(ino, start)
        except FormatError as exc:
            log.error("%s: directory %d is corrupt: %s", self.source, ino, exc)
            raise FsError(errno.EIO) from None

    def getxattr(self, ino: int, name: bytes, ctx: Context | None = None) -> bytes:
        value = self.xattrs(ino).get(name)
        if value is None:
            raise FsError(errno.ENODATA)
        return value

    def listxattr(self, ino: int, ctx: Context | None = None) -> list[bytes]:
        return list(self.xattrs(ino))

    def xattrs(self, ino: int) -> dict[bytes, bytes]:
        if not self.xattr_supported:
            raise FsError(errno.ENOSYS)
        self.attr(ino)
        try:
            return self.bootstrap.xattrs(ino)
        except FormatError as exc:
            log.error("%s: xattrs of inode %d are corrupt: %s", self.source, ino, exc)
            raise FsError(errno.EIO) from None

    def statfs(self, ino: int = 0, ctx: Context | None = None) -> StatFs:
        b = self.bootstrap
        blocks = sum(blob.uncompressed_size for blob in b.blobs) // 4096
        files = b.inodes_count
        return StatFs(blocks=blocks, bfree=0, bavail=0, files=files, ffree=0, bsize=4096,
                      namelen=255, frsize=4096)

    # -- data -------------------------------------------------------------------------
    def _chunk_index(self, ino: int) -> tuple[list[int], list[ChunkInfo]]:
        entry = self._chunks.get(ino)
        if entry is not None:
            self._chunks.move_to_end(ino)
            return entry
        try:
            chunks = sorted(self.bootstrap.chunks(ino), key=lambda c: c.file_offset)
        except FormatError as exc:
            log.error("%s: chunk table of inode %d is corrupt: %s", self.source, ino, exc)
            raise FsError(errno.EIO) from None
        entry = ([c.file_offset for c in chunks], chunks)
        self._chunks[ino] = entry
        if len(self._chunks) > _CHUNK_CACHE_MAX:
            self._chunks.popitem(last=False)
        return entry

    def plan_read(self, ino: int, offset: int, size: int) -> list[tuple[ChunkInfo, int, int]]:
        """The chunk I/O list for ``size`` bytes at ``offset`` of regular file ``ino``.

        Clipped at end of file; an empty list means EOF.  Gaps between chunks (a
        corrupt image) are an error, never silently zero-filled.
        """
        return self._plan(ino, offset, size)[0]

    def _plan(self, ino: int, offset: int, size: int) -> tuple[list[tuple[ChunkInfo, int, int]], list[ChunkInfo], int]:
        """:meth:`plan_read` plus the file's chunk list and the list position of the first iovec chunk."""
        a = self.attr(ino)
        if not stat.S_ISREG(a.mode):
            raise FsError(errno.EISDIR if stat.S_ISDIR(a.mode) else errno.EINVAL)
        if offset < 0:
            raise FsError(errno.EINVAL)
        end = min(a.size, offset + size)
        if offset >= end:
            return [], [], 0
        starts, chunks = self._chunk_index(ino)
        i = first = bisect.bisect_right(starts, offset) - 1
        iovec: list[tuple[ChunkInfo, int, int]] = []
        pos = offset
        while pos < end:
            if i < 0 or i >= len(chunks):
                log.error("%s: inode %d has no chunk covering offset %d", self.source, ino, pos)
                raise FsError(errno.EIO)
            c = chunks[i]
            in_chunk = pos - c.file_offset
            if in_chunk < 0 or in_chunk >= c.uncompressed_size:
                log.error("%s: inode %d chunk %d does not cover offset %d", self.source, ino, i, pos)
                raise FsError(errno.EIO)
            n = min(c.uncompressed_size - in_chunk, end - pos)
            iovec.append((c, in_chunk, n))
            pos += n
            i += 1
        return iovec, chunks, first

    async def read(self, ino: int, fh: int, offset: int, size: int, ctx: Context | None = None) -> ReadData:
        iovec, chunks, first = self._plan(ino, offset, size)
        if not iovec:
            return b""
        if self._order_task is None and self.device.amplify_io:
            self._start_blob_order()
        try:
            # The file's chunk list rides along so a miss can amplify (amplify_io).
            return await self.device.read(iovec, (chunks, first))
        except (StorageError, OSError) as exc:
            if getattr(exc, "logged", False):
                # The storage layer logged the chunk and reason (once, rate-limited).
                log.debug("%s: read of inode %d [%d, +%d) failed: %s", self.source, ino, offset, size, exc)
            else:
                self._limiter.log(logging.ERROR, (ino, type(exc).__name__),
                             "%s: read of inode %d [%d, +%d) failed: %s", self.source, ino, offset, size, exc)
            raise FsError(errno.EIO) from None

    # -- amplify_io across files ---------------------------------------------------------
    def _start_blob_order(self) -> None:
        """Build, in the background, each blob's chunks in blob order for the device.

        With it a miss amplifies into the chunks stored *after* it in the blob,
        whichever files they belong to (nydusd does this for v6 from the blob
        meta), so reading many small files costs one request per
        ``amplify_io`` bytes instead of one per file.  Only for remote
        backends (local reads gain nothing) and images of at most
        ``_ORDER_MAX_CHUNKS`` chunks (the index lives in memory).  The task is
        cancelled by :meth:`close`.
        """
        device = self.device
        total = sum(max(b.chunk_count, 0) for b in self.bootstrap.blobs)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if device.backend.supports_sync or total > _ORDER_MAX_CHUNKS:
            self._order_task = loop.create_future()  # marks "decided": never built
            self._order_task.set_result(None)
            return
        self._order_task = loop.create_task(self._build_blob_order(), name=f"rafs-blob-order {self.source}")

    async def _build_blob_order(self) -> None:
        per_blob: dict[int, list[ChunkInfo]] = {}
        seen: set[tuple[int, int, int]] = set()
        count = 0
        try:
            for _path, ino, info in self.bootstrap.walk():
                if info.is_reg and info.size:
                    for c in self.bootstrap.chunks(ino):
                        if c.blob_index < 0:
                            continue
                        key = (c.blob_index, c.compressed_offset, c.uncompressed_offset)
                        if key not in seen:
                            seen.add(key)
                            per_blob.setdefault(c.blob_index, []).append(c)
                count += 1
                if count % 256 == 0:
                    await asyncio.sleep(0)  # never hold up foreground requests
                    if self.device is None:
                        return
        except (FormatError, LookupError) as exc:
            log.warning("%s: no cross-file read amplification (walking the image failed: %s)", self.source, exc)
            return
        device = self.device
        if device is None:
            return
        order = {}
        for index, chunks in per_blob.items():
            chunks.sort(key=lambda c: c.compressed_offset)
            order[index] = ([c.compressed_offset for c in chunks], chunks)
        device.blob_order = order
        log.debug("%s: blob order of %d chunks ready for read amplification", self.source, len(seen))

    def lseek(self, ino: int, fh: int, offset: int, whence: int) -> int:
        """SEEK_DATA/SEEK_HOLE: an image file has no holes (its data is all chunks)."""
        a = self.attr(ino)
        if whence in (os.SEEK_SET, os.SEEK_CUR, os.SEEK_END):
            # The kernel handles these itself; answer the plain semantics anyway.
            return offset if whence != os.SEEK_END else a.size + offset
        if offset < 0 or offset >= a.size:
            raise FsError(errno.ENXIO)
        if whence == os.SEEK_DATA:
            return offset
        if whence == os.SEEK_HOLE:
            return a.size
        raise FsError(errno.EINVAL)

    # -- permission check for ACCESS (only sent without default_permissions) ----------
    def access(self, ino: int, mask: int, ctx: Context) -> None:
        a = self.attr(ino)
        if mask == os.F_OK:
            return
        if mask & os.W_OK:
            raise FsError(errno.EROFS)
        if ctx.uid == 0:
            if mask & os.X_OK and not (a.mode & 0o111) and not stat.S_ISDIR(a.mode):
                raise FsError(errno.EACCES)
            return
        if ctx.uid == a.uid:
            bits = (a.mode >> 6) & 7
        elif ctx.gid == a.gid:
            bits = (a.mode >> 3) & 7
        else:
            bits = a.mode & 7
        if mask & ~bits & 7:
            raise FsError(errno.EACCES)


def load_bootstrap(path: str) -> Bootstrap:
    """Read and parse a bootstrap file; FormatError names what is wrong with it.

    The file is read into memory: bootstraps are metadata only (megabytes), and a
    private copy cannot change under us the way an mmap of a replaced file can.
    """
    with open(path, "rb") as f:
        data = f.read()
    bootstrap = Bootstrap.from_bytes(data)
    # Blobs with inlined meta carry a placeholder id: like nydusd, the real id is
    # the meta file's name (the OCI layer digest in a converted image).
    bootstrap.set_blob_id_from_meta(blob_id_from_meta_path(path))
    return bootstrap

