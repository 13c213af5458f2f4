"""The InMemoryBackend test double passes the same conformance suite as real backends."""

from __future__ import annotations

import asyncio

import pytest

from nydus_vfs.errors import BackendError
from nydus_vfs.storage.backend.base import RetryPolicy
from nydus_vfs.testing.backend import InMemoryBackend, check_blob_backend
from tests.unit.storage.storage_helpers import run

BLOBS = {"a" * 64: bytes(range(200)) * 7, "b" * 64: b"x"}


def test_conformance():
    run(check_blob_backend(InMemoryBackend(BLOBS), BLOBS))


def test_conformance_with_latency():
    run(check_blob_backend(InMemoryBackend(BLOBS, latency=0.0005), BLOBS))


def test_conformance_catches_a_broken_backend():
    class Broken(InMemoryBackend):
        async def _read(self, blob_id, offset, size):
            data = await super()._read(blob_id, offset, size)
            return bytes(reversed(data))  # right length, wrong bytes

    with pytest.raises(AssertionError, match="wrong bytes"):
        run(check_blob_backend(Broken(BLOBS), BLOBS))


def test_injected_faults_are_retried_by_policy():
    async def no_sleep(_):
        pass

    backend = InMemoryBackend(BLOBS, retry=RetryPolicy(retry_limit=2, sleep=no_sleep))
    backend.fail_next(2)
    assert run(backend.read("b" * 64, 0, 1)) == b"x"
    assert backend.attempts == 3 and backend.reads == [("b" * 64, 0, 1)]
    backend.fail_next(1, retryable=False)
    with pytest.raises(BackendError, match="injected"):
        run(backend.read("b" * 64, 0, 1))
    assert backend.metrics.read_errors == 1


def test_gate_holds_reads_in_flight():
    async def main():
        backend = InMemoryBackend(BLOBS)
        backend.gate = asyncio.Event()
        task = asyncio.ensure_future(backend.read("b" * 64, 0, 1))
        await asyncio.sleep(0)
        assert not task.done() and backend.attempts == 1
        backend.gate.set()
        assert await task == b"x"

    run(main())


def test_shared_identity():
    assert InMemoryBackend(identity="x").identity == InMemoryBackend(identity="x").identity
    assert InMemoryBackend().identity != InMemoryBackend().identity
