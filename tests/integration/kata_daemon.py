"""The Kata ``virtio-fs-nydus`` layout served by our stack, for the real-guest test.

    python -m tests.integration.kata_daemon --sock S --shared DIR --bootstrap BOOT --blob-dir BLOBS

One writable ``Vfs`` holding a ``PassthroughFs`` of ``DIR`` at ``/containers``
and the RAFS image at ``/rafs/c1/lowerdir`` (nydus-surface.md §8.3), served
over vhost-user by the real transport until SIGTERM.  It is what ``nydusd
virtiofs --sock S --apisock A`` plus the two ``POST /api/v1/mount`` calls of
Kata build; it uses the same Python API the daemon's mount code calls
(``PassthroughFs.from_path``, ``RafsFs.from_paths``, ``Vfs.mount``).
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
    ap.add_argument("--shared", required=True)
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--blob-dir", required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    vfs = Vfs(writable=True)
    shared = PassthroughFs.from_path(args.shared, writable=True)
    rafs = RafsFs.from_paths(args.bootstrap, args.blob_dir)
    vfs.mount("/containers", shared)
    vfs.mount("/rafs/c1/lowerdir", rafs)
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
        shared.close()
        rafs.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
