"""The /dev/fuse transport loop, with a SOCK_SEQPACKET pair standing in for /dev/fuse.

A seqpacket socket keeps message boundaries the way /dev/fuse does (one request
per read, one reply per write), so the loop's framing, file-segment replies,
asynchronous replies and end-of-session handling are tested without a mount.
Both ways of sending file segments run: spliced through the transport's pipe
and copied with pread + writev.  A socket, unlike /dev/fuse, splits a spliced
reply of more than a few pages into several messages, so large spliced replies
are checked with a plain pipe as the session fd, and the splice faults the
kernel could return are injected by wrapping ``os.splice``.
Real mounts are in tests/functional/test_nydusd_fuse.py.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import socket
import struct

import pytest

from nydus_vfs.fuse.ops import FileSegment
from nydus_vfs.transport.fusedev import FuseDevTransport

needs_splice = pytest.mark.skipif(not hasattr(os, "splice"), reason="os.splice needs Linux and Python 3.10+")


def _hdr(length: int, error: int, unique: int) -> bytes:
    return struct.pack("<IiQ", length, error, unique)


class StubServer:
    """Replies by the first request byte: b"B" bytes, b"S" a file segment, b"A" async, b"N" none."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size = fd, size

    def handle(self, request: bytes):
        unique = struct.unpack_from("<Q", request, 8)[0]
        kind = request[:1]
        if kind == b"B":
            return _hdr(16 + 5, 0, unique) + b"hello"
        if kind == b"S":
            off = struct.unpack_from("<Q", request, 16)[0]
            return [_hdr(16 + 4, 0, unique), FileSegment(self.fd, off, 4)]
        if kind == b"A":
            async def later():
                await asyncio.sleep(0)
                return _hdr(16 + 3, 0, unique) + b"hey"
            return later()
        return None


def _req(kind: bytes, unique: int, extra: int = 0) -> bytes:
    return kind + b"\0" * 7 + struct.pack("<QQ", unique, extra) + b"\0" * 16


@pytest.mark.parametrize("splice", [True, False], ids=["splice", "copy"])
def test_transport_round_trips(tmp_path, splice):
    data = tmp_path / "cache"
    data.write_bytes(b"0123456789")
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with open(data, "rb") as f:
        transport = FuseDevTransport(ours.fileno(), StubServer(f.fileno(), 10), bufsize=4096, splice=splice)

        async def scenario():
            run = asyncio.ensure_future(transport.run())
            loop = asyncio.get_running_loop()
            peer.setblocking(False)
            requests = (_req(b"B", 1), _req(b"N", 2), _req(b"S", 3, 6), _req(b"S", 4, 8),
                        _req(b"A", 5), _req(b"S", 6, 0))
            for req in requests:
                peer.send(req)
            replies = []
            while len(replies) < 5:
                replies.append(await loop.sock_recv(peer, 4096))
            peer.close()  # the "kernel" goes away: the loop must end by itself
            await asyncio.wait_for(run, 5)
            return replies

        replies = asyncio.new_event_loop().run_until_complete(scenario())
    ours.close()
    by_unique = {struct.unpack_from("<Q", r, 8)[0]: r for r in replies}
    assert by_unique[1] == _hdr(21, 0, 1) + b"hello"
    assert by_unique[3] == _hdr(20, 0, 3) + b"6789"
    # Past the end of the cache file: never padded, an EIO header instead.
    assert by_unique[4] == _hdr(16, -errno.EIO, 4)
    assert by_unique[5] == _hdr(19, 0, 5) + b"hey"
    # After a failed reply the next one is not polluted by its leftovers.
    assert by_unique[6] == _hdr(20, 0, 6) + b"0123"
    assert 2 not in by_unique


@pytest.fixture
def blob(tmp_path):
    payload = os.urandom(300_000)
    path = tmp_path / "blob"
    path.write_bytes(payload)
    fd = os.open(path, os.O_RDONLY)
    yield fd, payload
    os.close(fd)


@pytest.fixture
def seqpacket():
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    peer.setblocking(False)
    yield ours, peer
    ours.close()
    peer.close()


