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
from nydus_vfs.fs import FileSystem, ReadOnlyFs, Vfs
from nydus_vfs.fuse.ops import Attr, Context, DirEntry, Entry, StatFs
from nydus_vfs.testing import BytesPayload

CTX = Context()


class TreeFs(ReadOnlyFs):
    """root(10) -> {a(11, dir) -> {f(12, file "hello")}, l(13, symlink -> a/f)}; immutable, read-only."""

    def __init__(self, root: int = 10, source: str = "tree") -> None:
        self.root_ino = root
        self.source = source
        self.closed = False
        self.released: list[int] = []
        r = root
        self.nodes = {
            r: (stat.S_IFDIR | 0o755, {b"a": r + 1, b"l": r + 3}, None),
            r + 1: (stat.S_IFDIR | 0o755, {b"f": r + 2}, None),
            r + 2: (stat.S_IFREG | 0o644, None, b"hello"),
            r + 3: (stat.S_IFLNK | 0o777, None, b"a/f"),
        }

    def getattr(self, ino, fh, ctx):
        if ino not in self.nodes:
            raise FsError(errno.ENOENT)
        mode, _, data = self.nodes[ino]
        return Attr(ino, mode, size=len(data or b""), nlink=1)

    def lookup(self, parent, name, ctx):
        kids = self.nodes[parent][1]
        if kids is None:
            raise FsError(errno.ENOTDIR)
        if name not in kids:
            raise FsError(errno.ENOENT)
        ino = kids[name]
        return Entry(ino, self.getattr(ino, None, ctx), 0, 5.0, 5.0)

    def readdir(self, ino, fh, offset, plus, ctx):
        kids = self.nodes[ino][1]
        if kids is None:
            raise FsError(errno.ENOTDIR)
        items = [(b".", ino, 4), (b"..", ino, 4)] + [
            (n, i, (self.nodes[i][0] >> 12) & 0xF) for n, i in sorted(kids.items())]
        return (DirEntry(name, i, t, pos + 1,
                         self.lookup(ino, name, ctx) if plus and name not in (b".", b"..") else None)
                for pos, (name, i, t) in enumerate(items) if pos >= offset)

    def open(self, ino, flags, ctx):
        if stat.S_ISDIR(self.nodes[ino][0]):
            raise FsError(errno.EISDIR)
        return 0, 1 << 1

    def opendir(self, ino, flags, ctx):
        return 0, 0

    def readlink(self, ino, ctx):
        return self.nodes[ino][2]

    def getxattr(self, ino, name, ctx):
        if ino == self.root_ino + 2 and name == b"user.k":
            return b"v"
        raise FsError(errno.ENODATA)

    def listxattr(self, ino, ctx):
        return [b"user.k"] if ino == self.root_ino + 2 else []

    def statfs(self, ino, ctx):
        return StatFs(files=len(self.nodes))

    async def read(self, ino, fh, offset, size, ctx):
        return self.nodes[ino][2][offset:offset + size]

    def lseek(self, ino, fh, offset, whence):
        raise FsError(errno.EINVAL)

    def access(self, ino, mask, ctx):
        return None

    def release_inode(self, ino):
        self.released.append(ino)

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
    # The pseudo directory held only the mount: it is pruned (issue 7 item 6), and a
    # kernel still holding its nodeid gets ENOENT.
    with pytest.raises(FsError) as ei:
        vfs.lookup(1, b"x", CTX)
    assert ei.value.errno_value == errno.ENOENT
    assert vfs.pseudo_nodes() == 1
    with pytest.raises(FsError):
        vfs.getattr(root.nodeid, None, CTX)


def test_nested_mounts_prune_only_empty_pseudo_directories():
    vfs = Vfs()
    vfs.mount("/rafs/a/lowerdir", TreeFs())
    vfs.mount("/rafs/b/lowerdir", TreeFs())
    assert vfs.pseudo_nodes() == 6  # /, rafs, a, a/lowerdir, b, b/lowerdir
    vfs.umount("/rafs/a/lowerdir")
    assert vfs.pseudo_nodes() == 4
    assert [d.name for d in vfs.readdir(vfs.lookup(1, b"rafs", CTX).nodeid, 0, 0, CTX)] == [b".", b"..", b"b"]
    vfs.umount("/rafs/b/lowerdir")
    assert vfs.pseudo_nodes() == 1
    assert vfs.parent_entry("/rafs/b/lowerdir") == (None, b"lowerdir")
    vfs.mount("/rafs/c/lowerdir", TreeFs())
    parent, name = vfs.parent_entry("/rafs/c/lowerdir")
    assert name == b"lowerdir" and parent == vfs.lookup(vfs.lookup(1, b"rafs", CTX).nodeid, b"c", CTX).nodeid


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


