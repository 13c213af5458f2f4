"""NydusDaemon without transports: mounts, sharing, refusals, lifecycle, and nothing leaking."""

from __future__ import annotations

import asyncio
import os

import pytest

from nydus_vfs.errors import ConfigError, FsError
from nydus_vfs.fuse.ops import Context, FileSegment
from nydus_vfs.service import DaemonState, MountError, NotReadyError, NydusDaemon, UnsupportedError
from nydus_vfs.service.state import UnexpectedEventError

from tests.image_helpers import localfs_config_text, make_image

CTX = Context()


def _resolve(vfs, path: str) -> int:
    node = 1
    for part in path.strip("/").split("/"):
        node = vfs.lookup(node, part.encode(), CTX).nodeid
    return node


async def _read(vfs, path: str, size: int = 1 << 20) -> bytes:
    node = _resolve(vfs, path)
    try:
        fh, _ = vfs.open(node, os.O_RDONLY, CTX)
    except FsError:  # RAFS without per-open state may answer ENOSYS
        fh = 0
    data = await vfs.read(node, fh, 0, size, CTX)
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    return b"".join(os.pread(s.fd, s.length, s.offset) if isinstance(s, FileSegment) else bytes(s)
                    for s in data)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def images(tmp_path):
    shared = os.urandom(200_000)
    a, blobs = make_image(tmp_path, "a", {"shared.bin": shared, "a.txt": b"alpha"})
    b, _ = make_image(tmp_path, "b", {"shared.bin": shared, "b.txt": b"beta"})
    return {"a": a, "b": b, "blobs": blobs, "shared": shared,
            "config": localfs_config_text(blobs, tmp_path / "cache")}


def test_mount_read_umount_and_one_backend_shared(images):
    async def run():
        async with NydusDaemon() as d:
            await d.mount("/a", str(images["a"]), images["config"])
            await d.mount("/rafs/b/lowerdir", str(images["b"]), images["config"])
            assert len(d.backends()) == 1, "alike backend configs must share one backend"
            assert await _read(d.vfs, "/a/a.txt") == b"alpha"
            assert await _read(d.vfs, "/rafs/b/lowerdir/b.txt") == b"beta"
            assert set(d.mounts()) == {"/a", "/rafs/b/lowerdir"}
            info = d.info()
            assert info["state"] == "INIT"
            assert info["backend_collection"]["/a"]["backend_type"] == "Rafs"
            await d.umount("/rafs/b/lowerdir")
            assert d.vfs.pseudo_nodes() == 2, "empty pseudo directories /rafs and /rafs/b must be pruned"
            await d.umount("/a")
            assert d.backends() == []
        assert d.state is DaemonState.STOPPED

    asyncio.run(run())


def test_refusals_leave_nothing_mounted(images, tmp_path):
    async def run():
        async with NydusDaemon() as d:
            bad = tmp_path / "bad.boot"
            bad.write_bytes(b"\0" * 9000)
            with pytest.raises(MountError, match="not a valid RAFS image"):
                await d.mount("/x", str(bad), images["config"])
            with pytest.raises(MountError, match="No such file"):
                await d.mount("/x", str(tmp_path / "missing.boot"), images["config"])
            with pytest.raises(MountError, match="absolute"):
                await d.mount("/x", str(images["a"]), images["config"], prefetch_files=["rel/path"])
            with pytest.raises(MountError, match="invalid component"):
                await d.mount("/x/../y", str(images["a"]), images["config"])
            with pytest.raises(MountError, match="only 'rafs' and 'passthrough_fs'"):
                await d.mount("/x", str(images["a"]), images["config"], fs_type="ext4")
            with pytest.raises(ConfigError, match="failed to parse"):
                await d.mount("/x", str(images["a"]), "{not json")
            with pytest.raises(ConfigError, match="enable_encryption"):
                await d.mount("/x", str(images["a"]), localfs_config_text(
                    images["blobs"], tmp_path / "c2") .replace('"work_dir"', '"enable_encryption": true, '
                                                                '"encryption_key": "' + "ab" * 32 + '", "work_dir"'))
            assert d.mounts() == {} and d.backends() == [] and d.vfs.pseudo_nodes() == 1
            await d.mount("/x", str(images["a"]), images["config"])
            with pytest.raises(MountError, match="already exists"):
                await d.mount("/x", str(images["b"]), images["config"])
            with pytest.raises(MountError, match="no filesystem"):
                await d.umount("/nothing")
            with pytest.raises(UnsupportedError):
                await d.remount("/x", str(images["b"]), images["config"], fs_type="passthrough_fs")

    asyncio.run(run())


def test_remount_swaps_the_image_and_keeps_the_old_on_failure(images, tmp_path):
    async def run():
        async with NydusDaemon() as d:
            await d.mount("/m", str(images["a"]), images["config"])
            bad = tmp_path / "bad.boot"
            bad.write_bytes(b"garbage")
            with pytest.raises(MountError):
                await d.remount("/m", str(bad), images["config"])
            assert await _read(d.vfs, "/m/a.txt") == b"alpha"
            await d.remount("/m", str(images["b"]), images["config"])
            assert await _read(d.vfs, "/m/b.txt") == b"beta"
            assert len(d.backends()) == 1

    asyncio.run(run())


