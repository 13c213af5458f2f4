from __future__ import annotations

import hashlib
import threading

import pytest

from nydus_vfs.builder._build import (BuildOptions, _prefetch_first, parse_prefetch_patterns, renumber_blobs,
                                      validate_chunk_size)
from nydus_vfs.builder._tree import Inode, Node, index_order, new_directory
from nydus_vfs.errors import BuildError
from nydus_vfs.format.types import BlobInfo, ChunkInfo, Compressor, Digester


@pytest.mark.parametrize("value", [0x1000, 0x100000, 0x1000000])
def test_chunk_size_accepts_powers_of_two_in_range(value):
    assert validate_chunk_size(value) == value


@pytest.mark.parametrize("value", [0, 0x800, 0x3000, 0x2000000])
def test_chunk_size_refuses(value):
    with pytest.raises(BuildError, match="invalid chunk size"):
        validate_chunk_size(value)


def test_prefetch_patterns_like_upstream():
    got = parse_prefetch_patterns(["/a/b", "/a/b/c", "relative", "", "/f\n", "/h/i", "/a/b/d/e"])
    assert got == [(b"a", b"b"), (b"f",), (b"h", b"i")]
    assert parse_prefetch_patterns(["/"]) == [()]
    assert parse_prefetch_patterns(["/", "/x"]) == [()]


@pytest.mark.parametrize("kw,message", [
    (dict(source_type="estargz-ref"), "unsupported conversion type"),
    (dict(fs_version=4), "fs-version"),
    (dict(chunk_size=0x1001), "chunk size"),
    (dict(compressor=Compressor.GZIP), "not supported"),
    (dict(whiteout_spec="aufs"), "whiteout"),
    (dict(prefetch_policy="all"), "prefetch"),
    (dict(blob_inline_meta=True, bootstrap="b"), "conflicts"),
    (dict(blob_inline_meta=True, blob_id="x"), "conflicts"),
    (dict(blob=None, blob_dir=None), "--blob-dir are missing"),
    (dict(bootstrap=None, blob_dir=None, blob="b"), "--bootstrap and --blob-dir are missing"),
    (dict(fs_version=5, blob_toc=True), "blob-toc"),
    (dict(blob_id="x" * 65), "64 bytes"),
    (dict(blob_id="a/b"), "may not contain"),
])
def test_options_are_validated(tmp_path, kw, message):
    base = dict(bootstrap=str(tmp_path / "b"), blob_dir=str(tmp_path))
    base.update(kw)
    with pytest.raises(BuildError, match=message):
        BuildOptions(**base).validate()


def test_options_blob_dir_must_exist(tmp_path):
    with pytest.raises(BuildError, match="does not exist"):
        BuildOptions(blob_dir=str(tmp_path / "nope")).validate()
    BuildOptions(fs_version=5, blob_id="x" * 100, bootstrap="b", blob="c").validate()  # v5 allows long ids


def _blob(i: int) -> BlobInfo:
    return BlobInfo(index=i, blob_id=str(i), chunk_count=1, chunk_size=0x1000, compressor=Compressor.NONE,
                    digester=Digester.BLAKE3, features=0, compressed_size=1, uncompressed_size=1)


def _file(blob_index: int) -> Inode:
    f = Inode(0o100644, size=1)
    f.chunks = [ChunkInfo(hashlib.sha256(b"%d" % blob_index).digest(), blob_index, 0, 0, 0, 1, 0, 1, 0)]
    return f


def test_renumber_blobs_by_first_use_and_keeps_parent_slots():
    root = new_directory(b"/")
    root.children[b"a"] = Node(b"a", _file(3))
    root.children[b"b"] = Node(b"b", _file(1))
    root.children[b"c"] = Node(b"c", _file(3))
    table, mapping = renumber_blobs(root, [_blob(i) for i in range(4)])
    assert [b.blob_id for b in table] == ["3", "1"] and [b.index for b in table] == [0, 1]
    assert mapping == {3: 0, 1: 1}
    assert [root.children[n].inode.chunks[0].blob_index for n in (b"a", b"b", b"c")] == [0, 1, 0]
    # Parent blobs (the first ``keep``) stay in place even when an unused one follows.
    table, mapping = renumber_blobs(root, [_blob(0), _blob(1), _blob(9)], keep=2)
    assert [b.blob_id for b in table] == ["0", "1"] and mapping == {0: 0, 1: 1}
    table, mapping = renumber_blobs(root, [_blob(7), _blob(0), _blob(1)], keep=1)
    assert [b.blob_id for b in table] == ["7", "0"] and mapping == {0: 0, 1: 1}


def test_prefetch_files_come_first_in_pattern_order():
    root = new_directory(b"/")
    for d in (b"x", b"y", b"z"):
        node = new_directory(d)
        node.children[b"f"] = Node(b"f", Inode(0o100644))
        root.children[d] = node
    order = index_order(root)
    assert [p for p, _ in _prefetch_first(order, [(b"z",), (b"x", b"f")])] == \
        [(b"z", b"f"), (b"x", b"f"), (b"y", b"f")]
    assert [p for p, _ in _prefetch_first(order, [])] == [(b"x", b"f"), (b"y", b"f"), (b"z", b"f")]


@pytest.mark.parametrize("enabled", [True, False])
@pytest.mark.parametrize("fails", [False, True])
def test_build_pauses_the_garbage_collector_and_restores_it(tmp_path, monkeypatch, enabled, fails):
    import gc

    from nydus_vfs.builder import _build
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data" * 100)
    seen = []
    real = _build.load_directory

    def spy(*a, **kw):
        seen.append(gc.isenabled())
        if fails:
            raise BuildError("source vanished")
        return real(*a, **kw)

    monkeypatch.setattr(_build, "load_directory", spy)
    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        if fails:
            with pytest.raises(BuildError, match="vanished"):
                _build.build(str(src), BuildOptions(bootstrap=str(tmp_path / "boot"), blob_dir=str(tmp_path)))
        else:
            _build.build(str(src), BuildOptions(bootstrap=str(tmp_path / "boot"), blob_dir=str(tmp_path)))
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()
    assert seen == [False]
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "src")
    if fails:
        assert left == []                      # nothing half-written
    else:
        assert "boot" in left and len(left) == 2
    assert not [t for t in threading.enumerate() if t.name.startswith(("nydus-chunk", "nydus-blob"))]
