"""Chunking: digest, deduplicate and compress file data on every core.

Strategy
--------
Goals: use all cores, keep memory bounded, and produce byte-identical output
whatever the thread timing.

* The caller (one thread) feeds chunks **in image order** with
  :meth:`ChunkPipeline.submit`.  Each chunk becomes a job on a thread pool;
  digesting (hashlib, blake3) and compressing (zstandard, lz4) release the GIL
  on large buffers, so two workers really run on two cores.
* Results are consumed strictly in submission order.  Only the consumer
  decides whether a chunk is new (first occurrence in image order) and appends
  it to the blob, so chunk order and blob bytes never depend on scheduling.
* Workers skip compressing a chunk whose digest another job already claimed:
  that saves work on duplicate data (zero chunks of sparse files above all).
  If the claim went to a *later* job, the earlier one reaches the consumer
  uncompressed and is compressed there: rare, and still deterministic.
* At most ``max_inflight`` bytes of chunk data are queued; ``submit`` blocks on
  the oldest job when the window is full.  Small chunks travel in batches
  (``batch_bytes``) so many small files do not cost one hand-off each.
* A chunk whose data is known to be all zeros (a hole in a sparse file) is
  submitted as its size only; its digest is computed once per size.
* Chunks of host files are *read by the workers* too (:meth:`submit_read`):
  the feeding thread only reserves room for them, so the ``open``/``preadv``
  syscalls (the kernel's copy out of the page cache) run on the other cores
  while the feeding thread walks on.  A chunk's bytes land in a slice of a
  pipeline-owned batch buffer, not in a fresh ``bytes`` per chunk.  Buffers
  are recycled once their job has been consumed, so the hot path neither
  allocates nor page-faults fresh memory for every chunk, and a batch of small
  files is one contiguous buffer.  Such views reach the sink only when it
  declares ``copies_chunk_data`` (the blob writer does: it copies each chunk
  into its output before returning); any other sink gets ``bytes``.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Callable, Protocol

from ..format.types import ChunkInfo, Compressor, Digester
from ..utils import compress_raw as _compress_raw
from ..utils import digest_bytes as _digest
from ._tree import Inode

__all__ = ["ChunkSink", "ChunkPipeline", "default_workers"]

#: Chunk bytes: owned ``bytes``, or a view of a pipeline buffer.
Data = bytes | memoryview
_NONE = int(Compressor.NONE)


class ChunkSink(Protocol):
    """Where new chunks go: the blob writer.

    A sink may set a class attribute ``copies_chunk_data = True`` to promise
    that :meth:`add_chunk` is done with ``stored`` when it returns; it then
    receives views into the pipeline's reusable buffers instead of copies.
    """

    def add_chunk(self, digest: bytes, stored: Data, compressed: bool, uncompressed_size: int) -> ChunkInfo:
        """Append one chunk; return its record (``file_offset`` 0)."""
        ...


def default_workers() -> int:
    """Worker threads: one per usable CPU."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def _compress(data: Data, algo: int) -> tuple[Data, bool]:
    """``utils.compress``'s rule (stored raw unless strictly smaller), minus its copy of the input.

    The copy would hold the GIL for a memcpy of every chunk; views of the
    pipeline's buffers are only ever read.
    """
    if algo == _NONE:
        return data, False
    packed = _compress_raw(data, algo)
    if len(packed) >= len(data):
        return data, False
    return packed, True


#: Fills a reserved view with a chunk's bytes and returns True, or returns
#: False (view untouched) when the chunk is known to be all zeros.  Runs on a
#: worker thread; any exception it raises reaches the caller in chunk order.
ChunkReader = Callable[[memoryview], bool]


class _Item:
    """One submitted chunk (``read``: fills ``data`` on the worker first)."""

    __slots__ = ("inode", "file_offset", "size", "data", "read")

    def __init__(self, inode: Inode, file_offset: int, size: int, data: Data | None,
                 read: ChunkReader | None = None) -> None:
        self.inode = inode
        self.file_offset = file_offset
        self.size = size
        self.data = data
        self.read = read


