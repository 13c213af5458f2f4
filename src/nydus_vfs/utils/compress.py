"""Chunk (de)compression exactly as nydus does it (reference/rafs-format.md §0.3).

* ``lz4_block``: a raw LZ4 *block*: no frame, no size prefix.  Decoding needs
  the uncompressed size, which the chunk record always has.
* ``zstd``: one standard frame, level 3.
* ``gzip``: one member (mtime 0, level 6); only legacy stargz/zran images use it.

Fallback rule: when compressing does not make the data strictly smaller, the
raw input is stored and the record says "not compressed".  :func:`compress`
applies it and tells the caller which happened.

Hostile input: :func:`decompress` never returns anything but exactly
``uncompressed_size`` bytes, never lets a library exception escape (everything
becomes :class:`~nydus_vfs.errors.ChunkCorruptError`) and never allocates more
than the declared size: the zstd frame header's own content size is checked
before decoding, because python-zstandard trusts it over ``max_output_size``.

Layering: ``utils`` sits below ``format``, so algorithms are the enum *values*
of ``format.types.Compressor`` (an ``IntEnum``, so its members work as is):
0 none, 1 lz4_block, 2 gzip, 3 zstd.
"""

from __future__ import annotations

import gzip as _gzip
import threading
import zlib

import lz4.block as _lz4
import zstandard as _zstd

from ..errors import ChunkCorruptError

__all__ = ["MAX_DECOMPRESSED_SIZE", "ZSTD_LEVEL", "compress", "compress_raw", "decompress"]

#: Largest output :func:`decompress` agrees to produce.  Chunks are at most
#: 16 MiB; the largest legitimate caller is an inlined bootstrap.
MAX_DECOMPRESSED_SIZE = 1 << 30

ZSTD_LEVEL = 3

# ``format.types.Compressor`` values (rafs-format.md §0.1).
_NONE, _LZ4_BLOCK, _GZIP, _ZSTD = 0, 1, 2, 3
_NAMES = {_NONE: "none", _LZ4_BLOCK: "lz4_block", _GZIP: "gzip", _ZSTD: "zstd"}

# python-zstandard (de)compressor objects are not thread safe: sharing one
# between threads corrupts output.  Each thread gets its own pair.
_ZSTD_LOCAL = threading.local()


def _zstd_pair() -> tuple[_zstd.ZstdCompressor, _zstd.ZstdDecompressor]:
    pair = getattr(_ZSTD_LOCAL, "pair", None)
    if pair is None:
        pair = _ZSTD_LOCAL.pair = (_zstd.ZstdCompressor(level=ZSTD_LEVEL), _zstd.ZstdDecompressor())
    return pair


_ZSTD_UNKNOWN_SIZES = (_zstd.CONTENTSIZE_UNKNOWN, _zstd.CONTENTSIZE_ERROR)

Buffer = bytes | bytearray | memoryview


def compress_raw(data: Buffer, algo: int) -> bytes:
    """Compress ``data`` with ``algo`` unconditionally (no fallback rule)."""
    if algo == _NONE:
        return bytes(data)
    if algo == _LZ4_BLOCK:
        return _lz4.compress(data, store_size=False)
    if algo == _ZSTD:
        return _zstd_pair()[0].compress(data)
    if algo == _GZIP:
        return _gzip.compress(bytes(data), compresslevel=6, mtime=0)
    raise ValueError(f"unknown compressor {algo!r}")


def compress(data: Buffer, algo: int) -> tuple[bytes, bool]:
    """Compress ``data`` for storage; returns ``(stored_bytes, is_compressed)``.

    ``is_compressed`` is False (and the input is returned as is) for
    ``Compressor.NONE``, for empty input and whenever the compressed form would
    not be strictly shorter than the input.
    """
    raw = bytes(data)
    if algo == _NONE or not raw:
        return raw, False
    packed = compress_raw(raw, algo)
    if len(packed) >= len(raw):
        return raw, False
    return packed, True


def decompress(data: Buffer, algo: int, uncompressed_size: int) -> bytes:
    """Decode ``data`` that must inflate to exactly ``uncompressed_size`` bytes.

    ``Compressor.NONE`` only checks the length.  Raises ``ChunkCorruptError``
    naming the algorithm and what was wrong; ``ValueError`` for a declared size
    that is negative or above :data:`MAX_DECOMPRESSED_SIZE` (a caller bug or
    hostile metadata; nothing is allocated).
    """
    if not 0 <= uncompressed_size <= MAX_DECOMPRESSED_SIZE:
        raise ValueError(
            f"declared uncompressed size {uncompressed_size} is outside 0..{MAX_DECOMPRESSED_SIZE}"
        )
    if algo == _NONE:
        out = bytes(data)
    elif algo == _LZ4_BLOCK:
        out = _lz4_decompress(data, uncompressed_size)
    elif algo == _ZSTD:
        out = _zstd_decompress(data, uncompressed_size)
    elif algo == _GZIP:
        out = _gzip_decompress(data, uncompressed_size)
    else:
        raise ChunkCorruptError(f"unknown compressor {algo!r}")
    if len(out) != uncompressed_size:
        raise ChunkCorruptError(
            f"{_name(algo)}: data decodes to {len(out)} bytes, expected {uncompressed_size}"
        )
    return out


def _name(algo: int) -> str:
    return _NAMES.get(algo, repr(algo))


def _lz4_decompress(data: Buffer, size: int) -> bytes:
    try:
        return _lz4.decompress(data, uncompressed_size=size)
    except Exception as exc:  # LZ4BlockError, and ValueError/MemoryError on odd input
        raise ChunkCorruptError(f"lz4_block: cannot decode {len(data)} bytes to {size}: {exc}") from None


def _zstd_decompress(data: Buffer, size: int) -> bytes:
    try:
        params = _zstd.get_frame_parameters(data)
    except _zstd.ZstdError as exc:
        raise ChunkCorruptError(f"zstd: not a zstd frame ({len(data)} bytes): {exc}") from None
    declared = params.content_size
    if declared not in _ZSTD_UNKNOWN_SIZES and declared != size:
        raise ChunkCorruptError(f"zstd: frame declares {declared} bytes, expected {size}")
    try:
        return _zstd_pair()[1].decompress(data, max_output_size=size, allow_extra_data=False)
    except _zstd.ZstdError as exc:
        raise ChunkCorruptError(f"zstd: cannot decode {len(data)} bytes to {size}: {exc}") from None


def _gzip_decompress(data: Buffer, size: int) -> bytes:
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        # One byte more than allowed reveals an over-long stream without
        # inflating the rest of it.
        out = inflater.decompress(data, size + 1)
    except zlib.error as exc:
        raise ChunkCorruptError(f"gzip: cannot decode {len(data)} bytes: {exc}") from None
    if len(out) > size:
        raise ChunkCorruptError(f"gzip: data decodes to more than {size} bytes")
    if not inflater.eof:
        raise ChunkCorruptError(f"gzip: stream truncated after {len(out)} of {size} bytes")
    if inflater.unused_data:
        raise ChunkCorruptError(f"gzip: {len(inflater.unused_data)} bytes after the end of the member")
    return out
