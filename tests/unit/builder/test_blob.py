from __future__ import annotations

import hashlib
import io

import pytest

from nydus_vfs.builder._blob import PLACEHOLDER_BLOB_ID, BlobWriter
from nydus_vfs.errors import BuildError
from nydus_vfs.format.blob import (BLOB_CCT_HEADER_SIZE, BlobCompressionContextHeader, BlobTail, TarHeader,
                                   TocEntryList, decode_ci_entries)
from nydus_vfs.format.types import BlobFeatures, Compressor, Digester
from nydus_vfs.utils import compress, decompress


def _writer(version=6, compressor=Compressor.ZSTD, **kw):
    out = io.BytesIO()
    w = BlobWriter(out, blob_index=0, chunk_size=0x10000, compressor=compressor, digester=Digester.BLAKE3,
                   fs_version=version, aligned=kw.pop("aligned", False), **kw)
    return out, w


def _add(w, payloads, compressor):
    infos = []
    for i, raw in enumerate(payloads):
        stored, packed = compress(raw, compressor)
        infos.append(w.add_chunk(hashlib.sha256(raw).digest(), stored, packed, len(raw)))
    return infos


PAYLOADS = [b"a" * 5000, bytes(range(256)) * 3, b"tail-bytes"]


def test_v6_none_is_identity_layout():
    out, w = _writer(compressor=Compressor.NONE)
    infos = _add(w, PAYLOADS, Compressor.NONE)
    w.seal()
    blob_id = w.finish()
    data = out.getvalue()
    assert [c.uncompressed_offset for c in infos] == [0, 8192, 12288]
    assert all(c.compressed_offset == c.uncompressed_offset for c in infos)
    assert w.uncompressed_size == 16384 and w.data_size == 16384
    for c, raw in zip(infos, PAYLOADS):
        assert data[c.uncompressed_offset:c.uncompressed_offset + len(raw)] == raw
    assert data[5000:8192] == bytes(3192)   # gaps are zeros
    assert blob_id == hashlib.sha256(data).hexdigest()
    info = w.info(blob_id, 0)
    assert info.features == BlobFeatures.ALIGNED | BlobFeatures.CAP_TAR_TOC
    hdr = BlobCompressionContextHeader.from_bytes(data, info.ci_offset + info.ci_compressed_size)
    hdr.validate(info)
    entries = decode_ci_entries(data[info.ci_offset:info.ci_offset + info.ci_compressed_size], 3, False)
    assert [(e.compressed_offset, e.compressed_size, e.uncompressed_offset, e.uncompressed_size) for e in entries] \
        == [(c.compressed_offset, c.compressed_size, c.uncompressed_offset, c.uncompressed_size) for c in infos]
    assert info.compressed_size == len(data)
    assert len(data) == info.ci_offset + info.ci_compressed_size + BLOB_CCT_HEADER_SIZE


def test_v6_compressed_chunks_are_packed_with_aligned_uncompressed_offsets():
    out, w = _writer()
    infos = _add(w, PAYLOADS, Compressor.ZSTD)
    w.seal()
    w.finish()
    assert infos[0].compressed_offset == 0
    assert infos[1].compressed_offset == infos[0].compressed_size
    assert [c.uncompressed_offset for c in infos] == [0, 8192, 12288]
    data = out.getvalue()
    c = infos[0]
    assert decompress(data[c.compressed_offset:c.compressed_offset + c.compressed_size], Compressor.ZSTD,
                      c.uncompressed_size) == PAYLOADS[0]


@pytest.mark.parametrize("aligned,expected", [(False, [0, 5000, 5768]), (True, [0, 8192, 12288])])
def test_v5_blob_is_chunk_data_only(aligned, expected):
    out, w = _writer(version=5, compressor=Compressor.NONE, aligned=aligned)
    infos = _add(w, PAYLOADS, Compressor.NONE)
    w.seal()
    w.finish()
    assert [c.uncompressed_offset for c in infos] == expected
    assert out.getvalue() == b"".join(PAYLOADS)
    assert w.info("x", 0).ci_uncompressed_size == 0


def test_blob_toc_layout_digests_and_id():
    out, w = _writer(blob_toc=True)
    infos = _add(w, PAYLOADS, Compressor.ZSTD)
    w.seal()
    blob_id = w.finish()
    data = out.getvalue()
    tail = BlobTail.parse(data)
    toc = tail.toc
    assert [e.entry_name for e in toc.entries] == ["image.blob", "blob.meta", "blob.meta.header", "blob.digest"]
    digest_sec = tail.sections["blob.digest"]
    assert data[digest_sec.offset:digest_sec.offset + digest_sec.size] == b"".join(c.digest for c in infos)
    # id = sha256 of everything but the digest array payload (rafs-format.md §3.8)
    assert blob_id == hashlib.sha256(data[:digest_sec.offset] + data[digest_sec.offset + digest_sec.size:]).hexdigest()
    img = toc.get("image.blob")
    end = w.data_size
    assert img.compressed_offset == 0 and img.compressed_size == end
    assert img.uncompressed_digest == hashlib.sha256(data[:end + 512]).digest()
    assert TarHeader.from_bytes(data, end).entry_name == "image.blob"
    info = w.info(blob_id, 0)
    assert info.features & BlobFeatures.HAS_TOC and info.features & BlobFeatures.INLINED_CHUNK_DIGEST
    assert info.blob_toc_size == 4 * 128 + 512
    assert info.blob_toc_digest == hashlib.sha256(data[-info.blob_toc_size:]).digest()
    assert tail.extract("blob.meta", data) == b"".join(
        e.to_bytes() for e in decode_ci_entries(tail.extract("blob.meta", data), 3, False))


