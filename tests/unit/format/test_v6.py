"""RAFS v6 structures (format/v6.py): a factory image shaped like the 2.2 vector, and the vector
itself when ../shared is there, decoded field by field,
byte-exact re-encoding, the loader's strict checks, dirents, chunk indexes, xattrs."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nydus_vfs.errors import FormatError
from nydus_vfs.format import (
    BlobFeatures,
    RafsV5ChunkInfo,
    RafsV6Blob,
    RafsV6Device,
    RafsV6Dirent,
    RafsV6DirentBlock,
    RafsV6InodeChunkAddr,
    RafsV6InodeCompact,
    RafsV6InodeExtended,
    RafsV6PrefetchTable,
    RafsV6SuperBlock,
    RafsV6SuperBlockExt,
    RafsV6Xattrs,
    SuperFlags,
    chunk_format,
    decode_inode,
)
from nydus_vfs.format.types import BlobInfo, Compressor, Digester
from nydus_vfs.format.v6 import EROFS_NULL_ADDR
from tests.unit.format.format_factory import build_v6, chunk, d, f

V6_BLOB = b"be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"
META = 2 * 4096


def inode_off(nid: int) -> int:
    return META + 32 * nid


@pytest.fixture(scope="module")
def boot(v6_vector):
    """The upstream 2.2 vector (tests of its exact facts skip without ../shared)."""
    return v6_vector["boot"].read_bytes()


def _synthetic() -> bytes:
    """A factory-built image shaped like the vector: one blob entry with the same
    fields, flags 0x194, a root with two chunk-based files."""
    blob = BlobInfo(index=0, blob_id=V6_BLOB.decode(), chunk_count=2, chunk_size=0x100000,
                    compressor=Compressor.ZSTD, digester=Digester.BLAKE3, features=0x70000021,
                    compressed_size=0x38DA, uncompressed_size=0x9000, ci_offset=0x207A, ci_compressed_size=0x20,
                    ci_uncompressed_size=0x20, blob_toc_size=0x400)
    tree = d({b"lib.rs": f(16931, [chunk(0, 0, 16931, uoff=0)]),
              b"sync_io.rs": f(4000, [chunk(0, 1, 4000, uoff=5 * 4096)])})
    return build_v6(tree, flags=SuperFlags(0x194), blobs=[blob])


@pytest.fixture(scope="module", params=["synthetic", "vector"])
def image(request):
    """Each structure test runs on a factory-built image, and on the vector when it is there."""
    if request.param == "synthetic":
        return _synthetic()
    return request.getfixturevalue("v6_vector")["boot"].read_bytes()


def _devslot_end(data: bytes) -> int:
    return 1408 + 128 * RafsV6SuperBlock.from_bytes(data, 1024).s_extra_devices


def _regular_nids(data: bytes) -> list[int]:
    """Nids of the root's regular files, from its inline dirent block."""
    sb = RafsV6SuperBlock.from_bytes(data, 1024)
    root = decode_inode(data, inode_off(sb.s_root_nid))
    block = RafsV6DirentBlock.from_bytes(data, inode_off(sb.s_root_nid) + root.SIZE + root.xattr_size,
                                         root.i_size)
    return [nid for _, nid, ftype in block.entries if ftype == 1]


def test_superblock_round_trip(image):
    sb = RafsV6SuperBlock.from_bytes(image, 1024)
    sb.validate(len(image))
    assert sb.to_bytes() == image[1024:1152]
    assert (sb.s_magic, sb.s_checksum, sb.s_feature_compat & 0x40000000) == (0xE0F5E1E2, 0, 0x40000000)
    assert (sb.s_feature_incompat, sb.s_devt_slotoff, sb.s_meta_blkaddr) == (0xC, 11, 2)
    assert sb.block_size == 4096 and RafsV6SuperBlock.probe(image)
    assert image[:1024] == b"\0" * 1024


