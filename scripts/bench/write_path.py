#!/usr/bin/env python3
"""WRITE data path: back-end time per WRITE, copied by the shim or left in guest memory.

One process, no VM, no daemon: the C shim (``binding.Device``) on one end of a
socketpair, the VM-less front-end (``tests/harness``) on the other, and per
request exactly what ``nydusd virtiofs --shared-dir`` runs: ``Device.pop``, the
transport's request handling (``_Connection._handle``: the copy or the guest
payload, the FUSE server, ``Vfs``, ``PassthroughFs``, ``pwrite``/``pwritev``,
the reply) into a file on tmpfs.  Sixteen WRITE chains are prepared in guest
RAM and republished batch after batch; only ``pop`` + handling is timed (not
the harness), and each figure is the best of ``--rounds`` rounds, the rounds of
all copy caps interleaved in random order, because the machine is shared.

``--copy`` lists ``max_copy_bytes`` values (0: the shim default, copy it all);
a WRITE longer than the cap reaches ``pwritev`` as a guest-memory payload.
This is how the transport's ``MAX_COPY_BYTES`` was chosen.

Example::

    .venv/bin/python scripts/bench/write_path.py --sizes 4k,16k,64k,128k --copy 0,4096,16384
"""

from __future__ import annotations

import argparse
import os
import pathlib
import random
import select
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time

PROJECT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT / "src"))
sys.path.insert(0, str(PROJECT))

from nydus_vfs._native import binding  # noqa: E402
from nydus_vfs.fs import PassthroughFs, Vfs  # noqa: E402
from nydus_vfs.fuse import abi  # noqa: E402
from nydus_vfs.fuse.server import FuseServer  # noqa: E402
from nydus_vfs.testing import FuseRequestFactory  # noqa: E402
from nydus_vfs.transport import virtiofs  # noqa: E402
from tests.harness import Buf, Frontend, ProtocolFeature, fuse_wire as fw  # noqa: E402

DEPTH = 16


def _size(text: str) -> int:
    text = text.strip().lower()
    return int(text[:-1]) << 10 if text.endswith("k") else int(text)


class _Rig:
    """A shim device and a harness front-end, started; control-plane replies pumped from here."""

    def __init__(self, copy: int) -> None:
        self.ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        config = binding.ShimConfig(max_copy_bytes=copy) if copy else None
        self.dev = binding.Device(self.ours.fileno(), config)
        self.fe = Frontend(theirs, mem_size=32 << 20, protocol_features=ProtocolFeature.REPLY_ACK)
        self._pump(self.fe.negotiate)
        self._pump(self.fe.start_queues)
        self.q = self.fe.queue(1)

    def _pump(self, fn) -> None:
        box: dict = {}
        t = threading.Thread(target=lambda: box.setdefault("error", _call(fn)))
        t.start()
        while t.is_alive():
            if select.select([self.ours], [], [], 0.005)[0]:
                self.dev.dispatch()
        t.join()
        while select.select([self.ours], [], [], 0)[0]:     # what it sent without waiting for a reply
            self.dev.dispatch()
        if box.get("error") is not None:
            raise box["error"]

    def close(self) -> None:
        self.dev.close()
        self.fe.close()
        self.ours.close()


def _call(fn) -> BaseException | None:
    try:
        fn()
    except BaseException as exc:  # re-raised by the pumping thread
        return exc
    return None


def _connection(dev: binding.Device, server: FuseServer):
    """The transport's per-connection request path without its event loop (nothing here is async)."""
    conn = object.__new__(virtiofs._Connection)
    conn.dev, conn.server, conn.leases, conn.tasks, conn.closed = dev, server, {}, {}, False
    conn.note = lambda *a, **kw: None
    return conn


