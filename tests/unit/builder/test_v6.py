from __future__ import annotations

import hashlib
import stat
from dataclasses import replace

import pytest

from nydus_vfs.builder._layout import ImageSpec
from nydus_vfs.builder._tree import Inode, Node, new_directory
from nydus_vfs.builder._v6 import build_v6_bootstrap, v6_dir_entries
from nydus_vfs.errors import BuildError
from nydus_vfs.format.reader import Bootstrap
from nydus_vfs.format.types import BlobInfo, ChunkInfo, Compressor, Digester, SuperFlags
from nydus_vfs.format.v5 import RafsV5ChunkInfo
from nydus_vfs.format.v6 import (EROFS_INODE_CHUNK_BASED, EROFS_INODE_FLAT_INLINE, EROFS_INODE_FLAT_PLAIN,
                                 EROFS_SUPER_OFFSET, RafsV6Blob, RafsV6Device, RafsV6SuperBlock, RafsV6SuperBlockExt,
                                 decode_inode)

CS = 0x1000


def _blob(i: int, usize: int = 3 * 4096) -> BlobInfo:
    return BlobInfo(index=i, blob_id=f"{i:064x}", chunk_count=3, chunk_size=CS, compressor=Compressor.ZSTD,
                    digester=Digester.BLAKE3, features=0x4000_0001, compressed_size=1000, uncompressed_size=usize,
                    ci_offset=900, ci_compressed_size=48, ci_uncompressed_size=48)


def _file(content_chunks: list[tuple[bytes, int, int]], size: int) -> Inode:
    f = Inode(0o100644, size=size)
    f.chunks = [ChunkInfo(hashlib.sha256(d).digest(), b, i, 1, 0, 10, i * 4096, min(CS, size - k * CS), k * CS)
                for k, (d, b, i) in enumerate(content_chunks)]
    return f


def _spec(root: Node, blobs=None, **kw) -> ImageSpec:
    return ImageSpec(root=root, chunk_size=CS, compressor=Compressor.ZSTD, digester=Digester.BLAKE3,
                     blobs=[_blob(0)] if blobs is None else blobs, **kw)


def _inodes(data: bytes):
    bs = Bootstrap.from_bytes(data)
    sb = RafsV6SuperBlock.from_bytes(data, EROFS_SUPER_OFFSET)
    meta = sb.s_meta_blkaddr * 4096
    return bs, sb, {p: (nid, decode_inode(data, meta + nid * 32)) for p, nid, _ in bs.walk()}


