"""Where decoded chunk bytes are kept between reads.

* :class:`CacheSpec` is the cache part of a mount's config (``blobcache`` /
  ``filecache`` are synonyms for the local file cache; ``dummycache`` or ``""``
  keep nothing on disk).
* :class:`BlobCacheFile` is the file cache of one blob in a work dir, laid out
  like nydusd's so a work dir stays interchangeable and the snapshotter's
  garbage collector finds the files by name:

  - ``<work_dir>/<blob_id>.blob.data``: the blob's *uncompressed* layout, sparse;
    chunk ``k`` lives at its ``uncompressed_offset``, gaps are holes.  It is
    sized to the blob's uncompressed size when the image says it, else grown
    to the end of the furthest chunk stored (v5 images without the extended
    blob table).
  - ``<work_dir>/<blob_id>.blob.data.chunk_map``: which chunks are present
    (see ``_chunkmap``).

  Hits are returned as :class:`~nydus_vfs.utils.io.FileSegment` into the data
  file, so the transport copies them to the guest without Python touching
  the bytes.
* :class:`ChunkLRU` is a small in-memory cache of decoded chunks used when
  there is no file cache, so a sequential reader of a compressed file does not
  decompress the same chunk once per 128 KiB request.

Nothing here decides *whether* bytes are good: the blob device validates
before it stores, and never stores data that failed a check.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

from ..errors import ConfigError, StorageError
from ..format.types import BlobFeatures, BlobInfo, ChunkInfo
from ..utils.io import FileSegment
from ._chunkmap import IndexedChunkMap, MemoryChunkMap
from .backend.base import check_blob_id

__all__ = ["CACHE_KINDS", "CacheSpec", "BlobCacheFile", "ChunkLRU"]

log = logging.getLogger("nydus_vfs.storage")

# RAFS v6 caps a blob's uncompressed size at 2^44 (reference §2.5).
_MAX_DATA_SIZE = 1 << 44

#: Accepted ``cache.type`` values (nydusd rejects anything else, ``dummy`` included).
CACHE_KINDS = ("blobcache", "filecache", "dummycache", "")


@dataclass(frozen=True, slots=True)
class CacheSpec:
    """How a mount caches chunk data.

    ``kind`` is one of :data:`CACHE_KINDS`; ``blobcache``/``filecache`` need
    ``work_dir`` (the config layer applies nydusd's default of ``.``; the blob
    layer creates the directory if missing).  ``validate`` re-checks every
    chunk read back from the cache file against its digest (and makes hits
    come back as bytes, not file segments).  Raises ``ConfigError``.
    """

    kind: str = ""
    work_dir: str | None = None
    validate: bool = False

    def __post_init__(self) -> None:
        if self.kind == "fscache":
            raise ConfigError("cache.type 'fscache' is served by the kernel, not by the blob layer")
        if self.kind not in CACHE_KINDS:
            raise ConfigError(f"cache.type {self.kind!r} is not one of blobcache, filecache, dummycache or ''")
        if self.persistent and not self.work_dir:
            raise ConfigError(f"cache.type {self.kind!r} needs a work_dir")

    @property
    def persistent(self) -> bool:
        """True for the local file cache kinds."""
        return self.kind in ("blobcache", "filecache")


def _needs_memory_map(blob: BlobInfo) -> bool:
    # Without a trustworthy chunk count the chunk ``index`` fields of v5 images
    # cannot key a bitmap (pre-2.0 builders wrote 0 everywhere).
    return blob.chunk_count <= 0 or bool(blob.features & BlobFeatures.V5_NO_EXT_BLOB_TABLE)


class BlobCacheFile:
    """The file cache of one blob: data file plus chunk map (see the module docstring).

    Raises ``StorageError`` when the files cannot be created.  A chunk map
    whose data file is missing or shorter than the blob is reset, since its
    "ready" bits would point at holes.
    """

    __slots__ = ("blob_id", "data_path", "map_path", "fd", "size", "map", "closed")

    def __init__(self, work_dir: str, blob: BlobInfo) -> None:
        self.blob_id = check_blob_id(blob.blob_id)
        self.data_path = os.path.join(work_dir, f"{blob.blob_id}.blob.data")
        self.map_path = self.data_path + ".chunk_map"
        self.closed = False
        try:
            self.fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StorageError(f"cannot open cache file {self.data_path}: {exc.strerror}") from None
        try:
            found = os.fstat(self.fd).st_size
            self.size = found
            self.grow(blob.uncompressed_size)
            self.map: IndexedChunkMap | MemoryChunkMap = (
                MemoryChunkMap() if _needs_memory_map(blob) else IndexedChunkMap(self.map_path, blob.chunk_count)
            )
        except BaseException:
            os.close(self.fd)
            raise
        if self.map.ready_count and (found == 0 or found < blob.uncompressed_size):
            log.warning("cache data %s is missing or truncated (%d bytes, blob is %d); "
                        "forgetting its %d cached chunks", self.data_path, found,
                        blob.uncompressed_size, self.map.ready_count)
            self.map.reset()

    def incompatible(self, blob: BlobInfo) -> str | None:
        """Why another image's description of this blob cannot share this cache file, or None.

        Sharing is refused when the chunk map is indexed and the image either
        has a different chunk count or cannot be trusted with chunk indexes:
        reopening the map with another size would corrupt it for its users.
        """
        if isinstance(self.map, IndexedChunkMap):
            if _needs_memory_map(blob):
                return "this image does not record the blob's chunk count"
            if blob.chunk_count != self.map.chunk_count:
                return (f"this image says {blob.chunk_count} chunks, "
                        f"the open cache has {self.map.chunk_count}")
        return None

    def grow(self, end: int) -> None:
        """Make the data file at least ``end`` bytes (sparse); ``StorageError`` past 2^44."""
        if end > _MAX_DATA_SIZE:
            raise StorageError(f"blob {self.blob_id}: uncompressed size {end} exceeds the RAFS limit")
        if end > self.size:
            try:
                os.ftruncate(self.fd, end)
            except OSError as exc:
                raise StorageError(f"cannot size cache file {self.data_path} to {end}: {exc.strerror}") from None
            self.size = end

    def lookup(self, chunk: ChunkInfo, offset: int, length: int) -> FileSegment | None:
        """The cached range of ``chunk`` as a segment, or None when not cached."""
        if self.map.is_ready(chunk) and chunk.uncompressed_offset + chunk.uncompressed_size <= self.size:
            return FileSegment(self.fd, chunk.uncompressed_offset + offset, length)
        return None

    def read_chunk(self, chunk: ChunkInfo) -> bytes:
        """The whole cached chunk (for validation); raises ``StorageError`` on I/O failure."""
        try:
            return os.pread(self.fd, chunk.uncompressed_size, chunk.uncompressed_offset)
        except OSError as exc:
            raise StorageError(f"cannot read cache file {self.data_path}: {exc.strerror}") from None

    def store(self, chunk: ChunkInfo, data: bytes) -> bool:
        """Write a *validated or trusted* chunk and mark it ready; False if it could not be kept.

        A full disk or any other write failure is logged and otherwise ignored:
        the caller still has the bytes, only caching is lost.
        """
        if self.closed:
            return False
        end = chunk.uncompressed_offset + len(data)
        try:
            self.grow(end)
            written = os.pwrite(self.fd, data, chunk.uncompressed_offset)
        except (OSError, StorageError) as exc:
            log.warning("cannot cache chunk %d of blob %s in %s: %s", chunk.index, self.blob_id,
                        self.data_path, exc)
            return False
        if written != len(data):
            log.warning("short write caching chunk %d of blob %s in %s (%d of %d bytes)",
                        chunk.index, self.blob_id, self.data_path, written, len(data))
            return False
        self.map.set_ready(chunk)
        return True

    def invalidate(self, chunk: ChunkInfo) -> None:
        if not self.closed:
            self.map.clear(chunk)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.map.close()
        os.close(self.fd)


class ChunkLRU:
    """Decoded chunks in memory, least recently used evicted first, bounded in bytes.

    Entries are ``(data, validated)``: ``validated`` says whether the bytes
    were checked against their digest, so a device that validates can still
    use an entry stored by one that does not (after checking it itself).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = 0
        self._entries: OrderedDict[Hashable, tuple[bytes, bool]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> tuple[bytes, bool] | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: Hashable, data: bytes, validated: bool) -> None:
        if len(data) > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.used -= len(old[0])
        self._entries[key] = (data, validated)
        self.used += len(data)
        while self.used > self.max_bytes:
            _, (evicted, _) = self._entries.popitem(last=False)
            self.used -= len(evicted)

    def discard(self, key: Hashable) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.used -= len(entry[0])

    def discard_prefix(self, prefix: Hashable) -> None:
        """Drop every entry whose key is ``(prefix, ...)``."""
        for key in [k for k in self._entries if k[0] == prefix]:
            self.used -= len(self._entries.pop(key)[0])
