"""Kata's virtio-fs-nydus layout in a real Linux 6.1 guest: a container rootfs from a RAFS lower and a passthrough upper.

As Kata drives it (nydus-surface.md §8.2–8.3): ``nydusd virtiofs --sock S
--apisock A`` starts empty, then ``POST /api/v1/mount?mountpoint=/containers``
with ``{"fs_type":"passthrough_fs","source":<host dir>,"config":""}`` and
``POST /api/v1/mount?mountpoint=/rafs/c1/lowerdir`` with a RAFS image built
from a busybox rootfs, both with curl on the API socket.  In the guest, as
Kata's agent does: mount virtio-fs at /run/kata-containers/shared,
overlay the image with an upper and work dir inside /containers, chroot into
the rootfs and create, modify, delete, rename and chmod files, several of them
from the lower image (copy-up).  Back on the host the upper directory must hold
exactly those changes, whiteouts included, as overlayfs makes them.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import stat
import subprocess
import time

import pytest

from nydus_vfs._native import binding
from tests.functional.nydusd_helpers import NYDUSD
from tests.guest import _module_bytes, find_kernel, guest_unavailable_reason, run_guest, start_backend
from tests.image_helpers import localfs_config_text
from tests.integration.guest_helpers import split_sections


def _skip_reason() -> str | None:
    reason = guest_unavailable_reason()
    if reason:
        return reason
    if os.geteuid() != 0:
        return "overlayfs whiteouts (mknod 0:0) and trusted.overlay.* xattrs on the host need root"
    if not binding.available():
        return f"nydusd virtiofs needs the shim: {binding.unavailable_reason()}"
    return None


pytestmark = [pytest.mark.guest, pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")]

S = "/run/kata-containers/shared"
C = f"{S}/containers/c1"
BIG = random.Random(10).randbytes(300_000)

SCRIPT = f"""
set -e
mkdir -p {S}
mount -t virtiofs nydus {S}
insmod /lib/modules/overlay.ko
mkdir -p {C}/snapshotdir/fs {C}/snapshotdir/work {C}/rootfs
mount -t overlay overlay -o lowerdir={S}/rafs/c1/lowerdir,upperdir={C}/snapshotdir/fs,workdir={C}/snapshotdir/work,index=off {C}/rootfs
echo "== lower keep"
chroot {C}/rootfs /bin/cat /data/keep
chroot {C}/rootfs /bin/sh -c '
set -e
echo new > /newfile
echo appended >> /etc/hostname
rm /data/old
mv /data/dir /data/dir2
chmod 600 /etc/passwd
mkdir /newdir
echo x > /newdir/f
ln -s /etc/hostname /newlink
echo more >> /usr/share/big.bin
echo "== hostname"
cat /etc/hostname
echo "== ls data"
ls /data
'
sync
umount {C}/rootfs
echo "== after umount"
ls {C}/snapshotdir/fs
"""


def _rootfs(root: pathlib.Path) -> None:
    """A busybox container image: static busybox, a few applets, files to copy up, delete and rename."""
    busybox = find_kernel().busybox
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "busybox").write_bytes(busybox.read_bytes())
    os.chmod(root / "bin" / "busybox", 0o755)
    for applet in ("sh", "cat", "echo", "ls", "rm", "mv", "cp", "chmod", "mkdir", "ln"):
        os.symlink("busybox", root / "bin" / applet)
    (root / "etc").mkdir()
    (root / "etc" / "hostname").write_bytes(b"lower-host\n")
    (root / "etc" / "passwd").write_bytes(b"root:x:0:0:root:/root:/bin/sh\n")
    os.chmod(root / "etc" / "passwd", 0o644)
    (root / "data" / "dir").mkdir(parents=True)
    (root / "data" / "old").write_bytes(b"old\n")
    (root / "data" / "keep").write_bytes(b"keep\n")
    (root / "data" / "dir" / "inner").write_bytes(b"inner\n")
    (root / "usr" / "share").mkdir(parents=True)
    (root / "usr" / "share" / "big.bin").write_bytes(BIG)


def _curl(sock: pathlib.Path, method: str, path: str, body: str | None = None) -> tuple[int, str]:
    cmd = ["curl", "-s", "-o", "/dev/stderr", "-w", "%{http_code}", "--unix-socket", str(sock), "-X", method,
           f"http://localhost{path}"]
    if body is not None:
        cmd += ["--data-binary", body]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    return int(r.stdout or 0), r.stderr


def _is_whiteout(p: pathlib.Path) -> bool:
    st = os.lstat(p)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def test_container_rootfs_overlay_on_rafs_lower_and_passthrough_upper(tmp_path):
    from nydus_vfs.builder import BuildOptions, build

    rootfs = tmp_path / "rootfs"
    _rootfs(rootfs)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    boot = tmp_path / "image.boot"
    build(str(rootfs), BuildOptions(fs_version=6, bootstrap=str(boot), blob_dir=str(blobs)))
    shared = tmp_path / "shared"
    shared.mkdir()
    sock, api = tmp_path / "kata.sock", tmp_path / "api.sock"
    overlay = find_kernel().modules_dir / "kernel" / "fs" / "overlayfs" / "overlay.ko"
    candidates = [overlay] + sorted(overlay.parent.glob("overlay.ko.*"))
    module = next((p for p in candidates if p.exists()), None)
    if module is None:
        pytest.skip(f"the guest kernel has no overlay module at {overlay}")
    cmd = NYDUSD + ["virtiofs", "--sock", str(sock), "--apisock", str(api),
                    "--log-file", str(tmp_path / "nydusd.log")]
    with start_backend(cmd, sock, timeout=30) as backend:
        deadline = time.monotonic() + 20
        while not api.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        status, text = _curl(api, "POST", "/api/v1/mount?mountpoint=/containers",
                             json.dumps({"fs_type": "passthrough_fs", "source": str(shared), "config": ""}))
        assert status == 204, text
        status, text = _curl(api, "POST", "/api/v1/mount?mountpoint=/rafs/c1/lowerdir", json.dumps(
            {"fs_type": "rafs", "source": str(boot), "config": localfs_config_text(blobs, tmp_path / "cache")}))
        assert status == 204, text
        result = run_guest(sock, SCRIPT, timeout=180, files={"/lib/modules/overlay.ko": _module_bytes(module)})
        log = backend.log() + (tmp_path / "nydusd.log").read_text(errors="replace")
        assert backend.proc.poll() is None, "the daemon must still run"
    assert result.exit_status == 0, f"guest script failed:\n{result.output}\n--- back-end log:\n{log[-3000:]}"
    out = split_sections(result.output)
    assert out["lower keep"] == "keep\n"
    assert out["hostname"] == "lower-host\nappended\n"
    assert out["ls data"].split() == ["dir2", "keep"]

    upper = shared / "c1" / "snapshotdir" / "fs"
    found = sorted(str(p.relative_to(upper)) for p in upper.rglob("*"))
    assert found == sorted([
        "newfile", "etc", "etc/hostname", "etc/passwd", "data", "data/old", "data/dir", "data/dir2",
        "data/dir2/inner", "newdir", "newdir/f", "newlink", "usr", "usr/share", "usr/share/big.bin",
    ]), found
    assert (upper / "newfile").read_bytes() == b"new\n"
    assert (upper / "etc" / "hostname").read_bytes() == b"lower-host\nappended\n"       # copy-up, then append
    assert (upper / "etc" / "passwd").read_bytes() == b"root:x:0:0:root:/root:/bin/sh\n"
    assert stat.S_IMODE(os.stat(upper / "etc" / "passwd").st_mode) == 0o600           # chmod of a lower file
    assert _is_whiteout(upper / "data" / "old")                                        # rm of a lower file
    assert _is_whiteout(upper / "data" / "dir")                                        # mv of a lower dir ...
    assert (upper / "data" / "dir2" / "inner").read_bytes() == b"inner\n"              # ... copied to its new name
    assert (upper / "newdir" / "f").read_bytes() == b"x\n"
    assert os.readlink(upper / "newlink") == "/etc/hostname"
    assert (upper / "usr" / "share" / "big.bin").read_bytes() == BIG + b"more\n"
    # overlayfs left nothing behind in its work dir, and the lower image is untouched
    assert [p.name for p in (shared / "c1" / "snapshotdir" / "work").iterdir()] in ([], ["work"])
    assert (rootfs / "etc" / "hostname").read_bytes() == b"lower-host\n"
