"""Blob-side structures (format/blob.py): the v6 vector's blob tail, ci arrays,
the zran blob.meta, ToC entries and the reversed-tar section headers."""

from __future__ import annotations

import hashlib

import lz4.block
import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from nydus_vfs.errors import FormatError
from nydus_vfs.format import (
    BatchContext,
    BlobChunkInfoV1,
    BlobChunkInfoV2,
    BlobCompressionContextHeader,
    BlobTail,
    Bootstrap,
    ChunkFlags,
    TarHeader,
    TocEntry,
    TocEntryList,
    ZranContext,
    decode_ci_entries,
    split_blob_meta_file,
)
from nydus_vfs.format.blob import TOC_FLAG_LZ4, TOC_FLAG_NONE, TOC_FLAG_ZSTD

V6_BLOB = "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"
ZRAN_META = "233c72f2b6b698c07021c4da367cfe2dff4f049efbaa885ca0ff760ea297865a.blob.meta"


@pytest.fixture(scope="module")
def blob(v6_vector):
    return (v6_vector["blob_dir"] / V6_BLOB).read_bytes()


@pytest.fixture(scope="module")
def boot(v6_vector):
    return Bootstrap.from_bytes(v6_vector["boot"].read_bytes())


@pytest.fixture(scope="module")
def zran_meta(vectors_dir):
    return (vectors_dir / "zran" / ZRAN_META).read_bytes()


def test_tail_of_vector_blob_uses_the_toc(blob, boot):
    tail = BlobTail.parse(blob)
    assert tail.toc is not None and len(tail.toc) == 4
    assert [e.entry_name for e in tail.toc.entries] == ["image.blob", "blob.meta", "blob.meta.header", "blob.digest"]
    # The 2.2 builder stored the *end* of the chunk data as image.blob's offset.
    assert tail.toc.entries[0].compressed_offset == 7802
    assert (tail.sections["image.blob"].offset, tail.sections["image.blob"].size) == (0, 7802)
    assert (tail.sections["blob.meta"].offset, tail.sections["blob.meta"].size) == (8314, 32)
    assert (tail.sections["blob.meta.header"].offset, tail.sections["blob.meta.header"].size) == (8346, 4096)
    assert (tail.sections["blob.digest"].offset, tail.sections["blob.digest"].size) == (12954, 64)
    [info] = boot.blobs
    assert tail.toc_digest == info.blob_toc_digest
    assert tail.toc_size == info.blob_toc_size == 1024
    assert tail.toc.to_bytes() == blob[13530:14042]
    # bytes 124..127 of each entry are builder garbage, kept for the round trip
    assert tail.toc.entries[0].reserved2[-4:] == b"\xff\xff\x00\x00"


def test_tail_extracts_and_verifies_sections(blob):
    tail = BlobTail.parse(blob)
    assert tail.extract("blob.digest", blob) == blob[12954:13018]
    assert tail.extract("blob.meta.header", blob) == blob[8346:12442]
    reads = []

    def read_at(off, size):
        reads.append((off, size))
        return blob[off:off + size]

    assert BlobTail.parse(read_at, len(blob)).extract("blob.meta", read_at) == blob[8314:8346]
    assert reads[0] == (len(blob) - 512, 512)
    corrupt = bytearray(blob)
    corrupt[12960] ^= 1
    with pytest.raises(FormatError, match="does not match the ToC"):
        tail.extract("blob.digest", bytes(corrupt))
    with pytest.raises(FormatError, match="has no section"):
        tail.extract("image.boot", blob)


def test_ci_header_and_entries_of_vector(blob, boot):
    [info] = boot.blobs
    header = BlobCompressionContextHeader.from_bytes(blob, 8346)
    assert header.to_bytes() == blob[8346:12442]
    header.validate(info)
    assert header.s_features == 0x70000021 and header.s_ci_entries == 2 and not header.is_v2
    entries = decode_ci_entries(blob, 2, False, 8314)
    assert b"".join(e.to_bytes() for e in entries) == blob[8314:8346]
    c1, c2 = boot.chunks(133)[0], boot.chunks(136)[0]
    for e, c in zip(entries, (c1, c2)):
        e.validate()
        assert (e.compressed_offset, e.compressed_size) == (c.compressed_offset, c.compressed_size)
        assert (e.uncompressed_offset, e.uncompressed_size) == (c.uncompressed_offset, c.uncompressed_size)
        assert e.flags == ChunkFlags.COMPRESSED and e.is_compressed
        info_c = e.to_chunk_info(0, entries.index(e), c.digest, 0)
        assert info_c.compressed_size == c.compressed_size
    bad = BlobCompressionContextHeader.from_bytes(blob, 8346)
    bad.s_ci_offset += 1
    with pytest.raises(FormatError, match="s_ci_offset"):
        bad.validate(info)


