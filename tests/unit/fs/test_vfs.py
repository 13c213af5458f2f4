"""The pseudo-mount VFS: nodeid translation, nested mounts, unmount, readdir.

The instances here are small in-memory stand-ins with RafsFs's interface so the
VFS rules are tested on their own; tests/functional/test_nydusd_fuse.py mounts
real images through the whole stack.
"""

from __future__ import annotations

import asyncio
import errno
import stat

import pytest

from nydus_vfs.errors import FsError
from nydus_vfs.fs import Vfs
from nydus_vfs.fuse.ops import Attr, Context

CTX = Context()


class TreeFs:
    """root(10) -> {a(11, dir) -> {f(12, file "hello")}, l(13, symlink -> a/f)}."""

    def __init__(self, root: int = 10, source: str = "tree") -> None:
        self.root_ino = root
        self.source = source
        self.closed = False
        r = root
        self.nodes = {
            r: (stat.S_IFDIR | 0o755, {b"a": r + 1, b"l": r + 3}, None),
            r + 1: (stat.S_IFDIR | 0o755, {b"f": r + 2}, None),
            r + 2: (stat.S_IFREG | 0o644, None, b"hello"),
            r + 3: (stat.S_IFLNK | 0o777, None, b"a/f"),
        }

    def attr(self, ino):
        if ino not in self.nodes:
            raise FsError(errno.ENOENT)
        mode, _, data = self.nodes[ino]
        return Attr(ino, mode, size=len(data or b""), nlink=1)

    def lookup(self, parent, name):
        kids = self.nodes[parent][1]
        if kids is None:
            raise FsError(errno.ENOTDIR)
        if name not in kids:
            raise FsError(errno.ENOENT)
        return kids[name]

    def children(self, ino, start):
        kids = self.nodes[ino][1]
        if kids is None:
            raise FsError(errno.ENOTDIR)
        items = [(b".", ino, 4), (b"..", ino, 4)] + [
            (n, i, (self.nodes[i][0] >> 12) & 0xF) for n, i in sorted(kids.items())]
        for pos in range(start, len(items)):
            name, i, t = items[pos]
            yield pos + 1, name, i, t

    def readlink(self, ino):
        return self.nodes[ino][2]

    def xattrs(self, ino):
        return {b"user.k": b"v"} if ino == self.root_ino + 2 else {}

    def statfs(self):
        from nydus_vfs.fuse.ops import StatFs

        return StatFs(files=len(self.nodes))

    async def read(self, ino, offset, size):
        return self.nodes[ino][2][offset:offset + size]

    def access(self, ino, mask, ctx):
        return None

    def close(self):
        self.closed = True


def run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


def test_root_mount_maps_nodeid_1_to_the_image_root():
    vfs = Vfs()
    fs = TreeFs()
    vfs.mount("/", fs)
    assert stat.S_ISDIR(vfs.getattr(1, None, CTX).mode)
    assert vfs.getattr(1, None, CTX).ino == 1
    a = vfs.lookup(1, b"a", CTX)
    f = vfs.lookup(a.nodeid, b"f", CTX)
    assert f.nodeid >> 56 == 1 and f.nodeid & ((1 << 56) - 1) == fs.root_ino + 2
    assert f.attr.ino == f.nodeid
    assert run(vfs.read(f.nodeid, 0, 1, 3, CTX)) == b"ell"
    assert vfs.readlink(vfs.lookup(1, b"l", CTX).nodeid, CTX) == b"a/f"
    with pytest.raises(FsError) as ei:
        vfs.lookup(1, b"missing", CTX)
    assert ei.value.errno_value == errno.ENOENT


def test_nested_mounts_create_pseudo_parents_and_keep_nodeids_apart():
    vfs = Vfs()
    one, two = TreeFs(10, "one"), TreeFs(10, "two")
    vfs.mount("/rafs/c1/lowerdir", one)
    vfs.mount("/rafs/c2/lowerdir", two)
    rafs = vfs.lookup(1, b"rafs", CTX)
    assert rafs.nodeid >> 56 == 0 and stat.S_ISDIR(rafs.attr.mode)
    names = [d.name for d in vfs.readdir(rafs.nodeid, 0, 0, CTX)]
    assert names == [b".", b"..", b"c1", b"c2"]
    roots = []
    for c in (b"c1", b"c2"):
        lower = vfs.lookup(vfs.lookup(rafs.nodeid, c, CTX).nodeid, b"lowerdir", CTX)
        roots.append(lower.nodeid)
    assert roots[0] != roots[1]
    f1 = vfs.lookup(vfs.lookup(roots[0], b"a", CTX).nodeid, b"f", CTX)
    f2 = vfs.lookup(vfs.lookup(roots[1], b"a", CTX).nodeid, b"f", CTX)
    assert f1.nodeid != f2.nodeid
    assert set(vfs.mounts()) == {"/rafs/c1/lowerdir", "/rafs/c2/lowerdir"}


