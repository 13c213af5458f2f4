"""CacheSpec, the per-blob cache file, and the in-memory chunk LRU."""

from __future__ import annotations

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
