"""The only importer of the compiled vhost-user shim (``nydus_vfs._native._vhost_shim``).

Loading never raises: when the extension is missing or was built for another
version of the package, :func:`available` is False and :func:`require` raises
:class:`NativeShimUnavailable` with what to do about it.  Everything that does
not need virtio-fs (the ``/dev/fuse`` transport, the builder, the tests of the
pure-Python layers) therefore works without a C compiler.

:class:`Device` owns one C ``vhs_dev`` (one vhost-user connection).  It is not
thread-safe: every method must be called from the thread running the event
loop that watches the socket and the kick fds.  Negative return codes from C
are turned into exceptions in one place, :func:`_check`:

=================  =============================================================
``-ECONNRESET``    :class:`FrontendDisconnected` (the front-end hung up)
``-EPROTO``        :class:`FrontendProtocolError` (drop the connection)
``-EINVAL``        :class:`ShimUsageError` (our bug: bad queue index / head / range)
``-EMSGSIZE``      :class:`ReplyTooLargeError` (a reply exceeded the writable part)
anything else      :class:`ShimOSError` (``errno`` set, e.g. a failed ``preadv``)
=================  =============================================================
"""

from __future__ import annotations

import dataclasses
import errno as _errno
import functools
import os
from typing import Any

from .._version import __version__
from ..errors import LocalProtocolError, RemoteProtocolError, TransportError

__all__ = [
    "ABI_VERSION",
    "available",
    "require",
    "unavailable_reason",
    "NativeShimUnavailable",
    "FrontendDisconnected",
    "FrontendProtocolError",
    "ShimUsageError",
    "ReplyTooLargeError",
    "ShimOSError",
    "ShimConfig",
    "QueueInfo",
    "Device",
    "StatProbe",
    "VIEW_MIN",
    "is_plain",
    "EV_QUEUES",
    "EV_DEFERRED",
    "EV_LOG",
    "EV_MEMTABLE",
    "POP_MORE",
    "POP_BROKEN",
    "POP_THROTTLED",
    "REQ_OVERSIZE",
    "REQ_PARTIAL",
    "F_INDIRECT_DESC",
    "F_EVENT_IDX",
    "F_PROTOCOL_FEATURES",
    "F_VERSION_1",
    "PF_MQ",
    "PF_REPLY_ACK",
    "PF_CONFIGURE_MEM_SLOTS",
]

#: The C ABI this binding was written against (``VHS_ABI_VERSION``).
ABI_VERSION = 3

# Mirrors of the C constants, so callers need not touch ``lib``.  Checked
# against the compiled values at import.
EV_QUEUES = 0x1
EV_DEFERRED = 0x2
EV_LOG = 0x4
EV_MEMTABLE = 0x8
POP_MORE = 0x1
POP_BROKEN = 0x2
POP_THROTTLED = 0x4
REQ_OVERSIZE = 0x1
REQ_PARTIAL = 0x2
F_INDIRECT_DESC = 28
F_EVENT_IDX = 29
F_PROTOCOL_FEATURES = 30
F_VERSION_1 = 32
PF_MQ = 0
PF_REPLY_ACK = 3
PF_CONFIGURE_MEM_SLOTS = 15

#: Requests longer than this are returned as views of the shim's copy (see Device.pop).
VIEW_MIN = 16 << 10

_BUILD_HINT = (
    "build it with `pip install -e .` from the project root (needs a C compiler, "
    "the Python headers (python3-dev) and cffi)"
)


class NativeShimUnavailable(TransportError, ImportError):
    """The compiled vhost-user shim is missing or stale, so virtio-fs cannot run."""


class FrontendDisconnected(TransportError, ConnectionResetError):
    """The vhost-user front-end closed the connection (or stopped reading replies)."""


class FrontendProtocolError(RemoteProtocolError):
    """The front-end sent something vhost-user does not allow; the connection must go."""


class ShimUsageError(LocalProtocolError):
    """The caller passed the shim an invalid queue index or a head that is not in flight."""


class ReplyTooLargeError(LocalProtocolError):
    """A reply exceeded the request's writable part; the chain was returned with length 0."""


class ShimOSError(TransportError, OSError):
    """A system call made for a request failed (e.g. ``preadv`` on a cache file)."""


