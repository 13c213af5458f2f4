"""Pushing nydus blobs to an object store (``nydusify convert --backend-type s3|oss``), a :class:`Backend`.

The config is the one nydusd reads for its ``s3`` or ``oss`` backend
(nydus-surface.md §2.3: ``scheme``, ``endpoint``, ``bucket_name``,
``object_prefix``, ``access_key_id``, ``access_key_secret``, and S3's
``region``), parsed and validated by :mod:`nydus_vfs.config`, so whatever
nydusify accepts nydusd accepts too.  Object ``<object_prefix><blob hex
digest>`` is what nydusd's backend reads for that blob id.  Requests are signed
by the storage layer's signers: SigV4 for S3
(:func:`~nydus_vfs.storage.backend.s3.sigv4_authorization`; an upload's
payload hash is the blob's sha256, which *is* its digest) and the OSS V1
signature (:func:`~nydus_vfs.storage.backend.oss.oss_signature`).  Keys never
appear in errors.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import ssl
import time
from email.utils import formatdate
from typing import Any
from urllib.parse import urlsplit

from ..config import OssConfig, S3Config, parse_daemon_config
from ..errors import ConfigError, ConvertError
from ..storage.backend.oss import oss_object_url, oss_signature, oss_string_to_sign
from ..storage.backend.s3 import EMPTY_SHA256, s3_object_url, sigv4_authorization

__all__ = ["ObjectBlobStore", "S3BlobStore", "OssBlobStore", "object_store_from_config"]

_TIMEOUT = 300
_OCTET = "application/octet-stream"


def object_store_from_config(backend_type: str, config_text: str) -> "ObjectBlobStore":
    """The blob store for ``--backend-type``/``--backend-config``; ConvertError names a bad key."""
    if backend_type not in ("s3", "oss"):
        raise ConvertError(f"--backend-type {backend_type!r} is not supported for pushing blobs (s3 or oss)")
    try:
        cfg = json.loads(config_text)
    except ValueError as exc:
        raise ConvertError(f"--backend-config is not JSON: {exc}") from None
    doc = {"device": {"backend": {"type": backend_type, "config": cfg}, "cache": {"type": ""}}, "mode": "direct"}
    try:
        parsed = parse_daemon_config(json.dumps(doc))
    except ConfigError as exc:
        raise ConvertError(f"--backend-config: {exc}") from None
    assert parsed.backend is not None
    if backend_type == "s3":
        assert isinstance(parsed.backend.s3, S3Config)
        return S3BlobStore(parsed.backend.s3)
    assert isinstance(parsed.backend.oss, OssConfig)
    return OssBlobStore(parsed.backend.oss)


class ObjectBlobStore:
    """Push, check and fetch blobs in one bucket (sync; the converter calls it from worker threads).

    Subclasses say where an object lives (:meth:`url`, :meth:`_resource`) and
    how a request is signed (:meth:`_sign`).
    """

    name = ""

    def __init__(self, cfg: S3Config | OssConfig) -> None:
        self.cfg = cfg
        self.scheme = "http" if cfg.scheme == "http" else "https"

    def type(self) -> str:
        return self.name

    def _blob_id(self, blob_digest: str) -> str:
        """The blob id nydusd names the object by: the digest's hex part."""
        algo, _, hexd = blob_digest.partition(":")
        if algo != "sha256" or len(hexd) != 64:
            raise ConvertError(f"{self.name}: {blob_digest!r} is not a sha256 digest")
        return hexd

    def _key(self, blob_digest: str) -> str:
        return self.cfg.object_prefix + self._blob_id(blob_digest)

    def url(self, blob_digest: str) -> str:
        raise NotImplementedError

    def _sign(self, method: str, blob_digest: str, parts, headers: dict[str, str], payload_hash: str) -> None:
        raise NotImplementedError

    def _request(self, method: str, blob_digest: str, *, body_path: str | None = None,
                 payload_hash: str = EMPTY_SHA256, sink: str | None = None,
                 hasher: Any = None) -> tuple[int, bytes]:
        url = self.url(blob_digest)
        parts = urlsplit(url)
        headers = {"Host": parts.netloc}
        if body_path:
            headers["Content-Length"] = str(os.path.getsize(body_path))
            headers["Content-Type"] = _OCTET
        if self.cfg.access_key_id:
            self._sign(method, blob_digest, parts, headers, payload_hash)
        conn = (http.client.HTTPSConnection(parts.netloc, timeout=_TIMEOUT, context=ssl.create_default_context())
                if self.scheme == "https" else http.client.HTTPConnection(parts.netloc, timeout=_TIMEOUT))
        try:
            if body_path:
                with open(body_path, "rb") as f:
                    conn.request(method, parts.path, body=f, headers=headers)
                    resp = conn.getresponse()
            else:
                conn.request(method, parts.path, headers=headers)
                resp = conn.getresponse()
            if sink is not None and resp.status == 200:
                with open(sink, "wb") as out:
                    while piece := resp.read(1 << 20):
                        out.write(piece)
                        if hasher is not None:
                            hasher.update(piece)
                return resp.status, b""
            return resp.status, resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise ConvertError(f"{self.name} {parts.netloc}: {method} {self._key(blob_digest)}: {exc}") from None
        finally:
            conn.close()

    def _fail(self, method: str, blob_digest: str, status: int, body: bytes) -> ConvertError:
        where = urlsplit(self.url(blob_digest)).netloc
        return ConvertError(f"{self.name} {where}: {method} {self._key(blob_digest)}: HTTP {status} "
                            f"{body[:300].decode(errors='replace')}")

    def check(self, blob_digest: str) -> str:
        """The blob's URL when the bucket has it; FileNotFoundError when not, ConvertError on other answers."""
        status, body = self._request("HEAD", blob_digest)
        if status == 200:
            return self.url(blob_digest)
        if status == 404:
            raise FileNotFoundError(f"{self.name} object {self._key(blob_digest)} does not exist")
        raise self._fail("HEAD", blob_digest, status, body)

    def push(self, path: str, blob_digest: str) -> None:
        """Upload the blob file ``path`` (whose sha256 is ``blob_digest``)."""
        status, body = self._request("PUT", blob_digest, body_path=path, payload_hash=blob_digest.partition(":")[2])
        if status not in (200, 201):
            raise self._fail("PUT", blob_digest, status, body)

    def fetch(self, blob_digest: str, dest: str) -> None:
        """Download the blob into ``dest``, checking its sha256 against ``blob_digest``."""
        h = hashlib.sha256()   # hashed as it is written: the file is not read back
        status, body = self._request("GET", blob_digest, sink=dest, hasher=h)
        if status != 200:
            raise self._fail("GET", blob_digest, status, body)
        if "sha256:" + h.hexdigest() != blob_digest:
            raise ConvertError(f"{self.name}: object {self._key(blob_digest)} does not match its digest")


