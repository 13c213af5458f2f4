"""nydus_vfs.fs.passthrough: a shared directory through Vfs + FuseServer, driven with request bytes.

Everything goes the way a guest's requests go (FuseRequestFactory -> FuseServer ->
Vfs -> PassthroughFs), and results are checked on the host.  The escape tests
put a canary directory next to the shared one and check it is never read
(atime below mtime, so any read moves it under relatime) nor written.
"""

from __future__ import annotations

import errno
import os
import stat
import struct

import pytest

from nydus_vfs.errors import ConfigError, FsError
from nydus_vfs.fs import FileSystem, PassthroughFs, Vfs
from nydus_vfs.fuse import abi, codec
from nydus_vfs.fuse.abi import Opcode
from nydus_vfs.fuse.ops import Context
from nydus_vfs.fuse.server import FuseServer
from nydus_vfs.testing import BytesPayload, FuseRequestFactory

ROOT = 1
IS_ROOT = os.geteuid() == 0


class FuseError(Exception):
    def __init__(self, err: int) -> None:
        super().__init__(errno.errorcode.get(err, err))
        self.errno = err


class Guest:
    """Sends requests the way a Linux guest would and decodes the replies."""

    def __init__(self, fs: PassthroughFs, *, mountpoint: str = "/", uid: int = 0, gid: int = 0,
                 max_nodeids: int = 1 << 20) -> None:
        self.vfs = Vfs(writable=True)
        self.vfs.mount(mountpoint, fs)
        self.server = FuseServer(self.vfs, readonly=False, max_nodeids=max_nodeids, posix_locks=True)
        self.f = FuseRequestFactory(uid=uid, gid=gid)
        self.payload(self.f.init())
        self.root = ROOT if mountpoint == "/" else self.lookup(ROOT, mountpoint.strip("/").encode()).nodeid

    def payload(self, req: bytes, data: BytesPayload | None = None) -> bytes:
        """The reply payload of ``req`` (followed by ``data``, as virtio-fs passes a long WRITE)."""
        reply = self.server.handle(req) if data is None else self.server.handle(req, None, data)
        if isinstance(reply, list):
            raw = b"".join(os.pread(p.fd, p.length, p.offset) if hasattr(p, "fd") else bytes(p) for p in reply)
        else:
            raw = bytes(reply)
        h = codec.OutHeader.from_bytes(raw)
        h.validate(len(raw))
        if h.error:
            raise FuseError(-h.error)
        return raw[16:]

    def errno_of(self, req: bytes) -> int:
        with pytest.raises(FuseError) as ei:
            self.payload(req)
        return ei.value.errno

    def entry(self, req: bytes) -> codec.EntryOut:
        e = codec.EntryOut.from_bytes(self.payload(req))
        e.validate()
        return e

    def lookup(self, parent: int, name: bytes) -> codec.EntryOut:
        return self.entry(self.f.lookup(parent, name))

    def getattr(self, nodeid: int) -> codec.FuseAttr:
        return codec.AttrOut.from_bytes(self.payload(self.f.getattr(nodeid))).attr

    def create(self, parent: int, name: bytes, mode: int = 0o100644, flags: int = abi.O_RDWR | abi.O_CREAT,
               **kw) -> tuple[codec.EntryOut, int]:
        payload = self.payload(self.f.create(parent, name, mode, flags, **kw))
        return codec.EntryOut.from_bytes(payload), codec.OpenOut.from_bytes(payload, 128).fh

    def open(self, nodeid: int, flags: int = abi.O_RDONLY) -> int:
        return codec.OpenOut.from_bytes(self.payload(self.f.open(nodeid, flags))).fh

    def write(self, nodeid: int, fh: int, offset: int, data: bytes) -> int:
        return codec.WriteOut.from_bytes(self.payload(self.f.write(nodeid, fh, offset, data))).size

    def write_payload(self, nodeid: int, fh: int, offset: int, data: BytesPayload) -> int:
        """A WRITE whose data stays with the transport (see FuseServer.handle)."""
        header = self.f.write(nodeid, fh, offset, bytes(len(data)))[:80]
        return codec.WriteOut.from_bytes(self.payload(header, data)).size

    def read(self, nodeid: int, fh: int, offset: int, size: int) -> bytes:
        return self.payload(self.f.read(nodeid, fh, offset, size))

    def names(self, nodeid: int, plus: bool = True) -> list[bytes]:
        fh = codec.OpenOut.from_bytes(self.payload(self.f.opendir(nodeid))).fh
        out, offset = [], 0
        while True:
            req = (self.f.readdirplus if plus else self.f.readdir)(nodeid, fh, offset, 4096)
            payload = self.payload(req)
            if not payload:
                break
            for d in (codec.iter_direntplus(payload) if plus else codec.iter_dirents(payload)):
                dirent = d.dirent if plus else d
                out.append(dirent.name)
                offset = dirent.off
        self.payload(self.f.releasedir(nodeid, fh))
        return out


@pytest.fixture
def shared(tmp_path):
    d = tmp_path / "shared"
    d.mkdir()
    (d / "hello").write_bytes(b"hello world")
    (d / "sub").mkdir()
    (d / "sub" / "inner").write_bytes(b"inner")
    return d


