"""The chunk data path: BlobLayer / BlobDevice over built images, real vectors and synthetic blobs.

The image-level tests run on images made by ``nydus_vfs.builder`` from a small
tree (so a fresh clone without ../shared tests them) and again on the upstream
vectors when they are there.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import hashlib
import logging
import os
import shutil

import blake3
import pytest

from nydus_vfs.builder import BuildOptions, build
from nydus_vfs.errors import BackendNotFoundError, ChunkCorruptError, ConfigError, StorageError
from nydus_vfs.format.types import BlobFeatures, ChunkFlags, ChunkInfo, Cipher, Compressor, Digester
from nydus_vfs.storage import BlobLayer, CacheSpec, FileSegment, LocalfsBackend
from nydus_vfs.storage.device import MAX_CHUNK_SIZE, check_chunk, decode_chunk, verify_chunk
from nydus_vfs.testing.backend import InMemoryBackend
from tests.unit.storage.storage_helpers import make_blob, parse_v5, parse_v6, run

NOCACHE = CacheSpec("")


def materialize(pieces) -> bytes:
    """Concatenate a read result, reading file segments from their fds."""
    out = bytearray()
    for p in pieces:
        if isinstance(p, FileSegment):
            data = os.pread(p.fd, p.length, p.offset)
            assert len(data) == p.length, "file segment reaches past the end of its file"
            out += data
        else:
            out += p
    return bytes(out)


def read(device, iovec):
    return materialize(run(device.read(iovec)))


def whole(chunk: ChunkInfo):
    return [(chunk, 0, chunk.uncompressed_size)]


def memory_backend(sb, **kw):
    return InMemoryBackend({sb.blob_id: sb.data}, **kw)


def filecache(tmp_path, validate=False, sub="cache"):
    return CacheSpec("blobcache", str(tmp_path / sub), validate)


# -- built images and upstream vectors -------------------------------------------------

_CHUNK = 0x10000
_DATA = b"".join(hashlib.sha256(b"%d" % i).digest() for i in range(6000))   # 192000 bytes


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Files of 0..3 chunks (64 KiB chunks), one a duplicate of another, for the builder."""
    src = tmp_path_factory.mktemp("tree")
    (src / "three").write_bytes(_DATA[:3 * _CHUNK - 100])
    (src / "one").write_bytes(b"a compressible line of text\n" * 150)
    (src / "dir").mkdir()
    (src / "dir" / "copy-of-three").write_bytes(_DATA[:3 * _CHUNK - 100])
    (src / "dir" / "tail").write_bytes(_DATA[-777:])
    (src / "empty").write_bytes(b"")
    return src


def _built(tmp_path_factory, src, version: int, compressor: Compressor, digester: Digester):
    out = tmp_path_factory.mktemp(f"v{version}-{compressor.name}-{digester.name}")
    build(str(src), BuildOptions(fs_version=version, compressor=compressor, digester=digester, chunk_size=_CHUNK,
                                 bootstrap=str(out / "boot"), blob_dir=str(out)))
    return (out / "boot").read_bytes(), out


@pytest.fixture(scope="module", params=["built", "vector"])
def v5(request, tmp_path_factory, tree):
    """(blob, distinct chunks, every chunk record, blob dir) of an uncompressed sha256 v5 image."""
    if request.param == "built":
        boot, blob_dir = _built(tmp_path_factory, tree, 5, Compressor.NONE, Digester.SHA256)
        info, distinct, records = parse_v5(boot)
        # The duplicate file's chunks are stored once.
        assert len(distinct) == 5 and len(records) == 8
    else:
        v5_vector = request.getfixturevalue("v5_vector")
        boot, blob_dir = v5_vector["boots"][0].read_bytes(), v5_vector["blob_dir"]
        info, distinct, records = parse_v5(boot)
        assert info.chunk_count == 23 and len(distinct) == 23 and len(records) == 29
    return info, distinct, records, blob_dir


@pytest.fixture(scope="module", params=["built", "vector"])
def v6(request, tmp_path_factory, tree):
    """(blob, chunk-table records, blob dir) of a zstd/blake3 v6 image."""
    if request.param == "built":
        boot, blob_dir = _built(tmp_path_factory, tree, 6, Compressor.ZSTD, Digester.BLAKE3)
        info, chunks = parse_v6(boot)
        assert len(chunks) == 5
    else:
        v6_vector = request.getfixturevalue("v6_vector")
        info, chunks = parse_v6(v6_vector["boot"].read_bytes())
        assert len(chunks) == 2 and [c.uncompressed_size for c in chunks] == [16931, 13400]
        # The v6 blob id is not sha256(file) (rafs-format.md §3.8): nothing may assume it is.
        blob_dir = v6_vector["blob_dir"]
        assert hashlib.sha256((blob_dir / info.blob_id).read_bytes()).hexdigest() != info.blob_id
    assert info.compressor == Compressor.ZSTD and info.digester == Digester.BLAKE3
    return info, chunks, blob_dir


@pytest.mark.parametrize("cache_kind", ["", "blobcache"])
def test_v5_every_chunk_matches_its_sha256(v5, tmp_path, cache_kind):
    info, distinct, _, blob_dir = v5
    assert info.digester == Digester.SHA256
    blob = (blob_dir / info.blob_id).read_bytes()
    layer = BlobLayer()
    cache = CacheSpec(cache_kind, str(tmp_path) if cache_kind else None)
    device = layer.open_device([info], LocalfsBackend(dir=blob_dir), cache, digest_validate=True)
    for c in distinct.values():
        data = read(device, whole(c))
        assert hashlib.sha256(data).digest() == c.digest
        assert data == blob[c.compressed_offset:c.compressed_offset + c.compressed_size]
    device.close()


