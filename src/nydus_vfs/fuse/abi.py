"""The FUSE kernel ABI, protocol 7.38, as plain constants and precompiled structs.

Everything here mirrors ``include/uapi/linux/fuse.h`` (``/usr/include/linux/fuse.h``
on the build machine): opcode and flag values, and one little-endian
``struct.Struct`` per kernel struct, named exactly like the C struct so a
reader can put the header next to this file.  No behaviour lives here; the
codec (``codec.py``) and the dispatcher (``server.py``) build on it.

Byte order: FUSE uses the host's byte order.  Only little-endian peers are
supported (x86-64 and aarch64 guests), so every format starts with ``<``.
"""

from __future__ import annotations

import enum
import struct

__all__ = [
    "FUSE_KERNEL_VERSION",
    "FUSE_KERNEL_MINOR_VERSION",
    "FUSE_ROOT_ID",
    "FUSE_MIN_READ_BUFFER",
    "FUSE_COMPAT_ENTRY_OUT_SIZE",
    "FUSE_COMPAT_ATTR_OUT_SIZE",
    "FUSE_COMPAT_STATFS_SIZE",
    "FUSE_COMPAT_INIT_OUT_SIZE",
    "FUSE_COMPAT_22_INIT_OUT_SIZE",
    "NAME_MAX",
    "XATTR_NAME_MAX",
    "PAGE_SIZE",
    "Opcode",
    "InitFlags",
    "FOPEN_DIRECT_IO",
    "FOPEN_KEEP_CACHE",
    "FOPEN_NONSEEKABLE",
    "FOPEN_CACHE_DIR",
    "FOPEN_STREAM",
    "FOPEN_NOFLUSH",
    "FUSE_GETATTR_FH",
    "FUSE_READ_LOCKOWNER",
    "FUSE_RELEASE_FLUSH",
    "FUSE_FSYNC_FDATASYNC",
    "FATTR_MODE",
    "FATTR_UID",
    "FATTR_GID",
    "FATTR_SIZE",
    "FATTR_ATIME",
    "FATTR_MTIME",
    "FATTR_FH",
    "FATTR_ATIME_NOW",
    "FATTR_MTIME_NOW",
    "FATTR_LOCKOWNER",
    "FATTR_CTIME",
    "FATTR_KILL_SUIDGID",
    "FUSE_WRITE_CACHE",
    "FUSE_WRITE_LOCKOWNER",
    "FUSE_WRITE_KILL_SUIDGID",
    "FUSE_LK_FLOCK",
    "FUSE_COMPAT_SETXATTR_IN_SIZE",
    "O_ACCMODE",
    "O_RDONLY",
    "O_WRONLY",
    "O_RDWR",
    "O_CREAT",
    "O_EXCL",
    "O_TRUNC",
    "O_APPEND",
    "O_TMPFILE_BIT",
    "WRITE_OPCODES",
    "NOSYS_OPCODES",
    "NO_REPLY_OPCODES",
    "fuse_in_header",
    "fuse_out_header",
    "fuse_attr",
    "fuse_kstatfs",
    "fuse_entry_out",
    "fuse_attr_out",
    "fuse_forget_in",
    "fuse_forget_one",
    "fuse_batch_forget_in",
    "fuse_getattr_in",
    "fuse_open_in",
    "fuse_open_out",
    "fuse_release_in",
    "fuse_flush_in",
    "fuse_read_in",
    "fuse_fsync_in",
    "fuse_getxattr_in",
    "fuse_getxattr_out",
    "fuse_access_in",
    "fuse_init_in",
    "fuse_init_in_compat",
    "fuse_init_out",
    "fuse_interrupt_in",
    "fuse_lseek_in",
    "fuse_lseek_out",
    "fuse_syncfs_in",
    "fuse_dirent",
    "fuse_setattr_in",
    "fuse_mknod_in",
    "fuse_mkdir_in",
    "fuse_rename_in",
    "fuse_rename2_in",
    "fuse_link_in",
    "fuse_write_in",
    "fuse_write_out",
    "fuse_create_in",
    "fuse_setxattr_in",
    "fuse_setxattr_in_compat",
    "fuse_fallocate_in",
    "fuse_copy_file_range_in",
    "fuse_file_lock",
    "fuse_lk_in",
    "fuse_lk_out",
    "FUSE_ENTRY_OUT_SIZE",
    "FUSE_ATTR_OUT_SIZE",
    "FUSE_NAME_OFFSET",
    "FUSE_NAME_OFFSET_DIRENTPLUS",
    "fuse_dirent_align",
]

