"""The /dev/fuse transport loop, with a SOCK_SEQPACKET pair standing in for /dev/fuse.

A seqpacket socket keeps message boundaries the way /dev/fuse does (one request
per read, one reply per write), so the loop's framing, file-segment replies,
asynchronous replies and end-of-session handling are tested without a mount.
Real mounts are in tests/functional/test_nydusd_fuse.py.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct

from nydus_vfs.fuse.ops import FileSegment
from nydus_vfs.transport.fusedev import FuseDevTransport


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


def test_transport_round_trips(tmp_path):
    data = tmp_path / "cache"
    data.write_bytes(b"0123456789")
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with open(data, "rb") as f:
        transport = FuseDevTransport(ours.fileno(), StubServer(f.fileno(), 10), bufsize=4096)

        async def scenario():
            run = asyncio.ensure_future(transport.run())
            loop = asyncio.get_running_loop()
            peer.setblocking(False)
            for req in (_req(b"B", 1), _req(b"N", 2), _req(b"S", 3, 6), _req(b"S", 4, 8), _req(b"A", 5)):
                peer.send(req)
            replies = []
            while len(replies) < 4:
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
    assert 2 not in by_unique
