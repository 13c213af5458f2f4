"""``nydusd fuse`` driven through its API the way nydus-snapshotter and the upstream smoke tests do.

Shared FUSE mode (nydus-surface.md §7.2–7.3): ``nydusd fuse --mountpoint M --apisock A``
with no bootstrap; one ``POST /api/v1/mount?mountpoint=/<snapshot id>`` per
image; reads through ``M/<id>/...``; metrics with and without ``id``
(nydus-surface.md §0 items 6–7).  Plus the upstream API smoke checks
(nydus-surface.md §9.3) and the mount/umount cycles with flat fd and memory use.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import time

import pytest

from nydus_vfs.transport.fusedev import mounts_at, resolve_mountpoint
from tests.conftest import PROJECT_ROOT, fuse_unavailable_reason
from tests.functional.nydusd_helpers import NYDUSD
from tests.image_helpers import localfs_config_text, make_image

pytestmark = pytest.mark.skipif(fuse_unavailable_reason() is not None, reason=fuse_unavailable_reason() or "")


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=30)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(30)
        self.sock.connect(self.path)


class Api:
    """A keep-alive client of the API socket (what the snapshotter's Go client does)."""

    def __init__(self, sock) -> None:
        self.conn = _UnixHTTP(str(sock))

    def call(self, method: str, path: str, body=None) -> tuple[int, object]:
        data = None if body is None else (body if isinstance(body, str) else json.dumps(body)).encode()
        self.conn.request(method, path, body=data)
        resp = self.conn.getresponse()
        raw = resp.read()
        return resp.status, (json.loads(raw) if raw else None)


def curl(sock, method, path, body=None):
    cmd = ["curl", "-s", "-w", "\n%{http_code}", "--unix-socket", str(sock), "-X", method, f"http://localhost{path}"]
    if body is not None:
        cmd += ["--data-binary", body]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    text, _, code = out.rpartition("\n")
    return int(code), text


@pytest.fixture
def shared_daemon(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    api = tmp_path / "api.sock"
    proc = subprocess.Popen(NYDUSD + ["fuse", "--mountpoint", str(mnt), "--apisock", str(api), "--thread-num", "4",
                                      "--log-file", str(tmp_path / "nydusd.log")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=PROJECT_ROOT)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (api.exists() and mounts_at(resolve_mountpoint(str(mnt)))):
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.02)
    yield proc, mnt, api
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    assert not mounts_at(resolve_mountpoint(str(mnt)))


def _images(tmp_path):
    files_a = {"etc/os-release": b"ID=a\n", "usr/bin/tool": os.urandom(200_000)}
    files_b = {"etc/os-release": b"ID=b\n", "data/big": os.urandom(1_500_000)}
    a, blobs = make_image(tmp_path, "a", files_a)
    b, _ = make_image(tmp_path, "b", files_b)
    return (a, files_a), (b, files_b), blobs


def _cfg(blobs, cache, snapshot: str, **extra) -> str:
    doc = json.loads(localfs_config_text(blobs, cache, enable_xattr=True, **extra))
    doc["device"]["id"] = snapshot  # what the snapshotter writes: device.id = "/<snapshot id>"
    return json.dumps(doc)


def test_snapshotter_shared_mode(tmp_path, shared_daemon):
    proc, mnt, api = shared_daemon
    (a, files_a), (b, files_b), blobs = _images(tmp_path)
    status, text = curl(api, "GET", "/api/v1/daemon")
    assert status == 200 and json.loads(text)["state"] == "RUNNING"
    for sid, boot in (("11", a), ("12", b)):
        body = json.dumps({"source": str(boot), "fs_type": "rafs", "config": _cfg(blobs, tmp_path / "cache", "/" + sid)})
        assert curl(api, "POST", f"/api/v1/mount?mountpoint=/{sid}", body)[0] == 204
    for sid, files in (("11", files_a), ("12", files_b)):
        for rel, data in files.items():
            assert (mnt / sid / rel).read_bytes() == data
    # Metrics: ids are mountpoints for fs/backend, config ids for the blob cache; no id is ambiguous.
    m = json.loads(curl(api, "GET", "/api/v1/metrics?id=/11")[1])
    assert m["fop_hits"][4] >= 2 and m["data_read"] == sum(len(d) for d in files_a.values())
    assert curl(api, "GET", "/api/v1/metrics")[0] == 404
    assert curl(api, "GET", "/api/v1/metrics/backend")[0] == 404
    assert curl(api, "GET", "/api/v1/metrics/backend?id=/12")[0] == 200
    bc = json.loads(curl(api, "GET", "/api/v1/metrics/blobcache?id=/12")[1])
    assert bc["underlying_files"] and all(f.endswith((".blob.data", ".blob.data.chunk_map")) or ".blob." in f
                                          for f in bc["underlying_files"])
    # Umount invalidates the kernel's dentry: the same path can be mounted again at once.
    assert curl(api, "DELETE", "/api/v1/mount?mountpoint=/11")[0] == 204
    assert not (mnt / "11").exists()
    body = json.dumps({"source": str(b), "fs_type": "rafs", "config": _cfg(blobs, tmp_path / "cache", "/11")})
    assert curl(api, "POST", "/api/v1/mount?mountpoint=/11", body)[0] == 204
    assert (mnt / "11" / "etc/os-release").read_bytes() == b"ID=b\n"
    status, text = curl(api, "GET", "/api/v1/metrics/inflight")
    assert status == 204 and text == ""


def test_upstream_api_smoke_checks(tmp_path, shared_daemon):
    proc, mnt, api = shared_daemon
    (a, files_a), _, blobs = _images(tmp_path)
    cfg = _cfg(blobs, tmp_path / "cache", "/", access_pattern=True)
    body = {"source": str(a), "fs_type": "rafs", "config": cfg, "prefetch_files": ["/"]}
    client = Api(api)
    assert client.call("GET", "/api/v1/daemon")[1]["state"] == "RUNNING"
    assert client.call("POST", "/api/v1/mount?mountpoint=/pf", body)[0] == 204
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        bc = client.call("GET", "/api/v1/metrics/blobcache")[1]
        if bc["prefetch_data_amount"] > 0 and bc["data_all_ready"]:
            break
        time.sleep(0.1)
    assert bc["prefetch_data_amount"] > 0, bc
    assert (mnt / "pf" / "usr/bin/tool").read_bytes() == files_a["usr/bin/tool"]
    fs = client.call("GET", "/api/v1/metrics")[1]
    assert fs["fop_hits"][4] > 0
    pattern = client.call("GET", "/api/v1/metrics/pattern")[1]
    assert pattern and pattern[0]["nr_read"] >= 1
    backend = client.call("GET", "/api/v1/metrics/backend")[1]
    reads_after_prefetch = backend["read_count"]
    assert (mnt / "pf" / "etc/os-release").read_bytes() == b"ID=a\n"
    assert client.call("GET", "/api/v1/metrics/backend")[1]["read_count"] == reads_after_prefetch
    assert client.call("DELETE", "/api/v1/mount?mountpoint=/pf")[0] == 204
    # Nested mountpoint, remounted with another image.
    body.pop("prefetch_files")
    assert client.call("POST", "/api/v1/mount?mountpoint=/a/b/c", body)[0] == 204
    for _ in range(3):
        assert client.call("PUT", "/api/v1/mount?mountpoint=/a/b/c", body)[0] == 204
        assert (mnt / "a/b/c/etc/os-release").read_bytes() == b"ID=a\n"
    assert client.call("DELETE", "/api/v1/mount?mountpoint=/a/b/c")[0] == 204
    assert not (mnt / "a").exists()


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss_kib(pid: int) -> int:
    text = open(f"/proc/{pid}/status").read()
    return int(re.search(r"VmRSS:\s+(\d+)", text).group(1))


def test_300_mount_umount_cycles_keep_fds_and_memory_flat(tmp_path, shared_daemon):
    proc, mnt, api = shared_daemon
    (a, files_a), _, blobs = _images(tmp_path)
    body = {"source": str(a), "fs_type": "rafs", "config": _cfg(blobs, tmp_path / "cache", "/")}
    client = Api(api)

    def cycle(i: int) -> None:
        assert client.call("POST", "/api/v1/mount?mountpoint=/rafs/c/lowerdir", body)[0] == 204
        if i % 10 == 0:  # (the first read of a large file also creates the splice pipe: warm-up)
            assert (mnt / "rafs/c/lowerdir/etc/os-release").read_bytes() == b"ID=a\n"
            assert (mnt / "rafs/c/lowerdir/usr/bin/tool").read_bytes() == files_a["usr/bin/tool"]
        assert client.call("DELETE", "/api/v1/mount?mountpoint=/rafs/c/lowerdir")[0] == 204

    for i in range(20):
        cycle(i)
    fds, rss = _fds(proc.pid), _rss_kib(proc.pid)
    for i in range(280):
        cycle(i)
    assert _fds(proc.pid) <= fds, "fds leaked across mount/umount cycles"
    assert _rss_kib(proc.pid) < rss + 20_000, "memory grew by more than 20 MiB over 280 cycles"
    info = client.call("GET", "/api/v1/daemon")[1]
    assert info["backend_collection"] == {}


def test_umount_while_a_reader_holds_a_file(tmp_path, shared_daemon):
    proc, mnt, api = shared_daemon
    (a, files_a), _, blobs = _images(tmp_path)
    body = json.dumps({"source": str(a), "fs_type": "rafs", "config": _cfg(blobs, tmp_path / "cache", "/")})
    assert curl(api, "POST", "/api/v1/mount?mountpoint=/x", body)[0] == 204
    f = open(mnt / "x/usr/bin/tool", "rb")
    assert f.read(1000) == files_a["usr/bin/tool"][:1000]
    assert curl(api, "DELETE", "/api/v1/mount?mountpoint=/x")[0] == 204
    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    with pytest.raises(OSError) as info:
        f.seek(100_000)
        f.read(50_000)
    assert info.value.errno in (5, 2, 116)  # EIO, ENOENT, ESTALE
    f.close()
    assert proc.poll() is None
    assert curl(api, "POST", "/api/v1/mount?mountpoint=/x", body)[0] == 204
    assert (mnt / "x/etc/os-release").read_bytes() == b"ID=a\n"


def test_version_and_daemon_info_report_the_same_commit(shared_daemon):
    proc, mnt, api = shared_daemon
    r = subprocess.run(NYDUSD + ["--version"], capture_output=True, text=True, timeout=30, cwd=PROJECT_ROOT)
    commit = re.search(r"Git Commit:\s*(\S+)", r.stdout).group(1)
    info = json.loads(curl(api, "GET", "/api/v1/daemon")[1])
    assert info["version"]["git_commit"] == commit


def test_put_daemon_exit_leaves_the_mount_and_sigterm_of_a_busy_daemon_is_quick(tmp_path, shared_daemon):
    proc, mnt, api = shared_daemon
    assert curl(api, "PUT", "/api/v1/daemon/exit")[0] == 204
    assert proc.wait(timeout=10) == 0
    # Exit does not unmount (hot upgrade hands the session over): the dead mount stays.
    assert mounts_at(resolve_mountpoint(str(mnt)))
    subprocess.run(["umount", "-l", str(mnt)], check=True)
