"""Per-instance filesystem counters, named and shaped as nydusd's ``/api/v1/metrics`` family.

One :class:`FsMetrics` per mounted instance (nydus-surface.md §3.5): the FUSE
server bumps its ``fop_hits``/``fop_errors`` lists for every request on the
instance (see ``Operations.counters``), the VFS records every READ:

* ``fop_hits`` / ``fop_errors``: 15 counters in upstream's FOP order
  (:data:`FOPS`; READ is index 4, which the smoke tests check);
* ``data_read``, ``block_count_read`` (8 read-size buckets), ``nr_opens``,
  ``read_latency_dist`` (8 latency buckets) and the cumulative latency per FOP,
  recorded for READ (timing every GETATTR would cost more than it tells);
* with ``iostats_files``: per-inode READ counters (``/metrics/files``); with
  ``access_pattern``: first access time and read count per inode
  (``/metrics/pattern``); with ``latest_read_files``: the inodes read since the
  last ``?latest=true`` query, which clears them.

Recording is plain integer arithmetic on the event loop: no locks.
"""

from __future__ import annotations

import time
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field

from ..utils.fops import FOPS

__all__ = ["FOPS", "FOP_INDEX", "FsMetrics", "SIZE_BUCKETS", "LATENCY_BUCKETS_US"]

FOP_INDEX = {name: i for i, name in enumerate(FOPS)}
#: Upper bounds of the read-size buckets (<1K, <4K, <16K, <64K, <128K, <512K, <1M, >=1M).
SIZE_BUCKETS = (1 << 10, 4 << 10, 16 << 10, 64 << 10, 128 << 10, 512 << 10, 1 << 20)
#: Upper bounds of the latency buckets in µs (≤200µs, ≤1ms, ≤20ms, ≤50ms, ≤500ms, ≤1s, ≤2s, >2s).
LATENCY_BUCKETS_US = (200, 1_000, 20_000, 50_000, 500_000, 1_000_000, 2_000_000)


@dataclass(eq=False)
class _FileStats:
    total_fops: int = 0
    data_read: int = 0
    block_count_read: list[int] = field(default_factory=lambda: [0] * 8)
    fop_hits: list[int] = field(default_factory=lambda: [0] * len(FOPS))
    fop_errors: list[int] = field(default_factory=lambda: [0] * len(FOPS))


class FsMetrics:
    """Counters of one instance; ``id`` is its pseudo mountpoint (nydus-surface.md §0 item 7)."""

    def __init__(self, id: str, *, files: bool = False, access_pattern: bool = False,
                 latest_read_files: bool = False) -> None:
        self.id = id
        self.files_account_enabled = files
        self.access_pattern_enabled = access_pattern
        self.record_latest_read_files_enabled = latest_read_files
        self.fop_hits = [0] * len(FOPS)
        self.fop_errors = [0] * len(FOPS)
        self.fop_cumulative_latency_total = [0] * len(FOPS)
        self.data_read = 0
        self.block_count_read = [0] * 8
        self.read_latency_dist = [0] * 8
        self._files: dict[int, _FileStats] = {}
        self._pattern: dict[int, list[int]] = {}   # ino -> [nr_read, secs, nanos]
        self._latest: set[int] = set()
        self._per_inode = files or access_pattern or latest_read_files

    def read(self, ino: int, size: int, elapsed_ns: int) -> None:
        """A READ of ``size`` bytes on ``ino`` that took ``elapsed_ns`` (``fop_hits`` is the server's).

        On every READ: the common case is a few additions and two C-level
        bisections; the per-inode families cost only when enabled.
        """
        self.data_read += size
        self.block_count_read[bisect_right(SIZE_BUCKETS, size)] += 1
        us = elapsed_ns // 1000
        self.read_latency_dist[bisect_left(LATENCY_BUCKETS_US, us)] += 1
        self.fop_cumulative_latency_total[4] += us
        if self._per_inode:
            self._read_per_inode(ino, size)

    def _read_per_inode(self, ino: int, size: int) -> None:
        if self.files_account_enabled:
            st = self._files.get(ino)
            if st is None:
                st = self._files[ino] = _FileStats()
            st.total_fops += 1
            st.fop_hits[FOP_INDEX["read"]] += 1
            st.data_read += size
            st.block_count_read[bisect_right(SIZE_BUCKETS, size)] += 1
        if self.access_pattern_enabled:
            p = self._pattern.get(ino)
            if p is None:
                now = time.time_ns()
                self._pattern[ino] = [1, now // 10**9, now % 10**9]
            else:
                p[0] += 1
        if self.record_latest_read_files_enabled:
            self._latest.add(ino)

    # -- JSON, field names exactly as upstream serialises them ---------------------------
    def to_json(self) -> dict:
        return {
            "files_account_enabled": self.files_account_enabled,
            "access_pattern_enabled": self.access_pattern_enabled,
            "record_latest_read_files_enabled": self.record_latest_read_files_enabled,
            "measure_latency": True,
            "id": self.id,
            "nr_opens": self.fop_hits[FOP_INDEX["open"]],
            "data_read": self.data_read,
            "block_count_read": list(self.block_count_read),
            "fop_hits": list(self.fop_hits),
            "fop_errors": list(self.fop_errors),
            "fop_cumulative_latency_total": list(self.fop_cumulative_latency_total),
            "read_latency_dist": list(self.read_latency_dist),
        }

    def files_json(self) -> dict:
        return {str(ino): {"total_fops": st.total_fops, "data_read": st.data_read,
                           "block_count_read": list(st.block_count_read), "fop_hits": list(st.fop_hits),
                           "fop_errors": list(st.fop_errors)}
                for ino, st in sorted(self._files.items())}

    def take_latest(self) -> list[list[int]]:
        """The inodes read since the last call, as ``[ino]`` / ``[start, end]`` ranges; clears them."""
        inos, self._latest = sorted(self._latest), set()
        out: list[list[int]] = []
        for ino in inos:
            if out and out[-1][-1] + 1 == ino:
                if len(out[-1]) == 1:
                    out[-1].append(ino)
                else:
                    out[-1][1] = ino
            else:
                out.append([ino])
        return out

    def pattern_json(self) -> list[dict]:
        return [{"ino": ino, "nr_read": p[0], "first_access_time_secs": p[1],
                 "first_access_time_nanos": p[2]} for ino, p in sorted(self._pattern.items())]
