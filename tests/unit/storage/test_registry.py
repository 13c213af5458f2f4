"""The registry backend against a fault-injecting fake registry of ours (http_helpers)."""

from __future__ import annotations

import asyncio
import base64
import logging
import os

import pytest

from nydus_vfs.config import ProxyConfig, RegistryConfig
from nydus_vfs.errors import BackendError, BackendNotFoundError, BackendTimeoutError, ConfigError
from nydus_vfs.storage.backend import backend_events
from nydus_vfs.storage.backend.base import RetryPolicy
from nydus_vfs.storage.backend.registry import RegistryBackend
from tests.unit.storage.http_helpers import FakeRegistry
from tests.unit.storage.storage_helpers import run

BLOB_ID = "ab" * 32
DATA = bytes(range(256)) * 64          # 16 KiB, every offset distinguishable
OTHER_ID = "cd" * 32
OTHER = b"other blob " * 100
PASSWORD = "s3cr3t-pw"
AUTH = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()


def _ours(caplog) -> str:
    """What our own loggers said (the test servers' access logs excluded)."""
    return "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("nydus_vfs"))


def _backend(reg: FakeRegistry, *, retry_limit: int = 0, timeout: int = 5, env=None, **kw) -> RegistryBackend:
    kw.setdefault("scheme", "http")
    cfg = RegistryConfig(host=reg.host, repo="library/test", timeout=timeout, connect_timeout=2,
                         retry_limit=retry_limit, **kw)
    return RegistryBackend(cfg, retry=RetryPolicy(retry_limit=retry_limit, base_delay=0.01), env=env or {})


async def _with(reg: FakeRegistry, body, **kw):
    async with reg:
        backend = _backend(reg, **kw)
        try:
            return await body(backend)
        finally:
            await backend.aclose()


def test_ranged_read_size_metrics_and_identity():
    reg = FakeRegistry({BLOB_ID: DATA})

    async def body(b):
        assert await b.read(BLOB_ID, 1000, 5000) == DATA[1000:6000]
        assert await b.read(BLOB_ID, 0, 1) == DATA[:1]
        assert await b.blob_size(BLOB_ID) == len(DATA)
        got = reg.blob_requests()
        assert got[0].path == f"/v2/library/test/blobs/sha256:{BLOB_ID}"
        assert got[0].headers["Range"] == "bytes=1000-5999"
        m = b.metrics.to_dict()
        assert m["backend_type"] == "registry" and m["read_count"] == 2 and m["read_amount_total"] == 5001
        assert sum(m["read_count_block_size_dist"]) == 2 and m["read_count_block_size_dist"][0] == 1
        assert sum(map(sum, m["read_latency_sizes_dist"])) == 2

    run(_with(reg, body))
    a = RegistryBackend(RegistryConfig(host="h:1", repo="r", auth=AUTH), env={})
    b = RegistryBackend(RegistryConfig(host="h:1", repo="r"), env={})
    c = RegistryBackend(RegistryConfig(host="h:1", repo="other"), env={})
    assert a.identity == b.identity != c.identity


@pytest.mark.parametrize("fault", ["500", "503", "reset", "short", "wrong_range"])
def test_transient_faults_are_retried_then_fail_then_recover(fault):
    reg = FakeRegistry({BLOB_ID: DATA})

    async def body(b):
        reg.faults = [fault]
        assert await b.read(BLOB_ID, 100, 4000) == DATA[100:4100]
        assert len(reg.blob_requests()) == 2
        reg.faults = [fault] * 3
        with pytest.raises(BackendError) as info:
            await b.read(BLOB_ID, 100, 4000)
        assert info.value.retryable and BLOB_ID in str(info.value)
        assert len(reg.blob_requests()) == 5        # 1 + retry_limit 2
        assert b.metrics.read_errors == 1
        assert any(BLOB_ID in e for e in backend_events()["errors"])
        assert await b.read(BLOB_ID, 100, 4000) == DATA[100:4100]

    run(_with(reg, body, retry_limit=2))


def test_stalled_response_times_out_and_is_retried():
    reg = FakeRegistry({BLOB_ID: DATA})

    async def body(b):
        reg.faults = ["stall", "stall"]
        with pytest.raises(BackendTimeoutError):
            await b.read(BLOB_ID, 0, 10)
        assert len(reg.blob_requests()) == 2
        assert await b.read(BLOB_ID, 0, 10) == DATA[:10]

    run(_with(reg, body, retry_limit=1, timeout=1))