def test_superblock_facts_and_round_trip(boot):
    sb = RafsV6SuperBlock.from_bytes(boot, 1024)
    sb.validate(len(boot))
    assert sb.to_bytes() == boot[1024:1152]
    assert (sb.s_magic, sb.s_checksum, sb.s_feature_compat) == (0xE0F5E1E2, 0, 0x40000000)
    assert (sb.s_blkszbits, sb.s_root_nid, sb.s_inos, sb.s_blocks, sb.s_meta_blkaddr) == (12, 128, 3, 9, 2)
    assert (sb.s_feature_incompat, sb.s_extra_devices, sb.s_devt_slotoff) == (0xC, 1, 11)
    assert sb.block_size == 4096 and RafsV6SuperBlock.probe(boot)
    assert boot[:1024] == b"\0" * 1024


def test_superblock_defaults_round_trip():
    sb = RafsV6SuperBlock(s_root_nid=128, s_inos=1)
    assert RafsV6SuperBlock.from_bytes(sb.to_bytes()) == sb
    sb.validate(8192)


@pytest.mark.parametrize("field, value, match", [
    ("s_magic", 0xE0F5E1E3, "s_magic"),
    ("s_checksum", 1, "must be 0"),
    ("s_blkszbits", 10, "12 or 9"),
    ("s_extslots", 1, "s_extslots"),
    ("s_inos", 0, "at least the root"),
    ("s_u", 1, "compression configuration"),
    ("s_xattr_blkaddr", 3, "shared xattrs"),
    ("s_devt_slotoff", 12, "1408"),
    ("s_extra_devices", 1000, "runs past"),
    ("s_feature_incompat", 0xE, "exactly 0xc"),
    ("s_feature_compat", 0, "RAFS v6 bit"),
    ("s_meta_blkaddr", 100, "past the end"),
    ("s_root_nid", 0, "root nid 0"),
])
def test_superblock_validate_refuses(image, field, value, match):
    sb = RafsV6SuperBlock.from_bytes(image, 1024)
    setattr(sb, field, value)
    with pytest.raises(FormatError, match=match):
        sb.validate(len(image))


def test_superblock_blocks_rule_without_devices():
    sb = RafsV6SuperBlock(s_root_nid=128, s_inos=1, s_blocks=4096)
    sb.validate(8192)
    sb.s_blocks = 7
    with pytest.raises(FormatError, match="without blobs"):
        sb.validate(8192)
    with pytest.raises(FormatError, match="multiple of 4096"):
        RafsV6SuperBlock(s_root_nid=128, s_inos=1).validate(5000)


def test_ext_superblock_round_trip(image):
    ext = RafsV6SuperBlockExt.from_bytes(image, 1152)
    ext.validate(len(image), _devslot_end(image))
    assert ext.to_bytes() == image[1152:1408]
    assert ext.s_flags == 0x194 and ext.s_chunk_size == 0x100000
    assert (ext.s_blob_table_offset, ext.s_blob_table_size) == (4096, 256)
    assert ext.s_chunk_table_size == 160 and ext.s_chunk_table_offset % 4096 == 0


def test_ext_superblock_facts(boot):
    ext = RafsV6SuperBlockExt.from_bytes(boot, 1152)
    assert ext.s_flags == 0x194 and ext.s_chunk_size == 0x100000
    assert (ext.s_blob_table_offset, ext.s_blob_table_size) == (4096, 256)
    assert (ext.s_chunk_table_offset, ext.s_chunk_table_size) == (16384, 160)
    assert (ext.s_prefetch_table_offset, ext.s_prefetch_table_size) == (0, 0)


