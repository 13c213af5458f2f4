"""A host directory served read-write to the guest (Kata's ``passthrough_fs``).

``PassthroughFs`` implements :class:`~nydus_vfs.fs._seam.FileSystem` over a
shared directory; the :class:`~nydus_vfs.fs.vfs.Vfs` mounts it at a pseudo path
next to RAFS images (``/containers`` in Kata's layout, nydus-surface.md §8.3).
The reference behaviour is QEMU's C virtiofsd with ``cache=auto``; the bar for
safety is the Rust virtiofsd's sandbox.

Safety: the guest is hostile
----------------------------
* Every inode the guest knows is held as an ``O_PATH`` fd, keyed by
  ``(st_dev, st_ino, mount id)`` so hard links share one inode.  No operation
  ever resolves a path: each one names a single component relative to a held
  directory fd.  Components are checked (no ``/``, no NUL, not ``.`` or ``..``,
  at most 255 bytes) and opened with ``openat2(RESOLVE_BENEATH |
  RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`` and ``O_NOFOLLOW`` (plain
  ``openat(O_NOFOLLOW)`` where openat2 is missing, which is equivalent for one
  component).  A symlink is therefore always the link itself, never its target:
  a host symlink to ``/etc`` is a symlink inode, and a LOOKUP in it is ENOTDIR.
  A directory renamed away or swapped for a symlink between two requests
  changes nothing: the held fd still names the directory the guest looked up.
* Data and attribute calls go through the held fd: ``fstat``, ``fchownat(fd,
  "", AT_EMPTY_PATH)``, ``utimensat(fd, "", AT_EMPTY_PATH)``, and the
  ``/proc/self/fd/N`` magic link where Linux has no fd-based call (reopening
  a regular file or directory, chmod, truncate, xattrs, linkat).  That magic
  link always lands on the held inode itself; it is only used for regular
  files and directories, or for calls that never open (xattrs).  OPEN is
  refused for anything but regular files (ENXIO), so a device node or FIFO the
  guest creates is never opened on the host.
* Credentials: file-creating calls (CREATE, MKNOD, MKDIR, SYMLINK) run under
  the request's uid/gid with ``setfsuid``/``setfsgid`` on the calling thread
  (the event loop's), as virtiofsd does; permission checks happen in the
  guest (virtio-fs mounts with ``default_permissions``).  Supplementary groups
  are not applied.  A daemon that is not root cannot switch: new files are
  then owned by the daemon's user (logged once at start).  The host umask is
  undone on the modes the guest asked for (the guest already applied its own).
* Bounded host resources: at most ``max_inode_fds`` O_PATH fds stay open for
  inodes that can be reopened by file handle (``name_to_handle_at``, needs
  CAP_DAC_READ_SEARCH to reopen); the least recently used are closed and
  reopened on demand, checked against their key.  Inodes without a usable
  handle keep their fd; their number is bounded by the FUSE server's
  ``max_nodeids``.  Open files and directories are bounded by ``max_handles``
  (EMFILE beyond).  FORGET (``release_inode``) drops an inode and its fd.

Data path: READ answers a :class:`~nydus_vfs.fuse.ops.FileSegment` of the open
file, which the transport ``preadv``s straight into guest memory (or splices
into /dev/fuse); WRITE hands the request buffer to ``pwrite`` without a copy in
Python, or, for a long virtio-fs WRITE, lets the
:class:`~nydus_vfs.utils.io.WritePayload` ``pwritev`` straight from guest memory.

Locks (negotiated only with ``FuseServer(posix_locks=True)``, off by default
like virtiofsd's) are OFD locks on the open file, so they belong to the FUSE
file handle rather than to the guest's lock owner; a contended SETLKW waits in
a coroutine, never on the event loop.  Not supported: TMPFILE, DAX windows,
``security.*`` xattr remapping.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import logging
import os
import stat
import struct
from collections import OrderedDict
from collections.abc import Iterator

from .._native import binding
from ..errors import ConfigError, FsError
from ..fuse import abi
from ..fuse.ops import Attr, Context, DirEntry, Entry, FileLock, FileSegment, ReadData, SetAttr, StatFs, WriteData
from . import _linux

__all__ = ["PassthroughFs"]

log = logging.getLogger("nydus_vfs.fs.passthrough")

_ROOT = 1
#: cache=auto: the guest revalidates names and attributes after a second.
_TIMEOUT = 1.0
#: d_ino of a READDIR entry whose inode the guest has not looked up (libfuse's FUSE_UNKNOWN_INO).
_UNKNOWN_INO = 0xFFFF_FFFF

# Guest open(2) flags (asm-generic, x86-64 and aarch64 guests alike for these bits);
# the ones fuse/abi.py does not name.
_G_DSYNC = 0o10000
_G_DIRECT = 0o40000
_G_SYNC = 0o4010000

_RENAME_FLAGS = 1 | 2 | 4   # NOREPLACE, EXCHANGE, WHITEOUT
_OFFSET_MAX = 0x7FFF_FFFF_FFFF_FFFF
_FLOCK = struct.Struct("hh4xqqi4x")  # struct flock on 64-bit Linux
_F_OFD_GETLK, _F_OFD_SETLK = 36, 37

_O_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_RESOLVE = _linux.RESOLVE_BENEATH | _linux.RESOLVE_NO_SYMLINKS | _linux.RESOLVE_NO_MAGICLINKS
_DTYPE = {stat.S_IFDIR: 4, stat.S_IFREG: 8, stat.S_IFLNK: 10, stat.S_IFCHR: 2, stat.S_IFBLK: 6,
          stat.S_IFIFO: 1, stat.S_IFSOCK: 12}


def _proc(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def _fs_errors(method):
    """Turn an OSError of a system call into FsError(errno); FsError passes as is.

    Values the guest chose that no system call can take (offsets beyond 2**63,
    a mode that is not a C int) are EINVAL, not a filesystem bug.
    """
    @functools.wraps(method)
    def wrapper(*args, **kw):
        try:
            return method(*args, **kw)
        except FsError:
            raise
        except OSError as exc:
            raise FsError(exc.errno or errno.EIO) from None
        except (OverflowError, ValueError, struct.error, ctypes.ArgumentError):
            raise FsError(errno.EINVAL) from None
    return wrapper


def _check_name(name: bytes) -> None:
    """One path component the guest may name: never '.', '..', '/', NUL or empty."""
    if not name or name == b"." or name == b".." or b"/" in name or b"\0" in name:
        raise FsError(errno.EINVAL, f"invalid name {name!r}")
    if len(name) > 255:
        raise FsError(errno.ENAMETOOLONG)


def _encode_rdev(rdev: int) -> int:
    """Host dev_t as the kernel's new_encode_dev() u32 that fuse_attr.rdev carries."""
    major, minor = os.major(rdev), os.minor(rdev)
    return (minor & 0xFF) | ((major & 0xFFF) << 8) | ((minor & ~0xFF) << 12)


