"""``nydus-image create``: a directory or layer tar to a bootstrap and a data blob.

Order of work (upstream's order where it matters for the bytes produced):

1. Load the parent bootstrap and the chunk dictionary, if any: their chunks
   seed the dedup table, their blobs come first in the blob table.
2. Read the source into a tree.  Tar data is chunked as it streams past (tar
   order); directory data afterwards, prefetch files first, then index order.
   (Chunking while the walk goes on was measured slower: the walk's Python
   holds the GIL that the reading workers need between their syscalls.)
3. Seal the blob data, then lay out the bootstrap (v5 or v6):

   * separate bootstrap: finish the blob first (its id is its sha256, or
     ``--blob-id``), then write the bootstrap that names it;
   * ``--blob-inline-meta``: write the bootstrap, naming the blob with the
     placeholder id, *into* the blob, then finish the blob.

4. Rename every output into place; nothing is left behind on failure.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import time
from dataclasses import dataclass, field, replace
from typing import BinaryIO, Iterable

from ..errors import BuildError
from ..format.types import BlobInfo, ChunkInfo, Compressor, Digester
from ..utils import sha256_hex
from ._blob import PLACEHOLDER_BLOB_ID, BlobWriter
from ._chunker import ChunkPipeline
from ._layout import ImageSpec
from ._output import Outputs, PendingFile
from ._overlay import apply_layer
from ._source import WhiteoutSpec, chunk_files, load_directory, load_tar
from ._tree import Indexed, Node, index_order, split_path
from ._v5 import build_v5_bootstrap
from ._v6 import build_v6_bootstrap

__all__ = [
    "SOURCE_TYPES",
    "PREFETCH_POLICIES",
    "DEFAULT_CHUNK_SIZE",
    "BuildOptions",
    "BuildResult",
    "build",
    "parse_prefetch_patterns",
    "validate_chunk_size",
    "renumber_blobs",
    "write_bootstrap_image",
]

log = logging.getLogger("nydus_vfs.builder")

#: ``--type`` values and the source kind each means.
SOURCE_TYPES = {"dir-rafs": "dir", "directory": "dir", "tar-rafs": "tar", "targz-rafs": "tar"}
PREFETCH_POLICIES = ("fs", "blob", "none")
DEFAULT_CHUNK_SIZE = 0x100000


def validate_chunk_size(value: int) -> int:
    """A chunk size must be a power of two in 4 KiB..16 MiB (rafs-format.md §0.6)."""
    if value < 0x1000 or value > 0x1000000 or value & (value - 1):
        raise BuildError(f"invalid chunk size {value:#x}: must be a power of two between 0x1000 and 0x1000000")
    return value


def parse_prefetch_patterns(lines: Iterable[str | bytes]) -> list[tuple[bytes, ...]]:
    """Prefetch patterns as upstream reads them from stdin: absolute paths, one per line.

    Relative paths are skipped with a warning, as are patterns already covered
    by an earlier one (``/a`` covers ``/a/b``).  ``/`` means everything.
    """
    out: list[tuple[bytes, ...]] = []
    for raw in lines:
        line = (raw.encode() if isinstance(raw, str) else raw).strip()
        if not line:
            continue
        if not line.startswith(b"/"):
            log.warning("prefetch pattern %r is not an absolute path, ignored", line)
            continue
        parts = split_path(line, what="prefetch pattern")
        if any(parts[:len(p)] == p for p in out):
            log.warning("prefetch pattern %r is covered by an earlier pattern, ignored", line)
            continue
        out.append(parts)
    return out


@dataclass
class BuildOptions:
    """Everything ``create`` accepts (paths as str).  Defaults are upstream's."""

    source_type: str = "dir-rafs"
    fs_version: int = 6
    compressor: Compressor = Compressor.ZSTD
    digester: Digester = Digester.BLAKE3
    chunk_size: int = DEFAULT_CHUNK_SIZE
    bootstrap: str | None = None
    blob: str | None = None
    blob_dir: str | None = None
    blob_inline_meta: bool = False
    blob_toc: bool = False
    blob_id: str | None = None
    whiteout_spec: str = WhiteoutSpec.OCI
    prefetch_policy: str = "none"
    prefetch_patterns: list[tuple[bytes, ...]] = field(default_factory=list)
    chunk_dict: str | None = None
    parent_bootstrap: str | None = None
    aligned_chunk: bool = False
    repeatable: bool = False
    workers: int | None = None

    def validate(self) -> None:
        if self.source_type not in SOURCE_TYPES:
            raise BuildError(f"unsupported conversion type {self.source_type!r} "
                             f"(supported: {', '.join(SOURCE_TYPES)})")
        if self.fs_version not in (5, 6):
            raise BuildError(f"invalid fs-version {self.fs_version}: must be 5 or 6")
        validate_chunk_size(self.chunk_size)
        if self.compressor not in (Compressor.NONE, Compressor.LZ4_BLOCK, Compressor.ZSTD):
            raise BuildError(f"compressor {Compressor(self.compressor).cli_name} is not supported by create")
        if self.whiteout_spec not in WhiteoutSpec.ALL:
            raise BuildError(f"invalid whiteout spec {self.whiteout_spec!r}")
        if self.prefetch_policy not in PREFETCH_POLICIES:
            raise BuildError(f"invalid prefetch policy {self.prefetch_policy!r}")
        if self.blob_inline_meta and self.bootstrap:
            raise BuildError("--bootstrap conflicts with --blob-inline-meta (the bootstrap goes into the blob)")
        if self.blob_inline_meta and self.blob_id:
            raise BuildError("--blob-id conflicts with --blob-inline-meta")
        if not self.blob and not self.blob_dir:
            raise BuildError("both --blob and --blob-dir are missing, please specify one to store the data blob")
        if not self.blob_inline_meta and not self.bootstrap and not self.blob_dir:
            raise BuildError("both --bootstrap and --blob-dir are missing, please specify one to store the "
                             "generated metadata blob file")
        if self.blob_dir and not os.path.isdir(self.blob_dir):
            raise BuildError(f"directory to store blobs does not exist: {self.blob_dir!r}")
        if self.blob_toc and self.fs_version != 6:
            raise BuildError("`--features blob-toc` can't be used with `--fs-version 5`")
        if self.blob_id is not None:
            if not self.blob_id or len(self.blob_id) > 255:
                raise BuildError("blob id must be 1..255 characters")
            if self.fs_version == 6 and len(self.blob_id.encode()) > 64:
                raise BuildError("RAFS v6 stores blob ids of at most 64 bytes")
            if "/" in self.blob_id or "\0" in self.blob_id:
                raise BuildError(f"blob id {self.blob_id!r} may not contain '/' or NUL")


