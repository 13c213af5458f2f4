#!/usr/bin/env python3
"""Walk + read of one large tree: RAFS via ``nydusd fuse`` beside kernel erofs, squashfuse and the plain dir.

The same tree (a ``debootstrap`` Debian root, cached under ``.cache/bench``) is
served six ways, and two workloads run on each, with the page cache, dentries
and inodes dropped before every measurement:

* **walk**: ``find M -printf ...`` (an ``lstat`` of every entry, fields printed);
* **read**: ``find M -type f -print0 | xargs -0 cat > /dev/null`` (every byte of every file).

Systems: ``plain`` (the directory itself), ``erofs`` (``mkfs.erofs``, no
compression, kernel mount on a loop device), ``squashfuse`` (``mksquashfs
-comp zstd``), and our daemon on ``nydus-image create -v 6`` images:
``nydusd-none`` (uncompressed blob, ``dummycache``: chunks are read straight from
the blob, the closest match to erofs), ``nydusd-none-cache`` and
``nydusd-zstd-cache`` (``blobcache`` in a fresh work dir, so the first read is
cold for the daemon too; the read is then repeated with the daemon's cache warm
and the page cache dropped again).  Each repetition mounts everything afresh,
in a rotated order.  The first repetition also checks every listing and the
sha256 of every file against the plain tree.

Afterwards (``--profile``, on by default) the FUSE systems run once more with
the kernel's ``fuse:fuse_request_send/end`` tracepoints on (request mix, READ
sizes, latency, concurrency, which processes asked), the daemon's run state
sampled, and for ours ``py-spy`` (Python functions) and ``perf record``
(kernel and interpreter symbols) on the daemon.

    sudo .venv/bin/python scripts/bench/fuse_walk_read.py                # about 3 min on 2 vCPUs
    sudo .venv/bin/python scripts/bench/fuse_walk_read.py --reps 1 --no-profile --systems erofs,nydusd-none
    sudo .venv/bin/python scripts/bench/fuse_walk_read.py --tree /some/dir --min-mb 1 --min-files 10

Needs root (mounts, drop_caches), ``/dev/fuse``, erofs in the kernel,
erofs-utils, squashfs-tools and squashfuse; py-spy (``pip install py-spy``)
and perf for the profile.  Every mount is taken down on exit, also on Ctrl-C
and SIGTERM; mounts left by a run that was SIGKILLed are swept at the next start.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from _common import (
    PROJECT_ROOT,
    BenchError,
    CpuTimes,
    StateSampler,
    TreeStats,
    cache_root,
    cached_dir,
    children_cpu_seconds,
    cpu_times,
    drop_caches,
    exclusive_lock,
    files_digest,
    human_bytes,
    is_mountpoint,
    median,
    prepare_tree,
    ratio,
    render_table,
    run,
    signals_raise,
    sweep_mounts,
    unmount,
    venv_tool,
)


@dataclass(frozen=True)
class Ours:
    """How one of our variants is run: image compressor and blob cache."""

    comp: str
    cache: bool


OURS: dict[str, Ours] = {
    "nydusd-none": Ours("none", False),
    "nydusd-none-cache": Ours("none", True),
    "nydusd-zstd-cache": Ours("zstd", True),
}
ALL_SYSTEMS = ("plain", "erofs", "squashfuse", *OURS)
KNOWN_SYSTEMS = ALL_SYSTEMS
FUSE_SYSTEMS = ("squashfuse", *OURS)
#: What --profile traces by default: the FUSE reference and two of ours.
PROFILED = ("squashfuse", "nydusd-none", "nydusd-zstd-cache")

_MOUNT_TIMEOUT = 60.0
# Let the FORGETs that drop_caches triggers reach the FUSE daemons before timing.
_SETTLE = 0.3
# find's output: type, permissions, size, uid, gid, path, link target; NUL-terminated.
_WALK_FORMAT = r"%y %m %s %U %G %P\0%l\0"


def log(msg: str = "") -> None:
    print(msg, flush=True)


# -- images -------------------------------------------------------------------------------

def _tool_identity(name: str) -> list:
    path = shutil.which(name)
    if path is None:
        raise BenchError(f"{name} is not installed (apt-get install erofs-utils squashfs-tools squashfuse)")
    st = os.stat(path)
    return [path, st.st_size, int(st.st_mtime)]


@dataclass
class Images:
    rafs: dict[str, Path]   # compressor -> directory holding bootstrap + blobs/
    erofs: Path | None
    squashfs: Path | None


def build_images(tree: Path, stats: TreeStats, desc: str, systems: tuple[str, ...],
                 squashfs_comp: str) -> Images:
    """Build (or reuse from the cache) every image ``systems`` need."""
    base = cache_root() / "fuse_walk_read" / "images"
    tree_key = {"tree": str(tree), "description": desc, "stats": stats.__dict__}
    rafs: dict[str, Path] = {}
    comps = sorted({_ours(s).comp for s in systems if _ours(s) is not None})
    if comps:
        src = PROJECT_ROOT / "src" / "nydus_vfs"
        code = files_digest([*src.glob("builder/*.py"), *src.glob("format/*.py"), src / "utils" / "compress.py"])
        nydus_image = venv_tool("nydus-image")
    for comp in comps:
        def build_rafs(out: Path, comp=comp) -> None:
            (out / "blobs").mkdir()
            t = time.perf_counter()
            run([nydus_image, "create", "-v", "6", "--compressor", comp, "-B", out / "bootstrap",
                 "-D", out / "blobs", "-J", out / "result.json", tree], what=f"nydus-image create ({comp})")
            (out / "build_seconds").write_text(f"{time.perf_counter() - t:.2f}\n")

        rafs[comp] = cached_dir(base / f"rafs-v6-{comp}", {**tree_key, "comp": comp, "code": code}, build_rafs, log)
    erofs = squashfs = None
    if "erofs" in systems:
        def build_erofs(out: Path) -> None:
            run(["mkfs.erofs", "--quiet", out / "image.erofs", tree], what="mkfs.erofs")

        erofs = cached_dir(base / "erofs", {**tree_key, "tool": _tool_identity("mkfs.erofs")},
                           build_erofs, log) / "image.erofs"
    if "squashfuse" in systems:
        _tool_identity("squashfuse")

        def build_squashfs(out: Path) -> None:
            comp_args = (["-noI", "-noD", "-noF", "-noX"] if squashfs_comp == "none"
                         else ["-comp", squashfs_comp])
            run(["mksquashfs", tree, out / "image.sqfs", *comp_args, "-noappend", "-quiet", "-no-progress"],
                what="mksquashfs")

        squashfs = cached_dir(base / f"squashfs-{squashfs_comp}",
                              {**tree_key, "comp": squashfs_comp, "tool": _tool_identity("mksquashfs")},
                              build_squashfs, log) / "image.sqfs"
    return Images(rafs, erofs, squashfs)


# -- mounts -------------------------------------------------------------------------------

@dataclass
class Mounted:
    """One system, ready to be walked and read at ``path``."""

    name: str
    path: Path
    mount_seconds: float = 0.0
    proc: subprocess.Popen | None = None   # the FUSE daemon, if any
    log_path: Path | None = None
    has_daemon_cache: bool = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def log_tail(self, lines: int = 8) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-lines:])


def _wait_mounted(m: Mounted, t0: float) -> None:
    deadline = t0 + _MOUNT_TIMEOUT
    while not is_mountpoint(m.path):
        if m.proc is not None and m.proc.poll() is not None:
            raise BenchError(f"{m.name}: the daemon exited with status {m.proc.returncode} before mounting"
                             f" ({m.log_tail() or 'no output'})")
        if time.perf_counter() > deadline:
            raise BenchError(f"{m.name}: not mounted after {_MOUNT_TIMEOUT:.0f} s ({m.log_tail() or 'no output'})")
        time.sleep(0.01)
    os.stat(m.path)  # the first request (INIT, GETATTR of the root) is part of mounting
    m.mount_seconds = time.perf_counter() - t0


def _teardown(m: Mounted) -> None:
    try:
        unmount(m.path)
    finally:
        if m.proc is not None:
            try:
                m.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                m.proc.terminate()
                try:
                    m.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    m.proc.kill()
                    m.proc.wait()


def _ours(name: str) -> Ours | None:
    return OURS.get(name)


def _nydusd_config(blob_dir: Path, work_dir: Path | None) -> str:
    cache = ({"type": "blobcache", "filecache": {"work_dir": str(work_dir)}} if work_dir is not None
             else {"type": "dummycache"})
    return json.dumps({"version": 2, "backend": {"type": "localfs", "localfs": {"dir": str(blob_dir)}},
                       "cache": cache, "rafs": {"mode": "direct"}})


@contextlib.contextmanager
def mount_system(name: str, tree: Path, images: Images, run_dir: Path) -> Iterator[Mounted]:
    """Mount ``name`` freshly (for ours: a new daemon and, with a cache, an empty work dir)."""
    if name == "plain":
        yield Mounted(name, tree)
        return
    mnt = run_dir / "mnt" / name
    mnt.mkdir(parents=True, exist_ok=True)
    m = Mounted(name, mnt, log_path=run_dir / f"{name}.log")
    work_dir = None
    try:
        t0 = time.perf_counter()
        if name == "erofs":
            run(["mount", "-t", "erofs", "-o", "ro,loop", images.erofs, mnt], what="mount erofs")
            _wait_mounted(m, t0)
        elif name == "squashfuse":
            with open(m.log_path, "wb") as out:
                m.proc = subprocess.Popen(["squashfuse", "-f", str(images.squashfs), str(mnt)],
                                          stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            _wait_mounted(m, t0)
        else:
            spec = _ours(name)
            image = images.rafs[spec.comp]
            if spec.cache:
                work_dir = run_dir / "work" / name
                shutil.rmtree(work_dir, ignore_errors=True)
                work_dir.mkdir(parents=True)
                m.has_daemon_cache = True
            config = run_dir / f"{name}.json"
            config.write_text(_nydusd_config(image / "blobs", work_dir))
            daemon_args = ["fuse", "-C", str(config), "-B", str(image / "bootstrap"), "-M", str(mnt), "-l", "warn"]
            cmd = [str(venv_tool("nydusd")), *daemon_args]
            with open(m.log_path, "wb") as out:
                m.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            _wait_mounted(m, t0)
        yield m
    finally:
        _teardown(m)
        if work_dir is not None:
            shutil.rmtree(work_dir, ignore_errors=True)


# -- workloads ----------------------------------------------------------------------------

@dataclass
class Sample:
    seconds: float
    client_cpu: float              # find/xargs/cat, user + system (the kernel's erofs work lands here)
    daemon: CpuTimes | None        # the FUSE daemon, all threads
    output: bytes = b""
    states: dict[str, float] | None = None   # daemon R/D/S shares (profile pass only)


def _measure(m: Mounted, script: str, *, keep_output: bool, sample_states: bool = False) -> Sample:
    drop_caches()
    time.sleep(_SETTLE)
    d0 = cpu_times(m.pid) if m.pid else None
    c0 = children_cpu_seconds()
    sampler = StateSampler(m.pid) if m.pid and sample_states else contextlib.nullcontext()
    with sampler:
        t0 = time.perf_counter()
        proc = subprocess.run(["bash", "-o", "pipefail", "-c", script], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
        elapsed = time.perf_counter() - t0
    c1 = children_cpu_seconds()
    d1 = cpu_times(m.pid) if m.pid else None
    if proc.returncode != 0:
        err = " | ".join(proc.stderr.decode(errors="replace").strip().splitlines()[-4:])
        raise BenchError(f"{m.name}: `{script}` failed with status {proc.returncode}: {err}"
                         + (f" (daemon: {m.log_tail()})" if m.log_tail() else ""))
    return Sample(elapsed, c1 - c0, None if d0 is None else d1 - d0, proc.stdout if keep_output else b"",
                  sampler.fractions() if isinstance(sampler, StateSampler) else None)


def _q(p: Path) -> str:
    return "'" + str(p).replace("'", "'\\''") + "'"


def walk(m: Mounted, keep_output: bool = False, sample_states: bool = False) -> Sample:
    return _measure(m, f"find {_q(m.path)} -printf '{_WALK_FORMAT}'", keep_output=keep_output,
                    sample_states=sample_states)


def read_all(m: Mounted, sample_states: bool = False) -> Sample:
    return _measure(m, f"find {_q(m.path)} -type f -print0 | xargs -0 -r cat > /dev/null", keep_output=False,
                    sample_states=sample_states)


def checksums(m: Mounted) -> dict[str, str]:
    """sha256 of every regular file, by relative path (untimed; run after the measurements)."""
    proc = subprocess.run(["bash", "-o", "pipefail", "-c",
                           "find . -type f -print0 | xargs -0 -r sha256sum -z"],
                          cwd=m.path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if proc.returncode != 0:
        raise BenchError(f"{m.name}: checksumming failed: {proc.stderr.decode(errors='replace').strip()[-300:]}")
    out = {}
    for rec in proc.stdout.split(b"\0"):
        if rec:
            digest, _, path = rec.decode(errors="surrogateescape").partition("  ")
            out[path] = digest
    return out


def parse_walk(output: bytes) -> dict[str, tuple]:
    """path -> comparable metadata (directory sizes and link counts differ between filesystems)."""
    fields = output.split(b"\0")
    out = {}
    for i in range(0, len(fields) - 1, 2):
        ftype, mode, size, uid, gid, rel = fields[i].split(b" ", 5)
        if ftype == b"d":
            size = b"-"
        out[rel.decode(errors="surrogateescape")] = (ftype, mode, size, uid, gid, fields[i + 1])
    return out


def compare(name: str, got: dict, want: dict, what: str) -> list[str]:
    """Human-readable differences (at most a few of each kind)."""
    problems = []
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    differ = sorted(p for p in set(got) & set(want) if got[p] != want[p])
    if missing:
        problems.append(f"{name}: {len(missing)} {what} missing, e.g. {missing[:3]}")
    if extra:
        problems.append(f"{name}: {len(extra)} unexpected {what}, e.g. {extra[:3]}")
    if differ:
        ex = [(p, got[p], want[p]) for p in differ[:3]]
        problems.append(f"{name}: {len(differ)} {what} differ, e.g. (path, ours, plain) {ex}")
    return problems


# -- the timed runs ---------------------------------------------------------------------------

@dataclass
class Results:
    mount: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    walk: dict[str, list[Sample]] = field(default_factory=lambda: collections.defaultdict(list))
    read: dict[str, list[Sample]] = field(default_factory=lambda: collections.defaultdict(list))
    read_warm: dict[str, list[Sample]] = field(default_factory=lambda: collections.defaultdict(list))
    problems: list[str] = field(default_factory=list)


def one_rep(rep: int, systems: tuple[str, ...], tree: Path, images: Images, run_dir: Path,
            res: Results, verify: bool) -> None:
    # Rotate the order so no system always runs first (after the builds) or last.
    order = systems[rep % len(systems):] + systems[:rep % len(systems)]
    reference_walk = reference_sums = None
    for name in order:
        with mount_system(name, tree, images, run_dir) as m:
            res.mount[name].append(m.mount_seconds)
            w = walk(m, keep_output=verify)
            r = read_all(m)
            res.walk[name].append(w)
            res.read[name].append(r)
            line = f"  rep {rep + 1} {name:<18} mount {m.mount_seconds:5.2f}s  walk {w.seconds:6.2f}s  read {r.seconds:6.2f}s"
            if m.has_daemon_cache:
                r2 = read_all(m)
                res.read_warm[name].append(r2)
                line += f"  read (warm daemon cache) {r2.seconds:6.2f}s"
            log(line)
            if verify:
                listing = parse_walk(w.output)
                sums = checksums(m)
                if reference_walk is None:
                    plain = Mounted("plain", tree)
                    reference_walk = parse_walk(walk(plain, keep_output=True).output)
                    reference_sums = checksums(plain)
                res.problems += compare(name, listing, reference_walk, "entries")
                res.problems += compare(name, sums, reference_sums, "file contents")


def _daemon_breakdown(samples: list[Sample]) -> dict | None:
    """Median split of the wall time of ``samples`` from the daemon's point of view."""
    ds = [(s.seconds, s.daemon) for s in samples if s.daemon is not None]
    if not ds:
        return None
    return {
        "wall": median([w for w, _ in ds]),
        "user": median([d.user for _, d in ds]),
        "system": median([d.system for _, d in ds]),
        "on_cpu": median([d.on_cpu for _, d in ds]),
        "runqueue_wait": median([d.runqueue_wait for _, d in ds]),
        # Neither on a CPU nor waiting for one: asleep for the next request, or in disk I/O.
        "off_cpu": median([max(0.0, w - d.on_cpu - d.runqueue_wait) for w, d in ds]),
    }


