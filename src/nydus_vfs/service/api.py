"""The nydusd HTTP API on a unix socket (nydus-surface.md §3), served by aiohttp on the daemon's loop.

Contract kept for the drivers (nydus-snapshotter, Kata, nydusctl, the smoke tests):

* Routing by exact path, query stripped; trailing slashes do not match.  Every
  response carries ``Server: Nydus API`` and ``Content-Type: application/json``
  (204s included).  Success with a body is 200, without one 204.
* Errors: ``{"code":"UNDEFINED","message":"<upstream-style debug text>"}`` with
  400 for a bad method, body or query, 404 for an unknown path (``NoRoute``)
  and for metrics without a counter (``…(Stats(NoCounter))``), and the
  daemon's error kinds mapped as nydus-surface.md §3.1 says (NotReady 503, Unsupported 501,
  UnexpectedEvent 400, others 500).  The message substrings drivers match are
  kept verbatim (nydus-surface.md §0 item 5).
* dbs-uhttp's limits (nydus-surface.md §0 item 4): at most 10 connections (the
  11th gets a raw 503 ``Too many open connections`` and is closed), request
  and header lines of at most 1024 bytes, bodies of at most 51,200 bytes, no
  chunked request bodies (400 each).  Idle connections are kept open for the
  life of the process: the snapshotter holds one and watches it for HUP.
* The socket file is created with mode 0600.  A stale socket file (nothing
  accepts on it: a crashed predecessor) is replaced; a live one is refused.

Unlike upstream, requests do not queue behind one another: a slow mount does
not block metrics (mounts are serialised by the daemon itself).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from ..errors import ConfigError, NydusError
from ..utils.logging import API_LOG_LEVELS, set_level
from ..utils.unixsock import listen_unix, remove_unix_socket
from ._errors import ServiceError
from .state import DaemonState, UnexpectedEventError

__all__ = ["ApiServer", "MAX_CONNECTIONS", "MAX_LINE", "MAX_BODY"]

log = logging.getLogger("nydus_vfs.api")

MAX_CONNECTIONS = 10
MAX_LINE = 1024
MAX_BODY = 51_200
# Idle connections are never closed by us (the snapshotter watches one for HUP).
_FOREVER = 10.0 ** 9

_HEADERS = {"Server": "Nydus API", "Content-Type": "application/json"}
_TOO_MANY = (b"HTTP/1.1 503 Service Unavailable\r\nServer: Firecracker API\r\n"
             b"Content-Type: application/json\r\nConnection: close\r\nContent-Length: 42\r\n\r\n"
             b'{ "error": "Too many open connections" }\r\n')


class _ApiError(Exception):
    """An error answer: HTTP status and the ``message`` of the error body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _reply(status: int, body: Any = None) -> web.Response:
    if body is None:
        return web.Response(status=status, headers=_HEADERS)
    text = body if isinstance(body, str) else json.dumps(body)
    return web.Response(status=status, body=text.encode(), headers=_HEADERS)


def _error(status: int, message: str) -> web.Response:
    return _reply(status, {"code": "UNDEFINED", "message": message})


def _debug_str(text: str) -> str:
    """Rust's Debug rendering of a string: quoted, with quotes and backslashes escaped."""
    return json.dumps(text)


def _daemon_error(exc: BaseException) -> _ApiError:
    if isinstance(exc, UnexpectedEventError):
        return _ApiError(400, exc.debug_text)
    if isinstance(exc, ServiceError):
        return _ApiError(exc.status, exc.debug_text)
    if isinstance(exc, ConfigError):
        return _ApiError(500, f"Mount(MountFilesystem(Other({_debug_str(str(exc))})))")
    return _ApiError(500, f"Other({_debug_str(str(exc))})")