def test_cycles_leak_no_fds_backends_or_pseudo_nodes(images):
    async def run():
        async with NydusDaemon() as d:
            await d.mount("/warm", str(images["a"]), images["config"])
            await d.umount("/warm")
            before = _open_fds()
            for i in range(50):
                await d.mount(f"/rafs/c{i}/lowerdir", str(images["a"]), images["config"])
                assert await _read(d.vfs, f"/rafs/c{i}/lowerdir/shared.bin") == images["shared"]
                await d.umount(f"/rafs/c{i}/lowerdir")
            assert _open_fds() == before
            assert d.backends() == [] and d.vfs.pseudo_nodes() == 1 and len(d.blob_layer) == 0

    asyncio.run(run())


def test_lifecycle_and_mounts_refused_once_stopped(images):
    async def run():
        d = NydusDaemon()
        async with d:
            with pytest.raises(UnexpectedEventError):
                d.start()  # INIT: nothing to start yet
        assert d.state is DaemonState.STOPPED
        with pytest.raises(NotReadyError):
            await d.mount("/a", str(images["a"]), images["config"])
        await d.wait()  # returns at once

    asyncio.run(run())


def test_runtime_config_is_stored_per_id_and_unknown_keys_refused(images):
    async def run():
        async with NydusDaemon() as d:
            await d.mount("/a", str(images["a"]), images["config"])
            d.set_runtime_config("/a", {"registry_auth": "dXNlcjpwYXNz"})
            assert d.get_runtime_config("/a") == {"registry_auth": "dXNlcjpwYXNz"}
            assert d.get_runtime_config(None) == {"/a:registry_auth": "dXNlcjpwYXNz"}
            from nydus_vfs.service import ServiceError

            with pytest.raises(ServiceError, match="unknown configuration key"):
                d.set_runtime_config("/a", {"proxy_url": "http://p", "bogus": "1"})
            assert d.get_runtime_config("/a")["proxy_url"] == "http://p"

    asyncio.run(run())


def test_passthrough_mounts_beside_rafs_in_a_writable_export(images, tmp_path):
    shared = tmp_path / "shared"
    (shared / "c1").mkdir(parents=True)
    (shared / "c1" / "hello").write_bytes(b"host file")

    async def run():
        async with NydusDaemon() as ro:
            with pytest.raises(UnsupportedError, match="writable export"):
                await ro.mount("/containers", str(shared), "", fs_type="passthrough_fs")
        async with NydusDaemon(writable=True) as d:
            await d.mount("/containers", str(shared), "", fs_type="passthrough_fs")
            await d.mount("/rafs/c1/lowerdir", str(images["a"]), images["config"])
            assert await _read(d.vfs, "/containers/c1/hello") == b"host file"
            assert await _read(d.vfs, "/rafs/c1/lowerdir/a.txt") == b"alpha"
            info = d.info()["backend_collection"]
            assert info["/containers"]["backend_type"] == "PassthroughFs"
            assert info["/containers"]["config"] is None
            with pytest.raises(MountError, match="shared directory"):
                await d.mount("/other", str(tmp_path / "missing"), "", fs_type="passthroughfs")
            await d.umount("/containers")
            assert d.backends() != [] and "/containers" not in d.mounts()

    asyncio.run(run())


def test_settings_not_acted_on_are_warned_once_and_encryption_refused(images, tmp_path, caplog):
    import json
    import logging

    from nydus_vfs.service import daemon as daemon_module

    daemon_module._warned.clear()
    cfg = json.loads(images["config"])
    v2 = {"version": 2, "backend": {"type": "localfs", "localfs": {"dir": cfg["device"]["backend"]["config"]["dir"]}},
          "cache": {"type": "blobcache", "filecache": {"work_dir": str(tmp_path / "c")}}, "rafs": {"mode": "direct"},
          "overlay": {"upper_dir": str(tmp_path / "u"), "work_dir": str(tmp_path / "w")}}

    async def run():
        async with NydusDaemon() as d:
            with caplog.at_level(logging.WARNING, logger="nydus_vfs"):
                await d.mount("/a", str(images["a"]), json.dumps(v2))
                await d.mount("/b", str(images["b"]), json.dumps(v2))
            overlay = [r for r in caplog.records if "overlay" in r.getMessage()]
            assert len(overlay) == 1, "warned once, not per mount"
            enc = dict(v2, cache={"type": "blobcache", "filecache": {
                "work_dir": str(tmp_path / "c"), "enable_encryption": True, "encryption_key": "ab" * 32}})
            with pytest.raises(ConfigError, match="refusing to write it unencrypted"):
                await d.mount("/c", str(images["a"]), json.dumps(enc))

    asyncio.run(run())
