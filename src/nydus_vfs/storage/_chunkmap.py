"""Which chunks of a blob are present in its cache file.

Two kinds, chosen per blob by the cache:

* :class:`IndexedChunkMap`: one bit per chunk index, persisted beside the cache
  data as ``<blob_id>.blob.data.chunk_map`` so a restart reuses what was
  fetched.  The file layout is nydusd's (``PersistMap``), so a work dir can be
  handed between this implementation and upstream nydusd:

  ======  ====  ===============================================================
  offset  size  field
  ======  ====  ===============================================================
  0       4     ``magic``      0x424D4150
  4       4     ``version``    1
  8       4     ``magic2``     0x434D4150
  12      4     ``all_ready``  0x4D4D4150 once every chunk is present, else 0
  16      4     ``chunk_count`` (our addition in nydusd's reserved area; 0 = not recorded)
  20      4076  reserved, zero
  4096    n/8   bitmap; chunk ``i`` is bit ``0x80 >> (i % 8)`` of byte ``i // 8``
  ======  ====  ===============================================================

  The file must be exactly ``4096 + ceil(chunk_count / 8)`` bytes.  A file that
  does not validate is *discarded* (logged with the reason) and the cache
  refills from the backend: a wrong "ready" bit would serve garbage, a lost
  one only costs a refetch.

* :class:`MemoryChunkMap`: for blobs whose chunk count is unknown (v5 images
  without the extended blob table, whose chunk ``index`` fields cannot be
  trusted), keyed by the chunk's uncompressed range and not persisted, like
  nydusd's ``DigestedChunkMap``.

Durability: the cache sets a bit only after the chunk's data was written *and*
``fdatasync``-ed (see ``cache.BlobCacheFile``), so a bit that reaches the disk,
whenever the kernel writes the shared mapping back, never claims bytes that did
not.  The map itself is not synced: losing a bit only costs a refetch.
"""

from __future__ import annotations

import logging
import mmap
import os
import stat
import struct
from dataclasses import dataclass

from ..errors import FormatError, StorageError
from ..format.types import ChunkInfo

__all__ = [
    "CHUNK_MAP_MAGIC",
    "CHUNK_MAP_MAGIC2",
    "CHUNK_MAP_ALL_READY",
    "CHUNK_MAP_HEADER_SIZE",
    "ChunkMapHeader",
    "IndexedChunkMap",
    "MemoryChunkMap",
    "open_regular",
]

log = logging.getLogger("nydus_vfs.storage")

CHUNK_MAP_MAGIC = 0x424D_4150
CHUNK_MAP_MAGIC2 = 0x434D_4150
CHUNK_MAP_ALL_READY = 0x4D4D_4150
CHUNK_MAP_VERSION = 1
CHUNK_MAP_HEADER_SIZE = 4096

_HEADER = struct.Struct("<IIIII")


@dataclass(frozen=True, slots=True)
class ChunkMapHeader:
    """The 4096-byte header of a ``.chunk_map`` file."""

    magic: int = CHUNK_MAP_MAGIC
    version: int = CHUNK_MAP_VERSION
    magic2: int = CHUNK_MAP_MAGIC2
    all_ready: int = 0
    chunk_count: int = 0

    @classmethod
    def from_bytes(cls, raw: bytes | bytearray | memoryview) -> "ChunkMapHeader":
        if len(raw) < CHUNK_MAP_HEADER_SIZE:
            raise FormatError("ChunkMapHeader", "size", len(raw),
                              f"need {CHUNK_MAP_HEADER_SIZE} bytes")
        return cls(*_HEADER.unpack_from(raw, 0))

    def validate(self, chunk_count: int) -> None:
        """Raise ``FormatError`` unless this header belongs to a map of ``chunk_count`` chunks."""
        if self.magic != CHUNK_MAP_MAGIC:
            raise FormatError("ChunkMapHeader", "magic", self.magic, f"expected {CHUNK_MAP_MAGIC:#x}")
        if self.version != CHUNK_MAP_VERSION:
            raise FormatError("ChunkMapHeader", "version", self.version, f"expected {CHUNK_MAP_VERSION}")
        if self.magic2 != CHUNK_MAP_MAGIC2:
            raise FormatError("ChunkMapHeader", "magic2", self.magic2, f"expected {CHUNK_MAP_MAGIC2:#x}")
        if self.chunk_count not in (0, chunk_count):
            raise FormatError("ChunkMapHeader", "chunk_count", self.chunk_count,
                              f"the blob has {chunk_count} chunks")

    def to_bytes(self) -> bytes:
        packed = _HEADER.pack(self.magic, self.version, self.magic2, self.all_ready, self.chunk_count)
        return packed + bytes(CHUNK_MAP_HEADER_SIZE - len(packed))


