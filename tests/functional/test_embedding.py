"""The embedding API: one in-process NydusDaemon serves the same mounts over /dev/fuse and
virtio-fs at once (one blob cache), plus examples/embed.py run as a user would.

The virtio-fs side is driven by the VM-less front-end in tests/harness.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time

import pytest

from nydus_vfs._native import binding
from nydus_vfs.service import NydusDaemon
from nydus_vfs.transport.fusedev import mounts_at, resolve_mountpoint
from tests.conftest import PROJECT_ROOT, fuse_unavailable_reason
from tests.harness import Frontend, FuseSession
from tests.image_helpers import localfs_config_text, make_image

_REASON = fuse_unavailable_reason() or (binding.unavailable_reason() and
                                        f"virtio-fs needs the shim: {binding.unavailable_reason()}")
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


def test_one_daemon_serves_fuse_and_virtiofs_from_the_same_cache(tmp_path):
    big = os.urandom(600_000)
    boot, blobs = make_image(tmp_path, "img", {"etc/motd": b"hello\n", "big.bin": big})
    cfg = localfs_config_text(blobs, tmp_path / "cache")
    mnt, sock = tmp_path / "mnt", str(tmp_path / "vu.sock")
    mnt.mkdir()
    loop = asyncio.new_event_loop()
    ready, stop = threading.Event(), None
    holder: dict = {}

    async def serve():
        nonlocal stop
        stop = asyncio.Event()
        async with NydusDaemon() as d:
            holder["d"] = d
            await d.mount("/img", str(boot), cfg)
            await d.serve_fuse(str(mnt))
            await d.serve_virtiofs(sock)
            ready.set()
            await stop.wait()

    t = threading.Thread(target=lambda: loop.run_until_complete(serve()), daemon=True)
    t.start()
    assert ready.wait(20)
    d = holder["d"]
    try:
        assert (mnt / "img" / "big.bin").read_bytes() == big  # FUSE: every chunk fetched once
        backend = d.backends()[0]
        # The blob meta is fetched in the background on a blob's first miss: let it land.
        fetched = -1
        for _ in range(50):
            if backend.metrics.read_count == fetched:
                break
            fetched = backend.metrics.read_count
            time.sleep(0.1)
        with Frontend.connect(sock) as fe:
            fe.negotiate()
            fe.start_queues()
            fs = FuseSession(fe)
            fs.init()
            img = fs.lookup(1, "img")
            e = fs.lookup(img.nodeid, "big.bin")
            data = b""
            while len(data) < len(big):
                data += fs.read(e.nodeid, 0, len(data), 128 << 10)
            assert data == big
            assert backend.metrics.read_count == fetched, "virtio-fs re-fetched what FUSE had cached"
            motd = fs.lookup(fs.lookup(img.nodeid, "etc").nodeid, "motd")
            assert fs.read(motd.nodeid, 0, 0, 100) == b"hello\n"
        assert d.metrics.fs("/img")["fop_hits"][4] >= 2
    finally:
        loop.call_soon_threadsafe(stop.set)
        t.join(20)
    assert not t.is_alive()
    assert not mounts_at(resolve_mountpoint(str(mnt)))
    assert not os.path.exists(sock)


def test_the_embedding_example_runs(tmp_path):
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    subprocess.run([sys.executable, "-m", "nydus_vfs.cli.nydus_image", "create", "--bootstrap",
                    str(tmp_path / "img.boot"), "--blob-dir", str(blobs), str(PROJECT_ROOT / "examples/sample")],
                   check=True, capture_output=True, timeout=120)
    (tmp_path / "mnt").mkdir()
    r = subprocess.run([sys.executable, str(PROJECT_ROOT / "examples/embed.py"), str(tmp_path / "img.boot"),
                        str(blobs), str(tmp_path / "mnt"), str(tmp_path / "vu.sock")],
                       capture_output=True, text=True, timeout=120, cwd=PROJECT_ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["state: RUNNING", "pseudo_1: ['bin', 'etc', 'usr']", "reads so far: 0",
                                     "state: STOPPED"]


def test_a_writable_export_is_served_over_one_transport_only(tmp_path):
    from nydus_vfs.service import UnsupportedError

    (tmp_path / "mnt").mkdir()

    async def main():
        async with NydusDaemon(writable=True) as d:
            await d.serve_virtiofs(str(tmp_path / "vu.sock"))
            with pytest.raises(UnsupportedError, match="one transport at a time"):
                await d.serve_fuse(str(tmp_path / "mnt"))
            with pytest.raises(UnsupportedError):
                await d.serve_virtiofs(str(tmp_path / "vu2.sock"))
        assert not mounts_at(resolve_mountpoint(str(tmp_path / "mnt")))

    asyncio.run(main())
