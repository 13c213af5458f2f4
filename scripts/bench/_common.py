"""Helpers shared by the benchmark scripts in ``scripts/bench/``.

What lives here, so every script measures the same way:

* **Where things go.**  :data:`PROJECT_ROOT`, :func:`cache_root` (``.cache/bench``,
  gitignored; ``NYDUS_BENCH_CACHE`` overrides it) and :func:`venv_tool`.
* **The test tree.**  :func:`prepare_tree` builds (once) and caches a large real
  tree: a Debian root made with ``debootstrap`` or, when the mirror cannot be
  reached, a copy of the Python standard library.  :func:`tree_stats` counts it.
* **Cached build products.**  :func:`cached_dir` rebuilds a directory only when
  the recipe that made it changed.
* **Measuring.**  :func:`drop_caches`, :func:`cpu_times` (user, system, on-CPU
  and run-queue wait of a daemon), :class:`StateSampler` (running / disk wait /
  asleep), :func:`children_cpu_seconds`, :func:`median`, :func:`ratio`,
  :func:`render_table`.
* **Not leaving a mess.**  :func:`signals_raise` turns SIGTERM/SIGHUP into an
  exception so ``finally`` blocks run; :func:`unmount`, :func:`mounts_under`
  and :func:`sweep_mounts` take down mounts, including those a killed
  earlier run left behind; :func:`exclusive_lock` keeps two runs apart.

Everything raises :class:`BenchError` with a message meant for the operator;
scripts catch it at the top and print it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import statistics
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = [
    "PROJECT_ROOT",
    "MIN_TREE_BYTES",
    "MIN_TREE_FILES",
    "BenchError",
    "TreeStats",
    "cache_root",
    "venv_tool",
    "run",
    "tree_stats",
    "debian_mirror",
    "prepare_tree",
    "cached_dir",
    "files_digest",
    "drop_caches",
    "CpuTimes",
    "cpu_times",
    "StateSampler",
    "children_cpu_seconds",
    "median",
    "ratio",
    "render_table",
    "signals_raise",
    "is_mountpoint",
    "mounts_under",
    "unmount",
    "sweep_mounts",
    "exclusive_lock",
    "human_bytes",
]

PROJECT_ROOT = Path(__file__).resolve().parents[2]

#: The issue's floor for "a large real tree".
MIN_TREE_BYTES = 200 * 10**6
MIN_TREE_FILES = 5000

_DEFAULT_MIRROR = "http://deb.debian.org/debian"
_SUITE = "bookworm"


class BenchError(Exception):
    """A benchmark could not run or produced something wrong; the message says what and why."""


def cache_root() -> Path:
    """Directory for cached trees and images (created on demand)."""
    root = Path(os.environ.get("NYDUS_BENCH_CACHE") or PROJECT_ROOT / ".cache" / "bench")
    root.mkdir(parents=True, exist_ok=True)
    return root


def venv_tool(name: str) -> Path:
    """A console script of the project venv (``nydusd``, ``nydus-image``, ``py-spy``).

    Falls back to the directory of the running interpreter, so the scripts also
    work from another venv that has the package installed.
    """
    for d in (PROJECT_ROOT / ".venv" / "bin", Path(sys.executable).parent):
        p = d / name
        if p.is_file() and os.access(p, os.X_OK):
            return p
    raise BenchError(f"{name} not found in {PROJECT_ROOT / '.venv' / 'bin'} or next to {sys.executable}")


def run(cmd: Sequence[str | os.PathLike], *, what: str | None = None, timeout: float | None = None,
        **kw) -> subprocess.CompletedProcess:
    """Run ``cmd`` to completion; BenchError naming the command and its stderr tail on failure."""
    argv = [os.fspath(c) for c in cmd]
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    try:
        proc = subprocess.run(argv, timeout=timeout, **kw)
    except FileNotFoundError:
        raise BenchError(f"{what or argv[0]}: {argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what or argv[0]}: no result after {timeout:.0f} s") from None
    if proc.returncode != 0:
        err = proc.stderr if isinstance(proc.stderr, (bytes, str)) else b""
        if isinstance(err, bytes):
            err = err.decode(errors="replace")
        tail = " | ".join(err.strip().splitlines()[-4:])
        raise BenchError(f"{what or ' '.join(argv)} failed with exit status {proc.returncode}"
                         + (f": {tail}" if tail else ""))
    return proc


# -- the tree -----------------------------------------------------------------------------

@dataclass(frozen=True)
class TreeStats:
    """Counts of a tree, by ``lstat`` (symlinks are not followed)."""

    files: int
    dirs: int
    symlinks: int
    others: int
    bytes: int  # apparent size of the regular files

    @property
    def entries(self) -> int:
        return self.files + self.dirs + self.symlinks + self.others

    def describe(self) -> str:
        return (f"{human_bytes(self.bytes)} in {self.files:,} files, {self.dirs:,} directories, "
                f"{self.symlinks:,} symlinks, {self.others:,} other")


def tree_stats(root: str | os.PathLike) -> TreeStats:
    files = dirs = links = others = size = 0
    stack = [os.fspath(root)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                if e.is_symlink():
                    links += 1
                elif e.is_dir(follow_symlinks=False):
                    dirs += 1
                    stack.append(e.path)
                elif e.is_file(follow_symlinks=False):
                    files += 1
                    size += e.stat(follow_symlinks=False).st_size
                else:
                    others += 1
    return TreeStats(files, dirs, links, others, size)


def debian_mirror(paths: Iterable[str] = ("/etc/apt/sources.list", "/etc/apt/sources.list.d")) -> str:
    """The first plain Debian mirror URL apt is configured with (not the security archive)."""
    candidates: list[str] = []
    for p in paths:
        files = sorted(Path(p).glob("*")) if os.path.isdir(p) else [Path(p)]
        for f in files:
            try:
                text = f.read_text(errors="replace")
            except OSError:
                continue
            for line in text.splitlines():
                words = line.split("#", 1)[0].split()
                if words[:1] == ["deb"]:
                    # deb [options] URL suite components
                    urls = [w for w in words[1:] if "://" in w]
                    candidates += urls[:1]
                elif words[:1] == ["URIs:"]:
                    candidates += words[1:]
    for url in candidates:
        if "security" not in url and url.startswith(("http://", "https://")):
            return url.rstrip("/")
    return _DEFAULT_MIRROR


def _python_stdlib() -> Path:
    return Path(sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_prefix})["stdlib"])


def _build_debootstrap(dest: Path, log: Callable[[str], None]) -> str:
    mirror = debian_mirror()
    # python3 on top of minbase: minbase alone is ~190 MB, just under the floor.
    cmd = ["debootstrap", "--variant=minbase", "--include=python3", _SUITE, str(dest), mirror]
    log(f"  $ {' '.join(cmd)}   (about a minute)")
    run(cmd, what="debootstrap", timeout=900)
    return f"debootstrap --variant=minbase --include=python3 {_SUITE} ({mirror})"


def _build_python_copy(dest: Path, log: Callable[[str], None]) -> str:
    src = _python_stdlib()
    log(f"  copying the Python standard library {src} (without site-packages)")
    shutil.copytree(src, dest, symlinks=True,
                    ignore=lambda d, names: ["site-packages", "dist-packages"] if Path(d) == src else [])
    return f"copy of {src} without site-packages"


_TREE_BUILDERS = {"debootstrap": _build_debootstrap, "python": _build_python_copy}


def prepare_tree(kind: str = "auto", *, min_bytes: int = MIN_TREE_BYTES, min_files: int = MIN_TREE_FILES,
                 log: Callable[[str], None] = print) -> tuple[Path, TreeStats, str]:
    """The benchmark tree: ``(path, stats, description)``.

    ``kind`` is ``debootstrap``, ``python``, ``auto`` (debootstrap, falling back
    to python when it fails) or the path of an existing directory, used as is.
    Built trees are cached as ``<cache>/trees/<kind>`` with a ``.json`` stamp
    next to them, and reused when the stamp is there.  A tree smaller than
    ``min_bytes``/``min_files`` (regular files) is refused.
    """
    if kind not in ("auto", *_TREE_BUILDERS):
        path = Path(kind).resolve()
        if not path.is_dir():
            raise BenchError(f"tree {kind}: not a directory")
        stats = tree_stats(path)
        desc = f"directory {path}"
    else:
        errors = []
        for k in (("debootstrap", "python") if kind == "auto" else (kind,)):
            try:
                path, stats, desc = _cached_tree(k, log)
                break
            except BenchError as exc:
                errors.append(f"{k}: {exc}")
                log(f"  tree {k} unavailable: {exc}")
        else:
            raise BenchError("no benchmark tree could be made: " + "; ".join(errors))
    if stats.bytes < min_bytes or stats.files < min_files:
        raise BenchError(f"tree {path} is too small: {stats.describe()} (need at least "
                         f"{human_bytes(min_bytes)} and {min_files:,} files)")
    return path, stats, desc


def _cached_tree(kind: str, log: Callable[[str], None]) -> tuple[Path, TreeStats, str]:
    trees = cache_root() / "trees"
    trees.mkdir(exist_ok=True)
    dest, stamp = trees / kind, trees / f"{kind}.json"
    if dest.is_dir() and stamp.is_file():
        meta = json.loads(stamp.read_text())
        return dest, TreeStats(**meta["stats"]), meta["description"]
    partial = trees / f"{kind}.partial"
    for p in (dest, partial):
        if p.exists():
            shutil.rmtree(p)
    log(f"making the benchmark tree ({kind}) under {trees}")
    try:
        desc = _TREE_BUILDERS[kind](partial, log)
        stats = tree_stats(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    partial.rename(dest)
    stamp.write_text(json.dumps({"description": desc, "stats": asdict(stats), "made": time.time()}))
    log(f"  tree: {stats.describe()}")
    return dest, stats, desc


def files_digest(paths: Iterable[str | os.PathLike]) -> str:
    """A short sha256 over the contents of ``paths`` (used to key caches on source code)."""
    h = hashlib.sha256()
    for p in sorted(os.fspath(p) for p in paths):
        h.update(p.encode() + b"\0")
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def cached_dir(path: Path, recipe: dict, build: Callable[[Path], None],
               log: Callable[[str], None] = print) -> Path:
    """``path``, rebuilt with ``build(tmp)`` unless its stamp holds the same ``recipe``.

    ``recipe`` must be JSON-serialisable and say everything the result depends
    on (inputs, tool versions, options).  A failed build leaves nothing behind.
    """
    stamp = path / ".recipe.json"
    want = json.dumps(recipe, sort_keys=True)
    if stamp.is_file() and stamp.read_text() == want:
        return path
    partial = path.with_name(path.name + ".partial")
    for p in (path, partial):
        if p.exists():
            shutil.rmtree(p)
    partial.mkdir(parents=True)
    log(f"building {path.name} ...")
    t = time.perf_counter()
    try:
        build(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    (partial / ".recipe.json").write_text(want)
    partial.rename(path)
    log(f"  {path.name} built in {time.perf_counter() - t:.1f} s")
    return path


# -- measuring -----------------------------------------------------------------------------

def drop_caches() -> None:
    """Write back dirty pages, then drop the page cache, dentries and inodes (needs root)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as exc:
        raise BenchError(f"cannot drop caches: {exc.strerror} (run as root)") from None


