"""A VM-less vhost-user front-end: QEMU 7.2 + a Linux 6.1 virtio-fs driver, in Python.

It plays both parts a back-end normally sees from outside a VM: the vhost-user
control plane QEMU 7.2 drives for ``vhost-user-fs-pci`` (same messages, same
order, same reply checks), and the guest driver's split virtqueues in a memfd
that stands in for guest RAM.  Standard library only (``os.memfd_create``,
``mmap``, ``SCM_RIGHTS``, ``os.eventfd``).

Quick use::

    from tests.harness import Frontend, FuseSession, fuse_wire as fw, start_virtiofsd

    with start_virtiofsd(src_dir, sock) as be, Frontend.connect(sock, backend=be) as fe:
        fe.negotiate()                  # block A: GET_FEATURES ... per-queue CALL/ERR
        fe.start_queues()               # block B: SET_FEATURES, mem table, NUM/BASE/ADDR/KICK, ENABLE, CALL
        fs = FuseSession(fe)            # FUSE on queue 1, FORGET on queue 0 (hiprio)
        fs.init()
        entry = fs.lookup(1, "hello")   # EntryOut; a -errno reply raises FuseErrorReply
        reply = fe.queue(1).fuse_request(fw.FuseOpcode.GETATTR, 1, args, out_size=104)  # FuseReply
        bases = fe.stop_queues()        # block C: ENABLE 0, GET_VRING_BASE -> {0: n0, 1: n1}, CALL
        fe.start_queues()               # resume at those bases (``reset=True`` = guest reboot)

Layers, top down (each usable on its own):

* :class:`FuseSession` -- FUSE requests/replies with strict reply checks
  (``out.len``, ``unique``, ``error`` range, used len == out.len, FORGET used len 0).
* :class:`DriverQueue` -- one split virtqueue, driver side: ``add``/``publish``
  (= ``submit``) chains of readable ``bytes`` and writable sizes, direct or
  indirect (Linux's rule by default: indirect whenever INDIRECT_DESC is negotiated
  and the chain has >1 segment); ``wait``/``poll``/``wait_for`` completions,
  matched by head id (out-of-order safe, double completions detected);
  ``mode = "irq"`` waits on the call eventfd like a guest, ``"poll"`` busy-polls
  the used ring; kicks and interrupts follow EVENT_IDX (``avail_event`` /
  ``used_event``) or the NO_NOTIFY / NO_INTERRUPT flags.  Throughput path:
  ``prepare`` chains once, then ``republish(heads)`` / ``reap()`` /
  ``wait_used(timeout)`` (``unprepare`` frees them).
  ``queue.raw`` (:class:`RawRing`) writes arbitrary descriptors, indirect tables,
  avail entries and indices for hostile tests -- always before the kick.
* :class:`Frontend` -- the vhost-user socket: ``negotiate``, ``start_queues``,
  ``stop_queues``, ``set_vring_call`` (swap / NOFD), ``add_mem_region`` ...,
  plus ``send``/``request_u64`` for scripted or hostile message sequences.
  Every message is logged in ``transcript`` (compare with the proxy logs via
  :func:`load_proxy_transcript`).
* :class:`GuestMemory` -- memfd guest RAM mapped in this process, regions laid
  out like QEMU's (gpa 0..0xa0000 at offset 0, gpa 0xc0000.. at offset 0xc0000,
  the same fd twice; ``user_addr`` = this process's mapping + offset; GPA is the
  memfd offset), and a first-fit allocator for rings, tables and buffers.

Memory ordering: Python cannot issue a fence, so :func:`_smp_mb` takes and drops
a lock (a locked read-modify-write, a full barrier on x86) where the driver
needs ``smp_mb`` -- between publishing ``avail->idx`` and reading
``avail_event``/``used->flags``, and between re-arming ``used_event`` and
re-reading ``used->idx``.  Plain stores are ordered on x86 (TSO) and each
ring field is a single aligned 2- or 4-byte store through a memoryview.

Start one back-end per :class:`Frontend`: both reference daemons exit when the
front-end disconnects.  With ``backend=`` (a :class:`~harness.backends.BackendProcess`)
every wait also notices a dead back-end and raises ``BackendExited`` with its stderr.

Not modelled: the packed ring, STATUS and CONFIG protocol features (masked off),
IOMMU, dirty logging, reading the back-end's slave channel.
"""

from __future__ import annotations

import array
import ctypes
import errno
import mmap
import os
import re
import select
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Any, Iterable, NamedTuple, Sequence

from . import fuse_wire as fw
from .errors import (
    BackendClosed,
    BackendProtocolError,
    FuseErrorReply,
    GuestMemoryFull,
    HarnessTimeout,
    HarnessUsageError,
    NegotiationError,
    QueueFull,
)

__all__ = [
    "VhostUserRequest",
    "Feature",
    "ProtocolFeature",
    "VHOST_FS_DEVICE_FEATURES",
    "LINUX_DRIVER_FEATURES",
    "QEMU72_PROTOCOL_FEATURES",
    "VRING_DESC_F_NEXT",
    "VRING_DESC_F_WRITE",
    "VRING_DESC_F_INDIRECT",
    "VRING_AVAIL_F_NO_INTERRUPT",
    "VRING_USED_F_NO_NOTIFY",
    "REPLY_FLAGS",
    "MemRegion",
    "Buf",
    "GuestMemory",
    "Completion",
    "DriverQueue",
    "RawRing",
    "Frontend",
    "TranscriptEntry",
    "load_proxy_transcript",
    "FuseReply",
    "Pending",
    "FuseSession",
    "vring_need_event",
]

DEFAULT_TIMEOUT = 5.0

if sys.byteorder != "little":  # pragma: no cover - ring views use native 'H'/'I'
    raise ImportError("the vhost-user harness assumes a little-endian host")


class VhostUserRequest(IntEnum):
    """Front-end -> back-end request codes (vhost-user.rst)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_SLAVE_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class Feature(IntFlag):
    """Virtio / vhost feature bits (as masks) relevant to vhost-user-fs."""

    NOTIFY_ON_EMPTY = 1 << 24
    LOG_ALL = 1 << 26
    INDIRECT_DESC = 1 << 28
    EVENT_IDX = 1 << 29
    PROTOCOL_FEATURES = 1 << 30
    VERSION_1 = 1 << 32
    IOMMU_PLATFORM = 1 << 33
    RING_PACKED = 1 << 34
    RING_RESET = 1 << 40


class ProtocolFeature(IntFlag):
    """vhost-user protocol feature bits (as masks)."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    NET_MTU = 1 << 4
    SLAVE_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    SLAVE_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16


#: What QEMU 7.2's vhost-user-fs passes through from the back-end's offer (``user_feature_bits``).
VHOST_FS_DEVICE_FEATURES = (Feature.VERSION_1 | Feature.INDIRECT_DESC | Feature.EVENT_IDX
                            | Feature.NOTIFY_ON_EMPTY | Feature.RING_PACKED | Feature.IOMMU_PLATFORM
                            | Feature.RING_RESET)
#: What a Linux 6.1 guest accepts of those, minus what this harness cannot drive (packed, IOMMU).
LINUX_DRIVER_FEATURES = Feature.VERSION_1 | Feature.INDIRECT_DESC | Feature.EVENT_IDX
#: QEMU 7.2 keeps protocol bits 0-16 and strips CONFIG for vhost-user-fs; STATUS is masked
#: here too because the harness does not model GET/SET_STATUS.
QEMU72_PROTOCOL_FEATURES = ProtocolFeature((1 << 17) - 1) & ~ProtocolFeature.CONFIG & ~ProtocolFeature.STATUS

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1

VERSION = 0x1
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
#: The only reply flags QEMU 7.2 accepts (``vhost_user_read_header``).
REPLY_FLAGS = VERSION | FLAG_REPLY
VRING_NOFD = 0x100
_MAX_REPLY_PAYLOAD = 4096

_HDR = struct.Struct("<III")
_U64 = struct.Struct("<Q")
_STATE = struct.Struct("<II")
_ADDR = struct.Struct("<IIQQQQ")
_REGION = struct.Struct("<QQQQ")
_DESC = struct.Struct("<QIHH")

# QEMU's guest RAM has a hole at 0xa0000-0xc0000 (VGA/ROM); the second region maps
# the same memfd again at its own offset.
_QEMU_LOW_END = 0xA0000
_QEMU_HIGH_START = 0xC0000

_FENCE = threading.Lock()


def _smp_mb() -> None:
    """A full memory barrier: a lock round trip is a locked RMW, i.e. ``mfence``-strong on x86."""
    _FENCE.acquire()
    _FENCE.release()


def vring_need_event(event: int, new: int, old: int) -> bool:
    """The kernel's ``vring_need_event``: did ``old -> new`` cross ``event``?"""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


