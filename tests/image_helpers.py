"""Synthetic images and configs for daemon tests (no ../shared needed): built in-process."""

from __future__ import annotations

import asyncio
import json
import pathlib
import threading

from nydus_vfs.builder import BuildOptions, build
from nydus_vfs.service import NydusDaemon

__all__ = ["make_image", "localfs_config_text", "DaemonThread"]


def make_image(tmp: pathlib.Path, name: str, files: dict[str, bytes], *, fs_version: int = 6,
               blob_dir: pathlib.Path | None = None) -> tuple[pathlib.Path, pathlib.Path]:
    """Build ``files`` (relative path -> content) into ``tmp/name.boot``; returns (bootstrap, blob dir)."""
    src = tmp / f"{name}-src"
    for rel, data in files.items():
        p = src / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    blob_dir = blob_dir or tmp / "blobs"
    blob_dir.mkdir(exist_ok=True)
    boot = tmp / f"{name}.boot"
    build(str(src), BuildOptions(fs_version=fs_version, bootstrap=str(boot), blob_dir=str(blob_dir),
                                 chunk_size=0x10000))
    return boot, blob_dir


def localfs_config_text(blob_dir: pathlib.Path, cache_dir: pathlib.Path, **extra) -> str:
    """A v1 config string as drivers send it: localfs blobs, a blobcache, direct mode."""
    doc = {"device": {"backend": {"type": "localfs", "config": {"dir": str(blob_dir)}},
                      "cache": {"type": "blobcache", "config": {"work_dir": str(cache_dir)}}},
           "mode": "direct", "digest_validate": True}
    doc.update(extra)
    return json.dumps(doc)


class DaemonThread:
    """A NydusDaemon serving its API on ``sock`` from a loop in a thread."""

    def __init__(self, sock: str) -> None:
        self.sock = sock
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.daemon: NydusDaemon | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._main())
        except BaseException as exc:  # reported by start()
            self.error = exc
            self.ready.set()

    async def _main(self) -> None:
        async with NydusDaemon() as d:
            self.daemon = d
            await d.serve_api(self.sock)
            self.ready.set()
            await d.wait()

    def start(self) -> "DaemonThread":
        self.thread.start()
        self.ready.wait(10)
        if self.error:
            raise self.error
        return self

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def stop(self) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.daemon.request_stop)
            self.thread.join(10)