_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuTimes:
    """CPU accounting of one process (all its threads), in seconds.

    ``user``/``system`` come from ``/proc/PID/stat`` (clock ticks, 10 ms
    granularity); ``on_cpu``/``runqueue_wait`` from the scheduler's
    ``/proc/PID/task/*/schedstat`` (nanoseconds): ``runqueue_wait`` is time the
    process was ready to run but another task had the CPU.
    """

    user: float
    system: float
    on_cpu: float
    runqueue_wait: float

    def __sub__(self, other: "CpuTimes") -> "CpuTimes":
        return CpuTimes(self.user - other.user, self.system - other.system,
                        self.on_cpu - other.on_cpu, self.runqueue_wait - other.runqueue_wait)

    @property
    def total(self) -> float:
        return self.user + self.system


def cpu_times(pid: int) -> CpuTimes:
    """A snapshot of :class:`CpuTimes` for ``pid``; BenchError if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        run_ns = wait_ns = 0
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                    fields = f.read().split()
            except FileNotFoundError:  # a thread that just exited
                continue
            run_ns += int(fields[0])
            wait_ns += int(fields[1])
    except OSError as exc:
        raise BenchError(f"process {pid} is gone ({exc.strerror})") from None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    stat = data[data.rindex(b")") + 2:].split()
    return CpuTimes(int(stat[11]) / _CLK_TCK, int(stat[12]) / _CLK_TCK, run_ns / 1e9, wait_ns / 1e9)


class StateSampler:
    """Samples what a process is doing, every ``interval`` seconds, on a thread.

    Each sample is ``R`` if any thread is running or runnable, else ``D`` if
    any is in uninterruptible sleep (in practice: waiting for the disk), else
    ``S`` (asleep: for a FUSE daemon, waiting for the next request).
    ``fractions()`` gives the share of samples of each.
    """

    def __init__(self, pid: int, interval: float = 0.002) -> None:
        import threading

        self.pid = pid
        self.interval = interval
        self.counts: dict[str, int] = {"R": 0, "D": 0, "S": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="state-sampler", daemon=True)

    def __enter__(self) -> "StateSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        base = f"/proc/{self.pid}/task"
        while not self._stop.wait(self.interval):
            states = set()
            try:
                for task in os.listdir(base):
                    with contextlib.suppress(OSError):
                        with open(f"{base}/{task}/stat", "rb") as f:
                            data = f.read()
                        states.add(data[data.rindex(b")") + 2:data.rindex(b")") + 3].decode())
            except OSError:
                return
            key = "R" if "R" in states else "D" if "D" in states else "S"
            self.counts[key] += 1

    def fractions(self) -> dict[str, float]:
        n = sum(self.counts.values())
        return {k: (v / n if n else 0.0) for k, v in self.counts.items()}


def children_cpu_seconds() -> float:
    """User + system CPU time of this process's waited-for children so far."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def rafs_v6_image(tree: Path) -> tuple[Path, str]:
    """``tree`` built as one RAFS v6 image (zstd, 1 MiB chunks), cached: (its dir, the blob id).

    The dir holds ``image.boot`` and the blob file named by its id; the remote
    read benchmarks share it, so running several builds it once.
    """
    from nydus_vfs.builder import BuildOptions, build

    def make(out: Path) -> None:
        build(str(tree), BuildOptions(fs_version=6, bootstrap=str(out / "image.boot"), blob_dir=str(out)))

    out = cached_dir(cache_root() / "images" / "v6-zstd", {"tree": str(tree), "v": 1}, make)
    blobs = [p.name for p in out.iterdir() if p.name != "image.boot" and not p.name.startswith(".")]
    if len(blobs) != 1:
        raise BenchError(f"expected one blob in {out}, found {blobs}")
    return out, blobs[0]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM ``proc`` (a daemon the bench started), wait ``timeout`` s, then SIGKILL and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def median(values: Sequence[float]) -> float:
    if not values:
        raise BenchError("no measurement to take the median of")
    return statistics.median(values)


