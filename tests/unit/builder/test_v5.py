from __future__ import annotations

import hashlib
from dataclasses import replace

from nydus_vfs.builder._layout import ImageSpec
from nydus_vfs.builder._tree import Inode, Node, new_directory
from nydus_vfs.builder._v5 import build_v5_bootstrap, v5_dir_size
from nydus_vfs.format.reader import Bootstrap
from nydus_vfs.format.types import BlobInfo, ChunkInfo, Compressor, Digester, SuperFlags
from nydus_vfs.format.v5 import (RAFSV5_SUPERBLOCK_SIZE, RafsV5Inode, RafsV5InodeRecord, RafsV5InodeTable,
                                 RafsV5SuperBlock)

BLOB = BlobInfo(index=0, blob_id="b" * 64, chunk_count=2, chunk_size=0x1000, compressor=Compressor.NONE,
                digester=Digester.SHA256, features=0x4000_0000, compressed_size=8192, uncompressed_size=8192)


def _chunk(data: bytes, index: int, offset: int) -> ChunkInfo:
    return ChunkInfo(hashlib.sha256(data).digest(), 0, index, 0, offset, len(data), offset, len(data), 0)


def _spec(**kw) -> ImageSpec:
    root = new_directory(b"/")
    d = new_directory(b"dir")
    root.children[b"dir"] = d
    f = Inode(0o100644, uid=1, gid=2, size=4100, mtime=7, mtime_nsec=8, xattrs={b"user.k": b"v"})
    f.chunks = [_chunk(b"a" * 4096, 0, 0), replace(_chunk(b"b" * 4, 1, 4096), file_offset=4096)]
    d.children[b"file"] = Node(b"file", f)
    root.children[b"link"] = Node(b"link", f)            # hardlink
    root.children[b"sym"] = Node(b"sym", Inode(0o120777, symlink=b"dir/file", size=8))
    root.children[b"empty"] = new_directory(b"empty")
    return ImageSpec(root=root, chunk_size=0x1000, compressor=Compressor.NONE, digester=Digester.SHA256,
                     blobs=[BLOB], **kw)


def _records(data: bytes):
    sb = RafsV5SuperBlock.from_bytes(data)
    sb.validate(len(data))
    table = RafsV5InodeTable.from_bytes(data, sb.s_inode_table_offset, sb.s_inode_table_entries).entries
    return sb, [RafsV5InodeRecord.from_bytes(data, v << 3) for v in table], list(table)


def test_layout_tables_and_records():
    data = build_v5_bootstrap(_spec())
    sb, recs, table = _records(data)
    assert len(data) % 8 == 0
    assert sb.s_inode_table_offset == RAFSV5_SUPERBLOCK_SIZE
    assert sb.s_inode_table_entries == 6 and sb.s_inodes_count == 5   # two names share the file
    assert sb.s_flags == SuperFlags.COMPRESSION_NONE | SuperFlags.HASH_SHA256 | SuperFlags.EXPLICIT_UID_GID \
        | SuperFlags.HAS_XATTR
    # index order: /, dir, empty, link, sym, dir/file ; records contiguous in that order
    assert [r.name for r in recs] == [b"/", b"dir", b"empty", b"link", b"sym", b"file"]
    offsets = [v << 3 for v in table]
    assert offsets == sorted(offsets)
    for r, off, nxt in zip(recs, offsets, offsets[1:] + [len(data)]):
        assert off + r.size == nxt
        r.validate(6, 0x1000, 1)
    root, dirn, empty, link, sym, file = recs
    assert (root.inode.i_child_index, root.inode.i_child_count, root.inode.i_parent) == (2, 4, 0)
    assert (dirn.inode.i_child_index, dirn.inode.i_child_count) == (6, 1)
    assert empty.inode.i_child_index == 7 and empty.inode.i_child_count == 0
    assert link.inode.i_ino == file.inode.i_ino == 4 and link.inode.i_nlink == file.inode.i_nlink == 2
    assert file.inode.i_parent == 2 and link.inode.i_parent == 1
    assert root.inode.i_nlink == 4 and dirn.inode.i_nlink == 2
    assert root.inode.i_size == v5_dir_size([b"dir", b"empty", b"link", b"sym"]) == 4096
    assert [c.file_offset for c in file.chunks] == [0, 4096]
    assert file.inode.i_blocks == (4100 + 16 + 511) // 512
    assert sym.symlink == b"dir/file" and sym.inode.i_flags == 0x1
    assert file.xattrs.as_dict() == {b"user.k": b"v"}


def test_inode_digests_are_computed_bottom_up():
    data = build_v5_bootstrap(_spec())
    _, recs, _ = _records(data)
    by = {r.name: r.inode.i_digest for r in recs}
    h = hashlib.sha256
    file_digest = h(b"".join(c.block_id for c in recs[-1].chunks)).digest()
    assert by[b"file"] == by[b"link"] == file_digest
    assert by[b"sym"] == h(b"dir/file").digest()
    assert by[b"dir"] == h(file_digest).digest()
    assert by[b"/"] == h(by[b"dir"] + by[b"empty"] + by[b"link"] + by[b"sym"]).digest()


def test_repeatable_drops_owners_and_prefetch_table():
    data = build_v5_bootstrap(_spec(explicit_uidgid=False, prefetch=[(b"dir",), (b"missing",), (b"link",)]))
    sb, recs, _ = _records(data)
    assert not sb.s_flags & SuperFlags.EXPLICIT_UID_GID
    assert {(r.inode.i_uid, r.inode.i_gid) for r in recs} == {(0, 0)}
    bs = Bootstrap.from_bytes(data)
    assert bs.prefetch_inodes == [2, 4]


def test_dir_size_rule():
    assert v5_dir_size([]) == 4096
    assert v5_dir_size([b"x" * 100] * 40) == 8192


def test_reader_agrees():
    bs = Bootstrap.from_bytes(build_v5_bootstrap(_spec()))
    paths = {p: (ino, info.nlink) for p, ino, info in bs.walk()}
    assert paths[b"/dir/file"] == paths[b"/link"] == (4, 2)
    assert bs.blobs[0].blob_id == "b" * 64
    assert RafsV5Inode.SIZE == 128
