"""The prefetch engine: what it fetches, merging, pacing, single flight, cancellation, counters."""

from __future__ import annotations

import asyncio
import logging
import os
import random

import pytest

from nydus_vfs.builder import BuildOptions, build, parse_prefetch_patterns
from nydus_vfs.config import PrefetchConfig, parse_daemon_config as load_config
from nydus_vfs.fs import RafsFs, load_bootstrap, prefetch_config, prefetch_rafs
from nydus_vfs.fs import prefetch as prefetch_mod
from nydus_vfs.storage import BlobLayer, CacheSpec
from nydus_vfs.testing.backend import InMemoryBackend

CHUNK = 0x10000


def _tree(root):
    rnd = random.Random(7)
    (root / "hot" / "sub").mkdir(parents=True)
    (root / "cold").mkdir()
    files = {
        "hot/a": 5 * CHUNK + 123, "hot/sub/b": 3 * CHUNK, "hot/small": 100,
        "cold/c": 4 * CHUNK + 1, "cold/d": 2 * CHUNK, "top": CHUNK // 2,
    }
    for name, size in files.items():
        (root / name).write_bytes(rnd.randbytes(size))
    return files


@pytest.fixture(params=[5, 6])
def image(request, tmp_path):
    src = tmp_path / "src"
    files = _tree(src)
    out = tmp_path / "out"
    out.mkdir()
    r = build(str(src), BuildOptions(fs_version=request.param, chunk_size=CHUNK, prefetch_policy="fs",
                                     prefetch_patterns=parse_prefetch_patterns(["/hot"]),
                                     bootstrap=str(out / "boot"), blob_dir=str(out)))
    blobs = {bid: (out / bid).read_bytes() for bid in r.blobs}
    return {"boot": str(out / "boot"), "blobs": blobs, "files": files, "src": src, "tmp": tmp_path}


class GatedBackend(InMemoryBackend):
    """Holds reads whose range starts in ``held`` until ``release`` is set."""

    def __init__(self, blobs):
        super().__init__(blobs)
        self.held: set[int] = set()
        self.release = asyncio.Event()
        self.waiting = asyncio.Event()

    async def _read(self, blob_id, offset, size):
        if offset in self.held:
            self.waiting.set()
            await self.release.wait()
        return await super()._read(blob_id, offset, size)


def _open(image, backend=None, *, cache=True, amplify_io=0, work="cache"):
    boot = load_bootstrap(image["boot"])
    backend = backend or InMemoryBackend(image["blobs"])
    spec = CacheSpec("blobcache", str(image["tmp"] / work)) if cache else CacheSpec("")
    device = BlobLayer().open_device(boot.blobs, backend, spec, amplify_io=amplify_io)
    return RafsFs(boot, device, source=image["boot"]), backend


def _ino(fs, path):
    return prefetch_mod._resolve(fs, path)


def _chunks_of(fs, path):
    return fs.bootstrap.chunks(_ino(fs, path))


def _cached(fs, path):
    return all(fs.device.is_cached(c) for c in _chunks_of(fs, path))


async def _read_all(fs, path):
    ino = _ino(fs, path)
    size = fs.attr(ino).size
    out = bytearray()
    while len(out) < size:
        pieces = await fs.read(ino, 0, len(out), 128 << 10)
        for p in pieces if isinstance(pieces, list) else [pieces]:
            out += os.pread(p.fd, p.length, p.offset) if hasattr(p, "fd") else p
    return bytes(out)


def cfg(**kw):
    base = dict(enable=True, threads=4, batch_size=1 << 20, bandwidth_limit=0, prefetch_all=False)
    base.update(kw)
    return PrefetchConfig(**base)


def test_the_prefetch_table_is_cached_before_any_read_and_then_read_without_the_backend(image):
    fs, backend = _open(image)

    async def main():
        report = await prefetch_rafs(fs, None, cfg())
        assert report.errors == 0 and report.inodes == 3
        for name in ("/hot/a", "/hot/sub/b", "/hot/small"):
            assert _cached(fs, name), name
        assert not _cached(fs, "/cold/c") and not _cached(fs, "/top")
        before = backend.metrics.read_count
        for name in ("hot/a", "hot/sub/b", "hot/small"):
            assert await _read_all(fs, "/" + name) == (image["src"] / name).read_bytes()
        assert backend.metrics.read_count == before
        return report

    report = asyncio.run(main())
    m = fs.device.metrics_json("/")
    assert m["prefetch_unmerged_chunks"] == report.fetched_chunks == 10
    assert m["prefetch_requests_count"] == report.requests < report.fetched_chunks   # merged
    assert m["prefetch_data_amount"] == report.fetched_bytes > 0
    assert m["prefetch_workers"] == 4 and not m["data_all_ready"]
    assert m["prefetch_end_time_millis"] >= m["prefetch_begin_time_millis"] > 0
    fs.close()