@pytest.fixture
def canary(tmp_path):
    """A directory and file outside the shared one; atime < mtime so any read shows."""
    c = tmp_path / "canary"
    c.mkdir()
    f = c / "secret"
    f.write_bytes(b"do not touch")
    os.utime(f, ns=(1_000_000_000, 2_000_000_000))
    os.utime(c, ns=(1_000_000_000, 2_000_000_000))
    return c


def canary_untouched(c) -> None:
    assert sorted(os.listdir(c)) == ["secret"]
    st = os.stat(c / "secret")
    assert (c / "secret").read_bytes() == b"do not touch"  # (after the stat: this read moves atime)
    assert st.st_mtime_ns == 2_000_000_000 and st.st_atime_ns == 1_000_000_000, "the canary was read or written"
    assert os.stat(c).st_mtime_ns == 2_000_000_000


@pytest.fixture
def fs(shared):
    p = PassthroughFs.from_path(str(shared), writable=True)
    yield p
    p.close()


@pytest.fixture
def guest(fs):
    return Guest(fs)


# -- basics ------------------------------------------------------------------------------------------

def test_is_a_filesystem_and_open_refuses_what_is_not_a_directory(tmp_path, fs):
    assert isinstance(fs, FileSystem) and not fs.immutable and not fs.readonly
    (tmp_path / "file").write_bytes(b"")
    for bad in (tmp_path / "missing", tmp_path / "file"):
        with pytest.raises(ConfigError):
            PassthroughFs.from_path(str(bad))
    with pytest.raises(FsError) as ei:
        Vfs().mount("/x", fs)       # a mutable instance needs a writable VFS
    assert ei.value.errno_value == errno.EPERM


def test_lookup_read_getattr_readdir(guest, shared):
    e = guest.lookup(ROOT, b"hello")
    assert e.attr.size == 11 and stat.S_ISREG(e.attr.mode) and e.attr.ino == e.nodeid
    assert e.entry_valid == 1 and e.attr_valid == 1
    fh = guest.open(e.nodeid)
    assert guest.read(e.nodeid, fh, 6, 100) == b"world"
    assert guest.read(e.nodeid, fh, 11, 100) == b""
    assert guest.getattr(e.nodeid).mtime == int(os.stat(shared / "hello").st_mtime)
    assert sorted(guest.names(ROOT)) == [b".", b"..", b"hello", b"sub"]
    assert sorted(guest.names(ROOT, plus=False)) == [b".", b"..", b"hello", b"sub"]
    assert guest.errno_of(guest.f.lookup(ROOT, b"nope")) == errno.ENOENT
    # the same host inode is the same nodeid
    assert guest.lookup(ROOT, b"hello").nodeid == e.nodeid


def test_getattr_and_setattr_answers_expire_like_entries(guest, shared):
    # The host may change a shared file at any time: a GETATTR answer must be
    # revalidated after a second (cache=auto), not kept as long as an image's.
    e = guest.lookup(ROOT, b"hello")
    out = codec.AttrOut.from_bytes(guest.payload(guest.f.getattr(e.nodeid)))
    assert (out.attr_valid, out.attr_valid_nsec) == (1, 0)
    out = codec.AttrOut.from_bytes(guest.payload(guest.f.setattr(e.nodeid, abi.FATTR_MODE, mode=0o100600)))
    assert (out.attr_valid, out.attr_valid_nsec) == (1, 0) and out.attr.mode == 0o100600


def test_create_write_truncate_append_on_the_host(guest, shared):
    e, fh = guest.create(ROOT, b"new", 0o100640, abi.O_WRONLY | abi.O_CREAT | abi.O_EXCL)
    assert guest.write(e.nodeid, fh, 0, b"abcdef") == 6
    assert guest.write(e.nodeid, fh, 10, b"XY") == 2
    assert (shared / "new").read_bytes() == b"abcdef\0\0\0\0XY"
    assert stat.S_IMODE(os.stat(shared / "new").st_mode) == 0o640
    assert guest.errno_of(guest.f.create(ROOT, b"new", 0o100644, abi.O_WRONLY | abi.O_CREAT | abi.O_EXCL)) == errno.EEXIST
    fh2 = guest.open(e.nodeid, abi.O_WRONLY | abi.O_TRUNC)
    assert (shared / "new").read_bytes() == b""
    guest.payload(guest.f.release(e.nodeid, fh2))
    fh3 = guest.open(e.nodeid, abi.O_WRONLY | abi.O_APPEND)
    guest.write(e.nodeid, fh3, 0, b"1")
    guest.write(e.nodeid, fh3, 0, b"2")
    assert (shared / "new").read_bytes() == b"12"
    guest.payload(guest.f.flush(e.nodeid, fh3))
    guest.payload(guest.f.fsync(e.nodeid, fh3, datasync=True))
    guest.payload(guest.f.release(e.nodeid, fh3))
    assert guest.errno_of(guest.f.write(e.nodeid, fh3, 0, b"x")) == errno.EBADF


def test_write_payload_is_pwritten_from_where_it_is(guest, shared):
    e, fh = guest.create(ROOT, b"big")
    data = os.urandom(1 << 20)
    payload = BytesPayload(data)
    assert guest.write_payload(e.nodeid, fh, 4096, payload) == 1 << 20
    assert (shared / "big").read_bytes() == bytes(4096) + data
    assert payload.pwrites == 1 and payload.copies == 0


