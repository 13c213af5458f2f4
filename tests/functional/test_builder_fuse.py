"""Images built here, mounted by ``nydusd fuse``, show the source tree exactly.

Skipped (with the reason) where FUSE cannot be mounted or where ``nydusd``
cannot serve an image at all yet; a failure to show the *right* tree is a
test failure.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from nydus_vfs.builder import BuildOptions, build
from nydus_vfs.format.types import Compressor, Digester
from tests.conftest import PROJECT_ROOT, requires_fuse
from tests.functional.builder_helpers import diff_snapshots, make_rich_tree, snapshot_dir

pytestmark = [requires_fuse]

NYDUSD = [sys.executable, "-m", "nydus_vfs.cli.nydusd"]


class _Mount:
    def __init__(self, tmp: pathlib.Path, boot: pathlib.Path, blob_dir: pathlib.Path) -> None:
        self.mnt = tmp / "mnt"
        self.mnt.mkdir(exist_ok=True)
        self.log = tmp / "nydusd.log"
        cfg = {"device": {"backend": {"type": "localfs", "config": {"dir": str(blob_dir)}},
                          "cache": {"type": "blobcache", "config": {"work_dir": str(tmp / "cache")}}},
               "mode": "direct", "digest_validate": True, "enable_xattr": True}
        (tmp / "config.json").write_text(json.dumps(cfg))
        self.cmd = NYDUSD + ["fuse", "--mountpoint", str(self.mnt), "--bootstrap", str(boot), "--config",
                             str(tmp / "config.json"), "--log-file", str(self.log)]
        self.proc: subprocess.Popen | None = None
        self.error = ""

    def __enter__(self) -> "_Mount":
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=PROJECT_ROOT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if os.path.ismount(self.mnt):
                return self
            if self.proc.poll() is not None:
                _, err = self.proc.communicate()
                log = self.log.read_text(errors="replace") if self.log.exists() else ""
                self.error = f"nydusd exited {self.proc.returncode}: {err.decode(errors='replace')}\n{log}"
                return self
            time.sleep(0.05)
        self.error = "nydusd did not mount within 30 s"
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if os.path.ismount(self.mnt):
            subprocess.run(["umount", "-l", str(self.mnt)], check=False)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> pathlib.Path:
    return make_rich_tree(tmp_path_factory.mktemp("fuse") / "src")


@pytest.fixture(scope="module")
def nydusd_works(tmp_path_factory) -> None:
    """Skip the module when nydusd cannot serve even a one-file image."""
    tmp = tmp_path_factory.mktemp("probe")
    (tmp / "src").mkdir()
    (tmp / "src" / "f").write_bytes(b"probe")
    build(str(tmp / "src"), BuildOptions(bootstrap=str(tmp / "boot"), blob_dir=str(tmp)))
    with _Mount(tmp, tmp / "boot", tmp) as m:
        if m.error or not os.path.ismount(m.mnt):
            pytest.skip(f"nydusd fuse cannot mount an image here yet: {m.error[-800:]}")
        try:
            ok = (m.mnt / "f").read_bytes() == b"probe"
        except OSError as exc:
            pytest.skip(f"nydusd fuse cannot read an image here yet: {exc}")
    if not ok:
        pytest.skip("nydusd fuse returns wrong data for the probe image")


CASES = [
    (5, Compressor.NONE, Digester.SHA256, 0x1000),
    (5, Compressor.LZ4_BLOCK, Digester.BLAKE3, 0x10000),
    (5, Compressor.ZSTD, Digester.SHA256, 0x100000),
    (6, Compressor.NONE, Digester.BLAKE3, 0x100000),
    (6, Compressor.LZ4_BLOCK, Digester.SHA256, 0x1000),
    (6, Compressor.ZSTD, Digester.BLAKE3, 0x10000),
]


@pytest.mark.parametrize("version,compressor,digester,chunk_size", CASES,
                         ids=[f"v{v}-{c.cli_name}-{d.cli_name}-{cs:#x}" for v, c, d, cs in CASES])
def test_nydusd_fuse_shows_identical_tree(tmp_path, tree, nydusd_works, version, compressor, digester,
                                          chunk_size):
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    build(str(tree), BuildOptions(fs_version=version, compressor=compressor, digester=digester,
                                  chunk_size=chunk_size, bootstrap=str(tmp_path / "boot"), blob_dir=str(blobs)))
    with _Mount(tmp_path, tmp_path / "boot", blobs) as m:
        assert not m.error, m.error
        got = snapshot_dir(m.mnt)
    assert diff_snapshots(snapshot_dir(tree), got) == []


def test_nydusd_fuse_mounts_an_inline_meta_blob(tmp_path, tree, nydusd_works):
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    layer = blobs / "layer"
    build(str(tree), BuildOptions(blob_inline_meta=True, blob_toc=True, blob=str(layer)))
    with _Mount(tmp_path, layer, blobs) as m:
        assert not m.error, m.error
        got = snapshot_dir(m.mnt)
    assert diff_snapshots(snapshot_dir(tree), got) == []