def test_prefetch_files_override_the_table_dirs_mean_subtrees_missing_are_reported(image, caplog):
    fs, backend = _open(image)
    with caplog.at_level(logging.WARNING, logger="nydus_vfs.fs"):
        report = asyncio.run(prefetch_rafs(fs, ["/cold", "/nope/x", "/top"], cfg()))
    assert report.missing == ["/nope/x"] and "/nope/x is not in the image" in caplog.text
    assert _cached(fs, "/cold/c") and _cached(fs, "/cold/d") and _cached(fs, "/top")
    assert not _cached(fs, "/hot/a")
    fs.close()


def test_prefetch_all_fetches_everything_and_the_cache_is_all_ready(image):
    fs, backend = _open(image)
    asyncio.run(prefetch_rafs(fs, None, cfg(prefetch_all=True)))
    for name in image["files"]:
        assert _cached(fs, "/" + name), name
    assert fs.device.metrics_json()["data_all_ready"]
    # A restarted daemon over the same work dir needs no backend at all.
    fs.close()
    fs2, backend2 = _open(image)
    for name in image["files"]:
        assert asyncio.run(_read_all(fs2, "/" + name)) == (image["src"] / name).read_bytes()
    assert backend2.attempts == 0
    fs2.close()


def test_merging_size_bounds_each_request(image):
    fs, backend = _open(image)
    report = asyncio.run(prefetch_rafs(fs, ["/hot"], cfg(batch_size=0)))
    assert report.requests == report.fetched_chunks == 10
    fs.close()
    fs, backend = _open(image, work="cache2")
    report = asyncio.run(prefetch_rafs(fs, ["/hot"], cfg(batch_size=2 * CHUNK + 100)))
    assert all(size <= 2 * CHUNK + 100 for _, _, size in backend.reads)
    assert report.requests < report.fetched_chunks
    fs.close()


def test_disabled_or_without_a_file_cache_nothing_is_fetched(image):
    fs, backend = _open(image)
    report = asyncio.run(prefetch_rafs(fs, None, cfg(enable=False)))
    assert report.skipped and backend.attempts == 0
    fs.close()
    fs, backend = _open(image, cache=False)
    report = asyncio.run(prefetch_rafs(fs, None, cfg()))
    assert "no blob cache" in report.skipped and backend.attempts == 0
    fs.close()


def test_bandwidth_limit_paces_requests(image, monkeypatch):
    fs, backend = _open(image)
    waits = []
    real_sleep = asyncio.sleep

    async def fake_sleep(delay, *a):
        waits.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(prefetch_mod.asyncio, "sleep", fake_sleep)
    rate = 100  # below the chunk size: raised to it
    report = asyncio.run(prefetch_rafs(fs, ["/hot"], cfg(threads=1, batch_size=CHUNK, bandwidth_limit=rate)))
    planned = sum(c.compressed_size for n in ("/hot/a", "/hot/sub/b", "/hot/small") for c in _chunks_of(fs, n))
    assert report.fetched_chunks == 10
    # One worker, sleep not advancing the clock: the last request is scheduled after all the
    # bytes before it went out at chunk_size bytes/s (rate raised to the chunk size).
    assert len([w for w in waits if w > 0]) >= 5
    assert (planned - CHUNK) / CHUNK - 0.5 <= max(waits) <= planned / CHUNK
    fs.close()


def test_a_foreground_read_of_a_chunk_in_flight_waits_for_the_prefetch_request(image):
    boot = load_bootstrap(image["boot"])
    backend = GatedBackend(image["blobs"])
    fs, _ = _open(image, backend)
    first = _chunks_of(fs, "/hot/a")[0]
    backend.held.add(first.compressed_offset)

    async def main():
        task = asyncio.create_task(prefetch_rafs(fs, ["/hot/a"], cfg(threads=1)))
        await backend.waiting.wait()
        reader = asyncio.create_task(_read_all(fs, "/hot/a"))
        await asyncio.sleep(0.01)
        assert not reader.done()          # following the prefetch request...
        backend.release.set()
        data = await reader
        await task
        return data

    data = asyncio.run(main())
    assert data == (image["src"] / "hot/a").read_bytes()
    # ...not sending a second one: every chunk came from the prefetch's requests only.
    blob = fs.bootstrap.blobs[0]
    data_reads = [r for r in backend.reads if not (blob.ci_compressed_size and r[1] == blob.ci_offset)]  # not blob.meta
    offsets = [off for _, off, _ in data_reads]
    assert offsets.count(first.compressed_offset) == 1
    assert len(data_reads) == fs.device.metrics.prefetch_requests_count
    fs.close()
    del boot


