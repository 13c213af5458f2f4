"""Launch vhost-user back-ends for the harness: C virtiofsd, our ``nydusd``, or any command.

A back-end is a process that creates a listening AF_UNIX socket.  The launcher
waits for the socket *file* (never probes it with a connection: C virtiofsd
accepts exactly one front-end and exits when it leaves), collects stderr in a
file (no pipe to fill up), and stops the process by its own pid.

Both reference daemons exit once their front-end disconnects, so start one
back-end per :class:`~harness.vhost_frontend.Frontend`.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from typing import Sequence

from .errors import BackendExited, HarnessTimeout, HarnessUsageError

__all__ = [
    "VIRTIOFSD",
    "BackendProcess",
    "virtiofsd_unavailable_reason",
    "start_virtiofsd",
    "nydusd_command",
    "start_nydusd_virtiofs",
]

#: QEMU 7.2's C virtiofsd as Debian 12 ships it (package qemu-system-common).
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"


def virtiofsd_unavailable_reason(binary: str = VIRTIOFSD) -> str | None:
    """Why the reference virtiofsd cannot run here, or None when it can."""
    if not os.access(binary, os.X_OK):
        return f"{binary} not found (install Debian's qemu-system-common)"
    if os.geteuid() != 0:
        return "C virtiofsd needs root for its namespace sandbox (run the suite as root)"
    return None


class BackendProcess:
    """A running back-end: ``pid``, ``sock_path``, stderr capture, liveness, CPU time.

    Use as a context manager; leaving it stops the process (SIGTERM, then SIGKILL).
    Output is captured in a temporary file until :meth:`stop`, then kept in memory.
    """

    def __init__(self, argv: Sequence[str], sock_path: str | os.PathLike, *,
                 env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None,
                 name: str | None = None) -> None:
        self.argv = [os.fspath(a) for a in argv]
        self.sock_path = os.fspath(sock_path)
        self.name = name or os.path.basename(self.argv[0])
        self._err = tempfile.NamedTemporaryFile(prefix=f"{self.name}-", suffix=".stderr", delete=False)
        self.stderr_path = self._err.name
        self._final_output: str | None = None
        try:
            os.unlink(self.sock_path)
        except FileNotFoundError:
            pass
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self._err,
                                     stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True,
                                     close_fds=True)

    @classmethod
    def start(cls, argv: Sequence[str], sock_path: str | os.PathLike, *, timeout: float = 10.0,
              env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None,
              name: str | None = None) -> BackendProcess:
        """Start ``argv`` and wait until it has created the socket at ``sock_path``."""
        bp = cls(argv, sock_path, env=env, cwd=cwd, name=name)
        try:
            bp.wait_for_socket(timeout)
        except BaseException:
            bp.stop()
            raise
        return bp

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr_text(self) -> str:
        """Everything the back-end wrote to stdout/stderr (kept after :meth:`stop`)."""
        if self._final_output is not None:
            return self._final_output
        try:
            return pathlib.Path(self.stderr_path).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stderr_tail(self, lines: int = 30) -> str:
        return "\n".join(self.stderr_text().splitlines()[-lines:])

    def check_alive(self, grace: float = 0.0) -> None:
        """Raise :class:`BackendExited` if the process has exited (waiting up to ``grace`` s)."""
        deadline = time.monotonic() + grace
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise BackendExited(f"{self.name} (pid {self.pid}) exited with {_describe_rc(rc)}",
                                    rc, self.stderr_tail())
            if time.monotonic() >= deadline:
                return
            time.sleep(0.01)

    def wait_for_socket(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            try:
                if stat.S_ISSOCK(os.stat(self.sock_path).st_mode):
                    return
            except FileNotFoundError:
                pass
            if time.monotonic() >= deadline:
                raise HarnessTimeout(f"{self.name} created no socket at {self.sock_path} within {timeout:.1f}s; "
                                     f"stderr:\n{self.stderr_tail()}")
            time.sleep(0.01)

    def processes(self) -> list[int]:
        """The back-end's pid and all its descendants (C virtiofsd serves from a forked,
        sandboxed child while the launched process only waits for it)."""
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as fh:
                    ppid = int(fh.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
        out, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo.extend(children.get(pid, ()))
        return out

    def threads(self) -> list[int]:
        """Every thread id of the back-end and its descendants."""
        tids = []
        for pid in self.processes():
            try:
                tids.extend(int(t) for t in os.listdir(f"/proc/{pid}/task"))
            except OSError:
                continue
        return tids

    def cpu_seconds(self) -> float:
        """User + system CPU time of the back-end and its descendants (from /proc/PID/stat)."""
        ticks = 0
        for pid in self.processes():
            try:
                with open(f"/proc/{pid}/stat", "rb") as fh:
                    fields = fh.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            # fields[0] is the state (field 3); utime and stime are fields 14 and 15
            ticks += int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")

    def pin(self, cpus: set[int]) -> None:
        """Restrict every current thread of the back-end (and descendants) to ``cpus``;
        threads created later inherit the mask of their creator."""
        for tid in self.threads():
            try:
                os.sched_setaffinity(tid, cpus)
            except OSError:
                pass

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        if self._final_output is None:
            # keep the output in memory so nothing is left behind in /tmp
            self._final_output = self.stderr_text()
            self._err.close()
            try:
                os.unlink(self.stderr_path)
            except FileNotFoundError:
                pass
        try:
            os.unlink(self.sock_path)
        except (FileNotFoundError, IsADirectoryError):
            pass
        return self.proc.returncode

    def cleanup(self) -> None:
        """Alias of :meth:`stop` (which also removes the capture file)."""
        self.stop()

    def __enter__(self) -> BackendProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def _describe_rc(rc: int) -> str:
    if rc < 0:
        try:
            return f"signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"signal {-rc}"
    return f"exit code {rc}"


def start_virtiofsd(source: str | os.PathLike, sock_path: str | os.PathLike, *, cache: str = "auto",
                    extra_args: Sequence[str] = (), binary: str = VIRTIOFSD, timeout: float = 10.0,
                    ) -> BackendProcess:
    """C virtiofsd serving ``source``.

    Always ``--thread-pool-size=0``: with a pool, glib's workers call
    ``sched_getaffinity``, which virtiofsd's own seccomp filter kills on Debian 12.
    """
    reason = virtiofsd_unavailable_reason(binary)
    if reason:
        raise HarnessUsageError(reason)
    argv = [binary, f"--socket-path={os.fspath(sock_path)}", "-o", f"source={os.fspath(source)}",
            "-o", f"cache={cache}", "--thread-pool-size=0", *extra_args]
    return BackendProcess.start(argv, sock_path, timeout=timeout, name="virtiofsd")


def nydusd_command() -> str | None:
    """Our ``nydusd`` console script: next to this interpreter, else on PATH."""
    import sys

    here = pathlib.Path(sys.executable).parent / "nydusd"
    if here.exists():
        return str(here)
    return shutil.which("nydusd")


def start_nydusd_virtiofs(sock_path: str | os.PathLike, bootstrap: str | os.PathLike,
                          blob_dir: str | os.PathLike, *, extra_args: Sequence[str] = (),
                          nydusd: str | None = None, timeout: float = 15.0,
                          env: dict[str, str] | None = None) -> BackendProcess:
    """``nydusd virtiofs --sock S --bootstrap BOOT --localfs-dir BLOBDIR``."""
    exe = nydusd or nydusd_command()
    if exe is None:
        raise HarnessUsageError("no nydusd console script found (pip install -e the project)")
    argv = [exe, "virtiofs", "--sock", os.fspath(sock_path), "--bootstrap", os.fspath(bootstrap),
            "--localfs-dir", os.fspath(blob_dir), *extra_args]
    return BackendProcess.start(argv, sock_path, timeout=timeout, env=env, name="nydusd")