# -- the FileSystem seam ------------------------------------------------------------------------------

class MutableFs(TreeFs):
    """TreeFs that changes under the guest: mkdir/create/unlink/write work, nothing is immutable."""

    immutable = False
    readonly = False

    def __init__(self, root: int = 10, source: str = "mutable") -> None:
        super().__init__(root, source)
        self.next_ino = root + 100
        self.destroyed = 0
        self.calls: list[tuple] = []

    def _add(self, parent, name, mode, data=None):
        ino = self.next_ino
        self.next_ino += 1
        self.nodes[ino] = (mode, {} if stat.S_ISDIR(mode) else None, data)
        self.nodes[parent][1][name] = ino
        return self.lookup(parent, name, CTX)

    def mkdir(self, parent, name, mode, umask, ctx):
        return self._add(parent, name, stat.S_IFDIR | mode)

    def create(self, parent, name, mode, flags, umask, ctx):
        return self._add(parent, name, mode, b""), 42, 0

    def unlink(self, parent, name, ctx):
        del self.nodes[parent][1][name]

    def rename(self, parent, name, newparent, newname, flags, ctx):
        self.calls.append(("rename", parent, name, newparent, newname, flags))

    def link(self, ino, newparent, newname, ctx):
        self.calls.append(("link", ino, newparent, newname))
        self.nodes[newparent][1][newname] = ino
        return self.lookup(newparent, newname, ctx)

    def write(self, ino, fh, offset, data, write_flags, ctx):
        mode, kids, old = self.nodes[ino]
        new = bytearray(old or b"")
        new[offset:offset + len(data)] = data
        self.nodes[ino] = (mode, kids, bytes(new))
        return len(data)

    def flush(self, ino, fh, lock_owner):
        self.calls.append(("flush", ino, fh))

    def destroy(self):
        self.destroyed += 1


def test_rafs_and_test_instances_implement_the_seam():
    from nydus_vfs.fs import RafsFs

    assert isinstance(TreeFs(), FileSystem) and isinstance(MutableFs(), FileSystem)
    members = [name for name in dir(FileSystem) if not name.startswith("_")]
    missing = [name for name in members if not hasattr(RafsFs, name)]
    assert not missing
    assert RafsFs.immutable and RafsFs.readonly


def test_writes_to_immutable_instances_and_pseudo_dirs_are_erofs():
    vfs = Vfs(writable=True)
    vfs.mount("/rafs/c1/lowerdir", TreeFs())
    lower = vfs.lookup(vfs.lookup(vfs.lookup(1, b"rafs", CTX).nodeid, b"c1", CTX).nodeid, b"lowerdir", CTX)
    f = vfs.lookup(vfs.lookup(lower.nodeid, b"a", CTX).nodeid, b"f", CTX)
    for call in (lambda: vfs.mkdir(lower.nodeid, b"x", 0o755, 0, CTX),
                 lambda: vfs.create(lower.nodeid, b"x", 0o100644, 0o101, 0, CTX),
                 lambda: vfs.write(f.nodeid, 0, 0, memoryview(b"x"), 0, CTX),
                 lambda: vfs.write(f.nodeid, 0, 0, BytesPayload(b"x" * 8192), 0, CTX),
                 lambda: vfs.unlink(lower.nodeid, b"a", CTX),
                 lambda: vfs.mkdir(1, b"new-pseudo", 0o755, 0, CTX),
                 lambda: vfs.unlink(vfs.lookup(1, b"rafs", CTX).nodeid, b"c1", CTX)):
        with pytest.raises(FsError) as ei:
            call()
        assert ei.value.errno_value == errno.EROFS


