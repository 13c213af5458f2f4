#!/usr/bin/env python3
"""Lazy start: how soon ``python3 -c 'print(1)'`` prints from an image in a registry, OCI vs Nydus.

The image: a Debian bookworm root with python3, made from this (Debian 12)
host's installed packages: every package of priority required/important plus
the dependency closure of ``python3``, copied file by file as ``dpkg -L``
lists them (with the ``__pycache__`` directories py3compile made), usr-merged
like the host.  ``debootstrap --variant=minbase --include=python3`` makes the
same kind of tree but needs a Debian mirror, which the test machines cannot
reach.  It becomes a single-layer OCI image (gzip), pushed by skopeo to a
local ``docker-registry``, and converted by our ``nydusify`` (RAFS v6, zstd).

Both paths fetch through our rate-limiting HTTP proxy in front of the
registry (one shared token bucket = one link of ``--bandwidth`` Mbit/s, plus
``--rtt-ms`` of latency per request), which also counts the bytes:

(a) **OCI**: ``skopeo copy docker://… oci:…`` (full pull), ``tar -xzf`` of the
    layer (unpack), then ``chroot ROOTFS python3 -c 'print(1)'``;
(b) **Nydus**: fetch the manifest and the bootstrap layer (what the
    snapshotter pulls), start ``nydusd fuse`` with the registry backend
    (``scheme: http``, empty blob cache), wait for the mount, then the same
    chroot command in the mount;
(b2) **Nydus, shared daemon** (nydus-snapshotter's ``daemon_mode = "shared"``): one
    ``nydusd fuse --apisock`` already runs, started before the clock; the clock
    covers the bootstrap fetch, ``POST /api/v1/mount`` of the image into it and
    the same chroot command;
(c) **Nydus in a guest**: the same, but ``nydusd virtiofs``, and the test guest
    of ``qemu/`` (Debian 6.1 kernel, busybox) runs ``mount -t virtiofs`` and the
    chroot command.  The guest's boot is not counted (it is the VM's cost, the
    same for any image): the time is the host's part (bootstrap, nydusd up) plus
    the guest's own clock from before the mount to after the output.  Under TCG
    the guest's CPU is emulated, which slows python3 itself; the accelerator
    used is printed.

Each is timed from its first request to the first line of output, with the
page cache dropped before each run; the median of ``--rounds`` is reported
with the bytes each fetched from the registry and the ratio (a)/(b) or (a)/(c).

    sudo .venv/bin/python scripts/bench/lazy_start.py --bandwidth 100 1000 --rounds 3

Needs root (chroot, FUSE, drop_caches), docker-registry, skopeo, tar, gzip;
(c) needs QEMU and the guest kernel cache (``qemu/fetch-kernel``) and is
skipped with the reason otherwise (``--no-guest`` skips it too).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (BenchError, PROJECT_ROOT, cache_root, drop_caches, exclusive_lock, free_port,  # noqa: E402
                     human_bytes, is_mountpoint, median, render_table, run, signals_raise,
                     stop_process, sweep_mounts, unmount)

sys.path.insert(0, str(PROJECT_ROOT / "src"))

WORKLOAD = ["/usr/bin/python3", "-c", "print(1)"]
_ROOT_LINKS = ("bin", "lib", "lib64", "sbin")


def log(msg: str) -> None:
    print(msg, flush=True)


# -- the image -----------------------------------------------------------------------------------------

def host_packages() -> list[str]:
    """Required/important packages plus the installed dependency closure of python3."""
    q = run(["dpkg-query", "-W", "-f=${Package} ${Priority} ${Status}\\n"], what="dpkg-query").stdout.decode()
    pkgs = {line.split()[0] for line in q.splitlines()
            if line.split()[1:2] in (["required"], ["important"]) and line.endswith("installed")}
    deps = run(["apt-cache", "depends", "--recurse", "--installed", "--no-recommends", "--no-suggests",
                "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances", "python3"],
               what="apt-cache depends").stdout.decode()
    pkgs |= {line.strip() for line in deps.splitlines() if line and not line.startswith(" ") and "<" not in line}
    if "python3" not in pkgs:
        raise BenchError("python3 is not installed on this host")
    return sorted(pkgs)


def _canonical(path: str) -> str:
    parent = os.path.realpath(os.path.dirname(path))
    return os.path.join(parent, os.path.basename(path))


def build_rootfs(dest: Path, packages: list[str]) -> None:
    """Copy the files of ``packages`` from the host into ``dest`` (usr-merged like the host)."""
    dest.mkdir(parents=True)
    paths: set[str] = set()
    for pkg in packages:
        r = subprocess.run(["dpkg", "-L", pkg], capture_output=True)
        if r.returncode == 0:
            paths.update(p for p in r.stdout.decode(errors="surrogateescape").splitlines() if p.startswith("/"))
    for name in _ROOT_LINKS:
        host = Path("/") / name
        if host.is_symlink():
            os.symlink(os.readlink(host), dest / name)
    extra = set()
    for p in paths:
        d = os.path.dirname(_canonical(p))
        cache = os.path.join(d, "__pycache__")
        if os.path.isdir(cache):
            extra.update(os.path.join(cache, n) for n in os.listdir(cache))
    for p in sorted(paths | extra):
        src = _canonical(p)
        if not os.path.lexists(src) or src in ("/", "/proc", "/sys", "/dev"):
            continue
        out = dest / src.lstrip("/")
        if os.path.lexists(out):
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        if os.path.islink(src):
            os.symlink(os.readlink(src), out)
        elif os.path.isdir(src):
            out.mkdir(exist_ok=True)
            shutil.copystat(src, out)
        elif os.path.isfile(src):
            shutil.copy2(src, out)
    for d in ("tmp", "dev", "proc"):
        (dest / d).mkdir(exist_ok=True)
    os.chmod(dest / "tmp", 0o1777)


def build_layout(rootfs: Path, layout: Path, tag: str) -> int:
    """A single-layer OCI image layout of ``rootfs``; returns the image's byte size (config + layer)."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    tar_path = layout / "layer.tar"
    run(["tar", "--numeric-owner", "--xattrs", "-C", rootfs, "-cf", tar_path, "."], what="tar", timeout=1800)
    diff = hashlib.sha256()
    with open(tar_path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            diff.update(piece)
    gz_path = layout / "layer.tar.gz"
    with open(tar_path, "rb") as src, open(gz_path, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz:
            shutil.copyfileobj(src, gz, 1 << 20)
    tar_path.unlink()
    layer = hashlib.sha256()
    with open(gz_path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            layer.update(piece)
    gz_path.rename(blobs / layer.hexdigest())
    size = (blobs / layer.hexdigest()).stat().st_size
    from nydus_vfs.convert import host_platform
    arch = host_platform().split("/")[1]
    config = json.dumps({"architecture": arch, "os": "linux", "config": {"Cmd": WORKLOAD},
                         "rootfs": {"type": "layers", "diff_ids": ["sha256:" + diff.hexdigest()]}}).encode()
    cdigest = hashlib.sha256(config).hexdigest()
    (blobs / cdigest).write_bytes(config)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": "sha256:" + cdigest, "size": len(config)},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                       "digest": "sha256:" + layer.hexdigest(), "size": size}]}).encode()
    mdigest = hashlib.sha256(manifest).hexdigest()
    (blobs / mdigest).write_bytes(manifest)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + mdigest,
         "size": len(manifest), "annotations": {"org.opencontainers.image.ref.name": tag}}]}))
    return size + len(config)


