"""Real servers for the remote-backend tests, started by the tests on 127.0.0.1:<free port>.

* :class:`DockerRegistry`: Debian's ``docker-registry`` (distribution 2.8) with
  filesystem storage, optionally htpasswd Basic auth, token auth (whose token
  endpoint is :class:`TokenServer`, ours) or TLS with a private CA.
* :func:`push_blob`: a monolithic blob upload per the distribution spec
  (``POST /v2/<repo>/blobs/uploads/`` then ``PUT <location>?digest=``),
  authenticating through ``_registry_auth`` like the backend.
* :class:`Nginx` (307 redirects of blob URLs to a second location),
  :class:`Tinyproxy` (forward proxy, the dfdaemon stand-in), :class:`MotoS3`
  (``moto_server`` with signature checking via IAM keys).
* :func:`make_ca` / :func:`make_signing_cert`: openssl-made certificates.

Each ``need_*`` function skips the calling test with the reason when its binary
is missing.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import pathlib
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import uuid

import aiohttp
import pytest
from aiohttp import web

from nydus_vfs.storage.backend._registry_auth import RegistryAuth

__all__ = [
    "DockerRegistry", "TokenServer", "Nginx", "Tinyproxy", "MotoS3", "free_port", "make_ca",
    "make_signing_cert", "push_blob", "need", "wait_port", "FaultProxy", "StaticServer",
]


def need(binary: str) -> str:
    path = shutil.which(binary) or (f"/usr/sbin/{binary}" if os.path.exists(f"/usr/sbin/{binary}") else None)
    if path is None:
        pytest.skip(f"{binary} is not installed (scripts/setup installs it as root)")
    return path


def stop_process(proc: subprocess.Popen | None) -> None:
    """SIGTERM ``proc`` if it runs, SIGKILL after 10 s; waits for it either way."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 15.0, what: str = "server") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:g}s")


