"""``nydus-image create`` end to end: what goes in comes out.

Every image is read back through the format reader (``Bootstrap``) with the
chunk data decoded and digest-checked independently of the builder, and
compared with the source: modes, owners, sizes, nanosecond mtimes, symlink
targets, xattrs, hardlink sets, device numbers and contents.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import pathlib
import subprocess
import sys
import tarfile

import pytest
from tests.functional.builder_helpers import (IS_ROOT, diff_snapshots, make_rich_tree, snapshot_dir, snapshot_image)

from nydus_vfs.builder import BuildOptions, build, check, inspect_request, unpack
from nydus_vfs.format.reader import Bootstrap
from nydus_vfs.format.types import BlobFeatures, Compressor, Digester

NYDUS_IMAGE = [sys.executable, "-m", "nydus_vfs.cli.nydus_image"]


@pytest.fixture(scope="module")
def rich(tmp_path_factory) -> pathlib.Path:
    return make_rich_tree(tmp_path_factory.mktemp("rich") / "src")


@pytest.fixture(scope="module")
def rich_snapshot(rich) -> dict:
    return snapshot_dir(rich)


MATRIX = [
    (v, comp, dig, cs)
    for v in (5, 6)
    for comp in (Compressor.NONE, Compressor.LZ4_BLOCK, Compressor.ZSTD)
    for dig in (Digester.BLAKE3, Digester.SHA256)
    for cs in (0x1000, 0x10000)
]


@pytest.mark.parametrize("version,compressor,digester,chunk_size", MATRIX,
                         ids=[f"v{v}-{c.cli_name}-{d.cli_name}-{cs:#x}" for v, c, d, cs in MATRIX])
def test_directory_image_reads_back_identical(tmp_path, rich, rich_snapshot, version, compressor, digester,
                                              chunk_size):
    opts = BuildOptions(fs_version=version, compressor=compressor, digester=digester, chunk_size=chunk_size,
                        bootstrap=str(tmp_path / "boot"), blob_dir=str(tmp_path))
    result = build(str(rich), opts)
    got = snapshot_image(tmp_path / "boot", blob_dir=tmp_path)
    assert diff_snapshots(rich_snapshot, got) == []
    # The blob is named by its id and the id is in the bootstrap.
    assert result.blobs == [result.blob_id]
    assert (tmp_path / result.blob_id).is_file()
    # Duplicate data (dup-of-exact, zeros, holes) is stored once.
    assert result.chunks_deduplicated > 0
    assert check(str(tmp_path / "boot"), blob_dir=str(tmp_path)).inodes == len(rich_snapshot)


def test_v6_none_blob_is_the_uncompressed_aligned_image(tmp_path, rich):
    """Chunk data sits at its uncompressed offset, so the blob is an erofs device as is (rafs-format.md §2.14)."""
    r = build(str(rich), BuildOptions(compressor=Compressor.NONE, bootstrap=str(tmp_path / "boot"),
                                      blob_dir=str(tmp_path), chunk_size=0x10000))
    bs = Bootstrap.from_bytes((tmp_path / "boot").read_bytes())
    blob = (tmp_path / r.blob_id).read_bytes()
    info = bs.blobs[0]
    assert info.features & BlobFeatures.ALIGNED
    assert info.uncompressed_size % 4096 == 0 and len(blob) >= info.uncompressed_size
    for path, ino, node in bs.walk():
        for c in bs.chunks(ino) if node.is_reg else ():
            assert c.compressed_offset == c.uncompressed_offset
            assert c.uncompressed_offset % 4096 == 0


def test_v5_aligned_chunk_option(tmp_path, rich, rich_snapshot):
    build(str(rich), BuildOptions(fs_version=5, aligned_chunk=True, bootstrap=str(tmp_path / "boot"),
                                  blob_dir=str(tmp_path), chunk_size=0x10000))
    bs = Bootstrap.from_bytes((tmp_path / "boot").read_bytes())
    offsets = [c.uncompressed_offset for _, ino, n in bs.walk() if n.is_reg for c in bs.chunks(ino)]
    assert offsets and all(o % 4096 == 0 for o in offsets)
    assert bs.blobs[0].features & BlobFeatures.ALIGNED
    assert diff_snapshots(rich_snapshot, snapshot_image(tmp_path / "boot", blob_dir=tmp_path)) == []


@pytest.mark.parametrize("version", [5, 6])
def test_repeatable_builds_are_byte_identical(tmp_path, rich, version):
    outs = []
    for run in range(2):
        d = tmp_path / str(run)
        d.mkdir()
        r = build(str(rich), BuildOptions(fs_version=version, repeatable=True, bootstrap=str(d / "boot"),
                                          blob_dir=str(d), workers=1 if run else 2))
        outs.append(((d / "boot").read_bytes(), (d / r.blob_id).read_bytes()))
    assert outs[0] == outs[1]
    # --repeatable stores owners as 0 (upstream clears EXPLICIT_UID_GID).
    snap = snapshot_image(tmp_path / "0" / "boot", blob_dir=tmp_path / "0")
    assert {e["owner"] for e in snap.values()} == {(0, 0)}


def test_default_builds_are_deterministic_across_thread_counts(tmp_path, rich):
    blobs = []
    for workers in (1, 2, 4):
        d = tmp_path / f"w{workers}"
        d.mkdir()
        r = build(str(rich), BuildOptions(bootstrap=str(d / "boot"), blob_dir=str(d), chunk_size=0x1000,
                                          workers=workers))
        blobs.append(((d / "boot").read_bytes(), (d / r.blob_id).read_bytes()))
    assert blobs[0] == blobs[1] == blobs[2]


@pytest.mark.parametrize("version,toc", [(5, False), (6, False), (6, True)])
def test_inline_meta_blob_is_self_contained(tmp_path, rich, rich_snapshot, version, toc):
    blob = tmp_path / "layer.blob"
    r = build(str(rich), BuildOptions(fs_version=version, blob_inline_meta=True, blob_toc=toc, blob=str(blob)))
    assert r.bootstrap_path is None and r.blob_path == str(blob)
    assert r.blobs == [hashlib.sha256(blob.read_bytes()).hexdigest()] or toc
    bs = Bootstrap.from_bytes(blob.read_bytes())
    assert bs.inlined
    assert bs.blobs[0].features & BlobFeatures.INLINED_FS_META
    assert diff_snapshots(rich_snapshot, snapshot_image(blob)) == []
    assert check(str(blob)).blobs[0].blob_id == "layer"  # the placeholder id is replaced by the file name


def test_blob_toc_blob_id_excludes_digest_array(tmp_path, rich):
    """rafs-format.md §3.8: with blob-toc the id hashes everything but the ``blob.digest`` payload."""
    r = build(str(rich), BuildOptions(blob_toc=True, bootstrap=str(tmp_path / "boot"), blob_dir=str(tmp_path)))
    data = (tmp_path / r.blob_id).read_bytes()
    bs = Bootstrap.from_bytes((tmp_path / "boot").read_bytes())
    info = bs.blobs[0]
    n = info.chunk_count
    from nydus_vfs.format.blob import BlobTail
    tail = BlobTail.parse(data)
    sec = tail.sections["blob.digest"]
    assert sec.size == 32 * n
    assert hashlib.sha256(data[:sec.offset] + data[sec.offset + sec.size:]).hexdigest() == r.blob_id
    assert hashlib.sha256(data).hexdigest() != r.blob_id
    assert info.blob_toc_size == 5 * 128 + 512 - 128  # image.blob, blob.meta, header, digest (no image.boot)
    assert hashlib.sha256(data[-info.blob_toc_size:]).digest() == info.blob_toc_digest


def test_blob_id_option_and_v6_limit(tmp_path, rich):
    r = build(str(rich), BuildOptions(blob_id="my-blob", bootstrap=str(tmp_path / "boot"), blob_dir=str(tmp_path)))
    assert r.blobs == ["my-blob"] and (tmp_path / "my-blob").is_file()
    assert check(str(tmp_path / "boot"), blob_dir=str(tmp_path)).blobs[0].blob_id == "my-blob"


@pytest.mark.parametrize("name", ["all-entry-type.tar", "all-entry-type-macos.tar"])
@pytest.mark.parametrize("version", [5, 6])
def test_vector_tars_build_and_show_every_entry(tmp_path, vectors_dir, name, version):
    src = vectors_dir / "tar" / name
    build(str(src), BuildOptions(source_type="tar-rafs", fs_version=version, bootstrap=str(tmp_path / "boot"),
                                 blob_dir=str(tmp_path)))
    got = snapshot_image(tmp_path / "boot", blob_dir=tmp_path)
    with tarfile.open(src) as tf:
        members = tf.getmembers()
        contents = {m.name: tf.extractfile(m).read() for m in members if m.isfile()}
    for m in members:
        e = got["/" + m.name.rstrip("/")]
        assert e["mtime"][0] == int(m.mtime)
        assert e["owner"] == (m.uid, m.gid)
        if m.isdir():
            assert e["type"] == 0o040000
        elif m.issym():
            assert e["target"] == m.linkname.encode()
        elif m.islnk():
            target = got["/" + m.linkname]
            assert e["sha256"] == target["sha256"] and e["links"] == target["links"]
        else:
            assert e["sha256"] == hashlib.sha256(contents[m.name]).hexdigest()
            assert e["perm"] == m.mode & 0o7777
    hard = [m for m in members if m.islnk()]
    assert hard and len(got["/" + hard[0].name]["links"]) == len(hard) + 1
    # Every tar entry plus the root, nothing else.
    assert len(got) == len({m.name.rstrip("/") for m in members}) + 1
    if "macos" in name:
        # PAX path for the long name and nanosecond mtimes survive; bare macOS xattr names are skipped.
        long = [k for k in got if len(k.rsplit("/", 1)[-1]) > 100]
        assert long and got["/tar/dir1/hardlink2.txt"]["mtime"] == (1665584430, 393557573)
        assert all(not e["xattrs"] for e in got.values())


def test_targz_source_and_empty_tar(tmp_path, vectors_dir):
    raw = (vectors_dir / "tar" / "all-entry-type.tar").read_bytes()
    import gzip
    (tmp_path / "l.tar.gz").write_bytes(gzip.compress(raw))
    build(str(tmp_path / "l.tar.gz"), BuildOptions(source_type="targz-rafs", bootstrap=str(tmp_path / "gz.boot"),
                                                   blob_dir=str(tmp_path)))
    build(str(vectors_dir / "tar" / "all-entry-type.tar"),
          BuildOptions(source_type="tar-rafs", bootstrap=str(tmp_path / "t.boot"), blob_dir=str(tmp_path)))
    assert snapshot_image(tmp_path / "gz.boot", blob_dir=tmp_path) == \
        snapshot_image(tmp_path / "t.boot", blob_dir=tmp_path)
    r = build(str(vectors_dir / "tar" / "empty.tar"),
              BuildOptions(source_type="tar-rafs", bootstrap=str(tmp_path / "e.boot"), blob_dir=str(tmp_path)))
    assert r.blobs == [] and r.blob_path is None
    assert list(snapshot_image(tmp_path / "e.boot", blob_dir=tmp_path)) == ["/"]


@pytest.mark.parametrize("version", [5, 6])
def test_directory_to_image_to_unpack_to_directory(tmp_path, rich, rich_snapshot, version):
    build(str(rich), BuildOptions(fs_version=version, bootstrap=str(tmp_path / "boot"), blob_dir=str(tmp_path),
                                  chunk_size=0x10000))
    unpack(str(tmp_path / "boot"), str(tmp_path / "out.tar"), blob_dir=str(tmp_path))
    # Rebuild from the tar: the image is identical to the directory (sockets cannot live in a tar).
    build(str(tmp_path / "out.tar"), BuildOptions(source_type="tar-rafs", fs_version=version,
                                                  bootstrap=str(tmp_path / "boot2"), blob_dir=str(tmp_path),
                                                  chunk_size=0x10000))
    want = {k: v for k, v in rich_snapshot.items() if k != "/sock"}
    assert diff_snapshots(want, snapshot_image(tmp_path / "boot2", blob_dir=tmp_path)) == []
    if IS_ROOT:
        # And GNU tar extracts it to the same directory.
        dest = tmp_path / "x"
        dest.mkdir()
        subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "-xpf", str(tmp_path / "out.tar"), "-C",
                        str(dest)], check=True)
        got = snapshot_dir(dest)
        want_dir = copy.deepcopy(want)
        # tar cannot restore a directory's mtime after writing into it unless asked; compare the rest.
        for snap in (got, want_dir):
            for k, v in snap.items():
                if v["type"] == 0o040000:
                    v.pop("mtime")
        assert diff_snapshots(want_dir, got) == []


def test_chunk_dict_dedups_against_dictionary_blobs(tmp_path, rich, rich_snapshot):
    (tmp_path / "dict").mkdir()
    d = build(str(rich), BuildOptions(bootstrap=str(tmp_path / "dict.boot"), blob_dir=str(tmp_path / "dict"),
                                      chunk_size=0x10000))
    src2 = tmp_path / "src2"
    src2.mkdir()
    (src2 / "copy").write_bytes((rich / "dir" / "multi").read_bytes())
    (src2 / "new").write_bytes(b"brand new data")
    (tmp_path / "out").mkdir()
    r = build(str(src2), BuildOptions(bootstrap=str(tmp_path / "boot"), blob_dir=str(tmp_path / "out"),
                                      chunk_size=0x10000, chunk_dict=f"bootstrap={tmp_path / 'dict.boot'}"))
    assert r.blobs == [d.blob_id, r.blob_id]
    assert r.chunks_stored == 1
    for blob_id in r.blobs:
        if not (tmp_path / "out" / blob_id).exists():
            os.link(tmp_path / "dict" / blob_id, tmp_path / "out" / blob_id)
    got = snapshot_image(tmp_path / "boot", blob_dir=tmp_path / "out")
    assert got["/copy"]["sha256"] == rich_snapshot["/dir/multi"]["sha256"]


def test_parent_bootstrap_layers_a_directory_with_whiteouts(tmp_path, rich, rich_snapshot):
    (tmp_path / "b").mkdir()
    build(str(rich), BuildOptions(bootstrap=str(tmp_path / "parent"), blob_dir=str(tmp_path / "b")))
    upper = tmp_path / "upper"
    (upper / "dir").mkdir(parents=True)
    (upper / "dir" / ".wh.multi").write_bytes(b"")
    (upper / "many").mkdir()
    (upper / "many" / ".wh..wh..opq").write_bytes(b"")
    (upper / "many" / "only-new").write_bytes(b"new")
    (upper / "small.txt").write_bytes(b"replaced")
    r = build(str(upper), BuildOptions(parent_bootstrap=str(tmp_path / "parent"), bootstrap=str(tmp_path / "boot"),
                                       blob_dir=str(tmp_path / "b")))
    got = snapshot_image(tmp_path / "boot", blob_dir=tmp_path / "b")
    assert "/dir/multi" not in got and "/dir/exact" in got
    assert [k for k in got if k.startswith("/many/")] == ["/many/only-new"]
    assert got["/small.txt"]["size"] == len(b"replaced")
    assert got["/dir/nested/dup-of-exact"] == rich_snapshot["/dir/nested/dup-of-exact"]
    assert not any(".wh." in k for k in got)
    assert len(r.blobs) == 2


@pytest.mark.parametrize("version", [5, 6])
def test_prefetch_fs_policy_writes_the_table_and_orders_data(tmp_path, rich, version):
    patterns = ["/dir/nested", "/small.txt", "relative/ignored", "/dir/nested/deeper"]
    from nydus_vfs.builder import parse_prefetch_patterns
    r = build(str(rich), BuildOptions(fs_version=version, prefetch_policy="fs",
                                      prefetch_patterns=parse_prefetch_patterns(patterns),
                                      bootstrap=str(tmp_path / "boot"), blob_dir=str(tmp_path)))
    table = inspect_request(str(tmp_path / "boot"), "prefetch")
    assert [e["path"] for e in table] == [["/dir/nested"], ["/small.txt"]]
    stats = inspect_request(str(tmp_path / "boot"), "stat /dir/nested/dup-of-exact")
    # Prefetch files come first in the blob.
    assert stats["chunks"][0]["compressed_offset"] == 0
    assert r.blobs


def test_cli_create_with_output_json_and_prefetch_on_stdin(tmp_path, rich):
    out = tmp_path / "out.json"
    p = subprocess.run(NYDUS_IMAGE + ["create", "--type", "dir-rafs", "--fs-version", "5", "--prefetch-policy", "fs",
                                      "--bootstrap", str(tmp_path / "boot"), "--blob-dir", str(tmp_path),
                                      "--output-json", str(out), str(rich)],
                       input=b"/dir\n", capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr.decode()
    doc = json.loads(out.read_text())
    assert doc["fs_version"] == "5" and doc["compressor"] == "zstd" and doc["bootstrap"] == str(tmp_path / "boot")
    assert len(doc["blobs"]) == 1 and (tmp_path / doc["blobs"][0]).is_file()
    assert "successfully built RAFS filesystem" in p.stderr.decode()
    p = subprocess.run(NYDUS_IMAGE + ["inspect", str(tmp_path / "boot"), "--request", "prefetch"],
                       capture_output=True, timeout=60)
    assert json.loads(p.stdout)[0]["path"] == ["/dir"]


def test_bootstrap_named_by_digest_in_blob_dir(tmp_path, rich):
    r = build(str(rich), BuildOptions(blob_dir=str(tmp_path)))
    data = pathlib.Path(r.bootstrap_path).read_bytes()
    assert pathlib.Path(r.bootstrap_path).name == hashlib.sha256(data).hexdigest()
    assert sorted(os.listdir(tmp_path)) == sorted([r.blob_id, pathlib.Path(r.bootstrap_path).name])


def test_stream_source(tmp_path, vectors_dir):
    raw = (vectors_dir / "tar" / "all-entry-type.tar").read_bytes()
    r = build(io.BytesIO(raw), BuildOptions(source_type="tar-rafs", bootstrap=str(tmp_path / "boot"),
                                            blob_dir=str(tmp_path)))
    assert len(r.blobs) == 1


def test_blob_and_source_may_be_fifos_like_the_converter_uses(tmp_path, vectors_dir):
    """``Pack`` streams the layer tar in through a FIFO and reads the blob back from one."""
    import threading
    raw = (vectors_dir / "tar" / "all-entry-type.tar").read_bytes()
    src_fifo, blob_fifo = tmp_path / "src.fifo", tmp_path / "blob.fifo"
    os.mkfifo(src_fifo)
    os.mkfifo(blob_fifo)
    got: list[bytes] = []

    def feed() -> None:
        with open(src_fifo, "wb") as f:
            f.write(raw)

    def drain() -> None:
        with open(blob_fifo, "rb") as f:
            got.append(f.read())

    threads = [threading.Thread(target=feed), threading.Thread(target=drain)]
    for t in threads:
        t.start()
    r = build(str(src_fifo), BuildOptions(source_type="tar-rafs", blob_inline_meta=True, blob_toc=True,
                                          blob=str(blob_fifo)))
    for t in threads:
        t.join(timeout=30)
    assert blob_fifo.is_fifo() and got and got[0]
    (tmp_path / "layer").write_bytes(got[0])
    ref = tmp_path / "ref"
    build(str(vectors_dir / "tar" / "all-entry-type.tar"),
          BuildOptions(source_type="tar-rafs", blob_inline_meta=True, blob_toc=True, blob=str(ref)))
    assert got[0] == ref.read_bytes()
    assert r.blobs == [r.blob_id]


def test_parent_that_is_also_the_chunk_dict_is_listed_once(tmp_path, rich):
    (tmp_path / "b").mkdir()
    p = build(str(rich), BuildOptions(bootstrap=str(tmp_path / "parent"), blob_dir=str(tmp_path / "b"),
                                      chunk_size=0x10000))
    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / "copy").write_bytes((rich / "dir" / "exact").read_bytes())
    r = build(str(upper), BuildOptions(parent_bootstrap=str(tmp_path / "parent"), chunk_dict=str(tmp_path / "parent"),
                                       bootstrap=str(tmp_path / "boot"), blob_dir=str(tmp_path / "b"),
                                       chunk_size=0x10000))
    assert r.blobs == [p.blob_id] and r.blob_path is None    # everything deduplicated: no new blob
    got = snapshot_image(tmp_path / "boot", blob_dir=tmp_path / "b")
    assert got["/copy"]["sha256"] == got["/dir/exact"]["sha256"]
