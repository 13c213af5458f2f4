"""``nydus-image merge``: layer bootstraps overlaid into one image (whiteouts, opaques, blob GC)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import shutil
import stat
import subprocess
import sys
import tarfile

import pytest

from nydus_vfs.builder import BuildOptions, InconsistentFilesystemError, MergeOptions, build, check, merge
from nydus_vfs.format import BlobTail
from tests.conftest import requires_fuse
from tests.functional.builder_helpers import IS_ROOT, diff_snapshots, snapshot_dir, snapshot_image
from tests.functional.nydusd_helpers import Nydusd

NYDUS_IMAGE = [sys.executable, "-m", "nydus_vfs.cli.nydus_image"]


def _layer(path: pathlib.Path, files: dict[str, bytes | None], dirs: tuple[str, ...] = ()) -> pathlib.Path:
    """A layer directory: ``None`` content makes a directory."""
    path.mkdir(parents=True)
    for d in dirs:
        (path / d).mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        p = path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if data is None:
            p.mkdir(exist_ok=True)
        else:
            p.write_bytes(data)
    for dirpath, dirnames, filenames in os.walk(path):
        for n in dirnames + filenames:
            os.utime(os.path.join(dirpath, n), (1_700_000_000, 1_700_000_000))
    os.utime(path, (1_700_000_000, 1_700_000_000))
    return path


LOWER = {
    "keep": b"kept from lower",
    "gone": b"whited out",
    "opq/a": b"lower a",
    "opq/sub/b": b"lower b",
    "dir/x": b"lower x",
    "dir/y": b"lower y",
    "replaced": b"old",
    "dir-becomes-file/inner": b"inner",
}
UPPER = {
    ".wh.gone": b"",
    "opq/.wh..wh..opq": b"",
    "opq/new": b"upper new in opaque dir",
    "dir/.wh.x": b"",
    "dir/z": b"upper z",
    "replaced": b"new content",
    "dir-becomes-file": b"now a file",
    "added/deep/file": b"added",
    # a whiteout never hides a sibling from the same layer
    ".wh.also-new": b"",
    "also-new": b"same layer",
}
EXPECTED = {
    "keep": b"kept from lower",
    "opq/new": b"upper new in opaque dir",
    "dir/y": b"lower y",
    "dir/z": b"upper z",
    "replaced": b"new content",
    "dir-becomes-file": b"now a file",
    "added/deep/file": b"added",
    "also-new": b"same layer",
}


def _build_layer(src: pathlib.Path, out: pathlib.Path, name: str, **kw) -> pathlib.Path:
    # Per-layer bootstraps keep whiteouts as plain files (the converter passes --whiteout-spec none).
    build(str(src), BuildOptions(whiteout_spec="none", bootstrap=str(out / name), blob_dir=str(out), **kw))
    return out / name


@pytest.mark.parametrize("version", [5, 6])
def test_merge_applies_oci_whiteouts_and_opaque_dirs(tmp_path, version):
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    lower = _build_layer(_layer(tmp_path / "lower", LOWER), blobs, "l1.boot", fs_version=version)
    upper = _build_layer(_layer(tmp_path / "upper", UPPER), blobs, "l2.boot", fs_version=version)
    r = merge([str(lower), str(upper)], MergeOptions(bootstrap=str(tmp_path / "merged")))
    got = snapshot_image(tmp_path / "merged", blob_dir=blobs)
    files = {k[1:]: v for k, v in got.items() if v["type"] == stat.S_IFREG}
    assert {k: v["sha256"] for k, v in files.items()} == \
        {k: hashlib.sha256(v).hexdigest() for k, v in EXPECTED.items()}
    assert set(got) == {"/", "/keep", "/opq", "/opq/new", "/dir", "/dir/y", "/dir/z", "/replaced",
                        "/dir-becomes-file", "/added", "/added/deep", "/added/deep/file", "/also-new"}
    assert len(r.blobs) == 2
    check(str(tmp_path / "merged"), blob_dir=str(blobs))


def test_merge_equals_building_the_overlaid_directory(tmp_path):
    """The merged image is the image of the overlay result (same tree, same data)."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    lower = _build_layer(_layer(tmp_path / "lower", LOWER), blobs, "l1.boot")
    upper = _build_layer(_layer(tmp_path / "upper", UPPER), blobs, "l2.boot")
    merge([str(lower), str(upper)], MergeOptions(bootstrap=str(tmp_path / "merged")))
    ref = _layer(tmp_path / "ref", EXPECTED)
    for d in ("opq",):
        os.utime(ref / d, (1_700_000_000, 1_700_000_000))
    want = snapshot_dir(ref)
    got = snapshot_image(tmp_path / "merged", blob_dir=blobs)
    for snap in (want, got):
        for e in snap.values():
            e.pop("mtime")
    assert diff_snapshots(want, got) == []


