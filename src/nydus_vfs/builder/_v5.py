"""Lay a tree out as a RAFS v5 bootstrap (rafs-format.md §1, recipe §7.3).

Layout written::

    0      superblock (8192)
    8192   inode table (u32 per index, padded to 8)
           prefetch table (u32 inode numbers, padded to 8; may be empty)
           blob table (padded to 8)
           extended blob table (64 bytes per blob)
           inode records, contiguous from the root in index order

Records are contiguous and in index order so cached mode (which reads them
sequentially from ``table[0]``) works.  Every name gets its own record; the
records of one hardlinked file share ``i_ino`` (the index of its first name)
and ``i_nlink``.  Inode digests are computed bottom-up (rafs-format.md §0.2).
"""

from __future__ import annotations

from ..errors import BuildError
from ..format import flags_from_algorithms
from ..format.types import SuperFlags
from ..format.v5 import (RAFSV5_SUPERBLOCK_SIZE, InodeFlags, RafsV5BlobEntry, RafsV5BlobTable,
                         RafsV5ChunkInfo, RafsV5ExtBlobEntry, RafsV5ExtBlobTable, RafsV5Inode,
                         RafsV5InodeRecord, RafsV5InodeTable, RafsV5PrefetchTable, RafsV5SuperBlock,
                         RafsV5Xattrs)
from ..utils import digest_bytes as _digest
from ..utils import new_hasher
from ._layout import ImageSpec
from ._tree import Indexed

__all__ = ["build_v5_bootstrap", "v5_dir_size"]


def _align8(n: int) -> int:
    return (n + 7) & ~7


def _align4k(n: int) -> int:
    return (n + 4095) & ~4095


def v5_dir_size(child_names: list[bytes]) -> int:
    """The made-up v5 directory ``i_size``: ``align4k(Σ(len(name) + 8))``, 4096 if empty."""
    total = sum(len(n) + 8 for n in child_names)
    return _align4k(total) if total else 4096


def _xattr_bytes(xattrs: dict[bytes, bytes]) -> int:
    return sum(4 + len(k) + 1 + len(v) for k, v in xattrs.items())


def _digests(order: list[Indexed], digester: int) -> dict[int, bytes]:
    """``i_digest`` per node id, computed children first (rafs-format.md §0.2)."""
    out: dict[int, bytes] = {}
    empty = _digest(digester, b"")
    for entry in reversed(order):
        node = entry.node
        inode = node.inode
        if node.children is not None:
            h = new_hasher(digester)
            for child in node.sorted_children():
                h.update(out[id(child)])
            out[id(node)] = h.digest()
        elif inode.is_reg:
            h = new_hasher(digester)
            for c in inode.chunks:
                h.update(c.digest)
            out[id(node)] = h.digest()
        elif inode.is_symlink:
            out[id(node)] = _digest(digester, inode.symlink or b"")
        else:
            out[id(node)] = empty
    return out


