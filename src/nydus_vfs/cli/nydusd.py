"""``nydusd``: the command line of the daemon, compatible with upstream's.

Forms (reference nydus-surface.md §1):

    nydusd [GLOBAL...] --mountpoint M [--bootstrap B] ...           legacy form = fuse
    nydusd fuse --mountpoint M [--bootstrap B] [--config C | --localfs-dir D] ...
    nydusd virtiofs --sock S [--bootstrap B] [--config C | --localfs-dir D] ...

Global options (``--config``, ``--apisock``, ``--log-level``, ...) may stand before
or after the subcommand, as the snapshotter passes them.  A config that fails
validation is refused at start with the reason and exit status 1.  SIGTERM and
SIGINT unmount and exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from .._version import version_text
from ..config import load_config_file, localfs_dir_config
from ..errors import ConfigError, NydusError, TransportError
from ..utils.logging import setup_logging
from ..utils.unixsock import probe_unix

__all__ = ["main", "build_parser"]

log = logging.getLogger("nydus_vfs.nydusd")

_LOG_LEVELS = ("trace", "debug", "info", "warn", "error")


def _thread_num(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not 1 <= n <= 1024:
        raise argparse.ArgumentTypeError(f"{n} is not in 1..=1024")
    return n


def _add_globals(p: argparse.ArgumentParser, *, suppress: bool) -> None:
    d = argparse.SUPPRESS if suppress else None
    p.add_argument("-A", "--apisock", default=d, help="HTTP API unix socket")
    p.add_argument("-C", "--config", default=d, help="daemon config (v1 JSON, v2 JSON or TOML)")
    p.add_argument("--id", default=d, help="service instance id (requires --supervisor)")
    p.add_argument("--supervisor", default=d, help="supervisor socket (requires --id)")
    p.add_argument("--upgrade", action="store_true", default=argparse.SUPPRESS if suppress else False,
                   help="start in upgrade mode")
    p.add_argument("-l", "--log-level", default=argparse.SUPPRESS if suppress else "info",
                   choices=_LOG_LEVELS, help="log level")
    p.add_argument("-L", "--log-file", default=d, help="log file (.log is added without an extension)")
    p.add_argument("--log-rotation-size", type=int, default=argparse.SUPPRESS if suppress else 0,
                   help="rotate the log file at this many MB (0: never)")
    p.add_argument("--rlimit-nofile", type=int, default=argparse.SUPPRESS if suppress else 1_000_000,
                   help="RLIMIT_NOFILE to set (0: unchanged)")


def _add_fs_source(p: argparse.ArgumentParser, *, suppress: bool) -> None:
    d = argparse.SUPPRESS if suppress else None
    p.add_argument("-B", "--bootstrap", default=d, help="RAFS bootstrap (metadata) file")
    p.add_argument("-D", "--localfs-dir", default=d, help="directory holding the data blobs")
    p.add_argument("-s", "--shared-dir", default=d, help="share a host directory (passthrough_fs)")
    p.add_argument("-m", "--virtual-mountpoint", default=argparse.SUPPRESS if suppress else "/",
                   help="pseudo path of the initial filesystem")
    p.add_argument("--prefetch-files", default=d, help="file listing absolute paths to prefetch")
    p.add_argument("--dedup-db", default=d, help="chunk dedup database (accepted, not used yet)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nydusd", description="Nydus image service daemon (nydus_vfs)")
    parser.add_argument("-V", "--version", action="store_true", help="print version information")
    _add_globals(parser, suppress=False)
    _add_fs_source(parser, suppress=False)
    # Legacy top-level form = fuse.
    parser.add_argument("-M", "--mountpoint", default=None, help="FUSE mountpoint (legacy form)")
    parser.add_argument("--fuse-threads", "--thread-num", dest="thread_num", type=_thread_num, default=4)
    parser.add_argument("--failover-policy", choices=("none", "resend", "flush"), default="resend")
    parser.add_argument("--writable", action="store_true")
    sub = parser.add_subparsers(dest="command")

    fuse = sub.add_parser("fuse", help="serve over /dev/fuse")
    _add_globals(fuse, suppress=True)
    _add_fs_source(fuse, suppress=True)
    fuse.add_argument("-M", "--mountpoint", default=argparse.SUPPRESS, required=True)
    fuse.add_argument("--fuse-threads", "--thread-num", dest="thread_num", type=_thread_num,
                      default=argparse.SUPPRESS)
    fuse.add_argument("--failover-policy", choices=("none", "resend", "flush"), default=argparse.SUPPRESS)
    fuse.add_argument("--writable", action="store_true", default=argparse.SUPPRESS)
    fuse.add_argument("--backend-source", default=argparse.SUPPRESS,
                      help="accepted for nydus-snapshotter compatibility; ignored")

    vfs = sub.add_parser("virtiofs", help="serve a vhost-user-fs backend for virtio-fs guests")
    _add_globals(vfs, suppress=True)
    _add_fs_source(vfs, suppress=True)
    vfs.add_argument("--sock", required=True, help="vhost-user socket to listen on")
    vfs.add_argument("--hybrid-mode", action="store_true", default=False,
                     help="accepted for compatibility (upstream's flag turns hybrid mode off)")

    sub.add_parser("singleton", help="shared blob cache / fscache service (not supported yet)")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    if args.config and args.localfs_dir:
        raise ConfigError("--config and --localfs-dir cannot be used together")
    if (args.id is None) != (args.supervisor is None):
        raise ConfigError("--id and --supervisor must be given together")
    if args.shared_dir and args.bootstrap:
        raise ConfigError("--shared-dir and --bootstrap cannot be used together")
    if args.prefetch_files and not args.bootstrap:
        raise ConfigError("--prefetch-files requires --bootstrap")
    if args.upgrade:
        # Upstream waits in INIT for a takeover from the supervisor; without takeover
        # support that would wait forever, so say so instead.
        raise ConfigError("--upgrade: hot upgrade / takeover is not supported by this nydusd")
    if getattr(args, "dedup_db", None):
        log.warning("--dedup-db %s: chunk deduplication across images is not supported by this "
                    "nydusd; ignored", args.dedup_db)
    if getattr(args, "writable", False) and args.bootstrap:
        log.warning("--writable: RAFS images are read-only and no overlay is supported; writes to "
                    "them fail with EROFS (passthrough_fs mounts through the API are writable)")


def _load_config(args: argparse.Namespace):
    if args.localfs_dir:
        if not os.path.isdir(args.localfs_dir):
            raise ConfigError(f"--localfs-dir {args.localfs_dir}: not a directory")
        return localfs_dir_config(args.localfs_dir)
    if args.config:
        return load_config_file(args.config)
    if args.bootstrap:
        raise ConfigError("both --config and --localfs-dir are missing")
    return None


def _prefetch_list(path: str | None) -> list[str]:
    if not path:
        return []
    try:
        with open(path, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f]
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--prefetch-files {path}: {getattr(exc, 'strerror', None) or exc}") from None
    return [ln for ln in lines if ln]


def _set_rlimit(n: int) -> None:
    if n <= 0:
        return
    import resource

    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = min(n, hard) if hard != resource.RLIM_INFINITY else n
        if want > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (OSError, ValueError) as exc:
        log.warning("cannot raise RLIMIT_NOFILE to %d: %s", n, exc)


def _enable_crash_traces(log_file: str | None) -> None:
    """Fatal signals (SIGSEGV, SIGBUS, SIGABRT, SIGFPE, SIGILL) leave a traceback in the log.

    Nothing should ever get there, but a daemon serving a guest that dies
    silently leaves that guest hung (QEMU 7.2 cannot reconnect a vhost-user-fs
    device): if it happens, the log must say where.
    """
    import faulthandler

    stream = None
    if log_file:
        from ..utils.logging import resolve_log_path

        try:
            stream = open(resolve_log_path(log_file), "a", encoding="utf-8")  # noqa: SIM115 - process lifetime
        except (OSError, ConfigError):
            stream = None
    faulthandler.enable(file=stream or sys.stderr, all_threads=True)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency; stay usable without it
        return asyncio.new_event_loop()


#: Signals that stop the daemon gracefully (unmount, exit 0), and those only logged.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
_LOGGED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGPIPE)
_early_signal: list[int] = []


def _early_handler(signum: int, frame) -> None:  # noqa: ARG001 - signal handler signature
    # Before the loop runs (and after it closed) a stop signal is remembered, never fatal.
    _early_signal.append(signum)


def _install_process_handlers() -> None:
    for sig in _STOP_SIGNALS + _LOGGED_SIGNALS:
        signal.signal(sig, _early_handler)


def _failover_refusal(mountpoint: str, apisock: str | None) -> str | None:
    """Why a FUSE start must not go ahead on a mountpoint left by a crashed daemon, or None."""
    from ..utils.mountinfo import mounts_at, resolve_mountpoint, top_mount

    here = mounts_at(resolve_mountpoint(mountpoint))
    if not here:
        return None
    top = top_mount(here)
    if apisock and os.path.exists(apisock) and probe_unix(apisock) is not None:
        return (f"mountpoint {mountpoint} is still mounted ({top.fstype}, source {top.source}) and the API "
                f"socket {apisock} is dead: a crashed nydusd left it. Upstream would wait for a "
                f"takeover, which this nydusd does not support: unmount it (umount -l) and start again")
    return None  # mount_fuse refuses a mounted mountpoint with its own message


def _writable_export(args: argparse.Namespace, command: str) -> bool:
    """Whether the export may hold read-write passthrough_fs instances.

    virtiofs: when it starts without a bootstrap (Kata mounts ``/containers``
    through the API, nydus-surface.md §8.2) or with ``--shared-dir``; fuse: with
    ``--shared-dir`` or ``--writable``.  A daemon started on a bootstrap keeps a
    read-only export, so the kernel can skip OPEN/FLUSH round trips for RAFS;
    upstream's "hybrid mode" (nydus-surface.md §0 item 17) makes that export
    open-capable instead, which only matters for passthrough mounts added later.
    """
    if command == "virtiofs":
        return bool(args.shared_dir) or not args.bootstrap
    return bool(args.shared_dir or args.writable)


async def _serve(args: argparse.Namespace, command: str) -> int:
    from ..service import NotReadyError, NydusDaemon

    config = _load_config(args)
    prefetch = _prefetch_list(args.prefetch_files)
    if command == "fuse":
        reason = _failover_refusal(args.mountpoint, args.apisock)
        if reason:
            raise TransportError(reason)
    loop = asyncio.get_running_loop()
    daemon = NydusDaemon(id=args.id, supervisor=args.supervisor, writable=_writable_export(args, command))

    def on_stop(sig: signal.Signals) -> None:
        daemon.request_stop(f"signal {sig.name} received")

    def on_logged(sig: signal.Signals) -> None:
        log.warning("signal %s received and ignored", sig.name)

    for sig in _STOP_SIGNALS:
        loop.add_signal_handler(sig, on_stop, sig)
    for sig in _LOGGED_SIGNALS:
        loop.add_signal_handler(sig, on_logged, sig)
    try:
        async with daemon:
            if _early_signal:
                log.info("signal %d received during start-up: exiting", _early_signal[0])
                return 0
            if args.apisock:
                await daemon.serve_api(args.apisock)
            if args.bootstrap:
                await daemon.mount(args.virtual_mountpoint, args.bootstrap, config, prefetch_files=prefetch)
            elif args.shared_dir:
                await daemon.mount(args.virtual_mountpoint, args.shared_dir, fs_type="passthrough_fs")
            try:
                if command == "virtiofs":
                    await daemon.serve_virtiofs(args.sock)
                else:
                    await daemon.serve_fuse(args.mountpoint)
            except NotReadyError:
                pass  # a signal arrived during start-up: stop cleanly
            await daemon.wait()
        return daemon.exit_code
    finally:
        for sig in _STOP_SIGNALS + _LOGGED_SIGNALS:
            loop.remove_signal_handler(sig)
        # Keep signals harmless until the process is gone (main() does it again
        # after closing the loop, which resets them too).
        _install_process_handlers()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        sys.stdout.write(version_text("nydusd"))
        return 0
    command = args.command or "fuse"
    if command == "singleton":
        print("nydusd: the singleton (fscache) service is not supported by this version", file=sys.stderr)
        return 1
    if command == "fuse" and not args.mountpoint:
        parser.error("the following arguments are required: --mountpoint")
    _install_process_handlers()
    try:
        setup_logging(args.log_level, args.log_file, args.log_rotation_size)
    except (OSError, ValueError) as exc:
        print(f"nydusd: cannot set up logging: {exc}", file=sys.stderr)
        return 1
    _enable_crash_traces(args.log_file)
    _set_rlimit(args.rlimit_nofile)
    try:
        _check_args(args)
        loop = _new_loop()
        try:
            return loop.run_until_complete(_serve(args, command))
        finally:
            # Closing the loop puts SIG_DFL back on the signals it handled: block them
            # meanwhile, so a late SIGTERM reaches our handler and is never fatal.
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS + _LOGGED_SIGNALS)
            try:
                loop.close()
                _install_process_handlers()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    except NydusError as exc:  # ConfigError, TransportError, MountError, StorageError...
        log.error("%s", exc)
        if args.log_file:  # otherwise the log line above already went to stderr
            print(f"nydusd: {exc}", file=sys.stderr)
        return 1
    except Exception:  # a bug: say so plainly, keep the traceback in the log
        log.exception("internal error")
        print("nydusd: internal error (see the log for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
