"""An in-process virtio-fs back-end for the conformance and hostile tests.

* :class:`MemFs` is a tiny read-only tree served through the real
  :class:`~nydus_vfs.fuse.server.FuseServer`: a small file, a 2 MiB file whose
  READs come back as :class:`FileSegment` (the preadv path), a directory, a
  symlink and a file whose READ waits until the test opens a gate (to hold a
  request in flight).
* :class:`Backend` runs :class:`~nydus_vfs.transport.virtiofs.VirtioFsTransport`
  on a uvloop loop in a thread, listening on a temporary socket, so the
  synchronous harness front-end (``tests.harness``) can drive it from the test
  thread.  It records every exception that escapes the loop; a test fails if
  the back-end crashed even when the front-end side looked fine.
* :func:`backend` (a fixture: import it into the test module), :func:`connect`,
  :func:`started` and :func:`wait_until` are the scaffolding every
  conformance and hostile test starts from.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import stat
import tempfile
import threading
import time
from typing import Any, Callable

import pytest
import uvloop

from nydus_vfs.errors import FsError
from nydus_vfs.fuse.ops import Attr, DirEntry, Entry, Operations, StatFs
from nydus_vfs.fuse.server import FuseServer
from nydus_vfs.transport.virtiofs import ShimConfig, VirtioFsTransport
from nydus_vfs.utils.io import FileSegment
from tests.harness import Frontend, FuseSession

HELLO = b"hello, virtio-fs\n"
BIG_SIZE = 2 << 20
BIG = b"".join(hashlib.sha256(i.to_bytes(4, "little")).digest() for i in range(BIG_SIZE // 32))

ROOT, HELLO_ID, BIG_ID, SUB_ID, LINK_ID, SLOW_ID = 1, 2, 3, 4, 5, 6
_NAMES = {b"hello": HELLO_ID, b"big": BIG_ID, b"sub": SUB_ID, b"link": LINK_ID, b"slow": SLOW_ID}


def open_fds() -> set[int]:
    """This process's open descriptors (back-end and harness share the process)."""
    return {int(n) for n in os.listdir("/proc/self/fd")}


class MemFs(Operations):
    """The test tree; ``slow`` READs block on :meth:`open_gate` (see the module docstring)."""

    attr_timeout = 1.0
    entry_timeout = 1.0

    def __init__(self) -> None:
        self._big = tempfile.TemporaryFile()
        self._big.write(BIG)
        self._big.flush()
        self.big_fd = self._big.fileno()
        self.attrs = {
            ROOT: Attr(ROOT, stat.S_IFDIR | 0o755, nlink=3),
            HELLO_ID: Attr(HELLO_ID, stat.S_IFREG | 0o644, size=len(HELLO)),
            BIG_ID: Attr(BIG_ID, stat.S_IFREG | 0o644, size=BIG_SIZE),
            SUB_ID: Attr(SUB_ID, stat.S_IFDIR | 0o755, nlink=2),
            LINK_ID: Attr(LINK_ID, stat.S_IFLNK | 0o777, size=5),
            SLOW_ID: Attr(SLOW_ID, stat.S_IFREG | 0o644, size=len(HELLO)),
        }
        self.gate: asyncio.Event | None = None     # created on the loop
        self.slow_started = threading.Event()
        self.slow_reads = 0
        self.inits = 0
        self.destroys = 0

    def close(self) -> None:
        self._big.close()

    # -- session
    def init(self, conn) -> None:
        self.inits += 1

    def destroy(self) -> None:
        self.destroys += 1

    # -- metadata
    def lookup(self, parent: int, name: bytes, ctx) -> Entry:
        nodeid = _NAMES.get(name) if parent == ROOT else None
        if nodeid is None:
            raise FsError(errno.ENOENT)
        return Entry(nodeid, self.attrs[nodeid], entry_timeout=1.0, attr_timeout=1.0)

    def getattr(self, nodeid: int, fh, ctx) -> Attr:
        try:
            return self.attrs[nodeid]
        except KeyError:
            raise FsError(errno.ENOENT) from None

    def readlink(self, nodeid: int, ctx) -> bytes:
        if nodeid != LINK_ID:
            raise FsError(errno.EINVAL)
        return b"hello"

    def open(self, nodeid: int, flags: int, ctx):
        if nodeid not in (HELLO_ID, BIG_ID, SLOW_ID):
            raise FsError(errno.EISDIR if nodeid in (ROOT, SUB_ID) else errno.ENOENT)
        return nodeid * 10, 0

    async def read(self, nodeid: int, fh: int, offset: int, size: int, ctx):
        if nodeid == HELLO_ID:
            return HELLO[offset:offset + size]
        if nodeid == BIG_ID:
            end = min(BIG_SIZE, offset + size)
            if end <= offset:
                return b""
            if offset % 4096 == 0:
                return [FileSegment(self.big_fd, offset, end - offset)]    # the transport's one-call path
            # Unaligned: two segments, to exercise a reply made of several preadv ranges.
            mid = offset + (end - offset) // 2
            return [FileSegment(self.big_fd, offset, mid - offset), FileSegment(self.big_fd, mid, end - mid)]
        if nodeid == SLOW_ID:
            self.slow_reads += 1
            self.slow_started.set()
            assert self.gate is not None
            await self.gate.wait()
            return HELLO[offset:offset + size]
        raise FsError(errno.EBADF)

    def opendir(self, nodeid: int, flags: int, ctx):
        if nodeid not in (ROOT, SUB_ID):
            raise FsError(errno.ENOTDIR)
        return nodeid * 100, 0

    def _entries(self, nodeid: int, offset: int, plus: bool):
        if nodeid == SUB_ID:
            names = []
        else:
            names = sorted(_NAMES.items())
        rows = [(b".", nodeid, None), (b"..", ROOT, None)]
        for name, child in names:
            rows.append((name, child, Entry(child, self.attrs[child], entry_timeout=1.0, attr_timeout=1.0)
                         if plus else None))
        for i, (name, ino, entry) in enumerate(rows):
            if i < offset:
                continue
            mode = self.attrs[ino].mode
            yield DirEntry(name, ino, mode >> 12, i + 1, entry)

    def readdir(self, nodeid: int, fh: int, offset: int, ctx):
        return self._entries(nodeid, offset, False)

    def readdirplus(self, nodeid: int, fh: int, offset: int, ctx):
        return self._entries(nodeid, offset, True)

    def statfs(self, nodeid: int, ctx) -> StatFs:
        return StatFs(blocks=1000, files=6)


