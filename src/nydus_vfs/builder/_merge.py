"""``nydus-image merge``: per-layer bootstraps (lowest first) into one (rafs-format.md §4.4, §5).

* Every layer must agree with the first on RAFS version, chunk size and
  explicit uid/gid (and, for v5, digester and compressor, which v5 stores
  once per image); otherwise :class:`InconsistentFilesystemError` (the CLI
  exits with status 2, as upstream does).
* Each layer's own data blob may be renamed to what nydusd will look for at
  runtime (``--blob-digests``, ``--original-blob-ids``, or a layer file
  named by its digest); ``--blob-sizes`` / ``--blob-toc-digests`` /
  ``--blob-toc-sizes`` patch that blob's entry.
* Every blob entry taken into the merged table (parent, layers, chunk-dict
  blobs) loses the ``INLINED_FS_META`` feature, as upstream's
  ``BlobContext::from`` does for parent and dict sources: the merged
  bootstrap is a file of its own, so nydusd must use the stored ids instead
  of replacing them by the merged bootstrap's file name.  A layer's own blob
  that carried the flag was named after its source file when loaded (and
  ``--blob-digests`` renames it again), so the stored id is the runtime one.
* Layers are applied with the whiteout rules of :mod:`._overlay`; then blobs
  are re-indexed in order of first use and unused ones dropped.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace

from ..errors import BuildError
from ..format.types import BlobFeatures, BlobInfo
from ..utils import from_hex, sha256_hex
from ._build import BuildResult, renumber_blobs, write_bootstrap_image
from ._layout import ImageSpec
from ._load import LoadedImage, load_bootstrap, load_chunk_dict
from ._output import Outputs
from ._overlay import apply_layer, strip_whiteouts
from ._source import WhiteoutSpec

__all__ = ["InconsistentFilesystemError", "MergeOptions", "merge"]

_INLINED_META = int(BlobFeatures.INLINED_FS_META)


class InconsistentFilesystemError(BuildError):
    """The layers cannot be merged into one filesystem (different settings)."""


@dataclass
class MergeOptions:
    """What ``merge`` accepts; list options have one item per source bootstrap."""

    bootstrap: str | None = None
    blob_dir: str | None = None
    parent_bootstrap: str | None = None
    chunk_dict: str | None = None
    whiteout_spec: str = WhiteoutSpec.OCI
    prefetch_policy: str = "none"
    prefetch_patterns: list[tuple[bytes, ...]] = field(default_factory=list)
    blob_digests: list[str] | None = None
    original_blob_ids: list[str] | None = None
    blob_sizes: list[int] | None = None
    blob_toc_digests: list[str] | None = None
    blob_toc_sizes: list[int] | None = None


def _check_lists(opts: MergeOptions, n: int) -> None:
    for name in ("blob_digests", "original_blob_ids", "blob_sizes", "blob_toc_digests", "blob_toc_sizes"):
        value = getattr(opts, name)
        if value is not None and len(value) != n:
            raise BuildError(f"number of --{name.replace('_', '-')} entries {len(value)} doesn't match number of "
                             f"sources {n}")


def _compatible(first: LoadedImage, img: LoadedImage) -> None:
    def bad(what: str, a: object, b: object) -> InconsistentFilesystemError:
        return InconsistentFilesystemError(f"inconsistent {what}: {a} in {first.path!r} vs {b} in {img.path!r}")

    if img.fs_version != first.fs_version:
        raise bad("RAFS version", first.fs_version, img.fs_version)
    if img.chunk_size != first.chunk_size:
        raise bad("chunk size", hex(first.chunk_size), hex(img.chunk_size))
    if img.explicit_uidgid != first.explicit_uidgid:
        raise bad("explicit uid/gid setting", first.explicit_uidgid, img.explicit_uidgid)
    if img.bootstrap.is_tarfs != first.bootstrap.is_tarfs:
        raise bad("TARFS mode", first.bootstrap.is_tarfs, img.bootstrap.is_tarfs)
    if first.fs_version == 5:
        if img.digester != first.digester:
            raise bad("digester (RAFS v5 inode digests)", first.digester.cli_name, img.digester.cli_name)
        if img.compressor != first.compressor:
            raise bad("compressor (RAFS v5 has one per image)", first.compressor.cli_name, img.compressor.cli_name)


def _layer_blob(blob: BlobInfo, layer: int, opts: MergeOptions) -> BlobInfo:
    """Apply the per-layer overrides to a layer's own data blob."""
    if opts.original_blob_ids is not None:
        blob = blob.with_blob_id(opts.original_blob_ids[layer])
    separate = bool(blob.features & BlobFeatures.SEPARATE)
    if opts.blob_digests is not None:
        try:
            digest = from_hex(opts.blob_digests[layer])
        except ValueError as exc:
            raise BuildError(f"--blob-digests entry {layer}: {exc}") from None
        blob = replace(blob, blob_meta_digest=digest) if separate else blob.with_blob_id(digest.hex())
    if opts.blob_sizes is not None:
        size = opts.blob_sizes[layer]
        blob = replace(blob, blob_meta_size=size) if separate else replace(blob, compressed_size=size)
    if opts.blob_toc_digests is not None:
        try:
            blob = replace(blob, blob_toc_digest=from_hex(opts.blob_toc_digests[layer]))
        except ValueError as exc:
            raise BuildError(f"--blob-toc-digests entry {layer}: {exc}") from None
    if opts.blob_toc_sizes is not None:
        blob = replace(blob, blob_toc_size=opts.blob_toc_sizes[layer])
    return blob


