"""Blob stores for ``nydusify --backend-type``: config parsing and OSS pushes to a verifying server.

(S3 pushes run against moto in tests/functional/test_nydusify.py.)
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import threading

import pytest

from nydus_vfs.convert import OssBlobStore, S3BlobStore, object_store_from_config
from nydus_vfs.errors import ConvertError

KEY_ID, SECRET = "LTAI-push-id", "oss-push-secret"


class _Bucket(http.server.BaseHTTPRequestHandler):
    """Bucket "bkt" at /<key>: checks every request's V1 signature, stores PUT bodies."""

    objects: dict[str, bytes] = {}
    secret = SECRET

    def log_message(self, *args) -> None:
        pass

    def _authorized(self) -> bool:
        key = self.path[1:]
        sts = (f"{self.command}\n\n{self.headers.get('Content-Type', '')}\n{self.headers.get('Date', '')}\n"
               f"/bkt/{key}")
        want = base64.b64encode(hmac.new(self.secret.encode(), sts.encode(), hashlib.sha1).digest()).decode()
        if self.headers.get("Authorization") == f"OSS {KEY_ID}:{want}":
            return True
        body = b"<Code>SignatureDoesNotMatch</Code>"
        self.rfile.read(int(self.headers.get("Content-Length") or 0))  # drain an upload before refusing it
        self.send_response(403)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        return False

    def do_PUT(self) -> None:
        if self._authorized():
            self.objects[self.path[1:]] = self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    def _get(self, body: bool) -> None:
        if not self._authorized():
            return
        data = self.objects.get(self.path[1:])
        self.send_response(200 if data is not None else 404)
        self.send_header("Content-Length", str(len(data or b"")))
        self.end_headers()
        if body and data:
            self.wfile.write(data)

    def do_GET(self) -> None:
        self._get(True)

    def do_HEAD(self) -> None:
        self._get(False)


@pytest.fixture
def bucket():
    _Bucket.objects = {}
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Bucket)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def _oss(port: int, secret: str = SECRET) -> OssBlobStore:
    store = object_store_from_config("oss", json.dumps({
        "scheme": "http", "endpoint": f"oss.example:{port}", "bucket_name": "bkt", "object_prefix": "nydus/",
        "access_key_id": KEY_ID, "access_key_secret": secret}))
    assert isinstance(store, OssBlobStore) and store.type() == "oss"
    # <bucket>.<endpoint> is what nydusd's oss backend reads; the test server answers on loopback.
    assert store.url("sha256:" + "a" * 64) == f"http://bkt.oss.example:{port}/nydus/{'a' * 64}"
    store.url = lambda digest: f"http://127.0.0.1:{port}/{store._key(digest)}"  # type: ignore[method-assign]
    return store


def test_oss_push_check_fetch_with_v1_signatures(bucket, tmp_path):
    data = b"nydus blob " * 1000
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (tmp_path / "blob").write_bytes(data)
    store = _oss(bucket)
    with pytest.raises(FileNotFoundError):
        store.check(digest)
    store.push(str(tmp_path / "blob"), digest)
    assert _Bucket.objects == {"nydus/" + digest[7:]: data}
    assert store.check(digest).endswith("/nydus/" + digest[7:])
    store.fetch(digest, str(tmp_path / "back"))
    assert (tmp_path / "back").read_bytes() == data
    # A wrong secret is refused by the server, and the error names neither key.
    bad = _oss(bucket, secret="wrong")
    with pytest.raises(ConvertError, match="HTTP 403") as info:
        bad.push(str(tmp_path / "blob"), digest)
    assert "wrong" not in str(info.value) and KEY_ID not in str(info.value)
    # An object that does not match its digest is refused on fetch.
    _Bucket.objects["nydus/" + "b" * 64] = b"other"
    with pytest.raises(ConvertError, match="does not match its digest"):
        store.fetch("sha256:" + "b" * 64, str(tmp_path / "x"))


def test_configs_are_checked_like_nydusd_checks_them():
    s3 = object_store_from_config("s3", json.dumps({"endpoint": "s3.example", "region": "r1",
                                                    "bucket_name": "b", "object_prefix": "p/"}))
    assert isinstance(s3, S3BlobStore) and s3.url("sha256:" + "c" * 64) == f"https://s3.example/b/p/{'c' * 64}"
    with pytest.raises(ConvertError, match="not supported for pushing blobs"):
        object_store_from_config("registry", "{}")
    with pytest.raises(ConvertError, match="not JSON"):
        object_store_from_config("oss", "{")
    with pytest.raises(ConvertError, match="--backend-config"):
        object_store_from_config("oss", json.dumps({"endpoint": "e"}))    # no bucket_name
    with pytest.raises(ConvertError, match="not a sha256 digest"):
        s3.url("md5:abc")