def _openssl(*args: str, cwd: pathlib.Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(tmp: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    """A private CA and a server certificate for 127.0.0.1 signed by it: (ca.pem, server.pem, server.key)."""
    need("openssl")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=nydus-test-ca",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=tmp)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key",
             "-out", "server.csr", cwd=tmp)
    (tmp / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-extfile", "san.ext", "-out", "server.pem", cwd=tmp)
    return tmp / "ca.pem", tmp / "server.pem", tmp / "server.key"


def make_signing_cert(tmp: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """A self-signed RSA certificate for signing registry tokens: (cert.pem, key.pem)."""
    need("openssl")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=token-issuer",
             "-keyout", "token.key", "-out", "token.pem", cwd=tmp)
    return tmp / "token.pem", tmp / "token.key"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """Our token endpoint for the registry's ``auth.token``: JWTs (RS256, ``x5c``) for one user.

    Grants the actions asked in ``scope`` to ``user``/``password`` given as a
    POST form or as Basic auth on GET; ``expires_in`` sets the lifetime.
    ``requests`` records ``(method, form-or-query)`` (passwords dropped).
    """

    ISSUER = "nydus-test-issuer"
    SERVICE = "nydus-test-registry"

    def __init__(self, tmp: pathlib.Path, user: str = "tok-user", password: str = "tok-pass",
                 expires_in: int = 300) -> None:
        from Crypto.PublicKey import RSA
        self.cert, key = make_signing_cert(tmp)
        self._key = RSA.import_key(key.read_bytes())
        der = ssl.PEM_cert_to_DER_cert(self.cert.read_text())
        self._x5c = [base64.b64encode(der).decode()]
        self.user, self.password, self.expires_in = user, password, expires_in
        self.requests: list[tuple[str, dict]] = []
        self.port = free_port()
        self._thread_loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def _jwt(self, scope: str) -> str:
        from Crypto.Hash import SHA256
        from Crypto.Signature import pkcs1_15
        access = []
        for item in scope.split(" "):
            parts = item.split(":")
            if len(parts) == 3 and parts[0] == "repository":
                access.append({"type": "repository", "name": parts[1], "actions": parts[2].split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": self._x5c}
        claims = {"iss": self.ISSUER, "sub": self.user, "aud": self.SERVICE, "exp": now + self.expires_in,
                  "nbf": now - 10, "iat": now, "jti": uuid.uuid4().hex, "access": access}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        sig = pkcs1_15.new(self._key).sign(SHA256.new(signing_input.encode()))
        return f"{signing_input}.{_b64url(sig)}"

    async def _handle(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            form = dict(await request.post())
            ok = form.get("username") == self.user and form.get("password") == self.password
            scope = str(form.get("scope", ""))
        else:
            form = dict(request.query)
            want = "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
            ok = request.headers.get("Authorization") == want
            scope = request.query.get("scope", "")
        self.requests.append((request.method, {k: str(v) for k, v in form.items() if k != "password"}))
        if not ok:
            return web.Response(status=401, text="bad credentials")
        return web.json_response({"token": self._jwt(scope), "expires_in": self.expires_in})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/token", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def start_in_thread(self) -> None:
        """Serve from a background thread (for tests whose client is a subprocess)."""
        import threading
        ready = threading.Event()

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._thread_loop = loop
            loop.run_until_complete(self.start())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.stop())
            loop.close()

        threading.Thread(target=main, daemon=True, name="token-server").start()
        ready.wait(10)

    def stop_thread(self) -> None:
        if self._thread_loop is not None:
            self._thread_loop.call_soon_threadsafe(self._thread_loop.stop)


class DockerRegistry:
    """``docker-registry serve`` on 127.0.0.1:<free port> with storage under ``tmp``.

    ``auth``: None, ``"htpasswd"`` (user/password) or a :class:`TokenServer`;
    ``tls``: (cert, key) to serve HTTPS.  ``log`` is its stderr (access log).
    """

    def __init__(self, tmp: pathlib.Path, *, auth: object = None, user: str = "alice",
                 password: str = "s3cr3t-pw", tls: tuple[pathlib.Path, pathlib.Path] | None = None) -> None:
        self.binary = need("docker-registry")
        self.tmp = tmp / f"registry-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()
        self.port = free_port()
        self.user, self.password = user, password
        self.auth = auth
        self.tls = tls
        self.log = self.tmp / "registry.log"
        self.proc: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def basic_auth(self) -> str:
        return base64.b64encode(f"{self.user}:{self.password}".encode()).decode()

    def _config(self) -> str:
        lines = ["version: 0.1", "log:", "  level: info", "  accesslog:", "    disabled: false",
                 "storage:", "  filesystem:", f"    rootdirectory: {self.tmp / 'data'}",
                 "  delete:", "    enabled: true", "http:", f"  addr: 127.0.0.1:{self.port}",
                 f"  secret: {uuid.uuid4().hex}"]
        if self.tls:
            lines += ["  tls:", f"    certificate: {self.tls[0]}", f"    key: {self.tls[1]}"]
        if self.auth == "htpasswd":
            htpasswd = self.tmp / "htpasswd"
            subprocess.run([need("htpasswd"), "-Bbc", str(htpasswd), self.user, self.password], check=True,
                           capture_output=True)
            lines += ["auth:", "  htpasswd:", "    realm: nydus-test", f"    path: {htpasswd}"]
        elif isinstance(self.auth, TokenServer):
            lines += ["auth:", "  token:", f"    realm: {self.auth.realm}", f"    service: {TokenServer.SERVICE}",
                      f"    issuer: {TokenServer.ISSUER}", f"    rootcertbundle: {self.auth.cert}"]
        return "\n".join(lines) + "\n"

    def __enter__(self) -> DockerRegistry:
        config = self.tmp / "config.yml"
        config.write_text(self._config())
        self.proc = subprocess.Popen([self.binary, "serve", str(config)], stdout=subprocess.DEVNULL,
                                     stderr=open(self.log, "wb"))
        try:
            wait_port(self.port, self.proc, what="docker-registry")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.log.read_text()[-3000:]}") from None
        return self

    def __exit__(self, *exc) -> None:
        stop_process(self.proc)

    def blob_gets(self) -> int:
        """How many blob GETs from nydus-vfs the registry log shows."""
        return sum(1 for line in self.log.read_text(errors="replace").splitlines()
                   if "response completed" in line and "http.request.method=GET" in line
                   and "/blobs/sha256:" in line and "useragent=nydus-vfs" in line)

    def push(self, repo: str, data: bytes, *, auth: str | None = None, ca: pathlib.Path | None = None) -> str:
        """Upload ``data`` as a blob of ``repo``; its hex digest."""
        return asyncio.run(push_blob(f"{self.scheme}://{self.host}", repo, data, auth=auth, ca=ca))


async def push_blob(base: str, repo: str, data: bytes, *, auth: str | None = None,
                    ca: pathlib.Path | None = None) -> str:
    """Monolithic upload (distribution spec): ``POST …/blobs/uploads/`` then ``PUT <Location>&digest=``."""
    digest = hashlib.sha256(data).hexdigest()
    ctx = ssl.create_default_context(cafile=str(ca)) if ca else None
    creds = RegistryAuth(auth=auth, scope=f"repository:{repo}:pull,push")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx) if ctx else None) as session:

        async def fetch(method, url, headers, form):
            async with session.request(method, url, headers=headers, data=form) as resp:
                return resp.status, await resp.read()

        async def send(method: str, url: str, **kw) -> aiohttp.ClientResponse:
            header = await creds.header(fetch)
            for _ in range(2):
                headers = dict(kw.pop("headers", {}))
                if header:
                    headers["Authorization"] = header
                resp = await session.request(method, url, headers=headers, allow_redirects=False, **kw)
                if resp.status != 401:
                    return resp
                challenge = resp.headers.get("WWW-Authenticate")
                resp.release()
                header = await creds.answer(challenge, fetch, failed_header=header)
            raise AssertionError(f"{method} {url}: still 401 after authenticating")

        resp = await send("POST", f"{base}/v2/{repo}/blobs/uploads/")
        assert resp.status == 202, (resp.status, await resp.text())
        location = resp.headers["Location"]
        resp.release()
        if location.startswith("/"):
            location = base + location
        sep = "&" if "?" in location else "?"
        resp = await send("PUT", f"{location}{sep}digest=sha256:{digest}", data=data,
                          headers={"Content-Type": "application/octet-stream"})
        assert resp.status == 201, (resp.status, await resp.text())
        resp.release()
    return digest


class Nginx:
    """nginx answering blob GETs on :attr:`port` with 307 to a second server on :attr:`data_port`.

    The 307 ``Location`` names host ``redirect_host`` (``127.0.0.2:<data_port>`` by
    default, where nothing listens: only ``blob_redirected_host`` makes it
    reachable).  The data server proxies to the registry; everything else on
    the front port is proxied too.  ``access_log`` counts requests per server.
    """

    def __init__(self, tmp: pathlib.Path, upstream: str, *, redirect_host: str | None = None) -> None:
        self.binary = need("nginx")
        self.tmp = tmp / f"nginx-{uuid.uuid4().hex[:8]}"
        (self.tmp / "logs").mkdir(parents=True)
        self.port, self.data_port = free_port(), free_port()
        self.redirect_host = redirect_host or f"127.0.0.2:{self.data_port}"
        self.upstream = upstream
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Nginx:
        conf = self.tmp / "nginx.conf"
        t = self.tmp
        conf.write_text(f"""
user root;
worker_processes 1;
pid {t}/nginx.pid;
error_log {t}/logs/error.log warn;
events {{ worker_connections 64; }}
http {{
  client_body_temp_path {t}/body; proxy_temp_path {t}/proxy; fastcgi_temp_path {t}/fcgi;
  uwsgi_temp_path {t}/uwsgi; scgi_temp_path {t}/scgi;
  log_format plain '$server_port $request $status';
  server {{
    listen 127.0.0.1:{self.port};
    access_log {t}/logs/front.log plain;
    location ~ ^/v2/.+/blobs/sha256: {{ return 307 http://{self.redirect_host}/data$request_uri; }}
    location / {{ proxy_pass http://{self.upstream}; }}
  }}
  server {{
    listen 127.0.0.1:{self.data_port};
    access_log {t}/logs/data.log plain;
    location /data/ {{ proxy_pass http://{self.upstream}/; proxy_set_header Host {self.upstream}; }}
  }}
}}
""")
        self.proc = subprocess.Popen([self.binary, "-p", str(t), "-c", str(conf), "-g", "daemon off;"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_port(self.port, self.proc, what="nginx")
        wait_port(self.data_port, self.proc, what="nginx")
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def requests(self, which: str) -> list[str]:
        path = self.tmp / "logs" / f"{which}.log"
        return path.read_text().splitlines() if path.exists() else []


class Tinyproxy:
    """tinyproxy as an HTTP forward proxy on 127.0.0.1:<free port> (foreground; :meth:`stop` ends it)."""

    def __init__(self, tmp: pathlib.Path) -> None:
        self.binary = need("tinyproxy")
        # tinyproxy writes its log as "nobody": pytest's tmp_path (0700) is not reachable for it.
        self.tmp = pathlib.Path(tempfile.mkdtemp(prefix="nydus-tinyproxy-"))
        os.chmod(self.tmp, 0o777)
        self.port = free_port()
        self.logfile = self.tmp / "tinyproxy.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Tinyproxy:
        conf = self.tmp / "tinyproxy.conf"
        conf.write_text(f"User nobody\nGroup nogroup\nPort {self.port}\nListen 127.0.0.1\nTimeout 30\n"
                        f"LogFile \"{self.logfile}\"\nLogLevel Info\nMaxClients 20\nAllow 127.0.0.1\n"
                        "DisableViaHeader Yes\n")
        self.logfile.touch()
        os.chmod(self.logfile, 0o666)
        self.proc = subprocess.Popen([self.binary, "-d", "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_port(self.port, self.proc, what="tinyproxy")
        return self

    def stop(self) -> None:
        """SIGTERM (so it flushes its log) and wait; the port is closed afterwards."""
        stop_process(self.proc)

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def proxied(self, needle: str) -> int:
        """Requests whose logged line mentions ``needle`` (complete only after :meth:`stop`: tinyproxy buffers its log)."""
        return sum(1 for line in self.logfile.read_text(errors="replace").splitlines()
                   if "Request (file descriptor" in line and needle in line)


class MotoS3:
    """``moto_server`` with authentication on: requests must be SigV4-signed by an IAM access key.

    The first three actions are unauthenticated (moto's INITIAL_NO_AUTH_ACTION_COUNT)
    and create the IAM user, its policy and its key; :attr:`key_id` / :attr:`secret`
    are then the only credentials the server accepts.
    """

    def __init__(self, tmp: pathlib.Path) -> None:
        try:
            import boto3  # noqa: F401
            import moto  # noqa: F401
        except ImportError:
            pytest.skip("moto[server] is not installed (pip install -e '.[test]')")
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log = tmp / f"moto-{self.port}.log"
        self.key_id = self.secret = ""

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, service: str, key_id: str = "any", secret: str = "any"):
        import boto3
        from botocore.config import Config
        return boto3.client(service, endpoint_url=f"http://{self.endpoint}", region_name="us-east-1",
                            aws_access_key_id=key_id, aws_secret_access_key=secret,
                            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))

    def __enter__(self) -> MotoS3:
        env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="3", MOTO_PORT=str(self.port))
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     env=env, stdout=subprocess.DEVNULL, stderr=open(self.log, "wb"))
        wait_port(self.port, self.proc, timeout=60, what="moto_server")
        iam = self.client("iam")
        iam.create_user(UserName="nydus")
        iam.put_user_policy(UserName="nydus", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="nydus")["AccessKey"]
        self.key_id, self.secret = key["AccessKeyId"], key["SecretAccessKey"]
        return self

    def __exit__(self, *exc) -> None:
        stop_process(self.proc)


class FaultProxy:
    """A reverse proxy of ours in front of a registry that breaks chosen blob requests.

    Runs on its own thread (the client under test is a subprocess).  :meth:`inject`
    arms ``count`` faults for requests whose path contains ``needle``:
    ``500``/``503``, ``reset`` (half the body, then RST), ``short`` (body shorter
    than ``Content-Length``), ``stall`` (no answer), ``wrong_range`` (a
    ``Content-Range`` and bytes shifted by one), ``404``, ``unauth`` (forward
    without ``Authorization``, so the registry itself challenges again, as
    for an expired token), ``loop`` (307 to the same URL).  ``faults_left``
    says what is still armed; ``seen`` counts proxied blob requests.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.port = free_port()
        self.needle = ""
        self.kind = ""
        self.count = 0
        self.seen = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: aiohttp.ClientSession | None = None
        self._closing: asyncio.Event | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def inject(self, kind: str, needle: str, count: int) -> None:
        self.kind, self.needle, self.count = kind, needle, count

    @property
    def faults_left(self) -> int:
        return self.count

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        fault = ""
        if "/blobs/" in request.path:
            self.seen += 1
            if self.count > 0 and self.needle in request.path:
                self.count -= 1
                fault = self.kind
        if fault in ("500", "503", "404"):
            return web.Response(status=int(fault), text="injected fault")
        if fault == "loop":
            return web.Response(status=307, headers={"Location": str(request.rel_url)})
        if fault == "stall":
            assert self._closing is not None
            await self._closing.wait()
            return web.Response(status=503, text="shutting down")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        if fault == "unauth":
            headers.pop("Authorization", None)
        assert self._session is not None
        async with self._session.request(request.method, f"http://{self.upstream}{request.rel_url}",
                                         headers=headers, data=await request.read() or None,
                                         allow_redirects=False) as up:
            body = await up.read()
            out = {k: v for k, v in up.headers.items()
                   if k.lower() in ("content-range", "content-type", "location", "www-authenticate",
                                    "docker-content-digest", "docker-upload-uuid", "range")}
            status = up.status
        if fault == "wrong_range" and "Content-Range" in out:
            a, b_total = out["Content-Range"][6:].split("-")
            out["Content-Range"] = f"bytes {int(a) + 1}-{b_total}"
        if fault in ("reset", "short"):
            resp = web.StreamResponse(status=status, headers=out)
            resp.content_length = len(body)
            await resp.prepare(request)
            await resp.write(body[: len(body) // 2])
            assert request.transport is not None
            if fault == "reset":
                request.transport.abort()
            else:
                request.transport.close()
            return resp
        return web.Response(status=status, body=body, headers=out)

    def __enter__(self) -> FaultProxy:
        import threading
        ready = threading.Event()
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.1)

            async def start() -> None:
                self._closing = asyncio.Event()
                self._session = aiohttp.ClientSession(auto_decompress=False)
                await runner.setup()
                await web.TCPSite(runner, "127.0.0.1", self.port).start()

            loop.run_until_complete(start())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._session.close())
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=main, daemon=True, name="fault-proxy")
        self._thread.start()
        ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        if self._loop is not None:
            assert self._closing is not None
            self._loop.call_soon_threadsafe(self._closing.set)      # release stalled answers first
            self._loop.call_soon_threadsafe(self._loop.call_later, 0.2, self._loop.stop)
            self._thread.join(10)


class StaticServer:
    """Plain files of ``root`` at ``http://127.0.0.1:<port>/<prefix>/<name>`` (ranges, HEAD), on a thread."""

    def __init__(self, root: pathlib.Path, prefix: str = "/blobs") -> None:
        self.root, self.prefix = root, prefix
        self.port = free_port()
        self.requests: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> StaticServer:
        import threading

        @web.middleware
        async def record(request: web.Request, handler):
            self.requests.append(f"{request.method} {request.path} {request.headers.get('Range', '')}")
            return await handler(request)

        app = web.Application(middlewares=[record])
        app.router.add_static(self.prefix, self.root)
        ready = threading.Event()

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.1)
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=main, daemon=True, name="static-server")
        self._thread.start()
        ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
