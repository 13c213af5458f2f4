# Deliberately independent of src/nydus_vfs/fuse/abi.py (the harness judges that code): do not fold the two.
"""FUSE requests shaped the way a Linux 6.1 virtio-fs guest sends them, and reply decoders.

Sans-IO: builders return :class:`FuseRequest` values that know their own
segmentation; decoders take reply bytes and return named tuples.  Nothing here
touches a socket or guest memory, so the same requests can be replayed through
the vhost-user front-end, dumped, or fuzzed.

This module is written from ``include/uapi/linux/fuse.h`` (protocol 7.38) and
``fs/fuse/virtio_fs.c`` independently of ``nydus_vfs.fuse`` on purpose: the
harness is the oracle the back-end is checked against, so it must not share
the code under test.

Segmentation (``virtio_fs_enqueue_req`` in Linux 6.1)::

    readable: [fuse_in_header 40 B] [one bounce buffer: every non-page in-arg] [page segments]
    writable: [fuse_out_header 16 B] [one bounce buffer: every non-page out-arg] [page segments]

Empty bounce buffers are omitted.  FORGET has no writable part at all.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

from .errors import BackendProtocolError, HarnessUsageError

__all__ = [
    "FuseOpcode",
    "PAGE_SIZE",
    "IN_HEADER_SIZE",
    "OUT_HEADER_SIZE",
    "LINUX61_INIT_FLAGS",
    "LINUX61_INIT_FLAGS2",
    "O_RDONLY_LARGEFILE",
    "O_DIRECTORY_OPEN_FLAGS",
    "FuseRequest",
    "OutHeader",
    "Attr",
    "AttrOut",
    "EntryOut",
    "OpenOut",
    "InitOut",
    "StatFs",
    "Dirent",
    "DirentPlus",
    "pack_in_header",
    "unpack_in_header",
    "decode_out_header",
    "decode_attr",
    "decode_attr_out",
    "decode_entry_out",
    "decode_open_out",
    "decode_init_out",
    "decode_statfs",
    "decode_getxattr_out",
    "decode_dirents",
    "decode_direntplus",
    "decode_xattr_names",
    "init",
    "lookup",
    "forget",
    "batch_forget",
    "getattr",
    "readlink",
    "open_",
    "opendir",
    "read",
    "readdir",
    "readdirplus",
    "release",
    "releasedir",
    "flush",
    "statfs",
    "getxattr",
    "listxattr",
    "syncfs",
    "destroy",
    "FATTR_MODE",
    "FATTR_UID",
    "FATTR_GID",
    "FATTR_SIZE",
    "FATTR_ATIME",
    "FATTR_MTIME",
    "FATTR_FH",
    "FATTR_ATIME_NOW",
    "FATTR_MTIME_NOW",
    "setattr",
    "mknod",
    "mkdir",
    "symlink",
    "unlink",
    "rmdir",
    "rename",
    "link",
    "create",
    "write",
    "fsync",
    "setxattr",
    "removexattr",
    "fallocate",
    "lseek",
    "copy_file_range",
]


class FuseOpcode(IntEnum):
    """Opcodes of ``enum fuse_opcode`` (fuse.h 7.38)."""

    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51


PAGE_SIZE = 4096
IN_HEADER_SIZE = 40
OUT_HEADER_SIZE = 16

#: ``fuse_init_in.flags`` as Linux 6.1 virtiofs sends it: bits 0-30 except FILE_OPS (2)
#: and MAP_ALIGNMENT (26); INIT_EXT (30) is set, so ``flags2`` is meaningful.
LINUX61_INIT_FLAGS = 0x7BFFFFFB
#: ``fuse_init_in.flags2``: SECURITY_CTX, HAS_INODE_DAX, HAS_EXPIRE_ONLY.
LINUX61_INIT_FLAGS2 = 0xB
#: ``f_flags`` of a plain ``open(O_RDONLY)`` on x86-64 (the kernel forces O_LARGEFILE).
O_RDONLY_LARGEFILE = 0o100000
#: ``f_flags`` of ``opendir()``: O_RDONLY|O_NONBLOCK|O_DIRECTORY|O_LARGEFILE.
O_DIRECTORY_OPEN_FLAGS = 0o100000 | 0o4000 | 0o200000

_IN_HEADER = struct.Struct("<IIQQIIIHH")
_OUT_HEADER = struct.Struct("<IiQ")
_ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
_ATTR_OUT_HEAD = struct.Struct("<QII")
_ENTRY_OUT_HEAD = struct.Struct("<QQQQII")
_OPEN_OUT = struct.Struct("<QII")
_INIT_IN = struct.Struct("<IIIII44x")
_INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")
_KSTATFS = struct.Struct("<QQQQQIIII24x")
_GETATTR_IN = struct.Struct("<IIQ")
_OPEN_IN = struct.Struct("<II")
_READ_IN = struct.Struct("<QQIIQII")
_RELEASE_IN = struct.Struct("<QIIQ")
_FLUSH_IN = struct.Struct("<QIIQ")
_FORGET_IN = struct.Struct("<Q")
_BATCH_FORGET_IN = struct.Struct("<II")
_FORGET_ONE = struct.Struct("<QQ")
_GETXATTR_IN = struct.Struct("<II")
_GETXATTR_OUT = struct.Struct("<II")
_DIRENT = struct.Struct("<QQII")
_SYNCFS_IN = struct.Struct("<Q")

assert _ATTR.size == 88 and _ENTRY_OUT_HEAD.size + _ATTR.size == 128
assert _INIT_IN.size == 64 and _INIT_OUT.size == 64 and _KSTATFS.size == 80
assert _READ_IN.size == 40 and _IN_HEADER.size == IN_HEADER_SIZE


@dataclass(frozen=True)
class FuseRequest:
    """One FUSE request, before it is given a ``unique`` and put into descriptors.

    ``args`` is the concatenation of all non-page in-args (Linux's bounce buffer);
    ``in_pages`` is page data (WRITE payloads; unused by a read-only client).
    ``out_size`` is the capacity of the non-page out-arg bounce buffer and
    ``out_pages`` the sizes of the page segments after it.  ``reply`` is False
    for FORGET/BATCH_FORGET, which have no writable part.  ``nocreds`` requests
    (INIT, DESTROY, RELEASE*, FORGET) carry uid = gid = pid = 0 as in Linux.
    ``coalesce`` puts header and args in one segment: the hiprio FORGET is a
    single 48-byte ``virtio_fs_forget_req``.
    """

    opcode: int
    nodeid: int
    args: bytes = b""
    in_pages: bytes = b""
    out_size: int = 0
    out_pages: tuple[int, ...] = ()
    reply: bool = True
    nocreds: bool = False
    coalesce: bool = False

    @property
    def in_len(self) -> int:
        """``fuse_in_header.len``: header plus every in-arg, as the kernel computes it."""
        return IN_HEADER_SIZE + len(self.args) + len(self.in_pages)

    def header(self, unique: int, *, uid: int = 0, gid: int = 0, pid: int = 1) -> bytes:
        if self.nocreds:
            uid = gid = pid = 0
        return pack_in_header(self.in_len, self.opcode, unique, self.nodeid, uid, gid, pid)

    def readable_segments(self, unique: int, *, uid: int = 0, gid: int = 0, pid: int = 1) -> list[bytes]:
        """The device-readable segments, split exactly like ``virtio_fs_enqueue_req``."""
        segs = [self.header(unique, uid=uid, gid=gid, pid=pid)]
        if self.coalesce:
            return [segs[0] + self.args + self.in_pages]
        if self.args:
            segs.append(self.args)
        for off in range(0, len(self.in_pages), PAGE_SIZE):
            segs.append(self.in_pages[off:off + PAGE_SIZE])
        return segs

    def writable_sizes(self) -> list[int]:
        """Sizes of the device-writable segments (empty for FORGET)."""
        if not self.reply:
            return []
        sizes = [OUT_HEADER_SIZE]
        if self.out_size:
            sizes.append(self.out_size)
        sizes.extend(self.out_pages)
        return sizes

    @property
    def capacity(self) -> int:
        return sum(self.writable_sizes())


def pack_in_header(length: int, opcode: int, unique: int, nodeid: int,
                   uid: int = 0, gid: int = 0, pid: int = 0, total_extlen: int = 0) -> bytes:
    """``struct fuse_in_header`` (40 bytes)."""
    return _IN_HEADER.pack(length, opcode, unique, nodeid, uid, gid, pid, total_extlen, 0)


def unpack_in_header(data: bytes) -> tuple[int, int, int, int, int, int, int, int]:
    """(len, opcode, unique, nodeid, uid, gid, pid, total_extlen) of a request."""
    if len(data) < IN_HEADER_SIZE:
        raise HarnessUsageError(f"fuse_in_header needs {IN_HEADER_SIZE} bytes, got {len(data)}")
    return _IN_HEADER.unpack_from(data)[:8]


def _pages(size: int) -> tuple[int, ...]:
    """Page segment sizes for ``size`` bytes of page-backed reply data."""
    full, rest = divmod(size, PAGE_SIZE)
    return (PAGE_SIZE,) * full + ((rest,) if rest else ())


def _name(name: bytes | str) -> bytes:
    raw = name.encode() if isinstance(name, str) else bytes(name)
    return raw + b"\0"


# ---------------------------------------------------------------- request builders

def init(*, major: int = 7, minor: int = 38, max_readahead: int = 0x20000,
         flags: int = LINUX61_INIT_FLAGS, flags2: int = LINUX61_INIT_FLAGS2) -> FuseRequest:
    """FUSE_INIT exactly as Linux 6.1 virtiofs sends it (104 B in, 16+64 B out)."""
    return FuseRequest(FuseOpcode.INIT, 0, _INIT_IN.pack(major, minor, max_readahead, flags, flags2),
                       out_size=_INIT_OUT.size, nocreds=True)


def lookup(parent: int, name: bytes | str) -> FuseRequest:
    """FUSE_LOOKUP: in-arg is the NUL-terminated name; out is ``fuse_entry_out``."""
    return FuseRequest(FuseOpcode.LOOKUP, parent, _name(name), out_size=128)


def forget(nodeid: int, nlookup: int) -> FuseRequest:
    """FUSE_FORGET (hiprio): 48 readable bytes, no writable part, no reply."""
    return FuseRequest(FuseOpcode.FORGET, nodeid, _FORGET_IN.pack(nlookup), reply=False, nocreds=True,
                       coalesce=True)


def batch_forget(items: list[tuple[int, int]]) -> FuseRequest:
    """FUSE_BATCH_FORGET: count + {nodeid, nlookup}[count]; Linux 6.1 never sends it."""
    body = _BATCH_FORGET_IN.pack(len(items), 0) + b"".join(_FORGET_ONE.pack(n, c) for n, c in items)
    return FuseRequest(FuseOpcode.BATCH_FORGET, 0, body, reply=False, nocreds=True, coalesce=True)


def getattr(nodeid: int, fh: int | None = None) -> FuseRequest:  # noqa: A001 - FUSE op name
    """FUSE_GETATTR (56 B in, 16+104 B out); ``fh`` sets FUSE_GETATTR_FH."""
    flags = 1 if fh is not None else 0
    return FuseRequest(FuseOpcode.GETATTR, nodeid, _GETATTR_IN.pack(flags, 0, fh or 0), out_size=104)


def readlink(nodeid: int) -> FuseRequest:
    """FUSE_READLINK: no in-args; one page segment of PAGE_SIZE-1 bytes out."""
    return FuseRequest(FuseOpcode.READLINK, nodeid, out_pages=(PAGE_SIZE - 1,))


def open_(nodeid: int, flags: int = O_RDONLY_LARGEFILE, open_flags: int = 0) -> FuseRequest:
    """FUSE_OPEN (48 B in, 16+16 B out)."""
    return FuseRequest(FuseOpcode.OPEN, nodeid, _OPEN_IN.pack(flags, open_flags), out_size=16)


def opendir(nodeid: int, flags: int = O_DIRECTORY_OPEN_FLAGS) -> FuseRequest:
    """FUSE_OPENDIR (48 B in, 16+16 B out)."""
    return FuseRequest(FuseOpcode.OPENDIR, nodeid, _OPEN_IN.pack(flags, 0), out_size=16)


def read(nodeid: int, fh: int, offset: int, size: int, *, flags: int = O_RDONLY_LARGEFILE) -> FuseRequest:
    """FUSE_READ through the page cache: 80 B in; out is header + page segments."""
    return FuseRequest(FuseOpcode.READ, nodeid, _READ_IN.pack(fh, offset, size, 0, 0, flags, 0),
                       out_pages=_pages(size))


def readdir(nodeid: int, fh: int, offset: int = 0, size: int = PAGE_SIZE) -> FuseRequest:
    """FUSE_READDIR: ``read_in`` with the directory cookie; one page out."""
    return FuseRequest(FuseOpcode.READDIR, nodeid,
                       _READ_IN.pack(fh, offset, size, 0, 0, O_DIRECTORY_OPEN_FLAGS, 0), out_pages=_pages(size))


def readdirplus(nodeid: int, fh: int, offset: int = 0, size: int = PAGE_SIZE) -> FuseRequest:
    """FUSE_READDIRPLUS: 80 B in, header + one page out."""
    return FuseRequest(FuseOpcode.READDIRPLUS, nodeid,
                       _READ_IN.pack(fh, offset, size, 0, 0, O_DIRECTORY_OPEN_FLAGS, 0), out_pages=_pages(size))


def release(nodeid: int, fh: int, flags: int = O_RDONLY_LARGEFILE) -> FuseRequest:
    """FUSE_RELEASE (64 B in, header-only reply)."""
    return FuseRequest(FuseOpcode.RELEASE, nodeid, _RELEASE_IN.pack(fh, flags, 0, 0), nocreds=True)


def releasedir(nodeid: int, fh: int, flags: int = O_DIRECTORY_OPEN_FLAGS) -> FuseRequest:
    """FUSE_RELEASEDIR (64 B in, header-only reply)."""
    return FuseRequest(FuseOpcode.RELEASEDIR, nodeid, _RELEASE_IN.pack(fh, flags, 0, 0), nocreds=True)


def flush(nodeid: int, fh: int, lock_owner: int = 0) -> FuseRequest:
    """FUSE_FLUSH (64 B in, header-only reply); sent on every close."""
    return FuseRequest(FuseOpcode.FLUSH, nodeid, _FLUSH_IN.pack(fh, 0, 0, lock_owner))


def statfs(nodeid: int = 1) -> FuseRequest:
    """FUSE_STATFS: 40 B in (header only), 16+80 B out."""
    return FuseRequest(FuseOpcode.STATFS, nodeid, out_size=_KSTATFS.size)


def getxattr(nodeid: int, name: bytes | str, size: int) -> FuseRequest:
    """FUSE_GETXATTR: ``getxattr_in`` + name; out is ``getxattr_out`` (size 0) or the value."""
    return FuseRequest(FuseOpcode.GETXATTR, nodeid, _GETXATTR_IN.pack(size, 0) + _name(name),
                       out_size=_GETXATTR_OUT.size if size == 0 else size)


def listxattr(nodeid: int, size: int) -> FuseRequest:
    """FUSE_LISTXATTR: ``getxattr_in``; out is ``getxattr_out`` (size 0) or the name list."""
    return FuseRequest(FuseOpcode.LISTXATTR, nodeid, _GETXATTR_IN.pack(size, 0),
                       out_size=_GETXATTR_OUT.size if size == 0 else size)


def syncfs(nodeid: int = 1) -> FuseRequest:
    """FUSE_SYNCFS (48 B in, header-only reply)."""
    return FuseRequest(FuseOpcode.SYNCFS, nodeid, _SYNCFS_IN.pack(0))


def destroy() -> FuseRequest:
    """FUSE_DESTROY (40 B in, header-only reply); nodeid 0 as at umount."""
    return FuseRequest(FuseOpcode.DESTROY, 0, nocreds=True)


# ---------------------------------------------------------------- write requests (Linux 6.1 shapes)

_SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
_MKNOD_IN = struct.Struct("<IIII")
_MKDIR_IN = struct.Struct("<II")
_RENAME_IN = struct.Struct("<Q")
_RENAME2_IN = struct.Struct("<QII")
_LINK_IN = struct.Struct("<Q")
_WRITE_IN = struct.Struct("<QQIIQII")
_CREATE_IN = struct.Struct("<IIII")
_SETXATTR_IN = struct.Struct("<II")       # without FUSE_SETXATTR_EXT
_FALLOCATE_IN = struct.Struct("<QQQII")
_LSEEK_IN = struct.Struct("<QQII")
_COPY_RANGE_IN = struct.Struct("<QQQQQQQ")
_FSYNC_IN = struct.Struct("<QII")
#: FATTR_* bits of fuse_setattr_in.valid
FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_SIZE, FATTR_ATIME, FATTR_MTIME, FATTR_FH = 1, 2, 4, 8, 16, 32, 64
FATTR_ATIME_NOW, FATTR_MTIME_NOW = 128, 256


def setattr(nodeid: int, valid: int, *, fh: int = 0, size: int = 0, atime: int = 0, atimensec: int = 0,  # noqa: A001
            mtime: int = 0, mtimensec: int = 0, mode: int = 0, uid: int = 0, gid: int = 0) -> FuseRequest:
    """FUSE_SETATTR (88 B in, fuse_attr_out)."""
    args = _SETATTR_IN.pack(valid, 0, fh, size, 0, atime, mtime, 0, atimensec, mtimensec, 0, mode, 0, uid, gid, 0)
    return FuseRequest(FuseOpcode.SETATTR, nodeid, args, out_size=104)


def mknod(parent: int, name: bytes | str, mode: int, rdev: int = 0, umask: int = 0o022) -> FuseRequest:
    return FuseRequest(FuseOpcode.MKNOD, parent, _MKNOD_IN.pack(mode, rdev, umask, 0) + _name(name), out_size=128)


def mkdir(parent: int, name: bytes | str, mode: int = 0o755, umask: int = 0o022) -> FuseRequest:
    return FuseRequest(FuseOpcode.MKDIR, parent, _MKDIR_IN.pack(mode, umask) + _name(name), out_size=128)


def symlink(parent: int, name: bytes | str, target: bytes | str) -> FuseRequest:
    """FUSE_SYMLINK: the new name first, then the target (fs/fuse/dir.c)."""
    return FuseRequest(FuseOpcode.SYMLINK, parent, _name(name) + _name(target), out_size=128)


def unlink(parent: int, name: bytes | str) -> FuseRequest:
    return FuseRequest(FuseOpcode.UNLINK, parent, _name(name))


def rmdir(parent: int, name: bytes | str) -> FuseRequest:
    return FuseRequest(FuseOpcode.RMDIR, parent, _name(name))


def rename(parent: int, name: bytes | str, newdir: int, newname: bytes | str, flags: int = 0) -> FuseRequest:
    """FUSE_RENAME, or FUSE_RENAME2 when ``flags`` (what Linux 6.1 does)."""
    names = _name(name) + _name(newname)
    if flags:
        return FuseRequest(FuseOpcode.RENAME2, parent, _RENAME2_IN.pack(newdir, flags, 0) + names)
    return FuseRequest(FuseOpcode.RENAME, parent, _RENAME_IN.pack(newdir) + names)


def link(oldnodeid: int, newparent: int, newname: bytes | str) -> FuseRequest:
    return FuseRequest(FuseOpcode.LINK, newparent, _LINK_IN.pack(oldnodeid) + _name(newname), out_size=128)


def create(parent: int, name: bytes | str, flags: int, mode: int, umask: int = 0o022) -> FuseRequest:
    """FUSE_CREATE: out is fuse_entry_out + fuse_open_out."""
    return FuseRequest(FuseOpcode.CREATE, parent, _CREATE_IN.pack(flags, mode, umask, 0) + _name(name),
                       out_size=144)


def write(nodeid: int, fh: int, offset: int, data: bytes, *, flags: int = 0o100001) -> FuseRequest:
    """FUSE_WRITE: fuse_write_in in the bounce buffer, the data in page segments."""
    return FuseRequest(FuseOpcode.WRITE, nodeid, _WRITE_IN.pack(fh, offset, len(data), 0, 0, flags, 0),
                       in_pages=bytes(data), out_size=8)


def fsync(nodeid: int, fh: int, datasync: bool = False) -> FuseRequest:
    return FuseRequest(FuseOpcode.FSYNC, nodeid, _FSYNC_IN.pack(fh, 1 if datasync else 0, 0))


def setxattr(nodeid: int, name: bytes | str, value: bytes, flags: int = 0) -> FuseRequest:
    return FuseRequest(FuseOpcode.SETXATTR, nodeid, _SETXATTR_IN.pack(len(value), flags) + _name(name) + value)


def removexattr(nodeid: int, name: bytes | str) -> FuseRequest:
    return FuseRequest(FuseOpcode.REMOVEXATTR, nodeid, _name(name))


def fallocate(nodeid: int, fh: int, offset: int, length: int, mode: int = 0) -> FuseRequest:
    return FuseRequest(FuseOpcode.FALLOCATE, nodeid, _FALLOCATE_IN.pack(fh, offset, length, mode, 0))


def lseek(nodeid: int, fh: int, offset: int, whence: int) -> FuseRequest:
    return FuseRequest(FuseOpcode.LSEEK, nodeid, _LSEEK_IN.pack(fh, offset, whence, 0), out_size=8)


def copy_file_range(nodeid_in: int, fh_in: int, off_in: int, nodeid_out: int, fh_out: int, off_out: int,
                    length: int) -> FuseRequest:
    return FuseRequest(FuseOpcode.COPY_FILE_RANGE, nodeid_in,
                       _COPY_RANGE_IN.pack(fh_in, off_in, nodeid_out, fh_out, off_out, length, 0), out_size=8)


# ---------------------------------------------------------------- reply decoders

class OutHeader(NamedTuple):
    len: int
    error: int
    unique: int


class Attr(NamedTuple):
    """``struct fuse_attr`` (88 bytes)."""

    ino: int
    size: int
    blocks: int
    atime: int
    mtime: int
    ctime: int
    atimensec: int
    mtimensec: int
    ctimensec: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    blksize: int
    flags: int


class AttrOut(NamedTuple):
    attr_valid: int
    attr_valid_nsec: int
    attr: Attr


class EntryOut(NamedTuple):
    nodeid: int
    generation: int
    entry_valid: int
    attr_valid: int
    entry_valid_nsec: int
    attr_valid_nsec: int
    attr: Attr


class OpenOut(NamedTuple):
    fh: int
    open_flags: int


class InitOut(NamedTuple):
    major: int
    minor: int
    max_readahead: int
    flags: int
    max_background: int
    congestion_threshold: int
    max_write: int
    time_gran: int
    max_pages: int
    map_alignment: int
    flags2: int


class StatFs(NamedTuple):
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    bsize: int
    namelen: int
    frsize: int


class Dirent(NamedTuple):
    ino: int
    off: int
    type: int
    name: bytes


class DirentPlus(NamedTuple):
    entry: EntryOut
    dirent: Dirent


def _need(data: bytes, size: int, what: str) -> None:
    if len(data) < size:
        raise BackendProtocolError(f"{what} needs {size} bytes of reply payload, got {len(data)}")


def decode_out_header(data: bytes) -> OutHeader:
    _need(data, OUT_HEADER_SIZE, "fuse_out_header")
    return OutHeader(*_OUT_HEADER.unpack_from(data))


def decode_attr(data: bytes, offset: int = 0) -> Attr:
    _need(data[offset:], _ATTR.size, "fuse_attr")
    return Attr(*_ATTR.unpack_from(data, offset))


def decode_attr_out(data: bytes) -> AttrOut:
    _need(data, 104, "fuse_attr_out")
    valid, nsec, _ = _ATTR_OUT_HEAD.unpack_from(data)
    return AttrOut(valid, nsec, decode_attr(data, 16))


def decode_entry_out(data: bytes, offset: int = 0) -> EntryOut:
    _need(data[offset:], 128, "fuse_entry_out")
    head = _ENTRY_OUT_HEAD.unpack_from(data, offset)
    return EntryOut(*head, decode_attr(data, offset + _ENTRY_OUT_HEAD.size))


def decode_open_out(data: bytes) -> OpenOut:
    _need(data, _OPEN_OUT.size, "fuse_open_out")
    fh, flags, _ = _OPEN_OUT.unpack_from(data)
    return OpenOut(fh, flags)


def decode_init_out(data: bytes) -> InitOut:
    """``fuse_init_out``; a short reply is zero-extended, as the kernel does."""
    _need(data, 8, "fuse_init_out.major/minor")
    padded = bytes(data[:_INIT_OUT.size]).ljust(_INIT_OUT.size, b"\0")
    return InitOut(*_INIT_OUT.unpack(padded))


def decode_statfs(data: bytes) -> StatFs:
    _need(data, _KSTATFS.size, "fuse_statfs_out")
    return StatFs(*_KSTATFS.unpack_from(data)[:8])


def decode_getxattr_out(data: bytes) -> int:
    _need(data, _GETXATTR_OUT.size, "fuse_getxattr_out")
    return _GETXATTR_OUT.unpack_from(data)[0]


def _dirent_at(data: bytes, pos: int, what: str) -> tuple[Dirent, int]:
    if len(data) - pos < _DIRENT.size:
        raise BackendProtocolError(f"{what} at byte {pos}: {len(data) - pos} bytes left, dirent header needs 24")
    ino, off, namelen, typ = _DIRENT.unpack_from(data, pos)
    if namelen == 0 or namelen > 1024:
        raise BackendProtocolError(f"{what} at byte {pos}: namelen {namelen} outside 1..1024")
    end = pos + _DIRENT.size + namelen
    if end > len(data):
        raise BackendProtocolError(f"{what} at byte {pos}: name of {namelen} bytes runs past the reply end")
    padded = (end + 7) & ~7
    return Dirent(ino, off, typ, bytes(data[pos + _DIRENT.size:end])), min(padded, len(data))


def decode_dirents(data: bytes) -> list[Dirent]:
    """All ``fuse_dirent`` records of a READDIR reply (8-byte aligned)."""
    out, pos = [], 0
    while pos < len(data):
        ent, pos = _dirent_at(data, pos, "fuse_dirent")
        out.append(ent)
    return out


def decode_direntplus(data: bytes) -> list[DirentPlus]:
    """All ``fuse_direntplus`` records of a READDIRPLUS reply."""
    out, pos = [], 0
    while pos < len(data):
        _need(data[pos:], 128 + _DIRENT.size, f"fuse_direntplus at byte {pos}")
        entry = decode_entry_out(data, pos)
        ent, pos = _dirent_at(data, pos + 128, "fuse_direntplus.dirent")
        out.append(DirentPlus(entry, ent))
    return out


def decode_xattr_names(data: bytes) -> list[bytes]:
    """The NUL-separated name list of a LISTXATTR reply."""
    if data and not data.endswith(b"\0"):
        raise BackendProtocolError("LISTXATTR reply is not NUL-terminated")
    return [n for n in bytes(data).split(b"\0") if n]
