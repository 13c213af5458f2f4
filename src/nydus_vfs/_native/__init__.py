"""Native code: the vhost-user shim compiled from ``native/libvhost_shim.c``.

* owns: loading the cffi extension, checking it matches this package, turning
  its return codes into exceptions, and the ownership of C objects
  (:mod:`.binding` is the only module that touches ``ffi``/``lib``).
* does not own: FUSE, the event loop, sockets (``transport.virtiofs`` does).
* works without a compiler: importing this package never fails; ``available()``
  says whether virtio-fs can run and ``require()`` raises with the fix.
"""

from .binding import NativeShimUnavailable as NativeShimUnavailable
from .binding import available as available
from .binding import require as require
from .binding import unavailable_reason as unavailable_reason

__all__ = ["NativeShimUnavailable", "available", "require", "unavailable_reason"]
