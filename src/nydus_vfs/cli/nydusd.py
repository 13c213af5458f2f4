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
from ..config import localfs_dir_config, parse_daemon_config
from ..errors import ConfigError, NydusError
from ..utils.logging import setup_logging

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
    if args.shared_dir:
        raise ConfigError("--shared-dir (passthrough_fs) is not supported by this nydusd yet")
    if args.prefetch_files and not args.bootstrap:
        raise ConfigError("--prefetch-files requires --bootstrap")


def _load_config(args: argparse.Namespace):
    if args.localfs_dir:
        if not os.path.isdir(args.localfs_dir):
            raise ConfigError(f"--localfs-dir {args.localfs_dir}: not a directory")
        return localfs_dir_config(args.localfs_dir)
    if args.config:
        try:
            with open(args.config, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise ConfigError(f"--config {args.config}: {exc.strerror}") from None
        return parse_daemon_config(text)
    if args.bootstrap:
        raise ConfigError("both --config and --localfs-dir are missing")
    return None


def _prefetch_list(path: str | None) -> list[str]:
    if not path:
        return []
    try:
        with open(path, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f]
    except OSError as exc:
        raise ConfigError(f"--prefetch-files {path}: {exc.strerror}") from None
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


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency; stay usable without it
        return asyncio.new_event_loop()


async def _serve(args: argparse.Namespace, command: str) -> int:
    from ..service.daemon import Daemon, MountError

    config = _load_config(args)
    daemon = Daemon()
    if args.bootstrap:
        try:
            daemon.mount_rafs(args.virtual_mountpoint, args.bootstrap, config,
                              _prefetch_list(args.prefetch_files))
        except MountError as exc:
            raise ConfigError(str(exc)) from None
    if args.apisock:
        log.warning("--apisock %s: the HTTP API is not served by this version yet", args.apisock)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    try:
        if command == "virtiofs":
            from ..transport.virtiofs import serve_virtiofs

            server = daemon.fuse_server()
            await serve_virtiofs(args.sock, server, stop_event=stop)
            return 0
        return await _serve_fuse(args, daemon, stop)
    finally:
        daemon.close()


async def _serve_fuse(args: argparse.Namespace, daemon, stop: asyncio.Event) -> int:
    from ..transport.fusedev import FuseDevTransport, mount_fuse, unmount_fuse

    server = daemon.fuse_server()
    fd = mount_fuse(args.mountpoint, readonly=not args.writable)
    transport = FuseDevTransport(fd, server, bufsize=server.max_write)
    waiter = asyncio.ensure_future(stop.wait())
    runner = asyncio.ensure_future(transport.run())
    try:
        done, _ = await asyncio.wait({waiter, runner}, return_when=asyncio.FIRST_COMPLETED)
        if waiter in done:
            log.info("signal received, unmounting %s", args.mountpoint)
    finally:
        transport.stop()
        await asyncio.gather(runner, return_exceptions=True)
        waiter.cancel()
        unmount_fuse(args.mountpoint)
        os.close(fd)
    return 0


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
    try:
        setup_logging(args.log_level, args.log_file, args.log_rotation_size)
    except (OSError, ValueError) as exc:
        print(f"nydusd: cannot set up logging: {exc}", file=sys.stderr)
        return 1
    _set_rlimit(args.rlimit_nofile)
    try:
        _check_args(args)
        loop = _new_loop()
        try:
            return loop.run_until_complete(_serve(args, command))
        finally:
            loop.close()
    except ConfigError as exc:
        log.error("invalid configuration: %s", exc)
        print(f"nydusd: invalid configuration: {exc}", file=sys.stderr)
        return 1
    except NydusError as exc:  # TransportError, MountError, StorageError...
        log.error("%s", exc)
        print(f"nydusd: {exc}", file=sys.stderr)
        return 1
    except Exception:  # a bug: say so plainly, keep the traceback in the log
        log.exception("internal error")
        print("nydusd: internal error (see the log for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