@pytest.mark.parametrize("field, value, match", [
    ("s_magic", 1, "s_magic"),
    ("s_magic2", 1, "s_magic2"),
    ("s_features", 0x1000, "unknown"),
    ("s_ci_compressor", 9, "compressor"),
    ("s_ci_entries", 3, "do not fit"),
])
def test_ci_header_validate_refuses(blob, field, value, match):
    header = BlobCompressionContextHeader.from_bytes(blob, 8346)
    setattr(header, field, value)
    with pytest.raises(FormatError, match=match):
        header.validate()


def test_zran_blob_meta_file(zran_meta):
    header, ci = split_blob_meta_file(zran_meta)
    assert header.to_bytes() == zran_meta[0xA2000:]
    assert header.s_features == 0xF and header.is_v2
    assert (header.s_ci_entries, header.s_ci_zran_offset, header.s_ci_zran_count) == (0xA3, 0xF48, 0x15)
    assert len(ci) == 0xA1290
    entries = decode_ci_entries(ci, header.s_ci_entries, True)
    assert len(entries) == 163
    assert all(e.ci_flags == 0x03 and e.is_zran for e in entries)
    for e in entries:
        e.validate(separate=True)
        assert e.flags == ChunkFlags.COMPRESSED and e.uncompressed_offset % 4096 == 0
    assert [e.uncompressed_offset for e in entries] == sorted(e.uncompressed_offset for e in entries)
    assert b"".join(e.to_bytes() for e in entries) == bytes(ci[:163 * 24])
    ctxs = [ZranContext.from_bytes(ci, 0xF48 + 40 * i) for i in range(0x15)]
    assert (ctxs[0].in_offset, ctxs[0].dict_size) == (10, 0)
    assert all(c.dict_size == 32768 for c in ctxs[1:])
    assert sum(1 for c in ctxs if c.ctx_bits) == 17  # these need inflatePrime
    for c in ctxs:
        c.validate()
        assert c.to_bytes() == bytes(ci[0xF48 + 40 * ctxs.index(c):0xF48 + 40 * ctxs.index(c) + 40])
    assert max(e.context_index for e in entries) == 0x14


def test_split_blob_meta_file_refuses_bad_sizes(zran_meta):
    with pytest.raises(FormatError, match="multiple of 4096"):
        split_blob_meta_file(zran_meta[:-1])
    with pytest.raises(FormatError):
        split_blob_meta_file(b"\0" * 4096)


@given(st.integers(0, (1 << 40) - 1), st.integers(1, 1 << 24), st.integers(0, (1 << 32) - 1),
       st.integers(1, 1 << 24))
def test_ci_v1_bit_packing(coff, csize, upage, usize):
    e = BlobChunkInfoV1.new(coff, csize, upage << 12, usize)
    back = BlobChunkInfoV1.from_bytes(e.to_bytes())
    assert (back.compressed_offset, back.compressed_size) == (coff, csize)
    assert (back.uncompressed_offset, back.uncompressed_size) == (upage << 12, usize)
    assert back.is_compressed == (csize != usize)


@given(st.integers(0, (1 << 40) - 1), st.integers(0, 0xFF_FFFF), st.integers(0, (1 << 32) - 1),
       st.integers(1, 1 << 24), st.integers(0, 0x1F), st.integers(0, (1 << 64) - 1))
def test_ci_v2_bit_packing(coff, csize, upage, usize, flags, data):
    e = BlobChunkInfoV2.new(coff, csize, upage << 12, usize, flags, data)
    back = BlobChunkInfoV2.from_bytes(e.to_bytes())
    assert (back.compressed_offset, back.compressed_size) == (coff, csize)
    assert (back.uncompressed_offset, back.uncompressed_size) == (upage << 12, usize)
    assert (back.ci_flags, back.data) == (flags, data)
    assert bool(back.flags & ChunkFlags.BATCH) == bool(flags & 0x04)


