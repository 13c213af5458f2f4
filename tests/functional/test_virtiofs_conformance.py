"""vhost-user-fs conformance of ``transport.virtiofs`` + the C shim, driven like QEMU 7.2.

The front-end is the VM-less harness (``tests.harness``): QEMU 7.2's message
order (checked against the proxy transcripts in the shared reference), Linux
6.1's split rings with indirect tables and EVENT_IDX, FUSE on top.  Scenarios
follow ``vhost-user-fs.md`` §1.2 / §5.3: start-up, start, pause/resume at a
non-zero base (GET_VRING_BASE waits for in-flight requests), reset (INIT
again, no DESTROY), a new front-end after a disconnect, SET_MEM_TABLE and
ADD/REM_MEM_REG (also while a request is in flight), call-fd swaps, NOFD,
REPLY_ACK on and off, reply flags 0x5, and FUSE semantics through the rings.
"""

from __future__ import annotations

import asyncio
import errno
import os
import pathlib
import socket
import struct
import threading
import time

import pytest

from nydus_vfs._native import binding
from nydus_vfs.errors import ConfigError
from nydus_vfs.utils.io import FileSegment

pytestmark = pytest.mark.skipif(not binding.available(), reason=f"{binding.unavailable_reason()}")

from tests.harness import (  # noqa: E402
    BackendClosed,
    Feature,
    FuseErrorReply,
    FuseSession,
    Frontend,
    ProtocolFeature,
    VhostUserRequest,
    fuse_wire as fw,
    load_proxy_transcript,
)
from tests.functional import virtiofs_helpers  # noqa: E402
from tests.functional.virtiofs_helpers import (  # noqa: E402
    BIG,
    BIG_ID,
    HELLO,
    HELLO_ID,
    LINK_ID,
    ROOT,
    SLOW_ID,
    Backend,
    connect,
    open_fds,
    started,
    wait_until,
)

backend = virtiofs_helpers.backend  # the fixture

TRANSCRIPTS = pathlib.Path(__file__).resolve().parents[3] / "shared" / "reference" / "vhost-user-transcripts"
R = VhostUserRequest
OFFERED = Feature.VERSION_1 | Feature.PROTOCOL_FEATURES | Feature.INDIRECT_DESC | Feature.EVENT_IDX
OFFERED_PROTOCOL = ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIGURE_MEM_SLOTS


# --------------------------------------------------------------------------- control plane

def test_offer_matches_the_recommended_feature_set(backend):
    with connect(backend) as fe:
        fe.negotiate()
        assert fe.backend_features == OFFERED
        assert fe.backend_protocol_features == OFFERED_PROTOCOL
        assert fe.backend_queue_num == 2
        assert fe.max_mem_slots == 32
        assert fe.acked_features == OFFERED


def test_startup_and_start_follow_the_qemu72_transcript(backend):
    """Blocks A and B of proxy_t2.log, message by message (direction, name, flags, size, fds)."""
    path = TRANSCRIPTS / "proxy_t2.log"
    if not path.exists():
        pytest.skip(f"reference transcript not found at {path}")
    # The reference back-end also offered SLAVE_REQ, which we deliberately do not.
    ref = [e for e in load_proxy_transcript(path) if e[1] != "SET_SLAVE_REQ_FD"]
    # Block C starts with one SET_VRING_ENABLE 0 per queue right before the first GET_VRING_BASE.
    expected = ref[:next(i for i, e in enumerate(ref) if e[1] == "GET_VRING_BASE") - 2]
    with connect(backend, queue_size=1024, mem_size=64 << 20) as fe:
        fe.negotiate()
        fe.start_queues()
        ours = [(e.direction, e.name, e.flags, e.size, e.fds) for e in fe.transcript]
    assert ours == expected


