"""scripts/bench/virtiofs.py keeps working: a tiny run against C virtiofsd, and the
"ours unavailable" path reported with its reason instead of a crash."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

from tests.harness import virtiofsd_unavailable_reason

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "bench" / "virtiofs.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_virtiofs", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod          # dataclasses look their module up here
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


@pytest.mark.skipif(virtiofsd_unavailable_reason() is not None, reason=virtiofsd_unavailable_reason() or "")
def test_peer_run(bench, capsys, tmp_path):
    rc = bench.main(["--peer-only", "--duration", "0.1", "--rounds", "1", "--file-size", "1", "--no-pin",
                     "--workloads", "getattr qd64,read 128k seq qd16", "--workdir", str(tmp_path),
                     "--json", str(tmp_path / "out.json")])
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = {line.split("  ")[0].strip(): line for line in out.splitlines() if line.startswith(("getattr", "read"))}
    assert set(rows) == {"getattr qd64", "read 128k seq qd16"}
    assert "op/s" in rows["getattr qd64"] and "MiB/s" in rows["read 128k seq qd16"]
    assert "BAD LEN" not in out and "FAILED" not in out
    assert (tmp_path / "out.json").read_text().startswith("[")


def test_ours_unavailable_is_reported(bench, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "nydusd_command", lambda: None)
    rc = bench.main(["--ours-only", "--duration", "0.1", "--rounds", "1", "--file-size", "1", "--no-pin",
                     "--workloads", "getattr qd1", "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 1
    assert "ours: UNAVAILABLE: no nydusd console script" in out