class _TooManyConnections(asyncio.Protocol):
    """What the 11th simultaneous connection gets: a raw 503, then the door."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(_TOO_MANY)  # type: ignore[attr-defined]
        transport.close()


Handler = Callable[[web.Request], Awaitable[web.Response]]


class _RequestHandler(RequestHandler):
    """aiohttp's connection handler, answering malformed requests the API's way.

    A request aiohttp cannot parse (a line over 1024 bytes, bad framing) gets a
    400 with the API's headers and JSON error body and one warning line, not
    aiohttp's plain-text page and an ERROR traceback per request.
    """

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        log.warning("API: malformed request refused with %d: %s", status, message or exc)
        resp = _error(400 if status < 500 else status, "BadRequest" if status < 500 else "Other(\"internal error\")")
        resp.force_close()
        return resp


class ApiServer:
    """The API of one :class:`~nydus_vfs.service.daemon.NydusDaemon` on one unix socket."""

    def __init__(self, daemon) -> None:
        self.daemon = daemon
        self.path: str | None = None
        self._runner: web.AppRunner | None = None
        self._server: asyncio.AbstractServer | None = None
        # (method, path) -> handler; routing is exact, as upstream's.
        self._routes: dict[str, dict[str, Handler]] = {}
        self._add_routes()

    # -- socket ---------------------------------------------------------------------
    async def start(self, path: str) -> None:
        """Bind ``path`` (mode 0600) and serve; ServiceError if another daemon serves it."""
        sock = listen_unix(path, flag="--apisock", backlog=64, mode=0o600)
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._middleware])
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        # The handler settings (the factory below builds the handlers itself).
        kwargs: dict[str, Any] = {"max_line_size": MAX_LINE, "max_field_size": MAX_LINE,
                                  "keepalive_timeout": _FOREVER, "lingering_time": 0, "access_log": None}
        self._runner = web.AppRunner(app, handle_signals=False, **kwargs)
        await self._runner.setup()
        web_server = self._runner.server
        assert web_server is not None
        loop = asyncio.get_running_loop()

        def factory() -> asyncio.Protocol:
            if len(web_server.connections) >= MAX_CONNECTIONS:
                return _TooManyConnections()
            return _RequestHandler(web_server, loop=loop, **kwargs)

        self._server = await loop.create_unix_server(factory, sock=sock)
        self.path = path
        log.info("HTTP API listening on %s", path)

    async def close(self) -> None:
        """Stop listening, remove the socket file, close every connection (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        if self.path is not None:
            remove_unix_socket(self.path)
            self.path = None
        runner, self._runner = self._runner, None
        if runner is not None:
            if runner.server is not None:
                await runner.server.shutdown(0.5)
            await runner.cleanup()

    # -- request handling -------------------------------------------------------------
    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if "chunked" in request.headers.get("Transfer-Encoding", "").lower():
            return _error(400, "BadRequest")
        length = request.content_length
        if length is not None and length > MAX_BODY:
            return _error(400, "BadRequest")
        try:
            return await handler(request)
        except _ApiError as exc:
            return _error(exc.status, exc.message)
        except web.HTTPException as exc:  # a body over client_max_size, ...
            return _error(400 if exc.status == 413 else exc.status, "BadRequest")
        except NydusError as exc:
            err = _daemon_error(exc)
            return _error(err.status, err.message)
        except Exception:  # a bug: answer, log, keep serving
            log.exception("API request %s %s failed", request.method, request.path)
            return _error(500, "Other(\"internal error\")")

    async def _dispatch(self, request: web.Request) -> web.Response:
        methods = self._routes.get(request.path)
        if methods is None:
            raise _ApiError(404, "NoRoute")
        handler = methods.get(request.method)
        if handler is None:
            raise _ApiError(400, "BadRequest")
        return await handler(request)

    def _route(self, path: str, method: str, handler: Handler) -> None:
        self._routes.setdefault(path, {})[method] = handler

    def _add_routes(self) -> None:
        for root in ("/api/v1", "/api/v2"):
            self._route(root + "/daemon", "GET", self._get_daemon)
            self._route(root + "/daemon", "PUT", self._put_daemon)
        r = "/api/v1"
        self._route(r + "/daemon/events", "GET", self._get_events)
        self._route(r + "/daemon/backend", "GET", self._get_backend)
        self._route(r + "/daemon/start", "PUT", self._put_start)
        self._route(r + "/daemon/exit", "PUT", self._put_exit)
        self._route(r + "/daemon/fuse/sendfd", "PUT", self._put_sendfd)
        self._route(r + "/daemon/fuse/takeover", "PUT", self._put_takeover)
        self._route(r + "/mount", "POST", self._post_mount)
        self._route(r + "/mount", "PUT", self._put_mount)
        self._route(r + "/mount", "DELETE", self._delete_mount)
        self._route(r + "/metrics", "GET", self._get_metrics)
        self._route(r + "/metrics/files", "GET", self._get_metrics_files)
        self._route(r + "/metrics/pattern", "GET", self._get_metrics_pattern)
        self._route(r + "/metrics/backend", "GET", self._get_metrics_backend)
        self._route(r + "/metrics/blobcache", "GET", self._get_metrics_blobcache)
        self._route(r + "/metrics/inflight", "GET", self._get_metrics_inflight)
        self._route(r + "/metrics/prometheus", "GET", self._get_metrics_prometheus)
        self._route(r + "/config", "GET", self._get_config)
        self._route(r + "/config", "PUT", self._put_config)
        for method in ("GET", "PUT", "DELETE"):
            self._route("/api/v2/blobs", method, self._blobs)

    # -- helpers --------------------------------------------------------------------------
    @staticmethod
    async def _no_body(request: web.Request) -> None:
        if request.can_read_body and await request.read():
            raise _ApiError(400, "BadRequest")

    @staticmethod
    async def _json_body(request: web.Request) -> Any:
        data = await request.read()
        if not data:
            raise _ApiError(400, "BadRequest")
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            line = getattr(exc, "lineno", 1)
            col = getattr(exc, "colno", 0)
            msg = getattr(exc, "msg", str(exc))
            raise _ApiError(400, f"ParseBody(Error({_debug_str(msg)}, line: {line}, column: {col}))") from None

    @staticmethod
    def _query(request: web.Request, name: str) -> str:
        value = request.query.get(name)
        if value is None:
            raise _ApiError(400, f"QueryString(\"'{name}' should be specified in query string\")")
        return value

    # -- daemon -------------------------------------------------------------------------
    async def _get_daemon(self, request: web.Request) -> web.Response:
        await self._no_body(request)
        v2 = request.path.startswith("/api/v2")
        return _reply(200, self.daemon.info(with_backends=not v2))

    async def _put_daemon(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        level = body.get("log_level") if isinstance(body, dict) else None
        if not isinstance(level, str) or level not in API_LOG_LEVELS:
            raise _ApiError(500, "Configure(ResponsePayloadType)")
        set_level(level)
        log.info("log level set to %s through the API", level)
        return _reply(204)

    async def _get_events(self, request: web.Request) -> web.Response:
        await self._no_body(request)
        return _reply(200, self.daemon.events())

    async def _get_backend(self, request: web.Request) -> web.Response:
        await self._no_body(request)
        mountpoint = self._query(request, "mountpoint")
        return _reply(200, self.daemon.superblock_info(mountpoint))

    async def _put_start(self, request: web.Request) -> web.Response:
        await self._no_body(request)
        self.daemon.start()
        return _reply(204)

    async def _put_exit(self, request: web.Request) -> web.Response:
        await self._no_body(request)
        if self.daemon.state is DaemonState.STOPPED:
            raise _ApiError(400, 'UnexpectedEvent("Exit")')
        # Answer first: the exit closes this very connection.
        asyncio.get_running_loop().call_soon(self.daemon.request_exit)
        return _reply(204)

    async def _put_sendfd(self, request: web.Request) -> web.Response:
        await self._no_body(request)
        raise _ApiError(501, 'Unsupported("saving the FUSE session for a supervisor is not supported by '
                             'this nydusd")')

    async def _put_takeover(self, request: web.Request) -> web.Response:
        await self._no_body(request)
        if self.daemon.state is not DaemonState.INIT:
            raise _ApiError(400, 'UnexpectedEvent("Takeover")')
        raise _ApiError(501, 'Unsupported("takeover is not supported by this nydusd")')

    # -- mounts ---------------------------------------------------------------------------
    async def _mount_cmd(self, request: web.Request) -> tuple[str, dict[str, Any]]:
        mountpoint = self._query(request, "mountpoint")
        body = await self._json_body(request)
        if not isinstance(body, dict):
            raise _ApiError(400, "ParseBody(Error(\"invalid type: expected struct MountCmd\", line: 1, column: 1))")
        for key in ("source", "config"):
            if key not in body:
                raise _ApiError(400, f"ParseBody(Error(\"missing field `{key}`\", line: 1, column: 1))")
        if not all(isinstance(body.get(k, ""), str) for k in ("source", "config", "fs_type")):
            raise _ApiError(400, "ParseBody(Error(\"invalid type: expected a string\", line: 1, column: 1))")
        pf = body.get("prefetch_files")
        if pf is not None and (not isinstance(pf, list) or not all(isinstance(p, str) for p in pf)):
            raise _ApiError(400, "ParseBody(Error(\"invalid type: prefetch_files must be an array of "
                                 "strings\", line: 1, column: 1))")
        return mountpoint, body

    async def _post_mount(self, request: web.Request) -> web.Response:
        mountpoint, body = await self._mount_cmd(request)
        await self.daemon.mount(mountpoint, body["source"], body["config"],
                                fs_type=body.get("fs_type", ""), prefetch_files=body.get("prefetch_files"))
        return _reply(204)

    async def _put_mount(self, request: web.Request) -> web.Response:
        mountpoint, body = await self._mount_cmd(request)
        await self.daemon.remount(mountpoint, body["source"], body["config"],
                                  fs_type=body.get("fs_type", "rafs") or "rafs",
                                  prefetch_files=body.get("prefetch_files"))
        return _reply(204)

    async def _delete_mount(self, request: web.Request) -> web.Response:
        await self._no_body(request)
        await self.daemon.umount(self._query(request, "mountpoint"))
        return _reply(204)

    # -- metrics --------------------------------------------------------------------------
    async def _get_metrics(self, request: web.Request) -> web.Response:
        await self._no_body(request)
        return _reply(200, self.daemon.metrics.fs(request.query.get("id")))

    async def _get_metrics_files(self, request: web.Request) -> web.Response:
        await self._no_body(request)
        latest = request.query.get("latest", "false").lower() == "true"
        return _reply(200, self.daemon.metrics.files(request.query.get("id"), latest=latest))

    async def _get_metrics_pattern(self, request: web.Request) -> web.Response:
        await self._no_body(request)
        return _reply(200, self.daemon.metrics.pattern(request.query.get("id")))

    async def _get_metrics_backend(self, request: web.Request) -> web.Response:
        await self._no_body(request)
        return _reply(200, self.daemon.metrics.backend(request.query.get("id")))

    async def _get_metrics_blobcache(self, request: web.Request) -> web.Response:
        await self._no_body(request)
        return _reply(200, self.daemon.metrics.blobcache(request.query.get("id")))

    async def _get_metrics_inflight(self, request: web.Request) -> web.Response:
        await self._no_body(request)
        items = self.daemon.metrics.inflight()
        return _reply(200, items) if items else _reply(204)

    async def _get_metrics_prometheus(self, request: web.Request) -> web.Response:
        await self._no_body(request)
        text = self.daemon.metrics.prometheus()
        return web.Response(status=200, body=text, headers={
            "Server": "Nydus API", "Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    # -- hot-reload config ------------------------------------------------------------
    async def _get_config(self, request: web.Request) -> web.Response:
        await self._no_body(request)
        return _reply(200, self.daemon.get_runtime_config(request.query.get("id")))

    async def _put_config(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        if not isinstance(body, dict) or not all(isinstance(v, str) for v in body.values()):
            raise _ApiError(400, "ParseBody(Error(\"invalid type: expected a map of strings\", line: 1, "
                                 "column: 1))")
        self.daemon.set_runtime_config(request.query.get("id", ""), body)
        return _reply(204)

    # -- v2 blobs (fscache singleton only) ----------------------------------------------
    async def _blobs(self, request: web.Request) -> web.Response:
        if request.method == "DELETE" and "blob_id" in request.query and "domain_id" not in request.query:
            # FUSE and virtio-fs daemons answer this with 204 and do nothing (nydus-surface.md §3.3).
            return _reply(204)
        if request.method == "GET" and "domain_id" not in request.query:
            raise _ApiError(400, "QueryString(\"'domain_id' should be specified in query string\")")
        raise _ApiError(501, 'Unsupported("blob cache entries need the singleton (fscache) service, '
                             'which this nydusd does not run")')
