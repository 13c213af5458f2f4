"""create_backend: every backend type from a parsed config, shared identities, refusals."""

from __future__ import annotations

import logging

import json
import socket

import pytest

from nydus_vfs.config import parse_daemon_config
from nydus_vfs.errors import ConfigError
from nydus_vfs.storage.backend import (
    HttpProxyBackend,
    LocalfsBackend,
    OssBackend,
    RegistryBackend,
    S3Backend,
    create_backend,
)


def _v2(backend: dict) -> str:
    return json.dumps({"version": 2, "backend": backend})


@pytest.mark.parametrize(("doc", "cls"), [
    ({"type": "localfs", "localfs": {"dir": "/tmp"}}, LocalfsBackend),
    ({"type": "registry", "registry": {"host": "r.io", "repo": "a/b", "retry_limit": 3}}, RegistryBackend),
    ({"type": "oss", "oss": {"endpoint": "oss.example", "bucket_name": "b", "access_key_id": "K",
                             "access_key_secret": "S"}}, OssBackend),
    ({"type": "s3", "s3": {"endpoint": "", "region": "us-east-1", "bucket_name": "b"}}, S3Backend),
    ({"type": "http-proxy", "http-proxy": {"addr": "http://127.0.0.1:9", "path": "/blobs"}}, HttpProxyBackend),
])
def test_every_type(doc, cls):
    cfg = parse_daemon_config(_v2(doc)).backend
    a, b = create_backend(cfg), create_backend(cfg, backend_id="/snap1")
    assert type(a) is cls and a.identity == b.identity
    assert a.retry.retry_limit == (3 if doc["type"] == "registry" else 0)
    for secret in ("K", "S"):
        assert f"'{secret}'" not in repr(a)
    a.close()
    b.close()


def test_refusals(tmp_path):
    cfg = parse_daemon_config(_v2({"type": "localdisk", "localdisk": {"device_path": "/dev/null"}})).backend
    with pytest.raises(ConfigError, match="not supported"):
        create_backend(cfg)
    with pytest.raises(ConfigError, match="backend section"):
        create_backend(None)
    missing = parse_daemon_config(_v2({"type": "http-proxy", "http-proxy": {"addr": str(tmp_path / "nope.sock")}}))
    with pytest.raises(ConfigError, match="nope.sock"):
        create_backend(missing.backend)
    plain = tmp_path / "file"
    plain.write_text("")
    with pytest.raises(ConfigError, match="neither"):
        create_backend(parse_daemon_config(_v2({"type": "http-proxy", "http-proxy": {"addr": str(plain)}})).backend)
    sock_path = tmp_path / "s.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock_path))
    try:
        b = create_backend(parse_daemon_config(_v2({"type": "http-proxy", "http-proxy": {"addr": str(sock_path)}})).backend)
        assert isinstance(b, HttpProxyBackend)
    finally:
        s.close()


def test_dragonfly_sdk_mode_is_refused_with_a_warning(caplog):
    cfg = parse_daemon_config(_v2({"type": "registry", "registry": {
        "host": "r.io", "repo": "a/b", "proxy": {"dragonfly_scheduler_endpoint": "http://sched:8002"}}})).backend
    # The level is set here: an earlier test may have left the root logger at ERROR.
    with caplog.at_level(logging.WARNING, logger="nydus_vfs"):
        b = create_backend(cfg, backend_id="/m")
    assert "dragonfly_scheduler_endpoint" in caplog.text and "/m" in caplog.text
    b.close()
