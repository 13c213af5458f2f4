"""The OSS backend: V1 signature (Aliyun's worked example) and reads from a verifying server."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging

import pytest
from aiohttp import web

from nydus_vfs.config import OssConfig
from nydus_vfs.errors import BackendError, BackendNotFoundError
from nydus_vfs.storage.backend.base import RetryPolicy
from nydus_vfs.storage.backend.oss import OssBackend, oss_signature, oss_string_to_sign
from tests.unit.storage.http_helpers import serve
from tests.unit.storage.storage_helpers import run

KEY_ID, SECRET = "LTAI-test-id", "oss-secret-never-shown"
DATA = bytes(range(256)) * 32


def test_signature_matches_aliyun_worked_example():
    # "Include a V1 signature in the Authorization header", Aliyun OSS documentation.
    sts = oss_string_to_sign("PUT", "ODBGOERFMDMzQTczRUY3NUE3NzA5QzdFNUYzMDQxNEM=", "text/html",
                             "Thu, 17 Nov 2005 18:49:58 GMT",
                             {"X-OSS-Meta-Author": "foo@bar.com", "X-OSS-Magic": "abracadabra", "Range": "x"},
                             "/oss-example/nelson")
    assert sts == ("PUT\nODBGOERFMDMzQTczRUY3NUE3NzA5QzdFNUYzMDQxNEM=\ntext/html\nThu, 17 Nov 2005 18:49:58 GMT\n"
                   "x-oss-magic:abracadabra\nx-oss-meta-author:foo@bar.com\n/oss-example/nelson")
    assert oss_signature("OtxrzxIsfpFjA7SwPzILwy8Bw21TLhquhboDYROV", sts) == "26NBxoKdsyly4EDv6inkoDft/yA="


def _oss_app(seen: list) -> web.Application:
    """A bucket "bkt" served at /<key>, checking every request's V1 signature itself."""

    async def handler(request: web.Request):
        key = request.path[1:]
        resource = f"/bkt/{key}"
        sts = f"{request.method}\n\n\n{request.headers.get('Date', '')}\n{resource}"
        want = base64.b64encode(hmac.new(SECRET.encode(), sts.encode(), hashlib.sha1).digest()).decode()
        seen.append(request.headers.get("Authorization"))
        if request.headers.get("Authorization") != f"OSS {KEY_ID}:{want}":
            return web.Response(status=403, text="<Code>SignatureDoesNotMatch</Code>")
        if key != "prefix/" + "e" * 64:
            return web.Response(status=404)
        if request.method == "HEAD":
            return web.Response(headers={"Content-Length": str(len(DATA))})
        a, b = map(int, request.headers["Range"][6:].split("-"))
        return web.Response(status=206, body=DATA[a:b + 1], headers={"Content-Range": f"bytes {a}-{b}/{len(DATA)}"})

    app = web.Application()
    app.router.add_route("*", "/{key:.*}", handler)
    return app


def test_signed_reads_against_a_verifying_server(caplog):
    caplog.set_level(logging.DEBUG)
    seen: list = []

    async def body():
        async with serve(_oss_app(seen)) as srv:
            # The bucket is addressed as <bucket>.<endpoint>: point that name at our server.
            cfg = OssConfig(scheme="http", endpoint=f"localhost:{srv.port}", bucket_name="bkt",
                            object_prefix="prefix/", access_key_id=KEY_ID, access_key_secret=SECRET)
            b = OssBackend(cfg, retry=RetryPolicy(retry_limit=1, base_delay=0.01))
            b._url = lambda blob_id: f"http://127.0.0.1:{srv.port}/prefix/{blob_id}"  # type: ignore[method-assign]
            try:
                assert await b.read("e" * 64, 100, 1000) == DATA[100:1100]
                assert await b.blob_size("e" * 64) == len(DATA)
                with pytest.raises(BackendNotFoundError):
                    await b.read("f" * 64, 0, 10)
                b._secret = "wrong"
                with pytest.raises(BackendError, match="HTTP 403") as info:
                    await b.read("e" * 64, 0, 10)
                assert not info.value.retryable
            finally:
                await b.aclose()
            assert b.metrics.backend_type == "oss" and b.metrics.read_count == 1
            assert SECRET not in repr(b) and KEY_ID not in repr(b) and SECRET not in repr(cfg)

    run(body())
    assert all(s and s.startswith(f"OSS {KEY_ID}:") for s in seen)
    assert SECRET not in caplog.text


def test_url_shape_and_anonymous_requests():
    b = OssBackend(OssConfig(endpoint="oss-cn-hangzhou.aliyuncs.com", bucket_name="bkt", object_prefix="nydus/"))
    assert b._url("abc") == "https://bkt.oss-cn-hangzhou.aliyuncs.com/nydus/abc"
    headers = b._sign("GET", "abc", b._url("abc"), {"Range": "bytes=0-1"})
    assert "Authorization" not in headers and "Date" in headers
    b.close()
