"""The virtio-fs transport: a vhost-user-fs back-end on an asyncio (uvloop) loop.

What runs where
---------------
The C shim (:mod:`nydus_vfs._native.binding`) speaks vhost-user, maps guest
memory and walks the virtqueues; it never calls into Python.  This module owns
the event loop side: it watches the vhost-user socket and every running
queue's kick eventfd with ``loop.add_reader`` and calls into the shim:

    socket readable -> Device.dispatch()         (one or more control messages)
    kick readable   -> Device.drain_kick(); Device.pop() a batch;
                       server.handle() each request; push each reply;
                       Device.notify() once per batch (EVENT_IDX aware)

Order of events for one front-end (QEMU 7.2, vhost-user-fs.md §1.2): negotiation,
then per start SET_VRING_* and SET_VRING_KICK (the queue becomes *running* and
its kick fd is watched; anything already on the ring is served at once), then
traffic, then SET_VRING_ENABLE 0 + GET_VRING_BASE per queue.  The shim defers
that GET_VRING_BASE reply while the queue has requests in flight; the socket is
not read meanwhile (QEMU waits for the reply anyway) and the reply goes out as
soon as the last of them is pushed.  A request still running after
``stop_timeout`` seconds is cancelled and answered EINTR so a stuck backend read
cannot wedge a VM pause forever.  A pause keeps the FUSE session; a guest reboot
shows up as a fresh FUSE INIT (the server resets itself).  When the front-end
disconnects, in-flight work is cancelled, the FUSE session is closed
(``server.close()``) and the next front-end is accepted.

Front-ends are served one at a time, so one that connects and never completes
the device-realize handshake (vhost-user-fs.md §1.2 block A, which QEMU sends
at once on connect and which ends with SET_VRING_CALL per queue) would keep
every other front-end waiting in the listen backlog.  ``handshake_timeout``
bounds that: a connection that has not set up any vring (call or kick fd) nor
SET_FEATURES by then is dropped with a log line and the next one accepted.  A
front-end that did complete block A and is waiting for its guest's driver
(block B can come minutes later under TCG) is never timed out.

Queues: 0 is hiprio (FORGET and friends: no reply, used length 0); 1..n are
request queues, all served the same way.  Hiprio never waits behind request
work: it is drained before each request-queue batch.

Replies (``server.handle(request, out_capacity)`` contract, see fuse/server.py):
``None`` -> used length 0; bytes-like -> copied into the writable buffers; a
list ``[header, part, ...]`` -> bytes parts copied, :class:`FileSegment` parts
``preadv``-ed from the cache file straight into guest memory; an awaitable ->
run as a task and replied to when done.  A request whose readable part exceeds
the shim's cap is answered E2BIG without reaching the server.

Requests (the data path of WRITE)
---------------------------------
The shim copies only the first ``max_copy_bytes`` (:data:`MAX_COPY_BYTES`:
16 KiB + the 80 bytes of a WRITE's headers, unless the :class:`ShimConfig`
says otherwise) of a request's readable part; that private copy is what the
server parses, so nothing it validates can change under it.  Nearly every
FUSE request fits in it: not WRITEs and SETXATTR values above 16 KiB, nor a
BATCH_FORGET of a thousand nodes.  For a longer request (``REQ_PARTIAL``):

* a WRITE goes to the server as its 80 header bytes (``fuse_in_header`` +
  ``fuse_write_in``, from the copy) plus a :class:`_GuestPayload` over the
  data, still in guest memory: ``PassthroughFs`` ``pwritev``s it to the file
  from there, as QEMU's virtiofsd does, with no copy at all.  The guest may
  rewrite its buffer meanwhile; that only changes what lands in its own file.
* anything else is completed from guest memory into one private copy
  (``Device.read_in``) and handled like any request.

A payload is valid until its request is pushed, also when the reply comes
from an awaitable much later; from the push on (or once the connection is
gone) it raises ``ValueError`` instead of touching the shim, so it can never
reach memory the request no longer owns.

Why 16 KiB and not less: handing data over as a payload costs about 1.5 µs
of Python per WRITE (the object, its lease, the calls down to ``pwritev``),
more than copying a few KiB costs in C, and the prefix is copied anyway.
Measured per WRITE in the back-end (scripts/bench/write_path.py, figures in
docs/benchmarks.md): a 4 KiB WRITE costs 6.1 µs copied and 7.7 µs as a
payload behind a 4 KiB prefix, a 16 KiB one 8.2 and 9.1 µs; a 64 KiB WRITE
16.1 µs copied and 14.0-15.8 µs as a payload, a 128 KiB one 26.5 and
19.8-20.7 µs.  So WRITEs of up to 16 KiB are copied, as before, and longer
ones go from guest memory (between 16 and about 48 KiB that costs up to 2 µs
more than a copy would).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import os
import socket
import struct
from typing import Any

from .._native import binding
from .._native.binding import (
    EV_DEFERRED,
    EV_LOG,
    EV_QUEUES,
    POP_BROKEN,
    POP_THROTTLED,
    REQ_OVERSIZE,
    Device,
    FrontendDisconnected,
    ReplyTooLargeError,
    ShimConfig,
    ShimUsageError,
    is_plain,
)
from ..errors import ConfigError, TransportError
from ..fuse import abi
from ..fuse.codec import error_reply
from ..utils.unixsock import listen_unix, remove_unix_socket
from ..utils.io import FileSegment

__all__ = ["VirtioFsTransport", "serve_virtiofs", "listen_vhost_user", "ShimConfig"]

log = logging.getLogger("nydus_vfs.transport.virtiofs")

_U32 = struct.Struct("<I").unpack_from
_U64 = struct.Struct("<Q").unpack_from
_HIPRIO = 0
_BYTES = (bytes, bytearray, memoryview)
#: Batches one _drain call handles before it yields to the event loop.
_DRAIN_BATCHES = 16
# A queue whose kick fd is NOFD ("poll instead of waiting for a kick").
_POLL_INTERVAL = 0.001
#: Pending connections the listening socket holds while one front-end is served.
_BACKLOG = 16
_WRITE = int(abi.Opcode.WRITE)
#: Where a WRITE's data begins: fuse_in_header + fuse_write_in.
_WRITE_DATA = abi.fuse_in_header.size + abi.fuse_write_in.size
#: Readable bytes the shim copies at pop unless the ShimConfig says otherwise:
#: a WRITE of up to 16 KiB is copied whole (see "Requests" in the module docstring).
MAX_COPY_BYTES = (16 << 10) + _WRITE_DATA


class _LogBudget:
    """Per-request log lines a guest can trigger: at most ``burst`` per ``window`` seconds.

    A hostile guest can send thousands of bad requests a second; the first few
    are logged, the rest counted and summarised when the window rolls over.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, burst: int = 20, window: float = 10.0) -> None:
        self._loop = loop
        self._burst = burst
        self._window = window
        self._start = loop.time()
        self._used = 0
        self._dropped = 0

    def __call__(self, level: int, msg: str, *args: Any, exc_info: bool = False) -> None:
        now = self._loop.time()
        if now - self._start >= self._window:
            if self._dropped:
                log.warning("%d similar request-level messages were suppressed in the last %.0fs",
                            self._dropped, now - self._start)
            self._start, self._used, self._dropped = now, 0, 0
        if self._used >= self._burst:
            self._dropped += 1
            return
        self._used += 1
        log.log(level, msg, *args, exc_info=exc_info)


