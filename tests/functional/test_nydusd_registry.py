"""``nydusd fuse`` over remote backends: an image built with ``nydus-image create``, its blobs
pushed to a real docker-registry (or moto S3, a static HTTP server, through tinyproxy),
mounted with a v1 registry config: the tree equals the source.  Then the faults list of
issue 9: a fault-injecting proxy of ours between nydusd and the registry breaks one blob's
requests; the reader of that file gets EIO (after the configured retries, within the
timeouts), the log names the blob and the reason, other files keep reading, and the same
file reads correctly once the fault clears.

Root and /dev/fuse are needed (``requires_fuse``); each server binary skips with its reason.
Until the daemon builds its backends with ``storage.backend.create_backend``, nydusd
refuses non-localfs backends and these tests skip saying so.
"""

from __future__ import annotations

import base64
import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests.conftest import PROJECT_ROOT, requires_fuse
from tests.functional.builder_helpers import diff_snapshots, make_rich_tree, snapshot_dir
from tests.functional.nydusd_helpers import Nydusd
from tests.functional.registry_helpers import (
    DockerRegistry,
    FaultProxy,
    MotoS3,
    Nginx,
    StaticServer,
    Tinyproxy,
    TokenServer,
    make_ca,
)

pytestmark = [requires_fuse]

NYDUS_IMAGE = [sys.executable, "-m", "nydus_vfs.cli.nydus_image"]
REPO = "nydus/e2e"
NOT_WIRED = "is not supported by this nydusd yet"


def _create(src: pathlib.Path, boot: pathlib.Path, blobs: pathlib.Path, *extra: str) -> None:
    r = subprocess.run(NYDUS_IMAGE + ["create", "--bootstrap", str(boot), "--blob-dir", str(blobs), *extra,
                                      str(src)], capture_output=True, text=True, timeout=300, cwd=PROJECT_ROOT)
    assert r.returncode == 0, r.stderr


def _blobs(blob_dir: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in blob_dir.iterdir() if len(p.name) == 64}


def _config(path: pathlib.Path, backend: dict, cache_dir: pathlib.Path, **extra) -> pathlib.Path:
    doc = {"device": {"backend": backend, "cache": {"type": "blobcache", "config": {"work_dir": str(cache_dir)}}},
           "mode": "direct", "digest_validate": True, "enable_xattr": True, **extra}
    path.write_text(json.dumps(doc))
    return path


def _registry_backend(host: str, **kw) -> dict:
    return {"type": "registry", "config": {"scheme": "http", "host": host, "repo": REPO, "timeout": 5,
                                           "connect_timeout": 2, **kw}}


def _mount(tmp: pathlib.Path, boot: pathlib.Path, cfg: pathlib.Path, *extra: str) -> Nydusd:
    d = Nydusd(tmp, ["--bootstrap", str(boot), "--config", str(cfg), *extra], timeout=30, check=False)
    d.__enter__()
    if d.error:
        d.stop()
        if NOT_WIRED in d.error:
            pytest.skip(f"nydusd does not build remote backends yet: {d.error.strip().splitlines()[-1][:300]}")
        raise AssertionError(d.error)
    return d


@pytest.fixture(scope="module")
def rich_image(tmp_path_factory, remote_backends_served):
    """The rich tree of the builder tests as a v6 image: (source, bootstrap, {blob id: bytes})."""
    tmp = tmp_path_factory.mktemp("rich")
    src = make_rich_tree(tmp / "src")
    (tmp / "blobs").mkdir()
    _create(src, tmp / "boot", tmp / "blobs")
    return src, tmp / "boot", _blobs(tmp / "blobs")


@pytest.fixture(scope="module")
def remote_backends_served(tmp_path_factory):
    """Skip the module at once (before any server starts) when nydusd refuses remote backends."""
    tmp = tmp_path_factory.mktemp("probe")
    (tmp / "src").mkdir()
    (tmp / "src" / "f").write_bytes(b"probe")
    (tmp / "blobs").mkdir()
    _create(tmp / "src", tmp / "boot", tmp / "blobs")
    d = Nydusd(tmp, ["--bootstrap", str(tmp / "boot"), "--config",
                     str(_config(tmp / "c.json", _registry_backend("127.0.0.1:1"), tmp / "cache"))],
               timeout=30, check=False)
    with d:
        if NOT_WIRED in d.error:
            pytest.skip(f"nydusd does not build remote backends yet: {d.error.strip().splitlines()[-1][:300]}")


def _check_tree(src: pathlib.Path, d: Nydusd) -> None:
    got = snapshot_dir(d.mnt)
    assert diff_snapshots(snapshot_dir(src), got) == []


