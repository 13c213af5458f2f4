"""CacheSpec, the per-blob cache file, and the in-memory chunk LRU."""

from __future__ import annotations

import asyncio
import errno
import logging
import os

import pytest

from nydus_vfs.errors import BackendError, ConfigError, StorageError
from nydus_vfs.storage.cache import BlobCacheFile, CacheSpec, ChunkLRU
from tests.unit.storage.storage_helpers import make_blob


@pytest.mark.parametrize("kind", ["blobcache", "filecache"])
def test_cache_spec_file_kinds_need_a_work_dir(kind):
    assert CacheSpec(kind, "/tmp/x").persistent
    with pytest.raises(ConfigError, match="needs a work_dir"):
        CacheSpec(kind)


@pytest.mark.parametrize("kind", ["", "dummycache"])
def test_cache_spec_no_cache_kinds(kind):
    assert not CacheSpec(kind).persistent


@pytest.mark.parametrize("kind", ["dummy", "fscache", "BLOBCACHE"])
def test_cache_spec_rejects_other_kinds(kind):
    with pytest.raises(ConfigError, match="cache.type"):
        CacheSpec(kind, "/tmp")


def test_files_are_named_as_nydusd_names_them(tmp_path):
    sb = make_blob([b"a" * 5000, b"b" * 100])
    cache = BlobCacheFile(str(tmp_path), sb.info)
    assert cache.data_path == str(tmp_path / f"{sb.blob_id}.blob.data")
    assert cache.map_path == str(tmp_path / f"{sb.blob_id}.blob.data.chunk_map")
    assert os.path.exists(cache.map_path)
    # Sized (sparse) to the blob's uncompressed size up front.
    assert os.path.getsize(cache.data_path) == sb.info.uncompressed_size == 8192 + 4096
    cache.close()
    cache.close()


def test_store_then_lookup(tmp_path):
    sb = make_blob([b"a" * 5000, b"b" * 100])
    cache = BlobCacheFile(str(tmp_path), sb.info)
    c0, c1 = sb.chunks
    assert cache.lookup(c1, 0, 10) is None
    assert cache.store(c1, sb.plain[1])
    seg = cache.lookup(c1, 10, 20)
    assert seg.offset == c1.uncompressed_offset + 10 and seg.length == 20
    assert os.pread(seg.fd, seg.length, seg.offset) == b"b" * 20
    assert cache.read_chunk(c1) == sb.plain[1]
    assert cache.lookup(c0, 0, 1) is None
    cache.invalidate(c1)
    assert cache.lookup(c1, 0, 1) is None
    cache.close()
    assert not cache.store(c0, sb.plain[0])  # closed: nothing kept


def test_unknown_size_grows_and_uses_an_in_memory_map(tmp_path):
    sb = make_blob([b"x" * 3000, b"y" * 3000], aligned=False, known_count=False, compressor=0)
    cache = BlobCacheFile(str(tmp_path), sb.info)
    assert os.path.getsize(cache.data_path) == 0
    c0, c1 = sb.chunks
    assert cache.store(c1, sb.plain[1])
    assert os.path.getsize(cache.data_path) == 6000
    assert cache.lookup(c1, 0, 1) is not None and cache.lookup(c0, 0, 1) is None
    cache.close()
    # Not persisted: a new instance knows nothing.
    cache = BlobCacheFile(str(tmp_path), sb.info)
    assert cache.lookup(c1, 0, 1) is None
    cache.close()


def test_lost_data_file_resets_the_map(tmp_path, caplog):
    sb = make_blob([b"a" * 5000])
    cache = BlobCacheFile(str(tmp_path), sb.info)
    cache.store(sb.chunks[0], sb.plain[0])
    cache.close()
    os.unlink(cache.data_path)
    with caplog.at_level(logging.WARNING, logger="nydus_vfs.storage"):
        cache = BlobCacheFile(str(tmp_path), sb.info)
    assert cache.lookup(sb.chunks[0], 0, 1) is None
    assert "missing or truncated" in caplog.text
    cache.close()