def _new_eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def _drain_eventfd(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


# ------------------------------------------------------------------ guest memory

@dataclass(frozen=True)
class MemRegion:
    """``VhostUserMemoryRegion``: what SET_MEM_TABLE / ADD_MEM_REG carry per region."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    def to_bytes(self) -> bytes:
        return _REGION.pack(self.guest_phys_addr, self.memory_size, self.userspace_addr, self.mmap_offset)


class Buf(NamedTuple):
    """A segment that already lives in guest RAM (no copy): ``gpa`` and ``length``."""

    gpa: int
    length: int


class _Extents:
    """First-fit allocator over a few [start, end) ranges, coalescing on free.

    Allocation sizes are tracked per address so ``free`` needs only the address.
    The free list is small (it fragments only as far as tests interleave
    lifetimes), so a sorted list with linear scans is plenty.
    """

    def __init__(self, ranges: Iterable[tuple[int, int]]) -> None:
        self._free: list[list[int]] = [[s, e] for s, e in sorted(ranges) if e > s]
        self._used: dict[int, int] = {}

    def alloc(self, size: int, align: int) -> int:
        if size <= 0:
            raise HarnessUsageError(f"guest allocation of {size} bytes")
        for i, (start, end) in enumerate(self._free):
            addr = _align(start, align)
            if addr + size <= end:
                pieces = []
                if addr > start:
                    pieces.append([start, addr])
                if addr + size < end:
                    pieces.append([addr + size, end])
                self._free[i:i + 1] = pieces
                self._used[addr] = size
                return addr
        largest = max((e - s for s, e in self._free), default=0)
        raise GuestMemoryFull(f"no free guest extent of {size} bytes (align {align}); largest free "
                              f"extent is {largest} bytes; reap completions or raise mem_size")

    def free(self, addr: int) -> None:
        size = self._used.pop(addr, None)
        if size is None:
            raise HarnessUsageError(f"guest address {addr:#x} was not allocated (double free?)")
        lo, hi = addr, addr + size
        free = self._free
        i = 0
        while i < len(free) and free[i][1] < lo:
            i += 1
        # merge with a predecessor ending exactly at lo and successors starting at hi
        if i < len(free) and free[i][1] == lo:
            free[i][1] = hi
            if i + 1 < len(free) and free[i + 1][0] == hi:
                free[i][1] = free[i + 1][1]
                del free[i + 1]
        elif i < len(free) and free[i][0] == hi:
            free[i][0] = lo
        else:
            free.insert(i, [lo, hi])

    @property
    def allocated(self) -> int:
        return sum(self._used.values())


class GuestMemory:
    """Guest RAM: a memfd mapped into this process, described to the back-end as regions.

    ``layout="qemu"``: two regions over the same fd, gpa 0..0xa0000 at offset 0 and
    gpa 0xc0000..size at offset 0xc0000 (QEMU 7.2's observed table); ``"single"``:
    one region covering everything.  GPA always equals the memfd offset, and
    ``user_addr`` is this process's mapping address plus the offset, exactly what
    QEMU sends.  Addresses below 0x1000 are never handed out.
    """

    def __init__(self, size: int = 64 << 20, layout: str = "qemu") -> None:
        if size < 2 << 20 or size % mmap.PAGESIZE:
            raise HarnessUsageError(f"guest RAM size {size:#x} must be a page multiple of at least 2 MiB")
        if layout not in ("qemu", "single"):
            raise HarnessUsageError(f"unknown guest memory layout {layout!r} (use 'qemu' or 'single')")
        self.size = size
        self.layout = layout
        self.fd = os.memfd_create("nydus-harness-guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self._mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        probe = (ctypes.c_char * 1).from_buffer(self._mm)
        self.base_address = ctypes.addressof(probe)
        del probe
        self.view = memoryview(self._mm)
        self._views: list[memoryview] = []
        if layout == "qemu":
            spans = [(0, _QEMU_LOW_END), (_QEMU_HIGH_START, size)]
        else:
            spans = [(0, size)]
        self.regions = [MemRegion(s, e - s, self.base_address + s, s) for s, e in spans]
        self._alloc = _Extents((max(s, 0x1000), e) for s, e in spans)

    # -- translation and access
    def contains(self, gpa: int, length: int = 1) -> bool:
        return any(r.guest_phys_addr <= gpa and gpa + length <= r.guest_phys_addr + r.memory_size
                   for r in self.regions)

    def uva(self, gpa: int) -> int:
        """The user address QEMU would use for ``gpa`` (ring addresses in SET_VRING_ADDR)."""
        if not self.contains(gpa):
            raise HarnessUsageError(f"gpa {gpa:#x} is not inside any region")
        return self.base_address + gpa

    def _check(self, gpa: int, length: int) -> None:
        if length and not self.contains(gpa, length):
            raise HarnessUsageError(f"guest range {gpa:#x}+{length:#x} is not inside one region")

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self._check(gpa, len(data))
        self.view[gpa:gpa + len(data)] = data

    def read(self, gpa: int, length: int) -> bytes:
        self._check(gpa, length)
        return bytes(self.view[gpa:gpa + length])

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        self._check(gpa, length)
        self.view[gpa:gpa + length] = bytes([byte]) * length

    def cast(self, gpa: int, length: int, fmt: str) -> memoryview:
        """A typed view (``'H'``, ``'I'``...) released automatically at :meth:`close`."""
        self._check(gpa, length)
        mv = self.view[gpa:gpa + length].cast(fmt)
        self._views.append(mv)
        return mv

    def release_view(self, mv: memoryview) -> None:
        try:
            self._views.remove(mv)
        except ValueError:
            pass
        mv.release()

    # -- allocation
    def alloc(self, size: int, align: int = 8) -> int:
        return self._alloc.alloc(size, align)

    def free(self, gpa: int) -> None:
        self._alloc.free(gpa)

    @property
    def allocated(self) -> int:
        return self._alloc.allocated

    def close(self) -> None:
        if self._mm.closed:
            return
        for mv in self._views:
            mv.release()
        self._views.clear()
        self.view.release()
        try:
            self._mm.close()
        except BufferError:
            # a caller still holds a slice of guest RAM; the mapping goes when it does
            pass
        os.close(self.fd)


# ------------------------------------------------------------------ split virtqueue (driver side)

@dataclass
class Completion:
    """One used-ring entry matched to the chain it completes.

    ``data`` is the content of the chain's writable segments, concatenated
    (the whole capacity, not just ``used_len``: Linux trusts ``out.len``, so the
    harness keeps both to check them against each other).
    """

    head: int
    used_len: int
    capacity: int | None
    token: Any = None
    data: bytes = b""


class _Chain:
    __slots__ = ("head", "descs", "bufs", "writable", "capacity", "token", "prepared", "copy_out")

    def __init__(self) -> None:
        self.head = -1
        self.descs: list[int] = []
        self.bufs: list[int] = []
        self.writable: list[Buf] = []
        self.capacity: int | None = 0
        self.token: Any = None
        self.prepared = False
        self.copy_out = True


class DriverQueue:
    """The guest driver's side of one split virtqueue.

    Index 0 is hiprio (FORGET), 1.. are request queues.  Ring memory lives in
    :class:`GuestMemory`, laid out like Linux's ``vring_init``: descriptor table,
    avail right after it, used at the next 64-byte boundary, in one page-aligned
    block.  Descriptors come from a free list (lowest index first, like a fresh
    Linux queue); a chain's descriptors and buffers are freed when its used entry
    is reaped.

    ``strict`` (default True): a used entry naming a head that is not in flight,
    a used ``len`` above the chain's writable capacity, or ``used->idx`` moving by
    more than the queue size raises :class:`BackendProtocolError`; with
    ``strict=False`` they are appended to ``anomalies`` instead.
    """

    def __init__(self, frontend: Frontend, index: int, size: int) -> None:
        self._fe = frontend
        self._mem = frontend.memory
        self.index = index
        self.size = size
        self.mode = "irq"
        self.strict = True
        self.anomalies: list[str] = []
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd = _new_eventfd()
        self.masked_call_fd = _new_eventfd()
        self.kicks = 0
        self.started = False
        self.enabled = False
        self.stopped_base: int | None = None
        self.raw = RawRing(self)
        self._ring_gpa: int | None = None
        self._views: list[memoryview] = []
        self._reset_state(0)

    # -- geometry
    @staticmethod
    def layout(size: int) -> tuple[int, int, int]:
        """(avail offset, used offset, total bytes) of a ring block for queue ``size``."""
        avail = 16 * size
        used = _align(avail + 6 + 2 * size, 64)
        return avail, used, used + 6 + 8 * size

    @property
    def desc_gpa(self) -> int:
        return self._require_ring()

    @property
    def avail_gpa(self) -> int:
        return self._require_ring() + self.layout(self.size)[0]

    @property
    def used_gpa(self) -> int:
        return self._require_ring() + self.layout(self.size)[1]

    @property
    def event_idx(self) -> bool:
        return bool(self._fe.acked_features & Feature.EVENT_IDX)

    @property
    def indirect_negotiated(self) -> bool:
        return bool(self._fe.acked_features & Feature.INDIRECT_DESC)

    @property
    def avail_idx(self) -> int:
        """The published ``avail->idx`` (driver shadow)."""
        return self._avail_idx

    @property
    def last_used_idx(self) -> int:
        return self._last_used

    @property
    def used_idx(self) -> int:
        """``used->idx`` as the back-end last stored it."""
        return self._used16[1]

    @property
    def in_flight(self) -> int:
        return sum(self._busy)

    @property
    def free_descriptors(self) -> int:
        return len(self._free)

    def _require_ring(self) -> int:
        if self._ring_gpa is None:
            raise HarnessUsageError(f"queue {self.index} has no ring yet (call start_queues first)")
        return self._ring_gpa

    # -- ring lifetime (driven by Frontend.start_queues)
    def _reset_state(self, base: int) -> None:
        self._free = list(range(self.size - 1, -1, -1))
        self._busy = bytearray(self.size)
        self._inflight: dict[int, _Chain] = {}
        self._prepared: dict[int, _Chain] = {}
        self._done: dict[int, Completion] = {}
        self._carry: list[tuple[int, int]] = []
        self._avail_idx = base & 0xFFFF
        self._next_avail = base & 0xFFFF
        self._last_used = base & 0xFFFF

    def _release_ring(self) -> None:
        for chain in list(self._inflight.values()) + list(self._prepared.values()):
            self._free_chain_memory(chain)
        for mv in self._views:
            self._mem.release_view(mv)
        self._views = []
        if self._ring_gpa is not None:
            self._mem.free(self._ring_gpa)
            self._ring_gpa = None

    def _setup_ring(self, size: int, base: int) -> None:
        """Fresh, zeroed ring at ``base``: avail->idx = used->idx = avail_event = base."""
        # Sizes a back-end must refuse (not a power of two, > 32768) are still laid
        # out, so hostile tests can send them.
        self._release_ring()
        if size <= 0:
            raise HarnessUsageError(f"queue size {size} cannot be laid out")
        self.size = size
        avail_off, used_off, total = self.layout(size)
        gpa = self._mem.alloc(total, 4096)
        self._mem.fill(gpa, total)
        self._ring_gpa = gpa
        self._avail16 = self._mem.cast(gpa + avail_off, 6 + 2 * size, "H")
        self._used16 = self._mem.cast(gpa + used_off, 4, "H")
        self._used32 = self._mem.cast(gpa + used_off + 4, 8 * size, "I")
        self._avail_event16 = self._mem.cast(gpa + used_off + 4 + 8 * size, 2, "H")
        self._views = [self._avail16, self._used16, self._used32, self._avail_event16]
        self._reset_state(base)
        self._avail16[1] = self._avail_idx
        self._used16[1] = self._last_used
        # as a device that stopped at ``base`` leaves it: "kick me at the next entry";
        # a zero here would make EVENT_IDX suppress every kick until the index wraps
        self._avail_event16[0] = self._avail_idx
        self._apply_mode()

    def _close(self) -> None:
        self._release_ring()
        for fd in (self.kick_fd, self.call_fd, self.err_fd, self.masked_call_fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.kick_fd = self.call_fd = None

    # -- notification policy
    def set_mode(self, mode: str) -> None:
        """``"irq"``: wait on the call eventfd (latency); ``"poll"``: busy-poll the used ring."""
        if mode not in ("irq", "poll"):
            raise HarnessUsageError(f"queue mode must be 'irq' or 'poll', not {mode!r}")
        self.mode = mode
        if self._ring_gpa is not None:
            self._apply_mode()

    def _apply_mode(self) -> None:
        if self.mode == "irq":
            self._arm()
        else:
            self._disarm()

    def _arm(self) -> None:
        """``virtqueue_enable_cb``: ask for an interrupt on the next used entry."""
        if self.event_idx:
            self._avail16[2 + self.size] = self._last_used
        else:
            self._avail16[0] = 0

    def _disarm(self) -> None:
        """``virtqueue_disable_cb``: no interrupts wanted while we poll."""
        if self.event_idx:
            # half the u16 space ahead: no batch can cross it
            self._avail16[2 + self.size] = (self._last_used + 0x8000) & 0xFFFF
        else:
            self._avail16[0] = VRING_AVAIL_F_NO_INTERRUPT

    def kick(self) -> None:
        """Write the kick eventfd (nothing with a NOFD kick: the back-end polls)."""
        self.kicks += 1
        if self.kick_fd is not None:
            os.eventfd_write(self.kick_fd, 1)

    def _notify(self, old: int, new: int) -> None:
        policy = self._fe.kick_policy
        if policy == "never":
            return
        if policy == "spec":
            _smp_mb()
            if self.event_idx:
                if not vring_need_event(self._avail_event16[0], new, old):
                    return
            elif self._used16[0] & VRING_USED_F_NO_NOTIFY:
                return
        self.kick()

    # -- building chains
    def _materialise(self, readable: Sequence[bytes | Buf], writable: Sequence[int | Buf],
                     chain: _Chain) -> list[tuple[int, int, int]]:
        """Guest buffers for each segment: [(gpa, len, flags)], allocating what is not a Buf."""
        segs: list[tuple[int, int, int]] = []
        for item in readable:
            if isinstance(item, Buf):
                segs.append((item.gpa, item.length, 0))
                continue
            data = bytes(item)
            if not data:
                raise HarnessUsageError("empty readable segment (Linux never sends one; use raw mode)")
            gpa = self._mem.alloc(len(data), 8)
            chain.bufs.append(gpa)
            self._mem.write(gpa, data)
            segs.append((gpa, len(data), 0))
        for item in writable:
            if isinstance(item, Buf):
                segs.append((item.gpa, item.length, VRING_DESC_F_WRITE))
                chain.writable.append(item)
                continue
            if item <= 0:
                raise HarnessUsageError("writable segment sizes must be positive (use raw mode)")
            gpa = self._mem.alloc(item, 4096 if item >= 4096 else 8)
            chain.bufs.append(gpa)
            segs.append((gpa, item, VRING_DESC_F_WRITE))
            chain.writable.append(Buf(gpa, item))
        chain.capacity = sum(b.length for b in chain.writable)
        return segs

    def _write_desc(self, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
        _DESC.pack_into(self._mem.view, self._require_ring() + 16 * i, addr, length, flags, nxt)

    def _build(self, readable: Sequence[bytes | Buf], writable: Sequence[int | Buf],
               indirect: bool | None, token: Any) -> _Chain:
        if not readable and not writable:
            raise HarnessUsageError("a chain needs at least one segment")
        self._require_ring()
        chain = _Chain()
        chain.token = token
        try:
            segs = self._materialise(readable, writable, chain)
            use_indirect = indirect if indirect is not None else (self.indirect_negotiated and len(segs) > 1)
            if use_indirect:
                if not self._free:
                    raise QueueFull(f"queue {self.index}: no free descriptor for an indirect head "
                                    f"({self.in_flight} chains in flight)")
                table = self._mem.alloc(16 * len(segs), 16)
                chain.bufs.append(table)
                entries = bytearray(16 * len(segs))
                for k, (gpa, ln, fl) in enumerate(segs):
                    last = k == len(segs) - 1
                    _DESC.pack_into(entries, 16 * k, gpa, ln, fl | (0 if last else VRING_DESC_F_NEXT),
                                    0 if last else k + 1)
                self._mem.write(table, entries)
                d = self._free.pop()
                chain.descs.append(d)
                self._write_desc(d, table, len(entries), VRING_DESC_F_INDIRECT, 0)
            else:
                if len(self._free) < len(segs):
                    raise QueueFull(f"queue {self.index}: chain needs {len(segs)} descriptors, "
                                    f"{len(self._free)} free")
                ds = [self._free.pop() for _ in segs]
                chain.descs.extend(ds)
                for k, (gpa, ln, fl) in enumerate(segs):
                    last = k == len(segs) - 1
                    self._write_desc(ds[k], gpa, ln, fl | (0 if last else VRING_DESC_F_NEXT),
                                     0 if last else ds[k + 1])
        except BaseException:
            self._free_chain_memory(chain)
            raise
        chain.head = chain.descs[0]
        return chain

    def _free_chain_memory(self, chain: _Chain) -> None:
        for gpa in chain.bufs:
            self._mem.free(gpa)
        chain.bufs = []
        self._free.extend(reversed(chain.descs))
        chain.descs = []

    def add(self, readable: Sequence[bytes | Buf], writable: Sequence[int | Buf] = (), *,
            indirect: bool | None = None, token: Any = None) -> int:
        """Write one chain and its avail slot (not yet visible: call :meth:`publish`).

        ``readable`` items are bytes (copied into fresh guest buffers) or
        :class:`Buf`; ``writable`` items are sizes or :class:`Buf`.  ``indirect``
        None = Linux's rule; True/False force it (True even when INDIRECT_DESC was
        not negotiated, for hostile tests).  Returns the head index.
        """
        chain = self._build(readable, writable, indirect, token)
        self._inflight[chain.head] = chain
        self._put_avail(chain.head)
        return chain.head

    def _put_avail(self, head: int) -> None:
        if self._busy[head]:
            raise HarnessUsageError(f"queue {self.index}: head {head} is already in flight")
        self._busy[head] = 1
        self._avail16[2 + (self._next_avail & (self.size - 1))] = head
        self._next_avail = (self._next_avail + 1) & 0xFFFF

    def publish(self) -> None:
        """Store ``avail->idx`` for everything added so far, then kick if the back-end wants it."""
        old, new = self._avail_idx, self._next_avail
        if old == new:
            return
        if self.mode == "irq":
            self._arm()
        else:
            self._disarm()
        self._avail16[1] = new
        self._avail_idx = new
        self._notify(old, new)

    def submit(self, readable: Sequence[bytes | Buf], writable: Sequence[int | Buf] = (), *,
               indirect: bool | None = None, token: Any = None) -> int:
        """:meth:`add` + :meth:`publish`: returns the head."""
        head = self.add(readable, writable, indirect=indirect, token=token)
        self.publish()
        return head

    # -- throughput path
    def prepare(self, readable: Sequence[bytes | Buf], writable: Sequence[int | Buf] = (), *,
                indirect: bool | None = None, token: Any = None) -> int:
        """Build a chain that stays allocated; publish it (again and again) with :meth:`republish`."""
        chain = self._build(readable, writable, indirect, token)
        chain.prepared = True
        chain.copy_out = False
        self._prepared[chain.head] = chain
        return chain.head

    def unprepare(self, head: int) -> None:
        """Free a prepared chain (descriptors and the buffers the queue allocated for it)."""
        if self._busy[head]:
            raise HarnessUsageError(f"queue {self.index}: prepared head {head} is still in flight")
        self._free_chain_memory(self._prepared.pop(head))

    def prepared_writable(self, head: int) -> list[Buf]:
        """Where the prepared chain ``head`` receives its reply."""
        return list(self._prepared[head].writable)

    def republish(self, heads: Sequence[int]) -> None:
        """Make prepared chains available again (one ``avail->idx`` store, one kick decision)."""
        a = self._avail16
        busy = self._busy
        mask = self.size - 1
        idx = self._next_avail
        for h in heads:
            if busy[h]:
                raise HarnessUsageError(f"queue {self.index}: head {h} republished while in flight")
            busy[h] = 1
            a[2 + (idx & mask)] = h
            idx = (idx + 1) & 0xFFFF
        self._next_avail = idx
        self.publish()

    def reap(self) -> list[tuple[int, int]]:
        """Fast path: (head, used len) of every new used entry; prepared chains are kept.

        Non-prepared chains completed here are freed and their :class:`Completion`
        is kept for :meth:`take` / :meth:`poll`.  A strict-mode error leaves the
        ring positioned after the offending entry and keeps what was reaped
        before it for the next call.
        """
        out, self._carry = self._carry, []
        used_idx = self._used16[1]
        last = self._last_used
        n = (used_idx - last) & 0xFFFF
        if not n:
            return out
        if n > self.size:
            self._flag(f"queue {self.index}: used->idx jumped from {last} to {used_idx} "
                       f"(more than the queue size {self.size})", out, used_idx)
            return out
        u32 = self._used32
        busy = self._busy
        mask = self.size - 1
        for k in range(n):
            s = ((last + k) & mask) << 1
            h = u32[s]
            ln = u32[s + 1]
            if h >= self.size or not busy[h]:
                self._flag(f"queue {self.index}: used entry #{(last + k) & 0xFFFF} names head {h}, "
                           f"which is not in flight (double completion or invented id)",
                           out, (last + k + 1) & 0xFFFF)
                continue
            busy[h] = 0
            if h not in self._prepared:
                chain = self._inflight.pop(h, None)
                if chain is not None:
                    self._done[h] = self._complete(chain, ln)
                    if chain.capacity is not None and ln > chain.capacity:
                        self._flag(f"queue {self.index}: head {h} completed with used len {ln}, "
                                   f"more than its writable capacity {chain.capacity}",
                                   out, (last + k + 1) & 0xFFFF)
                    continue
            out.append((h, ln))
        self._last_used = used_idx
        return out

    # -- completions
    def _flag(self, msg: str, reaped: list[tuple[int, int]], resume_at: int) -> None:
        """Report a ring anomaly: raise (strict) after saving state, or record it."""
        if self.strict:
            self._last_used = resume_at
            self._carry = reaped
            raise BackendProtocolError(msg)
        self.anomalies.append(msg)

    def _complete(self, chain: _Chain, used_len: int) -> Completion:
        data = b""
        if chain.copy_out and chain.writable:
            data = b"".join(self._mem.read(b.gpa, b.length) for b in chain.writable)
        if not chain.prepared:
            self._free_chain_memory(chain)
        return Completion(chain.head, used_len, chain.capacity, chain.token, data)

    def poll(self) -> list[Completion]:
        """Every new used entry as a :class:`Completion` (never blocks)."""
        done = []
        for h, ln in self.reap():
            chain = self._prepared[h]
            done.append(Completion(h, ln, chain.capacity, chain.token,
                                   b"".join(self._mem.read(b.gpa, b.length) for b in chain.writable)))
        if self._done:
            done.extend(self._done.values())
            self._done.clear()
        return done

    def wait_used(self, timeout: float) -> bool:
        """Block until ``used->idx`` moves past what the driver has reaped; False on timeout.

        ``"irq"`` mode with a call fd: arm the interrupt (``used_event`` or the
        NO_INTERRUPT flag), fence, re-check, then sleep on the call eventfd --
        what a guest does.  Otherwise (``"poll"`` mode or a NOFD call): spin.
        Does not reap; the back-end's liveness is checked every 50 ms.
        """
        used16 = self._used16
        if used16[1] != self._last_used:
            return True
        now = time.monotonic()
        deadline = now + timeout
        next_check = now + 0.05
        spins = 0
        irq = self.mode == "irq" and self.call_fd is not None
        while True:
            if irq:
                self._arm()
                _smp_mb()
                if used16[1] != self._last_used:
                    return True
                if select.select([self.call_fd], [], [], max(min(deadline - now, 0.05), 0))[0]:
                    _drain_eventfd(self.call_fd)
            else:
                spins += 1
                if spins > 2000:
                    time.sleep(50e-6)
            if used16[1] != self._last_used:
                return True
            now = time.monotonic()
            if now >= deadline:
                return False
            if now >= next_check:
                self._fe.check_backend()
                next_check = now + 0.05

    def wait(self, timeout: float | None = None, min_count: int = 1) -> list[Completion]:
        """Completions, waiting until at least ``min_count`` arrived (irq or poll mode)."""
        timeout = self._fe.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        got = self.poll()
        while len(got) < min_count:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.wait_used(remaining):
                raise HarnessTimeout(self._stall_report(timeout, len(got), min_count))
            got += self.poll()
        return got

    def wait_for(self, head: int, timeout: float | None = None) -> Completion:
        """The completion of ``head``; others that arrive meanwhile are kept for :meth:`take`."""
        if head in self._done:
            return self._done.pop(head)
        timeout = self._fe.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            for comp in self.wait(max(deadline - time.monotonic(), 0.0)):
                self._done[comp.head] = comp
            if head in self._done:
                return self._done.pop(head)

    def take(self, head: int) -> Completion | None:
        """A completion that :meth:`wait_for` or :meth:`reap` set aside, if any."""
        return self._done.pop(head, None)

    def _stall_report(self, timeout: float, got: int, want: int) -> str:
        parts = [f"queue {self.index}: {got}/{want} completions after {timeout:.1f}s",
                 f"in flight {self.in_flight}", f"avail->idx {self._avail_idx}",
                 f"used->idx {self._used16[1]} (driver saw {self._last_used})",
                 f"kicks {self.kicks}", f"mode {self.mode}"]
        if self.event_idx:
            parts.append(f"EVENT_IDX avail_event {self._avail_event16[0]}")
        else:
            parts.append(f"used->flags {self._used16[0]:#x}")
        if self.call_fd is None:
            parts.append("call fd NOFD")
        if not self.enabled:
            parts.append("ring not enabled")
        return "; ".join(parts)

    # -- FUSE convenience
    def fuse_request(self, opcode: int, nodeid: int, args: bytes = b"", out_size: int = 0, *,
                     out_pages: Sequence[int] = (), reply: bool = True, timeout: float | None = None,
                     indirect: bool | None = None) -> FuseReply:
        """Send one FUSE request on this queue and wait for its checked reply."""
        req = fw.FuseRequest(opcode, nodeid, bytes(args), out_size=out_size,
                             out_pages=tuple(out_pages), reply=reply)
        return self._fe.fuse.request(req, queue=self.index, timeout=timeout, indirect=indirect)


class RawRing:
    """Unchecked access to one queue's ring for hostile tests.

    Nothing here validates anything: addresses, lengths, flags, ``next`` values,
    head ids and indices are written as given.  Descriptors written here should
    use indices taken with :meth:`reserve` so normal chains do not reuse them.
    Always finish writing (descriptors, tables, avail entry, ``avail->idx``)
    before :meth:`kick` -- :meth:`submit` does it in that order.
    """

    def __init__(self, queue: DriverQueue) -> None:
        self._q = queue

    @property
    def memory(self) -> GuestMemory:
        return self._q._mem

    def reserve(self, count: int) -> list[int]:
        """Take ``count`` descriptor indices out of the free list for raw use."""
        q = self._q
        if len(q._free) < count:
            raise QueueFull(f"queue {q.index}: {count} descriptors wanted, {len(q._free)} free")
        return [q._free.pop() for _ in range(count)]

    def alloc(self, size: int, align: int = 16) -> int:
        return self._q._mem.alloc(size, align)

    def write(self, gpa: int, data: bytes) -> None:
        self._q._mem.write(gpa, data)

    def read(self, gpa: int, length: int) -> bytes:
        return self._q._mem.read(gpa, length)

    def write_desc(self, i: int, addr: int, length: int, flags: int = 0, next: int = 0) -> None:  # noqa: A002
        if not 0 <= i < self._q.size:
            raise HarnessUsageError(f"descriptor index {i} is outside our own table of {self._q.size}")
        _DESC.pack_into(self._q._mem.view, self._q._require_ring() + 16 * i,
                        addr & (2**64 - 1), length & 0xFFFFFFFF, flags & 0xFFFF, next & 0xFFFF)

    def read_desc(self, i: int) -> tuple[int, int, int, int]:
        return _DESC.unpack_from(self._q._mem.view, self._q._require_ring() + 16 * i)

    def indirect_table(self, entries: Sequence[tuple[int, int, int, int]]) -> Buf:
        """Write a table of (addr, len, flags, next) entries; returns where it is."""
        body = b"".join(_DESC.pack(a & (2**64 - 1), ln & 0xFFFFFFFF, f & 0xFFFF, n & 0xFFFF)
                        for a, ln, f, n in entries)
        gpa = self.alloc(max(len(body), 16), 16)
        self.write(gpa, body)
        return Buf(gpa, len(body))

    def put_avail(self, head: int, slot: int | None = None) -> None:
        """Write ``avail->ring[slot]`` (default: the next slot) without publishing."""
        q = self._q
        if slot is None:
            slot = q._next_avail
            q._next_avail = (q._next_avail + 1) & 0xFFFF
        q._avail16[2 + (slot & (q.size - 1))] = head & 0xFFFF

    def set_avail_idx(self, idx: int) -> None:
        """Store ``avail->idx`` directly (may jump arbitrarily); the shadow follows."""
        q = self._q
        q._avail16[1] = idx & 0xFFFF
        q._avail_idx = q._next_avail = idx & 0xFFFF

    def publish(self) -> None:
        """Store ``avail->idx`` = the slots written with :meth:`put_avail`, no kick."""
        q = self._q
        q._avail16[1] = q._next_avail
        q._avail_idx = q._next_avail

    def set_avail_flags(self, flags: int) -> None:
        self._q._avail16[0] = flags & 0xFFFF

    def set_used_event(self, value: int) -> None:
        q = self._q
        q._avail16[2 + q.size] = value & 0xFFFF

    def avail_event(self) -> int:
        return self._q._avail_event16[0]

    def used_flags(self) -> int:
        return self._q._used16[0]

    def used_idx(self) -> int:
        return self._q._used16[1]

    def used_entries(self, start: int, count: int) -> list[tuple[int, int]]:
        """(id, len) of used slots ``start .. start+count`` (free-running indices)."""
        q = self._q
        mask = q.size - 1
        return [(q._used32[((start + k) & mask) * 2], q._used32[((start + k) & mask) * 2 + 1])
                for k in range(count)]

    def track(self, head: int, capacity: int | None = None, token: Any = None) -> None:
        """Let :meth:`DriverQueue.wait_for` match a raw chain at ``head`` (< queue size)."""
        q = self._q
        chain = _Chain()
        chain.head, chain.capacity, chain.token = head, capacity, token
        q._busy[head] = 1
        q._inflight[head] = chain

    def kick(self) -> None:
        self._q.kick()

    def submit(self, descs: Sequence[tuple[int, int, int, int]], *, indices: Sequence[int] | None = None,
               head: int | None = None, track: bool = True, kick: bool = True) -> int:
        """Write ``descs`` (addr, len, flags, next) at ``indices`` (default: freshly reserved),
        put ``head`` (default the first index) on the avail ring, publish, then kick.

        ``track`` registers the head for :meth:`DriverQueue.wait_for` when it is a
        valid index; the capacity is the sum of WRITE lengths of a direct chain.
        """
        q = self._q
        if indices is None:
            indices = self.reserve(len(descs))
        for i, (addr, ln, fl, nxt) in zip(indices, descs):
            self.write_desc(i, addr, ln, fl, nxt)
        head = indices[0] if head is None else head
        self.put_avail(head)
        if track and 0 <= head < q.size and not q._busy[head]:
            direct = not any(fl & VRING_DESC_F_INDIRECT for _, _, fl, _ in descs)
            cap = sum(ln for _, ln, fl, _ in descs if fl & VRING_DESC_F_WRITE) if direct else None
            self.track(head, cap)
        if q.mode == "irq" and q._ring_gpa is not None:
            q._arm()
        self.publish()
        if kick:
            self.kick()
        return head


# ------------------------------------------------------------------ the vhost-user front-end

@dataclass(frozen=True)
class TranscriptEntry:
    """One message on the vhost-user socket, as the logging proxy records it."""

    direction: str          # "FE->BE" or "BE->FE"
    request: int
    flags: int
    size: int
    fds: int
    detail: str = ""

    @property
    def name(self) -> str:
        try:
            return VhostUserRequest(self.request).name
        except ValueError:
            return f"REQUEST_{self.request}"

    def __str__(self) -> str:
        return f"{self.direction} {self.name:<22} flags={self.flags:#x} size={self.size} fds={self.fds} {self.detail}"


_PROXY_LINE = re.compile(r"^\s*[\d.]+\s+(FE->BE|BE->FE)\s+([A-Z_]+)\s+flags=(0x[0-9a-f]+)\s+size=(\d+)\s+fds=(\d+)")


def load_proxy_transcript(path: str | os.PathLike) -> list[tuple[str, str, int, int, int]]:
    """(direction, request name, flags, size, fds) of every message in a proxy_*.log."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            m = _PROXY_LINE.match(line)
            if m:
                out.append((m.group(1), m.group(2), int(m.group(3), 16), int(m.group(4)), int(m.group(5))))
    return out


class Frontend:
    """The QEMU 7.2 side of one vhost-user-fs connection.

    Call order (QEMU 7.2 + Linux 6.1): :meth:`negotiate` once (device realize),
    then :meth:`start_queues` (driver OK) / :meth:`stop_queues` (pause, reset,
    shutdown) any number of times, then :meth:`close`.

    ``features`` is the driver's acceptance mask (default: what Linux 6.1 takes);
    ``protocol_features`` the mask applied to the back-end's protocol offer
    (default: QEMU 7.2's); e.g. ``features=Feature.VERSION_1`` gives a ring with
    neither EVENT_IDX nor INDIRECT_DESC, and ``protocol_features=0`` a single
    SET_MEM_TABLE without ACK.  ``kick_policy``: ``"spec"`` (EVENT_IDX /
    NO_NOTIFY decide), ``"always"`` or ``"never"`` (hostile tests kick by hand).
    """

    def __init__(self, sock: socket.socket, *, mem_size: int = 64 << 20, layout: str = "qemu",
                 queue_size: int = 1024, num_queues: int = 2,
                 features: int = LINUX_DRIVER_FEATURES,
                 protocol_features: int = QEMU72_PROTOCOL_FEATURES,
                 require_protocol_features: bool = True, kick_policy: str = "spec",
                 timeout: float = DEFAULT_TIMEOUT, backend: Any = None) -> None:
        if features & (Feature.RING_PACKED | Feature.IOMMU_PLATFORM):
            raise HarnessUsageError("the harness drives split rings without an IOMMU only")
        if kick_policy not in ("spec", "always", "never"):
            raise HarnessUsageError(f"kick_policy must be 'spec', 'always' or 'never', not {kick_policy!r}")
        if num_queues < 1:
            raise HarnessUsageError("need at least one queue")
        self._sock = sock
        self._sock.settimeout(timeout)
        self.timeout = timeout
        self.backend = backend
        self.driver_features = int(features)
        self.protocol_mask = int(protocol_features)
        self.require_protocol_features = require_protocol_features
        self.kick_policy = kick_policy
        self.memory = GuestMemory(mem_size, layout)
        self.transcript: list[TranscriptEntry] = []
        self.backend_features: int | None = None
        self.backend_protocol_features: int | None = None
        self.protocol_features = 0
        self.acked_features = 0
        self.backend_queue_num: int | None = None
        self.max_mem_slots: int | None = None
        self.negotiated = False
        self.mem_table_sent = False
        self.slave_socket: socket.socket | None = None
        self.queues = [DriverQueue(self, i, queue_size) for i in range(num_queues)]
        self._unique = 0
        self._fuse: FuseSession | None = None
        self._closed = False

    # -- connection
    @classmethod
    def connect(cls, sock_path: str | os.PathLike, *, timeout: float = DEFAULT_TIMEOUT,
                connect_timeout: float = 10.0, **kwargs: Any) -> Frontend:
        """Connect to a listening back-end, retrying while the socket is not there yet."""
        deadline = time.monotonic() + connect_timeout
        backend = kwargs.get("backend")
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(os.fspath(sock_path))
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                if backend is not None:
                    backend.check_alive()
                if time.monotonic() >= deadline:
                    raise HarnessTimeout(f"no vhost-user listener at {sock_path} after "
                                         f"{connect_timeout:.1f}s ({exc})") from exc
                time.sleep(0.01)
            except BaseException:
                sock.close()
                raise
        try:
            return cls(sock, timeout=timeout, **kwargs)
        except BaseException:
            sock.close()
            raise

    def __enter__(self) -> Frontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket (the back-end sees EOF), all eventfds and guest RAM."""
        if self._closed:
            return
        self._closed = True
        try:
            self._sock.close()
        finally:
            if self.slave_socket is not None:
                self.slave_socket.close()
            for q in self.queues:
                q._close()
            self.memory.close()

    def check_backend(self) -> None:
        """Raise :class:`BackendExited` if a launched back-end process has died."""
        if self.backend is not None:
            self.backend.check_alive()

    def queue(self, index: int) -> DriverQueue:
        if not 0 <= index < len(self.queues):
            raise HarnessUsageError(f"queue {index} does not exist (have {len(self.queues)})")
        return self.queues[index]

    @property
    def fuse(self) -> FuseSession:
        """A strict :class:`FuseSession` on queue 1 (hiprio 0), created on first use."""
        if self._fuse is None:
            self._fuse = FuseSession(self)
        return self._fuse

    def next_unique(self) -> int:
        """FUSE ``unique`` ids as Linux hands them out: 2, 4, 6, ..."""
        self._unique += 2
        return self._unique

    # -- raw messages
    def _closed_error(self, what: str) -> Exception:
        if self.backend is not None:
            self.backend.check_alive(grace=0.2)
        return BackendClosed(f"the back-end closed the vhost-user connection while {what}")

    def send(self, request: int, payload: bytes = b"", fds: Sequence[int] = (), *,
             need_reply: bool = False, flags: int | None = None) -> int | None:
        """Send one message; with ``need_reply`` wait for and return the u64 ACK value.

        ``flags`` overrides the header flags entirely (hostile tests).
        """
        if flags is None:
            flags = VERSION | (FLAG_NEED_REPLY if need_reply else 0)
        hdr = _HDR.pack(request, flags, len(payload))
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        data = hdr + bytes(payload)
        try:
            sent = self._sock.sendmsg([data], anc)
            if sent < len(data):
                self._sock.sendall(data[sent:])
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise self._closed_error(f"sending {_name(request)}") from exc
        except socket.timeout as exc:
            raise HarnessTimeout(f"sending {_name(request)} blocked for {self.timeout:.1f}s") from exc
        self.transcript.append(TranscriptEntry("FE->BE", request, flags, len(payload), len(fds),
                                               _detail(request, payload)))
        if need_reply:
            return _U64.unpack(self.recv_reply(request, 8))[0]
        return None

    def _recv_exact(self, n: int, what: str) -> tuple[bytes, list[int]]:
        buf = bytearray()
        fds: list[int] = []
        while len(buf) < n:
            try:
                data, anc, _, _ = self._sock.recvmsg(n - len(buf), socket.CMSG_SPACE(8 * 4))
            except socket.timeout as exc:
                self.check_backend()
                raise HarnessTimeout(f"no reply to {what} within {self.timeout:.1f}s") from exc
            except ConnectionResetError as exc:
                raise self._closed_error(f"waiting for the reply to {what}") from exc
            for level, typ, cdata in anc:
                if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", cdata[:len(cdata) - len(cdata) % 4]))
            if not data:
                for fd in fds:
                    os.close(fd)
                raise self._closed_error(f"waiting for the reply to {what}")
            buf += data
        return bytes(buf), fds

    def recv_reply(self, request: int, size: int) -> bytes:
        """Read one reply and check it like QEMU 7.2: same request, flags exactly 0x5, exact size."""
        what = _name(request)
        hdr, fds = self._recv_exact(_HDR.size, what)
        req, flags, rsize = _HDR.unpack(hdr)
        if fds:
            for fd in fds:
                os.close(fd)
            raise BackendProtocolError(f"reply to {what} carried {len(fds)} file descriptor(s)")
        if req != request:
            raise BackendProtocolError(f"reply names request {req} ({_name(req)}) while {what} was outstanding")
        if flags != REPLY_FLAGS:
            raise BackendProtocolError(f"reply to {what} has flags {flags:#x}; QEMU 7.2 accepts exactly "
                                       f"{REPLY_FLAGS:#x} (version 1 + REPLY, never NEED_REPLY)")
        if rsize != size:
            raise BackendProtocolError(f"reply to {what} has size {rsize}, QEMU 7.2 requires exactly {size}")
        payload, fds = self._recv_exact(size, what) if size else (b"", [])
        if fds:
            for fd in fds:
                os.close(fd)
            raise BackendProtocolError(f"reply payload of {what} carried file descriptors")
        self.transcript.append(TranscriptEntry("BE->FE", req, flags, rsize, 0, _detail(req, payload, True)))
        return payload

    def request_u64(self, request: int, payload: bytes = b"") -> int:
        """Send a GET-style request and return its u64 reply."""
        self.send(request, payload)
        return _U64.unpack(self.recv_reply(request, 8))[0]

    def assert_quiet(self) -> None:
        """Raise if the back-end sent bytes nobody asked for (e.g. an ACK without NEED_REPLY)."""
        # select first: with a socket timeout set, Python turns EAGAIN into a wait
        if not select.select([self._sock], [], [], 0)[0]:
            return
        try:
            extra = self._sock.recv(64, socket.MSG_PEEK)
        except ConnectionResetError as exc:
            raise self._closed_error("idle") from exc
        if extra:
            req = _HDR.unpack(extra[:12])[0] if len(extra) >= 12 else None
            raise BackendProtocolError(f"the back-end sent {len(extra)}+ unsolicited bytes "
                                       f"(request field {req}); a reply without NEED_REPLY?")

    def _acked(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> None:
        """QEMU's pattern: NEED_REPLY when REPLY_ACK is negotiated, and a non-zero ACK fails."""
        want_ack = bool(self.protocol_features & ProtocolFeature.REPLY_ACK)
        value = self.send(request, payload, fds, need_reply=want_ack)
        if value:
            raise BackendProtocolError(f"the back-end NACKed {_name(request)} with {value:#x}")

    # -- typed messages
    def set_vring_call(self, index: int, fd: int | None) -> None:
        """SET_VRING_CALL with ``fd``, or with the NOFD bit when ``fd`` is None."""
        if fd is None:
            self.send(VhostUserRequest.SET_VRING_CALL, _U64.pack(index | VRING_NOFD))
        else:
            self.send(VhostUserRequest.SET_VRING_CALL, _U64.pack(index), [fd])

    def swap_call_fd(self, index: int, *, nofd: bool = False) -> int | None:
        """Give queue ``index`` a brand-new call eventfd (or NOFD) and make the queue wait on it."""
        q = self.queue(index)
        new = None if nofd else _new_eventfd()
        self.set_vring_call(index, new)
        old, q.call_fd = q.call_fd, new
        if old is not None:
            os.close(old)
        return new

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        if fd is None:
            self.send(VhostUserRequest.SET_VRING_KICK, _U64.pack(index | VRING_NOFD))
        else:
            self.send(VhostUserRequest.SET_VRING_KICK, _U64.pack(index), [fd])

    def set_vring_err(self, index: int, fd: int) -> None:
        self.send(VhostUserRequest.SET_VRING_ERR, _U64.pack(index), [fd])

    def set_vring_num(self, index: int, num: int) -> None:
        self.send(VhostUserRequest.SET_VRING_NUM, _STATE.pack(index, num))

    def set_vring_base(self, index: int, base: int) -> None:
        self.send(VhostUserRequest.SET_VRING_BASE, _STATE.pack(index, base))

    def set_vring_addr(self, index: int, desc_uva: int, used_uva: int, avail_uva: int,
                       log_gpa: int = 0, flags: int = 0) -> None:
        self.send(VhostUserRequest.SET_VRING_ADDR, _ADDR.pack(index, flags, desc_uva, used_uva, avail_uva, log_gpa))

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self.send(VhostUserRequest.SET_VRING_ENABLE, _STATE.pack(index, 1 if enable else 0))

    def get_vring_base(self, index: int) -> int:
        """GET_VRING_BASE: the back-end stops the ring and returns its next avail index."""
        self.send(VhostUserRequest.GET_VRING_BASE, _STATE.pack(index, 0))
        rindex, num = _STATE.unpack(self.recv_reply(VhostUserRequest.GET_VRING_BASE, 8))
        if rindex != index:
            raise BackendProtocolError(f"GET_VRING_BASE for queue {index} answered for queue {rindex}")
        return num

    def set_mem_table(self, regions: Sequence[MemRegion] | None = None, fds: Sequence[int] | None = None) -> None:
        """One SET_MEM_TABLE with every region (ACKed if REPLY_ACK)."""
        regions = list(self.memory.regions if regions is None else regions)
        fds = [self.memory.fd] * len(regions) if fds is None else list(fds)
        payload = struct.pack("<II", len(regions), 0) + b"".join(r.to_bytes() for r in regions)
        self._acked(VhostUserRequest.SET_MEM_TABLE, payload, fds)

    def add_mem_region(self, region: MemRegion, fd: int | None = None) -> None:
        """ADD_MEM_REG (CONFIGURE_MEM_SLOTS): one region, one fd, ACKed if REPLY_ACK."""
        self._acked(VhostUserRequest.ADD_MEM_REG, _U64.pack(0) + region.to_bytes(),
                    [self.memory.fd if fd is None else fd])

    def rem_mem_region(self, region: MemRegion) -> None:
        """REM_MEM_REG: matched by {gpa, size, uva}; no fd, as the spec says."""
        self._acked(VhostUserRequest.REM_MEM_REG, _U64.pack(0) + region.to_bytes())

    # -- QEMU 7.2 sequences
    def negotiate(self) -> None:
        """Device realize (block A of vhost-user-fs.md §1.2), in QEMU 7.2's order.

        Raises :class:`NegotiationError` after sending what QEMU sends when the
        offer is one QEMU refuses (no PROTOCOL_FEATURES, no VERSION_1, too few
        memory slots).
        """
        if self.negotiated:
            raise HarnessUsageError("negotiate() runs once per connection")
        R = VhostUserRequest
        self.backend_features = self.request_u64(R.GET_FEATURES)
        if self.backend_features & Feature.PROTOCOL_FEATURES:
            self.backend_protocol_features = self.request_u64(R.GET_PROTOCOL_FEATURES)
            self.protocol_features = self.backend_protocol_features & self.protocol_mask
            self.send(R.SET_PROTOCOL_FEATURES, _U64.pack(self.protocol_features))
            if self.protocol_features & ProtocolFeature.MQ:
                self.backend_queue_num = self.request_u64(R.GET_QUEUE_NUM)
            if self.protocol_features & ProtocolFeature.CONFIGURE_MEM_SLOTS:
                self.max_mem_slots = self.request_u64(R.GET_MAX_MEM_SLOTS)
            if self.protocol_features & ProtocolFeature.SLAVE_REQ:
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    self._acked(R.SET_SLAVE_REQ_FD, b"", [theirs.fileno()])
                finally:
                    theirs.close()
                self.slave_socket = ours
        self.send(R.SET_OWNER)
        features = self.request_u64(R.GET_FEATURES)
        offered = features & VHOST_FS_DEVICE_FEATURES
        self.acked_features = offered & self.driver_features
        if features & Feature.PROTOCOL_FEATURES:
            self.acked_features |= Feature.PROTOCOL_FEATURES
        for q in self.queues:
            self.send(R.SET_VRING_CALL, _U64.pack(q.index), [q.masked_call_fd])
            self.send(R.SET_VRING_ERR, _U64.pack(q.index), [q.err_fd])
        self.negotiated = True
        if not features & Feature.PROTOCOL_FEATURES and self.require_protocol_features:
            raise NegotiationError("QEMU 7.2 refuses this back-end: no VHOST_USER_F_PROTOCOL_FEATURES (bit 30), "
                                   "so 'vhost backend memory slots limit is less than current number of "
                                   "present memory slots'")
        if not features & Feature.VERSION_1:
            raise NegotiationError(f"back-end features {features:#x} lack VIRTIO_F_VERSION_1; "
                                   "vhost-user-fs-pci is a modern-only device")
        limit = self.max_mem_slots if self.max_mem_slots is not None else 8
        if limit < len(self.memory.regions):
            raise NegotiationError(f"the back-end allows {limit} memory slots, guest RAM has "
                                   f"{len(self.memory.regions)} regions")

    def start_queues(self, *, bases: dict[int, int] | None = None, reset: bool = False,
                     sizes: dict[int, int] | None = None, kick_nofd: bool = False,
                     call_nofd: bool = False) -> None:
        """Driver OK / resume (block B of vhost-user-fs.md §1.2).

        First start: fresh rings at base 0 (or ``bases``).  After
        :meth:`stop_queues`: the same rings resume at the base each
        GET_VRING_BASE returned (a VM pause), unless ``reset`` (a guest reboot:
        zeroed rings, in-flight chains dropped, base 0).  ``bases`` overrides the
        base per queue; a fresh ring then starts with ``avail->idx = used->idx =
        base``.  ``sizes`` (fresh rings only) overrides the queue size.
        """
        if not self.negotiated:
            raise HarnessUsageError("start_queues() needs negotiate() first")
        R = VhostUserRequest
        bases = dict(bases or {})
        sizes = dict(sizes or {})
        for q in self.queues:
            self.send(R.SET_VRING_CALL, _U64.pack(q.index), [q.masked_call_fd])
        self.send(R.SET_FEATURES, _U64.pack(self.acked_features))
        if not self.mem_table_sent:
            if self.protocol_features & ProtocolFeature.CONFIGURE_MEM_SLOTS:
                for region in self.memory.regions:
                    self.add_mem_region(region)
            else:
                self.set_mem_table()
            self.mem_table_sent = True
        for q in self.queues:
            fresh = q._ring_gpa is None or reset or q.index in sizes
            if fresh:
                q._setup_ring(sizes.get(q.index, q.size), bases.get(q.index, 0))
                base = q._avail_idx
            elif q.index in bases:
                base = bases[q.index]
            elif q.stopped_base is not None:
                base = q.stopped_base
            else:
                base = q._avail_idx
            if q.kick_fd is None:
                q.kick_fd = _new_eventfd()
            q._apply_mode()
            self.set_vring_num(q.index, q.size)
            self.set_vring_base(q.index, base)
            self.set_vring_addr(q.index, self.memory.uva(q.desc_gpa), self.memory.uva(q.used_gpa),
                                self.memory.uva(q.avail_gpa), q.used_gpa)
            self.set_vring_kick(q.index, None if kick_nofd else q.kick_fd)
            if kick_nofd:
                os.close(q.kick_fd)
                q.kick_fd = None
            q.started = True
            q.stopped_base = None
        if self.acked_features & Feature.PROTOCOL_FEATURES:
            for q in self.queues:
                self.set_vring_enable(q.index, True)
                q.enabled = True
        else:
            for q in self.queues:
                q.enabled = True
        for q in self.queues:
            if call_nofd:
                if q.call_fd is not None:
                    os.close(q.call_fd)
                q.call_fd = None
                self.set_vring_call(q.index, None)
            else:
                if q.call_fd is None:
                    q.call_fd = _new_eventfd()
                self.set_vring_call(q.index, q.call_fd)
        self.assert_quiet()

    def stop_queues(self) -> dict[int, int]:
        """Pause / reset / shutdown (block C): ENABLE 0, GET_VRING_BASE, masked CALL.

        Returns {queue index: base}.  A well-behaved back-end has completed every
        in-flight chain before answering GET_VRING_BASE; :meth:`DriverQueue.poll`
        picks those completions up.
        """
        R = VhostUserRequest
        if self.acked_features & Feature.PROTOCOL_FEATURES:
            for q in self.queues:
                self.set_vring_enable(q.index, False)
                q.enabled = False
        bases = {}
        for q in self.queues:
            bases[q.index] = q.stopped_base = self.get_vring_base(q.index)
            q.started = False
            q.enabled = False
        for q in self.queues:
            self.send(R.SET_VRING_CALL, _U64.pack(q.index), [q.masked_call_fd])
        self.assert_quiet()
        return bases


def _name(request: int) -> str:
    try:
        return VhostUserRequest(request).name
    except ValueError:
        return f"request {request}"


def _detail(request: int, payload: bytes, reply: bool = False) -> str:
    """A proxy-log style rendering of a payload (best effort, never raises)."""
    R = VhostUserRequest
    try:
        if request in (R.SET_VRING_NUM, R.SET_VRING_BASE, R.GET_VRING_BASE, R.SET_VRING_ENABLE) \
                and len(payload) == 8:
            i, n = _STATE.unpack(payload)
            return f"index={i} num={n}"
        if request in (R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR) and len(payload) == 8:
            v = _U64.unpack(payload)[0]
            return f"index={v & 0xFF}" + (" NOFD" if v & VRING_NOFD else "")
        if request == R.SET_VRING_ADDR and len(payload) == 40:
            i, f, d, u, a, lg = _ADDR.unpack(payload)
            return f"index={i} flags={f:#x} desc={d:#x} used={u:#x} avail={a:#x} log={lg:#x}"
        if request in (R.ADD_MEM_REG, R.REM_MEM_REG) and len(payload) == 40:
            g, s, u, o = _REGION.unpack_from(payload, 8)
            return f"{{gpa={g:#x} size={s:#x} uva={u:#x} off={o:#x}}}"
        if request == R.SET_MEM_TABLE and len(payload) >= 8:
            n = struct.unpack_from("<I", payload)[0]
            regs = [_REGION.unpack_from(payload, 8 + 32 * k) for k in range(min(n, (len(payload) - 8) // 32))]
            return f"nregions={n} " + " ".join(f"{{gpa={g:#x} size={s:#x} uva={u:#x} off={o:#x}}}"
                                               for g, s, u, o in regs)
        if len(payload) == 8:
            return f"u64={_U64.unpack(payload)[0]:#x}"
    except struct.error:
        pass
    return f"raw={payload[:48].hex()}"


# ------------------------------------------------------------------ FUSE over the queues

@dataclass
class FuseReply:
    """A completed FUSE request: the decoded out header, payload and ring facts."""

    request: fw.FuseRequest
    unique: int
    header: fw.OutHeader | None
    payload: bytes
    used_len: int
    capacity: int

    @property
    def error(self) -> int:
        """``-errno`` from the out header (0 on success)."""
        return self.header.error if self.header else 0

    @property
    def errno(self) -> int:
        return -self.error

    @property
    def ok(self) -> bool:
        return self.header is not None and self.header.error == 0


class Pending(NamedTuple):
    queue: int
    head: int
    unique: int
    request: fw.FuseRequest


# fuse_open_out.open_flags the kernel assumes for an open it skipped.
_FOPEN_KEEP_CACHE = 1 << 1
_FOPEN_CACHE_DIR = 1 << 3


class FuseSession:
    """FUSE over the harness queues, checking every reply as strictly as the spec allows.

    Requests go to ``queue`` (1), FORGET/BATCH_FORGET to ``hiprio`` (0).  With
    ``strict`` (default) a reply raises :class:`BackendProtocolError` unless:
    ``16 <= out.len <= capacity``, ``out.unique`` echoes the request,
    ``-512 < out.error <= 0``, an error reply is header-only, and the used-ring
    len equals ``out.len``; a no-reply request (FORGET) must complete with used
    len 0.  The typed helpers (:meth:`lookup`, :meth:`getattr`, ...) return
    decoded structures and raise :class:`FuseErrorReply` on ``-errno``.
    """

    def __init__(self, frontend: Frontend, *, queue: int = 1, hiprio: int = 0, strict: bool = True,
                 timeout: float | None = None, uid: int = 0, gid: int = 0, pid: int = 1) -> None:
        self.fe = frontend
        self.queue = queue
        self.hiprio = hiprio
        self.strict = strict
        self.timeout = timeout
        self.uid, self.gid, self.pid = uid, gid, pid
        self.init_out: fw.InitOut | None = None
        # Like Linux: after ENOSYS for OPEN/OPENDIR/FLUSH (we offer NO_OPEN(DIR)_SUPPORT
        # in INIT) the opcode is never sent again; opens then "succeed" with fh 0.
        self.no_open = False
        self.no_opendir = False
        self.no_flush = False

    def submit(self, req: fw.FuseRequest, *, queue: int | None = None, indirect: bool | None = None,
               unique: int | None = None) -> Pending:
        """Put the request on its queue (FORGETs on hiprio by default) without waiting."""
        if queue is None:
            queue = self.hiprio if req.opcode in (fw.FuseOpcode.FORGET, fw.FuseOpcode.BATCH_FORGET) else self.queue
        unique = self.fe.next_unique() if unique is None else unique
        q = self.fe.queue(queue)
        segs = req.readable_segments(unique, uid=self.uid, gid=self.gid, pid=self.pid)
        head = q.submit(segs, req.writable_sizes(), indirect=indirect, token=unique)
        return Pending(queue, head, unique, req)

    def result(self, pending: Pending, timeout: float | None = None) -> FuseReply:
        """Wait for ``pending`` and check its reply."""
        timeout = self.timeout if timeout is None else timeout
        comp = self.fe.queue(pending.queue).wait_for(pending.head, timeout)
        return self._check(pending, comp)

    def request(self, req: fw.FuseRequest, *, queue: int | None = None, timeout: float | None = None,
                indirect: bool | None = None) -> FuseReply:
        return self.result(self.submit(req, queue=queue, indirect=indirect), timeout)

    def _fail(self, pending: Pending, msg: str) -> None:
        if self.strict:
            op = _opname(pending.request.opcode)
            raise BackendProtocolError(f"{op} unique={pending.unique}: {msg}")

    def _check(self, pending: Pending, comp: Completion) -> FuseReply:
        req = pending.request
        cap = req.capacity
        if not req.reply:
            if comp.used_len != 0:
                self._fail(pending, f"no-reply request completed with used len {comp.used_len} (must be 0)")
            return FuseReply(req, pending.unique, None, b"", comp.used_len, 0)
        if len(comp.data) < fw.OUT_HEADER_SIZE or comp.used_len == 0:
            self._fail(pending, f"chain completed with used len {comp.used_len} and no reply header")
            return FuseReply(req, pending.unique, None, b"", comp.used_len, cap)
        hdr = fw.decode_out_header(comp.data)
        if not fw.OUT_HEADER_SIZE <= hdr.len <= cap:
            self._fail(pending, f"out.len {hdr.len} outside 16..{cap} (the writable capacity)")
        if hdr.unique != pending.unique:
            self._fail(pending, f"out.unique {hdr.unique} does not echo the request's {pending.unique}")
        if not -512 < hdr.error <= 0:
            self._fail(pending, f"out.error {hdr.error} is not a negative errno in (-512, 0]")
        if hdr.error and hdr.len != fw.OUT_HEADER_SIZE:
            self._fail(pending, f"error reply {hdr.error} carries {hdr.len - 16} payload bytes (must be header-only)")
        if comp.used_len != hdr.len:
            self._fail(pending, f"used-ring len {comp.used_len} differs from out.len {hdr.len}")
        end = min(max(hdr.len, fw.OUT_HEADER_SIZE), len(comp.data))
        return FuseReply(req, pending.unique, hdr, comp.data[fw.OUT_HEADER_SIZE:end], comp.used_len, cap)

    def call(self, req: fw.FuseRequest, **kw: Any) -> bytes:
        """Send, wait, raise :class:`FuseErrorReply` on -errno, return the payload."""
        reply = self.request(req, **kw)
        if reply.header is not None and reply.header.error:
            raise FuseErrorReply(-reply.header.error, req.opcode, reply.unique)
        return reply.payload

    # -- typed helpers (Linux 6.1 shapes)
    def init(self, **kw: Any) -> fw.InitOut:
        self.init_out = fw.decode_init_out(self.call(fw.init(**kw)))
        return self.init_out

    def lookup(self, parent: int, name: bytes | str) -> fw.EntryOut:
        return fw.decode_entry_out(self.call(fw.lookup(parent, name)))

    def getattr(self, nodeid: int, fh: int | None = None) -> fw.AttrOut:
        return fw.decode_attr_out(self.call(fw.getattr(nodeid, fh)))

    def open(self, nodeid: int, flags: int = fw.O_RDONLY_LARGEFILE) -> fw.OpenOut:
        if not self.no_open:
            try:
                return fw.decode_open_out(self.call(fw.open_(nodeid, flags)))
            except FuseErrorReply as exc:
                if exc.errno != errno.ENOSYS:
                    raise
                self.no_open = True
        return fw.OpenOut(0, _FOPEN_KEEP_CACHE)

    def opendir(self, nodeid: int) -> fw.OpenOut:
        if not self.no_opendir:
            try:
                return fw.decode_open_out(self.call(fw.opendir(nodeid)))
            except FuseErrorReply as exc:
                if exc.errno != errno.ENOSYS:
                    raise
                self.no_opendir = True
        return fw.OpenOut(0, _FOPEN_KEEP_CACHE | _FOPEN_CACHE_DIR)

    def read(self, nodeid: int, fh: int, offset: int, size: int) -> bytes:
        return self.call(fw.read(nodeid, fh, offset, size))

    def readdirplus(self, nodeid: int, fh: int, offset: int = 0, size: int = fw.PAGE_SIZE) -> list[fw.DirentPlus]:
        return fw.decode_direntplus(self.call(fw.readdirplus(nodeid, fh, offset, size)))

    def readdir(self, nodeid: int, fh: int, offset: int = 0, size: int = fw.PAGE_SIZE) -> list[fw.Dirent]:
        return fw.decode_dirents(self.call(fw.readdir(nodeid, fh, offset, size)))

    def listdir(self, nodeid: int, *, plus: bool = True) -> list:
        """OPENDIR, READDIR(PLUS) until an empty page, RELEASEDIR: every entry."""
        fh = self.opendir(nodeid).fh
        entries: list = []
        offset = 0
        try:
            for _ in range(100000):
                batch = self.readdirplus(nodeid, fh, offset) if plus else self.readdir(nodeid, fh, offset)
                if not batch:
                    return entries
                entries.extend(batch)
                offset = (batch[-1].dirent.off if plus else batch[-1].off)
            raise BackendProtocolError(f"directory {nodeid} did not reach EOF after 100000 pages")
        finally:
            self.releasedir(nodeid, fh)

    def release(self, nodeid: int, fh: int) -> None:
        if not self.no_open:
            self.call(fw.release(nodeid, fh))

    def releasedir(self, nodeid: int, fh: int) -> None:
        if not self.no_opendir:
            self.call(fw.releasedir(nodeid, fh))

    def flush(self, nodeid: int, fh: int) -> None:
        if self.no_flush:
            return
        try:
            self.call(fw.flush(nodeid, fh))
        except FuseErrorReply as exc:
            if exc.errno != errno.ENOSYS:
                raise
            self.no_flush = True

    def statfs(self, nodeid: int = 1) -> fw.StatFs:
        return fw.decode_statfs(self.call(fw.statfs(nodeid)))

    def readlink(self, nodeid: int) -> bytes:
        return self.call(fw.readlink(nodeid))

    def getxattr(self, nodeid: int, name: bytes | str, size: int) -> bytes | int:
        """Size 0 probes (returns the value size); otherwise the value bytes."""
        payload = self.call(fw.getxattr(nodeid, name, size))
        return fw.decode_getxattr_out(payload) if size == 0 else payload

    def listxattr(self, nodeid: int, size: int) -> list[bytes] | int:
        payload = self.call(fw.listxattr(nodeid, size))
        return fw.decode_getxattr_out(payload) if size == 0 else fw.decode_xattr_names(payload)

    def forget(self, nodeid: int, nlookup: int, *, queue: int | None = None) -> int:
        """FORGET on hiprio; returns the used len (a correct back-end gives 0)."""
        return self.request(fw.forget(nodeid, nlookup), queue=queue).used_len

    def batch_forget(self, items: list[tuple[int, int]], *, queue: int | None = None) -> int:
        return self.request(fw.batch_forget(items), queue=queue).used_len

    def syncfs(self) -> None:
        self.call(fw.syncfs())

    def destroy(self) -> None:
        self.call(fw.destroy())

    def resolve(self, path: str) -> fw.EntryOut | None:
        """LOOKUP each component of ``/a/b/c`` from the root; None for "/" itself."""
        nodeid, entry = 1, None
        for part in [p for p in path.split("/") if p]:
            entry = self.lookup(nodeid, part)
            nodeid = entry.nodeid
        return entry


def _opname(opcode: int) -> str:
    try:
        return fw.FuseOpcode(opcode).name
    except ValueError:
        return f"opcode {opcode}"

