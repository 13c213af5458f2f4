"""The front-end harness checked without a real back-end.

A scripted peer on a socketpair answers the control plane (and can misbehave), and
a tiny simulated device, written here against the split-ring layout, consumes the
rings straight from the shared guest RAM.  This is what lets the harness judge a
back-end: it must reject what QEMU 7.2 would reject and build rings Linux would.
"""

from __future__ import annotations

import array
import os
import pathlib
import socket
import struct
import threading

import pytest

from tests.harness import (
    BackendProtocolError,
    Feature,
    Frontend,
    GuestMemory,
    GuestMemoryFull,
    HarnessUsageError,
    NegotiationError,
    ProtocolFeature,
    QueueFull,
    VhostUserRequest as R,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    load_proxy_transcript,
    vring_need_event,
)
from tests.harness.vhost_frontend import DriverQueue

TRANSCRIPTS = pathlib.Path(__file__).resolve().parents[4] / "shared" / "reference" / "vhost-user-transcripts"
VIRTIOFSD_FEATURES = 0x175000000
VIRTIOFSD_PROTOCOL = 0x8C2B


class ScriptedPeer(threading.Thread):
    """Answers vhost-user requests on one end of a socketpair; ``replies`` overrides answers.

    ``replies[request] = (request_field, flags, payload)`` replaces the normal reply.
    """

    def __init__(self, sock: socket.socket, *, features: int = VIRTIOFSD_FEATURES,
                 protocol: int = VIRTIOFSD_PROTOCOL, replies: dict | None = None, ack: int = 0) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.features = features
        self.protocol = protocol
        self.replies = replies or {}
        self.ack = ack
        self.received: list[tuple[int, int, int, int]] = []
        self.bases: dict[int, int] = {}

    def _recv(self, n: int) -> tuple[bytes, int]:
        buf, nfds = b"", 0
        while len(buf) < n:
            data, anc, _, _ = self.sock.recvmsg(n - len(buf), socket.CMSG_SPACE(8 * 4))
            for level, typ, cdata in anc:
                if typ == socket.SCM_RIGHTS:
                    fds = array.array("i", cdata[:len(cdata) - len(cdata) % 4])
                    nfds += len(fds)
                    for fd in fds:
                        os.close(fd)
            if not data:
                raise EOFError
            buf += data
        return buf, nfds

    def _reply(self, request: int, payload: bytes) -> None:
        req, flags, body = self.replies.get(request, (request, 0x5, payload))
        self.sock.sendall(struct.pack("<III", req, flags, len(body)) + body)

    def run(self) -> None:
        try:
            while True:
                hdr, nfds = self._recv(12)
                req, flags, size = struct.unpack("<III", hdr)
                payload, more = self._recv(size) if size else (b"", 0)
                self.received.append((req, flags, size, nfds + more))
                u64 = lambda v: struct.pack("<Q", v)  # noqa: E731
                if req == R.GET_FEATURES:
                    self._reply(req, u64(self.features))
                elif req == R.GET_PROTOCOL_FEATURES:
                    self._reply(req, u64(self.protocol))
                elif req == R.GET_QUEUE_NUM:
                    self._reply(req, u64(2))
                elif req == R.GET_MAX_MEM_SLOTS:
                    self._reply(req, u64(32))
                elif req == R.GET_VRING_BASE:
                    index = struct.unpack_from("<I", payload)[0]
                    self._reply(req, struct.pack("<II", index, self.bases.get(index, 0)))
                elif flags & 0x8:
                    self._reply(req, u64(self.ack))
        except (EOFError, OSError):
            pass


def _pair(**peer_kw) -> tuple[Frontend, ScriptedPeer]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    peer = ScriptedPeer(theirs, **peer_kw)
    peer.start()
    return Frontend(ours, mem_size=8 << 20, timeout=1.0), peer


@pytest.fixture
def started():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    peer = ScriptedPeer(theirs)
    peer.start()
    with Frontend(ours, mem_size=8 << 20, timeout=1.0, queue_size=16) as fe:
        fe.negotiate()
        fe.start_queues()
        yield fe
    theirs.close()


