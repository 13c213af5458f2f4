"""scripts/bench/build.py keeps working: a tiny run against mkfs.erofs (with a git
baseline), and the refusal of a tree below the size floor.

The run needs erofs-utils and skips with the reason otherwise.  Nothing here
asserts on timings: they only have to be there.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import shutil
import subprocess
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "bench"


@pytest.fixture(scope="module")
def bench():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))   # the script imports its sibling ``_common``
    spec = importlib.util.spec_from_file_location("bench_build", BENCH / "build.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod          # dataclasses look their module up here
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


def _tree(root: pathlib.Path) -> pathlib.Path:
    src = root / "src"
    (src / "d").mkdir(parents=True)
    for i in range(12):
        (src / "d" / f"f{i}").write_bytes(bytes([i]) * (3000 * i + 1) + b"text " * 500)
    (src / "empty").write_bytes(b"")
    (src / "link").symlink_to("d/f1")
    return src


def _git_has_head() -> bool:
    proc = subprocess.run(["git", "-C", str(BENCH), "rev-parse", "--verify", "HEAD"], capture_output=True)
    return proc.returncode == 0


@pytest.mark.skipif(shutil.which("mkfs.erofs") is None, reason="mkfs.erofs (erofs-utils) is not installed")
def test_tiny_run_reports_ratios_sizes_and_phases(bench, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("NYDUS_BENCH_CACHE", str(tmp_path / "cache"))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = ["--tree", str(_tree(tmp_path)), "--min-mb", "0", "--min-files", "1", "--runs", "1",
            "--cases", "none,lz4", "--out-dir", str(out_dir), "--json", str(tmp_path / "r.json")]
    baseline = _git_has_head()
    if baseline:
        args += ["--baseline", "HEAD"]
    rc = bench.main(args)
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = [line for line in out.splitlines() if line.startswith(("none:", "lz4:"))]
    labels = {line.split("  ")[0] for line in rows}
    assert {"none: ours vs mkfs.erofs", "lz4: ours vs mkfs.erofs -zlz4", "none: ours", "lz4: ours"} <= labels
    if baseline:
        assert "none: ours (baseline) vs mkfs.erofs" in labels
    assert "check (none, ours): 0: " in out      # nydus-image check accepted the image
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["source"] == "copy" and set(data["cases"]) == {"none", "lz4"}
    for case in ("none", "lz4"):
        ours = data["cases"][case]["ours"]
        assert ours["size_ratio"] > 0 and ours["throughput_ratio"] > 0
        assert ours["traced"][0]["phases"]["total_build"] > 0
    assert list(out_dir.iterdir()) == []          # the scratch dir is gone


def test_a_tree_below_the_floor_is_refused(bench, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("NYDUS_BENCH_CACHE", str(tmp_path / "cache"))
    rc = bench.main(["--tree", str(_tree(tmp_path)), "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 1
    assert "is too small" in out and "need at least" in out