def prepare_image(log=log) -> tuple[Path, dict]:
    """The cached OCI layout (rebuilt when the package set changes) and its description."""
    packages = host_packages()
    key = hashlib.sha256(("\n".join(packages) + "\nv1").encode()).hexdigest()[:16]
    base = cache_root() / "lazy_start"
    layout = base / f"layout-{key}"
    stamp = base / f"layout-{key}.json"
    if layout.is_dir() and stamp.is_file():
        return layout, json.loads(stamp.read_text())
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    rootfs = base / "rootfs"
    log(f"building the image root from {len(packages)} host packages")
    build_rootfs(rootfs, packages)
    files = sum(len(f) for _, _, f in os.walk(rootfs))
    usize = sum(os.lstat(os.path.join(d, n)).st_size for d, _, fs in os.walk(rootfs) for n in fs)
    log(f"  {files} files, {human_bytes(usize)}; packing the OCI layer")
    partial = base / "layout.partial"
    size = build_layout(rootfs, partial, "base")
    shutil.rmtree(rootfs)
    partial.rename(layout)
    meta = {"packages": len(packages), "files": files, "uncompressed": usize, "image_size": size}
    stamp.write_text(json.dumps(meta))
    return layout, meta


# -- the registry and the shaped link ---------------------------------------------------------------------