def test_every_reply_has_flags_0x5_and_exact_size(backend):
    with connect(backend) as fe:
        fe.negotiate()
        fe.start_queues()
        fe.stop_queues()
        replies = [e for e in fe.transcript if e.direction == "BE->FE"]
    assert replies and all(e.flags == 0x5 and e.size == 8 for e in replies)
    # GET_FEATURES x2, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM, GET_MAX_MEM_SLOTS,
    # 2 ADD_MEM_REG acks, 2 GET_VRING_BASE.
    assert [e.name for e in replies].count("ADD_MEM_REG") == 2
    assert [e.name for e in replies].count("GET_VRING_BASE") == 2


def test_reply_ack_off_uses_set_mem_table_without_acks(backend):
    """protocol features 0 (proxy_p0.log): one SET_MEM_TABLE, no NEED_REPLY, no stray replies."""
    fe, fs = started(backend, protocol_features=0)
    with fe:
        sent = [e for e in fe.transcript if e.direction == "FE->BE" and e.name == "SET_MEM_TABLE"]
        assert len(sent) == 1 and sent[0].flags == 0x1 and sent[0].fds == 2 and sent[0].size == 72
        assert not [e for e in fe.transcript if e.direction == "BE->FE" and e.name == "SET_MEM_TABLE"]
        assert fs.getattr(ROOT).attr.ino == ROOT
        fe.assert_quiet()


def test_reply_ack_on_acks_set_mem_table(backend):
    """REPLY_ACK without CONFIGURE_MEM_SLOTS (proxy_min.log): SET_MEM_TABLE flags 0x9, ACK 0."""
    fe, fs = started(backend, protocol_features=ProtocolFeature.REPLY_ACK)
    with fe:
        sent = [e for e in fe.transcript if e.name == "SET_MEM_TABLE"]
        assert [(e.direction, e.flags) for e in sent] == [("FE->BE", 0x9), ("BE->FE", 0x5)]
        assert fs.getattr(ROOT).attr.ino == ROOT


def test_need_reply_without_reply_ack_gets_no_reply(backend):
    with connect(backend, protocol_features=0) as fe:
        fe.negotiate()
        fe.send(R.SET_OWNER, flags=0x9)           # NEED_REPLY, but REPLY_ACK was not negotiated
        time.sleep(0.05)
        fe.assert_quiet()
        assert fe.request_u64(R.GET_QUEUE_NUM) == 2


def test_minimal_virtio_features_direct_chains_no_event_idx(backend):
    fe, fs = started(backend, features=Feature.VERSION_1, protocol_features=0)
    with fe:
        assert not fe.acked_features & (Feature.EVENT_IDX | Feature.INDIRECT_DESC)
        entry = fs.lookup(ROOT, "big")
        fh = fs.open(entry.nodeid).fh
        assert fs.read(entry.nodeid, fh, 4096, 128 << 10) == BIG[4096:4096 + (128 << 10)]


def test_one_mib_read_in_an_indirect_table_and_as_a_direct_chain(backend):
    for features in (Feature.VERSION_1 | Feature.INDIRECT_DESC | Feature.EVENT_IDX, Feature.VERSION_1):
        fe, fs = started(backend, features=features, queue_size=1024, mem_size=32 << 20)
        with fe:
            fh = fs.open(BIG_ID).fh
            req = fw.read(BIG_ID, fh, 12345, 1 << 20)
            assert len(req.writable_sizes()) == 257       # out header + 256 pages
            reply = fe.fuse.request(req)
            assert reply.ok and reply.payload == BIG[12345:12345 + (1 << 20)]
        backend.wait_disconnected(backend.connections())


