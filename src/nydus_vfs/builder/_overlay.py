"""Applying an upper layer onto a lower tree (rafs-format.md §5, ``Tree::merge_children``).

Whiteout markers are recognised only in the *upper* layer:

* OCI: ``.wh..wh..opq`` makes its directory opaque (all lower children go);
  ``.wh.NAME`` removes the lower ``NAME`` (with its subtree).
* overlayfs: a char device 0:0 removes the lower entry of that name; a
  directory with ``trusted.overlay.opaque = y`` is opaque (the xattr is
  dropped and the directory stays).

Per directory, all whiteouts are applied first, then every remaining upper
entry replaces the lower entry of the same name (a directory over a
directory keeps the lower children and recurses) or is added.  So a whiteout
never hides a sibling from its own layer.  Markers that hide nothing are
dropped as well: they are never part of the merged filesystem.
"""

from __future__ import annotations

from ._source import OCI_OPAQUE, OCI_WHITEOUT_PREFIX, OVERLAY_OPAQUE_XATTR, WhiteoutSpec, is_whiteout
from ._tree import Node

__all__ = ["apply_layer", "strip_whiteouts"]


def _is_overlay_opaque(node: Node, spec: str) -> bool:
    return (spec == WhiteoutSpec.OVERLAYFS and node.children is not None
            and node.inode.xattrs.get(OVERLAY_OPAQUE_XATTR) == b"y")


def strip_whiteouts(root: Node, spec: str) -> None:
    """Remove every marker below ``root`` (a layer applied onto nothing)."""
    if spec == WhiteoutSpec.NONE:
        return
    stack = [root]
    while stack:
        node = stack.pop()
        if _is_overlay_opaque(node, spec):
            node.inode.xattrs.pop(OVERLAY_OPAQUE_XATTR, None)
        if node.children is None:
            continue
        for name in [n for n, c in node.children.items() if is_whiteout(c, spec)]:
            del node.children[name]
        stack.extend(c for c in node.children.values() if c.children is not None)


def apply_layer(lower: Node, upper: Node, spec: str) -> None:
    """Merge directory ``upper`` onto directory ``lower`` in place (``lower`` becomes the result).

    ``lower`` takes ``upper``'s attributes; the caller passes the two roots.
    With spec ``none`` nothing is a whiteout and upper entries simply replace
    or join lower ones.
    """
    stack = [(lower, upper)]
    while stack:
        low, up = stack.pop()
        low.inode = up.inode
        assert low.children is not None and up.children is not None
        kids = up.sorted_children()
        # Pass 1: whiteouts and opaque markers.
        rest = []
        for child in kids:
            if spec == WhiteoutSpec.OCI and child.name == OCI_OPAQUE:
                low.children.clear()
            elif is_whiteout(child, spec):
                target = child.name[len(OCI_WHITEOUT_PREFIX):] if spec == WhiteoutSpec.OCI else child.name
                low.children.pop(target, None)
            else:
                if _is_overlay_opaque(child, spec):
                    child.inode.xattrs.pop(OVERLAY_OPAQUE_XATTR, None)
                    existing = low.children.get(child.name)
                    if existing is not None and existing.children is not None:
                        existing.children.clear()
                rest.append(child)
        # Pass 2: modifications and additions.
        for child in rest:
            existing = low.children.get(child.name)
            if existing is not None and existing.children is not None and child.children is not None:
                stack.append((existing, child))
            else:
                strip_whiteouts(child, spec)
                low.children[child.name] = child
