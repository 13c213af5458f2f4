"""The harness's FUSE requests have Linux 6.1's shapes; its decoders refuse malformed replies."""

from __future__ import annotations

import struct

import pytest

from tests.harness import BackendProtocolError, fuse_wire as fw


@pytest.mark.parametrize("req, readable, writable", [
    # vhost-user-fs.md §3.1, as C virtiofsd saw a Linux 6.1 guest's requests
    (fw.init(), [40, 64], [16, 64]),
    (fw.getattr(1), [40, 16], [16, 104]),
    (fw.lookup(1, "abc"), [40, 4], [16, 128]),
    (fw.open_(3), [40, 8], [16, 16]),
    (fw.opendir(1), [40, 8], [16, 16]),
    (fw.read(3, 0, 0, 4096), [40, 40], [16, 4096]),
    (fw.read(3, 0, 0, 128 * 1024), [40, 40], [16] + [4096] * 32),
    (fw.readdirplus(1, 0), [40, 40], [16, 4096]),
    (fw.readlink(2), [40], [16, 4095]),
    (fw.statfs(), [40], [16, 80]),
    (fw.release(3, 0), [40, 24], [16]),
    (fw.releasedir(1, 0), [40, 24], [16]),
    (fw.flush(3, 0), [40, 24], [16]),
    (fw.syncfs(), [40, 8], [16]),
    (fw.destroy(), [40], [16]),
    (fw.forget(5, 1), [48], []),
    (fw.getxattr(1, "user.a", 0), [40, 8 + 7], [16, 8]),
    (fw.listxattr(1, 256), [40, 8], [16, 256]),
])
def test_segments(req, readable, writable):
    segs = req.readable_segments(2)
    assert [len(s) for s in segs] == readable
    assert req.writable_sizes() == writable
    length, opcode, unique, nodeid = fw.unpack_in_header(segs[0])[:4]
    assert (length, opcode, unique, nodeid) == (sum(readable), req.opcode, 2, req.nodeid)


def test_init_matches_linux_61():
    args = fw.init().args
    major, minor, ra, flags, flags2 = struct.unpack_from("<IIIII", args)
    assert (major, minor, ra, flags, flags2) == (7, 38, 0x20000, 0x7BFFFFFB, 0xB)
    assert flags & (1 << 30)                      # INIT_EXT, so flags2 counts


def test_nocreds_requests_carry_zero_ids():
    hdr = fw.init().header(2, uid=1000, gid=1000, pid=77)
    assert fw.unpack_in_header(hdr)[4:7] == (0, 0, 0)
    hdr = fw.getattr(1).header(4, uid=1000, gid=100, pid=77)
    assert fw.unpack_in_header(hdr)[4:7] == (1000, 100, 77)


def _entry(nodeid: int, ino: int) -> bytes:
    attr = struct.pack("<QQQQQQIIIIIIIIII", ino, 10, 1, 0, 0, 0, 0, 0, 0, 0o100644, 1, 0, 0, 0, 4096, 0)
    return struct.pack("<QQQQII", nodeid, 0, 1, 1, 0, 0) + attr


def test_direntplus_roundtrip_and_padding():
    recs = b""
    for i, name in enumerate([b"a", b"longer-name"]):
        rec = _entry(10 + i, 100 + i) + struct.pack("<QQII", 100 + i, i + 1, len(name), 8) + name
        recs += rec + b"\0" * (-len(rec) % 8)
    out = fw.decode_direntplus(recs)
    assert [(d.entry.nodeid, d.dirent.name, d.dirent.off) for d in out] == [(10, b"a", 1), (11, b"longer-name", 2)]


@pytest.mark.parametrize("namelen, match", [(0, "namelen 0"), (5000, "namelen 5000"), (40, "runs past")])
def test_bad_dirents_are_named(namelen, match):
    rec = struct.pack("<QQII", 1, 1, namelen, 8) + b"x" * 8
    with pytest.raises(BackendProtocolError, match=match):
        fw.decode_dirents(rec)


def test_short_init_out_is_zero_extended_but_needs_major_minor():
    out = fw.decode_init_out(struct.pack("<IIII", 7, 31, 0x20000, 1))
    assert (out.major, out.minor, out.max_pages, out.flags2) == (7, 31, 0, 0)
    with pytest.raises(BackendProtocolError):
        fw.decode_init_out(b"\x07\0\0\0")


def test_decoders_check_lengths():
    with pytest.raises(BackendProtocolError, match="fuse_entry_out"):
        fw.decode_entry_out(b"\0" * 127)
    with pytest.raises(BackendProtocolError, match="fuse_attr_out"):
        fw.decode_attr_out(b"\0" * 100)
    assert fw.decode_xattr_names(b"user.a\0user.b\0") == [b"user.a", b"user.b"]
    with pytest.raises(BackendProtocolError):
        fw.decode_xattr_names(b"user.a")