def open_regular(path: str, what: str) -> int:
    """Open (creating) ``path`` read-write, non-blocking, and require a regular file.

    ``O_NONBLOCK`` keeps a FIFO or device planted at the path from blocking
    the daemon in ``open``; anything but a regular file is then refused with
    ``StorageError`` naming the path and what it is.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
    except OSError as exc:
        raise StorageError(f"cannot open {what} {path}: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        os.close(fd)
        raise StorageError(f"cannot stat {what} {path}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise StorageError(f"{what} {path} is not a regular file ({_kind(mode)}); remove it or "
                           "choose another cache work_dir")
    # Regular files ignore O_NONBLOCK, but keep the flags plain for pread/pwrite users.
    os.set_blocking(fd, True)
    return fd


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symlink")):
        if test(mode):
            return name
    return f"mode {mode:o}"


def map_file_size(chunk_count: int) -> int:
    return CHUNK_MAP_HEADER_SIZE + (chunk_count + 7) // 8


class IndexedChunkMap:
    """Persisted readiness bitmap of a blob with a known chunk count.

    Opening never fails because of the file's *content*: a foreign or corrupt
    map is replaced by an empty one (``discarded`` says why).  It fails with
    ``StorageError`` only when the file cannot be opened, sized or mapped.
    ``reset()`` forgets every chunk (used when the data file was lost).
    """

    __slots__ = ("path", "chunk_count", "_fd", "_mm", "_not_ready", "discarded")

    def __init__(self, path: str, chunk_count: int) -> None:
        if chunk_count <= 0:
            raise ValueError(f"chunk count must be positive, got {chunk_count}")
        self.path = path
        self.chunk_count = chunk_count
        self.discarded: str | None = None
        size = map_file_size(chunk_count)
        self._fd = open_regular(path, "chunk map")
        try:
            reason = self._check_existing(size)
            if reason is not None:
                if reason != "new":
                    log.warning("chunk map %s discarded (%s); the cache for this blob is refilled",
                                path, reason)
                    self.discarded = reason
                self._write_fresh(size)
            self._mm = mmap.mmap(self._fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            os.close(self._fd)
            raise StorageError(f"cannot set up chunk map {path}: {exc.strerror}") from None
        if ChunkMapHeader.from_bytes(self._mm[:CHUNK_MAP_HEADER_SIZE]).all_ready == CHUNK_MAP_ALL_READY:
            self._not_ready = 0
        else:
            self._not_ready = chunk_count - self._count_ready()
            if self._not_ready == 0:
                self._mark_all_ready()

    def _check_existing(self, size: int) -> str | None:
        """None if the file on disk is a valid map for us, else why not ("new" if empty)."""
        actual = os.fstat(self._fd).st_size
        if actual == 0:
            return "new"
        if actual != size:
            return f"file is {actual} bytes, expected {size} for {self.chunk_count} chunks"
        raw = os.pread(self._fd, CHUNK_MAP_HEADER_SIZE, 0)
        if not any(raw):
            # Crash between sizing the file and writing its header: nothing recorded yet.
            return "new"
        try:
            ChunkMapHeader.from_bytes(raw).validate(self.chunk_count)
        except FormatError as exc:
            return str(exc)
        return None

    def _write_fresh(self, size: int) -> None:
        os.ftruncate(self._fd, 0)
        os.ftruncate(self._fd, size)
        os.pwrite(self._fd, ChunkMapHeader(chunk_count=self.chunk_count).to_bytes(), 0)

    def _count_ready(self) -> int:
        nbytes = (self.chunk_count + 7) // 8
        bits = int.from_bytes(self._mm[CHUNK_MAP_HEADER_SIZE:CHUNK_MAP_HEADER_SIZE + nbytes], "big")
        # Ignore stray bits past the last chunk in the final byte.
        return (bits >> (nbytes * 8 - self.chunk_count)).bit_count()

    def _mark_all_ready(self) -> None:
        self._mm[12:16] = CHUNK_MAP_ALL_READY.to_bytes(4, "little")

    # -- queries and updates ---------------------------------------------------------
    @property
    def all_ready(self) -> bool:
        return self._not_ready == 0

    @property
    def ready_count(self) -> int:
        return self.chunk_count - self._not_ready

    def _index(self, chunk: ChunkInfo) -> int:
        index = chunk.index
        if not 0 <= index < self.chunk_count:
            raise StorageError(f"chunk index {index} is outside the blob's {self.chunk_count} chunks "
                               f"(chunk map {self.path})")
        return index

    def is_ready(self, chunk: ChunkInfo) -> bool:
        """Whether ``chunk`` is present; ``StorageError`` if its index is out of range."""
        index = self._index(chunk)
        if self._not_ready == 0:
            return True
        return bool(self._mm[CHUNK_MAP_HEADER_SIZE + (index >> 3)] & (0x80 >> (index & 7)))

    def set_ready(self, chunk: ChunkInfo) -> None:
        index = self._index(chunk)
        pos = CHUNK_MAP_HEADER_SIZE + (index >> 3)
        mask = 0x80 >> (index & 7)
        current = self._mm[pos]
        if current & mask:
            return
        self._mm[pos] = current | mask
        self._not_ready -= 1
        if self._not_ready == 0:
            self._mark_all_ready()

    def clear(self, chunk: ChunkInfo) -> None:
        """Forget ``chunk`` (its cached bytes turned out to be bad)."""
        index = self._index(chunk)
        pos = CHUNK_MAP_HEADER_SIZE + (index >> 3)
        mask = 0x80 >> (index & 7)
        self._mm[12:16] = bytes(4)
        self._mm[pos] &= ~mask & 0xFF
        # Recount: "all ready" may have come from the header rather than the bits.
        self._not_ready = self.chunk_count - self._count_ready()

    def reset(self) -> None:
        """Forget every chunk."""
        self._mm[:] = ChunkMapHeader(chunk_count=self.chunk_count).to_bytes() + bytes(
            len(self._mm) - CHUNK_MAP_HEADER_SIZE)
        self._not_ready = self.chunk_count

    def close(self) -> None:
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.flush()
            except (OSError, ValueError):
                pass
            mm.close()
            os.close(self._fd)


class MemoryChunkMap:
    """In-memory readiness keyed by ``(uncompressed_offset, uncompressed_size)``; never persisted."""

    __slots__ = ("_ready",)

    discarded = None
    chunk_count = 0

    def __init__(self) -> None:
        self._ready: set[tuple[int, int]] = set()

    @property
    def all_ready(self) -> bool:
        return False

    @property
    def ready_count(self) -> int:
        return len(self._ready)

    def is_ready(self, chunk: ChunkInfo) -> bool:
        return (chunk.uncompressed_offset, chunk.uncompressed_size) in self._ready

    def set_ready(self, chunk: ChunkInfo) -> None:
        self._ready.add((chunk.uncompressed_offset, chunk.uncompressed_size))

    def clear(self, chunk: ChunkInfo) -> None:
        self._ready.discard((chunk.uncompressed_offset, chunk.uncompressed_size))

    def reset(self) -> None:
        self._ready.clear()

    def close(self) -> None:
        self._ready.clear()
