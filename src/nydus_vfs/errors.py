"""The error vocabulary of nydus_vfs: one root, one branch per layer.

Names say who is at fault and whether trying again can help:

* ``ConfigError``      the operator gave us a bad config or command line.
* ``FormatError``      bytes on disk (bootstrap, blob meta, tar) are not what the
                       format allows.  Always names the structure, the field and
                       the bad value, so a corrupt image can be diagnosed from the log.
* ``FsError``          the *only* exception allowed to cross the FUSE boundary: it
                       carries an errno and nothing else reaches the kernel/guest.
* ``StorageError``     chunk data could not be produced.  ``BackendError`` says the
                       backend failed (``retryable`` tells the retry policy what to
                       do), ``ChunkCorruptError`` that the data came back but is wrong.
* ``TransportError``   the FUSE or vhost-user peer broke the protocol or went away.
* ``BuildError``       the builder refused its input (an entry is named).
* ``ConvertError``     converting or publishing an image failed (the layer,
                       blob or registry answer is named).

Every error is also an instance of the matching stdlib type where one exists
(``ValueError``, ``OSError``, ``TimeoutError``) so callers can catch either.
"""

from __future__ import annotations

import errno as _errno

__all__ = [
    "NydusError",
    "ConfigError",
    "FormatError",
    "FsError",
    "StorageError",
    "BackendError",
    "BackendNotFoundError",
    "BackendTimeoutError",
    "ChunkCorruptError",
    "TransportError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "BuildError",
    "ConvertError",
]


class NydusError(Exception):
    """Root of every error raised on purpose by nydus_vfs."""


class ConfigError(NydusError, ValueError):
    """A config file, config string or command line is invalid.

    The message is what the operator sees at start-up: it names the key.
    """


class FormatError(NydusError, ValueError):
    """On-disk bytes violate the RAFS / EROFS / blob format.

    ``structure`` and ``field`` name where the problem is and ``value`` holds the
    offending value (rendered in hex for integers), e.g.
    ``FormatError("RafsV5SuperBlock", "s_magic", 0x12345678, "bad magic")``.
    """

    def __init__(self, structure: str, field: str, value: object = None, reason: str = "") -> None:
        self.structure = structure
        self.field = field
        self.value = value
        self.reason = reason
        if isinstance(value, bool) or value is None:
            shown = repr(value)
        elif isinstance(value, int):
            shown = hex(value)
        elif isinstance(value, (bytes, bytearray, memoryview)):
            raw = bytes(value)
            shown = raw[:32].hex() + ("…" if len(raw) > 32 else "")
        else:
            shown = repr(value)
        msg = f"{structure}.{field} = {shown}"
        if reason:
            msg += f": {reason}"
        super().__init__(msg)


class FsError(NydusError, OSError):
    """A filesystem operation failed with ``errno``; the only thing a FUSE reply carries."""

    def __init__(self, errno: int, reason: str = "") -> None:
        self.errno_value = errno
        super().__init__(errno, reason or _errno.errorcode.get(errno, str(errno)))


class StorageError(NydusError):
    """Root of the storage layer (backends, caches, chunk decoding)."""


class BackendError(StorageError, OSError):
    """A backend could not deliver bytes.

    ``retryable`` is True when the same request may succeed later (timeouts, 5xx,
    connection resets) and False when it never will (missing blob, bad auth).
    """

    retryable: bool = False

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        if retryable is not None:
            self.retryable = retryable


class BackendNotFoundError(BackendError, FileNotFoundError):
    """The backend has no blob with that id."""


class BackendTimeoutError(BackendError, TimeoutError):
    """The backend did not answer in time."""

    retryable = True


class ChunkCorruptError(StorageError, ValueError):
    """Chunk bytes were delivered but fail decompression, size or digest checks."""


class TransportError(NydusError):
    """Root of transport failures (``/dev/fuse``, vhost-user)."""


class LocalProtocolError(TransportError):
    """We tried to do something the protocol does not allow (our bug)."""


class RemoteProtocolError(TransportError):
    """The peer (kernel, QEMU, guest driver) violated the protocol."""


class BuildError(NydusError, ValueError):
    """The image builder refused its input; the message names the entry."""


class ConvertError(NydusError):
    """Converting an image (pack / merge / unpack, nydusify) failed; the message names the layer or blob."""
