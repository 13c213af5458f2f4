"""The C shim's rings, notifications and memory table, driven directly through ``Device``.

No event loop: the test thread owns the device and calls pop/push/notify
itself, while the harness front-end's control-plane calls (which wait for
replies) run in a helper thread and the test thread pumps ``dispatch()``
(:class:`Pump`).  Ring-side actions of the harness (submitting chains,
kicking) are plain memory writes done from the test thread.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import tempfile
import threading

import pytest

from nydus_vfs._native import binding

pytestmark = pytest.mark.skipif(not binding.available(), reason=f"{binding.unavailable_reason()}")

from tests.harness import (  # noqa: E402
    Buf,
    Feature,
    Frontend,
    MemRegion,
    ProtocolFeature,
    fuse_wire as fw,
)

GETATTR = fw.getattr(1)


class Pump:
    """Run harness control-plane calls while dispatching the shim in this thread."""

    def __init__(self, dev: binding.Device, sock: socket.socket) -> None:
        self.dev = dev
        self.sock = sock
        self.events = 0

    def dispatch_pending(self, timeout: float = 0.0) -> None:
        while select.select([self.sock], [], [], timeout)[0]:
            self.events |= self.dev.dispatch()
            if self.events & binding.EV_DEFERRED:
                return
            timeout = 0.0

    def run(self, fn, *, until_deferred: bool = False):
        box: dict = {}

        def target() -> None:
            try:
                box["value"] = fn()
            except BaseException as exc:  # re-raised in the test thread
                box["error"] = exc

        t = threading.Thread(target=target)
        t.start()
        while t.is_alive():
            self.dispatch_pending(0.005)
            if until_deferred and self.events & binding.EV_DEFERRED:
                return t, box
        t.join()
        self.dispatch_pending()
        if "error" in box:
            raise box["error"]
        return box.get("value")


class Rig:
    """A Device on one end of a socketpair, the harness Frontend on the other."""

    def __init__(self, *, config: binding.ShimConfig | None = None, batch: int = 64, **fe_kw) -> None:
        fe_kw.setdefault("mem_size", 8 << 20)
        fe_kw.setdefault("queue_size", 64)
        self.ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.dev = binding.Device(self.ours.fileno(), config, batch=batch)
        self.fe = Frontend(theirs, **fe_kw)
        self.pump = Pump(self.dev, self.ours)
        self.pump.run(self.fe.negotiate)
        self.pump.run(self.fe.start_queues)
        self.q = self.fe.queue(1)

    def close(self) -> None:
        self.dev.close()
        self.fe.close()
        self.ours.close()

    def submit(self, req: fw.FuseRequest = GETATTR, unique: int = 2, **kw) -> int:
        return self.q.submit(req.readable_segments(unique), req.writable_sizes(), **kw)

    def pop(self, q: int = 1, n: int | None = None):
        return self.dev.pop(q, n)


@pytest.fixture
def rig():
    r = Rig()
    try:
        yield r
    finally:
        r.close()


def eventfd_count(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


# --------------------------------------------------------------------------- popping

def test_pop_gives_a_private_copy_and_the_writable_capacity(rig):
    head = rig.submit(unique=42)
    reqs, status = rig.pop()
    assert status == 0 and len(reqs) == 1
    got_head, data, out_cap, flags, in_total = reqs[0]
    assert got_head == head and flags == 0
    assert data == b"".join(GETATTR.readable_segments(42)) and in_total == len(data) == 56
    assert out_cap == 16 + 104
    info = rig.dev.queue_info(1)
    assert (info.inflight, info.last_avail, info.running) == (1, 1, True)


def test_complete_fills_the_writable_buffers_and_used_len(rig):
    head = rig.submit(unique=8)
    (h, *_), = rig.pop()[0]
    reply = struct.pack("<IiQ", 120, 0, 8) + bytes(range(104))
    rig.dev.complete(1, h, reply)
    rig.dev.notify(1)
    comp = rig.q.wait_for(head)
    assert comp.used_len == 120 and comp.data == reply
    assert rig.dev.queue_info(1).inflight == 0


def test_write_pread_push_across_page_segments(rig):
    blob = os.urandom(256 << 10)
    with tempfile.TemporaryFile() as f:
        f.write(blob)
        f.flush()
        req = fw.read(2, 1, 0, 128 << 10)
        req = fw.FuseRequest(req.opcode, req.nodeid, req.args, out_pages=(4096,) * 32)
        head = rig.submit(req, unique=4)
        (h, _, cap, _, _), = rig.pop()[0]
        assert cap == 16 + (128 << 10)
        rig.dev.write(1, h, 0, struct.pack("<IiQ", cap, 0, 4))
        assert rig.dev.pread(1, h, 16, f.fileno(), 1000, 128 << 10) == 128 << 10
        with pytest.raises(binding.ReplyTooLargeError):
            rig.dev.pread(1, h, 17, f.fileno(), 0, 128 << 10)      # one byte past the capacity
        with pytest.raises(binding.ReplyTooLargeError):
            rig.dev.write(1, h, cap, b"x")
        assert rig.dev.pread(1, h, 16, f.fileno(), len(blob) - 10, 100) == 10   # EOF: short
        rig.dev.pread(1, h, 16, f.fileno(), 1000, 128 << 10)
        rig.dev.push(1, h, cap)
        rig.dev.notify(1)
        comp = rig.q.wait_for(head)
        assert comp.used_len == cap and comp.data[16:] == blob[1000:1000 + (128 << 10)]


def test_complete_file_reads_and_pushes_in_one_call(rig):
    blob = os.urandom(64 << 10)
    with tempfile.TemporaryFile() as f:
        f.write(blob)
        f.flush()
        req = fw.FuseRequest(fw.FuseOpcode.READ, 2, bytes(40), out_pages=(4096,) * 8)
        heads = [rig.submit(req, unique=2), rig.submit(req, unique=4)]
        (h1, *_), (h2, *_) = rig.pop()[0]
        hdr = struct.pack("<IiQ", 16 + 32768, 0, 2)
        assert rig.dev.complete_file(1, h1, hdr, f.fileno(), 4096, 32768) == 32768
        # At end of file the read is short: nothing is pushed, the caller still owns the request.
        assert rig.dev.complete_file(1, h2, hdr, f.fileno(), len(blob) - 100, 32768) == 100
        assert rig.dev.queue_info(1).inflight == 1
        with pytest.raises(binding.ReplyTooLargeError):
            rig.dev.complete_file(1, h2, hdr, f.fileno(), 0, 32769)
        rig.dev.complete(1, h2, struct.pack("<IiQ", 16, -5, 4))
        rig.dev.notify(1)
        assert rig.q.wait_for(heads[0]).data[:16 + 32768] == hdr + blob[4096:4096 + 32768]
        assert rig.q.wait_for(heads[1]).used_len == 16


def test_pread_error_is_an_os_error(rig):
    rig.submit()
    (h, *_), = rig.pop()[0]
    r, w = os.pipe()
    try:
        with pytest.raises(binding.ShimOSError) as ei:
            rig.dev.pread(1, h, 0, w, 0, 16)               # the write end cannot be read
        assert ei.value.errno in (9, 29)                    # EBADF or ESPIPE
    finally:
        os.close(r)
        os.close(w)
    rig.dev.push(1, h, 0)


def test_reply_larger_than_the_writable_part_pushes_zero(rig):
    head = rig.submit()
    (h, *_), = rig.pop()[0]
    with pytest.raises(binding.ReplyTooLargeError, match="pushed 0"):
        rig.dev.complete(1, h, bytes(121))
    rig.dev.notify(1)
    assert rig.q.wait_for(head).used_len == 0
    with pytest.raises(binding.ShimUsageError):
        rig.dev.push(1, h, 0)                               # completed exactly once


def test_push_above_capacity_pushes_zero(rig):
    head = rig.submit()
    (h, *_), = rig.pop()[0]
    with pytest.raises(binding.ReplyTooLargeError):
        rig.dev.push(1, h, 500)
    rig.dev.notify(1)
    assert rig.q.wait_for(head).used_len == 0


def test_batches_report_more_until_drained(rig):
    heads = [rig.submit(unique=2 * i + 2) for i in range(5)]
    sizes = []
    while True:
        reqs, status = rig.pop(n=2)
        sizes.append(len(reqs))
        if not status & binding.POP_MORE:
            break
    assert sizes == [2, 2, 1]
    assert rig.dev.queue_info(1).inflight == len(heads)


def test_event_idx_avail_event_is_armed_after_an_exact_batch(rig):
    """A batch that drains the ring exactly must still re-arm avail_event (lost-kick regression)."""
    for i in range(4):
        rig.submit(unique=2 * i + 2)
    reqs, status = rig.pop(n=4)
    assert len(reqs) == 4 and not status & binding.POP_MORE
    assert rig.q.raw.avail_event() == rig.dev.queue_info(1).last_avail


def test_disabled_queue_is_not_popped(rig):
    rig.pump.run(lambda: rig.fe.set_vring_enable(1, False))
    rig.submit()
    assert rig.pop() == ([], 0)
    assert not rig.dev.queue_info(1).running
    rig.pump.run(lambda: rig.fe.set_vring_enable(1, True))
    assert len(rig.pop()[0]) == 1


def test_kick_drain_clears_the_eventfd(rig):
    rig.submit()
    rig.q.kick()
    rig.dev.drain_kick(1)
    assert eventfd_count(rig.q.kick_fd) == 0


# --------------------------------------------------------------------------- notifications

def _complete_all(rig, reqs) -> None:
    for h, *_ in reqs:
        rig.dev.push(1, h, 0)


def test_notify_once_per_batch(rig):
    for i in range(3):
        rig.submit(unique=2 * i + 2)
    _complete_all(rig, rig.pop()[0])
    eventfd_count(rig.q.call_fd)
    assert rig.dev.notify(1) is True
    assert rig.dev.notify(1) is False                     # nothing new since
    assert eventfd_count(rig.q.call_fd) == 1


def test_event_idx_notify_follows_used_event(rig):
    # (The harness re-arms used_event / avail flags on every publish: set them after it.)
    rig.submit()
    _complete_all(rig, rig.pop()[0])
    assert rig.dev.notify(1) is True                      # first decision after start: always
    rig.submit(unique=4)
    _complete_all(rig, rig.pop()[0])
    used = rig.dev.queue_info(1).used_idx
    rig.q.raw.set_used_event(used + 10)                   # driver: interrupt me 10 entries later
    assert rig.dev.notify(1) is False
    rig.submit(unique=6)
    _complete_all(rig, rig.pop()[0])
    rig.q.raw.set_used_event(used)                        # the entry just pushed crosses it
    assert rig.dev.notify(1) is True


def test_no_interrupt_flag_without_event_idx():
    rig = Rig(features=Feature.VERSION_1 | Feature.INDIRECT_DESC)
    try:
        rig.submit()
        _complete_all(rig, rig.pop()[0])
        rig.q.raw.set_avail_flags(1)                      # VRING_AVAIL_F_NO_INTERRUPT
        assert rig.dev.notify(1) is False
        rig.submit(unique=4)
        _complete_all(rig, rig.pop()[0])
        rig.q.raw.set_avail_flags(0)
        assert rig.dev.notify(1) is True
    finally:
        rig.close()


def test_call_fd_swap_signals_the_new_fd_once(rig):
    new = rig.pump.run(lambda: rig.fe.swap_call_fd(1))
    assert eventfd_count(new) == 1
    assert rig.dev.queue_info(1).call_fd >= 0


# --------------------------------------------------------------------------- stop / resume

def test_get_vring_base_is_deferred_until_in_flight_requests_are_pushed(rig):
    rig.submit(unique=2)
    rig.submit(unique=4)
    reqs, _ = rig.pop()
    t, box = rig.pump.run(rig.fe.stop_queues, until_deferred=True)
    assert rig.dev.queue_info(1).stopping and not rig.dev.queue_info(1).running
    assert rig.dev.finish_deferred() is False
    rig.dev.push(1, reqs[0][0], 0)
    assert rig.dev.finish_deferred() is False
    rig.dev.push(1, reqs[1][0], 0)
    assert rig.dev.finish_deferred() is True
    rig.pump.events = 0
    while t.is_alive():
        rig.pump.dispatch_pending(0.005)
    assert "error" not in box, box.get("error")
    assert box["value"] == {0: 0, 1: 2}
    info = rig.dev.queue_info(1)
    assert (info.started, info.kick_fd, info.stopping) == (False, -1, False)


def test_resume_at_a_nonzero_base(rig):
    for i in range(3):
        rig.submit(unique=2 * i + 2)
    _complete_all(rig, rig.pop()[0])
    bases = rig.pump.run(rig.fe.stop_queues)
    assert bases[1] == 3
    rig.pump.run(rig.fe.start_queues)
    info = rig.dev.queue_info(1)
    assert (info.last_avail, info.used_idx, info.running) == (3, 3, True)
    head = rig.submit(unique=10)
    (h, *_), = rig.pop()[0]
    assert h == head


# --------------------------------------------------------------------------- memory and limits

def _guest_ram_mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum("nydus-harness-guest-ram" in line for line in f)


def test_in_flight_request_keeps_the_old_memory_table_mapped():
    rig = Rig(protocol_features=ProtocolFeature.REPLY_ACK)
    other = os.memfd_create("nydus-test-other-ram")
    try:
        os.ftruncate(other, rig.fe.memory.size)
        head = rig.submit(unique=6)
        (h, *_), = rig.pop()[0]
        before = _guest_ram_mappings()
        # A new table over *different* memory at the same addresses.
        rig.pump.run(lambda: rig.fe.set_mem_table(fds=[other] * len(rig.fe.memory.regions)))
        assert _guest_ram_mappings() == before            # still mapped: the request uses it
        reply = struct.pack("<IiQ", 16, -2, 6)
        rig.dev.complete(1, h, reply)
        # The reply went to the buffer the chain named when it was popped.
        chain_out = rig.q._inflight[head].writable[0]
        assert rig.fe.memory.read(chain_out.gpa, 16) == reply
        assert _guest_ram_mappings() < before             # released with its last request
    finally:
        rig.close()
        os.close(other)


def test_oversize_readable_part_is_flagged_and_truncated():
    rig = Rig(config=binding.ShimConfig(max_in_bytes=4096))
    try:
        rig.q.submit([b"".join(GETATTR.readable_segments(2)), bytes(8192)], [120])
        (h, data, cap, flags, total), = rig.pop()[0]
        assert flags & binding.REQ_OVERSIZE
        assert total == 56 + 8192 and len(data) == 64 and data[:56] == b"".join(GETATTR.readable_segments(2))
        rig.dev.push(1, h, 0)
    finally:
        rig.close()


# --------------------------------------------------------------------------- partial requests

SPLIT = 4 << 20            # a region boundary in the middle of guest RAM (see _three_regions)


def _three_regions(rig) -> None:
    """Re-describe guest RAM as QEMU's low region plus two GPA-adjacent regions meeting at SPLIT.

    The shim maps each region on its own, so a descriptor across SPLIT is
    split into two host pieces that are not adjacent in its address space.
    """
    mem = rig.fe.memory
    low, high = mem.regions
    regions = [low, MemRegion(high.guest_phys_addr, SPLIT - high.guest_phys_addr, high.userspace_addr,
                              high.mmap_offset),
               MemRegion(SPLIT, mem.size - SPLIT, mem.base_address + SPLIT, SPLIT)]
    rig.pump.run(lambda: rig.fe.set_mem_table(regions))
    assert rig.dev.num_regions == 3


def _partial_rig(**config) -> Rig:
    config.setdefault("max_copy_bytes", 4096)
    return Rig(config=binding.ShimConfig(**config), protocol_features=ProtocolFeature.REPLY_ACK)


def _scattered_write(rig, payload: bytes) -> tuple[int, bytes]:
    """Submit a WRITE whose payload lies in four descriptors over all three regions; (head, readable bytes)."""
    mem = rig.fe.memory
    head = fw.write(2, 7, 0, payload).readable_segments(9)[:2]   # the page segments are ours
    prefix = b"".join(head)                                 # fuse_in_header + fuse_write_in: 80 bytes
    low = mem.alloc(5000)
    big = mem.alloc(4 << 20, 1 << 20)                       # [1 MiB, 5 MiB): crosses SPLIT
    assert low + 5000 <= 0xA0000 and big < SPLIT < big + (4 << 20)
    # 5000 bytes low, 10000 across SPLIT, 300000 from the start of `big`, the rest above SPLIT.
    cuts = [5000, 15_000, 315_000, len(payload)]
    gpas = [low, SPLIT - 3000, big, SPLIT + 100_000]
    bufs, start = [], 0
    for gpa, end in zip(gpas, cuts):
        mem.write(gpa, payload[start:end])
        bufs.append(Buf(gpa, end - start))
        start = end
    assert bufs[1].gpa < SPLIT < bufs[1].gpa + bufs[1].length
    h = rig.q.submit(head + bufs, [24])
    return h, prefix + payload


def test_partial_request_copies_a_prefix_and_reads_the_rest_from_guest_memory(tmp_path):
    rig = _partial_rig()
    try:
        _three_regions(rig)
        payload = os.urandom(1 << 20)
        head, readable = _scattered_write(rig, payload)
        (h, data, cap, flags, total), = rig.pop()[0]
        assert h == head and flags == binding.REQ_PARTIAL and cap == 24
        assert total == len(readable) == 80 + (1 << 20)
        assert data == readable[:4096]                        # the private copy: a prefix only
        assert rig.dev.read_in(1, h, 0, total) == readable
        for off, ln in ((0, 1), (4000, 2000), (80 + 5000 - 1, 2), (80 + 8000 - 5, 10),
                        (total - 1, 1), (total, 0), (12345, 678_901)):
            assert rig.dev.read_in(1, h, off, ln) == readable[off:off + ln], (off, ln)

        out = tmp_path / "out"
        fd = os.open(out, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            assert rig.dev.pwrite_in(1, h, 80, fd, 0, len(payload)) == len(payload)
            assert out.read_bytes() == payload
            # Any sub-range, to any file offset, from the middle of a piece to the middle of another.
            assert rig.dev.pwrite_in(1, h, 80 + 4999, fd, (2 << 20) + 3, 500_000) == 500_000
            assert out.read_bytes()[(2 << 20) + 3:] == payload[4999:4999 + 500_000]
            assert rig.dev.pwrite_in(1, h, total, fd, 0, 0) == 0
        finally:
            os.close(fd)
        rig.dev.push(1, h, 0)
        with pytest.raises(binding.ShimUsageError, match="not in flight"):
            rig.dev.read_in(1, h, 0, 16)                      # pushed: the guest has its memory back
    finally:
        rig.close()


def test_partial_read_in_sees_the_guest_changing_its_data_the_copy_does_not():
    rig = _partial_rig()
    try:
        req = fw.write(2, 7, 0, bytes(8192))
        head = rig.submit(req, unique=4)
        (h, data, _, flags, total), = rig.pop()[0]
        assert flags == binding.REQ_PARTIAL and len(data) == 4096
        readable_gpas = rig.q._inflight[head].bufs[:4]     # header, write_in, two pages
        # The guest scribbles over its whole request after the pop.
        for gpa in readable_gpas:
            rig.fe.memory.fill(gpa, 16, 0xEE)
        assert bytes(data[:16]) == b"".join(req.readable_segments(4))[:16]      # private: unchanged
        assert rig.dev.read_in(1, h, 0, 16) == b"\xee" * 16                     # guest memory: changed
        rig.dev.push(1, h, 0)
    finally:
        rig.close()


def test_hostile_ranges_are_einval_and_touch_nothing(tmp_path):
    rig = _partial_rig()
    try:
        rig.submit(fw.write(2, 7, 0, os.urandom(16384)), unique=4)
        (h, _, _, flags, total), = rig.pop()[0]
        assert flags == binding.REQ_PARTIAL and total == 80 + 16384
        lib, ffi, dev = binding.lib, binding.ffi, rig.dev._dev
        buf = ffi.new("char[]", 64)
        fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            for off, ln in ((0xFFFF_FFFF, 2), (2, 0xFFFF_FFFF), (0xFFFF_FFFF, 0xFFFF_FFFF),
                            (total, 1), (total + 1, 0), (total - 10, 11), (0x8000_0000, 0x8000_0000)):
                assert lib.vhs_req_read_in(dev, 1, h, off, buf if ln <= 64 else ffi.NULL, ln) == -errno.EINVAL
                assert lib.vhs_req_pwrite_in(dev, 1, h, off, fd, 0, ln) == -errno.EINVAL, (off, ln)
            assert "exceeds" in ffi.string(lib.vhs_dev_error(dev)).decode()
            for other in ((h + 1) % 64, (h + 7) % 64, 0xFFFF):  # never popped / beyond the queue
                assert lib.vhs_req_read_in(dev, 1, other, 0, buf, 1) == -errno.EINVAL
                assert lib.vhs_req_pwrite_in(dev, 1, other, 0, fd, 0, 1) == -errno.EINVAL
            assert lib.vhs_req_read_in(dev, 99, h, 0, buf, 1) == -errno.EINVAL     # no such queue
            assert lib.vhs_req_pwrite_in(dev, 1, h, 0, fd, -1, 1) == -errno.EINVAL
            assert lib.vhs_req_pwrite_in(dev, 1, h, 0, fd, (1 << 63) - 1, 2) == -errno.EINVAL
            assert os.fstat(fd).st_size == 0                   # nothing was written
            with pytest.raises(binding.ShimUsageError):
                rig.dev.read_in(1, h, total, 1)
            with pytest.raises(binding.ShimUsageError):
                rig.dev.pwrite_in(1, h, 0, fd, 0, total + 1)
            r, w = os.pipe()
            try:
                with pytest.raises(binding.ShimOSError) as ei:
                    rig.dev.pwrite_in(1, h, 80, r, 0, 100)     # the read end cannot be written
                assert isinstance(ei.value, OSError) and ei.value.errno in (errno.EBADF, errno.ESPIPE)
            finally:
                os.close(r)
                os.close(w)
            assert rig.dev.read_in(1, h, 4, 4) == struct.pack("<I", fw.FuseOpcode.WRITE)   # still usable
            rig.dev.push(1, h, 0)
            assert lib.vhs_req_read_in(dev, 1, h, 0, buf, 1) == -errno.EINVAL       # pushed
            assert lib.vhs_req_pwrite_in(dev, 1, h, 0, fd, 0, 1) == -errno.EINVAL
        finally:
            os.close(fd)
    finally:
        rig.close()


def test_oversize_wins_over_partial():
    rig = _partial_rig(max_in_bytes=8192)
    try:
        rig.q.submit([b"".join(GETATTR.readable_segments(2)), bytes(16384)], [120])
        (h, data, _, flags, total), = rig.pop()[0]
        assert flags == binding.REQ_OVERSIZE and len(data) == 64 and total == 56 + 16384
        with pytest.raises(binding.ShimUsageError, match="oversize"):
            rig.dev.read_in(1, h, 0, 16)
        rig.dev.push(1, h, 0)
        # Just under the cap: partial, and every byte reachable.
        body = (bytes(range(256)) * 32)[:8192 - 56]
        rig.q.submit([b"".join(GETATTR.readable_segments(4)), body], [120])
        (h, data, _, flags, total), = rig.pop()[0]
        assert flags == binding.REQ_PARTIAL and len(data) == 4096 and total == 8192
        assert rig.dev.read_in(1, h, 56, 8192 - 56) == body
        rig.dev.push(1, h, 0)
    finally:
        rig.close()


def test_by_default_everything_is_copied_and_still_readable_in_place():
    rig = Rig()
    try:
        value = os.urandom(65536)
        rig.submit(fw.setxattr(2, "user.k", value), unique=4)
        (h, data, _, flags, total), = rig.pop()[0]
        assert flags == 0 and len(data) == total and bytes(data[-65536:]) == value
        assert rig.dev.read_in(1, h, total - 65536, 65536) == value
        rig.dev.push(1, h, 0)
    finally:
        rig.close()


def test_many_readable_pieces_are_charged_to_the_in_flight_budget():
    """Readable iovecs beyond the inline few come from the budget, like the copies."""
    # 1 + 60 pieces: the array grows 8 -> 16 -> 32 -> 64 iovecs, 1 KiB in all.
    rig = _partial_rig(max_inflight_bytes=1024)
    try:
        mem = rig.fe.memory
        pieces = []
        for i in range(120):                                  # 1-byte pieces 16 bytes apart: no merging
            gpa = mem.alloc(16, 16)
            mem.write(gpa, bytes([i]))
            pieces.append(Buf(gpa, 1))
        hdr = b"".join(GETATTR.readable_segments(2))
        rig.q.submit([hdr] + pieces[:60], [120], indirect=True)
        rig.q.submit([hdr] + pieces[60:], [120], indirect=True)
        reqs, status = rig.pop()
        assert len(reqs) == 1 and status & binding.POP_THROTTLED        # the first one always fits
        (h, _, _, _, total), = reqs
        assert total == 56 + 60 and rig.dev.read_in(1, h, 56, 60) == bytes(range(60))
        rig.dev.push(1, h, 0)
        (h, *_), = rig.pop()[0]
        rig.dev.push(1, h, 0)
    finally:
        rig.close()


def test_writable_part_is_clamped_to_the_limit():
    rig = Rig(config=binding.ShimConfig(max_out_bytes=8192))
    try:
        rig.submit(fw.FuseRequest(fw.FuseOpcode.READ, 2, bytes(40), out_pages=(4096,) * 4))
        (h, _, cap, _, _), = rig.pop()[0]
        assert cap == 8192
        rig.dev.push(1, h, 0)
    finally:
        rig.close()


def test_in_flight_memory_budget_throttles_then_resumes():
    rig = Rig(config=binding.ShimConfig(max_inflight_bytes=16 << 10))
    try:
        for i in range(3):
            rig.q.submit([b"".join(GETATTR.readable_segments(2 * i + 2)), bytes(12 << 10)], [120])
        reqs, status = rig.pop()
        assert len(reqs) == 1 and status & binding.POP_THROTTLED     # the first one always fits
        assert rig.pop() == ([], binding.POP_THROTTLED)
        rig.dev.push(1, reqs[0][0], 0)
        reqs2, status = rig.pop()
        assert len(reqs2) == 1 and status & binding.POP_THROTTLED
        rig.dev.push(1, reqs2[0][0], 0)
        reqs3, status = rig.pop()
        assert len(reqs3) == 1 and status == 0
        rig.dev.push(1, reqs3[0][0], 0)
    finally:
        rig.close()


def test_broken_queue_stops_popping_and_reports_once(rig):
    rig.q.raw.put_avail(rig.q.size + 5)
    rig.q.raw.publish()
    reqs, status = rig.pop()
    assert reqs == [] and status & binding.POP_BROKEN
    assert "names head 69" in rig.dev.queue_error(1)
    assert rig.pop() == ([], 0)                           # no second report
    assert eventfd_count(rig.q.err_fd) == 1
    rig.pump.run(rig.fe.stop_queues)
    assert not rig.dev.queue_info(1).broken and rig.dev.queue_error(1) == ""