def summary(systems: tuple[str, ...], res: Results, stats: TreeStats) -> tuple[str, str, str, dict]:
    """(main table, ratio table, daemon-time table, all numbers)."""
    def med(samples: list[Sample], attr: str = "seconds") -> float | None:
        vals = [getattr(s, attr) for s in samples if getattr(s, attr) is not None]
        return median(vals) if vals else None

    def fmt(v: float | None, unit: str = "s") -> str:
        return "-" if v is None else f"{v:.2f}{unit}"

    rows, data, cpu_rows = [], {}, []
    for name in systems:
        d = {
            "mount": median(res.mount[name]) if res.mount[name] else None,
            "walk": med(res.walk[name]), "read": med(res.read[name]), "read_warm": med(res.read_warm[name]),
            "read_client_cpu": med(res.read[name], "client_cpu"),
            "daemon": {k: _daemon_breakdown(getattr(res, k)[name]) for k in ("walk", "read", "read_warm")},
            "runs": {k: [s.seconds for s in getattr(res, k)[name]] for k in ("walk", "read", "read_warm")},
        }
        data[name] = d
        mbps = f"{stats.bytes / d['read'] / 1e6:.0f}" if d["read"] else "-"
        rows.append([name, fmt(d["mount"]), fmt(d["walk"]), fmt(d["read"]), mbps, fmt(d["read_warm"]),
                     fmt(d["read_client_cpu"])])
        for phase, label in (("walk", "walk"), ("read", "read"), ("read_warm", "read, warm cache")):
            b = d["daemon"][phase]
            if b is not None:
                cpu_rows.append([f"{name} {label}", fmt(b["wall"]), fmt(b["user"]), fmt(b["system"]),
                                 fmt(b["runqueue_wait"]), fmt(b["off_cpu"])])
    table = render_table(["system", "mount", "walk", "read", "MB/s", "read, warm daemon cache",
                          "client CPU (read)"], rows)
    cpu_table = render_table(["daemon, phase", "wall", "user CPU", "system CPU", "waiting for a CPU",
                              "off CPU (idle or disk)"], cpu_rows) if cpu_rows else ""

    ratio_rows = []
    for name in systems:
        if _ours(name) is None:
            continue
        d = data[name]
        row = [name]
        for ref in ("erofs", "squashfuse", "plain"):
            r = data.get(ref)
            row += [ratio(d["walk"], r and r["walk"]), ratio(d["read"], r and r["read"]),
                    ratio(d["read_warm"], r and r["read"])]
        ratio_rows.append(row)
    ratios = render_table(["ours", "walk/erofs", "read/erofs", "warm/erofs", "walk/sqfuse", "read/sqfuse",
                           "warm/sqfuse", "walk/plain", "read/plain", "warm/plain"], ratio_rows)
    return table, ratios, cpu_table, data


