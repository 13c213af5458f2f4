"""nydus_vfs.fuse.codec: wire structs round-trip, refuse short or bad input, helpers."""

from __future__ import annotations

import dataclasses
import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nydus_vfs.errors import LocalProtocolError, RemoteProtocolError
from nydus_vfs.fuse import abi, codec
from nydus_vfs.fuse.abi import Opcode
from nydus_vfs.fuse.ops import Attr, StatFs
from nydus_vfs.testing import FuseRequestFactory

FLAT = [
    codec.InHeader, codec.OutHeader, codec.FuseAttr, codec.Kstatfs, codec.ForgetIn, codec.ForgetOne,
    codec.BatchForgetIn, codec.GetattrIn, codec.OpenIn, codec.OpenOut, codec.ReleaseIn, codec.FlushIn,
    codec.ReadIn, codec.FsyncIn, codec.GetxattrIn, codec.GetxattrOut, codec.AccessIn, codec.InterruptIn,
    codec.LseekIn, codec.LseekOut, codec.SyncfsIn, codec.InitIn, codec.InitOut,
]

_RANGES = {"B": 0xFF, "H": 0xFFFF, "I": 0xFFFF_FFFF, "Q": 0xFFFF_FFFF_FFFF_FFFF}


def test_attr_times_before_1970_encode_as_the_kernel_reads_them():
    # A passthrough file dated before the epoch (a guest may set any s64 time).
    a = Attr(5, 0o100644, mtime=-1, mtimensec=5)
    raw = codec.pack_attr(a)
    assert struct.unpack_from("<Q", raw, 32)[0] == 2**64 - 1


def _field_strategies(cls):
    """One strategy per dataclass field, bounded by the field's C type in ``cls._S``."""
    codes = [c for c in cls._S.format.lstrip("<") if c.isalpha() and c != "x"]
    out = []
    for code in codes[:len(dataclasses.fields(cls))]:
        if code == "i":
            out.append(st.integers(-(2**31), 2**31 - 1))
        elif code == "q":
            out.append(st.integers(-(2**63), 2**63 - 1))
        else:
            out.append(st.integers(0, _RANGES[code]))
    return out


@pytest.mark.parametrize("cls", FLAT, ids=lambda c: c.C_NAME)
@given(data=st.data())
def test_flat_struct_round_trip(cls, data):
    values = [data.draw(s) for s in _field_strategies(cls)]
    obj = cls(*values)
    raw = obj.to_bytes()
    assert len(raw) == cls._S.size
    assert cls.from_bytes(raw) == obj
    # decoding at an offset inside a bigger buffer
    assert cls.from_bytes(b"\xAA" * 3 + raw + b"\xBB", 3) == obj


@pytest.mark.parametrize("cls", FLAT, ids=lambda c: c.C_NAME)
def test_flat_struct_short_buffer_names_the_struct(cls):
    minimum = abi.FUSE_COMPAT_INIT_OUT_SIZE if cls is codec.InitOut else (
        abi.fuse_init_in_compat.size if cls is codec.InitIn else cls._S.size)
    with pytest.raises(RemoteProtocolError, match=cls.C_NAME):
        cls.from_bytes(bytes(minimum - 1))
    with pytest.raises(RemoteProtocolError, match=cls.C_NAME):
        cls.from_bytes(bytes(cls._S.size), offset=cls._S.size - minimum + 1)


def test_to_bytes_out_of_range_is_local_error():
    with pytest.raises(LocalProtocolError, match="fuse_open_out"):
        codec.OpenOut(fh=-1).to_bytes()
    with pytest.raises(LocalProtocolError, match="fuse_attr"):
        codec.EntryOut(attr=codec.FuseAttr(mode=2**32)).to_bytes()


@given(nodeid=st.integers(0, 2**64 - 1), gen=st.integers(0, 2**64 - 1), nsec=st.integers(0, 999_999_999),
       ino=st.integers(0, 2**64 - 1), mode=st.integers(0, 2**32 - 1))
def test_entry_and_attr_out_round_trip(nodeid, gen, nsec, ino, mode):
    attr = codec.FuseAttr(ino=ino, mode=mode, atimensec=nsec, size=12345)
    entry = codec.EntryOut(nodeid, gen, 5, 6, nsec, 0, attr)
    raw = entry.to_bytes()
    assert len(raw) == 128
    assert codec.EntryOut.from_bytes(raw) == entry
    out = codec.AttrOut(7, nsec, 0, attr)
    assert len(out.to_bytes()) == 104
    assert codec.AttrOut.from_bytes(out.to_bytes()) == out
    entry.validate()
    out.validate()


