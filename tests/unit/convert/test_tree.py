"""The OCI overlay model used by ``nydusify check``: whiteouts, opaque dirs, replacements."""

from __future__ import annotations

import gzip
import io

import pytest

from nydus_vfs.convert._tree import FileTree, diff_trees
from nydus_vfs.errors import ConvertError
from tests.functional.oci_helpers import tar_bytes


def _tree(*layers, whiteouts=True) -> FileTree:
    t = FileTree()
    for i, entries in enumerate(layers):
        t.apply_layer(io.BytesIO(gzip.compress(tar_bytes(entries))), name=f"layer {i}", whiteouts=whiteouts)
    return t


def test_whiteouts_opaque_and_replacement():
    lower = [("a", "dir", {}), ("a/x", "file", {"data": b"x"}), ("a/y", "file", {"data": b"y"}),
             ("b", "dir", {}), ("b/sub", "dir", {}), ("b/sub/z", "file", {"data": b"z"}),
             ("c", "dir", {}), ("c/in", "file", {}), ("d", "file", {"data": b"d"})]
    upper = [("a/.wh.x", "file", {}), ("b/.wh..wh..opq", "file", {}), ("b/kept", "file", {"data": b"k"}),
             ("c", "file", {"data": b"now a file"}), ("d", "dir", {}), ("e/f/g", "file", {"data": b"g"})]
    t = _tree(lower, upper)
    assert set(t.entries) == {"a", "a/y", "b", "b/kept", "c", "d", "e", "e/f", "e/f/g"}
    assert t.entries["c"]["type"] == "file" and t.entries["d"]["type"] == "dir"
    assert t.entries["e"] == {"type": "dir", "implicit": True}


def test_opaque_marker_does_not_hide_its_own_layer_entries():
    t = _tree([("d", "dir", {}), ("d/old", "file", {})],
              [("d/new", "file", {}), ("d/.wh..wh..opq", "file", {})])
    assert set(t.entries) == {"d", "d/new"}


def test_whiteouts_are_plain_files_when_disabled():
    t = _tree([("d", "dir", {}), ("d/.wh.x", "file", {})], whiteouts=False)
    assert "d/.wh.x" in t.entries


def test_hardlinks_take_their_targets_description():
    t = _tree([("f", "file", {"data": b"data"}), ("h", "hard", {"link": "f"})])
    assert t.entries["h"] == t.entries["f"]
    with pytest.raises(ConvertError, match="hardlink target"):
        _tree([("h", "hard", {"link": "missing"})])


def test_diff_names_the_differences():
    a = _tree([("f", "file", {"data": b"1"}), ("only-a", "file", {})])
    b = _tree([("f", "file", {"data": b"2", "mode": 0o600}), ("only-b", "dir", {})])
    diffs = diff_trees(a, b)
    assert any(d.startswith("/f: ") and "sha256" in d and "mode" in d for d in diffs)
    assert "/only-a: only in the source image" in diffs and "/only-b: only in the nydus image" in diffs
    assert diff_trees(a, _tree([("f", "file", {"data": b"1"}), ("only-a", "file", {})])) == []


def test_corrupt_layer_is_named():
    with pytest.raises(ConvertError, match="layer 0: cannot read the layer tar"):
        FileTree().apply_layer(io.BytesIO(gzip.compress(b"x" * 1000)[:50]), name="layer 0")


def test_a_directory_is_described_as_its_tar_would_be(tmp_path):
    import os
    import tarfile

    root = tmp_path / "root"
    (root / "d" / "e").mkdir(parents=True)
    (root / "d" / "f").write_bytes(b"data" * 1000)
    os.chmod(root / "d" / "f", 0o640)
    os.link(root / "d" / "f", root / "hard")
    os.symlink("d/f", root / "link")
    os.mkfifo(root / "fifo")
    os.setxattr(root / "d" / "f", "user.k", b"v\xff")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for path in sorted(p for p in root.rglob("*")):
            info = tf.gettarinfo(str(path), arcname=str(path.relative_to(root)))
            if path.name == "f":
                info.pax_headers["SCHILY.xattr.user.k"] = b"v\xff".decode("utf-8", "surrogateescape")
            if info.isfile():
                with open(path, "rb") as f:
                    tf.addfile(info, f)
            else:
                tf.addfile(info)
    from_tar = FileTree()
    from_tar.apply_layer(io.BytesIO(buf.getvalue()))
    walked = FileTree()
    walked.add_directory(str(root))
    assert diff_trees(from_tar, walked) == []
    assert walked.entries["d/f"]["xattrs"] == {"SCHILY.xattr.user.k": "v\udcff"}
    assert (walked.entries["link"]["type"], walked.entries["link"]["link"]) == ("symlink", "d/f")
    assert walked.entries["hard"] == walked.entries["d/f"] and walked.entries["fifo"]["type"] == "fifo"
    # A changed byte, mode or xattr shows.
    (root / "d" / "f").write_bytes(b"data" * 999 + b"datb")
    os.chmod(root / "d" / "e", 0o700)
    again = FileTree()
    again.add_directory(str(root))
    diffs = diff_trees(from_tar, again)
    assert any(d.startswith("/d/f: ") and "sha256" in d for d in diffs)
    assert any(d.startswith("/d/e: mode") for d in diffs)


def test_an_unreadable_directory_entry_is_named(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(ConvertError, match="cannot list"):
        FileTree().add_directory(str(root / "missing"))
