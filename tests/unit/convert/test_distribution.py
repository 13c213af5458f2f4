"""Image references and docker credentials, as docker and nydusify read them."""

from __future__ import annotations

import base64
import json

import pytest

from nydus_vfs.convert import Reference, docker_credentials
from nydus_vfs.errors import ConvertError

D = "sha256:" + "a" * 64


@pytest.mark.parametrize("text,registry,repo,tag,digest", [
    ("busybox", "registry-1.docker.io", "library/busybox", "latest", None),
    ("docker.io/library/busybox:1.36", "registry-1.docker.io", "library/busybox", "1.36", None),
    ("user/app:v1", "registry-1.docker.io", "user/app", "v1", None),
    ("127.0.0.1:5000/app", "127.0.0.1:5000", "app", "latest", None),
    ("localhost/a/b/c:t-1.2_x", "localhost", "a/b/c", "t-1.2_x", None),
    ("reg.example.com:443/ns/app:tag@" + D, "reg.example.com:443", "ns/app", "tag", D),
    ("reg.example.com/app@" + D, "reg.example.com", "app", None, D),
])
def test_reference_parse(text, registry, repo, tag, digest):
    ref = Reference.parse(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repo, tag, digest)
    assert ref.ref == (digest or tag)


@pytest.mark.parametrize("text", ["", "UPPER/app", "app:", "app:-bad", "a b", "app@sha256:1234",
                                  "reg:5000/", "reg.io/app//x", "app@md5:" + "a" * 32])
def test_reference_parse_refuses(text):
    with pytest.raises(ConvertError, match="invalid image reference"):
        Reference.parse(text)


def test_reference_str_round_trips():
    for text in ("127.0.0.1:5000/app:v1", "reg.io/ns/app@" + D):
        assert str(Reference.parse(text)) == text


def _config(tmp_path, monkeypatch, doc):
    (tmp_path / "config.json").write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))


def test_docker_credentials_auth_and_username_forms(tmp_path, monkeypatch):
    _config(tmp_path, monkeypatch, {"auths": {
        "reg.io:5000": {"auth": base64.b64encode(b"alice:pa:ss").decode()},
        "https://other.io": {"username": "bob", "password": "pw"},
        "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hub:tok").decode()},
    }})
    assert docker_credentials("reg.io:5000") == ("alice", "pa:ss")
    assert docker_credentials("other.io") == ("bob", "pw")
    assert docker_credentials("registry-1.docker.io") == ("hub", "tok")
    assert docker_credentials("unknown.io") is None


def test_docker_credentials_default_path_and_missing_file(tmp_path, monkeypatch):
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert docker_credentials("reg.io") is None
    (tmp_path / ".docker").mkdir()
    (tmp_path / ".docker" / "config.json").write_text(json.dumps(
        {"auths": {"reg.io": {"auth": base64.b64encode(b"u:p").decode()}}}))
    assert docker_credentials("reg.io") == ("u", "p")


def test_docker_credentials_bad_files_are_named(tmp_path, monkeypatch, caplog):
    _config(tmp_path, monkeypatch, "{not json")
    with pytest.raises(ConvertError, match="config.json.*unreadable"):
        docker_credentials("reg.io")
    _config(tmp_path, monkeypatch, {"auths": {"reg.io": {"auth": base64.b64encode(b"nocolon").decode()}}})
    with pytest.raises(ConvertError, match="has no ':'"):
        docker_credentials("reg.io")
    _config(tmp_path, monkeypatch, {"auths": {}, "credHelpers": {"reg.io": "pass"}})
    assert docker_credentials("reg.io") is None
    assert "credential helper" in caplog.text
