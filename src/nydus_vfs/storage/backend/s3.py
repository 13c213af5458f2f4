"""The ``s3`` backend: blobs as objects of an S3 bucket (AWS or any S3-compatible server).

Object ``<object_prefix><blob_id>`` of ``bucket_name``, addressed path-style at
``<scheme>://<endpoint>/<bucket_name>/<key>`` (``endpoint`` empty means AWS's
``s3.<region>.amazonaws.com``).  With an ``access_key_id`` every request is
signed with AWS Signature Version 4 (service ``s3``, ``region``; signed headers
``host``, ``range`` when present, ``x-amz-content-sha256``, ``x-amz-date``).
Upstream reports S3's metrics as ``backend_type: "oss"``
(nydus-surface.md §3.5); so do we.  Credentials never appear in repr, logs or errors.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Hashable, Mapping
from urllib.parse import quote, urlsplit

from ...config import S3Config
from ._object import HttpBlobBackend
from .base import RetryPolicy

__all__ = ["S3Backend", "sigv4_authorization", "EMPTY_SHA256"]

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def sigv4_authorization(*, method: str, canonical_uri: str, canonical_query: str,
                        headers: Mapping[str, str], payload_hash: str, access_key_id: str,
                        secret: str, region: str, amz_date: str, service: str = "s3") -> str:
    """The ``Authorization`` value of a SigV4-signed request (every header in ``headers`` is signed).

    ``canonical_uri`` must already be URI-encoded (each key segment once, ``/`` kept);
    ``amz_date`` is ``YYYYMMDDTHHMMSSZ`` and must equal the ``x-amz-date`` header.
    """
    items = sorted((k.lower().strip(), " ".join(str(v).split())) for k, v in headers.items())
    canonical_headers = "".join(f"{k}:{v}\n" for k, v in items)
    signed = ";".join(k for k, _ in items)
    canonical = "\n".join([method, canonical_uri, canonical_query, canonical_headers, signed, payload_hash])
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = _hmac(_hmac(_hmac(_hmac(("AWS4" + secret).encode(), amz_date[:8]), region), service), "aws4_request")
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    return f"AWS4-HMAC-SHA256 Credential={access_key_id}/{scope}, SignedHeaders={signed}, Signature={signature}"


def s3_endpoint(cfg: S3Config) -> str:
    """The endpoint of ``cfg``: its own, else AWS's for its region."""
    return cfg.endpoint or f"s3.{cfg.region}.amazonaws.com"


def s3_object_url(cfg: S3Config, blob_id: str) -> str:
    """Where blob ``blob_id`` lives (path style: ``<endpoint>/<bucket>/<object_prefix><blob_id>``).

    One place for nydusd's reads and nydusify's pushes, so they agree.
    """
    scheme = "http" if cfg.scheme == "http" else "https"
    key = quote(cfg.object_prefix + blob_id, safe="/-_.~")
    return f"{scheme}://{s3_endpoint(cfg)}/{quote(cfg.bucket_name, safe='-_.~')}/{key}"


class S3Backend(HttpBlobBackend):
    """Blobs from an S3 bucket; see the module docstring."""

    type_name = "s3"
    metrics_type = "oss"

    def __init__(self, cfg: S3Config, *, retry: RetryPolicy | None = None) -> None:
        super().__init__(cfg, retry=retry)
        self.scheme = "http" if cfg.scheme == "http" else "https"
        self.endpoint = s3_endpoint(cfg)
        self._key_id = cfg.access_key_id
        self._secret = cfg.access_key_secret

    def _location(self) -> Hashable:
        return (self.scheme, self.endpoint, self.cfg.region, self.cfg.bucket_name, self.cfg.object_prefix)

    def _url(self, blob_id: str) -> str:
        return s3_object_url(self.cfg, blob_id)

    def _sign(self, method: str, blob_id: str, url: str, headers: dict[str, str]) -> dict[str, str]:
        if not self._key_id:
            return headers
        amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        parts = urlsplit(url)
        signed = {"host": parts.netloc, "x-amz-content-sha256": EMPTY_SHA256, "x-amz-date": amz_date}
        if "Range" in headers:
            signed["range"] = headers["Range"]
        auth = sigv4_authorization(method=method, canonical_uri=parts.path or "/", canonical_query="",
                                   headers=signed, payload_hash=EMPTY_SHA256, access_key_id=self._key_id,
                                   secret=self._secret, region=self.cfg.region, amz_date=amz_date)
        return {"Host": parts.netloc, "x-amz-content-sha256": EMPTY_SHA256, "x-amz-date": amz_date,
                **headers, "Authorization": auth}
