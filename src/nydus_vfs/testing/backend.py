"""Test doubles and the conformance suite for blob backends.

* :class:`InMemoryBackend` serves blobs from a dict and records every read, with
  injectable faults (``fail_next``), latency and a gate that holds reads in
  flight (to test single-flight fetching).
* :func:`check_blob_backend` is the contract every backend must pass (as
  ``trio.testing.check_half_closeable_stream`` is for streams): exact reads,
  errors for ranges past the end, missing blobs and unsafe ids, concurrent
  reads, metrics, the optional sync/zero-copy paths and ``close``.

Nothing under ``src/`` may import this module.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Hashable, Mapping

from ..errors import BackendError, BackendNotFoundError
from ..storage.backend.base import BlobBackend, RetryPolicy

__all__ = ["InMemoryBackend", "check_blob_backend", "UNSAFE_BLOB_IDS"]

#: Ids every backend must refuse without touching storage.
UNSAFE_BLOB_IDS = ("", "a/b", "../etc", "..", "x\0y", "/abs", "a" * 256)


class InMemoryBackend(BlobBackend):
    """Blobs held in memory; a backend for tests.

    ``identity`` defaults to this instance; pass the same value to two
    instances to make the blob layer treat them as one backend.  ``reads``
    lists every successful ``(blob_id, offset, size)`` fetched.
    """

    type_name = "memory"

    def __init__(self, blobs: Mapping[str, bytes] | None = None, *, identity: Hashable | None = None,
                 latency: float = 0.0, retry: RetryPolicy | None = None) -> None:
        super().__init__(retry=retry)
        self.blobs: dict[str, bytes] = dict(blobs or {})
        self.latency = latency
        self.gate: asyncio.Event | None = None
        self.reads: list[tuple[str, int, int]] = []
        self.attempts = 0
        self._identity = identity
        self._faults: list[Callable[[], BackendError]] = []

    @property
    def identity(self) -> Hashable:
        return ("memory", self._identity) if self._identity is not None else super().identity

    def fail_next(self, count: int = 1, *, retryable: bool = True,
                  error: Callable[[], BackendError] | None = None) -> None:
        """Make the next ``count`` fetch attempts fail (``error()`` or an injected ``BackendError``)."""
        make = error or (lambda: BackendError("injected backend failure", retryable=retryable))
        self._faults.extend([make] * count)

    async def _read(self, blob_id: str, offset: int, size: int) -> bytes:
        self.attempts += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.latency:
            await asyncio.sleep(self.latency)
        if self._faults:
            raise self._faults.pop(0)()
        data = self._blob(blob_id)
        if offset + size > len(data):
            raise BackendError(f"memory: blob {blob_id}: range [{offset}, +{size}) ends past "
                               f"the end of the {len(data)}-byte blob", retryable=False)
        self.reads.append((blob_id, offset, size))
        return data[offset:offset + size]

    async def _blob_size(self, blob_id: str) -> int:
        return len(self._blob(blob_id))

    def _blob(self, blob_id: str) -> bytes:
        try:
            return self.blobs[blob_id]
        except KeyError:
            raise BackendNotFoundError(f"memory: blob {blob_id} not found") from None


async def _expect(exc_type: type[BaseException], coro, what: str) -> BaseException:
    try:
        await coro
    except exc_type as exc:
        return exc
    raise AssertionError(f"{what}: expected {exc_type.__name__}, nothing was raised")


async def check_blob_backend(backend: BlobBackend, blobs: Mapping[str, bytes], *,
                             missing_id: str = "0" * 64, check_close: bool = True) -> None:
    """Assert that ``backend`` honours the :class:`BlobBackend` contract.

    ``blobs`` is what the backend is known to serve (at least one non-empty
    blob); ``missing_id`` must not exist.  With ``check_close`` the backend is
    closed at the end and its behaviour after close checked too.  Raises
    ``AssertionError`` describing the first violation.
    """
    assert blobs and any(blobs.values()), "check_blob_backend needs at least one non-empty blob"
    hash(backend.identity)
    assert isinstance(backend.type_name, str) and backend.type_name

    reads_before = backend.metrics.read_count
    amount_before = backend.metrics.read_amount_total
    expected_reads = 0
    expected_amount = 0

    for blob_id, data in blobs.items():
        size = await backend.blob_size(blob_id)
        assert size == len(data), f"blob_size({blob_id!r}) = {size}, expected {len(data)}"
        n = len(data)
        ranges = [(0, n), (0, 0), (n, 0)]
        if n:
            ranges += [(0, 1), (n - 1, 1), (n // 3, max(1, n // 3)), (n // 2, n - n // 2)]
        for offset, length in ranges:
            got = await backend.read(blob_id, offset, length)
            assert isinstance(got, (bytes, bytearray)), f"read returned {type(got).__name__}, not bytes"
            assert bytes(got) == data[offset:offset + length], \
                f"read({blob_id!r}, {offset}, {length}) returned wrong bytes"
            expected_reads += 1
            expected_amount += length
        for offset, length in [(n, 1), (max(0, n - 1), 2), (n + 4096, 1)]:
            err = await _expect(BackendError, backend.read(blob_id, offset, length),
                                f"read({blob_id!r}, {offset}, {length}) past the end of a {n}-byte blob")
            assert not err.retryable, f"a range past the end must not be retryable: {err!r}"
        for bad in ((-1, 1), (0, -1)):
            await _expect(ValueError, backend.read(blob_id, *bad), f"read({blob_id!r}, {bad[0]}, {bad[1]})")

        # Concurrent reads of the same and different ranges all come back right.
        spans = [(i * n // 8, max(0, n // 8)) for i in range(8)] * 2
        results = await asyncio.gather(*(backend.read(blob_id, o, s) for o, s in spans))
        for (o, s), got in zip(spans, results, strict=True):
            assert bytes(got) == data[o:o + s], f"concurrent read({blob_id!r}, {o}, {s}) returned wrong bytes"
            expected_reads += 1
            expected_amount += s

        if backend.supports_sync:
            assert backend.read_sync(blob_id, 0, n) == data, f"read_sync({blob_id!r}) returned wrong bytes"
            expected_reads += 1
            expected_amount += n
        segment = backend.file_segment(blob_id, 0, n)
        if segment is not None:
            fd, offset, length = segment
            assert length == n, f"file_segment length {length}, expected {n}"
            assert os.pread(fd, length, offset) == data, "file_segment does not cover the blob bytes"

    err = await _expect(BackendNotFoundError, backend.read(missing_id, 0, 1), f"read of missing blob {missing_id}")
    assert not err.retryable, "a missing blob must not be retryable"
    await _expect(BackendNotFoundError, backend.blob_size(missing_id), f"blob_size of missing blob {missing_id}")
    for bad in UNSAFE_BLOB_IDS:
        err = await _expect(BackendError, backend.read(bad, 0, 1), f"read of unsafe blob id {bad[:20]!r}")
        assert not err.retryable, f"an unsafe blob id must not be retryable: {err!r}"
        await _expect(BackendError, backend.blob_size(bad), f"blob_size of unsafe blob id {bad[:20]!r}")

    m = backend.metrics
    assert m.read_count - reads_before == expected_reads, \
        f"metrics.read_count grew by {m.read_count - reads_before}, expected {expected_reads}"
    assert m.read_amount_total - amount_before == expected_amount, \
        f"metrics.read_amount_total grew by {m.read_amount_total - amount_before}, expected {expected_amount}"
    assert m.read_errors > 0, "failed reads were not counted in metrics.read_errors"

    if check_close:
        backend.close()
        backend.close()
        assert backend.closed
        blob_id = next(iter(blobs))
        await _expect(BackendError, backend.read(blob_id, 0, 1), "read after close")
