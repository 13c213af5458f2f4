"""``nydus-image``: the image builder's command line, compatible with upstream's (nydus-surface.md §4).

Subcommands: ``create``, ``merge``, ``check``, ``inspect``, ``unpack``.  Flags
keep upstream's spellings and aliases (``--type``/``--source-type``,
``--blob-inline-meta``/``--inline-bootstrap``) because nydus-snapshotter's
converter drives this tool and greps ``create -h`` to decide what to pass.
Only working features are listed in the help: ``--batch-size`` (only ``0``)
and ``--encrypt`` are accepted but hidden, and refused with a clear message
when they ask for something this builder does not do.

Exit status: 0 success, 1 any error (the message names what is wrong), 2
``merge`` of inconsistent filesystems, 130 interrupted.  Logs go to stderr (or
``--log-file``); only ``inspect`` writes to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Sequence

from .._version import version_info, version_text
from ..builder import (DEFAULT_CHUNK_SIZE, INSPECT_COMMANDS, BuildOptions, InconsistentFilesystemError,
                       MergeOptions, build, check, format_blob_features, inspect_request, merge,
                       parse_prefetch_patterns, unpack, validate_chunk_size)
from ..errors import BuildError, NydusError
from ..format.types import Compressor, Digester
from ..utils.logging import setup_logging
from ._common import run_subcommand

__all__ = ["main", "build_parser"]

log = logging.getLogger("nydus_vfs.nydus_image")

_CREATE_TYPES = ("directory", "dir-rafs", "tar-rafs", "targz-rafs")


class _CliError(Exception):
    """A usage problem found after argparse (conflicting options); exit status 1."""


def _size(text: str) -> int:
    """Decimal or ``0x`` hex, as upstream parses ``--chunk-size``."""
    try:
        return int(text[2:], 16) if text.lower().startswith("0x") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}") from None


def _chunk_size(text: str) -> int:
    value = _size(text)
    try:
        return validate_chunk_size(value)
    except BuildError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-L", "--log-file", default=argparse.SUPPRESS, help="log file path")
    common.add_argument("-l", "--log-level", default=argparse.SUPPRESS,
                        choices=("trace", "debug", "info", "warn", "error"), help="log level (default: info)")

    p = argparse.ArgumentParser(
        prog="nydus-image", parents=[common],
        description="Build, analyze, inspect or validate RAFS filesystems/Nydus accelerated container images")
    p.add_argument("-V", "--version", action="store_true", help="print version information")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser("create", parents=[common],
                       help="create RAFS filesystems from directories or tar files",
                       description="Create RAFS filesystems from directories or tar files")
    c.add_argument("SOURCE", help="source from which to build the RAFS filesystem")
    c.add_argument("-t", "--type", "--source-type", dest="type", default="dir-rafs", choices=_CREATE_TYPES,
                   help="conversion type (default: dir-rafs)")
    c.add_argument("-B", "--bootstrap", help="file path to save the generated RAFS metadata blob")
    c.add_argument("-D", "--blob-dir", help="directory path to save generated RAFS metadata and data blobs")
    c.add_argument("-b", "--blob", help="file path to save the generated RAFS data blob")
    c.add_argument("--blob-inline-meta", "--inline-bootstrap", dest="blob_inline_meta", action="store_true",
                   help="inline RAFS metadata and blob metadata into the data blob")
    c.add_argument("--blob-id", help="id of the generated RAFS data blob (default: its sha256)")
    c.add_argument("--blob-offset", type=int, default=0, help=argparse.SUPPRESS)
    c.add_argument("--chunk-size", type=_chunk_size, default=DEFAULT_CHUNK_SIZE,
                   help="size of data chunks, a power of two between 0x1000 and 0x1000000 (default: 0x100000)")
    c.add_argument("--batch-size", type=_size, default=0, help=argparse.SUPPRESS)
    c.add_argument("--compressor", default="zstd", choices=("none", "lz4_block", "zstd"),
                   help="algorithm to compress data chunks (default: zstd)")
    c.add_argument("--digester", default="blake3", choices=("blake3", "sha256"),
                   help="algorithm to digest data chunks (default: blake3)")
    c.add_argument("-v", "--fs-version", default="6", choices=("5", "6"), help="RAFS format version (default: 6)")
    c.add_argument("--features", choices=("blob-toc",), help="enable features: blob-toc (RAFS v6 only)")
    c.add_argument("--chunk-dict", help="chunk dictionary for data deduplication: bootstrap=PATH or PATH")
    c.add_argument("--parent-bootstrap", help="file path of the parent/referenced RAFS metadata blob")
    c.add_argument("--aligned-chunk", action="store_true", help="align uncompressed data chunks to 4K (RAFS v5)")
    c.add_argument("--repeatable", action="store_true", help="generate reproducible RAFS metadata")
    c.add_argument("--disable-check", action="store_true", help=argparse.SUPPRESS)
    c.add_argument("--whiteout-spec", default="oci", choices=("oci", "overlayfs", "none"),
                   help="type of whiteout specification (default: oci)")
    c.add_argument("--prefetch-policy", default="none", choices=("fs", "blob", "none"),
                   help="data prefetch policy; with fs or blob, absolute paths are read from stdin")
    c.add_argument("-J", "--output-json", help="file path to save the result in JSON format")
    c.add_argument("-E", "--encrypt", action="store_true", help=argparse.SUPPRESS)

    m = sub.add_parser("merge", parents=[common], help="merge multiple bootstraps into an overlaid bootstrap",
                       description="Merge multiple bootstraps (lowest layer first) into an overlaid bootstrap")
    m.add_argument("SOURCE", nargs="+", help="bootstrap paths, lowest layer first")
    m.add_argument("-B", "--bootstrap", help="output path of the merged bootstrap")
    m.add_argument("-D", "--blob-dir", help="directory to save the merged bootstrap (named by its sha256)")
    m.add_argument("--parent-bootstrap", help="file path of the parent RAFS metadata blob")
    m.add_argument("--chunk-dict", help="chunk dictionary the layers were built with: bootstrap=PATH or PATH")
    m.add_argument("--prefetch-policy", default="none", choices=("fs", "blob", "none"),
                   help="data prefetch policy; with fs, absolute paths are read from stdin")
    m.add_argument("--whiteout-spec", default="oci", choices=("oci", "overlayfs", "none"),
                   help="whiteout specification of the layers (default: oci)")
    m.add_argument("-J", "--output-json", help="file path to save the result in JSON format")
    for name, what in (("blob-digests", "RAFS blob digest"), ("original-blob-ids", "original blob id"),
                       ("blob-sizes", "RAFS blob size"), ("blob-toc-digests", "RAFS blob ToC digest"),
                       ("blob-toc-sizes", "RAFS blob ToC size")):
        m.add_argument(f"--{name}", help=f"{what} list separated by comma, one per source")

    k = sub.add_parser("check", parents=[common], help="validate RAFS filesystem metadata",
                       description="Validate RAFS filesystem metadata")
    k.add_argument("BOOTSTRAP", nargs="?", help="file path of RAFS metadata")
    k.add_argument("-B", "--bootstrap", dest="bootstrap_opt", help="[deprecated] file path of RAFS metadata")
    k.add_argument("-D", "--blob-dir", help="directory holding the data blobs, to check them too")
    k.add_argument("-v", "--verbose", action="store_true", help="output message in verbose mode")
    k.add_argument("-J", "--output-json", help="file path to save the result in JSON format")

    i = sub.add_parser("inspect", parents=[common], help="inspect RAFS filesystem metadata",
                       description="Inspect RAFS filesystem metadata in interactive or request mode")
    i.add_argument("BOOTSTRAP", nargs="?", help="file path of RAFS metadata")
    i.add_argument("-B", "--bootstrap", dest="bootstrap_opt", help="[deprecated] file path of RAFS metadata")
    i.add_argument("-D", "--blob-dir", help="directory holding the data blobs (unused by these requests)")
    i.add_argument("-R", "--request", help=f"request mode: one of {', '.join(INSPECT_COMMANDS)}; prints JSON")

    u = sub.add_parser("unpack", parents=[common], help="unpack a RAFS filesystem to a tar file",
                       description="Unpack a RAFS filesystem to an OCI layer tar file")
    u.add_argument("BOOTSTRAP", nargs="?", help="file path of RAFS metadata")
    u.add_argument("-B", "--bootstrap", dest="bootstrap_opt", help="[deprecated] file path of RAFS metadata")
    group = u.add_mutually_exclusive_group()
    group.add_argument("-b", "--blob", help="path to the RAFS data blob file")
    group.add_argument("-D", "--blob-dir", help="directory holding the data blobs, named by blob id")
    u.add_argument("--output", required=True, help="path for the output tar file")
    return p


def _bootstrap_arg(args: argparse.Namespace) -> str:
    path = args.BOOTSTRAP or args.bootstrap_opt
    if args.BOOTSTRAP and args.bootstrap_opt:
        raise _CliError("the BOOTSTRAP argument conflicts with --bootstrap")
    if not path:
        raise _CliError("a BOOTSTRAP path is required")
    return path


def _output_json(path: str | None, *, bootstrap: str, blobs: list[str],
                 fs_version: int, compressor: Compressor, trace: dict[str, float], pretty: bool) -> None:
    if not path:
        return
    v = version_info()
    doc = {
        "version": f"{v['package_ver']}-{v['git_commit']}",
        "bootstrap": bootstrap,
        "blobs": blobs,
        "external_bootstrap": "",
        "external_blobs": [],
        "trace": {"consumed_time": {k: round(t, 6) for k, t in trace.items()}, "registered_events": {}},
        "fs_version": str(fs_version),
        "compressor": Compressor(compressor).cli_name,
    }
    text = json.dumps(doc, indent=2) if pretty else json.dumps(doc, separators=(",", ":"))
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as exc:
        raise BuildError(f"can not open output file {path!r}: {exc.strerror}") from None


def _list(text: str | None, *, ints: bool = False) -> list[Any] | None:
    if text is None:
        return None
    items = [x.strip() for x in text.split(",")]
    if not ints:
        return items
    try:
        return [int(x) for x in items]
    except ValueError:
        raise _CliError(f"invalid number in list {text!r}") from None


def _patterns(policy: str) -> list[tuple[bytes, ...]]:
    if policy == "none":
        return []
    return parse_prefetch_patterns(sys.stdin.buffer.read().splitlines())


def _cmd_create(args: argparse.Namespace) -> int:
    if args.encrypt:
        raise _CliError("--encrypt is not supported by this nydus-image (images are never encrypted)")
    if args.batch_size:
        raise _CliError(f"--batch-size {args.batch_size:#x} is not supported by this nydus-image (only 0)")
    if args.blob_offset:
        raise _CliError("--blob-offset is not supported by this nydus-image (only 0)")
    opts = BuildOptions(
        source_type=args.type,
        fs_version=int(args.fs_version),
        compressor=Compressor.from_cli(args.compressor),
        digester=Digester.from_cli(args.digester),
        chunk_size=args.chunk_size,
        bootstrap=args.bootstrap,
        blob=args.blob,
        blob_dir=args.blob_dir,
        blob_inline_meta=args.blob_inline_meta,
        blob_toc=args.features == "blob-toc",
        blob_id=args.blob_id,
        whiteout_spec=args.whiteout_spec,
        prefetch_policy=args.prefetch_policy,
        prefetch_patterns=_patterns(args.prefetch_policy),
        chunk_dict=args.chunk_dict,
        parent_bootstrap=args.parent_bootstrap,
        aligned_chunk=args.aligned_chunk,
        repeatable=args.repeatable,
    )
    kind = "directory" if opts.source_type in ("dir-rafs", "directory") else "file"
    if kind == "directory" and not os.path.isdir(args.SOURCE):
        raise _CliError(f"specified path must be a directory: {args.SOURCE!r}")
    if kind == "file" and (not os.path.exists(args.SOURCE) or os.path.isdir(args.SOURCE)):
        raise _CliError(f"specified path must be a regular/fifo/char_device file: {args.SOURCE!r}")
    result = build(args.SOURCE, opts)
    log.info("successfully built RAFS filesystem: \nmeta blob path: %s\ndata blob size: %#x\ndata blobs: %s",
             result.bootstrap_path or result.blob_path or "", result.blob_size, result.blobs)
    _output_json(args.output_json, bootstrap=result.bootstrap_path or "", blobs=result.blobs,
                 fs_version=result.fs_version, compressor=result.compressor, trace=result.trace, pretty=True)
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    opts = MergeOptions(
        bootstrap=args.bootstrap,
        blob_dir=args.blob_dir,
        parent_bootstrap=args.parent_bootstrap,
        chunk_dict=args.chunk_dict,
        whiteout_spec=args.whiteout_spec,
        prefetch_policy=args.prefetch_policy,
        prefetch_patterns=_patterns(args.prefetch_policy),
        blob_digests=_list(args.blob_digests),
        original_blob_ids=_list(args.original_blob_ids),
        blob_sizes=_list(args.blob_sizes, ints=True),
        blob_toc_digests=_list(args.blob_toc_digests),
        blob_toc_sizes=_list(args.blob_toc_sizes, ints=True),
    )
    result = merge(args.SOURCE, opts)
    log.info("successfully merged %d bootstrap(s) into %s, data blobs: %s", len(args.SOURCE),
             result.bootstrap_path, result.blobs)
    _output_json(args.output_json, bootstrap=result.bootstrap_path or "", blobs=result.blobs,
                 fs_version=result.fs_version, compressor=result.compressor, trace=result.trace, pretty=True)
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    path = _bootstrap_arg(args)
    result = check(path, blob_dir=args.blob_dir, verbose=args.verbose)
    out = sys.stdout
    for line in result.verbose_lines:
        out.write(line + "\n")
    out.write("RAFS filesystem metadata is valid, referenced data blobs: \n")
    for idx, b in enumerate(result.blobs):
        out.write(f"\t {idx}: {b.blob_id}, compressed size {b.compressed_size}, uncompressed size "
                  f"{b.uncompressed_size}, chunk size: {b.chunk_size}, chunk count: {b.chunk_count}, "
                  f"features: {format_blob_features(b.features)}\n")
    out.flush()
    _output_json(args.output_json, bootstrap=path, blobs=[b.blob_id for b in result.blobs],
                 fs_version=result.fs_version, compressor=result.compressor, trace={}, pretty=False)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    path = _bootstrap_arg(args)
    if args.request is not None:
        value = inspect_request(path, args.request)
        sys.stdout.write(json.dumps(value) + "\n")
        return 0
    # Interactive prompt, as upstream: one command per line until exit/q/EOF.
    while True:
        sys.stdout.write("Inspecting RAFS :> ")
        sys.stdout.flush()
        line = sys.stdin.readline()
        if not line or line.strip() in ("exit", "q"):
            return 0
        if not line.strip():
            continue
        try:
            sys.stdout.write(json.dumps(inspect_request(path, line.strip())) + "\n")
        except BuildError as exc:
            sys.stdout.write(f"Failed to execute command, {exc}\n")


def _cmd_unpack(args: argparse.Namespace) -> int:
    path = _bootstrap_arg(args)
    count = unpack(path, args.output, blob=args.blob, blob_dir=args.blob_dir)
    log.info("unpacked %d entries to %s", count, args.output)
    return 0


_COMMANDS = {"create": _cmd_create, "merge": _cmd_merge, "check": _cmd_check, "inspect": _cmd_inspect,
             "unpack": _cmd_unpack}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        sys.stdout.write(version_text("nydus-image"))
        return 0
    try:
        setup_logging(getattr(args, "log_level", "info"), getattr(args, "log_file", None))
    except NydusError as exc:
        sys.stderr.write(f"nydus-image: {exc}\n")
        return 1
    if not args.command:
        parser.print_usage(sys.stderr)
        return 1
    # merge exits 2 on inconsistent layers, as upstream (nydus-surface.md §4.2).
    return run_subcommand(lambda: _COMMANDS[args.command](args), log, expected=(_CliError,),
                          statuses={InconsistentFilesystemError: (2, "message:%s")})


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
