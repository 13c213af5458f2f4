"""The daemon service: one owner for mounts, transports, backends, caches, tasks and the lifecycle.

* owns: :class:`NydusDaemon` (the asyncio service the CLI, the HTTP API and
  embedding programs drive), the lifecycle state machine, the HTTP API server,
  the metrics views.
* does not own: argv parsing and logging setup (``cli``), the filesystems
  (``fs``), the wire protocols (``fuse``, ``transport``), chunk I/O (``storage``).
"""

from ._errors import MountError as MountError
from ._errors import NotReadyError as NotReadyError
from ._errors import ServiceError as ServiceError
from ._errors import UnsupportedError as UnsupportedError
from .daemon import FS_TYPES as FS_TYPES
from .daemon import NydusDaemon as NydusDaemon
from .state import DaemonState as DaemonState

__all__ = ["NydusDaemon", "DaemonState", "ServiceError", "MountError", "NotReadyError",
           "UnsupportedError", "FS_TYPES"]
