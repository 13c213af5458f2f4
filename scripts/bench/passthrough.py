#!/usr/bin/env python3
"""passthrough_fs benchmark: our PassthroughFs against QEMU 7.2's C virtiofsd, no VM.

Both back-ends share the same directory (on tmpfs by default) and are driven
by the same VM-less front-end (``tests/harness``: QEMU 7.2 negotiation, Linux
6.1 request shapes), both running at once with their rounds alternating
(virtiofsd, ours, virtiofsd, ...) so load drifting on a shared machine hits
both alike:

* virtiofsd: ``-o source=DIR -o cache=auto --thread-pool-size=0 -o xattr``;
* ours: ``nydusd virtiofs --sock SOCK --shared-dir DIR`` (PassthroughFs at
  ``/`` of a writable export).

Workloads (each ``--rounds`` x ``--duration`` s, median reported): WRITE 4 KiB
and 128 KiB sequential at queue depth 1 and 16, READ 4 KiB random and 128 KiB
sequential (warm page cache), GETATTR at depth 64 (prepared chains republished
in guest RAM, completions busy-polled: the machinery of scripts/bench/virtiofs.py),
and CREATE + RELEASE + UNLINK + FORGET cycles (what ``touch f; rm f`` sends),
one request at a time through the harness's ordinary session (its own
overhead per request is included for both back-ends alike).

Example::

    .venv/bin/python scripts/bench/passthrough.py --duration 1 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import pathlib
import random
import shutil
import statistics
import struct
import sys
import tempfile
import time

PROJECT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT))
sys.path.insert(0, str(PROJECT / "scripts" / "bench"))

import virtiofs as vb  # noqa: E402  (scripts/bench/virtiofs.py: Driver, Sample, Workload)

from tests.harness import (  # noqa: E402
    BackendProcess,
    Buf,
    Frontend,
    FuseSession,
    HarnessError,
    fuse_wire as fw,
    start_virtiofsd,
    virtiofsd_unavailable_reason,
)

READ_FILE = "bench.dat"
O_RDWR_CREAT = 0o2 | 0o100 | 0o100000

WORKLOADS = [
    vb.Workload("write 4k seq", "write", 1, 4096, "seq"),
    vb.Workload("write 4k seq", "write", 16, 4096, "seq"),
    vb.Workload("write 128k seq", "write", 1, 131072, "seq"),
    vb.Workload("write 128k seq", "write", 16, 131072, "seq"),
    vb.Workload("read 4k rand", "read", 1, 4096, "rand"),
    vb.Workload("read 4k rand", "read", 16, 4096, "rand"),
    vb.Workload("read 128k seq", "read", 1, 131072, "seq"),
    vb.Workload("read 128k seq", "read", 16, 131072, "seq"),
    vb.Workload("getattr", "getattr", 64),
]
CYCLE = "create+unlink qd1"


# ------------------------------------------------------------------ drivers

class Driver(vb.Driver):
    """vb.Driver plus WRITE chains (fuse_write_in + data pages; the offset patched in place)."""

    def __init__(self, fe: Frontend, target: vb.Target, wl: vb.Workload, seed: int) -> None:
        self.writing = wl.op == "write"
        if not self.writing:
            super().__init__(fe, target, wl, seed)
            return
        self.fe, self.q, self.t, self.wl, self.mem = fe, fe.queue(1), target, wl, fe.memory
        self.rnd = random.Random(seed)
        self.own, self.heads, self.args_gpa = [], [], {}
        self.expected = [0] * self.q.size
        self.next_seq = 0
        self.lookups = 0
        req = fw.write(target.nodeid, target.fh, 0, bytes(random.Random(seed).getrandbits(8) for _ in range(wl.size)))
        for _ in range(wl.depth):
            segs = []
            for data in req.readable_segments(fe.next_unique()):
                gpa = self.mem.alloc(len(data), 8)
                self.mem.write(gpa, data)
                self.own.append(gpa)
                segs.append(Buf(gpa, len(data)))
            head = self.q.prepare(segs, req.writable_sizes())
            self.heads.append(head)
            self.args_gpa[head] = segs[1].gpa
            self._retarget(head)

    def _retarget(self, head: int) -> None:
        if not self.writing:
            return super()._retarget(head)
        off = self.next_seq
        self.next_seq = off + self.wl.size if off + self.wl.size < self.t.size else 0
        struct.pack_into("<Q", self.mem.view, self.args_gpa[head] + 8, off)
        self.expected[head] = fw.OUT_HEADER_SIZE + 8

    def run(self, duration, irq, stall, backend):
        if self.writing:
            # vb.Driver.run only retargets READs; WRITE offsets move the same way.
            self.wl = vb.Workload(self.wl.name, "read", self.wl.depth, self.wl.size, self.wl.pattern)
            try:
                sample = super().run(duration, irq, stall, backend)
            finally:
                self.wl = vb.Workload(self.wl.name, "write", self.wl.depth, self.wl.size, self.wl.pattern)
            sample.nbytes = sample.ops * self.wl.size
            return sample
        return super().run(duration, irq, stall, backend)


def _cycle(fs: FuseSession, duration: float, backend: BackendProcess) -> vb.Sample:
    """CREATE, RELEASE, UNLINK, FORGET of one name, back to back, for ``duration`` seconds."""
    ops = 0
    cpu0 = backend.cpu_seconds()
    t0 = time.perf_counter()
    end = t0 + duration
    while time.perf_counter() < end:
        payload = fs.call(fw.create(1, "cycle", O_RDWR_CREAT, 0o100644))
        e = fw.decode_entry_out(payload)
        fh = fw.decode_open_out(payload[128:]).fh
        fs.call(fw.release(e.nodeid, fh, O_RDWR_CREAT))
        fs.call(fw.unlink(1, "cycle"))
        fs.forget(e.nodeid, 1)
        ops += 1
    elapsed = time.perf_counter() - t0
    return vb.Sample(ops, 0, elapsed, 0, 0.0, backend.cpu_seconds() - cpu0)


class _Side:
    """One back-end, connected and set up: its session and its two targets."""

    def __init__(self, name: str, backend: BackendProcess, fe: Frontend, write_name: str) -> None:
        self.name, self.backend, self.fe = name, backend, fe
        fe.negotiate()
        fe.start_queues()
        self.fs = fs = FuseSession(fe, timeout=30.0)
        fs.init()
        r = fs.lookup(1, READ_FILE)
        self.read_t = vb.Target("/" + READ_FILE, 1, READ_FILE, r.nodeid, r.attr.size, fs.open(r.nodeid).fh)
        payload = fs.call(fw.create(1, write_name, O_RDWR_CREAT, 0o100644))
        w = fw.decode_entry_out(payload)
        self.write_t = vb.Target("/" + write_name, 1, write_name, w.nodeid, self.read_t.size,
                                 fw.decode_open_out(payload[128:]).fh)
        vb._warm(fs, self.read_t)
        self.samples: dict[str, list[vb.Sample]] = {}


def bench(sides: list[_Side], args: argparse.Namespace) -> None:
    """Every workload on every side, rounds interleaved (A, B, A, B, ...) so load drifts hit both alike."""
    wanted = {w.strip() for w in args.workloads.split(",") if w.strip()}
    for i, wl in enumerate(WORKLOADS):
        if wanted and wl.key not in wanted:
            continue
        drivers = [(side, Driver(side.fe, side.write_t if wl.op == "write" else side.read_t, wl, seed=i))
                   for side in sides]
        try:
            for side, drv in drivers:
                drv.run(min(0.2, args.duration), False, args.stall, side.backend)
            for _ in range(args.rounds):
                for side, drv in drivers:
                    side.samples.setdefault(wl.key, []).append(
                        drv.run(args.duration, False, args.stall, side.backend))
        finally:
            for side, drv in drivers:
                drv.close(side.fs)
    if wanted and CYCLE not in wanted:
        return
    for side in sides:
        _cycle(side.fs, min(0.2, args.duration), side.backend)
    for _ in range(args.rounds):
        for side in sides:
            side.samples.setdefault(CYCLE, []).append(_cycle(side.fs, args.duration, side.backend))


def _cell(samples: list[vb.Sample] | None, with_bytes: bool) -> str:
    if not samples:
        return "-"
    ops = statistics.median(s.ops_per_s for s in samples)
    text = f"{ops:,.0f} op/s"
    if with_bytes:
        text += f" {statistics.median(s.mib_per_s for s in samples):,.0f} MiB/s"
    if any(s.bad for s in samples):
        text += " (BAD LEN)"
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=1.0, help="seconds per measured round (default 1)")
    ap.add_argument("--rounds", type=int, default=3, help="measured rounds per workload; median reported")
    ap.add_argument("--file-size", type=int, default=32, help="size of the read/write files in MiB (default 32)")
    ap.add_argument("--workdir", default="/dev/shm", help="where the shared directory goes (default /dev/shm)")
    ap.add_argument("--stall", type=float, default=10.0, help="seconds without a completion = stalled")
    ap.add_argument("--workloads", default="", help="comma-separated subset, e.g. 'write 128k seq qd16,getattr qd64'")
    args = ap.parse_args(argv)
    reason = virtiofsd_unavailable_reason()
    if reason:
        print(f"C virtiofsd unavailable: {reason}", file=sys.stderr)
        return 2
    work = pathlib.Path(tempfile.mkdtemp(prefix="pt-bench-", dir=args.workdir))
    try:
        shared = work / "shared"
        shared.mkdir()
        block = random.Random(7).randbytes(1 << 20)
        with open(shared / READ_FILE, "wb") as fh:
            for _ in range(args.file_size):
                fh.write(block)
        ours_argv = [sys.executable, "-m", "nydus_vfs.cli.nydusd", "virtiofs", "--sock", str(work / "ours.sock"),
                     "--shared-dir", str(shared)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(PROJECT / "src"), str(PROJECT),
                                                           os.environ.get("PYTHONPATH", "")]))
        with start_virtiofsd(shared, work / "vfsd.sock", extra_args=["-o", "xattr"]) as vfsd, \
                Frontend.connect(vfsd.sock_path, backend=vfsd, mem_size=64 << 20, timeout=10.0) as fe1, \
                BackendProcess.start(ours_argv, work / "ours.sock", timeout=15.0, env=env, name="ours") as ours_be, \
                Frontend.connect(ours_be.sock_path, backend=ours_be, mem_size=64 << 20, timeout=10.0) as fe2:
            sides = [_Side("virtiofsd", vfsd, fe1, "bench-w-virtiofsd.dat"), _Side("ours", ours_be, fe2,
                                                                                 "bench-w-ours.dat")]
            bench(sides, args)
            for side in sides:
                side.fe.stop_queues()
        peer, ours = sides[0].samples, sides[1].samples
    except HarnessError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with open("/proc/loadavg") as fh:
        load = " ".join(fh.read().split()[:3])
    print(f"# passthrough bench: {args.duration}s x {args.rounds} rounds, busy-poll completions, "
          f"{os.cpu_count()} CPUs, load average {load}, shared dir on {args.workdir}")
    head = f"{'workload':<22} {'virtiofsd':>28} {'ours':>28} {'ours/virtiofsd':>15} {'be cpu us/op v|o':>18}"
    print(head)
    print("-" * len(head))
    for key in [wl.key for wl in WORKLOADS] + [CYCLE]:
        with_bytes = key.startswith(("read", "write"))
        ps, os_ = peer.get(key), ours.get(key)
        ratio = "-"
        if ps and os_:
            ratio = f"{statistics.median(s.ops_per_s for s in os_) / statistics.median(s.ops_per_s for s in ps):.3f}"
        cpu = f"{vb._per_op_us(ps, 'backend_cpu') if ps else '-'}|{vb._per_op_us(os_, 'backend_cpu') if os_ else '-'}"
        print(f"{key:<22} {_cell(ps, with_bytes):>28} {_cell(os_, with_bytes):>28} {ratio:>15} {cpu:>18}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
