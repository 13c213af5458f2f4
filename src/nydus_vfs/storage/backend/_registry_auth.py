"""Answering a registry's ``401 WWW-Authenticate`` challenges (Basic and Bearer).

Transport-agnostic: :class:`RegistryAuth` is handed an async ``fetch(method,
url, headers, form) -> (status, body)`` so the registry backend (pull) and the
converter (push, with a ``push,pull`` scope) share it.  Contract:

* ``auth`` is base64 of ``user:password`` (nydusd's ``auth`` key, the
  ``IMAGE_PULL_AUTH`` variable, ``PUT /api/v1/config registry_auth``);
  ``registry_token`` is a ready bearer token, used first when given.
* :meth:`RegistryAuth.header` is the ``Authorization`` value to send now (or
  None); it refreshes a bearer token that is about to expire (before
  ``expires_in`` runs out, minus a jittered margin) using the last challenge.
* :meth:`RegistryAuth.answer` takes the ``WWW-Authenticate`` of a 401 and
  returns the header to retry with.  Bearer tokens are fetched as upstream does
  (nydus-surface.md §2.3): a ``POST`` form (``grant_type=password``, ``service``,
  ``scope``, ``client_id=nydus-registry-client``, username, password) first when
  there are credentials, then a ``GET`` with ``service``/``scope``/``client_id``
  in the query and the credentials as Basic auth.  Concurrent callers share one
  token request.
* Failures raise ``BackendError``: 401/403 from the token endpoint and missing
  credentials are not retryable; 5xx and transport errors are.

Secrets (password, token, the base64 ``auth``) never appear in ``repr``, in log
lines or in exception messages.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlencode

from ...errors import BackendError
from .base import backend_error_from_http_status

__all__ = ["Challenge", "Credentials", "RegistryAuth", "parse_www_authenticate", "CLIENT_ID"]

log = logging.getLogger("nydus_vfs.storage")

CLIENT_ID = "nydus-registry-client"
#: Lifetime assumed when the token answer has no ``expires_in`` (distribution spec).
DEFAULT_EXPIRES_IN = 60

Fetch = Callable[[str, str, Mapping[str, str], Mapping[str, str] | None], Awaitable[tuple[int, bytes]]]


@dataclass(frozen=True, slots=True)
class Challenge:
    """One parsed ``WWW-Authenticate`` challenge: ``scheme`` lowercased, params by lowercase name."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict)


def parse_www_authenticate(value: str) -> Challenge | None:
    """Parse ``Bearer realm="…",service="…",scope="…"`` / ``Basic realm="…"``; None if unusable.

    Quoted values may contain commas and backslash escapes (RFC 7235 §2.1).
    """
    value = value.strip()
    if not value:
        return None
    scheme, _, rest = value.partition(" ")
    params: dict[str, str] = {}
    i, n = 0, len(rest)
    while i < n:
        while i < n and rest[i] in " ,":
            i += 1
        eq = rest.find("=", i)
        if eq < 0:
            break
        name = rest[i:eq].strip().lower()
        i = eq + 1
        if i < n and rest[i] == '"':
            i += 1
            buf = []
            while i < n and rest[i] != '"':
                if rest[i] == "\\" and i + 1 < n:
                    i += 1
                buf.append(rest[i])
                i += 1
            i += 1
            params[name] = "".join(buf)
        else:
            end = rest.find(",", i)
            end = n if end < 0 else end
            params[name] = rest[i:end].strip()
            i = end
    return Challenge(scheme.lower(), params)


class Credentials:
    """A username and password decoded from base64 ``user:password`` (never shown in repr)."""

    __slots__ = ("username", "password", "encoded")

    def __init__(self, username: str, password: str) -> None:
        self.username = username
        self.password = password
        self.encoded = base64.b64encode(f"{username}:{password}".encode()).decode()

    @classmethod
    def from_base64(cls, auth: str) -> Credentials:
        """Decode ``auth``; ``ValueError`` (naming no secret) when it is not base64 of ``user:password``."""
        try:
            text = base64.b64decode(auth.strip().encode("ascii"), validate=True).decode("utf-8")
        except (UnicodeError, binascii.Error, ValueError):
            raise ValueError("registry auth is not valid base64 of UTF-8 'username:password'") from None
        user, sep, password = text.partition(":")
        if not sep:
            raise ValueError("registry auth must be base64 of 'username:password'")
        return cls(user, password)

    def basic_header(self) -> str:
        return "Basic " + self.encoded

    def __repr__(self) -> str:
        return "<Credentials ***>"


