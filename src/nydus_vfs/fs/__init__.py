"""Filesystems served over FUSE: RAFS images and the pseudo-mount VFS holding them.

* owns: ``RafsFs`` (one image over a blob device, local inode numbers),
  ``prefetch_rafs`` (background prefetch of an instance into its blob cache) and
  ``Vfs`` (the ``Operations`` the FUSE server sees: pseudo paths, nodeid
  translation, one shared nodeid space for all instances).
* does not own: bytes on disk (``format``), chunk I/O (``storage``), the FUSE
  wire protocol (``fuse``).
"""

from .prefetch import PrefetchReport, prefetch_config, prefetch_rafs
from .rafs import RafsFs, load_bootstrap
from .vfs import MAX_INSTANCES, Vfs

__all__ = ["RafsFs", "Vfs", "MAX_INSTANCES", "load_bootstrap", "PrefetchReport", "prefetch_config",
           "prefetch_rafs"]
