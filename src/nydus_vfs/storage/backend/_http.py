"""The asyncio HTTP client shared by the remote backends (registry, OSS, S3, http-proxy).

One :class:`HttpClient` per backend instance owns an ``aiohttp`` session with a
pooled keep-alive connector, the TLS settings (``skip_verify``,
``ca_cert_files``), the timeouts and the optional forward proxy (Dragonfly
dfdaemon, nydus-surface.md §2.3 ``proxy``).  Contracts:

* ``timeout`` bounds a whole request including its body and ``connect_timeout``
  the TCP/TLS connect, so no request outlives ``connect_timeout + timeout``.
* :meth:`HttpClient.request` never follows redirects unless asked (the registry
  follows them itself to cache them per blob) and never decompresses bodies:
  a ranged read must see the stored bytes.
* :func:`read_range` returns exactly the asked bytes or raises a
  ``BackendError``: 206 with a matching ``Content-Range``, 200 with a matching
  ``Content-Range`` (nydus-backend-proxy, nydus-surface.md §0 item 20) or 200 with the whole blob
  (the range is cut out of it).  A short body, a ``Content-Range`` that does not
  match, a reset or a stall are retryable; a range past the end of the blob is
  not.  Wrong bytes are never returned.
* Transport failures are mapped by :func:`map_client_error`; statuses by
  :func:`~.base.backend_error_from_http_status`.
* Proxy: requests go through ``proxy.url`` while it is healthy; with
  ``fallback`` a connection failure or a 5xx from the proxy sends the request
  direct (warning rate-limited) and marks the proxy unhealthy until the
  ``ping_url`` health task (every ``check_interval`` s, paused after
  ``check_pause_elapsed`` idle seconds) sees it answer again, or, without a
  ``ping_url``, for ``check_interval`` seconds.  ``use_http`` sends proxied
  ``https://`` URLs as ``http://`` so the proxy can cache them.
* The session is bound to the event loop that first used it; a client used
  from another loop (tests run several) opens a new session there.

URLs in messages are shown without their query string (pre-signed redirect
targets carry credentials there).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from ...config import ProxyConfig
from ...errors import BackendError, BackendTimeoutError, ConfigError
from .base import BlobBackend, RetryPolicy, backend_error_from_http_status

__all__ = [
    "HttpClientBackend",
    "HttpClient",
    "HttpSettings",
    "TlsError",
    "map_client_error",
    "read_range",
    "read_small_body",
    "redact_url",
]

log = logging.getLogger("nydus_vfs.storage")

#: Largest body accepted by :func:`read_small_body` (token answers, error texts).
MAX_SMALL_BODY = 1 << 20
_WARN_EVERY = 30.0
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)


class TlsError(BackendError):
    """The TLS handshake failed (certificate, or the server does not speak TLS)."""

    retryable = False


def redact_url(url: str) -> str:
    """``url`` without query string, fragment or userinfo: safe for logs and errors."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def map_client_error(exc: BaseException, what: str) -> BackendError:
    """Map an aiohttp/asyncio/OS exception raised while doing ``what`` to a ``BackendError``."""
    reason = str(exc) or type(exc).__name__
    if isinstance(exc, (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError, ssl.SSLError)):
        err: BackendError = TlsError(f"{what}: TLS error: {reason}")
    elif isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        err = BackendTimeoutError(f"{what}: timed out ({type(exc).__name__})")
    elif isinstance(exc, aiohttp.TooManyRedirects):
        err = BackendError(f"{what}: too many redirects", retryable=False)
    elif isinstance(exc, (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError)):
        err = BackendError(f"{what}: invalid URL: {reason}", retryable=False)
    elif isinstance(exc, aiohttp.ClientPayloadError):
        err = BackendError(f"{what}: response body broken off: {reason}", retryable=True)
    elif isinstance(exc, (aiohttp.ClientError, OSError)):
        err = BackendError(f"{what}: connection failed: {reason}", retryable=True)
    else:
        err = BackendError(f"{what}: {type(exc).__name__}: {reason}", retryable=False)
    err.__cause__ = exc
    return err