class Registry:
    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        root.mkdir(parents=True, exist_ok=True)
        (root / "config.yml").write_text(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {root / 'store'}\nhttp:\n  addr: {self.host}\n")
        try:
            self.proc = subprocess.Popen(["docker-registry", "serve", str(root / "config.yml")],
                                         stdout=subprocess.DEVNULL, stderr=open(root / "registry.log", "wb"))
        except FileNotFoundError:
            raise BenchError("docker-registry is not installed (scripts/setup installs it)") from None
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise BenchError(f"docker-registry did not start: {(root / 'registry.log').read_text()}")
                time.sleep(0.1)

    def stop(self) -> None:
        stop_process(self.proc, 10)


class ShapedLink:
    """A reverse proxy to the registry: ``rate`` bytes/s shared by all responses, ``rtt`` s per request.

    ``bytes_sent`` counts response body bytes (what crossed the link).
    """

    def __init__(self, upstream: str, rate: float, rtt: float) -> None:
        self.upstream = upstream
        self.rate = rate
        self.rtt = rtt
        self.bytes_sent = 0
        self.requests = 0
        self._next_free = 0.0
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, daemon=True, name="shaped-link")
        self._thread.start()
        if not self._ready.wait(10):
            raise BenchError("the shaping proxy did not start")

    async def _pace(self, n: int) -> None:
        now = self._loop.time()
        start = max(now, self._next_free)
        self._next_free = start + n / self.rate
        delay = self._next_free - now
        if delay > 0:
            await asyncio.sleep(delay)

    def _main(self) -> None:
        from aiohttp import ClientSession, ClientTimeout, web
        from multidict import CIMultiDict

        asyncio.set_event_loop(self._loop)

        async def handler(request: web.Request) -> web.StreamResponse:
            self.requests += 1
            if self.rtt:
                await asyncio.sleep(self.rtt)
            # A multidict: clients send some headers (Accept) several times.
            headers = CIMultiDict((k, v) for k, v in request.headers.items()
                                  if k.lower() not in ("host", "content-length", "transfer-encoding"))
            body = await request.read()
            async with self._session.request(request.method, f"http://{self.upstream}{request.path_qs}",
                                             headers=headers, data=body or None, allow_redirects=False) as up:
                out = web.StreamResponse(status=up.status, headers=CIMultiDict(
                    (k, v) for k, v in up.headers.items()
                    if k.lower() not in ("transfer-encoding", "content-encoding", "connection")))
                await out.prepare(request)
                try:
                    async for piece in up.content.iter_chunked(64 << 10):
                        await self._pace(len(piece))
                        self.bytes_sent += len(piece)
                        await out.write(piece)
                    await out.write_eof()
                except ConnectionError:
                    pass   # the client hung up (it had what it wanted): not the link's business
                return out

        async def start() -> None:
            self._session = ClientSession(auto_decompress=False, timeout=ClientTimeout(total=None))
            app = web.Application(client_max_size=1 << 30)
            app.router.add_route("*", "/{tail:.*}", handler)
            self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]
            self.host = f"127.0.0.1:{self.port}"
            self._ready.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    def stop(self) -> None:
        async def stop() -> None:
            await self._session.close()
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


# -- the two ways to start ----------------------------------------------------------------------------------

def first_output(cmd: list[str]) -> float:
    """Run ``cmd``; monotonic time when its first output line arrived (BenchError if none)."""
    cmd = [shutil.which(cmd[0]) or cmd[0]] + cmd[1:]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"})
    line = proc.stdout.readline()
    t = time.monotonic()
    _, err = proc.communicate(timeout=120)
    if line.strip() != b"1" or proc.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} printed {line!r}, exit {proc.returncode}: {err.decode(errors='replace')}")
    return t