def test_memory_table_add_and_remove_regions(backend):
    fe = connect(backend)
    with fe:
        low, high = fe.memory.regions
        # Keep rings and buffers out of the low region, as a guest would with RAM it unplugs.
        fe.memory.alloc(low.memory_size - 0x1000)
        fe.negotiate()
        fe.start_queues()
        fs = FuseSession(fe)
        fs.init()
        # A region that does not hold the rings can go and come back while running.
        fe.rem_mem_region(low)
        assert backend.call(lambda: backend.transport.device.num_regions) == 1
        assert fs.getattr(ROOT).attr.ino == ROOT
        fe.add_mem_region(low)
        assert backend.call(lambda: backend.transport.device.num_regions) == 2
        # Removing a region nobody has is refused with a non-zero ACK.
        bogus = type(low)(0x7000_0000, 0x1000, low.userspace_addr + 0x7000_0000, 0)
        with pytest.raises(Exception, match="NACKed REM_MEM_REG"):
            fe.rem_mem_region(bogus)
        assert fs.getattr(HELLO_ID).attr.size == len(HELLO)


def test_memory_table_replaced_while_a_request_is_in_flight(backend):
    """The in-flight request's buffers stay mapped; its reply lands where the guest put it."""
    fe, fs = started(backend, protocol_features=ProtocolFeature.REPLY_ACK)
    with fe:
        fh = fs.open(SLOW_ID).fh
        pending = fs.submit(fw.read(SLOW_ID, fh, 0, 4096))
        assert backend.ops.slow_started.wait(5)
        fe.set_mem_table()                       # a fresh table (new mappings, same memory)
        fe.set_mem_table()
        backend.open_gate()
        reply = fs.result(pending)
        assert reply.ok and reply.payload == HELLO


def test_pause_resume_at_nonzero_base_waits_for_in_flight(backend):
    fe, fs = started(backend)
    with fe:
        for _ in range(5):
            fs.getattr(ROOT)
        fh = fs.open(SLOW_ID).fh
        pending = fs.submit(fw.read(SLOW_ID, fh, 0, 4096))
        assert backend.ops.slow_started.wait(5)
        result: dict = {}
        stopper = threading.Thread(target=lambda: result.setdefault("bases", fe.stop_queues()))
        stopper.start()
        time.sleep(0.2)
        # GET_VRING_BASE for the request queue must not be answered while the READ is in flight.
        assert stopper.is_alive()
        assert backend.queue_info(1).stopping
        backend.open_gate()
        stopper.join(5)
        assert not stopper.is_alive()
        bases = result["bases"]
        # The completion was pushed before the reply (the harness picks it up now).
        assert fs.result(pending, timeout=1).payload == HELLO
        assert bases[1] == 8                      # INIT, 5 GETATTR, OPEN, READ
        assert bases[0] == 0
        fe.start_queues()                         # resume at base 8, same FUSE session
        assert backend.queue_info(1).last_avail == 8
        assert fs.getattr(HELLO_ID).attr.size == len(HELLO)
        assert backend.ops.inits == 1


def test_guest_reset_then_new_init_without_destroy(backend):
    fe, fs = started(backend)
    with fe:
        entry = fs.lookup(ROOT, "hello")
        assert backend.server.lookup_count(entry.nodeid) == 1
        fe.stop_queues()
        fe.start_queues(reset=True)               # guest reboot: zeroed rings at base 0
        assert backend.queue_info(1).last_avail == 0
        fs.init()                                 # fresh INIT, no DESTROY before it
        assert backend.ops.inits == 2 and backend.ops.destroys == 1
        assert backend.server.lookup_count(entry.nodeid) == 0
        assert fs.lookup(ROOT, "hello").nodeid == entry.nodeid


def test_new_frontend_after_disconnect_gets_a_fresh_session(backend):
    baseline = open_fds()
    fe, fs = started(backend)
    with fe:
        fs.lookup(ROOT, "hello")
        fh = fs.open(SLOW_ID).fh
        fs.submit(fw.read(SLOW_ID, fh, 0, 4096))  # left in flight: cancelled at disconnect
        assert backend.ops.slow_started.wait(5)
    backend.wait_disconnected(1)
    assert backend.ops.destroys == 1
    # Every fd the front-end passed (kick, call, err, memfd) was closed with the device.
    assert open_fds() - baseline == set()
    with connect(backend) as fe2:
        fe2.negotiate()
        fe2.start_queues()
        fs2 = FuseSession(fe2)
        with pytest.raises(FuseErrorReply) as ei:
            fs2.getattr(ROOT)                     # before INIT: EIO
        assert ei.value.errno == errno.EIO
        fs2.init()
        assert fs2.getattr(ROOT).attr.ino == ROOT
    backend.wait_disconnected(2)


