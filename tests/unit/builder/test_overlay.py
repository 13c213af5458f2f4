from __future__ import annotations

import stat

from nydus_vfs.builder._overlay import apply_layer, strip_whiteouts
from nydus_vfs.builder._source import WhiteoutSpec
from nydus_vfs.builder._tree import Inode, Node, new_directory, walk


def _build(spec: dict) -> Node:
    """``{"a": b"data", "d": {...}, "c": ("chr", 0)}`` -> tree."""
    root = new_directory(b"/")
    stack = [(root, spec)]
    while stack:
        node, entries = stack.pop()
        for name, value in entries.items():
            raw = name.encode()
            if isinstance(value, dict):
                child = new_directory(raw)
                stack.append((child, value))
            elif isinstance(value, tuple):
                child = Node(raw, Inode(stat.S_IFCHR | 0o600, rdev=value[1]))
            else:
                child = Node(raw, Inode(0o100644, size=len(value), source=value))
            node.children[raw] = child
    return root


def _paths(root: Node) -> dict[str, object]:
    return {b"/".join(p).decode(): (n.inode.source if n.inode.is_reg else "dir" if n.is_dir else "other")
            for p, n in walk(root) if p}


def test_oci_whiteouts_opaque_and_replacement():
    lower = _build({"keep": b"k", "gone": b"g", "opq": {"a": b"a", "sub": {"b": b"b"}}, "dir": {"x": b"x", "y": b"y"},
                    "d2f": {"inner": b"i"}, "f2d": b"file"})
    upper = _build({".wh.gone": b"", "opq": {".wh..wh..opq": b"", "new": b"n"}, "dir": {".wh.x": b"", "z": b"z"},
                    "d2f": b"now file", "f2d": {"child": b"c", ".wh.nothing": b""}, ".wh.fresh": b"", "fresh": b"f"})
    apply_layer(lower, upper, WhiteoutSpec.OCI)
    assert _paths(lower) == {
        "keep": b"k", "opq": "dir", "opq/new": b"n", "dir": "dir", "dir/y": b"y", "dir/z": b"z",
        "d2f": b"now file", "f2d": "dir", "f2d/child": b"c", "fresh": b"f",
    }
    assert lower.inode is upper.inode   # the root takes the upper attributes


def test_overlayfs_whiteouts_and_opaque_xattr():
    lower = _build({"a": b"a", "b": b"b", "o": {"x": b"x"}})
    upper = _build({"a": ("chr", 0), "not-a-whiteout": ("chr", 0x103), "o": {"y": b"y"}})
    upper.children[b"o"].inode.xattrs[b"trusted.overlay.opaque"] = b"y"
    apply_layer(lower, upper, WhiteoutSpec.OVERLAYFS)
    assert _paths(lower) == {"b": b"b", "not-a-whiteout": "other", "o": "dir", "o/y": b"y"}
    assert lower.children[b"o"].inode.xattrs == {}


def test_spec_none_keeps_whiteout_files():
    lower = _build({"a": b"a"})
    upper = _build({".wh.a": b""})
    apply_layer(lower, upper, WhiteoutSpec.NONE)
    assert set(_paths(lower)) == {"a", ".wh.a"}


def test_strip_whiteouts_on_a_base_layer():
    root = _build({".wh.x": b"", "d": {".wh..wh..opq": b"", "f": b"f"}, "w": ("chr", 0)})
    strip_whiteouts(root, WhiteoutSpec.OCI)
    assert set(_paths(root)) == {"d", "d/f", "w"}
    strip_whiteouts(root, WhiteoutSpec.OVERLAYFS)
    assert set(_paths(root)) == {"d", "d/f"}
