"""nydus_vfs._version: the ``--version`` text and the daemon-info version block."""

from __future__ import annotations

import platform
import re
import subprocess
import sys
import types

import pytest

from nydus_vfs import _version


@pytest.fixture
def fresh():
    _version.version_info.cache_clear()
    yield _version
    _version.version_info.cache_clear()


def test_version_info_keys_and_fixed_values(fresh):
    info = fresh.version_info()
    assert list(info) == ["package_ver", "git_commit", "build_time", "profile", "rustc"]
    assert info["package_ver"] == fresh.__version__
    assert info["profile"] == "release"
    assert info["rustc"] == f"{platform.python_implementation()} {platform.python_version()}"
    assert all(isinstance(v, str) and v for v in info.values())


def test_version_text_is_clap_shape(fresh):
    info = fresh.version_info()
    text = fresh.version_text("nydusd")
    assert text == (f"nydusd \rVersion: \t{info['package_ver']}\nGit Commit: \t{info['git_commit']}\n"
                    f"Build Time: \t{info['build_time']}\nProfile: \trelease\nRustc: \t\t{info['rustc']}\n\n")


def test_snapshotter_extracts_the_same_commit_as_the_api(fresh):
    # nydus-snapshotter: regexp `Git Commit:\s*(.+)` then TrimSpace, compared with the API value.
    m = re.search(r"Git Commit:\s*(.+)", fresh.version_text("nydusd"))
    assert m and m.group(1).strip() == fresh.version_info()["git_commit"]


def test_commit_from_checkout_matches_git(fresh):
    head = subprocess.run(["git", "-C", str(fresh._HERE.parent), "rev-parse", "--verify", "HEAD"],
                          capture_output=True, text=True, check=False)
    if head.returncode != 0:
        pytest.skip("not running from a git checkout with commits")
    info = fresh.version_info()
    assert info["git_commit"] == head.stdout.strip()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z", info["build_time"])


def test_build_info_module_wins_over_git(fresh, monkeypatch):
    fake = types.ModuleType("nydus_vfs._build_info")
    fake.GIT_COMMIT = "0123abcd"
    fake.BUILD_TIME = "2026-01-01T00:00:00.000000000Z"
    monkeypatch.setitem(sys.modules, "nydus_vfs._build_info", fake)
    info = fresh.version_info()
    assert (info["git_commit"], info["build_time"]) == ("0123abcd", "2026-01-01T00:00:00.000000000Z")


def test_unknown_outside_a_checkout(fresh, monkeypatch, tmp_path):
    monkeypatch.setattr(fresh, "_HERE", tmp_path / "src" / "nydus_vfs" / "_version.py")
    info = fresh.version_info()
    assert info["git_commit"] == "unknown" and info["build_time"] == "unknown"
