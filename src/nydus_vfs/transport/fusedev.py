"""The ``/dev/fuse`` transport: mount, move request bytes to the FUSE server, unmount.

Order of events: :func:`mount_fuse` opens ``/dev/fuse`` and mounts it (source
``rafs``, type ``fuse``, read-only, ``default_permissions,allow_other`` like
nydusd); :class:`FuseDevTransport` then reads one request per ``read(2)`` on the
event loop, hands the bytes to ``FuseServer.handle`` and writes the reply; it ends
when the kernel reports ENODEV (someone unmounted us) or :meth:`stop` is called,
after which :meth:`FuseMount.unmount` detaches the mount.

The FUSE server never sees the fd: this module is the only place that does
``/dev/fuse`` I/O, so the same server serves virtio-fs unchanged.

Strategy for READ replies (``[header, FileSegment | bytes, ...]``), as libfuse
does it: the header and any bytes go into a private pipe with ``write``, each
file segment is ``splice``d from its file into the pipe (page references, no
copy), and then the whole reply moves from the pipe to ``/dev/fuse`` in ONE
``splice``: ``fuse_dev_splice_write`` takes exactly the bytes it is told and
parses them as one reply, so the pipe must hold all of it.  That leaves one copy
(pipe page into the request's page) instead of two (``pread`` into a Python
bytes, ``writev`` out of it).  Whenever that path cannot be used for a reply
(it would not fit in the pipe, a file refuses splice, the kernel refuses the
final splice) the reply goes out by ``pread`` + ``writev`` instead, and a pipe
left holding part of a reply is replaced so it never leaks into the next one.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import stat as _stat
import struct
import termios

from ..errors import TransportError
from ..fuse import abi
from ..fuse.codec import OutHeader, error_reply
from ..fuse.ops import FileSegment
from ..utils.mountinfo import (MountInfo, is_mountpoint, mounts_at, parse_mountinfo, resolve_mountpoint,
                               top_mount)

__all__ = [
    "FuseDevTransport",
    "FuseMount",
    "MountInfo",
    "mount_fuse",
    "mounts_at",
    "notify_inval_entry",
    "parse_mountinfo",
    "resolve_mountpoint",
    "top_mount",
    "is_mountpoint",
]

log = logging.getLogger("nydus_vfs.transport")

_MS_RDONLY = 1
_MS_NOSUID = 2
_MS_NODEV = 4
_MNT_DETACH = 2
_FUSE_NOTIFY_INVAL_ENTRY = 3

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

# The kernel refuses reads smaller than max_write plus room for the headers.
_HEADROOM = 64 * 1024

_PAGE = os.sysconf("SC_PAGE_SIZE")
_HAVE_SPLICE = hasattr(os, "splice")
_SPLICE_F_MOVE = getattr(os, "SPLICE_F_MOVE", 1)
# Python names these only from 3.10 on; the values are the Linux ABI.
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
_PIPE_MAX_SIZE = "/proc/sys/fs/pipe-max-size"
_FIONREAD_BUF = struct.Struct("i")


class FuseMount:
    """A ``/dev/fuse`` mount made by this process: its session fd and mount identity.

    Created by :func:`mount_fuse`.  The mountpoint is resolved once, at mount
    time, and the mount is identified by its mount id from
    ``/proc/self/mountinfo``: :meth:`unmount` detaches only *this* mount, and
    only while it is the one visible at the path, so a daemon never tears down a
    mount another daemon made after someone lazily unmounted ours, nor one
    stacked on top of it.
    """

    def __init__(self, fd: int, path: str, mount_id: int | None) -> None:
        self.fd = fd
        self.path = path
        self.mount_id = mount_id

    def is_mounted(self) -> bool:
        """True while our mount is still attached at :attr:`path` (visible or not)."""
        if self.mount_id is None:
            return False
        return any(m.mount_id == self.mount_id for m in mounts_at(self.path))

    def unmount(self) -> bool:
        """Lazily detach our mount if it is the visible one at the path; True if detached.

        Never raises: a mount that is gone, covered by another mount, or that
        the kernel refuses to detach is logged and left alone.  Safe to call from
        a worker thread while the event loop keeps serving the session (the
        kernel may need the daemon to answer while it detaches).
        """
        if self.mount_id is None:
            return False
        try:
            here = mounts_at(self.path)
        except TransportError as exc:
            log.warning("not unmounting %s: %s", self.path, exc)
            return False
        ours = [m for m in here if m.mount_id == self.mount_id]
        if not ours:
            log.info("%s: our FUSE mount is already gone (unmounted from outside)", self.path)
            self.mount_id = None
            return False
        top = top_mount(here)
        if top is not None and top.mount_id != self.mount_id:
            log.warning("not unmounting %s: another filesystem (%s, source %s) is mounted on top "
                        "of ours", self.path, top.fstype, top.source)
            return False
        if _libc.umount2(self.path.encode(), _MNT_DETACH) != 0:
            err = ctypes.get_errno()
            log.warning("unmount of %s failed: %s", self.path, os.strerror(err))
            return False
        log.info("unmounted %s", self.path)
        self.mount_id = None
        return True

    def close(self) -> None:
        """Close the session fd (idempotent); an attached mount then answers ENOTCONN."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


