"""nydus_vfs.fuse.server: FuseServer driven with FuseRequestFactory bytes over an in-memory filesystem."""

from __future__ import annotations

import asyncio
import errno
import inspect
import logging
import os
import stat
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nydus_vfs.errors import ConfigError, FsError
from nydus_vfs.fuse import abi, codec
from nydus_vfs.fuse.abi import InitFlags, Opcode
from nydus_vfs.fuse.ops import Attr, ConnInfo, DirEntry, Entry, FileSegment, Operations, StatFs
from nydus_vfs.fuse.server import SESSION_TRANSITIONS, FuseServer, SessionInput, SessionState
from nydus_vfs.testing import BytesPayload, FuseRequestFactory

try:
    import uvloop
except ImportError:  # the asyncio half of the READ tests still runs
    uvloop = None

ROOT, FILE, LINK, SUB, BIG = 1, 2, 3, 4, 5
BIG_NAMES = [b"n" * (1 + (i * 37) % 200) + b"-%d" % i for i in range(60)]


class MemOps(Operations):
    """A small tree: /hello.txt, /link -> hello.txt, /sub/, /big/ (60 files with long names)."""

    attr_timeout = 2.5
    entry_timeout = 1.25

    def __init__(self) -> None:
        self.attrs = {
            ROOT: Attr(ROOT, stat.S_IFDIR | 0o755, nlink=4),
            FILE: Attr(FILE, stat.S_IFREG | 0o644, size=11, mtime=1000, mtimensec=5),
            LINK: Attr(LINK, stat.S_IFLNK | 0o777, size=9),
            SUB: Attr(SUB, stat.S_IFDIR | 0o755, nlink=2),
            BIG: Attr(BIG, stat.S_IFDIR | 0o755, nlink=2),
        }
        self.tree: dict[int, dict[bytes, int]] = {
            ROOT: {b"hello.txt": FILE, b"link": LINK, b"sub": SUB, b"big": BIG},
            SUB: {},
            BIG: {},
        }
        for i, name in enumerate(BIG_NAMES):
            nodeid = 100 + i
            self.attrs[nodeid] = Attr(nodeid, stat.S_IFREG | 0o600, size=i)
            self.tree[BIG][name] = nodeid
        self.data = {FILE: b"hello world"}
        self.xattrs = {FILE: {b"user.a": b"value-a", b"user.empty": b""}}
        self.calls: list[tuple] = []
        self.forgets: list[list[tuple[int, int]]] = []
        self.released: list[int] = []
        self.inits: list[ConnInfo] = []
        self.destroys = 0
        self.closed_iterators = 0

    def init(self, conn):
        self.inits.append(conn)

    def destroy(self):
        self.destroys += 1

    def _attr(self, nodeid):
        try:
            return self.attrs[nodeid]
        except KeyError:
            raise FsError(errno.ESTALE) from None

    def _entry(self, nodeid):
        return Entry(nodeid, self._attr(nodeid), 7, self.entry_timeout, self.attr_timeout)

    def lookup(self, parent, name, ctx):
        self.calls.append(("lookup", parent, name, ctx))
        children = self.tree.get(parent)
        if children is None:
            raise FsError(errno.ENOTDIR)
        if name == b"negative":
            return Entry(0, None, 0, 30.0, 0.0)
        if name not in children:
            raise FsError(errno.ENOENT)
        return self._entry(children[name])

    def forget(self, items):
        self.forgets.append(list(items))

    def release_inode(self, nodeid):
        self.released.append(nodeid)

    def getattr(self, nodeid, fh, ctx):
        self.calls.append(("getattr", nodeid, fh, ctx))
        return self._attr(nodeid)

    def readlink(self, nodeid, ctx):
        if nodeid != LINK:
            raise FsError(errno.EINVAL)
        return b"hello.txt"

    def open(self, nodeid, flags, ctx):
        self.calls.append(("open", nodeid, flags))
        if not stat.S_ISREG(self._attr(nodeid).mode):
            raise FsError(errno.EISDIR)
        return (nodeid + 1000, abi.FOPEN_KEEP_CACHE)

    async def read(self, nodeid, fh, offset, size, ctx):
        self.calls.append(("read", nodeid, fh, offset, size))
        return self.data[nodeid][offset:offset + size]

    def release(self, nodeid, fh, flags):
        self.calls.append(("release", nodeid, fh, flags))

    def flush(self, nodeid, fh, lock_owner):
        self.calls.append(("flush", nodeid, fh, lock_owner))

    def fsync(self, nodeid, fh, datasync):
        self.calls.append(("fsync", nodeid, fh, datasync))

    def fsyncdir(self, nodeid, fh, datasync):
        self.calls.append(("fsyncdir", nodeid, fh, datasync))

    def lseek(self, nodeid, fh, offset, whence):
        self.calls.append(("lseek", nodeid, fh, offset, whence))
        return offset + 1

    def opendir(self, nodeid, flags, ctx):
        if not stat.S_ISDIR(self._attr(nodeid).mode):
            raise FsError(errno.ENOTDIR)
        return (nodeid + 2000, abi.FOPEN_CACHE_DIR)

    def _listing(self, nodeid, plus):
        children = self.tree[nodeid]
        out = [DirEntry(b".", nodeid, 4, 1), DirEntry(b"..", ROOT, 4, 2)]
        for name, child in children.items():
            mode = self.attrs[child].mode
            out.append(DirEntry(name, child, mode >> 12, len(out) + 1, self._entry(child) if plus else None))
        return out

    def _iterate(self, nodeid, offset, plus):
        try:
            yield from self._listing(nodeid, plus)[offset:]
        finally:
            self.closed_iterators += 1

    def readdir(self, nodeid, fh, offset, ctx):
        return self._iterate(nodeid, offset, False)

    def readdirplus(self, nodeid, fh, offset, ctx):
        return self._iterate(nodeid, offset, True)

    def releasedir(self, nodeid, fh):
        self.calls.append(("releasedir", nodeid, fh))

    def statfs(self, nodeid, ctx):
        return StatFs(blocks=100, bfree=0, bavail=0, files=70, ffree=0, bsize=4096, namelen=255, frsize=4096)

    def getxattr(self, nodeid, name, ctx):
        try:
            return self.xattrs.get(nodeid, {})[name]
        except KeyError:
            raise FsError(errno.ENODATA) from None

    def listxattr(self, nodeid, ctx):
        return list(self.xattrs.get(nodeid, {}))

    def access(self, nodeid, mask, ctx):
        self.calls.append(("access", nodeid, mask))

    def syncfs(self, nodeid):
        self.calls.append(("syncfs", nodeid))


# -- helpers -----------------------------------------------------------------------------

def flatten(reply) -> bytes:
    """A reply as the bytes a transport would write (file segments read with pread)."""
    if isinstance(reply, list):
        out = b""
        for part in reply:
            out += os.pread(part.fd, part.length, part.offset) if isinstance(part, FileSegment) else bytes(part)
        return out
    return bytes(reply)


def header(reply) -> codec.OutHeader:
    raw = flatten(reply)
    h = codec.OutHeader.from_bytes(raw)
    h.validate(len(raw))
    return h


def ok(reply) -> bytes:
    """Payload of a successful reply."""
    raw = flatten(reply)
    h = header(raw)
    assert h.error == 0, f"expected success, got errno {-h.error} ({errno.errorcode.get(-h.error)})"
    return raw[16:]


def err(reply) -> int:
    raw = flatten(reply)
    h = header(raw)
    assert h.error < 0, "expected an error reply"
    assert len(raw) == 16
    return -h.error


@pytest.fixture
def ops():
    return MemOps()


@pytest.fixture
def f():
    return FuseRequestFactory(uid=1000, gid=1000, pid=77)


@pytest.fixture
def srv(ops, f):
    server = FuseServer(ops)
    ok(server.handle(f.init()))
    return server


def open_dir(srv, f, nodeid):
    return codec.OpenOut.from_bytes(ok(srv.handle(f.opendir(nodeid)))).fh


# -- INIT negotiation --------------------------------------------------------------------------

@pytest.mark.parametrize("minor, reply_minor", [(31, 31), (36, 36), (38, 38), (40, 38)])
def test_init_negotiates_minor(ops, f, minor, reply_minor):
    srv = FuseServer(ops)
    payload = ok(srv.handle(f.init(minor=minor)))
    assert len(payload) == codec.init_out_size(reply_minor) == 64
    out = codec.InitOut.from_bytes(payload)
    out.validate()
    assert (out.major, out.minor) == (7, reply_minor)
    assert srv.state is SessionState.RUNNING
    assert ops.inits[-1].minor == reply_minor
    assert srv.conn == ops.inits[-1]


def test_init_reply_fields_for_linux_6_1(ops, f):
    srv = FuseServer(ops, max_write=2 << 20, max_pages=128)
    out = codec.InitOut.from_bytes(ok(srv.handle(f.init())))
    want = (InitFlags.ASYNC_READ | InitFlags.PARALLEL_DIROPS | InitFlags.MAX_PAGES | InitFlags.DO_READDIRPLUS
            | InitFlags.READDIRPLUS_AUTO | InitFlags.CACHE_SYMLINKS | InitFlags.BIG_WRITES)
    assert out.flags == want
    assert out.flags2 == 0 and not out.flags & InitFlags.INIT_EXT
    for never in (InitFlags.WRITEBACK_CACHE, InitFlags.HANDLE_KILLPRIV, InitFlags.HANDLE_KILLPRIV_V2,
                  InitFlags.POSIX_ACL, InitFlags.EXPORT_SUPPORT, InitFlags.POSIX_LOCKS, InitFlags.FLOCK_LOCKS,
                  InitFlags.SUBMOUNTS, InitFlags.MAP_ALIGNMENT, InitFlags.SETXATTR_EXT):
        assert not out.flags & never
    assert (out.max_write, out.max_pages, out.time_gran, out.max_readahead) == (2 << 20, 128, 1, 0x20000)
    assert out.max_background == 256 and 0 < out.congestion_threshold <= 256
    conn = ops.inits[-1]
    assert (conn.max_pages, conn.max_write, conn.flags) == (128, 2 << 20, int(want))


