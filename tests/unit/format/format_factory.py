"""Synthetic RAFS images for the format tests, built with the format layer's ``to_bytes`` side.

Imported as ``tests.unit.format.format_factory``.  These are small, test-only
builders (the real one is ``nydus_vfs.builder``): they exist to reach corners
the upstream vectors do not have (xattrs, compact inodes, multi-block
directories, FLAT_PLAIN symlinks, device nodes, hole chunks, tarfs, inlined
meta, big trees for timing).

A tree is described with :class:`Node`; regular files carry their chunks as
``ChunkInfo`` (``file_offset`` is recomputed per file), hardlinks reuse the
same ``Node`` object under several names.
"""

from __future__ import annotations

import hashlib
import stat
from dataclasses import dataclass, field

import zstandard

from nydus_vfs.errors import FormatError
from nydus_vfs.format import (
    BlobFeatures,
    BlobInfo,
    Bootstrap,
    ChunkInfo,
    Compressor,
    Digester,
    InodeFlags,
    RafsV5BlobEntry,
    RafsV5BlobTable,
    RafsV5ChunkInfo,
    RafsV5ExtBlobEntry,
    RafsV5ExtBlobTable,
    RafsV5Inode,
    RafsV5InodeRecord,
    RafsV5InodeTable,
    RafsV5PrefetchTable,
    RafsV5SuperBlock,
    RafsV5Xattrs,
    RafsV6Blob,
    RafsV6Device,
    RafsV6DirentBlock,
    RafsV6InodeChunkAddr,
    RafsV6InodeCompact,
    RafsV6InodeExtended,
    RafsV6PrefetchTable,
    RafsV6SuperBlock,
    RafsV6SuperBlockExt,
    RafsV6Xattrs,
    SuperFlags,
    TarHeader,
    TocEntry,
    TocEntryList,
    chunk_format,
)
from nydus_vfs.format.blob import TOC_FLAG_NONE, TOC_FLAG_ZSTD
from nydus_vfs.format.v6 import (
    EROFS_INODE_CHUNK_BASED,
    EROFS_INODE_FLAT_INLINE,
    EROFS_INODE_FLAT_PLAIN,
    EROFS_NULL_ADDR,
)

BLOB_A = "a" * 64
BLOB_B = "b" * 64


@dataclass(eq=False)
class Node:
    """One inode; ``children`` maps names to nodes for directories."""

    mode: int
    children: dict[bytes, "Node"] = field(default_factory=dict)
    size: int = 0
    chunks: list[ChunkInfo] = field(default_factory=list)
    symlink: bytes = b""
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    rdev: int = 0
    uid: int = 0
    gid: int = 0
    mtime: int = 1_700_000_000
    holes: bool = False


def d(children: dict[bytes, Node] | None = None, **kw) -> Node:
    return Node(stat.S_IFDIR | 0o755, dict(children or {}), **kw)


def f(size: int = 0, chunks: list[ChunkInfo] | None = None, **kw) -> Node:
    return Node(stat.S_IFREG | 0o644, size=size, chunks=list(chunks or []), **kw)


def link(target: bytes, **kw) -> Node:
    return Node(stat.S_IFLNK | 0o777, symlink=target, size=len(target), **kw)


def dev(kind: int, rdev: int) -> Node:
    return Node(kind | 0o600, rdev=rdev)


def chunk(blob: int, index: int, usize: int, uoff: int | None = None, *, digest: bytes | None = None) -> ChunkInfo:
    """A chunk record; offsets default to ``index * 1 MiB`` (uncompressed == compressed)."""
    off = index * 0x100000 if uoff is None else uoff
    return ChunkInfo(digest=digest or hashlib.sha256(b"%d/%d" % (blob, index)).digest(), blob_index=blob,
                     index=index, flags=0, compressed_offset=off, compressed_size=usize,
                     uncompressed_offset=off, uncompressed_size=usize, file_offset=0)


