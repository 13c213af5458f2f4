"""nydusctl against a live daemon API: tables, --raw JSON, mount/umount, errors and exit codes."""

from __future__ import annotations

import io
import json

import pytest

from nydus_vfs.cli import nydusctl
from tests.image_helpers import DaemonThread, localfs_config_text, make_image


@pytest.fixture
def api(tmp_path):
    d = DaemonThread(str(tmp_path / "api.sock")).start()
    yield d
    d.stop()


def run(*argv) -> tuple[int, str]:
    out = io.StringIO()
    return nydusctl.main(list(argv), out=out), out.getvalue()


def test_info_mount_metrics_umount(api, tmp_path, capsys):
    boot, blobs = make_image(tmp_path, "img", {"f": b"data"})
    cfg = tmp_path / "c.json"
    cfg.write_text(localfs_config_text(blobs, tmp_path / "cache"))
    rc, text = run("--sock", api.sock, "info")
    assert rc == 0 and "INIT" in text and "(nothing mounted)" in text
    rc, text = run("--sock", api.sock, "mount", "-s", str(boot), "-c", str(cfg), "-m", "/rafs/x/lowerdir")
    assert rc == 0 and "mounted" in text
    rc, text = run("--sock", api.sock, "info")
    assert "/rafs/x/lowerdir" in text and "Rafs" in text and "localfs" in text
    rc, text = run("--sock", api.sock, "--raw", "info")
    assert json.loads(text)["backend_collection"]["/rafs/x/lowerdir"]["backend_type"] == "Rafs"
    for kind, word in (("backend", "Read requests"), ("cache", "Prefetched data"), ("fsstats", "Data read")):
        rc, text = run("--sock", api.sock, "metrics", kind)
        assert rc == 0 and word in text, text
    rc, text = run("--sock", api.sock, "set", "log-level", "debug")
    assert rc == 0
    # A second mount makes "no id" ambiguous: the daemon's 404 message, exit 1.
    run("--sock", api.sock, "mount", "-s", str(boot), "-c", str(cfg), "-m", "/y")
    rc, _ = run("--sock", api.sock, "metrics", "backend")
    assert rc == 1 and "NoCounter" in capsys.readouterr().err
    rc, text = run("--sock", api.sock, "metrics", "backend", "--id", "/y")
    assert rc == 0
    assert run("--sock", api.sock, "umount", "-m", "/y")[0] == 0
    rc, _ = run("--sock", api.sock, "umount", "-m", "/y")
    assert rc == 1 and "no filesystem is mounted" in capsys.readouterr().err


def test_unreachable_socket_and_usage_errors(tmp_path, capsys):
    rc, _ = run("--sock", str(tmp_path / "nope.sock"), "info")
    assert rc == 3 and "cannot talk to nydusd" in capsys.readouterr().err
    rc, _ = run("--sock", str(tmp_path / "nope.sock"), "mount", "-s", "/b", "-m", "/x")
    assert rc == 2 and "needs --config" in capsys.readouterr().err
