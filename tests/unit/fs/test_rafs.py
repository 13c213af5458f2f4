"""RafsFs (fs/rafs.py): metadata answers over synthetic images.

File data goes through the blob device, which these tests never touch: the
device is a stand-in that fails the test if anything reads through it.
"""

from __future__ import annotations

import errno

import pytest

from nydus_vfs.errors import FsError
from nydus_vfs.format import Bootstrap
from nydus_vfs.fs import RafsFs, Vfs
from nydus_vfs.fuse.ops import Context
from tests.unit.format.format_factory import build_v5, build_v6, d, f, sample_tree

CTX = Context()


class _NoDevice:
    """A blob device that must not be used by metadata operations."""

    def __getattr__(self, name):
        raise AssertionError(f"metadata operation touched the blob device ({name})")

    def close(self) -> None:
        pass


def _plain_tree():
    return d({b"a.txt": f(0), b"sub": d({b"b": f(0)})})


def _mounted(data: bytes, enable_xattr: bool) -> tuple[RafsFs, Vfs]:
    fs = RafsFs(Bootstrap.from_bytes(data), _NoDevice(), enable_xattr=enable_xattr, source="test")
    vfs = Vfs()
    vfs.mount("/", fs)
    return fs, vfs


@pytest.mark.parametrize("build", [build_v5, build_v6], ids=["v5", "v6"])
def test_xattrs_are_served_when_the_image_has_them_even_without_enable_xattr(build):
    fs, vfs = _mounted(build(sample_tree()), enable_xattr=False)
    assert fs.bootstrap.has_xattr and fs.xattr_supported and not fs.enable_xattr
    node = vfs.lookup(1, b"a.txt", CTX).nodeid
    assert sorted(vfs.listxattr(node, CTX)) == [b"security.selinux", b"user.foo"]
    assert vfs.getxattr(node, b"user.foo", CTX) == b"bar"
    with pytest.raises(FsError) as info:
        vfs.getxattr(node, b"user.missing", CTX)
    assert info.value.errno_value == errno.ENODATA
    # A file without xattrs in such an image: an empty list, not ENOSYS.
    assert vfs.listxattr(vfs.lookup(1, b"empty", CTX).nodeid, CTX) == []


@pytest.mark.parametrize("build", [build_v5, build_v6], ids=["v5", "v6"])
def test_image_without_xattrs_answers_enosys_unless_enabled(build):
    data = build(_plain_tree())
    fs, vfs = _mounted(data, enable_xattr=False)
    assert not fs.bootstrap.has_xattr and not fs.xattr_supported
    node = vfs.lookup(1, b"a.txt", CTX).nodeid
    for call in (lambda: vfs.listxattr(node, CTX), lambda: vfs.getxattr(node, b"user.x", CTX)):
        with pytest.raises(FsError) as info:
            call()
        assert info.value.errno_value == errno.ENOSYS
    # enable_xattr still turns them on (empty answers) for such an image.
    fs, vfs = _mounted(data, enable_xattr=True)
    assert fs.xattr_supported
    assert vfs.listxattr(vfs.lookup(1, b"a.txt", CTX).nodeid, CTX) == []