FUSE_KERNEL_VERSION = 7
FUSE_KERNEL_MINOR_VERSION = 38
FUSE_ROOT_ID = 1

#: The kernel requires /dev/fuse readers to offer at least this many bytes.
FUSE_MIN_READ_BUFFER = 8192

# Reply sizes for peers older than the struct: the kernel copies at most the
# size it knows, so a server speaking to an old minor must send the short form.
FUSE_COMPAT_ENTRY_OUT_SIZE = 120   # minor < 9
FUSE_COMPAT_ATTR_OUT_SIZE = 96     # minor < 9
FUSE_COMPAT_STATFS_SIZE = 48       # minor < 4
FUSE_COMPAT_INIT_OUT_SIZE = 8      # minor < 5
FUSE_COMPAT_22_INIT_OUT_SIZE = 24  # minor < 23

NAME_MAX = 255
XATTR_NAME_MAX = 255
PAGE_SIZE = 4096


class Opcode(enum.IntEnum):
    """``enum fuse_opcode`` (without the ``FUSE_`` prefix)."""

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


class InitFlags(enum.IntFlag):
    """``FUSE_*`` INIT capability bits; bits 32..63 travel in ``flags2``."""

    ASYNC_READ = 1 << 0
    POSIX_LOCKS = 1 << 1
    FILE_OPS = 1 << 2
    ATOMIC_O_TRUNC = 1 << 3
    EXPORT_SUPPORT = 1 << 4
    BIG_WRITES = 1 << 5
    DONT_MASK = 1 << 6
    SPLICE_WRITE = 1 << 7
    SPLICE_MOVE = 1 << 8
    SPLICE_READ = 1 << 9
    FLOCK_LOCKS = 1 << 10
    HAS_IOCTL_DIR = 1 << 11
    AUTO_INVAL_DATA = 1 << 12
    DO_READDIRPLUS = 1 << 13
    READDIRPLUS_AUTO = 1 << 14
    ASYNC_DIO = 1 << 15
    WRITEBACK_CACHE = 1 << 16
    NO_OPEN_SUPPORT = 1 << 17
    PARALLEL_DIROPS = 1 << 18
    HANDLE_KILLPRIV = 1 << 19
    POSIX_ACL = 1 << 20
    ABORT_ERROR = 1 << 21
    MAX_PAGES = 1 << 22
    CACHE_SYMLINKS = 1 << 23
    NO_OPENDIR_SUPPORT = 1 << 24
    EXPLICIT_INVAL_DATA = 1 << 25
    MAP_ALIGNMENT = 1 << 26
    SUBMOUNTS = 1 << 27
    HANDLE_KILLPRIV_V2 = 1 << 28
    SETXATTR_EXT = 1 << 29
    INIT_EXT = 1 << 30
    INIT_RESERVED = 1 << 31
    SECURITY_CTX = 1 << 32
    HAS_INODE_DAX = 1 << 33
    HAS_EXPIRE_ONLY = 1 << 35


FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_CACHE_DIR = 1 << 3
FOPEN_STREAM = 1 << 4
FOPEN_NOFLUSH = 1 << 5

FUSE_GETATTR_FH = 1 << 0
FUSE_READ_LOCKOWNER = 1 << 1
FUSE_RELEASE_FLUSH = 1 << 0
FUSE_FSYNC_FDATASYNC = 1 << 0

# fuse_setattr_in.valid: which fields the kernel wants changed.
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11

# fuse_write_in.write_flags
FUSE_WRITE_CACHE = 1 << 0
FUSE_WRITE_LOCKOWNER = 1 << 1
FUSE_WRITE_KILL_SUIDGID = 1 << 2