def _decode_rdev(rdev: int) -> int:
    """fuse_mknod_in.rdev (new_encode_dev) as a host dev_t."""
    return os.makedev((rdev & 0xFFF00) >> 8, (rdev & 0xFF) | ((rdev >> 12) & 0xFFF00))


def _attr(ino: int, st: os.stat_result, _new=Attr.__new__) -> Attr:
    # Slots filled one by one: Attr(**kwargs) costs four times as much, and this
    # runs for every GETATTR, LOOKUP and READDIRPLUS entry.
    a = _new(Attr)
    a.ino = ino
    a.mode = st.st_mode
    a.size = st.st_size
    a.blocks = st.st_blocks
    a.nlink = st.st_nlink
    a.uid = st.st_uid
    a.gid = st.st_gid
    rdev = st.st_rdev
    a.rdev = _encode_rdev(rdev) if rdev else 0
    a.mtime, a.mtimensec = divmod(st.st_mtime_ns, 1_000_000_000)
    a.atime, a.atimensec = divmod(st.st_atime_ns, 1_000_000_000)
    a.ctime, a.ctimensec = divmod(st.st_ctime_ns, 1_000_000_000)
    a.blksize = st.st_blksize
    a.timeout = _TIMEOUT  # the host may change it: GETATTR answers are revalidated like entries
    a._packed = None
    return a


class _Inode:
    __slots__ = ("ino", "key", "fd", "handle", "fmt", "seen", "attr")

    def __init__(self, ino: int, key: tuple[int, int, int], fd: int, handle: bytes | None, fmt: int) -> None:
        self.ino = ino
        self.key = key
        self.fd = fd              # O_PATH fd, -1 while evicted
        self.handle = handle      # file handle to reopen it, None: never evicted
        self.fmt = fmt            # S_IFMT bits; an inode never changes type
        self.seen: bytes | tuple | None = None   # the stat the last Attr was built from (StatProbe bytes)
        self.attr: Attr | None = None


class _Handle:
    __slots__ = ("fd", "ino", "entries")

    def __init__(self, fd: int, ino: int) -> None:
        self.fd = fd
        self.ino = ino
        self.entries: list[tuple[bytes, int, int]] | None = None  # directory snapshot (readdir)


class _Creds:
    """setfsuid/setfsgid for the duration of one call on this thread."""

    __slots__ = ("uid", "gid")

    def __init__(self, uid: int, gid: int) -> None:
        self.uid = uid
        self.gid = gid

    def __enter__(self) -> None:
        _linux.setfsgid(self.gid)
        _linux.setfsuid(self.uid)

    def __exit__(self, *exc) -> None:
        _linux.setfsuid(0)
        _linux.setfsgid(0)


class _NoCreds:
    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        return None


_NO_CREDS = _NoCreds()