def test_registry_mount_equals_the_source_tree(tmp_path, rich_image):
    src, boot, blobs = rich_image
    with DockerRegistry(tmp_path) as reg:
        for data in blobs.values():
            reg.push(REPO, data)
        cfg = _config(tmp_path / "c.json", _registry_backend(reg.host), tmp_path / "cache")
        d = _mount(tmp_path, boot, cfg)
        try:
            _check_tree(src, d)
            assert d.alive()
        finally:
            d.stop()
        assert reg.blob_gets() > 0


def test_basic_auth_tls_and_redirects(tmp_path, rich_image):
    """htpasswd Basic auth over TLS with a private CA, then nginx 307s with blob_redirected_host."""
    src, boot, blobs = rich_image
    ca, cert, key = make_ca(tmp_path)
    with DockerRegistry(tmp_path, auth="htpasswd", tls=(cert, key)) as reg:
        for data in blobs.values():
            reg.push(REPO, data, auth=reg.basic_auth, ca=ca)
        backend = _registry_backend(reg.host, scheme="https", auth=reg.basic_auth, ca_cert_files=[str(ca)])
        d = _mount(tmp_path, boot, _config(tmp_path / "c.json", backend, tmp_path / "cache"))
        try:
            _check_tree(src, d)
        finally:
            d.stop()
        assert reg.password not in d.logtext() and reg.basic_auth not in d.logtext()
    with DockerRegistry(tmp_path) as reg, Nginx(tmp_path, reg.host) as nginx:
        for data in blobs.values():
            reg.push(REPO, data)
        backend = _registry_backend(f"127.0.0.1:{nginx.port}", blob_redirected_host=f"127.0.0.1:{nginx.data_port}")
        (tmp_path / "mnt2").mkdir()
        d = _mount(tmp_path / "mnt2", boot, _config(tmp_path / "c2.json", backend, tmp_path / "cache2"))
        try:
            _check_tree(src, d)
        finally:
            d.stop()
        assert nginx.requests("data") and all(line.split()[-1] == "307" for line in nginx.requests("front"))


def test_token_auth_mount(tmp_path, rich_image):
    src, boot, blobs = rich_image
    tokens = TokenServer(tmp_path)
    tokens.start_in_thread()
    try:
        with DockerRegistry(tmp_path, auth=tokens) as reg:
            auth = base64.b64encode(f"{tokens.user}:{tokens.password}".encode()).decode()
            for data in blobs.values():
                reg.push(REPO, data, auth=auth)
            tokens.requests.clear()
            cfg = _config(tmp_path / "c.json", _registry_backend(reg.host, auth=auth), tmp_path / "cache")
            d = _mount(tmp_path, boot, cfg)
            try:
                _check_tree(src, d)
            finally:
                d.stop()
            assert tokens.requests and tokens.requests[0][0] == "POST"
            assert tokens.password not in d.logtext()
    finally:
        tokens.stop_thread()


def test_s3_http_proxy_and_forward_proxy_mounts(tmp_path, rich_image):
    src, boot, blobs = rich_image
    with MotoS3(tmp_path) as moto:
        s3 = moto.client("s3", moto.key_id, moto.secret)
        s3.create_bucket(Bucket="nydus")
        for blob_id, data in blobs.items():
            s3.put_object(Bucket="nydus", Key=f"blobs/{blob_id}", Body=data)
        backend = {"type": "s3", "config": {"scheme": "http", "endpoint": moto.endpoint, "region": "us-east-1",
                                            "bucket_name": "nydus", "object_prefix": "blobs/",
                                            "access_key_id": moto.key_id, "access_key_secret": moto.secret}}
        d = _mount(tmp_path, boot, _config(tmp_path / "s3.json", backend, tmp_path / "cache-s3"))
        try:
            _check_tree(src, d)
        finally:
            d.stop()
        assert moto.secret not in d.logtext()
    with DockerRegistry(tmp_path) as reg, Tinyproxy(tmp_path) as proxy:
        for data in blobs.values():
            reg.push(REPO, data)
        backend = _registry_backend(reg.host, proxy={"url": proxy.url, "check_interval": 1})
        (tmp_path / "fwd").mkdir()
        d = _mount(tmp_path / "fwd", boot, _config(tmp_path / "fwd.json", backend, tmp_path / "cache-fwd"))
        try:
            assert (d.mnt / "dir" / "multi").read_bytes() == (src / "dir" / "multi").read_bytes()
            proxy.stop()                                     # the dfdaemon dies mid-run
            _check_tree(src, d)                              # the rest comes direct (fallback)
            assert d.alive()
        finally:
            d.stop()
        assert proxy.proxied("/blobs/sha256:") >= 1
        assert "falling back to a direct request" in d.logtext()


