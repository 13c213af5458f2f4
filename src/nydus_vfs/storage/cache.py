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
  - ``<work_dir>/<blob_id>.blob.meta``: the blob's compression-context (ci)
    table, uncompressed, as nydusd writes it (rafs-format.md §3.9), for blobs
    that carry one (v6).  Filled from the backend in the background on the
    blob's first miss unless a valid one is there (the snapshotter may have
    put it); nothing here reads it back: it keeps the work dir
    interchangeable with nydusd's.

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

import asyncio
import logging
import os
import stat
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

from ..errors import ConfigError, FormatError, StorageError
from ..format.blob import BLOB_CCT_HEADER_SIZE, BlobCompressionContextHeader
from ..format.types import BlobFeatures, BlobInfo, ChunkInfo, Cipher, Compressor
from ..utils.compress import decompress
from ..utils.io import FileSegment
from ..utils.ratelog import LogLimiter
from ._chunkmap import IndexedChunkMap, MemoryChunkMap, open_regular
from .backend.base import check_blob_id

__all__ = ["CACHE_KINDS", "CacheSpec", "BlobCacheFile", "ChunkLRU"]

log = logging.getLogger("nydus_vfs.storage")
_limiter = LogLimiter(log)
_lseek = os.lseek
_SEEK_END = os.SEEK_END

