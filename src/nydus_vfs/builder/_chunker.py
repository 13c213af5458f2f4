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
"""

from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Callable, Protocol

from ..format.types import ChunkInfo, Compressor, Digester
from ..utils import compress as _compress
from ..utils import digest_bytes as _digest
from ._tree import Inode

__all__ = ["ChunkSink", "ChunkPipeline", "default_workers"]


class ChunkSink(Protocol):
    """Where new chunks go: the blob writer."""

    def add_chunk(self, digest: bytes, stored: bytes, compressed: bool, uncompressed_size: int) -> ChunkInfo:
        """Append one chunk; return its record (``file_offset`` 0)."""
        ...


def default_workers() -> int:
    """Worker threads: one per usable CPU."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


class _Item:
    """One submitted chunk."""

    __slots__ = ("inode", "file_offset", "size", "data")

    def __init__(self, inode: Inode, file_offset: int, size: int, data: bytes | None) -> None:
        self.inode = inode
        self.file_offset = file_offset
        self.size = size
        self.data = data


class _Job:
    """A batch of consecutive items processed by one worker call."""

    __slots__ = ("items", "future", "cost")

    def __init__(self, items: list[_Item], future: Future, cost: int) -> None:
        self.items = items
        self.future = future
        self.cost = cost


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
                 max_inflight: int = 64 << 20, batch_bytes: int = 256 << 10,
                 on_chunk: Callable[[ChunkInfo, bool], None] | None = None) -> None:
        self._sink = sink
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

    def _work_one(self, data: bytes | None, size: int) -> tuple[bytes, bytes | None, bool]:
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

    def _work(self, items: list[_Item]) -> list[tuple[bytes, bytes | None, bool]]:
        return [self._work_one(it.data, it.size) for it in items]

    # -- producer side -------------------------------------------------------

    def submit(self, inode: Inode, file_offset: int, data: bytes | None, size: int | None = None) -> None:
        """Queue one chunk of ``inode`` starting at ``file_offset``.

        ``data`` is the chunk's bytes, or ``None`` with ``size`` for a chunk
        known to be all zeros.
        """
        if data is not None:
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
        self._queue.append(_Job(items, self._pool.submit(self._work, items), cost))
        self._queued_bytes += cost

    def _consume_one(self) -> None:
        job = self._queue.popleft()
        self._queued_bytes -= job.cost
        for item, (digest, stored, compressed) in zip(job.items, job.future.result()):
            record = self.known.get(digest)
            if record is None:
                if stored is None:
                    # A later chunk claimed the digest first, but this one is
                    # the first occurrence in image order, so it is stored.
                    raw = item.data if item.data is not None else bytes(item.size)
                    stored, compressed = _compress(raw, self._compressor)
                record = self._sink.add_chunk(digest, stored, compressed, item.size)
                self.known[digest] = record
                self.stored += 1
                if self._on_chunk is not None:
                    self._on_chunk(record, True)
            else:
                self.deduplicated += 1
                if self._on_chunk is not None:
                    self._on_chunk(record, False)
            item.inode.chunks.append(replace(record, file_offset=item.file_offset))
        job.items = []

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
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "ChunkPipeline":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
