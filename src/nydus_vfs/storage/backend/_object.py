"""Shared shape of the plain-URL backends (OSS, S3, http-proxy): one URL per blob.

A subclass gives the URL of a blob and the headers that sign a request;
:class:`HttpBlobBackend` does the ranged ``GET`` (``_http.read_range``) and the
``HEAD`` for the size, following at most 5 redirects.  Contract as
:class:`~.base.BlobBackend`; URLs in errors are shown without query strings.
"""

from __future__ import annotations

import abc
from collections.abc import Hashable

from ...errors import BackendError
from ._http import HttpClientBackend, read_range, redact_url
from .base import backend_error_from_http_status

__all__ = ["HttpBlobBackend"]


class HttpBlobBackend(HttpClientBackend):
    """Blobs at ``self._url(blob_id)``, requests signed by ``self._sign``."""

    @property
    def identity(self) -> Hashable:
        return (self.type_name, self._location(), self.cfg.skip_verify, tuple(self.cfg.ca_cert_files),
                self.cfg.proxy)

    @abc.abstractmethod
    def _location(self) -> Hashable:
        """What selects the bytes (endpoint, bucket, prefix...), without credentials."""

    @abc.abstractmethod
    def _url(self, blob_id: str) -> str:
        """The URL of blob ``blob_id``."""

    def _sign(self, method: str, blob_id: str, url: str, headers: dict[str, str]) -> dict[str, str]:
        """Headers to send (``headers`` plus any signature); default: unsigned."""
        return headers

    async def _read(self, blob_id: str, offset: int, size: int) -> bytes:
        if size == 0:
            return b""
        url = self._url(blob_id)
        what = f"{self.type_name}: GET blob {blob_id} [{offset}, +{size}) from {redact_url(url)}"
        headers = self._sign("GET", blob_id, url, {"Range": f"bytes={offset}-{offset + size - 1}"})
        async with self._client.request("GET", url, headers=headers, allow_redirects=True, what=what) as resp:
            return await read_range(resp, offset, size, what)

    async def _blob_size(self, blob_id: str) -> int:
        url = self._url(blob_id)
        what = f"{self.type_name}: HEAD blob {blob_id} at {redact_url(url)}"
        headers = self._sign("HEAD", blob_id, url, {})
        async with self._client.request("HEAD", url, headers=headers, allow_redirects=True, what=what) as resp:
            if not 200 <= resp.status < 300:
                raise backend_error_from_http_status(resp.status, what)
            if resp.content_length is None:
                raise BackendError(f"{what}: answer has no Content-Length", retryable=False)
            return resp.content_length
