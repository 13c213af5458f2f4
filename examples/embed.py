"""Embedding nydusd in another asyncio program: no subprocess, one daemon, FUSE and virtio-fs at once.

    sudo .venv/bin/python examples/embed.py BOOTSTRAP BLOB_DIR MOUNTPOINT [VHOST_USER_SOCKET]

Mounts the image at pseudo path /pseudo_1, serves the pseudo tree over /dev/fuse
on MOUNTPOINT (and to virtio-fs guests on the socket, if given), the HTTP API on
MOUNTPOINT.api.sock, prints what the mount shows, then stops cleanly.
"""

import asyncio
import json
import os
import sys

from nydus_vfs.service import NydusDaemon


async def main(bootstrap: str, blob_dir: str, mountpoint: str, sock: str | None) -> None:
    config = json.dumps({"device": {"backend": {"type": "localfs", "config": {"dir": blob_dir}},
                                    "cache": {"type": "blobcache", "config": {"work_dir": blob_dir}}},
                         "mode": "direct"})
    async with NydusDaemon() as daemon:                  # INIT
        await daemon.mount("/pseudo_1", bootstrap, config)
        await daemon.serve_api(mountpoint + ".api.sock")
        await daemon.serve_fuse(mountpoint)              # -> RUNNING
        if sock:
            await daemon.serve_virtiofs(sock)            # same mounts, same blob cache
        print("state:", daemon.info()["state"])
        entries = await asyncio.to_thread(os.listdir, os.path.join(mountpoint, "pseudo_1"))
        print("pseudo_1:", sorted(entries))
        print("reads so far:", daemon.metrics.fs("/pseudo_1")["fop_hits"][4])
    print("state:", daemon.state.value)                  # leaving the block unmounted everything


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None))
