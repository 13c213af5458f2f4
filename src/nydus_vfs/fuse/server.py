"""The FUSE dispatcher: one request's bytes in, one reply out, for both transports.

Strategy
--------
``/dev/fuse`` and virtio-fs deliver the same bytes (``fuse_in_header`` + args)
and expect the same reply bytes, so :meth:`FuseServer.handle` is the single
entry point for both.  It is also the hot path of the whole daemon, which
shapes the code:

* The opcode indexes a list of bound methods; the list is swapped when the
  session state changes, so "is the session initialised?" costs nothing per
  request (before INIT the list maps everything to EIO).
* Headers and args are read with precompiled ``struct.Struct.unpack_from`` on
  the caller's buffer (bytes, bytearray or memoryview) without copying it.
  WRITE data reaches ``Operations.write`` as a view of that buffer, or as the
  transport's :class:`~nydus_vfs.utils.io.WritePayload` when the transport
  left it where it arrived (virtio-fs: guest memory), never copied here.
* Replies are built with one ``pack`` of header + fixed fields, concatenated
  with the attr bytes cached on the :class:`~.ops.Attr` (``Attr._packed``).
* ``Context`` objects are reused while uid/gid/pid stay the same.
* READ drives ``Operations.read`` by hand (``coro.send(None)``): a warm-cache
  read that never suspends is answered synchronously with no event-loop round
  trip.  Only a read that really waits returns a coroutine for the transport
  to schedule; it then runs the filesystem's coroutine with the same
  semantics an ``asyncio.Task`` would give it (futures awaited, bare yields
  passed to the loop, cancellation thrown in), and INTERRUPT can cancel it.
* Nothing is logged per request; protocol violations are logged at a
  limited rate so a hostile peer cannot flood the log.

Goals
-----
Only an errno crosses the boundary: ``FsError`` becomes ``-errno``; any
other exception from the filesystem is a bug that is logged with its
traceback and answered with EIO, and the session keeps going.  Malformed
requests get an errno reply (EINVAL, ENAMETOOLONG, ...) and never an
exception, a hang or an allocation sized by the peer.

Reply contract of :meth:`FuseServer.handle`
-------------------------------------------
* ``None``: send nothing.  Used for FORGET, BATCH_FORGET, INTERRUPT and
  NOTIFY_REPLY, for requests shorter than ``fuse_in_header`` (nothing in
  them can be trusted, not even ``unique``), and when ``out_capacity`` is
  below 16 so not even an error header fits.  A virtio transport completes
  the chain with used length 0; ``/dev/fuse`` writes nothing.
* ``bytes``: a complete reply (header + payload), ``len`` field = ``len()``.
* ``list``: ``[header, part, ...]`` where the 16-byte header's ``len`` is
  already the total and each part is a bytes-like object or a
  :class:`~.ops.FileSegment` the transport reads itself (READ only).
* a coroutine (READ that suspended): ``await`` it or wrap it in a task; it
  resolves to ``bytes`` or a ``list`` as above and never raises except
  ``CancelledError`` when the transport cancels it.

Every reply fits ``out_capacity``: READ, READDIR(PLUS), GETXATTR and
LISTXATTR sizes are capped to it, and a fixed-size reply that does not fit is
replaced by a header-only EINVAL.

Naming decisions (vhost-user-fs.md §6.3): an empty name, a name with '/', ".", ".."
or a name whose NUL is missing or not last gets EINVAL; more than 255 bytes
gets ENAMETOOLONG.

Not thread-safe: call from one thread (the event loop's).
"""

from __future__ import annotations

import enum
import errno
import logging
import time
import struct
import sys
from typing import Any

from ..errors import ConfigError, FsError, LocalProtocolError
from . import abi
from .codec import InitIn, InitOut, error_reply, pack_attr, pack_statfs, split_timeout
from .ops import ROOT_ID, ConnInfo, Context, FileLock, FileSegment, Operations, SetAttr

__all__ = ["FuseServer", "SessionState", "SessionInput", "SESSION_TRANSITIONS"]

log = logging.getLogger("nydus_vfs.fuse")

_Op = abi.Opcode
_IN = abi.fuse_in_header.unpack_from
_OUT = abi.fuse_out_header.pack
_U32 = struct.Struct("<I").unpack_from
_U64 = struct.Struct("<Q").unpack_from
_GETATTR_IN = abi.fuse_getattr_in.unpack_from
_GETATTR_FH = abi.FUSE_GETATTR_FH
_READ_IN = abi.fuse_read_in.unpack_from
_OPEN_IN = abi.fuse_open_in.unpack_from
_RELEASE_IN = abi.fuse_release_in.unpack_from
_FSYNC_IN = abi.fuse_fsync_in.unpack_from
_LSEEK_IN = abi.fuse_lseek_in.unpack_from
_II = struct.Struct("<II").unpack_from
_SETATTR_IN = abi.fuse_setattr_in.unpack_from
_MKNOD_IN = abi.fuse_mknod_in.unpack_from
_RENAME2_IN = abi.fuse_rename2_in.unpack_from
_WRITE_IN = abi.fuse_write_in.unpack_from
_CREATE_IN = abi.fuse_create_in.unpack_from
_FALLOCATE_IN = abi.fuse_fallocate_in.unpack_from
_COPY_RANGE_IN = abi.fuse_copy_file_range_in.unpack_from
_LK_IN = abi.fuse_lk_in.unpack_from
_FORGET_ONE = abi.fuse_forget_one

# Header and fixed reply fields packed in one call.
_ATTR_REPLY = struct.Struct("<IiQQII")          # out_header + fuse_attr_out head
_ENTRY_REPLY = struct.Struct("<IiQQQQQII")      # out_header + fuse_entry_out head
_ENTRY_HEAD = abi.fuse_entry_out.pack           # fuse_entry_out head alone (direntplus)
_OPEN_REPLY = struct.Struct("<IiQQII").pack     # out_header + fuse_open_out
_XATTR_SIZE_REPLY = struct.Struct("<IiQII").pack  # out_header + fuse_getxattr_out
_LSEEK_REPLY = struct.Struct("<IiQQ").pack      # out_header + fuse_lseek_out
_WRITE_REPLY = struct.Struct("<IiQII").pack     # out_header + fuse_write_out
_LK_REPLY = struct.Struct("<IiQQQII").pack      # out_header + fuse_lk_out
_CREATE_OPEN = abi.fuse_open_out.pack           # fuse_open_out after the entry in a CREATE reply
_DIRENT = abi.fuse_dirent.pack

_HDR = 40                                        # sizeof(fuse_in_header)
_READ = int(abi.Opcode.READ)
_WRITE = int(abi.Opcode.WRITE)
_WRITE_DATA = _HDR + abi.fuse_write_in.size     # where a WRITE's data begins (80)
_ATTR_REPLY_LEN = 16 + abi.FUSE_ATTR_OUT_SIZE    # 120
_ENTRY_REPLY_LEN = 16 + abi.FUSE_ENTRY_OUT_SIZE  # 144
_ZERO_ATTR = bytes(abi.fuse_attr.size)
_ZERO_ENTRY = bytes(abi.FUSE_ENTRY_OUT_SIZE)
_PAD = tuple(bytes(i) for i in range(8))
_DIRENT_HEAD = abi.FUSE_NAME_OFFSET              # 24
_DIRENTPLUS_HEAD = abi.FUSE_NAME_OFFSET_DIRENTPLUS  # 152
_CREATE_REPLY_LEN = _ENTRY_REPLY_LEN + abi.fuse_open_out.size  # 160
#: Longest symlink target accepted (PATH_MAX, counting the NUL).
_PATH_MAX = 4096
#: Longest xattr value accepted (XATTR_SIZE_MAX).
_XATTR_SIZE_MAX = 65536

#: The kernel's page count per request when MAX_PAGES is not negotiated.
_DEFAULT_MAX_PAGES = 32
_MAX_BACKGROUND = 256
_CONGESTION_THRESHOLD = 192

_BYTES_TYPES = (bytes, bytearray, memoryview)

# Flags we may grant; each only if the kernel offered it.  Deliberately absent
# (vhost-user-fs.md §3.3): WRITEBACK_CACHE, HANDLE_KILLPRIV(_V2), POSIX_ACL,
# EXPORT_SUPPORT (would bring "."/".." lookups), lock flags, SUBMOUNTS, DAX.
_F = abi.InitFlags
_WANTED_FLAGS = (_F.ASYNC_READ | _F.PARALLEL_DIROPS | _F.MAX_PAGES | _F.CACHE_SYMLINKS
                 | _F.BIG_WRITES)
