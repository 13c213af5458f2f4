"""scripts/bench/fuse_walk_read.py and its helpers in scripts/bench/_common.py.

The pure parts (tables, ratios, mirror and mountinfo parsing, the build cache,
listing comparison, trace analysis) run everywhere; one small end-to-end run
(erofs, squashfuse and our daemon on a tiny tree, one repetition) needs root,
/dev/fuse, erofs and the Debian tools, and skips with the reason otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import sys

import pytest

from tests.conftest import fuse_unavailable_reason

BENCH = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "bench"


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))   # the script imports its sibling ``_common``
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod        # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def common():
    return _load("_common")


@pytest.fixture(scope="module")
def bench(common):
    return _load("fuse_walk_read")


# -- _common ---------------------------------------------------------------------------------

def test_ratio_and_table(common):
    assert common.ratio(3.0, 2.0) == "1.50x"
    assert common.ratio(None, 2.0) == "-" and common.ratio(1.0, 0) == "-"
    text = common.render_table(["name", "value"], [["a", "1"], ["long-name", "22"]])
    lines = text.splitlines()
    assert lines[0].startswith("name") and lines[2].startswith("a ")
    assert lines[3].endswith("22") and lines[2].endswith(" 1")   # numbers right-aligned
    md = common.render_table(["x", "y"], [[1, 2]], markdown=True)
    assert md.splitlines() == ["| x | y |", "|---|---|", "| 1 | 2 |"]


def test_debian_mirror_skips_security_and_comments(common, tmp_path):
    (tmp_path / "a.sources").write_text(
        "Types: deb\n# URIs: http://commented.example/debian\n"
        "URIs: http://security.debian.org/debian-security\n")
    (tmp_path / "b.list").write_text("deb [arch=amd64] http://mirror.example/debian/ bookworm main\n")
    assert common.debian_mirror([str(tmp_path)]) == "http://mirror.example/debian"
    assert common.debian_mirror([str(tmp_path / "missing")]) == "http://deb.debian.org/debian"


def test_mountinfo_unescape(common):
    assert common._unescape_mountinfo(r"/tmp/a\040b\134c") == "/tmp/a b\\c"
    assert common._unescape_mountinfo(r"/x\04") == r"/x\04"   # truncated escape kept as is


def test_tree_stats_counts_by_lstat(common, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"x" * 10)
    (tmp_path / "g").write_bytes(b"y" * 5)
    (tmp_path / "l").symlink_to("d/f")
    os.mkfifo(tmp_path / "p")
    s = common.tree_stats(tmp_path)
    assert (s.files, s.dirs, s.symlinks, s.others, s.bytes) == (2, 1, 1, 1, 15)
    assert s.entries == 5


def test_prepare_tree_refuses_small_tree(common, tmp_path):
    (tmp_path / "f").write_bytes(b"z")
    with pytest.raises(common.BenchError, match="too small"):
        common.prepare_tree(str(tmp_path), min_bytes=10, min_files=1, log=lambda m: None)
    path, stats, _ = common.prepare_tree(str(tmp_path), min_bytes=1, min_files=1, log=lambda m: None)
    assert path == tmp_path.resolve() and stats.files == 1


def test_cached_dir_rebuilds_only_on_recipe_change(common, tmp_path):
    calls = []

    def build(out):
        calls.append(out.name)
        (out / "x").write_text(str(len(calls)))

    target = tmp_path / "img"
    common.cached_dir(target, {"v": 1}, build, log=lambda m: None)
    common.cached_dir(target, {"v": 1}, build, log=lambda m: None)
    assert len(calls) == 1 and (target / "x").read_text() == "1"
    common.cached_dir(target, {"v": 2}, build, log=lambda m: None)
    assert len(calls) == 2 and (target / "x").read_text() == "2"

    def broken(out):
        (out / "half").write_text("")
        raise common.BenchError("tool failed")

    with pytest.raises(common.BenchError):
        common.cached_dir(target, {"v": 3}, broken, log=lambda m: None)
    assert not target.exists() and not (tmp_path / "img.partial").exists()


def test_cpu_times_of_self(common):
    t = common.cpu_times(os.getpid())
    assert t.user >= 0 and t.on_cpu > 0 and t.runqueue_wait >= 0
    with pytest.raises(common.BenchError, match="gone"):
        common.cpu_times(2**22 + 12345)


def test_exclusive_lock_refuses_second_holder(common, tmp_path):
    lock = tmp_path / "l"
    with common.exclusive_lock(lock):
        with pytest.raises(common.BenchError, match="another benchmark run"):
            with common.exclusive_lock(lock):
                pass
    with common.exclusive_lock(lock):   # released again
        pass


# -- fuse_walk_read: pure parts ----------------------------------------------------------------

def test_parse_walk_ignores_directory_sizes(bench):
    out = (b"d 755 4096 0 0 \0\0" b"d 755 4096 0 0 etc\0\0" b"f 644 12 0 0 etc/my file\0\0"
           b"l 777 7 0 0 lnk\0etc/x\0")
    got = bench.parse_walk(out)
    assert got["etc"][2] == b"-"
    assert got["etc/my file"] == (b"f", b"644", b"12", b"0", b"0", b"")
    assert got["lnk"][5] == b"etc/x"
    want = dict(got)
    want["etc/my file"] = (b"f", b"644", b"13", b"0", b"0", b"")
    problems = bench.compare("x", got, want, "entries")
    assert len(problems) == 1 and "1 entries differ" in problems[0]
    del want["lnk"]
    assert any("unexpected" in p for p in bench.compare("x", got, want, "entries"))


def test_trace_line_and_analysis(bench):
    send = ("   cat-123 [001] .....  100.000100: fuse_request_send: connection 45 req 8 "
            "opcode 15 (FUSE_READ) len 80")
    end = "   nydusd-9 [000] .....  100.000400: fuse_request_end: connection 45 req 8 len 65552 error 0"
    m1, m2 = bench._TRACE_LINE.search(send), bench._TRACE_LINE.search(end)
    assert (m1.group(1), m1.group(8)) == ("cat", "FUSE_READ") and m2.group(10) == "65552"
    events = [
        (100.0001, "send", 45, 8, "READ", 80, 0, "cat"),
        (100.0002, "send", 45, 9, "OPEN", 48, 0, "cat"),
        (100.0003, "end", 45, 9, None, 32, 0, "nydusd"),
        (100.0004, "end", 45, 8, None, 16 + 65536, 0, "nydusd"),
        (100.0005, "send", 45, 10, "FLUSH", 64, 0),   # never answered; no comm recorded
    ]
    t = bench.analyze_trace(events)
    assert t["requests"] == 3 and t["max_inflight"] == 2 and t["unanswered"] == 1
    assert t["ops"]["READ"]["count"] == 1 and round(t["ops"]["READ"]["median_us"]) == 300
    assert t["read_bytes"] == 65536 and t["read_sizes"] == {131072: 1} and t["read_max"] == 65536
    assert t["requesters"] == {"cat": 2}


def test_unknown_system_is_refused(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--systems", "plain,nonsense"])
    assert "unknown systems ['nonsense']" in capsys.readouterr().err


# -- end to end --------------------------------------------------------------------------------

def _e2e_unavailable() -> str | None:
    reason = fuse_unavailable_reason()
    if reason:
        return reason
    missing = [t for t in ("mkfs.erofs", "mksquashfs", "squashfuse") if shutil.which(t) is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install erofs-utils squashfs-tools squashfuse)"
    with open("/proc/filesystems") as f:
        if "erofs" not in f.read():
            return "the kernel has no erofs"
    return None


@pytest.mark.root
@pytest.mark.skipif(_e2e_unavailable() is not None, reason=_e2e_unavailable() or "")
def test_tiny_run_end_to_end(bench, common, tmp_path, monkeypatch, capsys):
    tree = tmp_path / "tree"
    (tree / "sub" / "deeper").mkdir(parents=True)
    for i in range(30):
        (tree / "sub" / f"f{i}").write_bytes(os.urandom(1000 * i + 1))
    (tree / "sub" / "deeper" / "big").write_bytes(os.urandom(300_000))
    (tree / "link").symlink_to("sub/f3")
    monkeypatch.setenv("NYDUS_BENCH_CACHE", str(tmp_path / "cache"))
    out_json = tmp_path / "out.json"
    rc = bench.main(["--tree", str(tree), "--min-mb", "0", "--min-files", "1", "--reps", "1",
                     "--systems", "plain,erofs,squashfuse,nydusd-none-cache", "--squashfs-comp", "none",
                     "--no-profile", "--json", str(out_json)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "verified: listings" in out and "VERIFY" not in out
    data = json.loads(out_json.read_text())
    ours = data["systems"]["nydusd-none-cache"]
    assert ours["walk"] > 0 and ours["read"] > 0 and ours["read_warm"] > 0
    assert ours["daemon"]["read"]["user"] >= 0
    assert "nydusd-none-cache" in out.split("ratios")[1]
    # Everything was taken down.
    assert common.mounts_under(tmp_path) == []
