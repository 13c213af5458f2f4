"""Transports: how FUSE request bytes reach the FUSE server and replies go back.

* owns: ``virtiofs`` (a vhost-user-fs back-end for QEMU on an asyncio loop,
  through the C shim in ``_native``) and ``fusedev`` (``/dev/fuse``).
* does not own: FUSE semantics (``fuse.server``), the filesystem (``fs``).
* works without the compiled shim: importing this package never needs it; only
  constructing the virtio-fs transport does, and it then says how to build it.
"""

from .virtiofs import ShimConfig as ShimConfig
from .virtiofs import VirtioFsTransport as VirtioFsTransport
from .virtiofs import serve_virtiofs as serve_virtiofs

__all__ = ["ShimConfig", "VirtioFsTransport", "serve_virtiofs"]
