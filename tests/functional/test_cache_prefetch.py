"""Blob cache and prefetch through the daemon: an image built with ``nydus-image create
--prefetch-policy fs`` (patterns on stdin), mounted by ``service.NydusDaemon`` with a v1 config
(localfs backend, blobcache, ``fs_prefetch``), prefetched in the background by the daemon (``fs.prefetch_rafs``).

Backend traffic is measured with the localfs backend's own counters
(``read_count``), the cache state with the chunk map files on disk.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import subprocess
import sys

import pytest

from nydus_vfs.config import load_config_file
from nydus_vfs.service import NydusDaemon
from tests.conftest import requires_fuse
from tests.functional.nydusd_helpers import Nydusd, write_localfs_config

NYDUS_IMAGE = [sys.executable, "-m", "nydus_vfs.cli.nydus_image"]
CHUNK = 0x10000
HOT = {"hot/a": 5 * CHUNK + 7, "hot/deep/b": 2 * CHUNK, "hot/deep/c": 300}
COLD = {"cold/x": 3 * CHUNK + 1, "cold/y": CHUNK, "top": 10}


def _build(tmp_path, version):
    src = tmp_path / "src"
    rnd = random.Random(version)
    for name, size in {**HOT, **COLD}.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(rnd.randbytes(size))
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    p = subprocess.run(NYDUS_IMAGE + ["create", "--fs-version", str(version), "--chunk-size", hex(CHUNK),
                                      "--prefetch-policy", "fs", "--bootstrap", str(tmp_path / "boot"),
                                      "--blob-dir", str(blobs), str(src)],
                       input=b"/hot\n", capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr.decode()
    return src, blobs


def _config(tmp_path, blobs, work_dir, **prefetch):
    doc = {"device": {"backend": {"type": "localfs", "config": {"dir": str(blobs)}},
                      "cache": {"type": "blobcache", "config": {"work_dir": str(work_dir)}}},
           "mode": "direct", "digest_validate": True,
           "fs_prefetch": {"enable": True, "threads_count": 2, "merging_size": 4 * CHUNK, **prefetch}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(doc))
    return load_config_file(path)


def _ready_bits(work_dir) -> int:
    total = 0
    for name in os.listdir(work_dir):
        if name.endswith(".blob.data.chunk_map"):
            raw = (work_dir / name).read_bytes()[4096:]
            total += sum(bin(b).count("1") for b in raw)
    return total


async def _read(fs, path):
    ino = fs.root_ino
    for part in path.split("/"):
        ino = fs.lookup(ino, part.encode()).nodeid
    size = fs.attr(ino).size
    out = bytearray()
    while len(out) < size:
        for p in await fs.read(ino, 0, len(out), 128 << 10):
            out += os.pread(p.fd, p.length, p.offset) if hasattr(p, "fd") else p
    return bytes(out)


@pytest.mark.parametrize("version", [5, 6])
def test_prefetched_files_are_cached_before_any_read_and_read_without_the_backend(tmp_path, version):
    src, blobs = _build(tmp_path, version)
    work = tmp_path / "cache"
    config = _config(tmp_path, blobs, work, prefetch_all=False)

    async def main():
        daemon = NydusDaemon()
        await daemon.mount("/", str(tmp_path / "boot"), config)
        fs = daemon.instance("/").fs
        backend = fs.device.backend
        report = await daemon.prefetched("/")
        assert report.errors == 0 and report.inodes == len(HOT)
        hot_chunks = sum(-(-size // CHUNK) for size in HOT.values())
        # Before any read: the hot files' chunks are in the cache, on disk, and nothing else is.
        assert _ready_bits(work) == hot_chunks == report.fetched_chunks
        m = fs.device.metrics_json("/")
        assert m["prefetch_unmerged_chunks"] == hot_chunks
        assert m["prefetch_requests_count"] == backend.metrics.read_count < hot_chunks   # merged
        assert m["prefetch_data_amount"] == backend.metrics.read_amount_total
        before = backend.metrics.read_count
        for name in HOT:
            assert await _read(fs, name) == (src / name).read_bytes()
        assert backend.metrics.read_count == before
        # Cold files still come from the backend.
        assert await _read(fs, "cold/x") == (src / "cold/x").read_bytes()
        assert backend.metrics.read_count > before
        await daemon.stop()

        # A restarted daemon over the same cache: zero backend requests for what was cached.
        daemon = NydusDaemon()
        await daemon.mount("/", str(tmp_path / "boot"), config)
        fs = daemon.instance("/").fs
        await daemon.prefetched("/")
        for name in [*HOT, "cold/x"]:
            assert await _read(fs, name) == (src / name).read_bytes()
        assert fs.device.backend.metrics.read_count == 0
        await daemon.stop()

    asyncio.run(main())


def test_v1_fs_prefetch_defaults_to_prefetch_all(tmp_path):
    src, blobs = _build(tmp_path, 6)
    work = tmp_path / "cache"
    config = _config(tmp_path, blobs, work)   # prefetch_all absent: true (nydus-surface.md §0 item 11)

    async def main():
        daemon = NydusDaemon()
        await daemon.mount("/", str(tmp_path / "boot"), config)
        fs = daemon.instance("/").fs
        await daemon.prefetched("/")
        assert fs.device.metrics_json()["data_all_ready"]
        before = fs.device.backend.metrics.read_count
        for name in [*HOT, *COLD]:
            assert await _read(fs, name) == (src / name).read_bytes()
        assert fs.device.backend.metrics.read_count == before
        await daemon.stop()

    asyncio.run(main())


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs as the cache dir needs root")
def test_a_full_cache_filesystem_degrades_to_the_backend_with_one_warning(tmp_path, caplog):
    src, blobs = _build(tmp_path, 6)
    work = tmp_path / "smallfs"
    work.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(work)], capture_output=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {p.stderr.decode().strip()}")
    try:
        config = _config(tmp_path, blobs, work)
        config = load_config_file(tmp_path / "config.json")

        async def main():
            daemon = NydusDaemon()
            await daemon.mount("/", str(tmp_path / "boot"), config)
            fs = daemon.instance("/").fs
            with caplog.at_level(logging.WARNING, logger="nydus_vfs"):
                for _ in range(2):
                    for name in [*HOT, *COLD]:
                        assert await _read(fs, name) == (src / name).read_bytes()
                await daemon.prefetched("/")
            await daemon.stop()

        asyncio.run(main())
        # One warning per cache file that could not be written (the data file, and the
        # blob meta the background prefetch writes), however many chunks failed.
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert 1 <= len(warnings) <= 2, [r.getMessage() for r in warnings]
        assert all("No space left on device" in w.getMessage() or "disk full" in w.getMessage()
                   for w in warnings)
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    finally:
        subprocess.run(["umount", "-l", str(work)], capture_output=True)


# -- through nydusd fuse (issue 7 items 9 and 10) -----------------------------------------

def _uncached_read(path) -> bytes:
    """Read ``path`` after dropping its pages, so the daemon (not the page cache) answers."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        out = bytearray()
        while chunk := os.read(fd, 1 << 20):
            out += chunk
        return bytes(out)
    finally:
        os.close(fd)


