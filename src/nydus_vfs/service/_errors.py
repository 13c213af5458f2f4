"""The service layer's errors: what a daemon request can fail with, and the API status for each."""

from __future__ import annotations

from ..errors import NydusError

__all__ = ["ServiceError", "MountError", "NotReadyError", "UnsupportedError"]


class ServiceError(NydusError):
    """A request to the daemon could not be carried out.

    ``status`` is the HTTP status the API answers with (nydus-surface.md §3.1:
    NotReady 503, Unsupported 501, UnexpectedEvent and bad requests 400,
    everything else 500) and :attr:`debug_text` the upstream-style rendering
    used as the error body's ``message``.
    """

    status = 500
    kind = "Other"

    @property
    def debug_text(self) -> str:
        return f'{self.kind}("{self}")'


class MountError(ServiceError):
    """A mount, umount or remount failed; the message says why."""

    kind = "Mount"

    @property
    def debug_text(self) -> str:
        return f'Mount(MountFilesystem(Other("{self}")))'


class NotReadyError(ServiceError):
    """The daemon is not in a state to do this yet (or any more)."""

    status = 503
    kind = "NotReady"


class UnsupportedError(ServiceError):
    """This daemon does not implement the request (upstream answers 501 too, or aborts)."""

    status = 501
    kind = "Unsupported"