@dataclass
class BuildResult:
    """What a build produced.

    ``blobs`` are the blob ids of the blob table in order (what
    ``--output-json`` reports); ``blob_id`` is the new data blob's id or
    ``None`` when no new data was written.
    """

    bootstrap_path: str | None
    blob_path: str | None
    blob_id: str | None
    blobs: list[str]
    blob_size: int
    fs_version: int
    compressor: Compressor
    chunks_stored: int = 0
    chunks_deduplicated: int = 0
    trace: dict[str, float] = field(default_factory=dict)


def renumber_blobs(root: Node, blobs: list[BlobInfo], *, keep: int = 0,
                   order: list[Indexed] | None = None) -> tuple[list[BlobInfo], dict[int, int]]:
    """Keep only used blobs, in order of first use, and rewrite chunk blob indexes.

    The first ``keep`` blobs (a parent's) keep their positions even when
    unused, as upstream keeps a parent image's blob table.  Returns the new
    table and the old -> new index mapping; every ``ChunkInfo.blob_index`` in
    the tree is updated.  ``order`` is ``index_order(root)`` if the caller has it.
    """
    mapping: dict[int, int] = {i: i for i in range(min(keep, len(blobs)))}
    seen_inodes: set[int] = set()
    if order is None:
        order = index_order(root)
    for e in order:
        inode = e.node.inode
        if not inode.is_reg or id(inode) in seen_inodes:
            continue
        seen_inodes.add(id(inode))
        for c in inode.chunks:
            if c.blob_index not in mapping:
                mapping[c.blob_index] = len(mapping)
    new_table = [None] * len(mapping)
    for old, new in mapping.items():
        new_table[new] = replace(blobs[old], index=new)
    if all(old == new for old, new in mapping.items()):
        return new_table, mapping  # type: ignore[return-value]
    seen_inodes.clear()
    for e in order:
        inode = e.node.inode
        if not inode.is_reg or id(inode) in seen_inodes:
            continue
        seen_inodes.add(id(inode))
        inode.chunks = [c if mapping[c.blob_index] == c.blob_index else replace(c, blob_index=mapping[c.blob_index])
                        for c in inode.chunks]
    return new_table, mapping  # type: ignore[return-value]


def write_bootstrap_image(spec: ImageSpec, fs_version: int) -> bytes:
    return build_v6_bootstrap(spec) if fs_version == 6 else build_v5_bootstrap(spec)


def _prefetch_first(order, patterns: list[tuple[bytes, ...]]):
    """Regular files in blob order: prefetch matches (pattern order) first, then the rest."""
    if not patterns:
        return [(e.path, e.node.inode) for e in order if e.node.inode.is_reg]
    first: list[list] = [[] for _ in patterns]
    rest = []
    for e in order:
        if not e.node.inode.is_reg:
            continue
        for i, p in enumerate(patterns):
            if e.path[:len(p)] == p:
                first[i].append((e.path, e.node.inode))
                break
        else:
            rest.append((e.path, e.node.inode))
    return [x for group in first for x in group] + rest