def test_init_grants_only_offered_flags(ops, f):
    srv = FuseServer(ops, max_readahead=4096)
    out = codec.InitOut.from_bytes(ok(srv.handle(f.init(flags=InitFlags.ASYNC_READ, max_readahead=65536))))
    assert out.flags == InitFlags.ASYNC_READ
    assert out.max_pages == 0  # MAX_PAGES not offered: the field means nothing to the kernel
    assert out.max_readahead == 4096
    assert ops.inits[-1].max_pages == 32


def test_init_without_readdirplus_support(f):
    class NoPlus(MemOps):
        readdirplus = Operations.readdirplus

    out = codec.InitOut.from_bytes(ok(FuseServer(NoPlus()).handle(f.init())))
    assert not out.flags & (InitFlags.DO_READDIRPLUS | InitFlags.READDIRPLUS_AUTO)


def test_init_newer_major_answers_7_38_and_waits(ops, f):
    srv = FuseServer(ops)
    out = codec.InitOut.from_bytes(ok(srv.handle(f.init(major=8, minor=0))))
    assert (out.major, out.minor) == (7, 38)
    assert srv.state is SessionState.NEED_INIT and not ops.inits
    assert err(srv.handle(f.getattr(ROOT))) == errno.EIO
    ok(srv.handle(f.init()))
    assert srv.state is SessionState.RUNNING


@pytest.mark.parametrize("major, minor", [(7, 30), (7, 0), (6, 38)])
def test_init_too_old_is_eproto_and_a_later_init_works(ops, f, major, minor):
    srv = FuseServer(ops)
    assert err(srv.handle(f.init(major=major, minor=minor))) == errno.EPROTO
    assert srv.state is SessionState.NEED_INIT and not ops.inits
    ok(srv.handle(f.init()))
    assert srv.state is SessionState.RUNNING


def test_min_minor_is_configurable(ops, f):
    assert err(FuseServer(ops, min_minor=36).handle(f.init(minor=31))) == errno.EPROTO
    ok(FuseServer(ops, min_minor=36).handle(f.init(minor=36)))


@pytest.mark.parametrize("kwargs", [{"min_minor": 8}, {"min_minor": 39}, {"max_pages": 0}, {"max_pages": 257},
                                    {"max_write": 100}, {"max_nodeids": 0}, {"max_readahead": -1}])
def test_bad_configuration(ops, kwargs):
    with pytest.raises(ConfigError):
        FuseServer(ops, **kwargs)


def test_init_args_too_short(ops, f):
    srv = FuseServer(ops)
    assert err(srv.handle(f.request(Opcode.INIT, 0, struct.pack("<I", 7)))) == errno.EINVAL
    assert err(srv.handle(f.request(Opcode.INIT, 0, struct.pack("<III", 7, 38, 0)))) == errno.EINVAL
    assert srv.state is SessionState.NEED_INIT


def test_init_failure_in_filesystem_is_eio(f, caplog):
    class Bad(MemOps):
        def init(self, conn):
            raise RuntimeError("boom")

    srv = FuseServer(Bad())
    assert err(srv.handle(f.init())) == errno.EIO
    assert srv.state is SessionState.NEED_INIT
    assert "boom" in caplog.text


def test_requests_before_init_are_eio_and_forgets_are_dropped(ops, f):
    srv = FuseServer(ops)
    for req in (f.getattr(ROOT), f.lookup(ROOT, b"hello.txt"), f.statfs(), f.request(99, 1), f.destroy(),
                f.write_request(Opcode.MKDIR)):
        assert err(srv.handle(req)) == errno.EIO
    assert srv.handle(f.forget(FILE, 1)) is None
    assert srv.handle(f.batch_forget([(FILE, 1)])) is None
    assert srv.handle(f.interrupt(4)) is None
    assert not ops.calls and not ops.forgets


def test_destroy_ends_session_until_next_init(srv, ops, f):
    ok(srv.handle(f.lookup(ROOT, b"hello.txt")))
    assert header(srv.handle(f.destroy())).len == 16
    assert ops.destroys == 1 and srv.state is SessionState.DESTROYED
    assert srv.lookup_count(FILE) == 0
    assert err(srv.handle(f.getattr(ROOT))) == errno.EIO
    assert err(srv.handle(f.destroy())) == errno.EIO
    assert ops.destroys == 1
    ok(srv.handle(f.init()))
    ok(srv.handle(f.getattr(ROOT)))


def test_second_init_resets_session(srv, ops, f):
    ok(srv.handle(f.lookup(ROOT, b"hello.txt")))
    assert srv.lookup_count(FILE) == 1
    ok(srv.handle(f.init(minor=36)))
    assert ops.destroys == 1 and len(ops.inits) == 2
    assert srv.lookup_count(FILE) == 0
    assert srv.conn.minor == 36
    # a forget from the old session is for a nodeid this session does not know
    assert srv.handle(f.forget(FILE, 1)) is None
    assert ops.forgets == []


def test_failed_reinit_leaves_no_session(srv, ops, f):
    assert err(srv.handle(f.init(minor=20))) == errno.EPROTO
    assert ops.destroys == 1
    assert err(srv.handle(f.getattr(ROOT))) == errno.EIO


def test_close_ends_a_running_session_once(srv, ops):
    srv.close()
    srv.close()
    assert ops.destroys == 1 and srv.state is SessionState.DESTROYED


def test_session_table_is_total_and_reinit_equals_destroy_then_init():
    for s in SessionState:
        for i in SessionInput:
            assert SESSION_TRANSITIONS[(s, i)] in SessionState
    for i in (SessionInput.INIT_ACCEPTED, SessionInput.INIT_REFUSED, SessionInput.INIT_NEWER_MAJOR):
        after_destroy = SESSION_TRANSITIONS[(SessionState.RUNNING, SessionInput.DESTROY)]
        assert SESSION_TRANSITIONS[(SessionState.RUNNING, i)] == SESSION_TRANSITIONS[(after_destroy, i)]


_SESSION_EVENTS = {
    "init": lambda f: f.init(),
    "init-old": lambda f: f.init(minor=30),
    "init-newer": lambda f: f.init(major=9),
    "destroy": lambda f: f.destroy(),
}
_EVENT_INPUT = {"init": SessionInput.INIT_ACCEPTED, "init-old": SessionInput.INIT_REFUSED,
                "init-newer": SessionInput.INIT_NEWER_MAJOR, "destroy": SessionInput.DESTROY}


@given(st.lists(st.sampled_from(sorted(_SESSION_EVENTS)), max_size=12))
def test_session_follows_the_table(events):
    ops, f = MemOps(), FuseRequestFactory()
    srv = FuseServer(ops)
    model = SessionState.NEED_INIT
    sessions_ended = 0
    for event in events:
        srv.handle(_SESSION_EVENTS[event](f))
        if model is SessionState.RUNNING:
            sessions_ended += 1  # DESTROY or any INIT ends the running session
        if event == "destroy" and model is not SessionState.RUNNING:
            pass  # EIO, no transition (documented)
        else:
            model = SESSION_TRANSITIONS[(model, _EVENT_INPUT[event])]
        assert srv.state is model
        assert ops.destroys == sessions_ended
        reply = srv.handle(f.getattr(ROOT))
        if model is SessionState.RUNNING:
            ok(reply)
        else:
            assert err(reply) == errno.EIO
    assert len(ops.inits) - ops.destroys == (1 if model is SessionState.RUNNING else 0)


# -- opcode reply layouts ---------------------------------------------------------------------------

def test_lookup_reply(srv, ops, f):
    reply = srv.handle(f.lookup(ROOT, b"hello.txt"))
    assert header(reply).unique == f.last_unique
    entry = codec.EntryOut.from_bytes(ok(reply))
    entry.validate()
    assert (entry.nodeid, entry.generation) == (FILE, 7)
    assert (entry.entry_valid, entry.entry_valid_nsec) == (1, 250_000_000)
    assert (entry.attr_valid, entry.attr_valid_nsec) == (2, 500_000_000)
    assert entry.attr == codec.FuseAttr.from_attr(ops.attrs[FILE])
    assert entry.attr.mtimensec == 5
    assert ops.calls[-1][3] == (1000, 1000, 77)
    assert srv.lookup_count(FILE) == 1
    assert err(srv.handle(f.lookup(ROOT, b"missing"))) == errno.ENOENT
    assert err(srv.handle(f.lookup(FILE, b"x"))) == errno.ENOTDIR


def test_negative_entry_is_sent_and_not_counted(srv, f):
    entry = codec.EntryOut.from_bytes(ok(srv.handle(f.lookup(ROOT, b"negative"))))
    assert entry.nodeid == 0 and entry.entry_valid == 30
    assert entry.attr == codec.FuseAttr()
    assert srv.live_nodeids == 0


def test_getattr_reply_and_fh(srv, ops, f):
    out = codec.AttrOut.from_bytes(ok(srv.handle(f.getattr(FILE))))
    assert (out.attr_valid, out.attr_valid_nsec) == (2, 500_000_000)
    assert out.attr == codec.FuseAttr.from_attr(ops.attrs[FILE])
    assert ops.calls[-1][:3] == ("getattr", FILE, None)
    ok(srv.handle(f.getattr(FILE, fh=42)))
    assert ops.calls[-1][:3] == ("getattr", FILE, 42)
    assert err(srv.handle(f.getattr(999))) == errno.ESTALE
    # the timeout follows Operations.attr_timeout
    ops.attr_timeout = 0.0
    assert codec.AttrOut.from_bytes(ok(srv.handle(f.getattr(FILE)))).attr_valid == 0


def test_readlink(srv, f):
    assert ok(srv.handle(f.readlink(LINK))) == b"hello.txt"
    assert err(srv.handle(f.readlink(FILE))) == errno.EINVAL