def test_http_proxy_backend_mount_v2_config(tmp_path, rich_image):
    src, boot, blobs = rich_image
    blob_dir = tmp_path / "served"
    blob_dir.mkdir()
    for blob_id, data in blobs.items():
        (blob_dir / blob_id).write_bytes(data)
    with StaticServer(blob_dir, prefix="/store/blobs") as static:
        cfg = tmp_path / "v2.json"
        cfg.write_text(json.dumps({
            "version": 2,
            "backend": {"type": "http-proxy", "http-proxy": {"addr": static.url, "path": "/store/blobs"}},
            "cache": {"type": "blobcache", "filecache": {"work_dir": str(tmp_path / "cache")}},
            "rafs": {"mode": "direct", "validate": True, "enable_xattr": True}}))
        d = _mount(tmp_path, boot, cfg)
        try:
            _check_tree(src, d)
        finally:
            d.stop()
        assert any(r.startswith("GET /store/blobs/") and "bytes=" in r for r in static.requests)


def test_restart_with_the_same_cache_makes_no_backend_request(tmp_path, rich_image):
    src, boot, blobs = rich_image
    with DockerRegistry(tmp_path) as reg:
        for data in blobs.values():
            reg.push(REPO, data)
        cfg = _config(tmp_path / "c.json", _registry_backend(reg.host), tmp_path / "cache")
        d = _mount(tmp_path, boot, cfg)
        try:
            _check_tree(src, d)
        finally:
            d.stop()
        fetched = reg.blob_gets()
        assert fetched > 0
        d = _mount(tmp_path, boot, cfg)
        try:
            _check_tree(src, d)
        finally:
            d.stop()
        assert reg.blob_gets() == fetched, "a restarted daemon must serve everything from its cache"


@pytest.fixture(scope="module")
def two_layers(tmp_path_factory, remote_backends_served):
    """A two-blob image: layer 1 has ``one/*``, layer 2 (on top) ``two/*``; files bigger than a chunk."""
    tmp = tmp_path_factory.mktemp("layers")
    files = {}
    for layer in ("one", "two"):
        d = tmp / f"src-{layer}" / layer
        d.mkdir(parents=True)
        for i in range(3):
            data = os.urandom(200_000 + i)
            (d / f"f{i}").write_bytes(data)
            files[f"{layer}/f{i}"] = data
    (tmp / "blobs").mkdir()
    _create(tmp / "src-one", tmp / "boot1", tmp / "blobs", "--chunk-size", "0x10000")
    before = set(_blobs(tmp / "blobs"))
    _create(tmp / "src-two", tmp / "boot", tmp / "blobs", "--chunk-size", "0x10000",
            "--parent-bootstrap", str(tmp / "boot1"))
    blobs = _blobs(tmp / "blobs")
    (layer2_blob,) = set(blobs) - before
    (layer1_blob,) = before
    return tmp / "boot", blobs, files, layer1_blob, layer2_blob


