"""nydusd's process lifecycle with real FUSE mounts: signals, mount ownership, refusals (issue 7 items 1–4, 8).

None of these tests stats a mountpoint a daemon serves: they read
/proc/self/mountinfo, so a daemon deadlocked on its own mount cannot hide
behind the kernel's attr cache.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from nydus_vfs.transport.fusedev import mounts_at, resolve_mountpoint
from tests.conftest import PROJECT_ROOT, fuse_unavailable_reason
from tests.functional.nydusd_helpers import NYDUSD
from tests.image_helpers import localfs_config_text, make_image

pytestmark = pytest.mark.skipif(fuse_unavailable_reason() is not None, reason=fuse_unavailable_reason() or "")


def _ours(mnt) -> list:
    return [m for m in mounts_at(resolve_mountpoint(str(mnt))) if m.source == "rafs"]


def _start(tmp_path, mnt, *args, name="d"):
    log = tmp_path / f"{name}.log"
    proc = subprocess.Popen(NYDUSD + ["fuse", "--mountpoint", str(mnt), "--log-file", str(log), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=PROJECT_ROOT)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if _ours(mnt) and len(_ours(mnt)) >= 1:
            return proc, log
        if proc.poll() is not None:
            raise AssertionError(f"nydusd exited {proc.returncode}: {proc.stderr.read().decode()}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("nydusd did not mount")


@pytest.fixture
def image(tmp_path):
    boot, blobs = make_image(tmp_path, "img", {"etc/hello": b"hello\n", "data.bin": os.urandom(100_000)})
    cfg = tmp_path / "config.json"
    cfg.write_text(localfs_config_text(blobs, tmp_path / "cache"))
    return ["--bootstrap", str(boot), "--config", str(cfg)]


@pytest.fixture
def mnt(tmp_path):
    m = tmp_path / "mnt"
    m.mkdir()
    yield m
    for _ in range(5):
        if not mounts_at(resolve_mountpoint(str(m))):
            break
        subprocess.run(["umount", "-l", str(m)], check=False)


def test_sigterm_of_a_never_accessed_daemon_exits_0_and_leaves_no_mount(tmp_path, mnt, image):
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        proc, log = _start(tmp_path, mnt, *image)
        proc.send_signal(sig)
        assert proc.wait(timeout=10) == 0, (sig, proc.stderr.read().decode())
        assert not mounts_at(resolve_mountpoint(str(mnt))), f"{sig.name} left a mount behind"
        assert f"signal {sig.name} received" in log.read_text()


def test_ignored_signals_are_logged_and_the_daemon_keeps_serving(tmp_path, mnt, image):
    proc, log = _start(tmp_path, mnt, *image)
    proc.send_signal(signal.SIGUSR1)
    time.sleep(0.3)
    assert proc.poll() is None
    assert (mnt / "etc" / "hello").read_bytes() == b"hello\n"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert "signal SIGUSR1 received and ignored" in log.read_text()


def test_sigterm_right_after_an_external_unmount_is_never_fatal(tmp_path, mnt, image):
    for _ in range(10):
        proc, _ = _start(tmp_path, mnt, *image)
        subprocess.run(["umount", "-l", str(mnt)], check=True)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


def test_external_unmount_ends_the_daemon(tmp_path, mnt, image):
    proc, log = _start(tmp_path, mnt, *image)
    subprocess.run(["umount", str(mnt)], check=True)
    assert proc.wait(timeout=10) == 0
    assert "the FUSE session ended" in log.read_text()


def test_a_daemon_never_unmounts_a_mount_that_is_not_its_own(tmp_path, mnt, image):
    a, _ = _start(tmp_path, mnt, *image, name="a")
    reader = open(mnt / "etc" / "hello", "rb")  # keeps a's lazily detached mount alive
    subprocess.run(["umount", "-l", str(mnt)], check=True)
    b, _ = _start(tmp_path, mnt, *image, name="b")
    b_mount = _ours(mnt)
    assert len(b_mount) == 1
    reader.close()  # a's session ends now; a must not detach b's mount
    assert a.wait(timeout=10) == 0
    assert _ours(mnt) == b_mount
    assert (mnt / "etc" / "hello").read_bytes() == b"hello\n"
    # Something stacked on top of b: b's SIGTERM must not unmount it.
    subprocess.run(["mount", "-t", "tmpfs", "stacked", str(mnt)], check=True)
    b.send_signal(signal.SIGTERM)
    assert b.wait(timeout=10) == 0
    here = mounts_at(resolve_mountpoint(str(mnt)))
    assert [m.fstype for m in here][-1] == "tmpfs", here
    subprocess.run(["umount", str(mnt)], check=True)


def test_a_second_daemon_on_a_mounted_mountpoint_is_refused(tmp_path, mnt, image):
    a, _ = _start(tmp_path, mnt, *image, name="a")
    try:
        before = _ours(mnt)
        r = subprocess.run(NYDUSD + ["fuse", "--mountpoint", str(mnt), *image], capture_output=True, text=True,
                           timeout=30, cwd=PROJECT_ROOT)
        assert r.returncode == 1 and "already mounted" in r.stderr, r.stderr
        r = subprocess.run(NYDUSD + ["fuse", "--mountpoint", str(mnt), "--upgrade", "--apisock",
                                     str(tmp_path / "api2.sock"), *image],
                           capture_output=True, text=True, timeout=30, cwd=PROJECT_ROOT)
        assert r.returncode == 1 and "takeover is not supported" in r.stderr, r.stderr
        assert _ours(mnt) == before
    finally:
        a.send_signal(signal.SIGTERM)
        assert a.wait(timeout=10) == 0


def test_a_crashed_daemon_with_a_dead_api_socket_is_reported_as_such(tmp_path, mnt, image):
    api = tmp_path / "api.sock"
    a, _ = _start(tmp_path, mnt, *image, "--apisock", str(api), name="a")
    a.kill()  # a crash: the mount stays (dead), the API socket file stays
    a.wait()
    r = subprocess.run(NYDUSD + ["fuse", "--mountpoint", str(mnt), "--apisock", str(api), *image],
                       capture_output=True, text=True, timeout=30, cwd=PROJECT_ROOT)
    assert r.returncode == 1 and "crashed nydusd" in r.stderr and "umount -l" in r.stderr, r.stderr


@pytest.mark.parametrize("content,fragment", [
    (b"\xff\xfe{not utf-8", "not UTF-8 text"),
    (b'{"version": 3, "backend": {"type": "localfs", "localfs": {"dir": "/"}}}', "version: must be 2"),
])
def test_config_errors_are_reported_once_and_clearly(tmp_path, mnt, image, content, fragment):
    cfg = tmp_path / "bad.json"
    cfg.write_bytes(content)
    r = subprocess.run(NYDUSD + ["fuse", "--mountpoint", str(mnt), "--bootstrap", image[1], "--config", str(cfg)],
                       capture_output=True, text=True, timeout=30, cwd=PROJECT_ROOT)
    assert r.returncode == 1 and fragment in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert all(line.count("invalid configuration") <= 1 for line in r.stderr.splitlines())
    assert "internal error" not in r.stderr
    assert not mounts_at(resolve_mountpoint(str(mnt)))


def test_a_missing_bootstrap_is_reported_as_what_it_is(tmp_path, mnt, image):
    r = subprocess.run(NYDUSD + ["fuse", "--mountpoint", str(mnt), "--bootstrap", str(tmp_path / "nope.boot"),
                                 "--config", image[3]], capture_output=True, text=True, timeout=30, cwd=PROJECT_ROOT)
    assert r.returncode == 1 and "No such file" in r.stderr and "configuration" not in r.stderr, r.stderr
    assert not mounts_at(resolve_mountpoint(str(mnt)))


def test_sigterm_of_a_busy_daemon_exits_0(tmp_path, mnt, image):
    import threading

    proc, log = _start(tmp_path, mnt, *image)
    stop = threading.Event()
    errors: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                fd = os.open(mnt / "data.bin", os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                while os.read(fd, 65536):
                    pass
                os.close(fd)
            except OSError as exc:  # the mount going away under the reader is fine
                errors.append(exc.strerror)
                return

    threads = [threading.Thread(target=reader, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    stop.set()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads), "a reader hangs on the unmounted daemon"
    assert not mounts_at(resolve_mountpoint(str(mnt)))


def test_a_second_virtiofs_daemon_does_not_steal_a_live_socket(tmp_path):
    from nydus_vfs._native import binding

    if binding.unavailable_reason():
        pytest.skip(f"nydusd virtiofs needs the shim: {binding.unavailable_reason()}")
    sock = tmp_path / "vu.sock"
    first = subprocess.Popen(NYDUSD + ["virtiofs", "--sock", str(sock), "--log-file", str(tmp_path / "a.log")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=PROJECT_ROOT)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists() and time.monotonic() < deadline:
            assert first.poll() is None, first.stderr.read().decode()
            time.sleep(0.05)
        r = subprocess.run(NYDUSD + ["virtiofs", "--sock", str(sock)], capture_output=True, text=True,
                           timeout=30, cwd=PROJECT_ROOT)
        assert r.returncode == 1 and "another daemon is serving there" in r.stderr, r.stderr
        assert first.poll() is None and sock.exists()
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=10) == 0
    assert not sock.exists()
