"""``nydus-image unpack``: an image back to an OCI layer tar, and reading chunk data.

:class:`BlobReader` fetches one chunk from local blob files: ``pread`` of the
stored bytes, decompression with the blob's compressor, a size check and a
digest check, so a corrupt blob is reported (naming blob and chunk) instead
of silently producing a wrong tar.

The tar is POSIX pax: plain ustar headers where the values fit, a PAX record
(``path``, ``linkpath``, ``mtime`` with nanoseconds, ``SCHILY.xattr.*``, big
ids/sizes) where they do not.  Entries come in walk order (a directory before
its contents, names sorted), the root as ``./``.  The first name of a
hardlinked file carries the data, later names are hardlinks to it.  Sockets
cannot be stored in a tar and are skipped with a warning, as are whiteout
conventions: the tree is written exactly as the image holds it.
"""

from __future__ import annotations

import logging
import os
import stat
from typing import BinaryIO, Iterator

from ..errors import BuildError, ChunkCorruptError
from ..format.types import BlobInfo, ChunkInfo, Digester
from ..utils import decompress as _decompress
from ..utils import digest_bytes as _digest
from ._load import load_bootstrap
from ._output import Outputs
from ._tar import BLKTYPE, BLOCK, CHRTYPE, DIRTYPE, FIFOTYPE, LNKTYPE, REGTYPE, SYMTYPE, TarHeader, pax_record
from ._tree import Node, decode_dev, walk

__all__ = ["BlobReader", "unpack", "TarWriter"]

log = logging.getLogger("nydus_vfs.builder")

_MAX_OCTAL7 = 8 ** 7
_MAX_OCTAL11 = 8 ** 11


