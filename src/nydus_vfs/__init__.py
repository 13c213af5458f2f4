"""nydus_vfs: a Python implementation of the Nydus image service.

General layout (import only rightwards):

    cli -> service -> {transport, fs, builder} -> {storage, _native}
        -> {fuse, format} -> {config, utils} -> errors

* ``format``    sans-IO RAFS v5/v6 (EROFS) and blob on-disk structures.
* ``fuse``      sans-IO FUSE protocol: request bytes in, reply bytes out.
* ``storage``   backends (localfs, ...), the blob cache, chunk decoding.
* ``fs``        RAFS as FUSE ``Operations`` and the pseudo-mount VFS.
* ``transport`` ``/dev/fuse`` and virtio-fs (vhost-user via the C shim).
* ``service``   the daemon (lifecycle state machine, later the HTTP API).
* ``builder``   ``nydus-image``: directories and tars to RAFS images.
"""

from ._version import __version__

__all__ = ["__version__"]