def test_validate_names_field_and_value():
    with pytest.raises(RemoteProtocolError, match=r"fuse_attr\.mtimensec = 0x3b9aca00"):
        codec.FuseAttr(mtimensec=1_000_000_000).validate()
    with pytest.raises(RemoteProtocolError, match=r"fuse_attr\.size"):
        codec.FuseAttr(size=2**63).validate()
    with pytest.raises(RemoteProtocolError, match=r"fuse_entry_out\.entry_valid_nsec"):
        codec.EntryOut(entry_valid_nsec=2**31).validate()
    with pytest.raises(RemoteProtocolError, match=r"fuse_out_header\.error"):
        codec.OutHeader(16, -600, 1).validate(16)
    with pytest.raises(RemoteProtocolError, match=r"fuse_out_header\.error"):
        codec.OutHeader(16, 5, 1).validate()
    with pytest.raises(RemoteProtocolError, match="no payload"):
        codec.OutHeader(24, -2, 1).validate(24)
    codec.OutHeader(16, -511, 1).validate(16)


def test_in_header_validate():
    h = codec.InHeader(len=48, opcode=2, unique=4)
    h.validate(48)
    with pytest.raises(RemoteProtocolError, match=r"fuse_in_header\.len = 0x30.*47 bytes"):
        h.validate(47)
    with pytest.raises(RemoteProtocolError, match="shorter than the header"):
        codec.InHeader(len=39).validate()
    ext = codec.InHeader(len=40, total_extlen=1)
    with pytest.raises(RemoteProtocolError, match="total_extlen"):
        ext.validate(40)
    ext.validate(40, security_ctx=True)


def test_init_in_accepts_pre_7_36_layout_and_folds_flags2():
    old = abi.fuse_init_in_compat.pack(7, 31, 4096, abi.InitFlags.ASYNC_READ)
    init = codec.InitIn.from_bytes(old)
    assert (init.major, init.minor, init.max_readahead, init.flags, init.flags2) == (7, 31, 4096, 1, 0)
    new = codec.InitIn(7, 38, 0, abi.InitFlags.INIT_EXT | 1, 0xB)
    assert new.all_flags == abi.InitFlags.INIT_EXT | 1 | (0xB << 32)
    # flags2 is ignored without INIT_EXT
    assert codec.InitIn(7, 38, 0, 1, 0xB).all_flags == 1


def test_init_out_short_reply_reads_missing_fields_as_zero():
    out = codec.InitOut(7, 38, 1, 2, 3, 4, 5, 6, 7, 8, 9)
    assert codec.InitOut.from_bytes(out.to_bytes()[:24]) == codec.InitOut(7, 38, 1, 2, 3, 4, 5)
    assert codec.InitOut.from_bytes(out.to_bytes()[:8]) == codec.InitOut(7, 38)
    assert len(out.to_bytes_for(38)) == 64
    assert len(out.to_bytes_for(22)) == 24
    assert len(out.to_bytes_for(4)) == 8
    with pytest.raises(RemoteProtocolError, match="major"):
        codec.InitOut(8, 0, time_gran=1).validate()
    with pytest.raises(RemoteProtocolError, match="time_gran"):
        codec.InitOut(7, 38, time_gran=0).validate()


def test_compat_sizes():
    assert [codec.init_out_size(m) for m in (4, 5, 22, 23, 38)] == [8, 24, 24, 64, 64]
    assert [codec.entry_out_size(m) for m in (8, 9)] == [120, 128]
    assert [codec.attr_out_size(m) for m in (8, 9)] == [96, 104]
    assert [codec.statfs_out_size(m) for m in (3, 4)] == [48, 80]


@given(names=st.lists(st.binary(min_size=1, max_size=255).filter(lambda b: b"/" not in b and b"\0" not in b),
                      max_size=8))
def test_dirents_round_trip(names):
    records = [codec.Dirent(i + 10, i + 1, len(n), 8, n) for i, n in enumerate(names)]
    payload = b"".join(r.to_bytes() for r in records)
    for r in records:
        assert len(r.to_bytes()) % 8 == 0
        assert len(r.to_bytes()) == r.record_size()
        r.validate()
    assert list(codec.iter_dirents(payload)) == records
    plus = [codec.DirentPlus(codec.EntryOut(nodeid=r.ino), r) for r in records]
    payload = b"".join(p.to_bytes() for p in plus)
    assert list(codec.iter_direntplus(payload)) == plus