def test_umount_makes_old_nodeids_stale_and_returns_the_instance():
    vfs = Vfs()
    fs = TreeFs()
    vfs.mount("/x", fs)
    root = vfs.lookup(1, b"x", CTX)
    a = vfs.lookup(root.nodeid, b"a", CTX)
    assert vfs.umount("/x") is fs
    with pytest.raises(FsError) as ei:
        vfs.getattr(a.nodeid, None, CTX)
    assert ei.value.errno_value == errno.ESTALE
    # The pseudo directory stays, empty.
    x = vfs.lookup(1, b"x", CTX)
    assert x.nodeid >> 56 == 0
    assert [d.name for d in vfs.readdir(x.nodeid, 0, 0, CTX)] == [b".", b".."]


def test_mount_errors():
    vfs = Vfs()
    vfs.mount("/a", TreeFs())
    for path, code in (("/a", errno.EEXIST), ("relative", errno.EINVAL), ("/a/../b", errno.EINVAL),
                       ("/a/b", errno.EBUSY)):
        with pytest.raises(FsError) as ei:
            vfs.mount(path, TreeFs())
        assert ei.value.errno_value == code, path
    with pytest.raises(FsError):
        vfs.umount("/nothing")


def test_many_mount_cycles_reuse_instance_slots():
    vfs = Vfs()
    for i in range(600):
        vfs.mount("/cycle", TreeFs())
        vfs.umount("/cycle")
    vfs.mount("/cycle", TreeFs())
    assert vfs.lookup(vfs.lookup(1, b"cycle", CTX).nodeid, b"a", CTX).nodeid


def test_readdirplus_counts_only_real_children():
    vfs = Vfs()
    vfs.mount("/", TreeFs())
    ents = list(vfs.readdirplus(1, 0, 0, CTX))
    assert [e.name for e in ents] == [b".", b"..", b"a", b"l"]
    assert ents[0].entry is None and ents[1].entry is None
    assert ents[2].entry is not None and ents[2].entry.nodeid == ents[2].ino
    # resume cookies
    rest = list(vfs.readdirplus(1, 0, ents[1].offset, CTX))
    assert [e.name for e in rest] == [b"a", b"l"]


def test_xattrs_and_statfs_and_pseudo_defaults():
    vfs = Vfs()
    vfs.mount("/m", TreeFs())
    assert vfs.listxattr(1, CTX) == []
    with pytest.raises(FsError) as ei:
        vfs.getxattr(1, b"user.k", CTX)
    assert ei.value.errno_value == errno.ENODATA
    m = vfs.lookup(1, b"m", CTX)
    f = vfs.lookup(vfs.lookup(m.nodeid, b"a", CTX).nodeid, b"f", CTX)
    assert vfs.getxattr(f.nodeid, b"user.k", CTX) == b"v"
    assert vfs.listxattr(f.nodeid, CTX) == [b"user.k"]
    assert vfs.statfs(f.nodeid, CTX).files == 4
    with pytest.raises(FsError) as ei:
        vfs.open(m.nodeid, 0, CTX)
    assert ei.value.errno_value == errno.EISDIR


def test_open_and_opendir_are_skipped_only_when_the_kernel_supports_it():
    from nydus_vfs.fuse.ops import ConnInfo

    vfs = Vfs()
    vfs.mount("/", TreeFs())
    f = vfs.lookup(vfs.lookup(1, b"a", CTX).nodeid, b"f", CTX).nodeid
    vfs.init(ConnInfo(7, 38, 0x20000, 1 << 20, 256, 0, kernel_flags=0))
    assert vfs.open(f, 0, CTX) == (0, 1 << 1)          # FOPEN_KEEP_CACHE
    assert vfs.opendir(1, 0, CTX)[0] == 0
    vfs.init(ConnInfo(7, 38, 0x20000, 1 << 20, 256, 0, kernel_flags=0x7BFFFFFB))
    for call in (lambda: vfs.open(f, 0, CTX), lambda: vfs.opendir(1, 0, CTX),
                 lambda: vfs.flush(f, 0, 0)):
        with pytest.raises(FsError) as ei:
            call()
        assert ei.value.errno_value == errno.ENOSYS
    # Type errors still win over "skip": a directory is never opened as a file.
    with pytest.raises(FsError) as ei:
        vfs.open(1, 0, CTX)
    assert ei.value.errno_value == errno.EISDIR
