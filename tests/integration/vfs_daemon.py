"""Our VFS with passthrough and RAFS instances on a vhost-user socket, for the real-guest tests.

    python -m tests.integration.vfs_daemon --sock S [--passthrough PATH DIR]... [--rafs PATH BOOT BLOBS]...

One writable ``Vfs`` (``FuseServer(readonly=False)``) with each
``PassthroughFs`` of ``DIR`` and each RAFS image mounted at its pseudo ``PATH``,
served by the real virtio-fs transport until SIGTERM.  With
``--passthrough /containers DIR --rafs /rafs/c1/lowerdir BOOT BLOBS`` it is the
Kata virtio-fs-nydus layout (nydus-surface.md §8.3) that ``nydusd virtiofs
--sock S --apisock A`` builds from two ``POST /api/v1/mount`` calls; it uses the
Python API the daemon's mount code calls (``PassthroughFs.from_path``,
``RafsFs.from_paths``, ``Vfs.mount``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import uvloop

from nydus_vfs.fs import PassthroughFs, RafsFs, Vfs
from nydus_vfs.fuse.server import FuseServer
from nydus_vfs.transport.virtiofs import VirtioFsTransport


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sock", required=True)
    ap.add_argument("--passthrough", nargs=2, action="append", default=[], metavar=("PATH", "DIR"))
    ap.add_argument("--rafs", nargs=3, action="append", default=[], metavar=("PATH", "BOOT", "BLOBS"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    vfs = Vfs(writable=True)
    instances = []
    for path, directory in args.passthrough:
        fs = PassthroughFs.from_path(directory, writable=True)
        instances.append(fs)
        vfs.mount(path, fs)
    for path, boot, blobs in args.rafs:
        fs = RafsFs.from_paths(boot, blobs)
        instances.append(fs)
        vfs.mount(path, fs)
    server = FuseServer(vfs, readonly=False)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        await VirtioFsTransport(server).serve(args.sock, stop_event=stop)

    try:
        uvloop.run(run())
    finally:
        for fs in instances:
            fs.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