def test_open_read_release(srv, ops, f):
    out = codec.OpenOut.from_bytes(ok(srv.handle(f.open(FILE))))
    assert (out.fh, out.open_flags) == (FILE + 1000, abi.FOPEN_KEEP_CACHE)
    assert ok(srv.handle(f.read(FILE, out.fh, 0, 4096))) == b"hello world"
    assert ops.calls[-1] == ("read", FILE, FILE + 1000, 0, 4096)
    assert ok(srv.handle(f.read(FILE, out.fh, 6, 3))) == b"wor"
    assert ok(srv.handle(f.read(FILE, out.fh, 100, 10))) == b""
    assert header(srv.handle(f.flush(FILE, out.fh, 99))).len == 16
    assert header(srv.handle(f.release(FILE, out.fh, 0o100000))).len == 16
    assert ops.calls[-2:] == [("flush", FILE, FILE + 1000, 99), ("release", FILE, FILE + 1000, 0o100000)]
    assert err(srv.handle(f.open(SUB))) == errno.EISDIR


def test_read_reply_is_a_list_without_copying(srv, ops, f):
    data = memoryview(bytearray(b"x" * 100))

    class Fs(MemOps):
        async def read(self, nodeid, fh, offset, size, ctx):
            return data[offset:offset + size]

    s = FuseServer(Fs())
    ok(s.handle(f.init()))
    reply = s.handle(f.read(FILE, 1, 10, 20))
    assert isinstance(reply, list) and len(reply) == 2
    assert reply[1].obj is data.obj  # the filesystem's buffer, not a copy
    assert header(reply).len == 36


def test_read_with_file_segments(tmp_path, f):
    path = tmp_path / "cache"
    path.write_bytes(bytes(range(256)) * 4)
    fd = os.open(path, os.O_RDONLY)
    try:
        class Fs(MemOps):
            async def read(self, nodeid, fh, offset, size, ctx):
                return [b"head", FileSegment(fd, 100, 50), bytearray(b"mid"), FileSegment(fd, 0, 500), b""]

        s = FuseServer(Fs())
        ok(s.handle(f.init()))
        reply = s.handle(f.read(FILE, 1, 0, 4096))
        assert ok(reply) == b"head" + bytes(range(100, 150)) + b"mid" + (bytes(range(256)) * 2)[:500]
        # cut to the requested size: the last segment is shortened, nothing after it is sent
        reply = s.handle(f.read(FILE, 1, 0, 60))
        assert ok(reply) == b"head" + bytes(range(100, 150)) + b"mid" + bytes(range(3))
        assert reply[-1] == FileSegment(fd, 0, 3)
    finally:
        os.close(fd)


def test_read_longer_than_asked_is_cut(f):
    class Fs(MemOps):
        async def read(self, nodeid, fh, offset, size, ctx):
            return b"z" * (size + 100)

    s = FuseServer(Fs())
    ok(s.handle(f.init()))
    assert ok(s.handle(f.read(FILE, 1, 0, 10))) == b"z" * 10


@pytest.mark.parametrize("bad", [None, "text", [123], [FileSegment(-1, 0, 5)], [FileSegment(3, -1, 5)]])
def test_read_returning_garbage_is_eio(f, bad, caplog):
    class Fs(MemOps):
        async def read(self, nodeid, fh, offset, size, ctx):
            return bad

    s = FuseServer(Fs())
    ok(s.handle(f.init()))
    assert err(s.handle(f.read(FILE, 1, 0, 10))) == errno.EIO
    assert "filesystem bug" in caplog.text


def test_statfs(srv, f):
    st_ = codec.Kstatfs.from_bytes(ok(srv.handle(f.statfs())))
    assert (st_.blocks, st_.files, st_.bsize, st_.namelen, st_.frsize) == (100, 70, 4096, 255, 4096)
    assert len(ok(srv.handle(f.statfs()))) == 80


def test_simple_opcodes(srv, ops, f):
    for req, call in [
        (f.fsync(FILE, 5, True), ("fsync", FILE, 5, True)),
        (f.fsync(FILE, 5, False), ("fsync", FILE, 5, False)),
        (f.fsyncdir(SUB, 6, True), ("fsyncdir", SUB, 6, True)),
        (f.releasedir(SUB, 6), ("releasedir", SUB, 6)),
        (f.access(FILE, 4), ("access", FILE, 4)),
        (f.syncfs(ROOT), ("syncfs", ROOT)),
    ]:
        assert ok(srv.handle(req)) == b""
        assert ops.calls[-1] == call


def test_lseek(srv, ops, f):
    assert codec.LseekOut.from_bytes(ok(srv.handle(f.lseek(FILE, 5, 10, 3)))).offset == 11
    assert ops.calls[-1] == ("lseek", FILE, 5, 10, 3)


def test_defaults_of_operations_base():
    s, f = FuseServer(Operations()), FuseRequestFactory()
    ok(s.handle(f.init()))
    for req in (f.lookup(ROOT, b"a"), f.getattr(ROOT), f.readlink(ROOT), f.open(ROOT), f.read(ROOT, 0, 0, 10),
                f.opendir(ROOT), f.readdir(ROOT, 0), f.getxattr(ROOT, b"user.a", 0), f.listxattr(ROOT, 0),
                f.access(ROOT, 4), f.lseek(ROOT, 0, 0, 3)):
        assert err(s.handle(req)) == errno.ENOSYS
    for req in (f.flush(ROOT, 0), f.release(ROOT, 0), f.fsync(ROOT, 0), f.releasedir(ROOT, 0),
                f.fsyncdir(ROOT, 0), f.syncfs(), f.statfs()):
        ok(s.handle(req))


# -- EROFS / ENOSYS ---------------------------------------------------------------------------------

@pytest.mark.parametrize("opcode", sorted(abi.WRITE_OPCODES), ids=lambda o: Opcode(o).name)
def test_write_opcodes_are_erofs(srv, ops, f, opcode):
    assert err(srv.handle(f.write_request(opcode))) == errno.EROFS
    assert not ops.calls


@pytest.mark.parametrize("opcode", sorted(abi.WRITE_OPCODES), ids=lambda o: Opcode(o).name)
def test_write_opcodes_without_readonly_are_enosys(ops, f, opcode):
    s = FuseServer(ops, readonly=False)
    ok(s.handle(f.init()))
    assert err(s.handle(f.write_request(opcode))) == errno.ENOSYS


@pytest.mark.parametrize("flags", [abi.O_WRONLY, abi.O_RDWR, abi.O_ACCMODE, abi.O_TRUNC, abi.O_CREAT,
                                   abi.O_EXCL, abi.O_TMPFILE_BIT | 0o200000, abi.O_RDWR | abi.O_APPEND])
def test_open_for_writing_is_erofs(srv, ops, f, flags):
    assert err(srv.handle(f.open(FILE, flags))) == errno.EROFS
    assert not any(c[0] == "open" for c in ops.calls)


@pytest.mark.parametrize("flags", [0, 0o100000, abi.O_APPEND, 0o4000 | 0o100000 | 0o400000])
def test_open_read_only_variants_reach_the_filesystem(srv, ops, f, flags):
    ok(srv.handle(f.open(FILE, flags)))
    assert ops.calls[-1] == ("open", FILE, flags)


def test_open_flags_unfiltered_without_readonly(ops, f):
    s = FuseServer(ops, readonly=False)
    ok(s.handle(f.init()))
    ok(s.handle(f.open(FILE, abi.O_RDWR)))
    assert ops.calls[-1] == ("open", FILE, abi.O_RDWR)


@pytest.mark.parametrize("opcode", sorted(abi.NOSYS_OPCODES) + [52, 99, 4096, 0xFFFF_FFFF, 26 << 24])
def test_unsupported_opcodes_are_enosys(srv, f, opcode):
    assert err(srv.handle(f.request(opcode, 1, bytes(64)))) == errno.ENOSYS


def test_notify_reply_gets_no_reply(srv, f):
    assert srv.handle(f.request(Opcode.NOTIFY_REPLY, 0, bytes(40))) is None


# -- lookup counting -----------------------------------------------------------------------------------

def test_lookup_forget_counting(srv, ops, f):
    for _ in range(3):
        ok(srv.handle(f.lookup(ROOT, b"hello.txt")))
    assert srv.lookup_count(FILE) == 3
    assert srv.handle(f.forget(FILE, 2)) is None
    assert srv.lookup_count(FILE) == 1 and ops.released == []
    assert srv.handle(f.forget(FILE, 5)) is None  # more than held: clamped
    assert srv.lookup_count(FILE) == 0 and ops.released == [FILE]
    assert ops.forgets == [[(FILE, 2)], [(FILE, 5)]]
    # unknown nodeid, root, and a zero count are ignored
    assert srv.handle(f.forget(FILE, 1)) is None
    assert srv.handle(f.forget(ROOT, 1)) is None
    assert srv.handle(f.forget(12345, 1)) is None
    assert ops.forgets == [[(FILE, 2)], [(FILE, 5)]] and ops.released == [FILE]


def test_root_and_nodeid_zero_are_never_counted(f):
    class RootEntries(MemOps):
        def lookup(self, parent, name, ctx):
            return self._entry(ROOT)

        def readdirplus(self, nodeid, fh, offset, ctx):
            return [DirEntry(b"..", ROOT, 4, 1, self._entry(ROOT)),
                    DirEntry(b"hidden", 9, 8, 2, Entry(0, self.attrs[FILE])),
                    DirEntry(b"hello.txt", FILE, 8, 3, self._entry(FILE))]

    s = FuseServer(RootEntries())
    ok(s.handle(f.init()))
    ok(s.handle(f.lookup(ROOT, b"x")))
    assert s.lookup_count(ROOT) == 0 and s.live_nodeids == 0
    sent = list(codec.iter_direntplus(ok(s.handle(f.readdirplus(ROOT, 0)))))
    assert [e.entry_out.nodeid for e in sent] == [ROOT, 0, FILE]
    assert s.lookup_count(ROOT) == 0 and s.lookup_count(0) == 0 and s.lookup_count(FILE) == 1
    assert s.live_nodeids == 1


def test_batch_forget(srv, ops, f):
    ok(srv.handle(f.lookup(ROOT, b"hello.txt")))
    ok(srv.handle(f.lookup(ROOT, b"link")))
    ok(srv.handle(f.lookup(ROOT, b"link")))
    assert srv.handle(f.batch_forget([(FILE, 1), (LINK, 1), (999, 4), (ROOT, 1)])) is None
    assert (srv.lookup_count(FILE), srv.lookup_count(LINK)) == (0, 1)
    assert ops.forgets == [[(FILE, 1), (LINK, 1)]]
    assert ops.released == [FILE]