def test_missing_blob_and_missing_repo_are_final_and_named():
    reg = FakeRegistry({BLOB_ID: DATA})

    async def body(b):
        with pytest.raises(BackendNotFoundError, match="BLOB_UNKNOWN"):
            await b.read(OTHER_ID, 0, 10)
        assert len(reg.blob_requests()) == 1          # not retried
        b.repo = "library/missing"
        with pytest.raises(BackendNotFoundError, match="NAME_UNKNOWN"):
            await b.read(BLOB_ID, 0, 10)

    run(_with(reg, body, retry_limit=3))


def test_range_past_the_end_is_not_retried():
    reg = FakeRegistry({BLOB_ID: DATA})

    async def body(b):
        with pytest.raises(BackendError, match="past the end") as info:
            await b.read(BLOB_ID, len(DATA) - 10, 20)
        assert not info.value.retryable
        with pytest.raises(BackendError, match="416"):
            await b.read(BLOB_ID, len(DATA) + 10, 20)
        assert len(reg.blob_requests()) == 2

    run(_with(reg, body, retry_limit=3))


def test_basic_auth(caplog):
    caplog.set_level(logging.DEBUG)
    reg = FakeRegistry({BLOB_ID: DATA}, auth="basic")

    async def body(b):
        assert await b.read(BLOB_ID, 0, 100) == DATA[:100]
        assert await b.read(BLOB_ID, 100, 100) == DATA[100:200]
        # One challenge, then the header is sent up front.
        assert [r.headers.get("Authorization", "")[:5] for r in reg.blob_requests()] == ["", "Basic", "Basic"]

    run(_with(reg, body, auth=AUTH))
    wrong = base64.b64encode(b"alice:nope").decode()

    async def refused(b):
        with pytest.raises(BackendError, match="refused the configured credentials") as info:
            await b.read(BLOB_ID, 0, 100)
        assert not info.value.retryable
        b.set_auth(AUTH)                      # hot reload fixes it
        assert await b.read(BLOB_ID, 0, 100) == DATA[:100]
        b.set_auth("")
        with pytest.raises(BackendError, match="no 'auth' is configured"):
            await b.read(BLOB_ID, 0, 100)
        with pytest.raises(ConfigError, match="registry_auth"):
            b.set_auth("!!notbase64")

    run(_with(FakeRegistry({BLOB_ID: DATA}, auth="basic"), refused, auth=wrong, retry_limit=2))
    assert PASSWORD not in _ours(caplog) and AUTH not in _ours(caplog) and "refused" in _ours(caplog)


def test_bearer_token_post_then_get_refresh_and_expiry(caplog):
    caplog.set_level(logging.DEBUG)
    reg = FakeRegistry({BLOB_ID: DATA}, auth="bearer")

    async def body(b):
        assert await b.read(BLOB_ID, 0, 100) == DATA[:100]
        token_reqs = [r for r in reg.requests if r.path == "/token"]
        assert [r.method for r in token_reqs] == ["POST"]
        form = token_reqs[0].form
        assert form["scope"] == "repository:library/test:pull" and form["service"] == "fake-registry"
        assert form["client_id"] == "nydus-registry-client" and form["grant_type"] == "password"
        # The token expires server-side mid-run: one re-authentication, same read succeeds.
        reg.faults = ["expire"]
        assert await b.read(BLOB_ID, 100, 100) == DATA[100:200]
        assert len([r for r in reg.requests if r.path == "/token"]) == 2

    run(_with(reg, body, auth=AUTH))
    tokens = list(reg.tokens)
    assert tokens and all(t not in _ours(caplog) for t in tokens) and PASSWORD not in _ours(caplog)

    reg2 = FakeRegistry({BLOB_ID: DATA}, auth="bearer", post_token=False)

    async def get_fallback(b):
        assert await b.read(BLOB_ID, 0, 10) == DATA[:10]
        token_reqs = [r for r in reg2.requests if r.path == "/token"]
        assert [r.method for r in token_reqs] == ["POST", "GET"]
        assert token_reqs[1].query == {"service": "fake-registry", "scope": "repository:library/test:pull",
                                       "client_id": "nydus-registry-client"}
        assert token_reqs[1].headers["Authorization"].startswith("Basic ")

    run(_with(reg2, get_fallback, auth=AUTH))