def test_dirent_namelen_past_payload_is_refused():
    raw = abi.fuse_dirent.pack(1, 1, 200, 8) + b"abc"
    with pytest.raises(RemoteProtocolError, match=r"fuse_dirent\.namelen = 0xc8"):
        list(codec.iter_dirents(raw))
    with pytest.raises(RemoteProtocolError, match="padding"):
        list(codec.iter_dirents(abi.fuse_dirent.pack(1, 1, 3, 8) + b"abc"))
    # READDIRPLUS records are walked the same way and name the direntplus.
    plus = codec.EntryOut(nodeid=1).to_bytes() + abi.fuse_dirent.pack(1, 1, 3, 8) + b"abc"
    assert codec.DirentPlus.from_bytes(plus + bytes(5)).namelen == 3
    with pytest.raises(RemoteProtocolError, match=r"fuse_direntplus\.namelen = 0x3: record padding"):
        list(codec.iter_direntplus(plus))
    for bad in (codec.Dirent(1, 1, 0, 8, b""), codec.Dirent(1, 1, 3, 8, b"a/b"), codec.Dirent(1, 1, 2, 8, b"a")):
        with pytest.raises(RemoteProtocolError):
            bad.validate()


def test_decode_request_of_every_factory_method():
    f = FuseRequestFactory(uid=1000, gid=100, pid=42)
    cases = {
        f.init(): (Opcode.INIT, codec.InitIn(7, 38, 0x20000, 0x7BFFFFFB, 0xB), ()),
        f.init(minor=31): (Opcode.INIT, codec.InitIn(7, 31, 0x20000, 0x3BFFFFFB, 0), ()),
        f.lookup(1, b"etc"): (Opcode.LOOKUP, None, (b"etc",)),
        f.forget(5, 3): (Opcode.FORGET, codec.ForgetIn(3), ()),
        f.getattr(5, fh=9): (Opcode.GETATTR, codec.GetattrIn(1, 0, 9), ()),
        f.open(5, 0o100000): (Opcode.OPEN, codec.OpenIn(0o100000, 0), ()),
        f.read(5, 9, 4096, 131072): (Opcode.READ, codec.ReadIn(9, 4096, 131072), ()),
        f.readdirplus(1, 3, 7): (Opcode.READDIRPLUS, codec.ReadIn(3, 7, 4096), ()),
        f.getxattr(5, b"user.a", 0): (Opcode.GETXATTR, codec.GetxattrIn(0), (b"user.a",)),
        f.listxattr(5, 100): (Opcode.LISTXATTR, codec.GetxattrIn(100), ()),
        f.release(5, 9): (Opcode.RELEASE, codec.ReleaseIn(9), ()),
        f.flush(5, 9, 77): (Opcode.FLUSH, codec.FlushIn(9, 0, 0, 77), ()),
        f.fsync(5, 9, True): (Opcode.FSYNC, codec.FsyncIn(9, 1), ()),
        f.lseek(5, 9, 100, 3): (Opcode.LSEEK, codec.LseekIn(9, 100, 3), ()),
        f.access(5, 4): (Opcode.ACCESS, codec.AccessIn(4), ()),
        f.interrupt(8): (Opcode.INTERRUPT, codec.InterruptIn(8), ()),
        f.syncfs(): (Opcode.SYNCFS, codec.SyncfsIn(0), ()),
        f.statfs(): (Opcode.STATFS, None, ()),
        f.destroy(): (Opcode.DESTROY, None, ()),
    }
    for raw, (opcode, arg, names) in cases.items():
        req = codec.decode_request(raw)
        assert req.opcode == opcode
        assert req.arg == arg
        assert req.names == names
        assert req.payload == b""
        assert (req.header.uid, req.header.gid, req.header.pid) == (1000, 100, 42)
        assert req.header.len == len(raw)


def test_decode_request_keeps_unknown_args_and_rejects_bad_headers():
    f = FuseRequestFactory()
    req = codec.decode_request(f.ioctl(1, 0, 0x5401))
    assert req.arg is None and len(req.payload) == 32
    with pytest.raises(RemoteProtocolError, match="len"):
        codec.decode_request(f.getattr(1, length=100))
    with pytest.raises(RemoteProtocolError, match="not NUL-terminated"):
        codec.decode_request(f.lookup(1, b"abc", nul=False))
    with pytest.raises(RemoteProtocolError, match="fuse_read_in"):
        codec.decode_request(f.request(Opcode.READ, 1, bytes(10)))


def test_factory_uniques_step_by_two_and_interrupt_sets_low_bit():
    f = FuseRequestFactory(first_unique=10)
    f.statfs()
    assert f.last_unique == 10
    f.statfs()
    assert f.last_unique == 12
    assert codec.decode_request(f.interrupt(12)).header.unique == 13