# RAFS v6 caps a blob's uncompressed size at 2^44 (rafs-format.md §2.5).
_MAX_DATA_SIZE = 1 << 44
# Largest ci table accepted from a (possibly hostile) blob table entry.
_MAX_META = 64 << 20

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

    Raises ``StorageError`` when the files cannot be created or are not
    regular files.  A chunk map whose data file is missing or shorter than the
    blob is reset, since its "ready" bits would point at holes.

    Durability (crash-safe ordering): a stored chunk is first written with
    ``pwrite`` and kept in :attr:`unsynced` (served from there in this
    process); only after an ``fdatasync`` of the data file returned does its
    bit go into the persisted chunk map.  A crash at any point therefore
    loses at most the bits of chunks written since the last sync, never
    claims bytes that are not on disk.  The sync runs in a worker thread when
    an event loop is running (batched: after ``SYNC_CHUNKS`` chunks,
    ``SYNC_BYTES`` bytes or ``SYNC_DELAY`` seconds), inline otherwise, and
    always in :meth:`flush` / :meth:`close`.

    A full disk (or any write failure) makes caching of that chunk fail with
    one warning per episode; reads go on from the backend.  A data file found
    shorter than a chunk it is supposed to hold (truncated by someone else)
    is a miss: every chunk is forgotten and fetched again, with a warning
    naming the file.
    """

    SYNC_CHUNKS = 64
    SYNC_BYTES = 8 << 20
    SYNC_DELAY = 0.5

    __slots__ = ("blob_id", "data_path", "map_path", "meta_path", "fd", "size", "map", "closed", "unsynced",
                 "_unsynced_bytes", "_want", "_syncing", "_timer", "_write_error", "failed_writes",
                 "entries_count", "repairs", "_blob", "meta_wanted", "meta_task")

    def __init__(self, work_dir: str, blob: BlobInfo) -> None:
        self.blob_id = check_blob_id(blob.blob_id)
        self.data_path = os.path.join(work_dir, f"{blob.blob_id}.blob.data")
        self.map_path = self.data_path + ".chunk_map"
        self.meta_path = os.path.join(work_dir, f"{blob.blob_id}.blob.meta")
        self._blob = blob
        #: Whether :meth:`start_meta` should run (the blob has a ci table and no valid file is there).
        self.meta_wanted = _has_ci(blob) and not blob_meta_valid(self.meta_path, blob)
        self.meta_task: asyncio.Task | None = None
        self.closed = False
        #: Chunks written but not yet known durable: chunk index (or range) -> chunk.
        self.unsynced: dict[object, ChunkInfo] = {}
        self._unsynced_bytes = 0
        self._want = 0
        self._syncing = False
        self._timer: asyncio.TimerHandle | None = None
        self._write_error: str | None = None
        self.failed_writes = 0
        #: Chunks stored by this process (nydusd's ``entries_count``).
        self.entries_count = 0
        #: How often a shrunken data file was found and the map reset.
        self.repairs = 0
        self.fd = open_regular(self.data_path, "cache file")
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
        if end > self._want:
            self._want = end
        if end > self.size:
            try:
                os.ftruncate(self.fd, end)
            except OSError as exc:
                raise StorageError(f"cannot size cache file {self.data_path} to {end}: {exc.strerror}") from None
            self.size = end

    # -- reading --------------------------------------------------------------------
    def _key(self, chunk: ChunkInfo) -> object:
        return chunk.index if self.map.chunk_count else (chunk.uncompressed_offset, chunk.uncompressed_size)

    def is_cached(self, chunk: ChunkInfo) -> bool:
        """Whether ``chunk`` is in the cache (durably or written by this process); no I/O."""
        return self.map.is_ready(chunk) or (bool(self.unsynced) and self._key(chunk) in self.unsynced)

    def lookup(self, chunk: ChunkInfo, offset: int, length: int) -> FileSegment | None:
        """The cached range of ``chunk`` as a segment, or None when not cached.

        The data file's current size is checked so a file truncated behind our
        back is a miss and gets repaired, never a short read for the
        transport.  (``lseek(SEEK_END)`` costs a fifth of ``fstat`` in Python;
        nothing here uses the fd's file position: every access is positioned.)
        """
        if self.closed or (not self.map.is_ready(chunk)
                           and not (self.unsynced and self._key(chunk) in self.unsynced)):
            return None
        end = chunk.uncompressed_offset + chunk.uncompressed_size
        try:
            actual = _lseek(self.fd, 0, _SEEK_END)
        except OSError:  # closed
            return None
        if end <= actual:
            return FileSegment(self.fd, chunk.uncompressed_offset + offset, length)
        self._repair_shrunk(actual, end)
        return None

    def _repair_shrunk(self, actual: int, needed: int) -> None:
        self.repairs += 1
        _limiter.log(logging.WARNING, ("shrunk", self.data_path),
                     "cache file %s is %d bytes but holds a chunk ending at %d (was it truncated?); "
                     "forgetting its %d cached chunks and fetching them again from the backend",
                     self.data_path, actual, needed, self.map.ready_count + len(self.unsynced))
        self.map.reset()
        self.unsynced.clear()
        self._unsynced_bytes = 0
        self.size = actual
        try:
            self.grow(self._want)
        except StorageError as exc:
            log.warning("%s", exc)

    def read_chunk(self, chunk: ChunkInfo) -> bytes:
        """The whole cached chunk (for validation); raises ``StorageError`` on I/O failure."""
        try:
            return os.pread(self.fd, chunk.uncompressed_size, chunk.uncompressed_offset)
        except OSError as exc:
            raise StorageError(f"cannot read cache file {self.data_path}: {exc.strerror}") from None

    # -- writing --------------------------------------------------------------------
    def store(self, chunk: ChunkInfo, data: bytes) -> bool:
        """Write a *validated or trusted* chunk; False if it could not be kept.

        The chunk is readable from the cache at once; its map bit is set
        once the data is synced (see the class docstring).  A full disk or
        any other write failure is logged once per episode and otherwise
        ignored: the caller still has the bytes, only caching is lost.
        """
        if self.closed:
            return False
        end = chunk.uncompressed_offset + len(data)
        try:
            self.grow(end)
            written = os.pwrite(self.fd, data, chunk.uncompressed_offset)
        except OSError as exc:
            self._write_failed(chunk, exc.strerror or str(exc))
            return False
        except StorageError as exc:
            self._write_failed(chunk, str(exc))
            return False
        if written != len(data):
            self._write_failed(chunk, f"short write ({written} of {len(data)} bytes; disk full?)")
            return False
        self.entries_count += 1
        if not isinstance(self.map, IndexedChunkMap):
            self.map.set_ready(chunk)  # not persisted: nothing to order against
            self._recovered()
            return True
        self.unsynced[self._key(chunk)] = chunk
        self._unsynced_bytes += len(data)
        self._schedule_sync()
        return True

    def _recovered(self) -> None:
        if self._write_error is not None:
            log.info("caching in %s works again (%d chunks were not cached meanwhile)",
                     self.data_path, self.failed_writes)
            self._write_error = None
            self.failed_writes = 0

    def _write_failed(self, chunk: ChunkInfo, reason: str) -> None:
        self.failed_writes += 1
        if self._write_error is None:
            self._write_error = reason
            log.warning("cannot cache chunk %d of blob %s in %s: %s; reading from the backend "
                        "without caching until writes succeed again", chunk.index, self.blob_id,
                        self.data_path, reason)

    def _schedule_sync(self) -> None:
        if self._syncing or not self.unsynced:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()  # no loop: nothing to keep responsive, make it durable now
            return
        if len(self.unsynced) >= self.SYNC_CHUNKS or self._unsynced_bytes >= self.SYNC_BYTES:
            self._start_sync(loop)
        elif self._timer is None:
            self._timer = loop.call_later(self.SYNC_DELAY, self._on_timer, loop)

    def _on_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        if not self.closed and not self._syncing and self.unsynced:
            self._start_sync(loop)

    def _start_sync(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch = list(self.unsynced.items())
        self._syncing = True
        try:
            future = loop.run_in_executor(None, os.fdatasync, self.fd)
        except RuntimeError:  # executor shut down (loop closing): sync here
            self._syncing = False
            self.flush()
            return
        future.add_done_callback(lambda f: self._synced(batch, f))

    def _synced(self, batch: list, future: asyncio.Future) -> None:
        self._syncing = False
        if self.closed:
            return  # close() synced and marked everything itself
        exc = future.exception() if not future.cancelled() else OSError("sync cancelled")
        self._commit(batch, exc)
        self._schedule_sync()

    def _commit(self, batch: list, exc: BaseException | None) -> None:
        """Set the map bits of ``batch`` after a sync (or forget the chunks if it failed)."""
        for key, chunk in batch:
            if self.unsynced.get(key) is not chunk:
                continue  # invalidated or repaired meanwhile
            del self.unsynced[key]
            self._unsynced_bytes -= chunk.uncompressed_size
            if exc is None:
                try:
                    self.map.set_ready(chunk)
                except StorageError as bad:  # a record the map cannot hold: never claim it
                    log.warning("%s", bad)
        if exc is None and batch:
            self._recovered()
        if not self.unsynced:
            self._unsynced_bytes = 0
        if exc is not None:
            reason = getattr(exc, "strerror", None) or str(exc)
            self.failed_writes += len(batch)
            if self._write_error is None:
                self._write_error = reason
                log.warning("cannot sync cache file %s (%s): %d chunks not kept; reading from the "
                            "backend without caching until writes succeed again",
                            self.data_path, reason, len(batch))

    def flush(self) -> None:
        """Sync the data file now and record every chunk written so far in the chunk map."""
        if self.closed or not self.unsynced:
            return
        batch = list(self.unsynced.items())
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            self._commit(batch, exc)
            return
        self._commit(batch, None)

    def invalidate(self, chunk: ChunkInfo) -> None:
        if not self.closed:
            dropped = self.unsynced.pop(self._key(chunk), None)
            if dropped is not None:
                self._unsynced_bytes -= dropped.uncompressed_size
            self.map.clear(chunk)

    @property
    def all_ready(self) -> bool:
        """Whether every chunk of the blob is durably cached."""
        return self.map.all_ready

    # -- the blob meta file ------------------------------------------------------------
    def start_meta(self, backend) -> None:
        """Fill ``<blob_id>.blob.meta`` from ``backend`` in a background task, once."""
        if not self.meta_wanted or self.closed:
            return
        self.meta_wanted = False
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self.meta_task = loop.create_task(self._fill_meta(backend), name=f"blob-meta {self.blob_id}")

    async def _fill_meta(self, backend) -> None:
        try:
            await fill_blob_meta(self.meta_path, self._blob, backend)
        except Exception as exc:  # noqa: BLE001 - a missing meta file costs nothing here
            log.warning("cannot write blob meta %s: %s", self.meta_path, exc)

    def close(self) -> None:
        if self.closed:
            return
        if self.meta_task is not None and not self.meta_task.done():
            self.meta_task.cancel()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()
        self.closed = True
        self.map.close()
        os.close(self.fd)


def _has_ci(blob: BlobInfo) -> bool:
    return blob.ci_compressed_size > 0 and blob.ci_uncompressed_size > 0 and blob.cipher == Cipher.NONE


def _align4k(n: int) -> int:
    return (n + 4095) & ~4095


def blob_meta_valid(path: str, blob: BlobInfo) -> bool:
    """Whether ``path`` holds the blob meta file of ``blob`` (size and header checked)."""
    try:
        size = os.stat(path).st_size
        if size != _align4k(blob.ci_uncompressed_size) + BLOB_CCT_HEADER_SIZE:
            return False
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return False
            raw = os.pread(fd, BLOB_CCT_HEADER_SIZE, size - BLOB_CCT_HEADER_SIZE)
        finally:
            os.close(fd)
        BlobCompressionContextHeader.from_bytes(raw).validate(blob)
    except (OSError, FormatError):
        return False
    return True


async def fill_blob_meta(path: str, blob: BlobInfo, backend) -> None:
    """Fetch ``blob``'s ci table and header and write ``path`` (rafs-format.md §3.9).

    The file appears complete or not at all (written beside, synced, renamed).
    Raises ``BackendError``, ``FormatError`` (the blob's header does not match
    its table entry), ``ChunkCorruptError`` (cannot decompress) or ``OSError``.
    """
    csize, usize = blob.ci_compressed_size, blob.ci_uncompressed_size
    if usize > _MAX_META or csize > _MAX_META:
        raise FormatError("RafsV6Blob", "ci_uncompressed_size", usize, f"ci tables above {_MAX_META} bytes refused")
    raw = await backend.read(blob.blob_id, blob.ci_offset, csize + BLOB_CCT_HEADER_SIZE)
    header_bytes = raw[csize:]
    BlobCompressionContextHeader.from_bytes(header_bytes).validate(blob)
    ci = raw[:csize] if blob.ci_compressor == Compressor.NONE else decompress(raw[:csize], blob.ci_compressor, usize)
    if len(ci) != usize:
        raise FormatError("blob.meta", "ci area", len(ci), f"expected {usize} bytes")
    body = bytes(ci) + bytes(_align4k(usize) - usize) + bytes(header_bytes)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        view = memoryview(body)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)


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

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

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