_TRANSPORT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, TimeoutError, OSError)


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """Connection settings common to the remote backends (the ``_ConnectionConfig`` keys)."""

    timeout: float = 5
    connect_timeout: float = 5
    skip_verify: bool = False
    ca_cert_files: tuple[str, ...] = ()
    proxy: ProxyConfig = ProxyConfig()

    @classmethod
    def from_config(cls, cfg: Any) -> HttpSettings:
        """From any of the parsed backend configs (``RegistryConfig``, ``OssConfig``...)."""
        return cls(timeout=cfg.timeout, connect_timeout=cfg.connect_timeout, skip_verify=cfg.skip_verify,
                   ca_cert_files=tuple(cfg.ca_cert_files), proxy=cfg.proxy)


def _ssl_context(settings: HttpSettings) -> ssl.SSLContext | bool:
    if not settings.ca_cert_files and not settings.skip_verify:
        # aiohttp's own verifying default context (built when aiohttp is
        # imported): the same as ssl.create_default_context(), without loading
        # the system CA store a third time at start (30 ms each).
        return True
    ctx = ssl.create_default_context()
    for path in settings.ca_cert_files:
        try:
            ctx.load_verify_locations(cafile=path)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"ca_cert_files: cannot load CA certificates from {path}: {exc}") from None
    if settings.skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class _ProxyState:
    """Health of the forward proxy, shared by every request of one client."""

    def __init__(self, cfg: ProxyConfig) -> None:
        self.cfg = cfg
        self.url = cfg.url
        self.healthy = True
        self.retry_at = 0.0
        self.last_used = time.monotonic()
        self.task: asyncio.Task[None] | None = None
        self.failures = 0
        self._last_warning = -_WARN_EVERY
        self._suppressed = 0

    def usable(self) -> bool:
        if not self.url:
            return False
        if not self.cfg.fallback:
            return True
        if not self.healthy and not self.cfg.ping_url and time.monotonic() >= self.retry_at:
            self.healthy = True
        return self.healthy

    def failed(self, reason: str, target: str) -> None:
        self.failures += 1
        self.healthy = False
        self.retry_at = time.monotonic() + max(1, self.cfg.check_interval)
        now = time.monotonic()
        if now - self._last_warning >= _WARN_EVERY:
            more = f" ({self._suppressed} similar warnings suppressed)" if self._suppressed else ""
            log.warning("proxy %s failed for %s (%s): falling back to a direct request%s",
                        redact_url(self.url), target, reason, more)
            self._last_warning = now
            self._suppressed = 0
        else:
            self._suppressed += 1