def test_batch_forget_count_beyond_payload_uses_what_is_present(srv, ops, f, caplog):
    ok(srv.handle(f.lookup(ROOT, b"hello.txt")))
    ok(srv.handle(f.lookup(ROOT, b"link")))
    assert srv.handle(f.batch_forget([(FILE, 1), (LINK, 1)], count=0xFFFF_FFFF)) is None
    assert ops.released == [FILE, LINK]
    assert "count" in caplog.text
    # a count smaller than the payload only uses count items
    ok(srv.handle(f.lookup(ROOT, b"hello.txt")))
    assert srv.handle(f.batch_forget([(999, 1), (FILE, 1)], count=1)) is None
    assert srv.lookup_count(FILE) == 1


def test_forget_callbacks_raising_are_logged(f, caplog):
    class Bad(MemOps):
        def forget(self, items):
            raise RuntimeError("forget bug")

        def release_inode(self, nodeid):
            raise RuntimeError("release bug")

    s = FuseServer(Bad())
    ok(s.handle(f.init()))
    ok(s.handle(f.lookup(ROOT, b"hello.txt")))
    assert s.handle(f.forget(FILE, 1)) is None
    assert "forget bug" in caplog.text and "release bug" in caplog.text
    assert s.lookup_count(FILE) == 0


def test_readdirplus_counts_sent_entries_only(srv, ops, f):
    fh = open_dir(srv, f, ROOT)
    entries = list(codec.iter_direntplus(ok(srv.handle(f.readdirplus(ROOT, fh)))))
    names = [e.dirent.name for e in entries]
    assert names == [b".", b"..", b"hello.txt", b"link", b"sub", b"big"]
    dots = entries[:2]
    assert all(e.entry_out == codec.EntryOut() for e in dots)  # nodeid 0: no lookup count
    for e in entries[2:]:
        assert e.entry_out.nodeid == e.dirent.ino
        assert e.entry_out.attr == codec.FuseAttr.from_attr(ops.attrs[e.dirent.ino])
        assert srv.lookup_count(e.dirent.ino) == 1
        assert e.entry_out.generation == 7
    assert srv.live_nodeids == 4
    # a reply that only fits two entries counts exactly those
    fh = open_dir(srv, f, BIG)
    before = srv.live_nodeids
    sent = list(codec.iter_direntplus(ok(srv.handle(f.readdirplus(BIG, fh, 2, 2 * 152 + 2 * 200)))))
    assert srv.live_nodeids == before + len(sent)
    assert all(srv.lookup_count(e.entry_out.nodeid) == 1 for e in sent)


def test_readdirplus_rolls_back_counts_when_the_reply_fails(srv, ops, f, caplog):
    ops.attrs[LINK] = Attr(LINK, stat.S_IFLNK | 0o777, size=-1)  # cannot be packed: a filesystem bug
    fh = open_dir(srv, f, ROOT)
    assert err(srv.handle(f.readdirplus(ROOT, fh))) == errno.EIO
    assert srv.live_nodeids == 0
    assert ops.closed_iterators == 1


def test_max_nodeids(ops, f):
    s = FuseServer(ops, max_nodeids=2)
    ok(s.handle(f.init()))
    ok(s.handle(f.lookup(ROOT, b"hello.txt")))
    ok(s.handle(f.lookup(ROOT, b"link")))
    ok(s.handle(f.lookup(ROOT, b"link")))  # already live: fine
    assert err(s.handle(f.lookup(ROOT, b"sub"))) == errno.ENFILE
    assert ops.released == [SUB]
    assert s.live_nodeids == 2
    fh = open_dir(s, f, BIG)
    entries = list(codec.iter_direntplus(ok(s.handle(f.readdirplus(BIG, fh, 2)))))
    assert entries and all(e.entry_out.nodeid == 0 for e in entries)  # names listed, no inode handed out
    assert s.live_nodeids == 2
    s.handle(f.forget(FILE, 1))
    ok(s.handle(f.lookup(ROOT, b"sub")))


# -- readdir ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [4096, 1000, 400])
@pytest.mark.parametrize("plus", [False, True])
def test_readdir_resume_and_size_limits(srv, ops, f, size, plus):
    fh = open_dir(srv, f, BIG)
    build = f.readdirplus if plus else f.readdir
    walk = codec.iter_direntplus if plus else codec.iter_dirents
    names, offset, replies = [], 0, 0
    while True:
        payload = ok(srv.handle(build(BIG, fh, offset, size)))
        assert len(payload) <= size
        if not payload:
            break
        replies += 1
        for rec in walk(payload):
            d = rec.dirent if plus else rec
            d.validate()
            names.append(d.name)
            offset = d.off
    assert names == [b".", b".."] + BIG_NAMES
    assert replies > 1
    assert ops.closed_iterators == replies + 1  # every iterator was closed, also the partial ones


def test_readdir_records_are_aligned(srv, f):
    fh = open_dir(srv, f, BIG)
    payload = ok(srv.handle(f.readdir(BIG, fh, 0, 4096)))
    pos = 0
    for d in codec.iter_dirents(payload):
        assert pos % 8 == 0
        raw = payload[pos:pos + d.record_size()]
        assert raw[24 + d.namelen:] == bytes(len(raw) - 24 - d.namelen)
        pos += d.record_size()
    assert pos == len(payload)


def test_readdir_too_small_for_one_entry_is_einval_not_eof(srv, f):
    fh = open_dir(srv, f, BIG)
    assert err(srv.handle(f.readdir(BIG, fh, 0, 10))) == errno.EINVAL
    assert err(srv.handle(f.readdirplus(BIG, fh, 0, 100))) == errno.EINVAL
    assert srv.live_nodeids == 0


def test_readdir_past_end_is_empty(srv, f):
    fh = open_dir(srv, f, SUB)
    assert ok(srv.handle(f.readdir(SUB, fh, 2))) == b""
    assert ok(srv.handle(f.readdirplus(SUB, fh, 1000))) == b""


def test_readdir_skips_invalid_names_from_the_filesystem(f, caplog):
    class Bad(MemOps):
        def readdir(self, nodeid, fh, offset, ctx):
            return [DirEntry(b"ok", 9, 8, 1), DirEntry(b"a/b", 9, 8, 2), DirEntry(b"", 9, 8, 3),
                    DirEntry(b"x\0y", 9, 8, 4), DirEntry(b"n" * 256, 9, 8, 5), DirEntry(b"fine", 9, 8, 6)]

    s = FuseServer(Bad())
    ok(s.handle(f.init()))
    assert [d.name for d in codec.iter_dirents(ok(s.handle(f.readdir(ROOT, 0))))] == [b"ok", b"fine"]
    assert "invalid entry name" in caplog.text


def test_opendir_and_errors(srv, f):
    out = codec.OpenOut.from_bytes(ok(srv.handle(f.opendir(SUB))))
    assert (out.fh, out.open_flags) == (SUB + 2000, abi.FOPEN_CACHE_DIR)
    assert err(srv.handle(f.opendir(FILE))) == errno.ENOTDIR


# -- xattrs -----------------------------------------------------------------------------------------

def test_getxattr_size_probe(srv, f):
    probe = codec.GetxattrOut.from_bytes(ok(srv.handle(f.getxattr(FILE, b"user.a", 0))))
    assert probe.size == 7
    assert err(srv.handle(f.getxattr(FILE, b"user.a", 6))) == errno.ERANGE
    assert ok(srv.handle(f.getxattr(FILE, b"user.a", 7))) == b"value-a"
    assert ok(srv.handle(f.getxattr(FILE, b"user.a", 0xFFFF_FFFF))) == b"value-a"
    assert ok(srv.handle(f.getxattr(FILE, b"user.empty", 10))) == b""
    assert err(srv.handle(f.getxattr(FILE, b"user.nope", 10))) == errno.ENODATA
    assert err(srv.handle(f.getxattr(FILE, b"user.a", 100), 16 + 4)) == errno.ERANGE


def test_listxattr_size_probe(srv, f):
    assert codec.GetxattrOut.from_bytes(ok(srv.handle(f.listxattr(FILE, 0)))).size == 18
    assert ok(srv.handle(f.listxattr(FILE, 18))) == b"user.a\0user.empty\0"
    assert err(srv.handle(f.listxattr(FILE, 17))) == errno.ERANGE
    assert codec.GetxattrOut.from_bytes(ok(srv.handle(f.listxattr(ROOT, 0)))).size == 0


def test_listxattr_with_bad_names_is_eio(f, caplog):
    class Bad(MemOps):
        def listxattr(self, nodeid, ctx):
            return [b"user.a", b"bad\0name"]

    s = FuseServer(Bad())
    ok(s.handle(f.init()))
    assert err(s.handle(f.listxattr(FILE, 100))) == errno.EIO


@pytest.mark.parametrize("name, nul, expected", [
    (b"user.a", False, errno.EINVAL), (b"", True, errno.EINVAL), (b"user.a\0x", True, errno.EINVAL),
    (b"u" * 256, True, errno.ERANGE),
])
def test_getxattr_bad_names(srv, f, name, nul, expected):
    assert err(srv.handle(f.getxattr(FILE, name, 10, nul=nul))) == expected


# -- async READ -----------------------------------------------------------------------------------------

class _YieldValue:
    def __init__(self, value):
        self.value = value

    def __await__(self):
        yield self.value


async def _run(awaitable):
    return await awaitable


def _run_in(loop, coro):
    """Run with a deadline so a read that is never woken fails the test instead of hanging it."""
    return loop.run_until_complete(asyncio.wait_for(coro, 5))


class SlowFs(MemOps):
    """READ waits on ``self.gate`` (a future made on first use) or bare-yields ``spins`` times."""

    def __init__(self) -> None:
        super().__init__()
        self.gate: asyncio.Future | None = None
        self.spins = 0
        self.saw_cancel = False
        self.swallow_cancel = False
        self.finished = False
        self.fail_with: BaseException | None = None

    async def read(self, nodeid, fh, offset, size, ctx):
        try:
            for _ in range(self.spins):
                await asyncio.sleep(0)
            if self.gate is None:
                self.gate = asyncio.get_running_loop().create_future()
            try:
                await self.gate
            except asyncio.CancelledError:
                self.saw_cancel = True
                if not self.swallow_cancel:
                    raise
                return b"late"
            if self.fail_with is not None:
                raise self.fail_with
            return self.data[nodeid][offset:offset + size]
        finally:
            self.finished = True