class BlobReader:
    """Read chunks of the blobs of one image from local files.

    ``paths`` maps blob index to a file path.  ``verify`` checks every chunk's
    digest with its blob's digester.
    """

    def __init__(self, blobs: list[BlobInfo], paths: dict[int, str], *, verify: bool = True) -> None:
        self._blobs = blobs
        self._paths = paths
        self._fds: dict[int, int] = {}
        self.verify = verify

    def _fd(self, index: int) -> int:
        fd = self._fds.get(index)
        if fd is None:
            if not 0 <= index < len(self._blobs):
                raise BuildError(f"chunk refers to blob index {index}, the image has {len(self._blobs)} blob(s)")
            path = self._paths.get(index)
            if path is None:
                raise BuildError(f"no file given for blob {self._blobs[index].blob_id} (use --blob or --blob-dir)")
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError as exc:
                raise BuildError(f"blob {self._blobs[index].blob_id}: cannot open {path!r}: {exc.strerror}") from None
            self._fds[index] = fd
        return fd

    def read_chunk(self, c: ChunkInfo) -> bytes:
        blob = self._blobs[c.blob_index] if 0 <= c.blob_index < len(self._blobs) else None
        fd = self._fd(c.blob_index)
        assert blob is not None
        where = f"blob {blob.blob_id} chunk {c.index} (offset {c.compressed_offset:#x})"
        try:
            raw = os.pread(fd, c.compressed_size, c.compressed_offset)
        except OSError as exc:
            raise BuildError(f"{where}: read error: {exc.strerror}") from None
        if len(raw) != c.compressed_size:
            raise BuildError(f"{where}: blob file is truncated ({len(raw)} of {c.compressed_size} bytes)")
        try:
            data = _decompress(raw, int(blob.compressor), c.uncompressed_size) if c.is_compressed else raw
        except (ChunkCorruptError, ValueError) as exc:
            raise BuildError(f"{where}: {exc}") from None
        if len(data) != c.uncompressed_size:
            raise BuildError(f"{where}: {len(data)} bytes, expected {c.uncompressed_size}")
        if self.verify and c.digest and any(c.digest) and _digest(int(blob.digester), data) != c.digest:
            raise BuildError(f"{where}: data does not match its {Digester(blob.digester).cli_name} digest")
        return data

    def file_data(self, chunks: list[ChunkInfo], size: int) -> Iterator[bytes]:
        """The file's bytes, chunk by chunk, cut to ``size``."""
        done = 0
        for c in chunks:
            data = self.read_chunk(c)
            take = min(len(data), size - done)
            if take <= 0:
                break
            yield data[:take] if take < len(data) else data
            done += take
        if done != size:
            raise BuildError(f"file chunks cover {done} bytes, the file has {size}")

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class TarWriter:
    """Write a pax tar stream, one member at a time."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._pax_count = 0

    def _header(self, name: bytes, *, typeflag: bytes, mode: int, uid: int, gid: int, size: int, mtime: int,
                mtime_nsec: int = 0, linkname: bytes = b"", devmajor: int = 0, devminor: int = 0,
                xattrs: dict[bytes, bytes] | None = None) -> None:
        pax: list[bytes] = []
        if len(name) > 100:
            pax.append(pax_record(b"path", name))
            name = name[:100]
        if len(linkname) > 100:
            pax.append(pax_record(b"linkpath", linkname))
            linkname = linkname[:100]
        if uid >= _MAX_OCTAL7:
            pax.append(pax_record(b"uid", str(uid).encode()))
        if gid >= _MAX_OCTAL7:
            pax.append(pax_record(b"gid", str(gid).encode()))
        if size >= _MAX_OCTAL11:
            pax.append(pax_record(b"size", str(size).encode()))
        if mtime_nsec or mtime < 0 or mtime >= _MAX_OCTAL11:
            pax.append(pax_record(b"mtime", b"%d.%09d" % (mtime, mtime_nsec) if mtime >= 0 else str(mtime).encode()))
        for key in sorted(xattrs or {}):
            pax.append(pax_record(b"SCHILY.xattr." + key, (xattrs or {})[key]))
        if pax:
            body = b"".join(pax)
            self._pax_count += 1
            hdr = TarHeader(name=b"PaxHeaders/%d" % self._pax_count, mode=0o644, size=len(body), typeflag=b"x")
            self._out.write(hdr.to_bytes())
            self._write_padded(body)
        hdr = TarHeader(name=name, mode=mode & 0o7777, uid=min(uid, _MAX_OCTAL7 - 1), gid=min(gid, _MAX_OCTAL7 - 1),
                        size=size if size < _MAX_OCTAL11 else 0, mtime=min(max(mtime, 0), _MAX_OCTAL11 - 1),
                        typeflag=typeflag, linkname=linkname, devmajor=devmajor, devminor=devminor)
        self._out.write(hdr.to_bytes())

    def _write_padded(self, data: bytes) -> None:
        self._out.write(data)
        pad = -len(data) % BLOCK
        if pad:
            self._out.write(b"\0" * pad)

    def add(self, name: bytes, node: Node, *, link_to: bytes | None = None,
            data: Iterator[bytes] | None = None) -> None:
        inode = node.inode
        common = dict(mode=inode.mode, uid=inode.uid, gid=inode.gid, mtime=inode.mtime, mtime_nsec=inode.mtime_nsec,
                      xattrs=inode.xattrs)
        if link_to is not None:
            self._header(name, typeflag=LNKTYPE, size=0, linkname=link_to, **common)
        elif node.children is not None:
            self._header(name, typeflag=DIRTYPE, size=0, **common)
        elif inode.is_reg:
            self._header(name, typeflag=REGTYPE, size=inode.size, **common)
            written = 0
            for piece in data or ():
                self._out.write(piece)
                written += len(piece)
            if written != inode.size:
                raise BuildError(f"{name!r}: wrote {written} bytes of {inode.size}")
            pad = -written % BLOCK
            if pad:
                self._out.write(b"\0" * pad)
        elif inode.is_symlink:
            self._header(name, typeflag=SYMTYPE, size=0, linkname=inode.symlink or b"", **common)
        elif stat.S_ISCHR(inode.mode) or stat.S_ISBLK(inode.mode):
            major, minor = decode_dev(inode.rdev)
            self._header(name, typeflag=CHRTYPE if stat.S_ISCHR(inode.mode) else BLKTYPE, size=0,
                         devmajor=major, devminor=minor, **common)
        elif stat.S_ISFIFO(inode.mode):
            self._header(name, typeflag=FIFOTYPE, size=0, **common)
        else:
            raise BuildError(f"{name!r}: file type {stat.S_IFMT(inode.mode):o} cannot be stored in a tar")

    def close(self) -> None:
        self._out.write(b"\0" * (2 * BLOCK))


def unpack(bootstrap: str, output: str, *, blob: str | None = None, blob_dir: str | None = None,
           verify: bool = True) -> int:
    """Write the image ``bootstrap`` as an OCI layer tar at ``output``; returns the member count.

    Chunk data comes from ``blob`` (an image with a single blob, or a blob
    with the bootstrap inlined, which is then the default) or from
    ``blob_dir/<blob id>``.
    """
    if not output:
        raise BuildError("invalid empty --output option")
    img = load_bootstrap(bootstrap)
    paths: dict[int, str] = {}
    used = {c.blob_index for c in img.chunks()}
    if blob is None and blob_dir is None and img.bootstrap.inlined:
        blob = bootstrap
    for i, b in enumerate(img.blobs):
        if blob is not None:
            if len(used) > 1:
                raise BuildError(f"the image uses {len(used)} blobs; --blob names one file, use --blob-dir")
            paths[i] = blob
        elif blob_dir is not None:
            paths[i] = os.path.join(blob_dir, b.blob_id)
    if used and not paths:
        raise BuildError("the image has file data: specify --blob or --blob-dir")
    reader = BlobReader(img.blobs, paths, verify=verify)
    count = 0
    try:
        with Outputs() as outputs:
            out = outputs.new(os.path.dirname(os.path.abspath(output)), output)
            writer = TarWriter(out.file)
            first_name: dict[int, bytes] = {}
            for parts, node in walk(img.root):
                if not parts:
                    name = b"./"
                else:
                    name = b"/".join(parts) + (b"/" if node.children is not None else b"")
                inode = node.inode
                if stat.S_ISSOCK(inode.mode):
                    log.warning("unpack: skipping socket %r (tar cannot store sockets)",
                                name.decode("utf-8", "backslashreplace"))
                    continue
                if inode.is_reg and id(inode) in first_name:
                    writer.add(name, node, link_to=first_name[id(inode)])
                elif inode.is_reg:
                    first_name[id(inode)] = name
                    writer.add(name, node, data=reader.file_data(inode.chunks, inode.size))
                else:
                    writer.add(name, node)
                count += 1
            writer.close()
            out.commit()
    finally:
        reader.close()
    return count
