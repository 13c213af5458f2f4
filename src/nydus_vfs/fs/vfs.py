"""The pseudo-mount VFS: several filesystem instances inside one FUSE/virtio-fs export.

Goals:
  * One export, many images: nydusd mounts each image at a *pseudo path*
    (``/`` by default; ``/rafs/<id>/lowerdir`` for Kata, ``/<snapshot>`` for the
    snapshotter's shared daemon).  Missing parents are created as pseudo
    directories, exactly like upstream's pseudo fs.
  * Nodeids never collide: a nodeid is ``index << 56 | local_ino`` where index 0 is
    the pseudo fs and 1..255 are mounted instances (the same split as
    fuse-backend-rs).  The FUSE root (nodeid 1) is the pseudo root, or the root of
    the instance mounted at ``/``.
  * Nodeids outlive mounts safely: after an unmount, requests on the old instance's
    nodeids answer ESTALE; a freed index is reused least-recently-freed first so
    a stale nodeid is unlikely to hit a new instance.

``st_ino`` reported for every inode is its nodeid, so hardlinks inside one image
share an ``st_ino`` and inodes of different images never do.

Instances implement :class:`~nydus_vfs.fs._seam.FileSystem` over local inode
numbers (RAFS images, passthrough directories); every FUSE op for an instance
goes through :meth:`Vfs._resolve` (nodeid -> instance, local inode) and its
answer through the ``_export_*`` helpers (local -> nodeid).  Immutable
instances (RAFS) get their attributes and lookups memoised here; the others
are asked every time.  Per-instance accounting (fop_hits/fop_errors,
nydus-surface.md §3.5) is done by the FUSE server in the per-instance lists
:meth:`Vfs.counters` hands it (a few list operations per request), and read
sizes and latencies by :meth:`Vfs.read`.
"""

from __future__ import annotations

import errno
import logging
import stat
import time
from collections import deque
from collections.abc import Callable, Iterator

from ..errors import FsError
from ..fuse import abi
from ..fuse.ops import (
    ROOT_ID,
    Attr,
    ConnInfo,
    Context,
    DirEntry,
    Entry,
    FileLock,
    FileSegment,
    Operations,
    ReadData,
    SetAttr,
    StatFs,
    WriteData,
)
from ._seam import FileSystem
from .metrics import FOPS, FsMetrics

__all__ = ["Vfs", "MAX_INSTANCES", "normalize_pseudo_path"]

log = logging.getLogger("nydus_vfs.fs")

_INDEX_SHIFT = 56
_LOCAL_MASK = (1 << _INDEX_SHIFT) - 1
MAX_INSTANCES = 255

# Pseudo directories can change (mounts come and go): short timeouts.  Image
# inodes never change while their instance is mounted: long ones.
_PSEUDO_TIMEOUT = 1.0
_IMAGE_TIMEOUT = 86400.0

_DT_DIR = 4
_NO_CTX = Context()

_LOOKUP_CACHE_MAX = 1 << 20

# FUSE opcode -> index in upstream's FOP counters (fs/metrics.py); -1: not counted.
# Every counter is named after its opcode.
_FOP_MAP = [-1] * 64
for _index, _name in enumerate(FOPS):
    _FOP_MAP[abi.Opcode[_name.upper()]] = _index
del _index, _name


def _data_len(data) -> int:
    kind = type(data)
    if kind is bytes or kind is bytearray or kind is memoryview:
        return len(data)
    n = 0
    for item in data:
        n += item[2] if type(item) is FileSegment else len(item)
    return n

# fuse_init_in flags the kernel offers (include/uapi/linux/fuse.h).
_NO_OPEN_SUPPORT = 1 << 17
_NO_OPENDIR_SUPPORT = 1 << 24


class _PseudoNode:
    __slots__ = ("ino", "name", "parent", "children", "mount", "attr")

    def __init__(self, ino: int, name: bytes, parent: "_PseudoNode | None") -> None:
        self.ino = ino
        self.name = name
        self.parent = parent
        self.children: dict[bytes, _PseudoNode] = {}
        self.mount: int | None = None  # instance index mounted here
        self.attr = _dir_attr(self)