class RegistryAuth:
    """Authorization state of one registry client; see the module docstring."""

    def __init__(self, *, auth: str | None = None, token: str | None = None, scope: str | None = None,
                 client_id: str = CLIENT_ID, clock: Callable[[], float] = time.monotonic,
                 jitter: Callable[[float, float], float] = random.uniform) -> None:
        self.credentials = Credentials.from_base64(auth) if auth else None
        self.default_scope = scope
        self.client_id = client_id
        self._clock = clock
        self._jitter = jitter
        self._header: str | None = f"Bearer {token}" if token else None
        self._static_token = bool(token)
        self._challenge: Challenge | None = None
        self._refresh_at: float | None = None
        self._generation = 0
        self._locks: dict[int, asyncio.Lock] = {}
        #: Token requests made (for tests and the converter's logs).
        self.token_fetches = 0

    def __repr__(self) -> str:
        kind = self._challenge.scheme if self._challenge else ("token" if self._static_token else "none")
        return f"<RegistryAuth {kind} credentials={'yes' if self.credentials else 'no'}>"

    # -- hot reload --------------------------------------------------------------------
    def set_auth(self, auth: str | None) -> None:
        """Replace the credentials (``""``/None clears them) and forget any fetched token.

        ``ValueError`` (naming no secret) when ``auth`` is not base64 ``user:password``.
        """
        self.credentials = Credentials.from_base64(auth) if auth else None
        self._generation += 1
        if self._challenge is not None or not self._static_token:
            self._header = None
            self._refresh_at = None
            if self._challenge is not None and self._challenge.scheme == "basic" and self.credentials:
                self._header = self.credentials.basic_header()

    def _lock(self) -> asyncio.Lock:
        loop_id = id(asyncio.get_running_loop())
        lock = self._locks.get(loop_id)
        if lock is None:
            self._locks = {loop_id: (lock := asyncio.Lock())}
        return lock

    # -- what to send ------------------------------------------------------------------
    async def header(self, fetch: Fetch) -> str | None:
        """The ``Authorization`` value for the next request, refreshing a due bearer token."""
        if self._refresh_at is not None and self._clock() >= self._refresh_at and self._challenge is not None:
            generation = self._generation
            async with self._lock():
                if generation == self._generation and self._refresh_at is not None \
                        and self._clock() >= self._refresh_at:
                    try:
                        await self._fetch_token(self._challenge, fetch)
                    except BackendError as exc:
                        # Keep the old token: it may still be valid; a 401 will tell.
                        log.warning("registry token refresh failed: %s", exc)
                        self._refresh_at = self._clock() + 5 + self._jitter(0, 5)
        return self._header

    async def answer(self, www_authenticate: str | None, fetch: Fetch, *, failed_header: str | None) -> str:
        """The ``Authorization`` header to retry a request that got 401 with ``failed_header``.

        When another caller already replaced ``failed_header`` meanwhile, its
        result is returned without a new token request.
        """
        async with self._lock():
            if self._header is not None and self._header != failed_header:
                return self._header
            challenge = parse_www_authenticate(www_authenticate or "")
            if challenge is None:
                raise BackendError("registry answered 401 without a WWW-Authenticate challenge",
                                   retryable=False)
            if challenge.scheme == "basic":
                if self.credentials is None:
                    raise BackendError("registry requires Basic authentication but no 'auth' is configured",
                                       retryable=False)
                header = self.credentials.basic_header()
                if header == failed_header:
                    raise BackendError("registry refused the configured credentials (Basic auth)",
                                       retryable=False)
                self._challenge = challenge
                self._header = header
                self._refresh_at = None
                return header
            if challenge.scheme != "bearer":
                raise BackendError(f"registry asks for unsupported auth scheme {challenge.scheme!r}",
                                   retryable=False)
            if "realm" not in challenge.params:
                raise BackendError("registry Bearer challenge has no realm", retryable=False)
            self._challenge = challenge
            await self._fetch_token(challenge, fetch)
            assert self._header is not None
            return self._header

    # -- bearer tokens -----------------------------------------------------------------
    async def _fetch_token(self, challenge: Challenge, fetch: Fetch) -> None:
        realm = challenge.params["realm"]
        service = challenge.params.get("service", "")
        scope = challenge.params.get("scope") or self.default_scope or ""
        self.token_fetches += 1
        status, body = 0, b""
        if self.credentials is not None:
            form = {"grant_type": "password", "username": self.credentials.username,
                    "password": self.credentials.password, "client_id": self.client_id}
            if service:
                form["service"] = service
            if scope:
                form["scope"] = scope
            status, body = await fetch("POST", realm, {}, form)
            if not 200 <= status < 300:
                log.debug("registry token POST to %s answered %d; trying GET", realm, status)
        if not 200 <= status < 300:
            query = {k: v for k, v in (("service", service), ("scope", scope),
                                       ("client_id", self.client_id)) if v}
            headers = {"Authorization": self.credentials.basic_header()} if self.credentials else {}
            url = realm + ("&" if "?" in realm else "?") + urlencode(query)
            status, body = await fetch("GET", url, headers, None)
        if status in (401, 403):
            raise BackendError(f"registry token endpoint refused the "
                               f"{'configured credentials' if self.credentials else 'anonymous request'} "
                               f"(HTTP {status})", retryable=False)
        if not 200 <= status < 300:
            raise backend_error_from_http_status(status, "registry token request")
        try:
            doc = json.loads(body)
            token = doc.get("token") or doc.get("access_token")
            expires_in = int(doc.get("expires_in") or DEFAULT_EXPIRES_IN)
        except (ValueError, TypeError, AttributeError):
            raise BackendError("registry token endpoint answered something that is not a token JSON",
                               retryable=True) from None
        if not isinstance(token, str) or not token:
            raise BackendError("registry token endpoint answered without a token", retryable=True)
        expires_in = max(1, expires_in)
        margin = min(30.0, expires_in * 0.2) + self._jitter(0.0, min(10.0, expires_in * 0.1))
        self._header = f"Bearer {token}"
        self._static_token = False
        self._refresh_at = self._clock() + max(0.5, expires_in - margin)
        self._generation += 1
