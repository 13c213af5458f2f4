"""Background prefetch: an image's chunks fetched into the blob cache before anyone reads them.

Entry point (the service creates, owns and cancels the task)::

    cfg = prefetch_config(daemon_config)                  # rafs.prefetch / cache.prefetch merged
    task = asyncio.create_task(prefetch_rafs(fs, prefetch_files, cfg))
    ...
    task.cancel()                                         # on umount, before fs.close()
    await asyncio.gather(task, return_exceptions=True)

``async def prefetch_rafs(fs: RafsFs, files: Sequence[str] | None, cfg: PrefetchConfig)
-> PrefetchReport`` never raises except ``CancelledError``; failures are logged
(rate-limited) and counted in the report.  Cancelling it stops its workers at
once; a chunk whose backend request was in flight is handed back to any
foreground reader waiting for it, who then fetches it itself.  It leaves no
task or fd behind.

What is prefetched, in this order (nydus-surface.md §0 item 11, §2.2, §2.5):

1. ``files`` (``--prefetch-files`` / the mount body's ``prefetch_files``:
   absolute paths; a directory means its whole subtree; a missing path is
   logged and skipped) when given, else the image's prefetch table (v5 inode
   numbers, v6 nids; rafs-format.md §1.9, §2.11: a v6 list holding only the
   root means everything), else the blobs' readahead windows (v5 blob table,
   ``--prefetch-policy blob``, rafs-format.md §1.6);
2. with ``prefetch_all`` (true by default for a v1 ``fs_prefetch`` table),
   every other regular file of the image.

How: the chunks are grouped per blob, deduplicated, and handed to
``threads`` worker coroutines (bounded concurrency) that each call
:meth:`~nydus_vfs.storage.BlobDevice.fetch_chunks`: neighbouring chunks of
one blob become one backend request of at most ``batch_size`` (v1
``merging_size``) bytes.  ``bandwidth_limit`` (v1 ``bandwidth_rate``, bytes/s,
0 = unlimited, raised to the chunk size when smaller) paces the requests.
Foreground reads never queue behind this: they go to the backend directly,
and only wait when they need a chunk whose request is already in flight
(single flight).  Blobs without a file cache are not prefetched (the
in-memory chunk cache is too small to be worth filling).

Counters go to ``fs.device.metrics`` under nydusd's names
(``prefetch_data_amount``, ``prefetch_requests_count``, ``prefetch_workers``,
``prefetch_unmerged_chunks``, ``prefetch_*_time_*``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import stat
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from ..config import DaemonConfig, PrefetchConfig
from ..errors import FormatError, FsError
from ..utils.ratelog import LogLimiter
from .rafs import RafsFs

__all__ = ["PrefetchReport", "prefetch_config", "prefetch_rafs"]

log = logging.getLogger("nydus_vfs.fs")

#: Workers when the config says 0 (nydusd's default ``threads_count``).
DEFAULT_WORKERS = 8
# Chunks handed to a worker at once when merging is off, and the most bytes
# one work item covers when it is on (the device splits it into requests).
_ITEM_CHUNKS = 64
# Inodes planned between two yields to the event loop.
_YIELD_EVERY = 256


@dataclass(slots=True)
class PrefetchReport:
    """What one :func:`prefetch_rafs` run did."""

    skipped: str = ""            # why nothing was done ("" when it ran)
    missing: list[str] = field(default_factory=list)   # requested paths not in the image
    inodes: int = 0              # regular files planned
    chunks: int = 0              # distinct chunks planned (cached or not)
    fetched_chunks: int = 0
    fetched_bytes: int = 0
    requests: int = 0
    errors: int = 0


def prefetch_config(config: DaemonConfig) -> PrefetchConfig:
    """The prefetch settings one RAFS mount runs with.

    ``rafs.prefetch`` (v1 ``fs_prefetch``) decides the worker count, merge
    size and bandwidth when enabled, else the blob-level ``cache.prefetch``;
    ``prefetch_all`` holds when either enabled section asks for it.
    """
    r = config.rafs.prefetch if config.rafs is not None else PrefetchConfig()
    c = config.cache.prefetch if config.cache is not None else PrefetchConfig()
    base = r if r.enable else c
    return dataclasses.replace(
        base, enable=r.enable or c.enable,
        prefetch_all=(r.enable and r.prefetch_all) or (c.enable and c.prefetch_all))


class _Pacer:
    """Spaces requests so that on average at most ``rate`` bytes/s are asked for."""

    def __init__(self, rate: int) -> None:
        self._rate = rate
        self._next = 0.0

    async def wait(self, nbytes: int) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        start = max(now, self._next)
        self._next = start + nbytes / self._rate
        if start > now:
            await asyncio.sleep(start - now)


def _now_parts() -> tuple[int, int]:
    t = time.time()
    return int(t), int(t * 1000)


async def prefetch_rafs(fs: RafsFs, files: Sequence[str] | None, cfg: PrefetchConfig) -> PrefetchReport:
    """Prefetch ``files`` (else the image's prefetch table) and, with ``prefetch_all``, the rest.

    See the module docstring for the contract.
    """
    report = PrefetchReport()
    if not cfg.enable:
        report.skipped = "prefetch is not enabled"
        return report
    device = fs.device
    if device is None or device.closed:
        report.skipped = "the filesystem is closed"
        return report
    wanted = [i for i in range(len(device.blobs)) if device.has_file_cache(i)]
    if not wanted:
        report.skipped = "no blob cache (cache type '' or dummycache)"
        log.info("%s: prefetch skipped: %s", fs.source, report.skipped)
        return report

    workers = cfg.threads or DEFAULT_WORKERS
    merging = cfg.batch_size
    rate = cfg.bandwidth_limit
    if 0 < rate < fs.chunk_size:
        rate = fs.chunk_size
    pacer = _Pacer(rate) if rate else None
    metrics = device.metrics
    metrics.prefetch_workers = workers
    metrics.prefetch_begin_time_secs, metrics.prefetch_begin_time_millis = _now_parts()
    started = time.monotonic()
    limiter = LogLimiter(log)
    queue: asyncio.Queue = asyncio.Queue(maxsize=2 * workers)

    async def worker() -> None:
        while True:
            item = await queue.get()
            if item is None:
                return
            if device.closed:
                continue  # unmounted under us: drain the queue so the planner can finish
            index, chunks = item
            need = [c for c in chunks if not device.is_cached(c)]
            if not need:
                continue
            if pacer is not None:
                await pacer.wait(sum(c.compressed_size for c in need))
            try:
                stats = await device.fetch_chunks(index, need, merging)
            except Exception as exc:  # noqa: BLE001 - prefetch must never take the daemon down
                if device.closed:
                    continue
                report.errors += 1
                limiter.log(logging.WARNING, ("blob", index), "%s: prefetch of blob %s failed: %s",
                            fs.source, device.blobs[index].blob_id, exc)
                continue
            report.fetched_chunks += stats.chunks
            report.fetched_bytes += stats.bytes
            report.requests += stats.requests
            metrics.prefetch_data_amount += stats.bytes
            metrics.prefetch_requests_count += stats.requests
            metrics.prefetch_unmerged_chunks += stats.chunks
            for exc in stats.errors:
                report.errors += 1
                limiter.log(logging.WARNING, ("blob", index, type(exc).__name__),
                            "%s: prefetch from blob %s failed (readers fetch on demand): %s",
                            fs.source, device.blobs[index].blob_id, exc)

    async def producer() -> None:
        try:
            await _plan(fs, files, cfg.prefetch_all, set(wanted), merging, queue, report)
        finally:
            for _ in range(workers):
                await queue.put(None)

    tasks = [asyncio.create_task(worker(), name=f"prefetch-worker-{n}") for n in range(workers)]
    tasks.append(asyncio.create_task(producer(), name="prefetch-planner"))
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    finally:
        elapsed = int((time.monotonic() - started) * 1000)
        metrics.prefetch_cumulative_time_millis += elapsed
        metrics.prefetch_end_time_secs, metrics.prefetch_end_time_millis = _now_parts()
    if not device.closed:
        device.flush()
    log.info("%s: prefetch done: %d files, %d chunks planned, %d fetched (%d bytes in %d requests), "
             "%d errors, %d ms", fs.source, report.inodes, report.chunks, report.fetched_chunks,
             report.fetched_bytes, report.requests, report.errors, elapsed)
    return report


async def _plan(fs: RafsFs, files: Sequence[str] | None, prefetch_all: bool, blobs: set[int],
                merging: int, queue: asyncio.Queue, report: PrefetchReport) -> None:
    """Feed ``queue`` with ``(blob index, chunks)`` work items in prefetch order."""
    device = fs.device
    seen_chunks: set[tuple[int, int, int]] = set()
    seen_inodes: set[int] = set()
    pending: dict[int, list] = {}   # blob index -> [chunks, compressed bytes]
    limit = merging if merging > 0 else 0

    async def flush(index: int) -> None:
        entry = pending.pop(index, None)
        if entry and entry[0]:
            await queue.put((index, entry[0]))

    async def add_file(ino: int, windows: dict[int, tuple[int, int]] | None) -> None:
        try:
            chunks = fs.bootstrap.chunks(ino)
        except (FormatError, LookupError) as exc:
            report.errors += 1
            log.warning("%s: prefetch skips inode %d: %s", fs.source, ino, exc)
            return
        if device.closed:
            return
        counted = False
        for c in chunks:
            index = c.blob_index
            if index not in blobs:
                continue
            if windows is not None:
                window = windows.get(index)
                if window is None or not window[0] <= c.compressed_offset < window[1]:
                    continue
            if not counted:
                report.inodes += 1
                counted = True
            key = (index, c.uncompressed_offset, c.uncompressed_size)
            if key in seen_chunks:
                continue
            seen_chunks.add(key)
            report.chunks += 1
            if device.is_cached(c):
                continue
            entry = pending.setdefault(index, [[], 0])
            entry[0].append(c)
            entry[1] += c.compressed_size
            if (limit and entry[1] >= limit) or (not limit and len(entry[0]) >= _ITEM_CHUNKS) \
                    or len(entry[0]) >= 4 * _ITEM_CHUNKS:
                await flush(index)

    count = 0
    for ino, windows in _targets(fs, files, prefetch_all, report):
        if device.closed:
            return
        if windows is None:
            if ino in seen_inodes:
                continue
            seen_inodes.add(ino)
        try:
            mode = fs.attr(ino).mode
        except FsError:
            continue
        if stat.S_ISREG(mode):
            await add_file(ino, windows)
        count += 1
        if count % _YIELD_EVERY == 0:
            await asyncio.sleep(0)  # planning a big image must not starve foreground requests
            if device.closed:
                return
    for index in list(pending):
        await flush(index)


def _targets(fs: RafsFs, files: Sequence[str] | None, prefetch_all: bool,
             report: PrefetchReport) -> Iterator[tuple[int, dict[int, tuple[int, int]] | None]]:
    """``(inode, windows)`` to prefetch, in order; directories expand to their subtree.

    ``windows`` is None for "every chunk of the file", else ``{blob index:
    (start, end)}``: only chunks whose compressed offset lies in their blob's
    window (the v5 blob table's ``readahead_offset``/``readahead_size``, written
    by ``--prefetch-policy blob``, used when neither files nor a prefetch
    table name anything).
    """
    if files:
        roots = []
        for path in files:
            ino = _resolve(fs, path)
            if ino is None:
                report.missing.append(path)
                log.warning("%s: prefetch file %s is not in the image; skipped", fs.source, path)
            else:
                roots.append(ino)
    else:
        roots = list(fs.bootstrap.prefetch_inodes)
    for ino in roots:
        for child in _subtree(fs, ino):
            yield child, None
    if not files and not roots:
        windows = {b.index: (b.readahead_offset, b.readahead_offset + b.readahead_size)
                   for b in fs.bootstrap.blobs if b.readahead_size > 0}
        if windows:
            for child in _subtree(fs, fs.root_ino):
                yield child, windows
    if prefetch_all:
        for child in _subtree(fs, fs.root_ino):
            yield child, None


def _subtree(fs: RafsFs, ino: int) -> Iterator[int]:
    try:
        for _path, child, _info in fs.bootstrap.walk(ino):
            yield child
    except (FormatError, LookupError) as exc:
        log.warning("%s: prefetch cannot walk inode %d: %s", fs.source, ino, exc)


def _resolve(fs: RafsFs, path: str) -> int | None:
    """Local inode of absolute ``path`` in ``fs`` (symlinks not followed), or None."""
    ino = fs.root_ino
    for name in path.encode("utf-8", "surrogateescape").split(b"/"):
        if not name or name == b".":
            continue
        try:
            ino = fs.lookup(ino, name).nodeid
        except FsError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                log.warning("%s: prefetch file %s: %s", fs.source, path, exc)
            return None
    return ino
