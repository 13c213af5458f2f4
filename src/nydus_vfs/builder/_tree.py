"""The builder's in-memory filesystem tree.

Every source (a directory, a tar stream, a bootstrap being merged) is turned
into this one model before anything is laid out on disk, so the v5 and v6
writers, ``merge`` and ``unpack`` share a single view of "a filesystem":

* a :class:`Node` is one *name* in one directory (a dirent);
* an :class:`Inode` is what the name points at.  Hardlinked regular files are
  several nodes sharing one ``Inode`` object; nothing else is ever shared.

Names are raw bytes everywhere (Linux file names are not text) and children
are kept in a dict keyed by name; :meth:`Node.sorted_children` gives the raw
byte order that both RAFS versions store on disk.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from typing import Any, NamedTuple

from ..errors import BuildError
from ..format.types import ChunkInfo

__all__ = [
    "NAME_MAX",
    "PATH_MAX",
    "Inode",
    "Node",
    "encode_dev",
    "decode_dev",
    "xattr_name_supported",
    "split_path",
    "display_path",
    "new_directory",
    "Indexed",
    "index_order",
    "walk",
]

#: Longest file name RAFS v5 (``i_name_size`` checks) and EROFS accept.
NAME_MAX = 255
#: Longest path we accept from a source (Linux ``PATH_MAX``).
PATH_MAX = 4096

# Namespaces both RAFS versions can store (rafs-format.md §1.8 / §2.10); anything
# else (macOS tars carry bare names such as ``dir``) cannot be represented.
_XATTR_PREFIXES = (b"user.", b"security.", b"trusted.")
_XATTR_EXACT = (b"system.posix_acl_access", b"system.posix_acl_default")


def encode_dev(major: int, minor: int) -> int:
    """Linux ``new_encode_dev``: the 32-bit rdev both RAFS versions store."""
    return ((minor & 0xFF) | ((major & 0xFFF) << 8) | ((minor & ~0xFF) << 12)) & 0xFFFFFFFF


def decode_dev(rdev: int) -> tuple[int, int]:
    """Inverse of :func:`encode_dev`: ``(major, minor)``."""
    return (rdev >> 8) & 0xFFF, (rdev & 0xFF) | ((rdev >> 12) & 0xFFF00)


def xattr_name_supported(name: bytes) -> bool:
    """Whether an xattr name is in a namespace RAFS can store."""
    return name.startswith(_XATTR_PREFIXES) or name in _XATTR_EXACT


def display_path(parts: tuple[bytes, ...] | list[bytes]) -> str:
    """Render path components for an error message (never fails on bad UTF-8)."""
    return "/" + "/".join(p.decode("utf-8", "backslashreplace") for p in parts)


def split_path(raw: bytes, *, what: str = "entry") -> tuple[bytes, ...]:
    """Normalise a source path into components below the image root.

    Leading ``/`` and ``./`` are dropped (tar members are relative to the layer
    root either way), empty and ``.`` components are ignored; ``..`` is refused
    because it would escape the root (the classic tar-bomb trick), as are NUL
    bytes, over-long components and over-long paths.  ``b""``/``b"."``/``b"/"``
    is the root itself and gives ``()``.
    """
    shown = raw[:200].decode("utf-8", "backslashreplace")
    if len(raw) > PATH_MAX:
        raise BuildError(f"{what} {shown!r}…: path is {len(raw)} bytes, longer than PATH_MAX ({PATH_MAX})")
    if b"\0" in raw:
        raise BuildError(f"{what} {shown!r}: path contains a NUL byte")
    parts = []
    for comp in raw.split(b"/"):
        if comp in (b"", b"."):
            continue
        if comp == b"..":
            raise BuildError(f"{what} {shown!r}: path contains '..' and would escape the image root")
        if len(comp) > NAME_MAX:
            raise BuildError(
                f"{what} {shown!r}: name component is {len(comp)} bytes, longer than NAME_MAX ({NAME_MAX})")
        parts.append(comp)
    return tuple(parts)


class Inode:
    """The attributes and data of one file, shared by all its hardlinks.

    ``mode`` is the full ``st_mode``.  ``rdev`` is already in the on-disk
    ``new_encode_dev`` form.  ``size`` is the byte size of regular files and the
    target length of symlinks (directories get theirs from the layout).
    ``chunks`` holds the file's chunks in file order once data was chunked;
    ``source`` is whatever the source needs to read the data later (a host
    path for directory builds, ``None`` once chunked); ``dense`` says the
    source knows the file has no holes, so reading it need not look for any.
    ``layer`` and ``origin`` identify where the inode came from, which
    ``merge`` uses to keep hardlinks within a layer.
    """

    __slots__ = ("mode", "uid", "gid", "mtime", "mtime_nsec", "rdev", "size", "xattrs",
                 "symlink", "chunks", "source", "layer", "origin", "digest", "dense", "_v6_dir_size")

    def __init__(self, mode: int, *, uid: int = 0, gid: int = 0, mtime: int = 0, mtime_nsec: int = 0,
                 rdev: int = 0, size: int = 0, xattrs: dict[bytes, bytes] | None = None,
                 symlink: bytes | None = None, source: Any = None, layer: int = 0,
                 origin: object = None) -> None:
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.mtime = mtime
        self.mtime_nsec = mtime_nsec
        self.rdev = rdev
        self.size = size
        self.xattrs: dict[bytes, bytes] = xattrs if xattrs is not None else {}
        self.symlink = symlink
        self.chunks: list[ChunkInfo] = []
        self.source = source
        self.layer = layer
        self.origin = origin
        self.digest = b""
        self.dense = False

    @property
    def kind(self) -> int:
        return stat.S_IFMT(self.mode)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    def copy(self) -> "Inode":
        """A detached copy (same chunk list contents, new containers)."""
        new = Inode(self.mode, uid=self.uid, gid=self.gid, mtime=self.mtime, mtime_nsec=self.mtime_nsec,
                    rdev=self.rdev, size=self.size, xattrs=dict(self.xattrs), symlink=self.symlink,
                    source=self.source, layer=self.layer, origin=self.origin)
        new.chunks = list(self.chunks)
        new.digest = self.digest
        new.dense = self.dense
        return new


class Node:
    """One name in a directory.

    ``children`` is a dict for directories and ``None`` otherwise.  ``implicit``
    marks a directory the builder created because an entry below it came first
    (a tar may list ``a/b`` without ever listing ``a/``); a later explicit entry
    for it replaces its attributes instead of being a duplicate.
    """

    __slots__ = ("name", "inode", "children", "implicit")

    def __init__(self, name: bytes, inode: Inode, *, implicit: bool = False) -> None:
        self.name = name
        self.inode = inode
        self.children: dict[bytes, Node] | None = {} if inode.is_dir else None
        self.implicit = implicit

    @property
    def is_dir(self) -> bool:
        return self.children is not None

    def sorted_children(self) -> list["Node"]:
        """Children in raw byte order of their names (the on-disk order)."""
        if not self.children:
            return []
        return [self.children[k] for k in sorted(self.children)]

    def child(self, name: bytes) -> "Node | None":
        return self.children.get(name) if self.children else None

    def lookup(self, parts: tuple[bytes, ...] | list[bytes]) -> "Node | None":
        """The node at ``parts`` below this one, or ``None``."""
        node: Node | None = self
        for part in parts:
            if node is None or node.children is None:
                return None
            node = node.children.get(part)
        return node

    def __repr__(self) -> str:
        return f"Node({self.name!r}, mode={self.inode.mode:o})"


def new_directory(name: bytes, *, mode: int = 0o755, implicit: bool = False, layer: int = 0) -> Node:
    """A fresh directory node (``mode`` without the type bits)."""
    return Node(name, Inode(stat.S_IFDIR | (mode & 0o7777), layer=layer), implicit=implicit)


def walk(root: Node) -> Iterator[tuple[tuple[bytes, ...], Node]]:
    """Every node with its path components, parents before children, name order."""
    stack: list[tuple[tuple[bytes, ...], Node]] = [((), root)]
    while stack:
        path, node = stack.pop()
        yield path, node
        if node.children:
            for child in reversed(node.sorted_children()):
                stack.append((path + (child.name,), child))


class Indexed(NamedTuple):
    """One node in index order (see :func:`index_order`)."""

    path: tuple[bytes, ...]
    node: Node
    parent: "Node | None"
    #: For directories, the 1-based index of their first child (for an empty
    #: directory: the index the next allocated group would get).  0 otherwise.
    child_index: int


def index_order(root: Node) -> list[Indexed]:
    """Nodes in RAFS index order (rafs-format.md §1.3); entry ``i`` has index ``i + 1``.

    The root is first.  Processing a directory allocates its whole sibling
    group consecutively in name order; then every child directory is processed
    the same way, in name order (depth first over directories).  The v5 inode
    table depends on exactly this order (children of a directory occupy
    ``[child_index, child_index + child_count)``); the v6 writer reuses it as
    its ``i_ino`` numbering and data order.
    """
    out: list[list] = [[(), root, None, 0]]
    pos_of: dict[int, int] = {id(root): 0}
    # Iterative so that very deep trees cannot hit Python's recursion limit.
    # Each stack entry is the list of directories still to visit in one
    # sibling group, reversed so that pop() yields them in name order.
    pending: list[list[tuple[tuple[bytes, ...], Node]]] = [[((), root)]]
    while pending:
        group = pending[-1]
        if not group:
            pending.pop()
            continue
        path, node = group.pop()
        out[pos_of[id(node)]][3] = len(out) + 1
        kids = node.sorted_children()
        for k in kids:
            if k.children is not None:
                pos_of[id(k)] = len(out)
            out.append([path + (k.name,), k, node, 0])
        pending.append([(path + (k.name,), k) for k in reversed(kids) if k.children is not None])
    return [Indexed(*e) for e in out]
