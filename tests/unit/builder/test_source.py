from __future__ import annotations

import io
import os
import stat
import tarfile

import pytest

from nydus_vfs.builder._chunker import ChunkPipeline
from nydus_vfs.builder._source import WhiteoutSpec, chunk_files, is_whiteout, load_directory, load_tar
from nydus_vfs.builder._tree import Inode, Node, decode_dev, index_order
from nydus_vfs.errors import BuildError
from nydus_vfs.format.types import ChunkInfo, Compressor, Digester


class _Sink:
    """Records chunks as a blob writer would (offsets = running total)."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.pos = 0

    def add_chunk(self, digest, stored, compressed, usize):
        info = ChunkInfo(digest, 0, len(self.data), 0, self.pos, len(stored), self.pos, usize, 0)
        self.data.append(stored)
        self.pos += len(stored)
        return info


def _pipeline(sink=None):
    return ChunkPipeline(sink or _Sink(), digester=Digester.SHA256, compressor=Compressor.NONE, workers=2)


def _tar(entries) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in entries:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _ti(name, data=b"", **kw):
    info = tarfile.TarInfo(name)
    for k, v in kw.items():
        setattr(info, k, v)
    return info, (data if kw.get("type", tarfile.REGTYPE) == tarfile.REGTYPE else None)


def test_load_directory_records_every_kind(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"abc")
    os.link(tmp_path / "d" / "f", tmp_path / "hl")
    os.symlink("d/f", tmp_path / "sym")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / ".wh.gone").write_bytes(b"")
    os.utime(tmp_path / "d" / "f", ns=(5, 1_234_567_891))
    root = load_directory(tmp_path)
    kids = root.children
    assert sorted(kids) == [b"d", b"fifo", b"hl", b"sym"]         # the OCI whiteout is dropped
    assert kids[b"hl"].inode is kids[b"d"].children[b"f"].inode    # hardlinks share one inode
    assert kids[b"sym"].inode.symlink == b"d/f" and kids[b"sym"].inode.size == 3
    f = kids[b"hl"].inode
    assert (f.mtime, f.mtime_nsec, f.size) == (1, 234_567_891, 3)
    assert stat.S_ISFIFO(kids[b"fifo"].inode.mode)
    kept = load_directory(tmp_path, keep_whiteouts=True)
    assert b".wh.gone" in kept.children


@pytest.mark.skipif(os.geteuid() != 0, reason="device nodes need root")
def test_load_directory_devices_and_overlay_whiteouts(tmp_path):
    os.mknod(tmp_path / "c", 0o600 | stat.S_IFCHR, os.makedev(300, 70000))
    os.mknod(tmp_path / "wo", 0o600 | stat.S_IFCHR, os.makedev(0, 0))
    root = load_directory(tmp_path, whiteout_spec=WhiteoutSpec.OVERLAYFS)
    assert decode_dev(root.children[b"c"].inode.rdev) == (300, 70000)
    assert b"wo" not in root.children
    assert b"wo" in load_directory(tmp_path, whiteout_spec=WhiteoutSpec.OCI).children


def test_load_directory_refuses_non_directories(tmp_path):
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(BuildError, match="not a directory"):
        load_directory(tmp_path / "f")
    with pytest.raises(BuildError, match="No such file"):
        load_directory(tmp_path / "missing")


def test_chunk_files_splits_skips_holes_and_reads_each_inode_once(tmp_path):
    with open(tmp_path / "sparse", "wb") as f:
        f.truncate(5 * 4096)
        f.seek(2 * 4096)
        f.write(b"x")
    (tmp_path / "small").write_bytes(b"s" * 5000)
    os.link(tmp_path / "small", tmp_path / "small2")
    (tmp_path / "empty").write_bytes(b"")
    root = load_directory(tmp_path)
    sink = _Sink()
    with _pipeline(sink) as p:
        chunk_files(p, [(e.path, e.node.inode) for e in index_order(root)], 4096)
    sparse = root.children[b"sparse"].inode
    assert [c.file_offset for c in sparse.chunks] == [0, 4096, 8192, 12288, 16384]
    zero = sparse.chunks[0].digest
    assert [c.digest == zero for c in sparse.chunks] == [True, True, False, True, True]
    assert [c.uncompressed_size for c in root.children[b"small"].inode.chunks] == [4096, 904]
    assert root.children[b"empty"].inode.chunks == []
    # zero chunk, x chunk, two small chunks: stored once each
    assert len(sink.data) == 4 and bytes(4096) in sink.data


def test_chunk_files_reports_a_file_that_shrinks(tmp_path):
    (tmp_path / "f").write_bytes(b"x" * 10000)
    root = load_directory(tmp_path)
    (tmp_path / "f").write_bytes(b"x" * 10)
    with pytest.raises(BuildError, match="/f: file shrank"):
        with _pipeline() as p:
            chunk_files(p, [((b"f",), root.children[b"f"].inode)], 4096)


def test_load_tar_builds_tree_with_implicit_dirs_and_hardlinks():
    data = _tar([
        _ti("a/b/file", b"payload", mode=0o600, uid=7, gid=8, mtime=123),
        _ti("a", type=tarfile.DIRTYPE, mode=0o700, mtime=5),          # after its child: not a duplicate
        _ti("a/b/hard", type=tarfile.LNKTYPE, linkname="a/b/file"),
        _ti("a/sym", type=tarfile.SYMTYPE, linkname="b/file"),
        _ti("dev", type=tarfile.BLKTYPE, devmajor=8, devminor=1),
        _ti(".wh.kept", b""),
        _ti("./", type=tarfile.DIRTYPE, mode=0o751),
    ])
    with _pipeline() as p:
        root = load_tar(io.BytesIO(data), p, chunk_size=4096)
    assert root.inode.mode & 0o7777 == 0o751
    a = root.children[b"a"]
    assert (a.inode.mode & 0o7777, a.inode.mtime, a.implicit) == (0o700, 5, False)
    b = a.children[b"b"]
    assert b.implicit and b.inode.mode & 0o7777 == 0o755
    f = b.children[b"file"].inode
    assert (f.uid, f.gid, f.mtime, f.size, len(f.chunks)) == (7, 8, 123, 7, 1)
    assert b.children[b"hard"].inode is f
    assert decode_dev(root.children[b"dev"].inode.rdev) == (8, 1)
    assert b".wh.kept" in root.children   # tar layers keep whiteouts for merge


@pytest.mark.parametrize("entries,message", [
    ([_ti("x", b"1"), _ti("x", b"2")], "duplicate entry"),
    ([_ti("d", type=tarfile.DIRTYPE), _ti("d", type=tarfile.DIRTYPE)], "duplicate entry"),
    ([_ti("f", b"1"), _ti("f/g", b"2")], "is not a directory"),
    ([_ti("h", type=tarfile.LNKTYPE, linkname="missing")], "does not exist"),
    ([_ti("d", type=tarfile.DIRTYPE), _ti("h", type=tarfile.LNKTYPE, linkname="d")], "is a directory"),
    ([_ti("s", type=tarfile.SYMTYPE, linkname="")], "empty target"),
    ([_ti("./", b"x")], "root must be a directory"),
    ([_ti("../evil", b"x")], "escape"),
])
def test_load_tar_refuses_bad_entries(entries, message):
    with pytest.raises(BuildError, match=message):
        with _pipeline() as p:
            load_tar(io.BytesIO(_tar(entries)), p, chunk_size=4096)


def test_load_tar_drops_unrepresentable_xattrs_and_refuses_huge_values():
    info, data = _ti("f", b"x")
    info.pax_headers = {"SCHILY.xattr.user.ok": "1", "SCHILY.xattr.macos": "v"}
    with _pipeline() as p:
        root = load_tar(io.BytesIO(_tar([(info, data)])), p, chunk_size=4096)
    assert root.children[b"f"].inode.xattrs == {b"user.ok": b"1"}
    info.pax_headers = {"SCHILY.xattr.user.big": "v" * 70000}
    with pytest.raises(BuildError, match="xattr"):
        with _pipeline() as p:
            load_tar(io.BytesIO(_tar([(info, data)])), p, chunk_size=4096)


def test_is_whiteout():
    assert is_whiteout(Node(b".wh.x", Inode(0o100644)), WhiteoutSpec.OCI)
    assert not is_whiteout(Node(b".wh.x", Inode(0o100644)), WhiteoutSpec.NONE)
    assert is_whiteout(Node(b"x", Inode(0o020000)), WhiteoutSpec.OVERLAYFS)
    assert not is_whiteout(Node(b"x", Inode(0o020000, rdev=0x103)), WhiteoutSpec.OVERLAYFS)


def test_load_tar_value_ranges():
    info, data = _ti("old", b"x")
    info.pax_headers = {"mtime": "-5.5"}
    with _pipeline() as p:
        root = load_tar(io.BytesIO(_tar([(info, data)])), p, chunk_size=4096)
    assert (root.children[b"old"].inode.mtime, root.children[b"old"].inode.mtime_nsec) == (0, 0)
    info, data = _ti("big-uid", b"x")
    info.pax_headers = {"uid": str(1 << 33)}
    with pytest.raises(BuildError, match="32 bits"):
        with _pipeline() as p:
            load_tar(io.BytesIO(_tar([(info, data)])), p, chunk_size=4096)
    info, data = _ti("long-xattr", b"x")
    info.pax_headers = {"SCHILY.xattr.user." + "n" * 260: "v"}
    with pytest.raises(BuildError, match="longer than 255"):
        with _pipeline() as p:
            load_tar(io.BytesIO(_tar([(info, data)])), p, chunk_size=4096)


def test_only_files_with_unallocated_blocks_are_probed_for_holes(tmp_path, monkeypatch):
    with open(tmp_path / "sparse", "wb") as f:
        f.truncate(3 * 4096)
        f.seek(4096)
        f.write(b"y")
    (tmp_path / "dense").write_bytes(b"d" * 3 * 4096)
    root = load_directory(tmp_path)
    sparse, dense = root.children[b"sparse"].inode, root.children[b"dense"].inode
    if sparse.dense:
        pytest.skip("this filesystem allocates blocks for holes")
    assert dense.dense
    probed = []
    real = os.lseek

    def lseek(fd, pos, how):
        if how == os.SEEK_DATA:
            probed.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd, pos, how)

    monkeypatch.setattr(os, "lseek", lseek)
    sink = _Sink()
    with _pipeline(sink) as p:
        chunk_files(p, [(e.path, e.node.inode) for e in index_order(root)], 4096)
    assert probed and all(path.endswith("/sparse") for path in probed)
    assert [c.digest == sparse.chunks[0].digest for c in sparse.chunks] == [True, False, True]
    assert b"".join(sink.data[c.index] for c in dense.chunks) == b"d" * 3 * 4096


def test_chunk_files_reports_an_unreadable_file_by_path(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"x" * 10)
    root = load_directory(tmp_path)
    os.unlink(tmp_path / "d" / "f")
    with pytest.raises(BuildError, match=r"^/d/f: cannot open: No such file"):
        with _pipeline() as p:
            chunk_files(p, [(e.path, e.node.inode) for e in index_order(root)], 4096)
