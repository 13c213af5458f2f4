"""Linux system calls the passthrough filesystem needs and ``os`` does not offer.

Thin ctypes wrappers, one per call, each raising ``OSError(errno)`` like ``os``
does.  Nothing here decides policy; :mod:`.passthrough` does.  Availability is
probed once at import (``HAVE_*``) so callers pick their fallback up front.

* ``openat2`` (Linux 5.6) has no glibc wrapper: it goes through ``syscall(2)``
  with its number, which is the same (437) on every architecture.
* ``statx`` is only used for ``stx_mnt_id`` (Linux 5.8); without it the mount
  id is reported as 0.
"""

from __future__ import annotations

import ctypes
import os
import struct

__all__ = [
    "RESOLVE_NO_XDEV",
    "RESOLVE_NO_MAGICLINKS",
    "RESOLVE_NO_SYMLINKS",
    "RESOLVE_BENEATH",
    "AT_EMPTY_PATH",
    "AT_SYMLINK_NOFOLLOW",
    "UTIME_NOW",
    "UTIME_OMIT",
    "HAVE_OPENAT2",
    "openat2",
    "mount_id",
    "name_to_handle",
    "open_by_handle",
    "renameat2",
    "utimensat",
    "fchownat",
    "fallocate",
    "setfsuid",
    "setfsgid",
    "syncfs",
]

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
AT_EMPTY_PATH = 0x1000
AT_SYMLINK_NOFOLLOW = 0x100
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

_SYS_OPENAT2 = 437
_STATX_MNT_ID = 0x1000
_STATX_SIZE = 256
_STX_MNT_ID_OFFSET = 0x90
_MAX_HANDLE_SZ = 128

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * _MAX_HANDLE_SZ)]


def _raise(name: str) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{name}: {os.strerror(err)}")


def openat2(dirfd: int, name: bytes, flags: int, resolve: int, mode: int = 0) -> int:
    """``openat2(dirfd, name, {flags, mode, resolve})``; a new fd or OSError."""
    how = _OpenHow(flags, mode, resolve)
    fd = _libc.syscall(_SYS_OPENAT2, dirfd, name, ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        _raise("openat2")
    return fd


def _probe_openat2() -> bool:
    try:
        fd = openat2(-100, b"/", os.O_PATH | os.O_CLOEXEC, RESOLVE_NO_MAGICLINKS)
    except OSError:
        return False
    os.close(fd)
    return True


HAVE_OPENAT2 = _probe_openat2()

_statx = getattr(_libc, "statx", None)
_statx_buf = ctypes.create_string_buffer(_STATX_SIZE)
_U64 = struct.Struct("<Q").unpack_from


def mount_id(fd: int) -> int:
    """The mount id of the file ``fd`` refers to (any fd, O_PATH too); 0 when statx cannot tell."""
    if _statx is None:
        return 0
    if _statx(fd, b"", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW, _STATX_MNT_ID, _statx_buf) != 0:
        _raise("statx")
    mask = struct.unpack_from("<I", _statx_buf, 0)[0]
    return _U64(_statx_buf, _STX_MNT_ID_OFFSET)[0] if mask & _STATX_MNT_ID else 0


def name_to_handle(fd: int) -> bytes | None:
    """An opaque handle for the file ``fd`` refers to (type + bytes), or None if unsupported."""
    fh = _FileHandle(_MAX_HANDLE_SZ, 0)
    mnt = ctypes.c_int()
    if _libc.name_to_handle_at(fd, b"", ctypes.byref(fh), ctypes.byref(mnt), AT_EMPTY_PATH) != 0:
        return None
    return struct.pack("<i", fh.handle_type) + bytes(fh.f_handle[:fh.handle_bytes])


def open_by_handle(mount_fd: int, handle: bytes, flags: int) -> int:
    """Reopen a handle from :func:`name_to_handle` (needs CAP_DAC_READ_SEARCH)."""
    fh = _FileHandle(len(handle) - 4, struct.unpack_from("<i", handle)[0])
    ctypes.memmove(fh.f_handle, handle[4:], len(handle) - 4)
    fd = _libc.open_by_handle_at(mount_fd, ctypes.byref(fh), flags)
    if fd < 0:
        _raise("open_by_handle_at")
    return fd


def renameat2(olddirfd: int, old: bytes, newdirfd: int, new: bytes, flags: int) -> None:
    if _libc.renameat2(olddirfd, old, newdirfd, new, ctypes.c_uint(flags)) != 0:
        _raise("renameat2")


def utimensat(dirfd: int, name: bytes, atime: tuple[int, int], mtime: tuple[int, int], flags: int) -> None:
    """Times as ``(sec, nsec)``; nsec may be UTIME_NOW or UTIME_OMIT."""
    ts = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    if _libc.utimensat(dirfd, name, ts, flags) != 0:
        _raise("utimensat")


def fchownat(dirfd: int, name: bytes, uid: int, gid: int, flags: int) -> None:
    """uid/gid of -1 (0xFFFFFFFF) leave that id unchanged."""
    if _libc.fchownat(dirfd, name, ctypes.c_uint32(uid), ctypes.c_uint32(gid), flags) != 0:
        _raise("fchownat")


_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        _raise("fallocate")


def setfsuid(uid: int) -> int:
    """Set this thread's filesystem uid; returns the previous one (the call cannot report errors)."""
    return _libc.setfsuid(ctypes.c_uint32(uid))


def setfsgid(gid: int) -> int:
    return _libc.setfsgid(ctypes.c_uint32(gid))


def syncfs(fd: int) -> None:
    """Flush the filesystem ``fd`` lives on (syncfs(2))."""
    if _libc.syncfs(fd) != 0:
        _raise("syncfs")
