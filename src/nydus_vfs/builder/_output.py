"""Output files that appear all at once or not at all.

Every artifact is written to a hidden temp file in its destination directory
and renamed into place only when the whole build succeeded, so a failed build
leaves no half-written bootstrap or blob behind (and never clobbers an
existing good one).  The one exception is an output that is a stream (a FIFO
the caller reads from): it is written directly.
"""

from __future__ import annotations

import os
import stat
import tempfile
from typing import BinaryIO

from ..errors import BuildError

__all__ = ["PendingFile", "Outputs", "write_atomically"]


def _is_stream(path: str | None) -> bool:
    try:
        mode = os.stat(path).st_mode if path else 0
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)


class PendingFile:
    """A temp file that becomes ``final`` on :meth:`commit` (``final`` may be set late).

    When ``final`` already exists as a FIFO or character device (the
    converter hands ``--blob`` a FIFO and streams it into the layer), there is
    nothing to rename: the data is written straight into it.
    """

    def __init__(self, directory: str, final: str | None = None) -> None:
        self.directory = directory or "."
        self.final = final
        self.committed = False
        self.direct = _is_stream(final)
        if self.direct:
            try:
                self.file: BinaryIO = open(final, "wb")  # type: ignore[arg-type]
            except OSError as exc:
                raise BuildError(f"cannot open {final!r} for writing: {exc.strerror}") from None
            self.tmp = ""
            return
        try:
            fd, self.tmp = tempfile.mkstemp(prefix=".nydus-image-", suffix=".tmp", dir=self.directory)
        except OSError as exc:
            raise BuildError(f"cannot create a file in {self.directory!r}: {exc.strerror}") from None
        self.file = os.fdopen(fd, "wb")

    def commit(self, final: str | None = None) -> str:
        if final is not None and not self.direct:
            self.final = final
        if self.final is None:
            raise BuildError("internal: output has no name")
        if self.direct:
            self.file.close()
            self.committed = True
            return self.final
        if not self.file.closed:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
        os.chmod(self.tmp, 0o644)
        try:
            os.replace(self.tmp, self.final)
        except OSError as exc:
            raise BuildError(f"cannot move the output into place at {self.final!r}: {exc.strerror}") from None
        self.committed = True
        return self.final

    def discard(self) -> None:
        if not self.file.closed:
            self.file.close()
        if not self.committed and not self.direct:
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass


class Outputs:
    """All pending outputs of one command: commit them together or discard them all."""

    def __init__(self) -> None:
        self._files: list[PendingFile] = []

    def new(self, directory: str, final: str | None = None) -> PendingFile:
        f = PendingFile(directory, final)
        self._files.append(f)
        return f

    def discard_all(self) -> None:
        for f in self._files:
            f.discard()

    def __enter__(self) -> "Outputs":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Anything not committed by now is abandoned, success or not.
        self.discard_all()


def write_atomically(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same directory."""
    f = PendingFile(os.path.dirname(os.path.abspath(path)), path)
    try:
        f.file.write(data)
        f.commit()
    finally:
        f.discard()
