"""FileSegment lives below storage and fuse, and fuse re-exports the very same type."""

from __future__ import annotations

from nydus_vfs.utils.io import FileSegment


def test_file_segment_fields():
    seg = FileSegment(5, 4096, 100)
    assert (seg.fd, seg.offset, seg.length) == (5, 4096, 100)
    fd, offset, length = seg
    assert (fd, offset, length) == (5, 4096, 100)


def test_fuse_ops_reexports_the_same_class():
    from nydus_vfs.fuse import ops

    assert ops.FileSegment is FileSegment
    assert "FileSegment" in ops.__all__


def test_storage_does_not_import_fuse():
    import subprocess
    import sys

    code = ("import sys, nydus_vfs.storage; "
            "bad = [m for m in sys.modules if m.startswith('nydus_vfs.fuse')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
