"""``nydusify``: convert OCI images in a registry to Nydus images, check them, mount them (nydus-surface.md §5).

    nydusify convert --source REG/REPO:TAG --target REG/REPO:TAG-nydus [--plain-http] [--fs-version 6] ...
    nydusify check   --target REG/REPO:TAG-nydus [--source REG/REPO:TAG]
    nydusify mount   --target REG/REPO:TAG-nydus --mount-path DIR
    nydusify copy    --source REG/REPO:TAG --target REG2/REPO:TAG [--all-platforms]

Flags keep upstream's names; most also read the upper-case environment
variable upstream reads (``SOURCE``, ``TARGET``, ``WORK_DIR``, ...).
Credentials come from ``$DOCKER_CONFIG/config.json`` (default
``~/.docker/config.json``).  Progress goes to stdout: one line per event when
stdout is not a terminal, a live per-layer block when it is.  Exit status 0
on success, 1 on any error (the message names the layer, blob or registry
answer).  ``--backend-type s3|oss --backend-config JSON`` puts the data blobs in
an S3 or OSS bucket (nydusd's s3/oss backend config) and only the bootstrap
layer in the registry.  Not here (yet): ``--oci-ref`` (zran), build caches,
chunk dictionaries from registries, ``--reverse``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Sequence

from .._version import version_text
from ..convert import (CheckOptions, ConvertOptions, Reference, check_image, convert_image, copy_image,
                       fetch_nydus_bootstrap, host_platform, nydusd_command, nydusd_config,
                       object_store_from_config, write_nydusd_config)
from ..errors import NydusError
from ..utils.logging import setup_logging
from ._common import run_subcommand

__all__ = ["main", "build_parser"]

log = logging.getLogger("nydus_vfs.nydusify")


def _env(name: str, default=None):
    return os.environ.get(name, default)


def _size(text: str) -> int:
    try:
        return int(text, 16) if text.lower().startswith("0x") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}") from None


def _mb(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("M")
    try:
        return int(float(t) * (1 << 20))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (e.g. 10MB)") from None


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-D", "--debug", action="store_true", default=bool(_env("DEBUG_LOG_LEVEL")),
                        help="enable debug log level")
    common.add_argument("-l", "--log-level", default=_env("LOG_LEVEL", "info"),
                        choices=("trace", "debug", "info", "warn", "error"), help="log level (default: info)")
    common.add_argument("--log-file", default=_env("LOG_FILE"), help="write logs to this file")

    p = argparse.ArgumentParser(prog="nydusify", parents=[common],
                                description="Nydusify converts, checks and mounts Nydus images")
    p.add_argument("-V", "--version", action="store_true", help="print version information")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser("convert", parents=[common], help="convert an OCI image to a Nydus image",
                       description="Convert an OCI image in a registry to a Nydus image")
    c.add_argument("--source", default=_env("SOURCE"), help="source OCI image reference")
    c.add_argument("--target", default=_env("TARGET"), help="target Nydus image reference")
    c.add_argument("--target-suffix", default=_env("TARGET_SUFFIX"),
                   help="target = source + this suffix on the tag (instead of --target)")
    c.add_argument("--source-insecure", action="store_true", help="skip TLS verification of the source registry")
    c.add_argument("--target-insecure", action="store_true", help="skip TLS verification of the target registry")
    c.add_argument("--plain-http", action="store_true", default=bool(_env("PLAIN_HTTP")),
                   help="talk plain HTTP to the registries")
    c.add_argument("--fs-version", default=_env("FS_VERSION", "6"), choices=("5", "6"),
                   help="RAFS version of the Nydus image (default: 6)")
    c.add_argument("--compressor", default=_env("COMPRESSOR", "zstd"), choices=("none", "lz4_block", "zstd"),
                   help="blob data compressor (default: zstd)")
    c.add_argument("--chunk-size", "--fs-chunk-size", dest="chunk_size", type=_size, default=0x100000,
                   help="chunk size, a power of two in 0x1000..0x1000000 (default: 0x100000)")
    c.add_argument("--prefetch-patterns", action="store_true",
                   help="read prefetch paths (absolute, one per line) from stdin")
    c.add_argument("--platform", action="append", default=None,
                   help=f"platform to convert, os/arch[/variant] (default: {host_platform()}); repeatable")
    c.add_argument("--all-platforms", action="store_true", help="convert every platform of an image index")
    c.add_argument("--merge-platform", "--multi-platform", dest="merge_platform", action="store_true",
                   help="push one index holding the source and the Nydus manifests")
    c.add_argument("--oci", action="store_true", help="always produce OCI media types (not Docker v2)")
    c.add_argument("--work-dir", default=_env("WORK_DIR", "./tmp"), help="work directory (default: ./tmp)")
    c.add_argument("--push-chunk-size", type=_mb, default=0, help="push blobs in chunks of this size (e.g. 16MB)")
    c.add_argument("--concurrency", type=int, default=0, help="layers converted at once (default: CPUs, max 4)")
    c.add_argument("--output-json", default=_env("OUTPUT_JSON"), help="write conversion metrics to this file")
    _backend_flags(c, "")

    k = sub.add_parser("check", parents=[common], help="check a Nydus image",
                       description="Check the manifest, bootstrap and blobs of a Nydus image, and optionally "
                                   "compare its files with the source image")
    k.add_argument("--target", default=_env("TARGET"), help="Nydus image reference")
    k.add_argument("--source", default=_env("SOURCE"), help="source OCI image to compare the files with")
    k.add_argument("--source-insecure", action="store_true")
    k.add_argument("--target-insecure", action="store_true")
    k.add_argument("--plain-http", action="store_true", default=bool(_env("PLAIN_HTTP")))
    k.add_argument("--platform", default=None, help=f"platform to check (default: {host_platform()})")
    k.add_argument("--work-dir", default=_env("WORK_DIR", "./output"))
    k.add_argument("--nydusd", default=_env("NYDUSD"),
                   help="nydusd command that mounts the image for the comparison (default: ours)")
    how = k.add_mutually_exclusive_group()
    how.add_argument("--mount", dest="mount", action="store_const", const=True, default=None,
                     help="compare the image mounted by nydusd (the default where FUSE mounts work)")
    how.add_argument("--unpack", dest="mount", action="store_const", const=False,
                     help="compare the image unpacked by nydus-image instead of mounting it")
    _backend_flags(k, "target-")

    y = sub.add_parser("copy", parents=[common], help="copy an image (OCI or Nydus) between registries",
                       description="Copy an image (OCI or Nydus, manifest or index) between registries")
    y.add_argument("--source", default=_env("SOURCE"), help="source image reference")
    y.add_argument("--target", default=_env("TARGET"), help="target image reference")
    y.add_argument("--source-insecure", action="store_true")
    y.add_argument("--target-insecure", action="store_true")
    y.add_argument("--plain-http", action="store_true", default=bool(_env("PLAIN_HTTP")))
    y.add_argument("--platform", action="append", default=None, help="platform to copy from an index")
    y.add_argument("--all-platforms", action="store_true", help="copy the whole index")
    y.add_argument("--push-chunk-size", type=_mb, default=0)
    y.add_argument("--work-dir", default=_env("WORK_DIR", "./tmp"))

    m = sub.add_parser("mount", aliases=["view"], parents=[common], help="mount a Nydus image with nydusd",
                       description="Mount a Nydus image from its registry with nydusd (FUSE) until interrupted")
    m.add_argument("--target", default=_env("TARGET"), help="Nydus image reference")
    m.add_argument("--target-insecure", action="store_true")
    m.add_argument("--plain-http", action="store_true", default=bool(_env("PLAIN_HTTP")))
    m.add_argument("--mount-path", default="./image-fs", help="mountpoint (default: ./image-fs)")
    m.add_argument("--platform", default=None)
    m.add_argument("--work-dir", default=_env("WORK_DIR", "./tmp"))
    m.add_argument("--nydusd", default=_env("NYDUSD"), help="nydusd command (default: this package's nydusd)")
    m.add_argument("--prefetch", action="store_true", help="prefetch the whole image")
    return p


def _backend_flags(p: argparse.ArgumentParser, prefix: str) -> None:
    p.add_argument(f"--{prefix}backend-type", dest="backend_type", default=None, choices=("s3", "oss"),
                   help="push/read the data blobs to/from this storage instead of the registry")
    p.add_argument(f"--{prefix}backend-config", dest="backend_config", default=None,
                   help="the backend's JSON config, as nydusd's backend.config")
    p.add_argument(f"--{prefix}backend-config-file", dest="backend_config_file", default=None,
                   help="file holding the backend's JSON config")


def _backend(args: argparse.Namespace):
    if not args.backend_type:
        if args.backend_config or args.backend_config_file:
            raise _UsageError("--backend-config needs --backend-type")
        return None
    text = args.backend_config
    if args.backend_config_file:
        if text:
            raise _UsageError("--backend-config conflicts with --backend-config-file")
        try:
            with open(args.backend_config_file) as f:
                text = f.read()
        except OSError as exc:
            raise _UsageError(f"--backend-config-file {args.backend_config_file!r}: {exc.strerror}") from None
    if not text:
        raise _UsageError("--backend-type needs --backend-config or --backend-config-file")
    return object_store_from_config(args.backend_type, text)


class _ProgressPrinter:
    """Per-label status: plain lines off a terminal, a redrawn block on one."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.rows: dict[str, str] = {}
        self.drawn = 0

    def __call__(self, label: str, text: str) -> None:
        if not self.tty:
            self.stream.write(f"{label}: {text}\n")
            self.stream.flush()
            return
        self.rows[label] = text
        if self.drawn:
            self.stream.write(f"\x1b[{self.drawn}F")
        for lab, t in self.rows.items():
            self.stream.write(f"\x1b[2K{lab}: {t}\n")
        self.drawn = len(self.rows)
        self.stream.flush()


