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
    assert [size for _, off, size in backend.reads if off != boot.blobs[0].ci_offset] == [4 * CHUNK, 2 * CHUNK]
    fs.close()


def test_amplify_io_follows_the_blob_across_small_files_once_the_order_is_known(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rnd = random.Random(5)
    contents = {f"f{i:02d}": rnd.randbytes(5000 + i) for i in range(30)}
    for name, data in contents.items():
        (src / name).write_bytes(data)
    r = build(str(src), BuildOptions(fs_version=6, chunk_size=CHUNK, bootstrap=str(tmp_path / "boot"),
                                     blob_dir=str(tmp_path)))
    boot = load_bootstrap(str(tmp_path / "boot"))
    backend = InMemoryBackend({bid: (tmp_path / bid).read_bytes() for bid in r.blobs})
    device = BlobLayer().open_device(boot.blobs, backend, CacheSpec("blobcache", str(tmp_path / "c")),
                                     amplify_io=1 << 20)
    fs = RafsFs(boot, device)

    async def main():
        first = boot.lookup(boot.root_ino, b"f00")
        assert bytes(await _bytes(fs.read(first, 0, 0, 1 << 20))) == contents["f00"]
        await fs._order_task            # the blob-order index, built in the background
        assert device.blob_order
        for name, data in contents.items():
            ino = boot.lookup(boot.root_ino, name.encode())
            assert await _bytes(fs.read(ino, 0, 0, 1 << 20)) == data

    asyncio.run(main())
    # The first file alone (order not known yet), then everything else in one request.
    assert len([r for r in backend.reads if r[1] != boot.blobs[0].ci_offset]) == 2
    fs.close()


def test_close_cancels_the_blob_order_build(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(600):
        (src / f"f{i}").write_bytes(b"x" * (i + 1))
    r = build(str(src), BuildOptions(fs_version=5, chunk_size=CHUNK, bootstrap=str(tmp_path / "boot"),
                                     blob_dir=str(tmp_path)))
    boot = load_bootstrap(str(tmp_path / "boot"))
    backend = InMemoryBackend({bid: (tmp_path / bid).read_bytes() for bid in r.blobs})
    device = BlobLayer().open_device(boot.blobs, backend, CacheSpec(""), amplify_io=1 << 20)
    fs = RafsFs(boot, device)

    async def main():
        await _bytes(fs.read(boot.lookup(boot.root_ino, b"f0"), 0, 0, 10))
        task = fs._order_task
        await asyncio.sleep(0)
        fs.close()
        await asyncio.gather(task, return_exceptions=True)
        assert task.cancelled()
        assert device.blob_order is None

    asyncio.run(main())


async def _bytes(coro) -> bytes:
    out = bytearray()
    for p in await coro:
        out += p if isinstance(p, bytes) else os.pread(p.fd, p.length, p.offset)
    return bytes(out)