def measure(sizes: list[int], copies: list[int], rounds: int, batches: int, workdir: str) -> dict:
    """Best back-end µs per WRITE for each (size, copy cap)."""
    shared = pathlib.Path(tempfile.mkdtemp(prefix="write-path-", dir=workdir))
    pt = PassthroughFs.from_path(str(shared), writable=True)
    results = {}
    try:
        vfs = Vfs(writable=True)
        vfs.mount("/", pt)
        server = FuseServer(vfs, readonly=False)
        f = FuseRequestFactory()
        server.handle(f.init())
        reply = server.handle(f.create(1, b"w", 0o100644, abi.O_RDWR | abi.O_CREAT))
        nodeid, fh = struct.unpack_from("<Q", reply, 16)[0], struct.unpack_from("<Q", reply, 16 + 128)[0]
        for size in sizes:
            setups = []
            req = fw.write(nodeid, fh, 0, os.urandom(size))
            for copy in copies:
                rig = _Rig(copy)
                heads = []
                for i in range(DEPTH):
                    segs = []
                    for data in req.readable_segments(2 + 2 * i):
                        gpa = rig.fe.memory.alloc(len(data), 8)
                        rig.fe.memory.write(gpa, data)
                        segs.append(Buf(gpa, len(data)))
                    heads.append(rig.q.prepare(segs, req.writable_sizes()))
                setups.append((copy, rig, _connection(rig.dev, server), heads))
            best = {copy: float("inf") for copy in copies}
            clock = time.perf_counter
            try:
                for rnd in range(rounds + 1):             # round 0 warms up (file pages, heap)
                    random.shuffle(setups)
                    for copy, rig, conn, heads in setups:
                        spent, ops = 0.0, 0
                        handle = conn._handle
                        for _ in range(batches):
                            rig.q.republish(heads)
                            t0 = clock()
                            reqs, _status = rig.dev.pop(1)
                            for head, data, cap, flags, total in reqs:
                                handle(1, head, data, cap, flags, total)
                            spent += clock() - t0
                            ops += len(reqs)
                            if len(reqs) != DEPTH or len(rig.q.reap()) != DEPTH:
                                raise RuntimeError(f"{len(reqs)} of {DEPTH} WRITEs were popped and completed")
                        if rnd:
                            best[copy] = min(best[copy], spent / ops * 1e6)
            finally:
                for _copy, rig, _conn, _heads in setups:
                    rig.close()
            for copy in copies:
                results[(size, copy)] = best[copy]
    finally:
        pt.close()
        shutil.rmtree(shared, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="4k,16k,64k,128k", help="WRITE sizes (default 4k,16k,64k,128k)")
    ap.add_argument("--copy", default="0,4096,16384",
                    help="max_copy_bytes values to compare; 0 = copy everything (default 0,4096,16384)")
    ap.add_argument("--rounds", type=int, default=25, help="rounds per cap; the best is reported (default 25)")
    ap.add_argument("--batches", type=int, default=300, help="batches of 16 WRITEs per round (default 300)")
    ap.add_argument("--workdir", default="/dev/shm", help="where the written file goes (default /dev/shm)")
    args = ap.parse_args(argv)
    if not binding.available():
        print(f"the shim is unavailable: {binding.unavailable_reason()}", file=sys.stderr)
        return 2
    sizes = [_size(s) for s in args.sizes.split(",") if s.strip()]
    copies = [int(c) for c in args.copy.split(",") if c.strip()]
    results = measure(sizes, copies, args.rounds, args.batches, args.workdir)
    with open("/proc/loadavg") as fh:
        load = " ".join(fh.read().split()[:3])
    print(f"# WRITE path: back-end µs per WRITE (pop + handling, depth {DEPTH}, best of {args.rounds} rounds), "
          f"{os.cpu_count()} CPUs, load average {load}, file on {args.workdir}")
    head = f"{'size':>8} " + " ".join(f"{'copy all' if c == 0 else f'cap {c}':>12}" for c in copies)
    print(head)
    print("-" * len(head))
    for size in sizes:
        print(f"{size:>8} " + " ".join(f"{results[(size, c)]:>12.2f}" for c in copies))
    return 0


if __name__ == "__main__":
    sys.exit(main())