@pytest.mark.parametrize("version,toc", [(5, False), (6, False), (6, True)])
def test_inline_bootstrap(version, toc):
    out, w = _writer(version=version, inline_meta=True, blob_toc=toc)
    _add(w, PAYLOADS, Compressor.ZSTD)
    w.seal()
    before = w.info(PLACEHOLDER_BLOB_ID, 0)
    boot = b"BOOTSTRAP" * 1000
    w.write_bootstrap(boot)
    blob_id = w.finish()
    data = out.getvalue()
    assert before.compressed_size == w.bootstrap_offset
    assert before.blob_toc_size == 0 and before.features & BlobFeatures.INLINED_FS_META
    tail = BlobTail.parse(data)
    assert tail.extract("image.boot", data) == boot
    if toc:
        assert tail.toc.get("image.boot").uncompressed_digest == hashlib.sha256(boot).digest()
    else:
        assert data.endswith(TarHeader.new("image.boot", len(boot)).to_bytes())
        assert blob_id == hashlib.sha256(data).hexdigest()


def test_call_order_is_enforced():
    _, w = _writer()
    w.seal()
    with pytest.raises(BuildError):
        w.add_chunk(b"d" * 32, b"x", False, 1)
    with pytest.raises(BuildError):
        w.write_bootstrap(b"boot")   # not an inline-meta blob
    _, w = _writer(inline_meta=True)
    w.seal()
    with pytest.raises(BuildError):
        w.finish()                   # bootstrap missing
    with pytest.raises(BuildError, match="blob-toc"):
        _writer(version=5, blob_toc=True)


def test_toc_names_fill_their_field():
    _, w = _writer(blob_toc=True)
    _add(w, PAYLOADS[:1], Compressor.ZSTD)
    w.seal()
    w.finish()
    raw = TocEntryList(w._toc).to_bytes()
    assert b"blob.meta.header" in raw and len(raw) == 4 * 128


def test_chunk_data_larger_than_the_staging_buffers_is_written_in_order():
    import os
    import threading

    from nydus_vfs.builder._blob import STAGE_BYTES
    out, w = _writer(version=5, compressor=Compressor.NONE)
    big = os.urandom(STAGE_BYTES * 2 + 123)          # spans three staging buffers at once
    pieces = [b"head" * 1000, memoryview(big), bytes(range(256)) * 40] + [os.urandom(70_000) for _ in range(90)]
    threads: dict[str, set[str]] = {"hash": set(), "write": set()}
    stager = w._stager
    real_hash, real_write = stager._hash_part, stager._write_part

    def hash_part(buf, n):
        threads["hash"].add(threading.current_thread().name)
        real_hash(buf, n)

    def write_part(buf, n):
        threads["write"].add(threading.current_thread().name)
        real_write(buf, n)

    stager._hash_part, stager._write_part = hash_part, write_part
    for i, raw in enumerate(pieces):
        w.add_chunk(hashlib.sha256(raw).digest(), raw, False, len(raw))
    w.seal()
    blob_id = w.finish()
    w.close()
    data = out.getvalue()
    assert data == b"".join(bytes(p) for p in pieces)
    assert blob_id == hashlib.sha256(data).hexdigest() and w.size == len(data)
    # Hashed and written behind, each on its own helper thread.
    assert threads["hash"] and all(n.startswith("nydus-blob-hash") for n in threads["hash"])
    assert threads["write"] and all(n.startswith("nydus-blob-write") for n in threads["write"])


def test_a_failed_write_behind_is_reported_and_close_stops_the_helper():
    import errno
    import os
    import threading

    from nydus_vfs.builder._blob import STAGE_BYTES

    class Full(io.BytesIO):
        def write(self, data):
            if self.tell() + len(data) > STAGE_BYTES:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data)

    w = BlobWriter(Full(), blob_index=0, chunk_size=0x100000, compressor=Compressor.NONE,
                   digester=Digester.BLAKE3, fs_version=5, aligned=False)
    with pytest.raises(OSError, match="No space left"):
        for i in range(8):
            raw = os.urandom(STAGE_BYTES // 2)
            w.add_chunk(hashlib.sha256(raw).digest(), raw, False, len(raw))
        w.seal()
    w.close()
    w.close()   # idempotent
    assert not [t for t in threading.enumerate() if t.name.startswith("nydus-blob")]
