"""RafsFs data path details: the file's chunk list rides along so a miss can amplify."""

from __future__ import annotations

import asyncio
import os
import random

from nydus_vfs.builder import BuildOptions, build
from nydus_vfs.fs import RafsFs, load_bootstrap
from nydus_vfs.storage import BlobLayer, CacheSpec
from nydus_vfs.testing.backend import InMemoryBackend

CHUNK = 0x10000


def test_amplify_io_reads_the_rest_of_the_file_in_one_request(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    data = random.Random(3).randbytes(6 * CHUNK)
    (src / "f").write_bytes(data)
    r = build(str(src), BuildOptions(fs_version=6, chunk_size=CHUNK, bootstrap=str(tmp_path / "boot"),
                                     blob_dir=str(tmp_path)))
    boot = load_bootstrap(str(tmp_path / "boot"))
    backend = InMemoryBackend({bid: (tmp_path / bid).read_bytes() for bid in r.blobs})
    device = BlobLayer().open_device(boot.blobs, backend, CacheSpec("blobcache", str(tmp_path / "c")),
                                     amplify_io=4 * CHUNK)
    fs = RafsFs(boot, device)
    ino = boot.lookup(boot.root_ino, b"f")

    async def read_all():
        out = bytearray()
        for off in range(0, len(data), 32 << 10):
            for p in await fs.read(ino, 0, off, 32 << 10):
                out += p if isinstance(p, bytes) else os.pread(p.fd, p.length, p.offset)
        return bytes(out)

    assert asyncio.run(read_all()) == data
    # 6 chunks, at most 4 per request (amplify_io), each miss taking its followers along.
    assert [size for _, _, size in backend.reads] == [4 * CHUNK, 2 * CHUNK]
    fs.close()