class _DiskFull(BytesPayload):
    def pwrite(self, fd: int, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_write_payload_failures_are_errnos(guest, shared):
    e, fh = guest.create(ROOT, b"f")
    released = BytesPayload(b"x" * 5000)
    released.release()                                      # used after its request completed
    for payload, want in ((released, errno.EINVAL), (_DiskFull(b"x" * 5000), errno.ENOSPC)):
        with pytest.raises(FuseError) as ei:
            guest.write_payload(e.nodeid, fh, 0, payload)
        assert ei.value.errno == want
    rfh = guest.open(e.nodeid, abi.O_RDONLY)
    with pytest.raises(FuseError) as ei:
        guest.write_payload(e.nodeid, rfh, 0, BytesPayload(b"y" * 5000))
    assert ei.value.errno == errno.EBADF
    assert (shared / "f").read_bytes() == b""


@pytest.mark.parametrize("probe", ["native fstat", "os.stat"])
def test_getattr_sees_every_host_side_change(fs, guest, shared, probe):
    if probe == "os.stat":
        fs._stat_probe = None
    elif fs._stat_probe is None:
        pytest.skip("the native shim is not built")
    e = guest.lookup(ROOT, b"hello")
    a = guest.getattr(e.nodeid)
    assert guest.getattr(e.nodeid) == a                              # unchanged: the same answer
    os.utime(shared / "hello", ns=(5_000_000_001, 6_000_000_002))  # nanoseconds only
    a = guest.getattr(e.nodeid)
    assert (a.atime, a.atimensec, a.mtime, a.mtimensec) == (5, 1, 6, 2)
    os.utime(shared / "hello", ns=(5_000_000_001, 6_000_000_003))
    assert guest.getattr(e.nodeid).mtimensec == 3
    with open(shared / "hello", "ab") as f:
        f.write(b"!")
    assert guest.getattr(e.nodeid).size == 12
    os.chmod(shared / "hello", 0o600)
    assert guest.getattr(e.nodeid).mode & 0o777 == 0o600


def test_setattr_mode_owner_size_and_times(guest, shared):
    e = guest.lookup(ROOT, b"hello")
    a = codec.AttrOut.from_bytes(guest.payload(guest.f.setattr(e.nodeid, abi.FATTR_MODE, mode=0o100600))).attr
    assert stat.S_IMODE(a.mode) == 0o600 and stat.S_IMODE(os.stat(shared / "hello").st_mode) == 0o600
    guest.payload(guest.f.setattr(e.nodeid, abi.FATTR_SIZE, size=5))
    assert (shared / "hello").read_bytes() == b"hello"
    guest.payload(guest.f.setattr(e.nodeid, abi.FATTR_MTIME | abi.FATTR_ATIME, mtime=1234, mtimensec=5,
                                  atime=99, atimensec=7))
    st = os.stat(shared / "hello")
    assert (st.st_mtime_ns, st.st_atime_ns) == (1234 * 10**9 + 5, 99 * 10**9 + 7)
    guest.payload(guest.f.setattr(e.nodeid, abi.FATTR_MTIME | abi.FATTR_MTIME_NOW))
    assert os.stat(shared / "hello").st_mtime > 1234 and os.stat(shared / "hello").st_atime_ns == 99 * 10**9 + 7
    if IS_ROOT:
        guest.payload(guest.f.setattr(e.nodeid, abi.FATTR_UID | abi.FATTR_GID, uid=1234, gid=4321))
        st = os.stat(shared / "hello")
        assert (st.st_uid, st.st_gid) == (1234, 4321)
    # ftruncate through a handle
    fh = guest.open(e.nodeid, abi.O_RDWR)
    guest.payload(guest.f.setattr(e.nodeid, abi.FATTR_SIZE | abi.FATTR_FH, fh=fh, size=2))
    assert (shared / "hello").read_bytes() == b"he"


def test_directories_links_symlinks_and_renames(guest, shared):
    d = guest.entry(guest.f.mkdir(ROOT, b"dir", 0o777, 0))
    assert stat.S_ISDIR(d.attr.mode)
    # the host umask is undone: the guest already applied its own
    assert stat.S_IMODE(os.stat(shared / "dir").st_mode) == 0o777
    s = guest.entry(guest.f.symlink(d.nodeid, b"sl", b"../hello"))
    assert os.readlink(shared / "dir" / "sl") == "../hello"
    assert guest.payload(guest.f.readlink(s.nodeid)) == b"../hello"
    hello = guest.lookup(ROOT, b"hello")
    link = guest.entry(guest.f.link(hello.nodeid, d.nodeid, b"hard"))
    assert link.nodeid == hello.nodeid and link.attr.nlink == 2
    assert os.stat(shared / "dir" / "hard").st_ino == os.stat(shared / "hello").st_ino
    guest.payload(guest.f.rename(d.nodeid, b"hard", ROOT, b"moved"))
    assert (shared / "moved").read_bytes() == b"hello world" and not (shared / "dir" / "hard").exists()
    # RENAME_NOREPLACE / RENAME_EXCHANGE / RENAME_WHITEOUT (overlayfs)
    assert guest.errno_of(guest.f.rename(ROOT, b"moved", ROOT, b"hello", flags=1)) == errno.EEXIST
    (shared / "other").write_bytes(b"other")
    guest.payload(guest.f.rename(ROOT, b"other", ROOT, b"moved", flags=2))
    assert (shared / "moved").read_bytes() == b"other" and (shared / "other").read_bytes() == b"hello world"
    if IS_ROOT:
        guest.payload(guest.f.rename(ROOT, b"other", d.nodeid, b"wh-target", flags=4))
        st = os.lstat(shared / "other")
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0       # the whiteout left behind
        assert (shared / "dir" / "wh-target").read_bytes() == b"hello world"
    guest.payload(guest.f.unlink(d.nodeid, b"sl"))
    assert guest.errno_of(guest.f.rmdir(ROOT, b"dir")) == errno.ENOTEMPTY
    for name in os.listdir(shared / "dir"):
        guest.payload(guest.f.unlink(d.nodeid, name.encode()))
    guest.payload(guest.f.rmdir(ROOT, b"dir"))
    assert not (shared / "dir").exists()
    assert guest.errno_of(guest.f.link(ROOT, ROOT, b"rootlink")) == errno.EPERM


def test_mknod_fifo_and_whiteout_are_never_opened(guest, shared):
    fifo = guest.entry(guest.f.mknod(ROOT, b"fifo", stat.S_IFIFO | 0o644, 0))
    assert stat.S_ISFIFO(os.lstat(shared / "fifo").st_mode)
    assert guest.errno_of(guest.f.open(fifo.nodeid, abi.O_RDONLY)) == errno.ENXIO
    if IS_ROOT:
        wh = guest.entry(guest.f.mknod(ROOT, b"wh", stat.S_IFCHR, 0))
        assert wh.attr.rdev == 0 and stat.S_ISCHR(os.lstat(shared / "wh").st_mode)
        dev = guest.entry(guest.f.mknod(ROOT, b"null", stat.S_IFCHR | 0o666, (1 << 8) | 3))
        assert os.lstat(shared / "null").st_rdev == os.makedev(1, 3) and dev.attr.rdev == (1 << 8) | 3
        assert guest.errno_of(guest.f.open(dev.nodeid, abi.O_RDWR)) == errno.ENXIO


def test_xattrs_including_trusted_overlay(guest, shared):
    e = guest.lookup(ROOT, b"sub")
    names = [b"user.k"] + ([b"trusted.overlay.opaque"] if IS_ROOT else [])
    for name in names:
        guest.payload(guest.f.setxattr(e.nodeid, name, b"y"))
        assert os.getxattr(shared / "sub", name) == b"y"
        assert guest.payload(guest.f.getxattr(e.nodeid, name, 10)) == b"y"
    listed = guest.payload(guest.f.listxattr(e.nodeid, 4096)).split(b"\0")
    assert set(names) <= set(listed)
    assert guest.errno_of(guest.f.setxattr(e.nodeid, b"user.k", b"z", flags=1)) == errno.EEXIST  # XATTR_CREATE
    guest.payload(guest.f.removexattr(e.nodeid, b"user.k"))
    assert guest.errno_of(guest.f.getxattr(e.nodeid, b"user.k", 10)) == errno.ENODATA


def test_fallocate_lseek_holes_copy_file_range_statfs(guest, shared):
    e, fh = guest.create(ROOT, b"sparse")
    guest.write(e.nodeid, fh, 1 << 20, b"end")
    assert guest.getattr(e.nodeid).size == (1 << 20) + 3
    data = codec.LseekOut.from_bytes(guest.payload(guest.f.lseek(e.nodeid, fh, 0, os.SEEK_DATA))).offset
    hole = codec.LseekOut.from_bytes(guest.payload(guest.f.lseek(e.nodeid, fh, 0, os.SEEK_HOLE))).offset
    assert hole == 0 and data >= 4096
    guest.payload(guest.f.fallocate(e.nodeid, fh, 0, 8192, 0))
    assert os.stat(shared / "sparse").st_blocks >= 16
    guest.payload(guest.f.fallocate(e.nodeid, fh, 0, 4096, 0x01 | 0x02))  # KEEP_SIZE | PUNCH_HOLE
    src = guest.lookup(ROOT, b"hello")
    sfh = guest.open(src.nodeid)
    n = codec.WriteOut.from_bytes(guest.payload(guest.f.copy_file_range(src.nodeid, sfh, 0, e.nodeid, fh, 100, 5))).size
    assert n == 5 and (shared / "sparse").read_bytes()[100:105] == b"hello"
    st = codec.Kstatfs.from_bytes(guest.payload(guest.f.statfs(ROOT)))
    assert st.bsize == os.statvfs(shared).f_bsize and st.namelen == 255


def test_posix_locks_and_flock(guest):
    e, fh = guest.create(ROOT, b"locked")
    fh2 = guest.open(e.nodeid, abi.O_RDWR)
    guest.payload(guest.f.lock(Opcode.SETLK, e.nodeid, fh, 1, 0, 99, 1))
    out = codec.LkOut.from_bytes(guest.payload(guest.f.lock(Opcode.GETLK, e.nodeid, fh2, 2, 0, 10, 1)))
    assert out.type == 1 and out.start == 0 and out.end == 99
    assert guest.errno_of(guest.f.lock(Opcode.SETLK, e.nodeid, fh2, 2, 50, 60, 1)) == errno.EAGAIN
    guest.payload(guest.f.lock(Opcode.SETLK, e.nodeid, fh, 1, 0, 99, 2))
    guest.payload(guest.f.lock(Opcode.SETLK, e.nodeid, fh2, 2, 50, 60, 1))
    guest.payload(guest.f.lock(Opcode.SETLK, e.nodeid, fh, 1, 0, 0, 1, lk_flags=abi.FUSE_LK_FLOCK))
    assert guest.errno_of(guest.f.lock(Opcode.SETLK, e.nodeid, fh2, 2, 0, 0, 1, lk_flags=abi.FUSE_LK_FLOCK)) \
        in (errno.EAGAIN, errno.EWOULDBLOCK)


def test_read_only_share_refuses_every_write(shared):
    fs = PassthroughFs.from_path(str(shared), writable=False)
    try:
        g = Guest(fs)
        e = g.lookup(ROOT, b"hello")
        for req in (g.f.create(ROOT, b"x"), g.f.mkdir(ROOT, b"d"), g.f.unlink(ROOT, b"hello"),
                    g.f.setattr(e.nodeid, abi.FATTR_SIZE, size=0), g.f.open(e.nodeid, abi.O_WRONLY),
                    g.f.open(e.nodeid, abi.O_RDONLY | abi.O_TRUNC), g.f.setxattr(e.nodeid, b"user.a", b"b"),
                    g.f.rename(ROOT, b"hello", ROOT, b"x"), g.f.symlink(ROOT, b"s", b"t")):
            assert g.errno_of(req) == errno.EROFS
        payload = BytesPayload(b"z" * 8192)
        with pytest.raises(FuseError) as ei:
            g.write_payload(e.nodeid, g.open(e.nodeid), 0, payload)
        assert ei.value.errno == errno.EROFS and payload.pwrites == 0
        assert g.read(e.nodeid, g.open(e.nodeid), 0, 5) == b"hello"
        assert (shared / "hello").read_bytes() == b"hello world" and sorted(os.listdir(shared)) == ["hello", "sub"]
    finally:
        fs.close()


@pytest.mark.skipif(not IS_ROOT, reason="setfsuid needs root (a non-root nydusd creates files as itself)")
def test_files_are_created_with_the_callers_credentials(fs, shared):
    os.chmod(shared, 0o777)
    g = Guest(fs, uid=1000, gid=1001)
    g.create(ROOT, b"mine")
    g.entry(g.f.mkdir(ROOT, b"mydir"))
    g.entry(g.f.symlink(ROOT, b"mylink", b"x"))
    for name in ("mine", "mydir", "mylink"):
        st = os.lstat(shared / name)
        assert (st.st_uid, st.st_gid) == (1000, 1001), name
    # without write permission on the host the creation fails as it would locally
    os.chmod(shared / "sub", 0o755)
    assert g.errno_of(g.f.create(g.lookup(ROOT, b"sub").nodeid, b"denied")) == errno.EACCES
    # and the daemon's own credentials are back afterwards
    g0 = Guest(fs)
    g0.create(ROOT, b"rootfile")
    assert os.stat(shared / "rootfile").st_uid == 0


def test_forget_releases_the_inode_and_its_fd(guest, fs):
    before = fs.inode_count
    e = guest.lookup(ROOT, b"hello")
    guest.lookup(ROOT, b"hello")
    assert fs.inode_count == before + 1
    assert guest.server.handle(guest.f.forget(e.nodeid, 1)) is None
    assert fs.inode_count == before + 1
    guest.server.handle(guest.f.batch_forget([(e.nodeid, 1)]))
    assert fs.inode_count == before
    assert guest.errno_of(guest.f.getattr(e.nodeid)) == errno.ESTALE


def test_session_end_drops_inodes_and_handles(guest, fs):
    e = guest.lookup(ROOT, b"hello")
    guest.open(e.nodeid)
    assert fs.inode_count == 2 and fs.open_fds >= 3
    guest.payload(guest.f.destroy())
    assert fs.inode_count == 1 and fs.open_fds == 2


def test_mounted_next_to_other_instances_at_a_pseudo_path(shared, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "f").write_bytes(b"f")
    one = PassthroughFs.from_path(str(shared))
    two = PassthroughFs.from_path(str(other))
    try:
        g = Guest(one, mountpoint="/containers")
        g.vfs.mount("/rafs/c1/lowerdir", two)
        lower = g.lookup(g.lookup(g.lookup(ROOT, b"rafs").nodeid, b"c1").nodeid, b"lowerdir")
        f = g.lookup(lower.nodeid, b"f")
        hello = g.lookup(g.root, b"hello")
        assert f.nodeid >> 56 != hello.nodeid >> 56
        # hard link and rename across instances: EXDEV, nothing created anywhere
        assert g.errno_of(g.f.link(f.nodeid, g.root, b"stolen")) == errno.EXDEV
        assert g.errno_of(g.f.rename(lower.nodeid, b"f", g.root, b"stolen")) == errno.EXDEV
        assert sorted(os.listdir(shared)) == ["hello", "sub"] and os.listdir(other) == ["f"]
        # pseudo directories are not writable
        assert g.errno_of(g.f.mkdir(ROOT, b"x")) == errno.EROFS
    finally:
        one.close()
        two.close()


# -- escape attempts (issue 10) -------------------------------------------------------------------------

def test_dotdot_and_slash_names_never_leave_the_share(guest, fs, canary):
    for name in (b"..", b".", b"../canary", b"sub/../../canary", b"/etc", b"a\0b"):
        assert guest.errno_of(guest.f.lookup(ROOT, name)) == errno.EINVAL
        assert guest.errno_of(guest.f.mkdir(ROOT, name)) == errno.EINVAL
        assert guest.errno_of(guest.f.create(ROOT, name)) == errno.EINVAL
    # the filesystem refuses them itself too, whatever a caller above it does
    for name in (b"..", b"../canary", b"x/y", b"a\0b", b""):
        with pytest.raises(FsError) as ei:
            fs.lookup(fs.root_ino, name, Context())
        assert ei.value.errno_value == errno.EINVAL
        with pytest.raises(FsError):
            fs.rename(fs.root_ino, b"hello", fs.root_ino, name, 0, Context())
    # ".." of the share's root is still the share (the kernel resolves ".." itself)
    sub = guest.lookup(ROOT, b"sub")
    assert guest.errno_of(guest.f.lookup(sub.nodeid, b"..")) == errno.EINVAL
    canary_untouched(canary)


def test_host_symlinks_are_never_followed(guest, shared, canary):
    os.symlink(str(canary), shared / "to-canary")
    os.symlink(str(canary / "secret"), shared / "to-secret")
    os.symlink("/etc", shared / "to-etc")
    for name in (b"to-canary", b"to-secret", b"to-etc"):
        e = guest.lookup(ROOT, name)
        assert stat.S_ISLNK(e.attr.mode)
        assert guest.errno_of(guest.f.lookup(e.nodeid, b"secret")) == errno.ENOTDIR
        assert guest.errno_of(guest.f.lookup(e.nodeid, b"passwd")) == errno.ENOTDIR
        assert guest.errno_of(guest.f.open(e.nodeid, abi.O_RDWR)) == errno.ENXIO
        assert guest.errno_of(guest.f.opendir(e.nodeid)) == errno.ENOTDIR
        assert guest.errno_of(guest.f.create(e.nodeid, b"planted")) == errno.ENOTDIR
        assert guest.errno_of(guest.f.mkdir(e.nodeid, b"planted")) == errno.ENOTDIR
        assert guest.errno_of(guest.f.setattr(e.nodeid, abi.FATTR_SIZE, size=0)) == errno.EINVAL
        assert guest.errno_of(guest.f.setattr(e.nodeid, abi.FATTR_MODE, mode=0o777)) in (errno.EOPNOTSUPP,
                                                                                         errno.ENOTSUP)
        guest.payload(guest.f.setattr(e.nodeid, abi.FATTR_MTIME, mtime=5))   # the link's own time
        assert guest.errno_of(guest.f.setxattr(e.nodeid, b"user.x", b"1")) == errno.EPERM
        # a hard link to it links the symlink, not what it points at
        guest.entry(guest.f.link(e.nodeid, ROOT, name + b"-hard"))
        assert os.path.islink(shared / (name + b"-hard").decode())
    assert os.lstat(shared / "to-secret").st_mtime == 5
    canary_untouched(canary)
    assert os.stat("/etc/passwd").st_size > 0


def test_rename_race_swapping_a_directory_for_a_symlink(guest, shared, canary):
    d = guest.lookup(ROOT, b"sub")
    # the host (or another guest process racing through the host) swaps the directory
    os.rename(shared / "sub", shared / "sub.old")
    os.symlink(str(canary), shared / "sub")
    # requests on the nodeid the guest holds still go to the directory it looked up
    e, fh = guest.create(d.nodeid, b"planted")
    guest.write(e.nodeid, fh, 0, b"x")
    guest.entry(guest.f.mkdir(d.nodeid, b"dir"))
    assert guest.lookup(d.nodeid, b"inner").attr.size == 5
    assert guest.errno_of(guest.f.lookup(d.nodeid, b"secret")) == errno.ENOENT
    assert sorted(os.listdir(shared / "sub.old")) == ["dir", "inner", "planted"]
    # a fresh lookup of the name finds the symlink, and nothing can be made through it
    s = guest.lookup(ROOT, b"sub")
    assert stat.S_ISLNK(s.attr.mode)
    assert guest.errno_of(guest.f.create(s.nodeid, b"planted")) == errno.ENOTDIR
    assert guest.errno_of(guest.f.rename(ROOT, b"hello", s.nodeid, b"moved")) == errno.ENOTDIR
    canary_untouched(canary)


def test_hard_links_by_nodeid_reuse_cannot_reach_outside(guest, fs, shared, canary):
    # nodeids never handed out, forgotten ones, and the share root
    e = guest.lookup(ROOT, b"hello")
    guest.server.handle(guest.f.forget(e.nodeid, 1))
    for nodeid in (e.nodeid, (1 << 56) | 999_999, (7 << 56) | 2, 0xFFFF_FFFF_FFFF_FFFF):
        assert guest.errno_of(guest.f.link(nodeid, ROOT, b"stolen")) in (errno.ESTALE, errno.ENOENT)
        assert guest.errno_of(guest.f.open(nodeid, abi.O_RDWR)) in (errno.ESTALE, errno.ENOENT)
    assert not (shared / "stolen").exists()
    canary_untouched(canary)


def test_many_lookups_without_forget_stay_within_the_fd_bound(shared, canary):
    names = [b"f%04d" % i for i in range(1500)]
    for n in names:
        (shared / n.decode()).write_bytes(n)
    fs = PassthroughFs.from_path(str(shared), max_inode_fds=64)
    try:
        g = Guest(fs)
        proc_fds = len(os.listdir("/proc/self/fd"))
        first = {}
        # (the 100,000 of issue 10 run end to end in tests/functional/test_passthrough_hostile.py)
        for i in range(20_000):
            name = names[(i * 7) % len(names)]
            e = g.lookup(ROOT, name)
            if name in first:
                assert e.nodeid == first[name]
            else:
                first[name] = e.nodeid
            if i % 2000 == 0:
                assert fs.open_fds <= 64 + 4
                assert len(os.listdir("/proc/self/fd")) <= proc_fds + 64 + 4
        assert len(first) == len(names) and fs.inode_count == len(names) + 1
        # evicted inodes come back by handle (or are still open): every one still reads right
        if IS_ROOT:
            for name in names[:200]:
                nodeid = first[name]
                fh = g.open(nodeid)
                assert g.read(nodeid, fh, 0, 100) == name
                g.payload(g.f.release(nodeid, fh))
        assert fs.open_fds <= 64 + 4
    finally:
        fs.close()
    canary_untouched(canary)


def test_evicted_inode_deleted_on_the_host_is_estale(shared):
    if not IS_ROOT:
        pytest.skip("reopening by file handle needs CAP_DAC_READ_SEARCH")
    for i in range(40):
        (shared / f"g{i}").write_bytes(b"x")
    fs = PassthroughFs.from_path(str(shared), max_inode_fds=16)
    try:
        g = Guest(fs)
        victim = g.lookup(ROOT, b"g0")
        for i in range(1, 40):
            g.lookup(ROOT, f"g{i}".encode())
        os.unlink(shared / "g0")
        assert g.errno_of(g.f.getattr(victim.nodeid)) == errno.ESTALE
    finally:
        fs.close()


def test_too_many_open_files_is_emfile_not_an_exhausted_daemon(shared):
    fs = PassthroughFs.from_path(str(shared), max_handles=8)
    try:
        g = Guest(fs)
        e = g.lookup(ROOT, b"hello")
        fhs = [g.open(e.nodeid) for _ in range(8)]
        assert g.errno_of(g.f.open(e.nodeid)) == errno.EMFILE
        g.payload(g.f.release(e.nodeid, fhs[0]))
        g.open(e.nodeid)
    finally:
        fs.close()


def test_write_through_server_rejects_oversized_claims(guest):
    e, fh = guest.create(ROOT, b"w")
    raw = bytearray(guest.f.write(e.nodeid, fh, 0, b"abc"))
    struct.pack_into("<I", raw, 40 + 16, 1 << 20)
    assert guest.errno_of(bytes(raw)) == errno.EINVAL


# -- hostile arguments: never a crash, never outside the share -----------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_U64 = st.one_of(st.integers(0, 16), st.integers(0, 2**64 - 1), st.sampled_from([2**63 - 1, 2**63, 2**64 - 1]))
_NAMES = st.one_of(st.sampled_from([b"hello", b"sub", b"new", b"..", b".", b"x/y", b"a\0b", b"", b"n" * 256]),
                   st.binary(min_size=1, max_size=12))


@st.composite
def _hostile_request(draw, f):
    node = draw(st.one_of(st.sampled_from([1, 2, 3, (1 << 56) | 2, 0, 2**64 - 1]), _U64))
    fh = draw(st.one_of(st.sampled_from([0, 1, 2, 3]), _U64))
    off, size = draw(_U64), draw(_U64)
    name, other = draw(_NAMES), draw(_NAMES)
    which = draw(st.integers(0, 17))
    return [
        lambda: f.lookup(node, name), lambda: f.getattr(node, fh), lambda: f.open(node, draw(st.integers(0, 2**32 - 1))),
        lambda: f.read(node, fh, off, size & 0xFFFFFFFF), lambda: f.write(node, fh, off, b"data"),
        lambda: f.create(node, name, draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1))),
        lambda: f.mkdir(node, name, draw(st.integers(0, 2**32 - 1))), lambda: f.unlink(node, name),
        lambda: f.rename(node, name, node, other, flags=draw(st.integers(0, 2**32 - 1))),
        lambda: f.link(node, 1, name), lambda: f.symlink(node, name, other),
        lambda: f.setattr(node, draw(st.integers(0, 2**32 - 1)), fh=fh, size=off, mode=draw(st.integers(0, 2**32 - 1)),
                          atime=off, mtime=size, uid=7, gid=7),
        lambda: f.fallocate(node, fh, off, size, draw(st.integers(0, 2**32 - 1))),
        lambda: f.lseek(node, fh, off, draw(st.integers(0, 2**32 - 1))),
        lambda: f.copy_file_range(node, fh, off, node, fh, size, off),
        lambda: f.lock(Opcode.SETLK, node, fh, 1, off, size, draw(st.integers(0, 3))),
        lambda: f.readdirplus(node, fh, off, 4096), lambda: f.mknod(node, name, draw(st.integers(0, 2**32 - 1))),
    ][which]()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_hostile_arguments_get_an_errno_never_a_crash(tmp_path_factory, data, caplog):
    base = tmp_path_factory.mktemp("hostile")
    shared = base / "shared"
    shared.mkdir()
    (shared / "hello").write_bytes(b"hello")
    (shared / "sub").mkdir()
    canary_dir = base / "canary"
    canary_dir.mkdir()
    (canary_dir / "secret").write_bytes(b"do not touch")
    os.utime(canary_dir / "secret", ns=(1_000_000_000, 2_000_000_000))
    os.utime(canary_dir, ns=(1_000_000_000, 2_000_000_000))
    fs = PassthroughFs.from_path(str(shared))
    try:
        g = Guest(fs)
        e = g.lookup(ROOT, b"hello")
        g.open(e.nodeid, abi.O_RDWR)
        g.payload(g.f.opendir(ROOT))
        caplog.clear()
        for _ in range(data.draw(st.integers(1, 8))):
            reply = g.server.handle(data.draw(_hostile_request(g.f)))
            assert reply is not None
        bugs = [r for r in caplog.records if "filesystem bug" in r.getMessage()]
        assert not bugs, bugs[0].getMessage()
    finally:
        fs.close()
    canary_untouched(canary_dir)