def _unique_of(data: bytes) -> int | None:
    """``fuse_in_header.unique`` if the private copy is long enough to hold it."""
    return _U64(data, 8)[0] if len(data) >= 16 else None


class _GuestPayload:
    """Readable bytes ``[start, start + length)`` of an in-flight request, left in guest memory.

    The transport's :class:`~nydus_vfs.utils.io.WritePayload`.  ``lease`` is a
    one-item list holding the device, shared with every slice; the transport
    empties it (``[None]``) when the request is pushed or the connection
    closes, and from then on every method but ``len`` raises ``ValueError``
    instead of touching the shim (see the module docstring).  One list and one
    object per WRITE: this is on the path of every long WRITE.
    """

    __slots__ = ("_lease", "_q", "_head", "_start", "_length")

    def __init__(self, lease: list, q: int, head: int, start: int, length: int) -> None:
        self._lease = lease
        self._q = q
        self._head = head
        self._start = start
        self._length = length

    def __len__(self) -> int:
        return self._length

    def __repr__(self) -> str:
        state = "released" if self._lease[0] is None else f"q={self._q} head={self._head}"
        return f"<guest payload of {self._length} bytes at {self._start} ({state})>"

    def _dev(self) -> Device:
        dev = self._lease[0]
        if dev is None:
            raise ValueError("operation on a WRITE payload whose request has completed")
        return dev

    def __getitem__(self, key: slice) -> _GuestPayload:
        if type(key) is not slice:
            raise TypeError("a WRITE payload only supports slices")
        start, stop, step = key.indices(self._length)
        if step != 1:
            raise ValueError("a WRITE payload only supports contiguous slices")
        return _GuestPayload(self._lease, self._q, self._head, self._start + start, max(0, stop - start))

    def pwrite(self, fd: int, offset: int) -> int:
        dev = self._lease[0]
        if dev is None:
            self._dev()
        try:
            return dev.pwrite_in(self._q, self._head, self._start, fd, offset, self._length)
        except ShimUsageError as exc:
            # The range and the head are ours and valid while the lease is:
            # this is pwritev's own EINVAL.
            raise OSError(errno.EINVAL, str(exc)) from None

    def tobytes(self) -> bytes:
        return self._dev().read_in(self._q, self._head, self._start, self._length)