def build(source: str | BinaryIO, opts: BuildOptions) -> BuildResult:
    """Build an image from ``source`` (a directory path, a tar path or a binary stream).

    The cyclic garbage collector is paused for the duration (and restored
    after): a build allocates a few objects per file and frees nothing until
    it ends, so collections would only re-scan the growing tree, and they
    were a fifth of the bootstrap layout time on a 7,000-file tree.  The
    builder's structures hold no reference cycles.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _build(source, opts)
    finally:
        if was_enabled:
            gc.enable()


def _build(source: str | BinaryIO, opts: BuildOptions) -> BuildResult:
    from ._load import load_bootstrap, load_chunk_dict

    opts.validate()
    t0 = time.monotonic()
    trace: dict[str, float] = {}
    kind = SOURCE_TYPES[opts.source_type]
    compressor = Compressor(opts.compressor)
    digester = Digester(opts.digester)
    fs_version = opts.fs_version

    # 1. parent and chunk dict --------------------------------------------------
    base_blobs: list[BlobInfo] = []
    known: dict[bytes, ChunkInfo] = {}
    parent_root: Node | None = None
    if opts.parent_bootstrap:
        parent = load_bootstrap(opts.parent_bootstrap)
        _check_compatible(parent, opts, "parent bootstrap")
        parent_root = parent.root
        base_blobs = list(parent.blobs)
        for c in parent.chunks():
            known.setdefault(c.digest, c)
    keep = len(base_blobs)
    if opts.chunk_dict:
        dict_img = load_chunk_dict(opts.chunk_dict)
        _check_compatible(dict_img, opts, "chunk dictionary")
        # A dictionary blob the parent already lists keeps the parent's slot.
        position = {b.blob_id: i for i, b in enumerate(base_blobs)}
        remap = []
        for b in dict_img.blobs:
            if b.blob_id not in position:
                position[b.blob_id] = len(base_blobs)
                base_blobs.append(replace(b, index=len(base_blobs)))
            remap.append(position[b.blob_id])
        for c in dict_img.chunks():
            known.setdefault(c.digest, replace(c, blob_index=remap[c.blob_index]))
    new_index = len(base_blobs)
    trace["load_parent_and_dict"] = time.monotonic() - t0

    # The blob writer is closed (its helper thread stopped) before the
    # outputs are discarded or committed: ExitStack unwinds first.
    with Outputs() as outputs, contextlib.ExitStack() as cleanup:
        blob_dir = opts.blob_dir
        blob_file: PendingFile = outputs.new(
            os.path.dirname(os.path.abspath(opts.blob)) if opts.blob else blob_dir, opts.blob)
        writer = BlobWriter(blob_file.file, blob_index=new_index, chunk_size=opts.chunk_size,
                            compressor=compressor, digester=digester, fs_version=fs_version,
                            aligned=opts.aligned_chunk, inline_meta=opts.blob_inline_meta,
                            blob_toc=opts.blob_toc)
        cleanup.callback(writer.close)
        patterns = opts.prefetch_patterns if opts.prefetch_policy != "none" else []

        # 2. source -> tree (+ chunks) ---------------------------------------------
        t1 = time.monotonic()
        order: list[Indexed] | None = None   # index_order(root), while root is unchanged
        # A window of a few chunks keeps every worker busy; more only costs
        # fresh memory (page faults) and cache misses.
        with ChunkPipeline(writer, digester=digester, compressor=compressor, known=known,
                           workers=opts.workers, max_inflight=max(8 << 20, 4 * opts.chunk_size)) as pipeline:
            if kind == "dir":
                if not isinstance(source, (str, bytes, os.PathLike)):
                    raise BuildError("a dir-rafs source must be a directory path")
                root = load_directory(source, whiteout_spec=opts.whiteout_spec,
                                      keep_whiteouts=parent_root is not None, layer=1 if parent_root else 0)
                order = index_order(root)
                chunk_files(pipeline, _prefetch_first(order, patterns), opts.chunk_size)
            else:
                root = _load_tar_source(source, pipeline, opts.chunk_size, layer=1 if parent_root else 0)
        trace["build_tree_and_dump_blob"] = time.monotonic() - t1
        writer.seal()

        if parent_root is not None:
            apply_layer(parent_root, root, opts.whiteout_spec)
            root = parent_root
            order = None

        # 3. blob table, bootstrap, blob finish ------------------------------------
        has_new = writer.chunk_count > 0
        blobs = base_blobs + ([writer.info(PLACEHOLDER_BLOB_ID, new_index)] if has_new else [])
        if order is None:
            order = index_order(root)
        blobs, mapping = renumber_blobs(root, blobs, keep=keep, order=order)
        new_pos = mapping.get(new_index) if has_new else None
        spec = ImageSpec(root=root, chunk_size=opts.chunk_size, compressor=compressor, digester=digester,
                         blobs=blobs, explicit_uidgid=not opts.repeatable,
                         prefetch=patterns if opts.prefetch_policy == "fs" else [], order=order)
        if opts.prefetch_policy == "blob" and new_pos is not None and fs_version == 5:
            spec.blobs[new_pos] = replace(spec.blobs[new_pos], readahead_offset=0,
                                          readahead_size=_prefetch_size(root, patterns, new_pos))
        t2 = time.monotonic()
        if opts.blob_inline_meta:
            bootstrap = write_bootstrap_image(spec, fs_version)
            writer.write_bootstrap(bootstrap)
            blob_id = writer.finish()
        else:
            digest = writer.finish()
            blob_id = opts.blob_id or digest
            if new_pos is not None:
                spec.blobs[new_pos] = replace(writer.info(blob_id, new_pos),
                                              readahead_offset=spec.blobs[new_pos].readahead_offset,
                                              readahead_size=spec.blobs[new_pos].readahead_size)
            bootstrap = write_bootstrap_image(spec, fs_version)
        trace["dump_bootstrap"] = time.monotonic() - t2

        # 4. commit --------------------------------------------------------------------
        blob_path = None
        write_blob = has_new or opts.blob_inline_meta
        if write_blob:
            name = opts.blob or os.path.join(blob_dir, blob_id)  # type: ignore[arg-type]
            blob_path = blob_file.commit(name)
        bootstrap_path = None
        if not opts.blob_inline_meta:
            target = opts.bootstrap or os.path.join(blob_dir, sha256_hex(bootstrap))  # type: ignore[arg-type]
            boot_file = outputs.new(os.path.dirname(os.path.abspath(target)), target)
            boot_file.file.write(bootstrap)
            bootstrap_path = boot_file.commit()
        trace["total_build"] = time.monotonic() - t0
        ids = [b.blob_id for b in spec.blobs]
        if opts.blob_inline_meta and new_pos is not None:
            ids[new_pos] = blob_id
        return BuildResult(bootstrap_path=bootstrap_path, blob_path=blob_path,
                           blob_id=blob_id if write_blob else None, blobs=ids,
                           blob_size=writer.size if write_blob else 0, fs_version=fs_version,
                           compressor=compressor, chunks_stored=pipeline.stored,
                           chunks_deduplicated=pipeline.deduplicated, trace=trace)


def _prefetch_size(root: Node, patterns: list[tuple[bytes, ...]], blob_index: int) -> int:
    """Bytes at the head of the blob holding the prefetch files' chunks (blob policy)."""
    end = 0
    for parts in patterns:
        node = root.lookup(parts)
        if node is None:
            continue
        stack = [node]
        while stack:
            n = stack.pop()
            if n.children is not None:
                stack.extend(n.children.values())
            elif n.inode.is_reg:
                for c in n.inode.chunks:
                    if c.blob_index == blob_index:
                        end = max(end, c.compressed_offset + c.compressed_size)
    return min(end, 0xFFFFFFFF)