def test_unsafe_blob_id_never_becomes_a_path(tmp_path):
    sb = make_blob([b"a"], blob_id="../escape")
    with pytest.raises(BackendError, match="invalid blob id"):
        BlobCacheFile(str(tmp_path), sb.info)


def test_unwritable_work_dir(tmp_path):
    sb = make_blob([b"a"])
    with pytest.raises(StorageError, match="cannot open cache file"):
        BlobCacheFile(str(tmp_path / "missing"), sb.info)


def test_store_failure_is_logged_not_raised(tmp_path, caplog):
    sb = make_blob([b"a" * 10])
    cache = BlobCacheFile(str(tmp_path), sb.info)
    os.close(cache.fd)
    cache.fd = os.open(os.devnull, os.O_RDONLY)  # writes now fail with EBADF
    with caplog.at_level(logging.WARNING, logger="nydus_vfs.storage"):
        assert not cache.store(sb.chunks[0], sb.plain[0])
    assert "cannot cache chunk 0" in caplog.text
    assert cache.lookup(sb.chunks[0], 0, 1) is None
    cache.close()


def test_lru_is_bounded_in_bytes_and_evicts_oldest():
    lru = ChunkLRU(100)
    lru.put(("s", 1), b"a" * 40, False)
    lru.put(("s", 2), b"b" * 40, True)
    assert lru.get(("s", 1)) == (b"a" * 40, False)  # now most recent
    lru.put(("s", 3), b"c" * 40, False)
    assert lru.get(("s", 2)) is None and lru.get(("s", 1)) is not None
    assert lru.used == 80 and len(lru) == 2
    lru.put(("s", 9), b"z" * 101, False)  # larger than the whole cache: ignored
    assert lru.get(("s", 9)) is None
    lru.put(("t", 1), b"t", False)
    lru.discard_prefix("s")
    assert len(lru) == 1 and lru.used == 1
    lru.discard(("t", 1))
    assert len(lru) == 0 and lru.used == 0


# -- durability, repair, disk full, file types (issue 7 items 5 and 9) ------------------

