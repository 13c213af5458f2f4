from __future__ import annotations

from nydus_vfs.builder._layout import ImageSpec
from nydus_vfs.builder._tree import Inode, Node, index_order, new_directory
from nydus_vfs.format.types import Compressor, Digester


def _root() -> Node:
    root = new_directory(b"/")
    d = new_directory(b"d")
    d.children[b"f"] = Node(b"f", Inode(0o100644))  # type: ignore[index]
    root.children[b"d"] = d  # type: ignore[index]
    root.children[b"a"] = Node(b"a", Inode(0o100644))  # type: ignore[index]
    return root


def test_index_order_is_computed_once_when_not_given():
    spec = ImageSpec(root=_root(), chunk_size=0x1000, compressor=Compressor.NONE, digester=Digester.BLAKE3)
    first = spec.index_order()
    assert [e.path for e in first] == [e.path for e in index_order(spec.root)] == [(), (b"a",), (b"d",),
                                                                                  (b"d", b"f")]
    assert spec.index_order() is first


def test_a_given_order_is_used_as_is():
    root = _root()
    order = index_order(root)
    spec = ImageSpec(root=root, chunk_size=0x1000, compressor=Compressor.NONE, digester=Digester.BLAKE3,
                     order=order)
    assert spec.index_order() is order