def test_call_fd_swapped_while_a_request_is_in_flight(backend):
    fe, fs = started(backend)
    with fe:
        fh = fs.open(SLOW_ID).fh
        pending = fs.submit(fw.read(SLOW_ID, fh, 0, 4096))
        assert backend.ops.slow_started.wait(5)
        old = fe.queue(1).call_fd
        new = fe.swap_call_fd(1)
        assert new != old
        backend.open_gate()
        assert fs.result(pending).payload == HELLO   # irq mode: waits on the new call fd
        assert fs.getattr(ROOT).attr.ino == ROOT


def test_call_nofd_completions_are_still_pushed(backend):
    fe, fs = started(backend, start={"call_nofd": True})
    with fe:
        assert fe.queue(1).call_fd is None
        assert backend.queue_info(1).call_fd == -1
        assert fs.getattr(ROOT).attr.ino == ROOT


def test_kick_nofd_queue_is_polled(backend):
    fe, fs = started(backend, start={"kick_nofd": True})
    with fe:
        assert backend.queue_info(1).kick_fd == -1 and backend.queue_info(1).running
        assert fs.lookup(ROOT, "hello").nodeid == HELLO_ID


def test_kick_fd_swap_retires_the_old_fd(backend):
    fe, fs = started(backend)
    with fe:
        q = fe.queue(1)
        new_kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        fe.set_vring_kick(1, new_kick)
        old, q.kick_fd = q.kick_fd, new_kick
        os.close(old)
        wait_until(lambda: backend.queue_info(1).kick_fd not in (-1,) and fs.getattr(ROOT))
        assert fs.getattr(HELLO_ID).attr.ino == HELLO_ID


def test_hiprio_forget_completes_with_used_len_0_while_a_request_waits(backend):
    fe, fs = started(backend)
    with fe:
        entry = fs.lookup(ROOT, "hello")
        fh = fs.open(SLOW_ID).fh
        pending = fs.submit(fw.read(SLOW_ID, fh, 0, 4096))
        assert backend.ops.slow_started.wait(5)
        assert fs.forget(entry.nodeid, 1) == 0   # hiprio is served while queue 1 has work in flight
        assert backend.server.lookup_count(entry.nodeid) == 0
        backend.open_gate()
        assert fs.result(pending).payload == HELLO


def test_forget_on_the_request_queue(backend):
    fe, fs = started(backend)
    with fe:
        entry = fs.lookup(ROOT, "hello")
        assert fs.forget(entry.nodeid, 1, queue=1) == 0
        assert backend.server.lookup_count(entry.nodeid) == 0


def test_every_request_queue_is_served(backend):
    fe, fs = started(backend, num_queues=4)
    with fe:
        for q in (1, 2, 3):
            reply = fe.queue(q).fuse_request(fw.FuseOpcode.GETATTR, HELLO_ID, bytes(16), out_size=104)
            assert reply.ok and fw.decode_attr_out(reply.payload).attr.ino == HELLO_ID


def test_a_batch_larger_than_the_pop_batch_is_fully_served(backend):
    fe, fs = started(backend)
    with fe:
        q = fe.queue(1)
        pend = [fs.submit(fw.getattr(ROOT)) for _ in range(200)]   # > 64 per pop
        assert all(fs.result(p).ok for p in pend)
        assert q.in_flight == 0


