from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile

import pytest

from nydus_vfs.builder import BuildOptions, build
from nydus_vfs.builder._tree import Inode, Node, encode_dev
from nydus_vfs.builder._unpack import BlobReader, TarWriter, unpack
from nydus_vfs.errors import BuildError
from nydus_vfs.format.types import BlobInfo, ChunkFlags, ChunkInfo, Compressor, Digester
from nydus_vfs.utils import compress


def _read_tar(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return {m.name: m for m in tf.getmembers()}


def test_tar_writer_uses_pax_only_where_needed():
    out = io.BytesIO()
    w = TarWriter(out)
    long = b"d/" + b"n" * 150
    f = Inode(0o100640, uid=70_000_000, gid=2, size=3, mtime=1_600_000_000, mtime_nsec=5,
              xattrs={b"user.k": b"v\x00bin"})
    w.add(long, Node(b"x", f), data=iter([b"abc"]))
    w.add(b"d/hard", Node(b"hard", f), link_to=long)
    w.add(b"d/sym", Node(b"sym", Inode(0o120777, symlink=b"t" * 200, size=200)))
    w.add(b"d/blk", Node(b"blk", Inode(stat.S_IFBLK | 0o600, rdev=encode_dev(300, 70000))))
    w.add(b"d/fifo", Node(b"fifo", Inode(stat.S_IFIFO | 0o644)))
    w.add(b"dir/", Node(b"dir", Inode(stat.S_IFDIR | 0o755)))
    w.close()
    data = out.getvalue()
    assert len(data) % 512 == 0
    members = _read_tar(data)
    m = members[long.decode()]
    assert m.uid == 70_000_000 and m.pax_headers["SCHILY.xattr.user.k"] == "v\x00bin"
    assert m.pax_headers["mtime"] == "1600000000.000000005" and m.mode == 0o640
    assert members["d/hard"].islnk() and members["d/hard"].linkname == long.decode()
    assert members["d/sym"].linkname == "t" * 200
    assert (members["d/blk"].devmajor, members["d/blk"].devminor) == (300, 70000)
    assert members["d/fifo"].isfifo() and members["dir"].isdir()
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        assert tf.extractfile(long.decode()).read() == b"abc"


def test_tar_writer_refuses_sockets_and_short_data():
    w = TarWriter(io.BytesIO())
    with pytest.raises(BuildError, match="cannot be stored"):
        w.add(b"s", Node(b"s", Inode(stat.S_IFSOCK | 0o755)))
    with pytest.raises(BuildError, match="wrote 1 bytes of 5"):
        w.add(b"f", Node(b"f", Inode(0o100644, size=5)), data=iter([b"x"]))


def _blob(tmp_path, payload: bytes, comp=Compressor.ZSTD):
    stored, packed = compress(payload, comp)
    (tmp_path / "blob").write_bytes(b"pad" + stored)
    info = BlobInfo(index=0, blob_id="blob", chunk_count=1, chunk_size=0x10000, compressor=comp,
                    digester=Digester.SHA256, features=0, compressed_size=3 + len(stored),
                    uncompressed_size=len(payload))
    chunk = ChunkInfo(hashlib.sha256(payload).digest(), 0, 0, ChunkFlags.COMPRESSED if packed else 0, 3,
                      len(stored), 0, len(payload), 0)
    return BlobReader([info], {0: str(tmp_path / "blob")}), chunk


def test_blob_reader_decodes_and_verifies(tmp_path):
    payload = b"hello " * 1000
    reader, chunk = _blob(tmp_path, payload)
    assert reader.read_chunk(chunk) == payload
    assert b"".join(reader.file_data([chunk], 10)) == payload[:10]
    with pytest.raises(BuildError, match="cover"):
        list(reader.file_data([chunk], len(payload) + 1))
    data = bytearray((tmp_path / "blob").read_bytes())
    data[-5] ^= 0xFF
    (tmp_path / "blob").write_bytes(bytes(data))
    reader2 = BlobReader(reader._blobs, reader._paths)
    with pytest.raises(BuildError, match="blob blob chunk 0"):
        reader2.read_chunk(chunk)
    (tmp_path / "blob").write_bytes(b"pad")
    with pytest.raises(BuildError, match="truncated"):
        BlobReader(reader._blobs, reader._paths).read_chunk(chunk)
    reader.close()


def test_blob_reader_digest_mismatch_and_missing_blob(tmp_path):
    payload = os.urandom(100)
    reader, chunk = _blob(tmp_path, payload, Compressor.NONE)
    from dataclasses import replace
    with pytest.raises(BuildError, match="digest"):
        reader.read_chunk(replace(chunk, digest=b"\1" * 32))
    with pytest.raises(BuildError, match="no file given"):
        BlobReader(reader._blobs, {}).read_chunk(chunk)
    with pytest.raises(BuildError, match="cannot open"):
        BlobReader(reader._blobs, {0: str(tmp_path / "nope")}).read_chunk(chunk)


def test_unpack_requires_blobs_and_an_output(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data")
    build(str(src), BuildOptions(bootstrap=str(tmp_path / "boot"), blob_dir=str(tmp_path)))
    with pytest.raises(BuildError, match="--blob or --blob-dir"):
        unpack(str(tmp_path / "boot"), str(tmp_path / "o.tar"))
    with pytest.raises(BuildError, match="empty --output"):
        unpack(str(tmp_path / "boot"), "", blob_dir=str(tmp_path))
    assert unpack(str(tmp_path / "boot"), str(tmp_path / "o.tar"), blob_dir=str(tmp_path)) == 2
    assert {m.name for m in _read_tar((tmp_path / "o.tar").read_bytes()).values()} == {".", "f"}
    # a failed unpack leaves nothing behind
    os.unlink(tmp_path / "o.tar")
    for p in tmp_path.iterdir():
        if len(p.name) == 64:
            p.write_bytes(b"")
    with pytest.raises(BuildError):
        unpack(str(tmp_path / "boot"), str(tmp_path / "o.tar"), blob_dir=str(tmp_path))
    assert not (tmp_path / "o.tar").exists() and not any(p.name.startswith(".nydus-image-") for p in tmp_path.iterdir())
