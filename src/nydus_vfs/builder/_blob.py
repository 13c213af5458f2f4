"""Writing one native data blob (rafs-format.md §3.1, §3.3, §3.6-§3.8, §4.1).

A blob is written strictly front to back (so it may go to a pipe-like temp
file and be renamed at the end) in this order::

    chunk data
    [hdr(image.blob)]                              inline meta or blob-toc
    [ci array (compressed) | ci header (4096)]     v6 with chunks
    [hdr(blob.meta)]                               inline meta or blob-toc
    [blob.digest array | hdr(blob.digest)]         blob-toc with chunks
    [bootstrap | hdr(image.boot)]                  inline meta (zstd with blob-toc)
    [ToC | hdr(rafs.blob.toc)]                     blob-toc

The blob id is sha256 over every byte written except the ``blob.digest``
payload (rafs-format.md §3.8); :class:`BlobWriter` hashes as it writes.

Chunk placement: compressed chunks are packed back to back.  Uncompressed
offsets are cumulative (v5) or 4 KiB aligned (v6, ``--aligned-chunk``).  With
``identity_layout`` (v6 and compressor ``none``) each chunk is written *at*
its uncompressed offset and the data area is padded to the uncompressed size,
so ``blob[0:uncompressed_size]`` is exactly the uncompressed 4 KiB-aligned
image that the kernel's erofs driver reads as an extra device (rafs-format.md §2.14).

Chunk data (the bulk of a blob) goes through a :class:`_Stager`: it is copied
into a few large buffers that two helper threads hash and write, in order,
while the builder reads and chunks the next files.  sha256 and ``write``
release the GIL on such buffers, so the blob id costs no time on the thread
that drives the build.  Everything after the chunk data is small and written
directly, once the stager has drained.
"""

from __future__ import annotations

import hashlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import BinaryIO

from ..errors import BuildError
from ..format.blob import (TOC_FLAG_LZ4, TOC_FLAG_NONE, TOC_FLAG_ZSTD,
                           BlobChunkInfoV1, BlobCompressionContextHeader, TarHeader, TocEntry, TocEntryList)
from ..format.types import BlobFeatures, BlobInfo, ChunkFlags, ChunkInfo, Compressor, Digester
from ..utils import Hasher
from ..utils import compress as _compress

__all__ = ["BlobWriter", "PLACEHOLDER_BLOB_ID", "MAX_CHUNKS_PER_BLOB"]

#: Id written into a bootstrap that is itself inside the blob (rafs-format.md §3.8): readers
#: replace it with the blob's real name.
PLACEHOLDER_BLOB_ID = "x" * 64
#: ``alloc_chunk_index`` refuses index >= 0xFF_FFFF (24-bit ci index in v6).
MAX_CHUNKS_PER_BLOB = 0xFF_FFFF

_TOC_FLAGS = {Compressor.NONE: TOC_FLAG_NONE, Compressor.ZSTD: TOC_FLAG_ZSTD, Compressor.LZ4_BLOCK: TOC_FLAG_LZ4}


#: Size of one staging buffer, and how many may wait for the helper thread.
STAGE_BYTES = 1 << 20
_MAX_PENDING = 4


