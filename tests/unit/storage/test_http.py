"""The shared HTTP layer: response shapes of ranged reads, error mapping, proxy and fallback."""

from __future__ import annotations

import asyncio
import logging
import ssl

import aiohttp
import pytest
from aiohttp import web

from nydus_vfs.config import ProxyConfig
from nydus_vfs.errors import BackendError, BackendNotFoundError, BackendTimeoutError, ConfigError
from nydus_vfs.storage.backend._http import (
    HttpClient,
    HttpSettings,
    TlsError,
    map_client_error,
    read_range,
    read_small_body,
    redact_url,
)
from tests.unit.storage.http_helpers import FakeRegistry, ForwardProxy, serve
from tests.unit.storage.storage_helpers import run

DATA = bytes(range(256)) * 16


def _shapes_app() -> web.Application:
    """Each path answers a ranged GET in one of the shapes servers really use."""

    async def whole(request):                # ignores Range: 200 with the whole blob
        return web.Response(body=DATA)

    async def proxy_quirk(request):          # nydus-backend-proxy: 200 + Content-Range (total = range len)
        a, b = map(int, request.headers["Range"][6:].split("-"))
        return web.Response(body=DATA[a:b + 1], headers={"Content-Range": f"bytes {a}-{b}/{b - a + 1}"})

    async def extra(request):                # 206 whose Content-Length is larger than the range
        a, b = map(int, request.headers["Range"][6:].split("-"))
        return web.Response(status=206, body=DATA[a:b + 2],
                            headers={"Content-Range": f"bytes {a}-{b}/{len(DATA)}"})

    async def no_crange(request):
        return web.Response(status=206, body=b"x")

    async def garbage(request):
        return web.Response(status=206, body=b"x", headers={"Content-Range": "lines 1-2"})

    async def short_total(request):          # the blob ends before the asked range does
        a, _ = map(int, request.headers["Range"][6:].split("-"))
        return web.Response(status=206, body=DATA[a:], headers={"Content-Range": f"bytes {a}-{len(DATA) - 1}/{len(DATA)}"})

    async def gone(request):
        return web.Response(status=404)

    async def big(request):
        return web.Response(body=b"y" * 5000)

    app = web.Application()
    for name, handler in [("whole", whole), ("quirk", proxy_quirk), ("extra", extra), ("nocr", no_crange),
                          ("garbage", garbage), ("short_total", short_total), ("gone", gone), ("big", big)]:
        app.router.add_get(f"/{name}", handler)
    return app


async def _get(client, url, offset, size):
    async with client.request("GET", url, headers={"Range": f"bytes={offset}-{offset + size - 1}"},
                              what="test") as resp:
        return await read_range(resp, offset, size, "test")


def test_read_range_accepts_the_real_shapes_and_refuses_wrong_bytes():
    async def body():
        async with serve(_shapes_app()) as srv:
            client = HttpClient(HttpSettings(timeout=2, connect_timeout=2), name="t")
            try:
                assert await _get(client, srv.base + "/whole", 100, 50) == DATA[100:150]
                assert await _get(client, srv.base + "/quirk", 100, 50) == DATA[100:150]
                for path, offset, retryable in [("extra", 100, True), ("nocr", 100, True),
                                                ("garbage", 100, True), ("short_total", len(DATA) - 10, False)]:
                    with pytest.raises(BackendError) as info:
                        await _get(client, srv.base + "/" + path, offset, 50)
                    assert info.value.retryable is retryable, path
                with pytest.raises(BackendError, match="past the end"):
                    await _get(client, srv.base + "/whole", len(DATA) - 10, 50)
                with pytest.raises(BackendNotFoundError):
                    await _get(client, srv.base + "/gone", 0, 1)
                async with client.request("GET", srv.base + "/big", what="t") as resp:
                    with pytest.raises(BackendError, match="larger than 1000"):
                        await read_small_body(resp, "t", limit=1000)
                async with client.request("GET", srv.base + "/big", what="t") as resp:
                    assert await read_small_body(resp, "t") == b"y" * 5000
            finally:
                await client.aclose()

    run(body())


def test_error_mapping_and_redaction():
    assert redact_url("https://u:p@h:1/a/b?sig=xyz#f") == "https://h:1/a/b"
    assert isinstance(map_client_error(asyncio.TimeoutError(), "x"), BackendTimeoutError)
    assert map_client_error(aiohttp.ClientPayloadError("cut"), "x").retryable
    assert map_client_error(ConnectionResetError(104, "reset"), "x").retryable
    assert not map_client_error(aiohttp.InvalidURL("::"), "x").retryable
    assert isinstance(map_client_error(ssl.SSLError(1, "wrong version number"), "x"), TlsError)
    with pytest.raises(ConfigError, match="ca_cert_files.*/nonexistent.pem"):
        HttpClient(HttpSettings(ca_cert_files=("/nonexistent.pem",)), name="t")


