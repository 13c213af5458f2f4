from __future__ import annotations

import gzip
import io
import os
import tarfile
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nydus_vfs.builder._tar import (BLOCK, DIRTYPE, LNKTYPE, REGTYPE, GzipStream, TarHeader, TarReader,
                                    open_tar_stream, parse_pax, pax_record)
from nydus_vfs.errors import BuildError


def _members(data: bytes, read_data: bool = True):
    reader = TarReader(io.BytesIO(data))
    out = []
    for m in reader:
        out.append((m, reader.read(m.size) if read_data else None))
    return out


def _stdlib_tar(fmt, entries) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for info, data in entries:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _info(name, data=b"", **kw):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in kw.items():
        setattr(info, k, v)
    return info, data


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_reads_what_stdlib_tarfile_writes(fmt):
    long = "d/" + "n" * 150 if fmt != tarfile.USTAR_FORMAT else "d/" + "n" * 90
    entries = [
        _info("d", type=tarfile.DIRTYPE, mode=0o755),
        _info(long, b"long name data", mode=0o640, uid=1000, gid=100, mtime=1_600_000_000),
        _info("d/link", type=tarfile.LNKTYPE, linkname=long),
        _info("d/sym", type=tarfile.SYMTYPE, linkname="t" * (120 if fmt != tarfile.USTAR_FORMAT else 90)),
        _info("d/chr", type=tarfile.CHRTYPE, devmajor=4, devminor=64),
        _info("d/fifo", type=tarfile.FIFOTYPE),
        _info("big", os.urandom(3000)),
    ]
    got = _members(_stdlib_tar(fmt, entries))
    assert [m.path.decode().rstrip("/") for m, _ in got] == [e[0].name for e in entries]
    by = {m.path.decode().rstrip("/"): (m, d) for m, d in got}
    m, d = by[long]
    assert d == b"long name data" and m.mode == 0o640 and (m.uid, m.gid, m.mtime) == (1000, 100, 1_600_000_000)
    assert by["d/link"][0].typeflag == LNKTYPE and by["d/link"][0].linkname == long.encode()
    assert by["d/sym"][0].linkname.startswith(b"ttt")
    assert (by["d/chr"][0].devmajor, by["d/chr"][0].devminor) == (4, 64)
    assert by["d"][0].typeflag == DIRTYPE and by["big"][1] == entries[-1][1]


def test_pax_xattrs_and_nanosecond_mtime():
    info, data = _info("f", b"x")
    info.pax_headers = {"SCHILY.xattr.user.k": "v", "mtime": "1665584430.393557573",
                        "LIBARCHIVE.xattr.user.lib": "Ynl0ZXM", "LIBARCHIVE.xattr.user.k": "aWdub3JlZA"}
    (m, _), = _members(_stdlib_tar(tarfile.PAX_FORMAT, [(info, data)]))
    assert m.xattrs == {b"user.k": b"v", b"user.lib": b"bytes"}   # SCHILY wins over LIBARCHIVE
    assert (m.mtime, m.mtime_nsec) == (1665584430, 393557573)


def test_pax_negative_fraction_mtime():
    info, data = _info("f")
    info.pax_headers = {"mtime": "-1.25"}
    (m, _), = _members(_stdlib_tar(tarfile.PAX_FORMAT, [(info, data)]))
    assert (m.mtime, m.mtime_nsec) == (-2, 750_000_000)


def test_global_pax_header_applies_to_following_entries():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"uid": "77"}) as tf:
        tf.addfile(*(lambda i, d: (i, io.BytesIO(d)))(*_info("a", b"1")))
    (m, d), = _members(buf.getvalue())
    assert m.uid == 77 and d == b"1"


@given(st.binary(min_size=1, max_size=300), st.binary(max_size=300))
def test_pax_record_round_trip(key, value):
    key = key.replace(b"=", b"_").replace(b"\n", b"_")
    rec = pax_record(key or b"k", value)
    assert int(rec.split(b" ", 1)[0]) == len(rec)
    assert parse_pax(rec, "x") == {key or b"k": value}


@pytest.mark.parametrize("bad", [b"10 a=b\n", b"x a=b\n", b"5 =b\n", b"99999999 a=b\n", b"7 ab\n"])
def test_malformed_pax_is_refused(bad):
    with pytest.raises(BuildError, match="PAX"):
        parse_pax(bad, "PAX header at offset 0")


def test_header_round_trip_and_checksum():
    hdr = TarHeader(name=b"dir/file", mode=0o4755, uid=1, gid=2, size=12345, mtime=99, typeflag=REGTYPE)
    raw = hdr.to_bytes()
    assert len(raw) == BLOCK
    back = TarHeader.from_bytes(raw)
    assert back is not None and (back.path, back.mode, back.size, back.mtime) == (b"dir/file", 0o4755, 12345, 99)
    # stdlib agrees with the checksum
    assert tarfile.TarInfo.frombuf(raw, "utf-8", "surrogateescape").name == "dir/file"
    bad = bytearray(raw)
    bad[0] ^= 1
    with pytest.raises(BuildError, match="checksum mismatch"):
        TarHeader.from_bytes(bytes(bad), 1024)