class HttpClient:
    """Pooled HTTP(S) requests with the backend timeouts, TLS settings and proxy.

    ``unix_socket`` sends every request over that Unix socket (http-proxy backend).
    Raises ``ConfigError`` when a CA file cannot be loaded.
    """

    def __init__(self, settings: HttpSettings, *, name: str, unix_socket: str | None = None) -> None:
        self.settings = settings
        self.name = name
        self.unix_socket = unix_socket
        self._ssl = _ssl_context(settings)
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout or None,
                                              connect=settings.connect_timeout or None,
                                              sock_connect=settings.connect_timeout or None)
        self.proxy = _ProxyState(settings.proxy)
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    # -- lifetime ------------------------------------------------------------------
    def _new_session(self) -> aiohttp.ClientSession:
        if self.unix_socket:
            connector: aiohttp.BaseConnector = aiohttp.UnixConnector(path=self.unix_socket, limit=64)
        else:
            connector = aiohttp.TCPConnector(limit=64, ssl=self._ssl, keepalive_timeout=30)
        return aiohttp.ClientSession(connector=connector, timeout=self._timeout, auto_decompress=False,
                                     headers={"User-Agent": "nydus-vfs", "Accept-Encoding": "identity"},
                                     trust_env=False)

    def session(self) -> aiohttp.ClientSession:
        """The session of the running loop (opened on first use there)."""
        if self._closed:
            raise BackendError(f"{self.name}: HTTP client is closed", retryable=False)
        loop = asyncio.get_running_loop()
        if self._session is None or self._loop is not loop or self._session.closed:
            self._drop_session()
            self._session = self._new_session()
            self._loop = loop
            self.proxy.task = None
        if self.proxy.url and self.proxy.cfg.ping_url and self.proxy.task is None:
            self.proxy.task = loop.create_task(self._health_loop(), name=f"{self.name} proxy health")
        return self._session

    def _drop_session(self) -> None:
        session, self._session = self._session, None
        task, self.proxy.task = self.proxy.task, None
        if task is not None and not task.done() and self._loop is not None and not self._loop.is_closed():
            task.cancel()
        if session is None or session.closed:
            return
        loop = self._loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is None or loop.is_closed():
            # The loop is gone and its sockets with it: only mark both objects closed.
            connector = session.connector
            session.detach()
            if connector is not None:
                connector._close()
        elif running is loop:
            running.create_task(session.close())
        elif not loop.is_running():
            loop.run_until_complete(session.close())
        else:
            asyncio.run_coroutine_threadsafe(session.close(), loop)

    def close(self) -> None:
        """Close the pooled connections and stop the proxy health task; idempotent."""
        if not self._closed:
            self._drop_session()
            self._closed = True

    async def aclose(self) -> None:
        """Like :meth:`close`, waiting for the session to shut down when on its loop."""
        session, task = self._session, self.proxy.task
        self._session, self.proxy.task, self._closed = None, None, True
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if session is not None and not session.closed:
            await session.close()

    def set_proxy_url(self, url: str) -> None:
        """Hot reload (``PUT /api/v1/config`` ``proxy_url``): use ``url`` ("" = no proxy)."""
        self.proxy.url = url
        self.proxy.healthy = True
        if not url and self.proxy.task is not None:
            self.proxy.task.cancel()
            self.proxy.task = None

    # -- the proxy health task -----------------------------------------------------------
    async def _health_loop(self) -> None:
        cfg = self.proxy.cfg
        interval = max(1, cfg.check_interval)
        while True:
            await asyncio.sleep(interval)
            if not self.proxy.url or self._session is None:
                continue
            if time.monotonic() - self.proxy.last_used > cfg.check_pause_elapsed:
                continue          # idle: upstream pauses the checks too
            ok = await self._ping(cfg.ping_url)
            if ok != self.proxy.healthy:
                log.warning("proxy %s is %s", redact_url(self.proxy.url), "healthy again" if ok else "unhealthy")
            self.proxy.healthy = ok

    async def _ping(self, url: str) -> bool:
        assert self._session is not None
        try:
            async with self._session.get(url, allow_redirects=False) as resp:
                return 200 <= resp.status < 300
        except _TRANSPORT_ERRORS:
            return False

    # -- requests --------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def request(self, method: str, url: str, *, headers: Mapping[str, str] | None = None,
                      data: Any = None, allow_redirects: bool = False,
                      what: str) -> AsyncIterator[aiohttp.ClientResponse]:
        """Send one request (through the proxy when configured) and yield the response.

        Transport failures raise ``BackendError`` (see :func:`map_client_error`);
        any status is yielded as is.  The response is released on exit.
        """
        session = self.session()
        kwargs: dict[str, Any] = {"headers": dict(headers or {}), "data": data,
                                  "allow_redirects": allow_redirects, "max_redirects": 5}
        proxy = self.proxy
        if proxy.usable():
            proxy.last_used = time.monotonic()
            target = url
            if proxy.cfg.use_http and target.startswith("https://"):
                target = "http://" + target[len("https://"):]
            resp = None
            try:
                resp = await session.request(method, target, proxy=proxy.url, **kwargs)
            except _TRANSPORT_ERRORS as exc:
                if not proxy.cfg.fallback:
                    raise map_client_error(exc, f"{what} via proxy {redact_url(proxy.url)}") from None
                proxy.failed(str(exc) or type(exc).__name__, redact_url(url))
            else:
                if resp.status >= 500 and proxy.cfg.fallback:
                    proxy.failed(f"HTTP {resp.status}", redact_url(url))
                    resp.release()
                    resp = None
            if resp is not None:
                try:
                    yield resp
                finally:
                    resp.release()
                return
        try:
            resp = await session.request(method, url, **kwargs)
        except _TRANSPORT_ERRORS as exc:
            raise map_client_error(exc, what) from None
        try:
            yield resp
        finally:
            resp.release()


def _content_range(resp: aiohttp.ClientResponse) -> tuple[int, int, int | None] | None:
    value = resp.headers.get("Content-Range")
    if value is None:
        return None
    m = _CONTENT_RANGE.match(value)
    if m is None:
        return (-1, -1, None)
    total = None if m.group(3) == "*" else int(m.group(3))
    return int(m.group(1)), int(m.group(2)), total