@pytest.mark.parametrize("field, value, match", [
    ("s_flags", 0x194 | 0x2, "one compression bit"),
    ("s_flags", 0x114, "one compression bit"),
    ("s_flags", 0x198 | 0x4, "one hash bit"),
    ("s_flags", 0x190 | 0x80 | 0x10000, "unknown RafsSuperFlags"),
    ("s_chunk_size", 0x800, "power of two"),
    ("s_chunk_size", 0x300000, "power of two"),
    ("s_blob_table_offset", 4097, "blob table"),
    ("s_blob_table_size", 100, "blob table"),
    ("s_chunk_table_offset", 4096, "overlaps the blob table"),
    ("s_chunk_table_size", 170, "chunk table"),
    ("s_prefetch_table_offset", 4096, "prefetch table"),
])
def test_ext_superblock_validate_refuses(image, field, value, match):
    ext = RafsV6SuperBlockExt.from_bytes(image, 1152)
    setattr(ext, field, value)
    if field == "s_prefetch_table_offset":
        ext.s_prefetch_table_size = 8
    with pytest.raises(FormatError, match=match):
        ext.validate(len(image), _devslot_end(image))


def test_device_and_blob_entry(image):
    dev = RafsV6Device.from_bytes(image, 1408)
    assert dev.to_bytes() == image[1408:1536]
    assert dev.blob_id == V6_BLOB and dev.blocks == 9
    dev.validate()
    with pytest.raises(FormatError, match="at least one block"):
        RafsV6Device(blob_id=b"x", blocks=0).validate()
    entry = RafsV6Blob.from_bytes(image, 4096)
    assert entry.to_bytes() == image[4096:4352]
    entry.validate(0, 0x100000, 0x194)
    info = entry.to_blob_info()
    assert info.blob_id == V6_BLOB.decode() and info.features == 0x70000021
    assert (entry.compression_algo, entry.digest_algo, entry.ci_compressor) == (3, 0, 0)
    assert RafsV6Blob.from_blob_info(info).to_bytes() == image[4096:4352]


def test_vector_device_mapping(boot):
    assert RafsV6Device.from_bytes(boot, 1408).mapped_blkaddr == 512


@pytest.mark.parametrize("field, value, match", [
    ("blob_id", b"\0" * 64, "empty"),
    ("blob_id", b"\x01" * 64, "printable"),
    ("blob_index", 1, "entry position"),
    ("chunk_size", 0x200000, "superblock chunk size"),
    ("chunk_count", (1 << 24) + 1, "2\\^24"),
    ("compression_algo", 9, "Compressor"),
    ("digest_algo", 2, "Digester"),
    ("cipher_algo", 7, "Cipher"),
    ("uncompressed_size", 1 << 45, "2\\^44"),
    ("compressed_size", 1 << 41, "2\\^40"),
    ("features", 0x70001021, "unknown"),
    ("features", 0x70000020, "ALIGNED must be set"),
    ("features", 0x70000021 | int(BlobFeatures.BATCH), "need CHUNK_INFO_V2"),
    ("features", 0x70000021 | int(BlobFeatures.CHUNK_INFO_V2), "v2 ci entries"),
    ("ci_uncompressed_size", 48, "v1 ci entries"),
    ("ci_compressed_size", 64, "larger than ci_uncompressed_size"),
])
def test_blob_entry_validate_refuses(image, field, value, match):
    entry = RafsV6Blob.from_bytes(image, 4096)
    setattr(entry, field, value)
    with pytest.raises(FormatError, match=match):
        entry.validate(0, 0x100000, 0x194)


def test_blob_entry_tarfs_rules(image):
    entry = RafsV6Blob.from_bytes(image, 4096)
    with pytest.raises(FormatError, match="must not be set in tarfs"):
        entry.validate(0, 0x100000, 0x194 | int(SuperFlags.TARTFS_MODE))
    entry.features &= ~int(BlobFeatures.ALIGNED)
    entry.ci_uncompressed_size = entry.ci_compressed_size = 0
    entry.validate(0, 0x100000, 0x194 | int(SuperFlags.TARTFS_MODE))