def _load() -> tuple[Any, Any, str | None]:
    try:
        from . import _vhost_shim  # type: ignore[attr-defined]
    except ImportError as exc:
        return None, None, f"the native vhost-user shim is not built ({exc}); {_BUILD_HINT}"
    ffi, lib = _vhost_shim.ffi, _vhost_shim.lib
    built = ffi.string(lib.vhs_version()).decode()
    if built != __version__ or lib.vhs_abi_version() != ABI_VERSION:
        return None, None, (
            f"the native vhost-user shim is stale: built for nydus_vfs {built} "
            f"(ABI {lib.vhs_abi_version()}), this is {__version__} (ABI {ABI_VERSION}); "
            f"rebuild it with `pip install -e .` (or use a fresh virtualenv)")
    for name, value in (("VHS_EV_QUEUES", EV_QUEUES), ("VHS_EV_DEFERRED", EV_DEFERRED),
                        ("VHS_EV_LOG", EV_LOG), ("VHS_EV_MEMTABLE", EV_MEMTABLE),
                        ("VHS_POP_MORE", POP_MORE), ("VHS_POP_BROKEN", POP_BROKEN),
                        ("VHS_POP_THROTTLED", POP_THROTTLED), ("VHS_REQ_OVERSIZE", REQ_OVERSIZE),
                        ("VHS_REQ_PARTIAL", REQ_PARTIAL)):
        if getattr(lib, name) != value:
            return None, None, f"the native vhost-user shim disagrees on {name}; {_BUILD_HINT}"
    return ffi, lib, None


ffi, lib, _UNAVAILABLE = _load()
# read_in fills every byte it hands out: no need to zero the buffer first.
_new_raw = ffi.new_allocator(should_clear_after_alloc=False) if ffi is not None else None

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_malloc_tuned = False


def _tune_malloc() -> None:
    """Keep the shim's request copies on a warm heap (once per process, glibc only).

    Every popped request is copied into a heap buffer that is freed when it is
    pushed.  With glibc's defaults, a batch of large requests (16 x 128 KiB
    WRITEs) grows the heap past the trim threshold, the frees shrink it again,
    and the next batch pays fresh page faults and zeroing for every buffer:
    about twice the CPU of the same WRITE at depth 1.  Keeping up to 64 MiB
    of freed heap (the shim's default in-flight budget) and serving buffers up
    to 4 MiB from the heap rather than mmap removes that churn.
    """
    global _malloc_tuned
    if _malloc_tuned:
        return
    _malloc_tuned = True
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = getattr(libc, "mallopt", None)
        if mallopt is not None:
            mallopt(_M_TRIM_THRESHOLD, 64 << 20)
            mallopt(_M_MMAP_THRESHOLD, 4 << 20)
    except OSError:
        pass


def available() -> bool:
    """True when the compiled shim is importable and matches this package."""
    return _UNAVAILABLE is None


def unavailable_reason() -> str | None:
    """Why the shim cannot be used, or None when it can."""
    return _UNAVAILABLE


def require() -> None:
    """Raise :class:`NativeShimUnavailable` (with the fix) unless the shim is usable."""
    if _UNAVAILABLE is not None:
        raise NativeShimUnavailable(f"virtio-fs is unavailable: {_UNAVAILABLE}")


_ERRORS: dict[int, type[TransportError]] = {
    _errno.ECONNRESET: FrontendDisconnected,
    _errno.EPROTO: FrontendProtocolError,
    _errno.EINVAL: ShimUsageError,
    _errno.EMSGSIZE: ReplyTooLargeError,
}


def _check(rc: int, dev: Any) -> int:
    """Return ``rc`` when >= 0, else raise the exception its errno stands for."""
    if rc >= 0:
        return rc
    code = -rc
    text = ffi.string(lib.vhs_dev_error(dev)).decode("utf-8", "replace") or _errno.errorcode.get(code, str(code))
    cls = _ERRORS.get(code)
    if cls is None:
        raise ShimOSError(code, text)
    raise cls(text)


