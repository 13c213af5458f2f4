"""Upstream nydusd's per-filesystem FUSE operation counters: their names, in ``fop_hits`` order.

A leaf (no imports) so that both the daemon's metrics (``fs.metrics``) and the
``nydusctl`` client, which labels the daemon's arrays by position, use the one
list.  Each name is also its FUSE opcode's name in lower case.
"""

from __future__ import annotations

__all__ = ["FOPS"]

#: Upstream's StatsFop order: the index of each op in ``fop_hits``/``fop_errors``.
FOPS = ("getattr", "readlink", "open", "release", "read", "statfs", "getxattr", "listxattr",
        "opendir", "lookup", "readdir", "readdirplus", "access", "forget", "batch_forget")
