"""Bootstrap (format/reader.py): the upstream vectors decoded end to end, plus
synthetic images for what the vectors lack (xattrs, devices, compact inodes,
multi-block directories, holes, tarfs, inlined meta, big trees)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import mmap
import stat
import struct

import blake3
import pytest
import zstandard

from nydus_vfs.errors import FormatError
from nydus_vfs.format import (
    BlobFeatures,
    Bootstrap,
    BootstrapV5,
    BootstrapV6,
    ChunkFlags,
    Compressor,
    Digester,
    NoSuchInodeError,
    RafsV6DirentBlock,
    SuperFlags,
    blob_id_from_meta_path,
)
from tests.unit.format.format_factory import (
    BLOB_A,
    build_v5,
    build_v6,
    chunk,
    d,
    exercise,
    f,
    file_of,
    inline_blob,
    link,
    sample_tree,
)

V5_BLOB = "7334a2594e133cf8ae364189c2276b090fc490c627bcc3fb1077f0419a538e00"
V6_BLOB = "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"
HARDLINK_TRIO = [b"/hardlink-test/foo", b"/hardlink-test/test.sh", b"/normal-file-test/test.sh"]


def resolve(boot: Bootstrap, path: bytes) -> int | None:
    ino = boot.root_ino
    for part in path.strip(b"/").split(b"/"):
        if part:
            ino = boot.lookup(ino, part)
            if ino is None:
                return None
    return ino


def file_bytes(boot: Bootstrap, ino: int, blob: bytes) -> bytes:
    out = []
    for c in boot.chunks(ino):
        raw = blob[c.compressed_offset:c.compressed_offset + c.compressed_size]
        if c.flags & ChunkFlags.COMPRESSED:
            raw = zstandard.ZstdDecompressor().decompress(raw, max_output_size=c.uncompressed_size)
        out.append(raw)
    return b"".join(out)


def digest_of(digester: Digester, data: bytes) -> bytes:
    return hashlib.sha256(data).digest() if digester == Digester.SHA256 else blake3.blake3(data).digest()


@pytest.fixture(scope="module")
def v5_boots(v5_vector):
    return [(p.name, p.read_bytes()) for p in v5_vector["boots"]]


@pytest.fixture(scope="module")
def v5_blob(v5_vector):
    return (v5_vector["blob_dir"] / V5_BLOB).read_bytes()


@pytest.fixture(scope="module")
def v6_boot(v6_vector):
    return v6_vector["boot"].read_bytes()


@pytest.fixture(scope="module")
def v6_blob(v6_vector):
    return (v6_vector["blob_dir"] / V6_BLOB).read_bytes()


# --------------------------------------------------------------------- v5 vectors


def test_v5_vector_superblock_facts(v5_boots):
    for name, data in v5_boots:
        boot = Bootstrap.from_bytes(data)
        assert isinstance(boot, BootstrapV5) and boot.version == 5
        assert boot.chunk_size == 0x100000
        assert boot.compressor == Compressor.NONE
        assert boot.inodes_count == 51
        assert boot.root_ino == 1
        assert not boot.explicit_uid_gid and not boot.has_xattr
        assert boot.prefetch_inodes == []
        if name.startswith("sha256"):
            assert int(boot.flags) == 0x9 and boot.digester == Digester.SHA256
        else:
            assert int(boot.flags) == 0x5 and boot.digester == Digester.BLAKE3
        [blob] = boot.blobs
        assert blob.blob_id == V5_BLOB and blob.index == 0
        assert blob.chunk_count == 23 and blob.features == 0
        assert blob.compressed_size == blob.uncompressed_size == 3508766
        assert blob.compressor == Compressor.NONE and blob.digester == boot.digester


def test_v5_vector_tree_matches_expected_result(v5_boots, v5_vector):
    text = v5_vector["expected"].read_text()
    tree_json, _, md5_lines = text.partition("]\n")
    tree, report = json.loads(tree_json + "]")
    assert report == {"type": "report", "directories": 26, "files": 27}
    assert len(md5_lines.splitlines()) == 23
    for _, data in v5_boots:
        boot = Bootstrap.from_bytes(data)

        def compare(node: dict, ino: int, path: str, boot: Bootstrap = boot) -> None:
            listed = {name: (child, dtype) for _, name, child, dtype in boot.children(ino)}
            assert listed.pop(b".")[0] == ino
            assert b".." in listed
            listed.pop(b"..")
            expected = {c["name"].encode(): c for c in node.get("contents", [])}
            assert set(listed) == set(expected), path
            for name, entry in expected.items():
                child, dtype = listed[name]
                info = boot.inode(child)
                assert dtype == info.dtype
                if entry["type"] == "link":
                    assert info.is_symlink and boot.readlink(child) == entry["target"].encode()
                elif entry["type"] == "directory":
                    assert info.is_dir
                    compare(entry, child, f"{path}/{entry['name']}")
                else:
                    assert info.is_reg

        compare(tree, boot.root_ino, "")


def test_v5_vector_file_contents_match_md5_list(v5_boots, v5_blob, v5_vector):
    expected = {}
    for line in v5_vector["expected"].read_text().splitlines():
        parts = line.split("  ", 1)
        if len(parts) == 2 and len(parts[0]) == 32:
            expected[parts[1].encode()] = parts[0]
    assert len(expected) == 23
    for _, data in v5_boots:
        boot = Bootstrap.from_bytes(data)
        for path, md5 in expected.items():
            ino = resolve(boot, path)
            assert ino is not None, path
            assert hashlib.md5(file_bytes(boot, ino, v5_blob)).hexdigest() == md5, path


def test_v5_vector_chunk_digests_recomputed(v5_boots, v5_blob):
    for _, data in v5_boots:
        boot = Bootstrap.from_bytes(data)
        records = 0
        distinct = set()
        for _, ino, info in boot.walk():
            if not info.is_reg:
                continue
            for k, c in enumerate(boot.chunks(ino)):
                raw = v5_blob[c.compressed_offset:c.compressed_offset + c.compressed_size]
                assert c.flags == 0 and c.uncompressed_offset == c.compressed_offset
                assert digest_of(boot.digester, raw) == c.digest
                assert c.file_offset == k * boot.chunk_size
                records += 1
                distinct.add(c.index)
        # walk() yields each of the 3 hardlink names: 29 records on disk, 23 distinct chunks.
        assert records == 29 and len(distinct) == 23


def test_v5_vector_hardlink_trio_shares_ino(v5_boots):
    for _, data in v5_boots:
        boot = Bootstrap.from_bytes(data)
        inos = {resolve(boot, p) for p in HARDLINK_TRIO}
        assert inos == {5}
        info = boot.inode(5)
        assert info.nlink == 3 and info.is_reg and info.size == 944
        # Table slots 6 and 9 are secondary names of inode 5: not inode numbers.
        for slot in (6, 9):
            with pytest.raises(NoSuchInodeError, match="another name of inode 5"):
                boot.inode(slot)


def test_v5_vector_every_path_resolves_and_attrs(v5_boots):
    for _, data in v5_boots:
        boot = Bootstrap.from_bytes(data)
        seen = 0
        for path, ino, info in boot.walk():
            assert resolve(boot, path) == ino
            assert info.ino == ino
            if path != b"/":
                assert info.mtime == 1668232305
                parent = resolve(boot, path.rsplit(b"/", 1)[0] or b"/")
                assert boot.lookup(ino, b"..") == (parent if info.is_dir else None)
            else:
                assert info.mtime == 0
            if info.is_dir:
                assert info.size == 4096
                assert boot.child_count(ino) == len(list(boot.children(ino))) - 2
            seen += 1
        assert seen == 54
        assert boot.readlink(resolve(boot, b"/symlink-test/root-1")) == b"/" * 17
        assert boot.lookup(1, b"nope") is None
        assert boot.lookup(1, b"..") == 1


def test_v5_children_order_and_resume(v5_boots):
    boot = Bootstrap.from_bytes(v5_boots[0][1])
    ino = resolve(boot, b"/normal-file-test/holefiles")
    full = list(boot.children(ino))
    names = [n for _, n, _, _ in full]
    assert names[:2] == [b".", b".."]
    assert names[2:] == sorted(names[2:])
    assert [pos for pos, _, _, _ in full] == list(range(1, len(full) + 1))
    for start in range(len(full) + 2):
        assert list(boot.children(ino, start)) == full[start:]


# --------------------------------------------------------------------- v6 vector


def test_v6_vector_facts(v6_boot):
    boot = Bootstrap.from_bytes(v6_boot)
    assert isinstance(boot, BootstrapV6) and boot.version == 6
    assert int(boot.flags) == 0x194
    assert boot.flags & SuperFlags.INLINED_CHUNK_DIGEST
    assert boot.compressor == Compressor.ZSTD and boot.digester == Digester.BLAKE3
    assert boot.explicit_uid_gid and boot.chunk_size == 0x100000
    assert boot.root_ino == 128 and boot.inodes_count == 3 and boot.block_size == 4096
    assert boot.superblock.s_meta_blkaddr == 2 and boot.superblock.s_blocks == 9
    [dev] = boot.devices
    assert dev.blob_id_str == V6_BLOB and dev.blocks == 9 and dev.mapped_blkaddr == 512
    [blob] = boot.blobs
    assert blob.blob_id == V6_BLOB and blob.chunk_count == 2
    assert blob.compressor == Compressor.ZSTD and blob.digester == Digester.BLAKE3
    assert blob.features == 0x70000021
    assert blob.compressed_size == 14554 and blob.uncompressed_size == 36864
    assert blob.ci_offset == 8314 and blob.ci_compressed_size == blob.ci_uncompressed_size == 32
    assert blob.blob_toc_size == 1024 and blob.blob_toc_digest[:4] == bytes.fromhex("cfc89ed0")
    assert boot.placeholder_blob_indexes() == []


def test_v6_vector_tree(v6_boot):
    boot = Bootstrap.from_bytes(v6_boot)
    entries = list(boot.children(128))
    assert entries == [(1, b".", 128, 4), (2, b"..", 128, 4), (3, b"lib.rs", 133, 8), (4, b"sync_io.rs", 136, 8)]
    for start in range(6):
        assert list(boot.children(128, start)) == entries[start:]
    assert boot.child_count(128) == 2
    assert boot.lookup(128, b"lib.rs") == 133 and boot.lookup(128, b"sync_io.rs") == 136
    assert boot.lookup(128, b"..") == 128 and boot.lookup(128, b"zzz") is None and boot.lookup(128, b"a") is None
    root = boot.inode(128)
    assert root.is_dir and root.size == 67 and root.mtime == 0
    lib = boot.inode(133)
    assert lib.is_reg and lib.size == 16931 and lib.nlink == 1 and lib.blocks == 34
    assert boot.inode(136).size == 13400
    assert [p for p, _, _ in boot.walk()] == [b"/", b"/lib.rs", b"/sync_io.rs"]
    assert boot.xattrs(133) == {}


def test_v6_vector_chunks_and_digests(v6_boot, v6_blob):
    boot = Bootstrap.from_bytes(v6_boot)
    [c1] = boot.chunks(133)
    [c2] = boot.chunks(136)
    assert (c1.blob_index, c1.index, c1.uncompressed_offset, c1.file_offset) == (0, 0, 0, 0)
    assert (c2.blob_index, c2.index, c2.uncompressed_offset) == (0, 1, 5 * 4096)
    assert c1.uncompressed_size == 16931 and c2.uncompressed_size == 13400
    assert c1.compressed_offset + c1.compressed_size <= 7802 and c2.compressed_offset + c2.compressed_size == 7802
    digest_array = v6_blob[12954:13018]
    for ino, c in ((133, c1), (136, c2)):
        data = file_bytes(boot, ino, v6_blob)
        assert len(data) == boot.inode(ino).size
        assert blake3.blake3(data).digest() == c.digest == digest_array[32 * c.index:32 * c.index + 32]


# --------------------------------------------------------------------- detection and bad input


@pytest.mark.parametrize("data, match", [
    (b"", "neither"),
    (b"\0" * 100, "neither"),
    (b"garbage!" * 2000, "neither"),
    (b"SFAR\x00\x05\x00\x00" + b"\0" * 100, "at least 8192"),
])
def test_garbage_and_empty_input(data, match):
    with pytest.raises(FormatError, match=match) as info:
        Bootstrap.from_bytes(data)
    assert info.value.structure == "Bootstrap"


def test_short_v6_refused_like_nydusd(v6_boot):
    with pytest.raises(FormatError, match="shorter than 8 KiB"):
        Bootstrap.from_bytes(v6_boot[:4096])


def test_truncation_gives_format_error(v5_boots, v6_boot):
    for data in (v5_boots[0][1], v6_boot):
        for cut in (8192, 8200, len(data) // 2, len(data) - 8):
            with pytest.raises(FormatError):
                exercise(Bootstrap.from_bytes(data[:cut]))


def _table_boundaries(data: bytes) -> list[tuple[str, int]]:
    """(what, offset) of every start and end of a table the superblock names, plus the
    first and last inode record (v5) or the meta area start (v6), below the file end."""
    boot = Bootstrap.from_bytes(data)
    marks: list[tuple[str, int]] = []
    if boot.version == 5:
        sb = boot.superblock
        tables = [("inode table", sb.s_inode_table_offset, 4 * sb.s_inode_table_entries),
                  ("prefetch table", sb.s_prefetch_table_offset, 4 * sb.s_prefetch_table_entries),
                  ("blob table", sb.s_blob_table_offset, sb.s_blob_table_size),
                  ("extended blob table", sb.s_extended_blob_table_offset, 64 * sb.s_extended_blob_table_entries)]
        offsets = sorted(v << 3 for v in boot._table)
        marks += [("first inode record", offsets[0]), ("last inode record", offsets[-1])]
    else:
        sb, ext = boot.superblock, boot.superblock_ext
        tables = [("device slots", 1408, 128 * sb.s_extra_devices),
                  ("blob table", ext.s_blob_table_offset, ext.s_blob_table_size),
                  ("prefetch table", ext.s_prefetch_table_offset, ext.s_prefetch_table_size),
                  ("chunk info table", ext.s_chunk_table_offset, ext.s_chunk_table_size)]
        marks.append(("meta area", sb.s_meta_blkaddr * boot.block_size))
    for what, off, size in tables:
        if size:
            marks += [(what + " start", off), (what + " middle", off + size // 2), (what + " end", off + size - 1)]
    return marks


def _truncations(data: bytes) -> list[tuple[str, int]]:
    """Each boundary as a length a truncated file could have (v5: 8-byte, v6: block multiples)."""
    boot = Bootstrap.from_bytes(data)
    align = 8 if boot.version == 5 else boot.block_size
    cuts = {}
    for what, off in _table_boundaries(data):
        cut = off // align * align
        if 0 < cut < len(data):
            cuts.setdefault(cut, what)
    # The 9000-byte cut reported by an operator: past every v5 table, inside the records.
    if 9000 < len(data):
        cuts.setdefault(9000 // align * align, "9000 bytes")
    return sorted((what, cut) for cut, what in cuts.items())


def _assert_refused_at_load(data: bytes, label: str) -> int:
    cuts = _truncations(data)
    assert cuts, label
    for what, cut in cuts:
        with pytest.raises(FormatError) as info:
            Bootstrap.from_bytes(data[:cut])
        err = info.value
        # The message names the structure, the field and the offending value in hex.
        assert err.structure and err.field and err.structure in str(err) and err.field in str(err), \
            (label, what, cut, str(err))
        if isinstance(err.value, int):
            assert hex(err.value) in str(err)
    return len(cuts)


@pytest.mark.parametrize("build", [
    lambda: build_v5(sample_tree()),
    lambda: build_v5(sample_tree(), prefetch=[2, 3]),
    lambda: build_v5(sample_tree(), ext_table=False),
    lambda: build_v6(sample_tree()),
    lambda: build_v6(sample_tree(), prefetch_paths=[b"/a.txt", b"/big"]),
    lambda: build_v6(sample_tree(), blkszbits=9),
    lambda: build_v6(sample_tree(), compact=True),
], ids=["v5", "v5-prefetch", "v5-no-ext-table", "v6", "v6-prefetch", "v6-tarfs", "v6-compact"])
def test_truncated_synthetic_bootstrap_is_refused_at_load(build):
    data = build()
    Bootstrap.from_bytes(data)  # the whole image loads
    assert _assert_refused_at_load(data, "synthetic") >= 3


def test_truncated_vector_bootstraps_are_refused_at_load(v5_boots, v6_boot):
    for name, data in v5_boots:
        _assert_refused_at_load(data, name)
    _assert_refused_at_load(v6_boot, "v6")
    with pytest.raises(FormatError) as info:
        Bootstrap.from_bytes(v5_boots[0][1][:9000])
    assert info.value.structure == "RafsV5InodeTable" and "past the end" in str(info.value)


def test_v5_last_record_cut_in_its_tail_is_refused():
    # Only the chunk records of the last inode are missing: its header still fits.
    data = build_v5(d({b"z": file_of(0x300000)}))
    boot = Bootstrap.from_bytes(data)
    last = max(boot._table) << 3
    assert len(data) - last > 128 + 8 + 3 * 80 - 1
    with pytest.raises(FormatError, match="last inode record .* runs past the end") as info:
        Bootstrap.from_bytes(data[:len(data) - 80])
    assert info.value.field.startswith("entries[")


def test_bad_magic_version_names_field(v5_boots):
    data = bytearray(v5_boots[0][1])
    data[12:16] = struct.pack("<I", 3000)  # chunk size not a power of two
    with pytest.raises(FormatError) as info:
        Bootstrap.from_bytes(bytes(data))
    assert info.value.field == "s_block_size" and "0xbb8" in str(info.value)


def test_unknown_inode_numbers(v5_boots, v6_boot):
    boot5 = Bootstrap.from_bytes(v5_boots[0][1])
    boot6 = Bootstrap.from_bytes(v6_boot)
    for boot, bad in ((boot5, [0, 55, -1, 10**20]), (boot6, [0, 10**9, -3])):
        for ino in bad:
            with pytest.raises(NoSuchInodeError) as info:
                boot.inode(ino)
            assert isinstance(info.value, LookupError) and info.value.field == "ino"


def test_accepts_memoryview_bytearray_and_mmap(v6_boot, tmp_path):
    path = tmp_path / "boot"
    path.write_bytes(v6_boot)
    for data in (memoryview(v6_boot), bytearray(v6_boot)):
        assert Bootstrap.from_bytes(data).lookup(128, b"lib.rs") == 133
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        boot = Bootstrap.from_bytes(mm)
        assert boot.lookup(128, b"sync_io.rs") == 136 and boot.chunks(136)[0].index == 1
        boot.release()


# --------------------------------------------------------------------- synthetic images


@pytest.fixture(scope="module", params=["v5", "v6", "v6-compact-plain", "v6-tarfs"])
def sample(request):
    tree = sample_tree()
    if request.param == "v5":
        return request.param, Bootstrap.from_bytes(build_v5(tree))
    if request.param == "v6":
        return request.param, Bootstrap.from_bytes(build_v6(tree))
    if request.param == "v6-compact-plain":
        return request.param, Bootstrap.from_bytes(build_v6(tree, compact=True, inline=False))
    return request.param, Bootstrap.from_bytes(build_v6(tree, blkszbits=9))


def test_sample_xattrs(sample):
    _, boot = sample
    assert boot.has_xattr
    assert boot.xattrs(boot.root_ino) == {b"trusted.overlay.opaque": b"y"}
    a = resolve(boot, b"/a.txt")
    assert boot.inode(a).has_xattr
    assert boot.xattrs(a) == {b"user.foo": b"bar", b"security.selinux": b"ctx\0"}
    assert boot.xattrs(resolve(boot, b"/empty")) == {}


def test_sample_special_files_and_symlink(sample):
    _, boot = sample
    chr_ = boot.inode(resolve(boot, b"/chr"))
    blk = boot.inode(resolve(boot, b"/blk"))
    assert chr_.is_chr and chr_.rdev == (1 << 8) | 3
    assert blk.is_blk and blk.rdev == (8 << 8) | 1
    assert boot.inode(resolve(boot, b"/fifo")).is_fifo
    assert boot.inode(resolve(boot, b"/sock")).is_sock
    sym = resolve(boot, b"/sym")
    assert boot.inode(sym).is_symlink and boot.readlink(sym) == b"dir/inner"
    with pytest.raises(FormatError, match="not a symlink"):
        boot.readlink(resolve(boot, b"/a.txt"))


def test_sample_hardlinks_and_chunks(sample):
    kind, boot = sample
    h1, h2 = resolve(boot, b"/dir/hl1"), resolve(boot, b"/hl2")
    assert h1 == h2 and boot.inode(h1).nlink == 2
    big = boot.chunks(resolve(boot, b"/big"))
    assert [(c.blob_index, c.index, c.file_offset, c.uncompressed_size) for c in big] == [
        (1, 3, 0, 0x100000), (1, 4, 0x100000, 0x100000), (1, 5, 0x200000, 0x80000)]
    assert boot.chunks(resolve(boot, b"/empty")) == []
    assert boot.chunks(resolve(boot, b"/dir")) == []
    if kind == "v6-tarfs":
        assert boot.is_tarfs and big[1].compressed_offset == big[1].uncompressed_offset
    else:
        assert big[0].digest == chunk(1, 3, 0).digest


def test_sample_dirent_order_dash_before_dot(sample):
    kind, boot = sample
    names = [n for _, n, _, _ in boot.children(boot.root_ino)]
    if kind == "v5":
        assert names[:3] == [b".", b"..", b"-dash"]
    else:
        # v6 sorts "." and ".." as ordinary names: "-dash" (0x2d) comes first.
        assert names[:3] == [b"-dash", b".", b".."]
    assert boot.child_count(boot.root_ino) == 11
    assert boot.lookup(boot.root_ino, b"-dash") is not None


def test_sample_compact_inodes_have_no_mtime():
    boot = Bootstrap.from_bytes(build_v6(sample_tree(), compact=True))
    assert boot.inode(resolve(boot, b"/a.txt")).mtime == 0
    full = Bootstrap.from_bytes(build_v6(sample_tree()))
    assert full.inode(resolve(full, b"/a.txt")).mtime == 1_700_000_000


def test_v6_multi_block_directory_lookup_and_resume():
    names = [b"entry-%05d-%s" % (i, b"x" * (i % 40)) for i in range(1500)]
    tree = d({n: f(0) for n in names})
    for inline in (True, False):
        boot = Bootstrap.from_bytes(build_v6(tree, inline=inline))
        root = boot.inode(boot.root_ino)
        assert root.size > 4096 * 10
        for n in names:
            ino = boot.lookup(boot.root_ino, n)
            assert ino is not None and boot.inode(ino).is_reg
        assert boot.lookup(boot.root_ino, b"entry-") is None
        assert boot.lookup(boot.root_ino, b"zzz") is None
        full = list(boot.children(boot.root_ino))
        assert [n for _, n, _, _ in full] == sorted(names + [b".", b".."])
        for start in (0, 1, 200, 777, len(full) - 1, len(full), len(full) + 5):
            assert list(boot.children(boot.root_ino, start)) == full[start:]
        assert boot.child_count(boot.root_ino) == len(names)


def test_v6_long_symlinks_plain_and_tarfs_blocks():
    target = b"/".join([b"component"] * 400)[:4096]
    for bits in (12, 9):
        boot = Bootstrap.from_bytes(build_v6(d({b"l": link(target)}), blkszbits=bits))
        assert boot.readlink(boot.lookup(boot.root_ino, b"l")) == target


def test_v6_hole_chunks_follow_the_convention():
    tree = d({b"holey": file_of(0x180000)})
    boot = Bootstrap.from_bytes(build_v6(tree, hole_paths=(b"/holey",)))
    chunks = boot.chunks(boot.lookup(boot.root_ino, b"holey"))
    assert [(c.blob_index, c.index, c.digest, c.file_offset, c.uncompressed_size) for c in chunks] == [
        (-1, -1, b"", 0, 0x100000), (-1, -1, b"", 0x100000, 0x80000)]


def test_v5_has_hole_gaps_become_hole_chunks():
    c = dataclasses.replace(chunk(0, 7, 0x1000), file_offset=0x200000)
    tree = d({b"sparse": f(0x201000, [c], holes=True)})
    boot = Bootstrap.from_bytes(build_v5(tree))
    chunks = boot.chunks(boot.lookup(1, b"sparse"))
    assert [(x.blob_index, x.file_offset, x.uncompressed_size) for x in chunks] == [
        (-1, 0, 0x200000), (0, 0x200000, 0x1000)]
    # A tail gap of a hostile size is one entry, not one per chunk.
    full = dataclasses.replace(chunk(0, 7, 0x100000), file_offset=0x200000)
    tree = d({b"huge": f(1 << 60, [full], holes=True)})
    boot = Bootstrap.from_bytes(build_v5(tree))
    chunks = boot.chunks(boot.lookup(1, b"huge"))
    assert [(x.blob_index, x.file_offset, x.uncompressed_size) for x in chunks] == [
        (-1, 0, 0x200000), (0, 0x200000, 0x100000), (-1, 0x300000, (1 << 60) - 0x300000)]


def test_chunk_count_inconsistent_with_size_is_refused():
    tree = d({b"short": f(0x300000, [chunk(0, 0, 0x100000)])})
    boot = Bootstrap.from_bytes(build_v5(tree))
    with pytest.raises(FormatError, match="needs 3 chunk"):
        boot.chunks(boot.lookup(1, b"short"))
    tree = d({b"wrong": f(100, [chunk(0, 0, 99)])})
    boot = Bootstrap.from_bytes(build_v5(tree))
    with pytest.raises(FormatError, match="must cover 100 bytes"):
        boot.chunks(boot.lookup(1, b"wrong"))


def test_v6_chunk_without_table_record_is_refused():
    data = bytearray(build_v6(d({b"x": f(10, [chunk(0, 1, 10)])})))
    boot = Bootstrap.from_bytes(bytes(data))
    ct = boot.superblock_ext.s_chunk_table_offset
    data[ct + 72:ct + 76] = struct.pack("<I", 9)  # the record's ci index no longer matches
    boot = Bootstrap.from_bytes(bytes(data))
    with pytest.raises(FormatError, match="no chunk table record"):
        boot.chunks(boot.lookup(boot.root_ino, b"x"))


def test_v6_directory_cycle_walk_terminates():
    data = bytearray(build_v6(d({b"a": d({b"loop": d({}), b"z": f(0)})})))
    boot = Bootstrap.from_bytes(bytes(data))
    a = boot.lookup(boot.root_ino, b"a")
    off, _, isize, xsize, _, _ = boot.inode(a)._aux
    tail = off + isize + xsize
    block = RafsV6DirentBlock.from_bytes(data, tail, boot.inode(a).size)
    i = [n for n, _, _ in block.entries].index(b"loop")
    data[tail + 12 * i:tail + 12 * i + 8] = struct.pack("<Q", boot.root_ino)
    boot = Bootstrap.from_bytes(bytes(data))
    paths = [p for p, _, _ in boot.walk()]
    assert paths == [b"/", b"/a", b"/a/loop", b"/a/z"]


def test_lookup_and_inode_caches_are_bounded(monkeypatch):
    boot = Bootstrap.from_bytes(build_v5(sample_tree()))
    monkeypatch.setattr(boot, "INODE_CACHE_LIMIT", 4)
    monkeypatch.setattr(boot, "LOOKUP_CACHE_LIMIT", 4)
    for path, ino, _ in boot.walk():
        assert resolve(boot, path) == ino
    assert len(boot._icache) <= 4 and len(boot._lcache) <= 4


def test_big_v5_image_loads_lazily_and_caches(monkeypatch):
    # Load cost is measured by scripts/bench, not asserted here: this checks the
    # behaviour that makes it cheap (nothing decoded up front, repeats are cache hits).
    tree = d({b"d%03d" % i: d({b"file-%05d" % j: f(0) for j in range(170)}) for i in range(100)})
    data = build_v5(tree)
    boot = Bootstrap.from_bytes(data)
    assert boot.max_ino == 17101
    assert len(boot._icache) == 1  # only the root was decoded
    d42 = boot.lookup(1, b"d042")
    names = [b"file-%05d" % j for j in range(170)]
    first = [boot.inode(boot.lookup(d42, n)).ino for n in names]
    assert len(set(first)) == 170
    decoded = []
    real = boot._load_inode
    monkeypatch.setattr(boot, "_load_inode", lambda ino: decoded.append(ino) or real(ino))
    monkeypatch.setattr(boot, "_lookup", lambda info, name: pytest.fail("lookup missed the cache"))
    for _ in range(3):
        assert [boot.inode(boot.lookup(d42, n)).ino for n in names] == first
    assert decoded == []
    assert len(boot._icache) == 1 + 1 + 170


# --------------------------------------------------------------------- inlined meta and blob ids


@pytest.mark.parametrize("toc", [True, False])
def test_blob_with_inlined_bootstrap(toc):
    boot_bytes = build_v6(sample_tree(), blobs=None)
    blob = inline_blob(boot_bytes, toc=toc)
    boot = Bootstrap.from_bytes(blob)
    assert boot.inlined and boot.version == 6
    assert resolve(boot, b"/dir/inner") is not None
    # Neither blob has INLINED_FS_META, both have CAP_TAR_TOC: nothing to replace.
    assert boot.placeholder_blob_indexes() == []


def test_placeholder_blob_ids_replaced():
    from tests.unit.format.format_factory import default_blobs

    blobs = default_blobs(features=int(BlobFeatures.ALIGNED | BlobFeatures.CAP_TAR_TOC))
    blobs[1] = dataclasses.replace(blobs[1], blob_id="x" * 64,
                                   features=int(BlobFeatures.ALIGNED | BlobFeatures.CAP_TAR_TOC
                                                | BlobFeatures.INLINED_FS_META))
    boot = Bootstrap.from_bytes(inline_blob(build_v6(sample_tree(), blobs=blobs)))
    assert boot.placeholder_blob_indexes() == [1]
    assert boot.set_blob_id_from_meta(blob_id_from_meta_path("/var/lib/" + "f" * 64 + ".blob.meta")) == [1]
    assert [b.blob_id for b in boot.blobs] == [BLOB_A, "f" * 64]
    with pytest.raises(FormatError):
        boot.replace_blob_ids({5: "z"})


def test_old_blob_without_cap_tar_toc_is_placeholder_only_when_inlined():
    from tests.unit.format.format_factory import default_blobs

    blobs = default_blobs(features=int(BlobFeatures.ALIGNED))
    plain = Bootstrap.from_bytes(build_v6(sample_tree(), blobs=blobs))
    assert plain.placeholder_blob_indexes() == []
    inlined = Bootstrap.from_bytes(inline_blob(build_v6(sample_tree(), blobs=blobs)))
    assert inlined.placeholder_blob_indexes() == [0, 1]


def test_blob_id_from_meta_path():
    assert blob_id_from_meta_path("/a/b/abc.blob.meta") == "abc"
    assert blob_id_from_meta_path("abc") == "abc"
    assert blob_id_from_meta_path("2fa78cad.boot.tar.gz") == "2fa78cad"
    with pytest.raises(FormatError):
        blob_id_from_meta_path("/a/b/")


def test_inlined_blob_with_corrupt_bootstrap_names_the_section():
    blob = bytearray(inline_blob(build_v5(sample_tree()), toc=True))
    blob[100 + 512 + 40] ^= 0xFF  # inside the zstd frame (after the data and its header)
    with pytest.raises(FormatError, match="image.boot"):
        Bootstrap.from_bytes(bytes(blob))


def test_stat_helpers(v5_boots):
    boot = Bootstrap.from_bytes(v5_boots[0][1])
    info = boot.inode(1)
    assert info.file_type == stat.S_IFDIR and info.dtype == 4 and info.is_dir and not info.is_reg
    assert "ino=1" in repr(info) and "BootstrapV5" in repr(boot)
