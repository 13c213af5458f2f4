"""``nydus-image check`` and ``nydus-image inspect --request``.

``check`` decodes *everything* a reader could touch (every inode, name,
symlink, xattr and chunk record, through the same reader nydusd uses) and, with
``--blob-dir``, that every referenced blob exists, is large enough and (v6)
carries a compression-context header matching its blob-table entry.

``inspect`` answers upstream's request-mode commands with JSON values.  Keys
upstream emits keep upstream's names (``stats`` -> ``inodes_count``; ``blobs``
-> ``blob_id``, ``readahead_offset``, ``readahead_size``, ``decompressed_size``,
``compressed_size``; ``prefetch`` -> ``inode``, ``path``); ``ls`` and ``stat``,
which upstream only prints as text, get JSON objects with the same fields.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import Any

from ..errors import BuildError, FormatError
from ..format.blob import BLOB_CCT_HEADER_SIZE, BlobCompressionContextHeader
from ..format.reader import Bootstrap
from ..format.types import BlobFeatures, BlobInfo, Compressor
from ._load import _tree_from, read_bootstrap_file

__all__ = ["CheckResult", "check", "format_blob_features", "inspect_request", "INSPECT_COMMANDS"]

INSPECT_COMMANDS = ("stats", "ls", "stat", "blobs", "prefetch", "icheck")

_FEATURE_NAMES = (
    (BlobFeatures.ALIGNED, "aligned"),
    (BlobFeatures.BATCH, "batch"),
    (BlobFeatures.CAP_TAR_TOC, "cap_toc"),
    (BlobFeatures.INLINED_CHUNK_DIGEST, "chunk-digest"),
    (BlobFeatures.CHUNK_INFO_V2, "chunk-v2"),
    (BlobFeatures.INLINED_FS_META, "fs-meta"),
    (BlobFeatures.SEPARATE, "separate"),
    (BlobFeatures.HAS_TAR_HEADER, "tar-header"),
    (BlobFeatures.HAS_TOC, "toc"),
    (BlobFeatures.ZRAN, "zran"),
    (BlobFeatures.ENCRYPTED, "encrypted"),
    (BlobFeatures.IS_CHUNKDICT_GENERATED, "is-chunkdict-generated"),
)


def format_blob_features(features: int) -> str:
    """Feature names as ``nydus-image check`` prints them (space separated)."""
    return " ".join(name for bit, name in _FEATURE_NAMES if features & bit)


@dataclass
class CheckResult:
    blobs: list[BlobInfo]
    compressor: Compressor
    fs_version: int
    inodes: int = 0
    verbose_lines: list[str] = field(default_factory=list)


def _check_blob_file(blob: BlobInfo, path: str, data_end: int) -> None:
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise BuildError(f"blob {blob.blob_id}: {path!r}: {exc.strerror}") from None
    if size < data_end:
        raise BuildError(f"blob {blob.blob_id}: file has {size} bytes but chunks extend to {data_end}")
    if blob.ci_uncompressed_size:
        end = blob.ci_offset + blob.ci_compressed_size + BLOB_CCT_HEADER_SIZE
        if size < end:
            raise BuildError(f"blob {blob.blob_id}: file has {size} bytes, its blob meta ends at {end}")
        with open(path, "rb") as f:
            f.seek(blob.ci_offset + blob.ci_compressed_size)
            raw = f.read(BLOB_CCT_HEADER_SIZE)
        try:
            BlobCompressionContextHeader.from_bytes(raw).validate(blob)
        except FormatError as exc:
            raise BuildError(f"blob {blob.blob_id}: compression context header does not match the image: {exc}") \
                from None


def check(bootstrap: str, *, blob_dir: str | None = None, verbose: bool = False) -> CheckResult:
    """Validate ``bootstrap`` completely; BuildError names what is wrong."""
    bs = read_bootstrap_file(bootstrap)
    lines: list[str] = []
    try:
        root = _tree_from(bs, 0)
        count = 0
        for path, ino, info in bs.walk():
            count += 1
            if verbose:
                lines.append(f"inode: {path.decode('utf-8', 'backslashreplace')} ino {ino} mode {info.mode:o} "
                             f"size {info.size} nlink {info.nlink}")
                if info.is_reg:
                    for c in bs.chunks(ino):
                        lines.append(f"\t chunk: blob {c.blob_index} index {c.index} file offset {c.file_offset:#x} "
                                     f"compressed {c.compressed_offset:#x}+{c.compressed_size:#x} uncompressed "
                                     f"{c.uncompressed_offset:#x}+{c.uncompressed_size:#x} digest {c.digest.hex()}")
    except FormatError as exc:
        raise BuildError(f"bootstrap {bootstrap!r} is corrupt: {exc}") from None
    if blob_dir is not None:
        ends: dict[int, int] = {}
        stack = [root]
        while stack:
            node = stack.pop()
            if node.children is not None:
                stack.extend(node.children.values())
            for c in node.inode.chunks:
                ends[c.blob_index] = max(ends.get(c.blob_index, 0), c.compressed_offset + c.compressed_size)
        for b in bs.blobs:
            _check_blob_file(b, os.path.join(blob_dir, b.blob_id), ends.get(b.index, 0))
    return CheckResult(blobs=list(bs.blobs), compressor=bs.compressor, fs_version=bs.version, inodes=count,
                       verbose_lines=lines)


# -- inspect -------------------------------------------------------------------


def _paths_by_ino(bs: Bootstrap) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for path, ino, _ in bs.walk():
        out.setdefault(ino, []).append(path.decode("utf-8", "backslashreplace"))
    return out


def _resolve(bs: Bootstrap, path: str) -> int:
    ino = bs.root_ino
    for part in path.encode().split(b"/"):
        if part in (b"", b"."):
            continue
        found = bs.lookup(ino, part)
        if found is None:
            raise BuildError(f"no such file: {path!r}")
        ino = found
    return ino


def _type_char(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "-"
    if stat.S_ISDIR(mode):
        return "d"
    if stat.S_ISLNK(mode):
        return "l"
    return " "


def inspect_request(bootstrap: str, request: str) -> Any:
    """Run one request (``stats``, ``ls [DIR]``, ``stat FILE``, ``blobs``, ``prefetch``, ``icheck INO``)."""
    words = request.split()
    if not words:
        raise BuildError("empty inspect request")
    cmd, args = words[0], words[1:]
    if cmd not in INSPECT_COMMANDS:
        raise BuildError(f"unsupported inspect request {request!r} (supported: {', '.join(INSPECT_COMMANDS)})")
    bs = read_bootstrap_file(bootstrap)
    try:
        return _run(bs, cmd, args, request)
    except FormatError as exc:
        raise BuildError(f"bootstrap {bootstrap!r} is corrupt: {exc}") from None


def _run(bs: Bootstrap, cmd: str, args: list[str], request: str) -> Any:
    if cmd == "stats":
        return {
            "inodes_count": bs.inodes_count,
            "version": bs.version,
            "chunk_size": bs.chunk_size,
            "flags": int(bs.flags),
            "compressor": bs.compressor.cli_name,
            "digester": bs.digester.cli_name,
            "root_inode": bs.root_ino,
            "blobs_count": len(bs.blobs),
            "prefetch_table_entries": len(bs.prefetch_inodes),
        }
    if cmd == "blobs":
        return [{
            "blob_id": b.blob_id,
            "readahead_offset": b.readahead_offset,
            "readahead_size": b.readahead_size,
            "decompressed_size": b.uncompressed_size,
            "compressed_size": b.compressed_size,
            "blob_index": b.index,
            "chunk_count": b.chunk_count,
            "chunk_size": b.chunk_size,
            "compressor": b.compressor.cli_name,
            "digester": b.digester.cli_name,
            "features": format_blob_features(b.features),
        } for b in bs.blobs]
    if cmd == "prefetch":
        paths = _paths_by_ino(bs) if bs.prefetch_inodes else {}
        return [{"inode": ino, "path": paths.get(ino, [])} for ino in bs.prefetch_inodes]
    if cmd == "ls":
        if len(args) > 1:
            raise BuildError(f"invalid arguments in inspect request {request!r}")
        dir_ino = _resolve(bs, args[0]) if args else bs.root_ino
        if not bs.inode(dir_ino).is_dir:
            raise BuildError(f"{args[0]!r} is not a directory")
        out = []
        for _, name, ino, _ in bs.children(dir_ino, 0):
            if name in (b".", b".."):
                continue
            info = bs.inode(ino)
            out.append({"name": name.decode("utf-8", "backslashreplace"), "inode": ino,
                        "type": _type_char(info.mode)})
        return out
    if cmd == "stat":
        if len(args) != 1:
            raise BuildError(f"invalid arguments in inspect request {request!r}")
        ino = _resolve(bs, args[0])
        info = bs.inode(ino)
        parent = bs.lookup(ino, b"..") if info.is_dir else _resolve(bs, os.path.dirname(args[0].rstrip("/")) or "/")
        result: dict[str, Any] = {
            "inode": ino, "name": os.path.basename(args[0].rstrip("/")) or "/", "size": info.size,
            "parent": parent, "mode": info.mode, "permissions": oct(info.mode & 0o7777), "nlink": info.nlink,
            "uid": info.uid, "gid": info.gid, "mtime": info.mtime, "mtime_nsec": info.mtime_nsec,
            "blocks": info.blocks,
        }
        if info.is_symlink:
            result["target"] = bs.readlink(ino).decode("utf-8", "backslashreplace")
        if info.has_xattr:
            result["xattrs"] = {k.decode("utf-8", "backslashreplace"): v.hex() for k, v in bs.xattrs(ino).items()}
        if info.is_reg:
            result["chunks"] = [{
                "file_offset": c.file_offset, "chunk_index": c.index, "blob_index": c.blob_index,
                "blob_id": bs.blobs[c.blob_index].blob_id if 0 <= c.blob_index < len(bs.blobs) else "",
                "compressed_offset": c.compressed_offset, "compressed_size": c.compressed_size,
                "decompressed_offset": c.uncompressed_offset, "decompressed_size": c.uncompressed_size,
                "chunk_id": c.digest.hex(),
            } for c in bs.chunks(ino)]
        return result
    # icheck
    if len(args) != 1 or not args[0].isdigit():
        raise BuildError(f"invalid arguments in inspect request {request!r}")
    ino = int(args[0])
    paths = _paths_by_ino(bs).get(ino)
    if paths is None:
        raise BuildError(f"inode {ino} is not in the image")
    info = bs.inode(ino)
    return {"inode": ino, "path": paths, "mode": info.mode, "size": info.size, "nlink": info.nlink}
