from __future__ import annotations

import hashlib
import threading
import time

import pytest

from nydus_vfs.builder import _chunker
from nydus_vfs.builder._chunker import ChunkPipeline
from nydus_vfs.builder._tree import Inode
from nydus_vfs.format.types import ChunkFlags, ChunkInfo, Compressor, Digester
from nydus_vfs.utils import decompress


class _Sink:
    def __init__(self) -> None:
        self.stored: list[tuple[bytes, bytes, bool, int]] = []
        self.pos = 0

    def add_chunk(self, digest, stored, compressed, usize):
        info = ChunkInfo(digest, 0, len(self.stored), ChunkFlags.COMPRESSED if compressed else 0, self.pos,
                         len(stored), 0, usize, 0)
        self.stored.append((digest, stored, compressed, usize))
        self.pos += len(stored)
        return info


def _data(n: int, seed: int = 0) -> bytes:
    # Compressible (each 8-byte token repeats 8 times) but different per seed.
    out = b"".join(hashlib.sha256(b"%d-%d" % (seed, i)).hexdigest()[:8].encode() * 8 for i in range(n // 64 + 1))
    return out[:n]


def _run(chunks, workers, compressor=Compressor.ZSTD, known=None, **kw):
    sink = _Sink()
    inodes = [Inode(0o100644) for _ in range(len(chunks))]
    with ChunkPipeline(sink, digester=Digester.BLAKE3, compressor=compressor, known=known, workers=workers,
                       **kw) as p:
        for inode, data in zip(inodes, chunks):
            if isinstance(data, int):
                p.submit(inode, 0, None, data)
            else:
                p.submit(inode, 0, data)
    return sink, inodes, p


def test_output_is_identical_whatever_the_thread_count():
    chunks = [_data(20000, i % 7) for i in range(60)] + [4096, 4096]
    results = [_run(chunks, w, max_inflight=50000)[0].stored for w in (1, 2, 8)]
    assert results[0] == results[1] == results[2]
    assert len(results[0]) == 8  # 7 distinct payloads + one zero chunk


def test_dedup_keeps_first_occurrence_and_records_file_offsets():
    a, b = _data(5000, 1), _data(5000, 2)
    sink = _Sink()
    f1, f2 = Inode(0o100644), Inode(0o100644)
    with ChunkPipeline(sink, digester=Digester.SHA256, compressor=Compressor.LZ4_BLOCK, workers=2) as p:
        p.submit(f1, 0, a)
        p.submit(f1, 5000, b)
        p.submit(f2, 0, b)
        p.submit(f2, 5000, a)
    assert [s[0] for s in sink.stored] == [hashlib.sha256(a).digest(), hashlib.sha256(b).digest()]
    assert [c.file_offset for c in f1.chunks + f2.chunks] == [0, 5000, 0, 5000]
    assert f2.chunks[0].index == f1.chunks[1].index and f2.chunks[1].index == f1.chunks[0].index
    assert (p.stored, p.deduplicated) == (2, 2)
    digest, stored, compressed, usize = sink.stored[0]
    assert compressed and decompress(stored, Compressor.LZ4_BLOCK, usize) == a


def test_known_chunks_are_never_stored_again():
    a = _data(3000)
    from nydus_vfs.utils import digest_bytes
    existing = ChunkInfo(digest_bytes(Digester.BLAKE3, a), 3, 9, 0, 100, 3000, 0, 3000, 0)
    sink, inodes, p = _run([a, a], 2, known={existing.digest: existing})
    assert sink.stored == []
    assert [(c.blob_index, c.index) for c in inodes[0].chunks] == [(3, 9)]


def test_incompressible_data_is_stored_raw():
    import os
    raw = os.urandom(8192)
    sink, inodes, _ = _run([raw], 1)
    assert sink.stored[0][1:3] == (raw, False)
    assert inodes[0].chunks[0].flags == 0


def test_first_occurrence_is_stored_even_when_a_later_job_claimed_it(monkeypatch):
    """Force the race: job 2 digests and claims before job 1; job 1 must still be the one stored."""
    gate = threading.Event()
    real = _chunker._digest
    payload = _data(4000, 3)

    def slow_first(algo, data):
        if data is payload and not gate.is_set():
            gate.set()
            time.sleep(0.2)
        return real(algo, data)

    monkeypatch.setattr(_chunker, "_digest", slow_first)
    copy = bytes(bytearray(payload))  # equal content, different object: not slowed down
    sink, inodes, _ = _run([payload, copy], 2, batch_bytes=1)
    assert len(sink.stored) == 1
    assert inodes[0].chunks[0].index == inodes[1].chunks[0].index == 0


def test_workers_really_run_in_parallel(monkeypatch):
    active = 0
    peak = 0
    lock = threading.Lock()
    real = _chunker._compress

    def tracked(data, algo):
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.02)
        try:
            return real(data, algo)
        finally:
            with lock:
                active -= 1

    monkeypatch.setattr(_chunker, "_compress", tracked)
    _run([_data(1000, i) for i in range(16)], 2, batch_bytes=1)
    assert peak == 2


def test_inflight_window_bounds_memory():
    seen = []
    sink = _Sink()
    orig = sink.add_chunk

    with ChunkPipeline(sink, digester=Digester.BLAKE3, compressor=Compressor.NONE, workers=2,
                       max_inflight=10000, batch_bytes=1) as p:
        sink.add_chunk = lambda *a: (seen.append(p._queued_bytes), orig(*a))[1]  # type: ignore[method-assign]
        for i in range(20):
            p.submit(Inode(0o100644), 0, _data(4000, i))
            assert p._queued_bytes <= 12000
    assert len(sink.stored) == 20


def test_small_chunks_travel_in_batches(monkeypatch):
    calls = []
    real = ChunkPipeline._work

    def counting(self, items):
        calls.append(len(items))
        return real(self, items)

    monkeypatch.setattr(ChunkPipeline, "_work", counting)
    sink, inodes, _ = _run([_data(1000, i) for i in range(100)], 2, batch_bytes=10_000)
    assert sum(calls) == 100 and len(calls) == 10
    assert [i.chunks[0].index for i in inodes] == list(range(100))


def test_abort_on_error_stops_without_recording():
    sink = _Sink()
    inode = Inode(0o100644)
    with pytest.raises(RuntimeError):
        with ChunkPipeline(sink, digester=Digester.BLAKE3, compressor=Compressor.NONE, workers=2) as p:
            p.submit(inode, 0, b"x" * 100)
            raise RuntimeError("source failed")
    assert inode.chunks == []


def test_submit_refuses_empty_chunks():
    with ChunkPipeline(_Sink(), digester=Digester.BLAKE3, compressor=Compressor.NONE, workers=1) as p:
        with pytest.raises(ValueError):
            p.submit(Inode(0o100644), 0, b"")


def _spins_during(fn, repeat: int = 3) -> int:
    """How often a Python thread got to run while ``fn`` executed.

    A C call that keeps the GIL cannot be interrupted, so the spinning thread
    only advances while ``fn`` has released the GIL.  It sleeps a little
    between steps, so it never races ``fn`` for the GIL afterwards (which
    would count spins that happened between calls).
    """
    stop = threading.Event()
    started = threading.Event()
    counter = [0]

    def spin() -> None:
        started.set()
        while not stop.is_set():
            counter[0] += 1
            time.sleep(0.0001)

    t = threading.Thread(target=spin, daemon=True)
    t.start()
    started.wait()
    fn()  # warm-up, not measured
    total = 0
    try:
        for _ in range(repeat):
            before = counter[0]
            fn()
            total += counter[0] - before
    finally:
        stop.set()
        t.join()
    return total


@pytest.mark.parametrize("name", ["blake3", "sha256", "zstd", "lz4_block"])
def test_digest_and_compression_release_the_gil(name):
    """The premise of the parallel chunker: these run on another core while Python runs."""
    from nydus_vfs.utils import compress, digest_bytes
    import os
    # blake3 is so fast that it needs more data to be caught in the act.
    data = os.urandom(1 << 20) * (64 if name == "blake3" else 16)
    fn = {
        "blake3": lambda: digest_bytes(Digester.BLAKE3, data),
        "sha256": lambda: digest_bytes(Digester.SHA256, data),
        "zstd": lambda: compress(data, Compressor.ZSTD),
        "lz4_block": lambda: compress(data, Compressor.LZ4_BLOCK),
    }[name]
    control = _spins_during(lambda: data.count(b"\x00\x01\x02\x03\x04"))   # bytes.count keeps the GIL
    spins = _spins_during(fn)
    # Under a loaded machine the control picks up scheduling noise; a call that
    # really releases the GIL is still well above it.
    assert spins >= control + 20, (spins, control)


class _CopyingSink(_Sink):
    """A sink that may receive views: it copies them, as the blob writer does."""

    copies_chunk_data = True

    def __init__(self) -> None:
        super().__init__()
        self.types: set[type] = set()

    def add_chunk(self, digest, stored, compressed, usize):
        self.types.add(type(stored))
        return super().add_chunk(digest, bytes(stored), compressed, usize)


def _reader(payload: bytes, calls: list | None = None):
    def read(view):
        if calls is not None:
            calls.append(threading.current_thread().name)
        if payload is None:
            return False
        view[:] = payload
        return True
    return read


@pytest.mark.parametrize("compressor", [Compressor.NONE, Compressor.LZ4_BLOCK])
def test_submit_read_fills_reused_buffers_without_corrupting_earlier_chunks(compressor):
    # Far more data than the window, so batch buffers are recycled many times;
    # every stored chunk must still be exactly its own payload.
    payloads = [_data(30000 + 997 * i, i) for i in range(120)]
    sink = _CopyingSink()
    inodes = [Inode(0o100644) for _ in payloads]
    calls: list[str] = []
    with ChunkPipeline(sink, digester=Digester.BLAKE3, compressor=compressor, workers=2,
                       max_inflight=200_000, batch_bytes=64_000) as p:
        for inode, payload in zip(inodes, payloads):
            p.submit_read(inode, 0, len(payload), _reader(payload, calls))
        assert len(p._free) > 0   # consumed jobs gave their buffers back
    assert len(sink.stored) == len(payloads)
    from nydus_vfs.utils import digest_bytes
    for (digest, stored, compressed, usize), payload in zip(sink.stored, payloads):
        raw = decompress(stored, compressor, usize) if compressed else stored
        assert raw == payload and digest == digest_bytes(Digester.BLAKE3, payload)
        assert usize == len(payload)
    assert [i.chunks[0].index for i in inodes] == list(range(len(payloads)))
    # Raw chunks travel as views of the batch buffers; compressed ones are new bytes.
    assert sink.types == ({memoryview} if compressor == Compressor.NONE else {bytes})
    assert len(calls) == len(payloads) and all(name.startswith("nydus-chunk") for name in calls)


def test_views_are_copied_for_sinks_that_keep_them():
    payload = _data(5000, 1)
    sink = _Sink()   # keeps what it is given, so it must get bytes
    with ChunkPipeline(sink, digester=Digester.BLAKE3, compressor=Compressor.NONE, workers=2) as p:
        p.submit_read(Inode(0o100644), 0, len(payload), _reader(payload))
        p.submit_read(Inode(0o100644), 0, len(payload), _reader(payload[::-1]))
    assert [type(s[1]) for s in sink.stored] == [bytes, bytes]
    assert [s[1] for s in sink.stored] == [payload, payload[::-1]]


def test_submit_read_hole_is_stored_as_zeros():
    sink = _CopyingSink()
    inode = Inode(0o100644)
    with ChunkPipeline(sink, digester=Digester.SHA256, compressor=Compressor.NONE, workers=2) as p:
        p.submit_read(inode, 0, 4096, _reader(None))
        p.submit(inode, 4096, None, 4096)
    assert len(sink.stored) == 1 and sink.stored[0][1] == bytes(4096)
    assert inode.chunks[0].digest == inode.chunks[1].digest == hashlib.sha256(bytes(4096)).digest()
    assert [c.file_offset for c in inode.chunks] == [0, 4096]


def test_reader_errors_surface_in_chunk_order_after_earlier_chunks():
    sink = _CopyingSink()
    good, bad, later = Inode(0o100644), Inode(0o100644), Inode(0o100644)

    def failing(view):
        raise RuntimeError("cannot read the second file")

    with pytest.raises(RuntimeError, match="second file"):
        with ChunkPipeline(sink, digester=Digester.BLAKE3, compressor=Compressor.NONE, workers=2,
                           batch_bytes=1) as p:
            p.submit_read(good, 0, 100, _reader(b"a" * 100))
            p.submit_read(bad, 0, 100, failing)
            p.submit_read(later, 0, 100, _reader(b"c" * 100))
    assert len(good.chunks) == 1 and bad.chunks == [] and later.chunks == []


def test_submit_read_refuses_empty_chunks():
    with ChunkPipeline(_Sink(), digester=Digester.BLAKE3, compressor=Compressor.NONE, workers=1) as p:
        with pytest.raises(ValueError):
            p.submit_read(Inode(0o100644), 0, 0, _reader(b""))


def test_chunks_starting_a_file_share_the_sinks_record():
    a = _data(3000, 5)
    sink = _CopyingSink()
    f1, f2 = Inode(0o100644), Inode(0o100644)
    with ChunkPipeline(sink, digester=Digester.BLAKE3, compressor=Compressor.NONE, workers=1) as p:
        p.submit(f1, 0, a)
        p.submit(f2, 0, a)       # duplicate at offset 0: same record object
        p.submit(f2, 3000, a)    # duplicate elsewhere: its own file offset
    assert f1.chunks[0] is f2.chunks[0]
    assert f2.chunks[1].file_offset == 3000 and f2.chunks[1].index == f1.chunks[0].index