def merge(sources: list[str], opts: MergeOptions) -> BuildResult:
    """Merge ``sources`` (bootstrap paths, lowest layer first) into one bootstrap."""
    t0 = time.monotonic()
    if not sources:
        raise BuildError("source bootstrap list is empty, at least one bootstrap is required")
    if not opts.bootstrap and not opts.blob_dir:
        raise BuildError("both --bootstrap and --blob-dir are missing, please specify one to store the merged "
                         "bootstrap")
    if opts.blob_dir and not os.path.isdir(opts.blob_dir):
        raise BuildError(f"directory to store blobs does not exist: {opts.blob_dir!r}")
    if opts.whiteout_spec not in WhiteoutSpec.ALL:
        raise BuildError(f"invalid whiteout spec {opts.whiteout_spec!r}")
    _check_lists(opts, len(sources))

    table: list[BlobInfo] = []
    index_of: dict[str, int] = {}

    def add_blob(blob: BlobInfo) -> int:
        pos = index_of.get(blob.blob_id)
        if pos is None:
            pos = index_of[blob.blob_id] = len(table)
            table.append(replace(blob, index=pos, features=int(blob.features) & ~_INLINED_META))
        return pos

    def remap(img: LoadedImage, new_index: list[int]) -> None:
        seen: set[int] = set()
        stack = [img.root]
        while stack:
            node = stack.pop()
            if node.children is not None:
                stack.extend(node.children.values())
            elif node.inode.is_reg and id(node.inode) not in seen:
                seen.add(id(node.inode))
                node.inode.chunks = [c if new_index[c.blob_index] == c.blob_index else
                                     replace(c, blob_index=new_index[c.blob_index]) for c in node.inode.chunks]

    root = None
    first: LoadedImage | None = None
    if opts.parent_bootstrap:
        parent = load_bootstrap(opts.parent_bootstrap, layer=0)
        first = parent
        remap(parent, [add_blob(b) for b in parent.blobs])
        root = parent.root
    dict_ids: set[str] = set()
    if opts.chunk_dict:
        dict_ids = {b.blob_id for b in load_chunk_dict(opts.chunk_dict).blobs}

    last: LoadedImage | None = None
    base_layer = 1 if root is not None else 0
    for i, path in enumerate(sources):
        img = load_bootstrap(path, layer=base_layer + i, rename_blob_from_path=True)
        if img.bootstrap.is_tarfs:
            raise BuildError(f"{path!r} is a tarfs image; merging tarfs images is not supported")
        if first is None:
            first = img
        else:
            _compatible(first, img)
        own = [b for b in img.blobs if b.blob_id not in dict_ids]
        if len(own) > 1:
            raise BuildError(f"invalid per layer bootstrap {path!r}: it references {len(own)} data blobs "
                             "outside the chunk dictionary, at most one is allowed")
        new_index = []
        for b in img.blobs:
            if b.blob_id not in dict_ids:
                b = _layer_blob(b, i, opts)
            new_index.append(add_blob(b))
        remap(img, new_index)
        if root is None:
            strip_whiteouts(img.root, opts.whiteout_spec)
            root = img.root
        else:
            apply_layer(root, img.root, opts.whiteout_spec)
        last = img

    assert root is not None and first is not None and last is not None
    blobs, _ = renumber_blobs(root, table, keep=0)
    spec = ImageSpec(root=root, chunk_size=first.chunk_size, compressor=last.compressor, digester=last.digester,
                     blobs=blobs, explicit_uidgid=first.explicit_uidgid,
                     prefetch=opts.prefetch_patterns if opts.prefetch_policy == "fs" else [])
    bootstrap = write_bootstrap_image(spec, first.fs_version)
    with Outputs() as outputs:
        target = opts.bootstrap or os.path.join(opts.blob_dir, sha256_hex(bootstrap))  # type: ignore[arg-type]
        out = outputs.new(os.path.dirname(os.path.abspath(target)), target)
        out.file.write(bootstrap)
        path = out.commit()
    return BuildResult(bootstrap_path=path, blob_path=None, blob_id=None, blobs=[b.blob_id for b in blobs],
                       blob_size=0, fs_version=first.fs_version, compressor=last.compressor,
                       trace={"total_build": time.monotonic() - t0})

