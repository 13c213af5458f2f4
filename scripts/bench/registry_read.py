#!/usr/bin/env python3
"""Cold read-all of an image through ``nydusd fuse`` from docker-registry, against curl.

    .venv/bin/python scripts/bench/registry_read.py [--tree python|debootstrap|auto|DIR] [--runs N]

What it measures (root, /dev/fuse, Debian's ``docker-registry`` on loopback):

* the physical limit: ``curl`` downloading the image's blob from the registry
  (``GET /v2/<repo>/blobs/sha256:<id>``), to /dev/null;
* ``nydusd fuse`` mounted with a v1 ``registry`` config and an empty blob cache,
  then every regular file read once in walk order by ``cat`` (128 KiB reads)
  in one process; with ``amplify_io`` 0 and 1 MiB, and with 1 MiB plus
  ``fs_prefetch`` ``prefetch_all`` (8 workers, 1 MiB merging) racing the reader.
  Only the read-all is timed (the clock starts once the mount is up).

Two reference rows say where the time goes: the same read-all of the source
tree on the local disk with the page cache dropped (the cost of reading that
many files at all, no FUSE, no network), and nydusd restarted on a blob cache
a first read-all filled (FUSE and the daemon, no network).

Reported per mode: wall seconds (median of ``--runs``), blob GETs the registry
logged, and the ratio curl / mode (1.00x = as fast as downloading the blob).
The blob is pushed with a monolithic upload (distribution spec).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (BenchError, PROJECT_ROOT, drop_caches, free_port, median, prepare_tree,  # noqa: E402
                     rafs_v6_image, ratio, render_table, stop_process, unmount)

sys.path.insert(0, str(PROJECT_ROOT / "src"))

REPO = "bench/image"


def _wait_port(port: int, proc: subprocess.Popen, what: str) -> None:
    for _ in range(300):
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"{what} did not listen on port {port}")


def _push(base: str, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    req = urllib.request.Request(f"{base}/v2/{REPO}/blobs/uploads/", method="POST", data=b"")
    with urllib.request.urlopen(req) as resp:
        location = resp.headers["Location"]
    if location.startswith("/"):
        location = base + location
    sep = "&" if "?" in location else "?"
    req = urllib.request.Request(f"{location}{sep}digest=sha256:{digest}", method="PUT", data=data,
                                 headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(req) as resp:
        if resp.status != 201:
            raise BenchError(f"blob upload answered {resp.status}")
    return digest


def _blob_gets(log: Path) -> int:
    return sum(1 for line in log.read_text(errors="replace").splitlines()
               if "response completed" in line and "http.request.method=GET" in line
               and "/blobs/sha256:" in line and "useragent=nydus-vfs" in line)


def _read_all_cmd(mnt: Path) -> list[str]:
    return ["sh", "-c", f"cd {mnt} && find . -type f -print0 | xargs -0 cat > /dev/null"]


def _plain(tree: Path) -> float:
    """The same read-all of the source tree on the local disk, page cache dropped: no FUSE, no network."""
    drop_caches()
    t = time.perf_counter()
    r = subprocess.run(_read_all_cmd(tree), capture_output=True)
    if r.returncode != 0:
        raise BenchError(f"read-all of {tree} failed: {r.stderr.decode(errors='replace')[-400:]}")
    return time.perf_counter() - t


def _mode(image: Path, port: int, log: Path, amplify: int, prefetch: bool = False,
          warm: bool = False) -> tuple[float, int]:
    """One nydusd mount's timed read-all: (seconds, blob GETs).

    ``warm``: a first, untimed read-all fills the blob cache; nydusd is then
    restarted on the same cache and the page cache dropped before the timed
    one (what FUSE and decompression cost without the network).
    """
    work = Path(tempfile.mkdtemp(prefix="registry-read-"))
    try:
        if warm:
            _mount_read(image, port, log, amplify, prefetch, work)
            drop_caches()
        return _mount_read(image, port, log, amplify, prefetch, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _mount_read(image: Path, port: int, log: Path, amplify: int, prefetch: bool, work: Path) -> tuple[float, int]:
    mnt = work / "mnt"
    mnt.mkdir(exist_ok=True)
    cfg = work / "config.json"
    cfg.write_text(json.dumps({
        "device": {"backend": {"type": "registry", "config": {"scheme": "http", "host": f"127.0.0.1:{port}",
                                                              "repo": REPO, "timeout": 30}},
                   "cache": {"type": "blobcache", "config": {"work_dir": str(work / "cache")}}},
        "mode": "direct", "digest_validate": False, "amplify_io": amplify,
        **({"fs_prefetch": {"enable": True, "threads_count": 8, "merging_size": 1 << 20, "prefetch_all": True}}
           if prefetch else {})}))
    proc = subprocess.Popen([sys.executable, "-m", "nydus_vfs.cli.nydusd", "fuse", "--mountpoint", str(mnt),
                             "--bootstrap", str(image / "image.boot"), "--config", str(cfg),
                             "--log-file", str(work / "nydusd.log")],
                            cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src")})
    try:
        for _ in range(600):
            if os.path.ismount(mnt):
                break
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise BenchError(f"nydusd exited {proc.returncode}: {err.strip()[-400:]}")
            time.sleep(0.05)
        else:
            raise BenchError("nydusd did not mount within 30 s")
        before = _blob_gets(log)
        t = time.perf_counter()
        r = subprocess.run(_read_all_cmd(mnt), capture_output=True)
        elapsed = time.perf_counter() - t
        if r.returncode != 0:
            raise BenchError(f"read-all failed: {r.stderr.decode(errors='replace')[-400:]}")
        return elapsed, _blob_gets(log) - before
    finally:
        stop_process(proc)
        if os.path.ismount(mnt):
            unmount(mnt)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", default="python")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    registry = shutil.which("docker-registry")
    if registry is None:
        raise BenchError("docker-registry is not installed (scripts/setup installs it as root)")
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        raise BenchError("needs root and /dev/fuse")
    # Any tree of 64 MiB and more says what a read-all costs (the Debian root of
    # lazy_start.py, 156 MiB, is the one issue 9 names).
    tree, stats, what = prepare_tree(args.tree, min_bytes=64 << 20)
    image, blob_id = rafs_v6_image(tree)
    blob_size = (image / blob_id).stat().st_size
    work = Path(tempfile.mkdtemp(prefix="registry-bench-"))
    port = free_port()
    (work / "config.yml").write_text(
        f"version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {work / 'data'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n")
    log = work / "registry.log"
    server = subprocess.Popen([registry, "serve", str(work / "config.yml")], stdout=subprocess.DEVNULL,
                              stderr=open(log, "wb"))
    try:
        _wait_port(port, server, "docker-registry")
        base = f"http://127.0.0.1:{port}"
        if _push(base, (image / blob_id).read_bytes()) != blob_id:
            raise BenchError(f"blob {blob_id} is not named by its sha256")
        url = f"{base}/v2/{REPO}/blobs/sha256:{blob_id}"
        curl = []
        for _ in range(args.runs):
            t = time.perf_counter()
            subprocess.run(["curl", "-sf", "-o", "/dev/null", url], check=True)
            curl.append(time.perf_counter() - t)
        t_curl = median(curl)
        rows = [["curl (whole blob)", f"{t_curl:.2f}", 1, "1.00x"]]
        t = median([_plain(tree) for _ in range(args.runs)])
        rows.append(["reference: the source tree on local disk, page cache dropped", f"{t:.2f}", 0,
                     ratio(t_curl, t)])
        for label, amplify, prefetch, warm in (
                ("reference: nydusd fuse, blob cache already full", 1 << 20, False, True),
                ("nydusd fuse, amplify_io=0", 0, False, False),
                ("nydusd fuse, amplify_io=1MiB", 1 << 20, False, False),
                ("nydusd fuse, amplify_io=1MiB + prefetch_all", 1 << 20, True, False)):
            runs = [_mode(image, port, log, amplify, prefetch, warm) for _ in range(args.runs)]
            t = median([r[0] for r in runs])
            rows.append([label, f"{t:.2f}", runs[-1][1], ratio(t_curl, t)])
        print(f"tree: {what}; {stats.files} files, {stats.bytes / 2**20:.0f} MiB; blob {blob_size / 2**20:.1f} MiB "
              f"(v6, zstd, 1 MiB chunks)")
        print(render_table(["mode", "seconds", "blob GETs", "curl/mode"], rows, markdown=True))
    finally:
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"registry_read: {exc}", file=sys.stderr)
        sys.exit(2)