def _proxy(name: str):
    path = TRANSCRIPTS / name
    if not path.exists():
        pytest.skip(f"reference transcript {path} not found")
    return [(d, n, f, s, k) for d, n, f, s, k in load_proxy_transcript(path)]


def _ours(fe: Frontend):
    return [(e.direction, e.name, e.flags, e.size, e.fds) for e in fe.transcript]


# ---------------------------------------------------------------- control plane

@pytest.mark.parametrize("log, features, protocol", [
    ("proxy_p0.log", 0x140000000, 0x0),
    ("proxy_min.log", 0x140000000, 0x8),
    ("proxy_t2.log", VIRTIOFSD_FEATURES, VIRTIOFSD_PROTOCOL),
])
def test_sequences_match_qemu_transcripts(log, features, protocol):
    qemu = _proxy(log)
    fe, peer = _pair(features=features, protocol=protocol)
    with fe:
        fe.negotiate()
        fe.start_queues()
        fe.stop_queues()
        ours = _ours(fe)
        assert ours == qemu[:len(ours)]
        # the log either ends there (QEMU quit) or restarts the rings (guest reboot)
        assert len(qemu) == len(ours) or qemu[len(ours)][1] == "SET_VRING_CALL"


def test_no_protocol_features_is_refused_like_qemu():
    qemu = _proxy("proxy_nopf.log")
    fe, peer = _pair(features=Feature.VERSION_1)
    with fe, pytest.raises(NegotiationError, match="PROTOCOL_FEATURES"):
        fe.negotiate()
    assert _ours(fe) == qemu


@pytest.mark.parametrize("reply, match", [
    ((R.GET_FEATURES, 0xD, struct.pack("<Q", 1 << 32)), "flags 0xd"),
    ((R.GET_FEATURES, 0x1, struct.pack("<Q", 1 << 32)), "flags 0x1"),
    ((R.GET_FEATURES, 0x5, b"\0" * 4), "size 4"),
    ((R.GET_PROTOCOL_FEATURES, 0x5, struct.pack("<Q", 1 << 32)), "GET_PROTOCOL_FEATURES"),
])
def test_bad_replies_are_rejected(reply, match):
    fe, peer = _pair(replies={R.GET_FEATURES: reply})
    with fe, pytest.raises(BackendProtocolError, match=match):
        fe.negotiate()


def test_nack_fails_the_memory_table():
    fe, peer = _pair(protocol=int(ProtocolFeature.REPLY_ACK), ack=1)
    with fe:
        fe.negotiate()
        with pytest.raises(BackendProtocolError, match="NACKed SET_MEM_TABLE"):
            fe.start_queues()


def test_unsolicited_reply_is_detected():
    fe, peer = _pair(protocol=0)
    with fe:
        fe.negotiate()
        # an ACK nobody asked for (no REPLY_ACK was negotiated)
        peer.sock.sendall(struct.pack("<IIIQ", R.SET_MEM_TABLE, 0x5, 8, 0))
        with pytest.raises(BackendProtocolError, match="unsolicited"):
            fe.start_queues()


def test_get_vring_base_index_must_echo():
    fe, peer = _pair(replies={R.GET_VRING_BASE: (R.GET_VRING_BASE, 0x5, struct.pack("<II", 7, 3))})
    with fe:
        fe.negotiate()
        fe.start_queues()
        with pytest.raises(BackendProtocolError, match="answered for queue 7"):
            fe.stop_queues()


# ---------------------------------------------------------------- guest memory

def test_qemu_memory_layout():
    mem = GuestMemory(8 << 20)
    try:
        low, high = mem.regions
        assert (low.guest_phys_addr, low.memory_size, low.mmap_offset) == (0, 0xA0000, 0)
        assert (high.guest_phys_addr, high.memory_size, high.mmap_offset) == (0xC0000, (8 << 20) - 0xC0000, 0xC0000)
        assert high.userspace_addr - low.userspace_addr == 0xC0000
        addrs = [mem.alloc(0x10000, 16) for _ in range(20)]
        assert all(not (0xA0000 <= a < 0xC0000) and mem.contains(a, 0x10000) for a in addrs)
        assert min(addrs) >= 0x1000
    finally:
        mem.close()


