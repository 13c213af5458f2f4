#!/usr/bin/env python3
"""Cold read-all of an image from an HTTP registry endpoint: on demand, with amplify_io, with prefetch.

    .venv/bin/python scripts/bench/remote_read.py [--tree python|debootstrap|auto|DIR] [--runs N]

What it measures (storage path only, no FUSE: the blob device and the
prefetch engine against a real HTTP server on loopback):

* the physical limit: ``curl`` downloading the image's blob from the same server;
* a cold read of every file in walk order (128 KiB reads, as the kernel sends
  them) through a ``registry`` backend and a blob cache, with ``amplify_io``
  0 (one request per chunk) and 1 MiB (a miss takes the following chunks of
  the blob along);
* ``fs_prefetch`` with ``prefetch_all`` (8 workers, 1 MiB merging) run to
  completion, then the same read-all (served from the cache).

The server is ``nydus-backend-proxy`` (a separate process, so it does not share
our GIL).  Each mode starts from an empty cache directory.  Reported per mode:
wall seconds (median of ``--runs``), backend requests, MiB fetched, and the
ratio curl / mode (1.00x = as fast as downloading the blob).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (BenchError, PROJECT_ROOT, free_port, median, prepare_tree, rafs_v6_image,  # noqa: E402
                     ratio, render_table)

sys.path.insert(0, str(PROJECT_ROOT / "src"))
from nydus_vfs.config import parse_daemon_config  # noqa: E402
from nydus_vfs.fs import RafsFs, load_bootstrap, prefetch_config, prefetch_rafs  # noqa: E402
from nydus_vfs.storage import BlobLayer, CacheSpec  # noqa: E402
from nydus_vfs.storage.backend.factory import create_backend  # noqa: E402

READ = 128 << 10


def _config(port: int, work: str, *, amplify: int, prefetch: bool) -> str:
    doc = {"device": {"backend": {"type": "registry", "config": {
        "scheme": "http", "host": f"127.0.0.1:{port}", "repo": "image", "timeout": 30}},
        "cache": {"type": "blobcache", "config": {"work_dir": work}}},
        "mode": "direct", "amplify_io": amplify}
    if prefetch:
        doc["fs_prefetch"] = {"enable": True, "threads_count": 8, "merging_size": 1 << 20}
    return json.dumps(doc)


async def _read_all(fs: RafsFs) -> int:
    total = 0
    for _path, ino, info in fs.bootstrap.walk():
        if not info.is_reg:
            continue
        for off in range(0, info.size, READ):
            for piece in await fs.read(ino, 0, off, READ):
                total += piece.length if hasattr(piece, "length") else len(piece)
    return total


async def _mode(image: Path, port: int, *, amplify: int, prefetch: bool) -> tuple[float, int, int, int]:
    work = tempfile.mkdtemp(prefix="remote-read-")
    try:
        cfg = parse_daemon_config(_config(port, work, amplify=amplify, prefetch=prefetch))
        backend = create_backend(cfg.backend)
        boot = load_bootstrap(str(image / "image.boot"))
        device = BlobLayer().open_device(boot.blobs, backend, CacheSpec("blobcache", work),
                                         amplify_io=cfg.rafs.batch_size)
        fs = RafsFs(boot, device)
        started = time.perf_counter()
        if prefetch:
            await prefetch_rafs(fs, None, prefetch_config(cfg))
        nbytes = await _read_all(fs)
        elapsed = time.perf_counter() - started
        m = backend.metrics
        result = (elapsed, m.read_count, m.read_amount_total, nbytes)
        fs.close()
        closer = getattr(backend, "aclose", None)
        if closer is not None:
            await closer()
        else:
            backend.close()
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", default="python")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    tree, stats, what = prepare_tree(args.tree)
    image, blob_id = rafs_v6_image(tree)
    blob_size = (image / blob_id).stat().st_size
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "nydus_vfs.cli.nydus_backend_proxy", "--blobsdir", str(image),
                               "--port", str(port)], cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src")})
    try:
        url = f"http://127.0.0.1:{port}/{blob_id}"
        for _ in range(100):
            if subprocess.run(["curl", "-sf", "-o", "/dev/null", "-I", url]).returncode == 0:
                break
            time.sleep(0.1)
        else:
            raise BenchError("nydus-backend-proxy did not come up")
        curl = []
        for _ in range(args.runs):
            t = time.perf_counter()
            subprocess.run(["curl", "-sf", "-o", "/dev/null", url], check=True)
            curl.append(time.perf_counter() - t)
        t_curl = median(curl)
        rows = [["curl (whole blob)", f"{t_curl:.2f}", 1, f"{blob_size / 2**20:.1f}", "1.00x"]]
        for label, amplify, prefetch in (("on demand, amplify_io=0", 0, False),
                                         ("on demand, amplify_io=1MiB", 1 << 20, False),
                                         ("prefetch_all, then read", 1 << 20, True)):
            runs = [asyncio.run(_mode(image, port, amplify=amplify, prefetch=prefetch)) for _ in range(args.runs)]
            t = median([r[0] for r in runs])
            _, reqs, amount, _ = runs[-1]
            rows.append([label, f"{t:.2f}", reqs, f"{amount / 2**20:.1f}", ratio(t_curl, t)])
        print(f"tree: {what}; {stats.files} files, {stats.bytes / 2**20:.0f} MiB; blob {blob_size / 2**20:.1f} MiB "
              f"(v6, zstd, 1 MiB chunks)")
        print(render_table(["mode", "seconds", "requests", "MiB fetched", "curl/mode"], rows, markdown=True))
    finally:
        server.terminate()
        server.wait(timeout=10)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"remote_read: {exc}", file=sys.stderr)
        sys.exit(2)
