from __future__ import annotations

import pytest

from nydus_vfs.builder import BuildOptions, InconsistentFilesystemError, MergeOptions, build, merge
from nydus_vfs.errors import BuildError


def _layer(tmp_path, name, files, **kw):
    src = tmp_path / f"src-{name}"
    src.mkdir()
    for n, data in files.items():
        (src / n).write_bytes(data)
    build(str(src), BuildOptions(whiteout_spec="none", bootstrap=str(tmp_path / name), blob_dir=str(tmp_path), **kw))
    return str(tmp_path / name)


def test_argument_checks(tmp_path):
    with pytest.raises(BuildError, match="at least one"):
        merge([], MergeOptions(bootstrap=str(tmp_path / "m")))
    with pytest.raises(BuildError, match="--bootstrap and --blob-dir are missing"):
        merge(["x"], MergeOptions())
    with pytest.raises(BuildError, match="does not exist"):
        merge(["x"], MergeOptions(blob_dir=str(tmp_path / "nope")))
    with pytest.raises(BuildError, match="whiteout"):
        merge(["x"], MergeOptions(bootstrap="m", whiteout_spec="aufs"))
    with pytest.raises(BuildError, match="blob-toc-sizes"):
        merge(["a", "b"], MergeOptions(bootstrap="m", blob_toc_sizes=[1]))


@pytest.mark.parametrize("kw,message", [
    (dict(fs_version=5), "RAFS version"),
    (dict(chunk_size=0x2000), "chunk size"),
    (dict(repeatable=True), "explicit uid/gid"),
])
def test_inconsistent_layers(tmp_path, kw, message):
    a = _layer(tmp_path, "a", {"f": b"1"})
    b = _layer(tmp_path, "b", {"g": b"2"}, **kw)
    with pytest.raises(InconsistentFilesystemError, match=message):
        merge([a, b], MergeOptions(bootstrap=str(tmp_path / "m")))
    assert not (tmp_path / "m").exists()


def test_v5_layers_must_share_compressor_and_digester(tmp_path):
    a = _layer(tmp_path, "a", {"f": b"1"}, fs_version=5)
    b = _layer(tmp_path, "b", {"g": b"2" * 100}, fs_version=5, compressor=0)
    with pytest.raises(InconsistentFilesystemError, match="compressor"):
        merge([a, b], MergeOptions(bootstrap=str(tmp_path / "m")))


def test_blob_dir_output_and_bad_digest(tmp_path):
    a = _layer(tmp_path, "a", {"f": b"1"})
    out = tmp_path / "out"
    out.mkdir()
    r = merge([a], MergeOptions(blob_dir=str(out)))
    import hashlib
    import os
    assert os.path.basename(r.bootstrap_path) == hashlib.sha256(open(r.bootstrap_path, "rb").read()).hexdigest()
    with pytest.raises(BuildError, match="--blob-digests entry 0"):
        merge([a], MergeOptions(bootstrap=str(tmp_path / "m"), blob_digests=["not-hex"]))


def test_parent_bootstrap_comes_first(tmp_path):
    p = _layer(tmp_path, "p", {"f": b"parent", "g": b"parent g"})
    u = _layer(tmp_path, "u", {".wh.g": b"", "h": b"upper"})
    r = merge([u], MergeOptions(bootstrap=str(tmp_path / "m"), parent_bootstrap=p))
    from nydus_vfs.builder import load_bootstrap
    root = load_bootstrap(str(tmp_path / "m")).root
    assert sorted(root.children) == [b"f", b"h"]
    assert len(r.blobs) == 2
