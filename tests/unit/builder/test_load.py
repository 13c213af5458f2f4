from __future__ import annotations

import pytest

from nydus_vfs.builder import BuildOptions, build
from nydus_vfs.builder._load import blob_path_for, load_bootstrap, parse_chunk_dict_arg
from nydus_vfs.errors import BuildError


@pytest.fixture
def image(tmp_path):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"content" * 1000)
    (src / "link").symlink_to("d/f")
    import os
    os.link(src / "d" / "f", src / "hard")
    os.setxattr(src / "d", "user.x", b"1")
    r = build(str(src), BuildOptions(bootstrap=str(tmp_path / "boot"), blob_dir=str(tmp_path), chunk_size=0x1000))
    return tmp_path / "boot", r


@pytest.mark.parametrize("version", [5, 6])
def test_load_bootstrap_rebuilds_the_tree(tmp_path, version):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"content" * 1000)
    import os
    os.link(src / "d" / "f", src / "hard")
    build(str(src), BuildOptions(fs_version=version, bootstrap=str(tmp_path / "boot"), blob_dir=str(tmp_path),
                                 chunk_size=0x1000))
    img = load_bootstrap(str(tmp_path / "boot"), layer=3)
    f = img.root.children[b"d"].children[b"f"].inode
    assert f is img.root.children[b"hard"].inode
    assert f.size == 7000 and len(f.chunks) == 2 and f.layer == 3
    assert img.fs_version == version and img.chunk_size == 0x1000
    assert len(list(img.chunks())) == 2   # the hardlinked file counted once


def test_load_keeps_xattrs_and_symlinks(image):
    boot, _ = image
    img = load_bootstrap(str(boot))
    assert img.root.children[b"d"].inode.xattrs == {b"user.x": b"1"}
    assert img.root.children[b"link"].inode.symlink == b"d/f"


def test_rename_blob_from_digest_named_path(tmp_path, image):
    boot, r = image
    named = tmp_path / ("ab" * 32 + ".boot")
    named.write_bytes(boot.read_bytes())
    assert load_bootstrap(str(named), rename_blob_from_path=True).blobs[0].blob_id == "ab" * 32
    assert load_bootstrap(str(boot), rename_blob_from_path=True).blobs[0].blob_id == r.blob_id


def test_bad_bootstraps_name_the_file(tmp_path):
    (tmp_path / "junk").write_bytes(b"\0" * 9000)
    with pytest.raises(BuildError, match="junk.*not a valid RAFS image"):
        load_bootstrap(str(tmp_path / "junk"))
    with pytest.raises(BuildError, match="missing"):
        load_bootstrap(str(tmp_path / "missing"))


def test_chunk_dict_argument_forms():
    assert parse_chunk_dict_arg("bootstrap=/x/y") == "/x/y"
    assert parse_chunk_dict_arg("/x/y") == "/x/y"
    with pytest.raises(BuildError, match="only 'bootstrap=PATH'"):
        parse_chunk_dict_arg("sqlite=/db")
    with pytest.raises(BuildError, match="empty path"):
        parse_chunk_dict_arg("bootstrap=")


def test_blob_path_for():
    assert blob_path_for("id", "/d", None) == "/d/id"
    assert blob_path_for("id", "/d", "/b") == "/b"
    assert blob_path_for("id", None, None) is None
