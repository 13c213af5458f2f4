"""FsMetrics: upstream's buckets, FOP order, and the per-inode families (nydus-surface.md §3.5)."""

from __future__ import annotations

from nydus_vfs.fs.metrics import FOP_INDEX, FOPS, FsMetrics


def test_fop_order_is_upstreams():
    assert FOPS[4] == "read" and len(FOPS) == 15 and FOP_INDEX["batch_forget"] == 14


def test_size_and_latency_buckets_at_their_edges():
    m = FsMetrics("/m")
    for size in (0, 1023, 1024, 4095, 4096, 1 << 20, 5 << 20):
        m.read(1, size, 0)
    assert m.block_count_read == [2, 2, 1, 0, 0, 0, 0, 2]
    for us in (200, 201, 1000, 1001, 20_000, 2_000_000, 2_000_001):
        m.read(1, 0, us * 1000)
    # <=200us, <=1ms, <=20ms, <=50ms, <=500ms, <=1s, <=2s, >2s; the first seven reads took 0 us.
    assert m.read_latency_dist == [8, 2, 2, 0, 0, 0, 1, 1]
    assert m.data_read == sum((0, 1023, 1024, 4095, 4096, 1 << 20, 5 << 20))
    doc = m.to_json()
    assert doc["id"] == "/m" and doc["fop_hits"] == [0] * 15 and doc["measure_latency"] is True


def test_per_inode_families_only_when_enabled():
    off = FsMetrics("/a")
    off.read(5, 10, 0)
    assert off.files_json() == {} and off.pattern_json() == [] and off.take_latest() == []
    on = FsMetrics("/b", files=True, access_pattern=True, latest_read_files=True)
    for ino in (5, 6, 7, 9, 5):
        on.read(ino, 100, 0)
    files = on.files_json()
    assert files["5"]["data_read"] == 200 and files["5"]["fop_hits"][4] == 2 and files["9"]["total_fops"] == 1
    assert [(p["ino"], p["nr_read"]) for p in on.pattern_json()] == [(5, 2), (6, 1), (7, 1), (9, 1)]
    assert on.take_latest() == [[5, 7], [9]]
    assert on.take_latest() == [], "latest=true clears the set"
