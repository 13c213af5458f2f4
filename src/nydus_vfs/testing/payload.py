"""``BytesPayload``: a :class:`~nydus_vfs.utils.io.WritePayload` held in memory, for tests."""

from __future__ import annotations

import os

__all__ = ["BytesPayload"]


class _State:
    __slots__ = ("released", "copies", "pwrites")

    def __init__(self) -> None:
        self.released = False
        self.copies = 0
        self.pwrites = 0


class BytesPayload:
    """WRITE data as the virtio-fs transport hands it over, but held in ``bytes``.

    It behaves like the transport's guest-memory payload: ``len``, contiguous
    slices (sharing the original's lifetime), ``pwrite(fd, offset)`` (one
    ``os.pwrite``) and ``tobytes()``; after :meth:`release` (the transport's
    push) every method but ``len`` raises ``ValueError``.  ``copies`` and
    ``pwrites`` count the calls made through it and all its slices, so a test
    can check that a filesystem or server moved the data without copying it.
    """

    __slots__ = ("_data", "_state")

    def __init__(self, data: bytes, _state: _State | None = None) -> None:
        self._data = bytes(data)
        self._state = _State() if _state is None else _state

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"<BytesPayload of {len(self._data)} bytes{' (released)' if self._state.released else ''}>"

    def _live(self) -> None:
        if self._state.released:
            raise ValueError("operation on a released WRITE payload")

    def __getitem__(self, key: slice) -> BytesPayload:
        self._live()
        if type(key) is not slice or key.step not in (None, 1):
            raise TypeError("a WRITE payload only supports contiguous slices")
        return BytesPayload(self._data[key], self._state)

    def pwrite(self, fd: int, offset: int) -> int:
        self._live()
        self._state.pwrites += 1
        return os.pwrite(fd, self._data, offset)

    def tobytes(self) -> bytes:
        self._live()
        self._state.copies += 1
        return self._data

    def release(self) -> None:
        """End the lifetime, as the transport does when it pushes the request."""
        self._state.released = True

    @property
    def released(self) -> bool:
        return self._state.released

    @property
    def copies(self) -> int:
        return self._state.copies

    @property
    def pwrites(self) -> int:
        return self._state.pwrites