def test_client_is_rebound_to_each_event_loop_and_closes():
    client = HttpClient(HttpSettings(timeout=2, connect_timeout=2), name="t")

    async def once():
        reg = FakeRegistry({"a" * 64: DATA})
        async with reg:
            url = f"{reg.server.base}/v2/library/test/blobs/sha256:{'a' * 64}"
            return await _get(client, url, 0, 10)

    assert run(once()) == DATA[:10]
    assert run(once()) == DATA[:10]          # a second loop: a second session
    client.close()
    client.close()
    with pytest.raises(BackendError, match="closed"):
        run(once())


def _proxied(proxy_url: str, **kw) -> HttpClient:
    return HttpClient(HttpSettings(timeout=2, connect_timeout=1, proxy=ProxyConfig(url=proxy_url, **kw)), name="t")


def test_requests_go_through_the_proxy_and_fall_back(caplog):
    caplog.set_level(logging.WARNING)
    reg = FakeRegistry({"a" * 64: DATA})
    proxy = ForwardProxy()

    async def body():
        async with reg, proxy:
            url = f"{reg.server.base}/v2/library/test/blobs/sha256:{'a' * 64}"
            client = _proxied(proxy.url, check_interval=1)
            try:
                assert await _get(client, url, 0, 10) == DATA[:10]
                assert proxy.seen == [url]
                proxy.mode = "502"              # the proxy breaks: direct, with a warning
                assert await _get(client, url, 10, 10) == DATA[10:20]
                assert await _get(client, url, 20, 10) == DATA[20:30]
                assert len(proxy.seen) == 2     # unhealthy: the third read went direct at once
                assert client.proxy.failures == 1
            finally:
                await client.aclose()
            dead = _proxied("http://127.0.0.1:1")
            try:
                for i in range(3):
                    assert await _get(dead, url, i, 5) == DATA[i:i + 5]
            finally:
                await dead.aclose()
            strict = _proxied("http://127.0.0.1:1", fallback=False)
            try:
                with pytest.raises(BackendError, match="via proxy"):
                    await _get(strict, url, 0, 5)
            finally:
                await strict.aclose()

    run(body())
    warnings = [r for r in caplog.records if r.name == "nydus_vfs.storage" and "falling back" in r.getMessage()]
    assert len(warnings) == 2                   # one per client: rate-limited


def test_ping_url_health_task_restores_the_proxy_and_use_http():
    reg = FakeRegistry({"a" * 64: DATA})
    proxy = ForwardProxy()

    async def body():
        async with reg, proxy:
            url = f"{reg.server.base}/v2/library/test/blobs/sha256:{'a' * 64}"
            client = _proxied(proxy.url, ping_url=proxy.url + "/ping", check_interval=1)
            try:
                proxy.mode = "502"
                assert await _get(client, url, 0, 10) == DATA[:10]
                assert not client.proxy.healthy
                proxy.mode = "ok"
                for _ in range(50):             # the health task runs every second
                    if client.proxy.healthy:
                        break
                    await asyncio.sleep(0.1)
                assert client.proxy.healthy
                seen = len(proxy.seen)
                assert await _get(client, url, 0, 10) == DATA[:10]
                assert len(proxy.seen) == seen + 1
            finally:
                await client.aclose()
            https_url = url.replace("http://", "https://")
            rewriting = _proxied(proxy.url, use_http=True)
            try:
                assert await _get(rewriting, https_url, 0, 10) == DATA[:10]
                assert proxy.seen[-1] == url
            finally:
                await rewriting.aclose()
            rewriting.set_proxy_url("")
            assert not rewriting.proxy.usable()

    run(body())


def test_close_after_the_loop_ended_leaves_nothing_open(recwarn):
    client = HttpClient(HttpSettings(timeout=2, connect_timeout=2), name="t")

    async def once():
        async with FakeRegistry({"a" * 64: DATA}) as reg:
            url = f"{reg.server.base}/v2/library/test/blobs/sha256:{'a' * 64}"
            assert await _get(client, url, 0, 10) == DATA[:10]
        return client._session

    session = run(once())                    # asyncio.run closed that loop
    connector = session.connector
    client.close()
    assert session.closed and connector.closed
    assert not [w for w in recwarn if "close" in str(w.message).lower()]


def test_health_checks_pause_when_the_backend_is_idle():
    reg = FakeRegistry({"a" * 64: DATA})
    proxy = ForwardProxy()

    async def body():
        async with reg, proxy:
            url = f"{reg.server.base}/v2/library/test/blobs/sha256:{'a' * 64}"
            # check_pause_elapsed=0: idle as soon as a request is done, so no ping is ever sent.
            client = _proxied(proxy.url, ping_url=proxy.url + "/ping", check_interval=1, check_pause_elapsed=0)
            try:
                proxy.mode = "502"
                assert await _get(client, url, 0, 10) == DATA[:10]
                proxy.mode = "ok"
                await asyncio.sleep(2.5)
                assert proxy.pings == 0 and not client.proxy.healthy
                assert await _get(client, url, 0, 10) == DATA[:10]     # still direct meanwhile
            finally:
                await client.aclose()

    run(body())