class Vfs(Operations):
    """FUSE ``Operations`` over a pseudo tree holding filesystem instances.

    ``writable``: the export may hold instances that are not immutable
    (passthrough directories, read-write or not).  Such instances need every
    OPEN, OPENDIR and FLUSH, so a writable VFS never takes the kernel's
    connection-wide ENOSYS shortcuts for them (``NO_OPEN_SUPPORT``), and a
    non-writable VFS refuses to mount them (EPERM).  Serve a writable VFS with
    ``FuseServer(vfs, readonly=False)`` to let write opcodes through; RAFS
    instances still answer them EROFS.

    Thread-safety: none needed; the daemon runs one event loop and all mount
    changes happen on it.
    """

    attr_timeout = _IMAGE_TIMEOUT
    entry_timeout = _IMAGE_TIMEOUT

    def __init__(self, *, writable: bool = False) -> None:
        self.writable = writable
        self._root = _PseudoNode(ROOT_ID, b"/", None)
        self._root.parent = self._root
        self._pseudo: dict[int, _PseudoNode] = {ROOT_ID: self._root}
        self._next_pseudo = ROOT_ID + 1
        self._instances: dict[int, FileSystem] = {}
        # getattr of each mutable instance by index: GETATTR's direct route.
        self._mutable_getattr: dict[int, Callable[[int, int | None, Context], Attr]] = {}
        self._metrics: dict[int, FsMetrics] = {}
        # Per-instance FUSE request counters handed to the server (counters()).
        self._hits: list[list[int]] = [[0] * len(FOPS) for _ in range(MAX_INSTANCES + 1)]
        self._errs: list[list[int]] = [[0] * len(FOPS) for _ in range(MAX_INSTANCES + 1)]
        self._paths: dict[int, str] = {}
        self._free = deque(range(1, MAX_INSTANCES + 1))
        self._root_index: int | None = None
        self._attr_cache: dict[int, Attr] = {}
        self._lookup_cache: dict[tuple[int, bytes], Entry] = {}
        self._skip_open = False
        self._skip_opendir = False

    # -- mount table (Python API; the HTTP API drives it) -------------------------------
    def mount(self, path: str, fs: FileSystem, *, metrics: FsMetrics | None = None) -> int:
        """Mount ``fs`` at pseudo ``path``; returns its instance index.

        ``metrics`` receives the counters of every request routed to ``fs``.

        FsError(EEXIST) if something is mounted there, EINVAL for a bad path,
        EBUSY under another mountpoint, ENOSPC when all 255 instance slots are
        used, EPERM for a non-immutable instance in a VFS built without
        ``writable``.
        """
        if not fs.immutable and not self.writable:
            raise FsError(errno.EPERM, f"{path}: {fs.source or 'this filesystem'} changes under the guest and "
                                       "needs a writable VFS (OPEN/FLUSH must reach it)")
        parts = _split(path)
        node = self._root
        for part in parts:
            if node.mount is not None:
                raise FsError(errno.EBUSY, f"{path}: a parent is a mountpoint")
            child = node.children.get(part)
            if child is None:
                child = _PseudoNode(self._next_pseudo, part, node)
                self._next_pseudo += 1
                self._pseudo[child.ino] = child
                node.children[part] = child
                node.attr = _dir_attr(node)
            node = child
        if node.mount is not None:
            raise FsError(errno.EEXIST, f"{path}: already mounted")
        if not self._free:
            raise FsError(errno.ENOSPC, "too many mounted instances")
        idx = self._free.popleft()
        self._instances[idx] = fs
        if not fs.immutable:
            self._mutable_getattr[idx] = fs.getattr
        self._metrics[idx] = metrics if metrics is not None else FsMetrics(path)
        self._paths[idx] = normalize_pseudo_path(path)
        node.mount = idx
        if node is self._root:
            self._root_index = idx
        self._invalidate()
        self._set_counters()
        log.info("mounted %s at %s (instance %d)", fs.source or type(fs).__name__, self._paths[idx], idx)
        return idx

    def umount(self, path: str) -> FileSystem:
        """Unmount the instance at ``path`` and return it (the caller closes it)."""
        node = self._node_at(path)
        if node is None or node.mount is None:
            raise FsError(errno.ENOENT, f"{path}: nothing mounted")
        idx = node.mount
        node.mount = None
        if node is self._root:
            self._root_index = None
        fs = self._instances.pop(idx)
        self._mutable_getattr.pop(idx, None)
        del self._paths[idx]
        self._metrics.pop(idx, None)
        self._free.append(idx)
        self._prune(node)
        self._invalidate()
        self._set_counters()
        log.info("unmounted %s (instance %d)", path, idx)
        return fs

    def _prune(self, node: _PseudoNode) -> None:
        # Pseudo directories exist only to hold mounts: drop the ones left empty, up
        # to the root, so mount/umount cycles do not accumulate them.  Their nodeids
        # are never reused; a kernel still holding one gets ENOENT.
        while node is not self._root and node.mount is None and not node.children:
            parent = node.parent
            del parent.children[node.name]
            del self._pseudo[node.ino]
            parent.attr = _dir_attr(parent)
            node = parent

    def pseudo_nodes(self) -> int:
        """Number of pseudo directories, the root included (diagnostics and leak tests)."""
        return len(self._pseudo)

    def stale_entry(self, path: str) -> tuple[int | None, bytes]:
        """The entry to invalidate after ``path`` changed: its topmost pruned component, else itself.

        Returns (nodeid of that component's parent, its name), or (None, b"")
        for the root.
        """
        parts = _split(path)
        if not parts:
            return None, b""
        node = parent = self._root
        for part in parts:
            child = node.children.get(part)
            if child is None:
                return node.ino, part
            parent, node = node, child
        return parent.ino, parts[-1]

    def parent_entry(self, path: str) -> tuple[int | None, bytes]:
        """(nodeid of the pseudo parent, name) of ``path``, as the kernel knows them.

        The parent is None when it does not exist (nothing to invalidate) or when
        ``path`` is the root.
        """
        parts = _split(path)
        if not parts:
            return None, b""
        node = self._root
        for part in parts[:-1]:
            node = node.children.get(part)
            if node is None:
                return None, parts[-1]
        return node.ino, parts[-1]

    def instance_at(self, path: str) -> FileSystem | None:
        node = self._node_at(path)
        return None if node is None or node.mount is None else self._instances[node.mount]

    def mounts(self) -> dict[str, FileSystem]:
        return {self._paths[i]: fs for i, fs in self._instances.items()}

    def _node_at(self, path: str) -> _PseudoNode | None:
        node = self._root
        for part in _split(path):
            node = node.children.get(part)
            if node is None:
                return None
        return node

    def _invalidate(self) -> None:
        self._attr_cache.clear()
        self._lookup_cache.clear()

    # -- nodeid translation --------------------------------------------------------------
    def _resolve(self, nodeid: int) -> tuple[FileSystem | None, int]:
        """The one routing point: (instance, local ino) for an instance nodeid,
        (None, pseudo ino) for a pseudo directory; ESTALE after an unmount."""
        idx = nodeid >> _INDEX_SHIFT
        if idx == 0:
            if nodeid == ROOT_ID and self._root_index is not None:
                fs = self._instances[self._root_index]
                return fs, fs.root_ino
            node = self._pseudo.get(nodeid)
            if node is None:
                raise FsError(errno.ENOENT)
            if node.mount is not None:
                fs = self._instances[node.mount]
                return fs, fs.root_ino
            return None, nodeid
        fs = self._instances.get(idx)
        if fs is None:
            raise FsError(errno.ESTALE)
        return fs, nodeid & _LOCAL_MASK

    def _global(self, idx: int, fs: FileSystem, local: int) -> int:
        if local == fs.root_ino and idx == self._root_index:
            return ROOT_ID
        if local > _LOCAL_MASK or local <= 0:
            raise FsError(errno.EOVERFLOW)
        return (idx << _INDEX_SHIFT) | local

    def _index_of(self, nodeid: int) -> int:
        idx = nodeid >> _INDEX_SHIFT
        if idx == 0:
            if nodeid == ROOT_ID and self._root_index is not None:
                return self._root_index
            node = self._pseudo.get(nodeid)
            if node is not None and node.mount is not None:
                return node.mount
        return idx

    def _instance(self, nodeid: int) -> tuple[int, FileSystem, int]:
        """(index, instance, local ino); EROFS for a pseudo directory (nothing can be written there)."""
        fs, local = self._resolve(nodeid)
        if fs is None:
            raise FsError(errno.EROFS)
        return self._index_of(nodeid), fs, local

    def _instance_attr(self, idx: int, fs: FileSystem, local: int) -> Attr:
        """Attributes of a local inode with ``ino`` = its nodeid (memoised for immutable instances)."""
        if not fs.immutable:
            return self._export_attr(idx, fs, fs.getattr(local, None, _NO_CTX), local)
        gid = self._global(idx, fs, local)
        a = self._attr_cache.get(gid)
        if a is None:
            src = fs.getattr(local, None, _NO_CTX)
            a = Attr(gid, src.mode, size=src.size, blocks=src.blocks, nlink=src.nlink, uid=src.uid,
                     gid=src.gid, rdev=src.rdev, mtime=src.mtime, mtimensec=src.mtimensec)
            self._attr_cache[gid] = a
        return a

    def _export_attr(self, idx: int, fs: FileSystem, attr: Attr, local: int) -> Attr:
        """An Attr of a mutable instance's inode ``local``, ``ino`` set to its nodeid in place.

        The seam hands the object over (it may be one the instance returned
        before, already carrying the nodeid: then its packed bytes stay valid).
        """
        gid = self._global(idx, fs, local)
        if attr.ino != gid:
            attr.ino = gid
            attr._packed = None
        return attr

    def _export_entry(self, idx: int, fs: FileSystem, e: Entry) -> Entry:
        if fs.immutable:
            return self._entry_for(idx, fs, e.nodeid)
        if not e.nodeid:
            return e  # a negative entry carries no inode
        gid = self._global(idx, fs, e.nodeid)
        attr = e.attr
        attr.ino = gid
        attr._packed = None
        return Entry(gid, attr, e.generation, e.entry_timeout, e.attr_timeout)

    def _entry_for(self, idx: int, fs: FileSystem, local: int) -> Entry:
        a = self._instance_attr(idx, fs, local)
        return Entry(a.ino, a, 0, _IMAGE_TIMEOUT, _IMAGE_TIMEOUT)

    def _pseudo_entry(self, node: _PseudoNode) -> Entry:
        if node.mount is not None:
            fs = self._instances[node.mount]
            a = self._instance_attr(node.mount, fs, fs.root_ino)
            # The mountpoint itself may be unmounted at any time: short timeouts.
            return Entry(a.ino, a, 0, _PSEUDO_TIMEOUT, _PSEUDO_TIMEOUT)
        return Entry(node.ino, node.attr, 0, _PSEUDO_TIMEOUT, _PSEUDO_TIMEOUT)

    # -- session -------------------------------------------------------------------------
    def init(self, conn: ConnInfo) -> None:
        # An immutable image needs no per-open state: where the kernel supports it,
        # answering OPEN/OPENDIR with ENOSYS makes it stop sending them (and their
        # RELEASEs), two round trips per file saved.  Kernels without the
        # NO_OPEN(DIR)_SUPPORT flags would fail the open instead, so ask first.
        # The kernel remembers the ENOSYS for the whole connection, so a
        # writable VFS (which may hold passthrough instances) never uses it.
        self._skip_open = not self.writable and bool(conn.kernel_flags & _NO_OPEN_SUPPORT)
        self._skip_opendir = not self.writable and bool(conn.kernel_flags & _NO_OPENDIR_SUPPORT)
        log.debug("FUSE session started: %s", conn)

    def destroy(self) -> None:
        for fs in list(self._instances.values()):
            try:
                fs.destroy()
            except Exception:
                log.exception("%s: destroy() raised; it must not", fs.source)
        log.debug("FUSE session ended")

    def release_inode(self, nodeid: int) -> None:
        idx = nodeid >> _INDEX_SHIFT
        if idx == 0:
            return  # pseudo directories (and nodeid 1) live as long as the VFS
        fs = self._instances.get(idx)
        local = nodeid & _LOCAL_MASK
        if fs is not None and local != fs.root_ino:
            fs.release_inode(local)

    # -- names and attributes ---------------------------------------------------------------
    def lookup(self, parent: int, name: bytes, ctx: Context) -> Entry:
        key = (parent, name)
        e = self._lookup_cache.get(key)
        if e is not None:
            return e
        fs, local = self._resolve(parent)
        if fs is None:
            child = self._pseudo[local].children.get(name)
            if child is None:
                raise FsError(errno.ENOENT)
            return self._pseudo_entry(child)
        idx = self._index_of(parent)
        found = fs.lookup(local, name, ctx)
        if not fs.immutable:
            return self._export_entry(idx, fs, found)
        e = self._entry_for(idx, fs, found.nodeid)
        if len(self._lookup_cache) >= _LOOKUP_CACHE_MAX:
            self._lookup_cache.clear()
        self._lookup_cache[key] = e
        return e

    def getattr(self, nodeid: int, fh: int | None, ctx: Context) -> Attr:
        direct = self._mutable_getattr.get(nodeid >> _INDEX_SHIFT)
        if direct is not None:
            # A mutable instance's inode (never memoised): the direct route.
            a = direct(nodeid & _LOCAL_MASK, fh, ctx)
            if a.ino != nodeid:
                a.ino = nodeid
                a._packed = None
            return a
        a = self._attr_cache.get(nodeid)
        if a is not None:
            return a
        fs, local = self._resolve(nodeid)
        if fs is None:
            return self._pseudo[local].attr
        idx = self._index_of(nodeid)
        if fs.immutable:
            return self._instance_attr(idx, fs, local)
        return self._export_attr(idx, fs, fs.getattr(local, fh, ctx), local)

    def readlink(self, nodeid: int, ctx: Context) -> bytes:
        fs, local = self._resolve(nodeid)
        if fs is None:
            raise FsError(errno.EINVAL)
        return fs.readlink(local, ctx)

    def statfs(self, nodeid: int, ctx: Context) -> StatFs:
        fs, local = self._resolve(nodeid)
        return StatFs() if fs is None else fs.statfs(local, ctx)

    def getxattr(self, nodeid: int, name: bytes, ctx: Context) -> bytes:
        fs, local = self._resolve(nodeid)
        if fs is None:
            raise FsError(errno.ENODATA)
        return fs.getxattr(local, name, ctx)

    def listxattr(self, nodeid: int, ctx: Context) -> list[bytes]:
        fs, local = self._resolve(nodeid)
        if fs is None:
            return []
        return fs.listxattr(local, ctx)

    def access(self, nodeid: int, mask: int, ctx: Context) -> None:
        fs, local = self._resolve(nodeid)
        if fs is None:
            if mask & 2:  # W_OK
                raise FsError(errno.EROFS)
            return
        fs.access(local, mask, ctx)

    # -- files ---------------------------------------------------------------------------------
    def open(self, nodeid: int, flags: int, ctx: Context) -> tuple[int, int]:
        fs, local = self._resolve(nodeid)
        if fs is None:
            raise FsError(errno.EISDIR)
        opened = fs.open(local, flags, ctx)  # type errors (EISDIR, ENXIO, EROFS) win over skipping
        if self._skip_open:
            raise FsError(errno.ENOSYS)
        return opened

    async def read(self, nodeid: int, fh: int, offset: int, size: int, ctx: Context) -> ReadData:
        fs, local = self._resolve(nodeid)
        if fs is None:
            raise FsError(errno.EISDIR)
        m = self._metrics[self._index_of(nodeid)]   # every mounted instance has its metrics
        started = time.perf_counter_ns()
        data = await fs.read(local, fh, offset, size, ctx)
        m.read(local, _data_len(data), time.perf_counter_ns() - started)
        return data

    def counters(self) -> tuple[list[int], list[list[int]], list[list[int]]]:
        # The FUSE server bumps fop_hits/fop_errors of the instance a nodeid belongs
        # to (index = nodeid >> 56); index 0 is the pseudo tree, or the instance
        # mounted at "/" (nodeid 1 is its root).  See _set_counters.
        return _FOP_MAP, self._hits, self._errs

    def _set_counters(self) -> None:
        for idx in range(MAX_INSTANCES + 1):
            m = self._metrics.get(idx) if idx else (self._metrics.get(self._root_index)
                                                     if self._root_index is not None else None)
            self._hits[idx] = m.fop_hits if m is not None else [0] * len(FOPS)
            self._errs[idx] = m.fop_errors if m is not None else [0] * len(FOPS)

    def flush(self, nodeid: int, fh: int, lock_owner: int) -> None:
        if not self.writable:
            # Nothing to flush on read-only images; ENOSYS stops the kernel sending a
            # synchronous FLUSH on every close(2), as nydusd does.
            raise FsError(errno.ENOSYS)
        fs, local = self._resolve(nodeid)
        if fs is not None:
            fs.flush(local, fh, lock_owner)

    def release(self, nodeid: int, fh: int, flags: int) -> None:
        fs, local = self._resolve(nodeid)
        if fs is not None:
            fs.release(local, fh, flags)

    def fsync(self, nodeid: int, fh: int, datasync: bool) -> None:
        fs, local = self._resolve(nodeid)
        if fs is not None:
            fs.fsync(local, fh, datasync)

    def lseek(self, nodeid: int, fh: int, offset: int, whence: int) -> int:
        fs, local = self._resolve(nodeid)
        if fs is None:
            raise FsError(errno.EINVAL)
        return fs.lseek(local, fh, offset, whence)

    # -- directories ------------------------------------------------------------------------------
    def opendir(self, nodeid: int, flags: int, ctx: Context) -> tuple[int, int]:
        fs, local = self._resolve(nodeid)
        if fs is not None:
            opened = fs.opendir(local, flags, ctx)
            if self._skip_opendir:
                raise FsError(errno.ENOSYS)
            return opened
        if self._skip_opendir:
            # The kernel then caches pseudo listings too; they are revalidated by
            # the directory's mtime, which changes with every new child.
            raise FsError(errno.ENOSYS)
        return 0, 0

    def releasedir(self, nodeid: int, fh: int) -> None:
        fs, local = self._resolve(nodeid)
        if fs is not None:
            fs.releasedir(local, fh)

    def fsyncdir(self, nodeid: int, fh: int, datasync: bool) -> None:
        fs, local = self._resolve(nodeid)
        if fs is not None:
            fs.fsyncdir(local, fh, datasync)

    def readdir(self, nodeid: int, fh: int, offset: int, ctx: Context) -> Iterator[DirEntry]:
        return self._readdir(nodeid, fh, offset, False, ctx)

    def readdirplus(self, nodeid: int, fh: int, offset: int, ctx: Context) -> Iterator[DirEntry]:
        return self._readdir(nodeid, fh, offset, True, ctx)

    def _readdir(self, nodeid: int, fh: int, offset: int, plus: bool, ctx: Context) -> Iterator[DirEntry]:
        fs, local = self._resolve(nodeid)
        if fs is None:
            return self._pseudo_readdir(self._pseudo[local], offset, plus)
        idx = self._index_of(nodeid)
        dirself = self._global(idx, fs, local)
        if fs.immutable:
            # Entries come from the memoised attrs here, so the instance lists names only.
            it = fs.readdir(local, fh, offset, False, ctx)
            return self._immutable_readdir(idx, fs, it, dirself, plus)
        return self._mutable_readdir(idx, fs, fs.readdir(local, fh, offset, plus, ctx), dirself)

    def _immutable_readdir(self, idx: int, fs: FileSystem, it, dirself: int, plus: bool) -> Iterator[DirEntry]:
        for name, ino, dtype, next_pos, _ in it:
            if name == b"." or name == b"..":
                d_ino = dirself if name == b"." else self._global(idx, fs, ino)
                yield DirEntry(name, d_ino, dtype, next_pos, None)
                continue
            if plus:
                e = self._entry_for(idx, fs, ino)
                yield DirEntry(name, e.nodeid, dtype, next_pos, e)
            else:
                yield DirEntry(name, self._global(idx, fs, ino), dtype, next_pos, None)

    def _mutable_readdir(self, idx: int, fs: FileSystem, it, dirself: int) -> Iterator[DirEntry]:
        try:
            for name, ino, dtype, next_pos, e in it:
                if name == b".":
                    yield DirEntry(name, dirself, dtype, next_pos, None)
                    continue
                if e is not None:
                    e = self._export_entry(idx, fs, e)
                    yield DirEntry(name, e.nodeid, dtype, next_pos, e)
                else:
                    yield DirEntry(name, self._global(idx, fs, ino) if ino else 0, dtype, next_pos, None)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def _pseudo_readdir(self, node: _PseudoNode, offset: int, plus: bool) -> Iterator[DirEntry]:
        items: list[tuple[bytes, int, Entry | None]] = [
            (b".", node.ino, None),
            (b"..", node.parent.ino if node.parent else node.ino, None),
        ]
        for name in sorted(node.children):
            child = node.children[name]
            e = self._pseudo_entry(child)
            items.append((name, e.nodeid, e if plus else None))
        for pos in range(max(offset, 0), len(items)):
            name, ino, e = items[pos]
            yield DirEntry(name, ino, _DT_DIR, pos + 1, e)

    # -- writes (pseudo directories are read-only; instances decide for themselves) ----------
    def setattr(self, nodeid: int, attrs: SetAttr, ctx: Context) -> Attr:
        idx, fs, local = self._instance(nodeid)
        return self._export_attr(idx, fs, fs.setattr(local, attrs, ctx), local)

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, umask: int, ctx: Context) -> Entry:
        idx, fs, local = self._instance(parent)
        return self._export_entry(idx, fs, fs.mknod(local, name, mode, rdev, umask, ctx))

    def mkdir(self, parent: int, name: bytes, mode: int, umask: int, ctx: Context) -> Entry:
        idx, fs, local = self._instance(parent)
        return self._export_entry(idx, fs, fs.mkdir(local, name, mode, umask, ctx))

    def symlink(self, parent: int, name: bytes, target: bytes, ctx: Context) -> Entry:
        idx, fs, local = self._instance(parent)
        return self._export_entry(idx, fs, fs.symlink(local, name, target, ctx))

    def _same_instance(self, fs: FileSystem, nodeid: int) -> int:
        """Local ino of ``nodeid``, which must belong to instance ``fs`` (EXDEV otherwise)."""
        other, local = self._resolve(nodeid)
        if other is not fs:
            raise FsError(errno.EXDEV)
        return local

    def link(self, nodeid: int, newparent: int, newname: bytes, ctx: Context) -> Entry:
        idx, fs, local_parent = self._instance(newparent)
        local = self._same_instance(fs, nodeid)
        return self._export_entry(idx, fs, fs.link(local, local_parent, newname, ctx))

    def unlink(self, parent: int, name: bytes, ctx: Context) -> None:
        _, fs, local = self._instance(parent)
        fs.unlink(local, name, ctx)

    def rmdir(self, parent: int, name: bytes, ctx: Context) -> None:
        _, fs, local = self._instance(parent)
        fs.rmdir(local, name, ctx)

    def rename(self, parent: int, name: bytes, newparent: int, newname: bytes, flags: int,
               ctx: Context) -> None:
        _, fs, local = self._instance(parent)
        fs.rename(local, name, self._same_instance(fs, newparent), newname, flags, ctx)

    def create(self, parent: int, name: bytes, mode: int, flags: int, umask: int,
               ctx: Context) -> tuple[Entry, int, int]:
        idx, fs, local = self._instance(parent)
        entry, fh, open_flags = fs.create(local, name, mode, flags, umask, ctx)
        return self._export_entry(idx, fs, entry), fh, open_flags

    def write(self, nodeid: int, fh: int, offset: int, data: WriteData, write_flags: int,
              ctx: Context) -> int:
        _, fs, local = self._instance(nodeid)
        return fs.write(local, fh, offset, data, write_flags, ctx)

    def setxattr(self, nodeid: int, name: bytes, value: bytes, flags: int, ctx: Context) -> None:
        _, fs, local = self._instance(nodeid)
        fs.setxattr(local, name, value, flags, ctx)

    def removexattr(self, nodeid: int, name: bytes, ctx: Context) -> None:
        _, fs, local = self._instance(nodeid)
        fs.removexattr(local, name, ctx)

    def fallocate(self, nodeid: int, fh: int, offset: int, length: int, mode: int, ctx: Context) -> None:
        _, fs, local = self._instance(nodeid)
        fs.fallocate(local, fh, offset, length, mode, ctx)

    def copy_file_range(self, nodeid_in: int, fh_in: int, off_in: int, nodeid_out: int, fh_out: int,
                        off_out: int, length: int, flags: int, ctx: Context) -> int:
        _, fs, local_in = self._instance(nodeid_in)
        local_out = self._same_instance(fs, nodeid_out)
        return fs.copy_file_range(local_in, fh_in, off_in, local_out, fh_out, off_out, length, flags, ctx)

    def getlk(self, nodeid: int, fh: int, owner: int, lock: FileLock, ctx: Context) -> FileLock:
        fs, local = self._resolve(nodeid)
        if fs is None:
            raise FsError(errno.ENOSYS)
        return fs.getlk(local, fh, owner, lock, ctx)

    def setlk(self, nodeid: int, fh: int, owner: int, lock: FileLock, sleep: bool, flock: bool,
              ctx: Context):
        fs, local = self._resolve(nodeid)
        if fs is None:
            raise FsError(errno.ENOSYS)
        return fs.setlk(local, fh, owner, lock, sleep, flock, ctx)  # a coroutine while SETLKW waits

    def syncfs(self, nodeid: int) -> None:
        fs, local = self._resolve(nodeid)
        if fs is not None:
            fs.syncfs(local)


def _split(path: str) -> list[bytes]:
    if not isinstance(path, str) or not path.startswith("/"):
        raise FsError(errno.EINVAL, f"mountpoint {path!r} must be an absolute path")
    parts = [p for p in path.split("/") if p]
    for p in parts:
        if p in (".", "..") or len(p.encode()) > 255 or "\0" in p:
            raise FsError(errno.EINVAL, f"mountpoint {path!r} has an invalid component {p!r}")
    return [p.encode() for p in parts]


def normalize_pseudo_path(path: str) -> str:
    """``path`` as the VFS keys mounts (``/a//b/`` -> ``/a/b``); FsError(EINVAL) when invalid."""
    return "/" + "/".join(p.decode() for p in _split(path))


def _dir_attr(node: _PseudoNode) -> Attr:
    nlink = 2 + len(node.children)
    now = time.time_ns()
    return Attr(node.ino, stat.S_IFDIR | 0o755, size=4096, nlink=nlink, mtime=now // 10**9,
                mtimensec=now % 10**9)
