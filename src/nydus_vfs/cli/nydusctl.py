"""``nydusctl``: an operator's client for a running nydusd's HTTP API (nydus-surface.md §3.7).

    nydusctl --sock API.sock [--raw] info
    nydusctl --sock API.sock set log-level debug
    nydusctl --sock API.sock metrics backend|cache|fsstats [--id ID] [--interval N]
    nydusctl --sock API.sock mount -s SOURCE -c CONFIGFILE -m MOUNTPOINT [-t rafs|passthrough_fs]
    nydusctl --sock API.sock umount -m MOUNTPOINT

Tables for people by default; ``--raw`` prints the daemon's JSON as it came.
Exit status 0 on success, 1 when the daemon answers an error (its message is
printed), 2 for usage errors, 3 when the socket cannot be reached.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
import time
import urllib.parse
from typing import Any, TextIO

from ..utils.fops import FOPS

__all__ = ["main", "ApiClient", "ApiCallError"]


class ApiCallError(Exception):
    """The daemon answered with an error status; ``message`` is its error body's message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class _UsageError(Exception):
    """The command line asks for something impossible (exit status 2)."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class ApiClient:
    """A blocking client of the API socket (one keep-alive connection)."""

    def __init__(self, path: str, *, timeout: float = 30.0) -> None:
        self._conn = _UnixConnection(path, timeout)

    def call(self, method: str, path: str, query: dict[str, str] | None = None, body: Any = None) -> Any:
        """The decoded JSON answer (None for 204); ApiCallError for an error status, OSError if unreachable."""
        if query:
            path += "?" + urllib.parse.urlencode(query)
        data = None if body is None else json.dumps(body).encode()
        self._conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        resp = self._conn.getresponse()
        raw = resp.read()
        if resp.status >= 400:
            try:
                message = json.loads(raw)["message"]
            except (ValueError, KeyError, TypeError):
                message = raw.decode(errors="replace")
            raise ApiCallError(resp.status, message)
        if not raw or resp.status == 204:
            return None
        ctype = resp.getheader("Content-Type", "")
        return json.loads(raw) if "json" in ctype else raw.decode(errors="replace")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _table(rows: list[tuple[str, Any]], out: TextIO) -> None:
    width = max((len(k) for k, _ in rows), default=0)
    for key, value in rows:
        out.write(f"{key:<{width}}  {value}\n")


def _print_info(info: dict, out: TextIO) -> None:
    v = info.get("version") or {}
    _table([("State", info.get("state")), ("ID", info.get("id") or "-"),
            ("Version", v.get("package_ver")), ("Git commit", v.get("git_commit")),
            ("Build time", v.get("build_time"))], out)
    mounts = info.get("backend_collection") or {}
    out.write(f"\n{'MOUNTPOINT':<32} {'TYPE':<14} {'BACKEND':<10} MOUNTED\n")
    for path, entry in sorted(mounts.items()):
        cfg = entry.get("config") or {}
        backend = (cfg.get("backend") or {}).get("type", "-")
        out.write(f"{path:<32} {entry.get('backend_type', ''):<14} {backend:<10} {entry.get('mounted_time', '')}\n")
    if not mounts:
        out.write("(nothing mounted)\n")


def _print_backend(m: dict, out: TextIO) -> None:
    count = m.get("read_count", 0)
    latency = m.get("read_cumulative_latency_millis_total", 0)
    _table([("Backend type", m.get("backend_type")), ("Read requests", count),
            ("Read errors", m.get("read_errors", 0)), ("Read data", _size(m.get("read_amount_total", 0))),
            ("Average latency", f"{latency / count:.2f} ms" if count else "-")], out)


def _print_cache(m: dict, out: TextIO) -> None:
    begin = m.get("prefetch_begin_time_secs", 0) * 1000 + m.get("prefetch_begin_time_millis", 0) % 1000
    end = m.get("prefetch_end_time_secs", 0) * 1000 + m.get("prefetch_end_time_millis", 0) % 1000
    amount = m.get("prefetch_data_amount", 0)
    rate = f"{_size(amount * 1000 / (end - begin))}/s" if end > begin and amount else "-"
    _table([("Cache files", ", ".join(m.get("underlying_files", [])) or "-"),
            ("Reads", m.get("total", 0)), ("Whole hits", m.get("whole_hits", 0)),
            ("Partial hits", m.get("partial_hits", 0)), ("Prefetched data", _size(amount)),
            ("Prefetch requests", m.get("prefetch_requests_count", 0)), ("Prefetch throughput", rate),
            ("All data cached", "yes" if m.get("data_all_ready") else "no")], out)


def _print_fsstats(m: dict, out: TextIO) -> None:
    _table([("ID", m.get("id")), ("Opens", m.get("nr_opens", 0)), ("Data read", _size(m.get("data_read", 0)))], out)
    out.write(f"\n{'FOP':<14} {'HITS':>10} {'ERRORS':>8}\n")
    for name, hits, errors in zip(FOPS, m.get("fop_hits", []), m.get("fop_errors", [])):
        if hits or errors:
            out.write(f"{name:<14} {hits:>10} {errors:>8}\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nydusctl", description="Query and control a running nydusd")
    p.add_argument("-S", "--sock", required=True, help="nydusd API socket (--apisock)")
    p.add_argument("-r", "--raw", action="store_true", help="print the daemon's JSON as it is")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="daemon state, version and mounts")
    s = sub.add_parser("set", help="change a setting of the running daemon")
    s.add_argument("key", choices=["log-level"])
    s.add_argument("value", choices=["trace", "debug", "info", "warn", "error", "off"])
    m = sub.add_parser("metrics", help="backend, blob cache or filesystem counters")
    m.add_argument("kind", choices=["backend", "cache", "fsstats"])
    m.add_argument("--id", help="instance id (mountpoint; config id for the cache)")
    m.add_argument("-I", "--interval", type=float, default=0, help="repeat every N seconds")
    mo = sub.add_parser("mount", help="mount a filesystem at a pseudo path")
    mo.add_argument("-s", "--source", required=True)
    mo.add_argument("-c", "--config", help="config file (required for rafs)")
    mo.add_argument("-m", "--mountpoint", required=True)
    mo.add_argument("-t", "--type", default="rafs", choices=["rafs", "passthrough_fs"])
    u = sub.add_parser("umount", help="unmount a pseudo path")
    u.add_argument("-m", "--mountpoint", required=True)
    return p


def _run(args: argparse.Namespace, client: ApiClient, out: TextIO) -> None:
    def show(data: Any, printer) -> None:
        if args.raw:
            out.write(json.dumps(data) + "\n")
        else:
            printer(data, out)

    if args.command == "info":
        show(client.call("GET", "/api/v1/daemon"), _print_info)
    elif args.command == "set":
        client.call("PUT", "/api/v1/daemon", body={"log_level": args.value})
        out.write(f"log level set to {args.value}\n")
    elif args.command == "metrics":
        path, printer = {"backend": ("/api/v1/metrics/backend", _print_backend),
                         "cache": ("/api/v1/metrics/blobcache", _print_cache),
                         "fsstats": ("/api/v1/metrics", _print_fsstats)}[args.kind]
        query = {"id": args.id} if args.id else None
        while True:
            show(client.call("GET", path, query), printer)
            if args.interval <= 0:
                break
            out.flush()
            time.sleep(args.interval)
            out.write("\n")
    elif args.command == "mount":
        config = ""
        if args.config:
            try:
                with open(args.config, encoding="utf-8") as f:
                    config = f.read()
            except (OSError, UnicodeDecodeError) as exc:
                raise _UsageError(f"config {args.config}: {getattr(exc, 'strerror', None) or exc}") from None
        elif args.type == "rafs":
            raise _UsageError("a rafs mount needs --config")
        client.call("POST", "/api/v1/mount", {"mountpoint": args.mountpoint},
                    {"source": args.source, "fs_type": args.type, "config": config})
        out.write(f"mounted {args.source} at {args.mountpoint}\n")
    elif args.command == "umount":
        client.call("DELETE", "/api/v1/mount", {"mountpoint": args.mountpoint})
        out.write(f"unmounted {args.mountpoint}\n")


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = out or sys.stdout
    client = ApiClient(args.sock)
    try:
        _run(args, client, out)
    except ApiCallError as exc:
        print(f"nydusctl: {exc.message}", file=sys.stderr)
        return 1
    except _UsageError as exc:
        print(f"nydusctl: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        print(f"nydusctl: cannot talk to nydusd at {args.sock}: {exc.strerror or exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
