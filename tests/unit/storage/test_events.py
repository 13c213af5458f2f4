"""The bounded error ring behind /api/v1/daemon/events."""

from nydus_vfs.storage.backend._events import ErrorRing, backend_events, record_backend_error


def test_ring_is_bounded_by_count_and_size():
    ring = ErrorRing(max_errors=3, max_size=20)
    for text in ["a" * 5, "b" * 5, "c" * 5, "d" * 5]:
        ring.push(text)
    snap = ring.snapshot()
    assert snap["errors"] == ["b" * 5, "c" * 5, "d" * 5] and snap["total_errors"] == 3
    assert snap["total_size"] == 15 and snap["max_errors"] == 3 and snap["max_size"] == 20
    ring.push("e" * 12)                  # size bound evicts two
    assert ring.snapshot()["errors"] == ["d" * 5, "e" * 12]
    ring.push("f" * 100)                 # longer than max_size: truncated, alone
    assert ring.snapshot()["errors"] == ["f" * 20] and ring.snapshot()["total_size"] == 20
    ring.clear()
    assert ring.snapshot()["errors"] == []


def test_process_ring_shape():
    record_backend_error("registry backend: blob x failed")
    snap = backend_events()
    assert set(snap) == {"max_errors", "total_errors", "max_size", "total_size", "errors"}
    assert snap["max_errors"] == 500 and snap["max_size"] == 51200
    assert snap["errors"][-1] == "registry backend: blob x failed"
