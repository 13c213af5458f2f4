"""The ``oss`` backend: blobs as objects of an Aliyun OSS bucket.

Object ``<object_prefix><blob_id>`` of ``bucket_name`` at
``<scheme>://<bucket_name>.<endpoint>/<key>`` (nydus-surface.md §2.3).  With an
``access_key_id`` every request carries the OSS V1 signature (HMAC-SHA1 of
``VERB\\nContent-MD5\\nContent-Type\\nDate\\n<x-oss- headers><resource>``, as in
Aliyun's "Include a V1 signature in the Authorization header"); without one the
bucket is read anonymously.  The key id and secret never appear in repr, logs
or errors.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Hashable, Mapping
from email.utils import formatdate
from urllib.parse import quote

from ...config import OssConfig
from .base import RetryPolicy
from ._object import HttpBlobBackend

__all__ = ["OssBackend", "oss_string_to_sign", "oss_signature"]


def oss_string_to_sign(method: str, content_md5: str, content_type: str, date: str,
                       headers: Mapping[str, str], resource: str) -> str:
    """The V1 string to sign: the ``x-oss-*`` headers lowercased, sorted, ``name:value`` lines."""
    oss_headers = sorted((k.lower().strip(), " ".join(v.split())) for k, v in headers.items()
                         if k.lower().startswith("x-oss-"))
    canonical = "".join(f"{k}:{v}\n" for k, v in oss_headers)
    return f"{method}\n{content_md5}\n{content_type}\n{date}\n{canonical}{resource}"


def oss_signature(secret: str, string_to_sign: str) -> str:
    """base64(HMAC-SHA1(secret, string_to_sign))."""
    mac = hmac.new(secret.encode(), string_to_sign.encode(), hashlib.sha1)
    return base64.b64encode(mac.digest()).decode()


def oss_object_url(cfg: OssConfig, blob_id: str) -> str:
    """Where blob ``blob_id`` lives (virtual-host style: ``<bucket>.<endpoint>/<object_prefix><blob_id>``).

    One place for nydusd's reads and nydusify's pushes, so they agree.
    """
    scheme = "http" if cfg.scheme == "http" else "https"
    return f"{scheme}://{cfg.bucket_name}.{cfg.endpoint}/{quote(cfg.object_prefix + blob_id)}"


class OssBackend(HttpBlobBackend):
    """Blobs from an OSS bucket; see the module docstring."""

    type_name = "oss"

    def __init__(self, cfg: OssConfig, *, retry: RetryPolicy | None = None) -> None:
        super().__init__(cfg, retry=retry)
        self.scheme = "http" if cfg.scheme == "http" else "https"
        self._key_id = cfg.access_key_id
        self._secret = cfg.access_key_secret

    def _location(self) -> Hashable:
        return (self.scheme, self.cfg.endpoint, self.cfg.bucket_name, self.cfg.object_prefix)

    def _key(self, blob_id: str) -> str:
        return self.cfg.object_prefix + blob_id

    def _url(self, blob_id: str) -> str:
        return oss_object_url(self.cfg, blob_id)

    def _sign(self, method: str, blob_id: str, url: str, headers: dict[str, str]) -> dict[str, str]:
        date = formatdate(usegmt=True)
        out = dict(headers, Date=date)
        if self._key_id:
            resource = f"/{self.cfg.bucket_name}/{self._key(blob_id)}"
            sts = oss_string_to_sign(method, "", "", date, out, resource)
            out["Authorization"] = f"OSS {self._key_id}:{oss_signature(self._secret, sts)}"
        return out
