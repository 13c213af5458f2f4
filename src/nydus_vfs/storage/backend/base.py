"""What every blob backend (localfs now; registry, OSS, S3, http-proxy later) provides.

Contract of :class:`BlobBackend`:

* One instance per backend *config*; it serves any number of blobs, addressed
  by blob id (lowercase hex sha256 in practice, but never assume it: ``--blob-id``
  may be anything without ``/``).  Ids containing ``/``, ``..`` or NUL, or that
  are empty, are refused before any I/O: they come from image metadata, which
  may be hostile, and must never escape a directory or a URL path.
* ``await read(blob_id, offset, size)`` returns *exactly* ``size`` bytes or
  raises :class:`~nydus_vfs.errors.BackendError`.  A range past the end of the
  blob is an error (never a short result).  ``BackendNotFoundError`` means the
  blob does not exist; ``retryable`` on any ``BackendError`` tells whether the
  same call may succeed later.  Transient failures are already retried inside
  ``read`` according to :attr:`BlobBackend.retry`.
* ``await blob_size(blob_id)`` is the size of the stored blob file in bytes.
* ``close()`` releases fds and connections; it is idempotent, and ``read`` after
  it raises ``BackendError``.
* ``identity`` is a hashable value equal for two instances that serve the same
  bytes for every blob id (same type and location).  The blob layer keys
  shared per-blob cache state on it, so two mounts configured alike share one
  cache and one in-flight fetch per chunk.
* Optional fast paths, used by the blob device when present:
  ``supports_sync`` + :meth:`BlobBackend.read_sync` (no event loop at all, for
  local files) and :meth:`BlobBackend.file_segment` (a zero-copy
  :class:`~nydus_vfs.utils.io.FileSegment` into the stored blob).

Subclasses implement ``_read`` and ``_blob_size``; the public methods add
argument checks, retries and the counters of :class:`BackendMetrics` (names as
in nydusd's ``/api/v1/metrics/backend``).
"""

from __future__ import annotations

import abc
import asyncio
import errno
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ...errors import BackendError, BackendNotFoundError, BackendTimeoutError
from ...utils.io import FileSegment
from ._events import record_backend_error

__all__ = [
    "BlobBackend",
    "BackendMetrics",
    "RetryPolicy",
    "check_blob_id",
    "backend_error_from_os",
    "backend_error_from_http_status",
]

log = logging.getLogger("nydus_vfs.storage")

T = TypeVar("T")

#: Largest blob id accepted (a file name component is at most 255 bytes).
MAX_BLOB_ID_LEN = 255


def check_blob_id(blob_id: str) -> str:
    """Return ``blob_id`` if it is safe as a file name / URL segment, else raise.

    Raises ``BackendError`` (not retryable) for an empty id, one longer than
    255 bytes, or one containing ``/``, ``..`` or NUL.
    """
    if not isinstance(blob_id, str) or not blob_id:
        raise BackendError(f"invalid blob id {blob_id!r}: empty or not a string", retryable=False)
    if "/" in blob_id or ".." in blob_id or "\0" in blob_id or len(blob_id.encode()) > MAX_BLOB_ID_LEN:
        raise BackendError(
            f"invalid blob id {blob_id[:80]!r}: must not contain '/', '..' or NUL "
            f"and must be at most {MAX_BLOB_ID_LEN} bytes",
            retryable=False,
        )
    return blob_id


# errno values that describe a condition which may clear up by itself.
_RETRYABLE_ERRNOS = frozenset({
    errno.EAGAIN, errno.EINTR, errno.EBUSY, errno.ECONNRESET, errno.ECONNREFUSED,
    errno.ECONNABORTED, errno.EPIPE, errno.ENETDOWN, errno.ENETUNREACH, errno.EHOSTUNREACH,
    errno.ENOBUFS, errno.ENOMEM,
})


def backend_error_from_os(exc: OSError, what: str) -> BackendError:
    """Map an ``OSError`` raised while doing ``what`` to the backend error vocabulary.

    ENOENT/ENOTDIR -> ``BackendNotFoundError``; ETIMEDOUT (or a plain
    ``TimeoutError``) -> ``BackendTimeoutError``; connection-level and
    resource-shortage errnos are retryable; everything else (EIO, EACCES, ...)
    is not.  The original exception is chained as ``__cause__``.
    """
    reason = exc.strerror or str(exc) or type(exc).__name__
    code = exc.errno
    if code in (errno.ENOENT, errno.ENOTDIR) or isinstance(exc, FileNotFoundError):
        err: BackendError = BackendNotFoundError(f"{what}: {reason}")
    elif code == errno.ETIMEDOUT or isinstance(exc, TimeoutError):
        err = BackendTimeoutError(f"{what}: {reason}")
    else:
        err = BackendError(f"{what}: {reason}", retryable=code in _RETRYABLE_ERRNOS)
    err.__cause__ = exc
    return err