#: fuse_lk_in.lk_flags: the lock request comes from flock(2), not fcntl(2).
FUSE_LK_FLOCK = 1 << 0

#: fuse_setxattr_in is 8 bytes (size, flags) unless SETXATTR_EXT was negotiated.
FUSE_COMPAT_SETXATTR_IN_SIZE = 8

# open(2) flags as the *guest's* Linux ABI encodes them (octal, asm-generic);
# deliberately not taken from the host's ``os`` module.
O_ACCMODE = 0o3
O_RDONLY = 0o0
O_WRONLY = 0o1
O_RDWR = 0o2
O_CREAT = 0o100
O_EXCL = 0o200
O_TRUNC = 0o1000
O_APPEND = 0o2000
#: ``__O_TMPFILE``: the bit that, with O_DIRECTORY, makes O_TMPFILE.
O_TMPFILE_BIT = 0o20000000

#: Opcodes that modify the filesystem: EROFS on a read-only server, handed to
#: the filesystem's write methods otherwise.
WRITE_OPCODES = frozenset({
    Opcode.SETATTR, Opcode.SYMLINK, Opcode.MKNOD, Opcode.MKDIR, Opcode.UNLINK,
    Opcode.RMDIR, Opcode.RENAME, Opcode.RENAME2, Opcode.LINK, Opcode.WRITE,
    Opcode.CREATE, Opcode.SETXATTR, Opcode.REMOVEXATTR, Opcode.FALLOCATE,
    Opcode.COPY_FILE_RANGE, Opcode.TMPFILE,
})

#: Known opcodes this server never implements: answered ENOSYS so the kernel
#: stops asking (BMAP is for block devices, DAX needs a window QEMU lacks).
#: IOCTL is answered ENOTTY instead (what ioctl(2) says for "not supported").
NOSYS_OPCODES = frozenset({
    Opcode.BMAP, Opcode.POLL, Opcode.SETUPMAPPING, Opcode.REMOVEMAPPING,
})

#: Requests the kernel expects no reply to.  NOTIFY_REPLY answers a
#: FUSE_NOTIFY_RETRIEVE we never send, so it is dropped like a forget.
NO_REPLY_OPCODES = frozenset({
    Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT, Opcode.NOTIFY_REPLY,
})

# -- structs (fields in declaration order, as in fuse.h) ----------------------------

