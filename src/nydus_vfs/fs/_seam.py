"""The seam between the pseudo-mount VFS and the filesystems mounted in it.

:class:`FileSystem` is what one mounted instance implements (``RafsFs``,
``PassthroughFs``).  It mirrors :class:`~nydus_vfs.fuse.ops.Operations` with
two differences:

* every inode number is **local** to the instance: the instance never sees a
  FUSE nodeid and never needs to know where it is mounted.  The
  :class:`~nydus_vfs.fs.vfs.Vfs` maps local numbers into the export's nodeid
  space both ways, including the nodeids inside returned ``Entry``/``Attr``/
  ``DirEntry`` objects (``Attr.ino`` is rewritten to the nodeid, so ``st_ino``
  is unique across instances);
* there is no session state: lookup counting stays in the FUSE server, and the
  instance only hears :meth:`FileSystem.release_inode` when the kernel holds
  no reference to an inode any more (or never learned of it), and
  :meth:`FileSystem.destroy` when the FUSE session ends.

Contract, beyond the method docstrings:

* Methods raise only :class:`~nydus_vfs.errors.FsError`; the VFS passes it on.
* ``immutable`` instances (RAFS) promise that an inode's attributes and a
  name's lookup result never change while mounted: the VFS memoises them and
  may answer OPEN/OPENDIR/FLUSH with the kernel's ENOSYS shortcuts.  Other
  instances get every request; the ``Attr`` objects they return are handed
  over: the VFS sets ``ino`` to the nodeid in place instead of copying (an
  instance may return the same object again while the inode is unchanged; it
  then still carries that nodeid and its packed bytes).
* ``readonly`` instances answer every write method with EROFS; deriving from
  :class:`ReadOnlyFs` gives exactly that.
* The local root (``root_ino``) is never released.
* ``fh`` values are the instance's own; the VFS hands them back unchanged to the
  instance that owns the nodeid they come with.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from ..errors import FsError
from ..fuse.ops import Attr, Context, DirEntry, Entry, FileLock, ReadData, SetAttr, StatFs, WriteData

__all__ = ["FileSystem", "ReadOnlyFs"]


@runtime_checkable
class FileSystem(Protocol):
    """One filesystem instance over local inode numbers (see the module docstring)."""

    #: Local inode number of the instance's root directory.
    root_ino: int
    #: What was mounted (image path, shared directory), for logs and the API.
    source: str
    #: Attributes and lookups never change while mounted (the VFS may memoise).
    immutable: bool
    #: Every write method raises EROFS.
    readonly: bool

    # -- lifetime ------------------------------------------------------------------
    def close(self) -> None:
        """Release everything (called by whoever unmounted the instance)."""

    def destroy(self) -> None:
        """The FUSE session ended: every inode reference and file handle handed out is dead.

        Must not raise.
        """

    def release_inode(self, ino: int) -> None:
        """The kernel holds no reference to ``ino`` any more; per-inode state may go.  Must not raise."""

    # -- names and attributes ---------------------------------------------------
    def lookup(self, parent: int, name: bytes, ctx: Context) -> Entry:
        """``name`` in directory ``parent``: an Entry with a local nodeid and Attr (ENOENT if absent)."""

    def getattr(self, ino: int, fh: int | None, ctx: Context) -> Attr:
        """Attributes of ``ino`` (``Attr.ino`` local)."""

    def readlink(self, ino: int, ctx: Context) -> bytes: ...

    def access(self, ino: int, mask: int, ctx: Context) -> None: ...

    def statfs(self, ino: int, ctx: Context) -> StatFs: ...

    def getxattr(self, ino: int, name: bytes, ctx: Context) -> bytes: ...

    def listxattr(self, ino: int, ctx: Context) -> list[bytes]: ...

    # -- files -----------------------------------------------------------------
    def open(self, ino: int, flags: int, ctx: Context) -> tuple[int, int]:
        """``(fh, fopen_flags)``; a readonly instance refuses write access modes and O_TRUNC with EROFS."""

    async def read(self, ino: int, fh: int, offset: int, size: int, ctx: Context) -> ReadData: ...

    def flush(self, ino: int, fh: int, lock_owner: int) -> None: ...

    def release(self, ino: int, fh: int, flags: int) -> None: ...

    def fsync(self, ino: int, fh: int, datasync: bool) -> None: ...

    def lseek(self, ino: int, fh: int, offset: int, whence: int) -> int: ...

    # -- directories ---------------------------------------------------------------
    def opendir(self, ino: int, flags: int, ctx: Context) -> tuple[int, int]: ...

    def readdir(self, ino: int, fh: int, offset: int, plus: bool, ctx: Context) -> Iterator[DirEntry]:
        """Entries after cookie ``offset``, "." and ".." included, local inode numbers.

        With ``plus`` every entry but "." and ".." carries its lookup ``Entry``.
        ENOTDIR and friends are raised by the call, not by the iterator.
        """

    def releasedir(self, ino: int, fh: int) -> None: ...

    def fsyncdir(self, ino: int, fh: int, datasync: bool) -> None: ...

    # -- writes ------------------------------------------------------------------
    def setattr(self, ino: int, attrs: SetAttr, ctx: Context) -> Attr: ...

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, umask: int, ctx: Context) -> Entry: ...

    def mkdir(self, parent: int, name: bytes, mode: int, umask: int, ctx: Context) -> Entry: ...

    def symlink(self, parent: int, name: bytes, target: bytes, ctx: Context) -> Entry: ...

    def link(self, ino: int, newparent: int, newname: bytes, ctx: Context) -> Entry: ...

    def unlink(self, parent: int, name: bytes, ctx: Context) -> None: ...

    def rmdir(self, parent: int, name: bytes, ctx: Context) -> None: ...

    def rename(self, parent: int, name: bytes, newparent: int, newname: bytes, flags: int,
               ctx: Context) -> None: ...

    def create(self, parent: int, name: bytes, mode: int, flags: int, umask: int,
               ctx: Context) -> tuple[Entry, int, int]: ...

    def write(self, ino: int, fh: int, offset: int, data: WriteData, write_flags: int,
              ctx: Context) -> int:
        """Write ``data`` at ``offset``; the bytes written (short only as ``pwrite(2)`` may be).

        ``data`` is a bytes-like object, valid only during the call (the
        ``/dev/fuse`` transport and short virtio-fs requests), or a
        :class:`~nydus_vfs.utils.io.WritePayload`: a long virtio-fs WRITE's data
        left in guest memory, written with ``data.pwrite(fd, offset)`` (one
        ``pwritev`` from guest memory, ``OSError`` on failure) or copied with
        ``data.tobytes()``; it may change under the call (the guest's own data),
        and it is valid until the reply is sent.
        """

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int, ctx: Context) -> None: ...

    def removexattr(self, ino: int, name: bytes, ctx: Context) -> None: ...

    def fallocate(self, ino: int, fh: int, offset: int, length: int, mode: int, ctx: Context) -> None: ...

    def copy_file_range(self, ino_in: int, fh_in: int, off_in: int, ino_out: int, fh_out: int,
                        off_out: int, length: int, flags: int, ctx: Context) -> int: ...

    def getlk(self, ino: int, fh: int, owner: int, lock: FileLock, ctx: Context) -> FileLock: ...

    def setlk(self, ino: int, fh: int, owner: int, lock: FileLock, sleep: bool, flock: bool, ctx: Context):
        """None when done; with ``sleep`` a coroutine that finishes once the lock is taken."""

    def syncfs(self, ino: int) -> None: ...


def _erofs(*_args, **_kw):
    raise FsError(errno.EROFS)


def _enosys(*_args, **_kw):
    raise FsError(errno.ENOSYS)


class ReadOnlyFs:
    """Mixin: the write half of :class:`FileSystem` for an instance that has none.

    Every write method raises EROFS; locks are ENOSYS (the guest kernel keeps
    them locally); handle-level calls that change nothing succeed.
    """

    immutable = True
    readonly = True

    setattr = mknod = mkdir = symlink = link = unlink = rmdir = rename = create = staticmethod(_erofs)
    write = setxattr = removexattr = fallocate = copy_file_range = staticmethod(_erofs)
    getlk = setlk = staticmethod(_enosys)

    def destroy(self) -> None:
        return None

    def release_inode(self, ino: int) -> None:
        return None

    def flush(self, ino: int, fh: int, lock_owner: int) -> None:
        return None

    def release(self, ino: int, fh: int, flags: int) -> None:
        return None

    def fsync(self, ino: int, fh: int, datasync: bool) -> None:
        return None

    def releasedir(self, ino: int, fh: int) -> None:
        return None

    def fsyncdir(self, ino: int, fh: int, datasync: bool) -> None:
        return None

    def syncfs(self, ino: int) -> None:
        return None