def test_contended_setlkw_waits_without_blocking_the_loop(guest):
    import asyncio

    e, fh = guest.create(ROOT, b"lockme")
    fh2 = guest.open(e.nodeid, abi.O_RDWR)
    guest.payload(guest.f.lock(Opcode.SETLK, e.nodeid, fh, 1, 0, 99, 1))

    async def scenario():
        pending = guest.server.handle(guest.f.lock(Opcode.SETLKW, e.nodeid, fh2, 2, 0, 10, 1))
        assert not isinstance(pending, (bytes, list))         # waiting, and the loop is free
        task = asyncio.ensure_future(pending)
        await asyncio.sleep(0.01)
        assert not task.done()
        guest.payload(guest.f.lock(Opcode.SETLK, e.nodeid, fh, 1, 0, 99, 2))   # the holder unlocks
        reply = await asyncio.wait_for(task, 5)
        assert codec.OutHeader.from_bytes(bytes(reply)).error == 0
        # now fh2 holds it: fh's attempt conflicts, and an interrupted SETLKW answers EINTR
        pending = guest.server.handle(guest.f.lock(Opcode.SETLKW, e.nodeid, fh, 1, 0, 10, 1))
        task = asyncio.ensure_future(pending)
        await asyncio.sleep(0.01)
        guest.server.handle(guest.f.interrupt(guest.f.last_unique))
        reply = await asyncio.wait_for(task, 5)
        assert -codec.OutHeader.from_bytes(bytes(reply)).error == errno.EINTR

    asyncio.run(scenario())