def _require(value, flag: str) -> str:
    if not value:
        raise _UsageError(f"{flag} is required")
    return value


class _UsageError(Exception):
    pass


def _cmd_convert(args: argparse.Namespace) -> int:
    source = _require(args.source, "--source")
    target = args.target
    if not target and args.target_suffix:
        ref = Reference.parse(source)
        target = f"{ref.registry}/{ref.repository}:{ref.tag or 'latest'}{args.target_suffix}"
    target = _require(target, "--target (or --target-suffix)")
    patterns = sys.stdin.read() if args.prefetch_patterns else ""
    opts = ConvertOptions(source=source, target=target, source_insecure=args.source_insecure,
                          target_insecure=args.target_insecure, plain_http=args.plain_http,
                          fs_version=args.fs_version, compressor=args.compressor, chunk_size=args.chunk_size,
                          prefetch_patterns=patterns, platforms=args.platform or [],
                          all_platforms=args.all_platforms, merge_platform=args.merge_platform, oci=args.oci,
                          work_dir=args.work_dir, push_chunk_size=args.push_chunk_size,
                          concurrency=args.concurrency, backend=_backend(args))
    result = asyncio.run(convert_image(opts, _ProgressPrinter()))
    log.info("converted %s to %s (%s): source %d bytes, target %d bytes, %.3f s", source, result.target,
             result.manifest_digest, result.source_size, result.target_size, result.elapsed_ns / 1e9)
    if args.output_json:
        try:
            with open(args.output_json, "w") as f:
                json.dump(result.metrics(), f, indent=2)
        except OSError as exc:
            raise _UsageError(f"cannot write --output-json {args.output_json!r}: {exc.strerror}") from None
    return 0