@requires_fuse
def test_nydusd_repairs_a_cache_file_truncated_while_mounted(tmp_path):
    src, blobs = _build(tmp_path, 6)
    work = tmp_path / "cache"
    cfg = write_localfs_config(tmp_path / "c.json", blobs, work, digest_validate=False, enable_xattr=False)
    with Nydusd(tmp_path, ["--bootstrap", str(tmp_path / "boot"), "--config", str(cfg)]) as d:
        assert _uncached_read(d.mnt / "hot/a") == (src / "hot/a").read_bytes()
        [data_file] = [p for p in work.iterdir() if p.name.endswith(".blob.data")]
        os.truncate(data_file, 100)
        for _ in range(3):
            assert _uncached_read(d.mnt / "hot/a") == (src / "hot/a").read_bytes()
        assert d.alive()
        log = d.logtext()
    assert str(data_file) in log and "fetching them again" in log
    assert " ERROR " not in log and log.count(" WARN ") == 1, log


@requires_fuse
def test_nydusd_logs_a_bad_chunk_once_however_often_it_is_read(tmp_path):
    src, blobs = _build(tmp_path, 6)
    [blob] = list(blobs.iterdir())
    raw = bytearray(blob.read_bytes())
    raw[10] ^= 0xFF   # inside the first chunk of the first prefetch file (hot/a is laid out first)
    blob.write_bytes(bytes(raw))
    cfg = write_localfs_config(tmp_path / "c.json", blobs, tmp_path / "cache", enable_xattr=False)
    with Nydusd(tmp_path, ["--bootstrap", str(tmp_path / "boot"), "--config", str(cfg)]) as d:
        for _ in range(30):
            with pytest.raises(OSError) as info:
                _uncached_read(d.mnt / "hot/a")
            assert info.value.errno == 5
        assert _uncached_read(d.mnt / "cold/x") == (src / "cold/x").read_bytes()
        log = d.logtext()
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "digest mismatch" in errors[0], log