def file_of(size: int, blob: int = 0, first_index: int = 0, chunk_size: int = 0x100000, **kw) -> Node:
    """A regular file of ``size`` bytes whose chunks are consecutive in ``blob``."""
    chunks = []
    for k in range(-(-size // chunk_size)):
        usize = min(chunk_size, size - k * chunk_size)
        chunks.append(chunk(blob, first_index + k, usize))
    return f(size, chunks, **kw)


def sample_tree() -> Node:
    """Every kind of inode, xattrs, a hardlink pair and a 3-chunk file."""
    shared = f(10, [chunk(0, 0, 10)], xattrs={b"user.shared": b"1"})
    return d({
        b"a.txt": f(10, [chunk(0, 1, 10)], xattrs={b"user.foo": b"bar", b"security.selinux": b"ctx\0"}),
        b"big": file_of(0x280000, blob=1, first_index=3),
        b"empty": f(0),
        b"dir": d({
            b"inner": f(5, [chunk(0, 2, 5)]),
            b"hl1": shared,
            b"sub": d({}),
        }),
        b"hl2": shared,
        b"sym": link(b"dir/inner"),
        b"chr": dev(stat.S_IFCHR, (1 << 8) | 3),
        b"blk": dev(stat.S_IFBLK, (8 << 8) | 1),
        b"fifo": dev(stat.S_IFIFO, 0),
        b"sock": dev(stat.S_IFSOCK, 0),
        b"-dash": f(0),
    }, xattrs={b"trusted.overlay.opaque": b"y"})


def default_blobs(n: int = 2, chunk_size: int = 0x100000, features: int = 0) -> list[BlobInfo]:
    return [BlobInfo(index=i, blob_id=(BLOB_A, BLOB_B, "c" * 64)[i], chunk_count=16, chunk_size=chunk_size,
                     compressor=Compressor.NONE, digester=Digester.SHA256, features=features,
                     compressed_size=16 * chunk_size, uncompressed_size=16 * chunk_size, ci_uncompressed_size=16 * 16)
            for i in range(n)]


# --------------------------------------------------------------------------- v5


def build_v5(root: Node, *, chunk_size: int = 0x100000, flags: int | None = None,
             blobs: list[BlobInfo] | None = None, ext_table: bool = True, prefetch: list[int] = ()) -> bytes:
    """A v5 bootstrap laid out like the current builder (rafs-format.md §1.1, §1.3 index order)."""
    blobs = default_blobs() if blobs is None else blobs
    if flags is None:
        flags = SuperFlags.COMPRESSION_NONE | SuperFlags.HASH_SHA256 | SuperFlags.EXPLICIT_UID_GID
    # Index assignment: root 1, then each directory's sorted children as one group, DFS.
    slots: list[tuple[Node, bytes, int]] = [(root, b"/", 0)]  # (node, name, parent index)
    child_index: dict[int, tuple[int, int]] = {}
    first_index: dict[int, int] = {}

    def assign(idx: int) -> None:
        node = slots[idx - 1][0]
        names = sorted(node.children)
        start = len(slots) + 1
        child_index[idx] = (start, len(names))
        for name in names:
            slots.append((node.children[name], name, idx))
        for k, name in enumerate(names):
            if stat.S_ISDIR(node.children[name].mode):
                assign(start + k)

    assign(1)
    links: dict[int, int] = {}
    for idx, (node, _, _) in enumerate(slots, 1):
        first_index.setdefault(id(node), idx)
        links[id(node)] = links.get(id(node), 0) + 1
    has_xattr = False
    records = []
    for idx, (node, name, parent) in enumerate(slots, 1):
        ino = first_index[id(node)]
        xattrs = RafsV5Xattrs(sorted(node.xattrs.items())) if node.xattrs else None
        has_xattr |= xattrs is not None
        nflags = (InodeFlags.SYMLINK if stat.S_ISLNK(node.mode) else 0) | (InodeFlags.XATTR if xattrs else 0) \
            | (InodeFlags.HAS_HOLE if node.holes else 0)
        chunks = []
        cidx, ccount = child_index.get(idx, (0, 0))
        if stat.S_ISREG(node.mode):
            chunks = [RafsV5ChunkInfo.from_chunk_info(c) for c in node.chunks]
            for k, c in enumerate(chunks):
                if not node.holes:
                    c.file_offset = k * chunk_size
            cidx, ccount = 0, len(chunks)
        nlink = links[id(node)] if stat.S_ISREG(node.mode) else 1
        if stat.S_ISDIR(node.mode):
            nlink = 2 + sum(1 for c in node.children.values() if stat.S_ISDIR(c.mode))
        size = 4096 if stat.S_ISDIR(node.mode) else node.size
        inode = RafsV5Inode(i_parent=parent, i_ino=ino, i_uid=node.uid, i_gid=node.gid, i_mode=node.mode,
                            i_size=size, i_blocks=(size + 511) // 512, i_flags=int(nflags), i_nlink=nlink,
                            i_child_index=cidx, i_child_count=ccount, i_name_size=len(name),
                            i_symlink_size=len(node.symlink), i_rdev=node.rdev,
                            i_mtime=0 if idx == 1 else node.mtime)
        records.append(RafsV5InodeRecord(inode, name, node.symlink, xattrs, chunks))
    n = len(slots)
    table_off = 8192
    table_size = (4 * n + 7) & ~7
    prefetch_off = table_off + table_size
    prefetch_bytes = RafsV5PrefetchTable(prefetch).to_bytes()
    blob_off = prefetch_off + len(prefetch_bytes)
    blob_bytes = RafsV5BlobTable(RafsV5BlobEntry(b.blob_id) for b in blobs).to_bytes()
    ext_off = blob_off + len(blob_bytes)
    ext_bytes = RafsV5ExtBlobTable(
        RafsV5ExtBlobEntry(chunk_count=b.chunk_count, features=b.features, uncompressed_size=b.uncompressed_size,
                           compressed_size=b.compressed_size) for b in blobs).to_bytes() if ext_table else b""
    pos = ext_off + len(ext_bytes)
    table = []
    encoded = []
    for rec in records:
        table.append(pos >> 3)
        raw = rec.to_bytes()
        encoded.append(raw)
        pos += len(raw)
    if has_xattr:
        flags |= SuperFlags.HAS_XATTR
    sb = RafsV5SuperBlock(s_block_size=chunk_size, s_flags=int(flags),
                          s_inodes_count=len(first_index), s_prefetch_table_offset=prefetch_off,
                          s_blob_table_offset=blob_off, s_inode_table_entries=n,
                          s_prefetch_table_entries=len(prefetch), s_blob_table_size=len(blob_bytes),
                          s_extended_blob_table_entries=len(blobs) if ext_table else 0,
                          s_extended_blob_table_offset=ext_off if ext_table else 0)
    return b"".join([sb.to_bytes(), RafsV5InodeTable(table).to_bytes(), prefetch_bytes, blob_bytes, ext_bytes,
                     *encoded])


# --------------------------------------------------------------------------- v6


def build_v6(root: Node, *, chunk_size: int = 0x100000, flags: int | None = None,
             blobs: list[BlobInfo] | None = None, compact: bool = False, inline: bool = True,
             blkszbits: int = 12, prefetch_paths: list[bytes] = (), hole_paths: tuple[bytes, ...] = ()) -> bytes:
    """A v6 bootstrap (rafs-format.md §2.1 layout).  ``hole_paths`` files get null block addresses."""
    bs = 1 << blkszbits
    tarfs = blkszbits == 9
    if flags is None:
        flags = SuperFlags.COMPRESSION_ZSTD | SuperFlags.HASH_BLAKE3 | SuperFlags.EXPLICIT_UID_GID
        if tarfs:
            flags |= SuperFlags.TARTFS_MODE
    features = (BlobFeatures.CAP_TAR_TOC if tarfs else BlobFeatures.ALIGNED | BlobFeatures.CAP_TAR_TOC)
    blobs = default_blobs(features=int(features)) if blobs is None else blobs
    nodes: list[Node] = []
    seen: dict[int, int] = {}
    parent_of: dict[int, Node] = {}
    paths: dict[bytes, Node] = {}

    def collect(node: Node, parent: Node, path: bytes) -> None:
        paths[path] = node
        if id(node) in seen:
            return
        seen[id(node)] = len(nodes)
        nodes.append(node)
        parent_of[id(node)] = parent
        for name in sorted(node.children):
            collect(node.children[name], node, path.rstrip(b"/") + b"/" + name)

    collect(root, root, b"/")
    links: dict[int, int] = {}
    for q in paths.values():
        links[id(q)] = links.get(id(q), 0) + 1
    holes = {id(paths[p]) for p in hole_paths}
    isize = 32 if compact else 64
    has_xattr = False
    plan = {}
    for node in nodes:
        xattrs = RafsV6Xattrs(sorted(node.xattrs.items())).to_bytes() if node.xattrs else b""
        has_xattr |= bool(xattrs)
        if stat.S_ISDIR(node.mode):
            names = sorted([b".", b".."] + list(node.children))
            blocks = RafsV6DirentBlock.pack([(n, 0, 0) for n in names], bs)
            size = (len(blocks) - 1) * bs + blocks[-1].size
        elif stat.S_ISLNK(node.mode):
            size = len(node.symlink)
        else:
            size = node.size
        tail = size % bs if (stat.S_ISDIR(node.mode) or stat.S_ISLNK(node.mode)) else 0
        use_inline = inline and tail and isize + len(xattrs) + tail <= bs
        if stat.S_ISREG(node.mode):
            body = ((isize + len(xattrs) + 7) & ~7) + 8 * -(-size // chunk_size)
        else:
            body = isize + len(xattrs) + (tail if use_inline else 0)
        plan[id(node)] = dict(xattrs=xattrs, size=size, inline=bool(use_inline), body=body)
    # Metadata: one empty block, then inode slots (inline bodies never cross a block).
    meta_rel = bs if bs == 4096 else 4096
    nid_of: dict[int, int] = {}
    for node in nodes:
        p = plan[id(node)]
        if p["inline"] and meta_rel // bs != (meta_rel + p["body"] - 1) // bs:
            meta_rel = (meta_rel + bs - 1) & ~(bs - 1)
        nid_of[id(node)] = meta_rel // 32
        meta_rel = (meta_rel + p["body"] + 31) & ~31
    nblobs = len(blobs)
    blob_table_off = ((1408 + 128 * nblobs) + 4095) & ~4095
    prefetch_off = blob_table_off + 256 * nblobs
    prefetch_nids = [nid_of[id(paths[p])] for p in prefetch_paths]
    meta_off = (prefetch_off + 4 * len(prefetch_nids) + 4095) & ~4095
    data_pos = meta_off + ((meta_rel + bs - 1) & ~(bs - 1))
    out = bytearray(data_pos)
    extra = bytearray()

    def alloc(raw: bytes) -> int:
        nonlocal extra
        blk = (data_pos + len(extra)) // bs
        extra += raw + b"\0" * (-len(raw) % bs)
        return blk

    records: dict[tuple[bytes, int], ChunkInfo] = {}
    for node in nodes:
        p = plan[id(node)]
        nid = nid_of[id(node)]
        off = meta_off + nid * 32
        size, xattrs = p["size"], p["xattrs"]
        tail_bytes = b""
        if stat.S_ISDIR(node.mode):
            parent = parent_of[id(node)]
            entries = [(n, nid_of[id(c)], RafsV6DirentBlock.file_type(c.mode)) for n, c in node.children.items()]
            entries += [(b".", nid, 2), (b"..", nid_of[id(parent)], 2)]
            blocks = RafsV6DirentBlock.pack(sorted(entries), bs)
            raw = [b.to_bytes(pad_to=bs) for b in blocks[:-1]]
            last = blocks[-1].to_bytes()
            if p["inline"]:
                tail_bytes = last
            else:
                raw.append(last)
            i_u = alloc(b"".join(raw)) if raw else 0
            layout = EROFS_INODE_FLAT_INLINE if p["inline"] else EROFS_INODE_FLAT_PLAIN
        elif stat.S_ISLNK(node.mode):
            if p["inline"]:
                full = len(node.symlink) - len(node.symlink) % bs
                tail_bytes = node.symlink[full:]
                i_u = alloc(node.symlink[:full]) if full else 0
                layout = EROFS_INODE_FLAT_INLINE
            else:
                i_u = alloc(node.symlink)
                layout = EROFS_INODE_FLAT_PLAIN
        elif stat.S_ISREG(node.mode):
            i_u = chunk_format(chunk_size, blkszbits)
            layout = EROFS_INODE_CHUNK_BASED
        else:
            i_u, layout = node.rdev, EROFS_INODE_FLAT_PLAIN
        icount = RafsV6Xattrs(sorted(node.xattrs.items())).icount if node.xattrs else 0
        nlink = 2 + sum(1 for c in node.children.values() if stat.S_ISDIR(c.mode)) if stat.S_ISDIR(node.mode) \
            else links[id(node)]
        if compact:
            inode = RafsV6InodeCompact(i_format=layout << 1, i_xattr_icount=icount, i_mode=node.mode,
                                       i_nlink=nlink, i_size=size, i_u=i_u, i_ino=seen[id(node)] + 1,
                                       i_uid=node.uid, i_gid=node.gid)
        else:
            inode = RafsV6InodeExtended(i_format=1 | (layout << 1), i_xattr_icount=icount, i_mode=node.mode,
                                        i_size=size, i_u=i_u, i_ino=seen[id(node)] + 1, i_uid=node.uid,
                                        i_gid=node.gid, i_mtime=0 if node is root else node.mtime,
                                        i_nlink=nlink)
        body = inode.to_bytes() + xattrs
        if stat.S_ISREG(node.mode):
            body += b"\0" * (-len(body) % 8)
            for c in node.chunks:
                if id(node) in holes:
                    addr = RafsV6InodeChunkAddr.new(c.blob_index, c.index, 0)
                    addr.c_blk_addr = EROFS_NULL_ADDR
                else:
                    addr = RafsV6InodeChunkAddr.new(c.blob_index, c.index, c.uncompressed_offset // bs)
                    records.setdefault((c.digest, c.blob_index), c)
                body += addr.to_bytes()
        body += tail_bytes
        out[off:off + len(body)] = body
    out += extra
    out += b"\0" * (-len(out) % 4096)
    chunk_table_off = len(out)
    table = b"".join(RafsV5ChunkInfo.from_chunk_info(records[k]).to_bytes() for k in sorted(records))
    out += table + b"\0" * (-len(table) % 4096)
    if len(out) < 8192:
        out += b"\0" * (8192 - len(out))
    if has_xattr:
        flags |= SuperFlags.HAS_XATTR
    sb = RafsV6SuperBlock(s_blkszbits=blkszbits, s_root_nid=nid_of[id(root)], s_inos=len(paths),
                          s_blocks=sum(b.uncompressed_size // bs for b in blobs), s_meta_blkaddr=meta_off // bs,
                          s_extra_devices=nblobs)
    ext = RafsV6SuperBlockExt(s_flags=int(flags), s_blob_table_offset=blob_table_off,
                              s_blob_table_size=256 * nblobs, s_chunk_size=chunk_size,
                              s_chunk_table_offset=chunk_table_off if table else 0, s_chunk_table_size=len(table),
                              s_prefetch_table_offset=prefetch_off if prefetch_nids else 0,
                              s_prefetch_table_size=4 * len(prefetch_nids))
    out[1024:1152] = sb.to_bytes()
    out[1152:1408] = ext.to_bytes()
    for i, b in enumerate(blobs):
        slot = RafsV6Device(blob_id=b.blob_id.encode().ljust(64, b"\0"), blocks=max(b.uncompressed_size // bs, 1))
        out[1408 + 128 * i:1536 + 128 * i] = slot.to_bytes()
        out[blob_table_off + 256 * i:blob_table_off + 256 * (i + 1)] = RafsV6Blob.from_blob_info(b).to_bytes()
    if prefetch_nids:
        raw = RafsV6PrefetchTable(prefetch_nids).to_bytes()
        out[prefetch_off:prefetch_off + len(raw)] = raw
    return bytes(out)


# --------------------------------------------------------------------------- blobs with inlined meta


def inline_blob(bootstrap: bytes, *, toc: bool = True, data: bytes = b"chunk-data" * 10) -> bytes:
    """``data | hdr(image.blob) | [zstd] bootstrap | hdr(image.boot) [| ToC | hdr(rafs.blob.toc)]``."""
    out = bytearray(data)
    out += TarHeader.new("image.blob", len(data)).to_bytes()
    boot_off = len(out)
    payload = zstandard.ZstdCompressor().compress(bootstrap) if toc else bootstrap
    out += payload
    out += TarHeader.new("image.boot", len(payload)).to_bytes()
    if toc:
        entries = TocEntryList([
            TocEntry(flags=TOC_FLAG_NONE, name=b"image.blob", compressed_offset=0, compressed_size=len(data),
                     uncompressed_size=len(data),
                     uncompressed_digest=hashlib.sha256(bytes(out[:len(data) + 512])).digest()),
            TocEntry(flags=TOC_FLAG_ZSTD, name=b"image.boot", compressed_offset=boot_off,
                     compressed_size=len(payload), uncompressed_size=len(bootstrap),
                     uncompressed_digest=hashlib.sha256(bootstrap).digest()),
        ]).to_bytes()
        out += entries
        out += TarHeader.new("rafs.blob.toc", len(entries)).to_bytes()
    return bytes(out)


# --------------------------------------------------------------------------- walking a loaded image


def exercise(boot: Bootstrap, max_ops: int | None = None) -> int:
    """Touch everything reachable from the root; return how many inodes were walked.

    Per inode: xattrs, then the link target, the chunks, or the child count,
    every child's lookup and inode plus one lookup that misses.  Then each
    inode of the prefetch list (which may name missing inodes: those
    FormatErrors are swallowed).  A corrupt image must only ever raise
    FormatError.  ``max_ops`` caps the work (walked inodes plus children), so
    an image presenting thousands of garbage entries stays quick; the
    prefetch list is skipped once the cap is hit.
    """
    ops = inodes = 0
    for _path, ino, info in boot.walk():
        ops += 1
        inodes += 1
        if max_ops is not None and ops > max_ops:
            return inodes
        boot.xattrs(ino)
        if info.is_symlink:
            boot.readlink(ino)
        elif info.is_reg:
            boot.chunks(ino)
        elif info.is_dir:
            boot.child_count(ino)
            for _, name, child, _ in boot.children(ino):
                ops += 1
                if max_ops is not None and ops > max_ops:
                    return inodes
                boot.lookup(ino, name)
                boot.inode(child)
            boot.lookup(ino, b"no-such-name")
    for ino in boot.prefetch_inodes:
        try:
            boot.inode(ino)
        except FormatError:
            pass
    return inodes