def _cmd_copy(args: argparse.Namespace) -> int:
    digest = asyncio.run(copy_image(_require(args.source, "--source"), _require(args.target, "--target"),
                                    source_insecure=args.source_insecure, target_insecure=args.target_insecure,
                                    plain_http=args.plain_http, platforms=args.platform or [],
                                    all_platforms=args.all_platforms, work_dir=args.work_dir,
                                    push_chunk_size=args.push_chunk_size, progress=_ProgressPrinter()))
    log.info("copied %s to %s (%s)", args.source, args.target, digest)
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    opts = CheckOptions(target=_require(args.target, "--target"), source=args.source,
                        target_insecure=args.target_insecure, source_insecure=args.source_insecure,
                        plain_http=args.plain_http, platform=args.platform, work_dir=args.work_dir,
                        backend=_backend(args), mount=args.mount, nydusd=args.nydusd)
    asyncio.run(check_image(opts, _ProgressPrinter()))
    log.info("verified Nydus image %s", opts.target)
    return 0


def _cmd_mount(args: argparse.Namespace) -> int:
    _require(args.target, "--target")
    try:
        os.makedirs(args.work_dir, exist_ok=True)
        work = tempfile.mkdtemp(prefix="nydusify-mount-", dir=args.work_dir)
    except OSError as exc:
        raise _UsageError(f"work dir {args.work_dir!r}: {exc.strerror}") from None
    try:
        boot = os.path.join(work, "nydus_bootstrap")
        ref = asyncio.run(fetch_nydus_bootstrap(args.target, boot, plain_http=args.plain_http,
                                                insecure=args.target_insecure, platform=args.platform))
        config = nydusd_config(ref, plain_http=args.plain_http, insecure=args.target_insecure,
                               cache_dir=os.path.join(work, "cache"), prefetch_all=args.prefetch)
        cfg_path = write_nydusd_config(os.path.join(work, "nydusd-config.json"), config)
        os.makedirs(args.mount_path, exist_ok=True)
        cmd = nydusd_command(args.nydusd) + ["fuse", "--config", cfg_path, "--bootstrap", boot,
                                             "--mountpoint", args.mount_path, "--log-level", args.log_level]
        log.info("mounting %s at %s: %s", ref, args.mount_path, " ".join(cmd))
        proc = subprocess.Popen(cmd)

        def forward(signum, _frame):
            proc.send_signal(signum)

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, forward)
        rc = proc.wait()
        if rc != 0:
            log.error("nydusd exited with status %d", rc)
            return 1
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


_COMMANDS = {"convert": _cmd_convert, "check": _cmd_check, "copy": _cmd_copy, "mount": _cmd_mount, "view": _cmd_mount}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        sys.stdout.write(version_text("nydusify"))
        return 0
    try:
        setup_logging("debug" if args.debug else args.log_level, args.log_file)
    except NydusError as exc:
        sys.stderr.write(f"nydusify: {exc}\n")
        return 1
    if not args.command:
        parser.print_usage(sys.stderr)
        return 1
    return run_subcommand(lambda: _COMMANDS[args.command](args), log, expected=(_UsageError,))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
