"""The ``registry`` backend: blobs of one repository of an OCI/Docker registry.

Configuration: ``RegistryConfig`` (nydus-surface.md §2.3).  Blob ``<id>`` is
``<scheme>://<host>/v2/<repo>/blobs/sha256:<id>``, read with ``Range`` requests
through the shared HTTP layer (``_http``).  Behaviour:

* ``scheme``: only the literal ``"http"`` selects plain HTTP; anything else is
  HTTPS.  With ``skip_verify`` a TLS failure switches the backend to plain HTTP
  for good, with a warning that says so (upstream does this silently, nydus-surface.md §10 item 3);
  without it the TLS error is final and names ``ca_cert_files``.
* Auth (``_registry_auth``): ``registry_token`` is sent first when set; a 401
  is answered once per request from its ``WWW-Authenticate`` (Basic with
  ``auth``, Bearer via the token endpoint); a second 401 is a final
  "credentials refused" error.  ``IMAGE_PULL_AUTH`` in the environment replaces
  ``auth``.  :meth:`RegistryBackend.set_auth` is the hot reload.
* Redirects: any 3xx with a ``Location`` is followed (at most 5 hops; more is a
  "redirect loop" error) without the registry's ``Authorization``;
  ``blob_url_scheme`` / ``blob_redirected_host`` rewrite the first target, which
  is cached per blob for :data:`REDIRECT_TTL` seconds.  A cached target that
  fails in any way is dropped and the registry is asked again in the same try.
* The blob size is taken from ``GET`` with ``Range: bytes=0-0`` (pre-signed
  redirect targets are often signed for GET only).
* Non-2xx answers name the registry's error codes (``BLOB_UNKNOWN``,
  ``NAME_UNKNOWN``...) but never quote bodies otherwise.

``identity`` covers everything that selects the bytes (scheme, host, repo,
redirect rewrites, TLS and proxy settings) but not the credentials, so mounts
of one repository share a backend whichever token they were given.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import TypeVar
from urllib.parse import urljoin, urlsplit, urlunsplit

import aiohttp

from ...config import RegistryConfig
from ...errors import BackendError, ConfigError
from ._http import HttpClientBackend, TlsError, read_range, read_small_body, redact_url
from ._registry_auth import RegistryAuth
from .base import RetryPolicy, backend_error_from_http_status

__all__ = ["RegistryBackend", "REDIRECT_TTL", "MAX_REDIRECTS"]

log = logging.getLogger("nydus_vfs.storage")

T = TypeVar("T")
#: Seconds a blob's redirect target is reused before asking the registry again.
REDIRECT_TTL = 300.0
MAX_REDIRECTS = 5

Consume = Callable[[aiohttp.ClientResponse, str], Awaitable[T]]


class RegistryBackend(HttpClientBackend):
    """Blobs from ``cfg.host``'s repository ``cfg.repo``; see the module docstring.

    ``ConfigError`` for an invalid ``auth``/``IMAGE_PULL_AUTH`` or an unreadable
    CA file.  ``backend_id`` is the mountpoint whose hot-reloaded settings apply.
    """

    type_name = "registry"

    def __init__(self, cfg: RegistryConfig, *, backend_id: str = "/", retry: RetryPolicy | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        super().__init__(cfg, client_name=f"registry {cfg.host}", retry=retry)
        env = os.environ if env is None else env
        auth = cfg.auth
        if env.get("IMAGE_PULL_AUTH", "").strip():
            auth = env["IMAGE_PULL_AUTH"].strip()
        self.backend_id = backend_id
        self.scheme = "http" if cfg.scheme == "http" else "https"
        self.host = cfg.host
        self.repo = cfg.repo.strip("/")
        try:
            self._auth = RegistryAuth(auth=auth, token=cfg.registry_token,
                                      scope=f"repository:{self.repo}:pull")
        except ValueError as exc:
            raise ConfigError(f"registry backend: {exc}") from None
        self._redirects: dict[str, tuple[str, float]] = {}

    @property
    def identity(self) -> Hashable:
        c = self.cfg
        return ("registry", "http" if c.scheme == "http" else "https", c.host, c.repo.strip("/"),
                c.blob_url_scheme, c.blob_redirected_host, c.skip_verify, tuple(c.ca_cert_files), c.proxy)

    # -- hot reload (PUT /api/v1/config) --------------------------------------------------
    def set_auth(self, auth: str | None) -> None:
        """Use base64 ``user:password`` ``auth`` from now on ("" clears it); ConfigError if invalid."""
        try:
            self._auth.set_auth((auth or "").strip() or None)
        except ValueError as exc:
            raise ConfigError(f"registry_auth: {exc}") from None
        log.info("registry %s: credentials replaced for backend %s", self.host, self.backend_id)

    # -- helpers ---------------------------------------------------------------------------
    def _blob_url(self, blob_id: str) -> str:
        return f"{self.scheme}://{self.host}/v2/{self.repo}/blobs/sha256:{blob_id}"

    async def _fetch(self, method: str, url: str, headers: Mapping[str, str],
                     form: Mapping[str, str] | None) -> tuple[int, bytes]:
        """The transport of :class:`RegistryAuth` (token requests)."""
        what = f"registry token request to {redact_url(url)}"
        async with self._client.request(method, url, headers=headers, data=dict(form) if form else None,
                                        allow_redirects=True, what=what) as resp:
            return resp.status, await read_small_body(resp, what)

    def _rewrite(self, location: str) -> str:
        parts = urlsplit(location)
        scheme = self.cfg.blob_url_scheme or parts.scheme
        netloc = self.cfg.blob_redirected_host or parts.netloc
        return urlunsplit((scheme, netloc, parts.path, parts.query, parts.fragment))

    async def _fail_status(self, resp: aiohttp.ClientResponse, what: str) -> BackendError:
        codes = ""
        if 400 <= resp.status < 500:
            try:
                doc = json.loads(await read_small_body(resp, what, limit=65536))
                names = [str(e.get("code")) for e in doc.get("errors", []) if isinstance(e, dict)]
                codes = f" ({', '.join(n for n in names if n.isupper() and len(n) < 64)})" if names else ""
            except (BackendError, ValueError, AttributeError, TypeError):
                pass
        err = backend_error_from_http_status(resp.status, what)
        if codes:
            err = type(err)(f"{err}{codes}", retryable=err.retryable)
        return err

    # -- one request with auth, redirects and the TLS fallback -----------------------------
    async def _request_blob(self, blob_id: str, method: str, headers: Mapping[str, str],
                            consume: Consume[T], what: str) -> T:
        cached = self._redirects.get(blob_id)
        if cached is not None:
            if cached[1] > time.monotonic():
                try:
                    return await self._follow(cached[0], method, headers, consume, what, hops=0)
                except BackendError as exc:
                    log.info("%s: cached redirect target %s failed (%s); asking the registry again",
                             what, redact_url(cached[0]), exc)
            self._redirects.pop(blob_id, None)
        try:
            return await self._from_registry(blob_id, method, headers, consume, what)
        except TlsError as exc:
            if self.scheme != "https" or not self.cfg.skip_verify:
                raise BackendError(f"{exc} (a private CA goes in 'ca_cert_files')", retryable=False) from None
            log.warning("registry %s: TLS failed (%s); falling back to plain HTTP because skip_verify is "
                        "set (all further requests go unencrypted)", self.host, exc)
            self.scheme = "http"
            return await self._from_registry(blob_id, method, headers, consume, what)

    async def _from_registry(self, blob_id: str, method: str, headers: Mapping[str, str],
                             consume: Consume[T], what: str) -> T:
        url = self._blob_url(blob_id)
        reauthenticated = False
        while True:
            auth = await self._auth.header(self._fetch)
            send = dict(headers)
            if auth:
                send["Authorization"] = auth
            challenge: str | None = None
            location: str | None = None
            async with self._client.request(method, url, headers=send, what=what) as resp:
                if resp.status == 401:
                    if reauthenticated:
                        raise BackendError(f"{what}: registry refused the configured credentials "
                                           f"(HTTP 401 after authenticating)", retryable=False)
                    challenge = resp.headers.get("WWW-Authenticate", "")
                elif 300 <= resp.status < 400 and resp.headers.get("Location"):
                    location = urljoin(url, resp.headers["Location"])
                elif 200 <= resp.status < 300 or resp.status == 416:
                    return await consume(resp, what)
                else:
                    raise await self._fail_status(resp, what)
            if location is not None:
                target = self._rewrite(location)
                self._redirects[blob_id] = (target, time.monotonic() + REDIRECT_TTL)
                return await self._follow(target, method, headers, consume, what, hops=1)
            try:
                await self._auth.answer(challenge, self._fetch, failed_header=auth)
            except BackendError as exc:
                raise type(exc)(f"{what}: {exc}", retryable=exc.retryable) from None
            reauthenticated = True

    async def _follow(self, url: str, method: str, headers: Mapping[str, str], consume: Consume[T],
                      what: str, hops: int) -> T:
        while True:
            async with self._client.request(method, url, headers=headers,
                                            what=f"{what} (redirected to {redact_url(url)})") as resp:
                if 300 <= resp.status < 400 and resp.headers.get("Location"):
                    hops += 1
                    if hops > MAX_REDIRECTS:
                        raise BackendError(f"{what}: more than {MAX_REDIRECTS} redirects (redirect loop?)",
                                           retryable=False)
                    url = urljoin(url, resp.headers["Location"])
                    continue
                if 200 <= resp.status < 300 or resp.status == 416:
                    return await consume(resp, f"{what} (redirected to {redact_url(url)})")
                raise await self._fail_status(resp, f"{what} (redirected to {redact_url(url)})")

    # -- the BlobBackend surface ----------------------------------------------------------------
    async def _read(self, blob_id: str, offset: int, size: int) -> bytes:
        if size == 0:
            return b""

        async def consume(resp: aiohttp.ClientResponse, what: str) -> bytes:
            return await read_range(resp, offset, size, what)

        return await self._request_blob(
            blob_id, "GET", {"Range": f"bytes={offset}-{offset + size - 1}"}, consume,
            f"registry {self.host}/{self.repo}: GET blob {blob_id} [{offset}, +{size})")

    async def _blob_size(self, blob_id: str) -> int:
        async def consume(resp: aiohttp.ClientResponse, what: str) -> int:
            value = resp.headers.get("Content-Range", "")
            total = value.rpartition("/")[2].strip()
            if resp.status == 206 and total.isdigit():
                return int(total)
            if resp.status == 200 and resp.content_length is not None:
                return resp.content_length
            if resp.status == 416 and total.isdigit():
                return int(total)       # an empty blob
            raise BackendError(f"{what}: cannot tell the blob size from HTTP {resp.status} "
                               f"(Content-Range {value!r})", retryable=False)

        return await self._request_blob(blob_id, "GET", {"Range": "bytes=0-0"}, consume,
                                        f"registry {self.host}/{self.repo}: size of blob {blob_id}")