_READDIRPLUS_FLAGS = _F.DO_READDIRPLUS | _F.READDIRPLUS_AUTO


class SessionState(enum.Enum):
    """Where the FUSE session is."""

    #: No INIT yet (or the last INIT was refused or asked for a newer major).
    NEED_INIT = "need-init"
    #: INIT accepted: every opcode is served.
    RUNNING = "running"
    #: DESTROY (or transport close) ended the session; only INIT is accepted.
    DESTROYED = "destroyed"


class SessionInput(enum.Enum):
    """What can happen to the session."""

    INIT_ACCEPTED = "init-accepted"
    #: The kernel speaks a newer major: we answered {7, 38} and wait for another INIT.
    INIT_NEWER_MAJOR = "init-newer-major"
    INIT_REFUSED = "init-refused"
    DESTROY = "destroy"


_S, _I = SessionState, SessionInput

#: The whole INIT/DESTROY state machine.  A new INIT while RUNNING is a DESTROY
#: followed by that INIT (``ops.destroy()``, lookup counts dropped): a rebooted
#: guest sends INIT without DESTROY, so the RUNNING rows equal the DESTROYED
#: rows.  DESTROY outside RUNNING is answered EIO like any request without a
#: session and leaves the state as it is.
SESSION_TRANSITIONS: dict[tuple[SessionState, SessionInput], SessionState] = {
    (_S.NEED_INIT, _I.INIT_ACCEPTED): _S.RUNNING,
    (_S.NEED_INIT, _I.INIT_NEWER_MAJOR): _S.NEED_INIT,
    (_S.NEED_INIT, _I.INIT_REFUSED): _S.NEED_INIT,
    (_S.NEED_INIT, _I.DESTROY): _S.NEED_INIT,
    (_S.RUNNING, _I.INIT_ACCEPTED): _S.RUNNING,
    (_S.RUNNING, _I.INIT_NEWER_MAJOR): _S.NEED_INIT,
    (_S.RUNNING, _I.INIT_REFUSED): _S.NEED_INIT,
    (_S.RUNNING, _I.DESTROY): _S.DESTROYED,
    (_S.DESTROYED, _I.INIT_ACCEPTED): _S.RUNNING,
    (_S.DESTROYED, _I.INIT_NEWER_MAJOR): _S.NEED_INIT,
    (_S.DESTROYED, _I.INIT_REFUSED): _S.NEED_INIT,
    (_S.DESTROYED, _I.DESTROY): _S.DESTROYED,
}


def _cancelled_error() -> BaseException | None:
    """A fresh ``asyncio.CancelledError``, without importing asyncio here.

    A read can only be suspended on a loop that has asyncio loaded (uvloop
    loads it too), so looking it up in ``sys.modules`` keeps this layer free of
    event-loop imports.  ``None`` if no asyncio is around.
    """
    mod = sys.modules.get("asyncio")
    return mod.CancelledError() if mod is not None else None


def _is_cancelled_error(exc: BaseException) -> bool:
    mod = sys.modules.get("asyncio")
    return mod is not None and isinstance(exc, mod.CancelledError)


