#!/usr/bin/env python3
"""virtio-fs benchmark: our ``nydusd virtiofs`` against QEMU 7.2's C virtiofsd, no VM.

Both back-ends are driven by the same VM-less front-end (``tests/harness``) with the
same negotiation (QEMU 7.2 + Linux 6.1 features, queue size 1024) and the same
FUSE request shapes, over the same tree:

* a synthetic tree on tmpfs with the shape of the v5 test vector (its directories,
  files and symlinks, from ``expected-tree.result``) plus ``bench.dat``;
* virtiofsd (``--thread-pool-size=0``: a pool dies by its own seccomp on Debian 12)
  serves that directory;
* ours serves a RAFS image built FROM that directory with ``nydus-image create
  --fs-version 5|6 --compressor none`` when that works, otherwise the v5 vector
  itself (then the read target differs: the vector's largest file; this is reported).

Workloads (each ``--rounds`` x ``--duration`` s, median reported): GETATTR and LOOKUP
at queue depth 1 and 64, 4 KiB random READ at depth 1 and 64, 128 KiB sequential
READ at depth 1 and 16, all from a warm cache.

Hot path: the requests are built once as prepared chains in guest RAM and only
republished (one avail-index store per batch, one kick decision), completions are
taken by busy-polling the used ring (``--irq`` waits on the call eventfd instead,
as a guest would); READ offsets are patched in place.  The harness runs on CPU 0
and the back-end on the other CPUs (``--no-pin`` to disable).  Columns: median
ops/s (and MiB/s for READ) per back-end, the ratio ours/virtiofsd, the back-end's
CPU time per op (all its threads and forked children, from /proc), and the
front-end's own work per op (reaping + republishing, not the polling spin): while
that stays well below the wall time per op, the harness is not the bottleneck.

Example::

    .venv/bin/python scripts/bench/virtiofs.py --duration 1 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import shutil
import stat
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

PROJECT = pathlib.Path(__file__).resolve().parents[2]
VECTORS = PROJECT.parent / "shared" / "vectors" / "nydus"
sys.path.insert(0, str(PROJECT))

from tests.harness import (  # noqa: E402
    BackendProcess,
    Buf,
    Frontend,
    FuseErrorReply,
    FuseSession,
    HarnessError,
    fuse_wire as fw,
    nydusd_command,
    start_nydusd_virtiofs,
    start_virtiofsd,
    virtiofsd_unavailable_reason,
)

BENCH_FILE = "bench.dat"


@dataclass(frozen=True)
class Workload:
    name: str
    op: str            # getattr | lookup | read
    depth: int
    size: int = 0      # READ size
    pattern: str = ""  # rand | seq

    @property
    def key(self) -> str:
        return f"{self.name} qd{self.depth}"


WORKLOADS = [
    Workload("getattr", "getattr", 1),
    Workload("getattr", "getattr", 64),
    Workload("lookup", "lookup", 1),
    Workload("lookup", "lookup", 64),
    Workload("read 4k rand", "read", 1, 4096, "rand"),
    Workload("read 4k rand", "read", 64, 4096, "rand"),
    Workload("read 128k seq", "read", 1, 131072, "seq"),
    Workload("read 128k seq", "read", 16, 131072, "seq"),
]


@dataclass
class Sample:
    ops: int
    nbytes: int
    elapsed: float
    bad: int
    harness_work: float   # seconds the front-end spent handling completions and republishing
    backend_cpu: float

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.elapsed if self.elapsed else 0.0

    @property
    def mib_per_s(self) -> float:
        return self.nbytes / self.elapsed / (1 << 20) if self.elapsed else 0.0


@dataclass
class BackendResult:
    name: str
    available: bool
    reason: str = ""
    image: str = ""
    target: str = ""
    target_size: int = 0
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


class Unavailable(Exception):
    """This back-end cannot be benchmarked here; the message says why."""


class Stalled(HarnessError):
    """Completions stopped; ``recovered`` says whether a forced kick brought them back
    (then the back-end lost a kick, e.g. a stale EVENT_IDX ``avail_event``)."""

    def __init__(self, message: str, recovered: bool) -> None:
        super().__init__(message)
        self.recovered = recovered


# ------------------------------------------------------------------ the tree and the image

def _v5_shape() -> list[dict] | None:
    """The v5 vector's tree (``tree -J`` JSON at the start of expected-tree.result)."""
    path = VECTORS / "v5" / "expected-tree.result"
    try:
        text = path.read_text()
    except OSError:
        return None
    doc, _ = json.JSONDecoder().raw_decode(text)
    return doc[0].get("contents", []) if doc and doc[0].get("type") == "directory" else None