def test_allocator_coalesces_and_reports_exhaustion():
    mem = GuestMemory(2 << 20, "single")
    try:
        a, b, c = mem.alloc(0x1000), mem.alloc(0x1000), mem.alloc(0x1000)
        mem.free(b)
        mem.free(a)
        mem.free(c)
        assert mem.allocated == 0
        big = mem.alloc((2 << 20) - 0x1000, 4096)     # everything is one extent again
        mem.free(big)
        with pytest.raises(GuestMemoryFull, match="largest free extent"):
            mem.alloc(4 << 20)
        with pytest.raises(HarnessUsageError):
            mem.free(0x1234)
    finally:
        mem.close()


# ---------------------------------------------------------------- rings

@pytest.mark.parametrize("size, avail, used", [(1024, 0x4000, 0x4840), (128, 0x800, 0x940)])
def test_ring_layout_matches_linux(size, avail, used):
    assert DriverQueue.layout(size)[:2] == (avail, used)


def test_vring_need_event():
    assert vring_need_event(0, 1, 0)
    assert not vring_need_event(5, 5, 4)
    assert vring_need_event(5, 7, 4)
    assert vring_need_event(0xFFFF, 0, 0xFFFE)       # across the wrap


def _walk(fe: Frontend, q: DriverQueue, head: int) -> list[tuple[int, int, int]]:
    """The simulated device: (gpa, len, flags) of each segment of the chain at ``head``."""
    view = fe.memory.view
    addr, ln, fl, nxt = struct.unpack_from("<QIHH", view, q.desc_gpa + 16 * head)
    if fl & VRING_DESC_F_INDIRECT:
        table = [struct.unpack_from("<QIHH", view, addr + 16 * k) for k in range(ln // 16)]
        out, k = [], 0
        while True:
            a, l2, f2, n2 = table[k]
            out.append((a, l2, f2))
            if not f2 & VRING_DESC_F_NEXT:
                return out
            k = n2
    out = [(addr, ln, fl)]
    while fl & VRING_DESC_F_NEXT:
        addr, ln, fl, nxt = struct.unpack_from("<QIHH", view, q.desc_gpa + 16 * nxt)
        out.append((addr, ln, fl))
    return out


def _device_pop(fe: Frontend, q: DriverQueue, last: int) -> tuple[list[int], int]:
    view = fe.memory.view
    idx = struct.unpack_from("<H", view, q.avail_gpa + 2)[0]
    heads = []
    while last != idx:
        heads.append(struct.unpack_from("<H", view, q.avail_gpa + 4 + 2 * (last % q.size))[0])
        last = (last + 1) & 0xFFFF
    return heads, last


def _device_push(fe: Frontend, q: DriverQueue, entries: list[tuple[int, int]]) -> None:
    view = fe.memory.view
    idx = struct.unpack_from("<H", view, q.used_gpa + 2)[0]
    for head, ln in entries:
        struct.pack_into("<II", view, q.used_gpa + 4 + 8 * (idx % q.size), head, ln)
        idx = (idx + 1) & 0xFFFF
    struct.pack_into("<H", view, q.used_gpa + 2, idx)


def test_indirect_chain_as_linux_builds_it(started):
    q = started.queue(1)
    head = q.submit([b"h" * 40, b"a" * 16], [16, 104])
    heads, _ = _device_pop(started, q, 0)
    assert heads == [head]
    segs = _walk(started, q, head)
    assert [(ln, fl & VRING_DESC_F_WRITE) for _, ln, fl in segs] == [(40, 0), (16, 0), (16, 2), (104, 2)]
    assert started.memory.read(segs[1][0], 16) == b"a" * 16
    started.memory.write(segs[2][0], b"R" * 16)
    _device_push(started, q, [(head, 16)])
    (comp,) = q.poll()
    assert comp.head == head and comp.used_len == 16 and comp.data[:16] == b"R" * 16
    assert comp.capacity == 120


def test_direct_chains_without_indirect_and_queue_full(started):
    q = started.queue(1)
    heads = [q.submit([b"x" * 8], [8], indirect=False) for _ in range(8)]   # 2 descriptors each
    assert q.free_descriptors == 0
    with pytest.raises(QueueFull):
        q.add([b"y"], [4], indirect=False)
    segs = _walk(started, q, heads[3])
    assert [(ln, fl) for _, ln, fl in segs] == [(8, VRING_DESC_F_NEXT), (8, VRING_DESC_F_WRITE)]
    popped, _ = _device_pop(started, q, 0)
    _device_push(started, q, [(h, 0) for h in reversed(popped)])          # out of order
    assert sorted(c.head for c in q.poll()) == sorted(heads)
    assert q.free_descriptors == 16 and q.in_flight == 0


def test_memory_is_returned_after_completion(started):
    q = started.queue(1)
    before = started.memory.allocated
    for _ in range(3):
        heads = [q.submit([b"z" * 100], [4096, 4096]) for _ in range(4)]
        _device_push(started, q, [(h, 0) for h in heads])
        assert len(q.poll()) == 4
    assert started.memory.allocated == before


def test_event_idx_decides_kicks(started):
    q = started.queue(1)
    assert q.event_idx
    k0 = q.kicks
    h = q.submit([b"a"], [16])             # avail_event starts at 0: 0 -> 1 crosses it
    assert q.kicks == k0 + 1
    q.submit([b"b"], [16])                 # device has not asked again: no kick
    assert q.kicks == k0 + 1
    q.raw.memory.write(q.used_gpa + 4 + 8 * q.size, struct.pack("<H", 2))   # avail_event = 2
    q.submit([b"c"], [16])
    assert q.kicks == k0 + 2
    assert struct.unpack_from("<H", started.memory.view, q.avail_gpa + 4 + 2 * q.size)[0] == q.last_used_idx
    _device_push(started, q, [(h, 0)])
    assert [c.head for c in q.poll()] == [h]


def test_no_notify_flag_without_event_idx():
    fe, peer = _pair(features=0x150000000, protocol=0)   # VERSION_1 + INDIRECT + PROTOCOL_FEATURES
    with fe:
        fe.negotiate()
        fe.start_queues()
        q = fe.queue(1)
        assert not q.event_idx
        q.submit([b"a"], [16])
        assert q.kicks == 1
        fe.memory.write(q.used_gpa, struct.pack("<H", VRING_USED_F_NO_NOTIFY))
        q.submit([b"b"], [16])
        assert q.kicks == 1


def test_strict_completion_checks(started):
    q = started.queue(1)
    h = q.submit([b"a"], [16])
    _device_push(started, q, [(h + 5, 0)])
    with pytest.raises(BackendProtocolError, match="not in flight"):
        q.poll()
    _device_push(started, q, [(h, 17)])
    with pytest.raises(BackendProtocolError, match="more than its writable capacity 16"):
        q.poll()
    # the offending entry was consumed: its completion is still delivered, nothing is re-read
    assert [(c.head, c.used_len) for c in q.poll()] == [(h, 17)]
    q.strict = False
    _device_push(started, q, [(h, 0)])
    assert q.poll() == [] and "not in flight" in q.anomalies[-1]
    h2 = q.submit([b"b"], [16])
    _device_push(started, q, [(h2, 16)])
    assert [c.head for c in q.poll()] == [h2]


def test_prepared_chains_survive_completion(started):
    q = started.queue(1)
    heads = [q.prepare([b"p" * 8], [32]) for _ in range(4)]
    for rnd in range(3):
        q.republish(heads)
        with pytest.raises(HarnessUsageError, match="in flight"):
            q.republish(heads[:1])
        popped, _ = _device_pop(started, q, (rnd * 4) & 0xFFFF)
        assert popped == heads
        _device_push(started, q, [(h, 32) for h in popped])
        assert sorted(q.reap()) == sorted((h, 32) for h in heads)


def test_raw_submit_publishes_before_kicking(started):
    q = started.queue(1)
    buf = q.raw.alloc(64)
    k0 = q.kicks
    head = q.raw.submit([(buf, 64, VRING_DESC_F_WRITE, 0)])
    popped, _ = _device_pop(started, q, 0)
    assert popped == [head] and q.kicks == k0 + 1
    assert q.raw.read_desc(head) == (buf, 64, VRING_DESC_F_WRITE, 0)
    _device_push(started, q, [(head, 64)])
    assert q.wait_for(head, timeout=0.5).used_len == 64