def build_v5_bootstrap(spec: ImageSpec) -> bytes:
    """Encode ``spec`` as a v5 bootstrap; every struct is written by its format class."""
    order = spec.index_order()
    count = len(order)
    if count >= 1 << 32:
        raise BuildError(f"too many entries for RAFS v5: {count}")
    digests = _digests(order, int(spec.digester))

    # First index of every inode (hardlinks repeat it) and the link counts.
    first_index: dict[int, int] = {}
    links: dict[int, int] = {}
    for idx, e in enumerate(order, 1):
        key = id(e.node.inode)
        first_index.setdefault(key, idx)
        links[key] = links.get(key, 0) + 1
    index_of_node = {id(e.node): idx for idx, e in enumerate(order, 1)}

    has_xattr = False
    records: list[RafsV5InodeRecord] = []
    for idx, e in enumerate(order, 1):
        node, inode = e.node, e.node.inode
        ino = first_index[id(inode)]
        flags = 0
        xattrs = None
        if inode.xattrs:
            xattrs = RafsV5Xattrs(sorted(inode.xattrs.items()))
            flags |= InodeFlags.XATTR
            has_xattr = True
        symlink = b""
        chunks: list[RafsV5ChunkInfo] = []
        if node.children is not None:
            kids = node.sorted_children()
            size = v5_dir_size([k.name for k in kids])
            nlink = 2 + sum(1 for k in kids if k.children is not None)
            child_index, child_count = e.child_index, len(kids)
        else:
            child_index = 0
            nlink = links[id(inode)] if inode.is_reg else 1
            if inode.is_reg:
                size = inode.size
                chunks = [RafsV5ChunkInfo.from_chunk_info(c) for c in inode.chunks]
                child_count = len(chunks)
            elif inode.is_symlink:
                symlink = inode.symlink or b""
                size = len(symlink)
                flags |= InodeFlags.SYMLINK
                child_count = 0
            else:
                size = 0
                child_count = 0
        name = b"/" if e.parent is None else node.name
        raw = RafsV5Inode(
            i_digest=digests[id(node)],
            i_parent=0 if e.parent is None else index_of_node[id(e.parent)],
            i_ino=ino,
            i_uid=inode.uid if spec.explicit_uidgid else 0,
            i_gid=inode.gid if spec.explicit_uidgid else 0,
            i_mode=inode.mode,
            i_size=size,
            i_blocks=(size + _align8(_xattr_bytes(inode.xattrs)) + 511) // 512,
            i_flags=flags,
            i_nlink=nlink,
            i_child_index=child_index,
            i_child_count=child_count,
            i_name_size=len(name),
            i_symlink_size=len(symlink),
            i_rdev=inode.rdev,
            i_mtime_nsec=inode.mtime_nsec,
            i_mtime=inode.mtime,
        )
        records.append(RafsV5InodeRecord(raw, name, symlink, xattrs, chunks))

    prefetch: list[int] = []
    for parts in spec.prefetch:
        target = spec.root.lookup(parts)
        if target is not None:
            prefetch.append(first_index[id(target.inode)])

    blob_table = RafsV5BlobTable(RafsV5BlobEntry(b.blob_id, b.readahead_offset, b.readahead_size)
                                 for b in spec.blobs)
    ext_table = RafsV5ExtBlobTable(RafsV5ExtBlobEntry(chunk_count=b.chunk_count, features=b.features,
                                                      uncompressed_size=b.uncompressed_size,
                                                      compressed_size=b.compressed_size)
                                   for b in spec.blobs)

    it_off = RAFSV5_SUPERBLOCK_SIZE
    it_size = _align8(4 * count)
    pt_off = it_off + it_size
    pt_bytes = RafsV5PrefetchTable(prefetch).to_bytes() if prefetch else b""
    bt_off = pt_off + len(pt_bytes)
    bt_bytes = blob_table.to_bytes()
    et_off = bt_off + len(bt_bytes)
    et_bytes = ext_table.to_bytes()
    rec_off = et_off + len(et_bytes)

    table = []
    pos = rec_off
    encoded = []
    for rec in records:
        if pos >> 3 >= 1 << 29:
            raise BuildError("RAFS v5 bootstrap would exceed the 4 GiB inode-table addressing limit")
        table.append(pos >> 3)
        raw = rec.to_bytes()
        encoded.append(raw)
        pos += len(raw)

    sflags = _super_flags(spec, has_xattr)
    sb = RafsV5SuperBlock(
        s_block_size=spec.chunk_size,
        s_flags=sflags,
        s_inodes_count=len(first_index),
        s_inode_table_offset=it_off,
        s_prefetch_table_offset=pt_off,
        s_blob_table_offset=bt_off,
        s_inode_table_entries=count,
        s_prefetch_table_entries=len(prefetch),
        s_blob_table_size=len(bt_bytes),
        s_extended_blob_table_entries=len(spec.blobs),
        s_extended_blob_table_offset=et_off if spec.blobs else 0,
    )
    out = b"".join([sb.to_bytes(), RafsV5InodeTable(table).to_bytes(), pt_bytes, bt_bytes, et_bytes, *encoded])
    assert len(out) % 8 == 0
    return out


def _super_flags(spec: ImageSpec, has_xattr: bool) -> int:
    flags = int(flags_from_algorithms(spec.compressor, spec.digester))
    if spec.explicit_uidgid:
        flags |= SuperFlags.EXPLICIT_UID_GID
    if has_xattr:
        flags |= SuperFlags.HAS_XATTR
    return flags