def test_v5_blake3_vector_reads_the_same_blob(v5_vector):
    info, distinct, _ = parse_v5(v5_vector["boots"][1].read_bytes())
    assert info.digester == Digester.BLAKE3
    device = BlobLayer().open_device([info], LocalfsBackend(dir=v5_vector["blob_dir"]), NOCACHE, True)
    for c in distinct.values():
        assert blake3.blake3(read(device, whole(c))).digest() == c.digest


def test_v5_built_blake3_image_reads_and_validates(tmp_path_factory, tree):
    boot, blob_dir = _built(tmp_path_factory, tree, 5, Compressor.NONE, Digester.BLAKE3)
    info, distinct, _ = parse_v5(boot)
    assert info.digester == Digester.BLAKE3
    device = BlobLayer().open_device([info], LocalfsBackend(dir=blob_dir), NOCACHE, True)
    got = b"".join(read(device, whole(c)) for c in sorted(distinct.values(), key=lambda c: c.index))
    assert _DATA[:3 * _CHUNK - 100] in got and _DATA[-777:] in got and b"compressible" in got
    for c in distinct.values():
        assert blake3.blake3(read(device, whole(c))).digest() == c.digest
    device.close()


def test_v6_zstd_chunks_decode_and_validate(v6, tmp_path):
    info, chunks, blob_dir = v6
    device = BlobLayer().open_device([info], LocalfsBackend(dir=blob_dir), filecache(tmp_path), True)
    sizes = []
    assert any(c.flags & ChunkFlags.COMPRESSED for c in chunks)
    for c in chunks:
        data = read(device, whole(c))
        assert blake3.blake3(data).digest() == c.digest
        sizes.append(len(data))
    assert sizes == [c.uncompressed_size for c in chunks]
    # Second time: served from the cache file, zero copy.
    pieces = run(device.read(whole(chunks[1])))
    assert len(pieces) == 1 and isinstance(pieces[0], FileSegment)
    device.close()


# -- corruption -----------------------------------------------------------------------