def backend_error_from_http_status(status: int, what: str) -> BackendError:
    """Map a non-2xx HTTP status to a backend error (for the HTTP backends).

    404 -> ``BackendNotFoundError``; 408 -> ``BackendTimeoutError``; 429 and
    5xx are retryable; any other 4xx (bad auth, bad range) is not.
    """
    if status == 404:
        return BackendNotFoundError(f"{what}: HTTP 404 Not Found")
    if status == 408:
        return BackendTimeoutError(f"{what}: HTTP 408 Request Timeout")
    return BackendError(f"{what}: HTTP {status}", retryable=status == 429 or 500 <= status <= 599)


@dataclass(slots=True)
class RetryPolicy:
    """Retry a failed backend call up to ``retry_limit`` extra times (nydusd ``retry_limit``).

    Only errors with ``retryable`` set are retried, after an exponential delay
    ``base_delay * 2**attempt`` capped at ``max_delay`` seconds.  ``sleep`` is
    injectable so tests need not wait.
    """

    retry_limit: int = 0
    base_delay: float = 0.1
    max_delay: float = 2.0
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    def __post_init__(self) -> None:
        if self.retry_limit < 0:
            raise ValueError(f"retry_limit must be >= 0, got {self.retry_limit}")

    def delays(self) -> Iterator[float]:
        """The waits before each retry, in order (``retry_limit`` of them)."""
        for attempt in range(self.retry_limit):
            yield min(self.max_delay, self.base_delay * (2 ** attempt))

    async def run(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        """Await ``call()`` until it succeeds, fails for good, or retries run out."""
        delays = self.delays()
        while True:
            try:
                return await call()
            except BackendError as exc:
                if not exc.retryable:
                    raise
                delay = next(delays, None)
                if delay is None:
                    raise
                log.warning("%s failed (%s); retrying in %.2fs", what, exc, delay)
                await self.sleep(delay)


#: Upper bounds (bytes, exclusive) of the 8 block-size buckets: <1K, <4K, <16K, <64K,
#: <128K, <512K, <1M, >=1M (nydus-surface.md §3.5).
_SIZE_BOUNDS = (1 << 10, 4 << 10, 16 << 10, 64 << 10, 128 << 10, 512 << 10, 1 << 20)
#: Upper bounds (ms, inclusive) of the 8 backend latency buckets: <=1, <=20, <=50, <=100,
#: <=500, <=1000, <=2000, >2000.
_LATENCY_BOUNDS_MS = (1, 20, 50, 100, 500, 1000, 2000)


def _bucket(value: float, bounds: tuple[float, ...], inclusive: bool) -> int:
    for index, bound in enumerate(bounds):
        if value <= bound if inclusive else value < bound:
            return index
    return len(bounds)


def _zeros() -> list[int]:
    return [0] * 8


@dataclass(slots=True)
class BackendMetrics:
    """Counters of one backend instance, named and shaped as ``/api/v1/metrics/backend``.

    ``read_cumulative_latency_millis_dist`` and ``read_count_block_size_dist`` are
    indexed by block-size bucket; ``read_latency_sizes_dist[size][latency]`` counts
    reads by size and latency bucket (nydus-surface.md §3.5).
    """

    backend_type: str
    read_count: int = 0
    read_errors: int = 0
    read_amount_total: int = 0
    read_cumulative_latency_millis_total: float = 0.0
    read_cumulative_latency_millis_dist: list[int] = field(default_factory=_zeros)
    read_count_block_size_dist: list[int] = field(default_factory=_zeros)
    read_latency_sizes_dist: list[list[int]] = field(default_factory=lambda: [_zeros() for _ in range(8)])

    def record_read(self, nbytes: int, started: float) -> None:
        millis = (time.monotonic() - started) * 1000.0
        self.read_count += 1
        self.read_amount_total += nbytes
        self.read_cumulative_latency_millis_total += millis
        size_bucket = _bucket(nbytes, _SIZE_BOUNDS, inclusive=False)
        self.read_cumulative_latency_millis_dist[size_bucket] += int(millis)
        self.read_count_block_size_dist[size_bucket] += 1
        self.read_latency_sizes_dist[size_bucket][_bucket(millis, _LATENCY_BOUNDS_MS, inclusive=True)] += 1

    def record_error(self) -> None:
        self.read_errors += 1

    def to_dict(self) -> dict[str, Any]:
        """The ``/api/v1/metrics/backend`` body (latency total in whole milliseconds)."""
        return {
            "backend_type": self.backend_type,
            "read_count": self.read_count,
            "read_errors": self.read_errors,
            "read_amount_total": self.read_amount_total,
            "read_cumulative_latency_millis_total": int(self.read_cumulative_latency_millis_total),
            "read_cumulative_latency_millis_dist": list(self.read_cumulative_latency_millis_dist),
            "read_count_block_size_dist": list(self.read_count_block_size_dist),
            "read_latency_sizes_dist": [list(row) for row in self.read_latency_sizes_dist],
        }


class BlobBackend(abc.ABC):
    """Base of every backend; see the module docstring for the contract."""

    #: Name as reported by nydusd metrics ("localfs", "registry", "oss", ...).
    type_name: str = "unknown"
    #: ``backend_type`` in the metrics (upstream's S3 backend reports "oss").
    metrics_type: str | None = None
    #: True when :meth:`read_sync` works without an event loop (local storage).
    supports_sync: bool = False
    #: True when ``_read`` must run inside an ``asyncio.Task`` (aiohttp's timeouts
    #: need ``current_task()``; the FUSE server drives a READ's first step by hand).
    needs_task: bool = False

    def __init__(self, *, retry: RetryPolicy | None = None) -> None:
        self.retry = retry if retry is not None else RetryPolicy()
        self.metrics = BackendMetrics(self.metrics_type or self.type_name)
        self._closed = False

    # -- identity and lifetime ---------------------------------------------------
    @property
    def identity(self) -> Hashable:
        """Equal for instances serving the same bytes; default: this instance only."""
        return (self.type_name, id(self))

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Release every resource; idempotent."""
        self._closed = True

    async def aclose(self) -> None:
        """:meth:`close`, waiting for network sessions to shut down (call it on their loop)."""
        self.close()

    # -- the I/O surface -----------------------------------------------------------
    async def read(self, blob_id: str, offset: int, size: int) -> bytes:
        """Exactly ``size`` bytes of blob ``blob_id`` at ``offset`` (see the module contract)."""
        if self.needs_task and asyncio.current_task() is None:
            return await asyncio.get_running_loop().create_task(self.read(blob_id, offset, size))
        self._check_args(blob_id, offset, size)
        started = time.monotonic()
        try:
            data = await self.retry.run(
                lambda: self._read(blob_id, offset, size),
                f"{self.type_name} read of blob {blob_id} [{offset}, +{size})",
            )
        except BackendError as exc:
            self._record_failure(blob_id, offset, size, exc)
            raise
        if len(data) != size:
            exc = BackendError(
                f"{self.type_name}: blob {blob_id}: short read at offset {offset}: "
                f"got {len(data)} of {size} bytes",
                retryable=False,
            )
            self._record_failure(blob_id, offset, size, exc)
            raise exc
        self.metrics.record_read(size, started)
        return data

    async def blob_size(self, blob_id: str) -> int:
        """Size in bytes of the stored blob ``blob_id``."""
        if self.needs_task and asyncio.current_task() is None:
            return await asyncio.get_running_loop().create_task(self.blob_size(blob_id))
        check_blob_id(blob_id)
        self._check_open()
        return await self.retry.run(lambda: self._blob_size(blob_id),
                                    f"{self.type_name} size of blob {blob_id}")

    def read_sync(self, blob_id: str, offset: int, size: int) -> bytes:
        """Synchronous :meth:`read`; only when ``supports_sync`` (no retries: local I/O)."""
        raise NotImplementedError(f"{self.type_name} backend has no synchronous read")

    def file_segment(self, blob_id: str, offset: int, size: int) -> FileSegment | None:
        """A zero-copy view of the stored range, or None when the backend cannot offer one.

        When a segment is returned, the range is known to lie inside the file.
        """
        return None

    # -- for subclasses ------------------------------------------------------------
    @abc.abstractmethod
    async def _read(self, blob_id: str, offset: int, size: int) -> bytes:
        """Fetch the range once (no retry); raise ``BackendError`` on failure."""

    @abc.abstractmethod
    async def _blob_size(self, blob_id: str) -> int:
        """The stored size of ``blob_id`` (no retry)."""

    def _record_failure(self, blob_id: str, offset: int, size: int, exc: BaseException) -> None:
        """Count and keep (``/daemon/events``) the final failure of one read.

        Logged at DEBUG only: the blob device logs the failure of the chunk
        with its reason, rate-limited (``utils.ratelog``).  Messages never
        carry secrets: backends build them from blob ids and URLs stripped of
        their query strings.
        """
        self.metrics.record_error()
        message = f"{self.type_name} backend: read of blob {blob_id} [{offset}, +{size}) failed: {exc}"
        log.debug("%s", message)
        record_backend_error(message)

    def _check_open(self) -> None:
        if self._closed:
            raise BackendError(f"{self.type_name} backend is closed", retryable=False)

    def _check_args(self, blob_id: str, offset: int, size: int) -> None:
        check_blob_id(blob_id)
        if offset < 0 or size < 0:
            raise ValueError(f"negative read range offset={offset} size={size}")
        self._check_open()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.identity!r}{' closed' if self._closed else ''}>"
