"""Lay a tree out as a RAFS v6 (EROFS-compatible) bootstrap (rafs-format.md §2, recipe §7.2).

Strategy
--------
The layout is planned before anything is encoded, because dirents need the
nids of their children and nids depend on where every inode lands:

1. *Measure* every inode (hardlinks once): extended inode (64 bytes), inline
   xattrs, and then either chunk indexes (regular files), an inline tail
   (directories and symlinks whose last partial block fits beside the inode:
   ``FLAT_INLINE``) or nothing (``FLAT_PLAIN``: all data in whole blocks).
   Directory sizes follow from names alone (``.``/``..`` included, sorted by
   raw bytes, no entry crossing a block).
2. *Place* inodes in index order on 32-byte slots, after one reserved all-zero
   block so the root gets nid 128 (never 0).  An inode plus its xattrs and
   inline tail never crosses a block boundary (the kernel refuses inline data
   that does); chunk index arrays may, as EROFS allows.
3. *Place* whole directory/symlink blocks after the last inode, then the
   chunk table (one record per distinct digest and blob), each 4 KiB aligned.
4. *Encode* with the format classes and assemble the file; the device slots'
   ``mapped_blkaddr`` need the final size, so they are computed last.

Everything the kernel reads is standard EROFS: with each data blob exposed as
an extra device in its uncompressed, 4 KiB-aligned layout the image mounts with
the in-kernel erofs driver and passes ``fsck.erofs``.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass

from ..errors import BuildError
from ..format import flags_from_algorithms
from ..format.types import SuperFlags
from ..format.v5 import RafsV5ChunkInfo
from ..format.v6 import (EROFS_DEVTABLE_OFFSET, EROFS_SUPER_OFFSET, EROFS_INODE_CHUNK_BASED, EROFS_INODE_FLAT_INLINE,
                         EROFS_INODE_FLAT_PLAIN, RafsV6Blob, RafsV6Device, RafsV6DirentBlock,
                         RafsV6InodeChunkAddr, RafsV6InodeExtended, RafsV6PrefetchTable, RafsV6SuperBlock,
                         RafsV6SuperBlockExt, RafsV6Xattrs, chunk_format)
from ._layout import ImageSpec
from ._tree import Inode, Node

__all__ = ["build_v6_bootstrap", "BLOCK_SIZE", "v6_dir_entries"]

BLOCK_SIZE = 4096
_INODE_SIZE = 64
_SLOT = 32
#: Device ``mapped_blkaddr`` alignment (512 KiB, rafs-format.md §2.4).
_SEG_ALIGN = 0x8_0000
_MAX_BLOBS = 254


def _align(value: int, to: int) -> int:
    return (value + to - 1) // to * to


@dataclass(slots=True)
class _Plan:
    """Where one inode goes and what it carries."""

    inode: Inode
    node: Node
    parent: Node
    index: int                       # builder index, stored as i_ino
    xattrs: bytes
    layout: int
    size: int                        # i_size
    inline_size: int                 # inode + xattrs + (chunk indexes | inline tail)
    data_blocks: int = 0             # whole blocks stored outside the inode
    data: bytes = b""                # directory blocks / symlink target, unpadded
    pos: int = 0                     # absolute file offset of the inode
    blkaddr: int = 0                 # first whole data block
    nid: int = 0                     # (pos - meta start) / 32
    icount: int = 0                  # i_xattr_icount
    dirents: list[tuple[bytes, Node]] | None = None   # directories: v6_dir_entries()


def v6_dir_entries(node: Node, parent: Node) -> list[tuple[bytes, Node]]:
    """A directory's dirents including ``.`` and ``..``, in raw byte order."""
    entries = [(b".", node), (b"..", parent)]
    entries += [(child.name, child) for child in node.sorted_children()]
    entries.sort(key=lambda e: e[0])
    return entries


def _dir_blocks(entries: list[tuple[bytes, int, int]]) -> list[RafsV6DirentBlock]:
    return RafsV6DirentBlock.pack(entries, BLOCK_SIZE)


