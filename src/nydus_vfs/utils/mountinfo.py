"""What is mounted where, from ``/proc/self/mountinfo`` (proc(5)), without ever stat'ing a mountpoint.

A path served by a FUSE daemon (possibly this process, possibly hung) must not
be stat'ed to find out whether it is mounted: the answer would come from that
daemon.  Everything here reads mountinfo or resolves only the parent directory.
Used by the ``/dev/fuse`` transport, nydusd's start checks and nydusify.
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple

from ..errors import TransportError

__all__ = ["MountInfo", "parse_mountinfo", "mounts_at", "top_mount", "resolve_mountpoint", "is_mountpoint"]


class MountInfo(NamedTuple):
    """One line of ``/proc/self/mountinfo`` (proc(5)): the fields we rely on."""

    mount_id: int
    parent_id: int
    dev: str            # "major:minor"
    mountpoint: str     # octal escapes (\\040 ...) decoded
    fstype: str
    source: str


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[MountInfo]:
    """Parse mountinfo text (sans-IO); malformed lines are skipped."""
    out = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        f = left.split()
        r = right.split()
        if not sep or len(f) < 5 or len(r) < 2:
            continue
        try:
            out.append(MountInfo(int(f[0]), int(f[1]), f[2], _unescape(f[4]), r[0], _unescape(r[1])))
        except ValueError:
            continue
    return out


def mounts_at(path: str) -> list[MountInfo]:
    """Every mount whose mount point is ``path`` (an absolute, resolved path), bottom first.

    Reads ``/proc/self/mountinfo`` only: nothing here stats ``path``, so asking
    never sends a request to a FUSE daemon serving it (possibly ourselves).
    """
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    except OSError as exc:
        raise TransportError(f"cannot read /proc/self/mountinfo: {exc.strerror}") from None
    return [m for m in parse_mountinfo(text) if m.mountpoint == path]


def top_mount(mounts: list[MountInfo]) -> MountInfo | None:
    """The mount visible at a path: the one no other mount at that path sits on."""
    parents = {m.parent_id for m in mounts}
    for m in reversed(mounts):
        if m.mount_id not in parents:
            return m
    return mounts[-1] if mounts else None


def resolve_mountpoint(mountpoint: str) -> str:
    """Canonical absolute path of ``mountpoint`` without touching its last component.

    The parent is resolved with realpath; the last component is only joined, so
    a mountpoint served by a live (or hung) FUSE daemon is never stat'ed here.
    """
    path = os.path.abspath(os.fspath(mountpoint))
    parent, name = os.path.split(path)
    if not name:  # "/"
        return path
    return os.path.join(os.path.realpath(parent), name)


def is_mountpoint(path: str) -> bool:
    """True when something is mounted at ``path`` (mountinfo only: never stats it)."""
    try:
        return bool(mounts_at(resolve_mountpoint(path)))
    except TransportError:
        return False