def test_fuse_semantics_through_the_rings(backend):
    fe, fs = started(backend)
    with fe:
        assert fs.init_out.major == 7
        entry = fs.lookup(ROOT, "hello")
        assert entry.attr.size == len(HELLO)
        with pytest.raises(FuseErrorReply) as ei:
            fs.lookup(ROOT, "missing")
        assert ei.value.errno == errno.ENOENT
        assert fs.readlink(LINK_ID) == b"hello"
        names = sorted(d.dirent.name for d in fs.listdir(ROOT))
        assert names == [b".", b"..", b"big", b"hello", b"link", b"slow", b"sub"]
        assert fs.statfs().blocks == 1000
        fh = fs.open(BIG_ID).fh
        assert fs.read(BIG_ID, fh, len(BIG) - 100, 4096) == BIG[-100:]   # short read at EOF
        fs.release(BIG_ID, fh)
        reply = fe.fuse.request(fw.FuseRequest(fw.FuseOpcode.MKDIR, ROOT, b"\xed\x01\0\0\0\0\0\0x\0",
                                               out_size=128))
        assert reply.errno == errno.EROFS
        reply = fe.fuse.request(fw.FuseRequest(200, ROOT, b"", out_size=0))
        assert reply.errno == errno.ENOSYS
        fs.destroy()
        with pytest.raises(FuseErrorReply):
            fs.getattr(ROOT)


def test_unknown_vhost_user_message_closes_only_that_connection(backend):
    with connect(backend) as fe:
        fe.negotiate()
        fe.send(R.SET_LOG_BASE, struct.pack("<QQ", 0, 0))
        with pytest.raises(BackendClosed):
            fe.request_u64(R.GET_FEATURES)
    backend.wait_disconnected(1)
    assert backend.alive
    fe, fs = started(backend)
    with fe:
        assert fs.getattr(ROOT).attr.ino == ROOT


def test_stale_socket_is_replaced_and_other_files_are_refused(tmp_path):
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()                                     # a dead daemon's socket file
    be = Backend(str(stale))
    try:
        fe, fs = started(be)
        with fe:
            assert fs.getattr(ROOT).attr.ino == ROOT
    finally:
        be.stop()
    assert not stale.exists()                     # removed on shutdown

    regular = tmp_path / "not-a-socket"
    regular.write_text("keep me")
    with pytest.raises(ConfigError, match="not a socket"):
        Backend(str(regular))
    assert regular.read_text() == "keep me"


# --------------------------------------------------------------------------- the server contract

class StandIn:
    """A stand-in FUSE server whose behaviour is chosen by the request's nodeid."""

    OK, TOO_BIG, RAISES, ASYNC_RAISES, NEVER, BAD_FD, SHORT, MIXED, ASYNC_OK, GARBAGE, NOT_AWAITABLE = range(1, 12)

    def __init__(self, big_fd: int) -> None:
        self.big_fd = big_fd
        self.closed = 0

    def handle(self, request, out_capacity):
        _, _, unique, nodeid = struct.unpack_from("<IIQQ", request)
        ok = struct.pack("<IiQ", 16, 0, unique)
        if nodeid == self.OK:
            return ok
        if nodeid == self.TOO_BIG:
            return struct.pack("<IiQ", out_capacity + 8, 0, unique) + bytes(out_capacity - 8)
        if nodeid == self.RAISES:
            raise RuntimeError("server bug")
        if nodeid == self.ASYNC_RAISES:
            async def boom():
                raise RuntimeError("async server bug")
            return boom()
        if nodeid == self.NEVER:
            return asyncio.get_running_loop().create_future()
        if nodeid == self.BAD_FD:
            return [struct.pack("<IiQ", 16 + 100, 0, unique), FileSegment(-1, 0, 100)]
        if nodeid == self.SHORT:
            return [struct.pack("<IiQ", 16 + 100, 0, unique), FileSegment(self.big_fd, len(BIG) - 10, 100)]
        if nodeid == self.MIXED:
            return [struct.pack("<IiQ", 16 + 3 + 5 + 2, 0, unique), b"abc", FileSegment(self.big_fd, 0, 5),
                    bytearray(b"yz")]
        if nodeid == self.GARBAGE:
            return [b"\x01", 42]                     # header too short, part of no known type
        if nodeid == self.NOT_AWAITABLE:
            return 12345
        if nodeid == self.ASYNC_OK:
            async def later():
                await asyncio.sleep(0)
                return ok
            return later()
        raise AssertionError(nodeid)

    def close(self) -> None:
        self.closed += 1


