"""scripts/bench/write_path.py keeps working: a tiny run prints one row per size, one column per cap."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

from nydus_vfs._native import binding

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "bench" / "write_path.py"

pytestmark = pytest.mark.skipif(not binding.available(), reason=f"{binding.unavailable_reason()}")


def test_tiny_run(capsys, tmp_path):
    spec = importlib.util.spec_from_file_location("bench_write_path", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rc = mod.main(["--sizes", "4k,64k", "--copy", "0,4096", "--rounds", "2", "--batches", "3",
                   "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = [line.split() for line in out.splitlines() if line.strip() and line.split()[0].isdigit()]
    assert [r[0] for r in rows] == ["4096", "65536"] and all(len(r) == 3 for r in rows)
    assert all(float(x) > 0 for r in rows for x in r[1:])
    assert list(tmp_path.iterdir()) == []                 # the shared directory is cleaned up