def test_superblock_tables_and_root_nid():
    root = new_directory(b"/")
    root.children[b"f"] = Node(b"f", _file([(b"x", 0, 0), (b"y", 0, 1)], 5000))
    data = build_v6_bootstrap(_spec(root, blobs=[_blob(0), _blob(1, 8192)]))
    assert len(data) % 4096 == 0
    sb = RafsV6SuperBlock.from_bytes(data, EROFS_SUPER_OFFSET)
    sb.validate(len(data))
    ext = RafsV6SuperBlockExt.from_bytes(data, RafsV6SuperBlockExt.OFFSET)
    ext.validate(len(data), 1408 + 256)
    assert sb.s_root_nid == 128 and sb.s_inos == 2 and sb.s_extra_devices == 2 and sb.s_blocks == 5
    assert ext.s_flags == SuperFlags.COMPRESSION_ZSTD | SuperFlags.HASH_BLAKE3 | SuperFlags.EXPLICIT_UID_GID \
        | SuperFlags.ENCRYPTION_NONE
    assert ext.s_blob_table_offset == 4096 and ext.s_blob_table_size == 512
    assert sb.s_meta_blkaddr == 2 and not any(data[8192:12288])  # the reserved block stays zero
    devs = [RafsV6Device.from_bytes(data, 1408 + 128 * i) for i in range(2)]
    assert devs[0].blocks == 3 and devs[0].mapped_blkaddr == 128        # bootstrap < 512 KiB
    assert devs[1].mapped_blkaddr == 256
    entry = RafsV6Blob.from_bytes(data, 4096 + 256)
    assert entry.blob_index == 1 and entry.chunk_size == CS
    recs = [RafsV5ChunkInfo.from_bytes(data, ext.s_chunk_table_offset + 80 * i)
            for i in range(ext.s_chunk_table_size // 80)]
    assert [r.block_id for r in recs] == sorted(r.block_id for r in recs) and len(recs) == 2


def test_image_without_blobs():
    root = new_directory(b"/")
    root.children[b"e"] = Node(b"e", Inode(0o100644))
    data = build_v6_bootstrap(_spec(root, blobs=[]))
    sb = RafsV6SuperBlock.from_bytes(data, EROFS_SUPER_OFFSET)
    assert sb.s_meta_blkaddr == 0 and sb.s_root_nid == 128 and sb.s_blocks == 0 and len(data) >= 8192
    assert Bootstrap.from_bytes(data).inode(128).is_dir


def test_dirents_sort_dot_entries_by_raw_bytes():
    root = new_directory(b"/")
    for name in (b"-dash", b"+plus", b"zed", b"\xff"):
        root.children[name] = Node(name, Inode(0o100644))
    names = [n for n, _ in v6_dir_entries(root, root)]
    assert names == [b"+plus", b"-dash", b".", b"..", b"zed", b"\xff"]
    bs = Bootstrap.from_bytes(build_v6_bootstrap(_spec(root, blobs=[])))
    assert [n for _, n, _, _ in bs.children(bs.root_ino)] == names
    assert bs.lookup(bs.root_ino, b"..") == bs.root_ino


@pytest.mark.parametrize("count,layout", [(3, EROFS_INODE_FLAT_INLINE), (400, None)])
def test_directory_blocks_never_split_entries(count, layout):
    root = new_directory(b"/")
    d = new_directory(b"d")
    root.children[b"d"] = d
    for i in range(count):
        n = b"entry-%05d-" % i + b"x" * 30
        d.children[n] = Node(n, Inode(0o100644))
    data = build_v6_bootstrap(_spec(root, blobs=[]))
    bs, _, inodes = _inodes(data)
    nid, ino = inodes[b"/d"]
    if layout is not None:
        assert ino.layout == layout
    assert sorted(n for _, n, _, _ in bs.children(nid) if n not in (b".", b"..")) == sorted(d.children)
    if count > 100:
        assert ino.i_size > 4096


def test_inline_data_never_crosses_a_block_and_symlink_layouts():
    root = new_directory(b"/")
    for i in range(120):  # push later inodes towards block ends
        n = b"s%03d" % i
        root.children[n] = Node(n, Inode(0o120777, symlink=b"t" * (200 + i * 7), size=200 + i * 7))
    root.children[b"big"] = Node(b"big", Inode(0o120777, symlink=b"L" * 4096, size=4096))
    data = build_v6_bootstrap(_spec(root, blobs=[]))
    bs, sb, inodes = _inodes(data)
    meta = sb.s_meta_blkaddr * 4096
    for path, (nid, ino) in inodes.items():
        start = meta + nid * 32
        if ino.layout == EROFS_INODE_FLAT_INLINE:
            assert start % 4096 + 64 + ino.xattr_size + ino.i_size % 4096 <= 4096, path
    assert inodes[b"/big"][1].layout == EROFS_INODE_FLAT_PLAIN
    assert bs.readlink(inodes[b"/big"][0]) == b"L" * 4096
    assert bs.readlink(inodes[b"/s119"][0]) == b"t" * (200 + 119 * 7)


def test_regular_files_devices_and_hardlinks():
    root = new_directory(b"/")
    f = _file([(b"a", 0, 2), (b"b", 0, 1)], 4097)
    root.children[b"f"] = Node(b"f", f)
    root.children[b"g"] = Node(b"g", f)
    root.children[b"c"] = Node(b"c", Inode(stat.S_IFCHR | 0o600, rdev=0x103))
    root.children[b"x"] = Node(b"x", Inode(0o100644, xattrs={b"user.a": b"1", b"trusted.b": b""}))
    data = build_v6_bootstrap(_spec(root))
    bs, _, inodes = _inodes(data)
    assert inodes[b"/f"][0] == inodes[b"/g"][0]
    nid, ino = inodes[b"/f"]
    assert ino.layout == EROFS_INODE_CHUNK_BASED and ino.i_nlink == 2 and ino.i_u == 0x20
    chunks = bs.chunks(nid)
    assert [(c.index, c.uncompressed_offset, c.file_offset) for c in chunks] == [(2, 8192, 0), (1, 4096, 4096)]
    assert inodes[b"/c"][1].i_u == 0x103 and bs.inode(inodes[b"/c"][0]).rdev == 0x103
    assert bs.xattrs(inodes[b"/x"][0]) == {b"user.a": b"1", b"trusted.b": b""}


def test_unaligned_chunks_and_too_many_blobs_are_refused():
    root = new_directory(b"/")
    f = _file([(b"a", 0, 0)], 10)
    f.chunks = [replace(f.chunks[0], uncompressed_offset=100)]
    root.children[b"f"] = Node(b"f", f)
    with pytest.raises(BuildError, match="aligned"):
        build_v6_bootstrap(_spec(root))
    with pytest.raises(BuildError, match="254"):
        build_v6_bootstrap(_spec(new_directory(b"/"), blobs=[_blob(i) for i in range(255)]))
    with pytest.raises(BuildError, match="64 bytes"):
        build_v6_bootstrap(_spec(new_directory(b"/"), blobs=[replace(_blob(0), blob_id="x" * 65)]))


def test_prefetch_table_holds_nids():
    root = new_directory(b"/")
    root.children[b"a"] = Node(b"a", Inode(0o100644))
    root.children[b"d"] = new_directory(b"d")
    data = build_v6_bootstrap(_spec(root, prefetch=[(b"d",), (b"nope",), (b"a",)]))
    bs, _, inodes = _inodes(data)
    assert bs.prefetch_inodes == [inodes[b"/d"][0], inodes[b"/a"][0]]
