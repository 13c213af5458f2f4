"""A hostile guest and a misbehaving front-end against ``transport.virtiofs`` + the C shim.

One test per threat of ``vhost-user-fs.md`` §6.1 (rings), §6.2 (FUSE messages)
and vhost-user-fs.md §6.4 (socket hygiene).  Hostile descriptors are written with the harness's
raw ring mode and published *before* the kick (vhost-user-fs.md §5.3).  Pass criteria (§5.3):
the back-end survives, the vhost-user socket keeps answering, a ring violation
marks only that queue broken (reason logged once, err eventfd signalled) while
the other queues keep working, and the broken queue serves again after the
front-end's GET_VRING_BASE / SET_VRING_BASE cycle (a guest reset).
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import socket
import struct
import time

import pytest

from nydus_vfs._native import binding

pytestmark = pytest.mark.skipif(not binding.available(), reason=f"{binding.unavailable_reason()}")

from nydus_vfs.fuse.server import FuseServer  # noqa: E402
from tests.harness import (  # noqa: E402
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    BackendClosed,
    Feature,
    FuseErrorReply,
    FuseSession,
    Frontend,
    ProtocolFeature,
    VhostUserRequest,
    fuse_wire as fw,
)
from tests.functional import virtiofs_helpers  # noqa: E402
from tests.functional.virtiofs_helpers import (  # noqa: E402
    HELLO,
    HELLO_ID,
    ROOT,
    SLOW_ID,
    Backend,
    MemFs,
    open_fds,
    wait_until,
)

R = VhostUserRequest
NEXT, WRITE, INDIRECT = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT
QSIZE = 256
OUTSIDE = 0x7000_0000_0000          # no region there
HOLE = 0xB0000                      # QEMU's GPA hole (0xa0000-0xc0000)
U16 = struct.Struct("<H")
U32 = struct.Struct("<I")


backend = virtiofs_helpers.backend  # the fixture
# Hostile tests use smaller rings than QEMU's default.
connect = functools.partial(virtiofs_helpers.connect, queue_size=QSIZE)
started = functools.partial(virtiofs_helpers.started, queue_size=QSIZE)


class Guest:
    """A started front-end with 3 queues plus helpers to build raw chains on queue 1."""

    def __init__(self, be: Backend, **kw) -> None:
        kw.setdefault("num_queues", 3)
        self.be = be
        self.fe, self.fs = started(be, **kw)
        self.q = self.fe.queue(1)
        self.raw = self.q.raw
        self.unique = 1000

    def close(self) -> None:
        self.fe.close()

    def data(self, payload: bytes) -> int:
        gpa = self.raw.alloc(max(len(payload), 16), 16)
        self.raw.write(gpa, payload)
        return gpa

    def out(self, size: int) -> int:
        gpa = self.raw.alloc(size, 16)
        self.raw.write(gpa, bytes(size))
        return gpa

    def getattr_bytes(self, nodeid: int = ROOT) -> bytes:
        self.unique += 2
        return b"".join(fw.getattr(nodeid).readable_segments(self.unique))

    def chain(self, segs: list[tuple[int, int, int]], *, head: int | None = None, kick: bool = True) -> int:
        """Write a direct chain of (gpa, len, flags) with NEXT links at fresh indices; publish; kick."""
        idx = self.raw.reserve(len(segs))
        descs = []
        for k, (gpa, ln, fl) in enumerate(segs):
            last = k == len(segs) - 1
            descs.append((gpa, ln, fl | (0 if last else NEXT), 0 if last else idx[k + 1]))
        return self.raw.submit(descs, indices=idx, head=head, kick=kick)

    def reply_at(self, gpa: int, size: int = 16) -> tuple[int, int, int]:
        """(len, error, unique) of the out header the back-end wrote at ``gpa``."""
        return struct.unpack("<IiQ", self.raw.read(gpa, 16))

    def queue_error(self, q: int = 1) -> str:
        return self.be.call(lambda: self.be.transport.device.queue_error(q))

    def expect_broken(self, caplog, reason: str, q: int = 1) -> None:
        """The queue is broken for ``reason``; everything else still works; a reset heals it."""
        wait_until(lambda: self.be.queue_info(q).broken)
        assert reason in self.queue_error(q)
        assert os.eventfd_read(self.fe.queue(q).err_fd) >= 1         # err eventfd signalled
        # The socket answers, the other request queue and hiprio still serve.
        assert self.fe.request_u64(R.GET_QUEUE_NUM) == 2
        other = self.fe.queue(2).fuse_request(fw.FuseOpcode.GETATTR, ROOT, bytes(16), out_size=104)
        assert other.ok
        assert self.fs.forget(HELLO_ID, 1) == 0
        # Kicking a broken queue again does nothing and does not log again.
        self.fe.queue(q).kick()
        time.sleep(0.02)
        broken_logs = [r for r in caplog.records if "is broken" in r.getMessage()]
        assert len(broken_logs) == 1, [r.getMessage() for r in broken_logs]
        assert self.be.alive
        # Guest reset: GET_VRING_BASE + SET_VRING_BASE clear the state.
        self.fe.stop_queues()
        assert not self.be.queue_info(q).broken
        self.fe.start_queues(reset=True)
        self.fs.init()
        assert self.fs.getattr(HELLO_ID).attr.size == len(HELLO)


@pytest.fixture
def guest(backend):
    g = Guest(backend)
    try:
        yield g
    finally:
        g.close()


# =========================================================================== vhost-user-fs.md §6.1 rings

def test_descriptor_address_outside_every_region(guest, caplog):
    guest.chain([(OUTSIDE, 56, 0), (guest.out(120), 120, WRITE)])
    guest.expect_broken(caplog, "outside guest memory")


def test_descriptor_address_in_the_gpa_hole(guest, caplog):
    req = guest.data(guest.getattr_bytes())
    guest.chain([(req, 56, 0), (HOLE, 120, WRITE)])
    guest.expect_broken(caplog, "writable buffer gpa=0xb0000")


def test_descriptor_addr_plus_len_wraps_u64(guest, caplog):
    guest.chain([(2**64 - 16, 64, 0), (guest.out(120), 120, WRITE)])
    guest.expect_broken(caplog, "wraps")


def test_descriptor_crossing_the_end_of_a_region(guest, caplog):
    # gpa 0x9fff0 + 0x40 runs from the low region into the hole.
    guest.chain([(guest.data(guest.getattr_bytes()), 56, 0), (0x9FFF0, 0x40, WRITE)])
    guest.expect_broken(caplog, "outside guest memory")


def test_chain_loop(guest, caplog):
    idx = guest.raw.reserve(2)
    req, out = guest.data(guest.getattr_bytes()), guest.out(120)
    # Two readable descriptors pointing at each other (an ordering error must not mask the loop).
    guest.raw.submit([(req, 56, NEXT, idx[1]), (out, 120, NEXT, idx[0])], indices=idx)
    guest.expect_broken(caplog, "loops")


def test_next_index_out_of_range(guest, caplog):
    idx = guest.raw.reserve(1)
    guest.raw.submit([(guest.data(guest.getattr_bytes()), 56, NEXT, 60000)], indices=idx)
    guest.expect_broken(caplog, "next index 60000 is out of range")


def test_head_index_out_of_range(guest, caplog):
    guest.raw.put_avail(9999)
    guest.raw.publish()
    guest.raw.kick()
    guest.expect_broken(caplog, "names head 9999")


def test_avail_index_jumps_more_than_the_queue_size(guest, caplog):
    guest.raw.set_avail_idx(guest.q.avail_idx + 5000)
    guest.raw.kick()
    guest.expect_broken(caplog, "avail index moved")


def _indirect_case(guest: Guest, case: str) -> tuple[int, int, int]:
    """The head descriptor (addr, len, flags) of a malformed indirect chain."""
    req, out = guest.data(guest.getattr_bytes()), guest.out(120)
    good = [(req, 56, NEXT, 1), (out, 120, WRITE, 0)]
    if case == "len_not_multiple_of_16":
        return guest.raw.indirect_table(good).gpa, 24, INDIRECT
    if case == "len_zero":
        return guest.raw.indirect_table(good).gpa, 0, INDIRECT
    if case == "len_above_queue_size":
        return guest.raw.indirect_table(good).gpa, 16 * (QSIZE + 1), INDIRECT
    if case == "table_unmapped":
        return OUTSIDE, 32, INDIRECT
    if case == "nested_indirect":
        inner = guest.raw.indirect_table(good)
        return guest.raw.indirect_table([(inner.gpa, inner.length, INDIRECT, 0)]).gpa, 16, INDIRECT
    if case == "indirect_with_next":
        return guest.raw.indirect_table(good).gpa, 32, INDIRECT | NEXT
    if case == "next_out_of_table":
        return guest.raw.indirect_table([(req, 56, NEXT, 7), (out, 120, WRITE, 0)]).gpa, 32, INDIRECT
    if case == "loop_in_table":
        return guest.raw.indirect_table([(req, 56, NEXT, 1), (out, 120, NEXT, 0)]).gpa, 32, INDIRECT
    raise AssertionError(case)


@pytest.mark.parametrize("case,reason", [
    ("len_not_multiple_of_16", "indirect table length 24"),
    ("len_zero", "indirect table length 0"),
    ("len_above_queue_size", f"indirect table length {16 * (QSIZE + 1)}"),
    ("table_unmapped", "is not mapped"),
    ("nested_indirect", "INDIRECT descriptor inside an indirect table"),
    ("indirect_with_next", "INDIRECT descriptor has NEXT set"),
    ("next_out_of_table", "next index 7 is out of range (indirect table of 2)"),
    ("loop_in_table", "loops"),
])
def test_malformed_indirect_table(guest, caplog, case, reason):
    addr, ln, flags = _indirect_case(guest, case)
    idx = guest.raw.reserve(1)
    guest.raw.submit([(addr, ln, flags, 0)], indices=idx)
    guest.expect_broken(caplog, reason)


def test_indirect_descriptor_without_the_feature(backend, caplog):
    g = Guest(backend, features=Feature.VERSION_1 | Feature.EVENT_IDX)
    try:
        req, out = g.data(g.getattr_bytes()), g.out(120)
        table = g.raw.indirect_table([(req, 56, NEXT, 1), (out, 120, WRITE, 0)])
        idx = g.raw.reserve(1)
        g.raw.submit([(table.gpa, table.length, INDIRECT, 0)], indices=idx)
        g.expect_broken(caplog, "INDIRECT_DESC not negotiated")
    finally:
        g.close()


def test_zero_length_descriptors_are_skipped(guest):
    """Tolerated (vhost-user-fs.md §6.1 allows skip or reject): the request itself is served."""
    body = guest.getattr_bytes(HELLO_ID)
    out = guest.out(120)
    head = guest.chain([(guest.data(body[:40]), 40, 0), (guest.data(b"x"), 0, 0), (guest.data(body[40:]), 16, 0),
                        (guest.out(16), 0, WRITE), (out, 120, WRITE)])
    comp = guest.q.wait_for(head)
    length, error, unique = guest.reply_at(out)
    assert (comp.used_len, length, error, unique) == (120, 120, 0, guest.unique)
    assert not guest.be.queue_info(1).broken


def test_readable_descriptor_after_a_writable_one(guest, caplog):
    body = guest.getattr_bytes()
    guest.chain([(guest.data(body[:40]), 40, 0), (guest.out(120), 120, WRITE), (guest.data(body[40:]), 16, 0)])
    guest.expect_broken(caplog, "readable descriptor after a writable one")


def test_oversize_readable_part_gets_an_error_reply(guest, caplog):
    """2 MiB readable on a GETATTR (C virtiofsd aborts): E2BIG for that request only."""
    body = guest.getattr_bytes()
    junk = guest.out(2 << 20)
    out = guest.out(120)
    head = guest.chain([(guest.data(body), len(body), 0), (junk, 2 << 20, 0), (out, 120, WRITE)])
    comp = guest.q.wait_for(head)
    assert comp.used_len == 16
    assert guest.reply_at(out) == (16, -errno.E2BIG, guest.unique)
    assert not guest.be.queue_info(1).broken
    assert guest.fs.getattr(ROOT).attr.ino == ROOT


def test_oversize_writable_part_is_clamped(guest):
    out = guest.out(4 << 20)
    head = guest.chain([(guest.data(guest.getattr_bytes()), 56, 0), (out, 4 << 20, WRITE)])
    assert guest.q.wait_for(head).used_len == 120
    assert guest.reply_at(out)[:2] == (120, 0)


def test_many_tiny_segments_in_one_request(guest):
    """A request split into 56 one-byte descriptors is reassembled from the private copy."""
    body = guest.getattr_bytes(HELLO_ID)
    out = guest.out(120)
    head = guest.chain([(guest.data(body[i:i + 1]), 1, 0) for i in range(len(body))] + [(out, 120, WRITE)])
    assert guest.q.wait_for(head).used_len == 120
    assert guest.reply_at(out) == (120, 0, guest.unique)


def test_in_flight_budget_exhausted_by_one_kick_of_synchronous_requests(tmp_path):
    """Three 12 KiB requests against a 16 KiB budget, one kick: all are answered without another."""
    be = Backend(str(tmp_path / "vfs.sock"), config=binding.ShimConfig(max_inflight_bytes=16 << 10))
    try:
        g = Guest(be)
        heads = []
        for _ in range(3):
            body = g.getattr_bytes()
            heads.append(g.chain([(g.data(body), len(body), 0), (g.out(12 << 10), 12 << 10, 0),
                                  (g.out(120), 120, WRITE)], kick=False))
        g.q.kick()
        # Each one is refused (in-header length != readable bytes): a 16-byte error reply.
        assert [g.q.wait_for(h).used_len for h in heads] == [16, 16, 16]
        g.close()
    finally:
        be.stop()


def test_same_head_made_available_twice_while_in_flight(guest, caplog):
    fh = guest.fs.open(SLOW_ID).fh
    pending = guest.fs.submit(fw.read(SLOW_ID, fh, 0, 4096))
    assert guest.be.ops.slow_started.wait(5)
    used_before = guest.raw.used_idx()
    guest.raw.put_avail(pending.head)
    guest.raw.publish()
    guest.raw.kick()
    wait_until(lambda: guest.be.queue_info(1).broken)
    assert "again while still in flight" in guest.queue_error()
    guest.be.open_gate()
    # The original request still completes, exactly once.
    assert guest.fs.result(pending).payload == HELLO
    assert guest.raw.used_idx() == (used_before + 1) & 0xFFFF
    guest.expect_broken(caplog, "head")


class _Hooked:
    """FuseServer wrapper that lets a test act between pop and handling (in the back-end thread)."""

    def __init__(self) -> None:
        self.inner = FuseServer(MemFs())
        self.hook = None

    def handle(self, request, out_capacity=None):
        hook, self.hook = self.hook, None
        if hook is not None:
            hook()
        return self.inner.handle(request, out_capacity)

    def close(self) -> None:
        self.inner.close()


def test_guest_rewrites_request_and_descriptors_after_publishing(tmp_path):
    """TOCTOU: only the private copies count; the reply lands where the chain said at pop time."""
    server = _Hooked()
    be = Backend(str(tmp_path / "vfs.sock"), server=server)
    try:
        g = Guest(be)
        try:
            body = g.getattr_bytes(HELLO_ID)
            original_unique = g.unique
            req, out, decoy = g.data(body), g.out(120), g.out(120)
            idx = g.raw.reserve(2)

            def rewrite() -> None:
                # What a malicious guest does from another vCPU once the chain is taken.
                g.raw.write(req, fw.pack_in_header(56, fw.FuseOpcode.DESTROY, 0xDEAD, 1) + bytes(16))
                g.raw.write_desc(idx[1], decoy, 120, WRITE, 0)

            server.hook = rewrite
            head = g.raw.submit([(req, 56, NEXT, idx[1]), (out, 120, WRITE, 0)], indices=idx)
            assert g.q.wait_for(head).used_len == 120
            assert g.reply_at(out) == (120, 0, original_unique)
            assert g.raw.read(decoy, 120) == bytes(120)
            assert server.inner.state.name == "RUNNING"           # no DESTROY happened
        finally:
            g.close()
    finally:
        be.stop()


def test_bogus_used_event_and_avail_flags(guest):
    """They only change when we signal; requests keep completing (the driver polls here)."""
    guest.q.set_mode("poll")
    for flags, used_event in ((VRING_AVAIL_F_NO_INTERRUPT, 0xFFFF), (0xFFFF, 0x1234), (0, 0x8000)):
        guest.raw.set_avail_flags(flags)
        guest.raw.set_used_event(used_event)
        head = guest.chain([(guest.data(guest.getattr_bytes()), 56, 0), (guest.out(120), 120, WRITE)])
        assert guest.q.wait_for(head).used_len == 120
    guest.q.set_mode("irq")
    assert guest.fs.getattr(ROOT).attr.ino == ROOT
    assert not guest.be.queue_info(1).broken


def test_call_fd_that_is_a_full_pipe_never_blocks_the_backend(guest):
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, fcntl.F_SETFL, os.O_NONBLOCK)
        try:
            while True:
                os.write(w, b"x" * 65536)
        except BlockingIOError:
            pass
        fcntl.fcntl(w, fcntl.F_SETFL, 0)          # hand over a full, *blocking* pipe
        guest.fe.set_vring_call(1, w)
        guest.q.call_fd = None
        guest.q.set_mode("poll")
        for _ in range(3):
            head = guest.chain([(guest.data(guest.getattr_bytes()), 56, 0), (guest.out(120), 120, WRITE)])
            assert guest.q.wait_for(head).used_len == 120
        assert guest.fe.request_u64(R.GET_QUEUE_NUM) == 2
    finally:
        os.close(r)
        os.close(w)


def test_kick_fd_that_cannot_be_polled_drops_the_connection(backend, tmp_path):
    fe, fs = started(backend, queue_size=QSIZE)
    with fe:
        regular = os.open(tmp_path / "file", os.O_RDWR | os.O_CREAT)
        fe.set_vring_kick(1, regular)
        os.close(regular)
        # Dropped once the loop fails to watch it (messages already read may still be answered).
        backend.wait_disconnected(1)
        with pytest.raises(BackendClosed):
            fe.request_u64(R.GET_QUEUE_NUM)
    fe, fs = started(backend)
    with fe:
        assert fs.getattr(ROOT).attr.ino == ROOT


def test_memory_table_with_bad_regions_is_refused_and_the_old_one_kept(backend, tmp_path):
    fe, fs = started(backend, protocol_features=ProtocolFeature.REPLY_ACK)
    with fe:
        low, high = fe.memory.regions
        table = lambda regs: struct.pack("<II", len(regs), 0) + b"".join(r.to_bytes() for r in regs)  # noqa: E731
        overlap = type(low)(low.guest_phys_addr, low.memory_size + 0x1000, low.userspace_addr + (1 << 40), 0)
        small = os.memfd_create("small")
        os.ftruncate(small, 4096)
        try:
            cases = [
                ([low, overlap], [fe.memory.fd] * 2),                                 # GPA overlap
                ([type(low)(0, 0, low.userspace_addr, 0)], [fe.memory.fd]),            # size 0
                ([type(low)(2**64 - 4096, 8192, 0x1000, 0)], [fe.memory.fd]),          # wraps
                ([type(low)(0, 1 << 20, 0x1000, 2**64 - 4096)], [fe.memory.fd]),       # offset wraps
                ([type(low)(0, 1 << 20, 0x1000, 0)], [small]),                         # file too small
            ]
            for regions, fds in cases:
                ack = fe.send(R.SET_MEM_TABLE, table(regions), fds, need_reply=True)
                assert ack == 1, regions
            sock_fd = socket.socket(socket.AF_UNIX)
            try:
                ack = fe.send(R.SET_MEM_TABLE, table([low]), [sock_fd.fileno()], need_reply=True)
                assert ack == 1                                                    # not a memfd/file
            finally:
                sock_fd.close()
        finally:
            os.close(small)
        assert backend.call(lambda: backend.transport.device.num_regions) == 2
        assert fs.getattr(HELLO_ID).attr.size == len(HELLO)


# =========================================================================== vhost-user-fs.md §6.2 FUSE messages

def _submit(guest: Guest, readable: list[bytes], writable: list[int]):
    head = guest.q.submit(readable, writable)
    return guest.q.wait_for(head)


def test_request_shorter_than_the_in_header(guest):
    comp = _submit(guest, [b"\x14" + bytes(19)], [16, 104])
    assert comp.used_len == 0
    assert guest.fs.getattr(ROOT).attr.ino == ROOT


def test_in_header_len_differs_from_the_readable_length(guest):
    guest.unique += 2
    hdr = fw.pack_in_header(500, fw.FuseOpcode.GETATTR, guest.unique, ROOT)
    comp = _submit(guest, [hdr, bytes(16)], [16, 104])
    assert fw.decode_out_header(comp.data) == (16, -errno.EINVAL, guest.unique)


def test_args_shorter_than_the_opcode_struct(guest):
    guest.unique += 2
    comp = _submit(guest, [fw.pack_in_header(44, fw.FuseOpcode.GETATTR, guest.unique, ROOT), bytes(4)], [16, 104])
    assert fw.decode_out_header(comp.data) == (16, -errno.EINVAL, guest.unique)


def test_writable_part_too_small_for_the_reply(guest):
    comp = _submit(guest, [guest.getattr_bytes()], [16, 40])
    assert fw.decode_out_header(comp.data)[:2] == (16, -errno.EINVAL)
    comp = _submit(guest, [guest.getattr_bytes()], [8])
    assert comp.used_len == 0


def test_no_writable_part_for_an_opcode_that_needs_one(guest):
    comp = _submit(guest, [guest.getattr_bytes()], [])
    assert comp.used_len == 0
    assert guest.fs.getattr(ROOT).attr.ino == ROOT


def test_request_before_init(backend):
    with connect(backend) as fe:
        fe.negotiate()
        fe.start_queues()
        with pytest.raises(FuseErrorReply) as ei:
            FuseSession(fe).getattr(ROOT)
        assert ei.value.errno == errno.EIO


def test_init_with_an_unsupported_version(backend):
    with connect(backend) as fe:
        fe.negotiate()
        fe.start_queues()
        fs = FuseSession(fe)
        with pytest.raises(FuseErrorReply) as ei:
            fs.init(major=6, minor=0)
        assert ei.value.errno == errno.EPROTO
        assert fs.init().major == 7


def test_unknown_opcode(guest):
    reply = guest.fe.fuse.request(fw.FuseRequest(4242, ROOT, b"", out_size=64))
    assert reply.errno == errno.ENOSYS


def test_unknown_nodeid(guest):
    with pytest.raises(FuseErrorReply):
        guest.fs.getattr(0xDEAD_BEEF)


def test_forget_for_unknown_nodeids_and_too_many_lookups(guest):
    entry = guest.fs.lookup(ROOT, "hello")
    assert guest.fs.forget(0xDEAD_BEEF, 5) == 0
    assert guest.fs.forget(entry.nodeid, 1000) == 0
    assert guest.fs.batch_forget([(1, 1), (0xDEAD, 2), (entry.nodeid, 1)]) == 0
    assert guest.be.server.lookup_count(entry.nodeid) == 0
    assert guest.fs.getattr(ROOT).attr.ino == ROOT


def test_huge_read_size_is_capped_to_the_writable_part(guest):
    fh = guest.fs.open(HELLO_ID).fh
    read_in = struct.pack("<QQIIQII", fh, 0, 0xFFFF_FFFF, 0, 0, 0x8000, 0)   # fuse_read_in, size 4 GiB - 1
    req = fw.FuseRequest(fw.FuseOpcode.READ, HELLO_ID, read_in, out_pages=(4096,))
    reply = guest.fe.fuse.request(req)
    assert reply.ok and reply.payload == HELLO


def test_nonzero_total_extlen(guest):
    guest.unique += 2
    hdr = fw.pack_in_header(56, fw.FuseOpcode.GETATTR, guest.unique, ROOT, total_extlen=2)
    comp = _submit(guest, [hdr, bytes(16)], [16, 104])
    assert fw.decode_out_header(comp.data) == (16, -errno.EINVAL, guest.unique)


@pytest.mark.parametrize("unique", [0, 7])
def test_unique_zero_or_reused_is_echoed(guest, unique):
    req = fw.getattr(ROOT)
    comps = []
    for _ in range(2):
        head = guest.q.submit(req.readable_segments(unique), req.writable_sizes())
        comps.append(guest.q.wait_for(head))
    assert [fw.decode_out_header(c.data) for c in comps] == [(120, 0, unique)] * 2


def test_guest_that_never_forgets_hits_the_nodeid_cap(tmp_path):
    ops = MemFs()
    be = Backend(str(tmp_path / "vfs.sock"), server=FuseServer(ops, max_nodeids=2))
    try:
        fe, fs = started(be)
        with fe:
            fs.lookup(ROOT, "hello")
            fs.lookup(ROOT, "big")
            with pytest.raises(FuseErrorReply) as ei:
                fs.lookup(ROOT, "link")
            assert ei.value.errno == errno.ENFILE
            assert fs.forget(HELLO_ID, 1) == 0
            assert fs.lookup(ROOT, "link").nodeid
    finally:
        be.stop()


# =========================================================================== vhost-user-fs.md §6.4 socket hygiene

def _expect_dropped(be: Backend, fe: Frontend, count: int = 1) -> None:
    with pytest.raises(BackendClosed):
        fe.request_u64(R.GET_QUEUE_NUM)
    fe.close()
    be.wait_disconnected(count)
    assert be.alive
    fe2, fs2 = started(be)
    with fe2:
        assert fs2.getattr(ROOT).attr.ino == ROOT


@pytest.mark.parametrize("request_, payload", [
    (R.SET_VRING_NUM, b"\0\0\0\0"),                        # 4 bytes, needs 8
    (R.SET_VRING_ADDR, bytes(48)),                          # 48 bytes, needs 40
    (R.GET_FEATURES, bytes(8)),                             # needs none
    (R.SET_MEM_TABLE, bytes(8 + 32 * 9)),                   # more than 8 regions
    (R.SET_MEM_TABLE, bytes(8 + 20)),                       # not 8 + 32 x n
])
def test_wrong_payload_size_drops_the_connection(backend, request_, payload):
    fe = connect(backend)
    fe.negotiate()
    fe.send(request_, payload)
    _expect_dropped(backend, fe)


@pytest.mark.parametrize("request_", [R.SET_LOG_BASE, R.SET_SLAVE_REQ_FD, R.RESET_DEVICE, R.GET_CONFIG, 99])
def test_unsupported_request_drops_the_connection(backend, request_):
    fe = connect(backend)
    fe.negotiate()
    fe.send(request_, b"")
    _expect_dropped(backend, fe)


def test_unexpected_fds_are_closed_and_drop_the_connection(backend):
    baseline = open_fds()
    fe = connect(backend)
    fe.negotiate()
    extra = [os.eventfd(0) for _ in range(3)]
    try:
        fe.send(R.GET_FEATURES, b"", extra)
    finally:
        for fd in extra:
            os.close(fd)
    _expect_dropped(backend, fe)
    backend.wait_disconnected(2)
    assert open_fds() - baseline == set()


def test_more_than_eight_fds_drop_the_connection(backend):
    fe = connect(backend)
    fe.negotiate()
    extra = [os.eventfd(0) for _ in range(12)]
    try:
        fe.send(R.SET_VRING_CALL, struct.pack("<Q", 1), extra)
    finally:
        for fd in extra:
            os.close(fd)
    _expect_dropped(backend, fe)


def test_kick_with_nofd_but_an_fd_attached(backend):
    fe = connect(backend)
    fe.negotiate()
    fd = os.eventfd(0)
    try:
        fe.send(R.SET_VRING_KICK, struct.pack("<Q", 1 | 0x100), [fd])
    finally:
        os.close(fd)
    _expect_dropped(backend, fe)


@pytest.mark.parametrize("flags", [0x0, 0x2, 0x5, 0x7])
def test_bad_header_flags_drop_the_connection(backend, flags):
    fe = connect(backend)
    fe.negotiate()
    fe.send(R.GET_QUEUE_NUM, b"", flags=flags)        # wrong version, or the REPLY bit
    _expect_dropped(backend, fe)


def test_ring_index_out_of_range_drops_the_connection(backend):
    fe = connect(backend)
    fe.negotiate()
    fe.set_vring_num(200, 128)
    _expect_dropped(backend, fe)


def test_invalid_ring_parameters_are_nacked(backend):
    fe = connect(backend, protocol_features=ProtocolFeature.REPLY_ACK)
    with fe:
        fe.negotiate()
        fe.start_queues()
        q = fe.queue(1)
        nack = lambda req, payload: fe.send(req, payload, need_reply=True)  # noqa: E731
        assert nack(R.SET_VRING_BASE, struct.pack("<II", 1, 5)) == 1          # queue is running
        assert nack(R.SET_VRING_NUM, struct.pack("<II", 1, 64)) == 1          # queue is running
        fe.stop_queues()
        assert nack(R.SET_VRING_NUM, struct.pack("<II", 1, 100)) == 1         # not a power of two
        assert nack(R.SET_VRING_NUM, struct.pack("<II", 1, 4096)) == 1        # above 1024
        assert nack(R.SET_VRING_BASE, struct.pack("<II", 1, 70000)) == 1      # above 16 bits
        assert nack(R.SET_VRING_ENABLE, struct.pack("<II", 1, 2)) == 1
        uva = fe.memory.uva(q.desc_gpa)
        addr = lambda d, u, a: struct.pack("<IIQQQQ", 1, 0, d, u, a, 0)  # noqa: E731
        assert nack(R.SET_VRING_ADDR, addr(uva + 8, uva + 8192, uva + 4096)) == 1   # desc not 16-aligned
        assert nack(R.SET_VRING_ADDR, addr(1 << 47, uva, uva)) == 1                 # not in any region
        assert nack(R.SET_FEATURES, struct.pack("<Q", int(Feature.PROTOCOL_FEATURES))) == 1  # no VERSION_1
        fe.start_queues(reset=True)
        fs = FuseSession(fe)
        fs.init()
        assert fs.getattr(ROOT).attr.ino == ROOT


def test_header_and_payload_in_separate_writes_and_byte_by_byte(backend):
    """libvhost-user-style front-ends write header and payload separately; both must work."""
    with connect(backend) as fe:
        fe.negotiate()
        raw = fe._sock
        hdr = struct.pack("<III", R.GET_QUEUE_NUM, 1, 0)
        for b in hdr:
            raw.send(bytes([b]))
            time.sleep(0.001)
        assert struct.unpack("<IIIQ", _recv(raw, 20)) == (R.GET_QUEUE_NUM, 5, 8, 2)
        raw.send(struct.pack("<III", R.SET_PROTOCOL_FEATURES, 1, 8))
        time.sleep(0.01)
        raw.send(struct.pack("<Q", fe.protocol_features))
        assert fe.request_u64(R.GET_FEATURES) & int(Feature.VERSION_1)


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, "connection closed"
        buf += chunk
    return buf


def test_a_flood_of_bad_requests_cannot_flood_the_log(tmp_path, caplog):
    from nydus_vfs.transport.virtiofs import ShimConfig

    be = Backend(str(tmp_path / "vfs.sock"), config=ShimConfig(max_in_bytes=4096))
    try:
        g = Guest(be)
        try:
            heads = [g.q.submit([g.getattr_bytes(), bytes(8192)], [120]) for _ in range(60)]
            assert all(g.q.wait_for(h).used_len == 16 for h in heads)        # each got E2BIG
            logged = [r for r in caplog.records if "exceeds the limit" in r.getMessage()]
            assert 1 <= len(logged) <= 20
        finally:
            g.close()
    finally:
        be.stop()


# -- vhost-user-fs.md §6.4: a front-end that hogs the one connection slot ------------------

HANDSHAKE_TIMEOUT = 0.5


@pytest.fixture
def impatient(tmp_path):
    """A back-end that drops a front-end after HANDSHAKE_TIMEOUT s without a vring set up."""
    be = Backend(str(tmp_path / "hs.sock"), handshake_timeout=HANDSHAKE_TIMEOUT)
    try:
        yield be
    finally:
        be.stop()


def _raw_client(be: Backend) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(be.sock_path)
    return sock


@pytest.mark.parametrize("stall", ["silent", "half-header", "before-set-owner"])
def test_stalled_handshake_is_dropped_and_the_next_front_end_served(impatient, caplog, stall):
    hog = _raw_client(impatient)
    if stall == "half-header":
        hog.sendall(struct.pack("<I", int(R.GET_FEATURES)) + b"\x01\0")   # 6 of 12 header bytes
    elif stall == "before-set-owner":
        hog.sendall(struct.pack("<III", int(R.GET_FEATURES), 1, 0))       # one whole message, then nothing
    try:
        # A real front-end queued behind it: its first reply arrives once the hog is dropped.
        fe, fs = started(impatient)
        with fe:
            assert fs.getattr(ROOT).attr.ino == ROOT
            assert fs.read(HELLO_ID, 0, 0, 4096) == HELLO
        assert impatient.connections() == 2
        # The hog's socket was closed by the back-end.
        hog.settimeout(5)
        rest = b""
        while chunk := hog.recv(4096):
            rest += chunk
        assert stall != "silent" or rest == b""
    finally:
        hog.close()
    assert "did not complete the handshake" in caplog.text
    assert impatient.alive


def test_front_end_waiting_for_its_guest_driver_is_not_timed_out(impatient):
    # Block A done (QEMU at start-up), block B only when the guest's driver probes: keep it.
    fe = connect(impatient)
    with fe:
        fe.negotiate()
        time.sleep(3 * HANDSHAKE_TIMEOUT)
        fe.start_queues()
        fs = FuseSession(fe)
        fs.init()
        assert fs.getattr(ROOT).attr.ino == ROOT
    assert impatient.connections() == 1


def test_quick_reconnects_queue_in_the_backlog_instead_of_eagain(backend):
    fe, fs = started(backend)
    with fe:
        # While one front-end is served, several others connect (non-blocking, as a
        # supervisor probing the socket would): none may be refused with EAGAIN.
        pending = []
        try:
            for _ in range(8):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.setblocking(False)
                pending.append(s)
                s.connect(backend.sock_path)
        finally:
            for s in pending:
                s.close()
        assert fs.getattr(ROOT).attr.ino == ROOT
    assert backend.alive


def test_a_burst_of_more_batches_than_one_drain_takes_is_answered_in_full(guest, monkeypatch):
    # More requests published at once than one drain handles before it yields
    # to the event loop: the rest is served right after (one batch per drain
    # here, so the 256-entry queue needs four).
    from nydus_vfs.transport import virtiofs

    monkeypatch.setattr(virtiofs, "_DRAIN_BATCHES", 1)
    n = guest.q.size
    assert n > 2 * 64, "the burst must take more than one drain"
    heads = [guest.q.add([guest.getattr_bytes()], [120]) for _ in range(n)]
    guest.q.publish()
    done = guest.q.wait(timeout=30, min_count=n)
    assert sorted(c.head for c in done) == sorted(heads) and all(c.used_len == 120 for c in done)