def start_oci(link: ShapedLink, work: Path, image: str) -> tuple[float, float]:
    """(a): full pull + unpack + chroot; (seconds to first output, seconds to unpacked)."""
    oci = work / "oci"
    rootfs = work / "rootfs-oci"
    rootfs.mkdir()
    t0 = time.monotonic()
    run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{link.host}/{image}", f"oci:{oci}:x"],
        what="skopeo copy", timeout=3600)
    index = json.loads((oci / "index.json").read_text())
    manifest = json.loads((oci / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]).read_text())
    for layer in manifest["layers"]:
        run(["tar", "--numeric-owner", "-xzf", oci / "blobs" / "sha256" / layer["digest"][7:], "-C", rootfs],
            what="tar -x", timeout=3600)
    t_unpacked = time.monotonic()
    t1 = first_output(["chroot", str(rootfs)] + WORKLOAD)
    return t1 - t0, t_unpacked - t0


def _write_registry_config(work: Path, link: ShapedLink, repo: str) -> None:
    """work/nydusd.json: the registry behind ``link``, a blob cache in work/cache."""
    config = {"device": {"backend": {"type": "registry",
                                     "config": {"scheme": "http", "host": link.host, "repo": repo}},
                         "cache": {"type": "blobcache", "config": {"work_dir": str(work / "cache")}}},
              "mode": "direct", "digest_validate": False, "enable_xattr": True}
    if AMPLIFY_IO is not None:
        config["amplify_io"] = AMPLIFY_IO
    (work / "nydusd.json").write_text(json.dumps(config))