def test_inodes_decode_and_round_trip(boot):
    root = decode_inode(boot, inode_off(128))
    assert isinstance(root, RafsV6InodeExtended)
    assert root.to_bytes() == boot[inode_off(128):inode_off(128) + 64]
    assert root.layout == 2 and root.is_extended and root.i_size == 67 and root.xattr_size == 0
    assert root.i_mode == 0o40755 and root.i_nlink == 2
    root.validate()
    lib = decode_inode(boot, inode_off(133))
    assert lib.layout == 4 and lib.i_size == 16931 and lib.i_u == 0x28
    assert lib.i_u == chunk_format(0x100000) | 0x8  # page-cache sharing: next_power_of_two(size)
    assert chunk_format(1 << 15) == 0x23 and chunk_format(0x100000) == 0x28
    assert lib.i_mtime == 1676819553
    with pytest.raises(FormatError):
        chunk_format(3000)


@pytest.mark.parametrize("kw, match", [
    (dict(i_format=0x11), "bits above"),
    (dict(i_format=1 | (3 << 1)), "compressed"),
    (dict(i_mode=0o170000), "file type"),
    (dict(i_nlink=0), "no links"),
    (dict(i_mode=0o40755, i_format=1 | (4 << 1)), "must be flat"),
])
def test_inode_validate_refuses(kw, match):
    base = dict(i_format=1, i_mode=0o100644, i_nlink=1)
    base.update(kw)
    with pytest.raises(FormatError, match=match):
        RafsV6InodeExtended(**base).validate()


def test_compact_inode_round_trip():
    ino = RafsV6InodeCompact(i_format=4 << 1, i_xattr_icount=3, i_mode=0o100600, i_nlink=2, i_size=77,
                             i_u=0x28, i_ino=9, i_uid=1000, i_gid=100)
    raw = ino.to_bytes()
    assert len(raw) == 32
    back = decode_inode(raw, 0)
    assert isinstance(back, RafsV6InodeCompact) and back == ino
    assert back.xattr_size == 12 + 2 * 4 and not back.is_extended and back.layout == 4


def test_root_dirent_block_round_trip_any(image):
    sb = RafsV6SuperBlock.from_bytes(image, 1024)
    root = decode_inode(image, inode_off(sb.s_root_nid))
    root.validate()
    assert root.layout == 2 and root.i_mode & 0o170000 == 0o040000
    start = inode_off(sb.s_root_nid) + root.SIZE + root.xattr_size
    block = RafsV6DirentBlock.from_bytes(image, start, root.i_size)
    assert [name for name, _, _ in block.entries] == [b".", b"..", b"lib.rs", b"sync_io.rs"]
    assert block.to_bytes() == image[start:start + root.i_size]
    block.validate()


def test_root_dirent_block_round_trip(boot):
    start = inode_off(128) + 64
    block = RafsV6DirentBlock.from_bytes(boot, start, 67)
    assert block.entries == [(b".", 128, 2), (b"..", 128, 2), (b"lib.rs", 133, 1), (b"sync_io.rs", 136, 1)]
    assert block.to_bytes() == boot[start:start + 67]
    assert block.size == 67
    block.validate()
    dirent = RafsV6Dirent.from_bytes(boot, start + 24)
    assert (dirent.e_nid, dirent.e_nameoff, dirent.e_file_type) == (133, 51, 1)
    assert dirent.to_bytes() == boot[start + 24:start + 36]


@pytest.mark.parametrize("entries, match", [
    ([(b"b", 1, 1), (b"a", 2, 1)], "not sorted"),
    ([(b"a", 1, 1), (b"a", 2, 1)], "not sorted"),
    ([(b"a/b", 1, 1)], "not a valid file name"),
    ([(b"a", 1, 9)], "file type"),
])
def test_dirent_block_validate_refuses(entries, match):
    with pytest.raises(FormatError, match=match):
        RafsV6DirentBlock(entries).validate()


def test_dirent_last_name_stops_at_nul():
    raw = RafsV6DirentBlock([(b"a", 1, 1), (b"bc", 2, 1)]).to_bytes(pad_to=64)
    assert RafsV6DirentBlock.from_bytes(raw, 0, 64).entries == [(b"a", 1, 1), (b"bc", 2, 1)]


