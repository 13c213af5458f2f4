"""The FUSE protocol, sans-IO: request bytes in, reply bytes out.

* owns: the kernel ABI (``abi``: opcodes, INIT flags, struct layouts of
  protocol 7.38), wire structs as objects (``codec``), the dispatcher with
  INIT negotiation, lookup counting and READ/INTERRUPT handling
  (``server.FuseServer``), and the filesystem-side contract (``ops``).
* does not own: reading or writing ``/dev/fuse`` or virtqueues (``transport``),
  what a filesystem contains (``fs``).
* one entry point for both transports: ``FuseServer(ops).handle(request,
  out_capacity)`` returns ``None``, reply bytes, ``[header, parts...]`` (READ
  with file segments), or a coroutine for a READ that had to wait.
"""

from .abi import InitFlags, Opcode
from .ops import (
    ROOT_ID,
    Attr,
    ConnInfo,
    Context,
    DirEntry,
    Entry,
    FileLock,
    FileSegment,
    Operations,
    ReadData,
    SetAttr,
    StatFs,
    WriteData,
    WritePayload,
)
from .server import FuseServer, SessionState

__all__ = [
    "FuseServer",
    "SessionState",
    "Opcode",
    "InitFlags",
    "ROOT_ID",
    "Attr",
    "ConnInfo",
    "Context",
    "DirEntry",
    "Entry",
    "FileLock",
    "FileSegment",
    "Operations",
    "SetAttr",
    "ReadData",
    "StatFs",
    "WriteData",
    "WritePayload",
]
