"""nydus_vfs.utils.logging: levels, the upstream line format, log file naming, rotation."""

from __future__ import annotations

import io
import logging
import logging.handlers
import re
import sys

import pytest

from nydus_vfs.errors import ConfigError
from nydus_vfs.utils import logging as nlog

LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}) ([+-]\d\d:\d\d)\] (TRACE|DEBUG|INFO|WARN|ERROR) (.*)$")


@pytest.fixture
def root_restored():
    """Undo what setup_logging does to the root logger."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield root
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    root.setLevel(level)


def _record(level: int, msg: str = "hello %s", args=("world",), path: str = __file__, lineno: int = 42):
    return logging.LogRecord("nydus_vfs.test", level, path, lineno, msg, args, None)


def test_info_line_has_no_source():
    line = nlog.NydusFormatter().format(_record(logging.INFO))
    m = LINE.match(line)
    assert m and m.group(3) == "INFO" and m.group(4) == "hello world"


@pytest.mark.parametrize("level, name", [(nlog.TRACE, "TRACE"), (logging.DEBUG, "DEBUG"),
                                         (logging.WARNING, "WARN"), (logging.ERROR, "ERROR"),
                                         (logging.CRITICAL, "ERROR")])
def test_non_info_lines_carry_file_and_line(level, name):
    line = nlog.NydusFormatter().format(_record(level))
    m = LINE.match(line)
    assert m and m.group(3) == name
    assert m.group(4) == "[/" + __file__.lstrip("/") + ":42] hello world"


def test_source_is_relative_to_the_package_parent():
    import nydus_vfs.config as cfgmod

    line = nlog.NydusFormatter().format(_record(logging.DEBUG, path=cfgmod.__file__, lineno=7))
    assert line.endswith("] DEBUG [nydus_vfs/config.py:7] hello world")


def test_timestamp_offset_matches_local_time():
    import datetime

    rec = _record(logging.INFO)
    m = LINE.match(nlog.NydusFormatter().format(rec))
    expected = datetime.datetime.fromtimestamp(rec.created).astimezone()
    assert m.group(1) == expected.strftime("%Y-%m-%d %H:%M:%S.%f")
    off = expected.strftime("%z")
    assert m.group(2) == f"{off[:3]}:{off[3:]}"


def test_exception_text_follows_message():
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    out = nlog.NydusFormatter().format(rec)
    assert out.splitlines()[0].endswith("failed") and "ValueError: boom" in out


def test_colour_only_when_asked():
    plain = nlog.NydusFormatter(colour=False).format(_record(logging.WARNING))
    coloured = nlog.NydusFormatter(colour=True).format(_record(logging.WARNING))
    assert "\x1b[" not in plain and "\x1b[33m" in coloured


@pytest.mark.parametrize("name, level", [("trace", nlog.TRACE), ("debug", logging.DEBUG), ("INFO", logging.INFO),
                                         ("warn", logging.WARNING), ("error", logging.ERROR)])
def test_parse_level(name, level):
    assert nlog.parse_level(name) == level


def test_off_is_above_everything_and_bad_levels_are_refused():
    assert nlog.parse_level("off") > logging.CRITICAL
    for bad in ("warning", "verbose", "", None):
        with pytest.raises(ConfigError, match="invalid log level"):
            nlog.parse_level(bad)


@pytest.mark.parametrize("given, expected", [("nydusd", "nydusd.log"), ("nydusd.txt", "nydusd.txt"),
                                             ("logs/d", "logs/d.log"), ("a.b.c", "a.b.c"), (".hidden", ".hidden.log")])
def test_log_file_naming(tmp_path, monkeypatch, given, expected):
    monkeypatch.chdir(tmp_path)
    assert nlog.resolve_log_path(given) == tmp_path / expected


def test_absolute_log_path_kept(tmp_path):
    assert nlog.resolve_log_path(tmp_path / "x" / "daemon") == tmp_path / "x" / "daemon.log"


@pytest.mark.parametrize("bad", ["", ".", "/"])
def test_log_path_without_file_name(bad):
    with pytest.raises(ConfigError, match="invalid log file name"):
        nlog.resolve_log_path(bad)


def test_setup_logging_to_file_appends(tmp_path, monkeypatch, root_restored):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "daemon.log").write_text("previous line\n")
    path = nlog.setup_logging("info", "sub/daemon")
    assert path == tmp_path / "sub" / "daemon.log"
    log = logging.getLogger("nydus_vfs.test_logging")
    log.info("started %d", 1)
    log.debug("hidden at info")
    lines = path.read_text().splitlines()
    assert lines[0] == "previous line"
    assert len(lines) == 2 and LINE.match(lines[1]).group(4) == "started 1"


def test_setup_twice_replaces_only_our_handler(tmp_path, root_restored):
    foreign = logging.NullHandler()
    root_restored.addHandler(foreign)
    nlog.setup_logging("debug", tmp_path / "one.log")
    nlog.setup_logging("debug", tmp_path / "two.log")
    files = [h.baseFilename for h in root_restored.handlers if isinstance(h, logging.FileHandler)]
    assert [f for f in files if f.startswith(str(tmp_path))] == [str(tmp_path / "two.log")]
    assert foreign in root_restored.handlers


def test_set_level_at_run_time(tmp_path, root_restored):
    path = nlog.setup_logging("error", tmp_path / "d.log")
    log = logging.getLogger("nydus_vfs.test_logging")
    log.warning("dropped")
    nlog.set_level("trace")
    log.log(nlog.TRACE, "kept")
    nlog.set_level("off")
    log.error("dropped too")
    lines = path.read_text().splitlines()
    assert len(lines) == 1 and " TRACE [" in lines[0] and lines[0].endswith("kept")
    with pytest.raises(ConfigError):
        nlog.set_level("loud")


def test_stderr_by_default(root_restored, monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buf)
    assert nlog.setup_logging("info", None) is None
    logging.getLogger("nydus_vfs.test_logging").info("to stderr")
    out = buf.getvalue()
    assert LINE.match(out.rstrip("\n")) and "\x1b[" not in out  # StringIO is not a terminal


def test_rotation_keeps_ten_plain_files(tmp_path, root_restored):
    path = nlog.setup_logging("info", tmp_path / "r.log", rotation_size_mb=1)
    handler = next(h for h in root_restored.handlers if getattr(h, "baseFilename", None) == str(path))
    assert isinstance(handler, logging.handlers.RotatingFileHandler)
    assert handler.maxBytes == 1024 * 1024 and handler.backupCount == 10
    log = logging.getLogger("nydus_vfs.test_logging")
    chunk = "x" * 4096
    for _ in range(300):
        log.info(chunk)
    assert (tmp_path / "r.log.1").exists() and path.stat().st_size <= 1024 * 1024


def test_bad_rotation_and_unopenable_file(tmp_path, root_restored):
    with pytest.raises(ConfigError, match="rotation size"):
        nlog.setup_logging("info", tmp_path / "a.log", rotation_size_mb=-1)
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="cannot open log file"):
        nlog.setup_logging("info", tmp_path / "file" / "below.log")