@pytest.mark.skipif(not IS_ROOT, reason="overlayfs whiteouts are char devices, which need root to create")
def test_merge_overlayfs_whiteouts(tmp_path):
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    lower = _layer(tmp_path / "lower", {"a": b"a", "b": b"b", "o/x": b"x"})
    upper = _layer(tmp_path / "upper", {"c": b"c", "o/y": b"y"})
    os.mknod(upper / "a", 0o600 | stat.S_IFCHR, os.makedev(0, 0))
    os.setxattr(upper / "o", "trusted.overlay.opaque", b"y")
    l1 = _build_layer(lower, blobs, "l1")
    l2 = _build_layer(upper, blobs, "l2")
    merge([str(l1), str(l2)], MergeOptions(bootstrap=str(tmp_path / "m"), whiteout_spec="overlayfs"))
    got = snapshot_image(tmp_path / "m", blob_dir=blobs)
    assert set(got) == {"/", "/b", "/c", "/o", "/o/y"}
    assert got["/o"]["xattrs"] == {}


def test_merge_drops_unreferenced_blobs_and_keeps_order_of_first_use(tmp_path):
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    l1 = _build_layer(_layer(tmp_path / "one", {"only": b"from layer one"}), blobs, "l1")
    l2 = _build_layer(_layer(tmp_path / "two", {"second": b"from layer two"}), blobs, "l2")
    l3 = _build_layer(_layer(tmp_path / "three", {".wh.only": b"", "third": b"from layer three"}), blobs, "l3")
    r = merge([str(l1), str(l2), str(l3)], MergeOptions(bootstrap=str(tmp_path / "m")))
    ids = [json.loads(subprocess.run(NYDUS_IMAGE + ["inspect", str(p), "-R", "blobs"], capture_output=True,
                                     check=True).stdout)[0]["blob_id"] for p in (l1, l2, l3)]
    # layer one's blob is no longer used; "second" sorts before "third".
    assert r.blobs == [ids[1], ids[2]]


