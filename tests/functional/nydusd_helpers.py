"""Running ``nydusd fuse`` as a subprocess for the functional (and guest) tests.

* :class:`Nydusd` mounts on a fresh mountpoint, waits for the mount, and stops
  the daemon with SIGTERM (lazily unmounting whatever is left).
* :func:`write_localfs_config` writes the v1 config the tests use: blobs from
  a local directory, a blob cache, direct mode, xattrs served.
"""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import sys
import time

from nydus_vfs.transport.fusedev import is_mountpoint
from tests.conftest import PROJECT_ROOT

__all__ = ["NYDUSD", "Nydusd", "write_localfs_config"]

NYDUSD = [sys.executable, "-m", "nydus_vfs.cli.nydusd"]


def write_localfs_config(path: pathlib.Path, blob_dir: pathlib.Path, cache_dir: pathlib.Path, *,
                         digest_validate: bool = True, enable_xattr: bool = True) -> pathlib.Path:
    """A v1 JSON config at ``path``: localfs blobs in ``blob_dir``, blobcache in ``cache_dir``."""
    doc: dict = {
        "device": {"backend": {"type": "localfs", "config": {"dir": str(blob_dir)}},
                   "cache": {"type": "blobcache", "config": {"work_dir": str(cache_dir)}}},
        "mode": "direct", "digest_validate": digest_validate,
    }
    if enable_xattr:
        doc["enable_xattr"] = True
    path.write_text(json.dumps(doc))
    return path


class Nydusd:
    """``nydusd fuse --mountpoint TMP/mnt --log-file TMP/nydusd.log ARGS`` as a context manager.

    Entering waits up to ``timeout`` seconds for the mount.  With ``check``
    (the default) a daemon that exits or does not mount in time fails the
    test (AssertionError with its stderr and log); without it the reason is
    left in :attr:`error` and the caller decides (e.g. to skip).  Leaving
    always stops the daemon.
    """

    def __init__(self, tmp: pathlib.Path, args: list[str], *, timeout: float = 20.0, check: bool = True) -> None:
        self.mnt = tmp / "mnt"
        self.mnt.mkdir(exist_ok=True)
        self.log = tmp / "nydusd.log"
        self.cmd = NYDUSD + ["fuse", "--mountpoint", str(self.mnt), "--log-file", str(self.log)] + args
        self.timeout = timeout
        self.check = check
        self.proc: subprocess.Popen | None = None
        self.error = ""

    def __enter__(self) -> "Nydusd":
        self.error = self._start()
        if self.error and self.check:
            self.stop()
            raise AssertionError(self.error)
        return self

    def _start(self) -> str:
        """Start and wait for the mount; the reason it failed, or "" once mounted."""
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     cwd=PROJECT_ROOT)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            # /proc/self/mountinfo only: stat'ing the mountpoint would warm the
            # kernel's attr cache and hide a daemon that deadlocks on itself.
            if is_mountpoint(str(self.mnt)):
                return ""
            if self.proc.poll() is not None:
                _, err = self.proc.communicate()
                return f"nydusd exited {self.proc.returncode}: {err.decode(errors='replace')}\n{self.logtext()}"
            time.sleep(0.05)
        return f"nydusd did not mount within {self.timeout:g} s\n{self.logtext()}"

    def logtext(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGTERM (then SIGKILL after 20 s), unmount what is left; the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if is_mountpoint(str(self.mnt)):
            subprocess.run(["umount", "-l", str(self.mnt)], check=False)
        return self.proc.returncode

    def __exit__(self, *exc) -> None:
        self.stop()