def _file_type(mode: int) -> int:
    return RafsV6DirentBlock.file_type(mode)


def build_v6_bootstrap(spec: ImageSpec) -> bytes:
    """Encode ``spec`` as a v6 bootstrap; every struct is written by its format class."""
    nblobs = len(spec.blobs)
    if nblobs > _MAX_BLOBS:
        raise BuildError(f"a RAFS v6 image references at most {_MAX_BLOBS} blobs, this one needs {nblobs}")
    cs = spec.chunk_size
    order = spec.index_order()

    # -- 1. measure -------------------------------------------------------------
    plans: list[_Plan] = []
    plan_of: dict[int, _Plan] = {}          # id(Inode) -> plan
    links: dict[int, int] = {}
    for idx, e in enumerate(order, 1):
        key = id(e.node.inode)
        links[key] = links.get(key, 0) + 1
        if key in plan_of:
            continue
        inode = e.node.inode
        parent = e.parent if e.parent is not None else e.node
        icount = 0
        if inode.xattrs:
            table = RafsV6Xattrs(sorted(inode.xattrs.items()))
            xattrs, icount = table.to_bytes(), table.icount
        else:
            xattrs = b""
        head = _INODE_SIZE + len(xattrs)
        if e.node.children is not None:
            dirents = v6_dir_entries(e.node, parent)
            blocks = _dir_blocks([(name, 0, 0) for name, _ in dirents])
            size = (len(blocks) - 1) * BLOCK_SIZE + blocks[-1].size
            plan = _flat_plan(inode, e.node, parent, idx, xattrs, size, head)
            plan.dirents = dirents
        elif inode.is_symlink:
            target = inode.symlink or b""
            plan = _flat_plan(inode, e.node, parent, idx, xattrs, len(target), head)
            plan.data = target
        elif inode.is_reg:
            expected = (inode.size + cs - 1) // cs
            if len(inode.chunks) != expected:
                raise BuildError(f"internal: {e.path!r} has {len(inode.chunks)} chunks, expected {expected}")
            plan = _Plan(inode, e.node, parent, idx, xattrs, EROFS_INODE_CHUNK_BASED, inode.size,
                         _align(head, 8) + 8 * expected)
        else:
            plan = _Plan(inode, e.node, parent, idx, xattrs, EROFS_INODE_FLAT_PLAIN, 0, head)
        plan.icount = icount
        plans.append(plan)
        plan_of[key] = plan

    # -- header geometry ---------------------------------------------------------
    blob_table_off = _align(EROFS_DEVTABLE_OFFSET + 128 * nblobs, BLOCK_SIZE)
    prefetch_nodes = [n for n in (spec.root.lookup(p) for p in spec.prefetch) if n is not None]
    prefetch_size = 4 * len(prefetch_nodes) if nblobs else 0
    if nblobs:
        meta_start = _align(blob_table_off + 256 * nblobs + prefetch_size, BLOCK_SIZE)
    else:
        meta_start = 0  # block 0 (the superblock) doubles as the reserved block
    meta_blkaddr = meta_start // BLOCK_SIZE

    # -- 2. place inodes ---------------------------------------------------------
    pos = meta_start + BLOCK_SIZE
    for plan in plans:
        keep_together = plan.inline_size if plan.layout != EROFS_INODE_CHUNK_BASED else \
            _INODE_SIZE + len(plan.xattrs)
        if pos % BLOCK_SIZE and pos % BLOCK_SIZE + min(keep_together, BLOCK_SIZE) > BLOCK_SIZE:
            pos = _align(pos, BLOCK_SIZE)
        plan.pos = pos
        plan.nid = (pos - meta_start) // _SLOT
        pos = _align(pos + plan.inline_size, _SLOT)

    # -- 3. whole data blocks, then the chunk table ------------------------------
    pos = _align(pos, BLOCK_SIZE)
    for plan in plans:
        if plan.data_blocks:
            plan.blkaddr = pos // BLOCK_SIZE
            pos += plan.data_blocks * BLOCK_SIZE
    chunk_table_off = _align(pos, BLOCK_SIZE)
    records: dict[tuple[bytes, int], RafsV5ChunkInfo] = {}
    for plan in plans:
        for c in plan.inode.chunks:
            key = (c.digest, c.blob_index)
            if key not in records:
                records[key] = RafsV5ChunkInfo.from_chunk_info(c)
    chunk_table = b"".join(records[k].to_bytes() for k in sorted(records, key=lambda k: (k[0], k[1] + 1,
                                                                                         records[k].index)))
    total = _align(chunk_table_off + len(chunk_table), BLOCK_SIZE)

    def nid_of(node: Node) -> int:
        return plan_of[id(node.inode)].nid

    root_nid = nid_of(spec.root)
    if root_nid != 128:
        raise BuildError(f"internal: root nid is {root_nid}, expected 128")

    # -- 4. encode ---------------------------------------------------------------
    buf = bytearray(total)
    has_xattr = False
    chunk_fmt = chunk_format(cs)
    explicit = spec.explicit_uidgid
    # One record re-filled for every inode: the same fields are set each time
    # (the rest keep their defaults); one keyword construction per inode was
    # about a fifth of the layout time.
    ino = RafsV6InodeExtended()
    for plan in plans:
        inode = plan.inode
        has_xattr = has_xattr or bool(plan.xattrs)
        tail = b""
        if plan.dirents is not None:
            entries = [(name, plan_of[id(target.inode)].nid, _file_type(target.inode.mode))
                       for name, target in plan.dirents]
            blocks = _dir_blocks(entries)
            full = [b.to_bytes(pad_to=BLOCK_SIZE) for b in blocks[:plan.data_blocks]]
            if plan.layout == EROFS_INODE_FLAT_INLINE:
                tail = blocks[-1].to_bytes()
            elif len(blocks) > plan.data_blocks:
                raise BuildError("internal: directory blocks do not match the plan")
            _put(buf, plan.blkaddr * BLOCK_SIZE, b"".join(full))
        elif inode.is_symlink:
            whole = plan.data_blocks * BLOCK_SIZE
            _put(buf, plan.blkaddr * BLOCK_SIZE, plan.data[:whole])
            if plan.layout == EROFS_INODE_FLAT_INLINE:
                tail = plan.data[whole:]
        i_u = 0
        if plan.layout == EROFS_INODE_CHUNK_BASED:
            i_u = chunk_fmt
        elif plan.data_blocks:
            i_u = plan.blkaddr
        elif stat.S_ISCHR(inode.mode) or stat.S_ISBLK(inode.mode):
            i_u = inode.rdev
        if plan.dirents is not None:
            # "." plus the parent's entry, plus each subdirectory's "..".
            nlink = sum(1 for _, c in plan.dirents if c.children is not None)
        elif inode.is_reg:
            nlink = links[id(inode)]
        else:
            nlink = 1
        ino.i_format = 1 | (plan.layout << 1)
        ino.i_xattr_icount = plan.icount
        ino.i_mode = inode.mode
        ino.i_size = plan.size
        ino.i_u = i_u
        ino.i_ino = plan.index
        ino.i_uid = inode.uid if explicit else 0
        ino.i_gid = inode.gid if explicit else 0
        ino.i_mtime = inode.mtime
        ino.i_mtime_nsec = inode.mtime_nsec
        ino.i_nlink = nlink
        body = ino.to_bytes() + plan.xattrs
        if plan.layout == EROFS_INODE_CHUNK_BASED:
            body += b"\0" * (_align(len(body), 8) - len(body))
            body += b"".join(_chunk_addr(c, BLOCK_SIZE).to_bytes() for c in inode.chunks)
        else:
            body += tail
        if len(body) != plan.inline_size:
            raise BuildError("internal: inode encoding does not match the plan")
        _put(buf, plan.pos, body)
    _put(buf, chunk_table_off, chunk_table)

    # -- header ------------------------------------------------------------------
    devices = []
    mapped = _align(total, _SEG_ALIGN) // BLOCK_SIZE
    for b in spec.blobs:
        blocks = b.uncompressed_size // BLOCK_SIZE
        if b.uncompressed_size % BLOCK_SIZE or blocks == 0 or blocks >= 1 << 32:
            raise BuildError(f"blob {b.blob_id}: uncompressed size {b.uncompressed_size} is not a non-zero "
                             "multiple of 4096 below 16 TiB")
        if len(b.blob_id.encode()) > 64:
            raise BuildError(f"blob id {b.blob_id!r} is longer than the 64 bytes RAFS v6 stores")
        devices.append(RafsV6Device(blob_id=b.blob_id.encode().ljust(64, b"\0"), blocks=blocks,
                                    mapped_blkaddr=mapped))
        mapped = _align(mapped + blocks, _SEG_ALIGN // BLOCK_SIZE)
    flags = int(flags_from_algorithms(spec.compressor, spec.digester)) | SuperFlags.ENCRYPTION_NONE
    if spec.explicit_uidgid:
        flags |= SuperFlags.EXPLICIT_UID_GID
    if has_xattr:
        flags |= SuperFlags.HAS_XATTR
    prefetch_off = blob_table_off + 256 * nblobs
    sb = RafsV6SuperBlock(
        s_root_nid=root_nid,
        s_inos=len(order),
        s_blocks=sum(b.uncompressed_size // BLOCK_SIZE for b in spec.blobs),
        s_meta_blkaddr=meta_blkaddr,
        s_extra_devices=nblobs,
    )
    ext = RafsV6SuperBlockExt(
        s_flags=flags,
        s_blob_table_offset=blob_table_off,
        s_blob_table_size=256 * nblobs,
        s_chunk_size=cs,
        s_chunk_table_offset=chunk_table_off if chunk_table else 0,
        s_chunk_table_size=len(chunk_table),
        s_prefetch_table_offset=prefetch_off if prefetch_size else 0,
        s_prefetch_table_size=prefetch_size,
    )
    _put(buf, EROFS_SUPER_OFFSET, sb.to_bytes())
    _put(buf, RafsV6SuperBlockExt.OFFSET, ext.to_bytes())
    _put(buf, EROFS_DEVTABLE_OFFSET, b"".join(d.to_bytes() for d in devices))
    blob_entries = []
    for i, b in enumerate(spec.blobs):
        entry = RafsV6Blob.from_blob_info(b)
        entry.blob_index = i
        entry.chunk_size = cs
        blob_entries.append(entry.to_bytes())
    _put(buf, blob_table_off, b"".join(blob_entries))
    if prefetch_size:
        _put(buf, prefetch_off, RafsV6PrefetchTable(nid_of(n) for n in prefetch_nodes).to_bytes())
    return bytes(buf)


def _flat_plan(inode: Inode, node: Node, parent: Node, idx: int, xattrs: bytes, size: int, head: int) -> _Plan:
    tail = size % BLOCK_SIZE
    if tail and head + tail <= BLOCK_SIZE:
        return _Plan(inode, node, parent, idx, xattrs, EROFS_INODE_FLAT_INLINE, size, head + tail,
                     data_blocks=size // BLOCK_SIZE)
    return _Plan(inode, node, parent, idx, xattrs, EROFS_INODE_FLAT_PLAIN, size, head,
                 data_blocks=(size + BLOCK_SIZE - 1) // BLOCK_SIZE)


def _chunk_addr(chunk, block_size: int) -> RafsV6InodeChunkAddr:
    if chunk.uncompressed_offset % block_size:
        raise BuildError(f"internal: chunk {chunk.index} of blob {chunk.blob_index} is not 4 KiB aligned "
                         f"(uncompressed offset {chunk.uncompressed_offset:#x})")
    return RafsV6InodeChunkAddr.new(chunk.blob_index, chunk.index, chunk.uncompressed_offset // block_size)


def _put(buf: bytearray, offset: int, data: bytes) -> None:
    if data:
        buf[offset:offset + len(data)] = data