@pytest.fixture(params=["asyncio", "uvloop"])
def loop(request):
    if request.param == "uvloop" and uvloop is None:
        pytest.skip("uvloop is not installed")
    lp = asyncio.new_event_loop() if request.param == "asyncio" else uvloop.new_event_loop()
    yield lp
    lp.close()


def _session(fs):
    s, f = FuseServer(fs), FuseRequestFactory()
    ok(s.handle(f.init()))
    return s, f


def test_suspended_read_completes(loop):
    fs = SlowFs()
    s, f = _session(fs)

    async def main():
        fs.gate = loop.create_future()
        reply = s.handle(f.read(FILE, 1, 0, 5))
        assert inspect.iscoroutine(reply)
        assert s.pending_reads == 1
        task = asyncio.ensure_future(reply)
        await asyncio.sleep(0)
        assert not task.done()
        fs.gate.set_result(None)
        return await task

    reply = _run_in(loop, main())
    assert isinstance(reply, list)
    assert ok(reply) == b"hello"
    assert header(reply).unique == f.last_unique
    assert s.pending_reads == 0


def test_suspended_read_with_bare_yields(loop):
    fs = SlowFs()
    fs.spins = 5
    s, f = _session(fs)

    async def main():
        fs.gate = loop.create_future()
        fs.gate.set_result(None)
        return await s.handle(f.read(FILE, 1, 6, 100))

    assert ok(_run_in(loop, main())) == b"world"


@pytest.mark.parametrize("exc, expected", [(FsError(errno.EREMOTEIO), errno.EREMOTEIO),
                                           (RuntimeError("bug"), errno.EIO)])
def test_suspended_read_errors(loop, exc, expected, caplog):
    fs = SlowFs()
    fs.fail_with = exc
    s, f = _session(fs)

    async def main():
        fs.gate = loop.create_future()
        loop.call_soon(fs.gate.set_result, None)
        return await s.handle(f.read(FILE, 1, 0, 5))

    assert err(_run_in(loop, main())) == expected
    if expected == errno.EIO:
        assert "bug" in caplog.text


def test_suspended_read_bad_yield_is_eio(loop):
    class Weird(MemOps):
        async def read(self, nodeid, fh, offset, size, ctx):
            await _YieldValue(42)
            return b"never"

    s, f = _session(Weird())
    reply = s.handle(f.read(FILE, 1, 0, 5))
    assert err(_run_in(loop, _run(reply))) == errno.EIO


def test_interrupt_cancels_suspended_read_without_cancelling_its_future(loop):
    fs = SlowFs()
    s, f = _session(fs)

    async def main():
        shared = fs.gate = loop.create_future()
        reply = s.handle(f.read(FILE, 1, 0, 5))
        unique = f.last_unique
        task = asyncio.ensure_future(reply)
        await asyncio.sleep(0)
        assert s.handle(f.interrupt(unique)) is None
        result = await asyncio.wait_for(task, 5)
        assert not shared.cancelled()  # other readers of the chunk keep waiting
        return result, unique

    reply, unique = _run_in(loop, main())
    assert err(reply) == errno.EINTR
    assert header(reply).unique == unique
    assert fs.saw_cancel and fs.finished
    assert s.pending_reads == 0


def test_interrupt_before_the_transport_awaits(loop):
    fs = SlowFs()
    s, f = _session(fs)

    async def main():
        fs.gate = loop.create_future()
        reply = s.handle(f.read(FILE, 1, 0, 5))
        s.handle(f.interrupt(f.last_unique))
        return await reply

    assert err(_run_in(loop, main())) == errno.EINTR
    assert fs.saw_cancel


def test_interrupt_while_read_is_at_a_bare_yield(loop):
    fs = SlowFs()
    fs.spins = 3
    s, f = _session(fs)

    async def main():
        fs.gate = loop.create_future()  # never completed: only the interrupt ends the read
        task = asyncio.ensure_future(s.handle(f.read(FILE, 1, 0, 5)))
        await asyncio.sleep(0)
        s.handle(f.interrupt(f.last_unique))
        return await task

    assert err(_run_in(loop, main())) == errno.EINTR
    assert fs.saw_cancel is False and fs.finished  # cancelled inside sleep(0), before reaching the gate


def test_interrupted_read_that_swallows_cancellation_returns_data(loop):
    fs = SlowFs()
    fs.swallow_cancel = True
    s, f = _session(fs)

    async def main():
        fs.gate = loop.create_future()
        reply = asyncio.ensure_future(s.handle(f.read(FILE, 1, 0, 5)))
        await asyncio.sleep(0)
        s.handle(f.interrupt(f.last_unique))
        return await reply

    assert ok(_run_in(loop, main())) == b"late"


def test_interrupt_of_unknown_or_finished_request_is_ignored(srv, f):
    assert srv.handle(f.interrupt(12345)) is None
    ok(srv.handle(f.read(FILE, 1, 0, 5)))  # completed synchronously: nothing to interrupt
    assert srv.handle(f.interrupt(f.last_unique)) is None
    assert srv.handle(f.request(Opcode.INTERRUPT, 0, b"\x01")) is None  # short argument


def test_transport_cancelling_the_read_propagates(loop):
    fs = SlowFs()
    s, f = _session(fs)

    async def main():
        fs.gate = loop.create_future()
        task = asyncio.ensure_future(s.handle(f.read(FILE, 1, 0, 5)))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return fs.gate

    gate = _run_in(loop, main())
    assert fs.saw_cancel and fs.finished
    assert not gate.cancelled()
    assert s.pending_reads == 0


def test_warm_read_never_touches_the_loop(srv, f):
    # no event loop is running here: a read that does not suspend must not need one
    reply = srv.handle(f.read(FILE, 1, 0, 5))
    assert isinstance(reply, list) and ok(reply) == b"hello"


# -- hostile input ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 16, 39])
def test_request_shorter_than_header_is_dropped(srv, n, caplog):
    assert srv.handle(bytes(n)) is None
    assert "shorter than fuse_in_header" in caplog.text


@pytest.mark.parametrize("delta", [-1, 1, 1000])
def test_header_len_mismatch_is_einval(srv, f, delta):
    raw = f.getattr(FILE)
    bad = f.getattr(FILE, length=len(raw) + delta, unique=77)
    reply = srv.handle(bad)
    assert err(reply) == errno.EINVAL and header(reply).unique == 77


def test_total_extlen_without_security_ctx_is_einval(srv, ops, f):
    assert err(srv.handle(f.lookup(ROOT, b"hello.txt", total_extlen=1))) == errno.EINVAL
    assert srv.live_nodeids == 0


_ARG_SIZES = {
    Opcode.GETATTR: 16, Opcode.OPEN: 8, Opcode.READ: 40, Opcode.RELEASE: 24, Opcode.FLUSH: 24,
    Opcode.FSYNC: 16, Opcode.OPENDIR: 8, Opcode.READDIR: 40, Opcode.READDIRPLUS: 40, Opcode.RELEASEDIR: 24,
    Opcode.FSYNCDIR: 16, Opcode.GETXATTR: 8, Opcode.LISTXATTR: 8, Opcode.ACCESS: 8, Opcode.LSEEK: 24,
    Opcode.SYNCFS: 8,
}


@pytest.mark.parametrize("opcode", sorted(_ARG_SIZES), ids=lambda o: Opcode(o).name)
def test_args_shorter_than_struct_are_einval(srv, ops, f, opcode):
    for short in (0, _ARG_SIZES[opcode] - 1):
        assert err(srv.handle(f.request(opcode, FILE, b"\xff" * short))) == errno.EINVAL
    assert not ops.calls


def test_short_forget_is_ignored(srv, ops, f):
    ok(srv.handle(f.lookup(ROOT, b"hello.txt")))
    assert srv.handle(f.request(Opcode.FORGET, FILE, b"\x01\x00")) is None
    assert srv.handle(f.request(Opcode.BATCH_FORGET, 0, b"\x01")) is None
    assert srv.lookup_count(FILE) == 1


@pytest.mark.parametrize("name, nul, expected", [
    (b"hello.txt", False, errno.EINVAL),          # not NUL-terminated
    (b"hello.txt\0junk", True, errno.EINVAL),     # embedded NUL
    (b"", True, errno.EINVAL),
    (b"a/b", True, errno.EINVAL),
    (b"/", True, errno.EINVAL),
    (b".", True, errno.EINVAL),
    (b"..", True, errno.EINVAL),
    (b"n" * 256, True, errno.ENAMETOOLONG),
    (b"n" * 1024, True, errno.ENAMETOOLONG),
])
def test_hostile_names(srv, ops, f, name, nul, expected):
    assert err(srv.handle(f.lookup(ROOT, name, nul=nul))) == expected
    assert not ops.calls


def test_name_of_255_bytes_reaches_the_filesystem(srv, ops, f):
    assert err(srv.handle(f.lookup(ROOT, b"n" * 255))) == errno.ENOENT
    assert ops.calls[-1][2] == b"n" * 255


def test_unknown_nodeid_gets_the_filesystems_errno(srv, f):
    assert err(srv.handle(f.getattr(2**64 - 1))) == errno.ESTALE
    assert err(srv.handle(f.lookup(2**64 - 1, b"x"))) == errno.ENOTDIR


def test_huge_read_size_is_capped(srv, ops, f):
    ok(srv.handle(f.read(FILE, 1, 0, 0xFFFF_FFFF)))
    assert ops.calls[-1][-1] == 256 * 4096


def test_read_cap_follows_negotiated_pages(ops, f):
    s = FuseServer(ops)
    ok(s.handle(f.init(flags=InitFlags.ASYNC_READ)))  # no MAX_PAGES: 32 pages
    ok(s.handle(f.read(FILE, 1, 0, 1 << 20)))
    assert ops.calls[-1][-1] == 32 * 4096