def _map_bit(cache: BlobCacheFile, index: int) -> bool:
    """Whether chunk ``index`` is marked ready in the chunk map *file* (what a restart sees)."""
    with open(cache.map_path, "rb") as f:
        f.seek(4096 + index // 8)
        return bool(f.read(1)[0] & (0x80 >> (index % 8)))


def test_a_chunk_is_marked_only_after_its_data_was_synced(tmp_path, monkeypatch):
    sb = make_blob([b"a" * 5000, b"b" * 5000])
    events = []
    real_sync = os.fdatasync

    def recording_sync(fd):
        # At sync time the data is written but the map must not claim it yet.
        events.append(("sync", _map_bit(cache, 0)))
        real_sync(fd)

    monkeypatch.setattr(os, "fdatasync", recording_sync)
    cache = BlobCacheFile(str(tmp_path), sb.info)
    assert cache.store(sb.chunks[0], sb.plain[0])      # no event loop: synced inline
    assert events == [("sync", False)]
    assert _map_bit(cache, 0) and not _map_bit(cache, 1)
    cache.close()


def test_a_crash_between_write_and_sync_never_claims_the_chunk(tmp_path, monkeypatch):
    sb = make_blob([b"a" * 5000, b"b" * 5000])
    monkeypatch.setattr(BlobCacheFile, "SYNC_DELAY", 3600)  # the batch is not due: the "crash" comes first

    async def main():
        cache = BlobCacheFile(str(tmp_path), sb.info)
        assert cache.store(sb.chunks[0], sb.plain[0])
        assert cache.lookup(sb.chunks[0], 0, 10) is not None   # served in this process
        assert not _map_bit(cache, 0)
        # Crash: nothing is closed or flushed; a restarted daemon opens the files.
        again = BlobCacheFile(str(tmp_path), sb.info)
        assert again.lookup(sb.chunks[0], 0, 10) is None
        again.close()
        cache.flush()
        assert _map_bit(cache, 0)
        cache.close()

    asyncio.run(main())


def test_batched_sync_runs_off_the_loop_and_sets_the_bits(tmp_path, monkeypatch):
    sb = make_blob([bytes([i]) * 3000 for i in range(5)])
    monkeypatch.setattr(BlobCacheFile, "SYNC_DELAY", 0.01)

    async def main():
        cache = BlobCacheFile(str(tmp_path), sb.info)
        for c, p in zip(sb.chunks, sb.plain):
            assert cache.store(c, p)
        assert cache.unsynced
        while cache.unsynced:
            await asyncio.sleep(0.01)
        assert all(_map_bit(cache, i) for i in range(5))
        assert cache.all_ready
        cache.close()

    asyncio.run(main())


def test_a_failed_sync_forgets_the_chunks_with_one_warning(tmp_path, monkeypatch, caplog):
    sb = make_blob([b"a" * 5000, b"b" * 5000])

    def failing_sync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fdatasync", failing_sync)
    cache = BlobCacheFile(str(tmp_path), sb.info)
    with caplog.at_level(logging.WARNING, logger="nydus_vfs.storage"):
        cache.store(sb.chunks[0], sb.plain[0])
        cache.store(sb.chunks[1], sb.plain[1])
    assert cache.lookup(sb.chunks[0], 0, 1) is None and cache.lookup(sb.chunks[1], 0, 1) is None
    assert not _map_bit(cache, 0)
    assert caplog.text.count("cannot sync cache file") == 1
    cache.close()


def test_disk_full_degrades_with_one_warning_and_recovers(tmp_path, monkeypatch, caplog):
    sb = make_blob([bytes([i]) * 3000 for i in range(4)])
    cache = BlobCacheFile(str(tmp_path), sb.info)
    real_pwrite = os.pwrite

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    with caplog.at_level(logging.INFO, logger="nydus_vfs.storage"):
        assert not cache.store(sb.chunks[0], sb.plain[0])
        assert not cache.store(sb.chunks[1], sb.plain[1])
        assert not cache.store(sb.chunks[2], sb.plain[2])
        monkeypatch.setattr(os, "pwrite", real_pwrite)
        assert cache.store(sb.chunks[3], sb.plain[3])
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "No space left on device" in warnings[0].getMessage()
    assert "works again (3 chunks were not cached" in caplog.text
    assert cache.lookup(sb.chunks[3], 0, 1) is not None and cache.lookup(sb.chunks[0], 0, 1) is None
    cache.close()


def test_a_shrunken_data_file_is_a_miss_and_the_map_is_reset(tmp_path, caplog):
    sb = make_blob([b"a" * 5000, b"b" * 5000])
    cache = BlobCacheFile(str(tmp_path), sb.info)
    cache.store(sb.chunks[0], sb.plain[0])
    cache.store(sb.chunks[1], sb.plain[1])
    os.truncate(cache.data_path, 4096)   # someone else truncates it while in use
    with caplog.at_level(logging.WARNING, logger="nydus_vfs.storage"):
        assert cache.lookup(sb.chunks[1], 0, 10) is None
    assert cache.data_path in caplog.text and "fetching them again" in caplog.text
    assert cache.lookup(sb.chunks[0], 0, 10) is None        # every chunk forgotten
    assert os.path.getsize(cache.data_path) == sb.info.uncompressed_size   # regrown
    assert not _map_bit(cache, 0) and not _map_bit(cache, 1)
    assert cache.store(sb.chunks[1], sb.plain[1])
    seg = cache.lookup(sb.chunks[1], 0, 5000)
    assert os.pread(seg.fd, seg.length, seg.offset) == sb.plain[1]
    cache.close()


@pytest.mark.parametrize("which", ["data", "map"])
def test_a_fifo_at_a_cache_path_is_refused_without_blocking(tmp_path, which):
    sb = make_blob([b"a" * 10])
    name = f"{sb.blob_id}.blob.data" + (".chunk_map" if which == "map" else "")
    os.mkfifo(tmp_path / name)
    with pytest.raises(StorageError, match="is not a regular file \\(a FIFO\\)"):
        BlobCacheFile(str(tmp_path), sb.info)


def test_a_device_at_a_cache_path_is_refused(tmp_path):
    sb = make_blob([b"a" * 10])
    os.symlink("/dev/null", tmp_path / f"{sb.blob_id}.blob.data")
    with pytest.raises(StorageError, match="not a regular file \\(a character device\\)"):
        BlobCacheFile(str(tmp_path), sb.info)


# -- the blob meta file (nydus-surface.md §2.4, rafs-format.md §3.9) --------------------------

def _v6_image(tmp_path):
    from nydus_vfs.builder import BuildOptions, build
    from nydus_vfs.fs import load_bootstrap

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(200_000))
    r = build(str(src), BuildOptions(fs_version=6, chunk_size=0x10000, bootstrap=str(tmp_path / "boot"),
                                     blob_dir=str(tmp_path)))
    boot = load_bootstrap(str(tmp_path / "boot"))
    return boot, {b: (tmp_path / b).read_bytes() for b in r.blobs}