class _Stager:
    """An in-order, hashed, write-behind stream into ``out``.

    :meth:`write` copies the data (the caller may reuse its buffer at once).
    Each full buffer is hashed into ``hasher`` by one helper thread and
    written by another (both started on the first full buffer): sha256 and
    the kernel's copy into the page cache are the two biggest costs of an
    uncompressed blob, and they run side by side.  Each thread takes the
    buffers in order, so the hash and the file see the bytes in order.
    :meth:`drain` waits for all of it and re-raises the first error;
    :meth:`close` stops the helpers (also after an error) and must always be
    called.
    """

    def __init__(self, out: BinaryIO, hasher: Hasher) -> None:
        self._out = out
        self._hash = hasher
        self._buf = bytearray(STAGE_BYTES)
        self._view = memoryview(self._buf)
        self._len = 0
        self._free: list[bytearray] = []
        # (buffer, its hash job, its write job), oldest first.
        self._pending: deque[tuple[bytearray, Future, Future]] = deque()
        self._pools: tuple[ThreadPoolExecutor, ThreadPoolExecutor] | None = None

    def __bool__(self) -> bool:
        return bool(self._len or self._pending)

    def write(self, data: bytes | memoryview) -> None:
        n = len(data)
        room = STAGE_BYTES - self._len
        if n <= room:
            self._view[self._len:self._len + n] = data
            self._len += n
            return
        with memoryview(data) as rest:
            while len(rest):
                take = min(len(rest), STAGE_BYTES - self._len)
                self._view[self._len:self._len + take] = rest[:take]
                self._len += take
                rest = rest[take:]
                if self._len == STAGE_BYTES:
                    self._submit()

    def _submit(self) -> None:
        if self._pools is None:
            self._pools = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="nydus-blob-hash"),
                           ThreadPoolExecutor(max_workers=1, thread_name_prefix="nydus-blob-write"))
        while len(self._pending) >= _MAX_PENDING:
            self._free.append(self._retire())
        buf, n = self._buf, self._len
        hashing, writing = self._pools
        self._pending.append((buf, hashing.submit(self._hash_part, buf, n), writing.submit(self._write_part, buf, n)))
        self._buf = self._free.pop() if self._free else bytearray(STAGE_BYTES)
        self._view = memoryview(self._buf)
        self._len = 0

    def _retire(self) -> bytearray:
        """Wait for the oldest buffer's jobs (both, even if one failed); return the buffer."""
        buf, hashed, written = self._pending.popleft()
        wait((hashed, written))
        hashed.result()
        written.result()
        return buf

    def _hash_part(self, buf: bytearray, n: int) -> None:
        with memoryview(buf) as whole, whole[:n] as part:
            self._hash.update(part)

    def _write_part(self, buf: bytearray, n: int) -> None:
        with memoryview(buf) as whole, whole[:n] as part:
            self._out.write(part)

    def drain(self) -> None:
        while self._pending:
            self._free.append(self._retire())
        if self._len:
            part = self._view[:self._len]
            self._len = 0
            self._hash.update(part)
            self._out.write(part)

    def close(self) -> None:
        if self._pools is not None:
            for pool in self._pools:
                pool.shutdown(wait=True, cancel_futures=True)
            self._pools = None


# Padding between identity-layout chunks is always shorter than one block.
_ZEROS = memoryview(bytes(4096))


def _align4k(n: int) -> int:
    return (n + 4095) & ~4095