class S3BlobStore(ObjectBlobStore):
    """An S3 bucket, path-style ``<endpoint>/<bucket>/<key>``, SigV4-signed."""

    name = "s3"

    def url(self, blob_digest: str) -> str:
        return s3_object_url(self.cfg, self._blob_id(blob_digest))

    def _sign(self, method: str, blob_digest: str, parts, headers: dict[str, str], payload_hash: str) -> None:
        amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        signed = {"host": parts.netloc, "x-amz-content-sha256": payload_hash, "x-amz-date": amz_date}
        headers.update({"x-amz-content-sha256": payload_hash, "x-amz-date": amz_date,
                        "Authorization": sigv4_authorization(
                            method=method, canonical_uri=parts.path, canonical_query="", headers=signed,
                            payload_hash=payload_hash, access_key_id=self.cfg.access_key_id,
                            secret=self.cfg.access_key_secret, region=self.cfg.region, amz_date=amz_date)})


class OssBlobStore(ObjectBlobStore):
    """An Aliyun OSS bucket, virtual-host style ``<bucket>.<endpoint>/<key>``, V1-signed.

    The same object URL nydusd's ``oss`` backend reads.
    """

    name = "oss"

    def url(self, blob_digest: str) -> str:
        return oss_object_url(self.cfg, self._blob_id(blob_digest))

    def _sign(self, method: str, blob_digest: str, parts, headers: dict[str, str], payload_hash: str) -> None:
        headers["Date"] = formatdate(usegmt=True)
        resource = f"/{self.cfg.bucket_name}/{self._key(blob_digest)}"
        sts = oss_string_to_sign(method, "", headers.get("Content-Type", ""), headers["Date"], headers, resource)
        headers["Authorization"] = f"OSS {self.cfg.access_key_id}:{oss_signature(self.cfg.access_key_secret, sts)}"