def test_huge_readdir_size_is_capped(srv, f):
    fh = open_dir(srv, f, BIG)
    payload = ok(srv.handle(f.readdirplus(BIG, fh, 0, 0xFFFF_FFFF)))
    assert len(payload) <= 256 * 4096


def test_filesystem_bug_is_logged_with_traceback_and_eio(f, caplog):
    class Buggy(MemOps):
        def getattr(self, nodeid, fh, ctx):
            return {}["missing"]

    s = FuseServer(Buggy())
    ok(s.handle(f.init()))
    with caplog.at_level(logging.ERROR, logger="nydus_vfs.fuse"):
        assert err(s.handle(f.getattr(FILE))) == errno.EIO
    rec = [r for r in caplog.records if r.name == "nydus_vfs.fuse"][-1]
    assert rec.levelno == logging.ERROR and rec.exc_info and rec.exc_info[0] is KeyError
    ok(s.handle(f.statfs()))  # the session goes on


def test_fs_errno_out_of_range_becomes_eio(f):
    class Odd(MemOps):
        def getattr(self, nodeid, fh, ctx):
            raise FsError(0)

    s = FuseServer(Odd())
    ok(s.handle(f.init()))
    assert err(s.handle(f.getattr(FILE))) == errno.EIO


def test_protocol_warnings_are_rate_limited(srv, caplog):
    with caplog.at_level(logging.WARNING, logger="nydus_vfs.fuse"):
        for _ in range(3000):
            srv.handle(b"x")
    logged = [r for r in caplog.records if r.name == "nydus_vfs.fuse"]
    assert 16 <= len(logged) <= 20


# -- out_capacity ---------------------------------------------------------------------------------------

def test_capacity_below_header_gets_no_reply(srv, ops, f, caplog):
    assert srv.handle(f.getattr(FILE), 15) is None
    assert srv.handle(f.getattr(FILE), 0) is None
    assert "cannot hold a reply header" in caplog.text
    # FORGET still happens with no writable part at all (hiprio queue)
    ok(srv.handle(f.lookup(ROOT, b"hello.txt")))
    assert srv.handle(f.forget(FILE, 1), 0) is None
    assert srv.lookup_count(FILE) == 0


def test_fixed_reply_larger_than_capacity_is_einval(srv, f):
    assert err(srv.handle(f.getattr(FILE), 119)) == errno.EINVAL
    ok(srv.handle(f.getattr(FILE), 120))
    assert err(srv.handle(f.statfs(), 95)) == errno.EINVAL
    assert err(srv.handle(f.readlink(LINK), 20)) == errno.EINVAL


def test_lookup_without_room_is_not_counted(srv, ops, f):
    assert err(srv.handle(f.lookup(ROOT, b"hello.txt"), 143)) == errno.EINVAL
    assert srv.live_nodeids == 0 and not ops.calls
    ok(srv.handle(f.lookup(ROOT, b"hello.txt"), 144))


def test_read_and_readdir_are_capped_to_capacity(srv, ops, f):
    reply = srv.handle(f.read(FILE, 1, 0, 4096), 16 + 5)
    assert ok(reply) == b"hello"
    assert ops.calls[-1][-1] == 5
    fh = open_dir(srv, f, BIG)
    for build in (f.readdir, f.readdirplus):
        raw = flatten(srv.handle(build(BIG, fh, 0, 4096), 16 + 1000))
        assert 16 < len(raw) <= 16 + 1000


def test_init_reply_needs_room(ops, f):
    s = FuseServer(ops)
    assert err(s.handle(f.init(), 40)) == errno.EINVAL
    assert s.state is SessionState.NEED_INIT


# -- buffer types -------------------------------------------------------------------------------------

@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview, lambda b: memoryview(bytearray(b))])
def test_any_bytes_like_request(srv, f, wrap):
    assert codec.EntryOut.from_bytes(ok(srv.handle(wrap(f.lookup(ROOT, b"hello.txt"))))).nodeid == FILE
    assert codec.AttrOut.from_bytes(ok(srv.handle(wrap(f.getattr(FILE))))).attr.ino == FILE
    assert ok(srv.handle(wrap(f.getxattr(FILE, b"user.a", 100)))) == b"value-a"
    assert srv.handle(wrap(f.forget(FILE, 1))) is None
    assert srv.lookup_count(FILE) == 0


# -- differential check against the independent test-harness decoders -------------------------------------

def test_replies_decode_with_the_harness_decoders(srv, ops, f):
    wire = pytest.importorskip("tests.harness.fuse_wire")
    entry = wire.decode_entry_out(ok(srv.handle(f.lookup(ROOT, b"hello.txt"))))
    assert (entry.nodeid, entry.attr.size, entry.attr.mode) == (FILE, 11, stat.S_IFREG | 0o644)
    fh = open_dir(srv, f, ROOT)
    plus = wire.decode_direntplus(ok(srv.handle(f.readdirplus(ROOT, fh))))
    assert [p.dirent.name for p in plus] == [b".", b"..", b"hello.txt", b"link", b"sub", b"big"]


# -- property: nothing escapes handle() ------------------------------------------------------------------

def _check_reply(request: bytes, reply) -> None:
    if len(request) < 40:
        assert reply is None
        return
    length, opcode, unique = struct.unpack_from("<IIQ", request)
    if reply is None:
        assert opcode in abi.NO_REPLY_OPCODES
        return
    assert not inspect.isawaitable(reply)
    raw = flatten(reply)
    h = codec.OutHeader.from_bytes(raw)
    h.validate(len(raw))
    assert h.unique == unique


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_random_bytes_never_raise(data):
    srv, f = _session(MemOps())
    _check_reply(data, srv.handle(data))


_VALID = [
    lambda f: f.lookup(ROOT, b"hello.txt"), lambda f: f.getattr(FILE), lambda f: f.forget(FILE, 1),
    lambda f: f.batch_forget([(FILE, 1), (LINK, 2)]), lambda f: f.read(FILE, 1, 0, 100),
    lambda f: f.readdirplus(BIG, 0, 0, 4096), lambda f: f.readdir(ROOT, 0), lambda f: f.getxattr(FILE, b"user.a", 0),
    lambda f: f.listxattr(FILE, 100), lambda f: f.open(FILE), lambda f: f.init(), lambda f: f.statfs(),
    lambda f: f.interrupt(3), lambda f: f.lseek(FILE, 0, 0, 3), lambda f: f.write_request(Opcode.CREATE),
    lambda f: f.destroy(), lambda f: f.readlink(LINK), lambda f: f.access(FILE, 4),
]


@settings(max_examples=300)
@given(which=st.sampled_from(range(len(_VALID))),
       edits=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=6),
       cut=st.one_of(st.none(), st.integers(0, 400)), extra=st.binary(max_size=16),
       fix_len=st.booleans(), capacity=st.one_of(st.none(), st.integers(0, 5000)))
def test_mutated_requests_never_raise(which, edits, cut, extra, fix_len, capacity):
    srv, f = _session(MemOps())
    ok(srv.handle(f.lookup(ROOT, b"hello.txt")))
    raw = bytearray(_VALID[which](f))
    for pos, value in edits:
        if pos < len(raw):
            raw[pos] = value
    if cut is not None:
        del raw[cut:]
    raw += extra
    if fix_len and len(raw) >= 4:
        raw[0:4] = struct.pack("<I", len(raw))
    reply = srv.handle(bytes(raw), capacity)
    if capacity is not None and capacity < 16:
        assert reply is None
        return
    _check_reply(bytes(raw), reply)
    if reply is not None and capacity is not None:
        assert len(flatten(reply)) <= capacity


# -- write opcodes on a writable server ------------------------------------------------------------

class WriteOps(MemOps):
    """MemOps plus recording write methods; new inodes get nodeids from 500 on."""

    def __init__(self) -> None:
        super().__init__()
        self.next_id = 500

    def _new(self, mode):
        nodeid = self.next_id
        self.next_id += 1
        self.attrs[nodeid] = Attr(nodeid, mode)
        return self._entry(nodeid)

    def setattr(self, nodeid, attrs, ctx):
        self.calls.append(("setattr", nodeid, attrs))
        return self._attr(nodeid)

    def mknod(self, parent, name, mode, rdev, umask, ctx):
        self.calls.append(("mknod", parent, name, mode, rdev, umask))
        return self._new(mode)

    def mkdir(self, parent, name, mode, umask, ctx):
        self.calls.append(("mkdir", parent, name, mode, umask))
        return self._new(stat.S_IFDIR | mode)

    def symlink(self, parent, name, target, ctx):
        self.calls.append(("symlink", parent, name, target))
        return self._new(stat.S_IFLNK | 0o777)

    def link(self, nodeid, newparent, newname, ctx):
        self.calls.append(("link", nodeid, newparent, newname))
        return self._entry(nodeid)

    def unlink(self, parent, name, ctx):
        self.calls.append(("unlink", parent, name))

    def rmdir(self, parent, name, ctx):
        self.calls.append(("rmdir", parent, name))

    def rename(self, parent, name, newparent, newname, flags, ctx):
        self.calls.append(("rename", parent, name, newparent, newname, flags))

    def create(self, parent, name, mode, flags, umask, ctx):
        self.calls.append(("create", parent, name, mode, flags, umask))
        return self._new(mode), 77, abi.FOPEN_DIRECT_IO

    def write(self, nodeid, fh, offset, data, write_flags, ctx):
        self.calls.append(("write", nodeid, fh, offset, bytes(data), write_flags))
        return len(data)

    def setxattr(self, nodeid, name, value, flags, ctx):
        self.calls.append(("setxattr", nodeid, name, value, flags))

    def removexattr(self, nodeid, name, ctx):
        self.calls.append(("removexattr", nodeid, name))

    def fallocate(self, nodeid, fh, offset, length, mode, ctx):
        self.calls.append(("fallocate", nodeid, fh, offset, length, mode))

    def copy_file_range(self, nodeid_in, fh_in, off_in, nodeid_out, fh_out, off_out, length, flags, ctx):
        self.calls.append(("copy_file_range", nodeid_in, fh_in, off_in, nodeid_out, fh_out, off_out, length,
                           flags))
        return length // 2

    def getlk(self, nodeid, fh, owner, lock, ctx):
        self.calls.append(("getlk", nodeid, fh, owner, lock))
        return lock._replace(type=2, pid=0)

    def setlk(self, nodeid, fh, owner, lock, sleep, flock, ctx):
        self.calls.append(("setlk", nodeid, fh, owner, lock, sleep, flock))


