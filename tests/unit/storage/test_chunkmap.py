"""The persisted chunk readiness map (nydusd's PersistMap layout)."""

from __future__ import annotations

import logging
import os
import struct

import pytest

from nydus_vfs.errors import FormatError, StorageError
from nydus_vfs.format.types import ChunkInfo
from nydus_vfs.storage._chunkmap import (
    CHUNK_MAP_ALL_READY,
    CHUNK_MAP_HEADER_SIZE,
    CHUNK_MAP_MAGIC,
    CHUNK_MAP_MAGIC2,
    ChunkMapHeader,
    IndexedChunkMap,
    MemoryChunkMap,
)


def chunk(index: int, uoff: int = 0, usize: int = 4096) -> ChunkInfo:
    return ChunkInfo(b"", 0, index, 0, 0, usize, uoff, usize, 0)


def test_header_round_trip_and_layout():
    h = ChunkMapHeader(chunk_count=20)
    raw = h.to_bytes()
    assert len(raw) == CHUNK_MAP_HEADER_SIZE
    assert struct.unpack_from("<IIIII", raw) == (CHUNK_MAP_MAGIC, 1, CHUNK_MAP_MAGIC2, 0, 20)
    assert ChunkMapHeader.from_bytes(raw) == h
    h.validate(20)


@pytest.mark.parametrize(
    ("fields", "field_name"),
    [({"magic": 1}, "magic"), ({"version": 2}, "version"), ({"magic2": 0}, "magic2"),
     ({"chunk_count": 3}, "chunk_count")],
)
def test_header_validate_names_the_field(fields, field_name):
    with pytest.raises(FormatError, match=rf"ChunkMapHeader\.{field_name}"):
        ChunkMapHeader(**{"chunk_count": 20, **fields}).validate(20)


def test_header_too_short():
    with pytest.raises(FormatError, match="size"):
        ChunkMapHeader.from_bytes(b"\0" * 100)


def test_bits_persist_msb_first(tmp_path):
    path = str(tmp_path / "x.chunk_map")
    m = IndexedChunkMap(path, 10)
    assert m.discarded is None and m.ready_count == 0
    m.set_ready(chunk(0))
    m.set_ready(chunk(9))
    m.set_ready(chunk(9))  # idempotent
    assert m.ready_count == 2 and not m.all_ready
    m.close()
    raw = open(path, "rb").read()
    assert len(raw) == CHUNK_MAP_HEADER_SIZE + 2
    assert raw[CHUNK_MAP_HEADER_SIZE:] == bytes([0x80, 0x40])
    m = IndexedChunkMap(path, 10)
    assert [m.is_ready(chunk(i)) for i in range(10)] == [True] + [False] * 8 + [True]
    assert m.ready_count == 2
    m.close()


def test_all_ready_is_recorded_and_survives(tmp_path):
    path = str(tmp_path / "x.chunk_map")
    m = IndexedChunkMap(path, 3)
    for i in range(3):
        m.set_ready(chunk(i))
    assert m.all_ready
    m.close()
    assert struct.unpack_from("<I", open(path, "rb").read(), 12)[0] == CHUNK_MAP_ALL_READY
    m = IndexedChunkMap(path, 3)
    assert m.all_ready and m.is_ready(chunk(1))
    m.clear(chunk(1))
    assert not m.all_ready and not m.is_ready(chunk(1)) and m.is_ready(chunk(2))
    m.close()
    m = IndexedChunkMap(path, 3)
    assert m.ready_count == 2
    m.close()


def test_out_of_range_index_is_a_storage_error(tmp_path):
    m = IndexedChunkMap(str(tmp_path / "m"), 4)
    for bad in (-1, 4, 1 << 30):
        with pytest.raises(StorageError, match=f"chunk index {bad} is outside"):
            m.is_ready(chunk(bad))
        with pytest.raises(StorageError):
            m.set_ready(chunk(bad))
    m.close()


@pytest.mark.parametrize("damage", ["size", "magic", "magic2", "version", "count"])
def test_foreign_or_corrupt_maps_are_discarded(tmp_path, caplog, damage):
    path = str(tmp_path / "m")
    m = IndexedChunkMap(path, 16)
    m.set_ready(chunk(3))
    m.close()
    raw = bytearray(open(path, "rb").read())
    if damage == "size":
        raw += b"\0"
    elif damage == "magic":
        raw[0] ^= 0xFF
    elif damage == "magic2":
        raw[8] ^= 0xFF
    elif damage == "version":
        raw[4] = 9
    else:
        raw[16:20] = (17).to_bytes(4, "little")
    open(path, "wb").write(raw)
    with caplog.at_level(logging.WARNING, logger="nydus_vfs.storage"):
        m = IndexedChunkMap(path, 16)
    assert m.discarded and m.ready_count == 0 and not m.is_ready(chunk(3))
    assert "discarded" in caplog.text and path in caplog.text
    m.close()
    assert os.path.getsize(path) == CHUNK_MAP_HEADER_SIZE + 2
    assert ChunkMapHeader.from_bytes(open(path, "rb").read()).chunk_count == 16


def test_map_written_by_nydusd_without_chunk_count_is_accepted(tmp_path):
    # nydusd leaves our chunk_count field (its reserved area) zero.
    path = tmp_path / "m"
    header = ChunkMapHeader(chunk_count=0).to_bytes()
    path.write_bytes(header + bytes([0x20]))
    m = IndexedChunkMap(str(path), 8)
    assert m.discarded is None and m.is_ready(chunk(2)) and m.ready_count == 1
    m.close()


def test_zero_filled_file_is_a_crash_leftover_not_a_foreign_map(tmp_path, caplog):
    path = tmp_path / "m"
    path.write_bytes(bytes(CHUNK_MAP_HEADER_SIZE + 1))
    with caplog.at_level(logging.WARNING, logger="nydus_vfs.storage"):
        m = IndexedChunkMap(str(path), 8)
    assert m.discarded is None and caplog.text == ""
    m.close()


def test_stray_bits_past_the_last_chunk_are_not_counted(tmp_path):
    path = tmp_path / "m"
    path.write_bytes(ChunkMapHeader(chunk_count=3).to_bytes() + bytes([0xFF]))
    m = IndexedChunkMap(str(path), 3)
    assert m.ready_count == 3 and m.all_ready
    m.close()


def test_reset_forgets_everything(tmp_path):
    m = IndexedChunkMap(str(tmp_path / "m"), 9)
    m.set_ready(chunk(8))
    m.reset()
    assert m.ready_count == 0 and not m.is_ready(chunk(8))
    m.close()


def test_unopenable_path():
    with pytest.raises(StorageError, match="cannot open chunk map"):
        IndexedChunkMap("/nonexistent-dir/x/y", 4)
    with pytest.raises(ValueError):
        IndexedChunkMap("/tmp/unused", 0)


def test_memory_map_keys_on_the_uncompressed_range():
    m = MemoryChunkMap()
    a = chunk(0, uoff=0, usize=100)
    b = chunk(0, uoff=100, usize=50)  # same (untrustworthy) index, different chunk
    m.set_ready(a)
    assert m.is_ready(a) and not m.is_ready(b) and m.ready_count == 1 and not m.all_ready
    m.clear(a)
    assert not m.is_ready(a)
