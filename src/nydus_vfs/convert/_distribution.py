"""A small OCI distribution client for ``nydusify``: references, credentials, pull and push.

* :class:`Reference` parses ``[host[:port]/]repo[:tag][@sha256:…]`` the way
  docker does (``docker.io`` -> ``registry-1.docker.io``, ``library/`` for
  one-component names, tag ``latest`` by default).
* :func:`docker_credentials` reads ``$DOCKER_CONFIG/config.json`` (default
  ``~/.docker/config.json``) ``auths`` entries (``auth`` or
  ``username``/``password``), as every registry tool does.  Credential
  helpers are not run (a warning says so).
* :class:`RegistryClient` speaks the distribution API over aiohttp: manifests
  and blobs are pulled with their digests verified; blobs are pushed
  monolithically (``POST`` + ``PUT ?digest=``) or in chunks (``PATCH`` with
  ``Content-Range``), skipped when ``HEAD`` finds them; manifests are put
  last by the caller, so a failed push never moves a tag.  ``401`` answers are
  met by :class:`~nydus_vfs.storage.backend.RegistryAuth`, the challenge
  answering (Basic, Bearer token fetch and refresh) nydusd's registry backend
  uses too.

Every failure raises :class:`~nydus_vfs.errors.ConvertError` naming the
registry, the object and the HTTP status with the registry's error message.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlencode, urljoin

import aiohttp

from ..errors import BackendError, ConvertError
from ..storage.backend import RegistryAuth

__all__ = [
    "Reference",
    "RegistryClient",
    "docker_credentials",
    "MANIFEST_TYPES",
    "INDEX_TYPES",
    "OCI_MANIFEST",
    "OCI_INDEX",
    "DOCKER_MANIFEST",
    "DOCKER_LIST",
]

log = logging.getLogger("nydus_vfs.convert")

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
_ACCEPT = ", ".join(MANIFEST_TYPES + INDEX_TYPES)
_DOCKER_HUB = "docker.io"
_DOCKER_HUB_API = "registry-1.docker.io"
_MAX_MANIFEST = 4 << 20
_READ = 1 << 20

_REPO_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class Reference:
    """An image reference; ``registry`` is the API host (``host[:port]``)."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> "Reference":
        """Parse ``text``; ConvertError says what is wrong with it."""
        original = text
        if not text or any(c.isspace() for c in text):
            raise ConvertError(f"invalid image reference {original!r}")
        digest = None
        if "@" in text:
            text, _, digest = text.partition("@")
            if not _DIGEST.fullmatch(digest):
                raise ConvertError(f"invalid image reference {original!r}: digest must be sha256:<64 hex>")
        first, sep, rest = text.partition("/")
        if sep and ("." in first or ":" in first or first == "localhost"):
            registry, path = first, rest
        else:
            registry, path = _DOCKER_HUB, text
        tag = None
        if ":" in path.rsplit("/", 1)[-1]:
            path, _, tag = path.rpartition(":")
            if not _TAG.fullmatch(tag):
                raise ConvertError(f"invalid image reference {original!r}: bad tag {tag!r}")
        if not path or not all(_REPO_COMPONENT.fullmatch(c) for c in path.split("/")):
            raise ConvertError(f"invalid image reference {original!r}: bad repository name {path!r}")
        if registry == _DOCKER_HUB:
            registry = _DOCKER_HUB_API
            if "/" not in path:
                path = "library/" + path
        if tag is None and digest is None:
            tag = "latest"
        return cls(registry, path, tag, digest)

    @property
    def ref(self) -> str:
        """What goes after ``/manifests/``: the digest when given, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def docker_credentials(registry: str) -> tuple[str, str] | None:
    """(username, password) for ``registry`` from the docker config file, or None."""
    base = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    path = os.path.join(base, "config.json")
    try:
        with open(path, "rb") as f:
            doc = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConvertError(f"docker config {path!r} is unreadable: {exc}") from None
    if not isinstance(doc, dict):
        raise ConvertError(f"docker config {path!r} is not a JSON object")
    auths = doc.get("auths") or {}
    names = {registry, f"https://{registry}", f"http://{registry}", f"https://{registry}/v1/",
             f"https://{registry}/v2/"}
    if registry == _DOCKER_HUB_API:
        names |= {"docker.io", "index.docker.io", "https://index.docker.io/v1/"}
    for key, entry in auths.items() if isinstance(auths, dict) else ():
        if key.rstrip("/") not in {n.rstrip("/") for n in names} or not isinstance(entry, dict):
            continue
        if entry.get("auth"):
            try:
                user, sep, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                raise ConvertError(f"docker config {path!r}: the auth of {key!r} is not base64 user:password") \
                    from None
            if not sep:
                raise ConvertError(f"docker config {path!r}: the auth of {key!r} has no ':'")
            return user, password
        if entry.get("username"):
            return str(entry["username"]), str(entry.get("password", ""))
    helpers = doc.get("credHelpers") or {}
    if (isinstance(helpers, dict) and registry in helpers) or doc.get("credsStore"):
        log.warning("docker config %s names a credential helper; helpers are not run, using no credentials "
                    "for %s", path, registry)
    return None


def _check_digest(digest: object, what: str) -> str:
    """``digest`` when it is ``sha256:<64 hex>``; a manifest from a stranger may say anything."""
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise ConvertError(f"{what}: {str(digest)[:80]!r} is not a sha256:<64 hex> digest")
    return digest


def _registry_error(body: bytes) -> str:
    try:
        doc = json.loads(body)
        errs = doc.get("errors") or []
        text = "; ".join(f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in errs)
        if text:
            return text
    except (ValueError, AttributeError):
        pass
    return body[:200].decode("utf-8", "replace").strip()


class RegistryClient:
    """One registry, reached over ``session``.

    ``plain_http`` talks HTTP; ``insecure`` skips TLS verification and falls
    back to HTTP when the TLS handshake fails (docker's insecure-registry
    rule).  ``credentials`` default to :func:`docker_credentials`.
    """

    def __init__(self, session: aiohttp.ClientSession, registry: str, *, plain_http: bool = False,
                 insecure: bool = False, credentials: tuple[str, str] | None | bool = True) -> None:
        self._session = session
        self.registry = registry
        self._scheme = "http" if plain_http else "https"
        self._insecure = insecure
        creds = docker_credentials(registry) if credentials is True else (credentials or None)
        self._has_creds = creds is not None
        # Challenge answering (Basic, Bearer token fetch and refresh) is shared with the registry backend.
        self._auth = RegistryAuth(auth=base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
                                  if creds else None)

    def _url(self, path: str) -> str:
        return f"{self._scheme}://{self.registry}{path}"

    async def _fetch(self, method: str, url: str, headers, form) -> tuple[int, bytes]:
        """The transport :class:`RegistryAuth` uses for token requests."""
        try:
            async with self._session.request(method, url, headers=dict(headers), data=form,
                                             ssl=self._ssl()) as resp:
                return resp.status, await resp.read()
        except aiohttp.ClientError as exc:
            raise BackendError(f"token request to {url.split('?')[0]} failed: {exc}", retryable=True) from None

    async def _header(self) -> str | None:
        try:
            return await self._auth.header(self._fetch)
        except BackendError as exc:
            raise ConvertError(f"registry {self.registry}: {exc}") from None

    async def _answer(self, headers: Any, failed: str | None, what: str) -> str:
        try:
            return await self._auth.answer(headers.get("WWW-Authenticate"), self._fetch, failed_header=failed)
        except BackendError as exc:
            hint = "" if self._has_creds else " (no credentials for it in the docker config)"
            raise ConvertError(f"registry {self.registry}: {what}: HTTP 401 unauthorized: {exc}{hint}") from None

    def _ssl(self) -> Any:
        if self._scheme == "https" and self._insecure:
            return False
        return None

    async def request(self, method: str, path: str, *, what: str, repo: str, headers: dict[str, str] | None = None,
                      data: Any = None, ok: tuple[int, ...] = (200,), allow: tuple[int, ...] = (),
                      read_body: bool = True, data_factory: Callable[[], Any] | None = None,
                      absolute: bool = False) -> tuple[int, Any, bytes]:
        """One request with auth and insecure fallback; (status, headers, body).

        A status outside ``ok`` + ``allow`` raises ConvertError naming ``what``.
        ``data_factory`` re-creates the body for a retry after 401.
        """
        auth = await self._header()
        for attempt in range(2):
            hdrs = dict(headers or {})
            if auth:
                hdrs["Authorization"] = auth
            url = path if absolute else self._url(path)
            body_data = data_factory() if data_factory is not None else data
            try:
                async with self._session.request(method, url, headers=hdrs, data=body_data,
                                                 ssl=self._ssl(), allow_redirects=True) as resp:
                    status = resp.status
                    rheaders = resp.headers
                    body = await resp.read() if read_body or status not in ok else b""
            except aiohttp.ClientConnectorCertificateError as exc:
                raise ConvertError(f"registry {self.registry}: TLS certificate not trusted ({exc}); use "
                                   "--source-insecure/--target-insecure or --plain-http") from None
            except (aiohttp.ClientSSLError, aiohttp.ServerDisconnectedError) as exc:
                if self._insecure and self._scheme == "https" and not absolute and attempt == 0:
                    log.warning("registry %s: TLS failed (%s), falling back to plain HTTP (insecure)",
                                self.registry, exc)
                    self._scheme = "http"
                    continue
                raise ConvertError(f"registry {self.registry}: {what}: {exc}") from None
            except aiohttp.ClientError as exc:
                raise ConvertError(f"registry {self.registry}: {what}: {type(exc).__name__}: {exc}") from None
            if status == 401 and attempt == 0:
                auth = await self._answer(rheaders, auth, what)
                continue
            if status == 401:
                raise ConvertError(f"registry {self.registry}: {what}: HTTP 401 unauthorized (credentials refused)")
            if status not in ok and status not in allow:
                raise ConvertError(f"registry {self.registry}: {what}: HTTP {status} {_registry_error(body)}")
            return status, rheaders, body
        raise ConvertError(f"registry {self.registry}: {what}: HTTP 401 unauthorized (credentials refused)")

    # -- pull ----------------------------------------------------------------------------------------

    async def get_manifest(self, repo: str, ref: str) -> tuple[bytes, str, str]:
        """(body, media type, digest) of manifest ``ref``; the digest is checked when ``ref`` is one."""
        if not isinstance(ref, str) or not (_DIGEST.fullmatch(ref) or _TAG.fullmatch(ref)):
            raise ConvertError(f"registry {self.registry}: manifest reference {str(ref)[:80]!r} is neither a tag "
                               "nor a sha256 digest")
        _, headers, body = await self.request("GET", f"/v2/{repo}/manifests/{ref}", what=f"manifest {repo}:{ref}",
                                              repo=repo, headers={"Accept": _ACCEPT})
        if len(body) > _MAX_MANIFEST:
            raise ConvertError(f"registry {self.registry}: manifest {repo}:{ref} is {len(body)} bytes, over "
                               f"{_MAX_MANIFEST}")
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if ref.startswith("sha256:") and digest != ref:
            raise ConvertError(f"registry {self.registry}: manifest {repo}@{ref} has digest {digest}")
        media_type = headers.get("Content-Type", "").split(";")[0].strip()
        try:
            doc = json.loads(body)
        except ValueError:
            raise ConvertError(f"registry {self.registry}: manifest {repo}:{ref} is not JSON") from None
        if isinstance(doc, dict) and doc.get("mediaType"):
            media_type = doc["mediaType"]
        return body, media_type, digest

    async def get_blob(self, repo: str, digest: str, max_size: int = _MAX_MANIFEST) -> bytes:
        """A small blob (config) in memory, digest-checked."""
        _check_digest(digest, f"registry {self.registry}: blob of {repo}")
        _, _, body = await self.request("GET", f"/v2/{repo}/blobs/{digest}", what=f"blob {digest}", repo=repo)
        if len(body) > max_size:
            raise ConvertError(f"registry {self.registry}: blob {digest} is larger than {max_size} bytes")
        if "sha256:" + hashlib.sha256(body).hexdigest() != digest:
            raise ConvertError(f"registry {self.registry}: blob {digest} does not match its digest")
        return body

    async def download_blob(self, repo: str, digest: str, path: str, on_bytes: Callable[[int], None] | None = None
                            ) -> int:
        """Stream blob ``digest`` into ``path``, checking its sha256; returns its size."""
        _check_digest(digest, f"registry {self.registry}: blob of {repo}")
        what = f"blob {digest}"
        auth = await self._header()
        for attempt in range(2):
            hdrs = {"Authorization": auth} if auth else {}
            try:
                async with self._session.get(self._url(f"/v2/{repo}/blobs/{digest}"), headers=hdrs,
                                             ssl=self._ssl()) as resp:
                    if resp.status == 401 and attempt == 0:
                        auth = await self._answer(resp.headers, auth, what)
                        continue
                    if resp.status != 200:
                        body = await resp.read()
                        raise ConvertError(f"registry {self.registry}: {what}: HTTP {resp.status} "
                                           f"{_registry_error(body)}")
                    h = hashlib.sha256()
                    size = 0
                    with open(path, "wb") as f:
                        async for piece in resp.content.iter_chunked(_READ):
                            h.update(piece)
                            f.write(piece)
                            size += len(piece)
                            if on_bytes:
                                on_bytes(len(piece))
            except aiohttp.ClientError as exc:
                raise ConvertError(f"registry {self.registry}: {what}: {type(exc).__name__}: {exc}") from None
            if "sha256:" + h.hexdigest() != digest:
                raise ConvertError(f"registry {self.registry}: {what}: downloaded data does not match its digest")
            return size
        raise ConvertError(f"registry {self.registry}: {what}: HTTP 401 unauthorized")

    # -- push ------------------------------------------------------------------------------------------

    async def blob_exists(self, repo: str, digest: str) -> int | None:
        """Size of blob ``digest`` in ``repo``, or None when absent."""
        _check_digest(digest, f"registry {self.registry}: blob of {repo}")
        status, headers, _ = await self.request("HEAD", f"/v2/{repo}/blobs/{digest}", what=f"blob {digest}",
                                                repo=repo, allow=(404,), read_body=False)
        if status == 404:
            return None
        try:
            return int(headers.get("Content-Length", "-1"))
        except ValueError:
            return -1

    async def push_blob(self, repo: str, path: str, digest: str, size: int, *, chunk_size: int = 0,
                        what: str | None = None) -> None:
        """Upload the file ``path`` as blob ``digest``; monolithic, or in ``chunk_size`` pieces."""
        what = what or f"blob {digest}"
        _check_digest(digest, what)
        _, headers, _ = await self.request("POST", f"/v2/{repo}/blobs/uploads/", what=f"{what}: start upload",
                                           repo=repo, ok=(202,), headers={"Content-Length": "0"})
        location = self._location(headers, what)
        if chunk_size and size > chunk_size:
            offset = 0
            with open(path, "rb") as f:
                while offset < size:
                    piece = f.read(chunk_size)
                    end = offset + len(piece) - 1
                    _, headers, _ = await self.request(
                        "PATCH", location, absolute=True, what=f"{what}: upload bytes {offset}-{end}", repo=repo,
                        ok=(202,), data=piece, headers={"Content-Type": "application/octet-stream",
                                                         "Content-Range": f"{offset}-{end}",
                                                         "Content-Length": str(len(piece))})
                    location = self._location(headers, what)
                    offset += len(piece)
            await self.request("PUT", self._with_digest(location, digest), absolute=True,
                               what=f"{what}: finish upload", repo=repo, ok=(201,),
                               headers={"Content-Length": "0"})
            return

        f = None

        def factory():
            # A fresh file object per attempt: the retry after a 401 re-sends the body from its start.
            nonlocal f
            if f is not None:
                f.close()
            f = open(path, "rb")
            return f

        try:
            await self.request("PUT", self._with_digest(location, digest), absolute=True, what=f"{what}: upload",
                               repo=repo, ok=(201,), data_factory=factory,
                               headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)})
        finally:
            if f is not None:
                f.close()

    def _location(self, headers: Any, what: str) -> str:
        loc = headers.get("Location")
        if not loc:
            raise ConvertError(f"registry {self.registry}: {what}: upload answer has no Location")
        return urljoin(self._url("/"), loc)

    @staticmethod
    def _with_digest(location: str, digest: str) -> str:
        return location + ("&" if "?" in location else "?") + urlencode({"digest": digest})

    async def push_bytes(self, repo: str, data: bytes, what: str) -> str:
        """Upload small ``data`` (a config) unless present; returns its digest."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if await self.blob_exists(repo, digest) is not None:
            return digest
        _, headers, _ = await self.request("POST", f"/v2/{repo}/blobs/uploads/", what=f"{what}: start upload",
                                           repo=repo, ok=(202,), headers={"Content-Length": "0"})
        await self.request("PUT", self._with_digest(self._location(headers, what), digest), absolute=True,
                           what=f"{what}: upload", repo=repo, ok=(201,), data=data,
                           headers={"Content-Type": "application/octet-stream"})
        return digest

    async def put_manifest(self, repo: str, ref: str, body: bytes, media_type: str) -> str:
        """Put manifest ``body`` at ``ref`` (tag or digest); returns its digest."""
        await self.request("PUT", f"/v2/{repo}/manifests/{ref}", what=f"manifest {repo}:{ref}", repo=repo,
                           ok=(201, 200), data=body, headers={"Content-Type": media_type})
        return "sha256:" + hashlib.sha256(body).hexdigest()