class BlobWriter:
    """Accumulate chunks into a blob file and finish it with its metadata.

    Call order: :meth:`add_chunk` any number of times (the chunk pipeline's
    sink), then :meth:`seal` once, then (only for inline meta)
    :meth:`write_bootstrap`, then :meth:`finish`; :meth:`close` always, also
    after an error (it stops the helper thread that writes chunk data).
    :meth:`info` describes the blob for a bootstrap's blob table at any point
    after :meth:`seal`.
    """

    #: add_chunk() is done with ``stored`` when it returns (it has been
    #: written), so the chunk pipeline may pass views of its reusable buffers.
    copies_chunk_data = True

    def __init__(self, out: BinaryIO, *, blob_index: int, chunk_size: int, compressor: Compressor,
                 digester: Digester, fs_version: int, aligned: bool, inline_meta: bool = False,
                 blob_toc: bool = False) -> None:
        if blob_toc and fs_version != 6:
            raise BuildError("--features blob-toc needs --fs-version 6")
        self._f = out
        self._hash = hashlib.sha256()
        self._stager = _Stager(out, self._hash)
        self.pos = 0
        self.blob_index = blob_index
        self.chunk_size = chunk_size
        self.compressor = Compressor(compressor)
        self.digester = Digester(digester)
        self.fs_version = fs_version
        self.aligned = aligned or fs_version == 6
        self.identity_layout = fs_version == 6 and self.compressor == Compressor.NONE
        self.inline_meta = inline_meta
        self.blob_toc = blob_toc
        self._ci: list[BlobChunkInfoV1] = []
        self._digests: list[bytes] = []
        self._next_uoff = 0
        self.data_size = 0
        self.uncompressed_size = 0
        self._toc: list[TocEntry] = []
        self._sealed = False
        self._ci_offset = 0
        self._ci_csize = 0
        self._ci_usize = 0
        self._ci_compressor = Compressor.NONE
        self._meta_end = 0
        self.bootstrap_offset: int | None = None
        self.toc_digest = b""
        self.toc_size = 0
        self.blob_id = ""
        self.size = 0

    # -- writing -----------------------------------------------------------------

    def _write(self, data: bytes | memoryview, *, hashed: bool = True) -> None:
        if not data:
            return
        if self._stager:
            self._stager.drain()
        self._f.write(data)
        if hashed:
            self._hash.update(data)
        self.pos += len(data)

    def _tar_header(self, name: str, size: int) -> bytes:
        raw = TarHeader.new(name, size).to_bytes()
        self._write(raw)
        return raw

    @property
    def chunk_count(self) -> int:
        return len(self._digests)

    def add_chunk(self, digest: bytes, stored: bytes | memoryview, compressed: bool,
                  uncompressed_size: int) -> ChunkInfo:
        """Append one chunk (already compressed or raw) and return its record."""
        if self._sealed:
            raise BuildError("internal: chunk added to a sealed blob")
        index = len(self._digests)
        if index >= MAX_CHUNKS_PER_BLOB:
            raise BuildError(f"a blob holds fewer than {MAX_CHUNKS_PER_BLOB} chunks; use a larger --chunk-size")
        uoff = _align4k(self._next_uoff) if self.aligned else self._next_uoff
        stager = self._stager
        if self.identity_layout:
            if compressed:
                raise BuildError("internal: compressed chunk in an identity-layout blob")
            pad = uoff - self.pos
            if not 0 <= pad < 4096:
                raise BuildError(f"internal: identity-layout blob at {self.pos:#x}, next chunk at {uoff:#x}")
            if pad:
                stager.write(_ZEROS[:pad])
                self.pos += pad
        coff = self.pos
        stager.write(stored)
        self.pos += len(stored)
        self._next_uoff = uoff + uncompressed_size
        self._digests.append(digest)
        if self.fs_version == 6:
            self._ci.append(BlobChunkInfoV1.new(coff, len(stored), uoff, uncompressed_size))
        return ChunkInfo(digest=digest, blob_index=self.blob_index, index=index,
                         flags=int(ChunkFlags.COMPRESSED) if compressed else 0,
                         compressed_offset=coff, compressed_size=len(stored),
                         uncompressed_offset=uoff, uncompressed_size=uncompressed_size, file_offset=0)

    def seal(self) -> None:
        """End the chunk data and write everything that follows it except the bootstrap and ToC."""
        if self._sealed:
            return
        self._sealed = True
        self._stager.drain()   # the chunk data is complete (and any write error reported) here
        self.uncompressed_size = _align4k(self._next_uoff) if self.aligned else self._next_uoff
        if self.identity_layout:
            self._write(b"\0" * (self.uncompressed_size - self.pos))
        self.data_size = self.pos
        tar_headers = self.inline_meta or self.blob_toc
        if tar_headers:
            self._tar_header("image.blob", self.data_size)
            if self.blob_toc:
                # The digest covers the data *and* its tar header (rafs-format.md §3.7).
                self._toc.append(self._toc_entry("image.blob", Compressor.NONE, self._hash.digest(), 0,
                                                 self.data_size, self.uncompressed_size))
        if self.fs_version == 6 and self._digests:
            self._write_ci(tar_headers)
        self._meta_end = self.pos

    def _write_ci(self, tar_headers: bool) -> None:
        ci_raw = b"".join(e.to_bytes() for e in self._ci)
        stored, compressed = _compress(ci_raw, self.compressor)
        self._ci_compressor = self.compressor if compressed else Compressor.NONE
        self._ci_offset = self.pos
        self._ci_csize = len(stored)
        self._ci_usize = len(ci_raw)
        header = BlobCompressionContextHeader(
            s_features=self.features,
            s_ci_compressor=int(self._ci_compressor),
            s_ci_entries=len(self._ci),
            s_ci_offset=self._ci_offset,
            s_ci_compressed_size=self._ci_csize,
            s_ci_uncompressed_size=self._ci_usize,
        ).to_bytes()
        self._write(stored)
        self._write(header)
        if tar_headers:
            self._tar_header("blob.meta", len(stored) + len(header))
        if self.blob_toc:
            self._toc.append(self._toc_entry("blob.meta", self._ci_compressor, hashlib.sha256(ci_raw).digest(),
                                             self._ci_offset, self._ci_csize, self._ci_usize))
            self._toc.append(self._toc_entry("blob.meta.header", Compressor.NONE, hashlib.sha256(header).digest(),
                                             self._ci_offset + self._ci_csize, len(header), len(header)))
            array = b"".join(self._digests)
            offset = self.pos
            self._write(array, hashed=False)
            self._tar_header("blob.digest", len(array))
            self._toc.append(self._toc_entry("blob.digest", Compressor.NONE, hashlib.sha256(array).digest(),
                                             offset, len(array), len(array)))

    @staticmethod
    def _toc_entry(name: str, compression: Compressor, digest: bytes, offset: int, csize: int,
                   usize: int) -> TocEntry:
        return TocEntry(flags=_TOC_FLAGS[compression], name=name.encode("ascii"), uncompressed_digest=digest,
                        compressed_offset=offset, compressed_size=csize, uncompressed_size=usize)

    def write_bootstrap(self, bootstrap: bytes) -> None:
        """Inline the bootstrap (zstd-compressed with blob-toc, raw otherwise) after the blob meta."""
        if not self.inline_meta or not self._sealed or self.bootstrap_offset is not None:
            raise BuildError("internal: write_bootstrap out of order")
        self.bootstrap_offset = self.pos
        compression = Compressor.NONE
        stored = bootstrap
        if self.blob_toc:
            stored, packed = _compress(bootstrap, Compressor.ZSTD)
            compression = Compressor.ZSTD if packed else Compressor.NONE
        self._write(stored)
        self._tar_header("image.boot", len(stored))
        if self.blob_toc:
            self._toc.append(self._toc_entry("image.boot", compression, hashlib.sha256(bootstrap).digest(),
                                             self.bootstrap_offset, len(stored), len(bootstrap)))

    def finish(self) -> str:
        """Write the ToC (blob-toc), flush, and return the blob id (sha256 hex, rafs-format.md §3.8)."""
        if not self._sealed:
            self.seal()
        self._stager.drain()
        if self.inline_meta and self.bootstrap_offset is None:
            raise BuildError("internal: inline-meta blob finished without its bootstrap")
        if self.blob_toc:
            toc = TocEntryList(self._toc).to_bytes()
            self._write(toc)
            header = self._tar_header("rafs.blob.toc", len(toc))
            self.toc_digest = hashlib.sha256(toc + header).digest()
            self.toc_size = len(toc) + len(header)
        self._f.flush()
        self.size = self.pos
        self.blob_id = self._hash.hexdigest()
        return self.blob_id

    def close(self) -> None:
        """Stop the helper thread (waiting for a write in progress); idempotent."""
        self._stager.close()

    # -- description -------------------------------------------------------------

    @property
    def features(self) -> int:
        f = BlobFeatures.CAP_TAR_TOC
        if self.aligned:
            f |= BlobFeatures.ALIGNED
        if self.inline_meta:
            f |= BlobFeatures.INLINED_FS_META | BlobFeatures.HAS_TAR_HEADER
        if self.blob_toc:
            f |= BlobFeatures.HAS_TOC | BlobFeatures.HAS_TAR_HEADER
            if self._digests:
                f |= BlobFeatures.INLINED_CHUNK_DIGEST
        return int(f)

    def info(self, blob_id: str, index: int) -> BlobInfo:
        """The blob-table description of this blob as blob ``index``.

        Before :meth:`finish` (an inlined bootstrap describes its own blob)
        ``compressed_size`` is where the bootstrap starts and there is no ToC
        digest yet; afterwards it is the whole file.
        """
        finished = bool(self.blob_id)
        return BlobInfo(
            index=index,
            blob_id=blob_id,
            chunk_count=self.chunk_count,
            chunk_size=self.chunk_size,
            compressor=self.compressor,
            digester=self.digester,
            features=self.features,
            compressed_size=self.size if finished else self.pos,
            uncompressed_size=self.uncompressed_size,
            ci_compressor=self._ci_compressor,
            ci_offset=self._ci_offset,
            ci_compressed_size=self._ci_csize,
            ci_uncompressed_size=self._ci_usize,
            blob_toc_size=self.toc_size if finished and not self.inline_meta else 0,
            blob_toc_digest=self.toc_digest if finished and not self.inline_meta else b"",
        )