def test_ci_entry_constructors_refuse_out_of_range():
    with pytest.raises(FormatError, match="compressed_size"):
        BlobChunkInfoV1.new(0, 0, 0, 1)
    with pytest.raises(FormatError, match="aligned"):
        BlobChunkInfoV1.new(0, 1, 100, 1)
    with pytest.raises(FormatError, match="40 bits"):
        BlobChunkInfoV2.new(1 << 40, 1, 0, 1)
    with pytest.raises(FormatError, match="24 bits"):
        BlobChunkInfoV2.new(0, 1 << 24, 0, 1)
    with pytest.raises(FormatError, match="flag"):
        BlobChunkInfoV2.new(0, 1, 0, 1, 0x20)


@pytest.mark.parametrize("entry, match", [
    (BlobChunkInfoV2.new(0, 0, 0, 10), "compressed size is 0"),
    (BlobChunkInfoV2.new(0, 5, 0, 10), "plain chunk"),
    (BlobChunkInfoV2.new(0, 10, 0, 10, 0x10, 0), "CRC is 0"),
    (BlobChunkInfoV2(uncomp_info=0x40 << 56, comp_info=1 << 40), "unknown flag"),
])
def test_ci_v2_validate_refuses(entry, match):
    with pytest.raises(FormatError, match=match):
        entry.validate()


def test_ci_v2_crc_and_batch_fields():
    e = BlobChunkInfoV2.new(100, 10, 4096, 10, 0x10, 0xDEADBEEF)
    e.validate()
    assert e.crc32 == 0xDEADBEEF and e.flags & ChunkFlags.HAS_CRC32
    assert e.to_chunk_info(2, 7).crc32 == 0xDEADBEEF
    b = BlobChunkInfoV2.new(100, 0, 4096, 10, 0x05, (3 << 32) | 77)
    b.validate()
    assert (b.context_index, b.context_offset, b.is_batch) == (3, 77, True)
    batch = BatchContext(compressed_size=5, uncompressed_batch_size=9)
    assert batch.to_bytes()[:8] == bytes.fromhex("0500000009000000") and batch.SIZE == 40


def test_tar_header_matches_vector_bytes(blob):
    raw = blob[7802:8314]
    hdr = TarHeader.from_bytes(raw)
    hdr.validate()
    assert hdr.entry_name == "image.blob" and hdr.entry_size == 7802
    assert hdr.chksum == b"0005641\0" and hdr.magic == TarHeader.GNU_MAGIC
    assert hdr.to_bytes() == raw
    assert TarHeader.new("image.blob", 7802).to_bytes() == raw
    for off in (12442, 13018, 14042):
        TarHeader.from_bytes(blob, off).validate()
        assert TarHeader.new(TarHeader.from_bytes(blob, off).entry_name,
                             TarHeader.from_bytes(blob, off).entry_size).to_bytes() == blob[off:off + 512]


def test_tar_header_checksum_and_size_errors():
    hdr = TarHeader.new("x", 5)
    hdr.name = b"y"
    with pytest.raises(FormatError, match="checksum"):
        hdr.validate()
    hdr = TarHeader.new("x", 5)
    hdr.size = b"zz\0"
    with pytest.raises(FormatError, match="octal"):
        _ = hdr.entry_size
    big = TarHeader.new("x", 0)
    big.size = b"\x80" + (1 << 40).to_bytes(11, "big")
    assert big.entry_size == 1 << 40
    with pytest.raises(FormatError, match="1..100"):
        TarHeader.new("", 1)


def _sectioned(*sections: tuple[str, bytes], prefix: bytes = b"DATA" * 25) -> bytes:
    out = bytearray(prefix)
    for name, data in sections:
        out += data + TarHeader.new(name, len(data)).to_bytes()
    return bytes(out)