def test_pack_attr_is_cached_and_matches_fuse_attr():
    a = Attr(5, 0o100644, size=10, nlink=1, uid=3, gid=4, mtime=100, mtimensec=7, blksize=512)
    raw = codec.pack_attr(a)
    assert a._packed is raw
    assert codec.pack_attr(a) is raw
    decoded = codec.FuseAttr.from_bytes(raw)
    assert decoded == codec.FuseAttr.from_attr(a)
    assert (decoded.ino, decoded.size, decoded.mode, decoded.uid, decoded.gid) == (5, 10, 0o100644, 3, 4)
    assert (decoded.atime, decoded.ctime, decoded.mtimensec, decoded.blksize) == (100, 100, 7, 512)
    with pytest.raises(LocalProtocolError, match="fuse_attr"):
        codec.pack_attr(Attr(-1, 0))


def test_pack_statfs():
    raw = codec.pack_statfs(StatFs(blocks=10, files=3, bsize=4096, namelen=255, frsize=4096))
    assert len(raw) == 80
    assert codec.Kstatfs.from_bytes(raw) == codec.Kstatfs(10, 0, 0, 3, 0, 4096, 255, 4096, 0)
    assert len(codec.pack_statfs(StatFs(), minor=3)) == 48


@pytest.mark.parametrize("seconds, expected", [
    (0, (0, 0)), (-5, (0, 0)), (math.nan, (0, 0)), (1.5, (1, 500_000_000)), (2.0, (2, 0)),
    (0.9999999999, (1, 0)), (math.inf, (100 * 365 * 86400, 0)), (1e30, (100 * 365 * 86400, 0)),
])
def test_split_timeout(seconds, expected):
    assert codec.split_timeout(seconds) == expected


def test_error_reply():
    assert struct.unpack("<IiQ", codec.error_reply(7, 2)) == (16, -2, 7)
    # out-of-range errno values would be misread by the kernel: EIO instead
    assert struct.unpack("<IiQ", codec.error_reply(7, 0)) == (16, -5, 7)
    assert struct.unpack("<IiQ", codec.error_reply(7, 4000)) == (16, -5, 7)


def test_decode_request_understands_every_write_opcode():
    f = FuseRequestFactory()
    req = codec.decode_request(f.write(5, 7, 4096, b"payload"))
    assert req.arg == codec.WriteIn(fh=7, offset=4096, size=7) and req.payload == b"payload"
    req = codec.decode_request(f.symlink(1, b"name", b"../target"))
    assert req.arg is None and req.names == (b"name", b"../target")
    req = codec.decode_request(f.rename(1, b"old", 2, b"new", flags=2))
    assert req.arg == codec.Rename2In(newdir=2, flags=2) and req.names == (b"old", b"new")
    req = codec.decode_request(f.rename(1, b"old", 2, b"new"))
    assert req.arg == codec.RenameIn(newdir=2) and req.names == (b"old", b"new")
    req = codec.decode_request(f.setxattr(3, b"trusted.overlay.opaque", b"y"))
    assert req.arg == codec.SetxattrIn(size=1) and req.names == (b"trusted.overlay.opaque",) and req.payload == b"y"
    req = codec.decode_request(f.create(1, b"c", 0o100600, 0o101, 0o022))
    assert req.arg == codec.CreateIn(flags=0o101, mode=0o100600, umask=0o022) and req.names == (b"c",)
    req = codec.decode_request(f.mknod(1, b"n", 0o20000, 0, 0))
    assert req.arg == codec.MknodIn(mode=0o20000) and req.names == (b"n",)
    req = codec.decode_request(f.mkdir(1, b"d", 0o755, 0o022))
    assert req.arg == codec.MkdirIn(mode=0o755, umask=0o022) and req.names == (b"d",)
    req = codec.decode_request(f.link(9, 1, b"l"))
    assert req.arg == codec.LinkIn(oldnodeid=9) and req.names == (b"l",)
    req = codec.decode_request(f.setattr(4, 8, size=10))
    assert req.arg == codec.SetattrIn(valid=8, size=10)
    req = codec.decode_request(f.fallocate(4, 1, 2, 3, 4))
    assert req.arg == codec.FallocateIn(fh=1, offset=2, length=3, mode=4)
    req = codec.decode_request(f.copy_file_range(4, 1, 2, 5, 6, 7, 8))
    assert req.arg == codec.CopyFileRangeIn(fh_in=1, off_in=2, nodeid_out=5, fh_out=6, off_out=7, len=8)
    for opcode in (Opcode.GETLK, Opcode.SETLK, Opcode.SETLKW):
        req = codec.decode_request(f.lock(opcode, 4, 1, 2, 3, 4, 1, 9, lk_flags=1))
        assert req.arg == codec.LkIn(fh=1, owner=2, start=3, end=4, type=1, pid=9, lk_flags=1)
    for s in (codec.SetattrIn(valid=1), codec.WriteOut(size=3), codec.LkOut(start=1, end=2, type=1, pid=3)):
        assert type(s).from_bytes(s.to_bytes()) == s