@pytest.fixture
def standin(tmp_path):
    import tempfile

    big = tempfile.TemporaryFile()
    big.write(BIG)
    big.flush()
    server = StandIn(big.fileno())
    be = Backend(str(tmp_path / "vfs.sock"), server=server, stop_timeout=0.3)
    try:
        fe = connect(be)
        fe.negotiate()
        fe.start_queues()
        with fe:
            yield be, fe, server
    finally:
        be.stop()
        big.close()


def _ask(fe: Frontend, nodeid: int, writable=(16, 200)):
    unique = fe.next_unique()
    q = fe.queue(1)
    head = q.submit([fw.pack_in_header(56, fw.FuseOpcode.GETATTR, unique, nodeid), bytes(16)], list(writable))
    comp = q.wait_for(head)
    return comp, unique


def test_server_replies_reach_the_guest_whatever_their_shape(standin):
    be, fe, _ = standin
    comp, unique = _ask(fe, StandIn.OK)
    assert comp.used_len == 16 and fw.decode_out_header(comp.data) == (16, 0, unique)
    comp, unique = _ask(fe, StandIn.ASYNC_OK)
    assert comp.used_len == 16 and fw.decode_out_header(comp.data) == (16, 0, unique)
    comp, unique = _ask(fe, StandIn.MIXED, writable=(16, 4, 20))
    assert comp.used_len == 26 and comp.data[16:26] == b"abc" + BIG[:5] + b"yz"


@pytest.mark.parametrize("nodeid,used_len,err", [
    (StandIn.TOO_BIG, 0, None),          # a reply that does not fit: returned empty, logged
    (StandIn.RAISES, 0, None),           # handle() must not raise; if it does, no hang
    (StandIn.ASYNC_RAISES, 16, errno.EIO),
    (StandIn.BAD_FD, 16, errno.EIO),     # preadv fails: EIO, never garbage
    (StandIn.SHORT, 16, errno.EIO),      # a FileSegment past the end of its file
    (StandIn.GARBAGE, 0, None),          # a list that is no reply at all
    (StandIn.NOT_AWAITABLE, 16, errno.EIO),
])
def test_server_faults_complete_the_chain(standin, nodeid, used_len, err):
    be, fe, _ = standin
    comp, unique = _ask(fe, nodeid)
    assert comp.used_len == used_len
    if err is not None:
        assert fw.decode_out_header(comp.data) == (16, -err, unique)
    assert _ask(fe, StandIn.OK)[0].used_len == 16          # and the queue goes on
    assert be.alive


def test_stop_timeout_cancels_a_stuck_request_with_eintr(standin, caplog):
    be, fe, server = standin
    q = fe.queue(1)
    unique = fe.next_unique()
    head = q.submit([fw.pack_in_header(56, fw.FuseOpcode.GETATTR, unique, StandIn.NEVER), bytes(16)], [16, 200])
    wait_until(lambda: be.queue_info(1).inflight == 1)
    bases = fe.stop_queues()                 # answered once the request is cancelled (0.3 s)
    # The reply waited for the stop timeout (not answered at once with the request lost).
    assert "queue stop waited" in caplog.text and "cancelling them" in caplog.text
    assert bases[1] == 1
    comp = q.wait_for(head)
    assert fw.decode_out_header(comp.data) == (16, -errno.EINTR, unique)