def test_flipped_byte_fails_only_its_chunk_and_is_never_cached(v5, tmp_path, caplog):
    info, distinct, _, blob_dir = v5
    bad_dir = tmp_path / "blobs"
    bad_dir.mkdir()
    shutil.copy(blob_dir / info.blob_id, bad_dir / info.blob_id)
    victim = max(distinct.values(), key=lambda c: c.compressed_offset)
    with open(bad_dir / info.blob_id, "r+b") as f:
        f.seek(victim.compressed_offset + victim.compressed_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    device = BlobLayer().open_device([info], LocalfsBackend(dir=bad_dir), filecache(tmp_path), True)
    with caplog.at_level(logging.ERROR, logger="nydus_vfs.storage"):
        with pytest.raises(ChunkCorruptError) as exc_info:
            run(device.read(whole(victim)))
    err = exc_info.value
    assert err.blob_id == info.blob_id and err.chunk_index == victim.index
    assert err.expected == victim.digest.hex() and err.actual != err.expected
    assert info.blob_id in str(err) and f"chunk {victim.index}" in str(err) and victim.digest.hex() in str(err)
    assert "corrupt chunk data" in caplog.text and info.blob_id in caplog.text
    # Other chunks are fine.
    for c in distinct.values():
        if c.index != victim.index:
            assert hashlib.sha256(read(device, whole(c))).digest() == c.digest
    # Nothing bad was cached: the map says not ready and the cache file is a hole there.
    state_cache = device._states[0].cache
    assert not state_cache.map.is_ready(victim)
    assert os.pread(state_cache.fd, victim.uncompressed_size, victim.uncompressed_offset) == \
        bytes(victim.uncompressed_size)
    # And it keeps failing rather than serving bad bytes.
    with pytest.raises(ChunkCorruptError):
        run(device.read([(victim, 0, 10)]))
    device.close()


def test_corrupt_compressed_chunk_reports_decompression(tmp_path):
    sb = make_blob([b"hello world " * 500, b"second " * 300])
    broken = bytearray(sb.data)
    c0 = sb.chunks[0]
    broken[c0.compressed_offset:c0.compressed_offset + 8] = b"\xff" * 8
    backend = InMemoryBackend({sb.blob_id: bytes(broken)})
    device = BlobLayer().open_device([sb.info], backend, filecache(tmp_path), digest_validate=False)
    with pytest.raises(ChunkCorruptError, match="cannot decompress.*zstd"):
        run(device.read(whole(c0)))
    assert read(device, whole(sb.chunks[1])) == sb.plain[1]


def test_without_validation_bad_bytes_pass_and_with_it_they_do_not(tmp_path):
    sb = make_blob([b"A" * 6000], compressor=Compressor.NONE)
    bad = bytearray(sb.data)
    bad[100] ^= 1
    backend = InMemoryBackend({sb.blob_id: bytes(bad)}, identity="shared")
    layer = BlobLayer()
    lax = layer.open_device([sb.info], backend, filecache(tmp_path), digest_validate=False)
    strict = layer.open_device([sb.info], InMemoryBackend({sb.blob_id: bytes(bad)}, identity="shared"),
                               filecache(tmp_path), digest_validate=True)
    assert read(lax, whole(sb.chunks[0])) == bytes(bad)  # lax device trusts the backend
    # The strict device shares the cache state but checks what the lax one stored.
    with pytest.raises(ChunkCorruptError, match="digest mismatch"):
        run(strict.read(whole(sb.chunks[0])))



def test_a_record_at_a_verified_offset_with_another_digest_is_checked_again(tmp_path):
    # Hostile metadata: a second record claims a chunk already verified in the
    # cache, with a different digest.  It must not ride on the first one's check.
    sb = make_blob([b"V" * 6000], compressor=Compressor.NONE)
    good = sb.chunks[0]
    liar = dataclasses.replace(good, digest=bytes(b ^ 0xFF for b in good.digest))
    device = BlobLayer().open_device([sb.info], memory_backend(sb), filecache(tmp_path), digest_validate=True)
    assert read(device, whole(good)) == sb.plain[0]
    with pytest.raises(ChunkCorruptError, match="digest mismatch"):
        run(device.read(whole(liar)))
    assert read(device, whole(good)) == sb.plain[0]

def test_cache_validate_refetches_a_damaged_cache_file(tmp_path, caplog):
    sb = make_blob([b"q" * 5000, b"r" * 5000])
    backend = memory_backend(sb)
    cache = filecache(tmp_path, validate=True)
    device = BlobLayer().open_device([sb.info], backend, cache)
    assert read(device, whole(sb.chunks[0])) == sb.plain[0]
    device.close()
    data_path = tmp_path / "cache" / f"{sb.blob_id}.blob.data"
    with open(data_path, "r+b") as f:
        f.write(b"garbage")
    device = BlobLayer().open_device([sb.info], backend, cache)
    with caplog.at_level(logging.WARNING, logger="nydus_vfs.storage"):
        assert read(device, whole(sb.chunks[0])) == sb.plain[0]
    assert "fetching it again" in caplog.text
    assert len(backend.reads) == 2
    # Validated hits come back as checked bytes, not segments.
    assert all(isinstance(p, bytes) for p in run(device.read(whole(sb.chunks[0]))))


def test_crc32c_is_checked_instead_of_the_digest():
    sb = make_blob([b"crc me " * 100], with_crc=True)
    c = sb.chunks[0]
    plain = sb.plain[0]
    verify_chunk(plain, sb.info, c)
    # A wrong digest does not matter when the CRC is present (nydusd does the same).
    verify_chunk(plain, sb.info, dataclasses.replace(c, digest=b"\x01" * 32))
    with pytest.raises(ChunkCorruptError, match="CRC-32C mismatch") as info:
        verify_chunk(plain, sb.info, dataclasses.replace(c, crc32=c.crc32 ^ 1))
    assert info.value.expected == f"{c.crc32 ^ 1:08x}"


def test_chunks_without_a_digest_are_not_checked():
    sb = make_blob([b"tarfs"], compressor=Compressor.NONE)
    c = sb.chunks[0]
    for empty in (b"", bytes(32)):
        verify_chunk(b"other", sb.info, dataclasses.replace(c, digest=empty))


def test_decode_chunk_size_mismatch_for_raw_chunks():
    sb = make_blob([b"abc"], compressor=Compressor.NONE)
    with pytest.raises(ChunkCorruptError, match="size mismatch"):
        decode_chunk(b"ab", sb.info, sb.chunks[0], validate=False)


# -- refusing bad or unsupported chunk records ----------------------------------------

@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"flags": ChunkFlags.ENCRYPTED | ChunkFlags.COMPRESSED}, "encrypted chunks are not supported"),
        ({"flags": ChunkFlags.BATCH | ChunkFlags.COMPRESSED}, "batch chunks are not supported"),
        ({"uncompressed_size": 0}, "uncompressed_size 0"),
        ({"uncompressed_size": MAX_CHUNK_SIZE + 1}, "uncompressed_size"),
        ({"compressed_size": 0}, "compressed_size 0"),
        ({"compressed_size": 1 << 31}, "compressed_size"),
        ({"flags": 0, "compressed_size": 7}, "uncompressed chunk with compressed_size 7"),
        ({"uncompressed_offset": 1 << 44}, "offsets out of range"),
    ],
)
def test_bad_chunk_records_are_refused_before_io(change, match):
    sb = make_blob([b"z" * 5000])
    bad = dataclasses.replace(sb.chunks[0], **change)
    backend = memory_backend(sb)
    device = BlobLayer().open_device([sb.info], backend, NOCACHE)
    assert run(device.fetch_chunks(0, [bad], 1 << 20)).chunks == 0   # skipped (and logged)
    if bad.uncompressed_size:
        with pytest.raises(StorageError, match=match) as info:
            run(device.read([(bad, 0, 1)]))
        assert sb.blob_id in str(info.value)
    assert backend.attempts == 0


def test_zran_and_encrypted_blobs_are_refused():
    sb = make_blob([b"z" * 5000])
    for info in (dataclasses.replace(sb.info, features=sb.info.features | BlobFeatures.ZRAN),
                 dataclasses.replace(sb.info, cipher=Cipher.AES128_XTS)):
        with pytest.raises(StorageError, match="not supported yet"):
            check_chunk(info, sb.chunks[0])


