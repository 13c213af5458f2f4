"""The upstream vectors through ``check``, ``inspect`` and ``unpack``, and rebuilt by us."""

from __future__ import annotations

import hashlib
import re
import tarfile

import pytest

from nydus_vfs.builder import BuildOptions, build, check, inspect_request, unpack
from nydus_vfs.format.types import Compressor, Digester
from tests.functional.builder_helpers import snapshot_image


def _expected_md5(result_text: str) -> dict[str, str]:
    """``md5  /path`` lines of the ``.result`` file."""
    out = {}
    for line in result_text.splitlines():
        m = re.match(r"^([0-9a-f]{32})  (/.*)$", line)
        if m:
            out[m.group(2)] = m.group(1)
    return out


@pytest.mark.parametrize("which", [0, 1], ids=["sha256-none", "blake3-none"])
def test_v5_vectors_check_and_unpack_to_the_expected_files(tmp_path, v5_vector, which):
    boot = str(v5_vector["boots"][which])
    res = check(boot, blob_dir=str(v5_vector["blob_dir"]))
    assert [b.blob_id for b in res.blobs] == ["7334a2594e133cf8ae364189c2276b090fc490c627bcc3fb1077f0419a538e00"]
    assert inspect_request(boot, "stats")["inodes_count"] == 51
    unpack(boot, str(tmp_path / "out.tar"), blob_dir=str(v5_vector["blob_dir"]))
    with tarfile.open(tmp_path / "out.tar") as tf:
        got = {}
        for m in tf.getmembers():
            if m.isfile():
                got["/" + m.name] = hashlib.md5(tf.extractfile(m).read()).hexdigest()
            elif m.islnk():
                got["/" + m.name] = got["/" + m.linkname]
    want = _expected_md5(v5_vector["expected"].read_text())
    # find(1) follows nothing: symlinks to files are not listed as files, so compare on the listed paths.
    assert {p: got[p] for p in want} == want
    assert len(want) >= 23


def test_v6_vector_check_unpack_and_rebuild(tmp_path, v6_vector):
    boot = str(v6_vector["boot"])
    res = check(boot, blob_dir=str(v6_vector["blob_dir"]))
    assert res.fs_version == 6 and res.compressor == Compressor.ZSTD
    unpack(boot, str(tmp_path / "v6.tar"), blob_dir=str(v6_vector["blob_dir"]))
    with tarfile.open(tmp_path / "v6.tar") as tf:
        sizes = {m.name: m.size for m in tf.getmembers() if m.isfile()}
    assert sizes == {"lib.rs": 16931, "sync_io.rs": 13400}
    # Rebuilding the unpacked tar with the vector's settings gives the same files.
    (tmp_path / "b").mkdir()
    build(str(tmp_path / "v6.tar"), BuildOptions(source_type="tar-rafs", compressor=Compressor.ZSTD,
                                                 digester=Digester.BLAKE3, blob_toc=True,
                                                 bootstrap=str(tmp_path / "boot"), blob_dir=str(tmp_path / "b")))
    ours = snapshot_image(tmp_path / "boot", blob_dir=tmp_path / "b")
    theirs = snapshot_image(v6_vector["boot"], blob_dir=v6_vector["blob_dir"])
    assert {k: v.get("sha256") for k, v in ours.items()} == {k: v.get("sha256") for k, v in theirs.items()}
