"""nydusd configs and the nydusd child process used by ``nydusify mount`` / ``check``."""

from __future__ import annotations

import base64
import json
import os
import sys

import pytest

from nydus_vfs.convert import (NydusdMount, Reference, fuse_mount_reason, nydusd_command, nydusd_config,
                               write_nydusd_config)
from nydus_vfs.errors import ConvertError


def test_registry_config_carries_the_docker_credentials(tmp_path, monkeypatch):
    (tmp_path / "docker").mkdir()
    auth = base64.b64encode(b"alice:s3cret").decode()
    (tmp_path / "docker" / "config.json").write_text(json.dumps({"auths": {"reg.example:5000": {"auth": auth}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    ref = Reference.parse("reg.example:5000/team/app:v1-nydus")
    c = nydusd_config(ref, plain_http=True, insecure=False, cache_dir="/c")
    assert c["device"]["backend"] == {"type": "registry", "config": {
        "scheme": "http", "host": "reg.example:5000", "repo": "team/app", "skip_verify": False, "auth": auth}}
    assert c["device"]["cache"] == {"type": "blobcache", "config": {"work_dir": "/c"}}
    assert "fs_prefetch" not in c
    other = nydusd_config(Reference.parse("other.example/app:v1"), plain_http=False, insecure=True,
                          cache_dir="/c", prefetch_all=True)
    assert "auth" not in other["device"]["backend"]["config"]
    assert other["device"]["backend"]["config"]["scheme"] == "https"
    assert other["fs_prefetch"] == {"enable": True, "prefetch_all": True}
    local = nydusd_config(ref, plain_http=True, insecure=False, cache_dir="/c", blob_dir="/blobs")
    assert local["device"]["backend"] == {"type": "localfs", "config": {"dir": "/blobs"}}
    path = write_nydusd_config(str(tmp_path / "n.json"), c)
    assert json.loads(open(path).read()) == c and os.stat(path).st_mode & 0o077 == 0


def test_nydusd_command_defaults_to_ours():
    assert nydusd_command(None) == [sys.executable, "-m", "nydus_vfs.cli.nydusd"]
    assert nydusd_command("/opt/bin/nydusd --foo 'a b'") == ["/opt/bin/nydusd", "--foo", "a b"]


def test_fuse_mount_reason_names_what_is_missing():
    reason = fuse_mount_reason()
    if os.geteuid() != 0:
        assert reason == "not root"
    else:
        assert reason in (None, "/dev/fuse is missing")


def test_a_nydusd_that_exits_or_never_mounts_is_a_clear_error(tmp_path):
    mnt = str(tmp_path / "mnt")
    with pytest.raises(ConvertError, match="exited with status 3 before mounting the image: boom"):
        with NydusdMount([sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"],
                         "cfg", "boot", mnt, log_path=str(tmp_path / "log")):
            pass
    with pytest.raises(ConvertError, match="did not mount the image within 0.3 s"):
        with NydusdMount([sys.executable, "-c", "import time; time.sleep(60)"], "cfg", "boot", mnt,
                         log_path=str(tmp_path / "log"), timeout=0.3):
            pass
    with pytest.raises(ConvertError, match="cannot run nydusd"):
        with NydusdMount([str(tmp_path / "missing")], "cfg", "boot", mnt, log_path=str(tmp_path / "log")):
            pass