def test_chunk_index_beyond_the_blob_is_refused(tmp_path):
    sb = make_blob([b"z" * 5000])
    bad = dataclasses.replace(sb.chunks[0], index=5)
    device = BlobLayer().open_device([sb.info], memory_backend(sb), filecache(tmp_path))
    with pytest.raises(StorageError, match="chunk index 5 is outside"):
        run(device.read([(bad, 0, 1)]))


def test_unknown_blob_index_and_bad_ranges():
    sb = make_blob([b"z" * 5000])
    device = BlobLayer().open_device([sb.info], memory_backend(sb), NOCACHE)
    with pytest.raises(StorageError, match="blob index 3"):
        run(device.read([(dataclasses.replace(sb.chunks[0], blob_index=3), 0, 1)]))
    with pytest.raises(ValueError, match="outside a chunk"):
        run(device.read([(sb.chunks[0], 4999, 2)]))
    with pytest.raises(ValueError, match="negative"):
        run(device.read([(sb.chunks[0], 0, -1)]))
    assert run(device.read([(sb.chunks[0], 0, 0)])) == []


def test_missing_blob_surfaces_the_backend_error():
    sb = make_blob([b"z" * 5000])
    device = BlobLayer().open_device([sb.info], InMemoryBackend({}), NOCACHE)
    with pytest.raises(BackendNotFoundError):
        run(device.read(whole(sb.chunks[0])))


def test_blob_table_positions_must_match_indexes():
    sb = make_blob([b"z"], index=1)
    with pytest.raises(StorageError, match="says index 1"):
        BlobLayer().open_device([sb.info], memory_backend(sb), NOCACHE)


# -- holes, slicing, merging ---------------------------------------------------------------

def test_hole_chunks_read_as_zeros_without_any_blob():
    hole = ChunkInfo(digest=b"", blob_index=-1, index=-1, flags=0, compressed_offset=0, compressed_size=0,
                     uncompressed_offset=0, uncompressed_size=1 << 20, file_offset=1 << 20)
    device = BlobLayer().open_device([], InMemoryBackend({}), NOCACHE, digest_validate=True)
    assert run(device.read([(hole, 100, 5000)])) == [bytes(5000)]


def test_iovec_mixing_chunks_holes_and_partial_ranges(tmp_path):
    sb = make_blob([os.urandom(5000), b"x" * 7000, os.urandom(100)])
    hole = ChunkInfo(b"", -1, -1, 0, 0, 0, 0, 4096, 0)
    device = BlobLayer().open_device([sb.info], memory_backend(sb), filecache(tmp_path))
    iovec = [(sb.chunks[0], 4000, 1000), (hole, 0, 4096), (sb.chunks[1], 0, 7000), (sb.chunks[2], 10, 50)]
    expected = sb.plain[0][4000:] + bytes(4096) + sb.plain[1] + sb.plain[2][10:60]
    assert read(device, iovec) == expected  # cold
    assert read(device, iovec) == expected  # warm


def test_adjacent_cached_ranges_become_one_segment(tmp_path):
    sb = make_blob([b"a" * 3000, b"b" * 3000], aligned=False, compressor=Compressor.NONE)
    device = BlobLayer().open_device([sb.info], memory_backend(sb), filecache(tmp_path))
    run(device.fetch_chunks(0, sb.chunks, 0))
    pieces = run(device.read([(sb.chunks[0], 1000, 2000), (sb.chunks[1], 0, 500)]))
    assert len(pieces) == 1 and pieces[0].length == 2500 and pieces[0].offset == 1000
    assert materialize(pieces) == b"a" * 2000 + b"b" * 500


def test_no_cache_uncompressed_local_chunks_are_zero_copy_from_the_blob(tmp_path):
    sb = make_blob([b"raw data " * 500], compressor=Compressor.NONE)
    (tmp_path / sb.blob_id).write_bytes(sb.data)
    backend = LocalfsBackend(dir=tmp_path)
    device = BlobLayer().open_device([sb.info], backend, NOCACHE)
    pieces = run(device.read([(sb.chunks[0], 9, 100)]))
    assert pieces == [FileSegment(backend._files[sb.blob_id][0], 9, 100)]
    assert materialize(pieces) == sb.plain[0][9:109]
    # With validation the bytes must be checked, so they are read instead.
    checked = BlobLayer().open_device([sb.info], backend, NOCACHE, digest_validate=True)
    assert run(checked.read([(sb.chunks[0], 9, 100)])) == [sb.plain[0][9:109]]


# -- sharing, single flight, persistence ---------------------------------------------------

@pytest.mark.parametrize("cache_kind", ["", "blobcache"])
def test_two_devices_sharing_a_blob_read_each_chunk_once(tmp_path, cache_kind):
    sb = make_blob([os.urandom(3000), b"y" * 9000])
    b1 = memory_backend(sb, identity="registry-x")
    b2 = memory_backend(sb, identity="registry-x")
    layer = BlobLayer()
    cache = CacheSpec(cache_kind, str(tmp_path) if cache_kind else None)
    d1 = layer.open_device([sb.info], b1, cache)
    d2 = layer.open_device([sb.info], b2, cache, digest_validate=True)
    assert len(layer) == 1
    for c in sb.chunks:
        assert read(d1, whole(c)) == read(d2, whole(c)) == sb.plain[c.index]
    assert len(b1.reads) + len(b2.reads) == 2
    d1.close()
    assert len(layer) == 1
    assert read(d2, whole(sb.chunks[0])) == sb.plain[0]
    d2.close()
    d2.close()
    assert len(layer) == 0


