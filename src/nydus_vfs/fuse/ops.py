"""The filesystem side of the FUSE boundary: what a filesystem implements.

Contract (read this before implementing ``Operations``):

* Methods may raise only :class:`~nydus_vfs.errors.FsError`.  Its errno is the
  only thing that reaches the kernel or guest.  Anything else is a bug: the
  server logs it with a traceback, replies ``EIO`` and keeps serving.
* Every default raises ``FsError(ENOSYS)`` so the kernel stops asking.
* Metadata methods are **synchronous** and must not block: RAFS metadata lives
  in memory.  Only :meth:`Operations.read` is ``async``, because chunk data may
  have to come from a remote backend.  The server drives ``read`` without the
  event loop when it completes without suspending (warm cache), so a cache hit
  costs no task switch.
* Call order per session: ``init`` first; then any mix of the others; ``destroy``
  last (a guest reboot sends a new ``INIT`` without ``DESTROY``: the server
  calls ``destroy`` itself before the second ``init``).
* Lookup counting is done by the server, not the filesystem: every ``Entry``
  returned by ``lookup`` and every ``DirEntry.entry`` actually sent by
  ``readdirplus`` adds one reference to ``Entry.nodeid``; ``forget`` is called
  with the kernel's counts and ``release_inode`` when the server's count for a
  nodeid drops to zero.  Nodeid 1 is the root and is never forgotten.
* Write operations never reach a read-only filesystem: the server answers them
  with ``EROFS`` itself.  On a writable server they reach the write methods
  below (``setattr`` ... ``setlk``), whose defaults raise ENOSYS.  Every
  ``Entry`` returned by ``create``, ``mknod``, ``mkdir``, ``symlink`` and
  ``link`` counts one lookup, exactly like ``lookup``.
* ``release_inode`` is also called for a nodeid the filesystem returned but
  the kernel never learned (a LOOKUP refused with ENFILE, a READDIRPLUS entry
  that did not fit the reply), so a filesystem that keeps per-inode state from
  the first time it returns a nodeid until ``release_inode`` never leaks it.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from typing import NamedTuple, Union

from ..errors import FsError
from ..utils.io import FileSegment  # re-exported: storage produces it, transports consume it
from ..utils.io import WritePayload  # re-exported: transports produce it, filesystems consume it

__all__ = [
    "ROOT_ID",
    "Attr",
    "Entry",
    "DirEntry",
    "StatFs",
    "FileSegment",
    "ReadData",
    "WritePayload",
    "WriteData",
    "Context",
    "ConnInfo",
    "SetAttr",
    "FileLock",
    "Operations",
]

#: The FUSE root nodeid.
ROOT_ID = 1


class Attr:
    """Attributes of one inode, as ``struct fuse_attr`` carries them.

    Instances are treated as immutable once handed to the server: the codec
    caches their packed form in ``_packed`` so a hot GETATTR is one slice copy.
    ``timeout`` is how long the kernel may cache them after a GETATTR or
    SETATTR (``attr_valid``); ``None`` means the operations' ``attr_timeout``.
    """

    __slots__ = (
        "ino", "size", "blocks", "atime", "mtime", "ctime",
        "atimensec", "mtimensec", "ctimensec", "mode", "nlink",
        "uid", "gid", "rdev", "blksize", "timeout", "_packed",
    )

    def __init__(
        self,
        ino: int,
        mode: int,
        *,
        size: int = 0,
        blocks: int = 0,
        nlink: int = 1,
        uid: int = 0,
        gid: int = 0,
        rdev: int = 0,
        mtime: int = 0,
        mtimensec: int = 0,
        atime: int | None = None,
        atimensec: int | None = None,
        ctime: int | None = None,
        ctimensec: int | None = None,
        blksize: int = 4096,
        timeout: float | None = None,
    ) -> None:
        self.ino = ino
        self.mode = mode
        self.size = size
        self.blocks = blocks
        self.nlink = nlink
        self.uid = uid
        self.gid = gid
        self.rdev = rdev
        self.mtime = mtime
        self.mtimensec = mtimensec
        self.atime = mtime if atime is None else atime
        self.atimensec = mtimensec if atimensec is None else atimensec
        self.ctime = mtime if ctime is None else ctime
        self.ctimensec = mtimensec if ctimensec is None else ctimensec
        self.blksize = blksize
        self.timeout = timeout
        self._packed: bytes | None = None

    def __repr__(self) -> str:
        return f"Attr(ino={self.ino}, mode={self.mode:#o}, size={self.size}, nlink={self.nlink})"


class Entry(NamedTuple):
    """A name resolved to an inode (``struct fuse_entry_out``).

    ``nodeid`` 0 with a positive ``entry_timeout`` is a cached negative entry.
    """

    nodeid: int
    attr: Attr
    generation: int = 0
    entry_timeout: float = 0.0
    attr_timeout: float = 0.0


class DirEntry(NamedTuple):
    """One directory entry for READDIR/READDIRPLUS.

    ``offset`` is the resume cookie of the *next* entry: the kernel sends it back
    as the READDIR offset to continue after this entry.  ``type`` is the DT_*
    value (mode >> 12).  For READDIRPLUS ``entry`` carries the lookup result;
    ``None`` (used for "." and "..") is sent as nodeid 0 and counts no lookup.
    """

    name: bytes
    ino: int
    type: int
    offset: int
    entry: Entry | None = None


class StatFs(NamedTuple):
    """``struct fuse_kstatfs``."""

    blocks: int = 0
    bfree: int = 0
    bavail: int = 0
    files: int = 0
    ffree: int = 0
    bsize: int = 4096
    namelen: int = 255
    frsize: int = 4096


#: What ``Operations.read`` returns: bytes, or a list of bytes / file segments
#: whose concatenation is the data.  Less than requested means end of file.
ReadData = Union[bytes, bytearray, memoryview, "list[bytes | bytearray | memoryview | FileSegment]"]

#: What ``Operations.write`` receives: a bytes-like view of the request, or
#: the data a transport left where it arrived (virtio-fs: guest memory).
WriteData = Union[bytes, bytearray, memoryview, WritePayload]


class Context(NamedTuple):
    """Who asked (from ``fuse_in_header``).  Informational only: never trusted."""

    uid: int = 0
    gid: int = 0
    pid: int = 0


class ConnInfo(NamedTuple):
    """What INIT negotiated; ``kernel_flags`` is everything the kernel offered."""

    major: int
    minor: int
    max_readahead: int
    max_write: int
    max_pages: int
    flags: int
    kernel_flags: int = 0


class SetAttr(NamedTuple):
    """What SETATTR asks to change (``struct fuse_setattr_in``).

    ``valid`` holds ``abi.FATTR_*`` bits; only the fields whose bit is set mean
    anything.  ``FATTR_ATIME_NOW``/``FATTR_MTIME_NOW`` (with ``FATTR_ATIME``/
    ``FATTR_MTIME``) mean "the current time" (utimensat's UTIME_NOW).  ``fh``
    is valid with ``FATTR_FH`` (ftruncate, futimens).
    """

    valid: int
    mode: int = 0
    uid: int = 0
    gid: int = 0
    size: int = 0
    atime: int = 0
    atimensec: int = 0
    mtime: int = 0
    mtimensec: int = 0
    ctime: int = 0
    ctimensec: int = 0
    fh: int = 0
    lock_owner: int = 0


class FileLock(NamedTuple):
    """``struct fuse_file_lock``: a byte range lock as fcntl(2) describes it.

    ``type`` is F_RDLCK (0), F_WRLCK (1) or F_UNLCK (2) in the guest's ABI
    (the same values on every Linux architecture); ``end`` is inclusive, and
    ``2**64 - 1`` means "to the end of the file".
    """

    start: int
    end: int
    type: int
    pid: int = 0


def _enosys() -> FsError:
    return FsError(errno.ENOSYS)


class Operations:
    """Base class of a FUSE filesystem; see the module docstring for the contract.

    ``attr_timeout`` and ``entry_timeout`` are used by the server for GETATTR
    replies (``Entry`` carries its own timeouts).
    """

    attr_timeout: float = 1.0
    entry_timeout: float = 1.0

    # -- session -------------------------------------------------------------
    def init(self, conn: ConnInfo) -> None:
        """Called once per FUSE session after INIT was negotiated.  Must not raise."""

    def destroy(self) -> None:
        """Session ended (DESTROY, a new INIT, or the transport going away).  Must not raise.

        Drop every per-session handle; nodeids handed out are no longer referenced.
        """

    def counters(self) -> "tuple[list[int], list[list[int]], list[list[int]]] | None":
        """Optional per-request counters the server keeps for the filesystem, or None.

        ``(fop_of_opcode, hits, errors)``: ``fop_of_opcode[opcode]`` is a counter
        index (-1: not counted; opcodes past its end are not counted), and
        ``hits[nodeid >> 56][fop]`` / ``errors[nodeid >> 56][fop]`` are bumped by
        the server for every request, once its outcome (reply or errno) is
        known.  The outer lists are kept by the server for the whole session;
        the filesystem may swap their inner lists at any time.  Counting is a
        few list operations per request, cheap enough for the hot path.
        """
        return None

    # -- names and inodes -----------------------------------------------------
    def lookup(self, parent: int, name: bytes, ctx: Context) -> Entry:
        """Resolve ``name`` (no '/', not empty, at most 255 bytes) in directory ``parent``.

        Raise ``FsError(ENOENT)`` if absent.  The server counts one lookup on the
        returned nodeid if it is not 0.
        """
        raise _enosys()

    def forget(self, items: list[tuple[int, int]]) -> None:
        """The kernel dropped ``nlookup`` references to each nodeid.  Must not raise."""

    def release_inode(self, nodeid: int) -> None:
        """The server's lookup count for ``nodeid`` reached zero.  Must not raise."""

    def getattr(self, nodeid: int, fh: int | None, ctx: Context) -> Attr:
        raise _enosys()

    def readlink(self, nodeid: int, ctx: Context) -> bytes:
        raise _enosys()

    # -- files ----------------------------------------------------------------
    def open(self, nodeid: int, flags: int, ctx: Context) -> tuple[int, int]:
        """Open a regular file; returns ``(fh, fopen_flags)``.

        Only read-only opens reach here on a read-only server: the server refuses
        write access modes, O_TRUNC and O_CREAT with EROFS first.
        """
        raise _enosys()

    async def read(self, nodeid: int, fh: int, offset: int, size: int, ctx: Context) -> ReadData:
        """Return at most ``size`` bytes at ``offset``; fewer means end of file."""
        raise _enosys()

    def flush(self, nodeid: int, fh: int, lock_owner: int) -> None:
        return None

    def release(self, nodeid: int, fh: int, flags: int) -> None:
        return None

    def fsync(self, nodeid: int, fh: int, datasync: bool) -> None:
        return None

    def lseek(self, nodeid: int, fh: int, offset: int, whence: int) -> int:
        raise _enosys()

    # -- directories ------------------------------------------------------------
    def opendir(self, nodeid: int, flags: int, ctx: Context) -> tuple[int, int]:
        raise _enosys()

    def readdir(self, nodeid: int, fh: int, offset: int, ctx: Context) -> Iterable[DirEntry]:
        """Yield entries after the resume cookie ``offset`` (0 = from the start).

        The server stops pulling when the reply is full, so this should be lazy.
        """
        raise _enosys()

    def readdirplus(self, nodeid: int, fh: int, offset: int, ctx: Context) -> Iterable[DirEntry]:
        """Like :meth:`readdir` with ``DirEntry.entry`` filled for every real child."""
        raise _enosys()

    def releasedir(self, nodeid: int, fh: int) -> None:
        return None

    def fsyncdir(self, nodeid: int, fh: int, datasync: bool) -> None:
        return None

    # -- misc ---------------------------------------------------------------------
    def statfs(self, nodeid: int, ctx: Context) -> StatFs:
        return StatFs()

    def getxattr(self, nodeid: int, name: bytes, ctx: Context) -> bytes:
        """Value of xattr ``name``; ``FsError(ENODATA)`` if absent.  Size probing is the server's job."""
        raise _enosys()

    def listxattr(self, nodeid: int, ctx: Context) -> list[bytes]:
        """Names of all xattrs (without NUL).  Size probing is the server's job."""
        raise _enosys()

    def access(self, nodeid: int, mask: int, ctx: Context) -> None:
        raise _enosys()

    def syncfs(self, nodeid: int) -> None:
        return None

    # -- writes (a read-only server answers EROFS before any of these is called) -----
    def setattr(self, nodeid: int, attrs: SetAttr, ctx: Context) -> Attr:
        """Change what ``attrs.valid`` selects; return the attributes afterwards."""
        raise _enosys()

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, umask: int, ctx: Context) -> Entry:
        """Create a regular file, device, fifo or socket (``mode`` carries the type)."""
        raise _enosys()

    def mkdir(self, parent: int, name: bytes, mode: int, umask: int, ctx: Context) -> Entry:
        raise _enosys()

    def symlink(self, parent: int, name: bytes, target: bytes, ctx: Context) -> Entry:
        raise _enosys()

    def link(self, nodeid: int, newparent: int, newname: bytes, ctx: Context) -> Entry:
        """Hard link: a new name ``newname`` in ``newparent`` for inode ``nodeid``."""
        raise _enosys()

    def unlink(self, parent: int, name: bytes, ctx: Context) -> None:
        raise _enosys()

    def rmdir(self, parent: int, name: bytes, ctx: Context) -> None:
        raise _enosys()

    def rename(self, parent: int, name: bytes, newparent: int, newname: bytes, flags: int,
               ctx: Context) -> None:
        """rename(2)/renameat2(2); ``flags``: RENAME_NOREPLACE 1, RENAME_EXCHANGE 2, RENAME_WHITEOUT 4."""
        raise _enosys()

    def create(self, parent: int, name: bytes, mode: int, flags: int, umask: int,
               ctx: Context) -> tuple[Entry, int, int]:
        """Create and open a regular file; returns ``(entry, fh, fopen_flags)``."""
        raise _enosys()

    def write(self, nodeid: int, fh: int, offset: int, data: WriteData, write_flags: int,
              ctx: Context) -> int:
        """Write ``data`` at ``offset``; returns the bytes written.

        ``data`` is either a bytes-like view of the request buffer, valid only
        during the call, or (a long virtio-fs WRITE) a
        :class:`~nydus_vfs.utils.io.WritePayload` still in guest memory: move
        it with ``data.pwrite(fd, offset)``, copy it with ``data.tobytes()``.
        ``len(data)`` is the size in both cases.
        """
        raise _enosys()

    def setxattr(self, nodeid: int, name: bytes, value: bytes, flags: int, ctx: Context) -> None:
        """``flags``: XATTR_CREATE 1, XATTR_REPLACE 2."""
        raise _enosys()

    def removexattr(self, nodeid: int, name: bytes, ctx: Context) -> None:
        raise _enosys()

    def fallocate(self, nodeid: int, fh: int, offset: int, length: int, mode: int, ctx: Context) -> None:
        raise _enosys()

    def copy_file_range(self, nodeid_in: int, fh_in: int, off_in: int, nodeid_out: int, fh_out: int,
                        off_out: int, length: int, flags: int, ctx: Context) -> int:
        """Copy ``length`` bytes between two open files; returns the bytes copied."""
        raise _enosys()

    def getlk(self, nodeid: int, fh: int, owner: int, lock: FileLock, ctx: Context) -> FileLock:
        """The first lock that would conflict with ``lock``, or ``lock`` with type F_UNLCK."""
        raise _enosys()

    def setlk(self, nodeid: int, fh: int, owner: int, lock: FileLock, sleep: bool, flock: bool,
              ctx: Context):
        """Take or release a lock for ``owner``; ``flock`` means flock(2) semantics (whole file).

        ``sleep`` (SETLKW) asks to wait until a conflicting lock goes away
        instead of failing with EAGAIN.  A filesystem that has to wait returns
        a coroutine that finishes when the lock is taken; the server runs it
        like a READ that suspended (INTERRUPT cancels it: EINTR).  Otherwise
        it returns None.
        """
        raise _enosys()