class _Job:
    """A batch of consecutive items processed by one worker call.

    ``buffer`` is the pipeline buffer the items' views point into (if any):
    it goes back to the free list once the job has been consumed.
    """

    __slots__ = ("items", "future", "cost", "buffer")

    def __init__(self, items: list[_Item], future: Future, cost: int, buffer: bytearray | None) -> None:
        self.items = items
        self.future = future
        self.cost = cost
        self.buffer = buffer


class ChunkPipeline:
    """Turn file data into chunk records, deduplicating against ``known``.

    ``known`` maps a chunk digest to an existing record (chunks already in this
    blob, in a parent image or in a chunk dictionary); it is updated with every
    new chunk.  Each submitted chunk ends up appended, in file order, to
    ``inode.chunks`` with its ``file_offset`` set.  Call :meth:`close` (or use
    the pipeline as a context manager) to drain the queue and stop the workers.

    Small chunks are batched (up to ``batch_bytes`` per job) so that a tree of
    many small files does not pay a thread hand-off per file.
    """

    def __init__(self, sink: ChunkSink, *, digester: Digester, compressor: Compressor,
                 known: dict[bytes, ChunkInfo] | None = None, workers: int | None = None,
                 max_inflight: int = 8 << 20, batch_bytes: int = 1 << 20,
                 on_chunk: Callable[[ChunkInfo, bool], None] | None = None) -> None:
        self._sink = sink
        self._sink_copies = bool(getattr(sink, "copies_chunk_data", False))
        self._digester = int(digester)
        self._compressor = int(compressor)
        self.known: dict[bytes, ChunkInfo] = known if known is not None else {}
        self._claimed: set[bytes] = set(self.known)
        self._claim_lock = threading.Lock()
        self._workers = workers or default_workers()
        self._pool = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="nydus-chunk")
        self._queue: deque[_Job] = deque()
        self._queued_bytes = 0
        self._max_inflight = max(max_inflight, 1)
        self._batch: list[_Item] = []
        self._batch_cost = 0
        self._batch_bytes = max(batch_bytes, 1)
        # The buffer the current batch's views point into, and how much of
        # it is taken; buffers of consumed jobs wait in _free.
        self._buf: bytearray | None = None
        self._buf_view: memoryview | None = None
        self._buf_pos = 0
        self._free: list[bytearray] = []
        self._zero_digests: dict[int, bytes] = {}
        self._zero_lock = threading.Lock()
        self._on_chunk = on_chunk
        #: Chunks stored in the blob / deduplicated (counted by the consumer).
        self.stored = 0
        self.deduplicated = 0

    # -- worker side ---------------------------------------------------------

    def _zero_digest(self, size: int) -> bytes:
        with self._zero_lock:
            d = self._zero_digests.get(size)
        if d is None:
            d = _digest(self._digester, bytes(size))
            with self._zero_lock:
                self._zero_digests[size] = d
        return d

    def _work_one(self, data: Data | None, size: int) -> tuple[bytes, Data | None, bool]:
        if data is None:
            digest = self._zero_digest(size)
        else:
            digest = _digest(self._digester, data)
        with self._claim_lock:
            if digest in self._claimed:
                return digest, None, False
            self._claimed.add(digest)
        stored, compressed = _compress(data if data is not None else bytes(size), self._compressor)
        return digest, stored, compressed

    def _work(self, items: list[_Item]) -> list[tuple[bytes, Data | None, bool]]:
        out = []
        for it in items:
            if it.read is not None:
                assert it.data is not None
                if not it.read(it.data):  # type: ignore[arg-type]
                    it.data = None   # a hole: digest and store it as zeros
                it.read = None
            out.append(self._work_one(it.data, it.size))
        return out

    # -- producer side -------------------------------------------------------

    def _reserve(self, size: int) -> memoryview:
        """The next ``size`` bytes of the current batch buffer (a new buffer when it is full)."""
        buf = self._buf
        if buf is None or self._buf_pos + size > len(buf):
            self._flush()
            buf = None
            for i, free in enumerate(self._free):
                if len(free) >= size:
                    buf = self._free.pop(i)
                    break
            if buf is None:
                # Twice the batch size: a batch closes once it holds
                # batch_bytes, so the chunk that closes it still fits.
                buf = bytearray(max(2 * self._batch_bytes, size))
            self._buf = buf
            self._buf_view = memoryview(buf)
            self._buf_pos = 0
        assert self._buf_view is not None
        start = self._buf_pos
        self._buf_pos = start + size
        return self._buf_view[start:start + size]

    def submit_read(self, inode: Inode, file_offset: int, size: int, read: ChunkReader) -> None:
        """Queue one chunk of ``inode`` whose ``size`` bytes a worker reads with ``read``.

        ``read`` is called on a worker thread with a writable view of exactly
        ``size`` bytes (see :data:`ChunkReader`); if it raises, the exception
        is re-raised by whichever call consumes the chunk (a later submit,
        :meth:`drain` or :meth:`close`), after every earlier chunk.
        """
        if size <= 0:
            raise ValueError("a chunk needs at least one byte")
        self._batch.append(_Item(inode, file_offset, size, self._reserve(size), read))
        self._batch_cost += size
        if self._batch_cost >= self._batch_bytes:
            self._flush()

    def submit(self, inode: Inode, file_offset: int, data: bytes | bytearray | memoryview | None,
               size: int | None = None) -> None:
        """Queue one chunk of ``inode`` starting at ``file_offset``.

        ``data`` is the chunk's bytes, or ``None`` with ``size`` for a chunk
        known to be all zeros.
        """
        if data is not None:
            if type(data) is not bytes:
                data = bytes(data)  # the caller may reuse its buffer
            size = len(data)
        if size is None or size <= 0:
            raise ValueError("a chunk needs at least one byte")
        self._batch.append(_Item(inode, file_offset, size, data))
        # Zero chunks cost no memory but still work: count them lightly.
        self._batch_cost += size if data is not None else 64
        if self._batch_cost >= self._batch_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._batch:
            return
        cost = self._batch_cost
        while self._queue and self._queued_bytes + cost > self._max_inflight:
            self._consume_one()
        items, self._batch, self._batch_cost = self._batch, [], 0
        buffer, self._buf, self._buf_view = self._buf, None, None
        self._queue.append(_Job(items, self._pool.submit(self._work, items), cost, buffer))
        self._queued_bytes += cost

    def _consume_one(self) -> None:
        job = self._queue.popleft()
        self._queued_bytes -= job.cost
        known = self.known
        for item, (digest, stored, compressed) in zip(job.items, job.future.result()):
            record = known.get(digest)
            if record is None:
                if stored is None:
                    # A later chunk claimed the digest first, but this one is
                    # the first occurrence in image order, so it is stored.
                    raw = item.data if item.data is not None else bytes(item.size)
                    stored, compressed = _compress(raw, self._compressor)
                if not self._sink_copies and type(stored) is not bytes:
                    stored = bytes(stored)
                record = self._sink.add_chunk(digest, stored, compressed, item.size)
                known[digest] = record
                self.stored += 1
                if self._on_chunk is not None:
                    self._on_chunk(record, True)
            else:
                self.deduplicated += 1
                if self._on_chunk is not None:
                    self._on_chunk(record, False)
            # Records are immutable: most chunks start their file at offset 0,
            # like the record the sink returns, and can share it.
            if record.file_offset != item.file_offset:
                record = replace(record, file_offset=item.file_offset)
            item.inode.chunks.append(record)
        job.items = []
        if job.buffer is not None:
            self._free.append(job.buffer)
            job.buffer = None

    def drain(self) -> None:
        """Wait for every queued chunk and record it."""
        self._flush()
        while self._queue:
            self._consume_one()

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def abort(self) -> None:
        """Stop without recording the queued chunks (after an error)."""
        for job in self._queue:
            job.future.cancel()
        self._queue.clear()
        self._batch = []
        self._buf = self._buf_view = None
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "ChunkPipeline":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
