"""The registry backend against Debian's docker-registry: plain, Basic (htpasswd), token auth
(our token endpoint), TLS with a private CA, nginx 307 redirects, tinyproxy as the forward proxy."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import os

import pytest

from nydus_vfs.config import ProxyConfig, RegistryConfig
from nydus_vfs.errors import BackendError, BackendNotFoundError
from nydus_vfs.storage.backend.base import RetryPolicy
from nydus_vfs.storage.backend.registry import RegistryBackend
from tests.functional.registry_helpers import DockerRegistry, Nginx, Tinyproxy, TokenServer, make_ca

REPO = "nydus/test"
DATA = os.urandom(300_000)


def _read_all(cfg: RegistryConfig, blob_id: str, ranges, **kw):
    async def body():
        b = RegistryBackend(cfg, retry=RetryPolicy(retry_limit=cfg.retry_limit, base_delay=0.05), env={}, **kw)
        try:
            out = [await b.read(blob_id, off, size) for off, size in ranges]
            return out, await b.blob_size(blob_id), b
        finally:
            await b.aclose()

    return asyncio.run(body())


def _cfg(reg, **kw) -> RegistryConfig:
    kw.setdefault("scheme", reg.scheme)
    return RegistryConfig(host=kw.pop("host", reg.host), repo=kw.pop("repo", REPO), timeout=5, connect_timeout=2, **kw)


RANGES = [(0, 4096), (100_000, 65536), (len(DATA) - 10, 10)]


def _expect():
    return [DATA[o:o + s] for o, s in RANGES]


def test_plain_registry_reads_sizes_and_clear_errors(tmp_path):
    with DockerRegistry(tmp_path) as reg:
        blob = reg.push(REPO, DATA)
        got, size, backend = _read_all(_cfg(reg), blob, RANGES)
        assert got == _expect() and size == len(DATA)
        assert backend.metrics.read_count == 3 and reg.blob_gets() >= 3
        with pytest.raises(BackendNotFoundError, match="BLOB_UNKNOWN"):
            _read_all(_cfg(reg), "0" * 64, [(0, 1)])
        with pytest.raises(BackendNotFoundError, match="BLOB_UNKNOWN|NAME_UNKNOWN"):
            _read_all(_cfg(reg, repo="nydus/missing"), blob, [(0, 1)])
        with pytest.raises(BackendError, match="past the end"):
            _read_all(_cfg(reg), blob, [(len(DATA) - 5, 10)])


def test_htpasswd_basic_auth(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="nydus_vfs")
    with DockerRegistry(tmp_path, auth="htpasswd") as reg:
        blob = reg.push(REPO, DATA, auth=reg.basic_auth)
        got, size, _ = _read_all(_cfg(reg, auth=reg.basic_auth), blob, RANGES)
        assert got == _expect() and size == len(DATA)
        wrong = base64.b64encode(b"alice:wrong").decode()
        with pytest.raises(BackendError, match="refused the configured credentials") as info:
            _read_all(_cfg(reg, auth=wrong, retry_limit=2), blob, [(0, 1)])
        assert not info.value.retryable
        with pytest.raises(BackendError, match="no 'auth' is configured"):
            _read_all(_cfg(reg), blob, [(0, 1)])
    assert reg.password not in caplog.text and reg.basic_auth not in caplog.text


def test_token_auth_with_our_token_endpoint(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="nydus_vfs")
    tokens = TokenServer(tmp_path)
    tokens.start_in_thread()
    try:
        with DockerRegistry(tmp_path, auth=tokens) as reg:
            auth = base64.b64encode(f"{tokens.user}:{tokens.password}".encode()).decode()
            blob = reg.push(REPO, DATA, auth=auth)
            tokens.requests.clear()
            got, size, _ = _read_all(_cfg(reg, auth=auth), blob, RANGES)
            assert got == _expect() and size == len(DATA)
            assert [m for m, _ in tokens.requests] == ["POST"]        # one token, reused
            form = tokens.requests[0][1]
            assert form["scope"] == f"repository:{REPO}:pull" and form["service"] == TokenServer.SERVICE
            assert form["client_id"] == "nydus-registry-client"
            with pytest.raises(BackendError, match="token endpoint refused"):
                _read_all(_cfg(reg, auth=base64.b64encode(b"tok-user:nope").decode()), blob, [(0, 1)])
    finally:
        tokens.stop_thread()
    assert tokens.password not in caplog.text


def test_tls_with_a_private_ca(tmp_path):
    ca, cert, key = make_ca(tmp_path)
    with DockerRegistry(tmp_path, tls=(cert, key)) as reg:
        blob = reg.push(REPO, DATA, ca=ca)
        got, _, _ = _read_all(_cfg(reg, ca_cert_files=(str(ca),)), blob, RANGES)
        assert got == _expect()
        with pytest.raises(BackendError, match="TLS error.*ca_cert_files") as info:
            _read_all(_cfg(reg, retry_limit=2), blob, [(0, 1)])
        assert not info.value.retryable
        got, _, backend = _read_all(_cfg(reg, skip_verify=True), blob, RANGES)
        assert got == _expect() and backend.scheme == "https"     # TLS works: no fallback


def test_https_to_http_fallback_needs_skip_verify(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="nydus_vfs")
    with DockerRegistry(tmp_path) as reg:
        blob = reg.push(REPO, DATA)
        with pytest.raises(BackendError, match="TLS error"):
            _read_all(_cfg(reg, scheme="https"), blob, [(0, 1)])
        got, _, backend = _read_all(_cfg(reg, scheme="https", skip_verify=True), blob, RANGES)
        assert got == _expect() and backend.scheme == "http"
    assert "falling back to plain HTTP because skip_verify is set" in caplog.text


def test_nginx_307_redirects_with_blob_redirected_host(tmp_path):
    with DockerRegistry(tmp_path) as reg, Nginx(tmp_path, reg.host) as nginx:
        blob = reg.push(REPO, DATA)
        front = f"127.0.0.1:{nginx.port}"
        cfg = _cfg(reg, host=front, blob_redirected_host=f"127.0.0.1:{nginx.data_port}")
        got, size, _ = _read_all(cfg, blob, RANGES)
        assert got == _expect() and size == len(DATA)
        # One 307 per blob (then the target is cached), every byte from the second location.
        assert [line.split()[-1] for line in nginx.requests("front")] == ["307"]
        # nginx writes an access-log line after the response went out: give the last one a moment.
        for _ in range(50):
            if len(nginx.requests("data")) >= len(RANGES) + 1:
                break
            time.sleep(0.05)
        assert len(nginx.requests("data")) == len(RANGES) + 1
        with pytest.raises(BackendError, match="redirected to http://127.0.0.2"):
            _read_all(_cfg(reg, host=front, retry_limit=1), blob, [(0, 1)])


def test_tinyproxy_forward_proxy_with_fallback_when_it_dies(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="nydus_vfs")
    with DockerRegistry(tmp_path) as reg, Tinyproxy(tmp_path) as proxy:
        blob = reg.push(REPO, DATA)
        cfg = _cfg(reg, proxy=ProxyConfig(url=proxy.url, check_interval=1))

        async def body():
            b = RegistryBackend(cfg, env={})
            try:
                assert await b.read(blob, 0, 1000) == DATA[:1000]
                proxy.stop()                                   # the dfdaemon dies mid-run
                assert proxy.proxied(blob) == 1                # (its log is flushed at exit)
                assert await b.read(blob, 1000, 1000) == DATA[1000:2000]
                assert await b.read(blob, 2000, 1000) == DATA[2000:3000]
            finally:
                await b.aclose()

        asyncio.run(body())
        strict = _cfg(reg, proxy=ProxyConfig(url=proxy.url, fallback=False))
        with pytest.raises(BackendError, match="via proxy"):
            _read_all(strict, blob, [(0, 1)])
    warnings = [r for r in caplog.records if "falling back to a direct request" in r.getMessage()]
    assert len(warnings) == 1