def test_bearer_token_is_refreshed_before_expiry():
    reg = FakeRegistry({BLOB_ID: DATA}, auth="bearer", expires_in=100)

    async def body(b):
        now = [1000.0]
        b._auth._clock = lambda: now[0]
        assert await b.read(BLOB_ID, 0, 10) == DATA[:10]
        assert len([r for r in reg.requests if r.path == "/token"]) == 1
        now[0] += 50                       # well before expiry: same token
        await b.read(BLOB_ID, 0, 10)
        assert len([r for r in reg.requests if r.path == "/token"]) == 1
        now[0] += 45                       # inside the refresh margin: refreshed without a 401
        await b.read(BLOB_ID, 0, 10)
        assert len([r for r in reg.requests if r.path == "/token"]) == 2
        assert [r.headers.get("Authorization", "")[:6] for r in reg.blob_requests()] == \
            ["", "Bearer", "Bearer", "Bearer"]

    run(_with(reg, body, auth=AUTH))


def test_anonymous_bearer_and_refused_token():
    reg = FakeRegistry({BLOB_ID: DATA}, auth="bearer")

    async def body(b):
        with pytest.raises(BackendError, match="refused the anonymous request") as info:
            await b.read(BLOB_ID, 0, 10)
        assert not info.value.retryable

    run(_with(reg, body, retry_limit=2))


def test_registry_token_is_sent_first_and_env_overrides_auth():
    reg = FakeRegistry({BLOB_ID: DATA}, auth="basic")

    async def body(b):
        assert await b.read(BLOB_ID, 0, 10) == DATA[:10]
        assert reg.blob_requests()[0].headers["Authorization"] == "Bearer preset-token"

    # The preset token is refused (Basic registry); env credentials answer the challenge.
    run(_with(reg, body, registry_token="preset-token", auth="Ym9ndXM6Ym9ndXM=", env={"IMAGE_PULL_AUTH": AUTH}))
    with pytest.raises(ConfigError):
        RegistryBackend(RegistryConfig(host="h", repo="r"), env={"IMAGE_PULL_AUTH": "###"})


def test_redirects_are_followed_cached_rewritten_and_refreshed(caplog):
    caplog.set_level(logging.DEBUG)
    reg = FakeRegistry({BLOB_ID: DATA, OTHER_ID: OTHER}, redirect="307", auth="basic")

    async def body(b):
        assert await b.read(BLOB_ID, 10, 100) == DATA[10:110]
        assert await b.read(BLOB_ID, 200, 100) == DATA[200:300]
        assert len(reg.blob_requests()) == 2            # challenge, redirect; then cached
        data_reqs = [r for r in reg.requests if r.path.startswith("/data/")]
        assert len(data_reqs) == 2 and all("Authorization" not in r.headers for r in data_reqs)
        reg.data_faults = ["403"]                       # the cached target expired
        assert await b.read(BLOB_ID, 300, 100) == DATA[300:400]
        assert len(reg.blob_requests()) == 3
        assert await b.read(OTHER_ID, 0, 50) == OTHER[:50]

    run(_with(reg, body, auth=AUTH))
    assert "secret-sig" not in _ours(caplog) and "redirected to" in _ours(caplog)

    reg2 = FakeRegistry({BLOB_ID: DATA}, redirect="307")

    async def rewritten(b):
        assert await b.read(BLOB_ID, 0, 10) == DATA[:10]

    # The registry's Location names host "127.0.0.1:<port>" implicitly (relative);
    # blob_redirected_host must be what is actually contacted.
    async def run_rewrite():
        async with reg2:
            b = _backend(reg2, blob_redirected_host=reg2.host, blob_url_scheme="http")
            try:
                await rewritten(b)
            finally:
                await b.aclose()
            bad = _backend(reg2, blob_redirected_host="127.0.0.1:1")
            try:
                with pytest.raises(BackendError, match="redirected to http://127.0.0.1:1/data/"):
                    await bad.read(BLOB_ID, 0, 10)
            finally:
                await bad.aclose()

    run(run_rewrite())


def test_redirect_loop_is_an_error():
    reg = FakeRegistry({BLOB_ID: DATA}, redirect="loop")

    async def body(b):
        with pytest.raises(BackendError, match="redirect loop"):
            await b.read(BLOB_ID, 0, 10)

    run(_with(reg, body, retry_limit=1))


