"""``nydus-backend-proxy``: serve a directory of blob files as registry blob endpoints (nydus-surface.md §6).

    nydus-backend-proxy --blobsdir DIR [--address 127.0.0.1] [--port 8000]

The address and port default to upstream's (Rocket's) 127.0.0.1:8000 and may
also come from ``ROCKET_ADDRESS`` / ``ROCKET_PORT``; the command line wins.
nydusd reaches it with its **registry** backend: ``scheme: http``,
``host: <address:port>``, ``repo: <one path segment>``.

Routes (``<ns>`` and ``<repo>`` are one path segment each, their values unused)::

    HEAD /<ns>/<repo>/blobs/sha256:<hex>     size and digest of DIR/<hex>
    GET  /<ns>/<repo>/blobs/sha256:<hex>     the blob, or one range of it
    GET  /<hex>  (and HEAD)                  the blob file itself (upstream's static file route)

Every request opens ``DIR/<hex>`` afresh, so files added to DIR after start
are served, a replaced file is served from its new inode, and a file removed
while a response streams keeps streaming from the open descriptor to its end.
A file that *shrinks* under a response ends the body early (the client sees a
short body, the server logs it and goes on).

Deliberate differences from upstream (nydusd only checks for a 2xx answer, so
they are invisible to it; registry clients such as skopeo expect them):

=====================  ===========================  =================================
case                   upstream                     here
=====================  ===========================  =================================
range GET              ``200``, ``Content-Range``   ``206``, ``Content-Range:
                       total = range length,        bytes s-e/<file size>``,
                       chunked body                 ``Content-Length``
``Docker-Content-``    bare hex                     ``sha256:<hex>``
``Digest``
bad/unsatisfiable      ``416``, no Content-Range    ``416`` with ``Content-Range:
range                                               bytes */<file size>``
digest naming a path   joined to DIR as is          ``400`` (``/``, ``..``, NUL and
(``../x``, ``a/b``)                                 names starting with ``.`` refused)
replaced file          old inode kept forever       the file DIR holds now
=====================  ===========================  =================================

Kept as upstream: a digest without ``sha256:`` is ``400``; a missing blob
``404``; only the first range of a multi-range header is served; a failure to
stat or open an existing file is ``500``.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import re
import signal
import stat
import sys
from dataclasses import dataclass
from typing import Sequence

from aiohttp import web

from .._version import version_text
from ..errors import ConfigError, NydusError
from ..utils.logging import setup_logging

__all__ = ["main", "build_parser", "make_app", "parse_range", "ByteRange", "DEFAULT_ADDRESS", "DEFAULT_PORT"]

log = logging.getLogger("nydus_vfs.backend_proxy")

DEFAULT_ADDRESS = "127.0.0.1"
DEFAULT_PORT = 8000
#: Read size while streaming a body.
_PIECE = 256 << 10
#: A blob name: what nydusd asks for is 64 hex digits; other plain file names are served too.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")


@dataclass(frozen=True)
class ByteRange:
    """An inclusive byte range ``start..end`` of a file of ``size`` bytes."""

    start: int
    end: int
    size: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self) -> str:
        return f"bytes {self.start}-{self.end}/{self.size}"


class RangeNotSatisfiable(ValueError):
    """The ``Range`` header is malformed or asks for nothing inside the file."""


def parse_range(header: str, size: int) -> ByteRange:
    """Resolve the first range of a ``Range: bytes=...`` header against a file of ``size`` bytes.

    Forms: ``a-b`` (``b`` clamped to the last byte), ``a-``, ``-n`` (the last
    ``n`` bytes).  Anything else, or a range that selects no byte of the file,
    raises :class:`RangeNotSatisfiable` (upstream answers 416 to both).
    """
    unit, sep, spec = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        raise RangeNotSatisfiable(f"unsupported range unit in {header!r}")
    first = spec.split(",", 1)[0].strip()
    m = re.fullmatch(r"(\d*)\s*-\s*(\d*)", first)
    if m is None or (not m.group(1) and not m.group(2)):
        raise RangeNotSatisfiable(f"malformed range {first!r}")
    a, b = m.group(1), m.group(2)
    if not a:  # suffix range: the last n bytes
        n = int(b)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable(f"suffix range {first!r} selects nothing of a {size}-byte file")
        return ByteRange(max(0, size - n), size - 1, size)
    start = int(a)
    end = int(b) if b else size - 1
    if b and end < start:
        raise RangeNotSatisfiable(f"range {first!r} ends before it starts")
    if start >= size:
        raise RangeNotSatisfiable(f"range {first!r} starts at or after the end of a {size}-byte file")
    return ByteRange(start, min(end, size - 1), size)


def _blob_name(digest: str) -> str:
    if not digest.startswith("sha256:"):
        raise web.HTTPBadRequest(text=f"invalid digest {digest[:80]!r}: only sha256:<hex> digests are served\n")
    return _plain_name(digest[len("sha256:"):])


def _plain_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise web.HTTPBadRequest(text=f"invalid blob name {name[:80]!r}: not a plain file name in the blobs "
                                      "directory\n")
    return name


class _Proxy:
    def __init__(self, blobsdir: str) -> None:
        self.blobsdir = blobsdir

    def _open(self, name: str) -> tuple[int, int]:
        """Open ``DIR/name``; (fd, size).  404 when absent or not a regular file, 500 on other errors."""
        path = os.path.join(self.blobsdir, name)
        try:
            # O_NONBLOCK: a FIFO named like a blob must not block the loop in open().
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            raise web.HTTPNotFound(text=f"blob {name} not found\n") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a symlink: never leave the directory
                raise web.HTTPNotFound(text=f"blob {name} not found\n") from None
            log.error("blob %s: cannot open %s: %s", name, path, exc.strerror)
            raise web.HTTPInternalServerError(text=f"blob {name}: cannot open: {exc.strerror}\n") from None
        try:
            st = os.fstat(fd)
        except OSError as exc:
            os.close(fd)
            log.error("blob %s: cannot stat %s: %s", name, path, exc.strerror)
            raise web.HTTPInternalServerError(text=f"blob {name}: cannot stat: {exc.strerror}\n") from None
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise web.HTTPNotFound(text=f"blob {name} not found\n")
        return fd, st.st_size

    async def serve(self, request: web.Request, name: str) -> web.StreamResponse:
        fd, size = self._open(name)
        try:
            headers = {"Content-Type": "application/octet-stream", "Docker-Content-Digest": f"sha256:{name}"}
            start, length, status = 0, size, 200
            range_header = request.headers.get("Range")
            if range_header is not None and request.method == "GET":
                try:
                    r = parse_range(range_header, size)
                except RangeNotSatisfiable as exc:
                    log.info("blob %s: 416 for Range %r: %s", name, range_header[:80], exc)
                    raise web.HTTPRequestRangeNotSatisfiable(
                        headers={"Content-Range": f"bytes */{size}"}, text=f"{exc}\n") from None
                start, length, status = r.start, r.length, 206
                headers["Content-Range"] = r.content_range()
            resp = web.StreamResponse(status=status, headers=headers)
            resp.content_length = length
            if request.method == "HEAD":
                await resp.prepare(request)
                return resp
            await resp.prepare(request)
            await self._stream(request, resp, fd, name, start, length)
            return resp
        finally:
            os.close(fd)

    async def _stream(self, request: web.Request, resp: web.StreamResponse, fd: int, name: str,
                      start: int, length: int) -> None:
        loop = asyncio.get_running_loop()
        pos, end = start, start + length
        while pos < end:
            try:
                data = await loop.run_in_executor(None, os.pread, fd, min(_PIECE, end - pos), pos)
            except OSError as exc:
                log.warning("blob %s: read error at offset %d: %s; response ends early", name, pos, exc.strerror)
                break
            if not data:
                log.warning("blob %s: file shrank under the response (ends at %d, %d bytes promised); "
                            "response ends early", name, pos, end)
                break
            try:
                await resp.write(data)
            except (ConnectionResetError, ConnectionError):
                log.info("blob %s: client went away at offset %d", name, pos)
                return
            pos += len(data)
        if pos < end and request.transport is not None:
            # The promised Content-Length cannot be met: close so the client sees a short body, not a hang.
            request.transport.close()


def make_app(blobsdir: str) -> web.Application:
    """The aiohttp application serving ``blobsdir`` (the routes of the module docstring)."""
    proxy = _Proxy(blobsdir)

    async def blob(request: web.Request) -> web.StreamResponse:
        return await proxy.serve(request, _blob_name(request.match_info["digest"]))

    async def static(request: web.Request) -> web.StreamResponse:
        return await proxy.serve(request, _plain_name(request.match_info["name"]))

    app = web.Application()
    app.router.add_get("/{ns}/{repo}/blobs/{digest}", blob)   # add_get also routes HEAD
    app.router.add_get("/{name}", static)
    return app


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nydus-backend-proxy",
        description="A simple HTTP server to serve a local directory as blob backend for nydusd "
                    "(its registry backend with scheme http and a one-segment repo)")
    p.add_argument("-b", "--blobsdir", help="path to the directory of blob files")
    p.add_argument("--address", default=None,
                   help=f"listen address (default: $ROCKET_ADDRESS or {DEFAULT_ADDRESS})")
    p.add_argument("--port", type=int, default=None,
                   help=f"listen port, 0 picks a free one (default: $ROCKET_PORT or {DEFAULT_PORT})")
    p.add_argument("-l", "--log-level", default="info", choices=("trace", "debug", "info", "warn", "error"))
    p.add_argument("-V", "--version", action="store_true", help="print version information")
    return p


def _listen(args: argparse.Namespace) -> tuple[str, int]:
    address = args.address or os.environ.get("ROCKET_ADDRESS") or DEFAULT_ADDRESS
    port = args.port
    if port is None:
        env = os.environ.get("ROCKET_PORT")
        try:
            port = int(env) if env else DEFAULT_PORT
        except ValueError:
            raise ConfigError(f"ROCKET_PORT={env!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"port {port} is not in 0..65535")
    return address, port


async def _serve(blobsdir: str, address: str, port: int) -> None:
    runner = web.AppRunner(make_app(blobsdir), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, address, port)
        await site.start()
        sockets = site._server.sockets if site._server else []  # type: ignore[union-attr]
        bound = sockets[0].getsockname()[:2] if sockets else (address, port)
        # Handlers first: whoever reads the line below may send SIGTERM right away.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # One line on stdout, flushed, so a caller that asked for port 0 learns the port.
        sys.stdout.write(f"nydus-backend-proxy: serving {blobsdir} on http://{bound[0]}:{bound[1]}\n")
        sys.stdout.flush()
        log.info("serving %s on http://%s:%d", blobsdir, bound[0], bound[1])
        await stop.wait()
        log.info("signal received, shutting down")
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        sys.stdout.write(version_text("nydus-backend-proxy"))
        return 0
    if not args.blobsdir:
        parser.error("the following arguments are required: -b/--blobsdir")
    try:
        setup_logging(args.log_level)
        address, port = _listen(args)
        if not os.path.isdir(args.blobsdir):
            raise ConfigError(f"--blobsdir {args.blobsdir!r} is not a directory")
        os.listdir(args.blobsdir)  # readable now, or refuse to start (upstream reads it at start too)
    except (NydusError, OSError) as exc:
        sys.stderr.write(f"nydus-backend-proxy: {exc}\n")
        return 1
    try:
        asyncio.run(_serve(os.path.abspath(args.blobsdir), address, port))
    except OSError as exc:
        sys.stderr.write(f"nydus-backend-proxy: cannot listen on {address}:{port}: {exc.strerror or exc}\n")
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
