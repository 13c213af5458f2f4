"""``nydus_vfs._native.binding``: loading, version checks, error mapping, ``Device`` basics.

Control-plane bytes are written by hand on a socketpair here (no harness), so
each test pins one rule of the binding or of the shim's message framing.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
import sys
import textwrap

import pytest

from nydus_vfs import __version__
from nydus_vfs._native import binding
from nydus_vfs.errors import LocalProtocolError, RemoteProtocolError, TransportError

needs_shim = pytest.mark.skipif(not binding.available(), reason=f"{binding.unavailable_reason()}")

HDR = struct.Struct("<III")
GET_FEATURES, SET_FEATURES, SET_OWNER, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES = 1, 2, 3, 15, 16
GET_QUEUE_NUM, SET_VRING_CALL = 17, 13


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=60)


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.settimeout(2)
    try:
        yield ours, theirs
    finally:
        ours.close()
        theirs.close()


@pytest.fixture
def dev(pair):
    d = binding.Device(pair[0].fileno())
    try:
        yield d
    finally:
        d.close()


def send(sock: socket.socket, request: int, payload: bytes = b"", flags: int = 1, fds=()) -> None:
    import array

    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([HDR.pack(request, flags, len(payload)) + payload], anc)


def reply(sock: socket.socket) -> tuple[int, int, int, bytes]:
    head = sock.recv(12, socket.MSG_WAITALL)
    req, flags, size = HDR.unpack(head)
    return req, flags, size, sock.recv(size, socket.MSG_WAITALL)


# --------------------------------------------------------------------------- loading

@needs_shim
def test_loaded_shim_matches_this_package():
    assert binding.available() and binding.unavailable_reason() is None
    binding.require()
    assert binding.ffi.string(binding.lib.vhs_version()).decode() == __version__
    assert binding.lib.vhs_abi_version() == binding.ABI_VERSION
    assert binding.lib.VHS_F_EVENT_IDX == binding.F_EVENT_IDX
    assert binding.lib.VHS_PF_CONFIGURE_MEM_SLOTS == binding.PF_CONFIGURE_MEM_SLOTS
    assert (binding.lib.VHS_REQ_OVERSIZE, binding.lib.VHS_REQ_PARTIAL) == (binding.REQ_OVERSIZE, binding.REQ_PARTIAL)
    assert binding.ABI_VERSION == binding.lib.VHS_ABI_VERSION == 3


def test_package_works_without_the_compiled_shim():
    """The import of the extension fails: everything but virtio-fs still imports and says why."""
    proc = _run("""
        import sys
        sys.modules["nydus_vfs._native._vhost_shim"] = None        # ImportError on import
        import nydus_vfs, nydus_vfs.transport, nydus_vfs.transport.fusedev, nydus_vfs.fuse.server
        from nydus_vfs._native import binding
        from nydus_vfs.errors import TransportError
        assert not binding.available()
        try:
            nydus_vfs.transport.VirtioFsTransport(object())
        except binding.NativeShimUnavailable as exc:
            assert isinstance(exc, TransportError) and isinstance(exc, ImportError)
            print(exc)
        else:
            raise SystemExit("no error")
    """)
    assert proc.returncode == 0, proc.stderr
    assert "virtio-fs is unavailable: the native vhost-user shim is not built" in proc.stdout
    assert "pip install -e ." in proc.stdout and "C compiler" in proc.stdout


@needs_shim
def test_stale_build_is_refused_with_the_fix():
    proc = _run("""
        import nydus_vfs._version as v
        v.__version__ = "0.0.0-other"
        from nydus_vfs._native import binding
        print(binding.available(), binding.unavailable_reason())
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("False ")
    assert "stale" in proc.stdout and "this is 0.0.0-other" in proc.stdout and "pip install -e ." in proc.stdout


def test_require_raises_when_unavailable(monkeypatch):
    monkeypatch.setattr(binding, "_UNAVAILABLE", "the native vhost-user shim is not built (test)")
    with pytest.raises(binding.NativeShimUnavailable, match="virtio-fs is unavailable: .*not built"):
        binding.require()


