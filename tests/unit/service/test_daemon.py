"""The daemon's mount API: two images sharing a blob, refusals, unmount."""

from __future__ import annotations

import asyncio
import os

import pytest

from nydus_vfs.config import localfs_dir_config, parse_daemon_config
from nydus_vfs.errors import ConfigError
from nydus_vfs.fuse.ops import Context, FileSegment
from nydus_vfs.service.daemon import Daemon, MountError
from tests.conftest import linked_blob_dir

CTX = Context()
LAYER_TAR = ("normal-file-test/busybox/1f777dbdd68d1c4d554bc0d20e027bfef9ed2dfe2d8d5f029e958552a0e12475/"
             "layer.tar")


def _resolve(vfs, path: str) -> int:
    node = 1
    for part in path.strip("/").split("/"):
        node = vfs.lookup(node, part.encode(), CTX).nodeid
    return node


def _read_all(vfs, nodeid: int, size: int) -> bytes:
    segs = asyncio.new_event_loop().run_until_complete(vfs.read(nodeid, 0, 0, size, CTX))
    if isinstance(segs, (bytes, bytearray)):
        return bytes(segs)
    out = bytearray()
    for s in segs:
        out += os.pread(s.fd, s.length, s.offset) if isinstance(s, FileSegment) else bytes(s)
    return bytes(out)


def _backend_reads(*instances) -> int:
    backends = {id(fs.device.backend): fs.device.backend for fs in instances}
    return sum(b.metrics.read_count for b in backends.values())


def test_two_images_sharing_a_blob_fetch_each_chunk_once(tmp_path, v5_vector):
    # Both v5 vectors reference blob 7334a259…: one shared cache state in the daemon.
    cfg = localfs_dir_config(str(linked_blob_dir(v5_vector["blob_dir"], tmp_path / "blobs")))
    daemon = Daemon()
    a = daemon.mount_rafs("/a", str(v5_vector["boots"][0]), cfg)
    b = daemon.mount_rafs("/rafs/b/lowerdir", str(v5_vector["boots"][1]), cfg)
    first = _read_all(daemon.vfs, _resolve(daemon.vfs, "/a/" + LAYER_TAR), 1 << 20)
    after_a = _backend_reads(a, b)
    second = _read_all(daemon.vfs, _resolve(daemon.vfs, "/rafs/b/lowerdir/" + LAYER_TAR), 1 << 20)
    assert first == second and len(first) == 1 << 20
    assert after_a >= 1
    assert _backend_reads(a, b) == after_a, "the second image re-fetched chunks the first one cached"
    daemon.close()
    assert daemon.vfs.mounts() == {}


def test_mount_refusals_leave_nothing_mounted(tmp_path, v5_vector):
    daemon = Daemon()
    cfg = localfs_dir_config(str(linked_blob_dir(v5_vector["blob_dir"], tmp_path / "blobs")))
    bad = tmp_path / "bad.boot"
    bad.write_bytes(b"\0" * 9000)
    with pytest.raises(MountError, match="not a valid RAFS image"):
        daemon.mount_rafs("/", str(bad), cfg)
    with pytest.raises(MountError, match="No such file"):
        daemon.mount_rafs("/", str(tmp_path / "missing.boot"), cfg)
    with pytest.raises(MountError, match="absolute"):
        daemon.mount_rafs("/", str(v5_vector["boots"][0]), cfg, prefetch_files=["relative/path"])
    registry = parse_daemon_config('{"device": {"backend": {"type": "registry", "config": '
                                   '{"host": "example.invalid", "repo": "library/x"}}}, "mode": "direct"}')
    with pytest.raises(ConfigError, match="not supported"):
        daemon.mount_rafs("/", str(v5_vector["boots"][0]), registry)
    assert daemon.vfs.mounts() == {}
    daemon.mount_rafs("/", str(v5_vector["boots"][0]), cfg)
    with pytest.raises(MountError, match="already mounted"):
        daemon.mount_rafs("/", str(v5_vector["boots"][0]), cfg)
    daemon.umount("/")
    with pytest.raises(MountError):
        daemon.umount("/")