def test_different_backends_or_work_dirs_do_not_share(tmp_path):
    sb = make_blob([b"k" * 100])
    layer = BlobLayer()
    d1 = layer.open_device([sb.info], memory_backend(sb), filecache(tmp_path, sub="c1"))
    d2 = layer.open_device([sb.info], memory_backend(sb), filecache(tmp_path, sub="c1"))
    d3 = layer.open_device([sb.info], d1.backend, filecache(tmp_path, sub="c2"))
    assert len(layer) == 3
    for d in (d1, d2, d3):
        assert read(d, whole(sb.chunks[0])) == sb.plain[0]
    # d2 has its own state (another backend) but shares d1's open cache file, so
    # it finds d1's chunk there; d3's work dir is its own, so it fetched again.
    assert d2.backend.reads == []
    assert d1.backend.reads == [(sb.blob_id, 0, sb.chunks[0].compressed_size)] * 2
    for d in (d1, d2, d3):
        d.close()
    assert len(layer) == 0 and layer._files == {}


def test_images_disagreeing_about_a_blob_do_not_share_its_cache_file(tmp_path, caplog):
    sb = make_blob([b"1" * 5000, b"2" * 5000])
    layer = BlobLayer()
    backend = memory_backend(sb)
    good = layer.open_device([sb.info], backend, filecache(tmp_path))
    liar_info = dataclasses.replace(sb.info, chunk_count=1)
    with caplog.at_level(logging.WARNING, logger="nydus_vfs.storage"):
        liar = layer.open_device([liar_info], backend, filecache(tmp_path))
    assert "without the file cache" in caplog.text and "says 1 chunks" in caplog.text
    assert read(liar, whole(sb.chunks[1])) == sb.plain[1]  # served, just not file-cached
    assert read(good, whole(sb.chunks[1])) == sb.plain[1]
    assert os.path.getsize(tmp_path / "cache" / f"{sb.blob_id}.blob.data.chunk_map") == 4096 + 1
    liar.close()
    good.close()


def test_absurd_blob_size_fails_the_open_cleanly(tmp_path):
    sb = make_blob([b"1" * 10])
    layer = BlobLayer()
    with pytest.raises(StorageError, match="exceeds the RAFS limit"):
        layer.open_device([dataclasses.replace(sb.info, uncompressed_size=1 << 50)], memory_backend(sb),
                          filecache(tmp_path))
    assert len(layer) == 0


def test_concurrent_reads_of_a_missing_chunk_fetch_once(tmp_path):
    sb = make_blob([os.urandom(100) * 50])

    async def main(cache):
        backend = memory_backend(sb)
        backend.gate = asyncio.Event()
        device = BlobLayer().open_device([sb.info], backend, cache, digest_validate=True)
        tasks = [asyncio.ensure_future(device.read([(sb.chunks[0], i * 10, 10)])) for i in range(20)]
        await asyncio.sleep(0.01)
        assert backend.attempts == 1
        backend.gate.set()
        results = await asyncio.gather(*tasks)
        assert [materialize(r) for r in results] == [sb.plain[0][i * 10:i * 10 + 10] for i in range(20)]
        assert len(backend.reads) == 1

    run(main(NOCACHE))
    run(main(filecache(tmp_path)))


def test_concurrent_chunks_sharing_an_offset_get_their_own_bytes():
    # Hostile metadata: two records claim the same uncompressed offset with
    # different sizes.  Neither may be handed the other's bytes (a short read).
    sb = make_blob([b"s" * 3000, b"L" * 6000], aligned=False, known_count=False)
    small, large = sb.chunks[0], dataclasses.replace(sb.chunks[1], uncompressed_offset=0)

    async def main():
        backend = memory_backend(sb)
        backend.gate = asyncio.Event()
        device = BlobLayer().open_device([sb.info], backend, NOCACHE)
        tasks = [asyncio.ensure_future(device.read(whole(c))) for c in (small, large)]
        await asyncio.sleep(0)
        backend.gate.set()
        return [materialize(r) for r in await asyncio.gather(*tasks)]

    assert run(main()) == sb.plain


def test_a_failed_fetch_fails_all_waiters_and_the_next_read_retries(tmp_path):
    sb = make_blob([b"w" * 5000])

    async def main():
        backend = memory_backend(sb)
        backend.gate = asyncio.Event()
        backend.fail_next(1, retryable=False)
        device = BlobLayer().open_device([sb.info], backend, filecache(tmp_path))
        tasks = [asyncio.ensure_future(device.read(whole(sb.chunks[0]))) for _ in range(3)]
        await asyncio.sleep(0)
        backend.gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, StorageError) for r in results)
        assert materialize(await device.read(whole(sb.chunks[0]))) == sb.plain[0]

    run(main())


def test_cache_persists_across_blob_layers(tmp_path):
    sb = make_blob([os.urandom(5000), b"p" * 5000, b"q" * 10])
    cache = filecache(tmp_path)
    backend = memory_backend(sb)
    device = BlobLayer().open_device([sb.info], backend, cache)
    read(device, whole(sb.chunks[0]))
    read(device, whole(sb.chunks[2]))
    device.close()
    assert len(backend.reads) == 2

    # A "restarted daemon": new layer, new backend, same work dir.
    backend2 = memory_backend(sb)
    device2 = BlobLayer().open_device([sb.info], backend2, cache)
    pieces = run(device2.read(whole(sb.chunks[0])))
    assert all(isinstance(p, FileSegment) for p in pieces)
    assert materialize(pieces) == sb.plain[0]
    assert read(device2, whole(sb.chunks[2])) == sb.plain[2]
    assert backend2.reads == []
    assert read(device2, whole(sb.chunks[1])) == sb.plain[1]
    assert len(backend2.reads) == 1
    device2.close()


