"""`nydusd` command line: the upstream forms parse, bad combinations are refused with a reason."""

from __future__ import annotations

import pytest

from nydus_vfs.cli import nydusd


def parse(argv):
    return nydusd.build_parser().parse_args(argv)


def test_snapshotter_fuse_command_line_with_globals_after_the_subcommand():
    a = parse(["fuse", "--thread-num", "4", "--config", "/c.json", "--bootstrap", "/b.boot",
               "--mountpoint", "/mnt", "--apisock", "/api.sock", "--log-level", "debug",
               "--log-file", "/l", "--prefetch-files", "/p", "--failover-policy", "resend",
               "--backend-source", "http://x"])
    assert a.command == "fuse" and a.thread_num == 4 and a.config == "/c.json"
    assert a.bootstrap == "/b.boot" and a.mountpoint == "/mnt" and a.apisock == "/api.sock"
    assert a.log_level == "debug" and a.failover_policy == "resend"


def test_legacy_top_level_form_means_fuse_and_globals_before_a_subcommand_work():
    a = parse(["--config", "/c", "--mountpoint", "/m", "--bootstrap", "/b", "--fuse-threads", "2"])
    assert a.command is None and a.mountpoint == "/m" and a.thread_num == 2
    v = parse(["--log-level", "warn", "virtiofs", "--sock", "/s", "--hybrid-mode", "--localfs-dir", "/d"])
    assert v.command == "virtiofs" and v.log_level == "warn" and v.hybrid_mode and v.localfs_dir == "/d"
    # Kata's Go runtime: no --hybrid-mode, apisock and log level after the subcommand.
    k = parse(["virtiofs", "--log-level", "info", "--apisock", "/a", "--sock", "/s"])
    assert k.apisock == "/a" and not k.hybrid_mode


@pytest.mark.parametrize("bad", [["fuse", "--mountpoint", "/m", "--thread-num", "0"],
                                 ["fuse", "--mountpoint", "/m", "--thread-num", "1025"],
                                 ["fuse", "--mountpoint", "/m", "--log-level", "loud"],
                                 ["virtiofs"]])
def test_argument_errors_exit_2(bad, capsys):
    with pytest.raises(SystemExit) as ei:
        nydusd.main(bad)
    assert ei.value.code == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("argv, reason", [
    (["fuse", "--mountpoint", "/m", "--config", "/c", "--localfs-dir", "/d"], "cannot be used together"),
    (["fuse", "--mountpoint", "/m", "--id", "x"], "--id and --supervisor"),
    (["fuse", "--mountpoint", "/m", "--shared-dir", "/s", "--bootstrap", "/b"], "cannot be used together"),
    (["fuse", "--mountpoint", "/m", "--shared-dir", "/nonexistent/s"], "shared directory '/nonexistent/s'"),
    (["fuse", "--mountpoint", "/m", "--prefetch-files", "/p"], "requires --bootstrap"),
    (["fuse", "--mountpoint", "/m", "--bootstrap", "/b"], "both --config and --localfs-dir are missing"),
])
def test_bad_combinations_are_refused_with_the_reason(argv, reason, capsys, tmp_path):
    argv = argv + ["--log-file", str(tmp_path / "nydusd")]
    assert nydusd.main(argv) == 1
    err = capsys.readouterr().err
    assert reason in err and "Traceback" not in err
    assert (tmp_path / "nydusd.log").exists()  # upstream adds .log to a name without extension


def test_singleton_is_refused_and_version_prints_git_commit(capsys):
    assert nydusd.main(["singleton"]) == 1
    assert "not supported" in capsys.readouterr().err
    assert nydusd.main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("nydusd") and "Git Commit:" in out and "Version:" in out


def test_dedup_db_and_writable_without_overlay_are_warned(tmp_path, caplog):
    import logging

    args = nydusd.build_parser().parse_args(["fuse", "--mountpoint", "/m", "--bootstrap", "/b", "--localfs-dir",
                                             "/d", "--dedup-db", "/tmp/cas.db", "--writable"])
    with caplog.at_level(logging.WARNING, logger="nydus_vfs"):
        nydusd._check_args(args)
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "--dedup-db /tmp/cas.db" in text and "--writable" in text


def test_a_fatal_signal_leaves_a_traceback_in_the_log(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    log = tmp_path / "nydusd.log"
    code = ("import os, signal, sys; from nydus_vfs.cli import nydusd; nydusd._enable_crash_traces(sys.argv[1]); "
            "os.kill(os.getpid(), signal.SIGSEGV)")
    r = subprocess.run([sys.executable, "-c", code, str(log)], capture_output=True, timeout=60,
                       env={**os.environ})
    assert r.returncode == -signal.SIGSEGV
    assert "Fatal Python error: Segmentation fault" in log.read_text()