def test_the_blob_meta_file_is_filled_on_first_miss_and_reused(tmp_path):
    from nydus_vfs.format.blob import decode_ci_entries, split_blob_meta_file
    from nydus_vfs.storage import BlobLayer
    from nydus_vfs.testing.backend import InMemoryBackend

    boot, blobs = _v6_image(tmp_path)
    blob = boot.blobs[0]
    spec = CacheSpec("blobcache", str(tmp_path / "cache"))
    chunks = boot.chunks(boot.lookup(boot.root_ino, b"f"))
    chunk = chunks[0]

    async def session(k=0):
        backend = InMemoryBackend(blobs)
        device = BlobLayer().open_device(boot.blobs, backend, spec)
        await device.read([(chunks[k], 0, 10)])   # a miss: the meta file is filled on first use
        cache = device._states[0].cache
        if cache.meta_task is not None:
            await cache.meta_task
        device.close()
        return backend

    backend = asyncio.run(session())
    path = tmp_path / "cache" / f"{blob.blob_id}.blob.meta"
    raw = path.read_bytes()
    assert len(raw) == ((blob.ci_uncompressed_size + 4095) & ~4095) + 4096
    header, ci = split_blob_meta_file(raw)
    header.validate(blob)
    entries = decode_ci_entries(ci, header.s_ci_entries, header.is_v2)
    assert [(e.compressed_offset, e.uncompressed_offset) for e in entries][0] == (chunk.compressed_offset,
                                                                                  chunk.uncompressed_offset)
    assert (blob.blob_id, blob.ci_offset, blob.ci_compressed_size + 4096) in backend.reads
    # A valid file is kept: the next daemon does not fetch it again.
    backend = asyncio.run(session(1))
    assert len(backend.reads) == 1
    assert not [r for r in backend.reads if r[1] == blob.ci_offset]
    # A damaged one is replaced.
    path.write_bytes(b"junk")
    backend = asyncio.run(session(2))
    assert [r for r in backend.reads if r[1] == blob.ci_offset]
    assert split_blob_meta_file(path.read_bytes())[0].s_ci_entries == blob.chunk_count


def test_a_blob_without_a_ci_table_gets_no_meta_file(tmp_path):
    sb = make_blob([b"a" * 100])
    cache = BlobCacheFile(str(tmp_path), sb.info)
    assert not cache.meta_wanted
    cache.close()
    assert not os.path.exists(tmp_path / f"{sb.blob_id}.blob.meta")