def mount_fuse(mountpoint: str, *, readonly: bool = True, fsname: str = "rafs") -> FuseMount:
    """Open ``/dev/fuse`` and mount it on ``mountpoint``.

    Refuses (TransportError, nothing mounted) when something is already mounted
    there: stacking a second FUSE mount on a live or dead one hides it and
    confuses whoever unmounts next.  Also TransportError with the reason for not
    root, no /dev/fuse, or a mountpoint that is not a directory.
    """
    mnt = resolve_mountpoint(mountpoint)
    existing = mounts_at(mnt)
    if existing:
        top = top_mount(existing)
        raise TransportError(f"mountpoint {mnt} is already mounted ({top.fstype}, source "
                             f"{top.source}); refusing to mount another filesystem on top of it")
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
    mine = [m for m in mounts_at(mnt) if m.fstype == "fuse" and m.source == fsname]
    mount_id = mine[-1].mount_id if mine else None
    if mount_id is None:  # pragma: no cover - the kernel just mounted it
        log.warning("mounted FUSE on %s but cannot find it in /proc/self/mountinfo", mnt)
    log.info("mounted FUSE on %s (mount id %s)", mnt, mount_id)
    return FuseMount(fd, mnt, mount_id)


def notify_inval_entry(fd: int, parent: int, name: bytes) -> bool:
    """Tell the kernel to drop its dentry ``name`` under nodeid ``parent``.

    Blocking: the kernel takes the parent directory's lock, which a LOOKUP in
    flight holds until the daemon answers it, so call this from a worker thread
    while the event loop keeps serving, never from the loop.  Returns False when
    the kernel did not know the entry (ENOENT) or the session is gone.
    """
    payload = struct.pack("<QII", parent, len(name), 0) + name + b"\0"
    # A notification is a reply with unique 0 whose error field carries the code.
    header = abi.fuse_out_header.pack(abi.fuse_out_header.size + len(payload), _FUSE_NOTIFY_INVAL_ENTRY, 0)
    try:
        os.write(fd, header + payload)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENODEV, errno.EBADF, errno.ENOTCONN):
            log.warning("FUSE notify inval_entry(%d, %r) failed: %s", parent, name, exc)
        return False
    return True


def _eio_reply(reply: list) -> bytes:
    """EIO for the request ``reply`` (``[fuse_out_header, ...]``) answers."""
    return error_reply(OutHeader.from_bytes(reply[0]).unique, errno.EIO)


class _ReplyPipe:
    """The private pipe a spliced reply is assembled in.

    Both ends are non-blocking, so a reply that turns out bigger than the pipe
    makes ``splice``/``write`` fail with EAGAIN instead of stalling the loop.
    ``slots`` is the capacity in pipe buffers: each buffer holds at most one
    page, so that, not bytes, is what a reply has to fit in.
    """

    __slots__ = ("r", "w", "slots")

    def __init__(self, want: int) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            size = fcntl.fcntl(self.w, _F_GETPIPE_SZ)
            if want > size:
                try:
                    size = fcntl.fcntl(self.w, _F_SETPIPE_SZ, want)
                except OSError as exc:
                    # pipe-user-pages limits: work with the default size.
                    log.debug("cannot grow the reply pipe to %d bytes: %s", want, exc)
        except BaseException:
            self.close()
            raise
        self.slots = size // _PAGE

    def unread(self) -> int:
        """Bytes still queued in the pipe (0 after a complete reply)."""
        buf = fcntl.ioctl(self.r, termios.FIONREAD, b"\0" * _FIONREAD_BUF.size)
        return _FIONREAD_BUF.unpack(buf)[0]

    def close(self) -> None:
        for fd in (self.r, self.w):
            if fd >= 0:
                os.close(fd)
        self.r = self.w = -1


def _pipe_max_size() -> int:
    try:
        with open(_PIPE_MAX_SIZE, "rb") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 1 << 20  # the kernel's default