class _Connection:
    """One front-end connection: the shim device plus the loop registrations.

    Lives from accept to disconnect.  ``done`` resolves (never raises) when the
    connection is over, with the exception that ended it or None for a clean
    hang-up.
    """

    def __init__(self, transport: VirtioFsTransport, sock: socket.socket,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.t = transport
        self.sock = sock
        self.loop = loop
        self.server = transport.server
        self.dev = Device(sock.fileno(), transport.config, batch=transport.batch)
        self.done: asyncio.Future = loop.create_future()
        self.closed = False
        self.sock_watched = False
        self.watched: dict[int, int] = {}      # queue -> kick fd registered with the loop
        self.running: set[int] = set()
        self.polled: set[int] = set()          # running queues with a NOFD kick
        self.poll_handle: asyncio.TimerHandle | None = None
        self.tasks: dict[tuple[int, int], asyncio.Task] = {}
        self.leases: dict[tuple[int, int], list] = {}  # requests with a payload out: [device]
        self.dirty: set[int] = set()           # queues with pushes awaiting a notify
        self.flush_scheduled = False
        self.throttled: set[int] = set()
        self.deferred = False
        self.deferred_timer: asyncio.TimerHandle | None = None
        self.broken_logged: set[int] = set()
        self.note = _LogBudget(loop)
        self.handshake_timer: asyncio.TimerHandle | None = None

    # -- lifetime --------------------------------------------------------------
    def start(self) -> None:
        self._watch_socket(True)
        timeout = self.t.handshake_timeout
        if timeout and timeout > 0:
            self.handshake_timer = self.loop.call_later(timeout, self._handshake_overdue)

    def _handshake_done(self) -> bool:
        """True once the front-end set up a vring fd or SET_FEATURES (block A complete)."""
        dev = self.dev
        if dev.features:
            return True
        for q in range(dev.num_queues):
            info = dev.queue_info(q)
            if info.call_fd >= 0 or info.kick_fd >= 0 or info.running:
                return True
        return False

    def _handshake_overdue(self) -> None:
        self.handshake_timer = None
        if self.closed or self._handshake_done():
            return
        reason = (f"vhost-user front-end did not complete the handshake within "
                  f"{self.t.handshake_timeout:g}s (no vring set up); dropping the connection")
        log.warning("%s", reason)
        self.close(TransportError(reason))

    def close(self, exc: BaseException | None = None) -> None:
        """Tear everything down (idempotent); in-flight tasks are cancelled, never pushed."""
        if self.closed:
            return
        self.closed = True
        self._watch_socket(False)
        if self.handshake_timer is not None:
            self.handshake_timer.cancel()
            self.handshake_timer = None
        for fd in self.watched.values():
            if fd >= 0:
                self.loop.remove_reader(fd)
        self.watched.clear()
        if self.poll_handle is not None:
            self.poll_handle.cancel()
        if self.deferred_timer is not None:
            self.deferred_timer.cancel()
        for task in self.tasks.values():
            task.cancel()
        self.tasks.clear()
        for lease in self.leases.values():
            lease[0] = None
        self.leases.clear()
        self.dev.close()
        if not self.done.done():
            self.done.set_result(exc)

    def _watch_socket(self, on: bool) -> None:
        if on and not self.sock_watched and not self.closed:
            self.loop.add_reader(self.sock.fileno(), self._on_socket)
            self.sock_watched = True
        elif not on and self.sock_watched:
            self.loop.remove_reader(self.sock.fileno())
            self.sock_watched = False

    # -- control plane -----------------------------------------------------------
    def _on_socket(self) -> None:
        if self.closed:
            return
        try:
            ev = self.dev.dispatch()
        except FrontendDisconnected as exc:
            log.info("vhost-user front-end disconnected: %s", exc)
            self.close(None)
            return
        except TransportError as exc:
            log.error("vhost-user front-end broke the protocol, dropping the connection: %s", exc)
            self.close(exc)
            return
        if ev & EV_LOG:
            for line in self.dev.take_log():
                self.note(logging.WARNING, "vhost-user: %s", line)
        if self.handshake_timer is not None and self._handshake_done():
            self.handshake_timer.cancel()
            self.handshake_timer = None
        if ev & EV_QUEUES:
            self._reconcile()
            if self.closed:
                return
        if ev & EV_DEFERRED and not self.deferred:
            self.deferred = True
            self._watch_socket(False)
            self.deferred_timer = self.loop.call_later(self.t.stop_timeout, self._stop_overdue)
            self._try_finish_deferred()

    def _try_finish_deferred(self) -> None:
        if not self.deferred or self.closed:
            return
        try:
            finished = self.dev.finish_deferred()
        except TransportError as exc:
            log.info("vhost-user front-end went away during a queue stop: %s", exc)
            self.close(None)
            return
        if finished:
            self.deferred = False
            if self.deferred_timer is not None:
                self.deferred_timer.cancel()
                self.deferred_timer = None
            self._reconcile()
            self._watch_socket(True)

    def _stop_overdue(self) -> None:
        self.deferred_timer = None
        if not self.deferred or self.closed:
            return
        stuck = [key for key, task in self.tasks.items()
                 if self.dev.queue_info(key[0]).stopping and not task.done()]
        log.error("queue stop waited %.0fs for %d request(s); cancelling them (EINTR)",
                  self.t.stop_timeout, len(stuck))
        for key in stuck:
            self.tasks[key].cancel()

    def _reconcile(self) -> None:
        """Make the loop watch exactly the kick fds of running queues."""
        if self.closed:
            return
        dev = self.dev
        newly_running = []
        for q in range(dev.num_queues):
            info = dev.queue_info(q)
            want = info.kick_fd if info.running else -1
            have = self.watched.get(q, -1)
            if want != have:
                if have >= 0:
                    self.loop.remove_reader(have)
                    self.watched[q] = -1
                if want >= 0:
                    try:
                        self.loop.add_reader(want, self._on_kick, q)
                    except (OSError, ValueError) as exc:
                        log.error("queue %d: kick fd %d cannot be watched (%s); dropping the connection",
                                  q, want, exc)
                        self.close(exc)
                        return
                    self.watched[q] = want
            if info.running and info.kick_fd < 0:
                self.polled.add(q)
            else:
                self.polled.discard(q)
            if info.running and q not in self.running:
                newly_running.append(q)
                self.broken_logged.discard(q)
            if info.running:
                self.running.add(q)
            else:
                self.running.discard(q)
        dev.close_retired()
        for q in newly_running:
            # Entries may already be waiting (a resume at a non-zero base).
            self.loop.call_soon(self._service, q)
        if self.polled and self.poll_handle is None:
            self.poll_handle = self.loop.call_later(_POLL_INTERVAL, self._poll_tick)

    def _poll_tick(self) -> None:
        self.poll_handle = None
        if self.closed or not self.polled:
            return
        for q in list(self.polled):
            self._service(q)
        if self.polled and not self.closed:
            self.poll_handle = self.loop.call_later(_POLL_INTERVAL, self._poll_tick)

    # -- data plane ----------------------------------------------------------------
    def _on_kick(self, q: int) -> None:
        if self.closed:
            return
        self.dev.drain_kick(q)
        self._service(q)

    def _service(self, q: int) -> None:
        if self.closed or q not in self.running:
            return
        if q != _HIPRIO and _HIPRIO in self.running:
            self._drain(_HIPRIO)
        self._drain(q)

    def _drain(self, q: int) -> None:
        """Pop, handle and push batches until the queue is empty; one notify per batch."""
        dev = self.dev
        handle = self._handle
        serve = self.server.handle
        complete = dev.completer()
        request = dev.request
        unpack = binding.ffi.unpack
        batches = 0
        while not self.closed:
            try:
                reqs, n, status = dev.pop_raw(q)
            except TransportError as exc:  # only our own misuse can get here
                log.error("queue %d: pop failed: %s", q, exc)
                return
            for i in range(n):
                r = reqs[i]
                ln = r.in_len
                if not is_plain(r.flags, ln):
                    handle(q, *request(r))
                    continue
                # The common case inlined (a small GETATTR costs a few microseconds
                # in all, so each wrapper frame and tuple here shows): what pop,
                # _handle and _send do for a small request answered at once with bytes.
                head = r.head
                data = unpack(r.data, ln)
                try:
                    reply = serve(data, r.out_cap)
                except Exception:
                    reply = self._server_raised(q, head)
                if type(reply) is bytes:
                    rc = complete(q, head, reply, len(reply))
                    if rc < 0:
                        self._complete_failed(q, head, rc)
                else:
                    self._dispatch(q, head, reply, data)
            if self.closed:
                return
            if n:
                dev.notify(q)
            if status & POP_BROKEN and q not in self.broken_logged:
                self.broken_logged.add(q)
                log.error("virtio-fs queue %d is broken and no longer served until the front-end "
                          "resets it: %s", q, dev.queue_error(q))
                self.loop.call_soon(self._reconcile)  # stop watching its kicks
            if status & POP_THROTTLED:
                self.throttled.add(q)
            # Pop again after any non-empty batch, not only a full one: a busy
            # driver publishes while we answer, and finding those requests now
            # saves a kick's trip through the event loop (virtiofsd, too, pops
            # until the ring is empty).  Synchronous replies just freed what a
            # throttled batch held, and only asynchronous completions retry a
            # throttled queue (_flush).  An empty pop (throttled or not) ends
            # the drain: the shim armed avail_event, so the next publish kicks.
            if n == 0 or status & POP_BROKEN:
                return
            batches += 1
            if batches >= _DRAIN_BATCHES:
                # Let the loop run (API, timers, async completions, other
                # queues) between long bursts; come back right after.
                self.loop.call_soon(self._service, q)
                return
            if q != _HIPRIO and _HIPRIO in self.running:
                self._drain(_HIPRIO)

    def _handle(self, q: int, head: int, data: bytes, out_cap: int, flags: int, in_total: int) -> None:
        payload = None
        if flags:
            if flags & REQ_OVERSIZE:
                self.note(logging.WARNING, "queue %d head %d: request of %d readable bytes exceeds the limit; "
                          "replying E2BIG", q, head, in_total)
                unique = _unique_of(data)
                self._send(q, head, None if unique is None or out_cap < 16 else error_reply(unique, errno.E2BIG),
                           data)
                return
            # REQ_PARTIAL: ``data`` is a prefix of in_total bytes.
            if len(data) >= _WRITE_DATA and _U32(data, 4)[0] == _WRITE:
                lease = self.leases[(q, head)] = [self.dev]
                payload = _GuestPayload(lease, q, head, _WRITE_DATA, in_total - _WRITE_DATA)
                data = data[:_WRITE_DATA]
            else:
                try:
                    data = bytes(data) + self.dev.read_in(q, head, len(data), in_total - len(data))
                except TransportError as exc:  # only our own misuse can get here
                    self.note(logging.ERROR, "queue %d head %d: cannot read the request: %s", q, head, exc)
                    self._send(q, head, None, data)
                    return
        try:
            if payload is None:
                reply = self.server.handle(data, out_cap)
            else:
                reply = self.server.handle(data, out_cap, payload)
        except Exception:
            reply = self._server_raised(q, head)
        self._dispatch(q, head, reply, data)

    def _server_raised(self, q: int, head: int) -> None:
        # The server promises never to raise; if it does, the guest still
        # gets its buffer back instead of a hang.
        self.note(logging.ERROR, "queue %d head %d: FUSE server raised; completing without a reply",
                  q, head, exc_info=True)
        return None

    def _complete_failed(self, q: int, head: int, rc: int) -> None:
        """A bytes reply that ``vhs_req_complete`` refused: log it as :meth:`_send` would."""
        try:
            self.dev.raise_for(rc)
        except TransportError as exc:
            self._complete_error(q, head, exc)

    def _complete_error(self, q: int, head: int, exc: TransportError) -> None:
        if isinstance(exc, ReplyTooLargeError):    # the shim pushed it with length 0
            self.note(logging.ERROR, "queue %d: %s (FUSE server bug)", q, exc)
        else:
            self.note(logging.ERROR, "queue %d head %d: cannot complete the request: %s", q, head, exc)

    def _dispatch(self, q: int, head: int, reply: Any, data: Any) -> None:
        """Send a reply the server gave at once, or start the task that awaits it."""
        if reply is None or type(reply) in _BYTES or isinstance(reply, list):
            self._send(q, head, reply, data)
        else:
            task = self.loop.create_task(self._finish_async(q, head, reply, data))
            self.tasks[(q, head)] = task

    async def _finish_async(self, q: int, head: int, awaitable: Any, data: bytes) -> None:
        try:
            reply = await awaitable
        except asyncio.CancelledError:
            if self.closed:
                raise
            unique = _unique_of(data)
            reply = None if unique is None else error_reply(unique, errno.EINTR)
        except Exception:
            self.note(logging.ERROR, "queue %d head %d: asynchronous FUSE reply failed; replying EIO",
                      q, head, exc_info=True)
            unique = _unique_of(data)
            reply = None if unique is None else error_reply(unique, errno.EIO)
        finally:
            self.tasks.pop((q, head), None)
        if self.closed:
            return
        self._send(q, head, reply, data)
        self.dirty.add(q)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        """One notify per queue for every asynchronous completion of this loop turn."""
        self.flush_scheduled = False
        if self.closed:
            return
        for q in self.dirty:
            self.dev.notify(q)
        self.dirty.clear()
        if self.deferred:
            self._try_finish_deferred()
        if self.throttled:
            again, self.throttled = self.throttled, set()
            for q in again:
                self._service(q)

    def _send(self, q: int, head: int, reply: Any, data: bytes) -> None:
        dev = self.dev
        if self.leases:
            # Before the push: the request's guest memory is the guest's again after it.
            lease = self.leases.pop((q, head), None)
            if lease is not None:
                lease[0] = None
        try:
            if reply is None:
                dev.push(q, head, 0)
            elif type(reply) in _BYTES:
                dev.complete(q, head, reply)
            else:
                self._send_parts(q, head, reply, data)
        except TransportError as exc:
            self._complete_error(q, head, exc)
        except Exception:
            # A malformed reply (server bug): the chain must still go back, or
            # the next GET_VRING_BASE would wait for it forever.
            self.note(logging.ERROR, "queue %d head %d: unusable reply %.80r; completing without one",
                      q, head, reply, exc_info=True)
            try:
                dev.push(q, head, 0)
            except TransportError:
                pass                                  # it was pushed before the failure

    def _send_parts(self, q: int, head: int, parts: list, data: bytes) -> None:
        dev = self.dev
        header = parts[0]
        total = _U32(header, 0)[0]
        off = 0
        try:
            if len(parts) == 2 and type(parts[1]) is FileSegment:
                # The usual READ reply: one call writes, reads and pushes.
                seg = parts[1]
                if len(header) + seg.length != total:
                    raise OSError(errno.EIO, f"reply parts hold {len(header) + seg.length} bytes, "
                                             f"header says {total}")
                got = dev.complete_file(q, head, header, seg.fd, seg.offset, seg.length)
                if got == seg.length:
                    return
                raise OSError(errno.EIO, f"short read: {got} of {seg.length} bytes at offset "
                                         f"{seg.offset} of fd {seg.fd}")
            dev.write(q, head, 0, header)
            off = len(header)
            for part in parts[1:]:
                if type(part) is FileSegment:
                    got = dev.pread(q, head, off, part.fd, part.offset, part.length)
                    if got != part.length:
                        raise OSError(errno.EIO, f"short read: {got} of {part.length} bytes at "
                                                 f"offset {part.offset} of fd {part.fd}")
                    off += got
                else:
                    dev.write(q, head, off, part)
                    off += len(part)
            if off != total:
                raise OSError(errno.EIO, f"reply parts hold {off} bytes, header says {total}")
        except ReplyTooLargeError as exc:
            # write/pread refuse without completing: return the chain empty.
            self.note(logging.ERROR, "queue %d: %s (FUSE server bug); completing without a reply", q, exc)
            dev.push(q, head, 0)
            return
        except OSError as exc:
            # Covers ShimOSError from preadv too: the guest gets EIO, not garbage.
            self.note(logging.ERROR, "queue %d head %d: reply data failed (%s); replying EIO", q, head, exc)
            unique = _unique_of(data)
            if unique is None:
                dev.push(q, head, 0)
            else:
                dev.complete(q, head, error_reply(unique, errno.EIO))
            return
        dev.push(q, head, off)


class VirtioFsTransport:
    """Serves a FUSE server to vhost-user-fs front-ends (QEMU), one at a time.

    ``server`` is a :class:`~nydus_vfs.fuse.server.FuseServer` (or anything with
    the same ``handle(request, out_capacity[, payload])`` and ``close()``; the
    payload argument comes only with a WRITE longer than ``max_copy_bytes``).
    ``config`` tunes what the shim offers and enforces (:class:`ShimConfig`;
    ``max_copy_bytes`` is :data:`MAX_COPY_BYTES` unless it says); ``batch`` is
    how many requests one pop returns; ``stop_timeout`` bounds how long a queue
    stop (GET_VRING_BASE) waits for in-flight requests before cancelling them;
    ``handshake_timeout`` how long a new front-end may take to set up its first
    vring before it is dropped (0 or None: wait forever).

    Raises :class:`~nydus_vfs._native.binding.NativeShimUnavailable` at
    construction when the C shim is not built.
    """

    def __init__(self, server: Any, *, config: ShimConfig | None = None, batch: int = 64,
                 stop_timeout: float = 30.0, handshake_timeout: float | None = 10.0) -> None:
        binding.require()
        if batch < 1:
            raise ConfigError(f"batch={batch}: must be at least 1")
        if config is None or config.max_copy_bytes is None:
            config = dataclasses.replace(config or ShimConfig(), max_copy_bytes=MAX_COPY_BYTES)
        if handshake_timeout is not None and handshake_timeout < 0:
            raise ConfigError(f"handshake_timeout={handshake_timeout}: must not be negative")
        self.handshake_timeout = handshake_timeout
        self.server = server
        self.config = config
        self.batch = batch
        self.stop_timeout = stop_timeout
        #: Front-ends accepted so far, and those fully torn down (FUSE session
        #: closed too); diagnostics and tests.
        self.connections = 0
        self.finished = 0
        #: True while the listening socket is open (front-ends can connect).
        self.listening = False
        self._current: _Connection | None = None

    @property
    def device(self) -> Device | None:
        """The shim device of the connected front-end, if any (diagnostics and tests)."""
        return self._current.dev if self._current is not None and not self._current.closed else None

    async def serve(self, sock: str | os.PathLike | socket.socket, *, stop_event: asyncio.Event,
                    path: str | None = None) -> None:
        """Listen (or use the listening socket given) and serve front-ends until ``stop_event``.

        A stale socket file at the path is replaced; any other file there is an
        error.  The socket file is removed again on return (for a socket passed
        in, the file at ``path``, if given).
        """
        listener, bound = listen_vhost_user(sock)
        path = bound or path
        loop = asyncio.get_running_loop()
        stop_wait = asyncio.ensure_future(stop_event.wait())
        self.listening = True
        try:
            while not stop_event.is_set():
                accept = asyncio.ensure_future(loop.sock_accept(listener))
                await asyncio.wait({accept, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                if not accept.done():
                    accept.cancel()
                    await asyncio.gather(accept, return_exceptions=True)
                    break
                conn, _ = accept.result()
                try:
                    await self._serve_connection(conn, loop, stop_wait)
                finally:
                    conn.close()
        finally:
            self.listening = False
            stop_wait.cancel()
            await asyncio.gather(stop_wait, return_exceptions=True)
            listener.close()
            if path is not None:
                remove_unix_socket(path)

    async def _serve_connection(self, conn: socket.socket, loop: asyncio.AbstractEventLoop,
                                stop_wait: asyncio.Future) -> None:
        conn.setblocking(False)
        self.connections += 1
        c = _Connection(self, conn, loop)
        self._current = c
        log.info("vhost-user front-end connected (connection %d)", self.connections)
        try:
            c.start()
            await asyncio.wait({c.done, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            c.close(None)
            self._current = None
            # The guest's FUSE state dies with the connection (QEMU 7.2 cannot
            # reconnect a vhost-user-fs device); the next one starts afresh.
            try:
                self.server.close()
            except Exception:
                log.exception("FUSE server close() failed")
            self.finished += 1


def listen_vhost_user(sock: str | os.PathLike | socket.socket) -> tuple[socket.socket, str | None]:
    """A non-blocking listening unix socket for front-ends, and the path it was bound to.

    A socket object is used as it is (path None).  A stale socket file at the
    path is replaced; a live one (another daemon serves it) and a bind failure
    are TransportError, any other file there is ConfigError.
    """
    if isinstance(sock, socket.socket):
        sock.setblocking(False)
        return sock, None
    path = os.fspath(sock)
    listener = listen_unix(path, flag="--sock", backlog=_BACKLOG)
    return listener, path


async def serve_virtiofs(sock_path: str | os.PathLike | socket.socket, server: Any, *,
                         stop_event: asyncio.Event, config: ShimConfig | None = None,
                         batch: int = 64, stop_timeout: float = 30.0,
                         handshake_timeout: float | None = 10.0) -> None:
    """``nydusd virtiofs``: serve ``server`` on the vhost-user socket until ``stop_event`` is set.

    Raises :class:`~nydus_vfs._native.binding.NativeShimUnavailable` (a
    TransportError saying how to build the shim) before listening when the C
    shim is missing.
    """
    transport = VirtioFsTransport(server, config=config, batch=batch, stop_timeout=stop_timeout,
                                  handshake_timeout=handshake_timeout)
    await transport.serve(sock_path, stop_event=stop_event)
