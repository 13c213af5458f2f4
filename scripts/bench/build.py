#!/usr/bin/env python3
"""Builder benchmark: ``nydus-image create`` throughput and how well it uses the cores.

Part 1 checks the premise of the parallel chunker: that the digest and
compression libraries release the GIL on chunk-sized buffers.  Each primitive
runs on N chunks with 1 thread and with ``--workers`` threads; a speedup close
to the thread count means the GIL is released.

Part 2 builds a synthetic tree (compressible text plus random data, some
duplicates) with 1 worker and with ``--workers`` workers and reports MB/s of
source data, checking that both builds are byte-identical.

    python scripts/bench/build.py                    # defaults: 64 MiB tree, 2 workers
    python scripts/bench/build.py --size-mb 256 --workers 2 --compressor lz4_block
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from nydus_vfs.builder import BuildOptions, build
from nydus_vfs.format.types import Compressor, Digester
from nydus_vfs.utils import compress, digest_bytes


def _chunk(seed: int, size: int) -> bytes:
    text = b"".join(hashlib.sha256(b"%d-%d" % (seed, i)).hexdigest()[:16].encode() * 4
                    for i in range(size // 64 + 1))
    return text[:size // 2] + os.urandom(size - size // 2)


def primitives(workers: int, chunk_size: int, count: int) -> None:
    chunks = [_chunk(i, chunk_size) for i in range(count)]
    cases = {
        "blake3": lambda d: digest_bytes(Digester.BLAKE3, d),
        "sha256": lambda d: digest_bytes(Digester.SHA256, d),
        "zstd": lambda d: compress(d, Compressor.ZSTD),
        "lz4_block": lambda d: compress(d, Compressor.LZ4_BLOCK),
    }
    print(f"primitives on {count} x {chunk_size // 1024} KiB chunks")
    print(f"  {'op':<10} {'1 thread':>12} {f'{workers} threads':>12} {'speedup':>8}")
    for name, fn in cases.items():
        times = []
        for n in (1, workers):
            with ThreadPoolExecutor(n) as ex:
                t = time.perf_counter()
                list(ex.map(fn, chunks))
                times.append(time.perf_counter() - t)
        mbs = [count * chunk_size / t / 1e6 for t in times]
        print(f"  {name:<10} {mbs[0]:>9.0f} MB/s {mbs[1]:>9.0f} MB/s {times[0] / times[1]:>7.2f}x")


def make_tree(root: str, size_mb: int) -> int:
    total = 0
    i = 0
    while total < size_mb << 20:
        d = os.path.join(root, f"d{i % 16:02d}")
        os.makedirs(d, exist_ok=True)
        size = [4096, 65536, 1 << 20, 3 << 20][i % 4]
        data = _chunk(i % 97, size)   # some content repeats: dedup has work too
        with open(os.path.join(d, f"f{i:05d}"), "wb") as f:
            f.write(data)
        total += size
        i += 1
    return total


def builds(workers: int, size_mb: int, compressor: str, version: int) -> None:
    tmp = tempfile.mkdtemp(prefix="nydus-bench-")
    try:
        src = os.path.join(tmp, "src")
        total = make_tree(src, size_mb)
        results = []
        for n in (1, workers):
            out = os.path.join(tmp, f"out{n}")
            os.mkdir(out)
            t = time.perf_counter()
            r = build(src, BuildOptions(fs_version=version, compressor=Compressor.from_cli(compressor),
                                        bootstrap=os.path.join(out, "boot"), blob_dir=out, workers=n))
            elapsed = time.perf_counter() - t
            with open(os.path.join(out, "boot"), "rb") as f:
                boot = hashlib.sha256(f.read()).hexdigest()
            results.append((elapsed, boot, r.blob_id))
            print(f"build v{version} {compressor:<9} workers={n}: {total / elapsed / 1e6:7.1f} MB/s "
                  f"({elapsed:.2f} s, {r.chunks_stored} chunks stored, {r.chunks_deduplicated} deduplicated)")
        print(f"speedup with {workers} workers: {results[0][0] / results[1][0]:.2f}x; "
              f"outputs identical: {results[0][1:] == results[1][1:]}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--size-mb", type=int, default=64)
    p.add_argument("--compressor", default="zstd", choices=("none", "lz4_block", "zstd"))
    p.add_argument("--fs-version", type=int, default=6, choices=(5, 6))
    p.add_argument("--skip-primitives", action="store_true")
    args = p.parse_args()
    if not args.skip_primitives:
        primitives(args.workers, 1 << 20, 32)
    builds(args.workers, args.size_mb, args.compressor, args.fs_version)


if __name__ == "__main__":
    main()