def test_disconnect_closes_the_server_session(standin):
    be, fe, server = standin
    wait_until(lambda: be.queue_info(1).inflight == 0)
    q = fe.queue(1)
    q.submit([fw.pack_in_header(56, fw.FuseOpcode.GETATTR, 2, StandIn.NEVER), bytes(16)], [16, 200])
    wait_until(lambda: be.queue_info(1).inflight == 1)
    fe.close()
    be.wait_disconnected(1)
    assert server.closed == 1


# --------------------------------------------------------------------------- WRITE data from guest memory

O_RDWR_CREAT = 0o2 | 0o100 | 0o100000


class _PassthroughSpy:
    """``FuseServer`` over a writable ``PassthroughFs``, noting what the transport hands it.

    ``payloads`` keeps every WRITE payload (to try it again after its push),
    ``sizes`` the length of every request that came without one.  ``hold``:
    "later" answers a WRITE with a payload from a coroutine a few loop turns on
    (the payload is used only then), "forever" never answers it.
    """

    def __init__(self, shared: pathlib.Path, hold: str | None = None) -> None:
        from nydus_vfs.fs import PassthroughFs, Vfs
        from nydus_vfs.fuse.server import FuseServer

        self.pt = PassthroughFs.from_path(str(shared), writable=True)
        vfs = Vfs(writable=True)
        vfs.mount("/", self.pt)
        self.inner = FuseServer(vfs, readonly=False)
        self.hold = hold
        self.payloads: list = []
        self.sizes: list[int] = []

    def handle(self, request, out_capacity, payload=None):
        if payload is None:
            self.sizes.append(len(request))
            return self.inner.handle(request, out_capacity)
        self.payloads.append(payload)
        if self.hold == "forever":
            return asyncio.get_running_loop().create_future()
        if self.hold == "later":
            async def later():
                for _ in range(3):
                    await asyncio.sleep(0)
                return self.inner.handle(request, out_capacity, payload)
            return later()
        return self.inner.handle(request, out_capacity, payload)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def shared_dir(tmp_path):
    """A shared directory on tmpfs when there is one (64 KiB user xattrs), else under tmp_path."""
    import shutil
    import tempfile

    base = "/dev/shm" if os.path.isdir("/dev/shm") else str(tmp_path)
    d = pathlib.Path(tempfile.mkdtemp(prefix="nydus-vfs-write-", dir=base))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _spy_backend(tmp_path, shared: pathlib.Path, hold: str | None = None) -> tuple[Backend, _PassthroughSpy]:
    spy = _PassthroughSpy(shared, hold)
    return Backend(str(tmp_path / "vfs.sock"), server=spy), spy


def _create(fs: FuseSession, name: str) -> tuple[int, int]:
    payload = fs.call(fw.create(ROOT, name, O_RDWR_CREAT, 0o100644))
    return fw.decode_entry_out(payload).nodeid, fw.decode_open_out(payload[128:]).fh


def _written(fs: FuseSession, req: fw.FuseRequest) -> int:
    return struct.unpack_from("<I", fs.call(req))[0]      # fuse_write_out.size


