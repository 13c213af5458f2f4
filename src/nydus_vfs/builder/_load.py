"""Loading an existing bootstrap back into a builder tree.

Used by ``merge`` (each layer), ``create --parent-bootstrap``, ``--chunk-dict``
and ``unpack``.  The bootstrap is decoded by :class:`~nydus_vfs.format.reader.Bootstrap`
(which also extracts one inlined in a data blob); here it becomes
:class:`~nydus_vfs.builder._tree.Node` / :class:`Inode` objects again, with
each regular file's chunk records.  Hardlinks (same inode number) share one
:class:`Inode`; a directory reached twice is refused, so a malicious image
cannot make the walk loop.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from typing import Iterator

from ..errors import BuildError, FormatError
from ..format.reader import Bootstrap, blob_id_from_meta_path
from ..format.types import BlobFeatures, BlobInfo, ChunkInfo, Compressor, Digester
from ._tree import Inode, Node, display_path

__all__ = ["LoadedImage", "load_bootstrap", "load_chunk_dict", "read_bootstrap_file", "parse_chunk_dict_arg",
           "blob_path_for"]

_DIGEST_NAME = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class LoadedImage:
    """A bootstrap as a tree, with the settings it was built with."""

    path: str
    bootstrap: Bootstrap
    root: Node
    blobs: list[BlobInfo]
    fs_version: int
    chunk_size: int
    compressor: Compressor
    digester: Digester
    explicit_uidgid: bool

    def chunks(self) -> Iterator[ChunkInfo]:
        """Every chunk record of every regular file (hardlinks once), in walk order."""
        seen: set[int] = set()
        stack = [self.root]
        while stack:
            node = stack.pop()
            if node.children is not None:
                stack.extend(node.sorted_children()[::-1])
            elif node.inode.is_reg and id(node.inode) not in seen:
                seen.add(id(node.inode))
                yield from node.inode.chunks


def read_bootstrap_file(path: str) -> Bootstrap:
    """Read and decode a bootstrap (or a blob with an inlined one); BuildError names the file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise BuildError(f"bootstrap {path!r}: {exc.strerror}") from None
    try:
        bs = Bootstrap.from_bytes(data)
    except FormatError as exc:
        raise BuildError(f"bootstrap {path!r} is not a valid RAFS image: {exc}") from None
    if bs.inlined:
        try:
            bs.set_blob_id_from_meta(blob_id_from_meta_path(path))
        except FormatError:
            pass
    return bs


def load_bootstrap(path: str, *, layer: int = 0, rename_blob_from_path: bool = False) -> LoadedImage:
    """Load ``path`` into a tree; every inode is tagged with ``layer``.

    With ``rename_blob_from_path`` (``merge``), the layer's own data blob takes
    the id nydusd would use at runtime: the file name with extensions
    stripped.  That is done for a blob with inlined meta (``INLINED_FS_META``,
    not ``SEPARATE``: its stored id is a placeholder), as upstream's loader
    does for every bootstrap file, and for the only blob of a layer when the
    name is a sha256 hex digest (the layer digest, as nydus-snapshotter names
    the files).
    """
    bs = read_bootstrap_file(path)
    blobs = list(bs.blobs)
    if rename_blob_from_path:
        try:
            name = blob_id_from_meta_path(path)
        except FormatError:
            name = ""
        for i, blob in enumerate(blobs):
            if name and blob.features & BlobFeatures.INLINED_FS_META and not blob.features & BlobFeatures.SEPARATE:
                blobs[i] = blob.with_blob_id(name)
        if _DIGEST_NAME.match(name) and len(blobs) == 1:
            blobs[0] = blobs[0].with_blob_id(name)
    try:
        root = _tree_from(bs, layer)
    except FormatError as exc:
        raise BuildError(f"bootstrap {path!r} is corrupt: {exc}") from None
    return LoadedImage(path=path, bootstrap=bs, root=root, blobs=blobs, fs_version=bs.version,
                       chunk_size=bs.chunk_size, compressor=bs.compressor, digester=bs.digester,
                       explicit_uidgid=bs.explicit_uid_gid)


def parse_chunk_dict_arg(arg: str) -> str:
    """``bootstrap=PATH`` or a bare PATH (treated as a bootstrap), as upstream accepts."""
    if "=" in arg:
        kind, _, path = arg.partition("=")
        if kind != "bootstrap":
            raise BuildError(f"invalid chunk dict type {kind!r}: only 'bootstrap=PATH' is supported")
        if not path:
            raise BuildError("invalid chunk dict argument: empty path")
        return path
    return arg


def load_chunk_dict(arg: str) -> LoadedImage:
    return load_bootstrap(parse_chunk_dict_arg(arg))


def _tree_from(bs: Bootstrap, layer: int) -> Node:
    inodes: dict[int, Inode] = {}
    entered: set[int] = set()

    def make(ino: int, parts: tuple[bytes, ...]) -> Inode:
        got = inodes.get(ino)
        if got is not None:
            return got
        info = bs.inode(ino)
        inode = Inode(info.mode, uid=info.uid, gid=info.gid, mtime=info.mtime, mtime_nsec=info.mtime_nsec,
                      rdev=info.rdev if (info.is_chr or info.is_blk) else 0, layer=layer, origin=(layer, ino))
        if info.has_xattr:
            inode.xattrs = dict(sorted(bs.xattrs(ino).items()))
        if info.is_symlink:
            inode.symlink = bs.readlink(ino)
            inode.size = len(inode.symlink)
        elif info.is_reg:
            inode.size = info.size
            chunks = bs.chunks(ino)
            for c in chunks:
                if c.blob_index < 0:
                    raise BuildError(f"{display_path(parts)}: the image has a hole chunk at offset "
                                     f"{c.file_offset:#x}, which cannot be carried into a new image")
            inode.chunks = list(chunks)
        inodes[ino] = inode
        return inode

    root_ino = bs.root_ino
    root = Node(b"/", make(root_ino, ()))
    if root.children is None:
        raise BuildError("the image root is not a directory")
    stack: list[tuple[Node, int, tuple[bytes, ...]]] = [(root, root_ino, ())]
    entered.add(root_ino)
    while stack:
        node, ino, parts = stack.pop()
        assert node.children is not None
        for _, name, child_ino, _ in bs.children(ino, 0):
            if name in (b".", b".."):
                continue
            child_parts = parts + (name,)
            inode = make(child_ino, child_parts)
            child = Node(name, inode)
            if name in node.children:
                raise BuildError(f"{display_path(child_parts)}: duplicate directory entry in the image")
            node.children[name] = child
            if child.children is not None:
                if child_ino in entered:
                    raise BuildError(f"{display_path(child_parts)}: directory appears twice in the image "
                                     "(directory hardlink or loop)")
                entered.add(child_ino)
                stack.append((child, child_ino, child_parts))
            elif not (inode.is_reg or stat.S_ISLNK(inode.mode) or stat.S_ISCHR(inode.mode)
                      or stat.S_ISBLK(inode.mode) or stat.S_ISFIFO(inode.mode) or stat.S_ISSOCK(inode.mode)):
                raise BuildError(f"{display_path(child_parts)}: unknown file type {inode.mode:o}")
    return root


def blob_path_for(blob_id: str, blob_dir: str | None, blob: str | None) -> str | None:
    """Where blob ``blob_id`` lives for ``unpack``/``check``: ``--blob`` or ``--blob-dir/<id>``."""
    if blob:
        return blob
    if blob_dir:
        return os.path.join(blob_dir, blob_id)
    return None