class Backend:
    """The transport on a uvloop loop in a thread (see the module docstring)."""

    def __init__(self, sock_path: str, *, config: ShimConfig | None = None, batch: int = 64,
                 stop_timeout: float = 30.0, handshake_timeout: float | None = 10.0, server: Any = None) -> None:
        self.sock_path = sock_path
        self.ops = MemFs()
        self.server = server if server is not None else FuseServer(self.ops)
        self.errors: list[BaseException] = []
        self.loop = uvloop.new_event_loop()
        self.loop.set_exception_handler(self._on_loop_error)
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self.transport: VirtioFsTransport | None = None
        self._kw = dict(config=config, batch=batch, stop_timeout=stop_timeout, handshake_timeout=handshake_timeout)
        self._thread = threading.Thread(target=self._run, name="virtiofs-backend", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the back-end thread did not start")
        if self.errors:
            raise self.errors[0]

    def _on_loop_error(self, loop, context: dict) -> None:
        exc = context.get("exception") or RuntimeError(context.get("message"))
        self.errors.append(exc)
        logging.getLogger("tests.virtiofs").error("back-end loop error: %s", context.get("message"),
                                                  exc_info=exc)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            self._stop = asyncio.Event()
            self.ops.gate = asyncio.Event()
            self.transport = VirtioFsTransport(self.server, **self._kw)
            serving = asyncio.ensure_future(self.transport.serve(self.sock_path, stop_event=self._stop))
            while not self.transport.listening and not serving.done():
                await asyncio.sleep(0.001)
            if serving.done():
                serving.result()                  # raises why it could not listen
            self._ready.set()
            await serving

        try:
            self.loop.run_until_complete(main())
        except BaseException as exc:  # recorded: the test fails in stop()
            self.errors.append(exc)
        finally:
            self._ready.set()
            self.loop.close()

    # -- test-side helpers
    def call(self, fn: Callable[[], Any], timeout: float = 5.0) -> Any:
        """Run ``fn`` on the back-end loop (where the shim may be touched) and return its result."""
        done = threading.Event()
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["value"] = fn()
            except BaseException as exc:
                box["error"] = exc
            done.set()

        self.loop.call_soon_threadsafe(run)
        if not done.wait(timeout):
            raise TimeoutError("the back-end loop did not run the call")
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def queue_info(self, q: int):
        return self.call(lambda: self.transport.device.queue_info(q))

    def open_gate(self) -> None:
        self.loop.call_soon_threadsafe(self.ops.gate.set)

    def connections(self) -> int:
        return self.call(lambda: self.transport.connections)

    def wait_disconnected(self, count: int, timeout: float = 5.0) -> None:
        """Wait until ``count`` connections have ended (FUSE session closed too)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.call(lambda: self.transport.finished >= count):
                return
            time.sleep(0.005)
        raise TimeoutError(f"connection {count} did not end within {timeout}s")

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self.errors

    def stop(self) -> None:
        if self._thread.is_alive():
            if self._stop is not None:
                self.loop.call_soon_threadsafe(self._stop.set)
            self.loop.call_soon_threadsafe(self.ops.gate.set)
            self._thread.join(10)
        self.ops.close()
        if self._thread.is_alive():
            raise RuntimeError("the back-end did not stop within 10s")
        if self.errors:
            raise AssertionError(f"the back-end raised: {self.errors[0]!r}") from self.errors[0]


@pytest.fixture
def backend(tmp_path):
    """A :class:`Backend` on ``tmp_path/vfs.sock``; stopping it fails the test if it crashed."""
    be = Backend(str(tmp_path / "vfs.sock"))
    try:
        yield be
    finally:
        be.stop()


def connect(be: Backend, **kw) -> Frontend:
    """A harness front-end on ``be``'s socket; ``kw`` go to ``Frontend.connect`` (16 MiB of guest memory)."""
    kw.setdefault("mem_size", 16 << 20)
    return Frontend.connect(be.sock_path, **kw)


def started(be: Backend, **kw) -> tuple[Frontend, FuseSession]:
    """:func:`connect`, negotiate, start the queues (``start=`` their kwargs) and FUSE INIT."""
    start = kw.pop("start", {})
    fe = connect(be, **kw)
    fe.negotiate()
    fe.start_queues(**start)
    fs = FuseSession(fe)
    fs.init()
    return fe, fs


def wait_until(cond: Callable[[], Any], timeout: float = 5.0) -> None:
    """Poll ``cond`` every 2 ms; TimeoutError if it is still false after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.002)