def test_v5_without_ext_table_caches_by_range(tmp_path):
    # Old v5 images: chunk_count unknown and every chunk index 0.
    sb = make_blob([b"1" * 3000, b"2" * 4000], aligned=False, known_count=False)
    chunks = [dataclasses.replace(c, index=0) for c in sb.chunks]
    backend = memory_backend(sb)
    device = BlobLayer().open_device([sb.info], backend, filecache(tmp_path))
    assert [read(device, whole(c)) for c in chunks] == sb.plain
    assert [read(device, whole(c)) for c in chunks] == sb.plain
    assert len(backend.reads) == 2
    assert os.path.getsize(tmp_path / "cache" / f"{sb.blob_id}.blob.data") == 7000


# -- the hot path -------------------------------------------------------------------------

def _complete_without_loop(coro):
    """Drive ``coro`` like the FUSE server does for non-suspending reads."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise AssertionError("the read suspended")


def test_warm_and_local_cold_reads_never_suspend(tmp_path):
    sb = make_blob([os.urandom(1000) * 200])
    (tmp_path / sb.blob_id).write_bytes(sb.data)
    device = BlobLayer().open_device([sb.info], LocalfsBackend(dir=tmp_path), filecache(tmp_path), True)
    cold = _complete_without_loop(device.read([(sb.chunks[0], 0, 131072)]))
    assert materialize(cold) == sb.plain[0][:131072]
    warm = _complete_without_loop(device.read([(sb.chunks[0], 131072, 68928)]))
    assert len(warm) == 1 and isinstance(warm[0], FileSegment)
    assert materialize(warm) == sb.plain[0][131072:]


def test_metrics_count_hits(tmp_path):
    sb = make_blob([b"m" * 5000, b"n" * 5000])
    device = BlobLayer().open_device([sb.info], memory_backend(sb), filecache(tmp_path))
    assert device.metrics.underlying_files == [str(tmp_path / "cache" / f"{sb.blob_id}.blob.data")]
    read(device, [(sb.chunks[0], 0, 10)])
    read(device, [(sb.chunks[0], 0, 10), (sb.chunks[1], 0, 10)])
    read(device, [(sb.chunks[0], 0, 10), (sb.chunks[1], 0, 10)])
    m = device.metrics
    assert (m.total, m.whole_hits, m.partial_hits) == (3, 1, 3)
    assert device.backend.metrics.read_count == 2


def test_prefetch_warms_the_cache(tmp_path):
    sb = make_blob([b"f" * 5000, b"g" * 5000])
    backend = memory_backend(sb)
    device = BlobLayer().open_device([sb.info], backend, filecache(tmp_path))
    hole = ChunkInfo(b"", -1, -1, 0, 0, 0, 0, 10, 0)
    stats = run(device.fetch_chunks(0, sb.chunks + [hole], 1 << 20))
    assert (stats.chunks, stats.requests) == (2, 1)
    assert run(device.fetch_chunks(0, sb.chunks, 1 << 20)).chunks == 0
    assert read(device, whole(sb.chunks[1])) == sb.plain[1]
    assert len(backend.reads) == 1


def test_closed_device_and_layer(tmp_path):
    sb = make_blob([b"c" * 10])
    layer = BlobLayer()
    device = layer.open_device([sb.info], memory_backend(sb), filecache(tmp_path))
    other = layer.open_device([sb.info], device.backend, filecache(tmp_path))
    device.close()
    with pytest.raises(StorageError, match="closed"):
        run(device.read(whole(sb.chunks[0])))
    layer.close()
    assert len(layer) == 0
    assert "closed" in repr(device)
    other.close()  # after the layer itself closed: harmless


def test_work_dir_is_created_and_must_be_a_directory(tmp_path):
    sb = make_blob([b"c" * 10])
    layer = BlobLayer()
    device = layer.open_device([sb.info], memory_backend(sb), CacheSpec("filecache", str(tmp_path / "a/b")))
    assert (tmp_path / "a" / "b" / f"{sb.blob_id}.blob.data").exists()
    device.close()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a directory|File exists"):
        layer.open_device([sb.info], memory_backend(sb), CacheSpec("filecache", str(tmp_path / "file")))


def test_failed_open_releases_what_it_acquired(tmp_path):
    good = make_blob([b"a"], blob_id="a" * 64)
    bad = make_blob([b"b"], blob_id="../bad", index=1)
    layer = BlobLayer()
    with pytest.raises(StorageError):
        layer.open_device([good.info, bad.info], InMemoryBackend({}), filecache(tmp_path))
    assert len(layer) == 0


# -- persistence, repair and failure logging (issue 9 item 2, issue 7 items 9 and 10) ------

def test_restarted_layer_serves_everything_from_the_cache_with_zero_backend_bytes(tmp_path):
    sb = make_blob([os.urandom(3000) for _ in range(6)])
    cache = filecache(tmp_path)

    async def first():
        backend = memory_backend(sb)
        device = BlobLayer().open_device([sb.info], backend, cache)
        for c in sb.chunks:
            materialize(await device.read(whole(c)))
        device.close()   # batched syncs still pending are completed here
        return backend

    assert len(run(first()).reads) == 6
    backend2 = memory_backend(sb)
    device2 = BlobLayer().open_device([sb.info], backend2, cache)
    assert [read(device2, whole(c)) for c in sb.chunks] == sb.plain
    assert backend2.metrics.read_amount_total == 0 and backend2.attempts == 0
    device2.close()


def test_a_shrunken_cache_file_is_refetched_not_a_permanent_error(tmp_path, caplog):
    sb = make_blob([os.urandom(5000), os.urandom(5000)])
    backend = memory_backend(sb)
    device = BlobLayer().open_device([sb.info], backend, filecache(tmp_path))
    assert [read(device, whole(c)) for c in sb.chunks] == sb.plain
    data_path = tmp_path / "cache" / f"{sb.blob_id}.blob.data"
    os.truncate(data_path, 100)
    with caplog.at_level(logging.WARNING, logger="nydus_vfs.storage"):
        assert [read(device, whole(c)) for c in sb.chunks] == sb.plain
    assert len(backend.reads) == 4
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(data_path) in warnings[0].getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    # Repaired: served from the cache again.
    assert [read(device, whole(c)) for c in sb.chunks] == sb.plain
    assert len(backend.reads) == 4
    device.close()


def test_a_shrunken_cache_file_with_validation_is_refetched(tmp_path):
    sb = make_blob([os.urandom(5000), os.urandom(5000)])
    backend = memory_backend(sb)
    device = BlobLayer().open_device([sb.info], backend, filecache(tmp_path, validate=True), True)
    assert [read(device, whole(c)) for c in sb.chunks] == sb.plain
    os.truncate(tmp_path / "cache" / f"{sb.blob_id}.blob.data", 0)
    assert [read(device, whole(c)) for c in sb.chunks] == sb.plain
    assert len(backend.reads) == 4
    device.close()


def test_disk_full_cache_reads_from_the_backend_with_one_warning(tmp_path, monkeypatch, caplog):
    sb = make_blob([bytes([i]) * 3000 for i in range(5)])
    backend = memory_backend(sb)
    device = BlobLayer().open_device([sb.info], backend, filecache(tmp_path))

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    with caplog.at_level(logging.WARNING, logger="nydus_vfs.storage"):
        for _ in range(2):
            assert [read(device, whole(c)) for c in sb.chunks] == sb.plain
    assert len(backend.reads) == 10
    assert len(caplog.records) == 1 and "No space left on device" in caplog.records[0].getMessage()
    device.close()


def test_a_failing_chunk_is_logged_once_however_often_it_is_read(tmp_path, caplog):
    sb = make_blob([os.urandom(5000), os.urandom(5000)])
    bad = bytearray(sb.data)
    bad[sb.chunks[1].compressed_offset + 3] ^= 0xFF
    backend = InMemoryBackend({sb.blob_id: bytes(bad)})
    device = BlobLayer().open_device([sb.info], backend, filecache(tmp_path), True)
    with caplog.at_level(logging.DEBUG, logger="nydus_vfs"):
        for _ in range(50):
            with pytest.raises(ChunkCorruptError):
                run(device.read([(sb.chunks[1], 100, 10)]))
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "chunk 1" in errors[0].getMessage()
    device.close()


def test_failures_of_many_chunks_are_rate_limited_with_a_count(tmp_path, caplog):
    sb = make_blob([os.urandom(300) for _ in range(100)])
    backend = memory_backend(sb)
    device = BlobLayer().open_device([sb.info], backend, NOCACHE)
    backend.fail_next(100, retryable=False)
    with caplog.at_level(logging.DEBUG, logger="nydus_vfs"):
        for c in sb.chunks:
            with pytest.raises(StorageError):
                run(device.read(whole(c)))
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert 1 <= len(errors) <= 20
    assert device._limiter.suppressed == 100 - len(errors)
    device.close()


# -- amplify_io: a miss brings its neighbours in the same request ---------------------------

def _amp_device(tmp_path, sb, amplify, cache=True, backend=None):
    backend = backend or memory_backend(sb)
    spec = filecache(tmp_path) if cache else NOCACHE
    return BlobLayer().open_device([sb.info], backend, spec, amplify_io=amplify), backend


def _read_in_file(device, chunks, k):
    return materialize(run(device.read(whole(chunks[k]), (chunks, k))))


@pytest.mark.parametrize("cache", [True, False])
def test_a_miss_fetches_the_following_chunks_in_one_request(tmp_path, cache):
    sb = make_blob([os.urandom(3000) for _ in range(8)], aligned=False)
    device, backend = _amp_device(tmp_path, sb, 4 * 3000 + 10, cache)
    assert _read_in_file(device, sb.chunks, 0) == sb.plain[0]
    assert backend.reads == [(sb.blob_id, 0, 4 * 3000)]
    assert [_read_in_file(device, sb.chunks, k) for k in (1, 2, 3)] == sb.plain[1:4]
    assert len(backend.reads) == 1
    assert _read_in_file(device, sb.chunks, 5) == sb.plain[5]
    assert backend.reads[1] == (sb.blob_id, 5 * 3000, 3 * 3000)
    # Already cached neighbours are not fetched again.
    assert _read_in_file(device, sb.chunks, 4) == sb.plain[4]
    assert backend.reads[2] == (sb.blob_id, 4 * 3000, 3000)
    device.close()


def test_the_amplify_window_counts_file_bytes_not_stored_bytes(tmp_path):
    # Compressible chunks store a few bytes each: a window measured in stored
    # bytes would take the whole blob; nydusd's counts file (uncompressed) bytes.
    sb = make_blob([bytes([k]) * 3000 for k in range(8)], aligned=False)
    assert all(c.compressed_size < 100 for c in sb.chunks)
    device, backend = _amp_device(tmp_path, sb, 4 * 3000 + 10)
    assert _read_in_file(device, sb.chunks, 0) == sb.plain[0]
    c = sb.chunks
    assert backend.reads == [(sb.blob_id, 0, c[3].compressed_offset + c[3].compressed_size)]
    device.close()


def test_without_amplify_or_with_a_local_backend_each_miss_is_one_chunk(tmp_path):
    sb = make_blob([os.urandom(3000) for _ in range(4)], aligned=False)
    device, backend = _amp_device(tmp_path, sb, 0)
    assert [_read_in_file(device, sb.chunks, k) for k in range(4)] == sb.plain
    assert len(backend.reads) == 4
    device.close()
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / sb.blob_id).write_bytes(sb.data)
    local = LocalfsBackend(dir=tmp_path / "blobs")
    device = BlobLayer().open_device([sb.info], local, filecache(tmp_path, sub="c2"), amplify_io=1 << 20)
    assert [_read_in_file(device, sb.chunks, k) for k in range(4)] == sb.plain
    assert local.metrics.read_count == 4
    device.close()


def test_a_read_of_a_chunk_in_an_amplified_request_waits_for_it(tmp_path):
    sb = make_blob([os.urandom(3000) for _ in range(4)], aligned=False)
    backend = memory_backend(sb)
    device, _ = _amp_device(tmp_path, sb, 1 << 20, backend=backend)

    async def main():
        backend.gate = asyncio.Event()
        first = asyncio.create_task(device.read(whole(sb.chunks[0]), (sb.chunks, 0)))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(device.read(whole(sb.chunks[2]), (sb.chunks, 2)))
        await asyncio.sleep(0.01)
        assert backend.attempts == 1
        backend.gate.set()
        return materialize(await first), materialize(await second)

    assert run(main()) == (sb.plain[0], sb.plain[2])
    assert backend.reads == [(sb.blob_id, 0, 4 * 3000)]
    device.close()


def test_a_failed_amplified_request_fails_its_readers_and_is_retried_next_time(tmp_path):
    sb = make_blob([os.urandom(3000) for _ in range(4)], aligned=False)
    device, backend = _amp_device(tmp_path, sb, 1 << 20)
    backend.fail_next(1, retryable=False)
    with pytest.raises(StorageError, match="injected"):
        _read_in_file(device, sb.chunks, 1)
    assert _read_in_file(device, sb.chunks, 1) == sb.plain[1]
    assert backend.reads == [(sb.blob_id, 3000, 3 * 3000)]
    device.close()


def test_metrics_json_has_nydusd_blobcache_fields(tmp_path):
    sb = make_blob([b"m" * 5000, b"n" * 5000])
    device = BlobLayer().open_device([sb.info], memory_backend(sb), filecache(tmp_path))
    read(device, whole(sb.chunks[0]))
    doc = device.metrics_json("/snap")
    assert set(doc) == {
        "id", "underlying_files", "store_path", "partial_hits", "whole_hits", "total", "entries_count",
        "prefetch_data_amount", "prefetch_requests_count", "prefetch_workers", "prefetch_unmerged_chunks",
        "prefetch_cumulative_time_millis", "prefetch_begin_time_secs", "prefetch_begin_time_millis",
        "prefetch_end_time_secs", "prefetch_end_time_millis", "buffered_backend_size", "data_all_ready"}
    assert doc["id"] == "/snap" and doc["entries_count"] == 1 and doc["total"] == 1
    assert doc["store_path"] == str(tmp_path / "cache") and not doc["data_all_ready"]
    read(device, whole(sb.chunks[1]))
    device.flush()
    assert device.metrics_json()["data_all_ready"]
    device.close()


def test_big_merged_local_reads_run_off_the_loop_and_land_in_the_cache(tmp_path):
    sb = make_blob([os.urandom(400_000) for _ in range(4)], aligned=False)
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / sb.blob_id).write_bytes(sb.data)
    local = LocalfsBackend(dir=tmp_path / "blobs")
    device = BlobLayer().open_device([sb.info], local, filecache(tmp_path))
    stats = run(device.fetch_chunks(0, sb.chunks, 4 << 20))
    assert (stats.requests, stats.chunks, stats.bytes) == (1, 4, len(sb.data))
    assert [read(device, whole(c)) for c in sb.chunks] == sb.plain
    assert local.metrics.read_count == 1
    device.close()


def test_merged_fetch_skips_a_chunk_index_outside_the_map(tmp_path, caplog):
    sb = make_blob([b"a" * 3000, b"b" * 3000])
    bad = dataclasses.replace(sb.chunks[1], index=99)
    backend = memory_backend(sb)
    device = BlobLayer().open_device([sb.info], backend, filecache(tmp_path))
    with caplog.at_level(logging.ERROR, logger="nydus_vfs.storage"):
        stats = run(device.fetch_chunks(0, [sb.chunks[0], bad], 1 << 20))
    assert stats.chunks == 1 and "outside the blob's 2 chunks" in caplog.text
    device.close()