def _received(peer: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(peer.recv(1 << 20))
        except BlockingIOError:
            return out


def _read_reply(parts: list) -> list:
    total = 16 + sum(p.length if isinstance(p, FileSegment) else len(p) for p in parts)
    return [_hdr(total, 0, 7)] + parts


@needs_splice
def test_large_spliced_reply_arrives_whole(blob):
    fd, payload = blob
    out_r, out_w = os.pipe()
    fcntl.fcntl(out_w, fcntl.F_SETPIPE_SZ, 1 << 20)
    try:
        transport = FuseDevTransport(out_w, None, bufsize=1 << 20)
        # Unaligned file offsets, bytes between segments, two files' worth of pages.
        reply = _read_reply([FileSegment(fd, 123, 70_000), b"mid", FileSegment(fd, 200_001, 99_999)])
        transport._write(reply)
        got = os.read(out_r, 1 << 20)
    finally:
        os.close(out_r)
        os.close(out_w)
    assert got == reply[0] + payload[123:70_123] + b"mid" + payload[200_001:300_000]


@needs_splice
def test_reply_bigger_than_the_pipe_is_copied(blob, seqpacket, monkeypatch):
    fd, payload = blob
    ours, peer = seqpacket
    calls = []
    real_splice = os.splice
    monkeypatch.setattr(os, "splice", lambda *a, **k: calls.append(a) or real_splice(*a, **k))
    # bufsize 4096 leaves the pipe at its default 64 KiB: a 100 KB reply cannot fit.
    transport = FuseDevTransport(ours.fileno(), None, bufsize=4096)
    transport._write(_read_reply([FileSegment(fd, 5, 100_000)]))
    transport._write(_read_reply([FileSegment(fd, 5, 1000)]))
    got = _received(peer)
    assert got == [_hdr(100_016, 0, 7) + payload[5:100_005], _hdr(1016, 0, 7) + payload[5:1005]]
    assert len(calls) == 2  # only the small reply was spliced: file -> pipe, pipe -> session


class _FaultySplice:
    """Wraps os.splice and raises ``err`` on call number ``at`` (counting from 0)."""

    def __init__(self, monkeypatch, at: int, err: int) -> None:
        self.real = os.splice
        self.at, self.err, self.calls = at, err, 0
        monkeypatch.setattr(os, "splice", self)

    def __call__(self, *args, **kwargs):
        n = self.calls
        self.calls += 1
        if n == self.at:
            raise OSError(self.err, os.strerror(self.err))
        return self.real(*args, **kwargs)


@needs_splice
def test_file_refusing_splice_midway_is_copied_and_pipe_cleared(blob, seqpacket, monkeypatch):
    fd, payload = blob
    ours, peer = seqpacket
    # The first segment is already in the pipe when the second one fails.
    faulty = _FaultySplice(monkeypatch, at=1, err=errno.EINVAL)
    transport = FuseDevTransport(ours.fileno(), None, bufsize=1 << 20)
    transport._write(_read_reply([FileSegment(fd, 0, 10), FileSegment(fd, 50, 10)]))
    transport._write(_read_reply([FileSegment(fd, 100, 10)]))
    assert _received(peer) == [_hdr(36, 0, 7) + payload[:10] + payload[50:60],
                               _hdr(26, 0, 7) + payload[100:110]]
    assert faulty.calls == 4  # the second reply was spliced again


@needs_splice
def test_interrupted_request_leaves_no_stale_pipe_data(blob, seqpacket, monkeypatch):
    fd, payload = blob
    ours, peer = seqpacket
    # ENOENT from the final splice: the kernel dropped the request; our fault
    # also leaves the reply in the pipe, which must not prefix the next reply.
    faulty = _FaultySplice(monkeypatch, at=1, err=errno.ENOENT)
    transport = FuseDevTransport(ours.fileno(), None, bufsize=1 << 20)
    transport._write(_read_reply([FileSegment(fd, 0, 10)]))
    transport._write(_read_reply([FileSegment(fd, 20, 10)]))
    assert _received(peer) == [_hdr(26, 0, 7) + payload[20:30]]
    assert faulty.calls == 4


@needs_splice
def test_session_fd_refusing_splice_switches_to_copies(blob, seqpacket, monkeypatch):
    fd, payload = blob
    ours, peer = seqpacket
    faulty = _FaultySplice(monkeypatch, at=1, err=errno.EINVAL)
    transport = FuseDevTransport(ours.fileno(), None, bufsize=1 << 20)
    transport._write(_read_reply([FileSegment(fd, 0, 10)]))
    transport._write(_read_reply([FileSegment(fd, 20, 10)]))
    assert _received(peer) == [_hdr(26, 0, 7) + payload[:10], _hdr(26, 0, 7) + payload[20:30]]
    assert faulty.calls == 2  # nothing spliced after the refusal


@pytest.mark.parametrize("splice", [True, False], ids=["splice", "copy"])
def test_unreadable_segment_gives_eio(tmp_path, seqpacket, splice):
    ours, peer = seqpacket
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)  # neither splice nor pread works
    try:
        transport = FuseDevTransport(ours.fileno(), None, bufsize=4096, splice=splice)
        transport._write(_read_reply([FileSegment(dir_fd, 0, 10)]))
    finally:
        os.close(dir_fd)
    assert _received(peer) == [_hdr(16, -errno.EIO, 7)]

