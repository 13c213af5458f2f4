"""Mounting a Nydus image from its registry with nydusd, for ``nydusify mount`` and ``nydusify check``.

* :func:`nydusd_config`: the nydusd v1 config that reads an image's blobs from
  its registry (credentials from the docker config), with a blob cache.
* :func:`fuse_mount_reason`: why a FUSE mount cannot be made here (None when
  it can).
* :class:`NydusdMount`: ``nydusd fuse`` started on a bootstrap, waited for until
  the mount exists, stopped (and the mount gone) on exit.

The daemon runs as a child process: the same binary a user would run (ours by
default, any nydusd with the upstream command line via ``nydusd=``).
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from typing import Any

from ..errors import ConvertError
from ..utils.mountinfo import is_mountpoint
from ._distribution import Reference, docker_credentials

__all__ = ["NydusdMount", "fuse_mount_reason", "nydusd_command", "nydusd_config", "write_nydusd_config"]


def nydusd_config(ref: Reference, *, plain_http: bool, insecure: bool, cache_dir: str,
                  prefetch_all: bool = False, blob_dir: str | None = None) -> dict[str, Any]:
    """nydusd's v1 config for ``ref``: the registry backend (or ``blob_dir`` as localfs), a blobcache.

    The registry's credentials come from the docker config, as for every
    registry tool (nydus-surface.md §5); none are written when there are none.
    """
    if blob_dir is not None:
        backend: dict[str, Any] = {"type": "localfs", "config": {"dir": blob_dir}}
    else:
        conf: dict[str, Any] = {"scheme": "http" if plain_http else "https", "host": ref.registry,
                                "repo": ref.repository, "skip_verify": bool(insecure)}
        creds = docker_credentials(ref.registry)
        if creds:
            conf["auth"] = base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
        backend = {"type": "registry", "config": conf}
    config: dict[str, Any] = {"device": {"backend": backend,
                                         "cache": {"type": "blobcache", "config": {"work_dir": cache_dir}}},
                              "mode": "direct", "digest_validate": False, "enable_xattr": True}
    if prefetch_all:
        config["fs_prefetch"] = {"enable": True, "prefetch_all": True}
    return config


def nydusd_command(nydusd: str | None) -> list[str]:
    """The nydusd to run: ``nydusd`` split like a shell would, else ours in this interpreter."""
    return shlex.split(nydusd) if nydusd else [sys.executable, "-m", "nydus_vfs.cli.nydusd"]


def fuse_mount_reason() -> str | None:
    """Why this process cannot make a FUSE mount (None when it can)."""
    if os.geteuid() != 0:
        return "not root"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    return None


class NydusdMount:
    """``nydusd fuse`` serving ``bootstrap`` at ``mountpoint`` for the duration of a ``with`` block.

    Entering raises ``ConvertError`` (with the tail of nydusd's log) when the
    daemon exits or does not mount within ``timeout`` seconds; leaving sends
    SIGTERM, waits, and makes sure the mount is gone (SIGKILL and a lazy
    unmount as the last resort), so nothing stays mounted after a failed check.
    """

    def __init__(self, nydusd: list[str], config_path: str, bootstrap: str, mountpoint: str, *,
                 log_path: str, timeout: float = 60.0) -> None:
        self.cmd = nydusd + ["fuse", "--config", config_path, "--bootstrap", bootstrap,
                             "--mountpoint", mountpoint, "--log-file", log_path, "--log-level", "warn"]
        self.mountpoint = mountpoint
        self.log_path = log_path
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()[-800:].strip()
        except OSError:
            return ""

    def __enter__(self) -> "NydusdMount":
        os.makedirs(self.mountpoint, exist_ok=True)
        try:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE)
        except OSError as exc:
            raise ConvertError(f"cannot run nydusd ({self.cmd[0]}): {exc.strerror}") from None
        deadline = time.monotonic() + self.timeout
        while not is_mountpoint(self.mountpoint):
            rc = self.proc.poll()
            if rc is not None:
                err = (self.proc.stderr.read() if self.proc.stderr else b"").decode(errors="replace").strip()
                self.proc = None
                raise ConvertError(f"nydusd exited with status {rc} before mounting the image: "
                                   f"{(err or self._log_tail())[-800:]}")
            if time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise ConvertError(f"nydusd did not mount the image within {self.timeout:g} s: "
                                   f"{self._log_tail()}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()
        if is_mountpoint(self.mountpoint):
            subprocess.run(["umount", "-l", self.mountpoint], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=False)


def write_nydusd_config(path: str, config: dict[str, Any]) -> str:
    """Write ``config`` as JSON at ``path`` (0600: it may hold registry credentials); returns ``path``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(config, f)
    return path
