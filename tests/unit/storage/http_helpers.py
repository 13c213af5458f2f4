"""Small aiohttp servers for the HTTP backend tests: a fault-injecting registry, a token
endpoint, a second blob location for redirects and a forward proxy.

Everything listens on 127.0.0.1 with a port picked by the kernel and runs on the
test's own event loop (``async with FakeRegistry(...) as reg``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import secrets
import time
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

__all__ = ["FakeRegistry", "ForwardProxy", "Recorded", "serve"]

_RANGE = re.compile(r"bytes=(\d+)-(\d+)")


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    query: dict[str, str]
    form: dict[str, str] = field(default_factory=dict)


class _Server:
    """An aiohttp app on 127.0.0.1:<free port> (TCP) or on a Unix socket."""

    def __init__(self, app: web.Application, unix_path: str | None = None) -> None:
        self.app = app
        self.unix_path = unix_path
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def __aenter__(self):
        self.runner = web.AppRunner(self.app, handle_signals=False, shutdown_timeout=0.1)
        await self.runner.setup()
        if self.unix_path:
            site: web.BaseSite = web.UnixSite(self.runner, self.unix_path)
            await site.start()
        else:
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc):
        assert self.runner is not None
        await self.runner.cleanup()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def hostport(self) -> str:
        return f"127.0.0.1:{self.port}"


def serve(app: web.Application, unix_path: str | None = None) -> _Server:
    return _Server(app, unix_path)


async def _serve_range(request: web.Request, data: bytes, fault: str | None) -> web.StreamResponse:
    """Answer a (ranged) GET/HEAD for ``data``, optionally with one injected fault."""
    if fault in ("500", "503"):
        return web.Response(status=int(fault), text="injected")
    if fault == "stall":
        await asyncio.sleep(30)
    start, end = 0, len(data) - 1
    status = 200
    m = _RANGE.fullmatch(request.headers.get("Range", ""))
    if m:
        start, end = int(m.group(1)), int(m.group(2))
        if start >= len(data):
            return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
        end = min(end, len(data) - 1)
        status = 206
    body = data[start:end + 1]
    headers = {"Content-Type": "application/octet-stream"}
    if status == 206:
        crange_start = start + 1 if fault == "wrong_range" else start
        headers["Content-Range"] = f"bytes {crange_start}-{end + (1 if fault == 'wrong_range' else 0)}/{len(data)}"
        if fault == "wrong_range":
            body = data[start + 1:end + 2]
    if request.method == "HEAD":
        headers["Content-Length"] = str(len(body))
        return web.Response(status=status, headers=headers)
    if fault in ("reset", "short"):
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = len(body)
        await resp.prepare(request)
        await resp.write(body[: max(0, len(body) // 2)])
        transport = request.transport
        assert transport is not None
        if fault == "reset":
            transport.abort()
        else:
            transport.close()
        return resp
    return web.Response(status=status, body=body, headers=headers)


class FakeRegistry:
    """A distribution-spec blob endpoint with auth, redirects and fault injection.

    * ``blobs``: hex id -> bytes under any repository (``repos`` limits which exist).
    * ``auth``: None, ``"basic"`` or ``"bearer"`` (token endpoint at ``/token`` on the
      same server; ``post_token=False`` makes it refuse POST with 405).
    * ``redirect``: None, ``"307"`` (to ``/data/<id>``), or ``"loop"``.
    * ``faults``: a list of fault names consumed one per blob request
      (``500``, ``503``, ``reset``, ``short``, ``stall``, ``wrong_range``, ``404``,
      ``expire`` = treat the presented token as expired).
    """

    def __init__(self, blobs: dict[str, bytes], *, repos: tuple[str, ...] = ("library/test",),
                 auth: str | None = None, user: str = "alice", password: str = "s3cr3t-pw",
                 redirect: str | None = None, post_token: bool = True, expires_in: int = 300) -> None:
        self.blobs = blobs
        self.repos = repos
        self.auth = auth
        self.user, self.password = user, password
        self.redirect = redirect
        self.post_token = post_token
        self.expires_in = expires_in
        self.faults: list[str] = []
        self.data_faults: list[str] = []
        self.requests: list[Recorded] = []
        self.tokens: dict[str, float] = {}
        app = web.Application()
        app.router.add_route("*", "/token", self._token)
        app.router.add_route("*", "/data/{id}", self._data)
        app.router.add_route("*", r"/v2/{repo:.+}/blobs/sha256:{id}", self._blob)
        self.server = serve(app)

    async def __aenter__(self) -> FakeRegistry:
        await self.server.__aenter__()
        return self

    async def __aexit__(self, *exc):
        await self.server.__aexit__(*exc)

    @property
    def host(self) -> str:
        return self.server.hostport

    def blob_requests(self) -> list[Recorded]:
        return [r for r in self.requests if r.path.startswith("/v2/")]

    async def _record(self, request: web.Request) -> Recorded:
        form = {}
        if request.method == "POST":
            form = {k: str(v) for k, v in (await request.post()).items()}
        rec = Recorded(request.method, request.path, dict(request.headers), dict(request.query), form)
        self.requests.append(rec)
        return rec

    def _basic_ok(self, header: str) -> bool:
        expected = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        return header == f"Basic {expected}"

    async def _token(self, request: web.Request) -> web.Response:
        rec = await self._record(request)
        if request.method == "POST":
            if not self.post_token:
                return web.Response(status=405)
            ok = rec.form.get("username") == self.user and rec.form.get("password") == self.password
        else:
            ok = self._basic_ok(request.headers.get("Authorization", ""))
        if not ok:
            return web.Response(status=401, text='{"details":"bad credentials"}')
        token = secrets.token_hex(16)
        self.tokens[token] = time.monotonic() + self.expires_in
        return web.json_response({"token": token, "expires_in": self.expires_in})

    def _challenge(self, repo: str) -> web.Response:
        if self.auth == "basic":
            value = 'Basic realm="test"'
        else:
            value = (f'Bearer realm="{self.server.base}/token",service="fake-registry",'
                     f'scope="repository:{repo}:pull"')
        return web.json_response({"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]},
                                 status=401, headers={"WWW-Authenticate": value})

    def _authorized(self, request: web.Request, fault: str | None) -> bool:
        header = request.headers.get("Authorization", "")
        if self.auth == "basic":
            return self._basic_ok(header)
        if self.auth == "bearer":
            token = header.removeprefix("Bearer ")
            if fault == "expire":
                self.tokens.pop(token, None)
            return self.tokens.get(token, 0) > time.monotonic()
        return True

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        fault = self.faults.pop(0) if self.faults else None
        repo, blob_id = request.match_info["repo"], request.match_info["id"]
        if not self._authorized(request, fault):
            return self._challenge(repo)
        if repo not in self.repos:
            return web.json_response({"errors": [{"code": "NAME_UNKNOWN", "message": "repository name not known"}]},
                                     status=404)
        if fault == "404" or blob_id not in self.blobs:
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN", "message": "blob unknown"}]}, status=404)
        if self.redirect == "307":
            return web.Response(status=307, headers={"Location": f"/data/{blob_id}?X-Signature=secret-sig"})
        if self.redirect == "loop":
            return web.Response(status=307, headers={"Location": request.path})
        return await _serve_range(request, self.blobs[blob_id], fault)

    async def _data(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        fault = self.data_faults.pop(0) if self.data_faults else None
        if fault == "403":
            return web.Response(status=403, text="expired signature")
        if "Authorization" in request.headers:
            return web.Response(status=400, text="pre-signed URL must not get Authorization")
        blob = self.blobs.get(request.match_info["id"])
        if blob is None:
            return web.Response(status=404)
        return await _serve_range(request, blob, fault)


class ForwardProxy:
    """An HTTP forward proxy (absolute-form requests) that can fail on demand.

    ``mode``: ``"ok"`` forwards, ``"502"`` answers 502 to everything.
    ``seen`` lists the absolute URLs it was asked for.  ``/ping`` answers 200
    in mode ok, 503 otherwise (the ``ping_url``).
    """

    def __init__(self) -> None:
        self.mode = "ok"
        self.seen: list[str] = []
        self.pings = 0
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.server = serve(app)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ForwardProxy:
        await self.server.__aenter__()
        self._session = aiohttp.ClientSession(auto_decompress=False)
        return self

    async def __aexit__(self, *exc):
        assert self._session is not None
        await self._session.close()
        await self.server.__aexit__(*exc)

    @property
    def url(self) -> str:
        return self.server.base

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        target = str(request.url)
        if request.path == "/ping" and request.host == self.server.hostport:
            self.pings += 1
            return web.Response(status=200 if self.mode == "ok" else 503)
        self.seen.append(target)
        if self.mode != "ok":
            return web.Response(status=502, text="proxy broken")
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "proxy-connection")}
        async with self._session.request(request.method, target, headers=headers, allow_redirects=False,
                                         data=await request.read() or None) as upstream:
            body = await upstream.read()
            out = {k: v for k, v in upstream.headers.items()
                   if k.lower() in ("content-range", "content-type", "location", "www-authenticate")}
            return web.Response(status=upstream.status, body=body, headers=out)


def json_body(data: bytes) -> dict:
    return json.loads(data)