@pytest.fixture
def wops():
    return WriteOps()


@pytest.fixture
def wsrv(wops, f):
    server = FuseServer(wops, readonly=False, posix_locks=True)
    ok(server.handle(f.init()))
    return server


def _entry_of(payload: bytes) -> codec.EntryOut:
    e = codec.EntryOut.from_bytes(payload)
    e.validate()
    return e


def test_writable_server_grants_atomic_o_trunc_and_locks_only_when_asked(ops, f):
    ro = FuseServer(ops)
    init = codec.InitOut.from_bytes(ok(ro.handle(f.init())))
    assert not init.flags & (InitFlags.ATOMIC_O_TRUNC | InitFlags.POSIX_LOCKS | InitFlags.FLOCK_LOCKS)
    rw = FuseServer(ops, readonly=False)
    init = codec.InitOut.from_bytes(ok(rw.handle(f.init())))
    assert init.flags & InitFlags.ATOMIC_O_TRUNC
    assert not init.flags & (InitFlags.POSIX_LOCKS | InitFlags.FLOCK_LOCKS)
    locks = FuseServer(ops, readonly=False, posix_locks=True)
    init = codec.InitOut.from_bytes(ok(locks.handle(f.init())))
    assert init.flags & InitFlags.POSIX_LOCKS and init.flags & InitFlags.FLOCK_LOCKS


def test_entry_creating_opcodes_decode_their_arguments_and_count_a_lookup(wsrv, wops, f):
    cases = [
        (f.mknod(ROOT, b"fifo", stat.S_IFIFO | 0o600, 0, 0o022), ("mknod", ROOT, b"fifo", stat.S_IFIFO | 0o600, 0, 0o022)),
        (f.mknod(ROOT, b"wh", stat.S_IFCHR, 0), ("mknod", ROOT, b"wh", stat.S_IFCHR, 0, 0o022)),
        (f.mkdir(SUB, b"d", 0o700, 0o077), ("mkdir", SUB, b"d", 0o700, 0o077)),
        (f.symlink(ROOT, b"sl", b"../some/where"), ("symlink", ROOT, b"sl", b"../some/where")),
        (f.link(FILE, SUB, b"hard"), ("link", FILE, SUB, b"hard")),
    ]
    for req, call in cases:
        e = _entry_of(ok(wsrv.handle(req)))
        assert wops.calls[-1] == call
        assert e.entry_valid == 1 and e.attr_valid == 2  # Entry timeouts 1.25 / 2.5
        assert wsrv.lookup_count(e.nodeid) == 1 and e.attr.ino == e.nodeid
    assert wsrv.lookup_count(FILE) == 1  # the hard link counted the existing inode


def test_create_replies_entry_and_open_and_counts(wsrv, wops, f):
    payload = ok(wsrv.handle(f.create(ROOT, b"new", 0o100640, abi.O_WRONLY | abi.O_CREAT | abi.O_EXCL, 0o002)))
    assert len(payload) == 128 + 16
    e = _entry_of(payload)
    assert wops.calls[-1] == ("create", ROOT, b"new", 0o100640, abi.O_WRONLY | abi.O_CREAT | abi.O_EXCL, 0o002)
    out = codec.OpenOut.from_bytes(payload, 128)
    assert (out.fh, out.open_flags) == (77, abi.FOPEN_DIRECT_IO)
    assert wsrv.lookup_count(e.nodeid) == 1


def test_create_refused_for_max_nodeids_releases_the_handle_and_the_inode(wops, f):
    s = FuseServer(wops, readonly=False, max_nodeids=1)
    ok(s.handle(f.init()))
    ok(s.handle(f.lookup(ROOT, b"hello.txt")))
    assert err(s.handle(f.create(ROOT, b"x"))) == errno.ENFILE
    assert wops.calls[-1] == ("release", 500, 77, 0o102)
    assert wops.released == [500]


def test_unlink_rmdir_rename_rename2(wsrv, wops, f):
    ok(wsrv.handle(f.unlink(ROOT, b"hello.txt")))
    assert wops.calls[-1] == ("unlink", ROOT, b"hello.txt")
    ok(wsrv.handle(f.rmdir(ROOT, b"sub")))
    assert wops.calls[-1] == ("rmdir", ROOT, b"sub")
    ok(wsrv.handle(f.rename(ROOT, b"a", SUB, b"b")))
    assert wops.calls[-1] == ("rename", ROOT, b"a", SUB, b"b", 0)
    ok(wsrv.handle(f.rename(ROOT, b"a", SUB, b"b", flags=4)))  # RENAME_WHITEOUT
    assert wops.calls[-1] == ("rename", ROOT, b"a", SUB, b"b", 4)


@pytest.mark.parametrize("make", [
    lambda f: f.unlink(ROOT, b".."), lambda f: f.rmdir(ROOT, b"a/b"), lambda f: f.mkdir(ROOT, b"."),
    lambda f: f.rename(ROOT, b"a", ROOT, b".."), lambda f: f.rename(ROOT, b"..", ROOT, b"x", flags=0),
    lambda f: f.symlink(ROOT, b"x/y", b"t"), lambda f: f.link(FILE, ROOT, b"a/b"),
    lambda f: f.create(ROOT, b""), lambda f: f.mknod(ROOT, b"../x", stat.S_IFREG),
    lambda f: f.request(Opcode.RENAME, ROOT, struct.pack("<Q", ROOT) + b"a\0b"),
    lambda f: f.request(Opcode.SYMLINK, ROOT, b"name\0tar\0get\0"),
    lambda f: f.request(Opcode.SYMLINK, ROOT, b"name-without-nul"),
])
def test_bad_names_in_write_opcodes_never_reach_the_filesystem(wsrv, wops, f, make):
    before = len(wops.calls)
    assert err(wsrv.handle(make(f))) in (errno.EINVAL, errno.ENOENT)
    assert len(wops.calls) == before


def test_symlink_target_limits(wsrv, wops, f):
    assert err(wsrv.handle(f.symlink(ROOT, b"s", b""))) == errno.ENOENT
    assert err(wsrv.handle(f.symlink(ROOT, b"s", b"t" * 4096))) == errno.ENAMETOOLONG
    ok(wsrv.handle(f.symlink(ROOT, b"s", b"t" * 4095)))


def test_write_passes_a_view_of_the_data_and_replies_the_count(wsrv, wops, f):
    payload = ok(wsrv.handle(f.write(FILE, 9, 4096, b"abcdef", write_flags=abi.FUSE_WRITE_CACHE)))
    assert codec.WriteOut.from_bytes(payload).size == 6
    assert wops.calls[-1] == ("write", FILE, 9, 4096, b"abcdef", abi.FUSE_WRITE_CACHE)


def test_write_size_beyond_the_request_is_einval(wsrv, wops, f):
    raw = bytearray(f.write(FILE, 9, 0, b"abc"))
    struct.pack_into("<I", raw, 40 + 16, 100)  # fuse_write_in.size
    assert err(wsrv.handle(bytes(raw))) == errno.EINVAL
    assert not any(c[0] == "write" for c in wops.calls)
    assert err(wsrv.handle(f.write(FILE, 9, (1 << 63) - 2, b"abc"))) == errno.EFBIG


def test_write_returning_more_than_asked_is_a_filesystem_bug(wops, f, caplog):
    wops.write = lambda *a: 10
    s = FuseServer(wops, readonly=False)
    ok(s.handle(f.init()))
    with caplog.at_level(logging.ERROR, logger="nydus_vfs.fuse"):
        assert err(s.handle(f.write(FILE, 9, 0, b"abc"))) == errno.EIO


# -- WRITE data the transport left where it arrived (virtio-fs: guest memory) --------------------

class PayloadOps(WriteOps):
    """Keeps the data object ``write`` got (a view only as bytes: it dies with the call)."""

    def write(self, nodeid, fh, offset, data, write_flags, ctx):
        self.calls.append(("write", nodeid, fh, offset, bytes(data) if type(data) is memoryview else data,
                           write_flags))
        return len(data)


@pytest.fixture
def psrv(f):
    ops = PayloadOps()
    server = FuseServer(ops, readonly=False)
    ok(server.handle(f.init()))
    return server, ops


def _split(raw: bytes, at: int = 80) -> tuple[bytes, None, BytesPayload]:
    """``handle`` arguments as the virtio-fs transport passes a partial request: prefix, capacity, rest."""
    return raw[:at], None, BytesPayload(raw[at:])


def test_write_payload_reaches_the_filesystem_uncopied(psrv, f):
    server, ops = psrv
    data = os.urandom(1 << 20)
    prefix, _, payload = _split(f.write(FILE, 9, 4096, data, write_flags=abi.FUSE_WRITE_CACHE))
    reply = server.handle(prefix, 4096, payload)
    assert codec.WriteOut.from_bytes(ok(reply)).size == 1 << 20
    call = ops.calls[-1]
    assert call[:4] == ("write", FILE, 9, 4096) and call[5] == abi.FUSE_WRITE_CACHE
    assert call[4] is payload and payload.copies == 0


def test_write_payload_longer_than_size_is_cut_not_copied(psrv, f):
    server, ops = psrv
    raw = bytearray(f.write(FILE, 9, 0, bytes(range(256)) * 40))
    struct.pack_into("<I", raw, 40 + 16, 1000)            # fuse_write_in.size below the data present
    prefix, _, payload = _split(bytes(raw))
    assert codec.WriteOut.from_bytes(ok(server.handle(prefix, None, payload))).size == 1000
    got = ops.calls[-1][4]
    assert len(got) == 1000 and got.tobytes() == (bytes(range(256)) * 40)[:1000]
    assert payload.copies == 1                              # the test's tobytes, not the server's