def test_tail_walk_without_toc():
    blob = _sectioned(("image.blob", b"chunks"), ("blob.meta", b"M" * 40), ("image.boot", b"BOOT" * 10))
    tail = BlobTail.parse(blob)
    assert tail.toc is None and sorted(tail.sections) == ["blob.meta", "image.blob", "image.boot"]
    assert tail.extract("image.boot", blob) == b"BOOT" * 10
    assert tail.extract("blob.meta", blob) == b"M" * 40
    boot = zstandard.ZstdCompressor().compress(b"Z" * 5000)
    tail = BlobTail.parse(_sectioned(("image.boot", boot)))
    assert tail.extract("image.boot", _sectioned(("image.boot", boot))) == b"Z" * 5000


def test_tail_walk_errors():
    with pytest.raises(FormatError, match="too small"):
        BlobTail.parse(b"x" * 100)
    with pytest.raises(FormatError, match="chksum"):
        BlobTail.parse(b"\x01" * 2048)
    with pytest.raises(FormatError, match="checksum mismatch"):
        BlobTail.parse(b"\x01" * (1536 + 148) + b"0001234\0" + b"\x01" * 356)
    huge = b"x" * 10 + TarHeader.new("image.boot", 5000).to_bytes()
    with pytest.raises(FormatError, match="starts before the blob"):
        BlobTail.parse(huge)
    with pytest.raises(FormatError, match="blob size is required"):
        BlobTail.parse(lambda off, size: b"")


def _toc_blob(entries: list[TocEntry], payload: bytes) -> bytes:
    toc = TocEntryList(entries).to_bytes()
    return payload + toc + TarHeader.new("rafs.blob.toc", len(toc)).to_bytes()


def test_toc_section_compressions_and_limits():
    data = b"hello nydus " * 100
    lz = lz4.block.compress(data, store_size=False)
    zs = zstandard.ZstdCompressor().compress(data)
    payload = lz + zs
    digest = hashlib.sha256(data).digest()
    blob = _toc_blob([
        TocEntry(flags=TOC_FLAG_LZ4, name=b"a", compressed_offset=0, compressed_size=len(lz),
                 uncompressed_size=len(data), uncompressed_digest=digest),
        TocEntry(flags=TOC_FLAG_ZSTD, name=b"b", compressed_offset=len(lz), compressed_size=len(zs),
                 uncompressed_size=len(data), uncompressed_digest=digest),
        TocEntry(flags=TOC_FLAG_ZSTD, name=b"lies", compressed_offset=len(lz), compressed_size=len(zs),
                 uncompressed_size=len(data) - 1),
        TocEntry(flags=TOC_FLAG_LZ4, name=b"bomb", compressed_offset=0, compressed_size=4,
                 uncompressed_size=1 << 30),
        TocEntry(flags=TOC_FLAG_NONE, name=b"blob.meta.header", compressed_offset=0, compressed_size=4,
                 uncompressed_size=4),
    ], payload)
    tail = BlobTail.parse(blob)
    assert tail.extract("a", blob) == data and tail.extract("b", blob) == data
    assert "blob.meta.header" in tail
    with pytest.raises(FormatError, match="more than"):
        tail.extract("lies", blob)
    with pytest.raises(FormatError, match="impossible lz4"):
        tail.extract("bomb", blob)
    with pytest.raises(FormatError, match="cap"):
        tail.extract("a", blob, max_size=10)


@pytest.mark.parametrize("entry, match", [
    (TocEntry(flags=0x8, name=b"x"), "unknown compression"),
    (TocEntry(flags=1, name=b""), "empty section name"),
    (TocEntry(flags=1, name=b"x", compressed_offset=1 << 20, compressed_size=1), "runs past"),
    (TocEntry(flags=1, name=b"\xff"), "ASCII"),
])
def test_toc_entry_refused(entry, match):
    with pytest.raises(FormatError, match=match):
        BlobTail.parse(_toc_blob([entry], b""))


def test_toc_size_must_be_sane():
    blob = b"x" * 100 + TarHeader.new("rafs.blob.toc", 100).to_bytes()
    with pytest.raises(FormatError, match="multiple of 128"):
        BlobTail.parse(blob)


@given(st.binary(max_size=2048))
def test_tail_garbage_only_format_error(data):
    try:
        tail = BlobTail.parse(data)
        for name in list(tail.sections):
            tail.extract(name, data, max_size=1 << 20)
    except FormatError:
        pass
