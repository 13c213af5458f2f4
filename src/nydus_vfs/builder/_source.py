"""Build sources: a host directory or a tar stream, turned into a :class:`Node` tree.

* :func:`load_directory` walks a directory without following symlinks and
  records every entry kind (regular, directory, symlink, char/block device,
  fifo, socket) with xattrs, owners and nanosecond mtimes.  Regular files keep
  their host path in ``inode.source``; their data is chunked later, in image
  order, by :func:`chunk_files` (which also skips reading holes of sparse
  files).  It only queues the chunks: the ``open``/``preadv`` of each one run
  on the chunk pipeline's workers, into the pipeline's reusable buffers.
* :func:`load_tar` reads an (optionally gzip-compressed) layer tar once, front
  to back, and chunks file data as it streams past, so chunks are in tar order
  and the input may be a pipe.

Both refuse bad input with a :class:`~nydus_vfs.errors.BuildError` that names
the entry: unreadable files, names or paths that are too long, ``..``
components, duplicate entries, entries below a non-directory, hardlinks to
missing targets or directories, corrupt or truncated streams.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterable
from typing import BinaryIO

from ..errors import BuildError
from ._chunker import ChunkPipeline, ChunkReader
from ._tar import (BLKTYPE, CHRTYPE, DIRTYPE, FIFOTYPE, LNKTYPE, SYMTYPE, GzipStream, TarMember, TarReader,
                   open_tar_stream)
from ._tar import GNU_DUMPDIR as _GNU_DUMPDIR
from ._tree import (NAME_MAX, PATH_MAX, Inode, Node, display_path, encode_dev, new_directory, split_path,
                    xattr_name_supported)

__all__ = ["WhiteoutSpec", "load_directory", "chunk_files", "load_tar", "is_whiteout", "MAX_XATTR_VALUE"]

log = logging.getLogger("nydus_vfs.builder")

#: Largest xattr value both RAFS versions can store (v6 ``e_value_size`` is u16).
MAX_XATTR_VALUE = 0xFFFF
#: Longest xattr name (Linux XATTR_NAME_MAX).
MAX_XATTR_NAME = 255
_U32_MAX = 0xFFFF_FFFF

OCI_WHITEOUT_PREFIX = b".wh."
OCI_OPAQUE = b".wh..wh..opq"
OVERLAY_OPAQUE_XATTR = b"trusted.overlay.opaque"


class WhiteoutSpec:
    """The three ``--whiteout-spec`` values."""

    OCI = "oci"
    OVERLAYFS = "overlayfs"
    NONE = "none"
    ALL = (OCI, OVERLAYFS, NONE)


def is_whiteout(node: Node, spec: str) -> bool:
    """Whether ``node`` is a whiteout or opaque marker under ``spec``.

    Overlayfs opaque *directories* are not markers: they stay as directories.
    """
    if spec == WhiteoutSpec.OCI:
        return node.name.startswith(OCI_WHITEOUT_PREFIX)
    if spec == WhiteoutSpec.OVERLAYFS:
        return stat.S_ISCHR(node.inode.mode) and node.inode.rdev == 0
    return False


def _read_xattrs(path: bytes, parts: tuple[bytes, ...], entry: bytes | None = None) -> dict[bytes, bytes]:
    """The xattrs of ``path``; ``parts`` (+ ``entry``) say which entry it is in errors."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise BuildError(f"{_shown(parts, entry)}: cannot list xattrs: {exc.strerror}") from None
    if not names:
        return {}
    shown = _shown(parts, entry)
    out: dict[bytes, bytes] = {}
    for name in sorted(names):
        raw_name = os.fsencode(name)
        if not xattr_name_supported(raw_name):
            log.warning("%s: skipping xattr %r (namespace not representable in RAFS)", shown, name)
            continue
        try:
            value = os.getxattr(path, name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                continue  # removed while we were looking
            raise BuildError(f"{shown}: cannot read xattr {name!r}: {exc.strerror}") from None
        if len(value) > MAX_XATTR_VALUE:
            raise BuildError(f"{shown}: xattr {name!r} value is {len(value)} bytes, RAFS stores at most "
                             f"{MAX_XATTR_VALUE}")
        if len(raw_name) > MAX_XATTR_NAME:
            raise BuildError(f"{shown}: xattr name {name[:40]!r}… is longer than {MAX_XATTR_NAME} bytes")
        out[raw_name] = value
    return out


def _shown(parts: tuple[bytes, ...], entry: bytes | None) -> str:
    return display_path(parts + (entry,) if entry is not None else parts)


def _mtime(ns: int) -> tuple[int, int]:
    """``(seconds, nanoseconds)``; times before 1970 are stored as the epoch (RAFS fields are unsigned)."""
    if ns < 0:
        return 0, 0
    return ns // 1_000_000_000, ns % 1_000_000_000


def _inode_from_stat(st: os.stat_result, layer: int) -> Inode:
    mode = st.st_mode
    rdev = encode_dev(os.major(st.st_rdev), os.minor(st.st_rdev)) if (
        stat.S_ISCHR(mode) or stat.S_ISBLK(mode)) else 0
    sec, nsec = _mtime(st.st_mtime_ns)
    return Inode(mode, uid=st.st_uid, gid=st.st_gid, mtime=sec, mtime_nsec=nsec, rdev=rdev,
                 size=st.st_size if stat.S_ISREG(mode) else 0, layer=layer)


def load_directory(root_path: str | bytes | os.PathLike, *, whiteout_spec: str = WhiteoutSpec.OCI,
                   keep_whiteouts: bool = False, layer: int = 0) -> Node:
    """Walk ``root_path`` into a tree.

    Whiteout markers (per ``whiteout_spec``) are dropped unless
    ``keep_whiteouts`` (a layered build keeps them so they can be applied
    against the parent).  Regular files with several links share one
    :class:`Inode` (keyed by device and inode number); other kinds never do.
    """
    root_b = os.fsencode(root_path)
    try:
        st = os.lstat(root_b)
    except OSError as exc:
        raise BuildError(f"source {os.fsdecode(root_b)!r}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise BuildError(f"source {os.fsdecode(root_b)!r} is not a directory")
    root = Node(b"/", _inode_from_stat(st, layer))
    root.inode.xattrs = _read_xattrs(root_b, ())
    links: dict[tuple[int, int], Inode] = {}
    # (host dir, path components, bytes of "/a/b" so far, node)
    stack: list[tuple[bytes, tuple[bytes, ...], int, Node]] = [(root_b, (), 0, root)]
    S_ISREG, S_ISDIR, S_ISLNK = stat.S_ISREG, stat.S_ISDIR, stat.S_ISLNK
    while stack:
        host_dir, parts, parts_len, dir_node = stack.pop()
        try:
            with os.scandir(host_dir) as it:
                entries = sorted((e.name, e.path) for e in it)
        except OSError as exc:
            raise BuildError(f"{display_path(parts)}: cannot read directory: {exc.strerror}") from None
        children = dir_node.children
        assert children is not None
        for name, host_path in entries:
            child_len = parts_len + len(name) + 1
            if len(name) > NAME_MAX:
                raise BuildError(f"{display_path(parts + (name,))}: name is {len(name)} bytes, longer than "
                                 f"NAME_MAX ({NAME_MAX})")
            if child_len > PATH_MAX:
                raise BuildError(f"{display_path(parts + (name,))[:200]}…: path longer than PATH_MAX ({PATH_MAX})")
            try:
                est = os.lstat(host_path)
            except OSError as exc:
                raise BuildError(f"{display_path(parts + (name,))}: cannot stat: {exc.strerror}") from None
            mode = est.st_mode
            if S_ISREG(mode) and est.st_nlink > 1 and (est.st_dev, est.st_ino) in links:
                node = Node(name, links[(est.st_dev, est.st_ino)])
            else:
                inode = _inode_from_stat(est, layer)
                inode.xattrs = _read_xattrs(host_path, parts, name)
                if S_ISREG(mode):
                    inode.source = host_path
                    inode.origin = (est.st_dev, est.st_ino)
                    inode.dense = est.st_blocks * 512 >= est.st_size
                    if est.st_nlink > 1:
                        links[(est.st_dev, est.st_ino)] = inode
                elif S_ISLNK(mode):
                    try:
                        inode.symlink = os.readlink(host_path)
                    except OSError as exc:
                        raise BuildError(f"{display_path(parts + (name,))}: cannot read symlink: "
                                         f"{exc.strerror}") from None
                    if not inode.symlink:
                        raise BuildError(f"{display_path(parts + (name,))}: symlink has an empty target")
                    inode.size = len(inode.symlink)
                elif not (S_ISDIR(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                          or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
                    raise BuildError(f"{display_path(parts + (name,))}: unsupported file type "
                                     f"{stat.S_IFMT(mode):o}")
                node = Node(name, inode)
            if not keep_whiteouts and is_whiteout(node, whiteout_spec):
                continue
            children[name] = node
            if node.children is not None:
                stack.append((host_path, parts + (name,), child_len, node))
    return root


_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def _host_chunk_reader(path: bytes, parts: tuple[bytes, ...], offset: int, length: int, size: int,
                       probe: bool) -> ChunkReader:
    """A reader (run by a pipeline worker) for bytes ``[offset, offset + length)`` of a host file.

    With ``probe``, a chunk without data (SEEK_DATA finds none in it: a hole
    of a sparse file) is reported as zeros without reading.
    """
    def read(view: memoryview) -> bool:
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except OSError as exc:
            raise BuildError(f"{display_path(parts)}: cannot open: {exc.strerror}") from None
        try:
            if probe:
                try:
                    next_data = os.lseek(fd, offset, os.SEEK_DATA)
                except OSError as exc:
                    # ENXIO: no data at or after ``offset``; anything else
                    # (filesystems without SEEK_DATA) means "assume data".
                    next_data = size if exc.errno == errno.ENXIO else offset
                if next_data >= offset + length:
                    return False
            got = 0
            while got < length:
                try:
                    n = os.preadv(fd, [view[got:] if got else view], offset + got)
                except OSError as exc:
                    raise BuildError(f"{display_path(parts)}: read error at offset {offset + got}: "
                                     f"{exc.strerror}") from None
                if not n:
                    raise BuildError(f"{display_path(parts)}: file shrank while being read (expected "
                                     f"{size} bytes, ended at {offset + got})")
                got += n
            return True
        finally:
            os.close(fd)
    return read


def _read_chunks_from_host(pipeline: ChunkPipeline, inode: Inode, parts: tuple[bytes, ...],
                           chunk_size: int) -> None:
    path = inode.source
    size = inode.size
    # A file whose allocated blocks cover its size has no holes worth a
    # SEEK_DATA probe (a small hole read as zeros gives the same chunks).
    probe = not inode.dense
    for offset in range(0, size, chunk_size):
        length = min(chunk_size, size - offset)
        pipeline.submit_read(inode, offset, length, _host_chunk_reader(path, parts, offset, length, size, probe))
    inode.source = None


def chunk_files(pipeline: ChunkPipeline, files: Iterable[tuple[tuple[bytes, ...], Inode]], chunk_size: int) -> None:
    """Chunk the data of every host-backed regular file, in the given order.

    Each :class:`Inode` is read once even when it appears several times
    (hardlinks).  Empty files get no chunks.
    """
    for parts, inode in files:
        if inode.source is None or not inode.is_reg:
            continue
        if inode.size == 0:
            inode.source = None
            continue
        _read_chunks_from_host(pipeline, inode, parts, chunk_size)


# -- tar -----------------------------------------------------------------------

_TAR_KINDS = {
    DIRTYPE: stat.S_IFDIR,
    _GNU_DUMPDIR: stat.S_IFDIR,
    SYMTYPE: stat.S_IFLNK,
    CHRTYPE: stat.S_IFCHR,
    BLKTYPE: stat.S_IFBLK,
    FIFOTYPE: stat.S_IFIFO,
}


def _tar_xattrs(member: TarMember) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for name in sorted(member.xattrs):
        value = member.xattrs[name]
        if not xattr_name_supported(name):
            log.warning("tar entry %r: skipping xattr %r (namespace not representable in RAFS)",
                        member.shown, name.decode("utf-8", "backslashreplace"))
            continue
        if len(value) > MAX_XATTR_VALUE:
            raise BuildError(f"tar entry {member.shown!r}: xattr {name!r} value is {len(value)} bytes, RAFS "
                             f"stores at most {MAX_XATTR_VALUE}")
        if len(name) > MAX_XATTR_NAME:
            raise BuildError(f"tar entry {member.shown!r}: xattr name {name[:40]!r}… is longer than "
                             f"{MAX_XATTR_NAME} bytes")
        out[name] = value
    return out


def _parent_for(root: Node, parts: tuple[bytes, ...], shown: str, layer: int) -> Node:
    node = root
    for i, part in enumerate(parts[:-1]):
        assert node.children is not None
        nxt = node.children.get(part)
        if nxt is None:
            nxt = new_directory(part, implicit=True, layer=layer)
            node.children[part] = nxt
        elif nxt.children is None:
            raise BuildError(f"tar entry {shown!r}: parent {display_path(parts[:i + 1])!r} is not a directory")
        node = nxt
    return node


def load_tar(stream: BinaryIO, pipeline: ChunkPipeline, *, chunk_size: int, layer: int = 0,
             max_entries: int = 1 << 24) -> Node:
    """Read a layer tar (gzip detected by magic) into a tree, chunking data on the way.

    Whiteout files are kept as ordinary entries: a tar is one layer and only
    ``merge`` (or a build with a parent bootstrap) interprets them.  A
    directory entry may come after entries below it (the implicit directory
    then takes its attributes); any other repeated path is an error.
    """
    source = open_tar_stream(stream)
    reader = TarReader(source, max_entries=max_entries)
    root = new_directory(b"/", implicit=True, layer=layer)
    root.name = b"/"
    for member in reader:
        shown = member.shown
        parts = split_path(member.path, what="tar entry")
        if member.typeflag == LNKTYPE:
            _tar_hardlink(root, parts, member, layer)
            continue
        if member.is_file:
            kind = stat.S_IFREG
        else:
            kind = _TAR_KINDS[member.typeflag]
        if member.uid > _U32_MAX or member.gid > _U32_MAX:
            raise BuildError(f"tar entry {shown!r}: uid/gid {member.uid}/{member.gid} does not fit in 32 bits")
        if member.devmajor > 0xFFF or member.devminor > 0xFFFFF:
            raise BuildError(f"tar entry {shown!r}: device {member.devmajor}:{member.devminor} does not fit "
                             "the 32-bit Linux encoding")
        sec, nsec = _mtime(member.mtime * 1_000_000_000 + member.mtime_nsec)
        inode = Inode(kind | (member.mode & 0o7777), uid=member.uid, gid=member.gid, mtime=sec,
                      mtime_nsec=nsec, xattrs=_tar_xattrs(member), layer=layer,
                      origin=("tar", member.offset))
        if kind in (stat.S_IFCHR, stat.S_IFBLK):
            inode.rdev = encode_dev(member.devmajor, member.devminor)
        if kind == stat.S_IFLNK:
            if not member.linkname:
                raise BuildError(f"tar entry {shown!r}: symlink has an empty target")
            if len(member.linkname) > PATH_MAX:
                raise BuildError(f"tar entry {shown!r}: symlink target is {len(member.linkname)} bytes, longer "
                                 f"than PATH_MAX ({PATH_MAX})")
            inode.symlink = member.linkname
            inode.size = len(member.linkname)
        if not parts:
            if kind != stat.S_IFDIR:
                raise BuildError(f"tar entry {shown!r}: the image root must be a directory")
            if not root.implicit:
                raise BuildError(f"tar entry {shown!r}: duplicate entry for the image root")
            root.inode = inode
            root.implicit = False
            continue
        parent = _parent_for(root, parts, shown, layer)
        assert parent.children is not None
        name = parts[-1]
        existing = parent.children.get(name)
        if existing is not None:
            if existing.implicit and kind == stat.S_IFDIR:
                existing.inode = inode
                existing.implicit = False
                continue
            raise BuildError(f"tar entry {shown!r}: duplicate entry for {display_path(parts)!r}")
        node = Node(name, inode)
        parent.children[name] = node
        if kind == stat.S_IFREG:
            inode.size = member.size
            _tar_file_data(reader, pipeline, inode, member, chunk_size)
    if isinstance(source, GzipStream):
        # Inflate what follows the end-of-archive too: only the gzip trailer's
        # CRC can reveal corruption inside stored (uncompressed) deflate blocks.
        while source.read(1 << 20):
            pass
    return root


def _tar_file_data(reader: TarReader, pipeline: ChunkPipeline, inode: Inode, member: TarMember,
                   chunk_size: int) -> None:
    offset = 0
    while offset < member.size:
        want = min(chunk_size, member.size - offset)
        data = reader.read(want)
        if len(data) != want:
            raise BuildError(f"tar entry {member.shown!r}: data ends early at byte {offset + len(data)} "
                             f"of {member.size}")
        pipeline.submit(inode, offset, data)
        offset += want


def _tar_hardlink(root: Node, parts: tuple[bytes, ...], member: TarMember, layer: int) -> None:
    shown = member.shown
    target_parts = split_path(member.linkname, what=f"tar hardlink {shown!r} target")
    target = root.lookup(target_parts)
    if target is None or not target_parts:
        raise BuildError(f"tar entry {shown!r}: hardlink target {display_path(target_parts)!r} does not exist "
                         "(it must come earlier in the archive)")
    if target.children is not None:
        raise BuildError(f"tar entry {shown!r}: hardlink target {display_path(target_parts)!r} is a directory")
    if not parts:
        raise BuildError(f"tar entry {shown!r}: a hardlink cannot be the image root")
    parent = _parent_for(root, parts, shown, layer)
    assert parent.children is not None
    if parts[-1] in parent.children:
        raise BuildError(f"tar entry {shown!r}: duplicate entry for {display_path(parts)!r}")
    # Only regular files are shared (as upstream does); links to other kinds
    # become independent copies with the same attributes.
    inode = target.inode if target.inode.is_reg else target.inode.copy()
    parent.children[parts[-1]] = Node(parts[-1], inode)