def _load_tar_source(source: str | BinaryIO, pipeline: ChunkPipeline, chunk_size: int, layer: int) -> Node:
    if isinstance(source, (str, bytes, os.PathLike)):
        try:
            f = open(source, "rb")
        except OSError as exc:
            raise BuildError(f"source {os.fsdecode(source)!r}: {exc.strerror}") from None
        with f:
            return load_tar(f, pipeline, chunk_size=chunk_size, layer=layer)
    return load_tar(source, pipeline, chunk_size=chunk_size, layer=layer)


def _check_compatible(img, opts: BuildOptions, what: str) -> None:
    if img.fs_version != opts.fs_version:
        raise BuildError(f"{what} is RAFS v{img.fs_version} but the build is v{opts.fs_version}")
    if img.chunk_size != opts.chunk_size:
        raise BuildError(f"{what} uses chunk size {img.chunk_size:#x} but the build uses {opts.chunk_size:#x}")
    if img.digester != Digester(opts.digester):
        raise BuildError(f"{what} uses digester {img.digester.cli_name} but the build uses "
                         f"{Digester(opts.digester).cli_name}")
    if img.fs_version == 5 and img.compressor != Compressor(opts.compressor):
        raise BuildError(f"{what} uses compressor {img.compressor.cli_name}; RAFS v5 images have one compressor "
                         f"for all blobs, the build uses {Compressor(opts.compressor).cli_name}")