def test_error_classes_say_who_is_at_fault():
    assert issubclass(binding.FrontendDisconnected, TransportError)
    assert issubclass(binding.FrontendDisconnected, ConnectionResetError)
    assert issubclass(binding.FrontendProtocolError, RemoteProtocolError)
    assert issubclass(binding.ShimUsageError, LocalProtocolError)
    assert issubclass(binding.ReplyTooLargeError, LocalProtocolError)
    assert issubclass(binding.ShimOSError, OSError) and issubclass(binding.ShimOSError, TransportError)


# --------------------------------------------------------------------------- Device

@needs_shim
@pytest.mark.parametrize("config", [
    binding.ShimConfig(max_queue_size=1000),          # not a power of two
    binding.ShimConfig(max_queues=65),
    binding.ShimConfig(max_mem_slots=0),
    binding.ShimConfig(features=1 << 34),             # RING_PACKED: not implemented
    binding.ShimConfig(features=1 << 30),             # no VERSION_1
    binding.ShimConfig(protocol_features=1 << 5),     # SLAVE_REQ: not implemented
    binding.ShimConfig(max_copy_bytes=63),            # below the OVERSIZE prefix
])
def test_invalid_config_is_refused(pair, config):
    with pytest.raises(ValueError, match="refused the configuration"):
        binding.Device(pair[0].fileno(), config)


@needs_shim
def test_copy_cap_defaults_to_everything_and_may_be_as_small_as_64(pair):
    cfg = binding.ffi.new("struct vhs_config *")
    binding.lib.vhs_default_config(cfg)
    assert cfg.max_copy_bytes == cfg.max_in_bytes
    binding.Device(pair[0].fileno(), binding.ShimConfig(max_copy_bytes=64)).close()


@needs_shim
def test_readable_part_calls_check_their_arguments(dev):
    with pytest.raises(binding.ShimUsageError, match="head 3 is not in flight"):
        dev.read_in(1, 3, 0, 16)
    with pytest.raises(binding.ShimUsageError, match="head 3 is not in flight"):
        dev.read_in(1, 3, 0, 0)
    with pytest.raises(binding.ShimUsageError, match="queue 99 out of range"):
        dev.pwrite_in(99, 0, 0, 1, 0, 16)


@needs_shim
def test_check_maps_errno_to_exception_classes(dev):
    with pytest.raises(binding.ShimUsageError, match="queue 99 out of range"):
        dev.push(99, 0, 0)
    with pytest.raises(binding.ShimUsageError, match="head 3 is not in flight"):
        dev.push(1, 3, 0)
    with pytest.raises(binding.ShimOSError) as ei:
        binding._check(-errno.EIO, dev._dev)
    assert ei.value.errno == errno.EIO
    assert binding._check(7, dev._dev) == 7


@needs_shim
def test_get_features_reply_is_exact(dev, pair):
    _, fe = pair
    send(fe, GET_FEATURES)
    assert dev.dispatch() == 0
    req, flags, size, body = reply(fe)
    assert (req, flags, size) == (GET_FEATURES, 0x5, 8)
    assert struct.unpack("<Q", body)[0] == (1 << 32) | (1 << 30) | (1 << 29) | (1 << 28)


@needs_shim
def test_config_restricts_the_offer(pair):
    d = binding.Device(pair[0].fileno(), binding.ShimConfig(features=(1 << 32) | (1 << 30), protocol_features=0,
                                                            queue_num=5))
    try:
        _, fe = pair
        send(fe, GET_FEATURES)
        send(fe, GET_PROTOCOL_FEATURES)
        send(fe, GET_QUEUE_NUM)
        d.dispatch()
        assert [struct.unpack("<Q", reply(fe)[3])[0] for _ in range(3)] == [(1 << 32) | (1 << 30), 0, 5]
    finally:
        d.close()


@needs_shim
def test_need_reply_is_acked_only_with_reply_ack(dev, pair):
    _, fe = pair
    send(fe, SET_OWNER, flags=0x9)
    dev.dispatch()
    fe.setblocking(False)
    with pytest.raises(BlockingIOError):
        fe.recv(1)
    fe.setblocking(True)
    send(fe, SET_PROTOCOL_FEATURES, struct.pack("<Q", 1 << 3))
    send(fe, SET_OWNER, flags=0x9)
    dev.dispatch()
    assert dev.protocol_features == 1 << 3
    assert reply(fe) == (SET_OWNER, 0x5, 8, bytes(8))


