"""Filesystems served over FUSE: RAFS images, passthrough directories, and the
pseudo-mount VFS holding them.

* owns: the :class:`FileSystem` seam (one instance over local inode numbers,
  read and write operations), ``RafsFs`` (one image over a blob device,
  immutable, EROFS for writes), ``PassthroughFs`` (a shared host directory,
  read-write, safe against a hostile guest), ``prefetch_rafs`` (background prefetch of an
  instance into its blob cache) and ``Vfs`` (the ``Operations`` the FUSE server
  sees: pseudo paths, nodeid translation both ways, one shared nodeid space for
  all instances).
* does not own: bytes on disk (``format``), chunk I/O (``storage``), the FUSE
  wire protocol (``fuse``).
"""

from ._seam import FileSystem, ReadOnlyFs
from .passthrough import PassthroughFs
from .prefetch import PrefetchReport, prefetch_config, prefetch_rafs
from .rafs import RafsFs, load_bootstrap
from .vfs import MAX_INSTANCES, Vfs, normalize_pseudo_path

__all__ = ["FileSystem", "ReadOnlyFs", "RafsFs", "PassthroughFs", "Vfs", "MAX_INSTANCES", "normalize_pseudo_path", "load_bootstrap", "PrefetchReport",
           "prefetch_config", "prefetch_rafs"]