async def _read_exactly(resp: aiohttp.ClientResponse, size: int, what: str) -> bytes:
    buf = bytearray()
    try:
        while len(buf) < size:
            piece = await resp.content.read(size - len(buf))
            if not piece:
                break
            buf += piece
    except _TRANSPORT_ERRORS as exc:
        raise map_client_error(exc, what) from None
    if len(buf) != size:
        raise BackendError(f"{what}: response body ended after {len(buf)} of {size} bytes", retryable=True)
    return bytes(buf)


async def read_range(resp: aiohttp.ClientResponse, offset: int, size: int, what: str) -> bytes:
    """Exactly ``size`` bytes at ``offset`` from the answer to a ``Range`` request.

    See the module docstring for the accepted shapes.  Non-2xx statuses raise
    the ``backend_error_from_http_status`` error (416: not retryable, the range
    lies past the end of the blob).
    """
    status = resp.status
    if status == 416:
        raise BackendError(f"{what}: HTTP 416: range [{offset}, +{size}) lies past the end of the blob",
                           retryable=False)
    if not 200 <= status < 300:
        raise backend_error_from_http_status(status, what)
    if size == 0:
        return b""
    crange = _content_range(resp)
    if status == 206 or crange is not None:
        if crange is None:
            raise BackendError(f"{what}: HTTP 206 without Content-Range", retryable=True)
        start, end, total = crange
        want_end = offset + size - 1
        if start != offset or end != want_end:
            if start == offset and total is not None and end == total - 1 and end < want_end:
                raise BackendError(f"{what}: range [{offset}, +{size}) ends past the end of the "
                                   f"{total}-byte blob", retryable=False)
            raise BackendError(f"{what}: wrong Content-Range {resp.headers.get('Content-Range')!r} "
                               f"for bytes={offset}-{want_end}", retryable=True)
        length = resp.content_length
        if length is not None and length != size:
            raise BackendError(f"{what}: Content-Length {length} for a {size}-byte range", retryable=True)
        return await _read_exactly(resp, size, what)
    # 200 without Content-Range: the server ignored Range and sends the whole blob.
    length = resp.content_length
    if length is not None and length < offset + size:
        raise BackendError(f"{what}: range [{offset}, +{size}) ends past the end of the {length}-byte blob",
                           retryable=False)
    if offset:
        await _read_exactly(resp, offset, what)
    return await _read_exactly(resp, size, what)


async def read_small_body(resp: aiohttp.ClientResponse, what: str, limit: int = MAX_SMALL_BODY) -> bytes:
    """The whole body of a small answer (token JSON, error text), at most ``limit`` bytes."""
    data = bytearray()
    try:
        while len(data) <= limit:
            piece = await resp.content.read(limit + 1 - len(data))
            if not piece:
                break
            data += piece
    except _TRANSPORT_ERRORS as exc:
        raise map_client_error(exc, what) from None
    if len(data) > limit:
        raise BackendError(f"{what}: response body larger than {limit} bytes", retryable=False)
    return bytes(data)


class HttpClientBackend(BlobBackend):
    """A backend whose blobs are reached over HTTP(S) through one :class:`HttpClient`.

    Owns ``cfg`` (a backend config with the connection keys), the client built
    from it, the retry policy from ``retry_limit`` (unless given), the proxy
    hot reload and the client's closing.  Reads suspend on the network, so
    they always need a task (``needs_task``).
    """

    needs_task = True

    def __init__(self, cfg: Any, *, client_name: str | None = None, retry: RetryPolicy | None = None,
                 unix_socket: str | None = None) -> None:
        super().__init__(retry=retry if retry is not None else RetryPolicy(retry_limit=cfg.retry_limit))
        self.cfg = cfg
        self._client = HttpClient(HttpSettings.from_config(cfg), name=client_name or f"{self.type_name} backend",
                                  unix_socket=unix_socket)

    def set_proxy_url(self, url: str) -> None:
        """Send requests through proxy ``url`` from now on ("" = direct)."""
        self._client.set_proxy_url(url)

    def close(self) -> None:
        self._client.close()
        super().close()

    async def aclose(self) -> None:
        await self._client.aclose()
        super().close()
