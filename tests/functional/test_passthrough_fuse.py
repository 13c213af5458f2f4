"""``nydusd fuse --shared-dir`` under the host's own kernel FUSE client: a workload, then the same on a plain directory.

The workload runs real system calls (write/append/sparse pwrite, rename over an
existing name, hard and soft links, chmod, utime, truncate, posix_fallocate,
SEEK_DATA/SEEK_HOLE, copy_file_range, user xattrs, POSIX and flock locks, a
FIFO, ``tarfile`` extraction of a real tarball, and ``git init && git commit``
with fixed dates when git is installed) once through our passthrough mount and
once directly on a plain directory; what it observes and the two resulting
trees must be equal, file for file.  Needs root (/dev/fuse mounts).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import os
import pathlib
import shutil
import stat
import subprocess
import tarfile

import pytest

from tests.functional.nydusd_helpers import Nydusd

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                                reason="mounting /dev/fuse needs root and /dev/fuse")


def _tarball() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        src = pathlib.Path(os.__file__).parent / "json"
        tar.add(src, arcname="pkg/json", filter=lambda ti: None if "__pycache__" in ti.name else ti)
        ti = tarfile.TarInfo("pkg/link")
        ti.type, ti.linkname, ti.mtime = tarfile.SYMTYPE, "json/__init__.py", 1_600_000_000
        tar.addfile(ti)
    return buf.getvalue()


def _workload(root: pathlib.Path, tar: bytes) -> list:
    seen: list = []
    d = root / "w"
    d.mkdir()
    (d / "a").write_bytes(b"hello\n")
    with open(d / "a", "ab") as f:
        f.write(b"more\n")
    fd = os.open(d / "sparse", os.O_RDWR | os.O_CREAT, 0o644)
    os.pwrite(fd, b"end", 3 << 20)
    seen.append(("hole", os.lseek(fd, 0, os.SEEK_HOLE), "data", os.lseek(fd, 0, os.SEEK_DATA) >= 4096))
    os.posix_fallocate(fd, 0, 1 << 20)
    src = os.open(d / "a", os.O_RDONLY)
    seen.append(("copy_file_range", os.copy_file_range(src, fd, 11, 0, 100)))
    os.close(src)
    # POSIX and flock locks (the kernel keeps them locally: locks are not negotiated)
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(fd)
    os.link(d / "a", d / "hard")
    os.symlink("a", d / "soft")
    (d / "victim").write_bytes(b"old")
    os.rename(d / "hard", d / "victim")                   # over an existing name
    os.chmod(d / "a", 0o600)
    os.utime(d / "a", ns=(1_000_000_000, 1_234_567_890_123_456_789))
    os.truncate(d / "sparse", 5000)
    os.setxattr(d / "a", "user.k", b"v")
    seen.append(("xattr", os.getxattr(d / "a", "user.k"), sorted(os.listxattr(d / "a"))))
    os.removexattr(d / "a", "user.k")
    os.mkfifo(d / "fifo")
    os.mkdir(d / "gone")
    (d / "gone" / "f").write_bytes(b"x")
    shutil.rmtree(d / "gone")
    try:
        os.rmdir(d)
    except OSError as exc:
        seen.append(("rmdir nonempty", errno.errorcode[exc.errno]))
    seen.append(("stat a", oct(os.stat(d / "a").st_mode), os.stat(d / "a").st_nlink, os.stat(d / "a").st_size))
    seen.append(("readlink", os.readlink(d / "soft")))
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(root / "x", filter="tar")
    git = shutil.which("git")
    if git:
        env = dict(os.environ, GIT_AUTHOR_DATE="2020-01-01T00:00:00Z", GIT_COMMITTER_DATE="2020-01-01T00:00:00Z",
                   GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@e", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@e",
                   HOME=str(root))
        repo = root / "repo"
        run = lambda *a: subprocess.run([git, *a], cwd=repo, env=env, check=True, capture_output=True,  # noqa: E731
                                        text=True).stdout
        repo.mkdir()
        run("init", "-q", "-b", "main")
        (repo / "file").write_text("content\n")
        run("add", "file")
        run("commit", "-q", "-m", "init")
        seen.append(("git head", run("rev-parse", "HEAD").strip(), run("fsck", "--strict").strip()))
    seen.append(("listing", sorted(str(p.relative_to(root)) for p in root.rglob("*"))))
    return seen


def _tree(root: pathlib.Path) -> dict[str, tuple]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if rel.startswith("repo/.git/") and p.name in ("index", "ORIG_HEAD") or rel.endswith(".sample"):
            continue
        st = os.lstat(p)
        kind = stat.S_IFMT(st.st_mode)
        extra = None
        if kind == stat.S_IFREG:
            extra = hashlib.sha256(p.read_bytes()).hexdigest()
        elif kind == stat.S_IFLNK:
            extra = os.readlink(p)
        # (tarfile leaves symlink times alone, so they are "now" on both sides)
        mtime = st.st_mtime_ns if rel == "w/a" or rel.startswith("x/pkg/json/") and \
            kind != stat.S_IFDIR else None
        out[rel] = (oct(st.st_mode), None if kind == stat.S_IFDIR else (st.st_nlink, st.st_size), extra, mtime)
    return out


def test_workload_through_our_passthrough_equals_a_plain_directory(tmp_path):
    tar = _tarball()
    ref = tmp_path / "ref"
    ref.mkdir()
    want = _workload(ref, tar)
    share = tmp_path / "share"
    share.mkdir()
    with Nydusd(tmp_path, ["--shared-dir", str(share)]) as d:
        got = _workload(d.mnt, tar)
        assert d.alive()
    assert got == want
    assert _tree(share) == _tree(ref)
    assert ("rmdir nonempty", "ENOTEMPTY") in got