def test_merge_inconsistent_layers_exit_2(tmp_path):
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    l5 = _build_layer(_layer(tmp_path / "a", {"f": b"1"}), blobs, "v5", fs_version=5)
    l6 = _build_layer(_layer(tmp_path / "b", {"g": b"2"}), blobs, "v6", fs_version=6)
    with pytest.raises(InconsistentFilesystemError, match="RAFS version"):
        merge([str(l5), str(l6)], MergeOptions(bootstrap=str(tmp_path / "m")))
    cs = _build_layer(_layer(tmp_path / "c", {"h": b"3"}), blobs, "cs", chunk_size=0x10000)
    p = subprocess.run(NYDUS_IMAGE + ["merge", "--bootstrap", str(tmp_path / "m"), str(l6), str(cs)],
                       capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    assert "chunk size" in p.stderr
    assert not (tmp_path / "m").exists()


def test_merge_of_inline_meta_layers_named_by_digest_like_the_converter(tmp_path):
    """Layers are blobs with inlined bootstraps, stored under their sha256 (the OCI layer digest)."""
    store = tmp_path / "store"
    store.mkdir()
    paths = []
    for i, (files) in enumerate([LOWER, UPPER]):
        tmp_blob = tmp_path / f"layer{i}"
        build(str(_layer(tmp_path / f"src{i}", files)),
              BuildOptions(source_type="dir-rafs", whiteout_spec="none", blob_inline_meta=True, blob_toc=True,
                           blob=str(tmp_blob)))
        digest = hashlib.sha256(tmp_blob.read_bytes()).hexdigest()
        shutil.move(tmp_blob, store / digest)
        paths.append(str(store / digest))
    out = tmp_path / "out.json"
    p = subprocess.run(NYDUS_IMAGE + ["merge", "-B", str(tmp_path / "merged"), "-J", str(out), *paths],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    doc = json.loads(out.read_text())
    # Blob ids are the layer digests, in order of first use ("added/..." comes from the upper layer).
    assert doc["blobs"] == [os.path.basename(x) for x in reversed(paths)]
    got = snapshot_image(tmp_path / "merged", blob_dir=store)
    assert {k[1:] for k, v in got.items() if v["type"] == stat.S_IFREG} == set(EXPECTED)


def test_merge_blob_digest_options_rename_the_layer_blob(tmp_path):
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    l1 = _build_layer(_layer(tmp_path / "one", {"f": b"data"}), blobs, "l1")
    r = merge([str(l1)], MergeOptions(bootstrap=str(tmp_path / "m"), blob_digests=["sha256:" + "ab" * 32],
                                      blob_sizes=[12345]))
    assert r.blobs == ["ab" * 32]
    with pytest.raises(Exception, match="doesn't match number of sources"):
        merge([str(l1)], MergeOptions(bootstrap=str(tmp_path / "m2"), blob_sizes=[1, 2]))


def _tar_layer(path: pathlib.Path, entries: dict[str, bytes | None]) -> pathlib.Path:
    """A layer tar: ``None`` makes a directory; names are written in the given order."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    return path


BIG = b"".join(hashlib.sha256(b"%d" % i).digest() for i in range(80000))  # 2.5 MiB: three chunks
TAR_LOWER = {"etc": None, "etc/conf": b"lower conf", "gone": b"whited out", "big": BIG,
             "opq": None, "opq/a": b"lower a", "keep": b"kept"}
TAR_UPPER = {"etc": None, "etc/conf": b"upper conf", ".wh.gone": b"", "opq": None, "opq/.wh..wh..opq": b"",
             "opq/new": b"new in opaque", "added": b"added by upper"}
TAR_EXPECTED = {"etc/conf": b"upper conf", "big": BIG, "opq/new": b"new in opaque", "keep": b"kept",
                "added": b"added by upper"}


@requires_fuse
def test_converter_flow_tar_rafs_inline_meta_layers_merge_and_mount(tmp_path):
    """create as the converter does (nydus-surface.md §5.3 step 2), merge with --blob-digests, mount."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    boots, digests = [], []
    for i, entries in enumerate([TAR_LOWER, TAR_UPPER]):
        tar = _tar_layer(tmp_path / f"layer{i}.tar", entries)
        blob = tmp_path / f"layer{i}.blob"
        p = subprocess.run(NYDUS_IMAGE + ["create", "--log-level", "warn", "--prefetch-policy", "fs", "--blob",
                                          str(blob), "--whiteout-spec", "none", "--fs-version", "6", "--type",
                                          "tar-rafs", "--blob-inline-meta", "--features", "blob-toc", str(tar)],
                           input=b"/", capture_output=True)
        assert p.returncode == 0, p.stderr
        data = blob.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        shutil.move(blob, blobs / digest)
        # The snapshotter pulls image.boot out of the layer blob for merge.
        boot = tmp_path / f"layer{i}.boot"
        boot.write_bytes(BlobTail.parse(data).extract("image.boot", data))
        boots.append(str(boot))
        digests.append("sha256:" + digest)
    merged = tmp_path / "merged.boot"
    p = subprocess.run(NYDUS_IMAGE + ["merge", "--prefetch-policy", "fs", "--output-json", str(tmp_path / "m.json"),
                                      "--bootstrap", str(merged), *boots, "--blob-digests", ",".join(digests)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert sorted(json.loads((tmp_path / "m.json").read_text())["blobs"]) == sorted(d[7:] for d in digests)
    entries = json.loads(subprocess.run(NYDUS_IMAGE + ["inspect", str(merged), "-R", "blobs"], capture_output=True,
                                        check=True).stdout)
    # Upstream merge clears the inlined-meta flag: the merged bootstrap is not inside any blob.
    assert all("fs-meta" not in e["features"].split() for e in entries), entries
    with Nydusd(tmp_path, ["--bootstrap", str(merged), "--localfs-dir", str(blobs)]) as daemon:
        got = {}
        for root, _dirs, files in os.walk(daemon.mnt):
            for name in files:
                path = pathlib.Path(root) / name
                got[str(path.relative_to(daemon.mnt))] = path.read_bytes()
        assert daemon.alive()
    assert got == TAR_EXPECTED
