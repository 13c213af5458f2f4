"""v6 images are real EROFS: ``fsck.erofs`` accepts them and the kernel mounts them.

With compressor ``none`` the data blob is the uncompressed, 4 KiB-aligned
device image (chunks at their uncompressed offsets), so it serves directly as
the extra device: ``fsck.erofs --device=BLOB`` and ``mount -t erofs -o
device=LOOP(BLOB)``.  erofs-utils 1.5 rejects 255-byte names, so the fixture
here leaves the longest name out.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import subprocess

import pytest

from nydus_vfs.builder import BuildOptions, build
from nydus_vfs.format.types import Compressor
from tests.functional.builder_helpers import IS_ROOT, diff_snapshots, make_rich_tree, snapshot_dir

FSCK = shutil.which("fsck.erofs")
needs_fsck = pytest.mark.skipif(FSCK is None, reason="fsck.erofs (erofs-utils) is not installed")


def _kernel_erofs_reason() -> str | None:
    if not IS_ROOT:
        return "mounting needs root"
    try:
        with open("/proc/filesystems") as f:
            if "erofs" not in f.read():
                return "the running kernel has no erofs support"
    except OSError:
        return "/proc/filesystems is unreadable"
    if shutil.which("losetup") is None or shutil.which("mount") is None:
        return "losetup/mount are not installed"
    if not os.path.exists("/dev/loop-control"):
        return "no loop device support (/dev/loop-control missing)"
    return None


needs_kernel = pytest.mark.skipif(_kernel_erofs_reason() is not None, reason=_kernel_erofs_reason() or "")


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> pathlib.Path:
    return make_rich_tree(tmp_path_factory.mktemp("erofs") / "src", long_name=False)


def _build(tree: pathlib.Path, out: pathlib.Path, chunk_size: int, **kw) -> tuple[pathlib.Path, pathlib.Path]:
    r = build(str(tree), BuildOptions(compressor=Compressor.NONE, chunk_size=chunk_size,
                                      bootstrap=str(out / "boot"), blob_dir=str(out), **kw))
    return out / "boot", out / r.blob_id


@needs_fsck
@pytest.mark.parametrize("chunk_size", [0x1000, 0x10000, 0x100000])
def test_fsck_erofs_accepts_and_extracts_identical_tree(tmp_path, tree, chunk_size):
    boot, blob = _build(tree, tmp_path, chunk_size)
    r = subprocess.run([FSCK, f"--device={blob}", str(boot)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    dest = tmp_path / "extract"
    r = subprocess.run([FSCK, f"--device={blob}", f"--extract={dest}", str(boot)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    # fsck.erofs 1.5 extracts contents and modes (not owners, xattrs, mtimes or hardlinks).
    want, got = snapshot_dir(tree), snapshot_dir(dest)
    for snap in (want, got):
        for e in snap.values():
            for key in ("owner", "xattrs", "mtime", "links"):
                e.pop(key, None)
        snap.pop("/", None)
        snap.pop("/sock", None)  # not extracted by fsck.erofs 1.5
    assert diff_snapshots(want, got) == []


@needs_fsck
def test_fsck_erofs_accepts_blob_toc_and_inline_layouts(tmp_path, tree):
    boot, blob = _build(tree, tmp_path, 0x10000, blob_toc=True)
    r = subprocess.run([FSCK, f"--device={blob}", str(boot)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@contextlib.contextmanager
def _loop(path: pathlib.Path):
    dev = subprocess.run(["losetup", "-f", "--show", "-r", str(path)], capture_output=True, text=True, check=True)
    name = dev.stdout.strip()
    try:
        yield name
    finally:
        subprocess.run(["losetup", "-d", name], check=False)


@needs_kernel
@pytest.mark.parametrize("chunk_size", [0x1000, 0x100000])
def test_kernel_erofs_mount_shows_identical_tree(tmp_path, tree, chunk_size):
    boot, blob = _build(tree, tmp_path, chunk_size)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with _loop(boot) as meta_dev, _loop(blob) as blob_dev:
        r = subprocess.run(["mount", "-t", "erofs", "-o", f"device={blob_dev},ro", meta_dev, str(mnt)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.fail(f"mount -t erofs failed: {r.stderr}")
        try:
            got = snapshot_dir(mnt)
        finally:
            subprocess.run(["umount", str(mnt)], check=False)
    want = snapshot_dir(tree)
    assert diff_snapshots(want, got) == []
