"""The HTTP API with real clients: Debian's curl and raw sockets (nydus-surface.md §3, §0 items 3–5)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import time

import pytest

from tests.image_helpers import DaemonThread, localfs_config_text, make_image

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


@pytest.fixture
def api(tmp_path):
    d = DaemonThread(str(tmp_path / "api.sock")).start()
    yield d
    d.stop()


def curl(sock: str, method: str, path: str, body: str | None = None, *extra: str) -> tuple[int, dict, str]:
    cmd = ["curl", "-s", "-i", "--unix-socket", sock, "-X", method, f"http://localhost{path}", *extra]
    if body is not None:
        cmd += ["-H", "Content-Type: application/json", "--data-binary", body]
    out = subprocess.run(cmd, capture_output=True, timeout=20).stdout.decode()
    head, _, text = out.partition("\r\n\r\n")
    while head.startswith("HTTP/1.1 100"):
        head, _, text = text.partition("\r\n\r\n")
    lines = head.split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return status, headers, text


def error_message(text: str) -> str:
    doc = json.loads(text)
    assert doc["code"] == "UNDEFINED"
    return doc["message"]


def test_daemon_info_and_headers(api):
    status, headers, text = curl(api.sock, "GET", "/api/v1/daemon")
    assert status == 200
    assert headers["server"] == "Nydus API" and headers["content-type"] == "application/json"
    info = json.loads(text)
    assert info["state"] == "INIT" and info["backend_collection"] == {}
    assert set(info["version"]) == {"package_ver", "git_commit", "build_time", "profile", "rustc"}
    status, _, text = curl(api.sock, "GET", "/api/v2/daemon")
    assert status == 200 and json.loads(text)["backend_collection"] is None
    status, headers, text = curl(api.sock, "PUT", "/api/v1/daemon", '{"log_level": "debug"}')
    assert status == 204 and headers["server"] == "Nydus API" and headers["content-type"] == "application/json"
    status, _, text = curl(api.sock, "PUT", "/api/v1/daemon", '{"log_level": "loud"}')
    assert status == 500 and error_message(text) == "Configure(ResponsePayloadType)"
    curl(api.sock, "PUT", "/api/v1/daemon", '{"log_level": "info"}')


def test_socket_file_mode_and_ownership_rules(api, tmp_path):
    assert stat.S_IMODE(os.stat(api.sock).st_mode) == 0o600
    with pytest.raises(Exception, match="another daemon"):
        DaemonThread(api.sock).start()
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # a socket file nobody listens on: a crashed predecessor
    d = DaemonThread(str(stale)).start()
    try:
        assert curl(str(stale), "GET", "/api/v1/daemon")[0] == 200
    finally:
        d.stop()
    assert not stale.exists(), "the socket file is removed on exit"


@pytest.mark.parametrize("method,path,status,message", [
    ("GET", "/api/v1/nothing", 404, "NoRoute"),
    ("GET", "/api/v1/daemon/", 404, "NoRoute"),
    ("POST", "/api/v1/daemon", 400, "BadRequest"),
    ("DELETE", "/api/v1/mount", 400, "QueryString(\"'mountpoint' should be specified in query string\")"),
    ("GET", "/api/v1/metrics/pattern", 404, "Pattern(Metrics(Stats(NoCounter)))"),
    ("GET", "/api/v1/metrics", 404, "Metrics(Stats(NoCounter))"),
    ("GET", "/api/v1/metrics/inflight", 501, None),
    ("PUT", "/api/v1/daemon/start", 400, 'UnexpectedEvent("Start")'),
    ("PUT", "/api/v1/daemon/fuse/sendfd", 501, None),
    ("PUT", "/api/v2/blobs", 501, None),
    ("GET", "/api/v2/blobs", 400, "QueryString(\"'domain_id' should be specified in query string\")"),
    ("GET", "/api/v2/blobs?domain_id=d", 501, None),
])
def test_error_answers(api, method, path, status, message):
    got, headers, text = curl(api.sock, method, path)
    assert got == status, text
    assert headers["server"] == "Nydus API"
    m = error_message(text)
    if message is not None:
        assert m == message


def test_v2_blob_delete_by_blob_id_is_a_no_op(api):
    assert curl(api.sock, "DELETE", "/api/v2/blobs?blob_id=abc")[0] == 204


def test_mount_lifecycle_metrics_and_config(api, tmp_path):
    boot, blobs = make_image(tmp_path, "img", {"etc/hello": b"hi\n", "big": os.urandom(300_000)})
    cfg = localfs_config_text(blobs, tmp_path / "cache", access_pattern=True, iostats_files=True,
                              latest_read_files=True, device_id_unused=True)
    cfg = json.dumps({**json.loads(cfg), "device": {**json.loads(cfg)["device"], "id": "/snap1"}})
    body = json.dumps({"source": str(boot), "fs_type": "rafs", "config": cfg})
    # URL-encoded query values are decoded (runtime-rs percent-encodes them).
    status, headers, text = curl(api.sock, "POST", "/api/v1/mount?mountpoint=%2Fpseudo_1", body)
    assert status == 204, text
    assert headers["content-type"] == "application/json"
    status, _, text = curl(api.sock, "POST", "/api/v1/mount?mountpoint=/pseudo_1", body)
    assert status == 500 and "already exists" in error_message(text)
    info = json.loads(curl(api.sock, "GET", "/api/v1/daemon")[2])
    entry = info["backend_collection"]["/pseudo_1"]
    assert entry["backend_type"] == "Rafs" and entry["mountpoint"] == "/pseudo_1"
    assert entry["config"]["backend"]["type"] == "localfs"
    # Requests through a FUSE server (what a transport does) so the counters move.
    import struct

    from nydus_vfs.testing.fuse_factory import FuseRequestFactory

    async def read():
        f = FuseRequestFactory()
        srv = api.daemon.new_fuse_server()
        srv.handle(f.init())
        node = struct.unpack_from("<Q", srv.handle(f.lookup(1, b"pseudo_1")), 16)[0]
        node = struct.unpack_from("<Q", srv.handle(f.lookup(node, b"big")), 16)[0]
        reply = srv.handle(f.read(node, 0, 0, 4096))
        if not isinstance(reply, (bytes, list)):
            await reply

    api.call(read())
    fs = json.loads(curl(api.sock, "GET", "/api/v1/metrics")[2])
    assert fs["id"] == "/pseudo_1" and fs["fop_hits"][4] == 1 and fs["data_read"] == 4096
    assert fs["fop_hits"][9] == 1  # the LOOKUP inside the image (the first is on the pseudo root)
    assert json.loads(curl(api.sock, "GET", "/api/v1/metrics?id=/pseudo_1")[2]) == fs
    assert curl(api.sock, "GET", "/api/v1/metrics?id=/other")[0] == 404
    pattern = json.loads(curl(api.sock, "GET", "/api/v1/metrics/pattern")[2])
    assert len(pattern) == 1 and pattern[0]["nr_read"] == 1
    files = json.loads(curl(api.sock, "GET", "/api/v1/metrics/files")[2])
    assert sum(f["data_read"] for f in files.values()) == 4096
    latest = json.loads(curl(api.sock, "GET", "/api/v1/metrics/files?latest=true")[2])
    assert len(latest) == 1
    assert json.loads(curl(api.sock, "GET", "/api/v1/metrics/files?latest=true")[2]) == []
    backend = json.loads(curl(api.sock, "GET", "/api/v1/metrics/backend")[2])
    assert backend["backend_type"] == "localfs" and backend["read_count"] >= 1
    # Blob cache metrics are keyed by the config id, not the mountpoint (nydus-surface.md §0 item 7).
    assert curl(api.sock, "GET", "/api/v1/metrics/blobcache?id=/snap1")[0] == 200
    assert curl(api.sock, "GET", "/api/v1/metrics/blobcache?id=/pseudo_1")[0] == 404
    sb = json.loads(curl(api.sock, "GET", "/api/v1/daemon/backend?mountpoint=/pseudo_1")[2])
    assert sb["version"] == 6
    prom = curl(api.sock, "GET", "/api/v1/metrics/prometheus")[2]
    assert 'nydusd_fop_hits_total{fop="read",id="/pseudo_1"} 1.0' in prom
    assert curl(api.sock, "PUT", "/api/v1/config?id=/pseudo_1", '{"registry_auth": "dXNlcjpwYXNz"}')[0] == 204
    assert json.loads(curl(api.sock, "GET", "/api/v1/config?id=/pseudo_1")[2]) == {"registry_auth": "dXNlcjpwYXNz"}
    assert curl(api.sock, "PUT", "/api/v1/config", '{"nope": "1"}')[0] == 500
    # A second mount makes the no-id queries ambiguous: 404 (nydus-surface.md §0 item 6).
    assert curl(api.sock, "POST", "/api/v1/mount?mountpoint=/a/b/c", body)[0] == 204
    assert curl(api.sock, "GET", "/api/v1/metrics/backend")[0] == 404
    assert curl(api.sock, "PUT", "/api/v1/mount?mountpoint=/a/b/c", body)[0] == 204
    assert curl(api.sock, "DELETE", "/api/v1/mount?mountpoint=/a/b/c")[0] == 204
    assert curl(api.sock, "DELETE", "/api/v1/mount?mountpoint=/pseudo_1")[0] == 204
    status, _, text = curl(api.sock, "DELETE", "/api/v1/mount?mountpoint=/pseudo_1")
    assert status == 500 and "no filesystem is mounted" in error_message(text)


def test_bad_mount_commands(api, tmp_path):
    boot, blobs = make_image(tmp_path, "img", {"f": b"x"})
    good_cfg = localfs_config_text(blobs, tmp_path / "cache")
    cases = [
        ("/m", "{not json", 400, "ParseBody("),
        ("/m", json.dumps({"fs_type": "rafs", "config": good_cfg}), 400, "missing field `source`"),
        ("/m", json.dumps({"source": str(boot), "fs_type": "rafs", "config": "{"}), 500, "failed to parse"),
        ("/m", json.dumps({"source": str(tmp_path / "f"), "fs_type": "rafs", "config": good_cfg}), 500,
         "No such file"),
        ("/a/../b", json.dumps({"source": str(boot), "fs_type": "rafs", "config": good_cfg}), 500,
         "invalid component"),
        ("/m", json.dumps({"source": str(boot), "fs_type": ["rafs"], "config": good_cfg}), 400,
         "invalid type"),
        ("/m", json.dumps({"source": str(boot), "fs_type": "", "config": good_cfg}), 500,
         "only 'rafs' and 'passthrough_fs' are supported"),
        ("/m", json.dumps({"source": str(boot), "fs_type": "rafs", "config": good_cfg,
                           "prefetch_files": ["relative"]}), 500, "absolute"),
    ]
    (tmp_path / "corrupt.boot").write_bytes(os.urandom(9000))
    cases.append(("/m", json.dumps({"source": str(tmp_path / "corrupt.boot"), "fs_type": "rafs",
                                    "config": good_cfg}), 500, "not a valid RAFS image"))
    for mountpoint, body, status, fragment in cases:
        got, _, text = curl(api.sock, "POST", f"/api/v1/mount?mountpoint={mountpoint}", body)
        assert got == status and fragment in error_message(text), (mountpoint, body, got, text)
    assert api.daemon.mounts() == {}


def _raw(sock: str, data: bytes, timeout: float = 5.0) -> bytes:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(sock)
    s.sendall(data)
    out = b""
    try:
        while b"\r\n\r\n" not in out:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    finally:
        s.close()
    return out


def test_limits_body_header_and_chunked(api):
    big = b"x" * 51_201
    resp = _raw(api.sock, b"PUT /api/v1/daemon HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(big) + big)
    assert resp.startswith(b"HTTP/1.1 400")
    resp = _raw(api.sock, b"GET /api/v1/daemon HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 1100 + b"\r\n\r\n")
    assert resp.split(b" ")[1] == b"400" and b"Server: Nydus API" in resp
    resp = _raw(api.sock, b"GET /api/v1/daemon?" + b"a" * 1100 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert resp.split(b" ")[1] == b"400"
    resp = _raw(api.sock, b"PUT /api/v1/daemon HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                          b"5\r\nhello\r\n0\r\n\r\n")
    assert resp.startswith(b"HTTP/1.1 400")
    # A body on a body-less request is refused.
    resp = _raw(api.sock, b"GET /api/v1/daemon HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
    assert resp.startswith(b"HTTP/1.1 400")
    # The daemon is still fine.
    assert curl(api.sock, "GET", "/api/v1/daemon")[0] == 200


def test_eleventh_connection_is_refused_and_idle_ones_stay_open(api):
    conns = []
    for _ in range(10):
        s = socket.socket(socket.AF_UNIX)
        s.connect(api.sock)
        conns.append(s)
    time.sleep(0.2)
    extra = _raw(api.sock, b"GET /api/v1/daemon HTTP/1.1\r\nHost: x\r\n\r\n")
    assert extra.startswith(b"HTTP/1.1 503") and b"Too many open connections" in extra
    # The ten idle connections are still served (nothing times them out).
    time.sleep(1.0)
    for s in conns:
        s.sendall(b"GET /api/v1/daemon HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
    for s in conns:
        s.close()
    time.sleep(0.2)
    assert curl(api.sock, "GET", "/api/v1/daemon")[0] == 200


def test_exit_stops_the_daemon(api):
    assert curl(api.sock, "PUT", "/api/v1/daemon/exit")[0] == 204
    api.thread.join(10)
    assert not api.thread.is_alive()
    assert api.daemon.state.value == "STOPPED"
    assert not os.path.exists(api.sock)
