"""``nydus-backend-proxy`` as a real process, checked with Debian's curl and an aiohttp client.

What each test pins is the HTTP contract of nydus-surface.md §6 as this
implementation answers it (the deliberate differences, 206 and a Content-Range
total that is the file size, are in the module docstring of
``nydus_vfs.cli.nydus_backend_proxy``).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import subprocess
import sys

import aiohttp
import pytest

from nydus_vfs.cli.nydus_backend_proxy import ByteRange, RangeNotSatisfiable, parse_range

PROXY = [sys.executable, "-m", "nydus_vfs.cli.nydus_backend_proxy"]
CURL = shutil.which("curl")


def _blob(n: int, seed: bytes = b"x") -> bytes:
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(seed + i.to_bytes(8, "little")).digest()
        i += 1
    return bytes(out[:n])


class Proxy:
    def __init__(self, blobsdir, *extra: str, env: dict | None = None) -> None:
        self.proc = subprocess.Popen(PROXY + ["--blobsdir", str(blobsdir), *extra], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
        line = self.proc.stdout.readline().decode()
        m = re.search(r"on http://([\d.]+):(\d+)", line)
        if not m:
            self.proc.kill()
            raise AssertionError(f"proxy did not start: {line!r} {self.proc.stderr.read().decode()}")
        self.host, self.port = m.group(1), int(m.group(2))
        self.url = f"http://{self.host}:{self.port}"

    def stop(self) -> str:
        self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err.decode()


@pytest.fixture
def blobsdir(tmp_path):
    d = tmp_path / "blobs"
    d.mkdir()
    return d


@pytest.fixture
def proxy(blobsdir):
    p = Proxy(blobsdir, "--port", "0")
    yield p
    p.stop()
    assert p.proc.returncode == 0, "SIGTERM must end the proxy with status 0"


def _put(d, data: bytes) -> str:
    hexd = hashlib.sha256(data).hexdigest()
    (d / hexd).write_bytes(data)
    return hexd


def curl(*args: str) -> tuple[int, dict[str, str], bytes]:
    """(status, lower-cased headers, body) of one curl request."""
    if CURL is None:
        pytest.skip("curl is not installed (scripts/setup installs it)")
    r = subprocess.run([CURL, "-s", "-S", "-i", "--max-time", "20", *args], capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr.decode()
    head, _, body = r.stdout.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body


# -- the range parser (sans-IO) -------------------------------------------------------------------

@pytest.mark.parametrize("header,expect", [
    ("bytes=0-0", (0, 0)), ("bytes=10-19", (10, 19)), ("bytes=10-", (10, 99)), ("bytes=-5", (95, 99)),
    ("bytes=90-1000", (90, 99)), ("bytes=-1000", (0, 99)), ("bytes=3-4,10-20", (3, 4)), ("Bytes = 1 - 2", (1, 2)),
])
def test_parse_range_forms(header, expect):
    assert parse_range(header, 100) == ByteRange(*expect, 100)


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=100-200", "bytes=5-4", "bytes=-0", "bytes=-", "bytes=a-b",
                                    "items=0-1", "0-1", "bytes="])
def test_parse_range_refuses(header):
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, 100)


def test_parse_range_of_an_empty_file_is_never_satisfiable():
    for header in ("bytes=0-", "bytes=-1", "bytes=0-0"):
        with pytest.raises(RangeNotSatisfiable):
            parse_range(header, 0)


# -- HTTP, with curl ---------------------------------------------------------------------------------

def test_head_and_get_whole_blob(proxy, blobsdir):
    data = _blob(300_000)
    hexd = _put(blobsdir, data)
    status, h, body = curl("-I", f"{proxy.url}/v2/repo/blobs/sha256:{hexd}")
    assert status == 200 and body == b""
    assert h["content-length"] == str(len(data))
    assert h["content-type"] == "application/octet-stream"
    assert h["docker-content-digest"] == f"sha256:{hexd}"
    status, h, body = curl(f"{proxy.url}/ns/anything/blobs/sha256:{hexd}")
    assert status == 200 and body == data and h["content-length"] == str(len(data))
    # Upstream's static route: the file by its bare name.
    status, _, body = curl(f"{proxy.url}/{hexd}")
    assert status == 200 and body == data


def test_range_get_is_206_with_the_file_size_as_total(proxy, blobsdir):
    data = _blob(100_000)
    hexd = _put(blobsdir, data)
    url = f"{proxy.url}/v2/r/blobs/sha256:{hexd}"
    status, h, body = curl("-H", "Range: bytes=1000-1999", url)
    assert status == 206 and body == data[1000:2000]
    assert h["content-range"] == f"bytes 1000-1999/{len(data)}"
    assert h["content-length"] == "1000" and h["docker-content-digest"] == f"sha256:{hexd}"
    status, h, body = curl("-H", "Range: bytes=-10", url)
    assert status == 206 and body == data[-10:]
    status, h, body = curl("-H", "Range: bytes=99990-200000", url)
    assert status == 206 and body == data[99990:] and h["content-range"] == f"bytes 99990-99999/{len(data)}"
    # Multi-range: only the first is served, as upstream.
    status, h, body = curl("-H", "Range: bytes=0-3,10-20", url)
    assert status == 206 and body == data[:4]


def test_unsatisfiable_and_malformed_ranges_are_416(proxy, blobsdir):
    hexd = _put(blobsdir, b"0123456789")
    url = f"{proxy.url}/v2/r/blobs/sha256:{hexd}"
    for rng in ("bytes=10-20", "bytes=5-2", "bytes=x-y"):
        status, h, _ = curl("-H", f"Range: {rng}", url)
        assert status == 416, rng
        assert h["content-range"] == "bytes */10"


def test_bad_digests_are_refused(proxy, blobsdir, tmp_path):
    (tmp_path / "secret").write_bytes(b"outside the blobs dir")
    hexd = _put(blobsdir, b"data")
    # No sha256: prefix -> 400, even for a file that exists.
    assert curl(f"{proxy.url}/v2/r/blobs/{hexd}")[0] == 400
    assert curl(f"{proxy.url}/v2/r/blobs/sha512:{hexd}")[0] == 400
    # Traversal, percent-encoded so it reaches the digest segment.
    for digest in ("sha256:..%2Fsecret", "sha256:%2E%2E%2Fsecret", "sha256:..", "sha256:.hidden", "sha256:a%00b"):
        status, _, body = curl("--path-as-is", f"{proxy.url}/v2/r/blobs/{digest}")
        assert status == 400, (digest, body)
        assert b"outside the blobs dir" not in body
    # Unencoded traversal does not even match a route.
    status, _, body = curl("--path-as-is", f"{proxy.url}/v2/r/blobs/sha256:../../secret")
    assert status in (400, 404) and b"outside the blobs dir" not in body
    # A symlink inside the dir pointing outside is not followed.
    os.symlink(tmp_path / "secret", blobsdir / ("e" * 64))
    assert curl(f"{proxy.url}/v2/r/blobs/sha256:{'e' * 64}")[0] == 404
    # A repo of two segments is not a route (nydusd needs a one-segment repo).
    assert curl(f"{proxy.url}/v2/a/b/blobs/sha256:{hexd}")[0] == 404


def test_missing_blob_is_404_and_new_files_are_served(proxy, blobsdir):
    data = b"arrived after start"
    hexd = hashlib.sha256(data).hexdigest()
    url = f"{proxy.url}/v2/r/blobs/sha256:{hexd}"
    assert curl("-I", url)[0] == 404
    assert curl(url)[0] == 404
    assert curl("-H", "Range: bytes=0-1", url)[0] == 404
    (blobsdir / hexd).write_bytes(data)
    assert curl(url)[2] == data
    assert curl("-H", "Range: bytes=0-6", url)[2] == data[:7]
    # A directory with a blob's name is not a blob.
    (blobsdir / ("d" * 64)).mkdir()
    assert curl(f"{proxy.url}/v2/r/blobs/sha256:{'d' * 64}")[0] == 404
    # Nor is a FIFO (and opening it must not block the server).
    os.mkfifo(blobsdir / ("f" * 64))
    assert curl(f"{proxy.url}/v2/r/blobs/sha256:{'f' * 64}")[0] == 404
    assert curl(url)[2] == data


def test_unopenable_blob_is_500(proxy, blobsdir):
    """An entry that exists but cannot be opened (EACCES; as root, a socket: ENXIO) is a server error."""
    import socket
    hexd = "a" * 64
    if os.geteuid() == 0:
        import tempfile
        short = tempfile.mkdtemp(prefix="s")   # AF_UNIX paths are short; bind there, move it in
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(os.path.join(short, "s"))
        sock.close()
        os.rename(os.path.join(short, "s"), blobsdir / hexd)
        os.rmdir(short)
    else:
        _put(blobsdir, b"locked")
        hexd = hashlib.sha256(b"locked").hexdigest()
        os.chmod(blobsdir / hexd, 0)
    status, _, body = curl(f"{proxy.url}/v2/r/blobs/sha256:{hexd}")
    assert status == 500 and b"cannot open" in body
    assert curl(f"{proxy.url}/v2/r/blobs/sha256:{'b' * 64}")[0] == 404   # and it keeps serving


# -- streaming edge cases, with aiohttp ----------------------------------------------------------------

def test_file_removed_while_served_streams_to_its_end(proxy, blobsdir):
    data = _blob(8 << 20)
    hexd = _put(blobsdir, data)

    async def run():
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{proxy.url}/v2/r/blobs/sha256:{hexd}") as resp:
                assert resp.status == 200
                first = await resp.content.readexactly(1 << 20)
                os.unlink(blobsdir / hexd)
                rest = await resp.content.read()
            got = first + rest
            assert got == data
            async with s.head(f"{proxy.url}/v2/r/blobs/sha256:{hexd}") as resp:
                assert resp.status == 404

    asyncio.run(run())


def test_file_shrinking_while_served_ends_the_body_early_and_the_proxy_lives_on(proxy, blobsdir):
    data = _blob(16 << 20)
    hexd = _put(blobsdir, data)

    async def run():
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{proxy.url}/v2/r/blobs/sha256:{hexd}") as resp:
                assert resp.status == 200
                await resp.content.readexactly(1 << 20)
                os.truncate(blobsdir / hexd, 2 << 20)
                with pytest.raises(aiohttp.ClientPayloadError):
                    await resp.content.read()
            async with s.get(f"{proxy.url}/v2/r/blobs/sha256:{hexd}") as resp:
                assert resp.status == 200 and await resp.read() == data[:2 << 20]

    asyncio.run(run())


def test_concurrent_range_reads(proxy, blobsdir):
    data = _blob(4 << 20)
    hexd = _put(blobsdir, data)

    async def one(s, start, end):
        async with s.get(f"{proxy.url}/v2/r/blobs/sha256:{hexd}", headers={"Range": f"bytes={start}-{end}"}) as r:
            assert r.status == 206
            assert r.headers["Content-Range"] == f"bytes {start}-{end}/{len(data)}"
            return await r.read()

    async def run():
        async with aiohttp.ClientSession() as s:
            spans = [(i * 65536 + 7, i * 65536 + 65536 + 100) for i in range(40)]
            bodies = await asyncio.gather(*(one(s, a, b) for a, b in spans))
            for (a, b), body in zip(spans, bodies):
                assert body == data[a:b + 1]

    asyncio.run(run())


# -- command line ------------------------------------------------------------------------------------

def test_rocket_env_sets_address_and_port(blobsdir):
    hexd = _put(blobsdir, b"env")
    p = Proxy(blobsdir, env={"ROCKET_ADDRESS": "127.0.0.1", "ROCKET_PORT": "0"})
    try:
        assert p.host == "127.0.0.1" and p.port > 0
        assert curl(f"{p.url}/v2/r/blobs/sha256:{hexd}")[2] == b"env"
    finally:
        p.stop()


def test_default_listen_address_is_upstreams():
    from nydus_vfs.cli.nydus_backend_proxy import _listen, build_parser

    args = build_parser().parse_args(["--blobsdir", "/"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROCKET_")}
    old = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(env)
        assert _listen(args) == ("127.0.0.1", 8000)
        os.environ["ROCKET_PORT"] = "nope"
        with pytest.raises(Exception, match="ROCKET_PORT"):
            _listen(args)
    finally:
        os.environ.clear()
        os.environ.update(old)


def test_missing_blobsdir_refuses_to_start(tmp_path):
    r = subprocess.run(PROXY + ["--blobsdir", str(tmp_path / "nope"), "--port", "0"], capture_output=True,
                       timeout=30)
    assert r.returncode == 1 and b"not a directory" in r.stderr
    r = subprocess.run(PROXY, capture_output=True, timeout=30)
    assert r.returncode == 2 and b"--blobsdir" in r.stderr


def test_sigterm_right_after_start_exits_cleanly(blobsdir):
    for _ in range(5):
        p = Proxy(blobsdir, "--port", "0")
        p.stop()
        assert p.proc.returncode == 0


def test_port_in_use_is_a_clear_error(proxy, blobsdir):
    r = subprocess.run(PROXY + ["--blobsdir", str(blobsdir), "--port", str(proxy.port)], capture_output=True,
                       timeout=30)
    assert r.returncode == 1 and b"cannot listen" in r.stderr