@dataclasses.dataclass(frozen=True)
class ShimConfig:
    """What the back-end offers and the limits it enforces; ``None`` keeps the shim default.

    Defaults: features VERSION_1 | PROTOCOL_FEATURES | INDIRECT_DESC | EVENT_IDX;
    protocol features MQ | REPLY_ACK | CONFIGURE_MEM_SLOTS; GET_QUEUE_NUM 2 (hiprio
    + one request queue, what Linux uses); ring indices up to 16 request queues
    accepted; queue size <= 1024; 32 memory slots; 1 MiB + 64 KiB per request in
    each direction, all of the readable part copied at pop (``max_copy_bytes``
    = ``max_in_bytes``); 64 MiB held by in-flight request copies.

    ``max_copy_bytes`` (at least 64): a request whose readable part is longer
    is popped with ``REQ_PARTIAL``, only that many bytes copied, and the rest
    left in guest memory for :meth:`Device.read_in` / :meth:`Device.pwrite_in`.
    """

    features: int | None = None
    protocol_features: int | None = None
    queue_num: int | None = None
    max_queues: int | None = None
    max_queue_size: int | None = None
    max_mem_slots: int | None = None
    max_in_bytes: int | None = None
    max_copy_bytes: int | None = None
    max_out_bytes: int | None = None
    max_inflight_bytes: int | None = None


@dataclasses.dataclass(frozen=True)
class QueueInfo:
    """A snapshot of one virtqueue's state (``struct vhs_queue_info``)."""

    index: int
    kick_fd: int
    call_fd: int
    num: int
    inflight: int
    last_avail: int
    used_idx: int
    started: bool
    enabled: bool
    ready: bool
    broken: bool
    running: bool
    stopping: bool


def is_plain(flags: int, in_len: int) -> bool:
    """Whether a popped request's data is handed over as ``bytes`` (else as a view).

    Large copies (WRITE data, when max_copy_bytes lets the shim copy it) are
    handed over as a view of the shim's private copy instead of a second copy
    in Python; it lives until push.  So is the prefix of a flagged (PARTIAL,
    OVERSIZE) request, of which the caller typically needs 80 bytes.
    """
    return not flags and in_len <= VIEW_MIN


