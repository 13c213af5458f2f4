"""Images built here, mounted by ``nydusd fuse``, show the source tree exactly.

Skipped (with the reason) where FUSE cannot be mounted or where ``nydusd``
cannot serve an image at all yet; a failure to show the *right* tree is a
test failure.
"""

from __future__ import annotations

import pathlib

import pytest

from nydus_vfs.builder import BuildOptions, build
from nydus_vfs.format.types import Compressor, Digester
from nydus_vfs.transport.fusedev import is_mountpoint
from tests.conftest import requires_fuse
from tests.functional.builder_helpers import diff_snapshots, make_rich_tree, snapshot_dir
from tests.functional.nydusd_helpers import Nydusd, write_localfs_config

pytestmark = [requires_fuse]

def _mount(tmp: pathlib.Path, boot: pathlib.Path, blob_dir: pathlib.Path) -> Nydusd:
    """nydusd on ``boot`` with blobs from ``blob_dir``; a failure to mount is left in ``.error``."""
    cfg = write_localfs_config(tmp / "config.json", blob_dir, tmp / "cache")
    return Nydusd(tmp, ["--bootstrap", str(boot), "--config", str(cfg)], timeout=30, check=False)


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
    with _mount(tmp, tmp / "boot", tmp) as m:
        if m.error or not is_mountpoint(str(m.mnt)):
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
    with _mount(tmp_path, tmp_path / "boot", blobs) as m:
        assert not m.error, m.error
        got = snapshot_dir(m.mnt)
    assert diff_snapshots(snapshot_dir(tree), got) == []


def test_nydusd_fuse_mounts_an_inline_meta_blob(tmp_path, tree, nydusd_works):
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    layer = blobs / "layer"
    build(str(tree), BuildOptions(blob_inline_meta=True, blob_toc=True, blob=str(layer)))
    with _mount(tmp_path, layer, blobs) as m:
        assert not m.error, m.error
        got = snapshot_dir(m.mnt)
    assert diff_snapshots(snapshot_dir(tree), got) == []