def test_getattr_reflects_every_change_even_within_one_timestamp_tick(shared):
    fs = PassthroughFs.from_path(str(shared))
    try:
        g = Guest(fs, mountpoint="/containers")
        e = g.lookup(g.root, b"hello")
        for size in range(1, 40):
            os.truncate(shared / "hello", size)            # faster than the clock the fs stamps ctime with
            assert g.getattr(e.nodeid).size == size
            os.chmod(shared / "hello", 0o600 if size % 2 else 0o644)
            assert stat.S_IMODE(g.getattr(e.nodeid).mode) == (0o600 if size % 2 else 0o644)
        # the share's root, asked for through its mountpoint and directly, keeps its own nodeid
        for _ in range(3):
            assert g.getattr(g.root).ino == g.root
            assert g.lookup(ROOT, b"containers").attr.ino == g.root
        assert g.getattr(e.nodeid).ino == e.nodeid
    finally:
        fs.close()


def test_create_on_an_existing_fifo_or_device_never_opens_it(guest, shared):
    import signal

    os.mkfifo(shared / "fifo")
    guest.entry(guest.f.mknod(ROOT, b"dev", stat.S_IFCHR | 0o666, (1 << 8) | 5)) if IS_ROOT else None
    # Opening a FIFO for writing would block the daemon's loop: fail the test instead of hanging.
    old = signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(TimeoutError("CREATE blocked")))
    signal.alarm(10)
    try:
        for name in (b"fifo", b"dev") if IS_ROOT else (b"fifo",):
            assert guest.errno_of(guest.f.create(ROOT, name, 0o100644, abi.O_WRONLY | abi.O_CREAT)) == errno.ENXIO
            assert guest.errno_of(guest.f.create(ROOT, name, 0o100644, abi.O_WRONLY | abi.O_CREAT | abi.O_EXCL)) \
                == errno.EEXIST
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    # an existing regular file is opened (and truncated when asked), as open(2) with O_CREAT does
    e, fh = guest.create(ROOT, b"hello", 0o100600, abi.O_RDWR | abi.O_CREAT | abi.O_TRUNC)
    assert e.attr.size == 0 and (shared / "hello").read_bytes() == b""
    assert stat.S_IMODE(os.stat(shared / "hello").st_mode) == 0o644        # mode only applies to new files
    assert guest.errno_of(guest.f.create(ROOT, b"sub", 0o100644, abi.O_RDWR | abi.O_CREAT)) == errno.EISDIR