def test_foreground_reads_are_not_queued_behind_prefetch(image):
    backend = GatedBackend(image["blobs"])
    fs, _ = _open(image, backend)
    for c in _chunks_of(fs, "/hot/a"):
        backend.held.add(c.compressed_offset)

    async def main():
        task = asyncio.create_task(prefetch_rafs(fs, ["/hot/a"], cfg(threads=1, batch_size=0)))
        await backend.waiting.wait()
        # Prefetch is stuck on its first request; a read elsewhere completes anyway.
        data = await asyncio.wait_for(_read_all(fs, "/cold/c"), 30)
        assert not task.done()
        backend.release.set()
        await task
        return data

    assert asyncio.run(main()) == (image["src"] / "cold/c").read_bytes()
    fs.close()


def test_cancelling_prefetch_leaves_nothing_behind_and_waiters_fetch_themselves(image):
    backend = GatedBackend(image["blobs"])
    fs, _ = _open(image, backend)
    first = _chunks_of(fs, "/hot/a")[0]
    backend.held.add(first.compressed_offset)

    async def main():
        task = asyncio.create_task(prefetch_rafs(fs, None, cfg(prefetch_all=True)))
        await backend.waiting.wait()
        reader = asyncio.create_task(_read_all(fs, "/hot/a"))
        await asyncio.sleep(0.01)
        backend.held.clear()            # the reader's own request (after the cancel) is not held
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        data = await asyncio.wait_for(reader, 30)
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert others == []
        assert all(len(s.flights) == 0 for s in fs.device._states)
        return data

    assert asyncio.run(main()) == (image["src"] / "hot/a").read_bytes()
    fs.close()


def test_umount_during_prefetch_ends_it_cleanly(image):
    backend = GatedBackend(image["blobs"])
    fs, _ = _open(image, backend)
    backend.held.add(_chunks_of(fs, "/hot/a")[0].compressed_offset)

    async def main():
        task = asyncio.create_task(prefetch_rafs(fs, None, cfg(prefetch_all=True, threads=2)))
        await backend.waiting.wait()
        fs.close()
        backend.release.set()
        return await asyncio.wait_for(task, 30)

    report = asyncio.run(main())
    assert report.fetched_chunks < 20


def test_prefetch_config_follows_nydusd_v1_and_v2_rules():
    v1 = load_config('{"device": {"backend": {"type": "localfs", "config": {"dir": "/b"}}, '
                     '"cache": {"type": "blobcache", "config": {"work_dir": "/c"}}}, "mode": "direct", '
                     '"fs_prefetch": {"enable": true, "threads_count": 3, "merging_size": 4096}}')
    p = prefetch_config(v1)
    assert (p.enable, p.threads, p.batch_size, p.prefetch_all) == (True, 3, 4096, True)
    off = load_config('{"device": {"backend": {"type": "localfs", "config": {"dir": "/b"}}}, "mode": "direct"}')
    assert not prefetch_config(off).enable
    v2 = load_config('{"version": 2, "backend": {"type": "localfs", "localfs": {"dir": "/b"}}, '
                     '"cache": {"type": "blobcache", "filecache": {"work_dir": "/c"}, '
                     '"prefetch": {"enable": true, "threads": 2, "prefetch_all": true}}, '
                     '"rafs": {"mode": "direct"}}')
    p = prefetch_config(v2)
    assert (p.enable, p.threads, p.prefetch_all) == (True, 2, True)


def test_blob_policy_readahead_window_is_prefetched_when_there_is_no_table(tmp_path):
    src = tmp_path / "src"
    files = _tree(src)
    out = tmp_path / "out"
    out.mkdir()
    r = build(str(src), BuildOptions(fs_version=5, chunk_size=CHUNK, prefetch_policy="blob",
                                     prefetch_patterns=parse_prefetch_patterns(["/hot"]),
                                     bootstrap=str(out / "boot"), blob_dir=str(out)))
    image = {"boot": str(out / "boot"), "blobs": {b: (out / b).read_bytes() for b in r.blobs},
             "files": files, "src": src, "tmp": tmp_path}
    fs, backend = _open(image)
    assert fs.bootstrap.prefetch_inodes == [] and fs.bootstrap.blobs[0].readahead_size > 0
    report = asyncio.run(prefetch_rafs(fs, None, cfg()))
    assert report.fetched_chunks == 10
    assert _cached(fs, "/hot/a") and _cached(fs, "/hot/sub/b") and _cached(fs, "/hot/small")
    assert not _cached(fs, "/cold/c")
    fs.close()
