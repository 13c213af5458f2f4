"""Helpers for the storage tests (imported as ``storage_helpers``): synthetic blobs and
parsers for the upstream vectors.

The vector parsers read only what the storage layer needs (chunk records and
the blob entry) straight from the bootstrap bytes with ``struct``, so these
tests do not depend on ``nydus_vfs.format``'s reader.
"""

from __future__ import annotations

import asyncio
import stat
import struct
from dataclasses import dataclass

from nydus_vfs.format.types import BlobFeatures, BlobInfo, ChunkFlags, ChunkInfo, Compressor, Digester
from nydus_vfs.utils.compress import compress
from nydus_vfs.utils.digest import crc32c, digest_bytes


def run(coro):
    """Run a coroutine on a fresh event loop (no pytest-asyncio here)."""
    return asyncio.run(coro)


@dataclass
class SyntheticBlob:
    blob_id: str
    data: bytes            # the stored blob file
    info: BlobInfo
    chunks: list[ChunkInfo]
    plain: list[bytes]     # uncompressed chunk contents, by chunk index


def make_blob(contents: list[bytes], *, compressor: Compressor = Compressor.ZSTD,
              digester: Digester = Digester.BLAKE3, aligned: bool = True, with_crc: bool = False,
              blob_id: str = "b" * 64, index: int = 0, known_count: bool = True) -> SyntheticBlob:
    """Pack ``contents`` as chunks of one blob the way the builder does (rafs-format.md §0.3, §0.7)."""
    stored = bytearray()
    chunks = []
    uoff = 0
    for i, plain in enumerate(contents):
        packed, is_compressed = compress(plain, compressor)
        flags = ChunkFlags.COMPRESSED if is_compressed else 0
        crc = 0
        if with_crc:
            flags |= ChunkFlags.HAS_CRC32
            crc = crc32c(plain)
        chunks.append(ChunkInfo(
            digest=digest_bytes(digester, plain), blob_index=index, index=i, flags=int(flags),
            compressed_offset=len(stored), compressed_size=len(packed),
            uncompressed_offset=uoff, uncompressed_size=len(plain), file_offset=0, crc32=crc,
        ))
        stored += packed
        uoff += len(plain)
        if aligned:
            uoff = (uoff + 4095) & ~4095
    features = BlobFeatures.ALIGNED if aligned else 0
    if not known_count:
        features |= BlobFeatures.V5_NO_EXT_BLOB_TABLE
    info = BlobInfo(
        index=index, blob_id=blob_id, chunk_count=len(contents) if known_count else 0,
        chunk_size=1 << 20, compressor=compressor, digester=digester, features=int(features),
        compressed_size=len(stored) if known_count else 0, uncompressed_size=uoff if known_count else 0,
    )
    return SyntheticBlob(blob_id, bytes(stored), info, chunks, list(contents))


# -- upstream vectors --------------------------------------------------------------

def _align8(n: int) -> int:
    return (n + 7) & ~7


def parse_v5(boot: bytes) -> tuple[BlobInfo, dict[int, ChunkInfo], list[ChunkInfo]]:
    """(blob, distinct chunks by index, every chunk record) of a one-blob v5 bootstrap."""
    (magic, version, _sb, chunk_size, flags, _ic, ito, _pto, bto, ite, _pte, bts, ebe, ebo) = \
        struct.unpack_from("<IIIIQQQQQIIIIQ", boot, 0)
    assert (magic, version) == (0x52414653, 0x500)
    blob_id = boot[bto + 8:bto + bts].split(b"\0")[0].decode()
    count, features, usize, csize = struct.unpack_from("<IIQQ", boot, ebo) if ebe else (0, 0, 0, 0)
    info = BlobInfo(index=0, blob_id=blob_id, chunk_count=count, chunk_size=chunk_size,
                    compressor=Compressor.NONE if flags & 0x1 else Compressor.LZ4_BLOCK,
                    digester=Digester.SHA256 if flags & 0x8 else Digester.BLAKE3,
                    features=features, compressed_size=csize, uncompressed_size=usize)
    records = []
    for slot in struct.unpack_from(f"<{ite}I", boot, ito):
        off = slot << 3
        mode, = struct.unpack_from("<I", boot, off + 60)
        iflags, = struct.unpack_from("<Q", boot, off + 80)
        nchunks, name_size, symlink_size = struct.unpack_from("<IHH", boot, off + 96)
        if not stat.S_ISREG(mode):
            continue
        p = off + 128 + _align8(name_size) + _align8(symlink_size)
        if iflags & 0x4:
            total, = struct.unpack_from("<Q", boot, p)
            p += _align8(8 + total)
        for k in range(nchunks):
            (d, bi, cf, cs, us, co, uo, fo, idx, crc) = struct.unpack_from("<32sIIIIQQQII", boot, p + 80 * k)
            records.append(ChunkInfo(d, bi, idx, cf, co, cs, uo, us, fo, crc))
    distinct = {c.index: c for c in records}
    return info, distinct, records


def parse_v6(boot: bytes) -> tuple[BlobInfo, list[ChunkInfo]]:
    """(blob, chunk-table records) of a one-blob v6 bootstrap."""
    (_flags, bto, _bts, chunk_size, cto, cts) = struct.unpack_from("<QQIIQQ", boot, 1152)
    e = boot[bto:bto + 256]
    blob_id = e[:64].rstrip(b"\0").decode()
    (bindex, _cs, count, comp, dig, features, csize, usize) = struct.unpack_from("<IIIIIIQQ", e, 64)
    info = BlobInfo(index=bindex, blob_id=blob_id, chunk_count=count, chunk_size=chunk_size,
                    compressor=Compressor(comp), digester=Digester(dig), features=features,
                    compressed_size=csize, uncompressed_size=usize)
    chunks = []
    for k in range(cts // 80):
        (d, bi, cf, cs, us, co, uo, fo, idx, crc) = struct.unpack_from("<32sIIIIQQQII", boot, cto + 80 * k)
        chunks.append(ChunkInfo(d, bi, idx, cf, co, cs, uo, us, fo, crc))
    return info, sorted(chunks, key=lambda c: c.index)