class Device:
    """One vhost-user connection served by the C shim.

    ``sock_fd`` stays owned by the caller (the shim never closes it, and makes
    it non-blocking).  Call order: :meth:`dispatch` whenever the socket is
    readable; for each queue whose :class:`QueueInfo` says ``running``, when its
    kick fd is readable: :meth:`drain_kick` then :meth:`pop` until it returns
    fewer than asked; complete every popped request exactly once with
    :meth:`complete` or :meth:`write`/:meth:`pread` + :meth:`push`; then
    :meth:`notify` once per batch.  :meth:`close` (or garbage collection) frees
    the device, unmapping guest memory and closing the front-end's fds.
    """

    def __init__(self, sock_fd: int, config: ShimConfig | None = None, *, batch: int = 64) -> None:
        require()
        _tune_malloc()
        cfg = ffi.new("struct vhs_config *")
        lib.vhs_default_config(cfg)
        for field in dataclasses.fields(ShimConfig):
            value = getattr(config, field.name) if config is not None else None
            if value is not None:
                setattr(cfg, field.name, value)
        ptr = lib.vhs_dev_new(sock_fd, cfg)
        if ptr == ffi.NULL:
            raise ValueError(f"the vhost-user shim refused the configuration {config!r} "
                             "(limits: queues <= 64, queue size a power of two <= 32768, "
                             "memory slots <= 64, VERSION_1 offered, only supported feature bits, "
                             "max_in_bytes and max_out_bytes >= 4096, max_copy_bytes >= 64)")
        self._dev = ffi.gc(ptr, lib.vhs_dev_free)
        self.batch = batch
        self._reqs = ffi.new("struct vhs_req[]", batch)
        self._status = ffi.new("int *")
        self._info = ffi.new("struct vhs_queue_info *")
        self._log = ffi.new("char[]", 8192)
        self.closed = False

    # -- control plane ---------------------------------------------------------
    def dispatch(self) -> int:
        """Handle what the socket has; returns ``EV_*`` bits.  Raises on disconnect/violation."""
        return _check(lib.vhs_dev_dispatch(self._dev), self._dev)

    def finish_deferred(self) -> bool:
        """Send a deferred GET_VRING_BASE reply if its queue drained; True when nothing waits."""
        return _check(lib.vhs_dev_finish_deferred(self._dev), self._dev) == 1

    def close_retired(self) -> None:
        """Close replaced kick fds; call after they are no longer registered with the loop."""
        lib.vhs_dev_close_retired(self._dev)

    def take_log(self) -> list[str]:
        """Warnings the shim recorded since the last call (one string each)."""
        n = lib.vhs_dev_take_log(self._dev, self._log, len(self._log))
        text = ffi.string(self._log, n).decode("utf-8", "replace")
        return [line for line in text.split("\n") if line]

    @property
    def features(self) -> int:
        return int(lib.vhs_dev_features(self._dev))

    @property
    def protocol_features(self) -> int:
        return int(lib.vhs_dev_protocol_features(self._dev))

    @property
    def num_queues(self) -> int:
        """Highest ring index the front-end has configured, plus one."""
        return int(lib.vhs_dev_num_queues(self._dev))

    @property
    def num_regions(self) -> int:
        return int(lib.vhs_dev_num_regions(self._dev))

    def queue_info(self, q: int) -> QueueInfo:
        info = self._info
        _check(lib.vhs_queue_info(self._dev, q, info), self._dev)
        return QueueInfo(q, info.kick_fd, info.call_fd, info.num, info.inflight, info.last_avail,
                         info.used_idx, bool(info.started), bool(info.enabled), bool(info.ready),
                         bool(info.broken), bool(info.running), bool(info.stopping))

    def queue_error(self, q: int) -> str:
        return ffi.string(lib.vhs_queue_error(self._dev, q)).decode("utf-8", "replace")

    # -- data plane --------------------------------------------------------------
    def drain_kick(self, q: int) -> None:
        lib.vhs_queue_drain_kick(self._dev, q)

    def pop(self, q: int, max_requests: int | None = None) -> tuple[list[tuple[int, bytes, int, int, int]], int]:
        """Pop up to ``max_requests`` (default: ``batch``) requests.

        Returns ``(requests, status)``: each request is ``(head, data, out_cap,
        flags, in_total)`` where ``data`` is the private copy of the readable
        part (``bytes`` up to 16 KiB; above that, and for a flagged request,
        a cffi buffer over the shim's copy, valid until the request is
        pushed), and ``status`` holds ``POP_*`` bits.  With ``REQ_PARTIAL`` in ``flags``, ``data`` is only the
        first ``max_copy_bytes`` of ``in_total`` readable bytes: the rest is
        reached with :meth:`read_in` / :meth:`pwrite_in` until the push.
        """
        reqs, n, status = self.pop_raw(q, max_requests)
        request = self.request
        return [request(reqs[i]) for i in range(n)], status

    def pop_raw(self, q: int, max_requests: int | None = None) -> tuple[Any, int, int]:
        """The hot-path :meth:`pop`: ``(reqs, n, status)`` without building tuples.

        ``reqs`` is the cffi array of ``struct vhs_req`` (``head``, ``data``,
        ``in_len``, ``in_total``, ``out_cap``, ``flags``) holding ``n``
        requests; it is overwritten by the next pop on this device, so read
        what you need first.  ``ffi.unpack(r.data, r.in_len)`` is the data as
        :meth:`pop` gives it when ``r.flags`` is 0 and ``r.in_len <= VIEW_MIN``;
        :meth:`request` gives any request exactly as :meth:`pop` would
        (:func:`is_plain` says which need it).
        """
        n_max = self.batch if max_requests is None else min(max_requests, self.batch)
        reqs = self._reqs
        n = lib.vhs_queue_pop(self._dev, q, reqs, n_max, self._status)
        if n < 0:
            _check(n, self._dev)
        return reqs, n, self._status[0]

    @staticmethod
    def request(r: Any) -> tuple[int, Any, int, int, int]:
        """One popped ``struct vhs_req`` as :meth:`pop` returns it: (head, data, out_cap, flags, in_total)."""
        ln = r.in_len
        flags = r.flags
        data = ffi.unpack(r.data, ln) if is_plain(flags, ln) else ffi.buffer(r.data, ln)
        return r.head, data, r.out_cap, flags, r.in_total

    def complete(self, q: int, head: int, data: Any) -> None:
        """Write ``data`` (bytes-like) at offset 0 and push the chain with its length."""
        if type(data) is not bytes:
            data = ffi.from_buffer(data)
        _check(lib.vhs_req_complete(self._dev, q, head, data, len(data)), self._dev)

    def completer(self) -> Any:
        """The hot-path form of :meth:`complete` for ``bytes`` replies.

        Returns ``f(q, head, data, len(data)) -> rc``, the C call bound to this
        device: no wrapper frame and no exception on failure.  ``rc`` is 0 on
        success; a negative ``rc`` goes to :meth:`raise_for` (the chain is then
        in the state :meth:`complete` would have left it).  Valid while the
        device is open.
        """
        return functools.partial(lib.vhs_req_complete, self._dev)

    def raise_for(self, rc: int) -> None:
        """Raise the exception a negative return code of the shim stands for."""
        _check(rc, self._dev)

    def write(self, q: int, head: int, offset: int, data: Any) -> None:
        if type(data) is not bytes:
            data = ffi.from_buffer(data)
        _check(lib.vhs_req_write(self._dev, q, head, offset, data, len(data)), self._dev)

    def pread(self, q: int, head: int, offset: int, fd: int, file_offset: int, length: int) -> int:
        """``preadv`` ``length`` bytes of ``fd`` into the writable part; returns bytes read."""
        return _check(lib.vhs_req_pread(self._dev, q, head, offset, fd, file_offset, length), self._dev)

    def complete_file(self, q: int, head: int, header: Any, fd: int, file_offset: int, length: int) -> int:
        """``header`` at offset 0, ``length`` bytes of ``fd`` preadv-ed after it, pushed: one call.

        Returns the bytes read from ``fd``.  Only when that equals ``length`` was
        the chain pushed; otherwise (end of file) the request is still in flight
        and must be completed another way.  Errors of ``preadv`` raise
        :class:`ShimOSError` (nothing pushed either).
        """
        if type(header) is not bytes:
            header = ffi.from_buffer(header)
        rc = lib.vhs_req_complete_file(self._dev, q, head, header, len(header), fd, file_offset, length)
        return _check(rc, self._dev)

    def read_in(self, q: int, head: int, offset: int, length: int) -> bytes:
        """Readable bytes ``[offset, offset + length)`` of an in-flight request, copied from guest memory.

        The guest may be changing them (see ``vhs_req_read_in``): validate the
        copy returned, never guest memory.  A range outside ``in_total``, an
        OVERSIZE request or a head not in flight raise :class:`ShimUsageError`.
        """
        if length == 0:
            _check(lib.vhs_req_read_in(self._dev, q, head, offset, ffi.NULL, 0), self._dev)
            return b""
        buf = _new_raw("char[]", length)
        _check(lib.vhs_req_read_in(self._dev, q, head, offset, buf, length), self._dev)
        return ffi.unpack(buf, length)

    def pwrite_in(self, q: int, head: int, offset: int, fd: int, file_offset: int, length: int) -> int:
        """One ``pwritev`` of readable bytes ``[offset, offset + length)`` to ``fd`` at ``file_offset``.

        The data goes from guest memory to the file with no copy.  Returns the
        bytes written (possibly short, as ``os.pwrite``).  A failed system call
        raises :class:`ShimOSError` with its errno, except ``EINVAL``, which
        like a bad range or a head not in flight raises :class:`ShimUsageError`.
        """
        rc = lib.vhs_req_pwrite_in(self._dev, q, head, offset, fd, file_offset, length)
        return rc if rc >= 0 else _check(rc, self._dev)

    def push(self, q: int, head: int, used_len: int) -> None:
        _check(lib.vhs_req_push(self._dev, q, head, used_len), self._dev)

    def notify(self, q: int) -> bool:
        """Signal the call eventfd if the driver wants it (EVENT_IDX aware); once per batch."""
        return _check(lib.vhs_queue_notify(self._dev, q), self._dev) == 1

    def close(self) -> None:
        """Free the device now (idempotent): unmaps guest memory, closes received fds."""
        if not self.closed:
            self.closed = True
            ffi.release(self._dev)


class StatProbe:
    """``fstat(2)`` of an fd into one reusable buffer, as bytes: equal bytes, unchanged inode.

    The whole ``struct stat`` (sizes, ids, link count, all three timestamps
    to the nanosecond, blocks) is compared, so equal bytes mean nothing the
    kernel reports about the inode changed.  A direct C call with no
    ``os.stat_result`` built: about half the cost of ``os.stat`` per call,
    which is most of a passthrough GETATTR.  Not thread-safe (one buffer):
    use one probe per thread.  Raises ``OSError`` with the errno of ``fstat``;
    :class:`NativeShimUnavailable` at construction when the shim is missing.
    """

    __slots__ = ("_buf", "_view", "_fstat")

    def __init__(self) -> None:
        require()
        self._buf = ffi.new("struct stat *")
        self._view = ffi.buffer(self._buf)
        self._fstat = lib.fstat

    def __call__(self, fd: int) -> bytes:
        if self._fstat(fd, self._buf) != 0:
            code = ffi.errno
            raise OSError(code, os.strerror(code))
        return self._view[:]