def test_mutable_instance_needs_a_writable_vfs():
    with pytest.raises(FsError) as ei:
        Vfs().mount("/containers", MutableFs())
    assert ei.value.errno_value == errno.EPERM
    Vfs(writable=True).mount("/containers", MutableFs())


def test_mutable_instance_nodeids_are_translated_both_ways_and_never_memoised():
    vfs = Vfs(writable=True)
    fs = MutableFs()
    vfs.mount("/containers", fs)
    root = vfs.lookup(1, b"containers", CTX)
    assert root.nodeid >> 56 == 1 and root.attr.ino == root.nodeid
    d = vfs.mkdir(root.nodeid, b"c1", 0o755, 0o022, CTX)
    assert d.nodeid == (1 << 56) | (fs.root_ino + 100) and d.attr.ino == d.nodeid
    e, fh, _ = vfs.create(d.nodeid, b"file", stat.S_IFREG | 0o644, 0o101, 0o022, CTX)
    assert fh == 42 and e.nodeid & ((1 << 56) - 1) == fs.root_ino + 101
    assert vfs.write(e.nodeid, fh, 0, memoryview(b"data!"), 0, CTX) == 5
    # no memoised attr: the size written shows at once
    assert vfs.getattr(e.nodeid, None, CTX).size == 5
    assert vfs.lookup(d.nodeid, b"file", CTX).attr.size == 5
    plus = list(vfs.readdirplus(d.nodeid, 0, 0, CTX))
    assert [x.name for x in plus] == [b".", b"..", b"file"]
    assert plus[0].ino == d.nodeid and plus[2].entry.nodeid == e.nodeid == plus[2].ino
    assert plus[2].entry.attr.ino == e.nodeid
    vfs.unlink(d.nodeid, b"file", CTX)
    with pytest.raises(FsError) as ei:
        vfs.lookup(d.nodeid, b"file", CTX)
    assert ei.value.errno_value == errno.ENOENT
    # release_inode reaches the instance with the local number; its root never
    vfs.release_inode(e.nodeid)
    vfs.release_inode(root.nodeid)
    vfs.release_inode(1)
    assert fs.released == [fs.root_ino + 101]
    vfs.destroy()
    assert fs.destroyed == 1


def test_rename_link_and_copy_across_instances_are_exdev():
    vfs = Vfs(writable=True)
    one, two = MutableFs(source="one"), MutableFs(source="two")
    vfs.mount("/one", one)
    vfs.mount("/two", two)
    r1, r2 = vfs.lookup(1, b"one", CTX).nodeid, vfs.lookup(1, b"two", CTX).nodeid
    f1 = vfs.lookup(vfs.lookup(r1, b"a", CTX).nodeid, b"f", CTX).nodeid
    for call in (lambda: vfs.rename(r1, b"a", r2, b"b", 0, CTX),
                 lambda: vfs.link(f1, r2, b"l", CTX),
                 lambda: vfs.copy_file_range(f1, 0, 0, vfs.lookup(r2, b"l", CTX).nodeid, 0, 0, 1, 0, CTX)):
        with pytest.raises(FsError) as ei:
            call()
        assert ei.value.errno_value == errno.EXDEV
    vfs.rename(r1, b"a", r1, b"b", 4, CTX)
    assert one.calls[-1] == ("rename", one.root_ino, b"a", one.root_ino, b"b", 4)
    link = vfs.link(f1, r1, b"hard", CTX)
    assert link.nodeid == f1 and one.calls[-1] == ("link", one.root_ino + 2, one.root_ino, b"hard")


def test_writable_vfs_never_takes_the_connection_wide_enosys_shortcuts():
    from nydus_vfs.fuse.ops import ConnInfo

    vfs = Vfs(writable=True)
    fs = MutableFs()
    vfs.mount("/", fs)
    vfs.init(ConnInfo(7, 38, 0x20000, 1 << 20, 256, 0, kernel_flags=0x7BFFFFFB))
    f = vfs.lookup(vfs.lookup(1, b"a", CTX).nodeid, b"f", CTX).nodeid
    assert vfs.open(f, 0, CTX) == (0, 1 << 1)
    assert vfs.opendir(1, 0, CTX) == (0, 0)
    vfs.flush(f, 7, 0)
    assert fs.calls[-1] == ("flush", fs.root_ino + 2, 7)
