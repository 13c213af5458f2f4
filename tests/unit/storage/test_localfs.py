"""The localfs backend: dir, alt_dirs, blob_file, missing blobs, path escape, fds."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import threading

import pytest

from nydus_vfs.errors import BackendError, BackendNotFoundError, ConfigError
from nydus_vfs.storage.backend.localfs import LocalfsBackend
from nydus_vfs.testing.backend import check_blob_backend
from tests.unit.storage.storage_helpers import run

A = "a" * 64
B = "b" * 64
DATA_A = bytes(range(256)) * 40 + b"tail"
DATA_B = b"second blob " * 100


@pytest.fixture
def blob_dir(tmp_path):
    d = tmp_path / "blobs"
    d.mkdir()
    (d / A).write_bytes(DATA_A)
    (d / B).write_bytes(DATA_B)
    return d


def test_conformance_dir(blob_dir):
    run(check_blob_backend(LocalfsBackend(dir=blob_dir), {A: DATA_A, B: DATA_B}))


def test_conformance_blob_file(tmp_path):
    f = tmp_path / "the.blob"
    f.write_bytes(DATA_A)
    # blob_file serves any (safe) id: the "missing" id must be refused some other
    # way, so run the suite with the file itself and check not-found separately.
    backend = LocalfsBackend(blob_file=f)
    assert run(backend.read("anything", 10, 5)) == DATA_A[10:15]
    assert run(backend.read(A, 0, 4)) == DATA_A[:4]
    assert run(backend.blob_size("whatever")) == len(DATA_A)
    with pytest.raises(BackendError, match="invalid blob id"):
        run(backend.read("../x", 0, 1))
    # One fd shared by every id.
    assert len({fd for fd, _ in backend._files.values()}) == 1
    backend.close()


def test_blob_file_missing(tmp_path):
    backend = LocalfsBackend(blob_file=tmp_path / "nope")
    with pytest.raises(BackendNotFoundError, match="nope"):
        run(backend.read(A, 0, 1))


def test_alt_dirs_are_searched_in_order(tmp_path, blob_dir):
    alt1 = tmp_path / "alt1"
    alt2 = tmp_path / "alt2"
    alt1.mkdir()
    alt2.mkdir()
    only_alt = "c" * 64
    (alt2 / only_alt).write_bytes(b"from alt2")
    (alt1 / only_alt).write_bytes(b"from alt1")
    (alt2 / A).write_bytes(b"shadowed by dir")
    backend = LocalfsBackend(dir=blob_dir, alt_dirs=[alt1, alt2])
    assert run(backend.read(only_alt, 0, 9)) == b"from alt1"
    assert run(backend.read(A, 0, 4)) == DATA_A[:4]
    with pytest.raises(BackendNotFoundError) as info:
        run(backend.read("d" * 64, 0, 1))
    # The message lists every place looked at, for the operator.
    assert str(blob_dir) in str(info.value) and str(alt2) in str(info.value)


def test_path_escape_is_refused_even_when_the_target_exists(tmp_path, blob_dir):
    (tmp_path / "secret").write_bytes(b"do not serve")
    backend = LocalfsBackend(dir=blob_dir)
    for bad in ("../secret", "..", "sub/../../secret", str(tmp_path / "secret")):
        with pytest.raises(BackendError, match="invalid blob id"):
            run(backend.read(bad, 0, 1))
    assert backend.metrics.read_count == 0


def test_needs_dir_or_blob_file():
    with pytest.raises(ConfigError, match="'dir' or 'blob_file'"):
        LocalfsBackend()


def test_fds_are_cached_and_cloexec(blob_dir):
    backend = LocalfsBackend(dir=blob_dir)
    run(backend.read(A, 0, 1))
    fd, size = backend._files[A]
    run(backend.read(A, 1, 1))
    assert backend.read_sync(A, 2, 1) == DATA_A[2:3]
    assert backend._files[A] == (fd, size) and size == len(DATA_A)
    assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    assert os.fstat(fd).st_size == len(DATA_A)
    backend.close()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_file_segment_is_zero_copy_and_bounded(blob_dir):
    backend = LocalfsBackend(dir=blob_dir)
    seg = backend.file_segment(A, 100, 50)
    assert os.pread(seg.fd, seg.length, seg.offset) == DATA_A[100:150]
    with pytest.raises(BackendError, match="past the end"):
        backend.file_segment(A, len(DATA_A) - 10, 11)


def test_truncated_blob_is_a_short_read(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / A).write_bytes(DATA_A)
    backend = LocalfsBackend(dir=d)
    run(backend.blob_size(A))  # opened and sized at full length
    os.truncate(d / A, 10)
    with pytest.raises(BackendError, match="truncated while in use") as info:
        backend.read_sync(A, 0, 100)
    assert not info.value.retryable
    assert backend.metrics.read_errors == 1


def test_huge_read_is_refused_without_allocating(blob_dir):
    backend = LocalfsBackend(dir=blob_dir)
    with pytest.raises(BackendError, match="past the end"):
        run(backend.read(A, 0, 1 << 40))


def test_identity_is_by_location(tmp_path, blob_dir):
    same = LocalfsBackend(dir=str(blob_dir) + "/")
    assert same.identity == LocalfsBackend(dir=blob_dir).identity
    assert LocalfsBackend(dir=tmp_path).identity != same.identity
    assert LocalfsBackend(dir=blob_dir, alt_dirs=[tmp_path]).identity != same.identity


def test_directory_in_place_of_a_blob(blob_dir):
    (blob_dir / ("e" * 64)).mkdir()
    backend = LocalfsBackend(dir=blob_dir)
    with pytest.raises(BackendError):
        run(backend.read("e" * 64, 0, 1))


# -- short reads say what happened (issue 7 item 9) -------------------------------------

def test_a_short_read_cut_by_an_io_error_reports_the_error_not_truncation(blob_dir, monkeypatch):
    backend = LocalfsBackend(dir=blob_dir)
    assert run(backend.read(A, 0, 10)) == DATA_A[:10]   # opened
    real = os.pread
    calls = []

    def flaky(fd, n, off):
        calls.append((n, off))
        if len(calls) == 1:
            return real(fd, 100, off)                       # a legal short read...
        raise OSError(errno.EIO, os.strerror(errno.EIO))    # ...cut short by EIO

    monkeypatch.setattr(os, "pread", flaky)
    with pytest.raises(BackendError) as info:
        run(backend.read(A, 0, 1000))
    msg = str(info.value)
    assert "Input/output error" in msg and "after 100 bytes" in msg
    assert "truncated" not in msg
    backend.close()


def test_short_reads_that_complete_are_not_errors(blob_dir, monkeypatch):
    backend = LocalfsBackend(dir=blob_dir)
    real = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, off: real(fd, min(n, 300), off))
    assert run(backend.read(A, 5, 1000)) == DATA_A[5:1005]
    backend.close()


def test_a_file_truncated_while_in_use_is_named_as_such(blob_dir):
    backend = LocalfsBackend(dir=blob_dir)
    assert run(backend.read(A, 0, 10)) == DATA_A[:10]
    os.truncate(blob_dir / A, 500)
    with pytest.raises(BackendError) as info:
        run(backend.read(A, 0, 1000))
    msg = str(info.value)
    assert "after 500 of 1000 bytes" in msg and "now 500 bytes" in msg and f"{len(DATA_A)} bytes when opened" in msg


def _read_with_deadline(backend, blob_id, fifo=None, seconds: float = 5.0):
    """``read_sync(blob_id, 0, 1)`` on a thread; fail (after unblocking it) if it hangs.

    A blocked ``open`` of a FIFO is released by opening the FIFO's write end,
    so a regression fails this test instead of hanging the run.
    """
    outcome: list = []

    def work():
        try:
            outcome.append(backend.read_sync(blob_id, 0, 1))
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        if fifo is not None:
            wfd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            os.close(wfd)
        t.join(5)
        pytest.fail(f"reading blob {blob_id} did not return within {seconds} s (blocked in open/read)")
    return outcome[0]


def test_fifo_at_a_blob_path_is_refused_promptly(blob_dir):
    fifo = blob_dir / ("f" * 64)
    os.mkfifo(fifo)
    backend = LocalfsBackend(dir=blob_dir)
    err = _read_with_deadline(backend, "f" * 64, fifo)
    assert isinstance(err, BackendError) and not err.retryable, err
    assert str(fifo) in str(err) and "FIFO" in str(err)
    assert "f" * 64 not in backend._files  # nothing half-open is kept
    # The other blobs of the same backend are still served.
    assert backend.read_sync(A, 0, 4) == DATA_A[:4]
    backend.close()


@pytest.mark.parametrize("kind", ["socket", "directory", "chardev"])
def test_non_regular_files_at_a_blob_path_say_what_they_are(blob_dir, kind, monkeypatch):
    name = "9" * 64
    path = blob_dir / name
    if kind == "socket":
        monkeypatch.chdir(blob_dir)  # the full path is longer than sun_path allows
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(name)
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to("/dev/zero")
    backend = LocalfsBackend(dir=blob_dir)
    err = _read_with_deadline(backend, name)
    expected = {"socket": "a socket", "directory": "a directory", "chardev": "a character device"}[kind]
    assert isinstance(err, BackendError) and not err.retryable, err
    assert str(path) in str(err) and expected in str(err)
    assert run(backend.read(A, 0, 3)) == DATA_A[:3]
    backend.close()


def test_blob_fds_are_plain_blocking_fds(blob_dir):
    backend = LocalfsBackend(dir=blob_dir)
    backend.read_sync(A, 0, 1)
    fd, _ = backend._files[A]
    assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
    backend.close()
