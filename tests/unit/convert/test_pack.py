"""``nydus_vfs.convert`` pack / merge / unpack, on layer tars made here with ``tarfile``.

The layer format is checked from its bytes (reverse tar, section names, the
header *after* its data), the round trip by comparing tar trees member by
member (type, mode, owner, mtime, data, link target, device, xattrs, hardlink
groups), and merge against ``nydus-image merge`` run on the same layers.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile

import pytest
import zstandard

from nydus_vfs import convert
from nydus_vfs.builder import load_bootstrap
from nydus_vfs.cli import nydus_image
from nydus_vfs.errors import ConvertError
from nydus_vfs.format.blob import BlobTail

CHUNK = 0x10000


def _data(n: int, seed: str) -> bytes:
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}{i}".encode()).digest()
        i += 1
    return bytes(out[:n])


def _member(tf, name, kind="file", data=b"", mode=0o644, link="", uid=0, gid=0, mtime=1_600_000_000,
            dev=(0, 0), xattrs=None):
    ti = tarfile.TarInfo(name)
    ti.mode, ti.uid, ti.gid, ti.mtime = mode, uid, gid, mtime
    if xattrs:
        ti.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
    if kind == "file":
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))
        return
    ti.type = {"dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE, "chr": tarfile.CHRTYPE,
               "blk": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE}[kind]
    ti.linkname = link
    ti.devmajor, ti.devminor = dev
    tf.addfile(ti)


def make_layer(entries, fmt=tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for e in entries:
            _member(tf, *e[:2], **(e[2] if len(e) > 2 else {}))
    return buf.getvalue()


RICH = [
    ("etc", "dir", {"mode": 0o755}),
    ("etc/hostname", "file", {"data": b"nydus\n"}),
    ("etc/big", "file", {"data": _data(3 * CHUNK + 123, "big"), "uid": 1000, "gid": 100, "mode": 0o600}),
    ("etc/exact", "file", {"data": _data(2 * CHUNK, "exact")}),
    ("etc/dup", "file", {"data": _data(2 * CHUNK, "exact")}),
    ("etc/empty", "file", {"data": b""}),
    ("etc/suid", "file", {"data": b"#!/bin/sh\n", "mode": 0o4755}),
    ("etc/xattr", "file", {"data": b"x", "xattrs": {"user.k": "v", "security.capability": "cap"}}),
    ("usr", "dir", {"mode": 0o755, "mtime": 1_500_000_000}),
    ("usr/link", "sym", {"link": "../etc/hostname"}),
    ("usr/abs-link", "sym", {"link": "/etc/does-not-exist"}),
    ("usr/hard", "hard", {"link": "etc/big"}),
    ("usr/" + "n" * 255, "file", {"data": b"255-byte name"}),
    ("usr/" + "d" * 120 + "/" + "e" * 120, "dir", {}),
    ("dev", "dir", {}),
    ("dev/null", "chr", {"dev": (1, 3), "mode": 0o666}),
    ("dev/sda", "blk", {"dev": (8, 0), "mode": 0o660}),
    ("dev/fifo", "fifo", {"mode": 0o600}),
    ("tmp", "dir", {"mode": 0o1777}),
    ("tmp/.wh.gone", "file", {"data": b""}),
    ("opaque", "dir", {}),
    ("opaque/.wh..wh..opq", "file", {"data": b""}),
]


def tree_of_tar(data: bytes) -> dict:
    """path -> comparable description; hardlinks described by their group."""
    out = {}
    groups: dict[str, set[str]] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        members = tf.getmembers()
        by_name = {}
        for m in members:
            name = m.name.strip("/")
            if name.startswith("./"):
                name = name[2:]
            if name in ("", "."):
                continue
            by_name[name] = m
        for name, m in by_name.items():
            if m.islnk():
                target = m.linkname.strip("/")
                target = target[2:] if target.startswith("./") else target
                groups.setdefault(target, {target}).add(name)
                m = by_name[target]
            desc = {"type": m.type if m.type != tarfile.AREGTYPE else tarfile.REGTYPE, "mode": m.mode,
                    "uid": m.uid, "gid": m.gid, "mtime": int(m.mtime),
                    "xattrs": {k: v for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")}}
            if m.isfile():
                desc["sha"] = hashlib.sha256(tf.extractfile(m).read()).hexdigest()
            if m.issym():
                desc["link"] = m.linkname
            if m.ischr() or m.isblk():
                desc["dev"] = (m.devmajor, m.devminor)
            out[name] = desc
    hard = {frozenset(g) for g in groups.values()}
    return {"entries": out, "hardlinks": hard}


def _pack(tmp_path, layer: bytes, name="layer", **opt) -> tuple[str, convert.PackResult]:
    dest = tmp_path / name
    res = convert.pack(io.BytesIO(layer), str(dest), convert.PackOption(chunk_size=CHUNK, **opt))
    return str(dest), res


# -- the layer format -------------------------------------------------------------------------------

def test_packed_v6_layer_is_a_reverse_tar_with_the_upstream_sections(tmp_path):
    path, res = _pack(tmp_path, make_layer(RICH))
    blob = open(path, "rb").read()
    assert res.digest == "sha256:" + hashlib.sha256(blob).hexdigest() and res.size == len(blob)
    assert res.fs_version == 6
    # Walk the headers from the end: each header follows its data.
    names = []
    cur = len(blob) - 512
    while cur >= 0:
        hdr = tarfile.TarInfo.frombuf(blob[cur:cur + 512], "utf-8", "surrogateescape")
        names.append(hdr.name)
        if hdr.name == "image.blob":
            break
        cur -= hdr.size + 512
    assert names == ["rafs.blob.toc", "image.boot", "blob.digest", "blob.meta", "image.blob"]
    tail = BlobTail.parse(blob)
    assert {e.entry_name for e in tail.toc.entries} == {"image.blob", "blob.meta", "blob.meta.header",
                                                         "blob.digest", "image.boot"}
    assert blob[:4] != b"\x1f\x8b"   # raw chunk data first, not a gzip or a tar
    meta = convert.blob_meta_file(path)
    assert meta is not None and len(meta) % 4096 == 0 and meta[-4:] == b"\x0b\xb1\x0b\xb1"


def test_packed_v5_layer_has_blob_then_bootstrap(tmp_path):
    path, res = _pack(tmp_path, make_layer(RICH), fs_version="5", compressor="lz4_block")
    blob = open(path, "rb").read()
    boot_hdr = tarfile.TarInfo.frombuf(blob[-512:], "utf-8", "surrogateescape")
    assert boot_hdr.name == "image.boot"
    blob_end = len(blob) - 512 - boot_hdr.size
    assert tarfile.TarInfo.frombuf(blob[blob_end - 512:blob_end], "utf-8", "surrogateescape").name == "image.blob"
    assert load_bootstrap(path).fs_version == 5
    assert convert.blob_meta_file(path) is None


# -- round trips -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fs_version,compressor,wrap", [
    ("6", "zstd", "gzip"), ("6", "none", "plain"), ("6", "lz4_block", "zstd"), ("5", "zstd", "plain"),
])
def test_pack_unpack_round_trip_equals_the_layer(tmp_path, fs_version, compressor, wrap):
    layer = make_layer(RICH)
    src = {"gzip": gzip.compress, "plain": lambda b: b, "zstd": zstandard.ZstdCompressor().compress}[wrap](layer)
    path, _ = _pack(tmp_path, src, fs_version=fs_version, compressor=compressor)
    out = tmp_path / "out.tar"
    count = convert.unpack(path, str(out))
    assert count > len(RICH)
    want, got = tree_of_tar(layer), tree_of_tar(out.read_bytes())
    assert got["hardlinks"] == want["hardlinks"] == {frozenset({"etc/big", "usr/hard"})}
    # The unpacked tar also lists the parent of the deep dir the layer named implicitly.
    implicit = "usr/" + "d" * 120
    assert got["entries"].pop(implicit)["type"] == tarfile.DIRTYPE
    assert got["entries"] == want["entries"]


def test_unpack_to_a_file_object_and_pack_to_a_file_object(tmp_path):
    layer = make_layer(RICH[:4])
    sink = io.BytesIO()
    res = convert.pack(io.BytesIO(layer), sink, convert.PackOption(work_dir=str(tmp_path / "w")))
    assert res.digest == "sha256:" + hashlib.sha256(sink.getvalue()).hexdigest()
    (tmp_path / "blob").write_bytes(sink.getvalue())
    out = io.BytesIO()
    convert.unpack(str(tmp_path / "blob"), out, convert.UnpackOption(work_dir=str(tmp_path / "w")))
    assert tree_of_tar(out.getvalue())["entries"] == tree_of_tar(layer)["entries"]
    assert os.listdir(tmp_path / "w") == []   # temp files cleaned


def test_absolute_member_names_are_taken_relative_to_the_layer_root(tmp_path):
    layer = make_layer([("/abs", "dir", {}), ("/abs/file", "file", {"data": b"abs"}), ("./rel", "file", {})])
    path, _ = _pack(tmp_path, layer)
    convert.unpack(path, str(tmp_path / "o.tar"))
    assert set(tree_of_tar((tmp_path / "o.tar").read_bytes())["entries"]) == {"abs", "abs/file", "rel"}


# -- merge ---------------------------------------------------------------------------------------------------

LOWER = [
    ("bin", "dir", {}), ("bin/sh", "file", {"data": _data(CHUNK + 5, "sh")}),
    ("etc", "dir", {}), ("etc/keep", "file", {"data": b"keep"}), ("etc/old", "file", {"data": b"old"}),
    ("etc/over", "file", {"data": b"lower version"}),
    ("var", "dir", {}), ("var/lib", "dir", {}), ("var/lib/a", "file", {"data": b"a"}),
    ("var/lib/b", "file", {"data": _data(3 * CHUNK, "b")}),
]
UPPER = [
    ("etc", "dir", {}), ("etc/.wh.old", "file", {}), ("etc/over", "file", {"data": b"upper version"}),
    ("etc/new", "file", {"data": _data(2 * CHUNK + 1, "new")}),
    ("var", "dir", {}), ("var/lib", "dir", {"mode": 0o700}), ("var/lib/.wh..wh..opq", "file", {}),
    ("var/lib/c", "file", {"data": b"c"}),
]


def _unpack_merged(tmp_path, boot: str, layers: list[tuple[str, str]], name: str) -> dict:
    blobs = tmp_path / f"blobs-{name}"
    blobs.mkdir()
    for digest, path in layers:
        os.link(path, blobs / digest.split(":")[1])
    out = tmp_path / f"{name}.tar"
    nydus_image.main(["unpack", boot, "--blob-dir", str(blobs), "--output", str(out)])
    return tree_of_tar(out.read_bytes())


def test_merge_applies_whiteouts_and_equals_nydus_image_merge(tmp_path, monkeypatch):
    p1, r1 = _pack(tmp_path, make_layer(LOWER), name="l1")
    p2, r2 = _pack(tmp_path, make_layer(UPPER), name="l2")
    layers = [convert.Layer(r1.digest, p1), convert.Layer(r2.digest, p2)]
    boot = tmp_path / "merged.boot"
    digests = convert.merge(layers, str(boot), convert.MergeOption())
    assert digests == [r1.digest, r2.digest]
    img = load_bootstrap(str(boot))
    assert [b.blob_id for b in img.blobs] == [r1.digest[7:], r2.digest[7:]]

    # nydus-image merge on the same layer files, named as the snapshotter names them.
    for digest, path in ((r1.digest, p1), (r2.digest, p2)):
        os.link(path, tmp_path / digest[7:])
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"/\n")))
    cli_boot = tmp_path / "cli.boot"
    assert nydus_image.main(["merge", "--prefetch-policy", "fs", "-B", str(cli_boot),
                             "--blob-digests", f"{r1.digest[7:]},{r2.digest[7:]}",
                             str(tmp_path / r1.digest[7:]), str(tmp_path / r2.digest[7:])]) == 0
    pairs = [(r1.digest, p1), (r2.digest, p2)]
    ours = _unpack_merged(tmp_path, str(boot), pairs, "ours")
    cli = _unpack_merged(tmp_path, str(cli_boot), pairs, "cli")
    assert ours == cli
    names = set(ours["entries"])
    assert "etc/old" not in names and "var/lib/a" not in names and "var/lib/b" not in names
    assert {"bin/sh", "etc/keep", "etc/over", "etc/new", "var/lib/c"} <= names
    assert not any(".wh." in n for n in names)
    assert ours["entries"]["etc/over"]["sha"] == hashlib.sha256(b"upper version").hexdigest()
    assert ours["entries"]["var/lib"]["mode"] == 0o700


def test_merge_with_tar_holds_the_bootstrap_and_blob_meta_files(tmp_path):
    p1, r1 = _pack(tmp_path, make_layer(LOWER), name="l1")
    p2, r2 = _pack(tmp_path, make_layer([("x", "file", {"data": b"x"})]), name="l2")
    sink = io.BytesIO()
    digests = convert.merge([convert.Layer(r1.digest, p1), convert.Layer(r2.digest, p2)], sink,
                            convert.MergeOption(with_tar=True, work_dir=str(tmp_path / "w")))
    # Blob table order is order of first use in the merged tree: /x comes before /bin/sh.
    assert digests == [r2.digest, r1.digest]
    with tarfile.open(fileobj=io.BytesIO(sink.getvalue())) as tf:
        names = tf.getnames()
        assert names[:2] == ["image", convert.BOOTSTRAP_FILE_NAME_IN_LAYER]
        assert tf.getmember("image/image.boot").mode == 0o444
        assert set(names[2:]) == {f"image/{r1.digest[7:]}.blob.meta", f"image/{r2.digest[7:]}.blob.meta"}
        assert tf.extractfile(f"image/{r1.digest[7:]}.blob.meta").read() == convert.blob_meta_file(p1)
    assert os.listdir(tmp_path / "w") == []


def test_merge_drops_a_layer_whose_files_are_all_deleted(tmp_path):
    p1, r1 = _pack(tmp_path, make_layer([("gone", "file", {"data": b"bye"})]), name="l1")
    p2, r2 = _pack(tmp_path, make_layer([(".wh.gone", "file", {}), ("new", "file", {"data": b"hi"})]), name="l2")
    digests = convert.merge([convert.Layer(r1.digest, p1), convert.Layer(r2.digest, p2)], str(tmp_path / "m"))
    assert digests == [r2.digest]


def test_merge_refuses_mixed_versions_and_a_wrong_fs_version_option(tmp_path):
    p1, r1 = _pack(tmp_path, make_layer(LOWER), name="l1")
    p2, r2 = _pack(tmp_path, make_layer(UPPER), name="l2", fs_version="5")
    with pytest.raises(ConvertError, match="RAFS version"):
        convert.merge([convert.Layer(r1.digest, p1), convert.Layer(r2.digest, p2)], str(tmp_path / "m"))
    with pytest.raises(ConvertError, match="v6, the option asks for v5"):
        convert.merge([convert.Layer(r1.digest, p1)], str(tmp_path / "m"), convert.MergeOption(fs_version="5"))
    assert not (tmp_path / "m").exists()


def test_merge_of_a_file_that_is_not_a_nydus_layer_names_it(tmp_path):
    (tmp_path / "junk").write_bytes(b"\0" * 4096)
    with pytest.raises(ConvertError, match=r"layer 0 \(sha256:0{64}\).*not a valid nydus blob layer"):
        convert.merge([convert.Layer("sha256:" + "0" * 64, str(tmp_path / "junk"))], str(tmp_path / "m"))
    with pytest.raises(ConvertError, match="not a sha256"):
        convert.merge([convert.Layer("md5:abc", str(tmp_path / "junk"))], str(tmp_path / "m"))


# -- bad layers (issue 11): a clear error naming the entry, no output left ------------------------------

@pytest.mark.parametrize("entries,message", [
    ([("a/../../etc/passwd", "file", {"data": b"x"})], r"a/\.\./\.\./etc/passwd.*'\.\.'"),
    ([("hl", "hard", {"link": "missing/target"})], r"'hl'.*hardlink target '/missing/target' does not exist"),
    ([("x" * 256, "file", {"data": b"x"})], r"256 bytes, longer than NAME_MAX"),
    ([("f", "file", {"data": b"1"}), ("f", "file", {"data": b"2"})], r"'f': duplicate entry"),
])
def test_bad_layer_entries_are_named(tmp_path, entries, message):
    dest = tmp_path / "out"
    with pytest.raises(ConvertError, match=message):
        convert.pack(io.BytesIO(make_layer(entries)), str(dest))
    assert list(tmp_path.iterdir()) == []


def test_truncated_gzip_layer_is_refused(tmp_path):
    gz = gzip.compress(make_layer(LOWER))
    with pytest.raises(ConvertError, match="gzip stream: truncated"):
        convert.pack(io.BytesIO(gz[: len(gz) // 2]), str(tmp_path / "out"))
    assert list(tmp_path.iterdir()) == []


def test_truncated_plain_tar_names_the_entry(tmp_path):
    raw = make_layer(LOWER)
    cut = raw.index(_data(3 * CHUNK, "b")[:64]) + 1000
    with pytest.raises(ConvertError, match="var/lib/b"):
        convert.pack(io.BytesIO(raw[:cut]), str(tmp_path / "out"))


def test_unsupported_pack_options_are_refused(tmp_path):
    for opt, msg in ((convert.PackOption(batch_size=0x10000), "batch_size"),
                     (convert.PackOption(encrypt=True), "encrypt"),
                     (convert.PackOption(fs_version="4"), "fs_version"),
                     (convert.PackOption(compressor="gzip"), "compressor gzip is not supported")):
        with pytest.raises(ConvertError, match=msg):
            convert.pack(io.BytesIO(make_layer(LOWER)), str(tmp_path / "o"), opt)


def test_pack_timeout_stops_a_slow_stream(tmp_path):
    class Slow(io.RawIOBase):
        def __init__(self):
            self.data = io.BytesIO(make_layer(LOWER))

        def read(self, n=-1):
            import time as _t
            _t.sleep(0.05)
            return self.data.read(min(n if n and n > 0 else 512, 512))

    with pytest.raises(ConvertError, match="timed out"):
        convert.pack(Slow(), str(tmp_path / "o"), convert.PackOption(timeout=0.1))
    assert not (tmp_path / "o").exists()


def test_backend_receives_the_packed_blob_and_merge_checks_it(tmp_path):
    class Store:
        def __init__(self):
            self.blobs = {}

        def push(self, path, digest):
            self.blobs[digest] = open(path, "rb").read()

        def check(self, digest):
            if digest not in self.blobs:
                raise FileNotFoundError(digest)
            return f"mem://{digest}"

        def type(self):
            return "memory"

    store = Store()
    assert isinstance(store, convert.Backend)
    path, res = _pack(tmp_path, make_layer(LOWER), backend=store)
    assert store.blobs[res.digest] == open(path, "rb").read()
    assert convert.merge([convert.Layer(res.digest, path)], str(tmp_path / "m"),
                         convert.MergeOption(backend=store)) == [res.digest]
    store.blobs.clear()
    with pytest.raises(ConvertError, match="not in the memory backend"):
        convert.merge([convert.Layer(res.digest, path)], str(tmp_path / "m"), convert.MergeOption(backend=store))


def test_corrupt_chunk_in_a_layer_fails_unpack_naming_the_chunk(tmp_path):
    path, _ = _pack(tmp_path, make_layer(LOWER), compressor="none")
    data = bytearray(open(path, "rb").read())
    data[100] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(ConvertError, match="chunk"):
        convert.unpack(path, str(tmp_path / "o.tar"))
    assert not (tmp_path / "o.tar").exists()


def test_prefetch_patterns_become_the_bootstrap_prefetch_table(tmp_path):
    from nydus_vfs.builder import inspect_request
    path, _ = _pack(tmp_path, make_layer(LOWER), prefetch_patterns="/bin\n/etc/keep\nrelative-is-ignored\n")
    (tmp_path / "boot").write_bytes(convert.read_layer_section(path, "image.boot"))
    assert [e["path"] for e in inspect_request(str(tmp_path / "boot"), "prefetch")] == [["/bin"], ["/etc/keep"]]


def test_chunk_dict_from_a_merged_bootstrap_deduplicates_across_images(tmp_path):
    p1, r1 = _pack(tmp_path, make_layer(LOWER), name="l1")
    convert.merge([convert.Layer(r1.digest, p1)], str(tmp_path / "dict.boot"))
    shared = _data(CHUNK + 5, "sh")   # the same bytes as LOWER's bin/sh
    layer2 = make_layer([("x", "dir", {}), ("x/sh-copy", "file", {"data": shared}),
                         ("x/new", "file", {"data": b"new" * 1000})])
    p_plain, r_plain = _pack(tmp_path, layer2, name="plain")
    p2, r2 = _pack(tmp_path, layer2, name="l2", chunk_dict_path=str(tmp_path / "dict.boot"))
    assert r2.size < r_plain.size - CHUNK   # the shared chunks are not stored again
    digests = convert.merge([convert.Layer(r1.digest, p1), convert.Layer(r2.digest, p2)], str(tmp_path / "m"),
                            convert.MergeOption(chunk_dict_path=str(tmp_path / "dict.boot")))
    assert sorted(digests) == sorted([r1.digest, r2.digest])
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for d, p in ((r1.digest, p1), (r2.digest, p2)):
        os.link(p, blobs / d[7:])
    nydus_image.main(["unpack", str(tmp_path / "m"), "--blob-dir", str(blobs), "--output", str(tmp_path / "o.tar")])
    with tarfile.open(tmp_path / "o.tar") as tf:
        assert tf.extractfile("x/sh-copy").read() == shared
        assert tf.extractfile("bin/sh").read() == shared