@needs_shim
def test_rejected_values_are_nacked_and_logged_once(dev, pair):
    _, fe = pair
    send(fe, SET_PROTOCOL_FEATURES, struct.pack("<Q", 1 << 3))
    send(fe, SET_FEATURES, struct.pack("<Q", 1 << 30), flags=0x9)       # no VERSION_1
    ev = dev.dispatch()
    assert ev & binding.EV_LOG
    assert reply(fe) == (SET_FEATURES, 0x5, 8, struct.pack("<Q", 1))
    log = dev.take_log()
    assert len(log) == 1 and "lacks VIRTIO_F_VERSION_1" in log[0]
    assert dev.take_log() == []
    assert dev.features == 0


@needs_shim
def test_split_messages_are_reassembled(dev, pair):
    _, fe = pair
    msg = HDR.pack(SET_PROTOCOL_FEATURES, 1, 8) + struct.pack("<Q", 1 << 3)
    for i in range(len(msg)):
        fe.send(msg[i:i + 1])
        assert dev.dispatch() == 0
    assert dev.protocol_features == 1 << 3


@needs_shim
def test_peer_hangup_raises_frontend_disconnected(dev, pair):
    pair[1].close()
    with pytest.raises(binding.FrontendDisconnected, match="closed the connection"):
        dev.dispatch()
    with pytest.raises(binding.FrontendDisconnected):       # stays dead
        dev.dispatch()


@needs_shim
def test_protocol_violation_raises_and_closes_attached_fds(dev, pair):
    _, fe = pair
    r, w = os.pipe()
    try:
        send(fe, GET_FEATURES, fds=[r])                      # GET_FEATURES carries no fd
        with pytest.raises(binding.FrontendProtocolError, match="1 file descriptors attached, expected 0"):
            dev.dispatch()
    finally:
        os.close(r)
    # The shim's copy of the read end is closed: with ours closed too, writing breaks the pipe.
    with pytest.raises(BrokenPipeError):
        os.write(w, b"x")
    os.close(w)


@needs_shim
def test_unknown_request_is_a_protocol_error(dev, pair):
    send(pair[1], 77)
    with pytest.raises(binding.FrontendProtocolError, match="unsupported request 77"):
        dev.dispatch()


@needs_shim
def test_vring_call_with_nofd_needs_no_fd(dev, pair):
    _, fe = pair
    send(fe, SET_VRING_CALL, struct.pack("<Q", 1 | 0x100))
    assert dev.dispatch() == 0
    assert dev.queue_info(1).call_fd == -1
    assert dev.num_queues == 2


@needs_shim
def test_queue_info_of_a_fresh_queue(dev):
    info = dev.queue_info(0)
    assert info == binding.QueueInfo(0, -1, -1, 0, 0, 0, 0, False, False, False, False, False, False)
    with pytest.raises(binding.ShimUsageError):
        dev.queue_info(64)
    assert dev.pop(1) == ([], 0)


@needs_shim
def test_close_is_idempotent(pair):
    d = binding.Device(pair[0].fileno())
    d.close()
    d.close()
    assert d.closed
    assert pair[0].fileno() >= 0          # the socket stays the caller's


def test_stat_probe_bytes_change_exactly_when_the_inode_does(tmp_path):
    if not binding.available():
        pytest.skip(binding.unavailable_reason())
    f = tmp_path / "f"
    f.write_bytes(b"x")
    fd = os.open(f, os.O_PATH)
    try:
        probe = binding.StatProbe()
        first = probe(fd)
        assert probe(fd) == first and len(first) >= 88
        os.utime(f, ns=(1, 2))                      # timestamps only, to the nanosecond
        moved = probe(fd)
        assert moved != first
        os.utime(f, ns=(1, 3))
        assert probe(fd) != moved
        os.chmod(f, 0o600)
        assert probe(fd) != moved
    finally:
        os.close(fd)
    with pytest.raises(OSError) as info:
        probe(fd)                                  # closed
    assert info.value.errno == errno.EBADF
