"""One busybox workload in a real Linux 6.1 guest, on our passthrough_fs and on QEMU's C virtiofsd.

Both back-ends serve a copy of the same directory (ours: ``nydusd virtiofs
--shared-dir DIR``; virtiofsd: ``-o source=DIR -o cache=auto
--thread-pool-size=0``).  The guest creates, writes, appends, renames,
hard- and soft-links, chmods, truncates, fallocates, writes sparse files,
makes a fifo and a device node, removes a tree, unpacks a real tarball with
``tar x`` and creates a file as another user; it prints what it sees
(``stat`` of every entry, md5 of every file).  The outputs of the two guests
must be equal, and so must the two host trees afterwards, file for file.
"""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
import stat
import tarfile

import pytest

from nydus_vfs._native import binding
from tests.functional.nydusd_helpers import NYDUSD
from tests.guest import guest_unavailable_reason, run_guest, start_backend
from tests.integration.guest_helpers import split_sections

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"


def _skip_reason() -> str | None:
    reason = guest_unavailable_reason()
    if reason:
        return reason
    if os.geteuid() != 0:
        return "virtiofsd and device nodes need root"
    if not os.access(VIRTIOFSD, os.X_OK):
        return f"{VIRTIOFSD} is missing (apt-get install qemu-system-common)"
    if not binding.available():
        return f"nydusd virtiofs needs the shim: {binding.unavailable_reason()}"
    return None


pytestmark = [pytest.mark.guest, pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")]

SCRIPT = """
set -e
mount -t virtiofs nydus /mnt
cd /mnt
chmod 777 .
mkdir w
cd w
echo hello > a
echo more >> a
seq 1 20000 > lines
cat lines > copy
cmp lines copy
mv a a2
ln a2 hard
ln -s a2 soft
chmod 640 a2
touch -d '2001-02-03 04:05:06' a2
truncate -s 10000 lines
fallocate -l 1048576 falloc
dd if=/dev/zero of=sparse bs=1 count=1 seek=5000000 2>/dev/null
mkfifo fifo
mknod cdev c 1 3
mkdir -p d/e/f
touch d/e/f/g
rm -r d/e
rmdir d
mkdir x
tar -xf /guest-files/pkg.tar -C x
echo 'user:x:1000:1000::/:/bin/sh' >> /etc/passwd
echo 'user:x:1000:' >> /etc/group
su user -c 'echo mine > /mnt/userfile; mkdir /mnt/userdir'
sync
echo "== readlink"
readlink soft
echo "== stat"
find /mnt | sort | while read p; do stat -c '%n %a %u %g %h %F' "$p"; done
echo "== sizes"
find /mnt -type f | sort | while read p; do stat -c '%n %s' "$p"; done
echo "== md5"
find /mnt -type f | sort | xargs md5sum
echo "== mtime a2"
stat -c %Y a2
"""


def _tarball() -> bytes:
    """A real tarball: a stdlib package's sources, a symlink, a hard link, odd modes and mtimes."""
    buf = io.BytesIO()
    src = pathlib.Path(os.__file__).parent / "json"
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(src, arcname="pkg/json", filter=lambda ti: None if "__pycache__" in ti.name else ti)
        for name, data, mode in (("pkg/bin/tool", b"#!/bin/sh\necho hi\n", 0o755), ("pkg/etc/secret", b"k\n", 0o600)):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), mode, 1_600_000_000
            tar.addfile(ti, io.BytesIO(data))
        ti = tarfile.TarInfo("pkg/bin/link")
        ti.type, ti.linkname = tarfile.SYMTYPE, "tool"
        tar.addfile(ti)
        ti = tarfile.TarInfo("pkg/bin/hard")
        ti.type, ti.linkname = tarfile.LNKTYPE, "pkg/bin/tool"
        tar.addfile(ti)
    return buf.getvalue()


def _host_tree(root: pathlib.Path) -> dict[str, tuple]:
    out = {}
    for p in sorted(root.rglob("*")):
        st = os.lstat(p)
        kind = stat.S_IFMT(st.st_mode)
        if kind == stat.S_IFREG:
            extra: object = hashlib.sha256(p.read_bytes()).hexdigest()
        elif kind == stat.S_IFLNK:
            extra = os.readlink(p)
        elif kind in (stat.S_IFCHR, stat.S_IFBLK):
            extra = (os.major(st.st_rdev), os.minor(st.st_rdev))
        else:
            extra = None
        out[str(p.relative_to(root))] = (oct(st.st_mode), st.st_uid, st.st_gid,
                                         None if kind == stat.S_IFDIR else (st.st_nlink, st.st_size), extra)
    return out


def _run(cmd_for, tmp: pathlib.Path, tar: bytes) -> tuple[dict[str, str], dict[str, tuple]]:
    share = tmp / "share"
    share.mkdir()
    sock = tmp / "fs.sock"
    with start_backend(cmd_for(share, sock), sock, timeout=30) as backend:
        result = run_guest(sock, SCRIPT, timeout=180, files={"/guest-files/pkg.tar": tar})
        log = backend.log()
    assert result.exit_status == 0, f"guest script failed:\n{result.output}\n--- back-end log:\n{log[-3000:]}"
    return split_sections(result.output), _host_tree(share)


def test_busybox_workload_same_as_c_virtiofsd(tmp_path):
    tar = _tarball()
    (tmp_path / "c").mkdir()
    (tmp_path / "ours").mkdir()
    theirs_out, theirs_tree = _run(lambda share, sock: [
        VIRTIOFSD, f"--socket-path={sock}", "-o", f"source={share}", "-o", "cache=auto", "--thread-pool-size=0"],
        tmp_path / "c", tar)
    ours_out, ours_tree = _run(lambda share, sock: [
        *NYDUSD, "virtiofs", "--sock", str(sock), "--shared-dir", str(share)],
        tmp_path / "ours", tar)
    assert ours_out == theirs_out
    assert ours_tree == theirs_tree
    # and the workload did what it says
    assert ours_out["readlink"] == "a2\n"
    assert ours_out["mtime a2"].strip() == str(981173106)
    assert ours_tree["w/cdev"][4] == (1, 3) and ours_tree["w/hard"][3][0] == 2
    assert ours_tree["userfile"][1:3] == (1000, 1000) and ours_tree["userdir"][1:3] == (1000, 1000)
    assert ours_tree["w/x/pkg/bin/link"][4] == "tool" and ours_tree["w/x/pkg/etc/secret"][0] == oct(0o100600)
    assert ours_tree["w/sparse"][3][1] == 5000001 and "w/d" not in ours_tree