@pytest.mark.parametrize("raw, match", [
    (b"\0" * 8, "at least one dirent"),
    (struct.pack("<QHBB", 1, 0, 1, 0) + b"x", "first name offset"),
    (struct.pack("<QHBB", 1, 13, 1, 0) + b"x", "first name offset"),
    (struct.pack("<QHBB", 1, 12, 1, 0), "first name offset"),
    (struct.pack("<QHBBQHBB", 1, 24, 1, 0, 2, 30, 1, 0) + b"ab", "not inside the name area"),
    (struct.pack("<QHBBQHBB", 1, 24, 1, 0, 2, 24, 1, 0) + b"ab", "not inside the name area"),
    (struct.pack("<QHBB", 1, 12, 1, 0) + b"\0\0", "1..255"),
])
def test_dirent_block_refuses(raw, match):
    with pytest.raises(FormatError, match=match):
        RafsV6DirentBlock.from_bytes(raw, 0, len(raw))


def test_dirent_pack_never_crosses_a_block():
    entries = [(b"n%04d" % i + b"y" * 50, i + 1, 1) for i in range(300)]
    blocks = RafsV6DirentBlock.pack(entries, 4096)
    assert len(blocks) > 1
    assert [e for b in blocks for e in b.entries] == entries
    for b in blocks:
        assert b.size <= 4096
        raw = b.to_bytes(pad_to=4096)
        assert RafsV6DirentBlock.from_bytes(raw, 0, 4096) == b
    with pytest.raises(FormatError, match="does not fit"):
        RafsV6DirentBlock.pack([(b"x" * 600, 1, 1)], 512)
    with pytest.raises(FormatError, match="1..255"):
        RafsV6DirentBlock([(b"x" * 256, 1, 1)]).to_bytes()
    assert RafsV6DirentBlock.file_type(0o120777) == 7 and RafsV6DirentBlock.file_type(0o10644) == 5


def test_chunk_addresses_of_vector(boot):
    base = inode_off(133) + 64
    addr = RafsV6InodeChunkAddr.from_bytes(boot, base)
    assert (addr.blob_index, addr.blob_ci_index, addr.block_addr) == (0, 0, 0)
    assert addr.to_bytes() == boot[base:base + 8]
    addr2 = RafsV6InodeChunkAddr.from_bytes(boot, inode_off(136) + 64)
    assert (addr2.blob_index, addr2.blob_ci_index, addr2.block_addr) == (0, 1, 5)
    assert not addr2.is_hole
    addr2.validate(1)


@given(st.integers(0, 253), st.integers(0, 0xFF_FFFF), st.integers(0, 0xFFFF_FFFE))
def test_chunk_addr_bit_packing(blob, ci, blk):
    addr = RafsV6InodeChunkAddr.new(blob, ci, blk)
    back = RafsV6InodeChunkAddr.from_bytes(addr.to_bytes())
    assert (back.blob_index, back.blob_ci_index, back.block_addr) == (blob, ci, blk)
    assert back.c_blob_addr_hi & 0xFF == blob + 1


def test_chunk_addr_errors():
    with pytest.raises(FormatError, match="device id 0"):
        _ = RafsV6InodeChunkAddr(c_blob_addr_hi=0x0100).blob_index
    with pytest.raises(FormatError, match="0..254"):
        RafsV6InodeChunkAddr.new(255, 0, 0)
    with pytest.raises(FormatError, match="24 bits"):
        RafsV6InodeChunkAddr.new(0, 1 << 24, 0)
    with pytest.raises(FormatError, match="image has 1 blob"):
        RafsV6InodeChunkAddr.new(3, 0, 0).validate(1)
    RafsV6InodeChunkAddr(c_blk_addr=EROFS_NULL_ADDR).validate(0)


