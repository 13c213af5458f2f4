"""The http-proxy backend over TCP (addr + path + bare id) and over a Unix socket (path ignored)."""

from __future__ import annotations

import pytest
from aiohttp import web

from nydus_vfs.config import HttpProxyConfig
from nydus_vfs.errors import BackendError, BackendNotFoundError
from nydus_vfs.storage.backend.base import RetryPolicy
from nydus_vfs.storage.backend.http_proxy import HttpProxyBackend
from tests.unit.storage.http_helpers import serve
from tests.unit.storage.storage_helpers import run

BLOB = "9" * 64
DATA = b"0123456789abcdef" * 512


def _app(prefix: str, seen: list, faults: list) -> web.Application:
    async def handler(request: web.Request):
        seen.append((request.method, request.path))
        if faults:
            return web.Response(status=faults.pop(0))
        if request.path != f"{prefix}/{BLOB}":
            return web.Response(status=404)
        if request.method == "HEAD":
            return web.Response(headers={"Content-Length": str(len(DATA))})
        a, b = map(int, request.headers["Range"][6:].split("-"))
        # Like nydus-backend-proxy (nydus-surface.md §0 item 20): 200, Content-Range total = range length.
        return web.Response(status=200, body=DATA[a:b + 1], headers={"Content-Range": f"bytes {a}-{b}/{b - a + 1}"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


def test_tcp_addr_and_path():
    seen: list = []
    faults: list = []

    async def body():
        async with serve(_app("/blobs", seen, faults)) as srv:
            b = HttpProxyBackend(HttpProxyConfig(addr=srv.base + "/", path="/blobs/"),
                                 retry=RetryPolicy(retry_limit=1, base_delay=0.01))
            try:
                assert await b.read(BLOB, 10, 100) == DATA[10:110]
                assert await b.blob_size(BLOB) == len(DATA)
                assert seen == [("GET", f"/blobs/{BLOB}"), ("HEAD", f"/blobs/{BLOB}")]
                faults.extend([503])
                assert await b.read(BLOB, 0, 10) == DATA[:10]
                faults.extend([503, 503])
                with pytest.raises(BackendError, match="HTTP 503"):
                    await b.read(BLOB, 0, 10)
                with pytest.raises(BackendNotFoundError):
                    await b.read("8" * 64, 0, 10)
            finally:
                await b.aclose()

    run(body())


def test_unix_socket_ignores_path(tmp_path):
    seen: list = []
    sock = str(tmp_path / "proxy.sock")

    async def body():
        async with serve(_app("", seen, []), unix_path=sock):
            b = HttpProxyBackend(HttpProxyConfig(addr=sock, path="/ignored"))
            try:
                assert await b.read(BLOB, 5, 5) == DATA[5:10]
                assert await b.blob_size(BLOB) == len(DATA)
            finally:
                await b.aclose()
            assert b.identity == HttpProxyBackend(HttpProxyConfig(addr=sock, path="/ignored")).identity

    run(body())
    assert seen == [("GET", f"/{BLOB}"), ("HEAD", f"/{BLOB}")]