#: len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding
fuse_in_header = struct.Struct("<IIQQIIIHH")
#: len, error, unique
fuse_out_header = struct.Struct("<IiQ")
#: ino, size, blocks, atime, mtime, ctime, atimensec, mtimensec, ctimensec,
#: mode, nlink, uid, gid, rdev, blksize, flags.  The times are declared __u64 but
#: carry the kernel's signed seconds (a file dated before 1970 is negative), so
#: they are packed as two's complement.
fuse_attr = struct.Struct("<QQQqqqIIIIIIIIII")
#: blocks, bfree, bavail, files, ffree, bsize, namelen, frsize, padding, spare[6]
fuse_kstatfs = struct.Struct("<QQQQQIIII24x")
#: nodeid, generation, entry_valid, attr_valid, entry_valid_nsec, attr_valid_nsec
#: (the 88-byte fuse_attr follows)
fuse_entry_out = struct.Struct("<QQQQII")
#: attr_valid, attr_valid_nsec, dummy (the 88-byte fuse_attr follows)
fuse_attr_out = struct.Struct("<QII")
#: nlookup
fuse_forget_in = struct.Struct("<Q")
#: nodeid, nlookup
fuse_forget_one = struct.Struct("<QQ")
#: count, dummy
fuse_batch_forget_in = struct.Struct("<II")
#: getattr_flags, dummy, fh
fuse_getattr_in = struct.Struct("<IIQ")
#: flags, open_flags
fuse_open_in = struct.Struct("<II")
#: fh, open_flags, padding
fuse_open_out = struct.Struct("<QII")
#: fh, flags, release_flags, lock_owner
fuse_release_in = struct.Struct("<QIIQ")
#: fh, unused, padding, lock_owner
fuse_flush_in = struct.Struct("<QIIQ")
#: fh, offset, size, read_flags, lock_owner, flags, padding
fuse_read_in = struct.Struct("<QQIIQII")
#: fh, fsync_flags, padding
fuse_fsync_in = struct.Struct("<QII")
#: size, padding
fuse_getxattr_in = struct.Struct("<II")
#: size, padding
fuse_getxattr_out = struct.Struct("<II")
#: mask, padding
fuse_access_in = struct.Struct("<II")
#: major, minor, max_readahead, flags, flags2, unused[11]   (7.36+: 64 bytes)
fuse_init_in = struct.Struct("<IIIII44x")
#: major, minor, max_readahead, flags   (before 7.36 the kernel sends 16 bytes)
fuse_init_in_compat = struct.Struct("<IIII")
#: major, minor, max_readahead, flags, max_background, congestion_threshold,
#: max_write, time_gran, max_pages, map_alignment, flags2, unused[7]
fuse_init_out = struct.Struct("<IIIIHHIIHHI28x")
#: unique
fuse_interrupt_in = struct.Struct("<Q")
#: fh, offset, whence, padding
fuse_lseek_in = struct.Struct("<QQII")
#: offset
fuse_lseek_out = struct.Struct("<Q")
#: padding
fuse_syncfs_in = struct.Struct("<Q")
#: ino, off, namelen, type (the name follows, padded to 8 bytes)
fuse_dirent = struct.Struct("<QQII")
#: valid, padding, fh, size, lock_owner, atime, mtime, ctime, atimensec,
#: mtimensec, ctimensec, mode, unused4, uid, gid, unused5
fuse_setattr_in = struct.Struct("<IIQQQQQQIIIIIIII")
#: mode, rdev, umask, padding (the name follows)
fuse_mknod_in = struct.Struct("<IIII")
#: mode, umask (the name follows)
fuse_mkdir_in = struct.Struct("<II")
#: newdir (old name and new name follow)
fuse_rename_in = struct.Struct("<Q")
#: newdir, flags, padding (old name and new name follow)
fuse_rename2_in = struct.Struct("<QII")
#: oldnodeid (the new name follows)
fuse_link_in = struct.Struct("<Q")
#: fh, offset, size, write_flags, lock_owner, flags, padding (the data follows)
fuse_write_in = struct.Struct("<QQIIQII")
#: size, padding
fuse_write_out = struct.Struct("<II")
#: flags, mode, umask, open_flags (the name follows)
fuse_create_in = struct.Struct("<IIII")
#: size, flags, setxattr_flags, padding (with SETXATTR_EXT; name and value follow)
fuse_setxattr_in = struct.Struct("<IIII")
#: size, flags (without SETXATTR_EXT, what Linux 6.1 sends unless negotiated)
fuse_setxattr_in_compat = struct.Struct("<II")
#: fh, offset, length, mode, padding
fuse_fallocate_in = struct.Struct("<QQQII")
#: fh_in, off_in, nodeid_out, fh_out, off_out, len, flags
fuse_copy_file_range_in = struct.Struct("<QQQQQQQ")
#: start, end, type, pid
fuse_file_lock = struct.Struct("<QQII")
#: fh, owner, lk (start, end, type, pid), lk_flags, padding
fuse_lk_in = struct.Struct("<QQQQIIII")
#: lk (start, end, type, pid)
fuse_lk_out = fuse_file_lock
#: Full sizes of the two structs whose packed heads above omit the trailing attr.
FUSE_ENTRY_OUT_SIZE = fuse_entry_out.size + fuse_attr.size                # 128
FUSE_ATTR_OUT_SIZE = fuse_attr_out.size + fuse_attr.size                  # 104

FUSE_NAME_OFFSET = fuse_dirent.size                                   # 24
FUSE_NAME_OFFSET_DIRENTPLUS = fuse_entry_out.size + fuse_attr.size + fuse_dirent.size  # 152


def fuse_dirent_align(x: int) -> int:
    """``FUSE_DIRENT_ALIGN``: round up to the next multiple of 8."""
    return (x + 7) & ~7
