from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nydus_vfs.builder._tree import (Inode, Node, decode_dev, encode_dev, index_order, new_directory, split_path,
                                     walk, xattr_name_supported)
from nydus_vfs.errors import BuildError


@given(st.integers(0, 0xFFF), st.integers(0, 0xFFFFF))
def test_dev_encoding_round_trips_like_the_kernel(major, minor):
    rdev = encode_dev(major, minor)
    assert rdev < 1 << 32
    assert decode_dev(rdev) == (major, minor)
    # glibc's makedev agrees with new_encode_dev for these ranges' low bits
    assert (os.major(os.makedev(major, minor)), os.minor(os.makedev(major, minor))) == (major, minor)


def test_dev_encoding_known_values():
    assert encode_dev(1, 3) == 0x103
    assert encode_dev(8, 0x1234) == (0x34 | 8 << 8 | 0x1200 << 12)


@pytest.mark.parametrize("raw,parts", [
    (b"", ()), (b".", ()), (b"/", ()), (b"./", ()), (b"./a/b/", (b"a", b"b")), (b"/abs//x/./y", (b"abs", b"x", b"y")),
])
def test_split_path_normalises(raw, parts):
    assert split_path(raw) == parts


@pytest.mark.parametrize("raw,message", [
    (b"a/../../x", "escape"), (b"..", "escape"), (b"a\0b", "NUL"), (b"n" * 256, "NAME_MAX"),
    (b"/".join([b"p" * 250] * 17), "PATH_MAX"),
])
def test_split_path_refuses(raw, message):
    with pytest.raises(BuildError, match=message):
        split_path(raw, what="tar entry")


def test_xattr_namespaces():
    assert xattr_name_supported(b"user.x") and xattr_name_supported(b"trusted.overlay.opaque")
    assert xattr_name_supported(b"security.capability")
    assert xattr_name_supported(b"system.posix_acl_access")
    assert not xattr_name_supported(b"system.other") and not xattr_name_supported(b"dir")


def _tree():
    root = new_directory(b"/")
    for name in (b"b", b"a", b"c"):
        root.children[name] = new_directory(name)
    root.children[b"f"] = Node(b"f", Inode(0o100644))
    root.children[b"a"].children[b"z"] = new_directory(b"z")
    root.children[b"a"].children[b"y"] = Node(b"y", Inode(0o100644))
    root.children[b"c"].children[b"x"] = Node(b"x", Inode(0o100644))
    return root


def test_index_order_allocates_sibling_groups_depth_first():
    order = index_order(_tree())
    paths = [b"/".join(e.path) for e in order]
    assert paths == [b"", b"a", b"b", b"c", b"f", b"a/y", b"a/z", b"c/x"]
    ci = {b"/".join(e.path): e.child_index for e in order}
    assert ci[b""] == 2          # root's children start at index 2
    assert ci[b"a"] == 6         # a's group follows the root's group
    assert ci[b"a/z"] == 8       # empty directory: the next index that would be allocated
    assert ci[b"b"] == 8
    assert ci[b"c"] == 8         # c/x is index 8
    assert ci[b"f"] == 0
    # Children of every directory occupy [child_index, child_index + count).
    for e in order:
        if e.node.children:
            kids = [b"/".join(o.path) for o in order[e.child_index - 1:e.child_index - 1 + len(e.node.children)]]
            assert kids == sorted(b"/".join(e.path + (k,)) for k in e.node.children)
            assert all(order.index(o) > order.index(e) for o in order if o.parent is e.node)


def test_index_order_handles_very_deep_trees():
    root = new_directory(b"/")
    node = root
    for _ in range(3000):
        child = new_directory(b"d")
        node.children[b"d"] = child
        node = child
    assert len(index_order(root)) == 3001
    assert len(list(walk(root))) == 3001


def test_walk_is_preorder_in_name_order():
    assert [b"/".join(p) for p, _ in walk(_tree())] == [b"", b"a", b"a/y", b"a/z", b"b", b"c", b"c/x", b"f"]


def test_inode_copy_is_detached():
    ino = Inode(0o100644, xattrs={b"user.a": b"1"})
    ino.dense = True
    cp = ino.copy()
    assert cp.dense and not Inode(0o100644).dense
    cp.xattrs[b"user.b"] = b"2"
    cp.chunks.append(None)  # type: ignore[arg-type]
    assert ino.xattrs == {b"user.a": b"1"} and ino.chunks == []
