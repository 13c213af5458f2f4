"""The pseudo-mount VFS: several RAFS instances inside one FUSE/virtio-fs export.

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
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections import deque
from collections.abc import Iterator

from ..errors import FsError
from ..fuse.ops import ROOT_ID, Attr, ConnInfo, Context, DirEntry, Entry, Operations, ReadData, StatFs
from .rafs import RafsFs

__all__ = ["Vfs", "MAX_INSTANCES"]

log = logging.getLogger("nydus_vfs.fs")

_INDEX_SHIFT = 56
_LOCAL_MASK = (1 << _INDEX_SHIFT) - 1
MAX_INSTANCES = 255

# Pseudo directories can change (mounts come and go): short timeouts.  Image
# inodes never change while their instance is mounted: long ones.
_PSEUDO_TIMEOUT = 1.0
_IMAGE_TIMEOUT = 86400.0

_FOPEN_KEEP_CACHE = 1 << 1
_FOPEN_CACHE_DIR = 1 << 3
_DT_DIR = 4

_LOOKUP_CACHE_MAX = 1 << 20

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
    """FUSE ``Operations`` over a pseudo tree holding RAFS instances.

    Thread-safety: none needed; the daemon runs one event loop and all mount
    changes happen on it.
    """

    attr_timeout = _IMAGE_TIMEOUT
    entry_timeout = _IMAGE_TIMEOUT

    def __init__(self) -> None:
        self._root = _PseudoNode(ROOT_ID, b"/", None)
        self._root.parent = self._root
        self._pseudo: dict[int, _PseudoNode] = {ROOT_ID: self._root}
        self._next_pseudo = ROOT_ID + 1
        self._instances: dict[int, RafsFs] = {}
        self._paths: dict[int, str] = {}
        self._free = deque(range(1, MAX_INSTANCES + 1))
        self._root_index: int | None = None
        self._attr_cache: dict[int, Attr] = {}
        self._lookup_cache: dict[tuple[int, bytes], Entry] = {}
        self._skip_open = False
        self._skip_opendir = False

    # -- mount table (Python API; the HTTP API drives it later) ------------------------
    def mount(self, path: str, fs: RafsFs) -> int:
        """Mount ``fs`` at pseudo ``path``; returns its instance index.

        FsError(EEXIST) if something is mounted there, EINVAL for a bad path,
        ENOSPC when all 255 instance slots are used.
        """
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
        self._paths[idx] = "/" + "/".join(p.decode() for p in parts)
        node.mount = idx
        if node is self._root:
            self._root_index = idx
        self._invalidate()
        log.info("mounted %s at %s (instance %d)", fs.source or "rafs", self._paths[idx], idx)
        return idx

    def umount(self, path: str) -> RafsFs:
        """Unmount the instance at ``path`` and return it (the caller closes it)."""
        node = self._node_at(path)
        if node is None or node.mount is None:
            raise FsError(errno.ENOENT, f"{path}: nothing mounted")
        idx = node.mount
        node.mount = None
        if node is self._root:
            self._root_index = None
        fs = self._instances.pop(idx)
        del self._paths[idx]
        self._free.append(idx)
        self._invalidate()
        log.info("unmounted %s (instance %d)", path, idx)
        return fs

    def instance_at(self, path: str) -> RafsFs | None:
        node = self._node_at(path)
        return None if node is None or node.mount is None else self._instances[node.mount]

    def mounts(self) -> dict[str, RafsFs]:
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

    # -- nodeid translation ------------------------------------------------------------
    def _resolve(self, nodeid: int) -> tuple[RafsFs | None, int]:
        """(instance, local ino) for an image nodeid, (None, pseudo ino) for a pseudo one."""
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

    def _global(self, idx: int, fs: RafsFs, local: int) -> int:
        if local == fs.root_ino and idx == self._root_index:
            return ROOT_ID
        if local > _LOCAL_MASK:
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

    def _image_attr(self, idx: int, fs: RafsFs, local: int) -> Attr:
        gid = self._global(idx, fs, local)
        a = self._attr_cache.get(gid)
        if a is None:
            src = fs.attr(local)
            a = Attr(gid, src.mode, size=src.size, blocks=src.blocks, nlink=src.nlink, uid=src.uid,
                     gid=src.gid, rdev=src.rdev, mtime=src.mtime, mtimensec=src.mtimensec)
            self._attr_cache[gid] = a
        return a

    def _entry_for(self, idx: int, fs: RafsFs, local: int) -> Entry:
        a = self._image_attr(idx, fs, local)
        return Entry(a.ino, a, 0, _IMAGE_TIMEOUT, _IMAGE_TIMEOUT)

    def _pseudo_entry(self, node: _PseudoNode) -> Entry:
        if node.mount is not None:
            fs = self._instances[node.mount]
            a = self._image_attr(node.mount, fs, fs.root_ino)
            # The mountpoint itself may be unmounted at any time: short timeouts.
            return Entry(a.ino, a, 0, _PSEUDO_TIMEOUT, _PSEUDO_TIMEOUT)
        return Entry(node.ino, node.attr, 0, _PSEUDO_TIMEOUT, _PSEUDO_TIMEOUT)

    # -- Operations ------------------------------------------------------------------------
    def init(self, conn: ConnInfo) -> None:
        # An immutable image needs no per-open state: where the kernel supports it,
        # answering OPEN/OPENDIR with ENOSYS makes it stop sending them (and their
        # RELEASEs), two round trips per file saved.  Kernels without the
        # NO_OPEN(DIR)_SUPPORT flags would fail the open instead, so ask first.
        self._skip_open = bool(conn.kernel_flags & _NO_OPEN_SUPPORT)
        self._skip_opendir = bool(conn.kernel_flags & _NO_OPENDIR_SUPPORT)
        log.debug("FUSE session started: %s", conn)

    def destroy(self) -> None:
        log.debug("FUSE session ended")

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
        e = self._entry_for(idx, fs, fs.lookup(local, name))
        if len(self._lookup_cache) >= _LOOKUP_CACHE_MAX:
            self._lookup_cache.clear()
        self._lookup_cache[key] = e
        return e

    def getattr(self, nodeid: int, fh: int | None, ctx: Context) -> Attr:
        a = self._attr_cache.get(nodeid)
        if a is not None:
            return a
        fs, local = self._resolve(nodeid)
        if fs is None:
            return self._pseudo[local].attr
        return self._image_attr(self._index_of(nodeid), fs, local)

    def readlink(self, nodeid: int, ctx: Context) -> bytes:
        fs, local = self._resolve(nodeid)
        if fs is None:
            raise FsError(errno.EINVAL)
        return fs.readlink(local)

    def open(self, nodeid: int, flags: int, ctx: Context) -> tuple[int, int]:
        fs, local = self._resolve(nodeid)
        if fs is None:
            raise FsError(errno.EISDIR)
        mode = fs.attr(local).mode
        if stat.S_ISDIR(mode):
            raise FsError(errno.EISDIR)
        if not stat.S_ISREG(mode):
            # Only regular files carry data; devices and fifos are never opened here.
            raise FsError(errno.ENXIO)
        if self._skip_open:
            raise FsError(errno.ENOSYS)
        return 0, _FOPEN_KEEP_CACHE

    def flush(self, nodeid: int, fh: int, lock_owner: int) -> None:
        # Nothing to flush on a read-only image; ENOSYS stops the kernel sending a
        # synchronous FLUSH on every close(2), as nydusd does.
        raise FsError(errno.ENOSYS)

    async def read(self, nodeid: int, fh: int, offset: int, size: int, ctx: Context) -> ReadData:
        fs, local = self._resolve(nodeid)
        if fs is None:
            raise FsError(errno.EISDIR)
        return await fs.read(local, offset, size)

    def lseek(self, nodeid: int, fh: int, offset: int, whence: int) -> int:
        fs, local = self._resolve(nodeid)
        if fs is None:
            raise FsError(errno.EINVAL)
        a = fs.attr(local)
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

    def opendir(self, nodeid: int, flags: int, ctx: Context) -> tuple[int, int]:
        fs, local = self._resolve(nodeid)
        if fs is not None:
            if not stat.S_ISDIR(fs.attr(local).mode):
                raise FsError(errno.ENOTDIR)
            if self._skip_opendir:
                raise FsError(errno.ENOSYS)
            return 0, _FOPEN_KEEP_CACHE | _FOPEN_CACHE_DIR
        if self._skip_opendir:
            # The kernel then caches pseudo listings too; they are revalidated by
            # the directory's mtime, which changes with every new child.
            raise FsError(errno.ENOSYS)
        return 0, 0

    def readdir(self, nodeid: int, fh: int, offset: int, ctx: Context) -> Iterator[DirEntry]:
        return self._readdir(nodeid, offset, plus=False)

    def readdirplus(self, nodeid: int, fh: int, offset: int, ctx: Context) -> Iterator[DirEntry]:
        return self._readdir(nodeid, offset, plus=True)

    def _readdir(self, nodeid: int, offset: int, plus: bool) -> Iterator[DirEntry]:
        fs, local = self._resolve(nodeid)
        if fs is None:
            return self._pseudo_readdir(self._pseudo[local], offset, plus)
        return self._image_readdir(self._index_of(nodeid), fs, local, offset, plus)

    def _image_readdir(self, idx: int, fs: RafsFs, local: int, offset: int,
                       plus: bool) -> Iterator[DirEntry]:
        # Validate eagerly so ENOTDIR/EIO surface from the call, not mid-iteration.
        it = fs.children(local, offset)
        dirself = self._global(idx, fs, local)

        def gen() -> Iterator[DirEntry]:
            for next_pos, name, ino, dtype in it:
                if name == b"." or name == b"..":
                    d_ino = dirself if name == b"." else self._global(idx, fs, ino)
                    yield DirEntry(name, d_ino, dtype, next_pos, None)
                    continue
                if plus:
                    e = self._entry_for(idx, fs, ino)
                    yield DirEntry(name, e.nodeid, dtype, next_pos, e)
                else:
                    yield DirEntry(name, self._global(idx, fs, ino), dtype, next_pos, None)

        return gen()

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

    def statfs(self, nodeid: int, ctx: Context) -> StatFs:
        fs, _ = self._resolve(nodeid)
        return StatFs() if fs is None else fs.statfs()

    def getxattr(self, nodeid: int, name: bytes, ctx: Context) -> bytes:
        fs, local = self._resolve(nodeid)
        if fs is None:
            raise FsError(errno.ENODATA)
        value = fs.xattrs(local).get(name)
        if value is None:
            raise FsError(errno.ENODATA)
        return value

    def listxattr(self, nodeid: int, ctx: Context) -> list[bytes]:
        fs, local = self._resolve(nodeid)
        if fs is None:
            return []
        return list(fs.xattrs(local))

    def access(self, nodeid: int, mask: int, ctx: Context) -> None:
        fs, local = self._resolve(nodeid)
        if fs is None:
            if mask & 2:  # W_OK
                raise FsError(errno.EROFS)
            return
        fs.access(local, mask, ctx)


def _split(path: str) -> list[bytes]:
    if not isinstance(path, str) or not path.startswith("/"):
        raise FsError(errno.EINVAL, f"mountpoint {path!r} must be an absolute path")
    parts = [p for p in path.split("/") if p]
    for p in parts:
        if p in (".", "..") or len(p.encode()) > 255 or "\0" in p:
            raise FsError(errno.EINVAL, f"mountpoint {path!r} has an invalid component {p!r}")
    return [p.encode() for p in parts]


def _dir_attr(node: _PseudoNode) -> Attr:
    nlink = 2 + len(node.children)
    now = time.time_ns()
    return Attr(node.ino, stat.S_IFDIR | 0o755, size=4096, nlink=nlink, mtime=now // 10**9,
                mtimensec=now % 10**9)
