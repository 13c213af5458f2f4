"""A real Linux 6.1 guest mounts a directory served by QEMU's C virtiofsd.

This proves the guest tooling (kernel, initramfs, /init, run_guest, start_backend)
against the reference back-end; the tests of our own ``nydusd`` reuse the same
API.  Each boot takes a few seconds under TCG.
"""

from __future__ import annotations

import hashlib
import os
import random

import pytest

from tests.guest import guest_unavailable_reason, run_guest, start_backend, tree_result_script
from tests.integration.guest_helpers import host_tree_listing, split_sections

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"


def _skip_reason() -> str | None:
    reason = guest_unavailable_reason()
    if reason:
        return reason
    if os.geteuid() != 0:
        return "virtiofsd needs root (it sets up namespaces and switches credentials)"
    if not os.access(VIRTIOFSD, os.X_OK):
        return f"{VIRTIOFSD} is missing (apt-get install qemu-system-common)"
    return None


pytestmark = [pytest.mark.guest, pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")]

HELLO = b"hello from the host\n"


@pytest.fixture(scope="module")
def share(tmp_path_factory):
    """A directory with every kind of entry tree and md5sum have to get right."""
    d = tmp_path_factory.mktemp("share")
    (d / "hello.txt").write_bytes(HELLO)
    (d / ".hidden").write_bytes(b"dot file\n")
    (d / "empty-file").write_bytes(b"")
    (d / "with space.txt").write_bytes(b"spaces\n")
    for n in (1, 2, 10):  # tree -v must order these by version: 1, 2, 10
        (d / f"file{n}").write_bytes(b"%d\n" % n)
    # Larger than one 128 KiB FUSE read, and not a multiple of the page size.
    (d / "big.bin").write_bytes(random.Random(7).randbytes(3 * 1024 * 1024 + 123))
    (d / "dir" / "sub").mkdir(parents=True)
    (d / "dir" / "empty").mkdir()
    (d / "dir" / "sub" / "deep.txt").write_bytes(b"deep\n")
    os.link(d / "hello.txt", d / "dir" / "hard")
    os.symlink("hello.txt", d / "link-file")
    os.symlink("dir/sub", d / "link-dir")
    os.symlink("nowhere", d / "dangling")
    return d


@pytest.fixture
def virtiofsd(share, tmp_path):
    sock = tmp_path / "vfs.sock"
    cmd = [VIRTIOFSD, f"--socket-path={sock}", "-o", f"source={share}", "-o", "cache=auto",
           "--thread-pool-size=0"]
    with start_backend(cmd, sock) as backend:
        yield backend


def test_mount_list_read_and_tree_match_the_host(share, virtiofsd):
    script = "\n".join([
        "set -e",
        "mount -t virtiofs nydus /mnt",
        "echo '== ls'; ls -a /mnt",
        "echo '== cat'; cat /mnt/hello.txt",
        "echo '== md5'; md5sum /mnt/big.bin",
        "echo '== links'; readlink /mnt/link-file; readlink /mnt/dangling; cat /mnt/link-dir/deep.txt",
        "echo '== stat'; stat -c '%s %h %F' /mnt/hello.txt /mnt/dir/empty",
        "echo '== tree'",
        tree_result_script("/mnt"),
    ])
    result = run_guest(virtiofsd.sock_path, script, timeout=90)
    assert result.exit_status == 0, result.output
    got = split_sections(result.output)

    names = sorted(os.listdir(share)) + [".", ".."]
    assert sorted(got["ls"].split("\n")[:-1]) == sorted(names)
    assert got["cat"] == HELLO.decode()
    big_md5 = hashlib.md5((share / "big.bin").read_bytes()).hexdigest()
    assert got["md5"] == f"{big_md5}  /mnt/big.bin\n"
    assert got["links"] == "hello.txt\nnowhere\ndeep\n"
    # The hard link shows as a second link count, read through virtio-fs.
    assert got["stat"] == f"{len(HELLO)} 2 regular file\n4096 2 directory\n"
    # The real tree binary in the guest prints byte for byte what it prints on the host.
    assert got["tree"] == host_tree_listing(share)
    assert "\r" not in result.output


def test_reboot_then_second_mount(share, virtiofsd):
    first = "mount -t virtiofs nydus /mnt && cat /mnt/hello.txt && echo first boot\nexit 3\n"
    second = ("grep -c virtiofs /proc/mounts || true\n"
              "mount -t virtiofs nydus /mnt && cat /mnt/hello.txt && md5sum /mnt/big.bin\n")
    result = run_guest(virtiofsd.sock_path, [first, second], timeout=120)

    assert [(b.part, b.exit_status) for b in result.boots] == [(1, 3), (2, 0)]
    assert result.boots[0].output == HELLO.decode() + "first boot\n"
    big_md5 = hashlib.md5((share / "big.bin").read_bytes()).hexdigest()
    # "0": nothing survived the reset; the second mount is a new FUSE session.
    assert result.output == "0\n" + HELLO.decode() + f"{big_md5}  /mnt/big.bin\n"
    assert result.exit_status == 0
    # The reset went through vhost-user: virtiofsd saw its request queue stop and start again.
    log = virtiofsd.log()
    assert log.count("fv_queue_set_started: qidx=1 started=1") == 2, log
    assert log.count("fv_queue_set_started: qidx=1 started=0") >= 1, log
