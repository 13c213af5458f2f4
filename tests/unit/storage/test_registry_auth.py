"""Challenge parsing and token handling of the registry auth helper (no network: fake fetch)."""

from __future__ import annotations

import base64
import json

import pytest

from nydus_vfs.errors import BackendError
from nydus_vfs.storage.backend._registry_auth import Credentials, RegistryAuth, parse_www_authenticate
from tests.unit.storage.storage_helpers import run

AUTH = base64.b64encode(b"bob:pa:ss").decode()


def test_parse_challenges():
    c = parse_www_authenticate('Bearer realm="https://auth.io/token",service="reg",'
                               'scope="repository:a/b:pull,push"')
    assert c.scheme == "bearer"
    assert c.params == {"realm": "https://auth.io/token", "service": "reg", "scope": "repository:a/b:pull,push"}
    assert parse_www_authenticate('Basic realm="x \\"y\\""').params == {"realm": 'x "y"'}
    assert parse_www_authenticate("Basic realm=plain, charset=UTF-8").params == {"realm": "plain", "charset": "UTF-8"}
    assert parse_www_authenticate("") is None


def test_credentials():
    c = Credentials.from_base64(AUTH)
    assert (c.username, c.password) == ("bob", "pa:ss")
    assert "pa:ss" not in repr(c) and AUTH not in repr(c)
    for bad in ("!!", base64.b64encode(b"nocolon").decode(), base64.b64encode(b"\xff:x").decode()):
        with pytest.raises(ValueError) as info:
            Credentials.from_base64(bad)
        assert bad not in str(info.value)


class _TokenServer:
    def __init__(self, answers):
        self.answers = list(answers)
        self.calls = []

    async def __call__(self, method, url, headers, form):
        self.calls.append((method, url, dict(headers), dict(form or {})))
        return self.answers.pop(0)


def test_concurrent_challenges_share_one_token_request():
    fetch = _TokenServer([(200, json.dumps({"access_token": "T1", "expires_in": 60}).encode())])
    auth = RegistryAuth(auth=AUTH, scope="repository:x:pull")
    challenge = 'Bearer realm="http://t/token",service="s"'

    async def body():
        import asyncio
        results = await asyncio.gather(*(auth.answer(challenge, fetch, failed_header=None) for _ in range(5)))
        assert set(results) == {"Bearer T1"}

    run(body())
    assert len(fetch.calls) == 1
    method, url, _, form = fetch.calls[0]
    assert method == "POST" and form["scope"] == "repository:x:pull" and form["password"] == "pa:ss"


def test_token_errors():
    async def body():
        for answers, match, retryable in [
            ([(401, b""), (401, b"")], "refused the configured credentials", False),
            ([(500, b""), (503, b"")], "HTTP 503", True),
            ([(200, b"not json")], "not a token JSON", True),
            ([(200, b"{}")], "without a token", True),
        ]:
            auth = RegistryAuth(auth=AUTH)
            with pytest.raises(BackendError, match=match) as info:
                await auth.answer('Bearer realm="http://t/token"', _TokenServer(answers), failed_header=None)
            assert info.value.retryable is retryable
        with pytest.raises(BackendError, match="unsupported auth scheme"):
            await RegistryAuth().answer("Negotiate abc", _TokenServer([]), failed_header=None)
        with pytest.raises(BackendError, match="without a WWW-Authenticate"):
            await RegistryAuth().answer(None, _TokenServer([]), failed_header=None)
        with pytest.raises(BackendError, match="no realm"):
            await RegistryAuth().answer("Bearer service=x", _TokenServer([]), failed_header=None)

    run(body())


def test_failed_refresh_keeps_the_old_token():
    now = [0.0]
    fetch = _TokenServer([(200, b'{"token":"T1","expires_in":10}'), (503, b""), (503, b"")])
    auth = RegistryAuth(clock=lambda: now[0], jitter=lambda a, b: 0.0)

    async def body():
        assert await auth.answer('Bearer realm="http://t/token"', fetch, failed_header=None) == "Bearer T1"
        now[0] = 9.5
        assert await auth.header(fetch) == "Bearer T1"     # refresh failed; old token kept
        assert len(fetch.calls) == 2 and fetch.calls[1][0] == "GET"

    run(body())
    assert "T1" not in repr(auth)