class FuseServer:
    """Serves one FUSE session over ``ops`` (see the module docstring for replies).

    ``readonly``     answer every write opcode, and OPEN with write access,
                     O_TRUNC, O_CREAT, O_EXCL or O_TMPFILE, with EROFS.  With
                     ``False`` write opcodes are decoded and handed to the
                     write methods of ``ops`` (ENOSYS unless overridden), OPEN
                     flags go to the filesystem unfiltered and ATOMIC_O_TRUNC
                     is offered (O_TRUNC arrives in OPEN, as virtiofsd asks).
    ``posix_locks``  offer POSIX_LOCKS and FLOCK_LOCKS, so GETLK/SETLK/SETLKW
                     reach ``ops`` (default off, like virtiofsd: the guest
                     kernel then keeps locks to itself).
    ``max_write``    granted to the kernel (at least 4096).
    ``max_pages``    pages per request granted with MAX_PAGES (1..256); also caps
                     READ/READDIR sizes at ``max_pages * 4096``.
    ``max_readahead`` granted read-ahead; ``None`` echoes the kernel's value.
    ``min_minor``    oldest protocol 7.x accepted (9..38); older gets EPROTO.
    ``max_nodeids``  live (looked-up, not forgotten) nodeids allowed; a LOOKUP
                     that would exceed it fails with ENFILE and READDIRPLUS sends
                     such entries without a nodeid.
    ``readdirplus``  offer DO_READDIRPLUS (default: if ``ops`` overrides
                     :meth:`~.ops.Operations.readdirplus`).

    Lookup counting (ops.py contract): each successful LOOKUP with a nodeid
    other than 0 and the root, and each READDIRPLUS entry actually sent with
    one, adds a reference; FORGET/BATCH_FORGET subtract (clamped, unknown
    nodeids ignored), then ``ops.forget`` gets the kernel's counts for the
    known nodeids and ``ops.release_inode`` each nodeid that reached zero.  A
    LOOKUP (or MKDIR, CREATE, ...) refused with ENFILE, and a READDIRPLUS entry
    that is not sent, call ``ops.release_inode`` for the nodeid the
    filesystem returned, since the kernel never learns of it.

    Filesystem methods are bound when the server is built.
    """

    def __init__(
        self,
        ops: Operations,
        *,
        readonly: bool = True,
        max_write: int = 1 << 20,
        max_pages: int = 256,
        max_readahead: int | None = None,
        min_minor: int = 31,
        max_nodeids: int = 1 << 20,
        readdirplus: bool | None = None,
        posix_locks: bool = False,
    ) -> None:
        if not 9 <= min_minor <= abi.FUSE_KERNEL_MINOR_VERSION:
            raise ConfigError(f"min_minor={min_minor}: must be 9..{abi.FUSE_KERNEL_MINOR_VERSION}")
        if not 1 <= max_pages <= 256:
            raise ConfigError(f"max_pages={max_pages}: the kernel accepts 1..256")
        if not 4096 <= max_write <= 0xFFFF_FFFF:
            raise ConfigError(f"max_write={max_write}: must be 4096..2**32-1")
        if max_readahead is not None and not 0 <= max_readahead <= 0xFFFF_FFFF:
            raise ConfigError(f"max_readahead={max_readahead}: must fit 32 bits")
        if max_nodeids < 1:
            raise ConfigError(f"max_nodeids={max_nodeids}: must be positive")
        self._ops = ops
        self.readonly = readonly
        self.max_write = max_write
        self.max_pages = max_pages
        self.max_readahead = max_readahead
        self.min_minor = min_minor
        self.max_nodeids = max_nodeids
        if readdirplus is None:
            readdirplus = type(ops).readdirplus is not Operations.readdirplus
        self._wanted = _WANTED_FLAGS | (_READDIRPLUS_FLAGS if readdirplus else 0)
        if not readonly:
            self._wanted |= _F.ATOMIC_O_TRUNC
        if posix_locks:
            self._wanted |= _F.POSIX_LOCKS | _F.FLOCK_LOCKS

        #: What the last accepted INIT negotiated (None without a session).
        self.conn: ConnInfo | None = None
        self.state = SessionState.NEED_INIT
        self._minor = abi.FUSE_KERNEL_MINOR_VERSION
        self._max_read = _DEFAULT_MAX_PAGES * abi.PAGE_SIZE
        self._nlookup: dict[int, int] = {}
        self._inflight: dict[int, _PendingRead] = {}
        self._ctx = Context(0, 0, 0)
        self._tcache: dict[float, tuple[int, int]] = {}
        self._attr_timeout = float("nan")  # forces the first GETATTR to fill the fields below
        self._attr_s = 0
        self._attr_ns = 0
        self._warnings = 0

        # Bound once: a method lookup per request is measurable on the hot path.
        self._lookup = ops.lookup
        self._getattr = ops.getattr
        self._read = ops.read
        self._readdir = ops.readdir
        self._readdirplus = ops.readdirplus
        # Per-request counters of the filesystem (Operations.counters), or None.
        counters = ops.counters()
        self._fopmap, self._hits, self._errs = counters if counters is not None else ((), None, None)

        self._running_table = self._build_running_table()
        self._idle_table = self._build_idle_table()
        self._table = self._idle_table
        self._beyond_table = self._op_no_session  # opcodes past the end of the table

    # -- public --------------------------------------------------------------------

    def handle(self, request, out_capacity: int | None = None, payload: Any = None) -> Any:
        """Process one request; see the module docstring for what comes back.

        ``request`` is the whole request as a contiguous bytes-like object (the
        server does not keep it after returning, except a suspended READ keeps
        nothing but decoded integers).  ``out_capacity`` is how many bytes the
        transport can write back (virtio: the writable part of the chain);
        ``None`` means unlimited.  Never raises for any content of ``request``.

        ``payload`` (a :class:`~nydus_vfs.utils.io.WritePayload`) is the rest
        of a request the transport did not copy: the request is then
        ``request`` followed by ``payload``, and every length check
        (``fuse_in_header.len``, a WRITE's size) counts both.  A WRITE whose
        ``request`` ends where its data begins hands ``payload`` (or the first
        ``size`` bytes of it) to ``Operations.write`` as it is; any other
        request is read in whole first (``payload.tobytes()``).  The payload
        must stay valid until the reply has been sent.
        """
        n = len(request) if payload is None else len(request) + len(payload)
        if n < _HDR:
            self._warn("request of %d bytes is shorter than fuse_in_header (40); dropped", n)
            return None
        length, opcode, unique, nodeid, uid, gid, pid, extlen, _ = _IN(request, 0)
        if length != n or extlen:
            return self._bad_header(length, n, opcode, unique, extlen, out_capacity)
        if out_capacity is not None and out_capacity < 16 and opcode not in abi.NO_REPLY_OPCODES:
            self._warn("opcode %d unique %#x: writable part of %d bytes cannot hold a reply header; "
                       "completing without a reply", opcode, unique, out_capacity)
            return None
        ctx = self._ctx
        if ctx.uid != uid or ctx.gid != gid or ctx.pid != pid:
            ctx = self._ctx = Context(uid, gid, pid)
        try:
            handler = self._table[opcode]
        except IndexError:
            handler = self._beyond_table
        try:
            if payload is None:
                reply = handler(request, n, unique, nodeid, ctx, out_capacity)
            elif opcode == _WRITE and handler == self._op_write_data and len(request) == _WRITE_DATA:
                reply = self._op_write_data(request, n, unique, nodeid, ctx, out_capacity, payload)
            else:
                # Only WRITE data is worth leaving with the transport; anything
                # else is parsed, so it is parsed from a private copy.
                reply = handler(bytes(request) + payload.tobytes(), n, unique, nodeid, ctx, out_capacity)
        except FsError as exc:
            if self._hits is not None:
                self._tally(self._errs, opcode, nodeid)
            return error_reply(unique, exc.errno_value)
        except Exception:
            self._warn("opcode %d unique %#x nodeid %d: filesystem bug, replying EIO",
                       opcode, unique, nodeid, exc_info=True, level=logging.ERROR)
            if self._hits is not None:
                self._tally(self._errs, opcode, nodeid)
            return error_reply(unique, errno.EIO)
        hits = self._hits
        # A READ that suspended is counted when it ends (_PendingRead).
        if hits is not None and (opcode != _READ or type(reply) is list):
            try:
                fop = self._fopmap[opcode]
            except IndexError:  # opcodes past the table (CUSE_INIT, hostile ones) are not counted
                fop = -1
            if fop >= 0:
                hits[nodeid >> 56][fop] += 1
        if out_capacity is not None and type(reply) is bytes and len(reply) > out_capacity:
            self._warn("opcode %d unique %#x: %d-byte reply exceeds the %d writable bytes; replying EINVAL",
                       opcode, unique, len(reply), out_capacity)
            return error_reply(unique, errno.EINVAL)
        return reply

    def _tally(self, table: list[list[int]], opcode: int, nodeid: int) -> None:
        if opcode < len(self._fopmap):
            fop = self._fopmap[opcode]
            if fop >= 0:
                table[nodeid >> 56][fop] += 1

    def inflight(self) -> list[dict]:
        """Requests waiting for the filesystem, as ``/api/v1/metrics/inflight`` lists them."""
        return [{"inode": p.nodeid, "opcode": p.opcode, "unique": unique, "timestamp_secs": p.started}
                for unique, p in list(self._inflight.items())]

    def lookup_count(self, nodeid: int) -> int:
        """The server's current lookup count for ``nodeid`` (0 if unknown; the root is never counted)."""
        return self._nlookup.get(nodeid, 0)

    @property
    def live_nodeids(self) -> int:
        """How many nodeids currently hold lookup references."""
        return len(self._nlookup)

    @property
    def pending_reads(self) -> int:
        """READs that suspended and have not finished yet."""
        return len(self._inflight)

    def close(self) -> None:
        """The transport is gone: end the session as DESTROY would, without a reply."""
        if self.state is SessionState.RUNNING:
            self._end_session()
            self._transition(SessionInput.DESTROY)

    # -- session -------------------------------------------------------------------

    def _transition(self, event: SessionInput) -> None:
        self.state = SESSION_TRANSITIONS[(self.state, event)]
        if self.state is SessionState.RUNNING:
            self._table, self._beyond_table = self._running_table, self._op_unknown
        else:
            self._table, self._beyond_table = self._idle_table, self._op_no_session

    def _end_session(self) -> None:
        self._nlookup.clear()
        self._inflight.clear()
        self.conn = None
        try:
            self._ops.destroy()
        except Exception:
            log.exception("Operations.destroy() raised; it must not")

    def _build_running_table(self) -> list:
        table: list = [self._op_unknown] * (max(_Op) + 1)
        for op in abi.WRITE_OPCODES:
            table[op] = self._op_write
        for op in abi.NOSYS_OPCODES:
            table[op] = self._op_unknown
        table[_Op.NOTIFY_REPLY] = self._op_noreply
        table[_Op.IOCTL] = self._op_ioctl
        # Each write handler checks ``readonly`` first, so the flag can be read
        # per request without rebuilding this table.
        for op, name in {
            _Op.SETATTR: "setattr", _Op.MKNOD: "mknod", _Op.MKDIR: "mkdir", _Op.SYMLINK: "symlink",
            _Op.LINK: "link", _Op.UNLINK: "unlink", _Op.RMDIR: "rmdir", _Op.RENAME: "rename",
            _Op.RENAME2: "rename2", _Op.CREATE: "create", _Op.WRITE: "write_data",
            _Op.SETXATTR: "setxattr", _Op.REMOVEXATTR: "removexattr", _Op.FALLOCATE: "fallocate",
            _Op.COPY_FILE_RANGE: "copy_file_range", _Op.GETLK: "getlk", _Op.SETLK: "setlk",
            _Op.SETLKW: "setlkw",
        }.items():
            table[op] = getattr(self, "_op_" + name)
        for op, name in {
            _Op.INIT: "init", _Op.DESTROY: "destroy", _Op.LOOKUP: "lookup", _Op.FORGET: "forget",
            _Op.BATCH_FORGET: "batch_forget", _Op.GETATTR: "getattr", _Op.READLINK: "readlink",
            _Op.OPEN: "open", _Op.READ: "read", _Op.RELEASE: "release", _Op.STATFS: "statfs",
            _Op.GETXATTR: "getxattr", _Op.LISTXATTR: "listxattr", _Op.FLUSH: "flush",
            _Op.FSYNC: "fsync", _Op.FSYNCDIR: "fsyncdir", _Op.OPENDIR: "opendir",
            _Op.READDIR: "readdir", _Op.READDIRPLUS: "readdirplus", _Op.RELEASEDIR: "releasedir",
            _Op.ACCESS: "access", _Op.LSEEK: "lseek", _Op.INTERRUPT: "interrupt",
            _Op.SYNCFS: "syncfs",
        }.items():
            table[op] = getattr(self, "_op_" + name)
        return table

    def _build_idle_table(self) -> list:
        table: list = [self._op_no_session] * (max(_Op) + 1)
        table[_Op.INIT] = self._op_init
        for op in abi.NO_REPLY_OPCODES:
            table[op] = self._op_noreply
        return table

    # -- helpers ---------------------------------------------------------------------

    def _warn(self, msg: str, *args, exc_info: bool = False, level: int = logging.WARNING) -> None:
        # A hostile peer can trigger these at will: log the first few, then one
        # in 1024, so the log stays readable and cheap.
        self._warnings += 1
        count = self._warnings
        if count <= 16 or count % 1024 == 0:
            if count > 16:
                msg += " [%d warnings so far, most not logged]"
                args = (*args, count)
            log.log(level, msg, *args, exc_info=exc_info)

    def _bad_header(self, length: int, n: int, opcode: int, unique: int, extlen: int,
                    cap: int | None) -> bytes | None:
        if extlen:
            self._warn("opcode %d unique %#x: fuse_in_header.total_extlen = %#x without SECURITY_CTX; EINVAL",
                       opcode, unique, extlen)
        else:
            self._warn("opcode %d unique %#x: fuse_in_header.len = %#x but %d bytes were received; EINVAL",
                       opcode, unique, length, n)
        if cap is not None and cap < 16:
            return None
        return error_reply(unique, errno.EINVAL)

    def _short(self, opcode: int, need: int, n: int) -> FsError:
        self._warn("opcode %d: %d bytes of arguments, the struct needs %d; EINVAL", opcode, n - _HDR, need)
        return FsError(errno.EINVAL, "arguments too short")

    def _timeout(self, seconds: float) -> tuple[int, int]:
        split = self._tcache.get(seconds)
        if split is None:
            split = split_timeout(seconds)
            if len(self._tcache) >= 64:  # a filesystem inventing new timeouts must not grow this
                self._tcache.clear()
            self._tcache[seconds] = split
        return split

    def _name(self, buf, start: int, end: int) -> bytes:
        """A file name argument: exactly name + NUL, validated per vhost-user-fs.md §6.3."""
        raw = buf[start:end]
        if type(raw) is not bytes:
            raw = bytes(raw)
        nul = raw.find(b"\0")
        if nul != len(raw) - 1 or nul < 0:
            raise FsError(errno.EINVAL, "name not NUL-terminated or with an embedded NUL")
        name = raw[:nul]
        if nul > abi.NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        if not name or name == b"." or name == b".." or b"/" in name:
            raise FsError(errno.EINVAL, "empty, '.', '..' or containing '/'")
        return name

    def _xattr_name(self, buf, start: int, end: int) -> bytes:
        raw = buf[start:end]
        if type(raw) is not bytes:
            raw = bytes(raw)
        nul = raw.find(b"\0")
        if nul != len(raw) - 1 or nul < 0:
            raise FsError(errno.EINVAL, "xattr name not NUL-terminated or with an embedded NUL")
        if nul == 0:
            raise FsError(errno.EINVAL, "empty xattr name")
        if nul > abi.XATTR_NAME_MAX:
            raise FsError(errno.ERANGE, "xattr name too long")
        return raw[:nul]

    def _count(self, nodeid: int) -> bool:
        """Add one lookup reference; False if that would exceed ``max_nodeids``."""
        counts = self._nlookup
        c = counts.get(nodeid)
        if c is None:
            if len(counts) >= self.max_nodeids:
                return False
            counts[nodeid] = 1
        else:
            counts[nodeid] = c + 1
        return True

    def _uncount(self, nodeid: int) -> None:
        counts = self._nlookup
        c = counts.get(nodeid)
        if c is not None:
            if c <= 1:
                del counts[nodeid]
            else:
                counts[nodeid] = c - 1

    def _forget(self, items) -> None:
        counts = self._nlookup
        known = []
        released = []
        for nodeid, nlookup in items:
            c = counts.get(nodeid)
            if c is None or nlookup == 0:
                continue
            if nlookup >= c:
                del counts[nodeid]
                released.append(nodeid)
            else:
                counts[nodeid] = c - nlookup
            known.append((nodeid, nlookup))
        if known:
            try:
                self._ops.forget(known)
            except Exception:
                log.exception("Operations.forget() raised; it must not")
        for nodeid in released:
            try:
                self._ops.release_inode(nodeid)
            except Exception:
                log.exception("Operations.release_inode(%d) raised; it must not", nodeid)

    # -- opcodes: session ------------------------------------------------------------

    def _op_init(self, buf, n, unique, nodeid, ctx, cap):
        if self.state is SessionState.RUNNING:
            # A rebooted guest sends INIT without DESTROY: end the old session
            # first, so every path below starts from DESTROYED.
            log.info("FUSE INIT without DESTROY: ending the previous session (guest reset?)")
            self._end_session()
            self._transition(SessionInput.DESTROY)
        if n - _HDR < 8:
            self._transition(SessionInput.INIT_REFUSED)
            raise self._short(_Op.INIT, 8, n)
        major, minor = _II(buf, _HDR)
        if major > abi.FUSE_KERNEL_VERSION:
            # Tell the kernel which major we speak; it retries INIT with that.
            self._transition(SessionInput.INIT_NEWER_MAJOR)
            out = InitOut(major=abi.FUSE_KERNEL_VERSION, minor=abi.FUSE_KERNEL_MINOR_VERSION)
            return _OUT(16 + abi.fuse_init_out.size, 0, unique) + out.to_bytes()
        if major < abi.FUSE_KERNEL_VERSION or minor < self.min_minor:
            self._transition(SessionInput.INIT_REFUSED)
            log.warning("FUSE INIT %d.%d refused: need 7.%d or newer", major, minor, self.min_minor)
            raise FsError(errno.EPROTO)
        if n - _HDR < abi.fuse_init_in_compat.size:
            self._transition(SessionInput.INIT_REFUSED)
            raise self._short(_Op.INIT, abi.fuse_init_in_compat.size, n)
        init = InitIn.from_bytes(buf, _HDR)
        rminor = min(minor, abi.FUSE_KERNEL_MINOR_VERSION)
        flags = int(init.all_flags & self._wanted)
        readahead = init.max_readahead
        if self.max_readahead is not None:
            readahead = min(readahead, self.max_readahead)
        pages = self.max_pages if flags & _F.MAX_PAGES else _DEFAULT_MAX_PAGES
        out = InitOut(
            major=abi.FUSE_KERNEL_VERSION, minor=rminor, max_readahead=readahead,
            flags=flags & 0xFFFF_FFFF, max_background=_MAX_BACKGROUND,
            congestion_threshold=_CONGESTION_THRESHOLD, max_write=self.max_write, time_gran=1,
            max_pages=self.max_pages if flags & _F.MAX_PAGES else 0,
        )
        payload = out.to_bytes_for(rminor)
        if cap is not None and cap < 16 + len(payload):
            self._transition(SessionInput.INIT_REFUSED)
            raise FsError(errno.EINVAL, "no room for the INIT reply")
        conn = ConnInfo(abi.FUSE_KERNEL_VERSION, rminor, readahead, self.max_write, pages, flags,
                        int(init.all_flags))
        try:
            self._ops.init(conn)
        except Exception:
            log.exception("Operations.init() raised; refusing the session")
            self._transition(SessionInput.INIT_REFUSED)
            raise FsError(errno.EIO) from None
        self.conn = conn
        self._minor = rminor
        self._max_read = pages * abi.PAGE_SIZE
        self._transition(SessionInput.INIT_ACCEPTED)
        log.info("FUSE session 7.%d: flags %#x, max_pages %d, max_write %d, max_readahead %d",
                 rminor, flags, pages, self.max_write, readahead)
        return _OUT(16 + len(payload), 0, unique) + payload

    def _op_destroy(self, buf, n, unique, nodeid, ctx, cap):
        self._end_session()
        self._transition(SessionInput.DESTROY)
        return _OUT(16, 0, unique)

    def _op_no_session(self, buf, n, unique, nodeid, ctx, cap):
        raise FsError(errno.EIO, "no FUSE session (INIT first)")

    def _op_noreply(self, buf, n, unique, nodeid, ctx, cap):
        return None

    def _op_unknown(self, buf, n, unique, nodeid, ctx, cap):
        raise FsError(errno.ENOSYS)

    def _op_write(self, buf, n, unique, nodeid, ctx, cap):
        """A write opcode without a decoder of its own (TMPFILE)."""
        raise FsError(errno.EROFS if self.readonly else errno.ENOSYS)

    def _op_ioctl(self, buf, n, unique, nodeid, ctx, cap):
        # ioctl(2)'s own word for "this file does not do ioctls"; ENOSYS would
        # reach the guest's program as is on older kernels.
        raise FsError(errno.ENOTTY)

    # -- opcodes: names and inodes -----------------------------------------------------

    def _op_lookup(self, buf, n, unique, nodeid, ctx, cap):
        if cap is not None and cap < _ENTRY_REPLY_LEN:
            raise FsError(errno.EINVAL, "no room for fuse_entry_out")
        name = self._name(buf, _HDR, n)
        entry = self._lookup(nodeid, name, ctx)
        child, attr, generation, entry_timeout, attr_timeout = entry
        if attr is None:
            packed = _ZERO_ATTR
        else:
            packed = attr._packed or pack_attr(attr)
        timeouts = self._tcache
        es, ens = timeouts.get(entry_timeout) or self._timeout(entry_timeout)
        as_, ans = timeouts.get(attr_timeout) or self._timeout(attr_timeout)
        reply = _ENTRY_REPLY.pack(_ENTRY_REPLY_LEN, 0, unique, child, generation, es, as_, ens, ans) + packed
        if child and child != ROOT_ID and not self._count(child):
            self._warn("%d live nodeids (max_nodeids); LOOKUP of nodeid %d refused with ENFILE",
                       len(self._nlookup), child)
            self._release(child)
            raise FsError(errno.ENFILE)
        return reply

    def _op_forget(self, buf, n, unique, nodeid, ctx, cap):
        if n - _HDR < 8:
            self._warn("FORGET unique %#x: %d bytes of arguments, need 8; ignored", unique, n - _HDR)
            return None
        self._forget(((nodeid, _U64(buf, _HDR)[0]),))
        return None

    def _op_batch_forget(self, buf, n, unique, nodeid, ctx, cap):
        if n - _HDR < 8:
            self._warn("BATCH_FORGET unique %#x: %d bytes of arguments, need 8; ignored", unique, n - _HDR)
            return None
        count = _U32(buf, _HDR)[0]
        present = (n - _HDR - 8) // 16
        if count > present:
            self._warn("BATCH_FORGET unique %#x: count %d but only %d fuse_forget_one present; "
                       "using those", unique, count, present)
            count = present
        start = _HDR + 8
        self._forget(_FORGET_ONE.iter_unpack(buf[start:start + 16 * count]))
        return None

    def _op_getattr(self, buf, n, unique, nodeid, ctx, cap):
        if n < _HDR + 16:
            raise self._short(_Op.GETATTR, 16, n)
        flags, _, fh = _GETATTR_IN(buf, _HDR)
        attr = self._getattr(nodeid, fh if flags & _GETATTR_FH else None, ctx)
        packed = attr._packed or pack_attr(attr)
        timeout = attr.timeout
        if timeout is None:
            timeout = self._ops.attr_timeout
        if timeout != self._attr_timeout:
            self._attr_s, self._attr_ns = split_timeout(timeout)
            self._attr_timeout = timeout
        return _ATTR_REPLY.pack(_ATTR_REPLY_LEN, 0, unique, self._attr_s, self._attr_ns, 0) + packed

    def _op_readlink(self, buf, n, unique, nodeid, ctx, cap):
        target = self._ops.readlink(nodeid, ctx)
        if type(target) is not bytes:
            target = bytes(target)
        return _OUT(16 + len(target), 0, unique) + target

    # -- opcodes: files ----------------------------------------------------------------

    def _op_open(self, buf, n, unique, nodeid, ctx, cap):
        if n < _HDR + 8:
            raise self._short(_Op.OPEN, 8, n)
        flags, _ = _OPEN_IN(buf, _HDR)
        if self.readonly and (
            (flags & abi.O_ACCMODE) != abi.O_RDONLY
            or flags & (abi.O_TRUNC | abi.O_CREAT | abi.O_EXCL | abi.O_TMPFILE_BIT)
        ):
            raise FsError(errno.EROFS)
        fh, open_flags = self._ops.open(nodeid, flags, ctx)
        return _OPEN_REPLY(32, 0, unique, fh, open_flags, 0)

    def _op_read(self, buf, n, unique, nodeid, ctx, cap):
        # _read_args inlined: READ is the hottest opcode and the call costs ~10% of a cached read.
        if n < _HDR + 40:
            raise self._short(_Op.READ, 40, n)
        fh, offset, size, _, _, _, _ = _READ_IN(buf, _HDR)
        limit = size if size <= self._max_read else self._max_read
        if cap is not None and cap - 16 < limit:
            limit = cap - 16
        coro = self._read(nodeid, fh, offset, limit, ctx)
        try:
            yielded = coro.send(None)
        except StopIteration as done:
            return self._read_reply(unique, done.value, limit)
        pending = _PendingRead(self, coro, yielded, unique, limit)
        pending.opcode, pending.nodeid, pending.started = _READ, nodeid, int(time.time())
        self._inflight[unique] = pending
        return _await_pending(pending)

    def _read_reply(self, unique: int, data, limit: int) -> list:
        """``[header, data...]`` of a READ, cut to ``limit`` bytes."""
        kind = type(data)
        if kind is bytes or kind is bytearray or kind is memoryview:
            if kind is memoryview and data.itemsize != 1:
                data = data.cast("B")
            size = len(data)
            if size > limit:
                data = data[:limit]
                size = limit
            return [_OUT(16 + size, 0, unique), data]
        if kind is not list and kind is not tuple:
            raise LocalProtocolError(f"Operations.read returned {kind.__name__}, not bytes or a list")
        parts: list = [None]
        total = 0
        for item in data:
            room = limit - total
            if room <= 0:
                break
            if type(item) is FileSegment:
                fd, offset, length = item
                if fd < 0 or offset < 0 or length < 0:
                    raise LocalProtocolError(f"Operations.read returned an invalid {item!r}")
                if length > room:
                    item = FileSegment(fd, offset, room)
                    length = room
            elif isinstance(item, _BYTES_TYPES):
                if type(item) is memoryview and item.itemsize != 1:
                    item = item.cast("B")
                length = len(item)
                if length > room:
                    item = item[:room]
                    length = room
            else:
                raise LocalProtocolError(f"Operations.read returned a list holding {type(item).__name__}")
            if length:
                parts.append(item)
                total += length
        parts[0] = _OUT(16 + total, 0, unique)
        return parts

    def _op_release(self, buf, n, unique, nodeid, ctx, cap):
        if n < _HDR + 24:
            raise self._short(_Op.RELEASE, 24, n)
        fh, flags, _, _ = _RELEASE_IN(buf, _HDR)
        self._ops.release(nodeid, fh, flags)
        return _OUT(16, 0, unique)

    def _op_flush(self, buf, n, unique, nodeid, ctx, cap):
        if n < _HDR + 24:
            raise self._short(_Op.FLUSH, 24, n)
        fh, _, _, lock_owner = _RELEASE_IN(buf, _HDR)  # same layout as fuse_flush_in
        self._ops.flush(nodeid, fh, lock_owner)
        return _OUT(16, 0, unique)

    def _op_fsync(self, buf, n, unique, nodeid, ctx, cap):
        return self._sync_reply(_Op.FSYNC, self._ops.fsync, buf, n, unique, nodeid)

    def _sync_reply(self, opcode: int, sync, buf, n: int, unique: int, nodeid: int) -> bytes:
        """FSYNC / FSYNCDIR: ``sync(nodeid, fh, datasync)`` over a ``fuse_fsync_in``."""
        if n < _HDR + 16:
            raise self._short(opcode, 16, n)
        fh, flags, _ = _FSYNC_IN(buf, _HDR)
        sync(nodeid, fh, bool(flags & abi.FUSE_FSYNC_FDATASYNC))
        return _OUT(16, 0, unique)

    def _op_lseek(self, buf, n, unique, nodeid, ctx, cap):
        if n < _HDR + 24:
            raise self._short(_Op.LSEEK, 24, n)
        fh, offset, whence, _ = _LSEEK_IN(buf, _HDR)
        result = self._ops.lseek(nodeid, fh, offset, whence)
        return _LSEEK_REPLY(24, 0, unique, result)

    # -- opcodes: directories ----------------------------------------------------------

    def _op_opendir(self, buf, n, unique, nodeid, ctx, cap):
        if n < _HDR + 8:
            raise self._short(_Op.OPENDIR, 8, n)
        flags, _ = _OPEN_IN(buf, _HDR)
        fh, open_flags = self._ops.opendir(nodeid, flags, ctx)
        return _OPEN_REPLY(32, 0, unique, fh, open_flags, 0)

    def _read_args(self, opcode: int, buf, n: int, cap: int | None) -> tuple[int, int, int]:
        """``(fh, offset, limit)`` of the ``fuse_read_in`` of READDIR / READDIRPLUS (READ inlines it).

        ``limit`` is the requested size capped by the negotiated maximum and by
        what fits in ``cap`` after the reply header.
        """
        if n < _HDR + 40:
            raise self._short(opcode, 40, n)
        fh, offset, size, _, _, _, _ = _READ_IN(buf, _HDR)
        limit = size if size <= self._max_read else self._max_read
        if cap is not None and cap - 16 < limit:
            limit = cap - 16
        return fh, offset, limit

    def _skip_bad_name(self, name, nodeid: int) -> None:
        self._warn("directory %d: filesystem returned an invalid entry name %r; skipped", nodeid, name)

    def _op_readdir(self, buf, n, unique, nodeid, ctx, cap):
        return self._dir_reply(False, buf, n, unique, nodeid, ctx, cap)

    def _op_readdirplus(self, buf, n, unique, nodeid, ctx, cap):
        return self._dir_reply(True, buf, n, unique, nodeid, ctx, cap)

    def _dir_reply(self, plus: bool, buf, n, unique, nodeid, ctx, cap):
        """READDIR, or READDIRPLUS with ``plus``: the whole records that fit the size asked for.

        With ``plus`` each entry sent with a nodeid adds a lookup reference; if
        the reply is not built after all, those references are taken back.
        """
        if plus:
            opcode, head, list_entries = _Op.READDIRPLUS, _DIRENTPLUS_HEAD, self._readdirplus
        else:
            opcode, head, list_entries = _Op.READDIR, _DIRENT_HEAD, self._readdir
        fh, offset, limit = self._read_args(opcode, buf, n, cap)
        entries = list_entries(nodeid, fh, offset, ctx)
        parts: list = [None]
        append = parts.append
        used = 0
        counts = self._nlookup
        max_nodeids = self.max_nodeids
        timeouts = self._tcache
        counted: list[int] = []
        try:
            for name, ino, typ, off, entry in entries:
                namelen = len(name)
                reclen = (head + namelen + 7) & ~7
                if used + reclen > limit:
                    if plus:
                        self._unsent(entry)
                    if not used:
                        raise FsError(errno.EINVAL, f"{opcode.name} size too small for one entry")
                    break
                # A hostile image may carry names the guest must never see.
                if not 0 < namelen <= abi.NAME_MAX or b"/" in name or b"\0" in name:
                    self._skip_bad_name(name, nodeid)
                    if plus:
                        self._unsent(entry)
                    continue
                if plus:
                    if entry is None:
                        append(_ZERO_ENTRY)
                    else:
                        # Inlined _count/_pack_entry: this loop runs once per directory entry.
                        child, attr, generation, entry_timeout, attr_timeout = entry
                        if child and child != ROOT_ID:
                            c = counts.get(child)
                            if c is not None:
                                counts[child] = c + 1
                            elif len(counts) < max_nodeids:
                                counts[child] = 1
                            else:
                                # Without a nodeid the kernel lists the name but keeps no
                                # inode, so the cap holds without hiding the entry.
                                self._warn("%d live nodeids (max_nodeids); READDIRPLUS sends %r without a nodeid",
                                           len(counts), name)
                                append(_ZERO_ENTRY)
                                self._unsent(entry)
                                child = None
                            if child is not None:
                                counted.append(child)
                        if child is not None:
                            es_ens = timeouts.get(entry_timeout) or self._timeout(entry_timeout)
                            as_ans = timeouts.get(attr_timeout) or self._timeout(attr_timeout)
                            append(_ENTRY_HEAD(child, generation, es_ens[0], as_ans[0], es_ens[1], as_ans[1]))
                            append(_ZERO_ATTR if attr is None else (attr._packed or pack_attr(attr)))
                append(_DIRENT(ino, off, namelen, typ))
                append(name)
                append(_PAD[reclen - head - namelen])
                used += reclen
        except BaseException:
            # Nothing is sent, so the kernel learns none of these references.
            for child in counted:
                self._uncount(child)
                if child not in counts:
                    self._release(child)
            raise
        finally:
            close = getattr(entries, "close", None)
            if close is not None:
                close()
        parts[0] = _OUT(16 + used, 0, unique)
        return b"".join(parts)

    def _unsent(self, entry) -> None:
        """A READDIRPLUS entry the kernel will not see: release its nodeid unless the kernel knows it."""
        if entry is not None:
            child = entry[0]
            if child and child != ROOT_ID and child not in self._nlookup:
                self._release(child)

    def _op_releasedir(self, buf, n, unique, nodeid, ctx, cap):
        if n < _HDR + 24:
            raise self._short(_Op.RELEASEDIR, 24, n)
        fh = _U64(buf, _HDR)[0]
        self._ops.releasedir(nodeid, fh)
        return _OUT(16, 0, unique)

    def _op_fsyncdir(self, buf, n, unique, nodeid, ctx, cap):
        return self._sync_reply(_Op.FSYNCDIR, self._ops.fsyncdir, buf, n, unique, nodeid)

    # -- opcodes: misc -------------------------------------------------------------------

    def _op_statfs(self, buf, n, unique, nodeid, ctx, cap):
        payload = pack_statfs(self._ops.statfs(nodeid, ctx), self._minor)
        return _OUT(16 + len(payload), 0, unique) + payload

    def _op_getxattr(self, buf, n, unique, nodeid, ctx, cap):
        if n < _HDR + 8:
            raise self._short(_Op.GETXATTR, 8, n)
        size = _U32(buf, _HDR)[0]
        name = self._xattr_name(buf, _HDR + 8, n)
        value = self._ops.getxattr(nodeid, name, ctx)
        return self._xattr_reply(unique, size, value, cap)

    def _op_listxattr(self, buf, n, unique, nodeid, ctx, cap):
        if n < _HDR + 8:
            raise self._short(_Op.LISTXATTR, 8, n)
        size = _U32(buf, _HDR)[0]
        names = self._ops.listxattr(nodeid, ctx)
        for name in names:
            if not name or b"\0" in name:
                raise LocalProtocolError(f"Operations.listxattr returned an invalid name {name!r}")
        value = b"".join(name + b"\0" for name in names)
        return self._xattr_reply(unique, size, value, cap)

    def _xattr_reply(self, unique: int, size: int, value, cap: int | None) -> bytes:
        """Size-probe semantics: size 0 asks how big; too small is ERANGE."""
        if type(value) is not bytes:
            value = bytes(value)
        length = len(value)
        if size == 0:
            return _XATTR_SIZE_REPLY(24, 0, unique, length, 0)
        if length > size or (cap is not None and 16 + length > cap):
            raise FsError(errno.ERANGE)
        return _OUT(16 + length, 0, unique) + value

    def _op_access(self, buf, n, unique, nodeid, ctx, cap):
        if n < _HDR + 8:
            raise self._short(_Op.ACCESS, 8, n)
        self._ops.access(nodeid, _U32(buf, _HDR)[0], ctx)
        return _OUT(16, 0, unique)

    def _op_syncfs(self, buf, n, unique, nodeid, ctx, cap):
        if n < _HDR + 8:
            raise self._short(_Op.SYNCFS, 8, n)
        self._ops.syncfs(nodeid)
        return _OUT(16, 0, unique)

    # -- opcodes: writes ------------------------------------------------------------------
    # Every handler starts with the read-only check: a read-only server answers
    # EROFS before looking at the arguments, as it always did.

    def _writable(self) -> None:
        if self.readonly:
            raise FsError(errno.EROFS)

    def _entry_reply(self, unique: int, entry, cap: int | None, extra: bytes = b"") -> bytes:
        """A fuse_entry_out reply (plus ``extra``) for an Entry that counts one lookup.

        Used by MKNOD, MKDIR, SYMLINK, LINK and CREATE; a nodeid beyond
        ``max_nodeids`` is refused with ENFILE and released again, as LOOKUP does.
        """
        child, attr, generation, entry_timeout, attr_timeout = entry
        packed = _ZERO_ATTR if attr is None else (attr._packed or pack_attr(attr))
        es, ens = self._timeout(entry_timeout)
        as_, ans = self._timeout(attr_timeout)
        total = _ENTRY_REPLY_LEN + len(extra)
        if cap is not None and cap < total:
            raise FsError(errno.EINVAL, "no room for the entry reply")
        reply = _ENTRY_REPLY.pack(total, 0, unique, child, generation, es, as_, ens, ans) + packed + extra
        if child and child != ROOT_ID and not self._count(child):
            self._warn("%d live nodeids (max_nodeids); new nodeid %d refused with ENFILE",
                       len(self._nlookup), child)
            self._release(child)
            raise FsError(errno.ENFILE)
        return reply

    def _release(self, nodeid: int) -> None:
        try:
            self._ops.release_inode(nodeid)
        except Exception:
            log.exception("Operations.release_inode(%d) raised; it must not", nodeid)

    def _two_names(self, buf, start: int, end: int) -> tuple[bytes, bytes]:
        """Two NUL-terminated arguments back to back (RENAME's names, SYMLINK's name and target)."""
        raw = buf[start:end]
        if type(raw) is not bytes:
            raw = bytes(raw)
        nul = raw.find(b"\0")
        if nul < 0:
            raise FsError(errno.EINVAL, "first name not NUL-terminated")
        return raw[:nul + 1], raw[nul + 1:]

    def _op_setattr(self, buf, n, unique, nodeid, ctx, cap):
        self._writable()
        if n < _HDR + 88:
            raise self._short(_Op.SETATTR, 88, n)
        (valid, _, fh, size, lock_owner, atime, mtime, ctime, atimensec, mtimensec, ctimensec, mode,
         _, uid, gid, _) = _SETATTR_IN(buf, _HDR)
        for ns in (atimensec, mtimensec, ctimensec):
            if ns >= 1_000_000_000:
                raise FsError(errno.EINVAL, "nanoseconds out of range")
        attrs = SetAttr(valid, mode, uid, gid, size, atime, atimensec, mtime, mtimensec, ctime, ctimensec,
                        fh, lock_owner)
        attr = self._ops.setattr(nodeid, attrs, ctx)
        packed = attr._packed or pack_attr(attr)
        es, ens = self._timeout(self._ops.attr_timeout if attr.timeout is None else attr.timeout)
        return _ATTR_REPLY.pack(_ATTR_REPLY_LEN, 0, unique, es, ens, 0) + packed

    def _op_mknod(self, buf, n, unique, nodeid, ctx, cap):
        self._writable()
        if n < _HDR + 16:
            raise self._short(_Op.MKNOD, 16, n)
        mode, rdev, umask, _ = _MKNOD_IN(buf, _HDR)
        name = self._name(buf, _HDR + 16, n)
        return self._entry_reply(unique, self._ops.mknod(nodeid, name, mode, rdev, umask, ctx), cap)

    def _op_mkdir(self, buf, n, unique, nodeid, ctx, cap):
        self._writable()
        if n < _HDR + 8:
            raise self._short(_Op.MKDIR, 8, n)
        mode, umask = _II(buf, _HDR)
        name = self._name(buf, _HDR + 8, n)
        return self._entry_reply(unique, self._ops.mkdir(nodeid, name, mode, umask, ctx), cap)

    def _op_symlink(self, buf, n, unique, nodeid, ctx, cap):
        self._writable()
        first, rest = self._two_names(buf, _HDR, n)
        name = self._name(first, 0, len(first))
        nul = rest.find(b"\0")
        if nul != len(rest) - 1:
            raise FsError(errno.EINVAL, "symlink target not NUL-terminated or with an embedded NUL")
        if nul == 0:
            raise FsError(errno.ENOENT, "empty symlink target")
        if nul >= _PATH_MAX:
            raise FsError(errno.ENAMETOOLONG)
        return self._entry_reply(unique, self._ops.symlink(nodeid, name, rest[:nul], ctx), cap)

    def _op_link(self, buf, n, unique, nodeid, ctx, cap):
        self._writable()
        if n < _HDR + 8:
            raise self._short(_Op.LINK, 8, n)
        old = _U64(buf, _HDR)[0]
        name = self._name(buf, _HDR + 8, n)
        return self._entry_reply(unique, self._ops.link(old, nodeid, name, ctx), cap)

    def _op_unlink(self, buf, n, unique, nodeid, ctx, cap):
        self._writable()
        self._ops.unlink(nodeid, self._name(buf, _HDR, n), ctx)
        return _OUT(16, 0, unique)

    def _op_rmdir(self, buf, n, unique, nodeid, ctx, cap):
        self._writable()
        self._ops.rmdir(nodeid, self._name(buf, _HDR, n), ctx)
        return _OUT(16, 0, unique)

    def _op_rename(self, buf, n, unique, nodeid, ctx, cap):
        self._writable()
        if n < _HDR + 8:
            raise self._short(_Op.RENAME, 8, n)
        return self._do_rename(buf, _HDR + 8, n, unique, nodeid, _U64(buf, _HDR)[0], 0, ctx)

    def _op_rename2(self, buf, n, unique, nodeid, ctx, cap):
        self._writable()
        if n < _HDR + 16:
            raise self._short(_Op.RENAME2, 16, n)
        newdir, flags, _ = _RENAME2_IN(buf, _HDR)
        return self._do_rename(buf, _HDR + 16, n, unique, nodeid, newdir, flags, ctx)

    def _do_rename(self, buf, start, n, unique, nodeid, newdir, flags, ctx):
        first, rest = self._two_names(buf, start, n)
        name = self._name(first, 0, len(first))
        newname = self._name(rest, 0, len(rest))
        self._ops.rename(nodeid, name, newdir, newname, flags, ctx)
        return _OUT(16, 0, unique)

    def _op_create(self, buf, n, unique, nodeid, ctx, cap):
        self._writable()
        if n < _HDR + 16:
            raise self._short(_Op.CREATE, 16, n)
        flags, mode, umask, _ = _CREATE_IN(buf, _HDR)
        name = self._name(buf, _HDR + 16, n)
        if cap is not None and cap < _CREATE_REPLY_LEN:
            raise FsError(errno.EINVAL, "no room for the CREATE reply")
        entry, fh, open_flags = self._ops.create(nodeid, name, mode, flags, umask, ctx)
        try:
            return self._entry_reply(unique, entry, cap, _CREATE_OPEN(fh, open_flags, 0))
        except FsError:
            # The kernel never learns of this handle: close it again.
            try:
                self._ops.release(entry.nodeid, fh, flags)
            except Exception:
                log.exception("Operations.release() raised after a refused CREATE")
            raise

    def _op_write_data(self, buf, n, unique, nodeid, ctx, cap, payload=None):
        """WRITE; with ``payload``, ``buf`` ends where the data begins and the data is ``payload``."""
        self._writable()
        if n < _HDR + 40:
            raise self._short(_Op.WRITE, 40, n)
        fh, offset, size, write_flags, _, _, _ = _WRITE_IN(buf, _HDR)
        start = _HDR + 40
        if size > n - start:
            self._warn("WRITE unique %#x: size %d but %d data bytes present; EINVAL", unique, size, n - start)
            raise FsError(errno.EINVAL, "WRITE size beyond the request")
        if offset > 0x7FFF_FFFF_FFFF_FFFF or offset + size > 0x7FFF_FFFF_FFFF_FFFF:
            raise FsError(errno.EFBIG)
        if payload is not None:
            data = payload if size == len(payload) else payload[:size]
            written = self._ops.write(nodeid, fh, offset, data, write_flags, ctx)
        else:
            data = memoryview(buf)[start:start + size]
            try:
                written = self._ops.write(nodeid, fh, offset, data, write_flags, ctx)
            finally:
                data.release()
        if not 0 <= written <= size:
            raise LocalProtocolError(f"Operations.write returned {written} for {size} bytes")
        return _WRITE_REPLY(24, 0, unique, written, 0)

    def _op_setxattr(self, buf, n, unique, nodeid, ctx, cap):
        self._writable()
        head = abi.FUSE_COMPAT_SETXATTR_IN_SIZE
        if n < _HDR + head:
            raise self._short(_Op.SETXATTR, head, n)
        size, flags = _II(buf, _HDR)
        if size > _XATTR_SIZE_MAX:
            raise FsError(errno.E2BIG)
        raw = buf[_HDR + head:n]
        if type(raw) is not bytes:
            raw = bytes(raw)
        nul = raw.find(b"\0")
        if nul < 0:
            raise FsError(errno.EINVAL, "xattr name not NUL-terminated")
        name = self._xattr_name(raw, 0, nul + 1)
        value = raw[nul + 1:]
        if len(value) != size:
            raise FsError(errno.EINVAL, "xattr value length does not match its size field")
        self._ops.setxattr(nodeid, name, value, flags, ctx)
        return _OUT(16, 0, unique)

    def _op_removexattr(self, buf, n, unique, nodeid, ctx, cap):
        self._writable()
        self._ops.removexattr(nodeid, self._xattr_name(buf, _HDR, n), ctx)
        return _OUT(16, 0, unique)

    def _op_fallocate(self, buf, n, unique, nodeid, ctx, cap):
        self._writable()
        if n < _HDR + 32:
            raise self._short(_Op.FALLOCATE, 32, n)
        fh, offset, length, mode, _ = _FALLOCATE_IN(buf, _HDR)
        self._ops.fallocate(nodeid, fh, offset, length, mode, ctx)
        return _OUT(16, 0, unique)

    def _op_copy_file_range(self, buf, n, unique, nodeid, ctx, cap):
        self._writable()
        if n < _HDR + 56:
            raise self._short(_Op.COPY_FILE_RANGE, 56, n)
        fh_in, off_in, nodeid_out, fh_out, off_out, length, flags = _COPY_RANGE_IN(buf, _HDR)
        # The reply's size field is 32 bits: the kernel never asks for more (it caps len itself).
        length = min(length, 0xFFFF_F000)
        copied = self._ops.copy_file_range(nodeid, fh_in, off_in, nodeid_out, fh_out, off_out, length,
                                           flags, ctx)
        if not 0 <= copied <= length:
            raise LocalProtocolError(f"Operations.copy_file_range returned {copied} for {length} bytes")
        return _WRITE_REPLY(24, 0, unique, copied, 0)

    def _lk_args(self, opcode: int, buf, n: int) -> tuple[int, int, FileLock, int]:
        if n < _HDR + 48:
            raise self._short(opcode, 48, n)
        fh, owner, start, end, typ, pid, lk_flags, _ = _LK_IN(buf, _HDR)
        if typ > 2:
            raise FsError(errno.EINVAL, "lock type")
        return fh, owner, FileLock(start, end, typ, pid), lk_flags

    def _op_getlk(self, buf, n, unique, nodeid, ctx, cap):
        fh, owner, lock, _ = self._lk_args(_Op.GETLK, buf, n)
        found = self._ops.getlk(nodeid, fh, owner, lock, ctx)
        return _LK_REPLY(40, 0, unique, found.start, found.end, found.type, found.pid)

    def _op_setlk(self, buf, n, unique, nodeid, ctx, cap):
        fh, owner, lock, lk_flags = self._lk_args(_Op.SETLK, buf, n)
        self._ops.setlk(nodeid, fh, owner, lock, False, bool(lk_flags & abi.FUSE_LK_FLOCK), ctx)
        return _OUT(16, 0, unique)

    def _op_setlkw(self, buf, n, unique, nodeid, ctx, cap):
        fh, owner, lock, lk_flags = self._lk_args(_Op.SETLKW, buf, n)
        waiting = self._ops.setlk(nodeid, fh, owner, lock, True, bool(lk_flags & abi.FUSE_LK_FLOCK), ctx)
        if waiting is None:
            return _OUT(16, 0, unique)
        # The filesystem waits for the lock in a coroutine: driven like a READ
        # that suspended, so INTERRUPT (a signal in the guest) cancels it: EINTR.
        try:
            yielded = waiting.send(None)
        except StopIteration:
            return _OUT(16, 0, unique)
        pending = _PendingRead(self, waiting, yielded, unique, -1)
        pending.opcode, pending.nodeid, pending.started = int(_Op.SETLKW), nodeid, int(time.time())
        self._inflight[unique] = pending
        return _await_pending(pending)

    def _op_interrupt(self, buf, n, unique, nodeid, ctx, cap):
        if n < _HDR + 8:
            self._warn("INTERRUPT unique %#x: %d bytes of arguments, need 8; ignored", unique, n - _HDR)
            return None
        pending = self._inflight.get(_U64(buf, _HDR)[0])
        if pending is not None:
            pending.interrupt()
        return None