def _api(sock: pathlib.Path, method: str, path: str, body: dict | None = None) -> tuple[int, object]:
    """One request to nydusd's API socket with curl: (status, parsed JSON body or None)."""
    cmd = ["curl", "-s", "-o", "-", "-w", "\n%{http_code}", "--unix-socket", str(sock), "-X", method,
           f"http://localhost/api/v1{path}"]
    if body is not None:
        cmd += ["-H", "Content-Type: application/json", "-d", json.dumps(body)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    text, _, status = r.stdout.rpartition("\n")
    return int(status or 0), (json.loads(text) if text.strip() else None)


def _cat(path: pathlib.Path) -> subprocess.CompletedProcess:
    # Another process reads, so a daemon that hangs fails the test by timeout instead of hanging it.
    return subprocess.run(["cat", str(path)], capture_output=True, timeout=60)


FAULTS = ["500", "503", "reset", "short", "stall", "wrong_range", "404", "loop"]


@pytest.mark.parametrize("fault", FAULTS)
def test_faults_give_eio_to_that_file_only_then_recover(tmp_path, two_layers, fault):
    boot, blobs, files, layer1, layer2 = two_layers
    with DockerRegistry(tmp_path) as reg, FaultProxy(reg.host) as fp:
        for data in blobs.values():
            reg.push(REPO, data)
        retry_limit = 1
        backend = _registry_backend(fp.host, retry_limit=retry_limit, timeout=2, connect_timeout=2)
        api = tmp_path / "api.sock"
        d = _mount(tmp_path, boot, _config(tmp_path / "c.json", backend, tmp_path / "cache"), "--apisock", str(api))
        try:
            # Every try of every request for layer 2's blob fails while armed.
            fp.inject(fault, layer2, count=1000)
            r = _cat(d.mnt / "two" / "f0")
            assert r.returncode != 0 and b"Input/output error" in r.stderr, r
            status, events = _api(api, "GET", "/daemon/events")
            assert status == 200 and events["max_errors"] == 500 and events["max_size"] == 51200
            assert any(layer2 in e for e in events["errors"]), events
            status, metrics = _api(api, "GET", "/metrics/backend")
            assert status == 200 and metrics["backend_type"] == "registry" and metrics["read_errors"] >= 1
            assert (d.mnt / "one" / "f1").read_bytes() == files["one/f1"]    # the other blob still serves
            assert d.alive()
            fp.inject("", "", 0)                                              # the fault clears
            assert (d.mnt / "two" / "f0").read_bytes() == files["two/f0"]
            for name, data in files.items():
                assert (d.mnt / name).read_bytes() == data
            log = d.logtext()
        finally:
            d.stop()
    assert layer2 in log, log[-2000:]
    assert "Traceback" not in log


def test_expired_token_is_renewed_transparently(tmp_path, two_layers):
    boot, blobs, files, layer1, layer2 = two_layers
    tokens = TokenServer(tmp_path)
    tokens.start_in_thread()
    try:
        with DockerRegistry(tmp_path, auth=tokens) as reg, FaultProxy(reg.host) as fp:
            auth = base64.b64encode(f"{tokens.user}:{tokens.password}".encode()).decode()
            for data in blobs.values():
                reg.push(REPO, data, auth=auth)
            backend = _registry_backend(fp.host, auth=auth)
            d = _mount(tmp_path, boot, _config(tmp_path / "c.json", backend, tmp_path / "cache"))
            try:
                assert (d.mnt / "one" / "f0").read_bytes() == files["one/f0"]
                fetched = len(tokens.requests)
                fp.inject("unauth", layer2, count=1)      # the registry says 401 as for an expired token
                assert (d.mnt / "two" / "f0").read_bytes() == files["two/f0"]
                assert fp.faults_left == 0 and len(tokens.requests) == fetched + 1
            finally:
                d.stop()
    finally:
        tokens.stop_thread()


def test_wrong_credentials_and_missing_repo_are_clear_at_first_read(tmp_path, two_layers):
    boot, blobs, files, layer1, layer2 = two_layers
    with DockerRegistry(tmp_path, auth="htpasswd") as reg:
        for data in blobs.values():
            reg.push(REPO, data, auth=reg.basic_auth)
        wrong = base64.b64encode(b"alice:wrong").decode()
        api = tmp_path / "api.sock"
        d = _mount(tmp_path, boot, _config(tmp_path / "c.json", _registry_backend(reg.host, auth=wrong),
                                           tmp_path / "cache"), "--apisock", str(api))
        try:
            r = _cat(d.mnt / "one" / "f0")
            assert r.returncode != 0 and b"Input/output error" in r.stderr
            # Hot reload of the credentials (PUT /api/v1/config registry_auth): the same file now reads.
            status, _ = _api(api, "PUT", "/config", {"registry_auth": reg.basic_auth})
            assert status == 204
            assert (d.mnt / "one" / "f0").read_bytes() == files["one/f0"]
            log = d.logtext()
        finally:
            d.stop()
        assert "refused the configured credentials" in log and layer1 in log and wrong not in log
        assert reg.basic_auth not in log
        other = dict(_registry_backend(reg.host, auth=reg.basic_auth))
        other["config"] = dict(other["config"], repo="nydus/missing")
        (tmp_path / "m2").mkdir()
        d = _mount(tmp_path / "m2", boot, _config(tmp_path / "c2.json", other, tmp_path / "cache2"))
        try:
            r = _cat(d.mnt / "one" / "f0")
            assert r.returncode != 0 and b"Input/output error" in r.stderr
            log = d.logtext()
        finally:
            d.stop()
        assert "NAME_UNKNOWN" in log or "BLOB_UNKNOWN" in log, log[-2000:]


def test_full_cache_disk_degrades_to_backend_reads(tmp_path, two_layers):
    """A 256 KiB tmpfs as cache work_dir fills up at once: every file still reads right, from the registry."""
    boot, blobs, files, layer1, layer2 = two_layers
    cache = tmp_path / "tiny-cache"
    cache.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(cache)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.decode(errors='replace').strip()}")
    try:
        with DockerRegistry(tmp_path) as reg:
            for data in blobs.values():
                reg.push(REPO, data)
            d = _mount(tmp_path, boot, _config(tmp_path / "c.json", _registry_backend(reg.host), cache))
            try:
                for _ in range(2):
                    for name, data in files.items():
                        r = _cat(d.mnt / name)
                        assert r.returncode == 0 and r.stdout == data, (name, r.stderr)
                assert d.alive()
            finally:
                d.stop()
    finally:
        subprocess.run(["umount", "-l", str(cache)], check=False)
