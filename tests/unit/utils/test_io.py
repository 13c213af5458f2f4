"""FileSegment and WritePayload live below storage, fs and fuse, and fuse re-exports the very same types."""

from __future__ import annotations

import os

import pytest

from nydus_vfs.testing import BytesPayload
from nydus_vfs.utils.io import FileSegment, WritePayload


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


def test_fuse_ops_reexports_write_payload():
    from nydus_vfs.fuse import ops

    assert ops.WritePayload is WritePayload
    assert {"WritePayload", "WriteData"} <= set(ops.__all__)


def test_bytes_payload_behaves_as_the_protocol_says(tmp_path):
    """The stand-in used by the server and filesystem tests keeps the transport's rules."""
    payload = BytesPayload(b"0123456789")
    tail = payload[3:]
    assert len(tail) == 7 and tail.tobytes() == b"3456789" and len(payload[20:]) == 0
    with pytest.raises(TypeError):
        payload[::2]
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert tail[:4].pwrite(fd, 2) == 4
        assert os.pread(fd, 10, 0) == b"\0\0" + b"3456"
        assert (payload.pwrites, payload.copies) == (1, 1)       # slices share the counters
        payload.release()
        assert len(tail) == 7 and tail.released                  # the size stays known
        for use in (tail.tobytes, lambda: tail.pwrite(fd, 0), lambda: payload[1:]):
            with pytest.raises(ValueError):
                use()
    finally:
        os.close(fd)
