"""Shared plumbing of the format layer (format/_common.py)."""

from __future__ import annotations

import pytest

from nydus_vfs.errors import FormatError
from nydus_vfs.format import Compressor, Digester, OnDisk, SuperFlags, algorithms_from_flags, flags_from_algorithms
from nydus_vfs.format._common import (
    EntryList,
    XattrPairs,
    align,
    align4k,
    align8,
    check_super_flags,
    check_xattr_name,
    decode_blob_id,
    encode_blob_id,
    layout_slots,
    need,
)


class Sample(OnDisk):
    _LAYOUT = (("magic", "I"), ("count", "H"), ("tag", "4s"), ("reserved", "2s"))
    __slots__ = layout_slots(_LAYOUT)
    _INIT = {"magic": 0xABCD}


def test_ondisk_layout_defaults_and_round_trip():
    assert Sample.SIZE == 12 and Sample.NAME == "Sample"
    s = Sample(count=3, tag=b"ab")
    assert (s.magic, s.count, s.tag, s.reserved) == (0xABCD, 3, b"ab", b"\0\0")
    raw = s.to_bytes()
    assert raw == bytes.fromhex("cdab0000") + b"\x03\x00ab\0\0\0\0"
    back = Sample.from_bytes(b"xx" + raw, 2)
    assert back.tag == b"ab\0\0" and back.fields()["count"] == 3
    assert Sample.from_bytes(back.to_bytes()) == back
    assert back != Sample() and (back == 5) is False
    assert "count=3" in repr(back) and "reserved" not in repr(back)


def test_ondisk_errors_name_the_field():
    with pytest.raises(TypeError, match="no field"):
        Sample(bogus=1)
    with pytest.raises(FormatError) as info:
        Sample(count=70000).to_bytes()
    assert (info.value.structure, info.value.field, info.value.value) == ("Sample", "count", 70000)
    assert "Sample.count = 0x11170" in str(info.value)
    with pytest.raises(FormatError, match="tag.*longer than the 4-byte field"):
        Sample(tag=b"abcde").to_bytes()
    with pytest.raises(FormatError, match="needs 12 bytes at offset 0x4"):
        Sample.from_bytes(b"\0" * 15, 4)


def test_need_and_align():
    need(b"abc", 1, 2, "S")
    for off, size in ((-1, 1), (2, 2), (0, -1)):
        with pytest.raises(FormatError):
            need(b"abc", off, size, "S")
    assert (align8(0), align8(1), align8(8), align4k(1), align4k(4096), align(5, 4)) == (0, 8, 8, 4096, 4096, 8)


def test_algorithm_flag_precedence():
    assert algorithms_from_flags(0) == (Compressor.LZ4_BLOCK, Digester.BLAKE3)
    assert algorithms_from_flags(0x1 | 0x80 | 0x8) == (Compressor.NONE, Digester.SHA256)
    assert algorithms_from_flags(0x2 | 0x40) == (Compressor.LZ4_BLOCK, Digester.BLAKE3)
    assert algorithms_from_flags(0x40 | 0x80) == (Compressor.GZIP, Digester.BLAKE3)
    assert algorithms_from_flags(0x80 | 0x4 | 0x8) == (Compressor.ZSTD, Digester.BLAKE3)
    for comp in Compressor:
        for dig in Digester:
            assert algorithms_from_flags(flags_from_algorithms(comp, dig)) == (comp, dig)
    assert flags_from_algorithms(Compressor.ZSTD, Digester.BLAKE3) == \
        SuperFlags.COMPRESSION_ZSTD | SuperFlags.HASH_BLAKE3


def test_super_flags_and_ids():
    check_super_flags(0x0100_0194, "S")
    with pytest.raises(FormatError, match="0x400"):
        check_super_flags(0x400, "S")
    assert decode_blob_id(b"abc\0\0", "S") == "abc"
    for bad in (b"\0" * 4, b"a b", b"\xff"):
        with pytest.raises(FormatError):
            decode_blob_id(bad, "S")
    assert encode_blob_id("abc", 8, "S") == b"abc\0\0\0\0\0"
    with pytest.raises(FormatError, match="1..8"):
        encode_blob_id("x" * 9, 8, "S")


def test_xattr_names():
    check_xattr_name(b"user.x", "S", "f")
    check_xattr_name(b"system.posix_acl_default", "S", "f")
    for bad in (b"system.other", b"user." + b"x" * 260, b"user.a\0"):
        with pytest.raises(FormatError):
            check_xattr_name(bad, "S", "f")


def test_array_from_bytes_checks_the_whole_span_first():
    raw = Sample(count=1).to_bytes() + Sample(count=2).to_bytes()
    assert [s.count for s in Sample.array_from_bytes(b"x" + raw, 1, 2, "Table")] == [1, 2]
    assert Sample.array_from_bytes(raw, 0, 0, "Table") == []
    # A hostile count fails on the span, naming the containing structure and field.
    with pytest.raises(FormatError) as info:
        Sample.array_from_bytes(raw, 0, 1 << 40, "Table", "count")
    assert (info.value.structure, info.value.field) == ("Table", "count")


class Things(EntryList):
    __slots__ = ()
    NAME = "Things"


class OtherThings(EntryList):
    __slots__ = ()
    NAME = "OtherThings"


def test_entry_list_value_semantics():
    a = Things(iter([1, 2]))
    assert a.entries == [1, 2] and len(a) == 2 and len(Things()) == 0
    assert a == Things([1, 2]) and a != Things([2, 1])
    # Same entries in another structure are not equal.
    assert a != OtherThings([1, 2]) and (a == [1, 2]) is False
    assert repr(a) == "Things([1, 2])"
    with pytest.raises(TypeError):
        hash(a)


class Pairs(XattrPairs):
    __slots__ = ()
    NAME = "Pairs"


def test_xattr_pairs_validate_and_compare():
    p = Pairs([(bytearray(b"user.a"), b"1"), (b"trusted.b", memoryview(b"2"))])
    assert p.pairs == [(b"user.a", b"1"), (b"trusted.b", b"2")]
    assert p.as_dict() == {b"user.a": b"1", b"trusted.b": b"2"}
    p.validate()
    assert p == Pairs(p.pairs) and p != Pairs(p.pairs[::-1]) and repr(p).startswith("Pairs([(b'user.a'")
    for pairs, field in (([(b"user.a", b""), (b"user.a", b"")], "pairs[1].name"),
                         ([(b"user.a", b"x" * (64 * 1024 + 1))], "pairs[0].value"),
                         ([(b"bogus.a", b"")], "pairs[0].name")):
        with pytest.raises(FormatError) as info:
            Pairs(pairs).validate()
        assert (info.value.structure, info.value.field) == ("Pairs", field)