def test_write_payload_lengths_count_the_whole_request(psrv, f, caplog):
    server, ops = psrv
    raw = bytearray(f.write(FILE, 9, 0, bytes(8192)))
    struct.pack_into("<I", raw, 40 + 16, 8193)            # one byte more than prefix + payload hold
    assert err(server.handle(*_split(bytes(raw)))) == errno.EINVAL
    raw = f.write(FILE, 9, 0, bytes(8192))
    prefix, payload = raw[:80], BytesPayload(raw[80:-1])  # fuse_in_header.len counts a byte not there
    assert err(server.handle(prefix, None, payload)) == errno.EINVAL
    assert err(server.handle(*_split(f.write(FILE, 9, (1 << 63) - 2, bytes(5000))))) == errno.EFBIG
    assert not any(c[0] == "write" for c in ops.calls)


def test_other_requests_with_a_payload_are_read_in_whole(psrv, f):
    server, ops = psrv
    value = os.urandom(65536)
    prefix, _, payload = _split(f.setxattr(FILE, b"user.big", value), 4096)
    ok(server.handle(prefix, None, payload))
    assert ops.calls[-1] == ("setxattr", FILE, b"user.big", value, 0)
    assert payload.copies == 1
    # A WRITE split anywhere but where its data begins is read in too (a view of the copy).
    data = os.urandom(10000)
    prefix, _, payload = _split(f.write(FILE, 9, 0, data), 4096)
    ok(server.handle(prefix, None, payload))
    assert ops.calls[-1][4] == data and payload.copies == 1


def test_write_payload_on_a_read_only_server_is_erofs_untouched(ops, f):
    server = FuseServer(ops)
    ok(server.handle(f.init()))
    prefix, _, payload = _split(f.write(FILE, 9, 0, bytes(8192)))
    assert err(server.handle(prefix, None, payload)) == errno.EROFS
    assert payload.copies == payload.pwrites == 0


def test_a_payload_that_fails_is_an_errno_never_a_raise(psrv, f, caplog):
    server, ops = psrv
    prefix, _, payload = _split(f.setxattr(FILE, b"user.big", bytes(8192)), 4096)
    payload.release()                                       # e.g. used after its request completed
    with caplog.at_level(logging.ERROR, logger="nydus_vfs.fuse"):
        assert err(server.handle(prefix, None, payload)) == errno.EIO
    assert ops.calls == []


def test_setattr_decodes_every_field(wsrv, wops, f):
    valid = abi.FATTR_MODE | abi.FATTR_SIZE | abi.FATTR_ATIME | abi.FATTR_ATIME_NOW | abi.FATTR_MTIME | abi.FATTR_FH
    payload = ok(wsrv.handle(f.setattr(FILE, valid, fh=5, size=123, atime=1, atimensec=2, mtime=3,
                                       mtimensec=4, mode=0o600, uid=7, gid=8)))
    out = codec.AttrOut.from_bytes(payload)
    assert out.attr_valid == 2 and out.attr.ino == FILE
    call = wops.calls[-1]
    assert call[0] == "setattr" and call[1] == FILE
    a = call[2]
    assert (a.valid, a.fh, a.size, a.atime, a.atimensec, a.mtime, a.mtimensec, a.mode, a.uid, a.gid) == (
        valid, 5, 123, 1, 2, 3, 4, 0o600, 7, 8)
    assert err(wsrv.handle(f.setattr(FILE, abi.FATTR_MTIME, mtimensec=10**9))) == errno.EINVAL


def test_xattr_writes(wsrv, wops, f):
    ok(wsrv.handle(f.setxattr(FILE, b"trusted.overlay.opaque", b"y", flags=1)))
    assert wops.calls[-1] == ("setxattr", FILE, b"trusted.overlay.opaque", b"y", 1)
    ok(wsrv.handle(f.setxattr(FILE, b"user.empty", b"")))
    assert wops.calls[-1] == ("setxattr", FILE, b"user.empty", b"", 0)
    ok(wsrv.handle(f.removexattr(FILE, b"user.a")))
    assert wops.calls[-1] == ("removexattr", FILE, b"user.a")
    # value length must match the size field; the name must be NUL-terminated and non-empty
    raw = f.request(Opcode.SETXATTR, FILE, struct.pack("<II", 5, 0) + b"user.x\0abc")
    assert err(wsrv.handle(raw)) == errno.EINVAL
    assert err(wsrv.handle(f.setxattr(FILE, b"", b"v"))) == errno.EINVAL
    assert err(wsrv.handle(f.setxattr(FILE, b"user." + b"x" * 300, b"v"))) == errno.ERANGE
    assert err(wsrv.handle(f.request(Opcode.SETXATTR, FILE, struct.pack("<II", 70000, 0) + b"a\0"))) == errno.E2BIG


def test_fallocate_copy_file_range_and_locks(wsrv, wops, f):
    ok(wsrv.handle(f.fallocate(FILE, 3, 10, 20, 1)))
    assert wops.calls[-1] == ("fallocate", FILE, 3, 10, 20, 1)
    payload = ok(wsrv.handle(f.copy_file_range(FILE, 3, 5, SUB, 4, 6, 100, 0)))
    assert codec.WriteOut.from_bytes(payload).size == 50
    assert wops.calls[-1] == ("copy_file_range", FILE, 3, 5, SUB, 4, 6, 100, 0)
    payload = ok(wsrv.handle(f.lock(Opcode.GETLK, FILE, 3, 99, 0, 10, 1, 42)))
    out = codec.LkOut.from_bytes(payload)
    assert (out.start, out.end, out.type, out.pid) == (0, 10, 2, 0)
    ok(wsrv.handle(f.lock(Opcode.SETLK, FILE, 3, 99, 0, 10, 1, 42)))
    assert wops.calls[-1][5:] == (False, False)
    ok(wsrv.handle(f.lock(Opcode.SETLKW, FILE, 3, 99, 0, 2**64 - 1, 0, 42, lk_flags=abi.FUSE_LK_FLOCK)))
    assert wops.calls[-1][5:] == (True, True)
    assert err(wsrv.handle(f.lock(Opcode.SETLK, FILE, 3, 99, 0, 10, 7, 42))) == errno.EINVAL


def test_ioctl_is_enotty_on_any_server(srv, wsrv, f):
    assert err(srv.handle(f.ioctl(FILE, 0, 0x5401))) == errno.ENOTTY
    assert err(wsrv.handle(f.ioctl(FILE, 0, 0x5401))) == errno.ENOTTY


@pytest.mark.parametrize("opcode", sorted(abi.WRITE_OPCODES - {Opcode.TMPFILE}), ids=lambda o: Opcode(o).name)
def test_short_write_arguments_are_einval_not_a_crash(wsrv, f, opcode):
    assert err(wsrv.handle(f.request(opcode, ROOT, b"\0\0\0"))) == errno.EINVAL


def test_readdirplus_entries_not_sent_are_released(wops, f):
    s = FuseServer(wops, readonly=False)
    ok(s.handle(f.init()))
    # 152-byte heads + long names: a 4096-byte reply holds far fewer than the 60 entries.
    payload = ok(s.handle(f.readdirplus(BIG, 0, 0, 4096)))
    sent = [d.entry_out.nodeid for d in codec.iter_direntplus(payload) if d.entry_out.nodeid]
    assert sent and all(s.lookup_count(n) == 1 for n in sent)
    # exactly one more entry was pulled than fit, and the kernel never saw it
    assert len(wops.released) == 1 and wops.released[0] not in sent
    assert wops.released[0] == 100 + len(sent)


def test_setlkw_that_waits_is_driven_like_a_suspended_read_and_interrupt_cancels_it(wops, f):
    async def scenario():
        loop = asyncio.get_running_loop()
        gate = loop.create_future()
        log = []

        async def wait_for_lock():
            try:
                await gate
            except asyncio.CancelledError:
                log.append("cancelled")
                raise
            log.append("locked")

        wops.setlk = lambda *a: wait_for_lock()
        s = FuseServer(wops, readonly=False, posix_locks=True)
        ok(s.handle(f.init()))
        pending = s.handle(f.lock(Opcode.SETLKW, FILE, 3, 1, 0, 10, 1))
        assert inspect.isawaitable(pending) and s.pending_reads == 1
        task = asyncio.ensure_future(pending)
        await asyncio.sleep(0)
        gate.set_result(None)
        assert ok(await task) == b"" and log == ["locked"]
        gate = loop.create_future()
        pending = s.handle(f.lock(Opcode.SETLKW, FILE, 3, 1, 0, 10, 1))
        task = asyncio.ensure_future(pending)
        await asyncio.sleep(0)
        assert s.handle(f.interrupt(f.last_unique)) is None
        assert err(await task) == errno.EINTR and log == ["locked", "cancelled"]
        assert s.pending_reads == 0

    asyncio.run(scenario())


def test_per_request_counters_of_the_filesystem():
    # Operations.counters(): the server bumps hits/errors of nodeid >> 56, a READ that
    # suspends is counted when it ends.
    import asyncio

    fopmap = [-1] * 64
    fopmap[int(Opcode.GETATTR)] = 0
    fopmap[int(Opcode.READ)] = 1
    hits = [[0, 0] for _ in range(256)]
    errs = [[0, 0] for _ in range(256)]

    class Counted(Operations):
        def counters(self):
            return fopmap, hits, errs

        def getattr(self, nodeid, fh, ctx):
            if nodeid == 7:
                raise FsError(errno.ENOENT)
            return Attr(nodeid, 0o100644, size=10)

        async def read(self, nodeid, fh, offset, size, ctx):
            await asyncio.sleep(0)
            if nodeid >> 56 == 3:
                raise FsError(errno.EIO)
            return b"x" * size

    async def main():
        srv = FuseServer(Counted())
        f = FuseRequestFactory()
        srv.handle(f.init())
        srv.handle(f.getattr(1))
        srv.handle(f.getattr((2 << 56) | 5))
        srv.handle(f.getattr(7))
        await srv.handle(f.read((2 << 56) | 5, 0, 0, 10))
        await srv.handle(f.read((3 << 56) | 5, 0, 0, 10))
        assert hits[0] == [1, 0] and hits[2] == [1, 1] and errs[0] == [1, 0] and errs[3] == [0, 1]

    asyncio.run(main())