class FuseDevTransport:
    """Serves one ``/dev/fuse`` session on the running event loop.

    ``server`` is a :class:`nydus_vfs.fuse.FuseServer`; ``fd`` the session fd from
    :func:`mount_fuse`; ``bufsize`` the ``max_write`` granted to the kernel.
    With ``splice`` (the default, where ``os.splice`` exists) replies carrying
    file segments are spliced (see the module docstring); without it they are
    read with ``pread`` and written with ``writev``.  Every reply goes out as one
    write either way.  :meth:`run` returns when the session ends.
    """

    def __init__(self, fd: int, server, *, bufsize: int, splice: bool = True) -> None:
        self.fd = fd
        self.server = server
        self._buf = bytearray(bufsize + _HEADROOM)
        self._view = memoryview(self._buf)
        self._done: asyncio.Future | None = None
        self._tasks: set[asyncio.Task] = set()
        self._splice = splice and _HAVE_SPLICE
        # Room for the largest reply: max_write of data plus the header.
        self._pipe_want = min(bufsize + _PAGE, _pipe_max_size())
        self._pipe: _ReplyPipe | None = None

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
            self._drop_pipe()

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
            try:
                # No copy: the server keeps nothing of the request once handle() returns.
                reply = self.server.handle(self._view[:n])
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
            if self._splice and self._write_spliced(reply):
                return
            self._write_copied(reply)
            return
        try:
            os.write(self.fd, reply)
        except OSError as exc:
            self._write_failed(exc)

    def _write_copied(self, reply: list) -> bool:
        """Send ``reply`` with ``pread`` + ``writev``; True when the kernel took it."""
        parts = []
        for item in reply:
            if type(item) is FileSegment:
                try:
                    data = os.pread(item.fd, item.length, item.offset)
                except OSError as exc:
                    log.error("reading cache fd %d at %d failed: %s", item.fd, item.offset, exc)
                    parts = [_eio_reply(reply)]
                    break
                if len(data) != item.length:
                    # Never pad: the reader would get silently wrong data.
                    log.error("short read from cache fd %d at %d: %d of %d bytes",
                              item.fd, item.offset, len(data), item.length)
                    parts = [_eio_reply(reply)]
                    break
                parts.append(data)
            else:
                parts.append(item)
        try:
            os.writev(self.fd, parts)
        except OSError as exc:
            self._write_failed(exc)
            return False
        return True

    def _write_spliced(self, reply: list) -> bool:
        """Send ``reply`` through the pipe; False when it must go by :meth:`_write_copied`.

        True means the reply is dealt with: sent, answered with EIO (a file was
        shorter than its segment), or dropped because the kernel no longer
        waits for it.  False is returned before anything reached the session fd.
        """
        slots = 0
        total = 0
        has_segment = False
        for item in reply:
            if type(item) is FileSegment:
                has_segment = True
                if item.length:
                    slots += (item.offset % _PAGE + item.length + _PAGE - 1) // _PAGE
                total += item.length
            else:
                n = len(item)
                # A write may start a fresh buffer rather than fill the last one.
                slots += n // _PAGE + 1
                total += n
        if not has_segment:
            return False
        pipe = self._pipe
        if pipe is None:
            try:
                pipe = self._pipe = _ReplyPipe(self._pipe_want)
            except OSError as exc:
                log.warning("no pipe for spliced replies (%s): copying replies instead", exc)
                self._splice = False
                return False
        if slots > pipe.slots:
            return False
        w = pipe.w
        try:
            for item in reply:
                if type(item) is FileSegment:
                    fd, offset, left = item
                    while left:
                        n = os.splice(fd, w, left, offset_src=offset)
                        if n == 0:
                            # Never pad: the reader would get silently wrong data.
                            log.error("short read from cache fd %d at %d: %d of %d bytes",
                                      fd, item.offset, item.length - left, item.length)
                            self._drop_pipe()
                            self._send_error(reply)
                            return True
                        offset += n
                        left -= n
                else:
                    view = memoryview(item)
                    while view:
                        view = view[os.write(w, view):]
        except OSError as exc:
            # The file cannot be spliced (or the pipe filled up after all):
            # forget the half-built reply and copy this one.
            log.debug("splicing a reply from a file failed (%s): copying it", exc)
            self._drop_pipe()
            return False
        try:
            sent = os.splice(pipe.r, self.fd, total, flags=_SPLICE_F_MOVE)
        except OSError as exc:
            if pipe.unread():
                self._drop_pipe()
            if exc.errno == errno.ENOENT:
                return True  # interrupted: the kernel no longer waits for this reply
            if not self._write_copied(reply):
                return True
            # The session fd takes writes but not this splice: stop trying.
            log.info("splicing replies to the FUSE fd failed (%s): copying replies from now on", exc)
            self._splice = False
            self._drop_pipe()
            return True
        if sent != total:
            # Only a stream peer splits a reply; /dev/fuse takes all or nothing.
            log.error("spliced FUSE reply cut short: %d of %d bytes", sent, total)
            self._drop_pipe()
        return True

    def _send_error(self, reply: list) -> None:
        try:
            os.write(self.fd, _eio_reply(reply))
        except OSError as exc:
            self._write_failed(exc)

    def _drop_pipe(self) -> None:
        if self._pipe is not None:
            self._pipe.close()
            self._pipe = None

    def _write_failed(self, exc: OSError) -> None:
        # ENOENT: the request was interrupted and the kernel no longer waits for it.
        if exc.errno != errno.ENOENT:
            log.error("writing a FUSE reply failed: %s", exc)
