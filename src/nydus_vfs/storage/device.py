"""The chunk data path: from ``(ChunkInfo, offset, length)`` to bytes or file segments.

Shape (like nydusd's ``BlobDevice`` over per-blob caches):

* One :class:`BlobLayer` per daemon.  It owns per-blob state keyed by
  ``(backend identity, cache work dir, blob id)``, so every mount of images
  that share a blob, configured alike, shares one cache file, one in-memory
  LRU slice and one in-flight fetch per chunk: each chunk comes from the
  backend once.
* One :class:`BlobDevice` per RAFS instance (:meth:`BlobLayer.open_device`).
  It maps ``ChunkInfo.blob_index`` to the image's blob table, holds the mount's
  backend and validation settings, and releases its blob states on
  :meth:`BlobDevice.close` (the state goes with its last user).

Per chunk, a miss runs the decode pipeline once (single flight): read
``compressed_size`` bytes at ``compressed_offset`` -> (decrypt: not supported
yet) -> decompress with the *blob's* compressor if the chunk is compressed ->
check the size -> if validating, check CRC-32C when the chunk has one, else the
digest under the blob's digester -> store (file cache or LRU) -> serve.  Bad
data raises :class:`~nydus_vfs.errors.ChunkCorruptError` and is never stored.

Logging of failures: a failed chunk is logged here, once per (blob, chunk,
reason) and rate-limited with a count (``utils.ratelog``); the exception then
carries ``logged = True`` so the filesystem layer does not log it again.  A
cache problem that is repaired (bad or missing cached bytes fetched again) is
a WARNING, a chunk that cannot be served an ERROR.

Hot path: a warm file-cache read returns :class:`FileSegment` objects after a
few dict/list lookups and a bit test, without any ``await`` that suspends, so
the FUSE server can complete it without scheduling.  With a local backend
(``supports_sync``) even a cold read completes without suspending.

Merged fetches: :meth:`BlobDevice.fetch_chunks` (the prefetch engine) and a
foreground miss with ``amplify_io`` lead the single flights of several chunks
at once and fetch neighbouring ones (by compressed offset, gaps up to 128 KiB
read over) in one backend request; a foreground read of any of them waits for
that request.  Amplification follows the blob order the filesystem supplies
(:attr:`BlobDevice.blob_order`), else the file's own chunk list.

Holes: a ``ChunkInfo`` with ``blob_index == -1`` (the v6 hole convention:
no blob, ``uncompressed_size`` = bytes of the file it covers) reads as zeros.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field

from ..errors import ChunkCorruptError, ConfigError, StorageError
from ..format.types import BlobFeatures, BlobInfo, ChunkFlags, ChunkInfo, Cipher
from ..utils.compress import decompress
from ..utils.digest import crc32c, digest_bytes
from ..utils.io import FileSegment
from ..utils.ratelog import LogLimiter
from ._singleflight import SingleFlight
from .backend.base import BlobBackend
from .cache import BlobCacheFile, CacheSpec, ChunkLRU

__all__ = [
    "MAX_CHUNK_SIZE",
    "HOLE_BLOB_INDEX",
    "IoVec",
    "BlobLayer",
    "BlobDevice",
    "BlobCacheMetrics",
    "FetchStats",
    "check_chunk",
    "decode_chunk",
    "verify_chunk",
]

log = logging.getLogger("nydus_vfs.storage")

#: Largest chunk RAFS allows (rafs-format.md §0.6).
MAX_CHUNK_SIZE = 16 << 20
#: ``ChunkInfo.blob_index`` of a hole: no blob, reads as zeros.
HOLE_BLOB_INDEX = -1
# A chunk's uncompressed end must stay below this (v6 blob limit 2^44, rafs-format.md §2.5).
_MAX_UNCOMPRESSED_END = 1 << 44
# Headroom over MAX_CHUNK_SIZE for compressed sizes (incompressible data is
# stored raw, so this only matters for hostile metadata).
_MAX_COMPRESSED_SIZE = MAX_CHUNK_SIZE + 4096
# Plain ints: ``int & IntFlag`` goes through the enum's __rand__, which costs
# about a microsecond on the per-chunk path.
_COMPRESSED = int(ChunkFlags.COMPRESSED)
_ENCRYPTED = int(ChunkFlags.ENCRYPTED)
_BATCH = int(ChunkFlags.BATCH)
_HAS_CRC32 = int(ChunkFlags.HAS_CRC32)
_ZRAN = int(BlobFeatures.ZRAN)
_UNSUPPORTED_FLAGS = _ENCRYPTED | _BATCH
_ZERO_DIGEST = bytes(32)
_DEFAULT_LRU_BYTES = 64 << 20
# Bytes of other chunks a merged backend request may read over rather than
# split in two (chunks already cached or fetched by someone else).
_MAX_MERGE_GAP = 128 << 10
# Merged local reads larger than this go to a worker thread.
_INLINE_READ_MAX = 1 << 20
# Chunks of a merged run decoded between two yields to the event loop.
_DECODE_BATCH = 8
# Merged runs of at least this many uncompressed bytes are decoded in a worker thread.
_THREAD_DECODE_MIN = 512 << 10

#: One element of a read request: the chunk, the offset inside its
#: uncompressed data, and how many bytes from there.
IoVec = tuple[ChunkInfo, int, int]


# -- the per-chunk pipeline (pure functions over bytes) ---------------------------

def _where(blob: BlobInfo, chunk: ChunkInfo) -> str:
    return (f"blob {blob.blob_id} chunk {chunk.index} (compressed {chunk.compressed_offset:#x}"
            f"+{chunk.compressed_size}, uncompressed {chunk.uncompressed_offset:#x}+{chunk.uncompressed_size})")


def check_chunk(blob: BlobInfo, chunk: ChunkInfo) -> None:
    """Refuse a chunk record this layer cannot or must not serve, before any I/O.

    Raises ``StorageError`` naming the blob, chunk and field: sizes outside
    RAFS limits (so hostile metadata cannot make us allocate gigabytes),
    uncompressed chunks whose two sizes differ, and features not supported yet
    (encryption, batch chunks, ZRAN blobs).
    """
    usize = chunk.uncompressed_size
    csize = chunk.compressed_size
    if chunk.flags & _UNSUPPORTED_FLAGS or blob.cipher != Cipher.NONE or blob.features & _ZRAN:
        what = ("encrypted" if chunk.flags & _ENCRYPTED or blob.cipher != Cipher.NONE
                else "batch" if chunk.flags & _BATCH else "ZRAN (gzip random access)")
        raise StorageError(f"{_where(blob, chunk)}: {what} chunks are not supported yet")
    if not 0 < usize <= MAX_CHUNK_SIZE:
        raise StorageError(f"{_where(blob, chunk)}: uncompressed_size {usize} outside 1..{MAX_CHUNK_SIZE}")
    if not 0 < csize <= _MAX_COMPRESSED_SIZE:
        raise StorageError(f"{_where(blob, chunk)}: compressed_size {csize} outside 1..{_MAX_COMPRESSED_SIZE}")
    if not chunk.flags & _COMPRESSED and csize != usize:
        raise StorageError(f"{_where(blob, chunk)}: uncompressed chunk with compressed_size {csize} "
                           f"!= uncompressed_size {usize}")
    if chunk.compressed_offset < 0 or chunk.uncompressed_offset < 0 \
            or chunk.uncompressed_offset + usize > _MAX_UNCOMPRESSED_END:
        raise StorageError(f"{_where(blob, chunk)}: offsets out of range")


def _corrupt(blob: BlobInfo, chunk: ChunkInfo, what: str, expected: str | None = None,
             actual: str | None = None) -> ChunkCorruptError:
    msg = f"{_where(blob, chunk)}: {what}"
    if expected is not None:
        msg += f": expected {expected}, got {actual}"
    err = ChunkCorruptError(msg)
    err.blob_id = blob.blob_id
    err.chunk_index = chunk.index
    err.expected = expected
    err.actual = actual
    return err


def verify_chunk(data: bytes, blob: BlobInfo, chunk: ChunkInfo) -> None:
    """Check decoded ``data`` against the chunk's CRC-32C (preferred, as nydusd) or digest.

    A chunk without a CRC and with an empty or all-zero digest (tarfs,
    external blobs) has nothing to check against and passes.  Raises
    ``ChunkCorruptError`` with both values in hex (the device logs it).
    """
    if chunk.flags & _HAS_CRC32:
        actual_crc = crc32c(data)
        if actual_crc != chunk.crc32:
            raise _corrupt(blob, chunk, "CRC-32C mismatch", f"{chunk.crc32:08x}", f"{actual_crc:08x}")
        return
    expected = chunk.digest
    if not expected or expected == _ZERO_DIGEST:
        return
    actual = digest_bytes(blob.digester, data)
    if actual != expected:
        raise _corrupt(blob, chunk, f"{blob.digester.cli_name} digest mismatch", expected.hex(), actual.hex())


def decode_chunk(raw: bytes, blob: BlobInfo, chunk: ChunkInfo, validate: bool) -> bytes:
    """Turn the stored bytes of a checked chunk into its uncompressed data.

    ``raw`` is what the backend returned for ``compressed_size`` bytes at
    ``compressed_offset``; :func:`check_chunk` must have accepted the chunk.
    Raises ``ChunkCorruptError`` (the device logs it).
    """
    if chunk.flags & _COMPRESSED:
        try:
            data = decompress(raw, blob.compressor, chunk.uncompressed_size)
        except ChunkCorruptError as exc:
            raise _corrupt(blob, chunk, f"cannot decompress ({exc})") from None
    else:
        data = raw
        if len(data) != chunk.uncompressed_size:
            raise _corrupt(blob, chunk, "size mismatch", str(chunk.uncompressed_size), str(len(data)))
    if validate:
        verify_chunk(data, blob, chunk)
    return data


# -- shared per-blob state --------------------------------------------------------

class _BlobState:
    """Everything shared by the devices that use one blob through one backend and cache."""

    __slots__ = ("key", "blob_id", "users", "flights", "cache", "verified")

    def __init__(self, key: Hashable, blob_id: str, cache: BlobCacheFile | None) -> None:
        self.key = key
        self.blob_id = blob_id
        self.users = 0
        self.flights: SingleFlight[tuple[bytes, bool]] = SingleFlight()
        self.cache = cache
        # Uncompressed offsets of cached chunks checked against their digest in
        # this process: a validating device serves them zero-copy afterwards.
        # (uncompressed_offset, digest): a record at the same offset with another
        # digest is a different chunk and must be checked on its own.
        self.verified: set[tuple[int, bytes]] = set()


@dataclass(slots=True)
class BlobCacheMetrics:
    """Per-device counters, named as nydusd's ``/api/v1/metrics/blobcache``.

    ``total`` counts reads, ``whole_hits`` reads served entirely without a
    fetch, ``partial_hits`` chunk pieces served from the cache.  The
    ``prefetch_*`` counters are kept by the prefetch engine
    (``fs.prefetch``): bytes and merged backend requests it fetched, how many
    workers it ran, how many chunks went into those requests, and when it
    began and ended.  :meth:`BlobDevice.metrics_json` adds the live values
    (entries, all-ready, buffered bytes) and renders nydusd's JSON.
    """

    store_path: str = ""
    underlying_files: list[str] = field(default_factory=list)
    total: int = 0
    whole_hits: int = 0
    partial_hits: int = 0
    prefetch_data_amount: int = 0
    prefetch_requests_count: int = 0
    prefetch_workers: int = 0
    prefetch_unmerged_chunks: int = 0
    prefetch_cumulative_time_millis: int = 0
    prefetch_begin_time_secs: int = 0
    prefetch_begin_time_millis: int = 0
    prefetch_end_time_secs: int = 0
    prefetch_end_time_millis: int = 0


@dataclass(slots=True)
class FetchStats:
    """What :meth:`BlobDevice.fetch_chunks` did: backend requests, bytes read, chunks stored."""

    requests: int = 0
    bytes: int = 0
    chunks: int = 0
    errors: list = field(default_factory=list)


def _decode_one(raw: bytes, start: int, chunk: ChunkInfo, blob: BlobInfo,
                validate: bool) -> bytes | ChunkCorruptError:
    lo = chunk.compressed_offset - start
    try:
        return decode_chunk(raw[lo:lo + chunk.compressed_size], blob, chunk, validate)
    except ChunkCorruptError as exc:
        return exc


def _decode_run(raw: bytes, start: int, chunks: list[ChunkInfo], blob: BlobInfo,
                validate: bool) -> list[bytes | ChunkCorruptError]:
    """Decode every chunk of a merged request (run in a worker thread); errors are returned."""
    return [_decode_one(raw, start, c, blob, validate) for c in chunks]


def _merge_runs(claimed: list, max_size: int) -> list[list]:
    """Split ``(chunk, token)`` pairs into runs, each fetched by one backend request.

    Sorted by compressed offset; a run grows while the next chunk starts at
    most ``_MAX_MERGE_GAP`` bytes after the run's end and the run stays within
    ``max_size`` bytes (a single chunk larger than that is a run of its own).
    """
    ordered = sorted(claimed, key=lambda item: item[0].compressed_offset)
    runs: list[list] = []
    run: list = []
    run_start = run_end = 0
    for item in ordered:
        c = item[0]
        c_end = c.compressed_offset + c.compressed_size
        if run and (c.compressed_offset - run_end > _MAX_MERGE_GAP
                    or max(run_end, c_end) - run_start > max_size):
            runs.append(run)
            run = []
        if not run:
            run_start, run_end = c.compressed_offset, c_end
        run.append(item)
        run_end = max(run_end, c_end)
    if run:
        runs.append(run)
    return runs


class BlobLayer:
    """The daemon-wide owner of blob cache state; see the module docstring.

    ``memory_cache_bytes`` bounds the LRU of decoded chunks used by devices
    without a file cache.
    """

    def __init__(self, *, memory_cache_bytes: int = _DEFAULT_LRU_BYTES) -> None:
        self._states: dict[Hashable, _BlobState] = {}
        # One open cache file per (work dir, blob id) in this process, whatever
        # the backend: two chunk maps over one file would fight over its size.
        self._files: dict[tuple[str, str], list] = {}
        self._lru = ChunkLRU(memory_cache_bytes)

    def __len__(self) -> int:
        """Number of blob states alive (each shared by one or more devices)."""
        return len(self._states)

    def open_device(self, blobs: Sequence[BlobInfo], backend: BlobBackend, cache: CacheSpec,
                    digest_validate: bool = False, *, amplify_io: int = 0) -> "BlobDevice":
        """A device serving the chunks of an image whose blob table is ``blobs``.

        ``amplify_io`` (v1 ``amplify_io``, v2 ``rafs.batch_size``; 0 = off) lets a
        foreground miss fetch the missing chunks that follow it in the file, of
        the same blob, in the same backend request, up to that many bytes.

        ``blobs[i].index`` must be ``i`` (chunks name their blob by that index).
        Creates the cache work dir if needed.  Raises ``StorageError`` when the
        cache files cannot be set up, ``ConfigError`` for an unusable work dir;
        nothing stays acquired on failure.
        """
        work_dir = None
        if cache.persistent and cache.work_dir:  # CacheSpec guarantees a work_dir for these
            work_dir = _prepare_work_dir(cache.work_dir)
        states: list[_BlobState] = []
        try:
            for position, blob in enumerate(blobs):
                if blob.index != position:
                    raise StorageError(f"blob table entry {position} ({blob.blob_id}) says index {blob.index}")
                states.append(self._acquire(backend, work_dir, blob))
        except BaseException:
            for state in states:
                self._release(state)
            raise
        return BlobDevice(self, list(blobs), states, backend, cache, digest_validate, store_path=work_dir or "",
                          amplify_io=amplify_io)

    def _acquire(self, backend: BlobBackend, work_dir: str | None, blob: BlobInfo) -> _BlobState:
        if work_dir is not None:
            entry = self._files.get((work_dir, blob.blob_id))
            reason = entry[0].incompatible(blob) if entry is not None else None
            if reason is not None:
                log.warning("blob %s: this image reads it without the file cache in %s: %s",
                            blob.blob_id, work_dir, reason)
                work_dir = None
        key = (backend.identity, work_dir, blob.blob_id)
        state = self._states.get(key)
        if state is None:
            cache_file = self._open_file(work_dir, blob) if work_dir is not None else None
            state = _BlobState(key, blob.blob_id, cache_file)
            self._states[key] = state
        elif state.cache is not None:
            # Another image may know the blob's size when the first did not (v5).
            state.cache.grow(blob.uncompressed_size)
        state.users += 1
        return state

    def _open_file(self, work_dir: str, blob: BlobInfo) -> BlobCacheFile:
        entry = self._files.get((work_dir, blob.blob_id))
        if entry is None:
            entry = self._files[(work_dir, blob.blob_id)] = [BlobCacheFile(work_dir, blob), 0]
        else:
            entry[0].grow(blob.uncompressed_size)
        entry[1] += 1
        return entry[0]

    def _release(self, state: _BlobState) -> None:
        state.users -= 1
        if state.users > 0:
            return
        if self._states.get(state.key) is state:
            del self._states[state.key]
        cache = state.cache
        if cache is not None:
            file_key = (state.key[1], state.blob_id)
            entry = self._files.get(file_key)
            if entry is not None and entry[0] is cache:
                entry[1] -= 1
                if entry[1] > 0:
                    cache = None
                else:
                    del self._files[file_key]
            if cache is not None:
                cache.close()
        self._lru.discard_prefix(state.key)

    def close(self) -> None:
        """Drop every blob state (daemon shutdown); devices still open stop working."""
        states, self._states = self._states, {}
        self._files = {}
        for state in states.values():
            state.users = 0
            if state.cache is not None:
                state.cache.close()
        self._lru = ChunkLRU(self._lru.max_bytes)


def _prepare_work_dir(work_dir: str) -> str:
    try:
        os.makedirs(work_dir, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cache work_dir {work_dir}: {exc.strerror}") from None
    if not os.path.isdir(work_dir):
        raise ConfigError(f"cache work_dir {work_dir}: not a directory")
    return os.path.realpath(work_dir)


class BlobDevice:
    """Chunk reads for one RAFS instance; made by :meth:`BlobLayer.open_device`.

    ``digest_validate`` checks every chunk fetched from the backend (and every
    cached chunk once per process) against its CRC/digest before serving it.
    """

    def __init__(self, layer: BlobLayer, blobs: list[BlobInfo], states: list[_BlobState],
                 backend: BlobBackend, cache: CacheSpec, digest_validate: bool, *, store_path: str = "",
                 amplify_io: int = 0) -> None:
        self._layer = layer
        self.blobs = blobs
        self._states = states
        self.backend = backend
        self.cache = cache
        self.digest_validate = digest_validate
        self.amplify_io = max(0, int(amplify_io))
        #: ``{blob index: (compressed offsets, chunks)}`` in blob order, set by the
        #: filesystem when known: amplification then follows the blob, not the file.
        self.blob_order: dict[int, tuple[list[int], list[ChunkInfo]]] | None = None
        self._check_hits = cache.validate
        # Whatever goes into a validating cache must have been checked too.
        self._validate_fetch = digest_validate or cache.validate
        self._closed = False
        self._limiter = LogLimiter(log)
        self.metrics = BlobCacheMetrics(
            store_path=store_path,
            underlying_files=[s.cache.data_path for s in states if s.cache is not None],
        )

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Release this device's blob states; idempotent."""
        if self._closed:
            return
        self._closed = True
        for state in self._states:
            self._layer._release(state)
        self._states = []

    # -- reading ------------------------------------------------------------------------
    async def read(self, iovec: Iterable[IoVec],
                   more: tuple[Sequence[ChunkInfo], int] | None = None) -> list[bytes | FileSegment]:
        """The bytes of every ``(chunk, offset, length)`` in order, as bytes and file segments.

        ``more = (chunks, start)`` says that the iovec's chunks are
        ``chunks[start], chunks[start + 1], ...`` (a file's chunk list): with
        ``amplify_io``, a miss then also fetches the missing chunks after it
        in that list.  It is looked at only on a miss.
        The concatenation of the result is exactly the requested data.
        Adjacent segments of one file are merged.  Raises ``StorageError``
        (bad chunk record, unsupported feature, closed device),
        ``BackendError`` or ``ChunkCorruptError``; ``ValueError`` for a range
        outside its chunk (a caller bug).
        """
        if self._closed:
            raise StorageError("blob device is closed")
        out: list[bytes | FileSegment] = []
        whole_hit = True
        states = self._states
        position = -1
        for chunk, offset, length in iovec:
            position += 1
            if length <= 0:
                if length == 0:
                    continue
                raise ValueError(f"negative read length {length}")
            if offset < 0 or offset + length > chunk.uncompressed_size:
                raise ValueError(f"range [{offset}, +{length}) is outside a chunk of "
                                 f"{chunk.uncompressed_size} bytes")
            index = chunk.blob_index
            if index == HOLE_BLOB_INDEX:
                piece: bytes | FileSegment = bytes(length)
            else:
                if not 0 <= index < len(states):
                    raise StorageError(f"chunk {chunk.index} names blob index {index}, "
                                       f"but the image has {len(states)} blobs")
                piece = self._hit(index, chunk, offset, length)
                if piece is None:
                    whole_hit = False
                    try:
                        piece = await self._miss(index, chunk, offset, length,
                                                 None if more is None else (more[0], more[1] + position))
                    except StorageError as exc:
                        self._report(index, chunk, exc)
                        raise
                else:
                    self.metrics.partial_hits += 1
            if out and type(piece) is FileSegment:
                last = out[-1]
                if type(last) is FileSegment and last.fd == piece.fd and last.offset + last.length == piece.offset:
                    out[-1] = FileSegment(last.fd, last.offset, last.length + piece.length)
                    continue
            out.append(piece)
        self.metrics.total += 1
        if whole_hit:
            self.metrics.whole_hits += 1
        return out

    def _hit(self, index: int, chunk: ChunkInfo, offset: int, length: int) -> bytes | FileSegment | None:
        """The range from the cache without any I/O wait, or None on a miss."""
        state = self._states[index]
        cache = state.cache
        if cache is not None:
            segment = cache.lookup(chunk, offset, length)
            if segment is None:
                return None
            if not self._check_hits and not (self.digest_validate
                                             and (chunk.uncompressed_offset, chunk.digest) not in state.verified):
                return segment
            return self._checked_hit(index, chunk, offset, length, segment)
        key = (state.key, chunk.uncompressed_offset, chunk.uncompressed_size)
        entry = self._layer._lru.get(key)
        if entry is None:
            return None
        data, validated = entry
        if self._validate_fetch and not validated:
            try:
                verify_chunk(data, self.blobs[index], chunk)
            except ChunkCorruptError:
                self._layer._lru.discard(key)
                return None
            self._layer._lru.put(key, data, True)
        return data if offset == 0 and length == len(data) else data[offset:offset + length]

    def _checked_hit(self, index: int, chunk: ChunkInfo, offset: int, length: int,
                     segment: FileSegment) -> bytes | FileSegment | None:
        state = self._states[index]
        blob = self.blobs[index]
        cache = state.cache
        assert cache is not None
        check_chunk(blob, chunk)  # bounds the read below
        data = cache.read_chunk(chunk)
        try:
            if len(data) != chunk.uncompressed_size:
                raise _corrupt(blob, chunk, "cached chunk is short", str(chunk.uncompressed_size), str(len(data)))
            verify_chunk(data, blob, chunk)
        except ChunkCorruptError as exc:
            self._limiter.log(logging.WARNING, (blob.blob_id, chunk.index, "cached copy bad"),
                         "cached copy of chunk %d of blob %s in %s is bad (%s); fetching it again",
                         chunk.index, blob.blob_id, cache.data_path, exc)
            cache.invalidate(chunk)
            state.verified.discard((chunk.uncompressed_offset, chunk.digest))
            return None
        state.verified.add((chunk.uncompressed_offset, chunk.digest))
        if self._check_hits:
            # Serve the bytes just checked: a segment would read the file again.
            return data if offset == 0 and length == len(data) else data[offset:offset + length]
        return segment

    # -- merged fetches (amplify_io, prefetch) ----------------------------------------------
    def is_cached(self, chunk: ChunkInfo) -> bool:
        """Whether ``chunk`` can be served without the backend (holes: always); no I/O."""
        index = chunk.blob_index
        if index == HOLE_BLOB_INDEX:
            return True
        if not 0 <= index < len(self._states):
            return False
        try:
            return self._state_has(self._states[index], chunk)
        except StorageError:
            return False

    def _state_has(self, state: _BlobState, chunk: ChunkInfo) -> bool:
        """Whether blob state ``state`` holds ``chunk``; StorageError for an index its map cannot hold."""
        if state.cache is not None:
            return state.cache.is_cached(chunk)
        return (state.key, chunk.uncompressed_offset, chunk.uncompressed_size) in self._layer._lru

    def has_file_cache(self, index: int) -> bool:
        """Whether blob ``index`` is cached in a file (prefetching into memory is pointless)."""
        return 0 <= index < len(self._states) and self._states[index].cache is not None

    async def fetch_chunks(self, index: int, chunks: Sequence[ChunkInfo], max_size: int) -> "FetchStats":
        """Bring ``chunks`` of blob ``index`` into the cache in merged backend requests.

        Chunks already cached, in flight (someone else is fetching them: they
        are not waited for) or refused by :func:`check_chunk` are skipped.  The
        rest are fetched in runs of neighbouring chunks, each run one backend
        request of at most ``max_size`` bytes (0: one request per chunk).
        While a run is in flight its chunks are led in the blob's single
        flight, so a foreground read of one of them waits for this request
        instead of sending its own.  Failures are returned, not raised
        (cancellation is raised; the followers of unfinished chunks then
        fetch by themselves).
        """
        if self._closed:
            raise StorageError("blob device is closed")
        if not 0 <= index < len(self._states):
            raise StorageError(f"blob index {index} out of range (the image has {len(self._states)} blobs)")
        blob = self.blobs[index]
        state = self._states[index]
        flights = state.flights
        claimed = []
        for chunk in chunks:
            if chunk.blob_index != index:
                continue
            try:
                check_chunk(blob, chunk)
                if self._state_has(state, chunk):  # raises for an index outside the map
                    continue
            except StorageError as exc:
                self._report(index, chunk, exc)
                continue
            flight = flights.try_lead((chunk.uncompressed_offset, chunk.uncompressed_size))
            if flight is not None:
                claimed.append((chunk, flight))
        if not claimed:
            return FetchStats()
        _, stats = await self._fetch_claimed(index, claimed, max_size)
        return stats

    async def _amplified(self, index: int, chunk: ChunkInfo,
                         more: tuple[Sequence[ChunkInfo], int]) -> bytes | None:
        """Fetch ``chunk`` with the missing chunks after it (``more``) in one request; None if
        ``chunk`` is already in flight (the caller then follows that flight)."""
        flights = self._states[index].flights
        key = (chunk.uncompressed_offset, chunk.uncompressed_size)
        lead = flights.try_lead(key)
        if lead is None:
            return None
        claimed = [(chunk, lead)]
        try:
            blob = self.blobs[index]
            order = self.blob_order.get(index) if self.blob_order else None
            if order is not None:
                offsets, in_blob = order
                # A generator: the blob's list may be long, the walk below is short.
                following_chunks: Iterable[ChunkInfo] = (
                    in_blob[i] for i in range(bisect.bisect_right(offsets, chunk.compressed_offset), len(in_blob)))
            else:
                chunks, start = more
                following_chunks = chunks[start + 1:]
            # The window counts file bytes (uncompressed), as nydusd's amplify_io
            # does: a compressed budget would fetch two to three times as much
            # and pull unrelated files into a lazily started container.
            budget = self.amplify_io - chunk.uncompressed_size
            seen = {key}
            for following in following_chunks:
                if budget <= 0:
                    break
                if following.blob_index != index:
                    continue
                fkey = (following.uncompressed_offset, following.uncompressed_size)
                if fkey in seen or self.is_cached(following):
                    continue
                seen.add(fkey)
                try:
                    check_chunk(blob, following)
                except StorageError:
                    continue
                budget -= following.uncompressed_size
                if budget < 0:
                    break
                flight = flights.try_lead(fkey)
                if flight is not None:
                    claimed.append((following, flight))
        except BaseException:
            for c, f in claimed:
                flights.abandon((c.uncompressed_offset, c.uncompressed_size), f)
            raise
        results, _ = await self._fetch_claimed(index, claimed, self.amplify_io)
        result = results[key]
        if isinstance(result, BaseException):
            raise result
        return result

    async def _fetch_claimed(self, index: int, claimed: list, max_size: int) -> tuple[dict, "FetchStats"]:
        """Fetch chunks whose flights this coroutine leads; every flight is ended on every path.

        Returns ``{flight key: data or exception}`` and the request counts.
        """
        blob = self.blobs[index]
        state = self._states[index]
        flights = state.flights
        backend = self.backend
        validated = self._validate_fetch
        results: dict = {}
        stats = FetchStats()
        try:
            for run in _merge_runs(claimed, max_size):
                start = run[0][0].compressed_offset
                end = max(c.compressed_offset + c.compressed_size for c, _ in run)
                try:
                    if not backend.supports_sync:
                        raw = await backend.read(blob.blob_id, start, end - start)
                    elif end - start > _INLINE_READ_MAX:
                        # A big merged local read would hold up every other request.
                        raw = await asyncio.get_running_loop().run_in_executor(
                            None, backend.read_sync, blob.blob_id, start, end - start)
                    else:
                        raw = backend.read_sync(blob.blob_id, start, end - start)
                except Exception as exc:
                    stats.errors.append(exc)
                    for c, f in run:
                        key = (c.uncompressed_offset, c.uncompressed_size)
                        results[key] = exc
                        flights.finish(key, f, exc=exc)
                    continue
                stats.requests += 1
                stats.bytes += end - start
                decoded = None
                if sum(c.uncompressed_size for c, _ in run) >= _THREAD_DECODE_MIN:
                    # Decompression and hashing release the GIL: a big run decodes on
                    # another core while this loop keeps serving requests.
                    decoded = await asyncio.get_running_loop().run_in_executor(
                        None, _decode_run, raw, start, [c for c, _ in run], blob, validated)
                for n, (c, f) in enumerate(run):
                    key = (c.uncompressed_offset, c.uncompressed_size)
                    if decoded is not None:
                        data = decoded[n]
                    else:
                        if n and not n % _DECODE_BATCH:
                            await asyncio.sleep(0)  # decoding a long run must not starve other requests
                        data = _decode_one(raw, start, c, blob, validated)
                    if isinstance(data, ChunkCorruptError):
                        stats.errors.append(data)
                        results[key] = data
                        flights.finish(key, f, exc=data)
                        continue
                    if state.cache is not None:
                        if state.cache.store(c, data) and validated:
                            state.verified.add((c.uncompressed_offset, c.digest))
                    else:
                        self._layer._lru.put((state.key, c.uncompressed_offset, c.uncompressed_size), data,
                                             validated)
                    stats.chunks += 1
                    results[key] = data
                    flights.finish(key, f, result=(data, validated))
        except BaseException:
            for c, f in claimed:
                key = (c.uncompressed_offset, c.uncompressed_size)
                if key not in results:
                    flights.abandon(key, f)
            raise
        return results, stats

    def flush(self) -> None:
        """Make everything cached so far durable (chunk map bits set); see ``BlobCacheFile``."""
        for state in self._states:
            if state.cache is not None:
                state.cache.flush()

    def metrics_json(self, id: str = "") -> dict:
        """nydusd's ``/api/v1/metrics/blobcache`` body for this instance (nydus-surface.md §3.5)."""
        m = self.metrics
        caches = [s.cache for s in self._states if s.cache is not None]
        return {
            "id": id,
            "underlying_files": list(m.underlying_files),
            "store_path": m.store_path,
            "partial_hits": m.partial_hits,
            "whole_hits": m.whole_hits,
            "total": m.total,
            "entries_count": sum(c.entries_count for c in caches),
            "prefetch_data_amount": m.prefetch_data_amount,
            "prefetch_requests_count": m.prefetch_requests_count,
            "prefetch_workers": m.prefetch_workers,
            "prefetch_unmerged_chunks": m.prefetch_unmerged_chunks,
            "prefetch_cumulative_time_millis": m.prefetch_cumulative_time_millis,
            "prefetch_begin_time_secs": m.prefetch_begin_time_secs,
            "prefetch_begin_time_millis": m.prefetch_begin_time_millis,
            "prefetch_end_time_secs": m.prefetch_end_time_secs,
            "prefetch_end_time_millis": m.prefetch_end_time_millis,
            "buffered_backend_size": 0 if caches else self._layer._lru.used,
            "data_all_ready": bool(self._states) and len(caches) == len(self._states)
            and all(c.all_ready for c in caches),
        }

    def _report(self, index: int, chunk: ChunkInfo, exc: StorageError) -> None:
        """Log a chunk that could not be served: once per chunk and reason, rate-limited."""
        if getattr(exc, "logged", False):
            return
        blob_id = self.blobs[index].blob_id
        key = (blob_id, chunk.index, chunk.uncompressed_offset, type(exc).__name__)
        if isinstance(exc, ChunkCorruptError):  # its message names blob and chunk already
            self._limiter.log(logging.ERROR, key, "corrupt chunk data: %s", exc)
        else:
            self._limiter.log(logging.ERROR, key, "cannot read chunk %d of blob %s (compressed %#x+%d): %s",
                              chunk.index, blob_id, chunk.compressed_offset, chunk.compressed_size, exc)
        try:
            exc.logged = True  # type: ignore[attr-defined]
        except AttributeError:
            pass

    async def _miss(self, index: int, chunk: ChunkInfo, offset: int, length: int,
                    more: tuple[Sequence[ChunkInfo], int] | None = None) -> bytes | FileSegment:
        blob = self.blobs[index]
        check_chunk(blob, chunk)
        state = self._states[index]
        cache = state.cache
        if cache is not None and cache.meta_wanted:
            cache.start_meta(self.backend)
        if state.verified:
            # A cached copy may have been dropped (bad bytes, a shrunken file):
            # whatever replaces it gets checked afresh.
            state.verified.discard((chunk.uncompressed_offset, chunk.digest))
        if state.cache is None and not self._validate_fetch and not chunk.flags & _COMPRESSED:
            # Stored raw in a local file: serve straight from the blob, no copy.
            segment = self.backend.file_segment(blob.blob_id, chunk.compressed_offset + offset, length)
            if segment is not None:
                return segment
        data = None
        # Local backends read at disk speed: merging saves no round trip there.
        if more is not None and self.amplify_io > chunk.uncompressed_size and not self.backend.supports_sync:
            data = await self._amplified(index, chunk, more)
        if data is None:
            data = await self._fetch(index, chunk)
        return data if offset == 0 and length == len(data) else data[offset:offset + length]

    async def _fetch(self, index: int, chunk: ChunkInfo) -> bytes:
        """The decoded bytes of a checked chunk, fetched at most once at a time per blob state."""
        blob = self.blobs[index]
        state = self._states[index]
        # Keyed like the LRU: a follower must never receive a chunk of another size
        # (possible only with hostile metadata), or its slice would come back short.
        data, validated = await state.flights.run((chunk.uncompressed_offset, chunk.uncompressed_size),
                                                  lambda: self._fetch_and_store(index, chunk))
        if self._validate_fetch and not validated:
            # The leader was a device that does not validate; check its result for us.
            try:
                verify_chunk(data, blob, chunk)
            except ChunkCorruptError:
                if state.cache is not None:
                    state.cache.invalidate(chunk)
                raise
        return data

    async def _fetch_and_store(self, index: int, chunk: ChunkInfo) -> tuple[bytes, bool]:
        blob = self.blobs[index]
        state = self._states[index]
        backend = self.backend
        if backend.supports_sync:
            raw = backend.read_sync(blob.blob_id, chunk.compressed_offset, chunk.compressed_size)
        else:
            raw = await backend.read(blob.blob_id, chunk.compressed_offset, chunk.compressed_size)
        validated = self._validate_fetch
        data = decode_chunk(raw, blob, chunk, validated)
        if state.cache is not None:
            if state.cache.store(chunk, data) and validated:
                state.verified.add((chunk.uncompressed_offset, chunk.digest))
        else:
            self._layer._lru.put((state.key, chunk.uncompressed_offset, chunk.uncompressed_size), data, validated)
        return data, validated

    def __repr__(self) -> str:
        kind = self.cache.kind or "nocache"
        return f"<BlobDevice {len(self.blobs)} blobs {kind} via {self.backend!r}{' closed' if self._closed else ''}>"