def test_chunk_addresses_round_trip(image):
    nids = _regular_nids(image)
    assert len(nids) == 2
    for nid in nids:
        ino = decode_inode(image, inode_off(nid))
        ino.validate()
        assert ino.layout == 4 and ino.i_u == chunk_format(0x100000) | (ino.i_u & 0x8)
        base = inode_off(nid) + ((ino.SIZE + ino.xattr_size + 7) & ~7)
        addr = RafsV6InodeChunkAddr.from_bytes(image, base)
        assert addr.to_bytes() == image[base:base + 8]
        assert addr.blob_index == 0 and addr.blob_ci_index in (0, 1) and not addr.is_hole
        addr.validate(1)


def test_chunk_table_records_round_trip(image):
    ext = RafsV6SuperBlockExt.from_bytes(image, 1152)
    assert ext.s_chunk_table_size == 160
    for i in range(2):
        off = ext.s_chunk_table_offset + 80 * i
        rec = RafsV5ChunkInfo.from_bytes(image, off)
        assert rec.to_bytes() == image[off:off + 80]
        assert rec.blob_index == 0 and rec.index in (0, 1)


def test_xattrs_encoding_and_prefix_index():
    x = RafsV6Xattrs([(b"user.k", b"v"), (b"system.posix_acl_access", b"\x02\x00"), (b"security.ima", b"")])
    raw = x.to_bytes()
    assert raw[:12] == b"\0" * 12
    assert raw[12:16] == bytes((1, 1)) + (1).to_bytes(2, "little") and raw[16:18] == b"kv"
    assert raw[20:24] == bytes((0, 2)) + (2).to_bytes(2, "little")
    assert len(raw) % 4 == 0 and x.icount == (len(raw) - 12) // 4 + 1
    back = RafsV6Xattrs.from_bytes(raw, 0, x.icount)
    assert back == x and back.as_dict()[b"system.posix_acl_access"] == b"\x02\x00"
    assert RafsV6Xattrs().to_bytes() == b"" and RafsV6Xattrs().icount == 0
    assert RafsV6Xattrs.split_name(b"system.posix_acl_default") == (3, b"")
    assert RafsV6Xattrs.from_bytes(b"", 0, 0).pairs == []


@pytest.mark.parametrize("raw, icount, match", [
    (b"\0" * 4 + b"\x01" + b"\0" * 7, 1, "shared xattrs"),
    (b"\0" * 12 + bytes((10, 1, 0, 0)), 2, "overruns"),
    (b"\0" * 12 + bytes((0, 5, 0, 0)), 2, "unknown xattr name index"),
    (b"\0" * 12, 3, "needs"),
])
def test_xattrs_refused(raw, icount, match):
    with pytest.raises(FormatError, match=match):
        RafsV6Xattrs.from_bytes(raw, 0, icount)


_PREFIXES = st.sampled_from([b"user.", b"trusted.", b"security."])


@given(st.lists(st.tuples(_PREFIXES, st.binary(min_size=1, max_size=30), st.binary(max_size=100)), max_size=5))
def test_xattrs_round_trip_property(items):
    x = RafsV6Xattrs([(p + s, v) for p, s, v in items])
    assert RafsV6Xattrs.from_bytes(x.to_bytes(), 0, x.icount) == x


@given(st.binary(max_size=200), st.integers(0, 80))
def test_xattrs_garbage_only_format_error(raw, icount):
    try:
        RafsV6Xattrs.from_bytes(raw, 0, icount)
    except FormatError:
        pass


@given(st.binary(min_size=12, max_size=300))
def test_dirent_garbage_only_format_error(raw):
    try:
        RafsV6DirentBlock.from_bytes(raw, 0, len(raw))
    except FormatError:
        pass


def test_prefetch_table_is_not_padded():
    table = RafsV6PrefetchTable([128, 133, 0])
    assert table.to_bytes() == struct.pack("<3I", 128, 133, 0)
    back = RafsV6PrefetchTable.from_bytes(table.to_bytes(), 0, 3)
    assert back.inodes == [128, 133] and back == table
