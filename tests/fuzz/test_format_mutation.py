"""Mutation fuzzing of the format layer: corrupt real bootstraps, then walk everything.

The upstream vectors (and a few synthetic images with xattrs, devices and
inlined meta) are mutated with bit flips, overwrites of struct fields with
boundary values, truncation at every struct boundary and garbage.  Each result
is loaded and, when it loads, the whole tree is exercised: every inode, every
lookup, readlink, xattrs, chunks, child counts.  The only exception allowed out
is FormatError: no IndexError, struct.error, RecursionError, MemoryError or hang.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nydus_vfs.errors import FormatError
from nydus_vfs.format import (
    Bootstrap,
    RafsV5ChunkInfo,
    RafsV5Inode,
    RafsV5SuperBlock,
    RafsV6Blob,
    RafsV6Device,
    RafsV6InodeExtended,
    RafsV6SuperBlock,
    RafsV6SuperBlockExt,
)
from nydus_vfs.format.blob import BlobTail
from tests.unit.format.format_factory import build_v5, build_v6, exercise, inline_blob, sample_tree

#: Work done per mutated image is capped so a corrupt image that (legitimately)
#: presents thousands of garbage entries cannot make one example slow.
MAX_OPS = 3000

INTERESTING_INTS = [0, 1, 2, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0xFFF, 0x1000, 0xFFFF, 0x10000,
                    0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 1 << 40, (1 << 63), (1 << 64) - 1]


def load_and_exercise(data: bytes) -> None:
    try:
        boot = Bootstrap.from_bytes(data)
        exercise(boot, MAX_OPS)
        for blob in boot.blobs:
            assert isinstance(blob.blob_id, str)
    except FormatError as exc:
        assert str(exc)  # the message names structure and field


def _fields(cls, base: int) -> list[tuple[int, int]]:
    out, pos = [], base
    for _, fmt in cls._LAYOUT:
        size = struct.calcsize("<" + fmt)
        if not fmt.endswith("s") or size <= 8:
            out.append((pos, size))
        pos += size
    return out


def _v5_targets(data: bytes) -> tuple[list[tuple[int, int]], list[int]]:
    """Field positions (offset, size) and struct boundaries of a v5 bootstrap."""
    boot = Bootstrap.from_bytes(data)
    sb = boot.superblock
    fields = _fields(RafsV5SuperBlock, 0)
    bounds = {0, 8192, sb.s_blob_table_offset, sb.s_extended_blob_table_offset, len(data)}
    table_end = 8192 + 4 * sb.s_inode_table_entries
    fields += [(off, 4) for off in range(8192, table_end, 4)]
    fields += [(off, 4) for off in range(sb.s_blob_table_offset, sb.s_blob_table_offset + 8)]
    for value in boot._table:
        off = value << 3
        bounds.update({off, off + 128})
        fields += _fields(RafsV5Inode, off)
        mode = struct.unpack_from("<I", data, off + 60)[0]
        if mode & 0o170000 == 0o100000:
            count = struct.unpack_from("<I", data, off + 96)[0]
            name = struct.unpack_from("<H", data, off + 100)[0]
            first = off + 128 + ((name + 7) & ~7)
            for k in range(count):
                fields += _fields(RafsV5ChunkInfo, first + 80 * k)
                bounds.add(first + 80 * k)
    return fields, sorted(bounds)


def _v6_targets(data: bytes) -> tuple[list[tuple[int, int]], list[int]]:
    boot = Bootstrap.from_bytes(data)
    ext = boot.superblock_ext
    fields = _fields(RafsV6SuperBlock, 1024) + _fields(RafsV6SuperBlockExt, 1152)
    bounds = {1024, 1152, 1408, ext.s_blob_table_offset, ext.s_chunk_table_offset, len(data)}
    for i in range(len(boot.blobs)):
        fields += _fields(RafsV6Device, 1408 + 128 * i) + _fields(RafsV6Blob, ext.s_blob_table_offset + 256 * i)
    for _, _ino, info in boot.walk():
        off = info._aux[0]
        bounds.update({off, off + 64})
        fields += _fields(RafsV6InodeExtended, off)
        tail = off + info._aux[2] + info._aux[3]
        fields += [(tail + k, 1) for k in range(0, 48)]
    for k in range(ext.s_chunk_table_size // 80):
        fields += _fields(RafsV5ChunkInfo, ext.s_chunk_table_offset + 80 * k)
        bounds.add(ext.s_chunk_table_offset + 80 * k)
    return fields, sorted(bounds)


def _vectors(v5_vector, v6_vector) -> dict[str, bytes]:
    images = {p.name: p.read_bytes() for p in v5_vector["boots"]}
    images["v6-2.2"] = v6_vector["boot"].read_bytes()
    images["synthetic-v5"] = build_v5(sample_tree())
    images["synthetic-v6"] = build_v6(sample_tree())
    images["synthetic-v6-compact"] = build_v6(sample_tree(), compact=True, inline=False)
    images["synthetic-tarfs"] = build_v6(sample_tree(), blkszbits=9)
    return images


@pytest.fixture(scope="module")
def corpus(v5_vector, v6_vector):
    out = {}
    for name, data in _vectors(v5_vector, v6_vector).items():
        fields, bounds = (_v5_targets if data[:4] == b"SFAR" else _v6_targets)(data)
        out[name] = (data, fields, bounds)
    return out


def _draw_image(corpus, data) -> tuple[bytearray, list[tuple[int, int]]]:
    """A mutable copy of one corpus image, and its field positions."""
    raw, fields, _ = corpus[data.draw(st.sampled_from(sorted(corpus)))]
    return bytearray(raw), fields


_FUZZ = settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                        HealthCheck.data_too_large])


@_FUZZ
@given(data=st.data())
def test_bit_flips(corpus, data):
    buf, _ = _draw_image(corpus, data)
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(buf) - 1), st.integers(0, 7)), min_size=1, max_size=8))
    for pos, bit in flips:
        buf[pos] ^= 1 << bit
    load_and_exercise(bytes(buf))


@_FUZZ
@given(data=st.data())
def test_field_overwrites(corpus, data):
    buf, fields = _draw_image(corpus, data)
    for _ in range(data.draw(st.integers(1, 4))):
        off, size = data.draw(st.sampled_from(fields))
        value = data.draw(st.one_of(st.sampled_from(INTERESTING_INTS), st.integers(0, (1 << 64) - 1)))
        value &= (1 << (8 * size)) - 1
        buf[off:off + size] = value.to_bytes(size, "little")
    load_and_exercise(bytes(buf))


@_FUZZ
@given(data=st.data())
def test_field_overwrites_with_nearby_valid_values(corpus, data):
    """Small deltas keep images loadable, so the deep paths (dirents, chunks) get corrupted."""
    buf, fields = _draw_image(corpus, data)
    for _ in range(data.draw(st.integers(1, 3))):
        off, size = data.draw(st.sampled_from(fields))
        old = int.from_bytes(buf[off:off + size], "little")
        new = (old + data.draw(st.integers(-70, 70))) % (1 << (8 * size))
        buf[off:off + size] = new.to_bytes(size, "little")
    load_and_exercise(bytes(buf))


def test_truncation_at_every_struct_boundary(corpus):
    for raw, _, bounds in corpus.values():
        cuts = set(bounds) | set(range(0, len(raw), 4096)) | {b - 1 for b in bounds if b} | {b + 8 for b in bounds}
        for cut in sorted(c for c in cuts if 0 <= c < len(raw)):
            load_and_exercise(raw[:cut])


@_FUZZ
@given(data=st.data())
def test_garbage_spliced_in(corpus, data):
    name = data.draw(st.sampled_from(sorted(corpus)))
    raw = corpus[name][0]
    start = data.draw(st.integers(0, len(raw)))
    junk = data.draw(st.binary(min_size=1, max_size=600))
    mode = data.draw(st.sampled_from(["overwrite", "insert", "append"]))
    if mode == "overwrite":
        buf = raw[:start] + junk + raw[start + len(junk):]
    elif mode == "insert":
        buf = raw[:start] + junk + raw[start:]
    else:
        buf = raw + junk
    load_and_exercise(buf)


@_FUZZ
@given(st.binary(max_size=9000))
def test_pure_garbage(data):
    load_and_exercise(data)
    load_and_exercise(data + b"\0" * 8192)


@pytest.fixture(scope="module")
def inlined_blobs():
    boot = build_v5(sample_tree())
    return [inline_blob(boot, toc=True), inline_blob(boot, toc=False), inline_blob(build_v6(sample_tree()))]


@_FUZZ
@given(data=st.data())
def test_inlined_blob_tails(inlined_blobs, data):
    raw = bytearray(data.draw(st.sampled_from(inlined_blobs)))
    # Mutate the tail, where the ToC and section headers live.
    for _ in range(data.draw(st.integers(1, 6))):
        pos = len(raw) - 1 - data.draw(st.integers(0, min(len(raw) - 1, 2000)))
        raw[pos] = data.draw(st.integers(0, 255))
    load_and_exercise(bytes(raw))
    try:
        tail = BlobTail.parse(bytes(raw))
        for section in list(tail.sections):
            tail.extract(section, bytes(raw), max_size=1 << 24)
    except FormatError:
        pass
