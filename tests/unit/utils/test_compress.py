"""Chunk compression: round trips, the fallback rule, and hostile input (rafs-format.md §0.3)."""

from __future__ import annotations

import gzip
import os
import zlib

import lz4.block
import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from nydus_vfs.errors import ChunkCorruptError
from nydus_vfs.format.types import Compressor
from nydus_vfs.utils.compress import MAX_DECOMPRESSED_SIZE, compress, compress_raw, decompress

ALGOS = [Compressor.NONE, Compressor.LZ4_BLOCK, Compressor.GZIP, Compressor.ZSTD]
TEXT = b"the quick brown fox jumps over the lazy dog\n" * 200


@pytest.mark.parametrize("algo", ALGOS)
def test_round_trip(algo):
    packed, is_compressed = compress(TEXT, algo)
    assert is_compressed == (algo != Compressor.NONE)
    if is_compressed:
        assert len(packed) < len(TEXT)
    assert decompress(packed, algo, len(TEXT)) == TEXT


@pytest.mark.parametrize("algo", ALGOS)
@given(data=st.binary(max_size=2000))
def test_round_trip_property(algo, data):
    packed, is_compressed = compress(data, algo)
    stored_algo = algo if is_compressed else Compressor.NONE
    assert decompress(packed, stored_algo, len(data)) == data
    assert len(packed) <= len(data)


@pytest.mark.parametrize("algo", [Compressor.LZ4_BLOCK, Compressor.GZIP, Compressor.ZSTD])
def test_fallback_stores_incompressible_data_raw(algo):
    noise = os.urandom(4096)
    packed, is_compressed = compress(noise, algo)
    assert (packed, is_compressed) == (noise, False)


def test_empty_input_is_never_compressed():
    assert compress(b"", Compressor.ZSTD) == (b"", False)


def test_lz4_block_has_no_size_prefix():
    packed = compress_raw(TEXT, Compressor.LZ4_BLOCK)
    assert packed == lz4.block.compress(TEXT, store_size=False)
    # python-lz4's default prefixes the little-endian size; ours must not.
    assert lz4.block.compress(TEXT) == len(TEXT).to_bytes(4, "little") + packed
    assert lz4.block.decompress(packed, uncompressed_size=len(TEXT)) == TEXT


def test_zstd_is_one_standard_frame():
    packed = compress_raw(TEXT, Compressor.ZSTD)
    assert packed[:4] == b"\x28\xb5\x2f\xfd"
    assert zstandard.ZstdDecompressor().decompress(packed) == TEXT


def test_gzip_is_one_member_with_zero_mtime():
    packed = compress_raw(TEXT, Compressor.GZIP)
    assert packed[:2] == b"\x1f\x8b" and packed[4:8] == b"\0\0\0\0"
    assert gzip.decompress(packed) == TEXT


def test_unknown_algorithm():
    with pytest.raises(ValueError, match="unknown compressor"):
        compress(b"abc", 9)
    with pytest.raises(ChunkCorruptError, match="unknown compressor"):
        decompress(b"abc", 9, 3)


@pytest.mark.parametrize("algo", ALGOS)
def test_wrong_declared_size_is_corrupt(algo):
    packed = compress_raw(TEXT, algo)
    with pytest.raises(ChunkCorruptError):
        decompress(packed, algo, len(TEXT) - 1)
    with pytest.raises(ChunkCorruptError):
        decompress(packed, algo, len(TEXT) + 1)


@pytest.mark.parametrize("algo", [Compressor.LZ4_BLOCK, Compressor.GZIP, Compressor.ZSTD])
@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip", "empty", "trailing"])
def test_damaged_input_raises_chunk_corrupt_only(algo, damage):
    packed = bytearray(compress_raw(TEXT, algo))
    if damage == "truncate":
        bad = bytes(packed[: len(packed) // 2])
    elif damage == "garbage":
        bad = b"\xff" * len(packed)
    elif damage == "flip":
        packed[len(packed) // 2] ^= 0xFF
        packed[5] ^= 0x55
        bad = bytes(packed)
    elif damage == "empty":
        bad = b""
    else:
        bad = bytes(packed) + b"extra"
    try:
        out = decompress(bad, algo, len(TEXT))
    except ChunkCorruptError as exc:
        assert Compressor(algo).cli_name in str(exc)
    else:
        # A flipped literal can still decode to the right length; size is all
        # decompress promises, the digest check catches the rest.
        assert damage == "flip" and len(out) == len(TEXT)


@given(st.binary(max_size=200), st.sampled_from([Compressor.LZ4_BLOCK, Compressor.GZIP, Compressor.ZSTD]),
       st.integers(0, 5000))
def test_arbitrary_bytes_never_escape_as_other_errors(data, algo, size):
    try:
        out = decompress(data, algo, size)
    except ChunkCorruptError:
        return
    assert len(out) == size


def test_zstd_frame_lying_about_its_size_is_refused_before_decoding():
    # A frame header that declares 1 GiB + 1: must be refused without allocating.
    packed = zstandard.ZstdCompressor(level=3).compress(b"x" * 1000)
    params = zstandard.get_frame_parameters(packed)
    assert params.content_size == 1000
    with pytest.raises(ChunkCorruptError, match="declares 1000 bytes, expected 999"):
        decompress(packed, Compressor.ZSTD, 999)


def test_zstd_without_content_size_is_bounded_by_the_declared_size():
    packed = zstandard.ZstdCompressor(level=3, write_content_size=False).compress(b"x" * 100_000)
    assert decompress(packed, Compressor.ZSTD, 100_000) == b"x" * 100_000
    with pytest.raises(ChunkCorruptError):
        decompress(packed, Compressor.ZSTD, 1000)


def test_gzip_bomb_is_bounded():
    bomb = gzip.compress(bytes(50 << 20), mtime=0)
    with pytest.raises(ChunkCorruptError, match="more than 4096"):
        decompress(bomb, Compressor.GZIP, 4096)


def test_gzip_two_members_are_refused():
    two = gzip.compress(b"a" * 100, mtime=0) + gzip.compress(b"b" * 100, mtime=0)
    with pytest.raises(ChunkCorruptError, match="after the end of the member"):
        decompress(two, Compressor.GZIP, 100)


def test_gzip_raw_deflate_is_not_gzip():
    with pytest.raises(ChunkCorruptError, match="gzip"):
        decompress(zlib.compress(TEXT), Compressor.GZIP, len(TEXT))


def test_declared_size_limits():
    with pytest.raises(ValueError, match="outside"):
        decompress(b"", Compressor.LZ4_BLOCK, MAX_DECOMPRESSED_SIZE + 1)
    with pytest.raises(ValueError, match="outside"):
        decompress(b"", Compressor.NONE, -1)


def test_none_checks_length():
    assert decompress(b"abc", Compressor.NONE, 3) == b"abc"
    with pytest.raises(ChunkCorruptError, match="decodes to 3 bytes, expected 4"):
        decompress(b"abc", Compressor.NONE, 4)