def ratio(a: float | None, b: float | None) -> str:
    """``a/b`` as ``1.23x``; ``-`` when either side is missing."""
    if a is None or b is None or b <= 0:
        return "-"
    return f"{a / b:.2f}x"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def render_table(headers: Sequence[str], rows: Iterable[Sequence[object]], *, markdown: bool = False) -> str:
    """Rows as aligned text columns (first column left, the rest right), or a Markdown table."""
    rows = [[str(c) for c in r] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([fmt([str(h) for h in headers]), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


# -- cleanup ----------------------------------------------------------------------------------

@contextlib.contextmanager
def signals_raise(signals: Sequence[int] = (signal.SIGTERM, signal.SIGHUP)) -> Iterator[None]:
    """Within the block, ``signals`` raise KeyboardInterrupt so cleanup code runs.

    SIGINT already does that; a benchmark killed by ``timeout`` or a closed
    terminal would otherwise leave its mounts behind.
    """
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    old = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(field):
        code = field[i + 1:i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _mountpoints() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [_unescape_mountinfo(line.split()[4]) for line in f if line.strip()]


def is_mountpoint(path: str | os.PathLike) -> bool:
    """Whether something is mounted exactly at ``path`` (by the mount table, no stat)."""
    return os.path.realpath(path) in _mountpoints()


def mounts_under(root: str | os.PathLike) -> list[str]:
    """Mountpoints at or below ``root``, deepest first (the order to unmount them in)."""
    r = os.path.realpath(root)
    found = [m for m in _mountpoints() if m == r or m.startswith(r.rstrip("/") + "/")]
    return sorted(set(found), key=lambda m: m.count("/"), reverse=True)


def unmount(path: str | os.PathLike, *, timeout: float = 10.0) -> None:
    """Unmount ``path``; if it stays busy, detach it lazily.  No error if it is not mounted."""
    p = os.path.realpath(path)
    deadline = time.monotonic() + timeout
    while is_mountpoint(p):
        proc = subprocess.run(["umount", p], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if proc.returncode == 0 or not is_mountpoint(p):
            return
        if time.monotonic() > deadline:
            subprocess.run(["umount", "-l", p], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if is_mountpoint(p):
                raise BenchError(f"cannot unmount {p}: {proc.stderr.decode(errors='replace').strip()}")
            return
        time.sleep(0.2)


def sweep_mounts(root: str | os.PathLike, log: Callable[[str], None] = print) -> None:
    """Unmount whatever an earlier, killed run left mounted under ``root``."""
    for m in mounts_under(root):
        log(f"unmounting {m}, left over from an earlier run")
        unmount(m, timeout=2.0)


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path``; BenchError at once if another run holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BenchError(f"another benchmark run holds {path}; wait for it to finish") from None
        yield
    finally:
        os.close(fd)
