#!/usr/bin/env python3
"""Builder benchmark: ``nydus-image create`` against ``mkfs.erofs`` on the same large real tree.

Both tools turn the same directory (a ``debootstrap`` Debian root cached under
``.cache/bench``, see ``_common.prepare_tree``) into an image, at matching
compression, in the same run:

* ``none``:  ``nydus-image create --fs-version 6 --compressor none`` (bootstrap +
  blob in one output directory) against ``mkfs.erofs`` without compression;
* ``lz4``:   ``--compressor lz4_block`` against ``mkfs.erofs -zlz4``;
* ``zstd`` (only with ``--zstd``): ``--compressor zstd`` against ``mkfs.erofs
  -zlz4hc``, each tool's stronger codec (erofs-utils 1.5 has no zstd), so the
  pairing is "best ratio each offers", not like for like.

Where things live.  By default the tree is first copied (``cp -a``) into a
scratch directory under ``--out-dir`` (default ``/dev/shm``), and both tools
write their outputs there too: source and outputs on tmpfs, so the runs
measure the tools and not the disk, and nothing can be evicted between runs.
``--source cache`` reads the cached tree in place instead (on disk), reading
all of it right before every run (``--cache warm``) or dropping the page cache
(``--cache drop``, root).  Ours runs as the installed console script, with
Python's bytecode cache enabled (under ``.cache/bench/pycache``) as in any
installed package.

Each case runs ``--runs`` times (default 3), the tools alternating and taking
turns to go first, every run into a fresh empty directory.  Wall time and the
children's CPU time (user + system, all threads) are measured around the
process; the table shows medians and the ratios ours/mkfs.erofs of throughput
(source bytes per wall second) and of output size.  Ours also reports its own
phases (``--output-json`` trace).  ``--baseline REV`` adds a third contestant:
our builder as of git revision ``REV`` (``git archive``, run from a scratch
copy), for before/after figures taken in the same run.  Ours is checked once
per case with ``nydus-image check``.

    .venv/bin/python scripts/bench/build.py                      # about 1 min on 2 vCPUs
    .venv/bin/python scripts/bench/build.py --baseline HEAD --runs 5 --markdown
    .venv/bin/python scripts/bench/build.py --profile lz4        # where ours spends its time
    .venv/bin/python scripts/bench/build.py --primitives         # GIL release of digest/compress

``--profile CASE`` builds once in-process under cProfile and prints the
builder's phase timings and the top functions (main thread only: cProfile does
not see the workers).  ``--primitives`` runs the check that blake3/sha256/
zstd/lz4 release the GIL on chunk-sized buffers (1 vs N threads), which the
parallel chunker relies on.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from _common import (
    PROJECT_ROOT,
    BenchError,
    TreeStats,
    cache_root,
    children_cpu_seconds,
    drop_caches,
    exclusive_lock,
    human_bytes,
    median,
    prepare_tree,
    ratio,
    render_table,
    run,
    signals_raise,
    venv_tool,
)

#: case -> (our --compressor, mkfs.erofs arguments)
CASES = {
    "none": ("none", []),
    "lz4": ("lz4_block", ["-zlz4"]),
    "zstd": ("zstd", ["-zlz4hc"]),
}
_PEER = {"none": "mkfs.erofs", "lz4": "mkfs.erofs -zlz4", "zstd": "mkfs.erofs -zlz4hc"}


def log(msg: str = "") -> None:
    print(msg, flush=True)


@dataclass
class Sample:
    wall: float
    cpu: float
    size: int
    phases: dict[str, float] = field(default_factory=dict)


@dataclass
class CaseResult:
    ours: list[Sample] = field(default_factory=list)
    peer: list[Sample] = field(default_factory=list)
    base: list[Sample] = field(default_factory=list)
    ours_trace: list[Sample] = field(default_factory=list)   # the extra --output-json runs
    base_trace: list[Sample] = field(default_factory=list)


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.suffix != ".json")


def prewarm(tree: Path) -> None:
    """Read every regular file of ``tree`` once so the source is in the page cache."""
    buf = bytearray(1 << 20)
    stack = [os.fspath(tree)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                elif e.is_file(follow_symlinks=False):
                    try:
                        fd = os.open(e.path, os.O_RDONLY | os.O_NOFOLLOW)
                    except OSError:
                        continue
                    try:
                        with open(fd, "rb", buffering=0, closefd=False) as f:
                            while f.readinto(buf):
                                pass
                    finally:
                        os.close(fd)


def python_env(src: Path | None = None) -> dict[str, str]:
    """The environment for our tool: Python's bytecode cache on, as in any installed package.

    Shells that export PYTHONDONTWRITEBYTECODE would otherwise make every run
    compile the whole package again (about 0.1 s of pure start-up cost).  The
    cache goes under the benchmark cache, not into the source tree.  ``src``
    puts another copy of the package first on the path (``--baseline``).
    """
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = os.fspath(cache_root() / "pycache")
    if src is not None:
        env["PYTHONPATH"] = os.fspath(src) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _timed(cmd: list[str], what: str, env: dict[str, str] | None = None) -> tuple[float, float]:
    cpu0 = children_cpu_seconds()
    t0 = time.perf_counter()
    run(cmd, what=what, timeout=1800, env=env)
    return time.perf_counter() - t0, children_cpu_seconds() - cpu0


def run_ours(tree: Path, out: Path, compressor: str, src: Path | None = None, trace: bool = False) -> Sample:
    """One timed ``nydus-image create``; with ``trace``, also its ``--output-json`` phase times.

    Timed runs go without ``--output-json``: writing it asks git for the
    version (two subprocesses), a cost mkfs.erofs does not pay.
    """
    out.mkdir()
    trace_file = out / "trace.json"
    cmd = [os.fspath(venv_tool("nydus-image")), "create", "--log-level", "warn", "--fs-version", "6",
           "--compressor", compressor, "--bootstrap", os.fspath(out / "bootstrap"), "--blob-dir", os.fspath(out)]
    cmd += ["--output-json", os.fspath(trace_file)] if trace else []
    wall, cpu = _timed(cmd + [os.fspath(tree)], f"nydus-image create --compressor {compressor}", python_env(src))
    phases = {}
    if trace:
        try:
            phases = json.loads(trace_file.read_text())["trace"]["consumed_time"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return Sample(wall, cpu, _dir_size(out), phases)


def run_peer(tree: Path, out: Path, args: list[str]) -> Sample:
    out.mkdir()
    image = out / "image.erofs"
    wall, cpu = _timed(["mkfs.erofs", "--quiet", *args, os.fspath(image), os.fspath(tree)],
                       "mkfs.erofs " + " ".join(args))
    return Sample(wall, cpu, image.stat().st_size)


def check_ours(out: Path) -> str:
    proc = run([venv_tool("nydus-image"), "check", "--blob-dir", out, out / "bootstrap"],
               what="nydus-image check", env=python_env())
    tail = (proc.stdout or b"").decode(errors="replace").strip().splitlines()
    return " ".join(tail[-1].split()) if tail else "ok"


def peer_version() -> str:
    proc = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "erofs-utils"],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    return proc.stdout.decode().strip() or "unknown"


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def fs_type(path: Path) -> str:
    return subprocess.run(["stat", "-f", "-c", "%T", os.fspath(path)], stdout=subprocess.PIPE,
                          text=True).stdout.strip() or "unknown"


def baseline_source(rev: str, scratch: Path) -> Path:
    """Our package as of git ``rev``, unpacked into ``scratch`` (git state is not touched)."""
    dest = scratch / "baseline"
    dest.mkdir()
    archive = run(["git", "-C", PROJECT_ROOT, "archive", "--format=tar", rev, "src"],
                  what=f"git archive {rev}").stdout
    run(["tar", "-x", "-C", dest], what="tar -x", input=archive)
    src = dest / "src"
    if not (src / "nydus_vfs" / "builder").is_dir():
        raise BenchError(f"revision {rev} has no src/nydus_vfs/builder")
    return src


def measure(tree: Path, stats: TreeStats, cases: list[str], runs: int, out_root: Path, warm: str | None,
            verify: bool, base_src: Path | None) -> dict[str, CaseResult]:
    results = {c: CaseResult() for c in cases}
    # Fill the bytecode caches once (untimed).
    run([venv_tool("nydus-image"), "--version"], what="nydus-image --version", env=python_env())
    if base_src is not None:
        run([venv_tool("nydus-image"), "--version"], what="nydus-image --version", env=python_env(base_src))
    who_all = ["ours", "peer"] + (["base"] if base_src is not None else [])
    names = {"ours": "ours", "peer": "", "base": "ours (baseline)"}
    for r in range(runs):
        for case in cases:
            compressor, peer_args = CASES[case]
            # Rotate who goes first, so no tool always follows the same one.
            order = who_all[r % len(who_all):] + who_all[:r % len(who_all)]
            for who in order:
                out = out_root / f"{case}-{who}"
                shutil.rmtree(out, ignore_errors=True)
                if warm == "drop":
                    drop_caches()
                elif warm == "warm":
                    prewarm(tree)
                if who == "peer":
                    s = run_peer(tree, out, peer_args)
                else:
                    s = run_ours(tree, out, compressor, base_src if who == "base" else None)
                    if verify and r == 0:
                        log(f"  check ({case}, {names[who]}): {check_ours(out)}")
                getattr(results[case], who).append(s)
                log(f"  run {r + 1} {case:<5} {names[who] or _PEER[case]:<19} "
                    f"{s.wall:6.2f} s wall {s.cpu:6.2f} s cpu {stats.bytes / s.wall / 1e6:7.1f} MB/s "
                    f"{human_bytes(s.size):>10}  (load {loadavg()})")
                shutil.rmtree(out, ignore_errors=True)
    # One more (untimed for the ratios) run of ours per case, for its phase times.
    for case in cases:
        for who in [w for w in who_all if w != "peer"]:
            out = out_root / f"{case}-{who}-trace"
            if warm == "drop":
                drop_caches()
            elif warm == "warm":
                prewarm(tree)
            s = run_ours(tree, out, CASES[case][0], base_src if who == "base" else None, trace=True)
            getattr(results[case], who + "_trace").append(s)
            shutil.rmtree(out, ignore_errors=True)
    return results


def summarise(results: dict[str, CaseResult], stats: TreeStats, markdown: bool) -> tuple[str, str, dict]:
    rows, phase_rows, data = [], [], {}
    for case, res in results.items():
        pw, pc, psz = median([s.wall for s in res.peer]), median([s.cpu for s in res.peer]), res.peer[-1].size
        contestants = [("ours", res.ours, res.ours_trace)]
        contestants += [("ours (baseline)", res.base, res.base_trace)] if res.base else []
        data[case] = {"peer": [s.__dict__ for s in res.peer]}
        for label, samples, traced in contestants:
            ow, oc, osz = median([s.wall for s in samples]), median([s.cpu for s in samples]), samples[-1].size
            rows.append([
                f"{case}: {label} vs {_PEER[case]}",
                f"{stats.bytes / ow / 1e6:.0f} / {stats.bytes / pw / 1e6:.0f} MB/s",
                f"{ow:.2f} / {pw:.2f} s",
                f"{oc:.2f} / {pc:.2f} s",
                ratio(pw, ow),
                ratio(pc, oc),
                f"{human_bytes(osz)} / {human_bytes(psz)}",
                ratio(osz, psz),
            ])
            for t in traced:
                load = t.phases.get("build_tree_and_dump_blob", 0.0)
                boot = t.phases.get("dump_bootstrap", 0.0)
                total = t.phases.get("total_build", load + boot)
                phase_rows.append([f"{case}: {label}", f"{t.wall:.2f} s", f"{t.wall - total:.2f} s",
                                   f"{load:.2f} s", f"{boot:.2f} s", f"{total - load - boot:.2f} s"])
            data[case]["baseline" if label != "ours" else "ours"] = {
                "samples": [s.__dict__ for s in samples], "traced": [s.__dict__ for s in traced],
                "throughput_ratio": pw / ow, "cpu_ratio": pc / oc, "size_ratio": osz / psz}
    headers = ["case", "throughput ours / peer", "wall ours / peer", "cpu ours / peer",
               "throughput ratio", "cpu-efficiency ratio", "size ours / peer", "size ratio"]
    phase_headers = ["ours", "wall", "start-up + exit", "walk + chunk data", "bootstrap", "rest"]
    return (render_table(headers, rows, markdown=markdown),
            render_table(phase_headers, phase_rows, markdown=markdown), data)


def profile(tree: Path, case: str, out_root: Path, top: int) -> None:
    """One in-process build under cProfile: phase timings and the top functions by own time."""
    sys.path.insert(0, os.fspath(PROJECT_ROOT / "src"))
    from nydus_vfs.builder import BuildOptions, build
    from nydus_vfs.format.types import Compressor

    out = out_root / f"profile-{case}"
    out.mkdir()
    opts = BuildOptions(fs_version=6, compressor=Compressor.from_cli(CASES[case][0]),
                        bootstrap=os.fspath(out / "bootstrap"), blob_dir=os.fspath(out))
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    try:
        result = build(os.fspath(tree), opts)
    finally:
        prof.disable()
        shutil.rmtree(out, ignore_errors=True)
    log(f"in-process build ({case}) under cProfile: {time.perf_counter() - t0:.2f} s; phases: "
        + ", ".join(f"{k} {v:.2f} s" for k, v in result.trace.items()))
    for key in ("tottime", "cumulative"):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).strip_dirs().sort_stats(key).print_stats(top)
        log(f"\n-- by {key} --")
        log("\n".join(line for line in s.getvalue().splitlines()[6:] if line.strip()))


# -- primitives (GIL release) -------------------------------------------------------------

def primitives(workers: int, chunk_size: int, count: int) -> None:
    sys.path.insert(0, os.fspath(PROJECT_ROOT / "src"))
    from nydus_vfs.format.types import Compressor, Digester
    from nydus_vfs.utils import compress, digest_bytes

    # Half text, half random: compressible but not trivially so.
    chunks = [(b"%016x" % i * (chunk_size // 32 + 1))[:chunk_size // 2] + os.urandom(chunk_size - chunk_size // 2)
              for i in range(count)]
    cases = {
        "blake3": lambda d: digest_bytes(Digester.BLAKE3, d),
        "sha256": lambda d: digest_bytes(Digester.SHA256, d),
        "zstd": lambda d: compress(d, Compressor.ZSTD),
        "lz4_block": lambda d: compress(d, Compressor.LZ4_BLOCK),
    }
    log(f"primitives on {count} x {chunk_size // 1024} KiB chunks (load {loadavg()})")
    log(f"  {'op':<10} {'1 thread':>12} {f'{workers} threads':>12} {'speedup':>8}")
    for name, fn in cases.items():
        times = []
        for n in (1, workers):
            with ThreadPoolExecutor(n) as ex:
                t = time.perf_counter()
                list(ex.map(fn, chunks))
                times.append(time.perf_counter() - t)
        mbs = [count * chunk_size / t / 1e6 for t in times]
        log(f"  {name:<10} {mbs[0]:>9.0f} MB/s {mbs[1]:>9.0f} MB/s {times[0] / times[1]:>7.2f}x")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tree", default="auto",
                   help="debootstrap, python, auto (debootstrap, else python) or an existing directory")
    p.add_argument("--runs", type=int, default=3, help="runs per tool and case; tables show medians (default 3)")
    p.add_argument("--zstd", action="store_true", help="also compare zstd against mkfs.erofs -zlz4hc")
    p.add_argument("--cases", help="comma list of none,lz4,zstd (overrides --zstd)")
    p.add_argument("--out-dir", default="/dev/shm",
                   help="where the scratch dir (outputs, and the source copy) goes (default /dev/shm: tmpfs)")
    p.add_argument("--source", choices=("copy", "cache"), default="copy",
                   help="copy the tree next to the outputs (default) or read the cached tree in place")
    p.add_argument("--cache", choices=("warm", "drop"), default="warm",
                   help="with --source cache, before each run: read the whole tree (default) or drop the page "
                        "cache (root)")
    p.add_argument("--baseline", metavar="REV", help="also time our builder as of git revision REV")
    p.add_argument("--no-verify", action="store_true", help="skip 'nydus-image check' of ours")
    p.add_argument("--min-mb", type=float, default=200.0, help="refuse a smaller tree (default 200 MB)")
    p.add_argument("--min-files", type=int, default=5000, help="refuse a tree with fewer files (default 5000)")
    p.add_argument("--markdown", action="store_true", help="print the summary as Markdown tables")
    p.add_argument("--json", help="write every sample to this file")
    p.add_argument("--profile", choices=tuple(CASES), help="instead: one in-process build under cProfile")
    p.add_argument("--top", type=int, default=25, help="functions listed by --profile (default 25)")
    p.add_argument("--primitives", action="store_true", help="instead: the GIL-release check of the primitives")
    p.add_argument("--workers", type=int, default=2, help="threads for --primitives (default 2)")
    args = p.parse_args(argv)

    if args.primitives:
        primitives(args.workers, 1 << 20, 32)
        return 0
    cases = [c.strip() for c in args.cases.split(",") if c.strip()] if args.cases else \
        ["none", "lz4"] + (["zstd"] if args.zstd else [])
    bad = [c for c in cases if c not in CASES]
    if bad or not cases:
        p.error(f"unknown cases {bad}; choose from {', '.join(CASES)}")
    if args.runs < 1:
        p.error("--runs must be at least 1")
    try:
        with exclusive_lock(cache_root() / "build_bench.lock"), signals_raise():
            tree, stats, desc = prepare_tree(args.tree, min_bytes=int(args.min_mb * 1e6),
                                             min_files=args.min_files, log=log)
            log(f"tree: {tree}: {stats.describe()} ({desc})")
            if shutil.which("mkfs.erofs") is None:
                raise BenchError("mkfs.erofs is not installed (apt-get install erofs-utils)")
            out_dir = Path(args.out_dir)
            if not out_dir.is_dir():
                raise BenchError(f"--out-dir {out_dir} is not a directory")
            scratch = Path(tempfile.mkdtemp(prefix="nydus-build-bench-", dir=out_dir))
            try:
                warm: str | None = None
                if args.source == "copy":
                    src_tree = scratch / "tree"
                    t = time.perf_counter()
                    run(["cp", "-a", tree, src_tree], what="copying the tree")
                    log(f"copied the tree to {src_tree} ({fs_type(scratch)}) in {time.perf_counter() - t:.1f} s")
                else:
                    src_tree, warm = tree, args.cache
                if args.profile:
                    profile(src_tree, args.profile, scratch, args.top)
                    return 0
                base_src = baseline_source(args.baseline, scratch) if args.baseline else None
                fstype = fs_type(scratch)
                log(f"outputs in {scratch} ({fstype}); source {src_tree} ({fs_type(src_tree)}"
                    + (", pre-warmed before each run" if warm == "warm" else
                       ", page cache dropped before each run" if warm == "drop" else "")
                    + f"); mkfs.erofs {peer_version()}; Python {sys.version.split()[0]}; {os.cpu_count()} CPUs")
                results = measure(src_tree, stats, cases, args.runs, scratch, warm, not args.no_verify, base_src)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            table, phases, data = summarise(results, stats, args.markdown)
            log(f"\nmedians of {args.runs} runs; {human_bytes(stats.bytes)} of file data in "
                f"{stats.files:,} files; ratios are ours/mkfs.erofs (throughput and cpu-efficiency: above "
                "1.00x means ours is faster; size: above 1.00x means ours is larger)")
            log(table)
            log("\nwhere ours spends its wall time (one extra run per case with --output-json; start-up + exit "
                "includes asking git for the version, which that option does)")
            log(phases)
            if args.json:
                Path(args.json).write_text(json.dumps({
                    "tree": {"path": os.fspath(tree), "description": desc, "stats": stats.__dict__},
                    "out_fs": fstype, "source": args.source, "cache": warm, "baseline": args.baseline,
                    "peer_version": peer_version(), "cases": data,
                }, indent=2))
    except BenchError as exc:
        log(f"error: {exc}")
        return 1
    except KeyboardInterrupt as exc:
        log(f"interrupted ({exc or 'SIGINT'})")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