def test_base256_numbers():
    raw = bytearray(TarHeader(name=b"f", size=0).to_bytes())
    raw[124:136] = b"\x80" + (1 << 40).to_bytes(11, "big")
    raw[148:156] = b" " * 8
    raw[148:156] = b"%06o\0 " % sum(raw)
    assert TarHeader.from_bytes(bytes(raw)).size == 1 << 40
    assert TarHeader(name=b"f", uid=8 ** 7 + 5).to_bytes()[108] == 0x80


def test_zero_block_ends_the_archive_and_bad_numbers_are_named():
    assert TarHeader.from_bytes(bytes(BLOCK)) is None
    raw = bytearray(TarHeader(name=b"f").to_bytes())
    raw[124:136] = b"notoctal!!!\0"
    raw[148:156] = b" " * 8
    raw[148:156] = b"%06o\0 " % sum(raw)
    with pytest.raises(BuildError, match="field size: not an octal number"):
        TarHeader.from_bytes(bytes(raw))


def test_metadata_payload_limit():
    hdr = TarHeader(name=b"././@LongLink", size=10 << 20, typeflag=b"L").to_bytes()
    with pytest.raises(BuildError, match="exceeds"):
        list(TarReader(io.BytesIO(hdr + bytes(1024))))


def test_truncated_data_names_the_entry():
    data = _stdlib_tar(tarfile.PAX_FORMAT, [_info("victim", os.urandom(2000))])
    reader = TarReader(io.BytesIO(data[:1024]))
    m = next(iter(reader))
    with pytest.raises(BuildError, match="victim"):
        reader.read(m.size)


def test_unread_data_is_skipped_and_entry_limit():
    data = _stdlib_tar(tarfile.GNU_FORMAT, [_info(f"f{i}", b"z" * 700) for i in range(5)])
    assert [m.path for m, _ in _members(data, read_data=False)] == [b"f%d" % i for i in range(5)]
    with pytest.raises(BuildError, match="tar bomb"):
        list(TarReader(io.BytesIO(data), max_entries=3))


def test_sparse_and_unknown_types_are_refused():
    raw = TarHeader(name=b"s", typeflag=b"S").to_bytes()
    with pytest.raises(BuildError, match="sparse"):
        list(TarReader(io.BytesIO(raw)))
    raw = TarHeader(name=b"q", typeflag=b"Q").to_bytes()
    with pytest.raises(BuildError, match="unsupported tar entry type"):
        list(TarReader(io.BytesIO(raw)))


def test_extended_header_at_end_of_stream():
    raw = TarHeader(name=b"x", size=10, typeflag=b"x").to_bytes() + b"10 a=bcde\n".ljust(512, b"\0")
    with pytest.raises(BuildError, match="extended header"):
        list(TarReader(io.BytesIO(raw)))


def test_gzip_stream_multi_member_and_bounded_reads():
    raw = gzip.compress(b"first-") + gzip.compress(b"second") + b"\0" * 100
    assert GzipStream(io.BytesIO(raw)).read() == b"first-second"
    bomb = gzip.compress(bytes(50 << 20), compresslevel=9)
    s = GzipStream(io.BytesIO(bomb))
    total = 0
    while True:
        piece = s.read(1 << 20)
        assert len(piece) <= 1 << 20
        if not piece:
            break
        total += len(piece)
    assert total == 50 << 20


@pytest.mark.parametrize("mutate,message", [
    (lambda b: b[: len(b) // 2], "truncated"),
    (lambda b: b[:10] + bytes([b[10] ^ 0xFF]) + b[11:], "corrupt"),
    (lambda b: b + b"garbage", "garbage"),
])
def test_gzip_stream_errors(mutate, message):
    raw = gzip.compress(os.urandom(1000) + bytes(100000))
    with pytest.raises(BuildError, match=message):
        GzipStream(io.BytesIO(mutate(raw))).read()


def test_gzip_crc_mismatch_is_detected():
    body = os.urandom(5000)
    raw = bytearray(zlib.compress(body, 0)[2:-4])  # stored deflate blocks
    member = bytearray(gzip.compress(b"", 0)[:10]) + raw + zlib.crc32(body).to_bytes(4, "little") + \
        len(body).to_bytes(4, "little")
    assert GzipStream(io.BytesIO(bytes(member))).read() == body
    member[100] ^= 1
    with pytest.raises(BuildError, match="corrupt"):
        GzipStream(io.BytesIO(bytes(member))).read()


def test_open_tar_stream_sniffs_gzip_on_pipes():
    payload = b"tar bytes" * 100
    r, w = os.pipe()
    os.write(w, gzip.compress(payload))
    os.close(w)
    with os.fdopen(r, "rb") as f:
        assert open_tar_stream(f).read(10**6) == payload
    assert open_tar_stream(io.BytesIO(b"plain")).read(3) == b"pla"