def _content(path: str, size: int) -> bytes:
    seed = sum(path.encode()) & 0xFF
    return bytes((seed + i * 31) & 0xFF for i in range(min(size, 256))) * (size // 256 + 1)


def build_tree(root: pathlib.Path, file_size: int) -> str:
    """Populate ``root``; returns a description of where the shape came from."""
    shape = _v5_shape()
    origin = "v5 vector shape" if shape is not None else "generic shape (v5 vector not found)"
    if shape is None:
        shape = [{"type": "directory", "name": f"d{i}", "contents": [
            {"type": "file", "name": f"f{j}"} for j in range(8)]} for i in range(8)]
    rnd = random.Random(5)

    def make(base: pathlib.Path, entries: list[dict], rel: str) -> None:
        for ent in entries:
            name = ent.get("name", "")
            if not name or "/" in name or name in (".", ".."):
                continue
            path = base / name
            kind = ent.get("type")
            if kind == "directory":
                path.mkdir(exist_ok=True)
                make(path, ent.get("contents", []), f"{rel}/{name}")
            elif kind == "link":
                os.symlink(ent.get("target", "missing"), path)
            elif kind == "file":
                size = rnd.choice([0, 100, 4096, 5000, 65536, 300000])
                path.write_bytes(_content(f"{rel}/{name}", size)[:size])

    make(root, shape, "")
    block = bytes(random.Random(7).getrandbits(8) for _ in range(1 << 16))
    with open(root / BENCH_FILE, "wb") as fh:
        for _ in range(file_size // len(block)):
            fh.write(block)
        fh.write(block[:file_size % len(block)])
    return origin


def _nydus_image() -> str | None:
    here = pathlib.Path(sys.executable).parent / "nydus-image"
    return str(here) if here.exists() else shutil.which("nydus-image")


def build_image(tree: pathlib.Path, work: pathlib.Path, fs_version: int) -> tuple[pathlib.Path, pathlib.Path, str]:
    """(bootstrap, blob dir, description) of the image ours will serve."""
    exe = _nydus_image()
    why = "no nydus-image console script"
    if exe is not None:
        boot, blobs = work / f"image-v{fs_version}.boot", work / "blobs"
        blobs.mkdir(exist_ok=True)
        cmd = [exe, "create", "--bootstrap", str(boot), "--blob-dir", str(blobs),
               "--fs-version", str(fs_version), "--compressor", "none", str(tree)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            why = "nydus-image create timed out"
        else:
            if proc.returncode == 0 and boot.exists():
                return boot, blobs, f"built from the same tree: nydus-image create --fs-version {fs_version} --compressor none"
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
            why = f"nydus-image create failed (rc {proc.returncode}): {tail[0][:160]}"
    boot = VECTORS / "v5" / "sha256-none.boot"
    if not boot.exists():
        raise Unavailable(f"{why}, and the v5 vector is missing at {boot}")
    # --localfs-dir is also the cache work dir: serve links, never write into ../shared.
    links = work / "vector-blobs"
    links.mkdir(exist_ok=True)
    for blob in (VECTORS / "v5" / "blobs").iterdir():
        if not (links / blob.name).exists():
            (links / blob.name).symlink_to(blob)
    return boot, links, f"v5 vector sha256-none.boot ({why})"


# ------------------------------------------------------------------ running workloads

@dataclass
class Target:
    path: str
    parent: int
    name: str
    nodeid: int
    size: int
    fh: int


def find_target(fs: FuseSession) -> Target:
    """``/bench.dat`` if the tree has it, else the largest regular file (bounded walk)."""
    try:
        e = fs.lookup(1, BENCH_FILE)
        best = (e.attr.size, "/" + BENCH_FILE, 1, BENCH_FILE, e.nodeid)
    except FuseErrorReply:
        best = None
        stack, seen = [(1, "")], 0
        while stack and seen < 5000:
            nodeid, path = stack.pop()
            for d in fs.listdir(nodeid):
                name = d.dirent.name.decode(errors="replace")
                if name in (".", ".."):
                    continue
                seen += 1
                mode = d.entry.attr.mode
                if stat.S_ISDIR(mode):
                    stack.append((d.entry.nodeid, f"{path}/{name}"))
                elif stat.S_ISREG(mode) and (best is None or d.entry.attr.size > best[0]):
                    best = (d.entry.attr.size, f"{path}/{name}", nodeid, name, d.entry.nodeid)
        if best is None:
            raise Unavailable("the served tree has no regular file to read")
    size, path, parent, name, nodeid = best
    fh = fs.open(nodeid).fh
    return Target(path, parent, name, nodeid, size, fh)


def _warm(fs: FuseSession, t: Target) -> None:
    for off in range(0, t.size, 131072):
        fs.read(t.nodeid, t.fh, off, 131072)


class Driver:
    """Prepared chains for one workload on queue 1, republished until the time is up."""

    def __init__(self, fe: Frontend, target: Target, wl: Workload, seed: int) -> None:
        self.fe = fe
        self.q = fe.queue(1)
        self.t = target
        self.wl = wl
        self.mem = fe.memory
        self.rnd = random.Random(seed)
        self.own: list[int] = []
        self.heads: list[int] = []
        self.expected = [0] * self.q.size
        self.args_gpa: dict[int, int] = {}
        self.next_seq = 0
        if wl.op == "getattr":
            req = fw.getattr(target.nodeid)
        elif wl.op == "lookup":
            req = fw.lookup(target.parent, target.name)
        else:
            req = fw.read(target.nodeid, target.fh, 0, wl.size)
        self.lookups = 0
        for _ in range(wl.depth):
            hdr, *rest = req.readable_segments(fe.next_unique())
            segs = []
            for data in (hdr, *rest):
                gpa = self.mem.alloc(len(data), 8)
                self.mem.write(gpa, data)
                self.own.append(gpa)
                segs.append(Buf(gpa, len(data)))
            head = self.q.prepare(segs, req.writable_sizes())
            self.heads.append(head)
            self.expected[head] = fw.OUT_HEADER_SIZE + req.out_size
            if wl.op == "read":
                self.args_gpa[head] = segs[1].gpa
                self._retarget(head)

    def _retarget(self, head: int) -> None:
        size, t = self.wl.size, self.t
        if self.wl.pattern == "seq":
            off = self.next_seq
            self.next_seq = off + size if off + size < t.size else 0
        else:
            off = self.rnd.randrange(0, max(t.size - size, 0) + 1) & ~4095
        struct.pack_into("<Q", self.mem.view, self.args_gpa[head] + 8, off)
        self.expected[head] = fw.OUT_HEADER_SIZE + max(0, min(size, t.size - off))

    def run(self, duration: float, irq: bool, stall: float, backend: BackendProcess) -> Sample:
        q, expected = self.q, self.expected
        reap, republish = q.reap, q.republish
        retarget = self._retarget if self.wl.op == "read" else None
        q.set_mode("irq" if irq else "poll")
        ops = nbytes = bad = 0
        work = 0.0
        perf = time.perf_counter
        bcpu0 = backend.cpu_seconds()
        t0 = time.perf_counter()
        end = t0 + duration
        last = t0
        inflight = len(self.heads)
        republish(self.heads)
        while inflight:
            t_got = perf()
            got = reap()
            if not got:
                if irq:
                    q.wait_used(0.05)
                now = time.perf_counter()
                if now - last > stall:
                    self._stalled(inflight, stall)
                if now - last > 0.5:
                    backend.check_alive()
                continue
            n = len(got)
            ops += n
            inflight -= n
            for h, ln in got:
                if ln != expected[h]:
                    bad += 1
                nbytes += ln - fw.OUT_HEADER_SIZE
            last = time.perf_counter()
            if last < end:
                hs = [h for h, _ in got]
                if retarget:
                    for h in hs:
                        retarget(h)
                republish(hs)
                inflight += n
                last = perf()
            work += last - t_got
        elapsed = time.perf_counter() - t0
        if self.wl.op == "lookup":
            self.lookups += ops
        return Sample(ops, nbytes if self.wl.op == "read" else 0, elapsed, bad,
                      work, backend.cpu_seconds() - bcpu0)

    def _stalled(self, inflight: int, stall: float) -> None:
        """Diagnose a stall: note the ring state, kick by hand, drain what comes back."""
        q = self.q
        state = (f"no completion for {stall:.0f}s with {inflight} in flight (avail->idx {q.avail_idx}, "
                 f"used->idx {q.used_idx}, avail_event {q.raw.avail_event()}, kicks {q.kicks})")
        q.kick()
        deadline = time.perf_counter() + stall
        while inflight and time.perf_counter() < deadline:
            got = q.reap()
            inflight -= len(got)
            if got:
                q.kick()
        if inflight:
            raise Stalled(f"{state}; a forced kick did not help: back-end hung", False)
        raise Stalled(f"{state}; a forced kick drained it: the back-end lost a kick "
                      f"(stale EVENT_IDX avail_event?)", True)

    def close(self, fs: FuseSession) -> None:
        for h in self.heads:
            self.q.unprepare(h)
        for gpa in self.own:
            self.mem.free(gpa)
        self.q.set_mode("irq")
        if self.lookups:
            fs.forget(self.t.nodeid, self.lookups)


def bench_backend(name: str, start, args: argparse.Namespace, workloads: list[Workload],
                  harness_cpus: set[int], backend_cpus: set[int]) -> BackendResult:
    res = BackendResult(name, True)
    try:
        backend = start()
    except (Unavailable, HarnessError, OSError) as exc:
        return BackendResult(name, False, str(exc).splitlines()[0][:300])
    with backend:
        try:
            if backend_cpus:
                backend.pin(backend_cpus)
            with Frontend.connect(backend.sock_path, backend=backend, mem_size=64 << 20,
                                  timeout=10.0, kick_policy=args.kick) as fe:
                fe.negotiate()
                fe.start_queues()
                if backend_cpus:
                    backend.pin(backend_cpus)         # queue threads exist now
                fs = FuseSession(fe, timeout=30.0)
                fs.init()
                target = find_target(fs)
                res.target, res.target_size = target.path, target.size
                _warm(fs, target)
                for i, wl in enumerate(workloads):
                    drv = Driver(fe, target, wl, seed=i)
                    try:
                        drv.run(min(0.2, args.duration), args.irq, args.stall, backend)   # warm-up
                        res.samples[wl.key] = [drv.run(args.duration, args.irq, args.stall, backend)
                                               for _ in range(args.rounds)]
                    except Stalled as exc:
                        res.errors[wl.key] = str(exc)
                        backend.check_alive()
                        if not exc.recovered:
                            break
                        drv.close(fs)
                    except HarnessError as exc:
                        res.errors[wl.key] = str(exc).splitlines()[0][:300]
                        backend.check_alive()
                        break
                    else:
                        drv.close(fs)
                fe.stop_queues()
        except (Unavailable, HarnessError, OSError) as exc:
            res.available = bool(res.samples)
            res.reason = str(exc).splitlines()[0][:300]
            if getattr(exc, "stderr", ""):
                res.reason += " | stderr: " + " / ".join(exc.stderr.splitlines()[-3:])[:300]
    return res


# ------------------------------------------------------------------ report

def _median(samples: list[Sample], attr: str) -> float:
    return statistics.median(getattr(s, attr) for s in samples)


def _fmt(wl: Workload, samples: list[Sample] | None, err: str | None) -> str:
    if err:
        return "FAILED"
    if not samples:
        return "-"
    ops = _median(samples, "ops_per_s")
    text = f"{ops:,.0f} op/s"
    if wl.op == "read":
        text += f" {_median(samples, 'mib_per_s'):,.0f} MiB/s"
    if any(s.bad for s in samples):
        text += " (BAD LEN)"
    return text


def _per_op_us(samples: list[Sample], attr: str) -> str:
    total_ops = sum(s.ops for s in samples)
    return f"{sum(getattr(s, attr) for s in samples) / total_ops * 1e6:.1f}" if total_ops else "-"


def report(results: list[BackendResult], workloads: list[Workload], args: argparse.Namespace) -> str:
    peer = next((r for r in results if r.name == "virtiofsd"), None)
    ours = next((r for r in results if r.name == "ours"), None)
    with open("/proc/loadavg") as fh:
        load = " ".join(fh.read().split()[:3])
    lines = [f"# virtio-fs bench: duration {args.duration}s x {args.rounds} rounds, "
             f"{'irq (call eventfd)' if args.irq else 'busy-poll'} completions, kicks: {args.kick}, "
             f"queue size 1024, {os.cpu_count()} CPUs, load average {load}"]
    for r in results:
        state = f"target {r.target} ({r.target_size} B)" if r.available else f"UNAVAILABLE: {r.reason}"
        lines.append(f"# {r.name}: {state}" + (f"; image: {r.image}" if r.image else ""))
        if r.available and r.reason:
            lines.append(f"#   stopped early: {r.reason}")
        for key, err in r.errors.items():
            lines.append(f"#   {key}: {err}")
    head = f"{'workload':<20} {'virtiofsd':>26} {'ours':>26} {'ours/virtiofsd':>15}   " \
           f"{'be cpu us/op v|o':>17} {'fe work us/op v|o':>18}"
    lines += [head, "-" * len(head)]
    for wl in workloads:
        ps = peer.samples.get(wl.key) if peer else None
        os_ = ours.samples.get(wl.key) if ours else None
        ratio = "-"
        if ps and os_:
            ratio = f"{_median(os_, 'ops_per_s') / _median(ps, 'ops_per_s'):.3f}"
        be = f"{_per_op_us(ps, 'backend_cpu') if ps else '-'}|{_per_op_us(os_, 'backend_cpu') if os_ else '-'}"
        hn = f"{_per_op_us(ps, 'harness_work') if ps else '-'}|{_per_op_us(os_, 'harness_work') if os_ else '-'}"
        lines.append(f"{wl.key:<20} {_fmt(wl, ps, peer.errors.get(wl.key) if peer else None):>26} "
                     f"{_fmt(wl, os_, ours.errors.get(wl.key) if ours else None):>26} {ratio:>15}   "
                     f"{be:>17} {hn:>18}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    side = ap.add_mutually_exclusive_group()
    side.add_argument("--ours-only", action="store_true", help="benchmark only our nydusd")
    side.add_argument("--peer-only", action="store_true", help="benchmark only C virtiofsd")
    ap.add_argument("--duration", type=float, default=1.0, help="seconds per measured round (default 1)")
    ap.add_argument("--rounds", type=int, default=3, help="measured rounds per workload; median reported")
    ap.add_argument("--fs-version", type=int, choices=(5, 6), default=5,
                    help="RAFS version when building our image with nydus-image (default 5)")
    ap.add_argument("--file-size", type=int, default=32, help="size of bench.dat in MiB (default 32)")
    ap.add_argument("--workloads", default="", help="comma-separated subset, e.g. 'getattr qd1,lookup qd64'")
    ap.add_argument("--irq", action="store_true", help="wait on the call eventfd instead of busy-polling")
    ap.add_argument("--kick", choices=("spec", "always"), default="spec",
                    help="'spec': kick only when EVENT_IDX says so (like Linux); 'always': every publish")
    ap.add_argument("--no-pin", action="store_true", help="do not pin harness / back-end to separate CPUs")
    ap.add_argument("--stall", type=float, default=10.0, help="seconds without a completion = stalled")
    ap.add_argument("--workdir", default="/dev/shm", help="tmpfs directory for the tree (default /dev/shm)")
    ap.add_argument("--json", help="also write the raw samples here")
    args = ap.parse_args(argv)

    workloads = WORKLOADS
    if args.workloads:
        wanted = {w.strip() for w in args.workloads.split(",")}
        workloads = [w for w in WORKLOADS if w.key in wanted]
        if not workloads:
            ap.error(f"no workload matches {sorted(wanted)}; known: {[w.key for w in WORKLOADS]}")

    cpus = sorted(os.sched_getaffinity(0))
    harness_cpus, backend_cpus = set(), set()
    if not args.no_pin and len(cpus) >= 2:
        harness_cpus, backend_cpus = {cpus[0]}, set(cpus[1:])
        os.sched_setaffinity(0, harness_cpus)

    work = pathlib.Path(tempfile.mkdtemp(prefix="nydus-vbench-", dir=args.workdir))
    results: list[BackendResult] = []
    try:
        tree = work / "tree"
        tree.mkdir()
        origin = build_tree(tree, args.file_size << 20)
        print(f"# tree: {tree} ({origin} + {BENCH_FILE} {args.file_size} MiB)", flush=True)
        if not args.ours_only:
            def start_peer() -> BackendProcess:
                reason = virtiofsd_unavailable_reason()
                if reason:
                    raise Unavailable(reason)
                return start_virtiofsd(tree, work / "virtiofsd.sock")
            results.append(bench_backend("virtiofsd", start_peer, args, workloads, harness_cpus, backend_cpus))
            print("# virtiofsd done", flush=True)
        if not args.peer_only:
            image_note = ""

            def start_ours() -> BackendProcess:
                nonlocal image_note
                if nydusd_command() is None:
                    raise Unavailable("no nydusd console script (pip install -e .)")
                boot, blobs, image_note = build_image(tree, work, args.fs_version)
                return start_nydusd_virtiofs(work / "nydusd.sock", boot, blobs, timeout=30.0)
            res = bench_backend("ours", start_ours, args, workloads, harness_cpus, backend_cpus)
            res.image = image_note
            results.append(res)
            print("# ours done", flush=True)
        print(report(results, workloads, args))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump([{**asdict(r), "samples": {k: [asdict(s) for s in v] for k, v in r.samples.items()}}
                           for r in results], fh, indent=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r.available and not r.errors for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