async def _await_pending(pending: "_PendingRead"):
    return await pending


class _PendingRead:
    """A READ whose ``Operations.read`` coroutine suspended; awaiting this finishes it.

    (A SETLKW that waits for its lock runs the same way, with ``limit`` -1: its
    success reply is the bare header.)

    It runs the coroutine the way ``asyncio.Task.__step`` would: a yielded
    future is waited for and the coroutine resumed with ``send(None)`` (it
    collects the result itself); a bare ``yield`` goes to the event loop for one
    iteration; anything else is answered with the RuntimeError a Task throws.
    Waiting goes through a private "waker" future so that INTERRUPT can wake
    the read without cancelling the future it waits on, which may be shared
    with other readers (a chunk download).  An interrupted read gets
    ``CancelledError`` thrown in, like ``Task.cancel()``, and answers EINTR
    unless it swallows the cancellation and returns data anyway.
    """

    __slots__ = ("_server", "_coro", "_yielded", "_unique", "_limit", "_waker", "_interrupted",
                 "opcode", "nodeid", "started")

    def __init__(self, server: FuseServer, coro, yielded, unique: int, limit: int) -> None:
        self._server = server
        self._coro = coro
        self._yielded = yielded
        self._unique = unique
        self._limit = limit
        # For /api/v1/metrics/inflight; set by whoever suspends the request.
        self.opcode = 0
        self.nodeid = 0
        self.started = 0
        self._waker = None
        self._interrupted = False

    def interrupt(self) -> None:
        self._interrupted = True
        waker = self._waker
        if waker is not None and not waker.done():
            waker.set_result(None)

    def _wake(self, _fut) -> None:
        waker = self._waker
        if waker is not None and not waker.done():
            waker.set_result(None)

    def __await__(self):
        coro = self._coro
        value = self._yielded
        self._yielded = None
        unique = self._unique
        outer_cancel = False
        try:
            while True:
                throw: BaseException | None = None
                if value is None:
                    try:
                        yield None
                    except BaseException as exc:  # the transport's task was cancelled
                        throw, outer_cancel = exc, True
                else:
                    blocking = getattr(value, "_asyncio_future_blocking", None)
                    if blocking:
                        value._asyncio_future_blocking = False
                        waker = self._waker = value.get_loop().create_future()
                        value.add_done_callback(self._wake)
                        try:
                            if not self._interrupted:
                                waker._asyncio_future_blocking = True
                                yield waker
                        except BaseException as exc:
                            throw, outer_cancel = exc, True
                        finally:
                            self._waker = None
                            value.remove_done_callback(self._wake)
                    elif blocking is False:
                        throw = RuntimeError(f"yield was used instead of yield from in read coroutine {coro!r}")
                    else:
                        throw = RuntimeError(f"read coroutine {coro!r} yielded {value!r}, not a future")
                if throw is None and self._interrupted:
                    self._interrupted = False
                    throw = _cancelled_error()
                    if throw is None:
                        coro.close()
                        return error_reply(unique, errno.EINTR)
                try:
                    value = coro.send(None) if throw is None else coro.throw(throw)
                except StopIteration as done:
                    try:
                        if self._limit < 0:
                            return _OUT(16, 0, unique)   # SETLKW: the lock was taken
                        reply = self._server._read_reply(unique, done.value, self._limit)
                        if self._server._hits is not None:
                            self._server._tally(self._server._hits, self.opcode, self.nodeid)
                        return reply
                    except Exception:
                        self._server._warn("READ unique %#x: filesystem bug (bad data from Operations.read), "
                                           "replying EIO", unique, exc_info=True, level=logging.ERROR)
                        return error_reply(unique, errno.EIO)
                except FsError as exc:
                    if self._server._hits is not None and self._limit >= 0:
                        self._server._tally(self._server._errs, self.opcode, self.nodeid)
                    return error_reply(unique, exc.errno_value)
                except BaseException as exc:
                    if _is_cancelled_error(exc):
                        if outer_cancel:
                            raise
                        return error_reply(unique, errno.EINTR)
                    if not isinstance(exc, Exception):
                        raise
                    self._server._warn("READ unique %#x: filesystem bug, replying EIO", unique,
                                       exc_info=True, level=logging.ERROR)
                    return error_reply(unique, errno.EIO)
                if outer_cancel:
                    # The read swallowed the transport's cancellation and goes on;
                    # like a Task, keep driving it.
                    outer_cancel = False
        finally:
            inflight = self._server._inflight
            if inflight.get(unique) is self:
                del inflight[unique]
