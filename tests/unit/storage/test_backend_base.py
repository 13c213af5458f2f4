"""The backend contract helpers: blob id checks, error mapping, retries, metrics."""

from __future__ import annotations

import errno

import pytest

from nydus_vfs.errors import BackendError, BackendNotFoundError, BackendTimeoutError, StorageError
from nydus_vfs.storage.backend.base import (
    BlobBackend,
    RetryPolicy,
    backend_error_from_http_status,
    backend_error_from_os,
    check_blob_id,
)
from tests.unit.storage.storage_helpers import run


@pytest.mark.parametrize("good", ["a" * 64, "test", "sha256-abc", "x.y", "a" * 255])
def test_check_blob_id_accepts(good):
    assert check_blob_id(good) == good


@pytest.mark.parametrize("bad", ["", "a/b", "/abs", "..", "../x", "a..b", "x\0", "a" * 256, None, 5])
def test_check_blob_id_refuses(bad):
    with pytest.raises(BackendError, match="invalid blob id") as info:
        check_blob_id(bad)
    assert info.value.retryable is False


@pytest.mark.parametrize(
    ("exc", "cls", "retryable"),
    [
        (FileNotFoundError(errno.ENOENT, "No such file"), BackendNotFoundError, False),
        (OSError(errno.ENOTDIR, "Not a directory"), BackendNotFoundError, False),
        (OSError(errno.ETIMEDOUT, "timed out"), BackendTimeoutError, True),
        (TimeoutError("slow"), BackendTimeoutError, True),
        (OSError(errno.ECONNRESET, "reset"), BackendError, True),
        (OSError(errno.EIO, "I/O error"), BackendError, False),
        (PermissionError(errno.EACCES, "denied"), BackendError, False),
    ],
)
def test_backend_error_from_os(exc, cls, retryable):
    err = backend_error_from_os(exc, "open blob x")
    assert type(err) is cls
    assert err.retryable is retryable
    assert err.__cause__ is exc
    assert str(err).startswith("open blob x: ")
    assert isinstance(err, StorageError) and isinstance(err, OSError)


@pytest.mark.parametrize(
    ("status", "cls", "retryable"),
    [(404, BackendNotFoundError, False), (408, BackendTimeoutError, True), (429, BackendError, True),
     (500, BackendError, True), (503, BackendError, True), (401, BackendError, False),
     (403, BackendError, False), (416, BackendError, False)],
)
def test_backend_error_from_http_status(status, cls, retryable):
    err = backend_error_from_http_status(status, "GET blob")
    assert type(err) is cls and err.retryable is retryable
    assert str(status) in str(err)


def test_retry_policy_delays_are_capped_exponential():
    assert list(RetryPolicy(retry_limit=5, base_delay=0.1, max_delay=0.5).delays()) == \
        [0.1, 0.2, 0.4, 0.5, 0.5]
    assert list(RetryPolicy().delays()) == []
    with pytest.raises(ValueError):
        RetryPolicy(retry_limit=-1)


class _Flaky:
    def __init__(self, failures: list[BaseException]):
        self.failures = failures
        self.calls = 0

    async def __call__(self):
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return b"ok"


def _policy(limit, slept):
    async def sleep(delay):
        slept.append(delay)

    return RetryPolicy(retry_limit=limit, base_delay=1.0, max_delay=4.0, sleep=sleep)


def test_retry_policy_retries_retryable_errors_up_to_the_limit():
    slept: list[float] = []
    call = _Flaky([BackendError("5xx", retryable=True), BackendTimeoutError("slow")])
    assert run(_policy(2, slept).run(call, "read")) == b"ok"
    assert call.calls == 3 and slept == [1.0, 2.0]


def test_retry_policy_gives_up_after_the_limit():
    slept: list[float] = []
    call = _Flaky([BackendError("a", retryable=True)] * 3)
    with pytest.raises(BackendError, match="a"):
        run(_policy(2, slept).run(call, "read"))
    assert call.calls == 3


def test_retry_policy_never_retries_permanent_errors():
    slept: list[float] = []
    call = _Flaky([BackendNotFoundError("gone")])
    with pytest.raises(BackendNotFoundError):
        run(_policy(5, slept).run(call, "read"))
    assert call.calls == 1 and slept == []


class _Liar(BlobBackend):
    """Returns one byte fewer than asked: the base class must catch it."""

    type_name = "liar"

    async def _read(self, blob_id, offset, size):
        return b"x" * max(0, size - 1)

    async def _blob_size(self, blob_id):
        return 10


def test_base_read_refuses_short_results_and_counts_metrics():
    backend = _Liar()
    with pytest.raises(BackendError, match="short read") as info:
        run(backend.read("blob", 0, 4))
    assert info.value.retryable is False
    assert backend.metrics.read_errors == 1 and backend.metrics.read_count == 0
    assert run(backend.read("blob", 0, 0)) == b""
    assert backend.metrics.read_count == 1 and backend.metrics.backend_type == "liar"


def test_base_defaults():
    backend = _Liar()
    assert backend.identity != _Liar().identity
    assert backend.file_segment("blob", 0, 1) is None
    with pytest.raises(NotImplementedError):
        backend.read_sync("blob", 0, 1)
    with pytest.raises(ValueError, match="negative"):
        run(backend.read("blob", -1, 1))
    backend.close()
    assert backend.closed
    with pytest.raises(BackendError, match="closed"):
        run(backend.read("blob", 0, 1))
    with pytest.raises(BackendError, match="closed"):
        run(backend.blob_size("blob"))
    assert "closed" in repr(backend)

