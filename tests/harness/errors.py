"""Errors raised by the VM-less vhost-user front-end harness.

One root, :class:`HarnessError` (a :class:`nydus_vfs.errors.TransportError`), and
names that say who is at fault:

* :class:`BackendProtocolError`  the back-end under test broke vhost-user, virtio
  or FUSE rules (bad reply flags, a used entry for a head that is not in flight,
  a FUSE reply longer than the buffer...).  This is what tests assert on.
* :class:`BackendClosed`          the back-end closed the vhost-user socket.
* :class:`BackendExited`          the back-end process is gone; carries its stderr.
* :class:`HarnessTimeout`         nothing arrived in time (a lost kick or call, a
  hung back-end).
* :class:`NegotiationError`       the back-end's offer is one QEMU 7.2 would refuse.
* :class:`HarnessUsageError`      the test used the harness wrongly (our bug).
* :class:`QueueFull` / :class:`GuestMemoryFull`  resources of the fake guest ran
  out; the caller should reap completions or use a bigger ``mem_size``.

:class:`FuseErrorReply` is not a harness error: it is the back-end's legitimate
answer ``-errno`` to a FUSE request, raised by the convenience helpers of
:class:`~harness.vhost_frontend.FuseSession` as an :class:`OSError` so tests can
write ``pytest.raises(FileNotFoundError)``-style checks via ``.errno``.
"""

from __future__ import annotations

import errno as _errno
import os

from nydus_vfs.errors import LocalProtocolError, RemoteProtocolError, TransportError

__all__ = [
    "HarnessError",
    "BackendProtocolError",
    "BackendClosed",
    "BackendExited",
    "HarnessTimeout",
    "NegotiationError",
    "HarnessUsageError",
    "QueueFull",
    "GuestMemoryFull",
    "FuseErrorReply",
]


class HarnessError(TransportError):
    """Root of everything the harness raises on purpose."""


class BackendProtocolError(HarnessError, RemoteProtocolError):
    """The back-end under test violated vhost-user, the split-ring rules or FUSE."""


class BackendClosed(HarnessError, ConnectionError):
    """The back-end closed (or reset) the vhost-user connection."""


class BackendExited(HarnessError):
    """The back-end process exited; ``returncode`` and ``stderr`` say how."""

    def __init__(self, message: str, returncode: int | None = None, stderr: str = "") -> None:
        self.returncode = returncode
        self.stderr = stderr
        if stderr:
            message = f"{message}\n--- back-end stderr (tail) ---\n{stderr}"
        super().__init__(message)


class HarnessTimeout(HarnessError, TimeoutError):
    """An expected reply, completion or socket did not show up in time."""


class NegotiationError(HarnessError):
    """The back-end's feature offer is one QEMU 7.2 would refuse."""


class HarnessUsageError(HarnessError, LocalProtocolError):
    """The harness was used in a way it does not support (a test bug)."""


class QueueFull(HarnessError):
    """Not enough free descriptors for the chain; reap completions first."""


class GuestMemoryFull(HarnessError, MemoryError):
    """The fake guest RAM has no free extent large enough."""


class FuseErrorReply(OSError):
    """A FUSE reply carried ``error = -errno`` (the back-end's answer, not a fault).

    ``errno`` is the positive errno, ``opcode`` and ``unique`` identify the request.
    """

    def __init__(self, err: int, opcode: int, unique: int) -> None:
        name = _errno.errorcode.get(err, str(err))
        super().__init__(err, f"{os.strerror(err)} ({name}) for FUSE opcode {opcode} unique {unique}")
        self.opcode = opcode
        self.unique = unique
