"""Escape attempts against ``nydusd virtiofs --shared-dir`` over the VM-less vhost-user harness (issue 10).

A hostile guest sends what a Linux driver never would: ``..`` and names with
``/``, lookups through a host symlink to a directory outside, requests on a
nodeid swapped for a symlink behind its back, hard links by nodeids it was
never given, and 100,000 LOOKUPs without a FORGET.  A canary directory next to
the shared one must never be read (its atime sits below its mtime, so any read
moves it under relatime) nor written; the daemon must stay up, within its
file descriptor bound, and keep answering.
"""

from __future__ import annotations

import errno
import os
import pathlib

import pytest

from nydus_vfs._native import binding
from tests.functional.nydusd_helpers import NYDUSD
from tests.harness import BackendProcess, Frontend, FuseErrorReply, FuseSession, fuse_wire as fw

pytestmark = pytest.mark.skipif(not binding.available(), reason=f"nydusd virtiofs needs the shim: "
                                f"{binding.unavailable_reason()}")

ROOT = 1
O_RDWR_CREAT = 0o2 | 0o100 | 0o100000


@pytest.fixture
def share(tmp_path):
    shared = tmp_path / "shared"
    (shared / "dir").mkdir(parents=True)
    (shared / "hello").write_bytes(b"hello")
    for i in range(1500):
        (shared / "many" / f"f{i:04d}").parent.mkdir(exist_ok=True)
        (shared / "many" / f"f{i:04d}").write_bytes(b"x")
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "secret").write_bytes(b"do not touch")
    os.utime(canary / "secret", ns=(1_000_000_000, 2_000_000_000))
    os.utime(canary, ns=(1_000_000_000, 2_000_000_000))
    os.symlink(str(canary), shared / "to-canary")
    os.symlink("/etc", shared / "to-etc")
    return shared, canary


def _untouched(canary: pathlib.Path) -> None:
    assert sorted(os.listdir(canary)) == ["secret"]
    st = os.stat(canary / "secret")
    assert st.st_mtime_ns == 2_000_000_000 and st.st_atime_ns == 1_000_000_000, "the canary was read or written"
    assert (canary / "secret").read_bytes() == b"do not touch"


def _errno(fs: FuseSession, req: fw.FuseRequest) -> int:
    with pytest.raises(FuseErrorReply) as ei:
        fs.call(req)
    return ei.value.errno


def test_escape_attempts_and_lookup_flood(tmp_path, share):
    shared, canary = share
    sock = tmp_path / "fs.sock"
    with BackendProcess.start(NYDUSD + ["virtiofs", "--sock", str(sock), "--shared-dir", str(shared),
                                        "--log-file", str(tmp_path / "nydusd.log")], sock, timeout=30,
                              name="nydusd") as be, \
            Frontend.connect(str(sock), backend=be, mem_size=32 << 20) as fe:
        fe.negotiate()
        fe.start_queues()
        fs = FuseSession(fe, timeout=30)
        fs.init()
        baseline = len(os.listdir(f"/proc/{be.pid}/fd"))

        # names the kernel would never send
        for name in ("..", ".", "../canary", "dir/../../canary", "/etc", "a\0b"):
            assert _errno(fs, fw.lookup(ROOT, name)) in (errno.EINVAL, errno.ENAMETOOLONG), name
            assert _errno(fs, fw.mkdir(ROOT, name)) in (errno.EINVAL, errno.ENAMETOOLONG), name
        # host symlinks to outside are links, never directories to walk or files to open
        for link in ("to-canary", "to-etc"):
            e = fs.lookup(ROOT, link)
            assert _errno(fs, fw.lookup(e.nodeid, "secret")) == errno.ENOTDIR
            assert _errno(fs, fw.lookup(e.nodeid, "passwd")) == errno.ENOTDIR
            assert _errno(fs, fw.open_(e.nodeid, 0o2)) == errno.ENXIO
            assert _errno(fs, fw.create(e.nodeid, "planted", O_RDWR_CREAT, 0o100644)) == errno.ENOTDIR
        # a directory swapped for a symlink to outside: the held nodeid still means the directory
        d = fs.lookup(ROOT, "dir")
        os.rename(shared / "dir", shared / "dir.old")
        os.symlink(str(canary), shared / "dir")
        payload = fs.call(fw.create(d.nodeid, "planted", O_RDWR_CREAT, 0o100644))
        e = fw.decode_entry_out(payload)
        fs.call(fw.write(e.nodeid, fw.decode_open_out(payload[128:]).fh, 0, b"x"))
        assert (shared / "dir.old" / "planted").read_bytes() == b"x"
        assert _errno(fs, fw.lookup(d.nodeid, "secret")) == errno.ENOENT
        # hard links by nodeids never handed out (or of the root) create nothing anywhere
        for nodeid in ((1 << 56) | 999_999, (9 << 56) | 2, 2**64 - 1):
            assert _errno(fs, fw.link(nodeid, ROOT, "stolen")) in (errno.ESTALE, errno.ENOENT)
        assert _errno(fs, fw.link(ROOT, ROOT, "stolen")) == errno.EPERM
        assert not os.path.lexists(shared / "stolen")

        # 100,000 LOOKUPs of 1,500 names, never forgotten, 64 in flight at a time
        many = fs.lookup(ROOT, "many").nodeid
        peak = 0
        for start in range(0, 100_000, 64):
            pending = [fs.submit(fw.lookup(many, f"f{(i * 7) % 1500:04d}")) for i in range(start, start + 64)]
            for p in pending:
                reply = fs.result(p)
                assert reply.header.error == 0
            if start % 6400 == 0:
                peak = max(peak, len(os.listdir(f"/proc/{be.pid}/fd")))
        # PassthroughFs keeps at most 1024 reopenable inode fds (max_inode_fds); without
        # CAP_DAC_READ_SEARCH nothing is reopenable and the server's max_nodeids bounds them
        bound = 1024 if os.geteuid() == 0 else 1500
        assert peak <= baseline + bound + 16, (baseline, peak)
        # and still serves
        assert fs.read(fs.lookup(ROOT, "hello").nodeid, fs.open(fs.lookup(ROOT, "hello").nodeid).fh, 0, 10) == b"hello"
        assert be.alive
    _untouched(canary)