def test_https_to_http_fallback_only_with_skip_verify(caplog):
    reg = FakeRegistry({BLOB_ID: DATA})

    async def strict(b):
        with pytest.raises(BackendError, match="TLS error.*ca_cert_files") as info:
            await b.read(BLOB_ID, 0, 10)
        assert not info.value.retryable

    run(_with(reg, strict, scheme="https", retry_limit=2))
    assert reg.requests == []

    async def lax(b):
        assert await b.read(BLOB_ID, 0, 10) == DATA[:10]
        assert b.scheme == "http"

    caplog.set_level(logging.WARNING)
    run(_with(FakeRegistry({BLOB_ID: DATA}), lax, scheme="https", skip_verify=True))
    assert "falling back to plain HTTP because skip_verify is set" in _ours(caplog)


def test_secrets_stay_out_of_repr():
    cfg = RegistryConfig(host="h", repo="r", auth=AUTH, registry_token="tok-very-secret",
                         proxy=ProxyConfig(url="http://127.0.0.1:1"))
    b = RegistryBackend(cfg, env={})
    for text in (repr(b), repr(cfg), repr(b._auth), repr(b._auth.credentials), str(b.identity)):
        assert AUTH not in text and "tok-very-secret" not in text and PASSWORD not in text
    b.close()
    b.close()
    assert b.closed


def test_connection_refused_is_retryable_and_bounded():
    async def body():
        cfg = RegistryConfig(host="127.0.0.1:1", repo="r", scheme="http", connect_timeout=1, timeout=1)
        b = RegistryBackend(cfg, retry=RetryPolicy(retry_limit=1, base_delay=0.01), env={})
        try:
            with pytest.raises(BackendError, match="connection failed") as info:
                await b.read(BLOB_ID, 0, 10)
            assert info.value.retryable
        finally:
            await b.aclose()

    run(body())


def test_env_is_read_from_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("IMAGE_PULL_AUTH", AUTH)
    b = RegistryBackend(RegistryConfig(host="h", repo="r"))
    assert b._auth.credentials is not None and b._auth.credentials.username == "alice"
    monkeypatch.delenv("IMAGE_PULL_AUTH")
    assert "IMAGE_PULL_AUTH" not in os.environ


class _Rest:
    """Finish a coroutine whose first step was driven by hand (as the FUSE server does for READ)."""

    def __init__(self, coro, first):
        self.coro, self.first = coro, first

    def __await__(self):
        value = self.first
        while True:
            yield value
            try:
                value = self.coro.send(None)
            except StopIteration as done:
                return done.value


def test_read_whose_first_step_runs_outside_a_task():
    reg = FakeRegistry({BLOB_ID: DATA})

    async def body(b):
        loop = asyncio.get_running_loop()
        started = loop.create_future()

        def callback():                      # a loop callback: no current task
            try:
                assert asyncio.current_task() is None
                coro = b.read(BLOB_ID, 5, 10)
                started.set_result((coro, coro.send(None)))
            except BaseException as exc:     # noqa: BLE001 - reported by the awaiting test
                started.set_exception(exc)

        loop.call_soon(callback)
        coro, first = await started
        assert await _Rest(coro, first) == DATA[5:15]

    run(_with(reg, body))


def test_redirect_target_is_asked_again_after_its_ttl(monkeypatch):
    import nydus_vfs.storage.backend.registry as registry_mod
    reg = FakeRegistry({BLOB_ID: DATA}, redirect="307")

    async def body(b):
        monkeypatch.setattr(registry_mod, "REDIRECT_TTL", 0.0)
        for i in range(3):
            assert await b.read(BLOB_ID, i, 10) == DATA[i:i + 10]
        assert len(reg.blob_requests()) == 3               # expired at once: the registry every time
        monkeypatch.setattr(registry_mod, "REDIRECT_TTL", 300.0)
        for i in range(3):
            assert await b.read(BLOB_ID, i, 10) == DATA[i:i + 10]
        assert len(reg.blob_requests()) == 4

    run(_with(reg, body))


def test_bearer_credentials_hot_reload_fetches_a_new_token():
    reg = FakeRegistry({BLOB_ID: DATA}, auth="bearer")

    async def body(b):
        with pytest.raises(BackendError, match="token endpoint refused"):
            await b.read(BLOB_ID, 0, 10)
        b.set_auth(AUTH)
        assert await b.read(BLOB_ID, 0, 10) == DATA[:10]
        posts = [r for r in reg.requests if r.path == "/token" and r.method == "POST"]
        assert [p.form["username"] for p in posts][-1] == "alice"

    run(_with(reg, body, auth=base64.b64encode(b"alice:old-pw").decode()))
