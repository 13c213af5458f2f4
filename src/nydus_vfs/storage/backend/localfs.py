"""The ``localfs`` backend: blobs are plain files on a local filesystem.

Configuration (reference/nydus-surface.md §2.3): ``blob_file`` serves *every*
blob id from one file; otherwise blob ``<id>`` is ``dir/<id>``, and when that
does not exist, ``alt_dir/<id>`` for each of ``alt_dirs`` in order.

Files are opened ``O_RDONLY | O_CLOEXEC | O_NONBLOCK`` once and the fd is kept
for the backend's lifetime (blob files are immutable, so the size taken at open
time stays valid).  Only regular files are served: ``O_NONBLOCK`` keeps the open
of a FIFO from waiting for a writer (which would freeze the event loop, and with
it the whole daemon), and the ``fstat`` right after the open refuses FIFOs,
sockets, devices and directories with a non-retryable ``BackendError`` naming
the path and what is there.  Reads are ``pread`` done inline: local disk reads are short and
a thread hop would cost more than it saves; the ``async`` signature stays so
the blob device treats every backend alike, and :meth:`LocalfsBackend.read_sync`
/ :meth:`LocalfsBackend.file_segment` give the device a loop-free and a
zero-copy path.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from collections.abc import Hashable, Sequence

from ...errors import BackendError, BackendNotFoundError, ConfigError
from ...utils.io import FileSegment
from .base import BlobBackend, RetryPolicy, backend_error_from_os, check_blob_id

__all__ = ["LocalfsBackend"]

_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | os.O_NONBLOCK

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return f"not a regular file (mode {mode:#o})"


def _not_regular(blob_id: str, path: str, mode: int) -> BackendError:
    return BackendError(f"localfs: blob {blob_id} at {path} is {_kind(mode)}, not a regular file",
                        retryable=False)


class LocalfsBackend(BlobBackend):
    """Blobs as files under ``dir`` (then ``alt_dirs``), or one ``blob_file`` for all ids.

    Raises ``ConfigError`` when neither ``dir`` nor ``blob_file`` is given.
    Paths are resolved to absolute form at construction so that a later
    ``chdir`` does not change what is served and :attr:`identity` compares
    equal for the same locations.
    """

    type_name = "localfs"
    supports_sync = True

    def __init__(
        self,
        dir: str | os.PathLike[str] | None = None,
        blob_file: str | os.PathLike[str] | None = None,
        alt_dirs: Sequence[str | os.PathLike[str]] = (),
        *,
        retry: RetryPolicy | None = None,
    ) -> None:
        if not dir and not blob_file:
            raise ConfigError("localfs backend: one of 'dir' or 'blob_file' is required")
        super().__init__(retry=retry)
        self.dir = os.path.abspath(dir) if dir else None
        self.blob_file = os.path.abspath(blob_file) if blob_file else None
        self.alt_dirs = tuple(os.path.abspath(d) for d in alt_dirs if d)
        # blob id -> (fd, size); with blob_file every id maps to the same entry.
        self._files: dict[str, tuple[int, int]] = {}

    @property
    def identity(self) -> Hashable:
        return ("localfs", self.dir, self.blob_file, self.alt_dirs)

    def close(self) -> None:
        files, self._files = self._files, {}
        for fd in {fd for fd, _ in files.values()}:
            try:
                os.close(fd)
            except OSError:
                pass
        super().close()

    # -- opening -------------------------------------------------------------------
    def _candidates(self, blob_id: str) -> list[str]:
        if self.blob_file:
            return [self.blob_file]
        dirs = ([self.dir] if self.dir else []) + list(self.alt_dirs)
        return [os.path.join(d, blob_id) for d in dirs]

    def _open(self, blob_id: str) -> tuple[int, int]:
        entry = self._files.get(blob_id)
        if entry is not None:
            return entry
        check_blob_id(blob_id)
        self._check_open()
        key = "" if self.blob_file else blob_id
        entry = self._files.get(key)
        if entry is None:
            entry = self._open_first(blob_id)
            self._files[key] = entry
        self._files[blob_id] = entry
        return entry

    def _open_first(self, blob_id: str) -> tuple[int, int]:
        tried = self._candidates(blob_id)
        for path in tried:
            try:
                fd = os.open(path, _OPEN_FLAGS)
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    # open(2) gives ENXIO for a unix socket (and a FIFO without a writer
                    # when opened for writing): say what is at the path.
                    try:
                        mode = os.stat(path).st_mode
                    except OSError:
                        mode = 0
                    if mode and not stat.S_ISREG(mode):
                        raise _not_regular(blob_id, path, mode) from None
                raise backend_error_from_os(exc, f"localfs: open blob {blob_id} at {path}") from None
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise _not_regular(blob_id, path, st.st_mode)
                # Regular files ignore O_NONBLOCK for reads; clear it anyway so the fd
                # handed to splice/sendfile behaves like a plain one.
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
            except BackendError:
                os.close(fd)
                raise
            except OSError as exc:
                os.close(fd)
                raise backend_error_from_os(exc, f"localfs: stat blob {blob_id} at {path}") from None
            return fd, st.st_size
        raise BackendNotFoundError(f"localfs: blob {blob_id} not found (looked at {', '.join(tried)})")

    # -- I/O -----------------------------------------------------------------------
    def _checked_range(self, blob_id: str, offset: int, size: int) -> int:
        fd, blob_size = self._open(blob_id)
        if offset + size > blob_size:
            raise BackendError(
                f"localfs: blob {blob_id}: range [{offset}, +{size}) ends past the end "
                f"of the {blob_size}-byte blob",
                retryable=False,
            )
        return fd

    def _pread(self, blob_id: str, offset: int, size: int) -> bytes:
        fd = self._checked_range(blob_id, offset, size)
        try:
            data = os.pread(fd, size, offset)
        except OSError as exc:
            raise backend_error_from_os(exc, f"localfs: read blob {blob_id} [{offset}, +{size})") from None
        if len(data) != size:
            return self._finish_short(fd, blob_id, offset, size, data)
        return data

    def _finish_short(self, fd: int, blob_id: str, offset: int, size: int, first: bytes) -> bytes:
        """Complete a short ``pread`` (legal, e.g. on network filesystems) or say why it cannot be.

        Reading on from where it stopped either succeeds, fails with the
        errno that cut it short (reported as such), or hits end of file: then
        the file really is shorter now than when it was opened.
        """
        parts = [first]
        got = len(first)
        while got < size:
            try:
                more = os.pread(fd, size - got, offset + got)
            except OSError as exc:
                raise backend_error_from_os(
                    exc, f"localfs: read blob {blob_id} [{offset}, +{size}) failed after {got} bytes") from None
            if not more:
                try:
                    now = f"{os.fstat(fd).st_size} bytes"
                except OSError as exc:
                    now = f"of unknown size ({exc.strerror})"
                opened = self._files[blob_id][1] if blob_id in self._files else -1
                raise BackendError(
                    f"localfs: blob {blob_id}: end of file after {got} of {size} bytes at offset {offset}: "
                    f"the file is now {now}, it was {opened} bytes when opened (truncated while in use)",
                    retryable=False,
                )
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def _check_known(self, blob_id: str, offset: int, size: int) -> None:
        # Per-chunk path: an id already opened was checked when it was opened.
        if blob_id not in self._files or self._closed or offset < 0 or size < 0:
            self._check_args(blob_id, offset, size)

    def read_sync(self, blob_id: str, offset: int, size: int) -> bytes:
        self._check_known(blob_id, offset, size)
        started = time.monotonic()
        try:
            data = self._pread(blob_id, offset, size)
        except BackendError as exc:
            self._record_failure(blob_id, offset, size, exc)
            raise
        self.metrics.record_read(size, started)
        return data

    def file_segment(self, blob_id: str, offset: int, size: int) -> FileSegment:
        """The range as a segment of the blob file itself (checked to lie inside it)."""
        self._check_known(blob_id, offset, size)
        return FileSegment(self._checked_range(blob_id, offset, size), offset, size)

    async def _read(self, blob_id: str, offset: int, size: int) -> bytes:
        return self._pread(blob_id, offset, size)

    async def _blob_size(self, blob_id: str) -> int:
        return self._open(blob_id)[1]