# -- profiling: the kernel's view (ftrace) and the daemon's (py-spy) ----------------------------

_TRACE_LINE = re.compile(
    r"^\s*(.*?)-(\d+)\s+\[\d+\].*?\s(\d+\.\d+): fuse_request_(send|end): connection (\d+) req (\d+) "
    r"(?:opcode (\d+) \((\w+)\) len (\d+)|len (\d+) error (-?\d+))")


class FuseTracer:
    """The ``fuse:fuse_request_send`` / ``fuse_request_end`` tracepoints, filtered to our connections.

    Leaves tracing as it found it (events off, filters cleared, buffer size and
    ``tracing_on`` restored, tracefs unmounted if we mounted it).
    """

    def __init__(self) -> None:
        self.root: Path | None = None
        self.unavailable: str | None = None
        self._mounted_tracefs = False
        self._saved: dict[str, str] = {}
        for cand in (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing")):
            if (cand / "events" / "fuse" / "fuse_request_send").is_dir():
                self.root = cand
                return
        cand = Path("/sys/kernel/tracing")
        if cand.is_dir() and not (cand / "events").exists():
            if subprocess.run(["mount", "-t", "tracefs", "nodev", str(cand)], stderr=subprocess.DEVNULL).returncode == 0:
                self._mounted_tracefs = True
                if (cand / "events" / "fuse" / "fuse_request_send").is_dir():
                    self.root = cand
                    return
        self.unavailable = "the kernel has no fuse tracepoints (needs Linux 6.14+ and tracefs)"

    def _write(self, rel: str, value: str) -> None:
        with open(self.root / rel, "w") as f:
            f.write(value)

    def _read(self, rel: str) -> str:
        return (self.root / rel).read_text()

    def start(self, connections: list[int]) -> None:
        self._saved = {"tracing_on": self._read("tracing_on").strip(),
                       "buffer_size_kb": self._read("buffer_size_kb").strip().split()[0]}
        self._write("tracing_on", "0")
        self._write("buffer_size_kb", "32768")
        self._write("trace", "")
        flt = " || ".join(f"connection == {c}" for c in connections)
        for ev in ("fuse_request_send", "fuse_request_end"):
            self._write(f"events/fuse/{ev}/filter", flt)
            self._write(f"events/fuse/{ev}/enable", "1")
        self._write("tracing_on", "1")

    def stop(self) -> tuple[list[tuple], bool]:
        """Events ``(ts, kind, conn, unique, opcode_name, len, error, comm)`` and whether some were lost.

        ``comm`` is the command name of the task the event fired in: for a send,
        the process that made the request.
        """
        self._write("tracing_on", "0")
        for ev in ("fuse_request_send", "fuse_request_end"):
            self._write(f"events/fuse/{ev}/enable", "0")
            self._write(f"events/fuse/{ev}/filter", "0")
        text = self._read("trace")
        self._write("trace", "")
        self._restore()
        lost = False
        m = re.search(r"entries-in-buffer/entries-written: (\d+)/(\d+)", text)
        if m and int(m.group(1)) < int(m.group(2)):
            lost = True
        events = []
        for line in text.splitlines():
            mm = _TRACE_LINE.search(line)
            if not mm:
                continue
            comm, ts, kind = mm.group(1), float(mm.group(3)), mm.group(4)
            conn, uniq = int(mm.group(5)), int(mm.group(6))
            if kind == "send":
                events.append((ts, kind, conn, uniq, mm.group(8).removeprefix("FUSE_"), int(mm.group(9)), 0, comm))
            else:
                events.append((ts, kind, conn, uniq, None, int(mm.group(10)), int(mm.group(11)), comm))
        return events, lost

    def _restore(self) -> None:
        for k, v in self._saved.items():
            with contextlib.suppress(OSError):
                self._write(k, v)
        self._saved = {}

    def close(self) -> None:
        if self.root is not None and self._saved:
            for ev in ("fuse_request_send", "fuse_request_end"):
                with contextlib.suppress(OSError):
                    self._write(f"events/fuse/{ev}/enable", "0")
                    self._write(f"events/fuse/{ev}/filter", "0")
            self._restore()
        if self._mounted_tracefs:
            subprocess.run(["umount", str(self.root or "/sys/kernel/tracing")], stderr=subprocess.DEVNULL)


def fuse_connection(path: Path) -> int:
    """The kernel's dev_t of a FUSE mount, as the tracepoints print it (MKDEV: major << 20 | minor)."""
    st = os.stat(path)
    return (os.major(st.st_dev) << 20) | os.minor(st.st_dev)


def fuse_settings(path: Path) -> dict[str, str]:
    """Read-ahead and background-queue limits the kernel applied to a FUSE mount."""
    st = os.stat(path)
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    out = {}
    for key, p in (("read_ahead_kb", f"/sys/class/bdi/{dev}/read_ahead_kb"),
                   ("max_background", f"/sys/fs/fuse/connections/{os.minor(st.st_dev)}/max_background"),
                   ("congestion_threshold", f"/sys/fs/fuse/connections/{os.minor(st.st_dev)}/congestion_threshold")):
        with contextlib.suppress(OSError):
            out[key] = Path(p).read_text().strip()
    return out


_READ_BUCKETS = (4096, 32768, 131072, 1 << 20, 1 << 40)


def analyze_trace(events: list[tuple]) -> dict:
    """Per-opcode counts, latencies and sizes, the most requests the daemon had at once, and who asked.

    ``events`` as :meth:`FuseTracer.stop` returns them (the trailing ``comm`` is optional).
    """
    pending: dict[tuple[int, int], tuple[float, str]] = {}
    lat: dict[str, list[float]] = collections.defaultdict(list)
    counts: collections.Counter[str] = collections.Counter()
    read_bytes = 0
    read_sizes: collections.Counter[int] = collections.Counter()
    read_max = 0
    inflight = max_inflight = 0
    requesters: collections.Counter[str] = collections.Counter()
    for ev in sorted(events, key=lambda e: e[0]):
        ts, kind, conn, uniq, op, length, err = ev[:7]
        key = (conn, uniq)
        if kind == "send":
            counts[op] += 1
            if len(ev) > 7:
                requesters[ev[7]] += 1
            pending[key] = (ts, op)
            inflight += 1
            max_inflight = max(max_inflight, inflight)
        elif key in pending:
            t0, op = pending.pop(key)
            inflight -= 1
            lat[op].append((ts - t0) * 1e6)
            if op == "READ" and err == 0 and length > 16:
                read_bytes += length - 16
                read_sizes[min(b for b in _READ_BUCKETS if length - 16 <= b)] += 1
                read_max = max(read_max, length - 16)
    ops = {}
    for op, n in counts.most_common():
        ls = sorted(lat.get(op, []))
        ops[op] = {"count": n,
                   "median_us": statistics.median(ls) if ls else None,
                   "p99_us": ls[min(len(ls) - 1, int(len(ls) * 0.99))] if ls else None,
                   "total_ms": sum(ls) / 1000 if ls else None}
    return {"ops": ops, "requests": sum(counts.values()), "max_inflight": max_inflight,
            "read_bytes": read_bytes, "read_sizes": {k: read_sizes[k] for k in _READ_BUCKETS if read_sizes[k]}, "read_max": read_max,
            "unanswered": len(pending), "requesters": dict(requesters.most_common(8))}


class PySpy:
    """``py-spy record`` on a running daemon, stopped with SIGINT; raw collapsed stacks."""

    def __init__(self, pid: int, out: Path, rate: int = 250) -> None:
        self.out = out
        self.rate = rate
        self.proc = subprocess.Popen(
            [str(venv_tool("py-spy")), "record", "-p", str(pid), "-r", str(rate), "-f", "raw", "--nolineno",
             "--nonblocking", "-o", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)  # attach before the workload starts
        if self.proc.poll() is not None:
            raise BenchError(f"py-spy exited at once: {self.proc.stderr.read().decode(errors='replace').strip()}")

    def stop(self) -> collections.Counter[tuple[str, ...]]:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise BenchError("py-spy did not stop") from None
        stacks: collections.Counter[tuple[str, ...]] = collections.Counter()
        if self.out.exists():
            for line in self.out.read_text(errors="replace").splitlines():
                stack, _, n = line.rpartition(" ")
                if stack and n.isdigit():
                    stacks[tuple(stack.split(";"))] += int(n)
        return stacks


class PerfRecord:
    """``perf record`` of one process (user and kernel), summarised by ``perf report``."""

    def __init__(self, pid: int, out: Path, freq: int = 999) -> None:
        self.out = out
        for stale in (out, out.with_name(out.name + ".old")):   # perf would keep the last one as .old
            stale.unlink(missing_ok=True)
        self.proc = subprocess.Popen(["perf", "record", "-q", "-F", str(freq), "-p", str(pid), "-o", str(out)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)
        if self.proc.poll() is not None:
            raise BenchError(f"perf record exited at once: {self.proc.stderr.read().decode(errors='replace').strip()}")

    def stop(self, top: int = 14) -> tuple[str, dict]:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise BenchError("perf record did not stop") from None
        report = {}
        for sort in ("dso", "dso,sym"):
            proc = subprocess.run(["perf", "report", "-i", str(self.out), "--no-children", "--sort", sort,
                                   "--stdio", "-q"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            rows = []
            for line in proc.stdout.decode(errors="replace").splitlines():
                m = re.match(r"\s*([\d.]+)%\s+(.*\S)", line)
                if m:
                    rows.append((float(m.group(1)), re.sub(r"\s+", " ", m.group(2))))
            report[sort] = rows
        lines = ["  perf (user + kernel samples of the daemon): by object: "
                 + ", ".join(f"{name} {pct:.0f}%" for pct, name in report["dso"][:5])]
        lines += [f"    {pct:5.1f}%  {name}" for pct, name in report["dso,sym"][:top]]
        return "\n".join(lines), {"by_dso": report["dso"][:10], "by_symbol": report["dso,sym"][:40]}


def _layer(frame: str) -> str:
    m = re.search(r"\(([^)]*)\)$", frame)
    path = m.group(1) if m else frame
    for key, name in (("nydus_vfs/transport", "transport (fusedev: readv/writev/pread)"),
                      ("nydus_vfs/fuse", "fuse (server, codec)"), ("nydus_vfs/fs", "fs (vfs, rafs)"),
                      ("nydus_vfs/format", "format (bootstrap parsing)"), ("nydus_vfs/storage", "storage"),
                      ("nydus_vfs/utils", "utils (compress, digest, io)"), ("asyncio", "asyncio"),
                      ("uvloop", "uvloop")):
        if key in path:
            return name
    return "other"


def spy_report(stacks: collections.Counter, rate: int, top: int = 12) -> tuple[str, dict]:
    total = sum(stacks.values())
    if not total:
        return "  py-spy recorded no busy samples", {"samples": 0}
    selfc: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    layers: collections.Counter[str] = collections.Counter()
    for stack, n in stacks.items():
        selfc[stack[-1]] += n
        layers[_layer(stack[-1])] += n
        for fr in set(stack):
            incl[fr] += n
    lines = [f"  busy samples: {total} at {rate}/s = {total / rate:.2f} s of daemon time"]
    lines.append("  self time by layer: " + ", ".join(f"{k} {v * 100 / total:.0f}%" for k, v in layers.most_common()))
    lines.append("  top functions by self time (C calls count toward the Python function that made them):")
    for fr, n in selfc.most_common(top):
        lines.append(f"    {n * 100 / total:5.1f}%  self {incl[fr] * 100 / total:5.1f}% incl  {fr}")
    data = {"samples": total, "rate": rate, "layers": dict(layers),
            "self": dict(selfc.most_common(40)), "inclusive": dict(incl.most_common(40))}
    return "\n".join(lines), data


def profile(systems: tuple[str, ...], tree: Path, stats: TreeStats, images: Images, run_dir: Path,
            use_spy: bool, use_perf: bool) -> dict:
    """One traced pass per FUSE system: walk, cold read, warm read.

    The FUSE request trace always; for ours, py-spy (``use_spy``) and, for the
    reads, ``perf record`` (``use_perf``).
    """
    tracer = FuseTracer()
    out: dict = {}
    try:
        if tracer.unavailable:
            log(f"  request trace unavailable: {tracer.unavailable}")
        for name in systems:
            with mount_system(name, tree, images, run_dir) as m:
                settings = fuse_settings(m.path)
                out[name] = {"settings": settings}
                log(f"\n{name}: FUSE mount settings {settings}")
                phases: list[tuple[str, str, Callable[..., Sample]]] = [("walk", "walk", walk),
                                                                         ("read", "read", read_all)]
                if m.has_daemon_cache:
                    phases.append(("read, warm daemon cache", "read-warm", read_all))
                for phase, slug, fn in phases:
                    spy = PySpy(m.pid, run_dir / f"spy-{name}-{slug}.txt") \
                        if use_spy and _ours(name) is not None else None
                    perf = PerfRecord(m.pid, run_dir / f"perf-{name}-{slug}.data") \
                        if use_perf and _ours(name) is not None and slug != "walk" else None
                    if tracer.root is not None:
                        tracer.start([fuse_connection(m.path)])
                    try:
                        sample = fn(m, sample_states=True)
                    finally:
                        events, lost = tracer.stop() if tracer.root is not None else ([], False)
                        stacks = spy.stop() if spy is not None else None
                        perf_out = perf.stop() if perf is not None else None
                    d, st = sample.daemon, sample.states or {}
                    entry = {"seconds": sample.seconds, "daemon": d.__dict__, "states": st}
                    log(f"  {phase}: {sample.seconds:.2f} s wall (traced{' and sampled' if spy else ''}, so "
                        f"slower than the timed runs); daemon: user {d.user:.2f} s, system {d.system:.2f} s, "
                        f"waiting for a CPU {d.runqueue_wait:.2f} s; state samples: running "
                        f"{st.get('R', 0):.0%}, disk wait {st.get('D', 0):.0%}, asleep {st.get('S', 0):.0%}")
                    if events:
                        t = analyze_trace(events)
                        entry["trace"] = t
                        per = stats.entries if phase == "walk" else stats.files
                        unit = "entry" if phase == "walk" else "file"
                        sizes = ", ".join(f"{'>1M' if k > 1 << 20 else human_bytes(k).replace('.0 ', ' ')}: {v}"
                                          for k, v in t["read_sizes"].items())
                        who = ", ".join(f"{c} {n:,}" for c, n in t["requesters"].items())
                        log(f"    {t['requests']:,} FUSE requests = {t['requests'] / per:.2f} per {unit}; "
                            f"most in flight at once: {t['max_inflight']}"
                            + (f"; READ replies up to {sizes} (largest {human_bytes(t['read_max'])})"
                               if sizes else "")
                            + (f"; sent on behalf of {who}" if who else "")
                            + ("; WARNING: trace buffer overflowed, counts are low" if lost else ""))
                        rows = []
                        for op, o in t["ops"].items():
                            extra = ""
                            if op == "READ" and o["count"]:
                                extra = f"avg {t['read_bytes'] / o['count'] / 1024:.0f} KiB"
                            rows.append([op, f"{o['count']:,}", f"{o['count'] / per:.2f}",
                                         "-" if o["median_us"] is None else f"{o['median_us']:.0f}",
                                         "-" if o["p99_us"] is None else f"{o['p99_us']:.0f}",
                                         "-" if o["total_ms"] is None else f"{o['total_ms']:.0f}", extra])
                        log("\n".join("    " + ln for ln in render_table(
                            ["opcode", "count", f"per {unit}", "median µs", "p99 µs", "sum ms", ""], rows).splitlines()))
                    if stacks is not None:
                        text, sdata = spy_report(stacks, spy.rate)
                        entry["py_spy"] = sdata
                        log(text)
                    if perf_out is not None:
                        log(perf_out[0])
                        entry["perf"] = perf_out[1]
                    out[name][phase] = entry
    finally:
        tracer.close()
    return out


# -- main -----------------------------------------------------------------------------------------

def _preflight(systems: tuple[str, ...]) -> None:
    if os.geteuid() != 0:
        raise BenchError("run as root: the benchmark mounts filesystems and drops the page cache")
    if any(s in FUSE_SYSTEMS for s in systems) and not os.path.exists("/dev/fuse"):
        raise BenchError("/dev/fuse is missing (modprobe fuse)")
    if "erofs" in systems:
        with open("/proc/filesystems") as f:
            if "erofs" not in f.read():
                subprocess.run(["modprobe", "erofs"], stderr=subprocess.DEVNULL)
        with open("/proc/filesystems") as f:
            if "erofs" not in f.read():
                raise BenchError("the kernel has no erofs (modprobe erofs failed); drop it with --systems")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tree", default="auto",
                   help="debootstrap, python, auto (debootstrap, else python) or an existing directory")
    p.add_argument("--systems", default=",".join(ALL_SYSTEMS),
                   help=f"comma list of {', '.join(KNOWN_SYSTEMS)} (default: all)")
    p.add_argument("--reps", type=int, default=3, help="repetitions; the tables show medians (default 3)")
    p.add_argument("--squashfs-comp", default="zstd", choices=("zstd", "gzip", "lz4", "xz", "none"))
    p.add_argument("--no-verify", action="store_true",
                   help="skip comparing listings and file checksums with the plain tree (rep 1)")
    p.add_argument("--no-profile", action="store_true", help="skip the traced/sampled pass")
    p.add_argument("--no-py-spy", action="store_true", help="trace requests but do not sample the daemon")
    p.add_argument("--no-perf", action="store_true", help="do not run perf record on our daemon's reads")
    p.add_argument("--profile-systems", default=",".join(PROFILED))
    p.add_argument("--budget", type=float, default=540.0,
                   help="seconds; no new repetition or profile pass starts that would likely end later")
    p.add_argument("--min-mb", type=float, default=200.0, help="refuse a smaller tree (default 200 MB)")
    p.add_argument("--min-files", type=int, default=5000, help="refuse a tree with fewer files (default 5000)")
    p.add_argument("--json", help="write every number to this file")
    args = p.parse_args(argv)

    if args.reps < 1:
        p.error("--reps must be at least 1")
    systems = tuple(s.strip() for s in args.systems.split(",") if s.strip())
    bad = [s for s in systems if s not in KNOWN_SYSTEMS]
    if bad or not systems:
        p.error(f"unknown systems {bad}; choose from {', '.join(KNOWN_SYSTEMS)}")
    profiled = tuple(s for s in args.profile_systems.split(",") if s in systems and s in FUSE_SYSTEMS)
    start = time.perf_counter()
    try:
        _preflight(systems)
        run_dir = cache_root() / "fuse_walk_read" / "run"
        with exclusive_lock(cache_root() / "fuse_walk_read.lock"), signals_raise():
            sweep_mounts(run_dir, log)
            shutil.rmtree(run_dir / "work", ignore_errors=True)   # blob caches of a killed run
            tree, stats, desc = prepare_tree(args.tree, min_bytes=int(args.min_mb * 1e6),
                                             min_files=args.min_files, log=log)
            log(f"tree: {tree}: {stats.describe()} ({desc})")
            images = build_images(tree, stats, desc, systems, args.squashfs_comp)
            for comp, d in images.rafs.items():
                bt = d / "build_seconds"
                log(f"RAFS v6 {comp}: bootstrap {human_bytes((d / 'bootstrap').stat().st_size)}, blobs "
                    f"{human_bytes(sum(f.stat().st_size for f in (d / 'blobs').iterdir()))}"
                    + (f", built in {bt.read_text().strip()} s" if bt.exists() else ""))
            res = Results()
            rep_times: list[float] = []
            for rep in range(args.reps):
                elapsed = time.perf_counter() - start
                if rep_times and elapsed + max(rep_times) > args.budget:
                    log(f"stopping after {rep} repetitions to stay within the {args.budget:.0f} s budget")
                    break
                t = time.perf_counter()
                one_rep(rep, systems, tree, images, run_dir, res, verify=(rep == 0 and not args.no_verify))
                rep_times.append(time.perf_counter() - t)
            table, ratios, cpu_table, data = summary(systems, res, stats)
            log(f"\nmedians of {len(rep_times)} repetitions (page cache dropped before each measurement; "
                f"{stats.entries:,} entries walked, {human_bytes(stats.bytes)} in {stats.files:,} files read)")
            log(table)
            if any(_ours(s) is not None for s in systems):
                log("\nratios (ours / reference; below 1.00x means ours is faster; 'warm' = ours with "
                    "its cache warm against the reference's only read)")
                log(ratios)
            if cpu_table:
                log("\nwhere the FUSE daemons' time goes (medians; user/system from /proc/PID/stat, "
                    "on-CPU and run-queue wait from schedstat)")
                log(cpu_table)
            for prob in res.problems:
                log(f"VERIFY: {prob}")
            if not args.no_verify and not res.problems:
                log("verified: listings (type, mode, size, owner, link target) and sha256 of every file "
                    "match the plain tree")
            prof = {}
            if not args.no_profile and profiled:
                elapsed = time.perf_counter() - start
                per_system = (max(rep_times) / len(systems)) * 2 if rep_times else 30.0
                if elapsed + per_system * len(profiled) > args.budget:
                    log(f"\nskipping the profile pass: it would exceed the {args.budget:.0f} s budget")
                else:
                    use_spy = not args.no_py_spy
                    if use_spy:
                        try:
                            venv_tool("py-spy")
                        except BenchError:
                            log("\npy-spy is not installed (.venv/bin/pip install py-spy): not sampling")
                            use_spy = False
                    use_perf = not args.no_perf and shutil.which("perf") is not None
                    log("\n== profile: FUSE request trace" + (" + py-spy" if use_spy else "")
                        + (" + perf" if use_perf else "") + " on the daemons")
                    try:
                        prof = profile(profiled, tree, stats, images, run_dir, use_spy, use_perf)
                    except BenchError as exc:
                        # The timed results above stand; say why the profile is missing.
                        log(f"profile pass failed: {exc}")
            if args.json:
                Path(args.json).write_text(json.dumps({
                    "tree": {"path": str(tree), "description": desc, "stats": stats.__dict__},
                    "systems": data, "problems": res.problems, "profile": prof,
                    "total_seconds": time.perf_counter() - start}, indent=1, default=str))
            log(f"\ntotal {time.perf_counter() - start:.0f} s")
            return 1 if res.problems else 0
    except BenchError as exc:
        log(f"fuse_walk_read: {exc}")
        return 1
    except KeyboardInterrupt as exc:
        log(f"fuse_walk_read: interrupted ({exc or 'SIGINT'}); mounts were taken down")
        return 130


if __name__ == "__main__":
    sys.exit(main())