@pytest.mark.parametrize("features", [None, Feature.VERSION_1], ids=["indirect", "direct"])
def test_one_mib_write_goes_from_guest_memory_to_the_file(tmp_path, shared_dir, features):
    from nydus_vfs.transport.virtiofs import MAX_COPY_BYTES

    be, spy = _spy_backend(tmp_path, shared_dir)
    try:
        kw = {} if features is None else {"features": features}
        fe, fs = started(be, **kw)
        with fe:
            nodeid, fh = _create(fs, "big")
            data = os.urandom(1 << 20)
            assert _written(fs, fw.write(nodeid, fh, 0, data)) == 1 << 20
            tail = os.urandom(200_000)
            assert _written(fs, fw.write(nodeid, fh, 5000, tail)) == len(tail)      # unaligned, mid-file
            small = b"under the copy cap"
            assert _written(fs, fw.write(nodeid, fh, 7, small)) == len(small)
            copied = os.urandom(16384)                    # the longest WRITE the transport copies whole
            assert _written(fs, fw.write(nodeid, fh, 300_000, copied)) == len(copied)
            expect = bytearray(data)
            expect[5000:5000 + len(tail)] = tail
            expect[7:7 + len(small)] = small
            expect[300_000:300_000 + len(copied)] = copied
            assert (shared_dir / "big").read_bytes() == bytes(expect)
            assert fs.read(nodeid, fh, 0, 1 << 20) == bytes(expect)
        # The two long WRITEs came with guest-memory payloads, the short ones as bytes.
        assert [len(p) for p in spy.payloads] == [1 << 20, len(tail)]
        assert type(spy.payloads[0]).__name__ == "_GuestPayload"
        assert {80 + len(small), 80 + len(copied)} <= set(spy.sizes) and max(spy.sizes) <= MAX_COPY_BYTES
        # Pushed: the payloads refuse to be used, on the loop that owns the shim.
        for use in (lambda: spy.payloads[0].tobytes(), lambda: spy.payloads[1][:10].pwrite(0, 0)):
            with pytest.raises(ValueError, match="completed"):
                be.call(use)
    finally:
        be.stop()
        spy.pt.close()


def test_long_setxattr_value_is_read_in_whole(tmp_path, shared_dir):
    """A 64 KiB SETXATTR is a partial request too: read from guest memory, then handled as ever."""
    be, spy = _spy_backend(tmp_path, shared_dir)
    try:
        (shared_dir / "x").write_bytes(b"")
        try:
            os.setxattr(shared_dir / "x", "user.probe", bytes(65536))
        except OSError as exc:
            pytest.skip(f"{shared_dir} cannot hold a 64 KiB user xattr: {exc}")
        fe, fs = started(be)
        with fe:
            nodeid = fs.lookup(ROOT, "x").nodeid
            value = os.urandom(65536)
            fs.call(fw.setxattr(nodeid, "user.big", value))
            assert os.getxattr(shared_dir / "x", "user.big") == value
            assert fs.getxattr(nodeid, "user.big", 65536) == value
        assert spy.payloads == [] and 40 + 8 + len(b"user.big\0") + 65536 in spy.sizes
    finally:
        be.stop()
        spy.pt.close()


def test_write_answered_asynchronously_keeps_its_payload_until_the_push(tmp_path, shared_dir):
    be, spy = _spy_backend(tmp_path, shared_dir, hold="later")
    try:
        fe, fs = started(be)
        with fe:
            nodeid, fh = _create(fs, "f")
            data = os.urandom(300_000)
            pending = fs.submit(fw.write(nodeid, fh, 0, data))
            assert fs.getattr(ROOT).attr.ino == ROOT            # others are served meanwhile
            reply = fs.result(pending)
            assert reply.header.error == 0 and struct.unpack_from("<I", reply.payload)[0] == len(data)
            assert (shared_dir / "f").read_bytes() == data
        with pytest.raises(ValueError):
            be.call(lambda: spy.payloads[0].pwrite(0, 0))
    finally:
        be.stop()
        spy.pt.close()


def test_payload_of_a_request_cut_off_by_a_disconnect_is_dead(tmp_path, shared_dir):
    be, spy = _spy_backend(tmp_path, shared_dir, hold="forever")
    try:
        fe, fs = started(be)
        with fe:
            nodeid, fh = _create(fs, "f")
            fs.submit(fw.write(nodeid, fh, 0, bytes(65536)))
            wait_until(lambda: be.call(lambda: len(spy.payloads)) == 1)
            assert be.call(lambda: len(spy.payloads[0].tobytes())) == 65536   # alive while in flight
        be.wait_disconnected(1)
        # The device and the guest's memory are gone: a clean error, never a touch.
        with pytest.raises(ValueError):
            be.call(lambda: spy.payloads[0].tobytes())
        assert be.alive and (shared_dir / "f").read_bytes() == b""
    finally:
        be.stop()
        spy.pt.close()