def start_nydus(link: ShapedLink, work: Path, image: str, repo: str) -> tuple[float, float]:
    """(b): bootstrap pull + nydusd (registry backend) + chroot; (seconds to first output, seconds to mounted)."""
    from nydus_vfs.convert import fetch_nydus_bootstrap

    boot = work / "image.boot"
    mnt = work / "mnt"
    mnt.mkdir()
    _write_registry_config(work, link, repo)
    t0 = time.monotonic()
    asyncio.run(fetch_nydus_bootstrap(f"{link.host}/{image}", str(boot), plain_http=True))
    if EXPLAIN:
        log(f"    bootstrap ({human_bytes(boot.stat().st_size)}) fetched after {time.monotonic() - t0:.2f} s")
    proc = subprocess.Popen([sys.executable, "-m", "nydus_vfs.cli.nydusd", "fuse", "--config",
                             str(work / "nydusd.json"), "--bootstrap", str(boot), "--mountpoint", str(mnt),
                             "--log-file", str(work / "nydusd.log"), "--log-level", "warn"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src")})
    try:
        while not is_mountpoint(mnt):
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace")
                raise BenchError(f"nydusd exited {proc.returncode} before mounting: {err.strip()[-500:]}")
            if time.monotonic() - t0 > 120:
                raise BenchError("nydusd did not mount within 120 s")
            time.sleep(0.01)
        t_mounted = time.monotonic()
        t1 = first_output(["chroot", str(mnt)] + WORKLOAD)
        if EXPLAIN:
            explain_fetch(boot, work / "cache")
        return t1 - t0, t_mounted - t0
    finally:
        stop_process(proc)
        unmount(mnt)


#: Set by --explain: after each Nydus run, print which files the fetched chunks belong to.
EXPLAIN = False
#: Set by --amplify-io: nydusd's ``amplify_io`` (None: its default, 1 MiB).
AMPLIFY_IO: int | None = None


def explain_fetch(boot: Path, cache: Path, top: int = 15) -> None:
    """Attribute the chunks the blob cache holds to files (compressed bytes each), largest first.

    Reads the chunk maps by their documented layout (``<blob>.blob.data.chunk_map``:
    a 4 KiB header, then one bit per chunk index, ``0x80 >> (i % 8)`` of byte
    ``i // 8``; nydus-surface.md §2.4).  A chunk shared by several files (dedup)
    is counted once, for the first path that names it.
    """
    from nydus_vfs.format.reader import Bootstrap

    bs = Bootstrap.from_bytes(boot.read_bytes())
    maps = {}
    for i, blob in enumerate(bs.blobs):
        path = cache / f"{blob.blob_id}.blob.data.chunk_map"
        if path.is_file():
            maps[i] = path.read_bytes()[4096:]
    seen: set[tuple[int, int]] = set()
    per_file: list[tuple[int, int, int, str]] = []
    total = 0
    for path, _ino, info in bs.walk():
        if not info.is_reg:
            continue
        got = size = n = 0
        for c in bs.chunks(_ino):
            bits = maps.get(c.blob_index)
            key = (c.blob_index, c.index)
            if bits is None or key in seen or c.index // 8 >= len(bits):
                continue
            if bits[c.index // 8] & (0x80 >> (c.index % 8)):
                seen.add(key)
                got += c.compressed_size
                size += c.uncompressed_size
                n += 1
        if got:
            total += got
            per_file.append((got, size, n, path.decode(errors="replace")))
    per_file.sort(reverse=True)
    log(f"    fetched chunks by file: {len(per_file)} files, {human_bytes(total)} compressed")
    for got, size, n, path in per_file[:top]:
        log(f"      {human_bytes(got):>10} ({n} chunks, {human_bytes(size)} uncompressed)  {path}")


def start_shared(link: ShapedLink, work: Path, image: str, repo: str) -> tuple[float, float]:
    """(b2): nydus-snapshotter's shared mode: one ``nydusd fuse`` already runs (started before
    the clock), the image is mounted into it through the HTTP API; (seconds to output, to mounted)."""
    from nydus_vfs.cli.nydusctl import ApiCallError, ApiClient
    from nydus_vfs.convert import fetch_nydus_bootstrap

    boot = work / "image.boot"
    mnt = work / "mnt"
    mnt.mkdir()
    api = work / "api.sock"
    _write_registry_config(work, link, repo)
    proc = subprocess.Popen([sys.executable, "-m", "nydus_vfs.cli.nydusd", "fuse", "--mountpoint", str(mnt),
                             "--apisock", str(api), "--log-file", str(work / "nydusd.log"), "--log-level", "warn"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src")})
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise BenchError(f"shared nydusd exited {proc.returncode}: "
                                 f"{proc.stderr.read().decode(errors='replace').strip()[-500:]}")
            if is_mountpoint(mnt) and api.exists():
                try:
                    ApiClient(str(api), timeout=60).call("GET", "/api/v1/daemon")
                    break
                except (OSError, ApiCallError):
                    pass
            if time.monotonic() > deadline:
                raise BenchError("the shared nydusd did not come up within 60 s")
            time.sleep(0.01)
        t0 = time.monotonic()
        asyncio.run(fetch_nydus_bootstrap(f"{link.host}/{image}", str(boot), plain_http=True))
        try:
            ApiClient(str(api), timeout=60).call("POST", "/api/v1/mount", {"mountpoint": "/lazy"}, {
                "source": str(boot), "fs_type": "rafs", "config": (work / "nydusd.json").read_text()})
        except ApiCallError as exc:
            raise BenchError(f"POST /api/v1/mount answered {exc}") from None
        t_mounted = time.monotonic()
        t1 = first_output(["chroot", str(mnt / "lazy")] + WORKLOAD)
        if EXPLAIN:
            explain_fetch(boot, work / "cache")
        return t1 - t0, t_mounted - t0
    finally:
        stop_process(proc)
        unmount(mnt)


def _guest_module():
    """``tests/guest.py`` (the guest runner ``qemu/run-guest`` uses), loaded by path."""
    import importlib.util
    path = PROJECT_ROOT / "tests" / "guest.py"
    if not path.is_file():
        raise BenchError(f"{path} is missing (the guest runner lives in the project checkout)")
    spec = importlib.util.spec_from_file_location("nydus_guest", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["nydus_guest"] = mod
    spec.loader.exec_module(mod)
    return mod


def start_guest(link: ShapedLink, work: Path, image: str, repo: str) -> tuple[float, float]:
    """(c): bootstrap pull + nydusd virtiofs + guest mount + chroot; (seconds to output, host-side seconds)."""
    from nydus_vfs.convert import fetch_nydus_bootstrap

    guest = _guest_module()
    reason = guest.guest_unavailable_reason()
    if reason:
        raise BenchError(reason)
    boot = work / "image.boot"
    sock = work / "vfs.sock"
    _write_registry_config(work, link, repo)
    t0 = time.monotonic()
    asyncio.run(fetch_nydus_bootstrap(f"{link.host}/{image}", str(boot), plain_http=True))
    proc = subprocess.Popen([sys.executable, "-m", "nydus_vfs.cli.nydusd", "virtiofs", "--sock", str(sock),
                             "--config", str(work / "nydusd.json"), "--bootstrap", str(boot),
                             "--log-file", str(work / "nydusd.log"), "--log-level", "warn"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src")})
    try:
        while not sock.exists():
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace")
                raise BenchError(f"nydusd virtiofs exited {proc.returncode}: {err.strip()[-500:]}")
            if time.monotonic() - t0 > 120:
                raise BenchError("nydusd virtiofs did not listen within 120 s")
            time.sleep(0.01)
        host_part = time.monotonic() - t0
        # The guest has no entropy this early: python3 must not ask for random hash seeds.
        script = ('a=$(cut -d" " -f1 /proc/uptime)\n'
                  'mount -t virtiofs nydus /mnt && PYTHONHASHSEED=0 PYTHONDONTWRITEBYTECODE=1 '
                  'chroot /mnt /usr/bin/python3 -c "print(1)"\n'
                  'b=$(cut -d" " -f1 /proc/uptime)\n'
                  'echo "T $a $b"\n')
        try:
            result = guest.run_guest(str(sock), script, timeout=300)
        except guest.GuestError as exc:
            raise BenchError(f"guest: {exc}") from None
        lines = result.output.splitlines()
        marks = [line.split() for line in lines if line.startswith("T ")]
        if "1" not in lines or not marks:
            raise BenchError(f"guest printed {result.output[-300:]!r}")
        in_guest = float(marks[-1][2]) - float(marks[-1][1])
        return host_part + in_guest, host_part
    finally:
        stop_process(proc)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bandwidth", type=float, nargs="+", default=[100.0, 1000.0], help="link speeds in Mbit/s")
    ap.add_argument("--rtt-ms", type=float, default=0.0, help="added latency per request (default 0)")
    ap.add_argument("--rounds", type=int, default=3, help="runs per mode and speed; the median is shown")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    ap.add_argument("--json", help="write the raw figures here")
    ap.add_argument("--work", default=None, help="scratch directory (default: a temp dir under the cache)")
    ap.add_argument("--no-guest", action="store_true", help="skip (c), the guest over virtio-fs")
    ap.add_argument("--modes", default="oci,nydus,shared,guest", help="which of oci,nydus,shared,guest to run")
    ap.add_argument("--explain", action="store_true",
                    help="after each Nydus run, list the files whose chunks were fetched")
    ap.add_argument("--amplify-io", default=None,
                    help="nydusd's amplify_io for (b) and (c) (default: nydusd's own, 1 MiB; 0 disables)")
    ap.add_argument("--chunk-size", default="0x100000", help="chunk size of the Nydus image (nydusify --chunk-size)")
    args = ap.parse_args(argv)
    global EXPLAIN, AMPLIFY_IO
    EXPLAIN = args.explain
    AMPLIFY_IO = None if args.amplify_io is None else int(args.amplify_io, 0)
    if os.geteuid() != 0:
        print("lazy_start: needs root (chroot, FUSE mounts, drop_caches)", file=sys.stderr)
        return 2
    try:
        with exclusive_lock(cache_root() / "lazy_start.lock"), signals_raise():
            return _run(args)
    except BenchError as exc:
        print(f"lazy_start: {exc}", file=sys.stderr)
        return 1


def _run(args) -> int:
    layout, meta = prepare_image()
    log(f"image: host-package Debian root with python3, {meta['files']} files, "
        f"{human_bytes(meta['uncompressed'])} unpacked, {human_bytes(meta['image_size'])} as an OCI image")
    scratch = Path(tempfile.mkdtemp(prefix="lazy-start-", dir=args.work or cache_root()))
    registry = None
    results: list[dict] = []
    try:
        sweep_mounts(scratch)
        registry = Registry(scratch / "registry-root")
        run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:base",
             f"docker://{registry.host}/lazy:base"], what="skopeo copy (push)", timeout=1800)
        t = time.monotonic()
        out_json = scratch / "convert.json"
        run([sys.executable, "-m", "nydus_vfs.cli.nydusify", "convert", "--source", f"{registry.host}/lazy:base",
             "--target", f"{registry.host}/lazy:nydus", "--plain-http", "--work-dir", str(scratch / "convert"),
             "--output-json", str(out_json), "--chunk-size", args.chunk_size], what="nydusify convert", timeout=3600,
            env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src")})
        metrics = json.loads(out_json.read_text())
        log(f"converted with nydusify in {time.monotonic() - t:.1f} s: OCI {human_bytes(metrics['SourceImageSize'])}"
            f" -> Nydus {human_bytes(metrics['TargetImageSize'])}")
        for mbit in args.bandwidth:
            link = ShapedLink(registry.host, mbit * 1e6 / 8, args.rtt_ms / 1000)
            try:
                modes = [m for m in args.modes.split(",") if m in ("oci", "nydus", "shared", "guest")]
                for mode in [m for m in modes if not (m == "guest" and args.no_guest)]:
                    for i in range(args.rounds):
                        work = scratch / f"run-{mbit:g}-{mode}-{i}"
                        work.mkdir()
                        drop_caches()
                        before = link.bytes_sent
                        before_requests = link.requests
                        try:
                            if mode == "oci":
                                total, ready = start_oci(link, work, "lazy:base")
                            elif mode == "nydus":
                                total, ready = start_nydus(link, work, "lazy:nydus", "lazy")
                            elif mode == "shared":
                                total, ready = start_shared(link, work, "lazy:nydus", "lazy")
                            else:
                                total, ready = start_guest(link, work, "lazy:nydus", "lazy")
                        except BenchError as exc:
                            log(f"  {mode} @ {mbit:g} Mbit/s: unavailable: {exc}")
                            results.append({"mode": mode, "mbit": mbit, "error": str(exc)})
                            break
                        fetched = link.bytes_sent - before
                        requests = link.requests - before_requests
                        results.append({"mode": mode, "mbit": mbit, "round": i, "seconds": total,
                                        "ready_seconds": ready, "bytes": fetched, "requests": requests})
                        log(f"  {mode} @ {mbit:g} Mbit/s round {i + 1}: first output after {total:.2f} s "
                            f"({ {'oci': 'unpacked', 'nydus': 'mounted', 'shared': 'mounted'}.get(mode, 'nydusd up') } at {ready:.2f} s), "
                            f"{human_bytes(fetched)} fetched in {requests} requests")
                        shutil.rmtree(work, ignore_errors=True)
            finally:
                link.stop()
    finally:
        if registry is not None:
            registry.stop()
        sweep_mounts(scratch)
        shutil.rmtree(scratch, ignore_errors=True)

    rows = []
    image_bytes = meta["image_size"]
    for mbit in args.bandwidth:
        per = {}
        for mode in ("oci", "nydus", "shared", "guest"):
            rs = [r for r in results if r["mode"] == mode and r["mbit"] == mbit and "seconds" in r]
            per[mode] = (median([r["seconds"] for r in rs]), median([r["bytes"] for r in rs]),
                         median([r["requests"] for r in rs])) if rs else None
        for mode, label in (("oci", "(a) OCI: pull + unpack + chroot"), ("nydus", "(b) Nydus: nydusd fuse + chroot"),
                            ("shared", "(b2) Nydus: shared nydusd, API mount + chroot"),
                            ("guest", "(c) Nydus: nydusd virtiofs + guest")):
            if per[mode] is None:
                ran = mode in args.modes.split(",") and not (mode == "guest" and args.no_guest)
                why = "unavailable" if ran else "not run"
                rows.append([label, f"{mbit:g} Mbit/s", why, "", "", "", ""])
                continue
            secs, fetched, requests = per[mode]
            speedup = (f"{per['oci'][0] / secs:.1f}x" if mode != "oci" and per["oci"] else "")
            rows.append([label, f"{mbit:g} Mbit/s", f"{secs:.2f} s", human_bytes(fetched), f"{requests:g}",
                         f"{100 * fetched / image_bytes:.1f} %", speedup])
    print()
    print(render_table(["mode", "link", "first output", "fetched", "requests", "of image", "(a)/this"], rows,
                       markdown=args.markdown))
    if args.json:
        Path(args.json).write_text(json.dumps({"image": meta, "rtt_ms": args.rtt_ms, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
