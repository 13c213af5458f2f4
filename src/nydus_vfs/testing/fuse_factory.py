"""Build raw FUSE request bytes the way the Linux client lays them out (h2's FrameFactory idea).

Every method returns one complete request: ``fuse_in_header`` (with ``len``
equal to the total) followed by the opcode's arguments.  ``unique`` counts up
by 2 like the kernel's (the low bit is reserved for interrupts) unless given;
:attr:`FuseRequestFactory.last_unique` is the one just used.  Keyword
overrides of header fields (``unique``, ``uid``, ``gid``, ``pid``,
``total_extlen``, ``length``) let tests build malformed requests.

Used by the FUSE server's tests and benchmarks; nothing in ``src`` imports it.
"""

from __future__ import annotations

from struct import pack as _pack

from ..fuse import abi
from ..fuse.abi import Opcode

__all__ = ["FuseRequestFactory", "LINUX_6_1_INIT_FLAGS", "LINUX_6_1_INIT_FLAGS2"]

#: What Linux 6.1 virtiofs offers in FUSE_INIT (vhost-user-fs.md §3.2).
LINUX_6_1_INIT_FLAGS = 0x7BFFFFFB
LINUX_6_1_INIT_FLAGS2 = 0xB


class FuseRequestFactory:
    """Makes request bytes; ``uid``/``gid``/``pid`` are the defaults for every header."""

    def __init__(self, *, uid: int = 0, gid: int = 0, pid: int = 1, first_unique: int = 2) -> None:
        self.uid = uid
        self.gid = gid
        self.pid = pid
        self._next_unique = first_unique
        self.last_unique = 0

    # -- generic ----------------------------------------------------------------------

    def request(self, opcode: int, nodeid: int = 0, args: bytes = b"", *, unique: int | None = None,
                uid: int | None = None, gid: int | None = None, pid: int | None = None,
                total_extlen: int = 0, length: int | None = None) -> bytes:
        """Any opcode with raw ``args``; ``length`` overrides ``in_header.len``."""
        if unique is None:
            unique = self._next_unique
            self._next_unique += 2
        self.last_unique = unique
        total = abi.fuse_in_header.size + len(args)
        header = abi.fuse_in_header.pack(
            total if length is None else length, opcode, unique, nodeid,
            self.uid if uid is None else uid, self.gid if gid is None else gid,
            self.pid if pid is None else pid, total_extlen, 0)
        return header + args

    # -- session ------------------------------------------------------------------------

    def init(self, major: int = 7, minor: int = 38, *, max_readahead: int = 0x20000,
             flags: int = LINUX_6_1_INIT_FLAGS, flags2: int = LINUX_6_1_INIT_FLAGS2, **kw) -> bytes:
        """FUSE_INIT; the 16-byte pre-7.36 argument when ``minor < 36`` (as such kernels send)."""
        if minor < 36:
            args = abi.fuse_init_in_compat.pack(major, minor, max_readahead, flags & ~abi.InitFlags.INIT_EXT)
        else:
            args = abi.fuse_init_in.pack(major, minor, max_readahead, flags, flags2)
        return self.request(Opcode.INIT, 0, args, **kw)

    def destroy(self, **kw) -> bytes:
        return self.request(Opcode.DESTROY, 0, b"", **kw)

    # -- names and inodes -----------------------------------------------------------------

    def lookup(self, parent: int, name: bytes, *, nul: bool = True, **kw) -> bytes:
        """LOOKUP ``name``; ``nul=False`` omits the terminating NUL (malformed)."""
        return self.request(Opcode.LOOKUP, parent, name + (b"\0" if nul else b""), **kw)

    def forget(self, nodeid: int, nlookup: int, **kw) -> bytes:
        return self.request(Opcode.FORGET, nodeid, abi.fuse_forget_in.pack(nlookup), **kw)

    def batch_forget(self, items: list[tuple[int, int]], *, count: int | None = None, **kw) -> bytes:
        """BATCH_FORGET of ``(nodeid, nlookup)`` pairs; ``count`` overrides the header count."""
        args = abi.fuse_batch_forget_in.pack(len(items) if count is None else count, 0)
        args += b"".join(abi.fuse_forget_one.pack(nodeid, n) for nodeid, n in items)
        return self.request(Opcode.BATCH_FORGET, 0, args, **kw)

    def getattr(self, nodeid: int, fh: int | None = None, **kw) -> bytes:
        flags = abi.FUSE_GETATTR_FH if fh is not None else 0
        return self.request(Opcode.GETATTR, nodeid, abi.fuse_getattr_in.pack(flags, 0, fh or 0), **kw)

    def readlink(self, nodeid: int, **kw) -> bytes:
        return self.request(Opcode.READLINK, nodeid, b"", **kw)

    # -- files ----------------------------------------------------------------------------

    def open(self, nodeid: int, flags: int = 0, **kw) -> bytes:
        return self.request(Opcode.OPEN, nodeid, abi.fuse_open_in.pack(flags, 0), **kw)

    def read(self, nodeid: int, fh: int, offset: int, size: int, **kw) -> bytes:
        return self.request(Opcode.READ, nodeid, abi.fuse_read_in.pack(fh, offset, size, 0, 0, 0, 0), **kw)

    def release(self, nodeid: int, fh: int, flags: int = 0, **kw) -> bytes:
        return self.request(Opcode.RELEASE, nodeid, abi.fuse_release_in.pack(fh, flags, 0, 0), **kw)

    def flush(self, nodeid: int, fh: int, lock_owner: int = 0, **kw) -> bytes:
        return self.request(Opcode.FLUSH, nodeid, abi.fuse_flush_in.pack(fh, 0, 0, lock_owner), **kw)

    def fsync(self, nodeid: int, fh: int, datasync: bool = False, **kw) -> bytes:
        args = abi.fuse_fsync_in.pack(fh, abi.FUSE_FSYNC_FDATASYNC if datasync else 0, 0)
        return self.request(Opcode.FSYNC, nodeid, args, **kw)

    def lseek(self, nodeid: int, fh: int, offset: int, whence: int, **kw) -> bytes:
        return self.request(Opcode.LSEEK, nodeid, abi.fuse_lseek_in.pack(fh, offset, whence, 0), **kw)

    # -- directories ------------------------------------------------------------------------

    def opendir(self, nodeid: int, flags: int = 0, **kw) -> bytes:
        return self.request(Opcode.OPENDIR, nodeid, abi.fuse_open_in.pack(flags, 0), **kw)

    def readdir(self, nodeid: int, fh: int, offset: int = 0, size: int = 4096, **kw) -> bytes:
        return self.request(Opcode.READDIR, nodeid, abi.fuse_read_in.pack(fh, offset, size, 0, 0, 0, 0), **kw)

    def readdirplus(self, nodeid: int, fh: int, offset: int = 0, size: int = 4096, **kw) -> bytes:
        args = abi.fuse_read_in.pack(fh, offset, size, 0, 0, 0, 0)
        return self.request(Opcode.READDIRPLUS, nodeid, args, **kw)

    def releasedir(self, nodeid: int, fh: int, **kw) -> bytes:
        return self.request(Opcode.RELEASEDIR, nodeid, abi.fuse_release_in.pack(fh, 0, 0, 0), **kw)

    def fsyncdir(self, nodeid: int, fh: int, datasync: bool = False, **kw) -> bytes:
        args = abi.fuse_fsync_in.pack(fh, abi.FUSE_FSYNC_FDATASYNC if datasync else 0, 0)
        return self.request(Opcode.FSYNCDIR, nodeid, args, **kw)

    # -- misc -------------------------------------------------------------------------------

    def statfs(self, nodeid: int = 1, **kw) -> bytes:
        return self.request(Opcode.STATFS, nodeid, b"", **kw)

    def getxattr(self, nodeid: int, name: bytes, size: int, *, nul: bool = True, **kw) -> bytes:
        args = abi.fuse_getxattr_in.pack(size, 0) + name + (b"\0" if nul else b"")
        return self.request(Opcode.GETXATTR, nodeid, args, **kw)

    def listxattr(self, nodeid: int, size: int, **kw) -> bytes:
        return self.request(Opcode.LISTXATTR, nodeid, abi.fuse_getxattr_in.pack(size, 0), **kw)

    def access(self, nodeid: int, mask: int, **kw) -> bytes:
        return self.request(Opcode.ACCESS, nodeid, abi.fuse_access_in.pack(mask, 0), **kw)

    def interrupt(self, target_unique: int, **kw) -> bytes:
        """INTERRUPT of request ``target_unique`` (its own unique has the low bit set, as Linux does)."""
        if "unique" not in kw:
            kw["unique"] = target_unique | 1
        return self.request(Opcode.INTERRUPT, 0, abi.fuse_interrupt_in.pack(target_unique), **kw)

    def syncfs(self, nodeid: int = 1, **kw) -> bytes:
        return self.request(Opcode.SYNCFS, nodeid, abi.fuse_syncfs_in.pack(0), **kw)

    # -- write opcodes (layouts as Linux 6.1 sends them) ------------------------------------------

    def setattr(self, nodeid: int, valid: int, *, fh: int = 0, size: int = 0, lock_owner: int = 0,
                atime: int = 0, atimensec: int = 0, mtime: int = 0, mtimensec: int = 0, ctime: int = 0,
                ctimensec: int = 0, mode: int = 0, uid: int = 0, gid: int = 0, **kw) -> bytes:
        args = abi.fuse_setattr_in.pack(valid, 0, fh, size, lock_owner, atime, mtime, ctime, atimensec,
                                        mtimensec, ctimensec, mode, 0, uid, gid, 0)
        return self.request(Opcode.SETATTR, nodeid, args, **kw)

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int = 0, umask: int = 0o022, **kw) -> bytes:
        return self.request(Opcode.MKNOD, parent, abi.fuse_mknod_in.pack(mode, rdev, umask, 0) + name + b"\0",
                            **kw)

    def mkdir(self, parent: int, name: bytes, mode: int = 0o755, umask: int = 0o022, **kw) -> bytes:
        return self.request(Opcode.MKDIR, parent, abi.fuse_mkdir_in.pack(mode, umask) + name + b"\0", **kw)

    def symlink(self, parent: int, name: bytes, target: bytes, **kw) -> bytes:
        """SYMLINK: the new entry's name first, then the target (fs/fuse/dir.c order)."""
        return self.request(Opcode.SYMLINK, parent, name + b"\0" + target + b"\0", **kw)

    def link(self, oldnodeid: int, newparent: int, newname: bytes, **kw) -> bytes:
        return self.request(Opcode.LINK, newparent, abi.fuse_link_in.pack(oldnodeid) + newname + b"\0", **kw)

    def unlink(self, parent: int, name: bytes, **kw) -> bytes:
        return self.request(Opcode.UNLINK, parent, name + b"\0", **kw)

    def rmdir(self, parent: int, name: bytes, **kw) -> bytes:
        return self.request(Opcode.RMDIR, parent, name + b"\0", **kw)

    def rename(self, parent: int, name: bytes, newparent: int, newname: bytes, flags: int | None = None,
               **kw) -> bytes:
        """RENAME, or RENAME2 when ``flags`` is given (Linux sends RENAME2 only with flags)."""
        names = name + b"\0" + newname + b"\0"
        if flags is None:
            return self.request(Opcode.RENAME, parent, abi.fuse_rename_in.pack(newparent) + names, **kw)
        return self.request(Opcode.RENAME2, parent, abi.fuse_rename2_in.pack(newparent, flags, 0) + names, **kw)

    def create(self, parent: int, name: bytes, mode: int = 0o100644, flags: int = 0o102, umask: int = 0o022,
               **kw) -> bytes:
        args = abi.fuse_create_in.pack(flags, mode, umask, 0) + name + b"\0"
        return self.request(Opcode.CREATE, parent, args, **kw)

    def write(self, nodeid: int, fh: int, offset: int, data: bytes, write_flags: int = 0, **kw) -> bytes:
        args = abi.fuse_write_in.pack(fh, offset, len(data), write_flags, 0, 0, 0) + data
        return self.request(Opcode.WRITE, nodeid, args, **kw)

    def setxattr(self, nodeid: int, name: bytes, value: bytes, flags: int = 0, **kw) -> bytes:
        args = abi.fuse_setxattr_in_compat.pack(len(value), flags) + name + b"\0" + value
        return self.request(Opcode.SETXATTR, nodeid, args, **kw)

    def removexattr(self, nodeid: int, name: bytes, **kw) -> bytes:
        return self.request(Opcode.REMOVEXATTR, nodeid, name + b"\0", **kw)

    def fallocate(self, nodeid: int, fh: int, offset: int, length: int, mode: int = 0, **kw) -> bytes:
        return self.request(Opcode.FALLOCATE, nodeid, abi.fuse_fallocate_in.pack(fh, offset, length, mode, 0),
                            **kw)

    def copy_file_range(self, nodeid_in: int, fh_in: int, off_in: int, nodeid_out: int, fh_out: int,
                        off_out: int, length: int, flags: int = 0, **kw) -> bytes:
        args = abi.fuse_copy_file_range_in.pack(fh_in, off_in, nodeid_out, fh_out, off_out, length, flags)
        return self.request(Opcode.COPY_FILE_RANGE, nodeid_in, args, **kw)

    def lock(self, opcode: int, nodeid: int, fh: int, owner: int, start: int, end: int, type: int,
             pid: int = 0, lk_flags: int = 0, **kw) -> bytes:
        """GETLK / SETLK / SETLKW (``lk_flags`` FUSE_LK_FLOCK for flock(2))."""
        args = abi.fuse_lk_in.pack(fh, owner, start, end, type, pid, lk_flags, 0)
        return self.request(opcode, nodeid, args, **kw)

    def ioctl(self, nodeid: int, fh: int, cmd: int, **kw) -> bytes:
        """FUSE_IOCTL (fuse_ioctl_in: fh, flags, cmd, arg, in_size, out_size)."""
        return self.request(Opcode.IOCTL, nodeid, _pack("<QIIQII", fh, 0, cmd, 0, 0, 0), **kw)

    # -- any write opcode with plausible arguments (read-only servers refuse them all) ------------

    def write_request(self, opcode: int, nodeid: int = 1, **kw) -> bytes:
        """A plausible request of any write opcode (SETATTR, MKDIR, WRITE, ...)."""
        O = Opcode
        name = b"newname\0"
        args = {
            O.SETATTR: bytes(88),
            O.SYMLINK: name + b"target\0",
            O.MKNOD: _pack("<IIII", 0o100644, 0, 0o022, 0) + name,
            O.MKDIR: _pack("<II", 0o755, 0o022) + name,
            O.UNLINK: name,
            O.RMDIR: name,
            O.RENAME: _pack("<Q", 1) + name + b"other\0",
            O.RENAME2: _pack("<QII", 1, 0, 0) + name + b"other\0",
            O.LINK: _pack("<Q", 2) + name,
            O.WRITE: _pack("<QQIIQII", 0, 0, 5, 0, 0, 0, 0) + b"hello",
            O.CREATE: _pack("<IIII", 0o1 | 0o100, 0o644, 0o022, 0) + name,
            O.SETXATTR: _pack("<II", 3, 0) + b"user.x\0" + b"abc",
            O.REMOVEXATTR: b"user.x\0",
            O.FALLOCATE: _pack("<QQQII", 0, 0, 4096, 0, 0),
            O.COPY_FILE_RANGE: _pack("<QQQQQQQ", 0, 0, 3, 0, 0, 4096, 0),
            O.TMPFILE: _pack("<IIII", 0o2, 0o600, 0o022, 0) + b"\0",
        }.get(opcode, b"")
        return self.request(opcode, nodeid, args, **kw)
