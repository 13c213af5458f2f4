"""RAFS v5 structures (format/v5.py): decode real bytes, re-encode byte-exactly,
and refuse what the loader refuses."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nydus_vfs.errors import FormatError
from nydus_vfs.format import (
    BlobFeatures,
    InodeFlags,
    RafsV5BlobEntry,
    RafsV5BlobTable,
    RafsV5ChunkInfo,
    RafsV5ExtBlobEntry,
    RafsV5ExtBlobTable,
    RafsV5Inode,
    RafsV5InodeRecord,
    RafsV5InodeTable,
    RafsV5PrefetchTable,
    RafsV5SuperBlock,
    RafsV5Xattrs,
)
from tests.unit.format.format_factory import build_v5, sample_tree

V5_BLOB = b"7334a2594e133cf8ae364189c2276b090fc490c627bcc3fb1077f0419a538e00"


@pytest.fixture(scope="module")
def boot(v5_vector):
    """The upstream sha256-none vector (tests of its exact facts skip without ../shared)."""
    return v5_vector["boots"][0].read_bytes()


def _synthetic() -> bytes:
    return build_v5(sample_tree(), prefetch=[2, 3])


@pytest.fixture(scope="module", params=["synthetic", "vector"])
def image(request):
    """Each structure test runs on a factory-built image, and on the vector when it is there."""
    if request.param == "synthetic":
        return _synthetic()
    return request.getfixturevalue("v5_vector")["boots"][0].read_bytes()


def test_vector_superblock_facts(boot):
    sb = RafsV5SuperBlock.from_bytes(boot)
    assert (sb.s_magic, sb.s_fs_version, sb.s_sb_size, sb.s_block_size) == (0x52414653, 0x500, 8192, 0x100000)
    assert sb.s_flags == 0x9 and sb.s_inodes_count == 51 and sb.s_inode_table_entries == 54
    assert sb.s_inode_table_offset == 8192
    assert sb.s_prefetch_table_offset == sb.s_blob_table_offset == 8408 and sb.s_prefetch_table_entries == 0
    assert sb.s_blob_table_size == 72
    assert sb.s_extended_blob_table_entries == 1 and sb.s_extended_blob_table_offset == 8480


def test_superblock_round_trip(image):
    sb = RafsV5SuperBlock.from_bytes(image)
    sb.validate(len(image))
    assert sb.to_bytes() == image[:8192]
    assert (sb.s_magic, sb.s_fs_version, sb.s_sb_size, sb.s_inode_table_offset) == (0x52414653, 0x500, 8192, 8192)
    assert RafsV5SuperBlock.probe(image) and not RafsV5SuperBlock.probe(b"\0" * 8192)


def test_superblock_defaults_are_a_valid_header():
    sb = RafsV5SuperBlock(s_inode_table_entries=1, s_blob_table_offset=8200)
    raw = sb.to_bytes()
    assert len(raw) == 8192 and raw[:4] == b"SFAR" and RafsV5SuperBlock.probe(raw)
    assert RafsV5SuperBlock.from_bytes(raw) == sb


@pytest.mark.parametrize("field, value, match", [
    ("s_magic", 0x12345678, "s_magic"),
    ("s_fs_version", 0x600, "s_fs_version"),
    ("s_sb_size", 4096, "s_sb_size"),
    ("s_block_size", 0x800, "power of two"),
    ("s_block_size", 0x2000000, "power of two"),
    ("s_flags", 0x400, "unknown RafsSuperFlags"),
    ("s_inodes_count", lambda sb: sb.s_inode_table_entries + 1, "more inodes"),
    ("s_inode_table_entries", 0, "at least the root"),
    ("s_inode_table_offset", 4096, "does not fit"),
    ("s_blob_table_offset", 8200, "overlaps the inode table"),
    ("s_blob_table_size", 1 << 20, "does not fit"),
    ("s_extended_blob_table_offset", lambda sb: sb.s_blob_table_offset, "overlaps another table"),
    ("s_prefetch_table_offset", lambda sb: sb.s_blob_table_offset, "overlaps another table"),
])
def test_superblock_validate_refuses(image, field, value, match):
    sb = RafsV5SuperBlock.from_bytes(image)
    if sb.s_prefetch_table_entries == 0:
        sb.s_prefetch_table_entries = 4
    setattr(sb, field, value(sb) if callable(value) else value)
    with pytest.raises(FormatError, match=match) as info:
        sb.validate(len(image))
    assert info.value.structure == "RafsV5SuperBlock"


def test_superblock_validate_meta_size(image):
    sb = RafsV5SuperBlock.from_bytes(image)
    with pytest.raises(FormatError, match="multiple of 8"):
        sb.validate(len(image) - 3)
    with pytest.raises(FormatError, match="longer than 8192"):
        sb.validate(8192)


def test_vector_inode_table_entries(boot):
    table = RafsV5InodeTable.from_bytes(boot, 8192, 54)
    assert len(table) == 54 and table.entries[0] == 0x42C


def test_inode_table_round_trip(image):
    sb = RafsV5SuperBlock.from_bytes(image)
    n = sb.s_inode_table_entries
    table = RafsV5InodeTable.from_bytes(image, 8192, n)
    assert len(table) == n
    assert table.to_bytes() == image[8192:8192 + ((4 * n + 7) & ~7)]
    table.validate(len(image))
    odd = RafsV5InodeTable([0x500, 0x501, 0x502])
    assert len(odd.to_bytes()) == 16 and odd.to_bytes()[12:] == b"\0" * 4
    assert RafsV5InodeTable.from_bytes(odd.to_bytes(), 0, 3) == odd


@pytest.mark.parametrize("value", [0, 8192 >> 3, 1 << 29, 0x7FFF_FFFF])
def test_inode_table_refuses_offsets_outside_records(value):
    with pytest.raises(FormatError, match="entries\\[0\\]"):
        RafsV5InodeTable([value]).validate(1 << 32)


def test_prefetch_table_stops_at_zero():
    table = RafsV5PrefetchTable([5, 7, 0, 9])
    assert table.inodes == [5, 7]
    raw = RafsV5PrefetchTable([3]).to_bytes()
    assert raw == struct.pack("<II", 3, 0)
    assert RafsV5PrefetchTable.from_bytes(raw, 0, 1).inodes == [3]


def test_prefetch_table_of_synthetic_image():
    data = _synthetic()
    sb = RafsV5SuperBlock.from_bytes(data)
    table = RafsV5PrefetchTable.from_bytes(data, sb.s_prefetch_table_offset, sb.s_prefetch_table_entries)
    assert table.inodes == [2, 3]
    assert table.to_bytes() == data[sb.s_prefetch_table_offset:sb.s_blob_table_offset]


def test_blob_table_round_trip(image):
    sb = RafsV5SuperBlock.from_bytes(image)
    off, size = sb.s_blob_table_offset, sb.s_blob_table_size
    table = RafsV5BlobTable.from_bytes(image, off, size)
    table.validate()
    assert table.to_bytes() == image[off:off + size]
    assert all(len(e.blob_id) == 64 for e in table.entries)


def test_vector_blob_table(boot):
    assert RafsV5BlobTable.from_bytes(boot, 8408, 72).entries == [RafsV5BlobEntry(V5_BLOB.decode(), 0, 0)]


def test_blob_table_multiple_entries_and_padding():
    table = RafsV5BlobTable([RafsV5BlobEntry("abc", 1, 2), RafsV5BlobEntry("de", 3, 4)])
    raw = table.to_bytes()
    # 8+3, NUL, 8+2 = 22 bytes, padded to 24: the padding ends the last id.
    assert len(raw) == 24 and raw[11:12] == b"\0"
    assert RafsV5BlobTable.from_bytes(raw, 0, len(raw)) == table


def test_blob_table_refuses_bad_ids():
    raw = struct.pack("<II", 0, 0) + b"\xff\xfe"
    with pytest.raises(FormatError, match="not UTF-8"):
        RafsV5BlobTable.from_bytes(raw + b"\0" * 6, 0, 16)
    with pytest.raises(FormatError, match="non-empty"):
        RafsV5BlobTable([RafsV5BlobEntry("")]).to_bytes()
    with pytest.raises(FormatError, match="blob id is empty"):
        RafsV5BlobTable([RafsV5BlobEntry("")]).validate()


def test_ext_blob_table_round_trip(image):
    sb = RafsV5SuperBlock.from_bytes(image)
    off, n = sb.s_extended_blob_table_offset, sb.s_extended_blob_table_entries
    table = RafsV5ExtBlobTable.from_bytes(image, off, n)
    assert len(table.entries) == n >= 1
    assert table.to_bytes() == image[off:off + 64 * n]
    for i, entry in enumerate(table.entries):
        entry.validate(i)
    with pytest.raises(FormatError, match="features"):
        RafsV5ExtBlobEntry(features=int(BlobFeatures.V5_NO_EXT_BLOB_TABLE)).validate()


def test_vector_ext_blob_entry(boot):
    [entry] = RafsV5ExtBlobTable.from_bytes(boot, 8480, 1).entries
    assert (entry.chunk_count, entry.features, entry.uncompressed_size, entry.compressed_size) == \
        (23, 0, 3508766, 3508766)


def test_every_record_round_trips(image):
    sb = RafsV5SuperBlock.from_bytes(image)
    n = sb.s_inode_table_entries
    blob_count = len(RafsV5BlobTable.from_bytes(image, sb.s_blob_table_offset, sb.s_blob_table_size).entries)
    table = RafsV5InodeTable.from_bytes(image, 8192, n).entries
    offsets = sorted(set(v << 3 for v in table))
    ends = offsets[1:] + [len(image)]
    kinds = set()
    for off, end in zip(offsets, ends):
        rec = RafsV5InodeRecord.from_bytes(image, off)
        assert rec.size == end - off
        assert rec.to_bytes() == image[off:end]
        rec.validate(n, sb.s_block_size, blob_count)
        assert RafsV5Inode.from_bytes(image, off).to_bytes() == image[off:off + 128]
        for k, c in enumerate(rec.chunks):
            pos = off + rec.inode.xattr_offset + (rec.xattrs.size if rec.xattrs else 0) + 80 * k
            assert RafsV5ChunkInfo.from_bytes(image, pos).to_bytes() == image[pos:pos + 80]
            assert c.to_chunk_info().digest == c.block_id
            assert RafsV5ChunkInfo.from_chunk_info(c.to_chunk_info()) == c
        kinds.add((rec.inode.is_dir, rec.inode.is_reg, rec.inode.is_symlink))
    assert {(True, False, False), (False, True, False), (False, False, True)} <= kinds


def test_root_record(image):
    sb = RafsV5SuperBlock.from_bytes(image)
    root_off = RafsV5InodeTable.from_bytes(image, 8192, sb.s_inode_table_entries).entries[0] << 3
    ino = RafsV5InodeRecord.from_bytes(image, root_off).inode
    assert ino.is_dir and ino.i_ino == 1 and ino.i_parent == 0 and ino.i_mtime == 0
    assert ino.i_child_index == 2 and ino.i_child_count >= 1


def test_vector_root_record_facts(boot):
    rec = RafsV5InodeRecord.from_bytes(boot, 0x42C << 3)
    ino = rec.inode
    assert rec.name == b"/" and ino.i_ino == 1 and ino.i_parent == 0 and ino.i_mtime == 0
    assert (ino.i_child_index, ino.i_child_count, ino.i_nlink) == (2, 3, 5)


def _inode(**kw):
    base = dict(i_ino=3, i_parent=1, i_nlink=1, i_name_size=1, i_mode=0o100644)
    base.update(kw)
    return RafsV5Inode(**base)


@pytest.mark.parametrize("kw, match", [
    (dict(i_ino=0), "i_ino"),
    (dict(i_ino=99), "i_ino"),
    (dict(i_parent=0), "no parent"),
    (dict(i_nlink=0), "no links"),
    (dict(i_name_size=0), "1..256"),
    (dict(i_name_size=300), "1..256"),
    (dict(i_parent=5), "smaller index"),
    (dict(i_mode=0o170644), "file type"),
    (dict(i_mode=0o40755, i_child_index=2, i_child_count=1), "children"),
    (dict(i_mode=0o40755, i_child_index=4, i_child_count=10), "children"),
    (dict(i_mode=0o120777), "empty target"),
])
def test_inode_validate_refuses(kw, match):
    with pytest.raises(FormatError, match=match):
        _inode(**kw).validate(10)


def test_inode_validate_accepts_hardlink_with_larger_parent():
    _inode(i_parent=5, i_nlink=2).validate(10)
    _inode(i_mode=0o40755, i_child_index=4, i_child_count=7).validate(10)


def test_record_with_xattrs_round_trips_and_validates():
    inode = _inode(i_flags=int(InodeFlags.XATTR), i_child_count=1, i_size=5)
    chunk = RafsV5ChunkInfo(blob_index=0, uncompressed_size=5, compressed_size=5)
    rec = RafsV5InodeRecord(inode, b"x", xattrs=RafsV5Xattrs([(b"user.a", b"1"), (b"trusted.b", b"")]),
                            chunks=[chunk])
    raw = rec.to_bytes()
    assert len(raw) == rec.size and len(raw) % 8 == 0
    again = RafsV5InodeRecord.from_bytes(raw)
    assert again == rec
    again.validate(10, 0x100000, 1)
    with pytest.raises(FormatError, match="blob"):
        again.validate(10, 0x100000, 0)
    again.name = b"xy"
    with pytest.raises(FormatError, match="i_name_size"):
        again.validate(10, 0x100000, 1)


def test_xattrs_layout_and_errors():
    x = RafsV5Xattrs([(b"user.k", b"v")])
    raw = x.to_bytes()
    assert raw[:8] == struct.pack("<Q", 4 + 6 + 1 + 1)
    assert raw[8:12] == struct.pack("<I", 8) and raw[12:20] == b"user.k\0v"
    assert len(raw) == x.size == 24
    assert RafsV5Xattrs.from_bytes(raw).as_dict() == {b"user.k": b"v"}
    with pytest.raises(FormatError, match="runs past"):
        RafsV5Xattrs.from_bytes(struct.pack("<QI", 8, 100) + b"\0" * 8)
    with pytest.raises(FormatError, match="name NUL value"):
        RafsV5Xattrs.from_bytes(struct.pack("<QI", 7, 3) + b"abc")
    with pytest.raises(FormatError, match="truncated pair size"):
        RafsV5Xattrs.from_bytes(struct.pack("<Q", 2) + b"\0\0")
    with pytest.raises(FormatError, match="needs"):
        RafsV5Xattrs.from_bytes(struct.pack("<Q", 1 << 40))
    with pytest.raises(FormatError, match="prefix"):
        RafsV5Xattrs([(b"other.k", b"")]).validate()
    with pytest.raises(FormatError, match="duplicate"):
        RafsV5Xattrs([(b"user.k", b""), (b"user.k", b"1")]).validate()


_NAMES = st.sampled_from([b"user.", b"security.", b"trusted.", b"system.posix_acl_access"])


@given(st.lists(st.tuples(_NAMES, st.binary(min_size=1, max_size=20).filter(lambda b: b"\0" not in b),
                          st.binary(max_size=64)), max_size=6))
def test_xattrs_round_trip_property(items):
    pairs = [(p + s, v) for p, s, v in items]
    x = RafsV5Xattrs(pairs)
    assert RafsV5Xattrs.from_bytes(x.to_bytes()) == x


@given(st.binary(max_size=300))
def test_variable_structs_on_garbage_raise_only_format_error(data):
    for parse in (lambda: RafsV5Xattrs.from_bytes(data),
                  lambda: RafsV5BlobTable.from_bytes(data, 0, len(data)),
                  lambda: RafsV5InodeRecord.from_bytes(data),
                  lambda: RafsV5SuperBlock.from_bytes(data).validate(len(data))):
        try:
            parse()
        except FormatError:
            pass


def test_synthetic_image_records_validate():
    data = build_v5(sample_tree())
    sb = RafsV5SuperBlock.from_bytes(data)
    sb.validate(len(data))
    table = RafsV5InodeTable.from_bytes(data, 8192, sb.s_inode_table_entries)
    table.validate(len(data))
    for value in table.entries:
        RafsV5InodeRecord.from_bytes(data, value << 3).validate(sb.s_inode_table_entries, 0x100000, 2)