class PassthroughFs:
    """A shared host directory as a FileSystem instance (see the module docstring).

    Build it with :meth:`from_path`.  Not thread-safe: every call comes from the
    event loop's thread (credentials are switched per thread).
    """

    immutable = False
    root_ino = _ROOT

    def __init__(self, source: str, root_fd: int, mount_fd: int, *, writable: bool, max_inode_fds: int,
                 max_handles: int) -> None:
        self.source = source
        self.readonly = not writable
        self.max_inode_fds = max_inode_fds
        self.max_handles = max_handles
        self._mount_fd = mount_fd
        st = os.fstat(root_fd)
        self._root_mnt = _linux.mount_id(root_fd)
        root = _Inode(_ROOT, (st.st_dev, st.st_ino, self._root_mnt), root_fd, None, stat.S_IFDIR)
        self._inodes: dict[int, _Inode] = {_ROOT: root}
        self._by_key: dict[tuple[int, int, int], _Inode] = {root.key: root}
        self._lru: OrderedDict[int, _Inode] = OrderedDict()
        self._next_ino = _ROOT + 1
        self._handles: dict[int, _Handle] = {}
        self._next_fh = 1
        # Handles are worth keeping only if they can be reopened (CAP_DAC_READ_SEARCH).
        self._use_handles = self._probe_handles(root_fd)
        self._switch_creds = os.geteuid() == 0
        self._umask = _current_umask()
        # GETATTR's change check: a raw fstat where the native shim is built
        # (the cffi module binds fstat beside it), os.stat otherwise.
        self._stat_probe = binding.StatProbe() if binding.available() else None
        if not self._switch_creds:
            log.warning("%s: nydusd is not root: files the guest creates are owned by uid %d, not the "
                        "guest's user", source, os.geteuid())
        if not self._use_handles:
            log.info("%s: no reopenable file handles here; inode fds stay open until FORGET "
                     "(bounded by the FUSE server's max_nodeids)", source)

    @classmethod
    def from_path(cls, source: str, *, writable: bool = True, max_inode_fds: int = 1024,
             max_handles: int = 4096) -> "PassthroughFs":
        """Share directory ``source``.  ConfigError if it is not an accessible directory.

        ``writable=False`` serves it read-only (every write EROFS).  The caller
        mounts the result in a ``Vfs(writable=True)`` and closes it after the
        unmount.
        """
        if max_inode_fds < 16:
            raise ConfigError(f"max_inode_fds={max_inode_fds}: must be at least 16")
        if max_handles < 1:
            raise ConfigError(f"max_handles={max_handles}: must be positive")
        try:
            root_fd = os.open(source, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise ConfigError(f"shared directory {source!r}: {exc.strerror}") from None
        try:
            mount_fd = os.open(_proc(root_fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            os.close(root_fd)
            raise ConfigError(f"shared directory {source!r}: cannot open it: {exc.strerror}") from None
        return cls(os.path.abspath(source), root_fd, mount_fd, writable=writable, max_inode_fds=max_inode_fds,
                   max_handles=max_handles)

    def _probe_handles(self, root_fd: int) -> bool:
        handle = _linux.name_to_handle(root_fd)
        if handle is None:
            return False
        try:
            fd = _linux.open_by_handle(self._mount_fd, handle, _O_PATH)
        except OSError:
            return False
        os.close(fd)
        return True

    # -- lifetime ------------------------------------------------------------------
    @property
    def open_fds(self) -> int:
        """Host fds held right now (inodes + open files/dirs + the two root fds); diagnostics, tests."""
        return sum(1 for i in self._inodes.values() if i.fd >= 0) + len(self._handles) + 1

    @property
    def inode_count(self) -> int:
        return len(self._inodes)

    def destroy(self) -> None:
        for h in self._handles.values():
            _close(h.fd)
        self._handles.clear()
        for inode in self._inodes.values():
            if inode.ino != _ROOT and inode.fd >= 0:
                _close(inode.fd)
        root = self._inodes[_ROOT]
        self._inodes = {_ROOT: root}
        self._by_key = {root.key: root}
        self._lru.clear()

    def close(self) -> None:
        self.destroy()
        root = self._inodes[_ROOT]
        if root.fd >= 0:
            _close(root.fd)
            root.fd = -1
        if self._mount_fd >= 0:
            _close(self._mount_fd)
            self._mount_fd = -1

    def release_inode(self, ino: int) -> None:
        inode = self._inodes.get(ino)
        if inode is None or ino == _ROOT:
            return
        del self._inodes[ino]
        if self._by_key.get(inode.key) is inode:
            del self._by_key[inode.key]
        self._lru.pop(ino, None)
        if inode.fd >= 0:
            _close(inode.fd)
            inode.fd = -1

    # -- inode table ------------------------------------------------------------------
    def _get(self, ino: int) -> _Inode:
        inode = self._inodes.get(ino)
        if inode is None:
            raise FsError(errno.ESTALE)
        return inode

    def _fd(self, inode: _Inode) -> int:
        """The O_PATH fd of ``inode``, reopened by handle if it was evicted."""
        fd = inode.fd
        if fd >= 0:
            if inode.handle is not None:
                self._lru.move_to_end(inode.ino)
            return fd
        try:
            fd = _linux.open_by_handle(self._mount_fd, inode.handle, _O_PATH)
        except OSError as exc:
            # Deleted meanwhile (ESTALE) or the handle no longer opens.
            raise FsError(errno.ESTALE if exc.errno in (errno.ESTALE, errno.ENOENT) else exc.errno) from None
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != inode.key[:2]:
            os.close(fd)
            raise FsError(errno.ESTALE)
        inode.fd = fd
        self._lru[inode.ino] = inode
        self._evict()
        return fd

    def _evict(self) -> None:
        # The entries touched by the current request sit at the end of the LRU
        # order, so they are never the ones closed here (max_inode_fds >= 16).
        lru = self._lru
        while len(lru) > self.max_inode_fds:
            _, old = lru.popitem(last=False)
            _close(old.fd)
            old.fd = -1

    def _open_child(self, parent_fd: int, name: bytes) -> int:
        """O_PATH fd of ``name`` in the directory ``parent_fd``; symlinks are never followed."""
        if _linux.HAVE_OPENAT2:
            return _linux.openat2(parent_fd, name, _O_PATH, _RESOLVE)
        return os.open(name, _O_PATH, dir_fd=parent_fd)

    def _register(self, fd: int, st: os.stat_result | None = None) -> tuple[_Inode, os.stat_result]:
        """The inode for the O_PATH ``fd`` (ownership of ``fd`` passes here)."""
        try:
            if st is None:
                st = os.fstat(fd)
            key = (st.st_dev, st.st_ino, _linux.mount_id(fd))
        except OSError:
            os.close(fd)
            raise
        fmt = stat.S_IFMT(st.st_mode)
        inode = self._by_key.get(key)
        if inode is not None and inode.fmt == fmt:
            if inode.fd < 0:
                inode.fd = fd
                self._lru[inode.ino] = inode
                self._evict()
            else:
                os.close(fd)
                if inode.handle is not None:
                    self._lru.move_to_end(inode.ino)
            return inode, st
        # New (or an inode number the host reused for a file of another type).
        handle = None
        if self._use_handles and key[2] == self._root_mnt:
            handle = _linux.name_to_handle(fd)
        inode = _Inode(self._next_ino, key, fd, handle, fmt)
        self._next_ino += 1
        self._inodes[inode.ino] = inode
        self._by_key[key] = inode
        if handle is not None:
            self._lru[inode.ino] = inode
            self._evict()
        return inode, st

    def _entry(self, inode: _Inode, st: os.stat_result) -> Entry:
        return Entry(inode.ino, _attr(inode.ino, st), 0, _TIMEOUT, _TIMEOUT)

    def _lookup(self, parent: int, name: bytes) -> Entry:
        _check_name(name)
        pfd = self._fd(self._get(parent))
        inode, st = self._register(self._open_child(pfd, name))
        return self._entry(inode, st)

    def _handle(self, fh: int) -> _Handle:
        h = self._handles.get(fh)
        if h is None:
            raise FsError(errno.EBADF)
        return h

    def _new_handle(self, fd: int, ino: int) -> int:
        if len(self._handles) >= self.max_handles:
            os.close(fd)
            raise FsError(errno.EMFILE, "too many open files in the shared directory")
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = _Handle(fd, ino)
        return fh

    def _writable(self) -> None:
        if self.readonly:
            raise FsError(errno.EROFS)

    def _creds(self, ctx: Context):
        if not self._switch_creds or (ctx.uid == 0 and ctx.gid == 0):
            return _NO_CREDS
        return _Creds(ctx.uid, ctx.gid)

    def _fix_mode(self, fd: int, st: os.stat_result, mode: int) -> os.stat_result:
        """Undo the host umask on a node just created with ``mode`` (the guest applied its own)."""
        want = mode & 0o7777
        if not want & self._umask or stat.S_ISLNK(st.st_mode):
            return st
        if st.st_mode & 0o7777 != want & ~self._umask:
            return st  # not the node we just made (or changed already): leave it alone
        os.chmod(_proc(fd), want)
        return os.fstat(fd)

    # -- names and attributes ------------------------------------------------------------
    @_fs_errors
    def lookup(self, parent: int, name: bytes, ctx: Context) -> Entry:
        return self._lookup(parent, name)

    def getattr(self, ino: int, fh: int | None, ctx: Context) -> Attr:
        # The hottest call: no decorator, the inode fd fast path inlined.
        inode = self._inodes.get(ino)
        if inode is None:
            raise FsError(errno.ESTALE)
        fd = inode.fd
        probe = self._stat_probe
        try:
            # (An open fd is used without touching the LRU order: only name
            # lookups count as use, which keeps this path to one syscall.)
            if fd < 0:
                fd = self._fd(inode)
            if probe is not None:
                # Unchanged since the last answer (the raw struct stat, every
                # field to the nanosecond): the same Attr, packed once.
                seen = probe(fd)
                if seen == inode.seen:
                    return inode.attr
                st = os.stat(fd)
            else:
                st = os.stat(fd)
                seen = (st[:7], st.st_ctime_ns, st.st_mtime_ns, st.st_atime_ns, st.st_blocks)  # mode..size + rest
                if seen == inode.seen:
                    return inode.attr
        except FsError:
            raise
        except OSError as exc:
            raise FsError(exc.errno or errno.EIO) from None
        # A change between the probe and os.stat only makes the next probe
        # differ again (one more rebuild), never a stale answer.
        a = _attr(ino, st)
        inode.seen = seen
        inode.attr = a
        return a

    @_fs_errors
    def readlink(self, ino: int, ctx: Context) -> bytes:
        inode = self._get(ino)
        if inode.fmt != stat.S_IFLNK:
            raise FsError(errno.EINVAL)
        return os.readlink(b"", dir_fd=self._fd(inode))

    @_fs_errors
    def access(self, ino: int, mask: int, ctx: Context) -> None:
        st = os.stat(self._fd(self._get(ino)))
        if mask == os.F_OK:
            return
        if mask & os.W_OK and self.readonly:
            raise FsError(errno.EROFS)
        if ctx.uid == 0:
            if mask & os.X_OK and not st.st_mode & 0o111 and not stat.S_ISDIR(st.st_mode):
                raise FsError(errno.EACCES)
            return
        if ctx.uid == st.st_uid:
            bits = (st.st_mode >> 6) & 7
        elif ctx.gid == st.st_gid:
            bits = (st.st_mode >> 3) & 7
        else:
            bits = st.st_mode & 7
        if mask & ~bits & 7:
            raise FsError(errno.EACCES)

    @_fs_errors
    def statfs(self, ino: int, ctx: Context) -> StatFs:
        s = os.statvfs(self._fd(self._get(ino)))
        return StatFs(blocks=s.f_blocks, bfree=s.f_bfree, bavail=s.f_bavail, files=s.f_files, ffree=s.f_ffree,
                      bsize=s.f_bsize, namelen=s.f_namemax, frsize=s.f_frsize)

    @_fs_errors
    def getxattr(self, ino: int, name: bytes, ctx: Context) -> bytes:
        return os.getxattr(_proc(self._fd(self._get(ino))), name)

    @_fs_errors
    def listxattr(self, ino: int, ctx: Context) -> list[bytes]:
        return [os.fsencode(n) for n in os.listxattr(_proc(self._fd(self._get(ino))))]

    @_fs_errors
    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int, ctx: Context) -> None:
        self._writable()
        os.setxattr(_proc(self._fd(self._get(ino))), name, value, flags & 3)

    @_fs_errors
    def removexattr(self, ino: int, name: bytes, ctx: Context) -> None:
        self._writable()
        os.removexattr(_proc(self._fd(self._get(ino))), name)

    @_fs_errors
    def setattr(self, ino: int, attrs: SetAttr, ctx: Context) -> Attr:
        self._writable()
        inode = self._get(ino)
        fd = self._fd(inode)
        valid = attrs.valid
        h = self._handles.get(attrs.fh) if valid & abi.FATTR_FH else None
        hfd = h.fd if h is not None and h.ino == ino else -1
        if valid & abi.FATTR_MODE:
            if hfd >= 0:
                os.fchmod(hfd, attrs.mode & 0o7777)
            elif inode.fmt == stat.S_IFLNK:
                raise FsError(errno.EOPNOTSUPP)
            else:
                os.chmod(_proc(fd), attrs.mode & 0o7777)
        if valid & (abi.FATTR_UID | abi.FATTR_GID):
            uid = attrs.uid if valid & abi.FATTR_UID else 0xFFFF_FFFF
            gid = attrs.gid if valid & abi.FATTR_GID else 0xFFFF_FFFF
            _linux.fchownat(fd, b"", uid, gid, _linux.AT_EMPTY_PATH)
        if valid & abi.FATTR_SIZE:
            if hfd >= 0:
                os.ftruncate(hfd, attrs.size)
            elif inode.fmt != stat.S_IFREG:
                raise FsError(errno.EISDIR if inode.fmt == stat.S_IFDIR else errno.EINVAL)
            else:
                os.truncate(_proc(fd), attrs.size)
        if valid & (abi.FATTR_ATIME | abi.FATTR_MTIME):
            atime = mtime = (0, _linux.UTIME_OMIT)
            if valid & abi.FATTR_ATIME:
                atime = (0, _linux.UTIME_NOW) if valid & abi.FATTR_ATIME_NOW else (attrs.atime, attrs.atimensec)
            if valid & abi.FATTR_MTIME:
                mtime = (0, _linux.UTIME_NOW) if valid & abi.FATTR_MTIME_NOW else (attrs.mtime, attrs.mtimensec)
            try:
                _linux.utimensat(fd, b"", atime, mtime, _linux.AT_EMPTY_PATH)
            except OSError as exc:
                # Kernels before 5.8 lack AT_EMPTY_PATH here; the magic link works for all but symlinks.
                if exc.errno not in (errno.EINVAL, errno.ENOENT) or inode.fmt == stat.S_IFLNK:
                    raise
                _linux.utimensat(-100, _proc(fd).encode(), atime, mtime, 0)
        return _attr(ino, os.stat(fd))

    # -- creating and removing names -------------------------------------------------------
    def _created(self, parent_fd: int, name: bytes, mode: int) -> Entry:
        inode, st = self._register(self._open_child(parent_fd, name))
        st = self._fix_mode(inode.fd, st, mode)
        return self._entry(inode, st)

    @_fs_errors
    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, umask: int, ctx: Context) -> Entry:
        self._writable()
        _check_name(name)
        pfd = self._fd(self._get(parent))
        with self._creds(ctx):
            os.mknod(name, mode, _decode_rdev(rdev), dir_fd=pfd)
        return self._created(pfd, name, mode)

    @_fs_errors
    def mkdir(self, parent: int, name: bytes, mode: int, umask: int, ctx: Context) -> Entry:
        self._writable()
        _check_name(name)
        pfd = self._fd(self._get(parent))
        with self._creds(ctx):
            os.mkdir(name, mode & 0o7777, dir_fd=pfd)
        return self._created(pfd, name, mode)

    @_fs_errors
    def symlink(self, parent: int, name: bytes, target: bytes, ctx: Context) -> Entry:
        self._writable()
        _check_name(name)
        if not target or b"\0" in target:
            raise FsError(errno.EINVAL)
        pfd = self._fd(self._get(parent))
        with self._creds(ctx):
            os.symlink(target, name, dir_fd=pfd)
        inode, st = self._register(self._open_child(pfd, name))
        return self._entry(inode, st)

    @_fs_errors
    def link(self, ino: int, newparent: int, newname: bytes, ctx: Context) -> Entry:
        self._writable()
        _check_name(newname)
        inode = self._get(ino)
        if inode.fmt == stat.S_IFDIR:
            raise FsError(errno.EPERM)
        pfd = self._fd(self._get(newparent))
        os.link(_proc(self._fd(inode)), newname, dst_dir_fd=pfd, follow_symlinks=True)
        return self._lookup(newparent, newname)

    @_fs_errors
    def unlink(self, parent: int, name: bytes, ctx: Context) -> None:
        self._writable()
        _check_name(name)
        os.unlink(name, dir_fd=self._fd(self._get(parent)))

    @_fs_errors
    def rmdir(self, parent: int, name: bytes, ctx: Context) -> None:
        self._writable()
        _check_name(name)
        os.rmdir(name, dir_fd=self._fd(self._get(parent)))

    @_fs_errors
    def rename(self, parent: int, name: bytes, newparent: int, newname: bytes, flags: int,
               ctx: Context) -> None:
        self._writable()
        _check_name(name)
        _check_name(newname)
        if flags & ~_RENAME_FLAGS:
            raise FsError(errno.EINVAL)
        old_fd = self._fd(self._get(parent))
        new_fd = self._fd(self._get(newparent))
        if flags:
            _linux.renameat2(old_fd, name, new_fd, newname, flags)
        else:
            os.rename(name, newname, src_dir_fd=old_fd, dst_dir_fd=new_fd)

    # -- files ------------------------------------------------------------------------------
    def _host_flags(self, flags: int) -> int:
        acc = flags & abi.O_ACCMODE
        if acc == abi.O_ACCMODE:
            raise FsError(errno.EINVAL)
        if self.readonly and (acc != os.O_RDONLY or flags & (abi.O_TRUNC | abi.O_CREAT)):
            raise FsError(errno.EROFS)
        out = acc | os.O_CLOEXEC
        if flags & abi.O_APPEND:
            out |= os.O_APPEND
        if flags & abi.O_TRUNC:
            out |= os.O_TRUNC
        if flags & _G_SYNC == _G_SYNC:
            out |= os.O_SYNC
        elif flags & _G_DSYNC:
            out |= os.O_DSYNC
        # O_DIRECT is not passed on: our buffers are not aligned for it.  The
        # guest gets FOPEN_DIRECT_IO instead, so its page cache is bypassed.
        return out

    @_fs_errors
    def open(self, ino: int, flags: int, ctx: Context) -> tuple[int, int]:
        inode = self._get(ino)
        if inode.fmt != stat.S_IFREG:
            raise FsError(errno.EISDIR if inode.fmt == stat.S_IFDIR else errno.ENXIO)
        fd = os.open(_proc(self._fd(inode)), self._host_flags(flags))
        return self._new_handle(fd, ino), abi.FOPEN_DIRECT_IO if flags & _G_DIRECT else 0

    @_fs_errors
    def create(self, parent: int, name: bytes, mode: int, flags: int, umask: int,
               ctx: Context) -> tuple[Entry, int, int]:
        self._writable()
        _check_name(name)
        if not stat.S_ISREG(mode) and stat.S_IFMT(mode):
            raise FsError(errno.EINVAL)
        pfd = self._fd(self._get(parent))
        hflags = self._host_flags(flags)
        fopen = abi.FOPEN_DIRECT_IO if flags & _G_DIRECT else 0
        # O_EXCL always: an existing name is never opened by this open(2), since
        # O_CREAT alone would open a FIFO (blocking the loop) or a device node the
        # guest made (reaching the host's device).  It is reopened as OPEN does.
        try:
            with self._creds(ctx):
                fd = os.open(name, hflags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode & 0o7777, dir_fd=pfd)
        except FileExistsError:
            if flags & abi.O_EXCL:
                raise
            # (On failure the looked-up inode stays known: the kernel may hold
            # it from an earlier LOOKUP, and the same name maps to the same entry.)
            entry = self._lookup(parent, name)
            fh = self.open(entry.nodeid, flags, ctx)[0]
            # Attributes after the open: O_TRUNC has just changed the size.
            attr = _attr(entry.nodeid, os.fstat(self._handles[fh].fd))
            return Entry(entry.nodeid, attr, 0, _TIMEOUT, _TIMEOUT), fh, fopen
        try:
            st = os.fstat(fd)
            inode, st = self._register(os.open(_proc(fd), os.O_PATH | os.O_CLOEXEC), st)
            st = self._fix_mode(inode.fd, st, mode)
            fh = self._new_handle(fd, inode.ino)
        except BaseException:
            _close(fd)
            raise
        return self._entry(inode, st), fh, fopen

    async def read(self, ino: int, fh: int, offset: int, size: int, ctx: Context) -> ReadData:
        h = self._handle(fh)
        try:
            end = os.fstat(h.fd).st_size
        except OSError as exc:
            raise FsError(exc.errno or errno.EIO) from None
        # The transport reads the range itself (no copy here); it must lie inside
        # the file, so it is cut at the size seen now.
        n = min(size, end - offset)
        if n <= 0:
            return b""
        return [FileSegment(h.fd, offset, n)]

    @_fs_errors
    def write(self, ino: int, fh: int, offset: int, data: WriteData, write_flags: int, ctx: Context) -> int:
        self._writable()
        fd = self._handle(fh).fd
        kind = type(data)
        if kind is memoryview or kind is bytes or kind is bytearray:
            return os.pwrite(fd, data, offset)
        return data.pwrite(fd, offset)

    @_fs_errors
    def flush(self, ino: int, fh: int, lock_owner: int) -> None:
        # close(2) of a duplicate: what the guest's close() would do to a local
        # file (POSIX locks of this process on it are dropped, NFS-style
        # close-to-open flushes happen), while the handle stays usable.
        h = self._handles.get(fh)
        if h is not None:
            os.close(os.dup(h.fd))

    def release(self, ino: int, fh: int, flags: int) -> None:
        h = self._handles.pop(fh, None)
        if h is not None:
            _close(h.fd)

    @_fs_errors
    def fsync(self, ino: int, fh: int, datasync: bool) -> None:
        fd = self._handle(fh).fd
        if datasync:
            os.fdatasync(fd)
        else:
            os.fsync(fd)

    @_fs_errors
    def lseek(self, ino: int, fh: int, offset: int, whence: int) -> int:
        return os.lseek(self._handle(fh).fd, offset, whence)

    @_fs_errors
    def fallocate(self, ino: int, fh: int, offset: int, length: int, mode: int, ctx: Context) -> None:
        self._writable()
        _linux.fallocate(self._handle(fh).fd, mode, offset, length)

    @_fs_errors
    def copy_file_range(self, ino_in: int, fh_in: int, off_in: int, ino_out: int, fh_out: int,
                        off_out: int, length: int, flags: int, ctx: Context) -> int:
        self._writable()
        if flags:
            raise FsError(errno.EINVAL)
        return os.copy_file_range(self._handle(fh_in).fd, self._handle(fh_out).fd, length, off_in, off_out)

    # -- locks (only negotiated with FuseServer(posix_locks=True)) --------------------------
    @staticmethod
    def _flock_struct(lock: FileLock) -> bytes:
        length = 0 if lock.end >= _OFFSET_MAX else lock.end - lock.start + 1
        if lock.start > _OFFSET_MAX or length < 0:
            raise FsError(errno.EINVAL)
        return _FLOCK.pack(lock.type, os.SEEK_SET, lock.start, length, 0)

    @_fs_errors
    def getlk(self, ino: int, fh: int, owner: int, lock: FileLock, ctx: Context) -> FileLock:
        raw = fcntl.fcntl(self._handle(fh).fd, _F_OFD_GETLK, self._flock_struct(lock))
        typ, _, start, length, pid = _FLOCK.unpack(raw)
        end = 2**64 - 1 if length == 0 else start + length - 1
        return FileLock(start, end, typ, pid if pid > 0 else 0)  # OFD locks report pid -1

    @_fs_errors
    def setlk(self, ino: int, fh: int, owner: int, lock: FileLock, sleep: bool, flock: bool, ctx: Context):
        """OFD locks on the handle's open file (flock(2) for FUSE_LK_FLOCK).

        Never blocks the event loop: a contended SETLKW returns a coroutine that
        retries with a growing pause (1 ms .. 50 ms) until the lock is free, the
        handle is released (EBADF) or the guest interrupts it (EINTR).
        """
        self._handle(fh)  # EBADF for a handle that is not open
        if flock:
            if lock.type not in (0, 1, 2):
                raise FsError(errno.EINVAL)
            op = (fcntl.LOCK_SH, fcntl.LOCK_EX, fcntl.LOCK_UN)[lock.type] | fcntl.LOCK_NB

            def attempt() -> None:
                fcntl.flock(self._handle(fh).fd, op)
        else:
            arg = self._flock_struct(lock)

            def attempt() -> None:
                fcntl.fcntl(self._handle(fh).fd, _F_OFD_SETLK, arg)
        try:
            attempt()
        except OSError as exc:
            if not sleep or exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            return self._wait_lock(attempt)
        return None

    @staticmethod
    async def _wait_lock(attempt) -> None:
        import asyncio

        pause = 0.001
        while True:
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.05)
            try:
                attempt()
                return
            except FsError:
                raise
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise FsError(exc.errno or errno.EIO) from None

    # -- directories -------------------------------------------------------------------------
    @_fs_errors
    def opendir(self, ino: int, flags: int, ctx: Context) -> tuple[int, int]:
        inode = self._get(ino)
        if inode.fmt != stat.S_IFDIR:
            raise FsError(errno.ENOTDIR)
        fd = os.open(_proc(self._fd(inode)), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return self._new_handle(fd, ino), 0

    def releasedir(self, ino: int, fh: int) -> None:
        self.release(ino, fh, 0)

    @_fs_errors
    def fsyncdir(self, ino: int, fh: int, datasync: bool) -> None:
        self.fsync(ino, fh, datasync)

    @_fs_errors
    def readdir(self, ino: int, fh: int, offset: int, plus: bool, ctx: Context) -> Iterator[DirEntry]:
        h = self._handle(fh)
        if h.ino != ino:
            raise FsError(errno.EBADF)
        if offset == 0 or h.entries is None:
            # A snapshot per pass: cookies are indices into it, stable until the
            # guest starts over (offset 0 = rewinddir).
            entries = [(b".", 0, 4), (b"..", 0, 4)]
            with os.scandir(h.fd) as it:
                for d in it:
                    try:
                        if d.is_dir(follow_symlinks=False):
                            dtype = 4
                        elif d.is_file(follow_symlinks=False):
                            dtype = 8
                        elif d.is_symlink():
                            dtype = 10
                        else:
                            dtype = 0  # DT_UNKNOWN: the guest asks with LOOKUP
                        entries.append((os.fsencode(d.name), d.inode(), dtype))
                    except OSError:
                        continue
            h.entries = entries
        return self._dir_entries(ino, h.entries, offset, plus)

    def _dir_entries(self, ino: int, entries, offset: int, plus: bool) -> Iterator[DirEntry]:
        key = self._get(ino).key
        for pos in range(max(offset, 0), len(entries)):
            name, d_ino, dtype = entries[pos]
            if pos < 2:
                yield DirEntry(name, ino, dtype, pos + 1)
                continue
            if plus:
                try:
                    e = self._lookup(ino, name)
                except FsError:
                    continue  # gone since the snapshot (or not nameable): skip it
                except OSError:
                    continue
                yield DirEntry(name, e.nodeid, _DTYPE.get(stat.S_IFMT(e.attr.mode), dtype), pos + 1, e)
            else:
                known = self._by_key.get((key[0], d_ino, key[2]))
                yield DirEntry(name, known.ino if known is not None else _UNKNOWN_INO, dtype, pos + 1)

    @_fs_errors
    def syncfs(self, ino: int) -> None:
        _linux.syncfs(self._fd(self._get(_ROOT)))


def _current_umask() -> int:
    """The process umask, read without changing it (/proc/self/status has it since Linux 4.7).

    The os.umask(0)/os.umask(old) dance is the fallback: it leaves the umask at 0
    for an instant, which another thread creating a file could observe.
    """
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0)
    os.umask(old)
    return old


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
