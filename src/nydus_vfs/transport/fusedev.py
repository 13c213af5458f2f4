"""The ``/dev/fuse`` transport: mount, move request bytes to the FUSE server, unmount.

Order of events: :func:`mount_fuse` opens ``/dev/fuse`` and mounts it (source
``rafs``, type ``fuse``, read-only, ``default_permissions,allow_other`` like
nydusd); :class:`FuseDevTransport` then reads one request per ``read(2)`` on the
event loop, hands the bytes to ``FuseServer.handle`` and writes the reply; it ends
when the kernel reports ENODEV (someone unmounted us) or :meth:`stop` is called,
after which :func:`unmount_fuse` detaches the mount.

The FUSE server never sees the fd: this module is the only place that does
``/dev/fuse`` I/O, so the same server serves virtio-fs unchanged.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import logging
import os
import stat as _stat
import struct

from ..errors import TransportError
from ..fuse.ops import FileSegment

__all__ = ["FuseDevTransport", "mount_fuse", "unmount_fuse", "is_mountpoint"]

log = logging.getLogger("nydus_vfs.transport")

_MS_RDONLY = 1
_MS_NOSUID = 2
_MS_NODEV = 4
_MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

# The kernel refuses reads smaller than max_write plus room for the headers.
_HEADROOM = 64 * 1024


def mount_fuse(mountpoint: str, *, readonly: bool = True, fsname: str = "rafs") -> int:
    """Open ``/dev/fuse`` and mount it on ``mountpoint``; returns the session fd.

    Raises TransportError with the reason (not root, no /dev/fuse, not a directory).
    """
    mnt = os.path.realpath(mountpoint)
    try:
        st = os.stat(mnt)
    except OSError as exc:
        raise TransportError(f"mountpoint {mountpoint}: {exc.strerror}") from None
    if not _stat.S_ISDIR(st.st_mode):
        raise TransportError(f"mountpoint {mountpoint} is not a directory")
    try:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise TransportError(f"cannot open /dev/fuse: {exc.strerror}") from None
    opts = (f"fd={fd},rootmode={_stat.S_IFMT(st.st_mode):o},user_id={os.getuid()},"
            f"group_id={os.getgid()},default_permissions,allow_other")
    flags = _MS_NOSUID | _MS_NODEV | (_MS_RDONLY if readonly else 0)
    if _libc.mount(fsname.encode(), mnt.encode(), b"fuse", flags, opts.encode()) != 0:
        err = ctypes.get_errno()
        os.close(fd)
        hint = " (mounting FUSE needs root)" if err == errno.EPERM else ""
        raise TransportError(f"mount of FUSE on {mnt} failed: {os.strerror(err)}{hint}")
    log.info("mounted FUSE on %s", mnt)
    return fd


def unmount_fuse(mountpoint: str) -> None:
    """Lazily detach the FUSE mount at ``mountpoint``; logs (does not raise) on failure."""
    mnt = os.path.realpath(mountpoint)
    if _libc.umount2(mnt.encode(), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            log.warning("unmount of %s failed: %s", mnt, os.strerror(err))
    else:
        log.info("unmounted %s", mnt)


def is_mountpoint(path: str) -> bool:
    try:
        return os.path.ismount(path)
    except OSError:
        return False


class FuseDevTransport:
    """Serves one ``/dev/fuse`` session on the running event loop.

    ``server`` is a :class:`nydus_vfs.fuse.FuseServer`; ``fd`` the session fd from
    :func:`mount_fuse`.  :meth:`run` returns when the session ends.
    """

    def __init__(self, fd: int, server, *, bufsize: int) -> None:
        self.fd = fd
        self.server = server
        self._buf = bytearray(bufsize + _HEADROOM)
        self._view = memoryview(self._buf)
        self._done: asyncio.Future | None = None
        self._tasks: set[asyncio.Task] = set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        os.set_blocking(self.fd, False)
        loop.add_reader(self.fd, self._on_readable)
        try:
            await self._done
        finally:
            loop.remove_reader(self.fd)
            for t in list(self._tasks):
                t.cancel()

    def stop(self) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    def _on_readable(self) -> None:
        # Drain what is queued, but yield to the loop now and then so replies of
        # suspended READs and signals are not starved by a flood of requests.
        for _ in range(64):
            try:
                n = os.readv(self.fd, [self._buf])
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno == errno.ENOENT:  # request aborted by an interrupt before we read it
                    continue
                if exc.errno == errno.ENODEV:  # unmounted from outside
                    log.info("FUSE session ended (filesystem unmounted)")
                else:
                    log.error("reading /dev/fuse failed: %s", exc)
                self.stop()
                return
            if n == 0:
                self.stop()
                return
            request = bytes(self._view[:n])
            try:
                reply = self.server.handle(request)
            except Exception:  # the server promises not to raise; never let a bug end the session
                log.exception("FUSE server raised on a request")
                continue
            if reply is None:
                continue
            if isinstance(reply, (bytes, bytearray, memoryview, list)):
                self._write(reply)
            else:
                task = asyncio.ensure_future(reply)
                self._tasks.add(task)
                task.add_done_callback(self._on_async_reply)

    def _on_async_reply(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("asynchronous FUSE reply failed: %r", exc)
            return
        reply = task.result()
        if reply is not None:
            self._write(reply)

    def _write(self, reply) -> None:
        if isinstance(reply, list):
            parts = []
            for item in reply:
                if isinstance(item, FileSegment):
                    data = os.pread(item.fd, item.length, item.offset)
                    if len(data) != item.length:
                        # Never pad: the reader would get silently wrong data.
                        log.error("short read from cache fd %d at %d: %d of %d bytes",
                                  item.fd, item.offset, len(data), item.length)
                        unique = struct.unpack_from("<Q", reply[0], 8)[0]
                        parts = [struct.pack("<IiQ", 16, -errno.EIO, unique)]
                        break
                    parts.append(data)
                else:
                    parts.append(item)
            try:
                os.writev(self.fd, parts)
            except OSError as exc:
                self._write_failed(exc)
            return
        try:
            os.write(self.fd, reply)
        except OSError as exc:
            self._write_failed(exc)

    def _write_failed(self, exc: OSError) -> None:
        # ENOENT: the request was interrupted and the kernel no longer waits for it.
        if exc.errno != errno.ENOENT:
            log.error("writing a FUSE reply failed: %s", exc)
