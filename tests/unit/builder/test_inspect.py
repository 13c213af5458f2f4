from __future__ import annotations

import os

import pytest

from nydus_vfs.builder import BuildOptions, build, check, format_blob_features, inspect_request
from nydus_vfs.errors import BuildError
from nydus_vfs.format.types import BlobFeatures


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inspect")
    src = tmp / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"x" * 5000)
    (src / "s").symlink_to("d/f")
    os.setxattr(src / "d" / "f", "user.a", b"1")
    r = build(str(src), BuildOptions(fs_version=6, bootstrap=str(tmp / "boot"), blob_dir=str(tmp), chunk_size=0x1000))
    return str(tmp / "boot"), r, tmp


def test_feature_names_like_upstream():
    assert format_blob_features(int(BlobFeatures.ALIGNED | BlobFeatures.CAP_TAR_TOC | BlobFeatures.HAS_TOC)) == \
        "aligned cap_toc toc"
    assert format_blob_features(0) == ""


def test_requests(image):
    boot, r, _ = image
    assert inspect_request(boot, "stats")["inodes_count"] == 4
    blobs = inspect_request(boot, "blobs")
    assert blobs[0]["blob_id"] == r.blob_id and set(blobs[0]) >= {
        "blob_id", "readahead_offset", "readahead_size", "decompressed_size", "compressed_size"}
    assert [e["name"] for e in inspect_request(boot, "ls")] == ["d", "s"]
    assert inspect_request(boot, "ls d")[0]["type"] == "-"
    st = inspect_request(boot, "stat /d/f")
    assert st["size"] == 5000 and len(st["chunks"]) == 2 and st["xattrs"] == {"user.a": "31"}
    assert inspect_request(boot, "stat s")["target"] == "d/f"
    assert inspect_request(boot, f"icheck {st['inode']}")["path"] == ["/d/f"]
    assert inspect_request(boot, "prefetch") == []


@pytest.mark.parametrize("request_,message", [
    ("", "empty"), ("bogus", "unsupported"), ("stat", "invalid arguments"), ("ls a b", "invalid arguments"),
    ("stat /nope", "no such file"), ("ls d/f", "not a directory"), ("icheck x", "invalid arguments"),
    ("icheck 99999", "not in the image"),
])
def test_bad_requests(image, request_, message):
    with pytest.raises(BuildError, match=message):
        inspect_request(image[0], request_)


def test_check_verbose_and_blob_dir(image):
    boot, r, tmp = image
    res = check(boot, blob_dir=str(tmp), verbose=True)
    assert res.fs_version == 6 and res.inodes == 4
    assert any("chunk:" in line for line in res.verbose_lines)
    with pytest.raises(BuildError, match="No such file"):
        check(boot, blob_dir=str(tmp / "empty-dir-does-not-exist"))
