#!/usr/bin/env python3
"""Benchmark of the FUSE protocol core: request bytes in, reply out, one core, no kernel.

Measures ``FuseServer.handle`` for the requests that dominate a container
start: GETATTR, LOOKUP, READDIRPLUS of a directory and 128 KiB READs served
from a warm cache (and one that suspends once, to show the slow path).  Each
workload runs both as ``/dev/fuse`` calls it (no capacity) and as virtio-fs
calls it (``out_capacity`` = the writable bytes the guest posted).

By default the filesystem is an in-memory ``Operations`` that behaves like
RAFS with warm metadata (dict lookups, cached ``Attr``/``Entry`` objects).
``--image BOOTSTRAP --blob-dir DIR`` uses the real RAFS layer instead
(``nydus_vfs.fs.RafsFs``) when it is available.

    python scripts/bench/fuse_core.py                 # ops/s per workload
    python scripts/bench/fuse_core.py --profile getattr
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import errno
import inspect
import pstats
import stat
import sys
import time

from nydus_vfs.errors import FsError
from nydus_vfs.fuse import Attr, DirEntry, Entry, FuseServer, Operations, codec
from nydus_vfs.fuse.abi import FOPEN_KEEP_CACHE
from nydus_vfs.testing import FuseRequestFactory

READ_SIZE = 128 * 1024


class MemFs(Operations):
    """RAFS-like in-memory tree: one directory of ``nfiles`` files of ``file_size`` bytes."""

    attr_timeout = 3600.0
    entry_timeout = 3600.0

    def __init__(self, nfiles: int = 1000, file_size: int = 1 << 20) -> None:
        self.data = memoryview(bytes(range(256)) * (file_size // 256))
        self.attrs: dict[int, Attr] = {1: Attr(1, stat.S_IFDIR | 0o755, size=4096, nlink=2)}
        self.entries: dict[tuple[int, bytes], Entry] = {}
        self.listing: list[DirEntry] = [DirEntry(b".", 1, 4, 1), DirEntry(b"..", 1, 4, 2)]
        for i in range(nfiles):
            nodeid = i + 2
            name = b"file-%05d.so" % i
            attr = Attr(nodeid, stat.S_IFREG | 0o644, size=file_size, blocks=file_size // 512, mtime=1700000000)
            self.attrs[nodeid] = attr
            entry = Entry(nodeid, attr, 0, self.entry_timeout, self.attr_timeout)
            self.entries[(1, name)] = entry
            self.listing.append(DirEntry(name, nodeid, 8, len(self.listing) + 1, entry))
        self.names = [name for (_, name) in self.entries]

    def lookup(self, parent, name, ctx):
        entry = self.entries.get((parent, name))
        if entry is None:
            raise FsError(errno.ENOENT)
        return entry

    def getattr(self, nodeid, fh, ctx):
        try:
            return self.attrs[nodeid]
        except KeyError:
            raise FsError(errno.ENOENT) from None

    def open(self, nodeid, flags, ctx):
        return (nodeid, FOPEN_KEEP_CACHE)

    def opendir(self, nodeid, flags, ctx):
        return (0, 0)

    async def read(self, nodeid, fh, offset, size, ctx):
        return self.data[offset:offset + size]

    def readdir(self, nodeid, fh, offset, ctx):
        listing = self.listing
        for i in range(offset, len(listing)):
            yield listing[i]

    readdirplus = readdir


class SuspendingFs(MemFs):
    """Every READ waits once on the loop, as a cache miss would."""

    async def read(self, nodeid, fh, offset, size, ctx):
        await asyncio.sleep(0)
        return self.data[offset:offset + size]


def _rate(fn, seconds: float) -> tuple[float, int]:
    """Calls of ``fn(k)`` (k = loop count) per second over about ``seconds``."""
    n = 1000
    while True:
        t0 = time.perf_counter()
        fn(n)
        dt = time.perf_counter() - t0
        if dt >= seconds:
            return n / dt, n
        n = max(n * 2, int(n * seconds / max(dt, 1e-6) * 1.1))


def _init(server: FuseServer, factory: FuseRequestFactory) -> None:
    reply = server.handle(factory.init())
    header = codec.OutHeader.from_bytes(reply)
    if header.error:
        sys.exit(f"INIT failed: {header.error}")


def _workloads(server, factory, *, dir_node, file_node, names, cap_mode):
    """name -> (callable(n), reply data bytes per op, directory entries per op)."""
    handle = server.handle
    getattr_req = factory.getattr(file_node)
    lookup_reqs = [factory.lookup(dir_node, nm) for nm in names[:256]]
    rdp_req = factory.readdirplus(dir_node, 0, 0, 4096)
    read_req = factory.read(file_node, file_node, 0, READ_SIZE)
    cap_small = 16 + 128 if cap_mode else None

    def getattr_(n):
        cap = 16 + 104 if cap_mode else None
        for _ in range(n):
            handle(getattr_req, cap)

    def lookup(n):
        reqs = lookup_reqs
        k = len(reqs)
        for i in range(n):
            handle(reqs[i % k], cap_small)

    def readdirplus(n):
        cap = 16 + 4096 if cap_mode else None
        for _ in range(n):
            handle(rdp_req, cap)

    def read(n):
        cap = 16 + READ_SIZE if cap_mode else None
        for _ in range(n):
            reply = handle(read_req, cap)
            if not isinstance(reply, list):
                raise SystemExit(f"READ did not complete synchronously: {reply!r}")

    # Warm the cache once; the READ workload then measures the synchronous path.
    warm = handle(read_req)
    if inspect.isawaitable(warm):
        warm = asyncio.new_event_loop().run_until_complete(warm)
    read_bytes = codec.OutHeader.from_bytes(warm[0] if isinstance(warm, list) else warm).len - 16
    sample = codec.OutHeader.from_bytes(handle(rdp_req))
    entries = sum(1 for _ in codec.iter_direntplus(handle(rdp_req)[16:sample.len]))
    return {
        "getattr": (getattr_, 0, 0),
        "lookup": (lookup, 0, 0),
        "readdirplus": (readdirplus, 0, entries),
        "read128k": (read, read_bytes, 0),
    }


def _suspending_read_rate(seconds: float, use_uvloop: bool) -> float:
    fs = SuspendingFs(nfiles=4)
    server = FuseServer(fs)
    factory = FuseRequestFactory()
    _init(server, factory)
    req = factory.read(2, 2, 0, READ_SIZE)

    async def run(n):
        for _ in range(n):
            reply = server.handle(req)
            if inspect.isawaitable(reply):
                reply = await reply
            assert isinstance(reply, list)

    if use_uvloop:
        import uvloop
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    try:
        rate, _ = _rate(lambda n: loop.run_until_complete(run(n)), seconds)
    finally:
        loop.close()
    return rate


def _real_fs(image: str, blob_dir: str):
    try:
        from nydus_vfs.fs import RafsFs
    except ImportError as exc:
        print(f"nydus_vfs.fs is not available ({exc}); using the in-memory filesystem")
        return None
    fs = RafsFs.from_paths(image, blob_dir)
    if isinstance(fs, Operations):
        return fs
    from nydus_vfs.fs import Vfs  # RafsFs is one instance; the VFS is the Operations

    vfs = Vfs()
    vfs.mount("/", fs)
    return vfs


def _discover(server: FuseServer, factory: FuseRequestFactory):
    """Walk the tree through the server: the biggest directory, the biggest file, names to look up."""
    best_dir, best_dir_n, best_file, best_size, names = 1, -1, None, -1, []
    todo = [1]
    seen = 0
    while todo and seen < 2000:
        node = todo.pop()
        reply = server.handle(factory.opendir(node))
        err = codec.OutHeader.from_bytes(reply).error
        if err == -errno.ENOSYS:
            fh = 0  # the filesystem skips OPENDIR (as Linux then does): no handle
        elif err:
            continue
        else:
            fh = codec.OpenOut.from_bytes(reply, 16).fh
        offset, count, children = 0, 0, []
        while True:
            reply = server.handle(factory.readdirplus(node, fh, offset, 4096))
            if inspect.isawaitable(reply):
                reply = asyncio.run(reply)
            hdr = codec.OutHeader.from_bytes(reply)
            if hdr.error or hdr.len == 16:
                break
            for d in codec.iter_direntplus(reply[16:hdr.len]):
                offset = d.dirent.off
                count += 1
                if d.dirent.name in (b".", b".."):
                    continue
                children.append(d.dirent.name)
                attr = d.entry_out.attr
                if stat.S_ISDIR(attr.mode):
                    todo.append(d.entry_out.nodeid)
                elif stat.S_ISREG(attr.mode) and attr.size > best_size:
                    best_file, best_size = d.entry_out.nodeid, attr.size
        server.handle(factory.releasedir(node, fh))
        seen += count
        if count > best_dir_n:
            best_dir, best_dir_n, names = node, count, children
    return best_dir, best_file, names, best_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=1.0, help="time per workload (default 1 s)")
    parser.add_argument("--image", help="RAFS bootstrap to benchmark instead of the in-memory tree")
    parser.add_argument("--blob-dir", help="blob directory for --image")
    parser.add_argument("--profile", metavar="WORKLOAD",
                        help="run WORKLOAD (getattr, lookup, readdirplus, read128k) under cProfile")
    parser.add_argument("--no-suspend", action="store_true", help="skip the suspending-READ workload")
    args = parser.parse_args(argv)

    ops = None
    if args.image:
        if not args.blob_dir:
            parser.error("--image needs --blob-dir")
        ops = _real_fs(args.image, args.blob_dir)
    label = f"RAFS {args.image}" if ops is not None else "in-memory RAFS-like tree (1000 files)"
    if ops is None:
        ops = MemFs()
    server = FuseServer(ops)
    factory = FuseRequestFactory()
    _init(server, factory)
    if isinstance(ops, MemFs):
        dir_node, file_node, names = 1, 2, ops.names
    else:
        dir_node, file_node, names, size = _discover(server, factory)
        if file_node is None or not names:
            sys.exit("the image has no regular file or no directory entries to benchmark")
        print(f"image: directory {dir_node} ({len(names)} entries), file {file_node} ({size} bytes)")
        server.handle(factory.open(file_node))

    print(f"FuseServer.handle on {label}; Python {sys.version.split()[0]}")
    if args.profile:
        work = _workloads(server, factory, dir_node=dir_node, file_node=file_node, names=names, cap_mode=True)
        fn = work[args.profile][0]
        prof = cProfile.Profile()
        prof.enable()
        fn(200_000 if args.profile in ("getattr", "lookup") else 20_000)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(12)
        return 0

    for cap_mode, title in ((False, "/dev/fuse (no capacity)"), (True, "virtio-fs (out_capacity)")):
        print(f"-- {title}")
        work = _workloads(server, factory, dir_node=dir_node, file_node=file_node, names=names, cap_mode=cap_mode)
        for name, (fn, nbytes, entries) in work.items():
            rate, _ = _rate(fn, args.seconds)
            extra = f"  ({rate * nbytes / (1 << 30):6.2f} GiB/s of reply data)" if nbytes else ""
            if entries:
                extra = f"  ({entries} entries per 4 KiB reply, {rate * entries:,.0f} entries/s)"
            print(f"{name:>12}: {rate:>10,.0f} ops/s{extra}")
    if not args.no_suspend:
        for use_uvloop in (False, True):
            rate = _suspending_read_rate(args.seconds, use_uvloop)
            loop_name = "uvloop" if use_uvloop else "asyncio"
            print(f"read128k suspending once ({loop_name}): {rate:>10,.0f} ops/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
